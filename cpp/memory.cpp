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

// A restored cell at position 2^31-1 would overflow llama.cpp's next-position arithmetic (every
// decode computes pos_max + 1 for every sequence): such a state is refused. llama.cpp's seq_rm
// cannot remove that cell (its ranges end before INT32_MAX), so the whole cache is cleared.
void check_restored_positions(context_state & st, int32_t seq) {
    const int32_t first = seq < 0 ? 0 : seq, end = seq < 0 ? int32_t(llama_n_seq_max(st.ctx.get())) : seq + 1;
    for (int32_t s = first; s < end; ++s) {
        if (llama_memory_seq_pos_max(mem_of(st), s) == INT32_MAX) {
            llama_memory_clear(mem_of(st), true);
            st.tokens.clear();
            st.last_outputs = 0;
            seq_changed(st, -1, "load_state() (a refused state cleared the whole cache)");
            throw std::invalid_argument("the state holds a cell at position 2147483647, the end of llama.cpp's int32 "
                                        "positions: refused, and the whole cache was cleared (llama.cpp cannot "
                                        "remove that cell alone)");
        }
    }
}

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
    const size_t n = size_t(int64_t(pmax) + 1);
    if (suffix_removed_at && cut <= st.tokens.size() && n == cut) {
        st.tokens.resize(cut);
    } else {
        mirror_unknown(st, pmax);
    }
    st.last_outputs = 0;
}

// Sequence 0's mirror after a restored state: its saved tokens when trusted and as many as the
// cache's positions, else placeholders (mirror_unknown), so the next prompt is evaluated in full.
void mirror_restored(context_state & st, std::vector<llama_token> && tokens, bool trusted) {
    const llama_pos pmax = llama_memory_seq_pos_max(mem_of(st), 0);
    if (trusted && int64_t(tokens.size()) == int64_t(pmax) + 1) st.tokens = std::move(tokens);
    else mirror_unknown(st, pmax);
}

// A saved state: an 8-byte magic ("LAMINAS3" whole context, "LAMINAQ3" one sequence), the header,
// the token mirror (n_tokens int32 ids, -1 where unknown), then llama.cpp's own bytes
// (llama_state_get_data / llama_state_seq_get_data), payload_size of them. Saved state is
// untrusted input like a model file: parse_state checks all of it against this context before
// llama.cpp sees the payload (whose parser has its own bounds checks; ci/fuzz.py --state).
constexpr char k_magic[8] = {'L', 'A', 'M', 'I', 'N', 'A', 'S', '3'};
constexpr char k_seq_magic[8] = {'L', 'A', 'M', 'I', 'N', 'A', 'Q', '3'};

struct state_header {
    int64_t n_vocab, n_layer, n_embd, n_params, model_size;  // the model
    int64_t n_ctx, n_seq_max, type_k, type_v, embeddings;     // the context's settings
    int64_t last_outputs, n_tokens, src_seq, payload_size;    // this state
    int64_t adapters;  // the LoRA adapters and scales the cache was computed with (lora_fingerprint; 0: none)
};

state_header header_of(const context_state & st) {
    const llama_model * m = st.model->model.get();
    return {st.model->n_vocab, llama_model_n_layer(m), llama_model_n_embd(m), int64_t(llama_model_n_params(m)),
            int64_t(llama_model_size(m)), int64_t(llama_n_ctx(st.ctx.get())), int64_t(llama_n_seq_max(st.ctx.get())),
            st.type_k, st.type_v, st.embeddings ? 1 : 0, st.last_outputs, int64_t(st.tokens.size()), -1, 0,
            lora_fingerprint(st)};
}

// magic, header, tokens, then llama.cpp's bytes from fill(dst, n) (which returns the bytes written)
template <typename Size, typename Fill>
nb::bytes state_blob(const char (&magic)[8], state_header h, const std::vector<llama_token> & toks, Size size, Fill fill) {
    h.n_tokens = int64_t(toks.size());
    const size_t head = sizeof(magic) + sizeof(h) + toks.size() * sizeof(llama_token);
    std::string out;
    {
        gil_release nogil;
        llama_work work;
        const size_t n = size();
        out.resize(head + n);
        h.payload_size = int64_t(fill(reinterpret_cast<uint8_t *>(out.data() + head), n));
        out.resize(head + size_t(h.payload_size));
    }
    if (h.payload_size == 0) {
        std::string why = last_log_error();
        throw lamina_error("llama.cpp could not save the state" + (why.empty() ? "" : ": " + why));
    }
    std::memcpy(out.data(), magic, sizeof(magic));
    std::memcpy(out.data() + sizeof(magic), &h, sizeof(h));
    std::memcpy(out.data() + sizeof(magic) + sizeof(h), toks.data(), toks.size() * sizeof(llama_token));
    return nb::bytes(out.data(), out.size());
}

struct parsed_state {
    state_header h;
    std::vector<llama_token> tokens;
    const uint8_t * payload;
};

parsed_state parse_state(const char * p, size_t size, bool seq, const context_state & st) {
    const char * what = seq ? "sequence state" : "state";
    const char (&magic)[8] = seq ? k_seq_magic : k_magic;
    const char (&other)[8] = seq ? k_magic : k_seq_magic;
    parsed_state r{};
    auto fail = [&](const std::string & why) -> void {
        throw std::invalid_argument(std::string("not a usable lamina ") + what + ": " + why);
    };
    if (size < sizeof(magic) || std::memcmp(p, magic, 6) != 0) fail("it does not start with LAMINA");
    if (std::memcmp(p, other, sizeof(other)) == 0) {
        throw std::invalid_argument(seq ? "this is a whole-context state: load it without seq="
                                        : "this is a sequence state: load it with seq=");
    }
    if (std::memcmp(p, magic, sizeof(magic)) != 0) {
        fail(std::string("format '") + std::string(p + 6, 2) + "'; this lamina reads '" + std::string(magic + 6, 2) +
             "' (states from other lamina versions are not portable)");
    }
    if (size < sizeof(magic) + sizeof(r.h)) fail("it is shorter than its header");
    std::memcpy(&r.h, p + sizeof(magic), sizeof(r.h));
    const state_header mine = header_of(st);
    // the model, then (whole-context states) the settings that shape llama.cpp's bytes
    using H = state_header;
    const std::pair<const char *, int64_t H::*> fields[] = {
        {"n_vocab", &H::n_vocab}, {"n_layer", &H::n_layer}, {"n_embd", &H::n_embd}, {"n_params", &H::n_params},
        {"model_size", &H::model_size}, {"type_k", &H::type_k}, {"type_v", &H::type_v}, {"n_seq_max", &H::n_seq_max},
        {"n_ctx", &H::n_ctx}, {"embeddings", &H::embeddings}};
    const size_t n_checked = seq ? 8 : 10;  // a sequence fits a context of another size
    for (size_t i = 0; i < n_checked; ++i) {
        const auto & [name, f] = fields[i];
        if (r.h.*f != mine.*f) {
            throw std::invalid_argument(std::string("the ") + what + " was saved with " + name + "=" +
                                        std::to_string(r.h.*f) + ", this context has " + std::to_string(mine.*f) +
                                        (i == 7 ? " (llama.cpp keeps one KV stream per sequence; their number must match)"
                                                : ""));
        }
    }
    if (r.h.adapters != mine.adapters) {
        throw std::invalid_argument(std::string("the ") + what + " was computed with " +
                                    (r.h.adapters == 0 ? "no LoRA adapter" : "other LoRA adapters or scales") +
                                    " than this context applies (" + (mine.adapters == 0 ? "none" : "ctx.lora") +
                                    "): set the same ones first");
    }
    // the token mirror is bounded by the bytes, not by n_ctx: positions shifted by kv.seq_add can
    // make it longer than the context, and it is kept only when it matches the restored cache
    const size_t fixed = sizeof(magic) + sizeof(r.h);
    if (r.h.n_tokens < 0 || uint64_t(r.h.n_tokens) > (size - fixed) / sizeof(llama_token)) {
        fail("n_tokens=" + std::to_string(r.h.n_tokens) + " does not fit its " + std::to_string(size) + " bytes");
    }
    if (r.h.last_outputs < 0 || r.h.last_outputs > r.h.n_ctx) fail("last_outputs=" + std::to_string(r.h.last_outputs));
    if (seq ? (r.h.src_seq < 0 || r.h.src_seq >= r.h.n_seq_max) : r.h.src_seq != -1) {
        fail("source sequence " + std::to_string(r.h.src_seq));
    }
    const size_t head = fixed + size_t(r.h.n_tokens) * sizeof(llama_token);
    if (r.h.payload_size <= 0 || size < head || uint64_t(size - head) != uint64_t(r.h.payload_size)) {
        fail(std::to_string(size) + " bytes where the header accounts for " +
             std::to_string(head + uint64_t(std::max<int64_t>(r.h.payload_size, 0))) + " (truncated or extended)");
    }
    r.tokens.resize(size_t(r.h.n_tokens));
    std::memcpy(r.tokens.data(), p + sizeof(magic) + sizeof(r.h), r.tokens.size() * sizeof(llama_token));
    for (size_t i = 0; i < r.tokens.size(); ++i) {
        if (r.tokens[i] < -1 || r.tokens[i] >= mine.n_vocab) {
            fail("token " + std::to_string(i) + " is " + std::to_string(r.tokens[i]) + ", outside the vocabulary");
        }
    }
    r.payload = reinterpret_cast<const uint8_t *>(p + head);
    return r;
}

nb::bytes seq_state_get(nb::handle ctx, int32_t seq) {
    auto st = context_leased(ctx);
    check_seq(*st, seq, false);
    state_header h = header_of(*st);
    h.src_seq = seq;
    const std::vector<llama_token> toks = seq == 0 ? st->tokens : std::vector<llama_token>{};
    llama_context * c = st->ctx.get();
    return state_blob(k_seq_magic, h, toks, [&] { return llama_state_seq_get_size(c, seq); },
                      [&](uint8_t * dst, size_t n) { return llama_state_seq_get_data(c, dst, n, seq); });
}

void seq_state_set(nb::handle ctx, nb::bytes data, int32_t seq) {
    auto st = context_leased(ctx);
    check_seq(*st, seq, false);
    parsed_state r = parse_state(data.c_str(), data.size(), true, *st);
    llama_memory_seq_rm(mem_of(*st), seq, -1, -1);
    const size_t got = without_gil([&] {
        llama_work work;
        return llama_state_seq_set_data(st->ctx.get(), r.payload, size_t(r.h.payload_size), seq);
    });
    if (seq == 0) st->tokens.clear();
    seq_changed(*st, seq, "load_state(seq=...)");
    if (got == 0) {
        llama_memory_seq_rm(mem_of(*st), seq, -1, -1);
        std::string why = last_log_error();
        throw lamina_error("llama.cpp rejected the sequence state (sequence " + std::to_string(seq) +
                           " is now empty)" + (why.empty() ? "" : ": " + why));
    }
    check_restored_positions(*st, seq);
    if (seq == 0) mirror_restored(*st, std::move(r.tokens), r.h.src_seq == 0);  // saved from sequence 0: known
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
        if (ok) seq_changed(*st, seq, "kv.seq_rm()");
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
        if (src != dst) seq_changed(*st, dst, "kv.seq_cp()");
        if (dst == 0 && src != 0) resync_seq0(*st, false, 0);
    }, nb::arg("ctx"), nb::arg("src"), nb::arg("dst"), nb::arg("p0") = -1, nb::arg("p1") = -1,
    "Make sequence dst share src's cells in [p0, p1).");

    m.def("kv_seq_keep", [](nb::handle ctx, int32_t seq) {
        auto st = context_leased(ctx);
        check_seq(*st, seq, false);
        llama_memory_seq_keep(mem_of(*st), seq);
        for (int32_t other = 0; other < int32_t(st->seq_epochs.size()); ++other) {
            if (other != seq) seq_changed(*st, other, "kv.seq_keep()");
        }
        if (seq != 0) resync_seq0(*st, false, 0);
    }, nb::arg("ctx"), nb::arg("seq"), "Drop every sequence but this one.");

    m.def("kv_seq_add", [](nb::handle ctx, int32_t seq, llama_pos p0, llama_pos p1, llama_pos delta) {
        auto st = context_leased(ctx);
        check_seq(*st, seq, false);
        check_range(p0, p1);
        if (!llama_memory_can_shift(mem_of(*st))) {
            throw lamina_error("this KV cache cannot shift positions (e.g. a recurrent model or quantized cache)");
        }
        // llama.cpp adds delta to each cell's int32 position: keep the largest inside int32
        const int64_t pmax = llama_memory_seq_pos_max(mem_of(*st), seq);
        if (delta > 0 && pmax + int64_t(delta) >= int64_t(INT32_MAX)) {
            throw std::invalid_argument("shifting by " + std::to_string(delta) + " moves position " +
                                        std::to_string(pmax) + " past llama.cpp's int32 positions");
        }
        llama_memory_seq_add(mem_of(*st), seq, p0, p1, delta);
        seq_changed(*st, seq, "kv.seq_add()");
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
        seq_changed(*st, seq, "kv.seq_div()");
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
        llama_context * c = st->ctx.get();
        return state_blob(k_magic, header_of(*st), st->tokens, [&] { return llama_state_get_size(c); },
                          [&](uint8_t * dst, size_t n) { return llama_state_get_data(c, dst, n); });
    }, nb::arg("ctx"), "The whole context (KV cache, logits, token list) as bytes with a settings header.");

    m.def("state_set", [](nb::handle ctx, nb::bytes data) {
        auto st = context_leased(ctx);
        parsed_state r = parse_state(data.c_str(), data.size(), false, *st);
        if (st->live_views.load() > 0) {
            throw lamina_error("numpy views of ctx.logits are alive; loading a state may reallocate them: "
                               "delete the views first");
        }
        const size_t got = without_gil([&] {
            llama_work work;
            return llama_state_set_data(st->ctx.get(), r.payload, size_t(r.h.payload_size));
        });
        seq_changed(*st, -1, "load_state()");
        if (got == 0) {
            llama_memory_clear(mem_of(*st), true);
            st->tokens.clear();
            st->last_outputs = 0;
            std::string why = last_log_error();
            throw lamina_error("llama.cpp rejected the state (the cache is now empty)" + (why.empty() ? "" : ": " + why));
        }
        check_restored_positions(*st, -1);
        // the cache must hold exactly the mirrored tokens, or prefix reuse would skip real work
        mirror_restored(*st, std::move(r.tokens), true);
        st->last_outputs = 0;
        // llama.cpp's state holds the cache but no logits: evaluate the last token again for them
        // (the same computation, so the same values), when it is known and the cache allows it.
        if (r.h.last_outputs > 0 && !st->tokens.empty() && st->tokens.back() >= 0) {
            llama_token last = st->tokens.back();
            if (llama_memory_seq_rm(mem_of(*st), 0, llama_pos(st->tokens.size() - 1), -1)) {
                st->tokens.pop_back();
                decode_tokens(*st, &last, 1);
            }
        }
    }, nb::arg("ctx"), nb::arg("data"), "Restore a state from state_get into a context with the same settings.");
}

}  // namespace lamina
