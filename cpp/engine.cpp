// The sequence engine (engine.h). One step builds one llama_batch: a token of every sequence that
// is generating (with its draft, for speculative decoding) first, then prompt chunks of admitted
// requests in the room left (n_batch tokens, at most `chunk` per request and step), in the order
// of their sequences. After the decode every request with an output samples; one that ended
// leaves, and its sequence is emptied (or, for ctx.generate's, trimmed to its prompt and text).
#include "engine.h"

#include "speculation.h"

#include <algorithm>
#include <fcntl.h>
#include <unistd.h>

namespace lamina {

engine & engine_of(context_state & st) { return *st.eng; }

void request::raise_error() const {
    if (seq_lost) throw stale_error(error);
    if (error_code != 0) throw decode_error(error_code, error);
    throw lamina_error(error);
}

engine::~engine() {
    if (wake_rd_ >= 0) ::close(wake_rd_);
    if (wake_wr_ >= 0) ::close(wake_wr_);
}

void engine::check(context_state & st, request & rr) {
    request * r = &rr;
    check_tokens(*st.model, r->prompt.data(), r->prompt.size());
    try {
        check_prompt_fits(st, r->prompt.size());
    } catch (const std::invalid_argument & e) {
        if (llama_n_seq_max(st.ctx.get()) == 1) throw;
        throw std::invalid_argument(std::string(e.what()) +
                                    " (each of n_seq_max sequences gets n_ctx / n_seq_max tokens unless the KV cache is unified)");
    }
    if (r->o.max_tokens < 0) throw std::invalid_argument("max_tokens must be >= 0");
    if (r->o.chunk < 0) throw std::invalid_argument("chunk must be >= 0 (0: n_batch)");
    if (st.embeddings) throw std::invalid_argument("generation needs a context without embeddings");
    if (r->o.top_logprobs > 20) throw std::invalid_argument("top_logprobs must be 0..20");
    if (r->o.top_logprobs >= 0 && r->o.backend) {
        throw std::invalid_argument("logprobs need the logits on the host: backend_sampling takes the token in the graph");
    }
    if (r->o.backend && !r->sampler->greedy()) {
        throw std::invalid_argument("backend_sampling supports the greedy sampler only (no penalties, bias or grammar)");
    }
    if (r->o.shift_keep >= 0) {
        const int32_t n_ctx = int32_t(llama_n_ctx_seq(st.ctx.get()));
        if (r->o.shift_keep >= n_ctx / 2) {
            throw std::invalid_argument("n_keep must be below half the context (" + std::to_string(n_ctx / 2) + ")");
        }
        if (!llama_memory_can_shift(llama_get_memory(st.ctx.get()))) {
            throw lamina_error("this model's KV cache cannot shift positions: use context_full='stop'");
        }
    }
}

void engine::queue(const request_ptr & r) {
    r->t_submit = llama_time_us();
    std::lock_guard<std::mutex> lk(mu);  // its holders never wait for the GIL
    r->id = next_id_++;
    waiting_.push_back(r);
    work.notify_all();
}

bool engine::has_work_locked(const void * client) const {
    if (client == nullptr) return !waiting_.empty() || !active_.empty();
    auto mine = [client](const request_ptr & r) { return r->o.client == client; };
    return std::any_of(waiting_.begin(), waiting_.end(), mine) || std::any_of(active_.begin(), active_.end(), mine);
}

void engine::signal_news() {  // mutex held
    news.notify_all();
    if (wake_armed_) {
        char c = 1;
        ssize_t r = ::write(wake_wr_, &c, 1);  // full pipe: a wake-up is already pending
        (void)r;
    }
}

int engine::wake_fd() {
    gil_release nogil;
    std::lock_guard<std::mutex> lk(mu);
    if (wake_rd_ < 0) {
        int fds[2];
        if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
        wake_rd_ = fds[0];
        wake_wr_ = fds[1];
    }
    wake_armed_ = true;
    return wake_rd_;
}

// A request ends (mutex held): readers get the rest of its text; it leaves at the next settle.
void engine::end(request & r, const char * why) {
    if (!r.finish.empty()) return;
    // an incomplete character at the end is shown replaced, and may complete a stop string
    if (r.said.finish()) {
        r.keep_tokens(r.said.tokens_before_stop());
        if (std::string(why) == "length") why = "stop";
    }
    r.finish = why;
    r.released = r.said.text().size();
    r.t_end = llama_time_us();
    ++n_finished_;
}

void engine::end_all(const char * finish, const std::string & why, const void * client) {
    gil_release nogil;
    std::deque<request_ptr> gone;  // freed after the mutex
    std::lock_guard<std::mutex> lk(mu);
    auto mine = [client](const request_ptr & r) { return client == nullptr || r->o.client == client; };
    for (const request_ptr & r : waiting_) {
        if (!mine(r)) continue;
        r->error = why;
        end(*r, finish);
    }
    auto left = std::stable_partition(waiting_.begin(), waiting_.end(), [&mine](const request_ptr & r) { return !mine(r); });
    gone.assign(std::make_move_iterator(left), std::make_move_iterator(waiting_.end()));
    waiting_.erase(left, waiting_.end());
    for (const request_ptr & r : active_) {
        if (!mine(r) || !r->finish.empty()) continue;
        r->error = why;
        end(*r, finish);
    }
    signal_news();
}

void engine::cancel(request & r) {
    gil_release nogil;
    std::lock_guard<std::mutex> lk(mu);
    if (!r.finish.empty()) return;
    r.cancel = true;
    auto it = std::find_if(waiting_.begin(), waiting_.end(), [&r](const request_ptr & p) { return p.get() == &r; });
    if (it != waiting_.end()) {  // never admitted: nothing to free
        waiting_.erase(it);
        end(r, "cancelled");
        signal_news();
    }
    work.notify_all();
}

// A request whose sequence another client changed between steps (ctx.decode, a KV operation,
// load_state, set_lora) ends with the error that names it (mutex held).
void engine::end_stale(const context_state & st) {
    bool any = false;
    for (const request_ptr & r : active_) {
        if (!r->finish.empty() || st.seq_epochs[size_t(r->slot)] == r->epoch) continue;
        r->error = std::string(r->o.who) + " on sequence " + std::to_string(r->slot) +
                   " has ended: its cache was changed under it by " + st.seq_changers[size_t(r->slot)] +
                   ". Start it again (a new generation reuses what the cache still holds of its prompt).";
        r->seq_lost = true;
        end(*r, "error");
        any = true;
    }
    if (any) signal_news();
}

// Ended requests leave the active list (mutex held); their sequences go to freed_, emptied by
// free_seqs after the mutex is released. A slot is taken again only by a later admission.
void engine::take_finished() {
    bool any = false;
    for (const request_ptr & r : active_) {
        if (r->cancel && r->finish.empty()) {
            end(*r, "cancelled");
            any = true;
        }
    }
    auto keep = std::stable_partition(active_.begin(), active_.end(), [](const request_ptr & r) { return r->finish.empty(); });
    for (auto it = keep; it != active_.end(); ++it) {
        request & r = **it;
        // a kept sequence holds its prompt and text, less what context shifts dropped
        const int64_t held = int64_t(r.prompt.size() + r.generated.size()) - r.n_discarded;
        freed_.push_back({r.slot, r.epoch, r.o.keep ? held : -1, r.o.keep && r.o.backend});
        slot_used_[size_t(r.slot)] = false;
        r.slot = -1;
        r.has_pending = false;
    }
    // freed after the mutex (free_seqs): a request's draft and sampler go with it
    graveyard_.insert(graveyard_.end(), std::make_move_iterator(keep), std::make_move_iterator(active_.end()));
    active_.erase(keep, active_.end());
    if (any) signal_news();
}

// Empty the sequences of ended requests, or trim a kept one to its prompt and text (llama.cpp
// calls: no mutex), unless another client took the sequence since (its epoch moved).
void engine::free_seqs(context_state & st) {
    llama_memory_t mem = llama_get_memory(st.ctx.get());
    for (const freed_seq & f : freed_) {
        if (f.backend) backend_sampler_detach(st, f.slot);  // the context gets its logits back
        if (st.seq_epochs[size_t(f.slot)] != f.epoch) continue;
        if (f.keep < 0) {
            llama_memory_seq_rm(mem, f.slot, -1, -1);
            if (f.slot == 0) st.tokens.clear();
        } else if (size_t(f.keep) < st.tokens.size()) {  // a stop string or an end inside a draft: the tokens after it go
            if (llama_memory_seq_rm(mem, 0, llama_pos(f.keep), -1)) {
                st.tokens.resize(size_t(f.keep));
            } else {  // a cache that cannot drop a tail (recurrent): the mirror says what it holds
                mirror_unknown(st, llama_memory_seq_pos_max(mem, 0));
            }
            st.last_outputs = 0;  // the logits were the dropped tokens'
        }
    }
    freed_.clear();
    graveyard_.clear();
}

void engine::settle(context_state & st) {
    {
        std::lock_guard<std::mutex> lk(mu);
        take_finished();
    }
    free_seqs(st);
}

// A request takes its sequence (no mutex). A keep request keeps the longest prefix the cache holds
// of its prompt (at least its last token is evaluated again, for its logits).
void engine::admit(context_state & st, request & r) {
    llama_memory_t mem = llama_get_memory(st.ctx.get());
    size_t common = 0;
    if (r.o.keep) {
        while (common < st.tokens.size() && common < r.prompt.size() && st.tokens[common] == r.prompt[common]) ++common;
        if (common == r.prompt.size()) --common;
    }
    // the cache may hold more than the mirror knows (a mirror dropped for far-shifted positions)
    if (!r.o.keep || common < st.tokens.size() || llama_pos(common) <= llama_memory_seq_pos_max(mem, r.slot)) {
        bool ok = llama_memory_seq_rm(mem, r.slot, llama_pos(common), -1);
        // a sliding-window cache may have dropped what the kept prefix still needs
        const int32_t n_swa = llama_model_n_swa(st.model->model.get());
        if (ok && common > 0 && n_swa > 0 && llama_memory_seq_pos_min(mem, r.slot) > std::max<llama_pos>(0, llama_pos(common) - n_swa)) {
            ok = false;
        }
        if (!ok) {
            llama_memory_seq_rm(mem, r.slot, -1, -1);
            common = 0;
        }
        if (r.slot == 0) st.tokens.resize(common);
    }
    r.n_fed = common;
    r.n_reused = int64_t(common);
    r.epoch = seq_changed(st, r.slot, r.o.keep ? "another generation (ctx.generate, chat or complete)"
                                                         : "a Batcher request (generate_batch or lamina.Batcher)");
    r.sampler->accept_prompt(r.prompt.data(), r.prompt.size());  // penalties and DRY see the prompt
    // llama.cpp's backend sampling (experimental in the pin): the argmax runs in the graph on the
    // device holding the output layer and only the token comes back. Not while numpy views of the
    // logits are alive (attaching reallocates llama.cpp's output buffer); where llama.cpp cannot
    // (e.g. a tensor split), the token is picked on the host.
    if (r.o.backend && st.live_views.load() == 0) {
        backend_greedy_attach(st, r.slot, this);
    } else if (st.seq_samplers[size_t(r.slot)]) {
        backend_sampler_detach(st, r.slot);
    }
}

// The context is full: keep the first shift_keep tokens, drop half of the rest, and move the
// remainder down (llama.cpp's context shift; RoPE positions are corrected by the cache).
void engine::shift(context_state & st, request & r) {
    const llama_pos keep = r.o.shift_keep, discard = (r.pos - keep) / 2;
    llama_memory_t mem = llama_get_memory(st.ctx.get());
    llama_memory_seq_rm(mem, r.slot, keep, keep + discard);
    llama_memory_seq_add(mem, r.slot, keep + discard, r.pos, -discard);
    if (r.slot == 0) st.tokens.erase(st.tokens.begin() + keep, st.tokens.begin() + keep + discard);
    r.pos -= discard;
    r.n_discarded += discard;
    ++r.n_shifts;
}

// A draft to decode after r's pending token, in at most `room` more rows of the batch. The draft
// model's context is leased for it to the end of the step.
void engine::draft(context_state & st, request & r, int32_t room, std::vector<std::unique_ptr<context_lease>> & leases) {
    r.draft.clear();
    const llama_pos n_ctx_seq = llama_pos(llama_n_ctx_seq(st.ctx.get()));
    int32_t n = std::min<int64_t>({int64_t(room), int64_t(n_ctx_seq - r.pos - 1),
                                   int64_t(r.o.max_tokens) - int64_t(r.generated.size()) - 1});
    // more logits rows than any decode before would reallocate llama.cpp's buffer under live views
    if (st.live_views.load() > 0) n = std::min(n, st.max_outputs - 1);
    if (n <= 0) return;
    if (const auto & dft = r.spec->draft_context()) {
        try {
            leases.push_back(std::make_unique<context_lease>(dft));
        } catch (const busy_error &) {
            throw lamina_error("the draft model's context is in use by another thread: one lamina.Draft per target "
                               "generating at the same time");
        }
    }
    r.spec->propose(st.tokens, r.pending, n, r.draft);
}

// After a decode: r's k-th token of this step (r.ids[k]) is out. Records it, its text, and why r
// ends, if it does (mutex held). Returns whether readers have news.
bool engine::publish(request & r, size_t k, llama_pos n_ctx_seq, const llama_vocab * vocab) {
    const llama_token t = r.ids[k];
    if (r.t_first == 0) r.t_first = llama_time_us();
    if (r.cancel) {
        end(r, "cancelled");
        return true;
    }
    if (r.o.max_tokens == 0) {  // the prompt only
        end(r, "length");
        return true;
    }
    if (!r.o.ignore_eos && llama_vocab_is_eog(vocab, t)) {
        end(r, "stop");
        return true;
    }
    r.generated.push_back(t);
    if (r.o.top_logprobs >= 0) {
        const row_logprobs & lp = r.rows[k];
        r.logprob.push_back(lp.logprob);
        r.top_ids.insert(r.top_ids.end(), lp.top_ids.begin(), lp.top_ids.end());
        r.top_logprob.insert(r.top_logprob.end(), lp.top.begin(), lp.top.end());
    }
    if (r.said.push(r.pieces[k])) {  // keep the tokens whose text lies wholly before the stop
        r.keep_tokens(r.said.tokens_before_stop());
        end(r, "stop");
        return true;
    }
    const bool last = k + 1 == r.ids.size();  // the others are drafts already decoded
    if (int32_t(r.generated.size()) >= r.o.max_tokens || (last && r.o.shift_keep < 0 && r.pos + 1 > n_ctx_seq)) {
        end(r, "length");
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

void request::keep_tokens(size_t n) {
    if (n >= generated.size()) return;
    generated.resize(n);
    if (o.top_logprobs < 0) return;
    logprob.resize(n);
    top_ids.resize(n * size_t(o.top_logprobs));
    top_logprob.resize(top_ids.size());
}

void request_copy::take(const request & r) {
    tokens.assign(r.generated.begin(), r.generated.end());
    k = r.o.top_logprobs;
    logprob = r.logprob;
    top_ids = r.top_ids;
    top_logprob = r.top_logprob;
}

nb::object request_copy::logprobs() {
    if (k < 0) return nb::none();
    nb::dict d;
    const size_t n = logprob.size();
    d["logprob"] = to_numpy(std::move(logprob));
    d["top_ids"] = to_numpy<int32_t, 2>(std::move(top_ids), {n, size_t(k)});
    d["top_logprob"] = to_numpy<float, 2>(std::move(top_logprob), {n, size_t(k)});
    return std::move(d);
}

void raise_interrupted(context_state & st) {
    if (st.signal) st.signal.raise();  // a signal handler raised (KeyboardInterrupt): re-raise it
    throw decode_error(2, decode_message(2, st));
}

engine::outcome engine::step(context_state & st, bool resume_aborted) {
    llama_context * lc = st.ctx.get();
    const int32_t n_batch = int32_t(llama_n_batch(lc));
    const llama_pos n_ctx_seq = llama_pos(llama_n_ctx_seq(lc));
    if (!batch_) batch_ = std::make_unique<owned_batch>(n_batch);
    llama_batch & b = *batch_;
    admitted_.clear();
    {
        std::lock_guard<std::mutex> lk(mu);
        end_stale(st);
        // A keep request (ctx.generate) first: it takes sequence 0, and a request holding that ends
        // (StaleGenerationError). The others take free sequences from the last one down, in order of
        // arrival, so that sequence 0 stays free for a generation where it can.
        const auto keep = std::find_if(waiting_.begin(), waiting_.end(), [](const request_ptr & r) { return r->o.keep; });
        for (const request_ptr & h : active_) {
            if (keep == waiting_.end() || h->slot != 0 || !h->finish.empty()) continue;
            h->error = std::string(h->o.who) + " on sequence 0 has ended: another generation (ctx.generate, chat or "
                       "complete) took the sequence. Start it again (a new generation reuses what the cache still "
                       "holds of its prompt).";
            h->seq_lost = true;
            end(*h, "error");
            signal_news();
        }
        take_finished();
        auto place = [this](const request_ptr & r, int32_t slot) {
            r->slot = slot;
            slot_used_[size_t(slot)] = true;
            r->t_admit = llama_time_us();
            active_.push_back(r);
            admitted_.push_back(r);
        };
        if (keep != waiting_.end()) {  // sequence 0 passes as it is: the new owner keeps what it can of it
            freed_.erase(std::remove_if(freed_.begin(), freed_.end(), [](const freed_seq & f) { return f.slot == 0; }), freed_.end());
            place(*keep, 0);
            waiting_.erase(keep);
        }
        while (!waiting_.empty()) {
            const auto it = std::find(slot_used_.rbegin(), slot_used_.rend(), false);
            if (it == slot_used_.rend()) break;
            place(waiting_.front(), int32_t(slot_used_.rend() - it) - 1);
            waiting_.pop_front();
        }
        max_running_ = std::max<int64_t>(max_running_, int64_t(active_.size()));
        // the batch lists sequences in ascending order: llama.cpp splits a batch whose sequences are
        // out of order (per-sequence KV streams) into a ubatch per sequence, one graph each
        if (!admitted_.empty()) {
            std::stable_sort(active_.begin(), active_.end(), [](const request_ptr & a, const request_ptr & b) {
                return a->slot < b->slot;
            });
        }
    }
    free_seqs(st);
    for (const request_ptr & r : admitted_) admit(st, *r);
    b.n_tokens = 0;
    in_batch_.clear();
    int32_t n_out = 0, n_prompt = 0, n_gen = 0;
    int32_t to_place = int32_t(std::count_if(active_.begin(), active_.end(), [](const request_ptr & r) {
        return r->has_pending && r->finish.empty();
    }));
    std::vector<std::unique_ptr<context_lease>> drafts;  // the draft models' contexts, to the end of the step
    for (const request_ptr & rp : active_) {  // one token of each generating sequence, and its draft
        request & r = *rp;
        r.out = -1;
        if (!r.has_pending || !r.finish.empty()) continue;
        --to_place;
        if (r.pos + 1 > n_ctx_seq) shift(st, r);  // shift requests only: the others ended "length"
        if (r.spec) draft(st, r, n_batch - b.n_tokens - 1 - to_place, drafts);  // room for the others' tokens
        r.out = batch_add(b, r.pending, r.pos, r.slot, true);
        for (size_t i = 0; i < r.draft.size(); ++i) batch_add(b, r.draft[i], r.pos + 1 + llama_pos(i), r.slot, true);
        in_batch_.push_back(&r);
        n_out += 1 + int32_t(r.draft.size());
        ++n_gen;
    }
    for (const request_ptr & rp : active_) {  // prompt chunks in the room left
        request & r = *rp;
        if (r.has_pending || r.n_fed >= r.prompt.size() || !r.finish.empty()) continue;
        const int32_t room = n_batch - b.n_tokens;
        if (room <= 0) break;
        const size_t take = std::min<size_t>(size_t(std::min(room, r.o.chunk > 0 ? r.o.chunk : n_batch)), r.prompt.size() - r.n_fed);
        for (size_t k = 0; k < take; ++k) {
            const size_t i = r.n_fed + k;
            const bool last = i + 1 == r.prompt.size();
            const int32_t at = batch_add(b, r.prompt[i], llama_pos(i), r.slot, last);
            if (last) {
                r.out = at;
                ++n_out;
            }
        }
        r.feeding = take;
        in_batch_.push_back(&r);
        n_prompt += int32_t(take);
    }
    if (b.n_tokens == 0) return outcome::ran;
    if (st.live_views.load() > 0 && n_out > st.max_outputs) {
        throw lamina_error("this step asks for " + std::to_string(n_out) + " logits rows, more than any decode before, "
                           "while numpy views of ctx.logits are alive; delete them (or copy with np.array(ctx.logits)) first");
    }
    const bool tuned = tuner.on() && b.n_tokens == 1;  // a one-token decode runs on the generation pool
    if (tuner.on()) {
        const int gen = tuner.next(), batch = tuner.batch(llama_n_threads_batch(lc));
        if (gen != llama_n_threads(lc) || batch != llama_n_threads_batch(lc)) llama_set_n_threads(lc, gen, batch);
    }
    const int64_t t0 = llama_time_us();
    t_decode_ = t0;
    int rc;
    {
        caller_pin pin(b.n_tokens > 1 ? st.pin_batch : st.pin_gen);
        rc = decode_checked(st, b, false);
    }
    if (rc != 0) return failed(st, rc, resume_aborted) ? outcome::interrupted : outcome::ran;
    st.last_outputs = n_out;
    st.max_outputs = std::max(st.max_outputs, n_out);
    const int64_t t_dec = t_decoded_ = llama_time_us();
    try {
        collect(st);
    } catch (const std::exception & ex) {  // the requests in the batch end with it; their sequences are cut back
        failed(st, -1, false, ex.what());
        throw;
    }
    const int64_t t1 = llama_time_us();
    if (tuned) tuner.took(t1 - t0);
    {
        std::lock_guard<std::mutex> lk(mu);
        bool any = false;
        for (request * r : in_batch_) {
            if (r->has_pending) n_gen += int32_t(r->ids.size()) - 1;  // the drafts kept
            r->has_pending = false;
            if (r->out < 0 || !r->finish.empty()) continue;
            for (size_t k = 0; k < r->ids.size() && r->finish.empty(); ++k) any |= publish(*r, k, n_ctx_seq, st.model->vocab);
        }
        take_finished();
        ++n_steps_;
        graphs_reused_ = llama_perf_context(lc).n_reused;
        n_prompt_tokens_ += n_prompt;
        if (n_prompt > 0) {
            t_prompt_steps_us_ += t1 - t0;
        } else {
            t_gen_steps_us_ += t1 - t0;
            t_gen_sample_us_ += t1 - t_dec;
            ++n_gen_steps_;
            n_gen_tokens_ += n_gen;
        }
        if (any) signal_news();
    }
    free_seqs(st);
    return outcome::ran;
}

// After a decode (no mutex): what each request in the batch takes, and what its sequence now holds.
void engine::collect(context_state & st) {
    llama_context * lc = st.ctx.get();
    {
        llama_work work;  // sampling reads the decode's results (a device synchronize)
        for (request * r : in_batch_) {
            if (r->out < 0) continue;
            r->ids.clear();
            for (size_t i = 0;; ++i) {
                const int32_t row = r->out + int32_t(i);
                llama_token t = LLAMA_TOKEN_NULL;
                if (r->sampler->greedy()) {
                    if (st.seq_samplers[size_t(r->slot)]) t = llama_get_sampled_token_ith(lc, row);
                    if (t == LLAMA_TOKEN_NULL) {
                        const float * logits = llama_get_logits_ith(lc, row);
                        if (logits == nullptr) throw lamina_error("llama.cpp returned neither a token nor logits for a sequence");
                        t = argmax(logits, st.model->n_vocab);
                    }
                } else {
                    t = r->sampler->sample(lc, row);
                }
                r->ids.push_back(t);
                if (r->o.top_logprobs >= 0) {
                    const float * logits = llama_get_logits_ith(lc, row);
                    if (logits == nullptr) throw lamina_error("llama.cpp returned no logits row for logprobs");
                    r->rows.resize(r->ids.size());
                    r->rows.back().compute(logits, st.model->n_vocab, t, r->o.top_logprobs);
                }
                if (i >= r->draft.size() || t != r->draft[i]) break;
            }
            r->pieces.resize(r->ids.size());
            for (size_t k = 0; k < r->ids.size(); ++k) {
                r->pieces[k].clear();
                append_piece(*st.model, r->ids[k], r->sampler->shown(r->ids[k]), r->pieces[k]);
            }
        }
    }
    // what the sequences hold now: fed prompt chunks, the pending tokens and the drafts kept
    for (request * r : in_batch_) {
        if (r->has_pending) {
            const size_t n_acc = r->ids.size() - 1;
            if (r->slot == 0) {
                st.tokens.push_back(r->pending);
                st.tokens.insert(st.tokens.end(), r->draft.begin(), r->draft.begin() + std::ptrdiff_t(n_acc));
            }
            if (r->spec) {
                if (n_acc < r->draft.size()) llama_memory_seq_rm(llama_get_memory(lc), r->slot, r->pos + 1 + llama_pos(n_acc), -1);
                r->spec->accepted(r->pending, r->pos, r->draft, n_acc, st.tokens);
            }
            r->pos += 1 + llama_pos(n_acc);
        } else {
            if (r->slot == 0) st.tokens.insert(st.tokens.end(), r->prompt.begin() + std::ptrdiff_t(r->n_fed),
                                               r->prompt.begin() + std::ptrdiff_t(r->n_fed + r->feeding));
            r->n_fed += r->feeding;
            r->feeding = 0;
            r->t_prompt_us += t_decoded_ - t_decode_;
            if (r->n_fed == r->prompt.size()) r->pos = llama_pos(r->n_fed);
        }
    }
}

// A failed decode: llama.cpp may keep ubatches that finished before the failure, so every
// sequence in the batch is cut back to what the engine knows it holds. An interruption (a signal,
// ctx.abort()) leaves the requests as they were before the step (the next step resumes them). A
// full unified cache (status 1) ends the longest request ("length") and the step is retried; any
// other status ends the requests in the batch with the error.
bool engine::failed(context_state & st, int rc, bool resume_aborted, const char * why_not_decode) {
    llama_memory_t mem = llama_get_memory(st.ctx.get());
    st.last_outputs = 0;
    st.abort = false;
    const bool interrupted = why_not_decode == nullptr && ((rc == 2 && resume_aborted) || bool(st.signal));
    std::vector<request *> lost;  // requests whose sequence could not be cut back (no mutex: llama.cpp calls)
    for (request * r : in_batch_) {
        const llama_pos held = r->has_pending ? r->pos : llama_pos(r->n_fed);
        r->feeding = 0;
        if (r->slot == 0) st.tokens.resize(std::min(st.tokens.size(), size_t(held)));
        if (!llama_memory_seq_rm(mem, r->slot, held, -1)) {  // a cache that cannot cut: start the prompt over
            llama_memory_seq_rm(mem, r->slot, -1, -1);
            r->n_fed = 0;
            r->n_reused = 0;
            if (r->slot == 0) st.tokens.clear();
            if (r->has_pending) lost.push_back(r);
        }
    }
    const std::string why = interrupted ? "" : why_not_decode != nullptr ? why_not_decode : decode_message(rc, st);
    std::lock_guard<std::mutex> lk(mu);
    for (request * r : lost) {
        r->error = "the cache of sequence " + std::to_string(r->slot) + " was lost with a failed decode";
        end(*r, "error");
    }
    if (interrupted) {
        if (!lost.empty()) signal_news();
        return true;
    }
    if (rc == 1 && active_.size() > 1) {
        request * longest = nullptr;
        for (const request_ptr & r : active_) {
            if (longest == nullptr || r->pos + llama_pos(r->n_fed) > longest->pos + llama_pos(longest->n_fed)) longest = r.get();
        }
        end(*longest, "length");  // it leaves at the next step, which retries the others
    } else {
        for (request * r : in_batch_) {
            r->error = why;
            r->error_code = why_not_decode != nullptr ? 0 : rc;
            end(*r, "error");
        }
    }
    signal_news();
    return false;
}

void engine::stats(nb::dict & d) {
    std::vector<std::pair<const char *, int64_t>> v;  // read under the mutex without the GIL
    {
        gil_release nogil;
        std::lock_guard<std::mutex> lk(mu);
        v = {{"waiting", int64_t(waiting_.size())}, {"running", int64_t(active_.size())},
             {"n_seq_max", int64_t(slot_used_.size())}, {"steps", n_steps_}, {"finished", n_finished_},
             {"max_running", max_running_}, {"n_prompt_tokens", n_prompt_tokens_}, {"n_gen_tokens", n_gen_tokens_},
             {"t_prompt_steps_us", t_prompt_steps_us_}, {"t_gen_steps_us", t_gen_steps_us_}, {"n_gen_steps", n_gen_steps_},
             {"t_gen_sample_us", t_gen_sample_us_}, {"graphs_reused", graphs_reused_}};
    }
    for (const auto & [k, x] : v) d[k] = x;
}

}  // namespace lamina
