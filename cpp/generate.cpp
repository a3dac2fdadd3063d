// The generation loop: prompt (with prefix reuse), sample, detokenize incrementally, decode.
// One native call per yielded text piece; no Python work per token beyond the call itself.
#include "lamina.h"

#include "argmax.h"
#include "sampler.h"

#include <algorithm>

namespace lamina {

llama_token sample_token(context_state & st, sampler_handle & s, bool use_chain) {
    if (s.greedy() && !use_chain) {
        const float * logits = llama_get_logits_ith(st.ctx.get(), -1);
        return argmax(logits, st.model->n_vocab);
    }
    return s.sample(st.ctx.get(), -1);
}

namespace {

class generator {
public:
    generator(nb::handle ctx, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> prompt,
              sampler_handle & sampler, int32_t max_tokens, bool ignore_eos, nb::handle sampler_obj, int32_t shift_keep,
              bool backend_sampling, const std::optional<draft_options> & draft, nb::handle draft_ctx,
              std::vector<std::string> stops)
        : st_(context_shared(ctx)), sampler_(sampler), sampler_ref_(nb::borrow(sampler_obj)),
          text_(std::move(stops)), max_tokens_(max_tokens), ignore_eos_(ignore_eos), shift_keep_(shift_keep) {
        context_lease lease(st_, this);  // the checks below read the context
        require_vocab(*st_->model);     // generated tokens become text
        if (draft) {
            if (backend_sampling) throw std::invalid_argument("speculative decoding samples on the host: not with backend_sampling");
            if (shift_keep >= 0) throw std::invalid_argument("speculative decoding ends at a full context: use context_full='stop'");
            if (st_->embeddings) throw std::invalid_argument("speculative decoding needs a context without embeddings");
            std::shared_ptr<context_state> dft;
            if (!draft_ctx.is_none()) {
                dft = context_shared(draft_ctx);
                if (dft == st_) throw std::invalid_argument("the draft context is the target context");
                if (llama_n_ctx_seq(dft->ctx.get()) < llama_n_ctx_seq(st_->ctx.get())) {
                    throw std::invalid_argument("the draft context holds fewer tokens than the target's");
                }
                context_lease dlease(dft);
                spec_ = std::make_unique<speculation>(*st_, dft, *draft);
            } else {
                spec_ = std::make_unique<speculation>(*st_, nullptr, *draft);
            }
        } else if (!draft_ctx.is_none()) {
            throw std::invalid_argument("a draft context without draft settings");
        }
        if (backend_sampling) {
            // llama.cpp's backend sampling (experimental in the pin): the argmax runs in the graph
            // on the device holding the output layer, and only the token id comes back instead of
            // n_vocab logits. Greedy only: the other samplers keep their exact host chains.
            if (!sampler.greedy()) throw std::invalid_argument("backend_sampling supports the greedy sampler only");
            if (st_->embeddings) throw std::invalid_argument("backend_sampling needs a context without embeddings");
            backend_wanted_ = true;
        }
        if (shift_keep >= 0) {
            const int32_t n_ctx = int32_t(llama_n_ctx_seq(st_->ctx.get()));
            if (shift_keep >= n_ctx / 2) {
                throw std::invalid_argument("n_keep must be below half the context (" + std::to_string(n_ctx / 2) + ")");
            }
            if (!llama_memory_can_shift(llama_get_memory(st_->ctx.get()))) {
                throw lamina_error("this model's KV cache cannot shift positions: use context_full='stop'");
            }
        }
        prompt_.assign(prompt.data(), prompt.data() + prompt.shape(0));
        check_tokens(*st_->model, prompt_.data(), prompt_.size());
        check_prompt_fits(*st_, prompt_.size());
    }

    nb::str next() {
        if (done_ && final_piece_) {
            final_piece_ = false;
            nb::str out = text_replaced(bytes_.data(), bytes_.size());
            bytes_.clear();
            return out;
        }
        if (done_) throw nb::stop_iteration();
        context_lease lease(st_, this);  // BusyError for a second thread, or a re-entrant call
        context_state & st = *lease;
        std::optional<context_lease> draft_lease;  // the draft model's context is ours for the step too
        if (spec_ && spec_->draft_context()) draft_lease.emplace(spec_->draft_context());
        begin_operation(st, op_);  // an abort between two tokens stops the next one
        if (started_ && st.seq_epochs[0] != epoch_) {  // another client changed sequence 0 under this generation
            finish("error");
            raise_stale(st, 0, "this generation");
        }
        if (!started_) {
            // Evaluating the prompt takes sequence 0 (a generation still open on it ends at its next
            // next()). An interrupted evaluation (Ctrl-C, abort) leaves the cache holding a prefix of
            // the prompt: the next call evaluates the rest, reusing it.
            if (backend_wanted_ && st.backend_owner.load() != this) attach_backend(st);  // may refuse (live views): retried
            epoch_ = seq_changed(st, 0, "another generation (ctx.generate, chat or complete)");
            const int64_t t0 = llama_time_us();
            n_prompt_eval_ += int64_t(eval_prompt(st, prompt_));
            t_prompt_us_ += llama_time_us() - t0;
            if (spec_) spec_->begin(prompt_);
            {
                gil_release nogil;
                sampler_.accept_prompt(prompt_.data(), prompt_.size());  // penalties and DRY see the prompt
            }
            started_ = true;
            n_reused_ = std::max<int64_t>(int64_t(prompt_.size()) - n_prompt_eval_, 0);
            t_gen_start_ = llama_time_us();
            if (max_tokens_ == 0) {
                finish("length");
                throw nb::stop_iteration();
            }
        }
        // the sampler is ours unless another operation on the context detached it meanwhile
        const bool backend = st.seq_samplers[0] && st.backend_owner.load() == this;
        // Signals are handled between pieces; a token slow enough for Ctrl-C to wait on (> 20 ms,
        // a big model on a CPU) also gets the watch inside its decode (it costs a few us per piece)
        signal_watch watch(slow_tokens_ && on_main_thread());  // destroyed with the GIL held
        st.signals_here = watch.active();
        {
            gil_release nogil;
            caller_pin pin(st.pin_gen);
            llama_work work;  // decodes and the sampling reads that synchronize with them
            while (true) {
                if (pending_ && spec_) {
                    // `last_` and a draft in one decode; every token the target's sampler keeps is out at once
                    const size_t n_ctx_seq = llama_n_ctx_seq(st.ctx.get());
                    if (st.tokens.size() + 1 > n_ctx_seq) {
                        finish_reason_ = "length";
                        done_ = true;
                        break;
                    }
                    const size_t base = st.tokens.size();
                    const int32_t n_draft_max = int32_t(std::min<int64_t>(int64_t(n_ctx_seq - base - 1),
                                                                          int64_t(max_tokens_) - int64_t(generated_.size()) - 1));
                    const int64_t t_dec = llama_time_us();
                    int rc = spec_->step(st, sampler_, last_, n_draft_max, ids_);
                    slow_tokens_ = llama_time_us() - t_dec > 20000;
                    if (rc != 0) {
                        gil_acquire gil;
                        st.signals_here = false;
                        decode_failed(st, rc);
                    }
                    pending_ = false;
                    size_t k = 0;
                    bool pushed = false;  // the last id went out
                    for (; k < ids_.size(); ++k) {
                        const llama_token tok = ids_[k];
                        pushed = false;
                        if (!ignore_eos_ && llama_vocab_is_eog(st.model->vocab, tok)) {
                            finish_reason_ = "stop";
                            done_ = true;
                            break;
                        }
                        generated_.push_back(tok);
                        pushed = true;
                        append_piece(*st.model, tok, false, bytes_);
                        take_piece();
                        if (stopped_) {
                            finish_reason_ = "stop";
                            done_ = true;
                            break;
                        }
                        if (int32_t(generated_.size()) >= max_tokens_) {
                            finish_reason_ = "length";
                            done_ = true;
                            break;
                        }
                    }
                    if (done_) {  // the caches hold the tokens before the last one out
                        spec_->truncate(st, base + 1 + k);
                        pending_ = pushed;  // the token that ended it is out but not decoded (a stop cuts from there)
                        break;
                    }
                    last_ = ids_.back();
                    pending_ = true;
                    if (ready()) break;
                    continue;
                }
                if (pending_) {
                    if (st.tokens.size() + 1 > llama_n_ctx_seq(st.ctx.get())) {
                        if (shift_keep_ < 0) {
                            finish_reason_ = "length";
                            done_ = true;
                            break;
                        }
                        shift_context(st);
                    }
                    llama_token t = last_;
                    const int64_t t_dec = llama_time_us();
                    int rc = decode_checked(st, llama_batch_get_one(&t, 1), false);  // sampling syncs
                    slow_tokens_ = llama_time_us() - t_dec > 20000;
                    if (rc != 0) {
                        gil_acquire gil;
                        st.signals_here = false;
                        decode_failed(st, rc);  // raises (KeyboardInterrupt from a signal handler, or DecodeError)
                    }
                    st.last_outputs = 1;
                    st.tokens.push_back(t);
                    pending_ = false;
                }
                llama_token tok = backend ? llama_get_sampled_token_ith(st.ctx.get(), -1)
                                          : sample_token(st, sampler_, false);
                if (tok == LLAMA_TOKEN_NULL) {
                    const float * logits = llama_get_logits_ith(st.ctx.get(), -1);
                    if (logits == nullptr) {
                        failed_ = true;
                        done_ = true;
                        break;
                    }
                    tok = argmax(logits, st.model->n_vocab);
                }
                if (!ignore_eos_ && llama_vocab_is_eog(st.model->vocab, tok)) {
                    finish_reason_ = "stop";
                    done_ = true;
                    break;
                }
                generated_.push_back(tok);
                last_ = tok;
                pending_ = true;
                append_piece(*st.model, tok, false, bytes_);
                take_piece();
                if (stopped_) {
                    finish_reason_ = "stop";
                    done_ = true;
                    break;
                }
                if (int32_t(generated_.size()) >= max_tokens_) {
                    finish_reason_ = "length";
                    done_ = true;
                    break;
                }
                if (ready()) break;
            }
        }
        st.signals_here = false;
        if (failed_) {
            ended_ = true;
            detach_backend(st);
            throw lamina_error("backend sampling returned no token and no logits for this step");
        }
        if (done_) {
            t_gen_us_ = llama_time_us() - t_gen_start_;
            detach_backend(st);
            if (text_.active()) {  // the rest of the text, up to a stop string (an incomplete tail may complete one)
                if (!stopped_ && text_.finish()) stopped_ = true;
                if (stopped_) {
                    finish_reason_ = "stop";
                    cut_tokens(st, text_.tokens_before_stop());
                }
                bytes_.assign(text_.text(), released_);
                released_ = text_.text().size();
            }
            ended_ = true;
            if (bytes_.empty()) throw nb::stop_iteration();
            final_piece_ = true;
            check_signals();  // as below; the next call returns the last piece
            final_piece_ = false;
            nb::str out = text_replaced(bytes_.data(), bytes_.size());
            bytes_.clear();
            return out;
        }
        // A Ctrl-C that arrived during the decode (GIL released) is raised here, inside __next__, with
        // the piece kept for the next call: a `for` loop's try/except then sees it on every Python.
        // Left to the interpreter, it is raised at the loop's back edge, which Python 3.13 can match
        // against the wrong exception-table entry and skip the handler (CPython gh-130279).
        check_signals();
        if (text_.active()) {
            const size_t upto = text_.releasable();
            nb::str out = text_replaced(text_.text().data() + released_, upto - released_);
            released_ = upto;
            return out;
        }
        size_t k = utf8_complete(bytes_);
        nb::str out = text_replaced(bytes_.data(), k);
        bytes_.erase(0, k);
        return out;
    }

    // Final: iteration ends, and the context gets its logits back (the backend sampler detached).
    void close() {
        ended_ = true;
        done_ = true;
        final_piece_ = false;
        if (st_->backend_owner.load() != this) return;
        context_lease lease(st_, this);
        detach_backend(*lease);
    }
    // Without a lease (a generator can be collected while another thread uses the context): give
    // up the sampler; the context's next operation detaches it.
    ~generator() {
        const void * self = this;
        st_->backend_owner.compare_exchange_strong(self, nullptr);
    }

    // A stop string ended the text after the first `keep` tokens: take the others out of the token
    // list and the KV cache (the next generation reuses the prefix up to the stop). Under the lease.
    void cut_tokens(context_state & st, size_t keep) {
        const size_t drop = generated_.size() - keep;
        const size_t decoded = drop - (pending_ && drop > 0 ? 1 : 0);  // the last sampled token is not decoded yet
        const bool mirrored = decoded <= st.tokens.size() &&
            std::equal(st.tokens.end() - std::ptrdiff_t(decoded), st.tokens.end(),
                       generated_.begin() + std::ptrdiff_t(keep));
        if (decoded > 0 && mirrored) {  // another operation since would have changed the mirror: leave it
            const llama_pos from = llama_pos(st.tokens.size() - decoded);
            llama_memory_t mem = llama_get_memory(st.ctx.get());
            if (llama_memory_seq_rm(mem, 0, from, -1)) {
                st.tokens.resize(size_t(from));
            } else {  // a cache that cannot drop a tail (recurrent): the mirror says what it holds
                mirror_unknown(st, llama_memory_seq_pos_max(mem, 0));
            }
            st.last_outputs = 0;  // the logits were the dropped tokens'
        }
        generated_.resize(keep);
        pending_ = false;
    }

    // A token's bytes were appended to bytes_: with stop strings they go to the text (stopped_ when
    // one appeared).
    void take_piece() {
        if (!text_.active()) return;
        stopped_ = text_.push(bytes_);
        bytes_.clear();
    }
    // Whether next() has a piece to hand out: whole characters (none that may start a stop string).
    bool ready() const {
        return text_.active() ? text_.releasable() > released_ : utf8_complete(bytes_) > 0;
    }

    // Under a lease: next() appends to generated_ with the GIL released (another thread reading
    // meanwhile gets BusyError, as for any use of a context in use).
    nb::dict stats() {
        std::optional<context_lease> lease;  // once ended, nothing changes what stats read
        if (!ended_) lease.emplace(st_, this);
        nb::dict d;
        d["finish_reason"] = finish_reason_.empty() ? nb::none() : nb::cast(finish_reason_);
        d["n_prompt"] = prompt_.size();
        d["n_prompt_eval"] = n_prompt_eval_;
        d["n_reused"] = n_reused_;
        d["n_generated"] = generated_.size();
        d["t_prompt_us"] = t_prompt_us_;
        d["n_shifts"] = n_shifts_;
        d["t_gen_us"] = done_ ? t_gen_us_ : (started_ ? llama_time_us() - t_gen_start_ : 0);
        if (spec_) spec_->stats(d);
        return d;
    }

    nb::ndarray<nb::numpy, int32_t, nb::ndim<1>> tokens() {
        std::optional<context_lease> lease;
        if (!ended_) lease.emplace(st_, this);
        auto * heap = new std::vector<int32_t>(generated_.begin(), generated_.end());
        nb::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<int32_t> *>(p); });
        return nb::ndarray<nb::numpy, int32_t, nb::ndim<1>>(heap->data(), {heap->size()}, owner);
    }

private:
    const uint64_t op_ = new_operation_id();
    // The context is full: keep the first shift_keep_ tokens, drop half of the rest, and move the
    // remainder down (llama.cpp's context shift; RoPE positions are corrected by the cache).
    void shift_context(context_state & st) {
        const llama_pos n_past = llama_pos(st.tokens.size());
        const llama_pos keep = shift_keep_;
        const llama_pos discard = (n_past - keep) / 2;
        llama_memory_t mem = llama_get_memory(st.ctx.get());
        llama_memory_seq_rm(mem, 0, keep, keep + discard);
        llama_memory_seq_add(mem, 0, keep + discard, n_past, -discard);
        st.tokens.erase(st.tokens.begin() + keep, st.tokens.begin() + keep + discard);
        ++n_shifts_;
    }

    void finish(const char * reason) {
        ended_ = true;
        finish_reason_ = reason;
        done_ = true;
        t_gen_us_ = 0;
        detach_backend(*st_);  // under next()'s lease
    }

    // llama.cpp's backend sampling (experimental in the pin): the argmax runs in the graph on the
    // device holding the output layer and only the token id comes back. The context owns the
    // sampler while attached. Attaching makes llama.cpp reallocate its output buffer at the next
    // decode: refused while numpy views of the logits are alive.
    void attach_backend(context_state & st) {
        if (st.live_views.load() > 0) {
            throw lamina_error("backend sampling reallocates llama.cpp's logits buffer, and numpy views of "
                               "ctx.logits are alive: delete them (or copy with np.array(ctx.logits)) first");
        }
        backend_greedy_attach(st, 0, this);  // false: not supported here (e.g. tensor split): sampled on the host
    }

    void detach_backend(context_state & st) {
        if (st.backend_owner.load() == this) backend_sampler_detach(st, -1);
    }


    std::shared_ptr<context_state> st_;
    std::unique_ptr<speculation> spec_;  // speculative decoding, when asked for
    std::vector<llama_token> ids_;       // a speculative step's tokens
    sampler_handle & sampler_;
    nb::object sampler_ref_;  // keeps the Python sampler (owner of sampler_) alive
    std::vector<llama_token> prompt_, generated_;
    std::string bytes_;       // detokenized bytes not yet returned (an incomplete UTF-8 tail)
    stop_text text_;          // with stop strings: the text, cut at the first one
    size_t released_ = 0;     // bytes of text_ returned
    bool stopped_ = false;    // a stop string ended it
    std::string finish_reason_;
    int32_t max_tokens_;
    bool ignore_eos_;
    int32_t shift_keep_;      // < 0: stop when the context is full; else tokens kept when shifting
    int64_t n_shifts_ = 0;
    bool started_ = false, done_ = false, pending_ = false, failed_ = false;
    bool final_piece_ = false;  // done, and the last piece waits in bytes_ (a Ctrl-C came with it)
    bool ended_ = false;        // done and settled (set with the GIL): stats and tokens read without a lease
    uint64_t epoch_ = 0;  // sequence 0's epoch when this generation took it (seq_changed)
    llama_token last_ = -1;
    bool slow_tokens_ = false;     // the last token's decode took > 20 ms: watch for signals inside it
    bool backend_wanted_ = false;  // greedy sampling inside the graph (llama_set_sampler), at the first next()
    int64_t n_prompt_eval_ = 0, n_reused_ = 0, t_prompt_us_ = 0, t_gen_start_ = 0, t_gen_us_ = 0;
};

}  // namespace

void init_generate(nb::module_ & m) {
    m.def("argmax", [](nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> x, const std::string & impl) {
        const int32_t n = int32_t(x.shape(0));
        if (impl == "auto") return argmax(x.data(), n);
        if (impl == "sse2") return argmax_sse2(x.data(), n);
        if (impl == "avx2") {
#if defined(LAMINA_ARGMAX_AVX2)
            if (has_avx2()) return argmax_avx2(x.data(), n);
#endif
            throw std::invalid_argument("this CPU or build has no AVX2 argmax");
        }
        throw std::invalid_argument("impl must be 'auto', 'sse2' or 'avx2'");
    }, nb::arg("x"), nb::arg("impl") = "auto",
    "First index of the largest value (llama.cpp greedy semantics); impl picks the SIMD version (tests).");

    m.def("utf8_replace", [](nb::bytes b) {
        const std::string out = utf8_replace(std::string(b.c_str(), b.size()));
        return nb::bytes(out.data(), out.size());
    }, nb::arg("data"), "bytes.decode('utf-8', 'replace').encode() without Python: how generated text and stop strings see bytes (tests).");
    {
        using Params = draft_options;
        nb::class_<Params>(m, "DraftParams", "A draft's settings for speculative decoding (the defaults live here).")
            .def(nb::init<>())
            LAMINA_RW(n_max) LAMINA_RW(n_min) LAMINA_RW(p_min) LAMINA_RW(ngram_n);
    }
    nb::class_<generator>(m, "Generator", "Iterator of text pieces from a native decode loop.")
        .def("__init__", [](generator * self, nb::handle ctx,
                            nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> prompt,
                            nb::handle sampler, int32_t max_tokens, bool ignore_eos, int32_t shift_keep,
                            bool backend_sampling, std::optional<draft_options> draft, nb::handle draft_ctx,
                            std::vector<std::string> stop) {
            new (self) generator(ctx, prompt, nb::cast<sampler_handle &>(sampler), max_tokens, ignore_eos, sampler,
                                 shift_keep, backend_sampling, draft, draft_ctx, std::move(stop));
        }, nb::arg("ctx"), nb::arg("prompt"), nb::arg("sampler"), nb::arg("max_tokens"), nb::arg("ignore_eos") = false,
        nb::arg("shift_keep") = -1, nb::arg("backend_sampling") = false, nb::arg("draft").none() = nb::none(),
        nb::arg("draft_ctx").none() = nb::none(), nb::arg("stop") = std::vector<std::string>{},
        R"(Prepare generation on sequence 0 of ctx; nothing runs until the first next().

The first next() evaluates the prompt, reusing the longest prefix already in the KV cache.
Each next() returns the next piece of UTF-8-complete text (GIL released while decoding).
shift_keep < 0 stops with finish reason 'length' when the context is full; otherwise the first
shift_keep tokens stay and half of the rest is dropped (context shift). draft (DraftParams): speculative
decoding with the draft model's context draft_ctx (n_seq_max 1), or n-gram lookup without one. stop:
strings that end the text before them (finish reason 'stop'), matched in the text as yielded; the tokens
from the stop on leave the token list and the KV cache.)")
        .def("__iter__", [](nb::handle self) { return nb::borrow(self); }, nb::sig("def __iter__(self) -> Generator"))
        .def("__next__", &generator::next)
        .def("close", &generator::close, "Stop: iteration ends, and the context gets its logits back.")
        .def("stats", &generator::stats, "finish_reason, prompt/generated counts, timings (us).")
        .def_prop_ro("tokens", &generator::tokens, nb::rv_policy::automatic, "Generated token ids so far (a copy).");
}

}  // namespace lamina
