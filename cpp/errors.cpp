// C++ exceptions of the native layer and the Python exception types they become.
#include "lamina.h"

#include "ggml-backend.h"

#include <Python.h>

#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <utility>

namespace lamina {
namespace {

std::string grouped(uint64_t n) {  // 98304000000 -> "98,304,000,000"
    std::string d = std::to_string(n), out;
    for (size_t i = 0; i < d.size(); ++i) {
        if (i > 0 && (d.size() - i) % 3 == 0) out += ',';
        out += d[i];
    }
    return out;
}

// Set a Python exception from a C++ message that may not be UTF-8 (a last resort: lamina's own
// errors are escaped when made).
void set_error(PyObject * type, const char * msg) {
    PyObject * text = PyUnicode_DecodeUTF8(msg, Py_ssize_t(std::strlen(msg)), "backslashreplace");
    if (text == nullptr) return;  // the decode's own error stays set
    PyErr_SetObject(type, text);
    Py_DECREF(text);
}

// Raise an instance of exception type `type` (a PyObject *) built from msg, with attributes set.
void raise_with(void * type, const char * msg, std::initializer_list<std::pair<const char *, nb::object>> attrs) {
    PyObject * t = static_cast<PyObject *>(type);
    PyObject * inst = PyObject_CallFunction(t, "s", msg);
    if (inst == nullptr) return;  // the call's own error stays set
    nb::handle h(inst);
    for (const auto & [name, value] : attrs) h.attr(name) = value;
    PyErr_SetObject(t, inst);
    Py_DECREF(inst);
}

std::atomic<unsigned long> g_main_thread_ident{0};  // read without the GIL once set

}  // namespace

void raise_failed(const std::string & what, failure fallback) {
    // llama.cpp logs the cause first ("error loading model: unknown model architecture: ...")
    // and a generic line last ("failed to load model"): both, cause first
    const std::string first = first_log_error(), last = last_log_error();
    const std::string why = first == last ? last : first + "; " + last;
    const alloc_failure a = first_alloc_failure();
    if (!a.device.empty()) {
        char gib[32];
        std::snprintf(gib, sizeof gib, "%.2f GiB", double(a.bytes) / double(1ull << 30));
        ggml_backend_dev_t dev = device_named(a.device);
        const std::string device = dev ? ggml_backend_dev_name(dev) : a.device;
        size_t free = 0, total = 0;
        if (dev) ggml_backend_dev_memory(dev, &free, &total);
        std::string msg = what + ": out of memory on " + device + ": it could not allocate " + grouped(a.bytes) +
                          " bytes (" + gib + ")";
        if (dev) msg += ", " + grouped(free / (1024 * 1024)) + " MiB free";
        if (!why.empty()) msg += " (llama.cpp: " + why + ")";
        throw out_of_memory_error(msg, device, a.bytes);
    }
    std::string msg = what + (why.empty() ? "" : ": " + why);
    if (log_says_out_of_memory(why)) throw out_of_memory_error(msg);
    if (fallback == failure::load) throw load_error(msg);
    throw lamina_error(msg);
}

bool on_main_thread() {
    if (g_main_thread_ident.load() == 0) {  // threading.main_thread().ident, once
        g_main_thread_ident = nb::cast<unsigned long>(
            nb::module_::import_("threading").attr("main_thread")().attr("ident"));
    }
    return PyThread_get_thread_ident() == g_main_thread_ident.load();
}

void check_signals() {
    if (PyErr_CheckSignals() != 0) throw nb::python_error();
}

void init_errors(nb::module_ & m) {
    // Translators run newest first, so subclasses are registered after their base. This one runs
    // after lamina's own and before nanobind's: the standard exceptions nanobind would raise with
    // PyErr_SetString (a UnicodeDecodeError for a message that is not UTF-8), with any bytes.
    nb::register_exception_translator([](const std::exception_ptr & p, void *) {
        try {
            std::rethrow_exception(p);
        } catch (const nb::builtin_exception &) {
            throw;  // nanobind's own (StopIteration, ...)
        } catch (const permission_error & e) {
            set_error(PyExc_PermissionError, e.what());
        } catch (const std::invalid_argument & e) {
            set_error(PyExc_ValueError, e.what());
        } catch (const std::domain_error & e) {
            set_error(PyExc_ValueError, e.what());
        } catch (const std::length_error & e) {
            set_error(PyExc_ValueError, e.what());
        } catch (const std::out_of_range & e) {
            set_error(PyExc_IndexError, e.what());
        } catch (const std::range_error & e) {
            set_error(PyExc_ValueError, e.what());
        } catch (const std::overflow_error & e) {
            set_error(PyExc_OverflowError, e.what());
        } catch (const std::runtime_error & e) {
            set_error(PyExc_RuntimeError, e.what());
        }
    });
    nb::exception<lamina_error> base(m, "LaminaError", PyExc_RuntimeError);
    base.doc() = "Base class of lamina's errors.";
    nb::exception<load_error> load(m, "LoadError", base.ptr());
    load.doc() = "The model file could not be loaded (not GGUF, truncated, unsupported architecture, ...).";
    nb::exception<model_format_error> fmt(m, "ModelFormatError", load.ptr());
    fmt.doc() = "The model file is malformed, or holds a value llama.cpp would abort on.\n\n"
                "field: the GGUF key, tensor or header field; offset: the byte in the file where\n"
                "it starts; reason: what is wrong with it.";
    fmt.attr("field") = nb::str("");
    fmt.attr("offset") = nb::int_(0);
    fmt.attr("reason") = nb::str("");
    nb::register_exception_translator([](const std::exception_ptr & p, void * type) {
        try {
            std::rethrow_exception(p);
        } catch (const model_format_error & e) {
            raise_with(type, e.what(), {{"field", nb::str(e.field.c_str())}, {"offset", nb::int_(e.offset)},
                                        {"reason", nb::str(e.reason.c_str())}});
        }
    }, fmt.ptr());
    nb::exception<out_of_memory_error> oom(m, "OutOfMemoryError", base.ptr());
    oom.doc() = "A model, context or buffer did not fit the memory of a device.\n\n"
                "device: the device whose allocation failed (a name as in lamina.devices(), '' when\n"
                "llama.cpp did not say); bytes: the bytes it asked for (0 when unknown).";
    oom.attr("device") = nb::str("");
    oom.attr("bytes") = nb::int_(0);
    // after nb::exception's own translator, so this one runs first: the instance carries device/bytes
    nb::register_exception_translator([](const std::exception_ptr & p, void * type) {
        try {
            std::rethrow_exception(p);
        } catch (const out_of_memory_error & e) {
            if (e.device.empty()) raise_with(type, e.what(), {});
            else raise_with(type, e.what(), {{"device", nb::str(e.device.c_str())}, {"bytes", nb::int_(e.bytes)}});
        }
    }, oom.ptr());
    nb::exception<decode_error>(m, "DecodeError", base.ptr()).doc() =
        "llama_decode failed (no KV slot, aborted, invalid batch, or a backend error).";
    nb::exception<closed_error>(m, "ClosedError", base.ptr()).doc() =
        "The object was closed; create a new one.";
    nb::exception<busy_error>(m, "BusyError", base.ptr()).doc() =
        "The context is in use by another thread: one context serves one thread at a time (a\n"
        "second caller gets this error at once instead of waiting); give each thread its own context.";
    nb::exception<stale_error>(m, "StaleGenerationError", base.ptr()).doc() =
        "A generation (or Batcher request) owned a sequence of its context, and something else changed\n"
        "that sequence's cache before it finished: another generation, ctx.decode, a KV operation,\n"
        "load_state, set_lora or generate_batch. The message names it. The generation has ended;\n"
        "start a new one (it reuses what the cache still holds of its prompt).";
    nb::exception<fork_error>(m, "ForkError", base.ptr()).doc() =
        "The object was created before fork() and used in the child process, where its worker\n"
        "threads and device state do not exist: create models and contexts in the child.";
}

}  // namespace lamina
