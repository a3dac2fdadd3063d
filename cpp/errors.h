// lamina's C++ exceptions; errors.cpp registers each as a Python exception.
#pragma once

#include "text.h"

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lamina {

// Every lamina error carries an escaped message (so do a format error's field and reason).
struct lamina_error : std::runtime_error {
    explicit lamina_error(const std::string & msg) : std::runtime_error(escape_bytes(msg)) {}
};
struct load_error : lamina_error { using lamina_error::lamina_error; };
struct out_of_memory_error : lamina_error {
    std::string device;  // the device whose allocation failed ("" when llama.cpp did not say)
    uint64_t bytes = 0;  // the bytes it asked for (0 when unknown)
    using lamina_error::lamina_error;
    out_of_memory_error(const std::string & msg, std::string dev, uint64_t n)
        : lamina_error(msg), device(std::move(dev)), bytes(n) {}
};
struct model_format_error : load_error {  // -> lamina.ModelFormatError(field, offset, reason)
    std::string field, reason;
    uint64_t offset;  // the byte in the file where the bad field starts
    model_format_error(const std::string & msg, std::string f, uint64_t off, std::string r)
        : load_error(msg), field(escape_bytes(f)), reason(escape_bytes(r)), offset(off) {}
};
struct decode_error : lamina_error {
    int code;
    decode_error(int code_, const std::string & msg) : lamina_error(msg), code(code_) {}
};
struct closed_error : lamina_error { using lamina_error::lamina_error; };
struct busy_error : lamina_error { using lamina_error::lamina_error; };   // another thread uses it
struct stale_error : lamina_error { using lamina_error::lamina_error; };  // its sequence was changed under it
struct fork_error : lamina_error { using lamina_error::lamina_error; };   // made before fork()
struct permission_error : std::runtime_error { using std::runtime_error::runtime_error; };  // -> PermissionError
// std::invalid_argument -> ValueError, std::out_of_range -> IndexError (nanobind built-ins)

}  // namespace lamina
