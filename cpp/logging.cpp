// llama.cpp / ggml log output -> a Python callable (lamina routes it to logging "lamina").
//
// ggml logs in fragments (GGML_LOG_LEVEL_CONT continues a line) and from any thread, often with
// the GIL released and inside llama.cpp. Lines are assembled per thread; those at or above the
// threshold Python set go to a queue. The log callback never takes the GIL: the queue is delivered
// to Python where the GIL is held already, outside llama.cpp (when a lamina call takes the GIL back
// after a GIL-free section: gil_release, gil_acquire), and by a pending call in the main thread for
// lines from threads that never return to Python (ggml's workers).
#include "lamina.h"

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

namespace lamina {
namespace {

std::atomic<int> g_min_level{GGML_LOG_LEVEL_WARN};
std::atomic<bool> g_enabled{false};
PyObject * g_sink = nullptr;  // strong reference, owned while g_enabled
std::mutex g_last_error_mutex;
std::string g_last_error;
std::string g_first_error;  // the first error since clear_last_log_error: usually the cause
alloc_failure g_alloc_failure;  // guarded by g_last_error_mutex

std::mutex g_queue_mutex;                      // guards g_queue and g_dropped (held for a push or a swap only)
std::deque<std::pair<int, std::string>> g_queue;
size_t g_dropped = 0;                          // lines the full queue could not take
constexpr size_t k_queue_max = 10000;
std::atomic<bool> g_pending_call{false};       // a pending call to deliver is scheduled

int deliver_pending(void *) {  // Python's pending call: the main thread, GIL held
    g_pending_call.store(false);
    log_deliver_queued();  // not inside a lease (a signal handler run during a decode): its end delivers
    return 0;
}

thread_local std::string t_line;
thread_local std::vector<std::pair<int, std::string>> * t_layers = nullptr;
thread_local int t_level = GGML_LOG_LEVEL_INFO;

void log_callback(ggml_log_level level, const char * text, void *) {
    int lvl = level == GGML_LOG_LEVEL_CONT ? t_level : static_cast<int>(level);
    t_level = lvl;
    t_line += text ? text : "";
    if (t_line.empty() || t_line.back() != '\n') return;
    std::string line;
    line.swap(t_line);
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    if (t_layers != nullptr) {
        // "load_tensors: layer  12 assigned to device CUDA0, is_swa = 0"
        size_t at = line.find("layer ");
        size_t dev = line.find(" assigned to device ");
        if (at != std::string::npos && dev != std::string::npos && dev > at) {
            size_t end = line.find(',', dev);
            size_t name0 = dev + std::strlen(" assigned to device ");
            t_layers->emplace_back(std::atoi(line.c_str() + at + 6),
                                   line.substr(name0, end == std::string::npos ? std::string::npos : end - name0));
        }
    }
    if (lvl >= GGML_LOG_LEVEL_ERROR) {
        std::lock_guard<std::mutex> lock(g_last_error_mutex);
        g_last_error = line;
        if (g_first_error.empty()) g_first_error = line;
        // "alloc_tensor_range: failed to allocate CUDA0 buffer of size 1048576000" (and gallocr's)
        size_t at = line.find("failed to allocate ");
        size_t of = line.find(" buffer of size ");
        if (g_alloc_failure.device.empty() && at != std::string::npos && of != std::string::npos && of > at) {
            size_t name0 = at + std::strlen("failed to allocate ");
            g_alloc_failure.device = line.substr(name0, of - name0);
            g_alloc_failure.bytes = std::strtoull(line.c_str() + of + std::strlen(" buffer of size "), nullptr, 10);
        }
    }
    if (line.empty() || lvl < g_min_level.load() || !g_enabled.load()) return;
    {
        std::lock_guard<std::mutex> lock(g_queue_mutex);
        if (g_queue.size() >= k_queue_max) {
            ++g_dropped;
        } else {
            g_queue.emplace_back(lvl, std::move(line));
        }
        g_log_queued.store(int(g_queue.size()) + (g_dropped > 0));
    }
    // the main thread delivers at its next bytecode boundary, unless a lamina call does it first
    if (!g_exiting.load() && !g_pending_call.exchange(true)) {
        if (Py_AddPendingCall(deliver_pending, nullptr) != 0) g_pending_call.store(false);
    }
}

}  // namespace

std::atomic<int> g_log_queued{0};

void log_deliver() {
    // Counted as a call that exit waits for: a handler that drops the GIL (its I/O) and would take it
    // back during finalization meets Python's pthread_exit inside lamina's frames (std::terminate).
    // Once the interpreter exits, threads other than the main one deliver nothing more.
    llama_work delivering;
    if (g_exiting.load() && !on_main_thread()) return;
    std::deque<std::pair<int, std::string>> lines;
    size_t dropped;
    {
        std::lock_guard<std::mutex> lock(g_queue_mutex);
        lines.swap(g_queue);
        dropped = g_dropped;
        g_dropped = 0;
        g_log_queued.store(0);
    }
    if (dropped > 0) {
        lines.emplace_back(GGML_LOG_LEVEL_WARN, "lamina: " + std::to_string(dropped) +
                                                " llama.cpp log lines were dropped (more than " +
                                                std::to_string(k_queue_max) + " waited for Python)");
    }
    // an exception on its way to Python (a destructor delivering during unwinding) waits meanwhile
    PyObject *et = nullptr, *ev = nullptr, *tb = nullptr;
    PyErr_Fetch(&et, &ev, &tb);
    struct restore {
        PyObject *&t, *&v, *&b;
        ~restore() { PyErr_Restore(t, v, b); }
    } keep{et, ev, tb};
    for (const auto & [lvl, line] : lines) {
        if (!g_enabled.load() || g_sink == nullptr) return;
        // no "s#" format: nanobind does not define PY_SSIZE_T_CLEAN, and without it the call fails
        PyObject * text_obj = PyUnicode_DecodeUTF8(line.data(), Py_ssize_t(line.size()), "replace");
        PyObject * res = text_obj ? PyObject_CallFunction(g_sink, "iO", lvl, text_obj) : nullptr;
        Py_XDECREF(text_obj);
        if (res == nullptr) {
            if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
                PyErr_Clear();
                PyErr_SetInterrupt();  // a Ctrl-C that landed in the handler is raised at the next check, not lost
            } else {
                PyErr_WriteUnraisable(g_sink);  // report a failing handler, but never break a load or decode
            }
        } else {
            Py_DECREF(res);
        }
    }
}

void capture_layer_devices(std::vector<std::pair<int, std::string>> * out) { t_layers = out; }

bool log_says_out_of_memory(const std::string & why) {
    return why.find("alloc") != std::string::npos || why.find("memory") != std::string::npos;
}

std::string last_log_error() {
    std::lock_guard<std::mutex> lock(g_last_error_mutex);
    return g_last_error;
}

std::string first_log_error() {
    std::lock_guard<std::mutex> lock(g_last_error_mutex);
    return g_first_error;
}

void clear_last_log_error() {
    std::lock_guard<std::mutex> lock(g_last_error_mutex);
    g_last_error.clear();
    g_first_error.clear();
    g_alloc_failure = {};
}

alloc_failure first_alloc_failure() {
    std::lock_guard<std::mutex> lock(g_last_error_mutex);
    return g_alloc_failure;
}

void init_logging(nb::module_ & m) {
    llama_log_set(log_callback, nullptr);

    m.def("log_set_sink", [](nb::object sink, int min_level) {
        if (!sink.is_none() && !PyCallable_Check(sink.ptr())) {
            throw std::invalid_argument("log sink must be callable or None");
        }
        log_deliver();  // lines queued for the old sink go to it
        g_enabled = false;
        PyObject * old = g_sink;
        g_sink = sink.is_none() ? nullptr : sink.inc_ref().ptr();
        Py_XDECREF(old);
        g_min_level = min_level;
        g_enabled = g_sink != nullptr;
    }, nb::arg("sink").none(), nb::arg("min_level"),
    R"(Route llama.cpp log lines at or above ``min_level`` (ggml levels: 1 debug, 2 info,
3 warn, 4 error) to ``sink(level, line)``; ``None`` drops them all.)");

    m.def("log_set_level", [](int min_level) { g_min_level = min_level; }, nb::arg("min_level"),
          "Change the lowest ggml log level forwarded to the sink.");
    m.def("log_flush", &log_deliver, "Deliver the llama.cpp log lines waiting for Python now.");
}

}  // namespace lamina
