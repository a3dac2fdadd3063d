// KV cache (llama_memory) sequence operations and context state to/from bytes.
#include "lamina.h"

#include "ggml-backend.h"

#include <cstring>

#if __has_include("llama-ext.h")
#include "llama-ext.h"  // llama_get_memory_breakdown: exported, declared outside include/
#define LAMINA_HAS_MEMORY_BREAKDOWN 1
#endif

namespace lamina {
namespace {

llama_memory_t mem_of(context_state & st) { return llama_get_memory(st.ctx.get()); }

void check_seq(const context_state & st, int32_t seq, bool allow_all) {
    const int32_t n = int32_t(llama_n_seq_max(st.ctx.get()));
    if ((allow_all && seq == -1) || (seq >= 0 && seq < n)) return;
    throw std::out_of_range("sequence id " + std::to_string(seq) + " out of range [0, " + std::to_string(n) + ")" +
                            (allow_all ? " (or -1 for all)" : ""));
}

void check_range(llama_pos p0, llama_pos p1) {
    if (p0 < -1 || p1 < -1) throw std::invalid_argument("positions must be >= 0, or -1 for an open end");
    if (p0 >= 0 && p1 >= 0 && p1 < p0) throw std::invalid_argument("p1 must be >= p0");
}

// After an operation that touched sequence 0, make the token mirror match the cache again. An
// exact suffix removal keeps the known tokens; anything else keeps only the positions (-1 ids
// never match a prompt, so prefix reuse starts over but positions stay right).
void resync_seq0(context_state & st, bool suffix_removed_at, size_t cut) {
    llama_pos pmax = llama_memory_seq_pos_max(mem_of(st), 0);
    size_t n = size_t(pmax + 1);
    if (suffix_removed_at && cut <= st.tokens.size() && n == cut) {
        st.tokens.resize(cut);
    } else {
        st.tokens.assign(n, -1);
    }
    st.last_outputs = 0;
}

// The state's lamina header: what must match between the saving and the loading context.
constexpr char k_magic[8] = {'L', 'A', 'M', 'I', 'N', 'A', 'S', '1'};

struct state_header {
    int64_t n_vocab, n_layer, n_embd, n_ctx, n_seq_max, type_k, type_v, embeddings, last_outputs, n_tokens;
};

state_header header_of(const context_state & st) {
    const llama_model * m = st.model->model.get();
    return {st.model->n_vocab, llama_model_n_layer(m), llama_model_n_embd(m), int64_t(llama_n_ctx(st.ctx.get())),
            int64_t(llama_n_seq_max(st.ctx.get())), st.type_k, st.type_v, st.embeddings ? 1 : 0,
            st.last_outputs, int64_t(st.tokens.size())};
}

// One sequence's state: "LAMINAQ1", the header, the source sequence, its token mirror (known for
// sequence 0 only), then llama.cpp's llama_state_seq_* data.
constexpr char k_seq_magic[8] = {'L', 'A', 'M', 'I', 'N', 'A', 'Q', '1'};

void check_same_model(const state_header & theirs, const state_header & mine) {
    const char * names[] = {"n_vocab", "n_layer", "n_embd", "type_k", "type_v"};
    const int64_t a[] = {theirs.n_vocab, theirs.n_layer, theirs.n_embd, theirs.type_k, theirs.type_v};
    const int64_t b[] = {mine.n_vocab, mine.n_layer, mine.n_embd, mine.type_k, mine.type_v};
    for (size_t i = 0; i < 5; ++i) {
        if (a[i] != b[i]) {
            throw std::invalid_argument(std::string("the sequence state was saved with ") + names[i] + "=" +
                                        std::to_string(a[i]) + ", this context has " + std::to_string(b[i]));
        }
    }
}

nb::bytes seq_state_get(nb::handle ctx, int32_t seq) {
    auto st = context_leased(ctx);
    check_seq(*st, seq, false);
    state_header h = header_of(*st);
    const std::vector<llama_token> toks = seq == 0 ? st->tokens : std::vector<llama_token>{};
    h.n_tokens = int64_t(toks.size());
    int64_t src = seq;
    std::string out(sizeof(k_seq_magic) + sizeof(h) + sizeof(src) + toks.size() * sizeof(llama_token), '\0');
    char * p = out.data();
    std::memcpy(p, k_seq_magic, sizeof(k_seq_magic));
    std::memcpy(p + sizeof(k_seq_magic), &h, sizeof(h));
    std::memcpy(p + sizeof(k_seq_magic) + sizeof(h), &src, sizeof(src));
    std::memcpy(p + sizeof(k_seq_magic) + sizeof(h) + sizeof(src), toks.data(), toks.size() * sizeof(llama_token));
    size_t head = out.size(), n;
    {
        nb::gil_scoped_release nogil;
        n = llama_state_seq_get_size(st->ctx.get(), seq);
        out.resize(head + n);
        n = llama_state_seq_get_data(st->ctx.get(), reinterpret_cast<uint8_t *>(out.data() + head), n, seq);
    }
    out.resize(head + n);
    return nb::bytes(out.data(), out.size());
}

void seq_state_set(nb::handle ctx, nb::bytes data, int32_t seq) {
    auto st = context_leased(ctx);
    check_seq(*st, seq, false);
    const char * p = data.c_str();
    const size_t size = data.size();
    state_header h;
    int64_t src;
    size_t head = sizeof(k_seq_magic) + sizeof(h) + sizeof(src);
    if (size < head || std::memcmp(p, k_seq_magic, sizeof(k_seq_magic)) != 0) {
        throw std::invalid_argument(std::memcmp(p, k_magic, std::min(size, sizeof(k_magic))) == 0
                                        ? "this is a whole-context state: load it without seq="
                                        : "not a lamina sequence state");
    }
    std::memcpy(&h, p + sizeof(k_seq_magic), sizeof(h));
    std::memcpy(&src, p + sizeof(k_seq_magic) + sizeof(h), sizeof(src));
    check_same_model(h, header_of(*st));
    const int64_t n_seq_max = int64_t(llama_n_seq_max(st->ctx.get()));
    if (h.n_seq_max != n_seq_max) {
        throw std::invalid_argument("the sequence state was saved with n_seq_max=" + std::to_string(h.n_seq_max) +
                                    ", this context has " + std::to_string(n_seq_max) +
                                    " (llama.cpp keeps one KV stream per sequence; their number must match)");
    }
    if (h.n_tokens < 0 || size < head + size_t(h.n_tokens) * sizeof(llama_token)) {
        throw std::invalid_argument("the sequence state is truncated or corrupt");
    }
    std::vector<llama_token> toks(size_t(h.n_tokens));
    std::memcpy(toks.data(), p + head, toks.size() * sizeof(llama_token));
    head += toks.size() * sizeof(llama_token);
    llama_memory_seq_rm(mem_of(*st), seq, -1, -1);
    size_t got;
    {
        nb::gil_scoped_release nogil;
        got = llama_state_seq_set_data(st->ctx.get(), reinterpret_cast<const uint8_t *>(p + head), size - head, seq);
    }
    if (seq == 0) st->tokens.clear();
    if (got == 0) {
        llama_memory_seq_rm(mem_of(*st), seq, -1, -1);
        std::string why = last_log_error();
        throw lamina_error("llama.cpp rejected the sequence state (sequence " + std::to_string(seq) +
                           " is now empty)" + (why.empty() ? "" : ": " + why));
    }
    if (seq == 0) {
        // the token mirror (prefix reuse) is known when the state came from sequence 0;
        // otherwise placeholders that never match, so the next prompt is evaluated in full
        llama_pos pmax = llama_memory_seq_pos_max(mem_of(*st), 0);
        if (src == 0 && llama_pos(toks.size()) == pmax + 1) {
            st->tokens = std::move(toks);
        } else {
            st->tokens.assign(size_t(std::max<llama_pos>(pmax + 1, 0)), llama_token(-1));
        }
    }
    st->last_outputs = 0;
}

}  // namespace

void init_memory(nb::module_ & m) {
    m.def("seq_state_get", &seq_state_get, nb::arg("ctx"), nb::arg("seq"),
          "One sequence's KV cache as bytes (llama_state_seq_get_data) with a lamina header.");
    m.def("seq_state_set", &seq_state_set, nb::arg("ctx"), nb::arg("data"), nb::arg("seq"),
          "Replace sequence seq with a state from seq_state_get (same model and K/V types).");
    m.def("kv_seq_rm", [](nb::handle ctx, int32_t seq, llama_pos p0, llama_pos p1) {
        auto st = context_leased(ctx);
        check_seq(*st, seq, true);
        check_range(p0, p1);
        bool ok = llama_memory_seq_rm(mem_of(*st), seq, p0, p1);
        if (ok && (seq == 0 || seq == -1)) resync_seq0(*st, p1 == -1, size_t(std::max(p0, 0)));
        return ok;
    }, nb::arg("ctx"), nb::arg("seq"), nb::arg("p0"), nb::arg("p1"),
    "Remove positions [p0, p1) of a sequence (-1: all sequences / open end). False if the cache can't.");

    m.def("kv_seq_cp", [](nb::handle ctx, int32_t src, int32_t dst, llama_pos p0, llama_pos p1) {
        auto st = context_leased(ctx);
        check_seq(*st, src, false);
        check_seq(*st, dst, false);
        check_range(p0, p1);
        // without a unified cache each sequence has its own KV stream, and llama.cpp copies across
        // streams only whole (a partial copy aborts the process in llama_kv_cache::seq_cp)
        const llama_pos n_cells = llama_pos(llama_n_ctx_seq(st->ctx.get()));
        const bool whole = p0 <= 0 && (p1 < 0 || p1 + 1 >= n_cells);
        if (src != dst && !st->kv_unified && llama_n_seq_max(st->ctx.get()) > 1 && !whole) {
            throw std::invalid_argument("copying positions [" + std::to_string(p0) + ", " + std::to_string(p1) +
                                        ") of a sequence needs a unified KV cache (kv=lamina.KV(unified=True)): "
                                        "each sequence has its own cache here, which llama.cpp copies whole only "
                                        "(p0=-1, p1=-1)");
        }
        llama_memory_seq_cp(mem_of(*st), src, dst, p0, p1);
        if (dst == 0) {
            if (src != 0) resync_seq0(*st, false, 0);
        }
    }, nb::arg("ctx"), nb::arg("src"), nb::arg("dst"), nb::arg("p0") = -1, nb::arg("p1") = -1,
    "Make sequence dst share src's cells in [p0, p1).");

    m.def("kv_seq_keep", [](nb::handle ctx, int32_t seq) {
        auto st = context_leased(ctx);
        check_seq(*st, seq, false);
        llama_memory_seq_keep(mem_of(*st), seq);
        if (seq != 0) resync_seq0(*st, false, 0);
    }, nb::arg("ctx"), nb::arg("seq"), "Drop every sequence but this one.");

    m.def("kv_seq_add", [](nb::handle ctx, int32_t seq, llama_pos p0, llama_pos p1, llama_pos delta) {
        auto st = context_leased(ctx);
        check_seq(*st, seq, false);
        check_range(p0, p1);
        if (!llama_memory_can_shift(mem_of(*st))) {
            throw lamina_error("this KV cache cannot shift positions (e.g. a recurrent model or quantized cache)");
        }
        llama_memory_seq_add(mem_of(*st), seq, p0, p1, delta);
        if (seq == 0) resync_seq0(*st, false, 0);
    }, nb::arg("ctx"), nb::arg("seq"), nb::arg("p0"), nb::arg("p1"), nb::arg("delta"),
    "Shift positions [p0, p1) of a sequence by delta (RoPE-corrected).");

    m.def("kv_seq_div", [](nb::handle ctx, int32_t seq, llama_pos p0, llama_pos p1, int d) {
        auto st = context_leased(ctx);
        check_seq(*st, seq, false);
        check_range(p0, p1);
        if (d < 1) throw std::invalid_argument("d must be >= 1");
        if (!llama_memory_can_shift(mem_of(*st))) throw lamina_error("this KV cache cannot shift positions");
        llama_memory_seq_div(mem_of(*st), seq, p0, p1, d);
        if (seq == 0) resync_seq0(*st, false, 0);
    }, nb::arg("ctx"), nb::arg("seq"), nb::arg("p0"), nb::arg("p1"), nb::arg("d"),
    "Integer-divide positions [p0, p1) of a sequence by d.");

    m.def("kv_pos_range", [](nb::handle ctx, int32_t seq) {
        auto st = context_leased(ctx);
        check_seq(*st, seq, false);
        return std::make_pair(llama_memory_seq_pos_min(mem_of(*st), seq), llama_memory_seq_pos_max(mem_of(*st), seq));
    }, nb::arg("ctx"), nb::arg("seq"), "(pos_min, pos_max) of a sequence; (-1, -1) when empty.");

    m.def("kv_can_shift", [](nb::handle ctx) { return llama_memory_can_shift(mem_of(*context_leased(ctx))); },
          nb::arg("ctx"));

    m.def("memory_breakdown", [](nb::handle ctx) {
        auto st = context_leased(ctx);
        nb::list out;
#ifdef LAMINA_HAS_MEMORY_BREAKDOWN
        for (const auto & [buft, mb] : llama_get_memory_breakdown(st->ctx.get())) {
            ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
            nb::dict d;
            d["buffer_type"] = ggml_backend_buft_name(buft);
            d["device"] = dev ? nb::cast(std::string(ggml_backend_dev_name(dev))) : nb::none();
            d["host"] = ggml_backend_buft_is_host(buft);
            d["model"] = mb.model;
            d["context"] = mb.context;
            d["compute"] = mb.compute;
            out.append(d);
        }
#else
        throw lamina_error("this llama.cpp has no llama_get_memory_breakdown");
#endif
        return out;
    }, nb::arg("ctx"), "Bytes per buffer type: model weights, context (KV cache, outputs), compute buffers.");

    m.def("state_get", [](nb::handle ctx) {
        auto st = context_leased(ctx);
        state_header h = header_of(*st);
        std::string out(sizeof(k_magic) + sizeof(h) + st->tokens.size() * sizeof(llama_token), '\0');
        char * p = out.data();
        std::memcpy(p, k_magic, sizeof(k_magic));
        std::memcpy(p + sizeof(k_magic), &h, sizeof(h));
        std::memcpy(p + sizeof(k_magic) + sizeof(h), st->tokens.data(), st->tokens.size() * sizeof(llama_token));
        size_t head = out.size();
        size_t n;
        {
            nb::gil_scoped_release nogil;
            n = llama_state_get_size(st->ctx.get());
            out.resize(head + n);
            n = llama_state_get_data(st->ctx.get(), reinterpret_cast<uint8_t *>(out.data() + head), n);
        }
        out.resize(head + n);
        return nb::bytes(out.data(), out.size());
    }, nb::arg("ctx"), "The whole context (KV cache, logits, token list) as bytes with a settings header.");

    m.def("state_set", [](nb::handle ctx, nb::bytes data) {
        auto st = context_leased(ctx);
        const char * p = data.c_str();
        size_t size = data.size();
        state_header h;
        if (size < sizeof(k_magic) + sizeof(h) || std::memcmp(p, k_magic, sizeof(k_magic)) != 0) {
            throw std::invalid_argument("not a lamina context state");
        }
        std::memcpy(&h, p + sizeof(k_magic), sizeof(h));
        state_header mine = header_of(*st);
        const char * names[] = {"n_vocab", "n_layer", "n_embd", "n_ctx", "n_seq_max", "type_k", "type_v", "embeddings"};
        const int64_t theirs_v[] = {h.n_vocab, h.n_layer, h.n_embd, h.n_ctx, h.n_seq_max, h.type_k, h.type_v, h.embeddings};
        const int64_t mine_v[] = {mine.n_vocab, mine.n_layer, mine.n_embd, mine.n_ctx, mine.n_seq_max, mine.type_k,
                                  mine.type_v, mine.embeddings};
        for (size_t i = 0; i < 8; ++i) {
            if (theirs_v[i] != mine_v[i]) {
                throw std::invalid_argument(std::string("the state was saved with ") + names[i] + "=" +
                                            std::to_string(theirs_v[i]) + ", this context has " +
                                            std::to_string(mine_v[i]));
            }
        }
        size_t head = sizeof(k_magic) + sizeof(h);
        if (h.n_tokens < 0 || h.n_tokens > h.n_ctx || h.last_outputs < 0 || h.last_outputs > h.n_ctx ||
            size < head + size_t(h.n_tokens) * sizeof(llama_token)) {
            throw std::invalid_argument("the state is truncated or corrupt");
        }
        if (st->live_views.load() > 0) {
            throw lamina_error("numpy views of ctx.logits are alive; loading a state may reallocate them: "
                               "delete the views first");
        }
        std::vector<llama_token> toks(size_t(h.n_tokens));
        std::memcpy(toks.data(), p + head, toks.size() * sizeof(llama_token));
        head += toks.size() * sizeof(llama_token);
        size_t got;
        {
            nb::gil_scoped_release nogil;
            got = llama_state_set_data(st->ctx.get(), reinterpret_cast<const uint8_t *>(p + head), size - head);
        }
        if (got == 0) {
            llama_memory_clear(mem_of(*st), true);
            st->tokens.clear();
            st->last_outputs = 0;
            std::string why = last_log_error();
            throw lamina_error("llama.cpp rejected the state (the cache is now empty)" + (why.empty() ? "" : ": " + why));
        }
        st->tokens = std::move(toks);
        st->last_outputs = 0;
        // llama.cpp's state holds the cache but no logits: evaluate the last token again for them
        // (the same computation, so the same values), when it is known and the cache allows it.
        if (h.last_outputs > 0 && !st->tokens.empty() && st->tokens.back() >= 0) {
            llama_token last = st->tokens.back();
            if (llama_memory_seq_rm(mem_of(*st), 0, llama_pos(st->tokens.size() - 1), -1)) {
                st->tokens.pop_back();
                decode_tokens(*st, &last, 1);
            }
        }
    }, nb::arg("ctx"), nb::arg("data"), "Restore a state from state_get into a context with the same settings.");
}

}  // namespace lamina
