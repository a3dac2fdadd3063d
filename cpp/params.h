// Parameter structs: thread pools and pinning, a model's placement, a context's settings. Each
// field has its one default here (Python takes its defaults from these through the bindings).
#pragma once

#include "llama.h"
#include "ggml.h"
#include "ggml-cpu.h"

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lamina {

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
    bool adapt = false;  // lamina's default count: the engine's thread_tuner may run fewer (tuner.h)
};
llama_context_params build_context_params(const context_params & a);
// Collect llama.cpp's "layer N assigned to device X" lines logged by this thread (null: stop).
void capture_layer_devices(std::vector<std::pair<int, std::string>> * out);

}  // namespace lamina
