// Interpreter exit with lamina work still running in daemon threads (see gil_release in
// lamina.h). prepare_exit runs as lamina's last atexit handler: after the Batchers closed, before
// the interpreter finalizes and C++'s static objects (ggml's backends among them) are destroyed.
#include "lamina.h"

#include <chrono>
#include <cstdlib>
#include <thread>

namespace lamina {

std::atomic<bool> g_exiting{false};
std::atomic<int> g_llama_work{0};
std::atomic<int> g_taking_gil{0};

thread_local int t_llama_work = 0;
thread_local bool t_gil_released = false;
thread_local int t_leases = 0;

void park_forever() {
    g_llama_work.fetch_sub(t_llama_work);  // this thread's calls into llama.cpp end here, as far as exit goes
    t_llama_work = 0;
    while (true) std::this_thread::sleep_for(std::chrono::hours(1));
}

void exit_state_after_fork() {
    g_llama_work.store(0);
    g_taking_gil.store(0);
    g_exiting.store(false);
    t_llama_work = 0;
}

namespace {

// Stop daemon threads' llama.cpp work: decodes abort at their next graph node (abort_requested),
// every thread that leaves a GIL-free section parks; waits up to `timeout` seconds for the calls
// into llama.cpp to end. Returns how many were still running.
int prepare_exit(double timeout, bool others) {
    if (!on_main_thread()) return 0;  // only the interpreter's own exit (this call caches the id, GIL held)
    g_exiting.store(true);  // seq_cst: see gil_release
    // With other threads alive, one may park and keep its objects: nanobind would call them leaks ("likely a reference
    // counting issue") at the module's teardown. LAMINA_LEAK_WARNINGS=1 keeps the report.
    const char * keep = std::getenv("LAMINA_LEAK_WARNINGS");
    if (others && (keep == nullptr || std::string(keep) != "1")) nb::set_leak_warnings(false);
    gil_release nogil;
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
    // a thread that passed the check before the store takes the GIL now, while this one waits
    // without it, and runs Python code (which Python ends at finalization as any daemon thread)
    while ((g_llama_work.load() > 0 || g_taking_gil.load() > 0) && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return g_llama_work.load() + g_taking_gil.load();
}

}  // namespace

void init_exit(nb::module_ & m) {
    m.def("prepare_exit", &prepare_exit, nb::arg("timeout") = 10.0, nb::arg("others") = true,
          "At interpreter exit (lamina's last atexit handler): other threads' decodes abort and their "
          "threads park instead of taking the GIL back; waits for running llama.cpp calls. Not for other use.");
}

}  // namespace lamina
