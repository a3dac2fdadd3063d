// lamina.Batcher and generate_batch: clients of the context's engine (engine.h) that submit
// requests on any free sequence and drive its steps in a loop: a Batcher's background thread
// (until close()), or generate_batch's caller (until no request is left).
#include "engine.h"

#include <algorithm>
#include <chrono>
#include <thread>

namespace lamina {
namespace {

using tokens_in = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

using steady = std::chrono::steady_clock;
// timeout seconds from now (< 0 or huge: a billion seconds, far enough)
steady::time_point deadline(double timeout) {
    const double s = timeout < 0 || !(timeout < 1e9) ? 1e9 : timeout;
    return steady::now() + std::chrono::duration_cast<steady::duration>(std::chrono::duration<double>(s));
}

class batcher {
public:
    batcher(const batcher &) = delete;
    batcher & operator=(const batcher &) = delete;
    // Gone (never run, or its caller raised): its requests leave the engine, whoever steps it next.
    ~batcher() {
        if (fork_gen_ == fork_generation()) e_.end_all("cancelled", "", this);
    }
    batcher(nb::handle ctx, int32_t chunk, bool backend_sampling)
        : st_(context_shared(ctx)), e_(engine_of(*st_)), chunk_(chunk), backend_(backend_sampling) {
        context_lease lease(st_);
        if (st_->embeddings) throw std::invalid_argument("generation needs a context without embeddings");
        require_vocab(*st_->model);
        if (chunk < 0) throw std::invalid_argument("chunk must be >= 0 (0: n_batch)");
    }

    // Queue a request (any thread).
    request_ptr submit(tokens_in prompt, const sampler_options & opts, int32_t max_tokens, bool ignore_eos,
                       std::vector<std::string> stops, int32_t top_logprobs) {
        check_fork(fork_gen_, "Batcher");
        if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1");
        for (const std::string & s : stops) {
            if (s.empty()) throw std::invalid_argument("a stop string is empty");
        }
        auto r = std::make_shared<request>();
        r->prompt.assign(prompt.data(), prompt.data() + prompt.shape(0));
        r->sampler = std::make_unique<sampler_handle>(st_->model, opts);
        r->said = stop_text(std::move(stops));
        r->o.max_tokens = max_tokens;
        r->o.ignore_eos = ignore_eos;
        r->o.top_logprobs = top_logprobs;
        r->o.backend = backend_ && r->sampler->greedy() && top_logprobs < 0;  // logprobs read the logits
        r->o.chunk = chunk_;
        r->o.client = this;
        e_.check(*st_, *r);
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(e_.mu);
            if (closed_) throw closed_error("this Batcher is closed");
        }
        e_.queue(r);
        return r;
    }

    // The loop (GIL held on entry; released while waiting and stepping). until_idle: return when no
    // request is queued or running; else serve until close().
    void run(bool until_idle) {
        check_fork(fork_gen_, "Batcher");
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(e_.mu);
            if (looping_) throw busy_error("this Batcher's loop already runs in another thread");
            if (closed_) throw closed_error("this Batcher is closed");
            looping_ = true;
        }
        struct loop_flag {
            batcher & b;
            ~loop_flag() {
                std::lock_guard<std::mutex> lk(b.e_.mu);
                b.looping_ = false;
            }
        } flag{*this};
        const bool signals = until_idle && on_main_thread();  // generate_batch in the main thread: Ctrl-C
        while (true) {
            bool closed;
            {
                gil_release nogil;
                std::unique_lock<std::mutex> lk(e_.mu);
                if (until_idle) {
                    if (!e_.has_work_locked(this) && !closed_) break;
                } else {
                    e_.work.wait(lk, [this] { return closed_ || e_.has_work_locked(); });
                }
                closed = closed_;
            }
            if (closed) {
                shutdown();
                return;
            }
            try {
                if (signals) check_signals();  // between steps; a long decode has its own watch
                context_lease lease(st_, &e_);  // keeps the backend samplers the engine attached
                context_state & st = *lease;
                begin_operation(st);
                signal_watch watch(signals);
                st.signals_here = watch.active();
                engine::outcome out;
                {
                    gil_release nogil;
                    out = e_.step(st, false);
                }
                st.signals_here = false;
                if (out == engine::outcome::interrupted) raise_interrupted(st);
            } catch (const busy_error &) {
                if (until_idle) {
                    e_.end_all("error", "another thread used this Batcher's context", this);
                    throw;
                }
                // the background loop waits for the other user of its context
                gil_release nogil;
                std::this_thread::sleep_for(std::chrono::milliseconds(1));
            } catch (const std::exception & e) {  // a Ctrl-C in generate_batch, or a failed step
                e_.end_all("error", e.what(), this);
                throw;
            }
        }
        // idle: the context gets its logits rows back
        try {
            context_lease lease(st_);
        } catch (const std::exception &) {  // busy: the next lease by its other user detaches them
        }
    }

    // Cancel every request and refuse new ones; the loop ends at its next step.
    void close() {
        if (fork_gen_ != fork_generation()) return;  // a forked child: the loop is the parent's
        bool loop_runs;
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(e_.mu);
            closed_ = true;
            loop_runs = looping_;
            e_.work.notify_all();
        }
        if (!loop_runs) shutdown();
    }

    void cancel(request & r) {
        check_fork(fork_gen_, "Batcher");
        e_.cancel(r);
    }

    // The next piece of r's text, waiting up to timeout seconds (< 0: no limit). None on timeout;
    // StopIteration at the end; the request's error, if it failed.
    nb::object next(request & r, double timeout) {
        std::string piece;
        const bool ready = wait_for(r, timeout, &piece);
        if (!piece.empty()) return text_replaced(piece.data(), piece.size());
        if (!ready) return nb::none();
        raise_if_failed(r);
        throw nb::stop_iteration();
    }

    // Without waiting: (text available now, whether the request ended). Raises its error at the end.
    std::pair<nb::str, bool> poll(request & r) {
        check_fork(fork_gen_, "Batcher");
        std::string piece;
        bool end;
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(e_.mu);
            piece.assign(r.said.text(), r.taken, r.released - r.taken);
            r.taken = r.released;
            end = !r.finish.empty();
        }
        if (end && piece.empty()) raise_if_failed(r);
        return {text_replaced(piece.data(), piece.size()), end};
    }

    // Block until r ends (or timeout seconds pass: False).
    bool wait(request & r, double timeout) { return wait_for(r, timeout, nullptr); }

    nb::dict result(request & r) {
        check_fork(fork_gen_, "Batcher");
        // copied under the mutex with the GIL released (the loop never waits for the GIL holding it,
        // and neither does a reader), then made into Python objects
        request_copy c;
        std::string text, finish, error;
        int64_t t_admit, t_first, t_end;
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(e_.mu);
            c.take(r);
            text = r.said.text();
            finish = r.finish;
            error = r.error;
            t_admit = r.t_admit;
            t_first = r.t_first;
            t_end = r.t_end;
        }
        nb::dict d;
        d["n_generated"] = c.tokens.size();
        d["logprobs"] = c.logprobs();
        d["tokens"] = to_numpy(std::move(c.tokens));
        d["text"] = text_replaced(text.data(), text.size());
        d["finish_reason"] = finish.empty() ? nb::none() : nb::cast(finish);
        d["error"] = error.empty() ? nb::none() : nb::cast(error);
        d["n_prompt"] = r.prompt.size();  // fixed at submit
        d["t_submit_us"] = r.t_submit;
        d["t_admit_us"] = t_admit;
        d["t_first_us"] = t_first;
        d["t_end_us"] = t_end;
        return d;
    }

    // Why r ended ("" while queued or running), without copying its tokens or text.
    std::string finish_reason(const request & r) {
        check_fork(fork_gen_, "Batcher");
        gil_release nogil;
        std::lock_guard<std::mutex> lk(e_.mu);
        return r.finish;
    }

    void raise_if_failed(const request & r) {
        bool failed;
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(e_.mu);
            failed = r.finish == "error";
        }
        if (failed) r.raise_error();  // error, error_code and seq_lost are final once it ended
    }
    int wake_fd() {
        check_fork(fork_gen_, "Batcher");
        return e_.wake_fd();
    }

    nb::dict stats() {
        check_fork(fork_gen_, "Batcher");
        nb::dict d;
        e_.stats(d);
        const int32_t n_batch = int32_t(llama_n_batch(st_->ctx.get()));
        d["chunk"] = chunk_ > 0 ? std::min(chunk_, n_batch) : n_batch;
        bool closed;
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(e_.mu);
            closed = closed_;
        }
        d["closed"] = closed;
        return d;
    }

private:
    // Waits (GIL released; Ctrl-C checked every 100 ms in the main thread) up to timeout seconds for
    // r's end, or for its text when piece is given (the text released so far is taken into it).
    // False on timeout.
    bool wait_for(request & r, double timeout, std::string * piece) {
        check_fork(fork_gen_, "Batcher");
        const bool main = on_main_thread();
        const auto until = deadline(timeout);
        while (true) {
            bool ready;
            {
                gil_release nogil;
                std::unique_lock<std::mutex> lk(e_.mu);
                auto slice = std::min(until, steady::now() + std::chrono::milliseconds(main ? 100 : 1000));
                ready = e_.news.wait_until(lk, slice, [&] { return (piece && r.taken < r.released) || !r.finish.empty(); });
                if (piece) {
                    piece->assign(r.said.text(), r.taken, r.released - r.taken);
                    r.taken = r.released;
                }
            }
            if (ready || steady::now() >= until) return ready;
            if (main) check_signals();
        }
    }

    // Closed: its requests end ("cancelled"); their sequences are freed now if the context is free,
    // else by the next step of the engine.
    void shutdown() {
        e_.end_all("cancelled", "", this);
        try {
            context_lease lease(st_);  // no owner: the backend samplers are detached
            gil_release nogil;
            e_.settle(*lease);
        } catch (const std::exception &) {  // busy, closed or forked: the engine settles them later
        }
    }

    std::shared_ptr<context_state> st_;
    engine & e_;  // st_'s
    int32_t chunk_;
    bool backend_;
    bool closed_ = false, looping_ = false;  // e_.mu
    uint32_t fork_gen_ = fork_generation();
};

// A request as Python holds it: the request plus the engine that serves it.
struct request_handle {
    std::shared_ptr<batcher> eng;
    std::shared_ptr<request> req;
};

}  // namespace

void init_batcher(nb::module_ & m) {
    nb::class_<request_handle>(m, "BatchRequest", "One request of a Batcher: its text, tokens and end.")
        .def("next", [](request_handle & h, double timeout) { return h.eng->next(*h.req, timeout); }, nb::arg("timeout") = -1.0,
             "The next piece of text (blocks up to timeout seconds, < 0: no limit; None on timeout). "
             "StopIteration at the end; the request's error if it failed.")
        .def("poll", [](request_handle & h) { return h.eng->poll(*h.req); }, "(text available now, ended) without waiting.")
        .def("wait", [](request_handle & h, double timeout) { return h.eng->wait(*h.req, timeout); }, nb::arg("timeout") = -1.0,
             "Block until the request ends (False when timeout seconds passed first).")
        .def("cancel", [](request_handle & h) { h.eng->cancel(*h.req); }, "End it: a queued request at once, a running one at the next step.")
        .def("result", [](request_handle & h) { return h.eng->result(*h.req); }, "tokens, text, finish_reason, error, counts, times (us).")
        .def("raise_if_failed", [](request_handle & h) { h.eng->raise_if_failed(*h.req); })
        .def_prop_ro("finish_reason", [](const request_handle & h) -> std::optional<std::string> {
            std::string why = h.eng->finish_reason(*h.req);
            if (why.empty()) return std::nullopt;
            return why;
        }, "Why it ended (stop, length, cancelled, error), or None while queued or running.")
        .def_prop_ro("id", [](const request_handle & h) { return h.req->id; });

    nb::class_<batcher>(m, "Batcher", "Continuous batching over one context (see cpp/batcher.cpp).")
        .def("__init__", [](batcher * self, nb::handle ctx, int32_t chunk, bool backend_sampling) {
            new (self) batcher(ctx, chunk, backend_sampling);
        }, nb::arg("ctx"), nb::arg("chunk") = 0, nb::arg("backend_sampling") = false,
        "chunk: prompt tokens per request and step (0: n_batch). backend_sampling: greedy requests take "
        "their token from llama.cpp's backend sampling (the argmax in the graph), not from a logits row.")
        .def("submit", [](nb::handle self, tokens_in prompt, const sampler_options & opts, int32_t max_tokens, bool ignore_eos,
                          std::vector<std::string> stops, int32_t top_logprobs) {
            batcher & e = nb::cast<batcher &>(self);
            // the handle shares the engine: Python's Batcher object may go while a request lives
            auto keep = std::shared_ptr<batcher>(&e, [ref = nb::borrow(self)](batcher *) mutable {
                gil_acquire gil;
                ref.reset();
            });
            return request_handle{keep, e.submit(prompt, opts, max_tokens, ignore_eos, std::move(stops), top_logprobs)};
        }, nb::arg("prompt"), nb::arg("sampler"), nb::arg("max_tokens"), nb::arg("ignore_eos") = false,
           nb::arg("stop") = std::vector<std::string>{}, nb::arg("top_logprobs") = -1)
        .def("run", &batcher::run, nb::arg("until_idle"),
             "Serve requests in this thread: until none is queued or running (until_idle), or until close().")
        .def("close", &batcher::close, "Cancel every request, refuse new ones; a running loop ends.")
        .def("wake_fd", &batcher::wake_fd, "A pipe's read end that gets a byte after each step with news (asyncio).")
        .def("stats", &batcher::stats);
}

}  // namespace lamina
