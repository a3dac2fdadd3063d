// LoRA adapters: loaded once per model (llama_adapter_lora_init), applied to contexts with scales
// (llama_set_adapters_lora), hot-swapped without reloading the model.
//
// Lifetimes: an adapter points into its model (llama.cpp frees the adapters left over when the
// model goes), so lora_state keeps its model alive and frees the adapter first; a context keeps
// the adapters it applies alive, so closing a Lora never frees one a context still runs.
// Swapping: the KV cache holds keys and values the old weights computed, so a change of adapters
// or scales clears every sequence (and the token mirror); the same set again changes nothing.
#include "lamina.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <shared_mutex>

namespace lamina {

std::shared_mutex & lora_registry() {
    static std::shared_mutex mu;
    return mu;
}

namespace {
// Free an adapter: the exclusive side of lora_registry, taken and let go without the GIL (a reader,
// a decode in the main thread, may need the GIL for its Ctrl-C check; and a thread that parks at
// interpreter exit must not hold the lock).
void free_adapter(llama_adapter_lora * adapter) {
    std::optional<gil_release> nogil;
    if (gil_held()) nogil.emplace();
    llama_work work;
    std::unique_lock<std::shared_mutex> lk(lora_registry());
    llama_adapter_lora_free(adapter);
}

// A 64-bit hash of the file's bytes (saved states compare adapters by content, not by name).
uint64_t content_hash(const std::string & path) {
    std::FILE * f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) return 0;
    uint64_t h = 0x9E3779B97F4A7C15ull;
    std::vector<unsigned char> buf(1 << 20);
    size_t n;
    while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) {
        size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            uint64_t w;
            std::memcpy(&w, buf.data() + i, 8);
            h = (h ^ w) * 0x100000001B3ull;
            h ^= h >> 29;
        }
        for (; i < n; ++i) h = (h ^ buf[i]) * 0x100000001B3ull;
    }
    std::fclose(f);
    return h;
}
}  // namespace

struct lora_state {
    std::shared_ptr<model_state> model;
    llama_adapter_lora * adapter = nullptr;
    std::string path;
    uint64_t content = 0;  // content_hash of the file
    uint32_t fork_gen = fork_generation();
    lora_state() = default;
    lora_state(const lora_state &) = delete;
    lora_state & operator=(const lora_state &) = delete;
    ~lora_state() {
        if (adapter == nullptr || fork_gen != fork_generation()) return;  // a forked child: the parent's
        free_adapter(adapter);
    }
};

namespace {

class lora_handle {
public:
    lora_handle(nb::handle model, const std::string & path) {
        auto ms = model_shared(model);
        check_fork(ms->fork_gen, "model");
        if (ms->vocab_only) throw std::invalid_argument("a vocabulary-only model (a tokenizer) has no weights to adapt");
        if (!ms->rpc_endpoints.empty() && rpc_lost(*ms)) throw closed_error(ms->lost_why);
        check_gguf_file(path);
        auto st = std::make_shared<lora_state>();
        st->model = ms;
        st->path = path;
        {
            gil_release nogil;
            validate_lora_gguf(path, ms->path, ms->file_id);
            st->content = content_hash(path);
            clear_last_log_error();
            llama_work work;
            std::unique_lock<std::shared_mutex> lk(lora_registry());
            st->adapter = llama_adapter_lora_init(ms->model.get(), path.c_str());
        }
        if (st->adapter == nullptr) raise_failed("failed to load the LoRA adapter '" + path + "'", failure::load);
        st_ = std::move(st);
    }

    const std::shared_ptr<lora_state> & shared() const {
        if (!st_) throw closed_error("the LoRA adapter is closed");
        check_fork(st_->fork_gen, "LoRA adapter");
        return st_;
    }
    void close() { st_.reset(); }
    bool closed() const { return !st_; }
    std::string path() const { return shared()->path; }

    nb::dict metadata() const {
        const llama_adapter_lora * a = shared()->adapter;
        nb::dict d;
        const int32_t n = llama_adapter_meta_count(a);
        for (int32_t i = 0; i < n; ++i) {
            const auto key =
                copied_string([&](char * b, size_t k) { return llama_adapter_meta_key_by_index(a, i, b, k); });
            if (!key) continue;
            const auto v =
                copied_string([&](char * b, size_t k) { return llama_adapter_meta_val_str_by_index(a, i, b, k); });
            if (v) d[file_text(*key)] = file_text(*v);
        }
        return d;
    }

    // adapter.lora.alpha (0: none, the scale applies as given; else scale * alpha / rank)
    float alpha() const {
        const llama_adapter_lora * a = shared()->adapter;
        const auto v = copied_string([a](char * b, size_t n) {
            return llama_adapter_meta_val_str(a, "adapter.lora.alpha", b, n);
        });
        return v ? std::strtof(v->c_str(), nullptr) : 0.0f;  // strtof("") is 0 too
    }

    std::vector<int32_t> invocation_tokens() const {
        const llama_adapter_lora * a = shared()->adapter;
        const uint64_t n = llama_adapter_get_alora_n_invocation_tokens(a);
        const llama_token * t = llama_adapter_get_alora_invocation_tokens(a);
        return n == 0 || t == nullptr ? std::vector<int32_t>{} : std::vector<int32_t>(t, t + n);
    }

private:
    std::shared_ptr<lora_state> st_;
};

// Apply adapters with scales to a context (under a lease). A change clears the KV cache.
// Returns whether anything changed.
bool set_lora(nb::handle ctx, const std::vector<std::pair<nb::handle, float>> & items) {
    context_lease lease(context_shared(ctx));
    context_state & st = *lease;
    std::vector<std::pair<std::shared_ptr<lora_state>, float>> next, given;
    for (const auto & [h, scale] : items) {
        std::shared_ptr<lora_state> l = nb::cast<lora_handle &>(h).shared();
        if (l->model != st.model) {
            throw std::invalid_argument("the LoRA adapter '" + l->path + "' was loaded for another model ('" +
                                        l->model->path + "'); load it with this context's model.load_lora()");
        }
        if (!std::isfinite(scale)) throw std::invalid_argument("the scale of '" + l->path + "' is not a finite number");
        for (const auto & [other, s] : given) {
            if (other == l) throw std::invalid_argument("the LoRA adapter '" + l->path + "' is given twice");
        }
        given.emplace_back(l, scale);
        if (scale != 0.0f) next.emplace_back(std::move(l), scale);  // llama.cpp drops zero scales too
    }
    // the same (adapter, scale) pairs in any order (each adapter is given once)
    if (std::is_permutation(next.begin(), next.end(), st.loras.begin(), st.loras.end())) return false;
    std::vector<llama_adapter_lora *> adapters;
    std::vector<float> scales;
    for (const auto & [l, s] : next) {
        adapters.push_back(l->adapter);
        scales.push_back(s);
    }
    llama_set_adapters_lora(st.ctx.get(), adapters.empty() ? nullptr : adapters.data(), adapters.size(),
                            scales.empty() ? nullptr : scales.data());
    // what the cache holds was computed with the old weights
    llama_memory_clear(llama_get_memory(st.ctx.get()), true);
    st.tokens.clear();
    st.last_outputs = 0;
    st.loras = std::move(next);
    seq_changed(st, -1, "set_lora() (the adapters changed, and the cache made with the old ones was cleared)");
    return true;
}

}  // namespace

int64_t lora_fingerprint(const context_state & st) {
    uint64_t sum = 0;
    for (const auto & [l, scale] : st.loras) {
        uint64_t h = 1469598103934665603ull;
        auto mix = [&h](const void * p, size_t n) {
            for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const unsigned char *>(p)[i]) * 1099511628211ull;
        };
        mix(&l->content, sizeof l->content);
        uint32_t bits;
        std::memcpy(&bits, &scale, sizeof bits);
        mix(&bits, sizeof bits);
        sum += h;
    }
    return st.loras.empty() ? 0 : int64_t(sum | 1);
}

void init_lora(nb::module_ & m) {
    nb::class_<lora_handle>(m, "Lora", "A LoRA adapter loaded for one model (owns llama_adapter_lora).")
        .def(nb::init<nb::handle, const std::string &>(), nb::arg("model"), nb::arg("path"),
             "Load (GIL released). Raises ModelFormatError for a malformed or mismatched file, LoadError "
             "with llama.cpp's reason.")
        .def("close", &lora_handle::close, "Release this handle (contexts applying it keep it alive).")
        .def_prop_ro("closed", &lora_handle::closed)
        .def_prop_ro("path", &lora_handle::path)
        .def_prop_ro("alpha", &lora_handle::alpha)
        .def("metadata", &lora_handle::metadata, "The adapter file's scalar metadata, as strings.")
        .def("invocation_tokens", &lora_handle::invocation_tokens, "An activated LoRA's invocation tokens (else empty).");
    m.def("set_lora", &set_lora, nb::arg("ctx"), nb::arg("adapters"),
          "Apply [(Lora, scale)] to a context (none: no adapter). A change clears the KV cache; returns "
          "whether anything changed.");
}

}  // namespace lamina
