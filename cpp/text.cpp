// Bytes from model files and from llama.cpp as Python can hold them: Python's str is UTF-8, a GGUF
// string (a key, a token, general.name, a chat template, llama.cpp's log line quoting one) may be any
// bytes. Valid UTF-8 is kept as it is; every other byte becomes the four characters \xNN.
#include "lamina.h"

#include <cstdio>

namespace lamina {
namespace {

// Length of the valid UTF-8 sequence at s[i] (0: not one): RFC 3629, no overlongs or surrogates.
size_t utf8_sequence(const std::string & s, size_t i) {
    const auto at = [&s](size_t k) { return static_cast<unsigned char>(s[k]); };
    const unsigned char c = at(i);
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) { n = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { n = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return 0;
    if (i + n > s.size() || at(i + 1) < lo || at(i + 1) > hi) return 0;
    for (size_t k = 2; k < n; ++k) {
        if (at(i + k) < 0x80 || at(i + k) > 0xBF) return 0;
    }
    return n;
}

}  // namespace

std::string escape_bytes(const std::string & s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        const size_t n = utf8_sequence(s, i);
        if (n == 0 || (c < 0x20 && c != '\n' && c != '\t') || c == 0x7F) {
            char hex[5];
            std::snprintf(hex, sizeof(hex), "\\x%02x", c);
            out += hex;
            ++i;
        } else {
            out.append(s, i, n);
            i += n;
        }
    }
    return out;
}

nb::str file_text(const std::string & s) {
    PyObject * o = PyUnicode_DecodeUTF8(s.data(), Py_ssize_t(s.size()), "backslashreplace");
    if (o == nullptr) throw nb::python_error();
    return nb::steal<nb::str>(o);
}

nb::str text_replaced(const char * data, size_t n) {
    PyObject * o = PyUnicode_DecodeUTF8(data, Py_ssize_t(n), "replace");
    if (o == nullptr) throw nb::python_error();
    return nb::steal<nb::str>(o);
}

size_t utf8_complete(const std::string & s) {
    const size_t n = s.size();
    for (size_t back = 1; back <= 4 && back <= n; ++back) {
        const unsigned char c = static_cast<unsigned char>(s[n - back]);
        if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
        const size_t need = (c & 0x80) == 0 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
        return back >= need ? n : n - back;
    }
    return n;  // no lead byte in the last 4: invalid bytes, let the decoder replace them
}

}  // namespace lamina
