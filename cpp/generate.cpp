// ctx.generate: a request on sequence 0 of the context's engine (engine.h), stepped by next()
// itself. One native call per yielded text piece; no Python work per token beyond the call.
#include "engine.h"

#include "argmax.h"

#include <algorithm>

namespace lamina {

namespace {

const char * const k_generation = "a generation (ctx.generate, chat or complete)";

// ctx.generate's client of the context's engine: one request on sequence 0 (prefix reuse), driven
// by next() itself, a step at a time until the request has text or ended.
class generator {
public:
    generator(nb::handle ctx, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> prompt,
              const sampler_options & opts, int32_t max_tokens, bool ignore_eos, int32_t shift_keep,
              bool backend_sampling, const std::optional<draft_options> & draft, nb::handle draft_ctx,
              std::vector<std::string> stops, int32_t top_logprobs)
        : st_(context_shared(ctx)), r_(std::make_shared<request>()) {
        context_lease lease(st_, st_->eng.get());  // the checks below read the context
        require_vocab(*st_->model);  // generated tokens become text
        r_->prompt.assign(prompt.data(), prompt.data() + prompt.shape(0));
        r_->sampler = std::make_unique<sampler_handle>(st_->model, opts);
        r_->said = stop_text(std::move(stops));
        r_->o.max_tokens = max_tokens;
        r_->o.ignore_eos = ignore_eos;
        r_->o.keep = true;
        r_->o.shift_keep = shift_keep;
        r_->o.backend = backend_sampling;
        r_->o.top_logprobs = top_logprobs;
        r_->o.who = k_generation;
        engine_of(*st_).check(*st_, *r_);
        if (draft) {
            if (backend_sampling) throw std::invalid_argument("speculative decoding samples on the host: not with backend_sampling");
            if (shift_keep >= 0) throw std::invalid_argument("speculative decoding ends at a full context: use context_full='stop'");
            std::shared_ptr<context_state> dft;
            if (!draft_ctx.is_none()) {
                dft = context_shared(draft_ctx);
                if (dft == st_) throw std::invalid_argument("the draft context is the target context");
                if (llama_n_ctx_seq(dft->ctx.get()) < llama_n_ctx_seq(st_->ctx.get())) {
                    throw std::invalid_argument("the draft context holds fewer tokens than the target's");
                }
            }
            std::optional<context_lease> dlease;  // llama.cpp's speculative init reads the draft context
            if (dft) dlease.emplace(dft);
            r_->spec = std::make_unique<speculation>(*st_, dft, *draft);
        } else if (!draft_ctx.is_none()) {
            throw std::invalid_argument("a draft context without draft settings");
        }
    }

    // The next piece of text: whole characters, none that may start a stop string. The first call
    // queues the request (sequence 0 is then this generation's; one holding it ends); each call
    // steps the engine (GIL released) until the request has text or ended. rest: until it ended,
    // and all the text (complete(): the GIL is taken back once, not per token; beside a Python
    // thread that keeps the GIL, each taking waits up to its switch interval, 5 ms).
    nb::str next(bool rest = false) {
        if (closed_) throw nb::stop_iteration();
        context_lease lease(st_, st_->eng.get());  // BusyError for a second thread, or a re-entrant call
        context_state & st = *lease;
        engine & e = engine_of(st);
        begin_operation(st, op_);  // an abort between two tokens stops the next one
        if (!queued_) {
            // attaching a backend sampler makes llama.cpp reallocate its output buffer at the next decode
            if (r_->o.backend && st.live_views.load() > 0) {
                throw lamina_error("backend sampling reallocates llama.cpp's logits buffer, and numpy views of "
                                   "ctx.logits are alive: delete them (or copy with np.array(ctx.logits)) first");
            }
            if (r_->spec) {
                std::optional<context_lease> dlease;  // the draft model's context evaluates the prompt too
                if (r_->spec->draft_context()) dlease.emplace(r_->spec->draft_context());
                r_->spec->begin(r_->prompt);
            }
            e.queue(r_);
            queued_ = true;
        }
        if (!has_news(e, rest)) {
            // Signals are handled between pieces; a prompt, or a token slow enough for Ctrl-C to wait
            // on (> 20 ms, a big model on a CPU), also gets the watch inside its decode
            signal_watch watch(on_main_thread() && (rest || slow_ || r_->n_fed < r_->prompt.size()));  // destroyed with the GIL held
            st.signals_here = watch.active();
            engine::outcome out = engine::outcome::ran;
            {
                gil_release nogil;
                do {
                    const int64_t t0 = llama_time_us();
                    out = e.step(st, true);
                    slow_ = llama_time_us() - t0 > 20000;
                } while (out == engine::outcome::ran && !has_news(e, rest));
            }
            st.signals_here = false;
            if (out == engine::outcome::interrupted) raise_interrupted(st);
        }
        // A Ctrl-C that arrived during the decode (GIL released) is raised here, inside __next__, with
        // the piece kept for the next call: a `for` loop's try/except then sees it on every Python.
        // Left to the interpreter, it is raised at the loop's back edge, which Python 3.13 can match
        // against the wrong exception-table entry and skip the handler (CPython gh-130279).
        check_signals();
        std::string piece;
        {
            std::lock_guard<std::mutex> lk(e.mu);  // its holders never wait for the GIL
            piece.assign(r_->said.text(), r_->taken, r_->released - r_->taken);
            r_->taken = r_->released;
            if (piece.empty() && !r_->finish.empty()) {
                closed_ = true;
                if (r_->finish == "error") r_->raise_error();
                throw nb::stop_iteration();
            }
        }
        return text_replaced(piece.data(), piece.size());
    }

    // Final: iteration ends; the sequence keeps prompt and text (the next generation reuses them),
    // and with backend sampling the context gets its logits back.
    void close() {
        closed_ = true;
        if (!queued_ || st_->fork_gen != fork_generation()) return;  // a forked child: the engine is the parent's
        engine & e = engine_of(*st_);
        e.cancel(*r_);
        try {
            context_lease lease(st_, st_->eng.get());
            e.settle(*lease);
        } catch (const std::exception &) {  // busy (the thread stepping the engine settles it), or lost
        }
    }
    // Without a lease (a generator can be collected while another thread uses the context): the
    // engine's next step ends the request.
    ~generator() {
        if (queued_ && !closed_ && st_->fork_gen == fork_generation()) engine_of(*st_).cancel(*r_);
    }

    // Once ended, nothing changes what stats read; before, they need the lease (BusyError while
    // another thread drives the engine).
    nb::dict stats() {
        check_fork(st_->fork_gen, "generation");
        std::optional<context_lease> lease;
        if (!ended()) lease.emplace(st_, st_->eng.get());
        const request & r = *r_;
        nb::dict d;
        {
            std::lock_guard<std::mutex> lk(engine_of(*st_).mu);
            d["finish_reason"] = r.finish.empty() ? nb::none() : nb::cast(r.finish);
            d["n_generated"] = r.generated.size();
            d["t_gen_us"] = r.t_first == 0 ? 0 : (r.t_end != 0 ? r.t_end : llama_time_us()) - r.t_first;
        }
        d["n_prompt"] = r.prompt.size();
        d["n_prompt_eval"] = int64_t(r.n_fed) - r.n_reused;
        d["n_reused"] = r.n_reused;
        d["t_prompt_us"] = r.t_prompt_us;
        d["n_shifts"] = r.n_shifts;
        if (r.spec) r.spec->stats(d);
        return d;
    }

    // The generated tokens so far, and their logprobs (None unless asked for).
    nb::tuple output() {
        check_fork(st_->fork_gen, "generation");
        request_copy c;
        {
            std::lock_guard<std::mutex> lk(engine_of(*st_).mu);
            c.take(*r_);
        }
        nb::object lp = c.logprobs();
        return nb::make_tuple(to_numpy(std::move(c.tokens)), lp);
    }

private:
    bool has_news(engine & e, bool rest) {
        std::lock_guard<std::mutex> lk(e.mu);
        return rest ? !r_->finish.empty() : r_->has_news();
    }
    bool ended() {
        std::lock_guard<std::mutex> lk(engine_of(*st_).mu);
        return !r_->finish.empty() || !queued_;
    }

    const uint64_t op_ = new_operation_id();
    std::shared_ptr<context_state> st_;
    request_ptr r_;
    bool queued_ = false, closed_ = false;
    bool slow_ = false;  // the last step took > 20 ms: watch for signals inside the next
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
                            const sampler_options & sampler, int32_t max_tokens, bool ignore_eos, int32_t shift_keep,
                            bool backend_sampling, std::optional<draft_options> draft, nb::handle draft_ctx,
                            std::vector<std::string> stop, int32_t top_logprobs) {
            new (self) generator(ctx, prompt, sampler, max_tokens, ignore_eos, shift_keep, backend_sampling, draft,
                                 draft_ctx, std::move(stop), top_logprobs);
        }, nb::arg("ctx"), nb::arg("prompt"), nb::arg("sampler"), nb::arg("max_tokens"), nb::arg("ignore_eos") = false,
        nb::arg("shift_keep") = -1, nb::arg("backend_sampling") = false, nb::arg("draft").none() = nb::none(),
        nb::arg("draft_ctx").none() = nb::none(), nb::arg("stop") = std::vector<std::string>{}, nb::arg("top_logprobs") = -1,
        R"(Prepare generation on sequence 0 of ctx; nothing runs until the first next().

The first next() evaluates the prompt, reusing the longest prefix already in the KV cache.
Each next() returns the next piece of UTF-8-complete text (GIL released while decoding).
shift_keep < 0 stops with finish reason 'length' when the context is full; otherwise the first
shift_keep tokens stay and half of the rest is dropped (context shift). draft (DraftParams): speculative
decoding with the draft model's context draft_ctx (n_seq_max 1), or n-gram lookup without one. stop:
strings that end the text before them (finish reason 'stop'), matched in the text as yielded; the tokens
from the stop on leave the token list and the KV cache. top_logprobs >= 0: each generated token's logprob
and the top_logprobs most likely tokens' (log-softmax of its logits row, before the sampler chain).)")
        .def("__iter__", [](nb::handle self) { return nb::borrow(self); }, nb::sig("def __iter__(self) -> Generator"))
        .def("__next__", [](generator & g) { return g.next(); })
        .def("rest", [](generator & g) { return g.next(true); },
             "All the text still to come: steps to the end, taking the GIL back once (StopIteration when ended).")
        .def("close", &generator::close, "Stop: iteration ends, and the context gets its logits back.")
        .def("stats", &generator::stats, "finish_reason, prompt/generated counts, timings (us).")
        .def_prop_ro("output", &generator::output, "(generated token ids so far, their logprobs: None or {logprob, "
                     "top_ids, top_logprob}), copies.");
}

}  // namespace lamina
