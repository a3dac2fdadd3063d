// Model: load a GGUF file, read its metadata, tokenize and detokenize.
#include "lamina.h"

#include "ggml-backend.h"
#include "gguf.h"

#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <regex>

namespace lamina {

model_state::~model_state() {
    if (fork_gen != fork_generation()) {
        (void) model.release();  // a forked child: its device buffers and threads belong to the parent
    }
}

namespace {

// llama.cpp's tokenize/detokenize, without the GIL: a negative answer is the size needed, so the
// buffer grows to it and the call runs once more
template <typename Buf, typename F>
int32_t sized_call(Buf & buf, F call) {
    gil_release nogil;
    int32_t n = call();
    if (n < 0) {
        buf.resize(size_t(-n));
        n = call();
    }
    return n;
}

using tokens_in = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

struct load_progress {
    PyObject * callback = nullptr;  // borrowed; may be null
    bool python_error = false;      // a callback raised or a signal arrived: abort the load
    held_error error;
};

bool on_progress(float progress, void * user) {
    auto * lp = static_cast<load_progress *>(user);
    if (g_exiting.load() && !on_main_thread()) return false;  // the interpreter exits: the load stops
    gil_acquire gil;
    if (PyErr_CheckSignals() != 0) {
        lp->python_error = true;
    } else if (lp->callback != nullptr) {
        PyObject * r = PyObject_CallFunction(lp->callback, "f", progress);
        if (r == nullptr) {
            lp->python_error = true;
        } else {
            bool keep_going = r == Py_None || PyObject_IsTrue(r) == 1;
            Py_DECREF(r);
            if (!keep_going) return false;  // the callback asked to cancel: no exception of its own
        }
    }
    if (lp->python_error) {
        lp->error.take();
        return false;
    }
    return true;
}

std::string meta_string(const llama_model * model, const char * key) {
    return copied_string([&](char * b, size_t n) { return llama_model_meta_val_str(model, key, b, n); }).value_or("");
}

}  // namespace

// tokenizer.chat_template from the file's metadata (a file validate_gguf accepted), if present.
std::optional<std::string> file_chat_template(const std::string & path) {
    gguf_init_params params{true, nullptr};
    gguf_context * g = gguf_init_from_file(path.c_str(), params);
    if (g == nullptr) return std::nullopt;
    std::optional<std::string> out;
    const int64_t k = gguf_find_key(g, "tokenizer.chat_template");
    if (k >= 0 && gguf_get_kv_type(g, k) == GGUF_TYPE_STRING) out = std::string(gguf_get_val_str(g, k));
    gguf_free(g);
    return out;
}

namespace {

class model_handle {
public:
    model_handle(const std::string & path, const placement & args, int load_mode, bool vocab_only,
                 nb::object progress) {
        check_gguf_file(path);
        without_gil([&] { validate_gguf(path); });
        if (!progress.is_none() && !PyCallable_Check(progress.ptr())) {
            throw std::invalid_argument("progress must be callable or None");
        }
        if (load_mode < LLAMA_LOAD_MODE_AUTO || load_mode > LLAMA_LOAD_MODE_DIRECT_IO) {
            throw std::invalid_argument("invalid load_mode " + std::to_string(load_mode));
        }
        model_params mp;
        build_model_params(args, mp);
        llama_model_params & p = mp.p;
        p.load_mode = static_cast<llama_load_mode>(load_mode);
        p.vocab_only = vocab_only;

        load_progress lp;
        lp.callback = progress.is_none() ? nullptr : progress.ptr();
        p.progress_callback = on_progress;
        p.progress_callback_user_data = &lp;

        clear_last_log_error();
        llama_model * raw = nullptr;
        std::vector<std::pair<int, std::string>> layers;
        {
            gil_release nogil;
            capture_layer_devices(&layers);
            llama_work work;
            raw = llama_model_load_from_file(path.c_str(), p);
            capture_layer_devices(nullptr);
        }
        if (lp.python_error) {
            if (raw) llama_model_free(raw);
            lp.error.raise();
        }
        std::vector<ggml_backend_dev_t> used;
        for (size_t i = 0; i + 1 < mp.devs.size(); ++i) used.push_back(mp.devs[i]);
        if (mp.devs.empty()) {  // llama.cpp's choice: every device
            for (size_t i = 0; i < ggml_backend_dev_count(); ++i) used.push_back(ggml_backend_dev_get(i));
        }
        try {  // a server lost during the load answered zeros: nothing it "loaded" is there
            refuse_lost_rpc(used, "while '" + path + "' loaded");
        } catch (...) {
            if (raw) llama_model_free(raw);
            throw;
        }
        if (raw == nullptr) raise_failed("failed to load model from '" + path + "'", failure::load);
        st_ = std::make_shared<model_state>();
        st_->model.reset(raw);
        st_->vocab = llama_model_get_vocab(raw);
        st_->n_vocab = llama_vocab_n_tokens(st_->vocab);
        st_->path = path;
        st_->file_id = file_identity(path);
        st_->vocab_only = vocab_only;
        st_->rpc_endpoints = rpc_endpoints_of(used);
        layers_ = std::move(layers);
    }

    // (layer index, device name) as llama.cpp assigned them; index n_layer is the output layer
    std::vector<std::pair<int, std::string>> layer_devices() const { st(); return layers_; }

    model_state & st() const {
        if (!st_) throw closed_error("the model is closed");
        return *st_;
    }
    const llama_model * raw() const { return st().model.get(); }
    std::shared_ptr<model_state> shared() const { st(); return st_; }
    void close() { st_.reset(); }
    bool closed() const { return !st_; }

    // The model's state is held (shared) across the GIL release: close() in another thread meanwhile
    // drops only this handle's reference, never the vocabulary being read.
    nb::ndarray<nb::numpy, int32_t, nb::ndim<1>> tokenize(nb::bytes text, bool add_special, bool parse_special) {
        const std::shared_ptr<model_state> keep = shared();
        model_state & m = *keep;
        require_vocab(m);
        if (add_special) require_specials(m);
        return to_numpy(tokens_of(m.vocab, text.c_str(), text.size(), add_special, parse_special));
    }

    static std::vector<int32_t> tokens_of(const llama_vocab * v, const char * s, size_t len, bool add_special,
                                          bool parse_special) {
        if (len > size_t(INT32_MAX) / 2) throw std::invalid_argument("text too long to tokenize");
        std::vector<int32_t> out(len + 8);
        const int32_t n = sized_call(out, [&] {
            return llama_tokenize(v, s, int32_t(len), out.data(), int32_t(out.size()), add_special, parse_special);
        });
        if (n < 0) throw lamina_error("llama_tokenize failed");
        out.resize(size_t(n));
        return out;
    }

    // The tokens llama-server's /v1/rerank scores for a query and a document (server-common.cpp,
    // format_prompt_rerank): the model's "rerank" template with {query}, then {document}, put in;
    // without one, BOS, query, EOS, SEP, document, EOS as the vocabulary adds them.
    nb::ndarray<nb::numpy, int32_t, nb::ndim<1>> rerank_tokens(const std::string & query, const std::string & doc) {
        const std::shared_ptr<model_state> keep = shared();
        model_state & m = *keep;
        require_vocab(m);
        const llama_vocab * v = m.vocab;
        auto tokens = [v](const std::string & text, bool special) { return tokens_of(v, text.data(), text.size(), false, special); };
        std::vector<int32_t> out;
        if (const char * tmpl = llama_model_chat_template(m.model.get(), "rerank")) {
            std::string prompt = tmpl;
            auto replace_all = [&prompt](const std::string & key, const std::string & value) {
                for (size_t at = prompt.find(key); at != std::string::npos; at = prompt.find(key, at + value.size())) {
                    prompt.replace(at, key.size(), value);
                }
            };
            replace_all("{query}", query);
            replace_all("{document}", doc);
            out = tokens(prompt, true);
        } else {
            llama_token eos = llama_vocab_eos(v);
            if (eos == LLAMA_TOKEN_NULL) eos = llama_vocab_sep(v);
            if (llama_vocab_get_add_bos(v)) out.push_back(llama_vocab_bos(v));
            const std::vector<int32_t> q = tokens(query, false), d = tokens(doc, false);
            out.insert(out.end(), q.begin(), q.end());
            if (llama_vocab_get_add_eos(v)) out.push_back(eos);
            if (llama_vocab_get_add_sep(v)) out.push_back(llama_vocab_sep(v));
            out.insert(out.end(), d.begin(), d.end());
            if (llama_vocab_get_add_eos(v)) out.push_back(eos);
        }
        return to_numpy(std::move(out));
    }

    nb::bytes detokenize(tokens_in tokens, bool remove_special, bool unparse_special) {
        const std::shared_ptr<model_state> keep = shared();
        model_state & m = *keep;
        const int32_t * t = tokens.data();
        size_t n = tokens.shape(0);
        require_vocab(m);
        check_tokens(m, t, n);
        std::string out(n * 8 + 16, '\0');
        const int32_t got = sized_call(out, [&] {
            return llama_detokenize(m.vocab, t, int32_t(n), out.data(), int32_t(out.size()), remove_special, unparse_special);
        });
        if (got < 0) throw lamina_error("llama_detokenize failed");
        return nb::bytes(out.data(), size_t(got));
    }

    nb::bytes token_to_piece(int32_t token, bool special) {
        model_state & m = st();
        require_vocab(m);
        check_tokens(m, &token, 1);
        std::string piece;
        append_piece(m, token, special, piece);
        return nb::bytes(piece.data(), piece.size());
    }

    nb::dict metadata() const {
        const llama_model * mdl = raw();
        nb::dict d;
        int32_t count = llama_model_meta_count(mdl);
        std::string key(512, '\0');
        for (int32_t i = 0; i < count; ++i) {
            int32_t kn = llama_model_meta_key_by_index(mdl, i, key.data(), key.size());
            if (kn < 0) continue;
            const auto val = copied_string(
                [&](char * b, size_t n) { return llama_model_meta_val_str_by_index(mdl, i, b, n); });
            if (!val) continue;
            d[file_text(std::string(key.c_str(), size_t(std::min<int32_t>(kn, int32_t(key.size()) - 1))))] =
                file_text(*val);
        }
        return d;
    }

    nb::dict info() const {
        const llama_model * mdl = raw();
        const model_state & m = st();
        nb::dict d;
        char desc[256];
        llama_model_desc(mdl, desc, sizeof(desc));
        d["path"] = m.path;
        d["desc"] = desc;
        d["arch"] = file_text(meta_string(mdl, "general.architecture"));
        d["name"] = file_text(meta_string(mdl, "general.name"));
        d["n_params"] = llama_model_n_params(mdl);
        d["size"] = llama_model_size(mdl);
        // a vocab-only load reads no hyperparameters: llama.cpp aborts on n_head() etc. without them
        const bool hp = !m.vocab_only;
        d["n_layer"] = hp ? llama_model_n_layer(mdl) : 0;
        d["n_ctx_train"] = hp ? llama_model_n_ctx_train(mdl) : 0;
        d["n_embd"] = hp ? llama_model_n_embd(mdl) : 0;
        d["n_head"] = hp ? llama_model_n_head(mdl) : 0;
        d["n_head_kv"] = hp ? llama_model_n_head_kv(mdl) : 0;
        d["n_swa"] = hp ? llama_model_n_swa(mdl) : 0;
        d["n_vocab"] = m.n_vocab;
        d["has_encoder"] = llama_model_has_encoder(mdl);
        d["has_decoder"] = llama_model_has_decoder(mdl);
        d["is_recurrent"] = llama_model_is_recurrent(mdl);
        d["is_hybrid"] = llama_model_is_hybrid(mdl);
        const char * tmpl = llama_model_chat_template(mdl, nullptr);
        std::optional<std::string> chat_template;
        if (tmpl != nullptr) chat_template = std::string(tmpl);
        if (!chat_template && m.vocab_only) chat_template = file_chat_template(m.path);  // not kept by that load
        d["chat_template"] = chat_template ? nb::object(file_text(*chat_template)) : nb::none();
        d["bos"] = llama_vocab_bos(m.vocab);
        d["eos"] = llama_vocab_eos(m.vocab);
        d["eot"] = llama_vocab_eot(m.vocab);
        d["add_bos"] = llama_vocab_get_add_bos(m.vocab);
        d["add_eos"] = llama_vocab_get_add_eos(m.vocab);
        return d;
    }

    bool is_eog(int32_t token) {
        model_state & m = st();
        check_tokens(m, &token, 1);
        return llama_vocab_is_eog(m.vocab, token);
    }

private:
    std::shared_ptr<model_state> st_;
    std::vector<std::pair<int, std::string>> layers_;
};

}  // namespace

// A path llama.cpp can be trusted with: exists, is a regular readable file, starts with "GGUF".
void check_gguf_file(const std::string & path) {
    FILE * f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) {
        PyErr_SetFromErrnoWithFilename(errno == ENOENT ? PyExc_FileNotFoundError : PyExc_OSError, path.c_str());
        throw nb::python_error();
    }
    char magic[4] = {0, 0, 0, 0};
    size_t got = std::fread(magic, 1, 4, f);
    bool is_dir = got == 0 && std::ferror(f);
    std::fclose(f);
    if (is_dir) throw load_error("'" + path + "' is not a readable file");
    if (got < 4 || std::memcmp(magic, "GGUF", 4) != 0) {
        throw load_error("'" + path + "' is not a GGUF file (its first bytes are not 'GGUF')");
    }
}

void build_model_params(const placement & a, model_params & out) {
    const auto & [n_gpu_layers, devices, split_mode, main_gpu, tensor_split, overrides] = a;
    llama_model_params & p = out.p;
    p = llama_model_default_params();
    if (split_mode < 0 || split_mode > 3) {
        throw std::invalid_argument("split_mode must be 0 (none), 1 (layer), 2 (row) or 3 (tensor)");
    }
    if (n_gpu_layers < -1) throw std::invalid_argument("n_gpu_layers must be >= -1");
    p.n_gpu_layers = n_gpu_layers;
    p.split_mode = static_cast<llama_split_mode>(split_mode);
    p.main_gpu = main_gpu;
    const size_t n_dev = ggml_backend_dev_count();
    // devices: None = every device llama.cpp would pick; a list of ggml device indices
    // (possibly empty: CPU only) otherwise. NULL-terminated.
    if (devices) {
        for (int idx : *devices) {
            if (idx < 0 || size_t(idx) >= n_dev) {
                throw std::out_of_range("device index " + std::to_string(idx) + " out of range [0, " +
                                        std::to_string(n_dev) + ")");
            }
            out.devs.push_back(ggml_backend_dev_get(size_t(idx)));
        }
        out.devs.push_back(nullptr);
        p.devices = out.devs.data();
    }
    std::vector<ggml_backend_dev_t> chosen(out.devs.begin(), out.devs.end() - (devices ? 1 : 0));
    if (!devices) {
        for (size_t i = 0; i < n_dev; ++i) chosen.push_back(ggml_backend_dev_get(i));
    }
    refuse_lost_rpc(chosen, "earlier in this process");
    // main_gpu: Python's plan_placement checks it against the chosen devices (llama.cpp refuses a bad one)
    out.split.assign(llama_max_devices(), 0.0f);
    if (tensor_split) {
        if (tensor_split->size() > out.split.size()) {
            throw std::invalid_argument("tensor_split has more entries than llama.cpp supports devices");
        }
        std::copy(tensor_split->begin(), tensor_split->end(), out.split.begin());
        p.tensor_split = out.split.data();
    }
    out.patterns.reserve(overrides.size());
    for (const auto & [pattern, dev] : overrides) {
        ggml_backend_dev_t d = nullptr;
        if (dev < 0) {
            d = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        } else if (size_t(dev) < n_dev) {
            d = ggml_backend_dev_get(size_t(dev));
        }
        if (d == nullptr) throw std::out_of_range("tensor override device " + std::to_string(dev) + " does not exist");
        try {
            std::regex check(pattern);  // llama.cpp matches tensor names with std::regex
        } catch (const std::regex_error & e) {
            throw std::invalid_argument("tensor override pattern '" + pattern + "' is not a valid regex: " + e.what());
        }
        out.patterns.push_back(pattern);
        out.overrides.push_back({out.patterns.back().c_str(), ggml_backend_dev_buffer_type(d)});
    }
    if (!overrides.empty()) {
        out.overrides.push_back({nullptr, nullptr});
        p.tensor_buft_overrides = out.overrides.data();
    }
}

void check_tokens(const model_state & m, const llama_token * toks, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (toks[i] < 0 || toks[i] >= m.n_vocab) {
            throw std::out_of_range("token id " + std::to_string(toks[i]) + " at position " + std::to_string(i) +
                                    " is out of range [0, " + std::to_string(m.n_vocab) + ")");
        }
    }
}

void require_vocab(const model_state & m) {
    if (llama_vocab_type(m.vocab) == LLAMA_VOCAB_TYPE_NONE || m.n_vocab <= 0) {
        throw lamina_error("this model has no vocabulary (tokenizer.ggml.model 'none' or no tokens): "
                           "it takes and gives token ids, not text");
    }
}

void require_specials(const model_state & m) {
    const llama_vocab * v = m.vocab;
    const bool wpm = llama_vocab_type(v) == LLAMA_VOCAB_TYPE_WPM;  // adds BOS (CLS) and SEP always
    auto missing = [&](bool wanted, llama_token id, const char * name) {
        if (wanted && id == LLAMA_TOKEN_NULL) {
            throw std::invalid_argument(std::string("the model's vocabulary asks for a ") + name +
                                        " token it does not have: tokenize with add_special=False");
        }
    };
    missing(wpm || llama_vocab_get_add_bos(v), llama_vocab_bos(v), "BOS");
    missing(llama_vocab_get_add_eos(v), llama_vocab_eos(v), "EOS");
    missing(wpm, llama_vocab_sep(v), "SEP");
}

void append_piece(const model_state & m, llama_token tok, bool special, std::string & out) {
    char buf[256];
    int32_t n = llama_token_to_piece(m.vocab, tok, buf, sizeof(buf), 0, special);
    if (n >= 0) {
        out.append(buf, size_t(n));
        return;
    }
    std::string big(size_t(-n), '\0');
    n = llama_token_to_piece(m.vocab, tok, big.data(), int32_t(big.size()), 0, special);
    out.append(big.data(), size_t(std::max(n, 0)));
}

std::shared_ptr<model_state> model_shared(nb::handle model) {
    return nb::cast<model_handle &>(model).shared();
}

void init_model(nb::module_ & m) {
    {
        using Params = placement;
        nb::class_<placement>(m, "Placement", "Where a model's weights go: layers, devices, split, overrides.")
            .def(nb::init<>())
            LAMINA_RW(n_gpu_layers) LAMINA_RW(devices) LAMINA_RW(split_mode) LAMINA_RW(main_gpu) LAMINA_RW(tensor_split)
            LAMINA_RW(overrides);
    }
    m.def("validate_gguf", [](const std::string & path) {
        check_gguf_file(path);
        gil_release nogil;
        validate_gguf(path);
    }, nb::arg("path"),
    "Check a GGUF file for values llama.cpp would abort on; raises ModelFormatError (or "
    "FileNotFoundError / LoadError).");
    nb::class_<model_handle>(m, "Model", "A loaded llama.cpp model (owns llama_model).")
        .def(nb::init<const std::string &, const placement &, int, bool, nb::object>(),
             nb::arg("path"), nb::arg("placement"), nb::arg("load_mode") = -1, nb::arg("vocab_only") = false,
             nb::arg("progress").none() = nb::none(),
             R"(Load a GGUF model with the GIL released.

Args:
    path: GGUF file. Checked before llama.cpp sees it (exists, readable, GGUF magic).
    placement: (n_gpu_layers, devices, split_mode, main_gpu, tensor_split, overrides); see build_model_params.
    load_mode: llama_load_mode (-1 auto, 0 none, 1 mmap, 2 mlock, 3 mmap+mlock, 4 direct I/O).
    progress: called with a float in [0, 1]; returning False cancels the load.
Raises:
    FileNotFoundError, LoadError, OutOfMemoryError, KeyboardInterrupt (Ctrl-C during load).)")
        .def("close", &model_handle::close, "Release this handle (contexts keep the weights alive).")
        .def_prop_ro("closed", &model_handle::closed)
        .def("tokenize", &model_handle::tokenize, nb::arg("text"), nb::arg("add_special") = true,
             nb::arg("parse_special") = false, "UTF-8 bytes -> int32 token ids (numpy).")
        .def("rerank_tokens", &model_handle::rerank_tokens, nb::arg("query"), nb::arg("document"),
             "The tokens llama-server's /v1/rerank scores for a query and a document (int32 numpy).")
        .def("detokenize", &model_handle::detokenize, nb::arg("tokens"), nb::arg("remove_special") = false,
             nb::arg("unparse_special") = false, "Token ids -> UTF-8 bytes (may end mid-character).")
        .def("token_to_piece", &model_handle::token_to_piece, nb::arg("token"), nb::arg("special") = false,
             "One token's bytes.")
        .def("is_eog", &model_handle::is_eog, nb::arg("token"), "Whether the token ends generation.")
        .def("metadata", &model_handle::metadata, "All GGUF metadata key/values as strings.")
        .def("info", &model_handle::info, "Architecture, sizes and vocabulary facts.")
        .def("layer_devices", &model_handle::layer_devices,
             "(layer, device name) pairs as llama.cpp assigned them at load; layer n_layer is the output layer.");
}

}  // namespace lamina
