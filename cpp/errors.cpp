// C++ exceptions of the native layer and the Python exception types they become.
#include "lamina.h"

#include <Python.h>

namespace lamina {

void check_signals() {
    if (PyErr_CheckSignals() != 0) {
        throw nb::python_error();
    }
}

void init_errors(nb::module_ & m) {
    // Translators run newest first, so subclasses are registered after their base.
    nb::register_exception_translator([](const std::exception_ptr & p, void *) {
        try {
            std::rethrow_exception(p);
        } catch (const permission_error & e) {
            PyErr_SetString(PyExc_PermissionError, e.what());
        }
    });
    nb::exception<lamina_error> base(m, "LaminaError", PyExc_RuntimeError);
    base.doc() = "Base class of lamina's errors.";
    nb::exception<load_error>(m, "LoadError", base.ptr()).doc() =
        "The model file could not be loaded (not GGUF, truncated, unsupported architecture, ...).";
    nb::exception<out_of_memory_error>(m, "OutOfMemoryError", base.ptr()).doc() =
        "A model, context or buffer did not fit the memory of a device.";
    nb::exception<decode_error>(m, "DecodeError", base.ptr()).doc() =
        "llama_decode failed (no KV slot, aborted, invalid batch, or a backend error).";
    nb::exception<closed_error>(m, "ClosedError", base.ptr()).doc() =
        "The object was closed; create a new one.";
}

}  // namespace lamina
