// Checks of a GGUF file before llama.cpp loads it: the values llama.cpp rejects with GGML_ASSERT
// (an abort of the whole process) instead of an error. Parsed with ggml's own gguf reader
// (no_alloc: metadata only), the one llama.cpp's loader uses. Each check names the class of
// malformed file it covers (found by ci/fuzz.py):
//   <arch>.block_count outside [1, LLAMA_MAX_LAYERS]     llama-model.cpp: GGML_ASSERT(n_layer_all ...)
//   <arch>.attention.layer_norm[_rms]_epsilon negative,  ggml-cpu ops.cpp: GGML_ASSERT(eps >= 0.0f)
//     zero, NaN or infinite                              at the first decode
//   duplicate strings in tokenizer.ggml.tokens            llama-vocab.cpp: GGML_ASSERT(id_to_token.size()
//                                                          == token_to_id.size())
// This is a start, not the whole validator the hostile-files issue asks for.
#include "lamina.h"

#include "gguf.h"

#include <cmath>
#include <string_view>
#include <algorithm>
#include <functional>
#include <utility>
#include <vector>

namespace lamina {
namespace {

constexpr int64_t k_max_layers = 512;  // LLAMA_MAX_LAYERS (src/llama-hparams.h)

[[noreturn]] void bad(const std::string & path, const std::string & field, const std::string & reason) {
    throw model_format_error("'" + path + "' is malformed: " + field + ": " + reason, field, reason);
}

struct gguf_ptr {
    gguf_context * p;
    ~gguf_ptr() { if (p) gguf_free(p); }
};

}  // namespace

void validate_gguf(const std::string & path) {
    gguf_init_params params{true, nullptr};
    gguf_ptr g{gguf_init_from_file(path.c_str(), params)};
    if (g.p == nullptr) return;  // the reader refused it: llama.cpp's load reports that as LoadError
    const int64_t arch_id = gguf_find_key(g.p, "general.architecture");
    if (arch_id < 0 || gguf_get_kv_type(g.p, arch_id) != GGUF_TYPE_STRING) return;
    const std::string arch = gguf_get_val_str(g.p, arch_id);

    const std::string blocks = arch + ".block_count";
    if (int64_t id = gguf_find_key(g.p, blocks.c_str()); id >= 0) {
        int64_t n = -1;
        switch (gguf_get_kv_type(g.p, id)) {
            case GGUF_TYPE_UINT32: n = gguf_get_val_u32(g.p, id); break;
            case GGUF_TYPE_INT32: n = gguf_get_val_i32(g.p, id); break;
            case GGUF_TYPE_UINT64: n = int64_t(std::min<uint64_t>(gguf_get_val_u64(g.p, id), uint64_t(INT64_MAX))); break;
            case GGUF_TYPE_INT64: n = gguf_get_val_i64(g.p, id); break;
            default: bad(path, blocks, "not an integer");
        }
        if (n < 1 || n > k_max_layers) {
            bad(path, blocks, std::to_string(n) + " layers; llama.cpp supports 1 to " + std::to_string(k_max_layers));
        }
    }
    for (const char * suffix : {".attention.layer_norm_rms_epsilon", ".attention.layer_norm_epsilon"}) {
        const std::string key = arch + suffix;
        const int64_t id = gguf_find_key(g.p, key.c_str());
        if (id < 0) continue;
        if (gguf_get_kv_type(g.p, id) != GGUF_TYPE_FLOAT32) bad(path, key, "not a float32");
        const float eps = gguf_get_val_f32(g.p, id);
        if (!std::isfinite(eps) || eps <= 0.0f) bad(path, key, std::to_string(eps) + "; it must be finite and > 0");
    }
    if (int64_t id = gguf_find_key(g.p, "tokenizer.ggml.tokens"); id >= 0) {
        if (gguf_get_kv_type(g.p, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g.p, id) != GGUF_TYPE_STRING) {
            bad(path, "tokenizer.ggml.tokens", "not an array of strings");
        }
        // duplicates: sort (hash, index) pairs and compare the texts of equal hashes (a hash set
        // of 262k strings cost twice as much)
        const size_t n = gguf_get_arr_n(g.p, id);
        std::vector<std::pair<uint64_t, uint32_t>> keys(n);
        for (size_t i = 0; i < n; ++i) {
            keys[i] = {std::hash<std::string_view>{}(gguf_get_arr_str(g.p, id, i)), uint32_t(i)};
        }
        std::sort(keys.begin(), keys.end());
        for (size_t i = 1; i < n; ++i) {
            if (keys[i].first != keys[i - 1].first) continue;
            for (size_t j = i; j-- > 0 && keys[j].first == keys[i].first;) {
                if (std::string_view(gguf_get_arr_str(g.p, id, keys[j].second)) ==
                    std::string_view(gguf_get_arr_str(g.p, id, keys[i].second))) {
                    bad(path, "tokenizer.ggml.tokens", "tokens " + std::to_string(keys[j].second) + " and " +
                                                           std::to_string(keys[i].second) + " have the same text");
                }
            }
        }
    }
}

}  // namespace lamina
