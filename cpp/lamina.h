// Shared declarations of lamina's native layer: the owned native state (models, contexts), the
// decode helpers every client uses, and one init function per concern (each defined in
// cpp/<concern>.cpp and called from cpp/module.cpp). The rest is in one named place each:
// errors.h, lease.h (leases, locks and their order), exit.h (GIL, signals, exit), params.h,
// speculation.h, text.h.
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

#include "errors.h"
#include "exit.h"
#include "lease.h"
#include "params.h"
#include "speculation.h"
#include "text.h"

#include <array>
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

// An owned vector handed to numpy without a second copy, with this shape (1-D: its size).
template <class T, size_t D>
nb::ndarray<nb::numpy, T, nb::ndim<D>> to_numpy(std::vector<T> && v, const std::array<size_t, D> & shape) {
    auto * heap = new std::vector<T>(std::move(v));
    nb::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<T> *>(p); });
    return nb::ndarray<nb::numpy, T, nb::ndim<D>>(heap->data(), D, shape.data(), owner);
}
template <class T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> to_numpy(std::vector<T> && v) {
    const size_t n = v.size();
    return to_numpy<T, 1>(std::move(v), {n});
}

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

struct lora_state;  // a loaded LoRA adapter (lora.cpp)
struct context_state;
class engine;       // the sequence engine of a context (engine.h)
// What saved states record of a context's adapters: 0 for none, else a hash of each adapter's file
// content and its scale (independent of their order).
int64_t lora_fingerprint(const context_state & st);

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
    // the one owner of its sequences' requests: every way of generating submits to it (engine.h)
    std::shared_ptr<engine> eng;
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
    held_error signal;  // the exception a handler raised, if any
    ~context_state();
};

// Whether an RPC server holding part of the model went away (ggml's RPC client with lamina's patch
// marks it instead of aborting): sets model.lost. Cheap when no RPC server ever failed.
bool rpc_lost(model_state & model);
// The RPC endpoints among ggml devices (descriptions of devices whose backend is RPC).
std::vector<std::string> rpc_endpoints_of(const std::vector<ggml_backend_dev_t> & devs);
bool rpc_endpoint_lost(const std::string & endpoint);  // "host:port" lost in this process
// ConnectionError (GIL held) naming the first of devs that is a lost RPC server's, with `when`: it
// answers zeros, and llama.cpp must not plan or load with them (an alignment of 0 ends the process).
void refuse_lost_rpc(const std::vector<ggml_backend_dev_t> & devs, const std::string & when);
// Something changes what sequence `seq` (< 0: every sequence) holds: its epoch moves on, so the
// generation or Batcher request that owns it ends at its next step with stale_error naming `what`
// (a string literal). Returns the new epoch (of the last sequence changed). Under a lease.
uint64_t seq_changed(context_state & st, int32_t seq, const char * what);
// The one place backend samplers are attached and detached (under a lease). attach: a greedy chain
// on sequence seq for `owner` (another owner's chains are detached first); false where llama.cpp
// cannot sample in the graph (e.g. a tensor split). Either changes llama.cpp's output buffer at the
// next decode (max_outputs reset). detach: one sequence's chain, or every one (seq < 0).
bool backend_greedy_attach(context_state & st, int32_t seq, const void * owner);
void backend_sampler_detach(context_state & st, int32_t seq);
// Raise fork_error when an object made in generation `gen` is used in a forked child.
void check_fork(uint32_t gen, const char * what);

// A llama_batch of up to n tokens, one sequence id each, freed with its scope.
struct owned_batch : llama_batch {
    explicit owned_batch(int32_t n) : llama_batch(llama_batch_init(n, 0, 1)) {}
    ~owned_batch() { llama_batch_free(*this); }
    owned_batch(const owned_batch &) = delete;
    owned_batch & operator=(const owned_batch &) = delete;
};

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
// seq0: the batch had tokens of sequence 0 (else its cache and mirror are left alone).
[[noreturn]] void decode_failed(context_state & st, int rc, bool seq0 = true);
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
// Append n tokens to a sequence after what its cache holds, in n_batch chunks (context.cpp).
// logits: 0 none, 1 the last token, 2 every token (then n <= n_batch: the caller checks).
void decode_tokens(context_state & st, const llama_token * toks, size_t n, int logits = 1, int32_t seq = 0);
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
// tokenizer.chat_template from a GGUF file's metadata (a file validate_gguf accepted), if present.
std::optional<std::string> file_chat_template(const std::string & path);

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
