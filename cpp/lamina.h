// Shared declarations of lamina's native layer: handles, errors, and one init function per
// concern (each defined in cpp/<concern>.cpp and called from cpp/module.cpp).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/optional.h>

#include "llama-cpp.h"
#include "llama.h"
#include "ggml.h"

#include "text.h"

#include <atomic>
#include <mutex>
#include <shared_mutex>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace nb = nanobind;

namespace lamina {

// ---- errors (registered as Python exceptions in errors.cpp) ------------------------------
// Every lamina error carries an escaped message (so do a format error's field and reason).
struct lamina_error : std::runtime_error {
    explicit lamina_error(const std::string & msg) : std::runtime_error(escape_bytes(msg)) {}
};
struct load_error : lamina_error { using lamina_error::lamina_error; };
struct out_of_memory_error : lamina_error {
    std::string device;  // the device whose allocation failed ("" when llama.cpp did not say)
    uint64_t bytes = 0;  // the bytes it asked for (0 when unknown)
    using lamina_error::lamina_error;
    out_of_memory_error(const std::string & msg, std::string dev, uint64_t n)
        : lamina_error(msg), device(std::move(dev)), bytes(n) {}
};
struct model_format_error : load_error {  // -> lamina.ModelFormatError(field, offset, reason)
    std::string field, reason;
    uint64_t offset;  // the byte in the file where the bad field starts
    model_format_error(const std::string & msg, std::string f, uint64_t off, std::string r)
        : load_error(msg), field(escape_bytes(f)), reason(escape_bytes(r)), offset(off) {}
};
struct decode_error : lamina_error {
    int code;
    decode_error(int code_, const std::string & msg) : lamina_error(msg), code(code_) {}
};
struct closed_error : lamina_error { using lamina_error::lamina_error; };
struct busy_error : lamina_error { using lamina_error::lamina_error; };   // another thread uses it
struct stale_error : lamina_error { using lamina_error::lamina_error; };  // its sequence was changed under it
struct fork_error : lamina_error { using lamina_error::lamina_error; };   // made before fork()
struct permission_error : std::runtime_error { using std::runtime_error::runtime_error; };  // -> PermissionError
// std::invalid_argument -> ValueError, std::out_of_range -> IndexError (nanobind built-ins)

// ---- owned native state -------------------------------------------------------------------
// Handles are shared so that a context keeps its model alive and a numpy view keeps its
// context alive, whatever order Python closes or collects them in.
// fork(): ggml's worker threads (and device contexts) do not survive it. Objects remember the
// fork generation they were made in (a counter a pthread_atfork child handler bumps); used in a
// child they raise fork_error, and the child never frees them (that would join threads it lacks).
uint32_t fork_generation();

struct model_state {
    llama_model_ptr model;
    const llama_vocab * vocab = nullptr;
    int32_t n_vocab = 0;
    std::string path;
    std::string file_id;  // file_identity(path) when it was loaded (adapters are checked against the same file)
    bool vocab_only = false;  // loaded without weights (a tokenizer): no hyperparameters, no contexts
    // RPC servers holding part of the model ("host:port"), and whether one of them went away: then
    // every context of the model is closed (rpc_lost, devices.cpp)
    std::vector<std::string> rpc_endpoints;
    std::atomic<bool> lost{false};
    std::mutex lost_mutex;  // guards the one write of lost_why (read once lost is true)
    std::string lost_why;
    uint32_t fork_gen = fork_generation();
    ~model_state();
};

// Settings of one ggml CPU threadpool (threadpool.cpp).
struct threadpool_config {
    int n_threads = 1;
    int prio = 0;          // ggml_sched_priority: 0 normal, 1 medium, 2 high, 3 realtime (-1 low)
    uint32_t poll = 50;    // 0 sleep at once .. 100 spin; 50 is llama.cpp's default
    bool strict = false;   // one thread per listed CPU
    std::vector<int> cpus; // empty: the process's affinity
    bool operator==(const threadpool_config & o) const {
        return n_threads == o.n_threads && prio == o.prio && poll == o.poll && strict == o.strict && cpus == o.cpus;
    }
};

// What a decode must do to the calling thread, which ggml makes worker 0 of the pool: its CPU
// mask (empty: leave it) and scheduling priority (0: leave it). See caller_pin.
struct pin_plan {
    std::vector<int> cpus;
    int prio = 0;
    bool active() const { return !cpus.empty() || prio != 0; }
};

// For one scope, gives the calling thread the pool's worker-0 CPU mask and priority (ggml pins the
// thread that creates or resumes a pool, never the one that calls a later decode, and never undoes
// it), then restores the caller's own mask and priority. Inactive plans cost nothing.
class caller_pin {
public:
    explicit caller_pin(const pin_plan & plan);
    ~caller_pin();
    caller_pin(const caller_pin &) = delete;
    caller_pin & operator=(const caller_pin &) = delete;
private:
    struct saved;
    std::unique_ptr<saved> saved_;
};

struct lora_state;  // a loaded LoRA adapter (lora.cpp)
struct context_state;
// What saved states record of a context's adapters: 0 for none, else a hash of each adapter's file
// content and its scale (independent of their order).
int64_t lora_fingerprint(const context_state & st);
// llama.cpp reads a model's set of loaded adapters (graph_max_nodes) when it creates a context and
// reserves a graph (the first decode after a change of adapters); loading and freeing an adapter
// change that set. Readers share this lock (context creation, decode_checked), writers own it.
std::shared_mutex & lora_registry();

struct context_state {
    std::shared_ptr<model_state> model;
    llama_context_ptr ctx;
    // LoRA adapters applied to this context, with their scales (kept alive while applied; freed
    // after ctx by ~context_state)
    std::vector<std::pair<std::shared_ptr<lora_state>, float>> loras;
    // Who last changed each sequence's cache (seq_changed): a generation or a Batcher request that
    // owns a sequence records its epoch when it takes it, and raises stale_error (or ends with an
    // error) when the epoch moved under it, naming what moved it. Never silently wrong text.
    std::vector<uint64_t> seq_epochs;       // per sequence id (n_seq_max)
    std::vector<const char *> seq_changers; // what last moved each epoch (a string literal)
    uint64_t epoch_counter = 0;             // seq_changed hands out unique epochs
    // One thread at a time: every native operation holds a context_lease (busy) for its duration.
    std::atomic<bool> busy{false};
    uint32_t fork_gen = fork_generation();
    // llama.cpp's backend sampling: the greedy chains attached to sequences (backend_greedy_attach),
    // owned here because llama.cpp keeps pointers to them until they are detached or ctx is freed;
    // and the client that attached them (a generator or a Batcher; nullptr once it went away). A
    // lease by anyone else detaches them all first.
    std::vector<llama_sampler_ptr> seq_samplers;  // per sequence id
    int n_backend_samplers = 0;
    std::atomic<const void *> backend_owner{nullptr};
    // tokens held in the KV cache for sequence 0, in position order (prefix reuse, n_past)
    std::vector<llama_token> tokens;
    // logits views handed to Python that are still alive (see context.cpp: output realloc)
    std::atomic<int> live_views{0};
    int type_k = 1, type_v = 1;    // ggml types of the KV cache (state headers compare them)
    bool kv_unified = false;       // one KV stream for all sequences (else one per sequence)
    bool embeddings = false;       // every token is an output (llama.cpp's output_all)
    int32_t max_outputs = 0;       // the most outputs a decode has asked for so far
    int32_t last_outputs = 0;      // outputs of the latest decode (rows of ctx.logits)
    ggml_threadpool * pool = nullptr;        // generation pool, owned (freed after ctx)
    ggml_threadpool * pool_batch = nullptr;  // batch pool, owned; null: the generation pool serves both
    pin_plan pin_gen, pin_batch;             // caller pinning for one-token and multi-token decodes
    // Pools replaced by set_threads: llama.cpp's CPU backend keeps a pointer to the pool it last
    // ran on and pauses it when the next decode switches pools, so they are freed only after that
    // decode (threadpools_release_retired) or with the context.
    std::vector<ggml_threadpool *> retired_pools;
    std::atomic<bool> abort{false};
    // the compute operation the abort flag belongs to (begin_operation): a generation's number while
    // it runs (between two tokens too), 0 for a decode call
    uint64_t op_id = 0;
    uint32_t abort_calls = 0;
    // Ctrl-C during a decode: the abort callback polls Python's signal handlers (see context.cpp)
    int64_t last_signal_check_us = 0;
    // Python runs signal handlers in the main thread only: a decode started elsewhere never takes
    // the GIL from inside graph compute (set by each decode entry, with the GIL held)
    bool signals_here = false;
    nb::object signal_type, signal_value, signal_tb;  // the exception a handler raised, if any
    ~context_state();
};

// Exclusive use of a context for one native operation. Raises busy_error when another thread is
// using it (never waits: no deadlock with the GIL or a second lease in the same thread) and
// fork_error in a child process. `owner`: the generator taking it (others detach its backend
// sampler first).
class context_lease {
public:
    explicit context_lease(std::shared_ptr<context_state> st, const void * owner = nullptr);
    ~context_lease();
    context_lease(const context_lease &) = delete;
    context_lease & operator=(const context_lease &) = delete;
    context_state & operator*() const { return *st_; }
    context_state * operator->() const { return st_.get(); }
    const std::shared_ptr<context_state> & shared() const { return st_; }
private:
    std::shared_ptr<context_state> st_;
};
// Whether an RPC server holding part of the model went away (ggml's RPC client with lamina's patch
// marks it instead of aborting): sets model.lost. Cheap when no RPC server ever failed.
bool rpc_lost(model_state & model);
// The RPC endpoints among ggml devices (descriptions of devices whose backend is RPC).
std::vector<std::string> rpc_endpoints_of(const std::vector<ggml_backend_dev_t> & devs);
// A compute operation starts on a leased context: a decode call (op 0), or a generation's step (op:
// its number from new_operation_id(), the same for every token). ctx.abort() stops the operation
// running when it is called; one that arrived after the last operation ended (or while only
// read-only calls ran) is dropped here, so it never stops a later, unrelated call.
void begin_operation(context_state & st, uint64_t op = 0);
uint64_t new_operation_id();
// Something changes what sequence `seq` (< 0: every sequence) holds: its epoch moves on, so the
// generation or Batcher request that owns it ends at its next step with stale_error naming `what`
// (a string literal). Returns the new epoch (of the last sequence changed). Under a lease.
uint64_t seq_changed(context_state & st, int32_t seq, const char * what);
// stale_error for the owner of `seq`, whose epoch was `mine` when it took the sequence.
[[noreturn]] void raise_stale(const context_state & st, int32_t seq, const char * owner);
// The one place backend samplers are attached and detached (under a lease). attach: a greedy chain
// on sequence seq for `owner` (another owner's chains are detached first); false where llama.cpp
// cannot sample in the graph (e.g. a tensor split). Either changes llama.cpp's output buffer at the
// next decode (max_outputs reset). detach: one sequence's chain, or every one (seq < 0).
bool backend_greedy_attach(context_state & st, int32_t seq, const void * owner);
void backend_sampler_detach(context_state & st, int32_t seq);
// Raise fork_error when an object made in generation `gen` is used in a forked child.
void check_fork(uint32_t gen, const char * what);

// Append one token to a batch made by llama_batch_init (one sequence id per token).
inline int32_t batch_add(llama_batch & b, llama_token t, llama_pos pos, llama_seq_id seq, bool logits) {
    b.token[b.n_tokens] = t;
    b.pos[b.n_tokens] = pos;
    b.n_seq_id[b.n_tokens] = 1;
    b.seq_id[b.n_tokens][0] = seq;
    b.logits[b.n_tokens] = logits;
    return b.n_tokens++;
}

// What a llama_decode status means, for an exception's message.
std::string decode_message(int rc, const context_state & st);
// Turn a failed llama_decode into an exception (GIL held); resyncs the token list first.
[[noreturn]] void decode_failed(context_state & st, int rc);
// The one place lamina calls llama_decode (under a lease; GIL held or not): checks the
// preconditions llama.cpp asserts (ValueError), decodes, synchronizes when `sync`, and frees the
// thread pools a set_threads replaced. Returns llama.cpp's status (decode_failed turns it into
// an exception, with the GIL).
int decode_checked(context_state & st, const llama_batch & batch, bool sync);
// decode_checked's status when an RPC server holding part of the model went away
constexpr int decode_rc_rpc_lost = -100;
// decode_checked with the GIL released (held on entry and exit), the caller pinned as the pool's
// worker 0, and Ctrl-C watched inside a multi-token decode in the main thread. Returns the status.
int decode_watched(context_state & st, const llama_batch & batch, bool sync);
// Decode a batch with the GIL released; converts llama.cpp's status codes into exceptions.
void decode_batch(context_state & st, const llama_batch & batch, int32_t n_outputs);
// Evaluate tokens for sequence 0 starting at st.tokens.size(); logits for the last token only.
// Appends n tokens to sequence 0 in n_batch chunks; the last chunk's last token gets logits unless
// last_output is false (then no logits at all: llama.cpp computes none).
void decode_tokens(context_state & st, const llama_token * toks, size_t n, bool last_output = true);
// ValueError unless a prompt of n tokens leaves room for one more in the context.
void check_prompt_fits(const context_state & st, size_t n);
// Bring the KV cache of sequence 0 to `prompt`, reusing the longest common prefix; afterwards
// the logits of the prompt's last token are available at index -1. Returns the tokens evaluated.
size_t eval_prompt(context_state & st, const std::vector<llama_token> & prompt);
void check_tokens(const model_state & m, const llama_token * toks, size_t n);
// Set the token mirror of sequence 0 to unknown ids (-1) up to pmax. Positions beyond the
// context's cells (shifted by kv.seq_add, or a hostile saved state) leave it empty instead of
// allocating a mirror of billions: the next prompt then clears the cache and starts over.
void mirror_unknown(context_state & st, llama_pos pmax);
// Text needs a vocabulary: llama.cpp aborts on tokenize / detokenize / token_to_piece without one
// (tokenizer.ggml.model "none"), and on add_special when a special token it asks for is missing.
void require_vocab(const model_state & m);
void require_specials(const model_state & m);
// One token's text (grows the buffer for long pieces).
void append_piece(const model_state & m, llama_token tok, bool special, std::string & out);
// The shared model state behind a lamina._native.Model (raises ClosedError).
std::shared_ptr<model_state> model_shared(nb::handle model);
// The shared context state behind a lamina._native.Context (raises ClosedError).
std::shared_ptr<context_state> context_shared(nb::handle ctx);
// context_shared, leased (raises ClosedError, BusyError, ForkError).
inline context_lease context_leased(nb::handle ctx, const void * owner = nullptr) {
    return context_lease(context_shared(ctx), owner);
}

// The device behind a device or buffer-type name as ggml logs it: "CUDA0", "CPU_Mapped", and RPC's
// "RPC0[127.0.0.1:50052]"; nullptr if none.
ggml_backend_dev_t device_named(const std::string & name);
// A path llama.cpp can be trusted with (raises FileNotFoundError / OSError / LoadError).
void check_gguf_file(const std::string & path);
// Values in the file that llama.cpp would abort on (raises model_format_error; validate.cpp).
void validate_gguf(const std::string & path);
// A LoRA adapter file against the tensors of the model file it is for (raises model_format_error;
// load_error when that file is no longer the one loaded: model_identity, from file_identity at load).
void validate_lora_gguf(const std::string & path, const std::string & model_path, const std::string & model_identity);
// A file's identity (canonical path, size, times, inode); "" when it cannot be read.
std::string file_identity(const std::string & path);
std::string last_log_error();
std::string first_log_error();  // the first error-level line since clear_last_log_error()
void clear_last_log_error();
// The first buffer allocation that failed since clear_last_log_error(), from ggml's
// "failed to allocate <device> buffer of size <bytes>" error line (empty device: none).
struct alloc_failure {
    std::string device;
    uint64_t bytes = 0;
};
alloc_failure first_alloc_failure();
// Whether llama.cpp's error lines say memory ran out without naming a buffer ("alloc", "memory").
// All parsing of llama.cpp's log text lives in logging.cpp (tests/test_shape.py checks it still matches).
bool log_says_out_of_memory(const std::string & why);
// Raise for a failed llama.cpp call (load, context creation): out_of_memory_error naming the device,
// the bytes asked and the device's free memory when an allocation failure was logged; else
// out_of_memory_error or fallback(msg) with llama.cpp's last error line.
enum class failure { load, other };
[[noreturn]] void raise_failed(const std::string & what, failure fallback);

// Create ggml threadpools for generation and batches and attach them to st.ctx (replacing and
// freeing earlier ones); a no-op without CPU-backend threadpool support.
void threadpools_attach(context_state & st, const threadpool_config & gen, const threadpool_config & batch);
void pool_free(ggml_threadpool * tp);
// After a decode that succeeded: the CPU backend has switched to the current pools; free the old.
inline void threadpools_release_retired(context_state & st) {
    if (st.retired_pools.empty()) return;
    for (ggml_threadpool * tp : st.retired_pools) pool_free(tp);
    st.retired_pools.clear();
}

// Python's signal check, done with the GIL held; raises KeyboardInterrupt etc. as nb::python_error.
void check_signals();
// Whether the calling thread (GIL held) is Python's main thread, where signal handlers run.
bool on_main_thread();

// ---- interpreter exit ---------------------------------------------------------------------
// Set by prepare_exit (lamina's last atexit handler, in the main thread) before the interpreter
// finalizes. From then on a thread other than the main one that leaves a GIL-free section parks
// (sleeps until the process ends) instead of taking the GIL back: Python 3.11 ends such a thread
// with pthread_exit, whose unwinding through lamina's C++ ends in std::terminate, and a daemon
// thread still inside llama.cpp when C++'s static objects are destroyed crashed the process.
extern std::atomic<bool> g_exiting;
// Calls into llama.cpp running now (llama_work scopes), and threads taking the GIL back (past the
// check of g_exiting): prepare_exit waits for both.
extern std::atomic<int> g_llama_work;
extern std::atomic<int> g_taking_gil;
// Sleep until the process ends (never holding the GIL or a lock), no longer counted in g_llama_work.
[[noreturn]] void park_forever();
// After fork(): the child's counters start again (the parent's threads do not exist there).
void exit_state_after_fork();

// Whether the calling thread holds the GIL. PyGILState_Check is not in the limited API that the
// abi3 build (Python >= 3.12) compiles against, so lamina keeps the answer itself: a thread
// Python has no state for (ggml's workers, the Batcher's loop) holds no GIL; a Python thread runs
// lamina code with the GIL (it called in from Python) except inside a gil_release, where
// t_gil_released is set, and outside a gil_acquire nested in one, which clears it again. Every
// GIL release and acquire in cpp/ goes through these two classes.
extern thread_local bool t_gil_released;
inline bool gil_held() { return !t_gil_released && PyGILState_GetThisThreadState() != nullptr; }

// llama.cpp's log lines wait in a queue (logging.cpp) until a thread holding the GIL delivers them:
// after every GIL-free section (the classes below), and in the main thread through a pending call.
extern std::atomic<int> g_log_queued;
void log_deliver();  // GIL held
inline void log_deliver_queued() {
    if (g_log_queued.load(std::memory_order_relaxed) > 0) log_deliver();
}

// nb::gil_scoped_release, with the park above; used for every GIL-free section of lamina.
class gil_release {
public:
    gil_release() : state_(PyEval_SaveThread()), was_released_(t_gil_released) { t_gil_released = true; }
    ~gil_release() {
        g_taking_gil.fetch_add(1);  // seq_cst with prepare_exit's store of g_exiting: one sees the other
        if (g_exiting.load() && !on_main_thread()) {
            g_taking_gil.fetch_sub(1);
            park_forever();
        }
        PyEval_RestoreThread(state_);
        t_gil_released = was_released_;
        g_taking_gil.fetch_sub(1);
        if (!t_gil_released) log_deliver_queued();
    }
    gil_release(const gil_release &) = delete;
    gil_release & operator=(const gil_release &) = delete;
private:
    PyThreadState * state_;
    bool was_released_;
};

// nb::gil_scoped_acquire for a thread that runs without the GIL, with the same park.
class gil_acquire {
public:
    gil_acquire() {
        g_taking_gil.fetch_add(1);
        if (g_exiting.load() && !on_main_thread() && !gil_held()) {  // never parks holding the GIL
            g_taking_gil.fetch_sub(1);
            park_forever();
        }
        state_ = PyGILState_Ensure();
        was_released_ = t_gil_released;
        t_gil_released = false;
        g_taking_gil.fetch_sub(1);
    }
    ~gil_acquire() {
        log_deliver_queued();
        t_gil_released = was_released_;
        PyGILState_Release(state_);
    }
    gil_acquire(const gil_acquire &) = delete;
    gil_acquire & operator=(const gil_acquire &) = delete;
private:
    PyGILState_STATE state_;
    bool was_released_ = false;
};

// A call into llama.cpp that must not be running when the process ends (decode, sampling reads,
// load, context creation, state, a draft, adapters): counted for prepare_exit. Once the
// interpreter exits, a thread other than the main one parks here instead of starting one (it
// holds no lock yet: make it before taking any). A thread parking anywhere stops counting its own.
extern thread_local int t_llama_work;
class llama_work {
public:
    llama_work() {
        g_llama_work.fetch_add(1);
        ++t_llama_work;
        if (g_exiting.load() && !on_main_thread() && !gil_held()) park_forever();
    }
    ~llama_work() {
        --t_llama_work;
        g_llama_work.fetch_sub(1);
    }
    llama_work(const llama_work &) = delete;
    llama_work & operator=(const llama_work &) = delete;
};

// For one multi-token decode in Python's main thread (GIL held when made and destroyed): Python's
// signal wakeup fd points at lamina's pipe, so the abort callback notices a signal with a read()
// and takes the GIL only then (signals.cpp). Inactive when `on` is false or Python refuses.
class signal_watch {
public:
    explicit signal_watch(bool on);
    ~signal_watch();
    signal_watch(const signal_watch &) = delete;
    signal_watch & operator=(const signal_watch &) = delete;
    bool active() const { return active_; }
private:
    bool active_ = false;
    int old_fd_ = -1;
};
// In the abort callback, without the GIL: whether a signal arrived during the active watch.
bool signal_arrived();

// ---- parameters shared by loading, contexts and the memory fit (model.cpp, context.cpp) -----
// Where a model's weights go (Python: lamina.Model's resolved placement; bound as
// _native.Placement). Each field has its one default here.
struct placement {
    int32_t n_gpu_layers = 0;                    // -1: every layer
    std::optional<std::vector<int>> devices;     // ggml device indices; none: llama.cpp's choice
    int split_mode = 1;                          // 0 none, 1 layer, 2 row, 3 tensor
    int main_gpu = 0;
    std::optional<std::vector<float>> tensor_split;
    std::vector<std::pair<std::string, int>> overrides;  // (regex, device index or -1 for the CPU)
};
// llama_model_params with the storage its pointers point into
struct model_params {
    llama_model_params p;
    std::vector<ggml_backend_dev_t> devs;
    std::vector<float> split;
    std::vector<std::string> patterns;
    std::vector<llama_model_tensor_buft_override> overrides;
    model_params() = default;
    model_params(const model_params &) = delete;
    model_params & operator=(const model_params &) = delete;
};
// Validated; raises ValueError / IndexError for bad placements.
void build_model_params(const placement & a, model_params & out);
// A context's settings (Python: lamina.Context's resolved settings; bound as _native.ContextParams).
// Each field has its one default here; Python's Context takes its defaults from these.
struct context_params {
    uint32_t n_ctx = 4096, n_batch = 2048, n_ubatch = 512, n_seq_max = 1;
    int flash_attn = -1;                  // -1 auto, 0 off, 1 on
    int type_k = GGML_TYPE_F16, type_v = GGML_TYPE_F16;
    bool offload_kqv = true, op_offload = true, embeddings = false, swa_full = true, kv_unified = false;
    int pooling_type = -1;                // -1 the model's, 0 none, 1 mean, 2 cls, 3 last
    int rope_scaling_type = -1;           // -1 the model's, 0 none, 1 linear, 2 yarn, 3 longrope
    float rope_freq_base = 0.0f, rope_freq_scale = 0.0f;  // 0: the model's
};
// One threadpool (bound as _native.PoolParams): threads, CPUs to pin to, strict placement,
// priority (-1 low .. 3 realtime), polling level (0 sleep .. 100 spin).
struct pool_params {
    int32_t n_threads = 1;
    std::vector<int> cpus;
    bool strict = false;
    int priority = 0;
    uint32_t poll = 50;
};
llama_context_params build_context_params(const context_params & a);
// Collect llama.cpp's "layer N assigned to device X" lines logged by this thread (null: stop).
void capture_layer_devices(std::vector<std::pair<int, std::string>> * out);

// ---- speculative decoding (speculative.cpp) ----------------------------------------------------
// A draft's settings (bound as _native.DraftParams; lamina.Draft takes its defaults from here): the
// most and fewest tokens a draft may propose, the draft model's least probability for a token it
// proposes, and the n-gram lookup's key length (the draft without a model).
struct draft_options {
    int32_t n_max = 16, n_min = 0;
    float p_min = 0.75f;
    int32_t ngram_n = 12;
};
class sampler_handle;
// Speculative decoding of one generation on sequence 0 of a target context, with a draft model's
// context (its own, n_seq_max 1) or, without one, n-gram lookup (llama.cpp's common/speculative).
class speculation {
public:
    speculation(context_state & tgt, std::shared_ptr<context_state> dft, const draft_options & o);
    ~speculation();
    // The target evaluated `prompt`: the draft context gets it too (GIL held, draft leased).
    void begin(const std::vector<llama_token> & prompt);
    // Decode `last` (not yet decoded, at st.tokens.size()) and a draft of at most n_draft_max tokens
    // in one batch; ids gets the target sampler's picks: the drafts it kept, then its own token (not
    // decoded). The caches keep `last` and the kept drafts. Returns llama_decode's status (no GIL).
    int step(context_state & st, sampler_handle & s, llama_token last, int32_t n_draft_max, std::vector<llama_token> & ids);
    // Cut both caches and token lists back to n_tokens (a generation that ended inside a step).
    void truncate(context_state & st, size_t n_tokens);
    void stats(nb::dict & d) const;
    const std::shared_ptr<context_state> & draft_context() const;
private:
    struct impl;
    std::unique_ptr<impl> p_;
};

// Binds a field of the parameter struct named Params (a local alias) read-write, under its own name.
#define LAMINA_RW(field) .def_rw(#field, &Params::field)

// ---- init functions, one per concern --------------------------------------------------------
void init_errors(nb::module_ & m);
void init_logging(nb::module_ & m);
void init_system(nb::module_ & m);
void init_devices(nb::module_ & m);
void init_model(nb::module_ & m);
void init_context(nb::module_ & m);
void init_sampler(nb::module_ & m);
void init_generate(nb::module_ & m);
void init_chat(nb::module_ & m);
void init_memory(nb::module_ & m);
void init_fit(nb::module_ & m);
void init_batcher(nb::module_ & m);
void init_bandwidth(nb::module_ & m);
void init_lora(nb::module_ & m);
void init_exit(nb::module_ & m);

}  // namespace lamina
