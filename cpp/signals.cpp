// Python signals during a decode, without the GIL inside graph compute.
//
// Python runs signal handlers in its main thread, between bytecodes; a decode runs for seconds
// with the GIL released. CPython's C-level handler also writes each signal's number to its
// "wakeup fd" (signal.set_wakeup_fd). For one multi-token decode in the main thread, lamina
// points that fd at a pipe of its own; the decode's abort callback polls the pipe with a
// non-blocking read() and takes the GIL (to run the handlers, which may raise) only when a signal
// really arrived. Afterwards the previous wakeup fd (asyncio's, for instance) is restored and the
// bytes are passed on to it.
#include "lamina.h"

#include <cerrno>
#include <fcntl.h>
#include <string>
#include <unistd.h>

namespace lamina {
namespace {

int g_pipe[2] = {-1, -1};
std::string g_seen;  // signal numbers read during the watch (main thread only), forwarded after it

bool pipe_ready() {
    if (g_pipe[0] >= 0) return true;
    int fds[2];
    if (pipe(fds) != 0) return false;
    for (int fd : fds) {
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    g_pipe[0] = fds[0];
    g_pipe[1] = fds[1];
    return true;
}

void drain(bool keep) {
    char buf[64];
    ssize_t n;
    while ((n = read(g_pipe[0], buf, sizeof(buf))) > 0) {
        if (keep) g_seen.append(buf, size_t(n));
    }
}

// signal.set_wakeup_fd, looked up once and kept for the life of the process
PyObject * set_wakeup_fd() {
    static PyObject * fn = [] {
        PyObject * mod = PyImport_ImportModule("signal");
        PyObject * f = mod ? PyObject_GetAttrString(mod, "set_wakeup_fd") : nullptr;
        Py_XDECREF(mod);
        if (f == nullptr) PyErr_Clear();
        return f;
    }();
    return fn;
}

// set_wakeup_fd(fd, warn_on_full_buffer=warn) -> the previous fd, or -2 when it failed
int call_set_wakeup_fd(int fd, bool warn) {
    PyObject * fn = set_wakeup_fd();
    if (fn == nullptr) return -2;
    PyObject * args = Py_BuildValue("(i)", fd);
    PyObject * kwargs = Py_BuildValue("{s:O}", "warn_on_full_buffer", warn ? Py_True : Py_False);
    PyObject * res = (args && kwargs) ? PyObject_Call(fn, args, kwargs) : nullptr;
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    int old = res ? int(PyLong_AsLong(res)) : -2;
    Py_XDECREF(res);
    if (res == nullptr || PyErr_Occurred()) {
        PyErr_Clear();
        old = -2;
    }
    return old;
}

}  // namespace

signal_watch::signal_watch(bool on) {
    if (!on || !pipe_ready()) return;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    drain(false);
    g_seen.clear();
    int old = call_set_wakeup_fd(g_pipe[1], false);
    PyErr_Restore(t, v, tb);
    if (old == -2) return;  // not allowed here (another interpreter, ...): no signal checks
    old_fd_ = old;
    active_ = true;
}

signal_watch::~signal_watch() {
    if (!active_) return;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    call_set_wakeup_fd(old_fd_, true);
    drain(true);
    if (old_fd_ >= 0 && !g_seen.empty()) {
        ssize_t ignored = write(old_fd_, g_seen.data(), g_seen.size());
        (void) ignored;
    }
    g_seen.clear();
    PyErr_Restore(t, v, tb);
}

bool signal_arrived() {
    char b;
    if (read(g_pipe[0], &b, 1) != 1) return false;
    g_seen.push_back(b);
    drain(true);
    return true;
}

}  // namespace lamina
