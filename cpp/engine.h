// The sequence engine: one per context, the one owner of what its sequences hold. Every way of
// generating is a client that submits a request: ctx.generate (chat, complete) on sequence 0 with
// prefix reuse, generate_batch and lamina.Batcher on any free sequence, speculative decoding as a
// request that drafts. Only step() builds batches, tracks positions, places backend samplers,
// samples, matches stop strings and frees or trims sequences (engine.cpp).
//
// Threads: step() runs under the context's lease with the GIL released, in whichever thread
// drives it (a generator's next(), generate_batch's caller, a Batcher's loop). Submit, cancel and
// the readers of a request may be any thread. What readers see is guarded by the mutex (lease.h's
// lock 4), never held across a llama.cpp call; the rest is the driving step's own.
#pragma once

#include "lamina.h"
#include "logprobs.h"
#include "sampler.h"
#include "tuner.h"

#include <condition_variable>
#include <deque>

namespace lamina {

// What a client asks for; fixed at submit.
struct request_options {
    int32_t max_tokens = 1;   // 0: evaluate the prompt only (finish "length")
    bool ignore_eos = false;
    // Sequence 0, reusing the longest prefix the cache holds, left holding prompt and text at the
    // end (the next generation reuses it); a request holding sequence 0 ends with StaleGenerationError.
    // Else any free sequence, emptied before and after.
    bool keep = false;
    int32_t shift_keep = -1;  // a full context: shift it keeping this many tokens; < 0: finish "length"
    bool backend = false;     // greedy in the graph (llama.cpp's backend sampling) where it can be
    int32_t chunk = 0;        // prompt tokens per step (0: n_batch)
    int32_t top_logprobs = -1;  // >= 0: each generated token's logprob and the k most likely (logprobs.h)
    const void * client = nullptr;  // the Batcher that submitted it (close() cancels its requests)
    const char * who = "a Batcher request (generate_batch or lamina.Batcher)";  // its name in StaleGenerationError
};

struct request {
    // fixed at submit
    uint64_t id = 0;
    std::vector<llama_token> prompt;
    std::unique_ptr<sampler_handle> sampler;  // its own chain: any thread may free it
    std::unique_ptr<speculation> spec;        // speculative decoding (keep requests only)
    request_options o;
    // the driving step's own
    int32_t slot = -1;
    uint64_t epoch = 0;        // its sequence's epoch when admitted: moved by another client, it ends
    size_t n_fed = 0;          // prompt tokens in its sequence
    size_t feeding = 0;        // prompt tokens in the current batch
    llama_pos pos = 0;         // where `pending` goes
    llama_token pending = -1;  // sampled, not decoded yet
    bool has_pending = false;
    int32_t out = -1;          // its first logits row in the current batch
    std::vector<llama_token> draft, ids;  // this step's draft, and the tokens it took (kept drafts + its own)
    std::vector<std::string> pieces;      // their text
    std::vector<row_logprobs> rows;       // their logprobs (top_logprobs >= 0)
    int64_t n_reused = 0, n_shifts = 0, n_discarded = 0, t_prompt_us = 0;
    // shared (mutex)
    std::vector<llama_token> generated;
    std::vector<float> logprob, top_logprob;  // per generated token, and top_logprobs per token
    std::vector<int32_t> top_ids;
    stop_text said{{}};        // the text as users see it, cut at a stop string
    size_t released = 0;       // bytes of it readers may take: whole UTF-8, no possible start of a stop string
    size_t taken = 0;          // bytes handed out
    std::string finish;        // "" while queued or running: stop, length, cancelled, error
    std::string error;         // finish == "error": what failed
    int error_code = 0;        // llama_decode's status (0: none)
    bool seq_lost = false;     // ended because another client changed its sequence (StaleGenerationError)
    bool cancel = false;
    int64_t t_submit = 0, t_admit = 0, t_first = 0, t_end = 0;

    bool has_news() const { return taken < released || !finish.empty(); }
    void keep_tokens(size_t n);  // the first n generated tokens, and their logprobs (mutex held)
    [[noreturn]] void raise_error() const;  // finish == "error": its exception
};
using request_ptr = std::shared_ptr<request>;

// A request's tokens and logprobs, copied under the engine's mutex (take), then made into numpy
// arrays (tokens; logprobs: None, or {logprob: (n,), top_ids, top_logprob: (n, top_logprobs)}).
struct request_copy {
    std::vector<int32_t> tokens, top_ids;
    std::vector<float> logprob, top_logprob;
    int32_t k = -1;
    void take(const request & r);  // mutex held
    nb::object logprobs();         // GIL held
};

class engine {
public:
    explicit engine(int32_t n_seq_max) : slot_used_(size_t(n_seq_max), false) {}
    ~engine();
    engine(const engine &) = delete;
    engine & operator=(const engine &) = delete;

    // What a step would refuse, checked at submit (so a step never fails on it). Under the lease.
    void check(context_state & st, request & r);
    void queue(const request_ptr & r);  // GIL held or not
    // What a step ended with: ran (or nothing to do), or a decode interrupted by a signal (the
    // exception waits in st.signal_*) or, when resume_aborted, by ctx.abort(): the requests in it are
    // as before it. Else an aborted decode ends them (DecodeError).
    enum class outcome { ran, interrupted };
    // One batch: admit, decode, sample, publish (under the lease, GIL released).
    outcome step(context_state & st, bool resume_aborted);
    // End every request (closed: "cancelled"; else "error" with why), or those of one client.
    void end_all(const char * finish, const std::string & why, const void * client = nullptr);
    // Ended requests leave; their sequences are emptied (kept ones trimmed). Under the lease, no GIL.
    void settle(context_state & st);
    void cancel(request & r);
    // Whether requests (of one client, when given) are queued or running. Mutex held.
    bool has_work_locked(const void * client = nullptr) const;
    // The loop's bookkeeping readers wait on (mutex held by the caller of these).
    std::mutex mu;
    std::condition_variable work, news;
    int wake_fd();  // a pipe's read end that gets a byte after each step with news (asyncio)
    void stats(nb::dict & d);
    // The generation threads of one-token steps, when they are lamina's default (under the lease).
    thread_tuner tuner;

private:
    struct freed_seq {
        int32_t slot;
        uint64_t epoch;
        int64_t keep;        // tokens left in it (a keep request), or -1: emptied
        bool backend;        // detach its backend sampler
    };
    void signal_news();
    void end(request & r, const char * why);
    void end_stale(const context_state & st);
    void take_finished();
    void free_seqs(context_state & st);
    void admit(context_state & st, request & r);
    void shift(context_state & st, request & r);
    void draft(context_state & st, request & r, int32_t room, std::vector<std::unique_ptr<context_lease>> & leases);
    bool publish(request & r, size_t k, llama_pos n_ctx_seq, const llama_vocab * vocab);
    void collect(context_state & st);
    bool failed(context_state & st, int rc, bool resume_aborted, const char * why_not_decode = nullptr);

    std::deque<request_ptr> waiting_;
    std::vector<request_ptr> active_;  // admitted, in order of admission
    std::vector<bool> slot_used_;
    std::vector<freed_seq> freed_;     // taken under the mutex, emptied after it
    std::vector<request_ptr> graveyard_;  // ended, freed with freed_ (after the mutex)
    std::vector<request *> in_batch_;
    std::vector<request_ptr> admitted_;
    std::unique_ptr<owned_batch> batch_;
    int64_t t_decode_ = 0, t_decoded_ = 0;  // when this step's decode started and returned
    uint64_t next_id_ = 1;
    int wake_rd_ = -1, wake_wr_ = -1;
    bool wake_armed_ = false;
    int64_t n_steps_ = 0, n_prompt_tokens_ = 0, n_gen_tokens_ = 0, t_prompt_steps_us_ = 0, t_gen_steps_us_ = 0;
    int64_t n_gen_steps_ = 0, t_gen_sample_us_ = 0, graphs_reused_ = 0, n_finished_ = 0, max_running_ = 0;
};

// The engine of a context (made with it).
engine & engine_of(context_state & st);
// An interrupted step's exception (GIL held): the signal handler's, or DecodeError for ctx.abort().
[[noreturn]] void raise_interrupted(context_state & st);

}  // namespace lamina
