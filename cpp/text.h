// Text as Python shows it (text.cpp): messages quoting file bytes, generated text, and the one
// stop-string matcher every way of generating uses.
#pragma once

#include <nanobind/nanobind.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

namespace lamina {

namespace nb = nanobind;

// A message as Python can show it: valid UTF-8 is kept, every other byte (and a control character
// other than newline and tab) becomes \xNN. Text quoted from a file (a GGUF key, a token, a string
// value, llama.cpp's log line about them) may be any bytes; Python's str must be UTF-8.
std::string escape_bytes(const std::string & s);
// A string from a model file as a Python str, its bytes that are not UTF-8 as \xNN.
nb::str file_text(const std::string & s);
// Generated text as Python shows it: invalid bytes become U+FFFD (the "replace" handler), as
// everywhere lamina yields text.
nb::str text_replaced(const char * data, size_t n);
// The same without Python: bytes to valid UTF-8, each maximal invalid subpart one U+FFFD, exactly
// as Python's bytes.decode("utf-8", "replace") (tests compare them).
std::string utf8_replace(const std::string & s);
// The length of the longest prefix of s that does not end inside a UTF-8 sequence (what a stream
// may hand out now; the tail waits for the next token's bytes).
size_t utf8_complete(const std::string & s);
// How deep JSON-like text nests ({ and [, outside "strings"), fed piece by piece. llama.cpp's JSON
// schema converter, its chat parser and its message parsing recurse once per level: callers bound
// this before handing text to them.
struct bracket_depth {
    int depth = 0, deepest = 0;
    bool in_string = false, escaped = false;
    int feed(const std::string & s) {
        for (char c : s) {
            if (in_string) {
                if (escaped) escaped = false;
                else if (c == '\\') escaped = true;
                else if (c == '"') in_string = false;
            } else if (c == '"') {
                in_string = true;
            } else if (c == '{' || c == '[') {
                deepest = std::max(deepest, ++depth);
            } else if ((c == '}' || c == ']') && depth > 0) {
                --depth;
            }
        }
        return deepest;
    }
};

// A string llama.cpp copies into a caller's buffer (metadata): get(buf, size) returns its length,
// < 0 when there is none (nullopt).
template <typename Get>
std::optional<std::string> copied_string(Get get) {
    const int32_t n = get(nullptr, 0);
    if (n < 0) return std::nullopt;
    std::string s(size_t(n) + 1, '\0');
    get(s.data(), s.size());
    s.resize(size_t(n));
    return s;
}

// Generated text with stop strings, for generate and the Batcher alike. Tokens' bytes go in; the
// text comes out as users see it (utf8_replace), cut before the first stop string found in it.
// Stop strings match characters as users write them, never a part of a character.
class stop_text {
public:
    explicit stop_text(std::vector<std::string> stops);  // UTF-8; empty strings are dropped
    bool active() const { return !stops_.empty(); }
    // One token's bytes. Returns true when a stop string appeared (then text() ends before it).
    bool push(const std::string & piece);
    // No more tokens: an incomplete character at the end becomes U+FFFD (it may complete a stop).
    bool finish();
    const std::string & text() const { return text_; }
    // Bytes of text() that may be handed out now: whole characters, none that may start a stop.
    size_t releasable() const;
    bool stopped() const { return stopped_; }
    // After a stop: how many of the pushed tokens have their text wholly before it.
    size_t tokens_before_stop() const;
private:
    bool scan();
    std::vector<std::string> stops_;
    size_t longest_ = 0;
    std::string raw_;             // every byte pushed
    std::vector<size_t> ends_;    // raw_ bytes after each token
    size_t raw_done_ = 0;         // raw_ bytes already in text_ (a prefix at a character boundary)
    std::string text_;            // utf8_replace(raw_[0, raw_done_)), cut at a stop
    size_t scanned_ = 0;          // text_ bytes searched for stops
    bool stopped_ = false;
};

}  // namespace lamina
