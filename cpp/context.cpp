// Context: a llama_context over a model; decode batches, expose logits without copying.
#include "lamina.h"
#include "engine.h"

#include <cmath>

#include "ggml.h"

#include <nanobind/stl/shared_ptr.h>

#include <algorithm>

#include <pthread.h>
#include <unistd.h>

namespace lamina {

namespace {
std::atomic<uint32_t> g_fork_generation{0};
void on_fork_child() {
    g_fork_generation.fetch_add(1, std::memory_order_relaxed);
    exit_state_after_fork();
    thread_tuner::after_fork();
}
}  // namespace

uint32_t fork_generation() { return g_fork_generation.load(std::memory_order_relaxed); }

void check_fork(uint32_t gen, const char * what) {
    if (gen != fork_generation()) {
        throw fork_error(std::string("this ") + what + " was created before fork() in the parent process; process " +
                         std::to_string(getpid()) + " is a child, where its worker threads and device state do not "
                         "exist: create the model and context in the child (with multiprocessing, load them inside "
                         "the worker, or use the 'spawn' or 'forkserver' start method)");
    }
}

context_state::~context_state() {
    if (fork_gen != fork_generation()) {
        // a forked child: freeing would join worker threads that only the parent has (a hang);
        // the memory goes with the process
        (void) ctx.release();
        for (auto & s : seq_samplers) (void) s.release();
        new std::shared_ptr<engine>(std::move(eng));  // its requests' drafts hold contexts too
        return;
    }
    eng.reset();  // requests first: a draft points at ctx
    ctx.reset();  // free the context before the model it points into, its adapters and the pools it runs on
    loras.clear();
    pool_free(pool);
    pool_free(pool_batch);
    for (ggml_threadpool * tp : retired_pools) pool_free(tp);
    model.reset();
}

context_lease::context_lease(std::shared_ptr<context_state> st, const void * owner) : st_(std::move(st)) {
    check_fork(st_->fork_gen, "context");
    if (st_->model->lost.load()) {
        const std::string why = st_->model->lost_why;
        st_.reset();
        throw closed_error(why);
    }
    bool expected = false;
    if (!st_->busy.compare_exchange_strong(expected, true, std::memory_order_acquire)) {
        st_.reset();
        throw busy_error("the context is in use by another thread (or by an operation still running in this "
                         "one): use one context per thread, e.g. model.context() in each thread");
    }
    ++t_leases;
    // backend samplers whose owner is gone (nullptr) or another client: detached
    const void * holder = st_->backend_owner.load();
    if (st_->n_backend_samplers > 0 && (holder == nullptr || holder != owner)) {
        backend_sampler_detach(*st_, -1);
    }
}

void begin_operation(context_state & st, uint64_t op) {
    if (op == 0 || st.op_id != op) {
        st.abort = false;
        st.op_id = op;
    }
}

uint64_t new_operation_id() {
    static std::atomic<uint64_t> next{1};
    return next.fetch_add(1);
}

context_lease::~context_lease() {
    if (!st_) return;
    st_->busy.store(false, std::memory_order_release);
    --t_leases;
    // llama.cpp's lines from this operation (a GIL-holding call logs too), once the context is free
    if (g_log_queued.load(std::memory_order_relaxed) > 0 && t_leases <= 0 && gil_held()) log_deliver();
}

bool backend_greedy_attach(context_state & st, int32_t seq, const void * owner) {
    const void * holder = st.backend_owner.load();
    if (st.n_backend_samplers > 0 && (holder == nullptr || holder != owner)) backend_sampler_detach(st, -1);
    llama_sampler_ptr & slot = st.seq_samplers.at(size_t(seq));
    if (slot) return true;
    llama_sampler_ptr chain(llama_sampler_chain_init(llama_sampler_chain_default_params()));
    llama_sampler_chain_add(chain.get(), llama_sampler_init_greedy());
    if (!llama_set_sampler(st.ctx.get(), seq, chain.get())) return false;
    slot = std::move(chain);
    ++st.n_backend_samplers;
    st.backend_owner.store(owner);
    st.max_outputs = 0;  // llama.cpp resizes its output buffer at the next decode
    return true;
}

void backend_sampler_detach(context_state & st, int32_t seq) {
    for (size_t i = seq < 0 ? 0 : size_t(seq); i < st.seq_samplers.size() && (seq < 0 || i == size_t(seq)); ++i) {
        if (!st.seq_samplers[i]) continue;
        llama_set_sampler(st.ctx.get(), llama_seq_id(i), nullptr);
        st.seq_samplers[i].reset();
        --st.n_backend_samplers;
        st.max_outputs = 0;  // llama.cpp resizes its output buffer at the next decode: no live views then
    }
    if (st.n_backend_samplers == 0) st.backend_owner.store(nullptr);
}

namespace {

using tokens_in = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Called by ggml between graph nodes on the decoding thread (which released the GIL). Besides
// the caller's abort flag, it looks for a signal every 20 ms (a read() on lamina's wakeup pipe,
// see signals.cpp) and only then takes the GIL to run Python's handlers, so Ctrl-C stops a long
// CPU decode within one node instead of after the whole batch.
std::atomic<uint64_t> g_abort_gil_takes{0};  // times abort_requested took the GIL (a signal had arrived)

bool abort_requested(void * data) {
    auto * st = static_cast<context_state *>(data);
    if (st->abort.load(std::memory_order_relaxed)) {
        return true;
    }
    if (g_exiting.load(std::memory_order_relaxed) && !on_main_thread()) {
        return true;  // the interpreter exits: a daemon thread's decode stops (its thread then parks)
    }
    if (!st->signals_here) {
        return false;  // no watch: not Python's main thread, or a one-token decode
    }
    if ((++st->abort_calls & 31) != 0) {  // the clock only every 32 graph nodes
        return false;
    }
    int64_t now = ggml_time_us();
    if (now - st->last_signal_check_us < 20000) {
        return false;
    }
    st->last_signal_check_us = now;
    if (!signal_arrived() || !Py_IsInitialized()) {
        return false;  // the common case: no GIL
    }
    g_abort_gil_takes.fetch_add(1, std::memory_order_relaxed);
    gil_acquire gil;
    bool raised = PyErr_CheckSignals() != 0;
    if (raised) st->signal.take();
    return raised;
}

}  // namespace

std::string decode_message(int rc, const context_state & st) {
    switch (rc) {
        case 1: return "no KV cache slot for the batch (the context is full: n_ctx=" +
                       std::to_string(llama_n_ctx(st.ctx.get())) + ")";
        case 2: return "decode aborted";
        case decode_rc_rpc_lost: return st.model->lost_why;
        case -1: return "invalid input batch";
        default: {
            std::string why = last_log_error();
            return "llama_decode failed with status " + std::to_string(rc) + (why.empty() ? "" : ": " + why);
        }
    }
}


uint64_t seq_changed(context_state & st, int32_t seq, const char * what) {
    const size_t n = st.seq_epochs.size();
    for (size_t i = seq < 0 ? 0 : size_t(seq); i < (seq < 0 ? n : std::min(n, size_t(seq) + 1)); ++i) {
        st.seq_epochs[i] = ++st.epoch_counter;
        st.seq_changers[i] = what;
    }
    return st.epoch_counter;
}

void decode_failed(context_state & st, int rc, bool seq0) {
    // llama.cpp keeps the ubatches that finished before the failure: drop them from sequence 0 so
    // the cache holds exactly the token list again (a cache that cannot cut them is cleared)
    llama_memory_t mem = llama_get_memory(st.ctx.get());
    llama_pos pmax = llama_memory_seq_pos_max(mem, 0);
    const size_t held = size_t(int64_t(pmax) + 1);
    if (seq0) st.tokens.resize(std::min(st.tokens.size(), held));
    if (seq0 && held > st.tokens.size() && !llama_memory_seq_rm(mem, 0, llama_pos(st.tokens.size()), -1)) {
        llama_memory_seq_rm(mem, 0, -1, -1);
        st.tokens.clear();
    }
    st.last_outputs = 0;
    st.abort = false;
    if (st.signal) st.signal.raise();  // a signal handler raised (KeyboardInterrupt): re-raise it
    throw decode_error(rc, decode_message(rc, st));
}

int decode_checked(context_state & st, const llama_batch & batch, bool sync) {
    // llama.cpp asserts these (an abort, not an error code): check them first
    const int32_t n_batch = int32_t(llama_n_batch(st.ctx.get())), n_ubatch = int32_t(llama_n_ubatch(st.ctx.get()));
    if (batch.n_tokens > n_batch) {
        throw std::invalid_argument("a batch of " + std::to_string(batch.n_tokens) + " tokens exceeds n_batch=" +
                                    std::to_string(n_batch));
    }
    if (!llama_get_causal_attn(st.ctx.get()) && batch.n_tokens > n_ubatch) {
        throw std::invalid_argument("this model's attention is non-causal, so all " + std::to_string(batch.n_tokens) +
                                    " tokens of a text must fit one ubatch: raise n_ubatch (and n_batch) to at least " +
                                    std::to_string(batch.n_tokens) + " (now " + std::to_string(n_ubatch) + ")");
    }
    // positions are int32: llama.cpp numbers a batch without positions from the sequence's last
    // one, and past 2^31-1 that overflows inside it (a state or kv.seq_add can put a cell there)
    const int64_t last = batch.pos ? int64_t(batch.pos[std::max(batch.n_tokens - 1, 0)])
                                   : int64_t(llama_memory_seq_pos_max(llama_get_memory(st.ctx.get()), 0)) + batch.n_tokens;
    if (batch.n_tokens > 0 && last >= int64_t(INT32_MAX)) {
        throw std::invalid_argument("this decode would place tokens at position " + std::to_string(last) +
                                    ", past llama.cpp's int32 positions: clear the cache or shift it back first");
    }
    int rc;
    llama_work work;  // to the end: the synchronize below too
    {
        std::shared_lock<std::shared_mutex> adapters(lora_registry());  // a reserve reads the model's adapters
        rc = llama_decode(st.ctx.get(), batch);
    }
    if (rc == 0) {
        // GPU backends return before the graph has run: a decode returns when the evaluation is done,
        // so Python timings mean what they say and backend errors surface here
        if (sync) llama_synchronize(st.ctx.get());
        threadpools_release_retired(st);
    }
    // a server holding part of the model went away: what came back from it was zeros. The RPC
    // client queues its commands: wait for them first, or a lost server shows only after sampling
    if (!st.model->rpc_endpoints.empty()) {
        if (!sync) llama_synchronize(st.ctx.get());
        if (rpc_lost(*st.model)) return decode_rc_rpc_lost;
    }
    return rc;
}

int decode_watched(context_state & st, const llama_batch & batch, bool sync) {
    int rc;
    signal_watch watch(batch.n_tokens > 1 && on_main_thread());  // ends with the GIL held, below
    st.signals_here = watch.active();
    {
        gil_release nogil;
        caller_pin pin(batch.n_tokens > 1 ? st.pin_batch : st.pin_gen);
        rc = decode_checked(st, batch, sync);
    }
    st.signals_here = false;
    return rc;
}

void decode_batch(context_state & st, const llama_batch & batch, int32_t n_outputs) {
    if (st.live_views.load() > 0 && n_outputs > st.max_outputs) {
        // llama.cpp would grow (reallocate) its output buffer under the live numpy views.
        throw lamina_error("this decode asks for " + std::to_string(n_outputs) +
                           " logits rows, more than any decode before, while numpy views of ctx.logits "
                           "are alive; delete them (or copy with np.array(ctx.logits)) first");
    }
    const int rc = decode_watched(st, batch, true);
    if (rc != 0) {
        bool seq0 = batch.seq_id == nullptr;  // llama_batch_get_one: sequence 0
        for (int32_t i = 0; !seq0 && i < batch.n_tokens; ++i) seq0 = batch.seq_id[i][0] == 0;
        decode_failed(st, rc, seq0);
    }
    st.max_outputs = std::max(st.max_outputs, n_outputs);
    st.last_outputs = n_outputs;
}

// An embeddings context outputs every token (llama.cpp does anyway: the batch says so). Sequence 0
// keeps its token mirror; Ctrl-C is checked between chunks.
void decode_tokens(context_state & st, const llama_token * toks, size_t n, int logits, int32_t seq) {
    const size_t n_batch = llama_n_batch(st.ctx.get());
    llama_memory_t mem = llama_get_memory(st.ctx.get());
    owned_batch b(int32_t(std::min(n, n_batch)));
    for (size_t done = 0; done < n;) {
        const size_t k = std::min(n_batch, n - done);
        // positions follow the cache (-1: empty; without a cache, such as an encoder's, each chunk from 0)
        const llama_pos pos = llama_memory_seq_pos_max(mem, seq) + 1;
        int32_t outs = 0;
        b.n_tokens = 0;
        for (size_t j = 0; j < k; ++j) {
            const bool out = st.embeddings || logits == 2 || (logits == 1 && done + j + 1 == n);
            batch_add(b, toks[done + j], pos + llama_pos(j), seq, out);
            outs += out;
        }
        decode_batch(st, b, outs);
        done += k;
        if (seq == 0) {
            st.tokens.insert(st.tokens.end(), toks + done - k, toks + done);
            // the cache is the truth: a mirror that disagrees keeps only the positions (-1 ids never
            // match a prompt, so prefix reuse starts over but positions stay right)
            const llama_pos pmax = llama_memory_seq_pos_max(mem, 0);
            if (size_t(int64_t(pmax) + 1) != st.tokens.size()) mirror_unknown(st, pmax);
        }
        if (done < n) check_signals();  // Ctrl-C between chunks of a long prompt
    }
}

void mirror_unknown(context_state & st, llama_pos pmax) {
    const size_t n = size_t(std::max<int64_t>(int64_t(pmax) + 1, 0));
    if (n <= size_t(llama_n_ctx_seq(st.ctx.get()))) {
        st.tokens.assign(n, llama_token(-1));
    } else {
        st.tokens.clear();
    }
}

void check_prompt_fits(const context_state & st, size_t n) {
    if (n == 0) {
        throw std::invalid_argument("the prompt has no tokens");
    }
    const size_t n_ctx = llama_n_ctx_seq(st.ctx.get());
    if (n >= n_ctx) {
        throw std::invalid_argument("the prompt has " + std::to_string(n) + " tokens, the context holds " +
                                    std::to_string(n_ctx) + " (n_ctx) and generation needs at least one more: "
                                    "shorten the prompt or raise n_ctx");
    }
}

size_t eval_prompt(context_state & st, const std::vector<llama_token> & prompt) {
    check_prompt_fits(st, prompt.size());
    size_t common = 0;
    while (common < st.tokens.size() && common < prompt.size() && st.tokens[common] == prompt[common]) {
        ++common;
    }
    if (common == prompt.size()) {
        --common;  // re-evaluate the last token to get its logits
    }
    llama_memory_t mem = llama_get_memory(st.ctx.get());
    // the cache may hold more than the mirror knows (a mirror dropped for far-shifted positions)
    if (common < st.tokens.size() || llama_pos(common) <= llama_memory_seq_pos_max(mem, 0)) {
        bool ok = llama_memory_seq_rm(mem, 0, llama_pos(common), -1);
        // a sliding-window cache may have dropped what the kept prefix still needs
        int32_t n_swa = llama_model_n_swa(st.model->model.get());
        llama_pos pmin = llama_memory_seq_pos_min(mem, 0);
        if (ok && common > 0 && n_swa > 0 && pmin > std::max<llama_pos>(0, llama_pos(common) - n_swa)) {
            ok = false;
        }
        if (!ok) {
            llama_memory_clear(mem, true);
            common = 0;
        }
        st.tokens.resize(common);
    }
    decode_tokens(st, prompt.data() + common, prompt.size() - common);
    return prompt.size() - common;
}

llama_context_params build_context_params(const context_params & a) {
    llama_context_params p = llama_context_default_params();
    p.n_ctx = a.n_ctx;
    p.n_batch = a.n_batch;
    p.n_ubatch = a.n_ubatch;
    p.n_seq_max = a.n_seq_max;
    p.offload_kqv = a.offload_kqv;
    p.op_offload = a.op_offload;
    p.embeddings = a.embeddings;
    p.swa_full = a.swa_full;
    p.kv_unified = a.kv_unified;
    p.rope_freq_base = a.rope_freq_base;
    p.rope_freq_scale = a.rope_freq_scale;
    const int flash_attn = a.flash_attn, type_k = a.type_k, type_v = a.type_v, pooling_type = a.pooling_type,
              rope_scaling = a.rope_scaling_type;
    if (p.n_batch < 1 || p.n_ubatch < 1) throw std::invalid_argument("n_batch and n_ubatch must be >= 1");
    p.n_ubatch = std::min(p.n_ubatch, p.n_batch);
    if (p.n_seq_max < 1 || p.n_seq_max > llama_max_parallel_sequences()) {
        throw std::invalid_argument("n_seq_max must be in [1, " + std::to_string(llama_max_parallel_sequences()) + "]");
    }
    // llama.cpp reserves an output row per sequence within n_batch rows (GGML_ASSERT in output_reserve)
    if (p.n_seq_max > p.n_batch || (p.n_ctx > 0 && p.n_seq_max > p.n_ctx)) {
        throw std::invalid_argument("n_seq_max=" + std::to_string(p.n_seq_max) + " needs n_batch (and n_ctx) of at "
                                    "least as many tokens, got n_batch=" + std::to_string(p.n_batch) +
                                    ", n_ctx=" + std::to_string(p.n_ctx));
    }
    if (flash_attn < -1 || flash_attn > 1) throw std::invalid_argument("flash_attn must be -1 (auto), 0 or 1");
    if (pooling_type < -1 || pooling_type > 4) {
        throw std::invalid_argument("pooling_type must be -1 (model), 0 none, 1 mean, 2 cls, 3 last or 4 rank");
    }
    for (int t : {type_k, type_v}) {
        if (t < 0 || t >= GGML_TYPE_COUNT || ggml_type_size(ggml_type(t)) == 0) {
            throw std::invalid_argument("invalid KV cache type id " + std::to_string(t));
        }
    }
    p.flash_attn_type = static_cast<llama_flash_attn_type>(flash_attn);
    p.type_k = ggml_type(type_k);
    p.type_v = ggml_type(type_v);
    p.pooling_type = static_cast<enum llama_pooling_type>(pooling_type);
    if (rope_scaling < -1 || rope_scaling > LLAMA_ROPE_SCALING_TYPE_MAX_VALUE) {
        throw std::invalid_argument("rope_scaling_type must be -1 (the model's) or 0..3");
    }
    if (!std::isfinite(p.rope_freq_base) || p.rope_freq_base < 0.0f ||
        !std::isfinite(p.rope_freq_scale) || p.rope_freq_scale < 0.0f) {
        throw std::invalid_argument("rope_freq_base and rope_freq_scale must be finite and >= 0 (0: the model's)");
    }
    p.rope_scaling_type = static_cast<llama_rope_scaling_type>(rope_scaling);
    return p;
}

namespace {

threadpool_config pool_config(const pool_params & a) {
    threadpool_config c;
    c.n_threads = a.n_threads;
    c.cpus = a.cpus;
    c.strict = a.strict;
    c.prio = a.priority;
    c.poll = a.poll;
    if (c.n_threads < 1 || c.n_threads > GGML_MAX_N_THREADS) {
        throw std::invalid_argument("thread counts must be in [1, " + std::to_string(GGML_MAX_N_THREADS) + "]");
    }
    if (c.prio < -1 || c.prio > 3) throw std::invalid_argument("priority must be -1 (low) .. 3 (realtime)");
    return c;
}

class context_handle {
public:
    context_handle(nb::handle model, const context_params & args, const pool_params & gen_pool,
                   const pool_params & batch_pool) {
        auto ms = model_shared(model);
        check_fork(ms->fork_gen, "model");
        if (ms->vocab_only) throw std::invalid_argument("a vocabulary-only model (a tokenizer) has no weights to run");
        if (!ms->rpc_endpoints.empty() && rpc_lost(*ms)) throw closed_error(ms->lost_why);
        threadpool_config gen = pool_config(gen_pool), batch = pool_config(batch_pool);
        llama_context_params p = build_context_params(args);
        p.n_threads = gen.n_threads;
        p.n_threads_batch = batch.n_threads;
        const uint32_t n_ctx = p.n_ctx;
        const bool embeddings = p.embeddings;
        const bool kv_unified = p.kv_unified;
        const int type_k = int(p.type_k), type_v = int(p.type_v);

        auto st = std::make_shared<context_state>();
        st->model = ms;
        p.abort_callback = abort_requested;
        p.abort_callback_data = st.get();
        clear_last_log_error();
        llama_context * raw;
        {
            gil_release nogil;
            llama_work work;
            std::shared_lock<std::shared_mutex> adapters(lora_registry());  // it reads the model's adapters
            raw = llama_init_from_model(ms->model.get(), p);
        }
        if (raw == nullptr && !ms->rpc_endpoints.empty() && rpc_lost(*ms)) throw closed_error(ms->lost_why);
        if (raw == nullptr) raise_failed("failed to create the context (n_ctx=" + std::to_string(n_ctx) + ")", failure::other);
        st->ctx.reset(raw);
        st->embeddings = embeddings;
        st->kv_unified = kv_unified;
        st->type_k = type_k;
        st->type_v = type_v;
        st->max_outputs = int32_t(llama_n_seq_max(raw));
        st->seq_epochs.assign(llama_n_seq_max(raw), 0);
        st->seq_changers.assign(llama_n_seq_max(raw), "");
        st->seq_samplers.resize(llama_n_seq_max(raw));
        st->eng = std::make_shared<engine>(int32_t(llama_n_seq_max(raw)));
        threadpools_attach(*st, gen, batch);
        st->eng->tuner.reset(gen_pool.adapt ? gen.n_threads : 0, batch_pool.adapt ? batch.n_threads : -1);
        st_ = std::move(st);
    }

    context_state & st() const {
        if (!st_) throw closed_error("the context is closed");
        return *st_;
    }
    std::shared_ptr<context_state> shared() const { st(); return st_; }
    context_lease lease() const { return context_lease(shared()); }
    void close() { st_.reset(); }
    bool closed() const { return !st_; }

    // Append tokens to a sequence. logits: 0 none, 1 last token, 2 every token.
    void decode(tokens_in tokens, int logits, int32_t seq) {
        context_lease l = lease();
        context_state & s = *l;
        begin_operation(s);
        const int32_t * t = tokens.data();
        size_t n = tokens.shape(0);
        if (n == 0) throw std::invalid_argument("no tokens to decode");
        if (logits < 0 || logits > 2) throw std::invalid_argument("logits must be 0 (none), 1 (last) or 2 (all)");
        check_tokens(*s.model, t, n);
        const int32_t n_seq = int32_t(llama_n_seq_max(s.ctx.get()));
        if (seq < 0 || seq >= n_seq) {
            throw std::out_of_range("sequence id " + std::to_string(seq) + " out of range [0, " +
                                    std::to_string(n_seq) + "): raise n_seq_max");
        }
        // sequence 0 follows its token mirror, the others their cells (prefix reuse is sequence 0's)
        const int64_t pos = seq == 0 ? int64_t(s.tokens.size())
                                     : int64_t(llama_memory_seq_pos_max(llama_get_memory(s.ctx.get()), seq)) + 1;
        if (uint64_t(pos) + n > llama_n_ctx_seq(s.ctx.get())) {
            throw std::invalid_argument("decoding " + std::to_string(n) + " tokens after position " + std::to_string(pos) +
                                        " exceeds the context of sequence " + std::to_string(seq) +
                                        " (n_ctx=" + std::to_string(llama_n_ctx_seq(s.ctx.get())) + ")");
        }
        if (logits == 2 && n > llama_n_batch(s.ctx.get())) {
            throw std::invalid_argument("logits for every token need all " + std::to_string(n) +
                                        " tokens in one batch; n_batch is " + std::to_string(llama_n_batch(s.ctx.get())));
        }
        seq_changed(s, seq, "ctx.decode()");  // checked: the cache changes now
        decode_tokens(s, t, n, logits, seq);
    }

    // Zero-copy view of the latest decode's logits, shape (outputs, n_vocab). The view keeps the
    // native context alive; its values change with the next decode.
    nb::ndarray<nb::numpy, const float, nb::ndim<2>> logits() {
        context_lease l = lease();
        context_state & s = *l;
        if (s.last_outputs == 0) {
            throw lamina_error("no logits: the last decode produced none (decode with logits first)");
        }
        float * data = llama_get_logits(s.ctx.get());
        if (data == nullptr) throw lamina_error("llama.cpp returned no logits");
        auto * keep = new std::shared_ptr<context_state>(st_);
        s.live_views.fetch_add(1);
        nb::capsule owner(keep, [](void * p) noexcept {
            auto * sp = static_cast<std::shared_ptr<context_state> *>(p);
            (*sp)->live_views.fetch_sub(1);
            delete sp;
        });
        return nb::ndarray<nb::numpy, const float, nb::ndim<2>>(
            data, {size_t(s.last_outputs), size_t(s.model->n_vocab)}, owner);
    }

    // The pooled embedding of a sequence (a copy: n_embd floats; with rank pooling the rank head's
    // n_cls_out scores). Without pooling (a generative model's default), the last token's hidden state.
    nb::ndarray<nb::numpy, float, nb::ndim<1>> embedding(int32_t seq) {
        context_lease l = lease();
        context_state & s = *l;
        if (!s.embeddings) throw lamina_error("this context was created without embeddings=True");
        if (s.last_outputs == 0) throw lamina_error("no embeddings: decode first");
        const int32_t n_seq = int32_t(llama_n_seq_max(s.ctx.get()));
        if (seq < 0 || seq >= n_seq) {
            throw std::out_of_range("sequence id " + std::to_string(seq) + " out of range [0, " + std::to_string(n_seq) + ")");
        }
        const float * e = llama_get_embeddings_seq(s.ctx.get(), seq);
        if (e == nullptr && llama_pooling_type(s.ctx.get()) == LLAMA_POOLING_TYPE_NONE) {
            e = llama_get_embeddings_ith(s.ctx.get(), -1);
        }
        if (e == nullptr) throw lamina_error("llama.cpp returned no embedding for sequence " + std::to_string(seq));
        // rank pooling (a reranker) gives its classifier's outputs: n_cls_out floats, not n_embd
        const size_t n = llama_pooling_type(s.ctx.get()) == LLAMA_POOLING_TYPE_RANK
                             ? size_t(llama_model_n_cls_out(s.model->model.get()))
                             : size_t(llama_model_n_embd_out(s.model->model.get()));
        return to_numpy(std::vector<float>(e, e + n));
    }

    void kv_clear() {
        context_lease l = lease();
        context_state & s = *l;
        llama_memory_clear(llama_get_memory(s.ctx.get()), true);
        s.tokens.clear();
        s.last_outputs = 0;
        seq_changed(s, -1, "kv.clear()");
    }

    nb::ndarray<nb::numpy, int32_t, nb::ndim<1>> tokens() const {
        context_lease l = lease();
        const context_state & s = *l;
        return to_numpy(std::vector<int32_t>(s.tokens.begin(), s.tokens.end()));
    }

    nb::dict params() const {
        context_lease l = lease();
        llama_context * c = l->ctx.get();
        nb::dict d;
        d["n_ctx"] = llama_n_ctx(c);
        d["n_ctx_seq"] = llama_n_ctx_seq(c);
        d["n_batch"] = llama_n_batch(c);
        d["n_ubatch"] = llama_n_ubatch(c);
        d["n_seq_max"] = llama_n_seq_max(c);
        d["n_threads"] = llama_n_threads(c);
        d["n_threads_batch"] = llama_n_threads_batch(c);
        return d;
    }

    void set_threads(const pool_params & gen_pool, const pool_params & batch_pool) {
        threadpool_config gen = pool_config(gen_pool), batch = pool_config(batch_pool);
        context_lease l = lease();  // a running decode elsewhere: BusyError, never a pool swapped under it
        context_state & s = *l;
        threadpools_attach(s, gen, batch);
        llama_set_n_threads(s.ctx.get(), gen.n_threads, batch.n_threads);
        s.eng->tuner.reset(gen_pool.adapt ? gen.n_threads : 0, batch_pool.adapt ? batch.n_threads : -1);
    }

    // (generation, batch threads now, why): lamina's default counts adapt to busy CPUs (tuner.h)
    std::tuple<int, int, std::string> threads_now() {
        context_lease l = lease();
        const thread_tuner & t = l->eng->tuner;
        llama_context * lc = l->ctx.get();
        return {t.on() ? t.chosen() : int(llama_n_threads(lc)), t.batch(int(llama_n_threads_batch(lc))), t.why()};
    }

    // Safe from any thread: the running decode stops at its next graph node with DecodeError.
    void abort() { st().abort = true; }

private:
    std::shared_ptr<context_state> st_;
};

}  // namespace

std::shared_ptr<context_state> context_shared(nb::handle ctx) {
    return nb::cast<context_handle &>(ctx).shared();
}

void init_context(nb::module_ & m) {
    m.def("abort_gil_takes", [] { return g_abort_gil_takes.load(); },
          "How many times a decode's abort callback has taken the GIL in this process: only when a signal "
          "arrived (tests check that graph compute never waits for the GIL otherwise).");
    {
        using Params = context_params;
        nb::class_<context_params>(m, "ContextParams",
                                   "A context's settings; each field's default is the one lamina.Context uses.")
            .def(nb::init<>())
            LAMINA_RW(n_ctx) LAMINA_RW(n_batch) LAMINA_RW(n_ubatch) LAMINA_RW(n_seq_max) LAMINA_RW(flash_attn)
            LAMINA_RW(type_k) LAMINA_RW(type_v) LAMINA_RW(offload_kqv) LAMINA_RW(op_offload) LAMINA_RW(embeddings)
            LAMINA_RW(swa_full) LAMINA_RW(kv_unified) LAMINA_RW(pooling_type) LAMINA_RW(rope_scaling_type)
            LAMINA_RW(rope_freq_base) LAMINA_RW(rope_freq_scale);
    }
    {
        using Params = pool_params;
        nb::class_<pool_params>(m, "PoolParams", "One threadpool: threads, CPUs, strict placement, priority, polling.")
            .def(nb::init<>())
            LAMINA_RW(n_threads) LAMINA_RW(cpus) LAMINA_RW(strict) LAMINA_RW(priority) LAMINA_RW(poll) LAMINA_RW(adapt);
    }
    static bool atfork_registered = false;
    if (!atfork_registered) {
        pthread_atfork(nullptr, nullptr, on_fork_child);
        atfork_registered = true;
    }
    m.def("ggml_type_from_name", [](const std::string & name) {
        for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
            if (ggml_type_size(ggml_type(t)) == 0) continue;
            const char * n = ggml_type_name(ggml_type(t));
            if (n != nullptr && name == n) return t;
        }
        throw std::invalid_argument("unknown ggml type '" + name + "'");
    }, nb::arg("name"), "ggml type id for a name such as 'f16' or 'q8_0'.");

    nb::class_<context_handle>(m, "Context", "A llama.cpp context (owns llama_context, keeps its model alive).")
        .def(nb::init<nb::handle, const context_params &, const pool_params &, const pool_params &>(),
             nb::arg("model"), nb::arg("settings"), nb::arg("gen_pool"), nb::arg("batch_pool"),
             "Create the context with the GIL released. Raises OutOfMemoryError or LaminaError with llama.cpp's reason.")
        .def("close", &context_handle::close, "Release this handle (live logits views keep the memory alive).")
        .def_prop_ro("closed", &context_handle::closed)
        .def("decode", &context_handle::decode, nb::arg("tokens"), nb::arg("logits") = 1, nb::arg("seq") = 0,
             R"(Append tokens to sequence 0 and run the model (GIL released, Ctrl-C checked between batches).

Args:
    tokens: int32 token ids, validated against the vocabulary and the free context.
    logits: 0 none, 1 the last token's, 2 every token's (needs len(tokens) <= n_batch).)")
        .def_prop_ro("logits", &context_handle::logits, nb::rv_policy::automatic, "View (outputs, n_vocab) of the latest logits, no copy.")
        .def("embedding", &context_handle::embedding, nb::arg("seq") = 0,
             "Pooled embedding of a sequence (last token's without pooling); needs embeddings=True.")
        .def("kv_clear", &context_handle::kv_clear, "Empty the KV cache.")
        .def_prop_ro("tokens", &context_handle::tokens, nb::rv_policy::automatic, "Tokens of sequence 0 held in the KV cache (a copy).")
        .def_prop_ro("n_past", [](const context_handle & c) { return c.lease()->tokens.size(); })
        .def("params", &context_handle::params, "Effective sizes and thread counts.")
        .def("set_threads", &context_handle::set_threads, nb::arg("gen"), nb::arg("batch"))
        .def("threads_now", &context_handle::threads_now)
        .def("abort", &context_handle::abort, "Ask a running decode (in another thread) to stop.");
}

}  // namespace lamina
