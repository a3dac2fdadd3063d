// Continuous batching. Requests join and leave while others run: one native loop (run) builds one
// llama_batch per step, with a token for every sequence that is generating first, then prompt
// chunks of admitted requests in the room left (n_batch tokens, at most `chunk` per request and
// step, in order of arrival). After the decode every sequence with an output samples; a sequence
// that finished frees its KV cache (seq_rm) and its slot goes to the next waiting request.
//
// Threads: the loop runs in one thread (a Batcher's background thread, or the caller of
// generate_batch); submit, cancel and the readers of a request's text may be any thread. Shared
// request state is guarded by the engine's mutex; the loop's own bookkeeping is touched only by
// the loop. The loop holds the context's lease for each step, by the context-safety contract.
#include "lamina.h"

#include "sampler.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <fcntl.h>
#include <thread>
#include <unistd.h>

namespace lamina {
namespace {

using tokens_in = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

using steady = std::chrono::steady_clock;
// timeout seconds from now (< 0 or huge: a billion seconds, far enough)
steady::time_point deadline(double timeout) {
    const double s = timeout < 0 || !(timeout < 1e9) ? 1e9 : timeout;
    return steady::now() + std::chrono::duration_cast<steady::duration>(std::chrono::duration<double>(s));
}

struct request {
    // fixed at submit
    uint64_t id = 0;
    std::vector<llama_token> prompt;
    std::unique_ptr<sampler_handle> sampler;  // the request's own chain (no Python object: any thread may free it)
    int32_t max_tokens = 1;
    bool ignore_eos = false;
    // the loop's own
    int32_t slot = -1;
    uint64_t epoch = 0;        // its sequence's epoch when admitted (seq_changed): moved by another client, it ends
    bool seq_lost = false;     // it ended because another client changed its sequence (left as that client made it)
    size_t n_fed = 0;          // prompt tokens decoded
    size_t feeding = 0;        // prompt tokens in the current batch
    llama_pos pos = 0;         // next position of this sequence
    llama_token pending = -1;  // sampled, not decoded yet
    bool has_pending = false;
    int32_t out = -1;          // its logits row in the current batch
    // shared (engine mutex)
    std::vector<llama_token> generated;
    stop_text said{{}};        // the generated text as users see it, cut at a stop string (stops fixed at submit)
    size_t released = 0;       // bytes of it readers may take: whole UTF-8, no possible start of a stop string
    size_t taken = 0;          // bytes next() handed out
    std::string finish;        // "" while queued or running: stop, length, cancelled, error
    std::string error;         // finish == "error": what failed
    int error_code = 0;        // llama_decode's status (0: not a decode status)
    bool cancel = false;
    int64_t t_submit = 0, t_admit = 0, t_first = 0, t_end = 0;
};
using request_ptr = std::shared_ptr<request>;

struct engine_core {
    std::shared_ptr<context_state> st;
    std::mutex mu;
    std::condition_variable work;  // the loop waits here for requests
    std::condition_variable news;  // readers wait here for text or an end
    std::deque<request_ptr> waiting;
    std::vector<request_ptr> active;  // admitted, in order of admission
    std::vector<bool> slot_used;
    int32_t chunk = 0;
    bool closed = false, looping = false;
    uint64_t next_id = 1;
    int wake_rd = -1, wake_wr = -1;  // a pipe: a byte after each step that had news (asyncio readers)
    bool wake_armed = false;
    uint32_t fork_gen = fork_generation();
    // counters (mutex)
    int64_t n_steps = 0, n_prompt_tokens = 0, n_gen_tokens = 0, t_prompt_steps_us = 0, t_gen_steps_us = 0;
    int64_t n_gen_steps = 0, t_gen_sample_us = 0;  // generation steps, and their time after the decode returned
    int64_t graphs_reused = 0;  // the context's decodes that reused llama.cpp's previous graph (all users)
    int64_t n_finished = 0, max_running = 0;

    ~engine_core() {
        if (wake_rd >= 0) ::close(wake_rd);
        if (wake_wr >= 0) ::close(wake_wr);
    }
    void signal_news() {  // mutex held
        news.notify_all();
        if (wake_armed) {
            char c = 1;
            ssize_t r = ::write(wake_wr, &c, 1);  // full pipe: a wake-up is already pending
            (void)r;
        }
    }
    // A request ends (mutex held): readers get the rest of its text; its slot is freed by the loop.
    void end(request & r, const char * why) {
        if (!r.finish.empty()) return;
        // an incomplete character at the end is shown replaced, and may complete a stop string
        if (r.said.finish()) {
            r.generated.resize(std::min(r.generated.size(), r.said.tokens_before_stop()));
            if (std::string(why) == "length") why = "stop";
        }
        r.finish = why;
        r.released = r.said.text().size();
        r.t_end = llama_time_us();
        ++n_finished;
    }
};

class engine {
public:
    engine(const engine &) = delete;
    engine & operator=(const engine &) = delete;
    // Gone: a later lease by anyone detaches the samplers it left attached (the context owns them).
    ~engine() {
        const void * self = this;
        core_->st->backend_owner.compare_exchange_strong(self, nullptr);
    }
    engine(nb::handle ctx, int32_t chunk, bool backend_sampling)
        : core_(std::make_shared<engine_core>()), backend_sampling_(backend_sampling) {
        core_->st = context_shared(ctx);
        context_lease lease(core_->st);
        context_state & st = *lease;
        if (st.embeddings) throw std::invalid_argument("generation needs a context without embeddings");
        require_vocab(*st.model);
        const int32_t n_batch = int32_t(llama_n_batch(st.ctx.get()));
        if (chunk < 0) throw std::invalid_argument("chunk must be >= 0 (0: n_batch)");
        core_->chunk = chunk == 0 ? n_batch : std::min(chunk, n_batch);
        core_->slot_used.assign(llama_n_seq_max(st.ctx.get()), false);
        int fds[2];
        if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
        core_->wake_rd = fds[0];
        core_->wake_wr = fds[1];
    }

    // Queue a request (any thread). Checks everything a step would refuse, so a step never fails on it.
    std::shared_ptr<request> submit(tokens_in prompt, const sampler_options & opts, int32_t max_tokens,
                                    bool ignore_eos, std::vector<std::string> stops) {
        check_fork(core_->fork_gen, "Batcher");
        auto r = std::make_shared<request>();
        r->prompt.assign(prompt.data(), prompt.data() + prompt.shape(0));
        context_state & st = *core_->st;
        check_tokens(*st.model, r->prompt.data(), r->prompt.size());
        try {
            check_prompt_fits(st, r->prompt.size());
        } catch (const std::invalid_argument & e) {
            throw std::invalid_argument(std::string(e.what()) +
                                        " (each of n_seq_max sequences gets n_ctx / n_seq_max tokens unless the KV cache is unified)");
        }
        if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1");
        for (const std::string & s : stops) {
            if (s.empty()) throw std::invalid_argument("a stop string is empty");
        }
        r->sampler = std::make_unique<sampler_handle>(st.model, opts);
        r->max_tokens = max_tokens;
        r->ignore_eos = ignore_eos;
        r->said = stop_text(std::move(stops));
        r->t_submit = llama_time_us();
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(core_->mu);
            if (core_->closed) throw closed_error("this Batcher is closed");
            r->id = core_->next_id++;
            core_->waiting.push_back(r);
            core_->work.notify_all();
        }
        return r;
    }

    // The loop (GIL held on entry; released while waiting and decoding). until_idle: return when no
    // request is queued or running; else serve until close().
    void run(bool until_idle) {
        check_fork(core_->fork_gen, "Batcher");
        engine_core & c = *core_;
        {
            std::lock_guard<std::mutex> lk(c.mu);
            if (c.looping) throw busy_error("this Batcher's loop already runs in another thread");
            if (c.closed) throw closed_error("this Batcher is closed");
            c.looping = true;
        }
        struct loop_flag {
            engine_core & c;
            ~loop_flag() {
                std::lock_guard<std::mutex> lk(c.mu);
                c.looping = false;
            }
        } flag{c};
        struct detach_guard {  // the context gets its logits rows back when the loop ends
            engine & e;
            ~detach_guard() {
                try {
                    context_lease lease(e.core_->st, &e);
                    e.detach_samplers(*lease);
                } catch (const std::exception &) {  // busy or forked: the next lease's owner deals with it
                }
            }
        } detach{*this};
        llama_batch b = llama_batch_init(int32_t(llama_n_batch(c.st->ctx.get())), 0, 1);
        struct batch_guard { llama_batch & b; ~batch_guard() { llama_batch_free(b); } } guard{b};
        const bool signals = until_idle && on_main_thread();  // generate_batch in the main thread: Ctrl-C
        while (true) {
            if (signals) {
                try {
                    check_signals();  // between steps; a long decode has its own watch
                } catch (const nb::python_error & e) {
                    cancel_all(e.what());
                    throw;
                }
            }
            {
                gil_release nogil;
                std::unique_lock<std::mutex> lk(c.mu);
                if (until_idle) {
                    if (!has_work(c) && !c.closed) return;
                } else {
                    c.work.wait(lk, [&c] { return c.closed || has_work(c); });
                }
            }
            bool closed;
            {
                std::lock_guard<std::mutex> lk(c.mu);
                closed = c.closed;
            }
            if (closed) {
                shutdown();
                return;
            }
            try {
                step(b);
            } catch (const busy_error &) {
                if (until_idle) {
                    cancel_all("another thread used this Batcher's context");
                    throw;
                }
                // the background loop waits for the other user of its context
                gil_release nogil;
                std::this_thread::sleep_for(std::chrono::milliseconds(1));
            } catch (const nb::python_error & e) {  // KeyboardInterrupt in generate_batch's loop
                cancel_all(e.what());
                throw;
            } catch (const std::exception & e) {
                cancel_all(e.what());
                throw;
            }
        }
    }

    // Cancel every request and refuse new ones; the loop ends at its next step.
    void close() {
        if (core_->fork_gen != fork_generation()) return;  // a forked child: the loop is the parent's
        gil_release nogil;
        bool loop_runs;
        {
            std::lock_guard<std::mutex> lk(core_->mu);
            core_->closed = true;
            loop_runs = core_->looping;
            core_->work.notify_all();
        }
        if (!loop_runs) shutdown();
    }

    void cancel(request & r) {
        check_fork(core_->fork_gen, "Batcher");
        gil_release nogil;
        std::lock_guard<std::mutex> lk(core_->mu);
        if (!r.finish.empty()) return;
        r.cancel = true;
        auto it = std::find_if(core_->waiting.begin(), core_->waiting.end(), [&r](const request_ptr & p) { return p.get() == &r; });
        if (it != core_->waiting.end()) {  // never admitted: nothing to free
            core_->waiting.erase(it);
            core_->end(r, "cancelled");
            core_->signal_news();
        }
        core_->work.notify_all();
    }

    // The next piece of r's text: blocks (GIL released; Ctrl-C checked every 100 ms in the main
    // thread) up to timeout seconds (< 0: no limit). None on timeout; StopIteration at the end;
    // the request's error, if it failed.
    nb::object next(request & r, double timeout) {
        check_fork(core_->fork_gen, "Batcher");
        const bool main = on_main_thread();
        const auto until = deadline(timeout);
        while (true) {
            std::string piece;
            bool end = false, timed_out = false;
            {
                gil_release nogil;
                std::unique_lock<std::mutex> lk(core_->mu);
                auto ready = [&r] { return r.taken < r.released || !r.finish.empty(); };
                auto slice = std::min(until, steady::now() + std::chrono::milliseconds(main ? 100 : 1000));
                core_->news.wait_until(lk, slice, ready);
                if (r.taken < r.released) {
                    piece.assign(r.said.text(), r.taken, r.released - r.taken);
                    r.taken = r.released;
                } else if (!r.finish.empty()) {
                    end = true;
                } else if (steady::now() >= until) {
                    timed_out = true;
                }
            }
            if (!piece.empty()) return text_replaced(piece.data(), piece.size());
            if (end) {
                raise_if_failed(r);
                throw nb::stop_iteration();
            }
            if (timed_out) return nb::none();
            if (main) check_signals();
        }
    }

    // Without waiting: (text available now, whether the request ended). Raises its error at the end.
    std::pair<nb::str, bool> poll(request & r) {
        check_fork(core_->fork_gen, "Batcher");
        std::string piece;
        bool end;
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(core_->mu);
            piece.assign(r.said.text(), r.taken, r.released - r.taken);
            r.taken = r.released;
            end = !r.finish.empty();
        }
        if (end && piece.empty()) raise_if_failed(r);
        return {text_replaced(piece.data(), piece.size()), end};
    }

    // Block until r ends (or timeout seconds pass: False).
    bool wait(request & r, double timeout) {
        check_fork(core_->fork_gen, "Batcher");
        const bool main = on_main_thread();
        const auto until = deadline(timeout);
        while (true) {
            bool done;
            {
                gil_release nogil;
                std::unique_lock<std::mutex> lk(core_->mu);
                auto slice = std::min(until, steady::now() + std::chrono::milliseconds(main ? 100 : 1000));
                done = core_->news.wait_until(lk, slice, [&r] { return !r.finish.empty(); });
            }
            if (done) return true;
            if (steady::now() >= until) return false;
            if (main) check_signals();
        }
    }

    nb::dict result(request & r) {
        check_fork(core_->fork_gen, "Batcher");
        // copied under the mutex with the GIL released (the loop never waits for the GIL holding it,
        // and neither does a reader), then made into Python objects
        auto * heap = new std::vector<int32_t>();
        nb::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<int32_t> *>(p); });
        std::string text, finish, error;
        int64_t t_admit, t_first, t_end;
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(core_->mu);
            heap->assign(r.generated.begin(), r.generated.end());
            text = r.said.text();
            finish = r.finish;
            error = r.error;
            t_admit = r.t_admit;
            t_first = r.t_first;
            t_end = r.t_end;
        }
        nb::dict d;
        d["tokens"] = nb::ndarray<nb::numpy, int32_t, nb::ndim<1>>(heap->data(), {heap->size()}, owner);
        d["text"] = text_replaced(text.data(), text.size());
        d["finish_reason"] = finish.empty() ? nb::none() : nb::cast(finish);
        d["error"] = error.empty() ? nb::none() : nb::cast(error);
        d["n_prompt"] = r.prompt.size();  // fixed at submit
        d["n_generated"] = heap->size();
        d["t_submit_us"] = r.t_submit;
        d["t_admit_us"] = t_admit;
        d["t_first_us"] = t_first;
        d["t_end_us"] = t_end;
        return d;
    }

    // Why r ended ("" while queued or running), without copying its tokens or text.
    std::string finish_reason(const request & r) {
        check_fork(core_->fork_gen, "Batcher");
        gil_release nogil;
        std::lock_guard<std::mutex> lk(core_->mu);
        return r.finish;
    }

    void raise_if_failed(const request & r) {
        std::string finish, error;
        int code;
        bool lost;
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(core_->mu);
            finish = r.finish;
            error = r.error;
            code = r.error_code;
            lost = r.seq_lost;
        }
        if (finish != "error") return;
        if (lost) throw stale_error(error);
        if (code != 0) throw decode_error(code, error);
        throw lamina_error(error);
    }

    int wake_fd() {
        check_fork(core_->fork_gen, "Batcher");
        gil_release nogil;
        std::lock_guard<std::mutex> lk(core_->mu);
        core_->wake_armed = true;
        return core_->wake_rd;
    }

    nb::dict stats() {
        check_fork(core_->fork_gen, "Batcher");
        std::vector<std::pair<const char *, int64_t>> v;  // read under the mutex without the GIL
        bool closed;
        {
            gil_release nogil;
            std::lock_guard<std::mutex> lk(core_->mu);
            v.emplace_back("waiting", int64_t(core_->waiting.size()));
            v.emplace_back("running", int64_t(core_->active.size()));
            v.emplace_back("n_seq_max", int64_t(core_->slot_used.size()));
            v.emplace_back("chunk", int64_t(core_->chunk));
            v.emplace_back("steps", int64_t(core_->n_steps));
            v.emplace_back("finished", int64_t(core_->n_finished));
            v.emplace_back("max_running", int64_t(core_->max_running));
            v.emplace_back("n_prompt_tokens", int64_t(core_->n_prompt_tokens));
            v.emplace_back("n_gen_tokens", int64_t(core_->n_gen_tokens));
            v.emplace_back("t_prompt_steps_us", int64_t(core_->t_prompt_steps_us));
            v.emplace_back("t_gen_steps_us", int64_t(core_->t_gen_steps_us));
            v.emplace_back("n_gen_steps", int64_t(core_->n_gen_steps));
            v.emplace_back("t_gen_sample_us", int64_t(core_->t_gen_sample_us));
            v.emplace_back("graphs_reused", int64_t(core_->graphs_reused));
            closed = core_->closed;
        }
        nb::dict d;
        for (const auto & [k, x] : v) d[k] = x;
        d["closed"] = closed;
        return d;
    }

private:
    static bool has_work(const engine_core & c) { return !c.waiting.empty() || !c.active.empty(); }

    // One step (GIL held on entry and exit).
    void step(llama_batch & b) {
        engine_core & c = *core_;
        context_lease lease(c.st, this);  // keeps the backend samplers this engine attached
        context_state & st = *lease;
        begin_operation(st);
        llama_context * lc = st.ctx.get();
        llama_memory_t mem = llama_get_memory(lc);
        const int32_t n_batch = int32_t(llama_n_batch(lc));
        const llama_pos n_ctx_seq = llama_pos(llama_n_ctx_seq(lc));
        std::vector<request *> in_batch;  // requests with tokens in this batch
        int32_t n_out = 0, n_prompt = 0, n_gen = 0;
        {
            gil_release nogil;
            // Under the mutex only bookkeeping; the llama.cpp calls run after it (lease.h: the mutex is
            // never held across a llama.cpp call).
            std::vector<std::pair<int32_t, uint64_t>> freed;
            std::vector<request *> admitted;
            {
                std::lock_guard<std::mutex> lk(c.mu);
                end_stale(st);
                freed = take_finished();
                // admit waiting requests into free slots, in order of arrival
                while (!c.waiting.empty()) {
                    auto it = std::find(c.slot_used.begin(), c.slot_used.end(), false);
                    if (it == c.slot_used.end()) break;
                    request_ptr r = c.waiting.front();
                    c.waiting.pop_front();
                    r->slot = int32_t(it - c.slot_used.begin());
                    *it = true;
                    r->t_admit = llama_time_us();
                    c.active.push_back(r);
                    admitted.push_back(r.get());
                }
                c.max_running = std::max<int64_t>(c.max_running, int64_t(c.active.size()));
            }
            free_slots(st, freed);
            for (request * r : admitted) {
                llama_memory_seq_rm(mem, r->slot, -1, -1);
                if (r->slot == 0) st.tokens.clear();  // sequence 0's token mirror (single-sequence prefix reuse)
                r->epoch = seq_changed(st, r->slot, "a Batcher request (generate_batch or lamina.Batcher)");
                r->sampler->accept_prompt(r->prompt.data(), r->prompt.size());
                place_sampler(st, *r);
            }
            b.n_tokens = 0;
            for (const request_ptr & r : c.active) {  // one token of each generating sequence
                r->out = -1;
                if (!r->has_pending) continue;
                r->out = batch_add(b, r->pending, r->pos, r->slot, true);
                in_batch.push_back(r.get());
                ++n_out;
                ++n_gen;
            }
            for (const request_ptr & r : c.active) {  // prompt chunks in the room left
                if (r->has_pending || r->n_fed >= r->prompt.size()) continue;
                const int32_t room = n_batch - b.n_tokens;
                if (room <= 0) break;
                const size_t take = std::min<size_t>(size_t(std::min(room, c.chunk)), r->prompt.size() - r->n_fed);
                for (size_t k = 0; k < take; ++k) {
                    const size_t i = r->n_fed + k;
                    const bool last = i + 1 == r->prompt.size();
                    const int32_t at = batch_add(b, r->prompt[i], llama_pos(i), r->slot, last);
                    if (last) {
                        r->out = at;
                        ++n_out;
                    }
                }
                r->feeding = take;
                in_batch.push_back(r.get());
                n_prompt += int32_t(take);
            }
        }
        if (b.n_tokens == 0) return;
        const int64_t t0 = llama_time_us();
        const int rc = decode_watched(st, b, false);
        if (rc != 0) {
            decode_failed_step(st, b, in_batch, rc);
            return;
        }
        st.last_outputs = n_out;
        st.max_outputs = std::max(st.max_outputs, n_out);
        {
            gil_release nogil;
            // sample without the mutex (readers keep reading), then publish under it
            llama_work work;  // sampling reads the decode's results (a device synchronize)
            std::vector<llama_token> picked(in_batch.size(), -1);
            const int64_t t_dec = llama_time_us();
            sample(st, in_batch, picked);
            std::vector<std::string> pieces(in_batch.size());  // detokenized before the mutex (llama.cpp calls)
            for (size_t i = 0; i < in_batch.size(); ++i) {
                if (in_batch[i]->out >= 0) append_piece(*st.model, picked[i], false, pieces[i]);
            }
            const int64_t t1 = llama_time_us();
            std::vector<std::pair<int32_t, uint64_t>> freed;
            std::unique_lock<std::mutex> lk(c.mu);
            bool news = false;
            for (size_t i = 0; i < in_batch.size(); ++i) {
                request & r = *in_batch[i];
                if (r.has_pending) {
                    r.has_pending = false;
                    ++r.pos;
                } else {
                    r.n_fed += r.feeding;
                    r.feeding = 0;
                    if (r.n_fed == r.prompt.size()) r.pos = llama_pos(r.n_fed);
                }
                if (r.out < 0) continue;
                news |= publish(r, picked[i], pieces[i], n_ctx_seq);
            }
            freed = take_finished();  // a request seen ended has its sequence free (below, unlocked)
            ++c.n_steps;
            c.graphs_reused = llama_perf_context(lc).n_reused;
            c.n_prompt_tokens += n_prompt;
            if (n_prompt > 0) {
                c.t_prompt_steps_us += t1 - t0;
            } else {
                c.t_gen_steps_us += t1 - t0;
                c.t_gen_sample_us += t1 - t_dec;
                ++c.n_gen_steps;
            }
            c.n_gen_tokens += n_prompt > 0 ? 0 : n_gen;
            if (news) c.signal_news();
            lk.unlock();
            free_slots(st, freed);
        }
    }

    // The next token of every request with an output (no GIL): a greedy request in a slot with a
    // backend sampler has its token from the graph; others take the argmax of their logits row or
    // run their sampler chain.
    void sample(context_state & st, const std::vector<request *> & in_batch, std::vector<llama_token> & picked) {
        llama_context * lc = st.ctx.get();
        for (size_t i = 0; i < in_batch.size(); ++i) {
            request & r = *in_batch[i];
            if (r.out < 0) continue;
            if (r.sampler->greedy()) {
                llama_token t = st.seq_samplers[size_t(r.slot)] ? llama_get_sampled_token_ith(lc, r.out) : LLAMA_TOKEN_NULL;
                if (t == LLAMA_TOKEN_NULL) {
                    const float * row = llama_get_logits_ith(lc, r.out);
                    if (row == nullptr) throw lamina_error("llama.cpp returned neither a token nor logits for a sequence");
                    t = argmax(row, st.model->n_vocab);
                }
                picked[i] = t;
            } else {
                picked[i] = r.sampler->sample(lc, r.out);
            }
        }
    }

    // Backend sampling (llama.cpp's, experimental): a slot whose request is greedy gets a greedy
    // chain attached, so the argmax runs in the graph on the device holding the output layer and
    // only the token comes back (no vocabulary-sized logits row to copy and scan on the host); a
    // slot whose request samples otherwise has it detached. Not while numpy views of the logits are
    // alive (attaching reallocates llama.cpp's output buffer). Under the lease.
    void place_sampler(context_state & st, const request & r) {
        if (!backend_sampling_ || st.live_views.load() > 0) return;
        if (r.sampler->greedy()) {
            backend_greedy_attach(st, r.slot, this);
        } else {
            backend_sampler_detach(st, r.slot);
        }
    }

    // Detach every backend sampler this engine attached (the context gets its logits rows back).
    // The context owns the chains: when this cannot run (the context busy), nothing dangles, and
    // the next lease by another client detaches them. Under the lease.
    void detach_samplers(context_state & st) {
        if (st.backend_owner.load() == this) backend_sampler_detach(st, -1);
    }

    // After a decode: r's next token is t. Records it, its text, and why r ends, if it does.
    bool publish(request & r, llama_token t, const std::string & piece, llama_pos n_ctx_seq) {
        engine_core & c = *core_;
        const model_state & m = *c.st->model;
        if (r.t_first == 0) r.t_first = llama_time_us();
        if (r.cancel) {
            c.end(r, "cancelled");
            return true;
        }
        if (!r.ignore_eos && llama_vocab_is_eog(m.vocab, t)) {
            c.end(r, "stop");
            return true;
        }
        r.generated.push_back(t);
        if (r.said.push(piece)) {  // keep the tokens whose text lies wholly before the stop
            r.generated.resize(r.said.tokens_before_stop());
            c.end(r, "stop");
            return true;
        }
        if (int32_t(r.generated.size()) >= r.max_tokens || r.pos + 1 > n_ctx_seq) {
            c.end(r, "length");
            return true;
        }
        r.pending = t;
        r.has_pending = true;
        const size_t safe = r.said.releasable();
        if (safe > r.released) {
            r.released = safe;
            return true;
        }
        return false;
    }

    // Free the slots of ended requests (mutex held, under the lease).
    // Requests that ended (or were cancelled) leave the active list (mutex held); returns their
    // slots, whose sequences free_slots empties after the mutex is released. The slot is taken
    // again only by a later admission, which runs after that.
    std::vector<std::pair<int32_t, uint64_t>> take_finished() {
        engine_core & c = *core_;
        bool news = false;
        for (const request_ptr & r : c.active) {
            if (r->cancel && r->finish.empty()) {
                c.end(*r, "cancelled");
                news = true;
            }
        }
        std::vector<std::pair<int32_t, uint64_t>> freed;
        auto keep = std::stable_partition(c.active.begin(), c.active.end(), [](const request_ptr & r) { return r->finish.empty(); });
        for (auto it = keep; it != c.active.end(); ++it) {
            freed.emplace_back((*it)->slot, (*it)->epoch);
            c.slot_used[size_t((*it)->slot)] = false;
            (*it)->slot = -1;
            (*it)->has_pending = false;
        }
        c.active.erase(keep, c.active.end());
        if (news) c.signal_news();
        return freed;
    }
    // Empty the sequences of ended requests (no mutex: llama.cpp calls), unless another client took
    // one since (its epoch moved: a generation, ctx.decode, a KV operation): that sequence is theirs.
    static void free_slots(context_state & st, const std::vector<std::pair<int32_t, uint64_t>> & slots) {
        llama_memory_t mem = llama_get_memory(st.ctx.get());
        for (const auto & [s, epoch] : slots) {
            if (st.seq_epochs[size_t(s)] != epoch) continue;
            llama_memory_seq_rm(mem, s, -1, -1);
            if (s == 0) st.tokens.clear();
        }
    }
    // A request whose sequence another client changed between steps (ctx.decode, a KV operation,
    // load_state, set_lora, a generation on sequence 0) ends with the error that names it (mutex held).
    void end_stale(const context_state & st) {
        engine_core & c = *core_;
        bool news = false;
        for (const request_ptr & r : c.active) {
            if (!r->finish.empty() || r->slot < 0 || st.seq_epochs[size_t(r->slot)] == r->epoch) continue;
            r->error = "this request's sequence " + std::to_string(r->slot) + " was changed under it by " +
                       st.seq_changers[size_t(r->slot)] + "; submit it again";
            r->error_code = 0;
            r->seq_lost = true;
            c.end(*r, "error");
            news = true;
        }
        if (news) c.signal_news();
    }

    // A failed decode (GIL held): llama.cpp may keep ubatches that finished before the failure, so
    // every sequence in the batch is cut back to what the loop knows it holds. A full unified cache
    // (status 1) ends the longest request ("length") and the step is retried; any other status ends
    // the requests in the batch with the error; a signal handler's exception propagates.
    void decode_failed_step(context_state & st, const llama_batch & b, const std::vector<request *> & in_batch, int rc) {
        engine_core & c = *core_;
        llama_memory_t mem = llama_get_memory(st.ctx.get());
        st.last_outputs = 0;
        st.abort = false;
        for (request * r : in_batch) {
            const llama_pos held = r->has_pending ? r->pos : llama_pos(r->n_fed);
            r->feeding = 0;
            if (!llama_memory_seq_rm(mem, r->slot, held, -1)) llama_memory_seq_rm(mem, r->slot, -1, -1);
        }
        (void)b;
        if (st.signal_type.is_valid()) {
            PyErr_Restore(st.signal_type.release().ptr(), st.signal_value.release().ptr(), st.signal_tb.release().ptr());
            throw nb::python_error();
        }
        const std::string why = decode_message(rc, st);
        std::lock_guard<std::mutex> lk(c.mu);
        if (rc == 1 && c.active.size() > 1) {
            request * longest = nullptr;
            for (const request_ptr & r : c.active) {
                if (longest == nullptr || r->pos + llama_pos(r->n_fed) > longest->pos + llama_pos(longest->n_fed)) longest = r.get();
            }
            c.end(*longest, "length");  // its slot is freed at the next step, which retries the others
        } else {
            for (request * r : in_batch) {
                r->error = why;
                r->error_code = rc;
                c.end(*r, "error");
            }
        }
        c.signal_news();
    }

    // The loop stops with an exception: every request ends with it as its error.
    void cancel_all(const std::string & why) {
        gil_release nogil;
        std::lock_guard<std::mutex> lk(core_->mu);
        for (const request_ptr & r : core_->waiting) {
            r->error = why;
            core_->end(*r, "error");
        }
        core_->waiting.clear();
        for (const request_ptr & r : core_->active) {
            if (r->finish.empty()) {
                r->error = why;
                core_->end(*r, "error");
            }
        }
        core_->signal_news();
    }

    // Closed: every request ends ("cancelled") and the slots are freed when the context is free.
    void shutdown() {
        engine_core & c = *core_;
        {
            std::lock_guard<std::mutex> lk(c.mu);
            for (const request_ptr & r : c.waiting) c.end(*r, "cancelled");
            c.waiting.clear();
            for (const request_ptr & r : c.active) c.end(*r, "cancelled");
            c.signal_news();
        }
        if (c.st->busy.load()) return;  // someone else holds the context: the slots stay as they are
        try {
            context_lease lease(c.st);
            std::vector<std::pair<int32_t, uint64_t>> freed;
            {
                std::lock_guard<std::mutex> lk(c.mu);
                freed = take_finished();
            }
            free_slots(*lease, freed);
        } catch (const std::exception &) {  // busy, closed or forked: nothing to free here
        }
    }

    std::shared_ptr<engine_core> core_;
    bool backend_sampling_;
};

// A request as Python holds it: the request plus the engine that serves it.
struct request_handle {
    std::shared_ptr<engine> eng;
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

    nb::class_<engine>(m, "Batcher", "Continuous batching over one context (see cpp/batcher.cpp).")
        .def("__init__", [](engine * self, nb::handle ctx, int32_t chunk, bool backend_sampling) {
            new (self) engine(ctx, chunk, backend_sampling);
        }, nb::arg("ctx"), nb::arg("chunk") = 0, nb::arg("backend_sampling") = false,
        "chunk: prompt tokens per request and step (0: n_batch). backend_sampling: greedy requests take "
        "their token from llama.cpp's backend sampling (the argmax in the graph), not from a logits row.")
        .def("submit", [](nb::handle self, tokens_in prompt, const sampler_options & opts, int32_t max_tokens, bool ignore_eos,
                          std::vector<std::string> stops) {
            engine & e = nb::cast<engine &>(self);
            // the handle shares the engine: Python's Batcher object may go while a request lives
            auto keep = std::shared_ptr<engine>(&e, [ref = nb::borrow(self)](engine *) mutable {
                gil_acquire gil;
                ref.reset();
            });
            return request_handle{keep, e.submit(prompt, opts, max_tokens, ignore_eos, std::move(stops))};
        }, nb::arg("prompt"), nb::arg("sampler"), nb::arg("max_tokens"), nb::arg("ignore_eos") = false,
           nb::arg("stop") = std::vector<std::string>{})
        .def("run", &engine::run, nb::arg("until_idle"),
             "Serve requests in this thread: until none is queued or running (until_idle), or until close().")
        .def("close", &engine::close, "Cancel every request, refuse new ones; a running loop ends.")
        .def("wake_fd", &engine::wake_fd, "A pipe's read end that gets a byte after each step with news (asyncio).")
        .def("stats", &engine::stats);
}

}  // namespace lamina
