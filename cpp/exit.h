// The GIL, signals and interpreter exit: every GIL-free section of lamina (gil_release), every
// thread that takes the GIL (gil_acquire), every call into llama.cpp that exit waits for
// (llama_work), and where llama.cpp's queued log lines reach Python.
#pragma once

#include <nanobind/nanobind.h>

#include <atomic>

namespace lamina {

// Python's signal check, done with the GIL held; raises KeyboardInterrupt etc. as nb::python_error.
void check_signals();
// Whether the calling thread (GIL held) is Python's main thread, where signal handlers run.
bool on_main_thread();
// A Python exception taken from the interpreter (GIL held) to raise later, from another frame.
struct held_error {
    nb::object type, value, tb;
    void take() {
        PyObject *t, *v, *b;
        PyErr_Fetch(&t, &v, &b);
        type = nb::steal(t), value = nb::steal(v), tb = nb::steal(b);
    }
    explicit operator bool() const { return type.is_valid(); }
    [[noreturn]] void raise() {
        PyErr_Restore(type.release().ptr(), value.release().ptr(), tb.release().ptr());
        throw nb::python_error();
    }
};

// ---- interpreter exit ---------------------------------------------------------------------
// Set by prepare_exit (lamina's last atexit handler, in the main thread) before the interpreter
// finalizes. From then on a thread other than the main one that leaves a GIL-free section parks
// (sleeps until the process ends) instead of taking the GIL back: Python 3.11 ends such a thread
// with pthread_exit, whose unwinding through lamina's C++ ends in std::terminate, and a daemon
// thread still inside llama.cpp when C++'s static objects are destroyed crashed the process.
extern std::atomic<bool> g_exiting;
// Calls into llama.cpp running now (llama_work scopes), and threads taking the GIL back (past the
// check of g_exiting): prepare_exit waits for both.
extern std::atomic<int> g_llama_work;
extern std::atomic<int> g_taking_gil;
// Sleep until the process ends (never holding the GIL or a lock), no longer counted in g_llama_work.
[[noreturn]] void park_forever();
// After fork(): the child's counters start again (the parent's threads do not exist there).
void exit_state_after_fork();

// Whether the calling thread holds the GIL. PyGILState_Check is not in the limited API that the
// abi3 build (Python >= 3.12) compiles against, so lamina keeps the answer itself: a thread
// Python has no state for (ggml's workers, the Batcher's loop) holds no GIL; a Python thread runs
// lamina code with the GIL (it called in from Python) except inside a gil_release, where
// t_gil_released is set, and outside a gil_acquire nested in one, which clears it again. Every
// GIL release and acquire in cpp/ goes through these two classes.
extern thread_local bool t_gil_released;
inline bool gil_held() { return !t_gil_released && PyGILState_GetThisThreadState() != nullptr; }

// llama.cpp's log lines wait in a queue (logging.cpp) until a thread holding the GIL delivers them:
// after every GIL-free section (the classes below), and in the main thread through a pending call.
// Lines are delivered only outside every context lease of the thread (t_leases == 0), so a log
// handler may use the context that logged.
extern std::atomic<int> g_log_queued;
extern thread_local int t_leases;  // context leases this thread holds (context_lease)
void log_deliver();  // GIL held
inline void log_deliver_queued() {
    if (g_log_queued.load(std::memory_order_relaxed) > 0 && t_leases <= 0) log_deliver();
}

// nb::gil_scoped_release, with the park above; used for every GIL-free section of lamina.
class gil_release {
public:
    gil_release() : state_(PyEval_SaveThread()), was_released_(t_gil_released) { t_gil_released = true; }
    ~gil_release() {
        g_taking_gil.fetch_add(1);  // seq_cst with prepare_exit's store of g_exiting: one sees the other
        if (g_exiting.load() && !on_main_thread()) {
            g_taking_gil.fetch_sub(1);
            park_forever();
        }
        PyEval_RestoreThread(state_);
        t_gil_released = was_released_;
        g_taking_gil.fetch_sub(1);
        if (!t_gil_released) log_deliver_queued();
    }
    gil_release(const gil_release &) = delete;
    gil_release & operator=(const gil_release &) = delete;
private:
    PyThreadState * state_;
    bool was_released_;
};

// f() in a GIL-free section; returns what f returns.
template <typename F>
auto without_gil(F f) {
    gil_release nogil;
    return f();
}

// nb::gil_scoped_acquire for a thread that runs without the GIL, with the same park.
class gil_acquire {
public:
    gil_acquire() {
        g_taking_gil.fetch_add(1);
        if (g_exiting.load() && !on_main_thread() && !gil_held()) {  // never parks holding the GIL
            g_taking_gil.fetch_sub(1);
            park_forever();
        }
        state_ = PyGILState_Ensure();
        was_released_ = t_gil_released;
        t_gil_released = false;
        g_taking_gil.fetch_sub(1);
    }
    ~gil_acquire() {
        log_deliver_queued();
        t_gil_released = was_released_;
        PyGILState_Release(state_);
    }
    gil_acquire(const gil_acquire &) = delete;
    gil_acquire & operator=(const gil_acquire &) = delete;
private:
    PyGILState_STATE state_;
    bool was_released_ = false;
};

// A call into llama.cpp that must not be running when the process ends (decode, sampling reads,
// load, context creation, state, a draft, adapters): counted for prepare_exit. Once the
// interpreter exits, a thread other than the main one parks here instead of starting one (it
// holds no lock yet: make it before taking any). A thread parking anywhere stops counting its own.
extern thread_local int t_llama_work;
class llama_work {
public:
    llama_work() {
        g_llama_work.fetch_add(1);
        ++t_llama_work;
        if (g_exiting.load() && !on_main_thread() && !gil_held()) park_forever();
    }
    ~llama_work() {
        --t_llama_work;
        g_llama_work.fetch_sub(1);
    }
    llama_work(const llama_work &) = delete;
    llama_work & operator=(const llama_work &) = delete;
};

// For one multi-token decode in Python's main thread (GIL held when made and destroyed): Python's
// signal wakeup fd points at lamina's pipe, so the abort callback notices a signal with a read()
// and takes the GIL only then (signals.cpp). Inactive when `on` is false or Python refuses.
class signal_watch {
public:
    explicit signal_watch(bool on);
    ~signal_watch();
    signal_watch(const signal_watch &) = delete;
    signal_watch & operator=(const signal_watch &) = delete;
    bool active() const { return active_; }
private:
    bool active_ = false;
    int old_fd_ = -1;
};
// In the abort callback, without the GIL: whether a signal arrived during the active watch.
bool signal_arrived();

}  // namespace lamina
