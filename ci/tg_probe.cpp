// Where does a generated token's time go beyond llama-bench's tg loop? A native probe, built on the
// device machine against the lamina package's libllama (ci/gpu_run.sh stage "probe").
//
// Each variant decodes n_gen single tokens after a cleared cache, as llama-bench's tg test does;
// repetitions of the variants are interleaved so drift hits all of them alike.
//   bench     llama_decode + llama_synchronize, next token random (llama-bench's loop)
//   logits    + llama_get_logits_ith (no read of the logits)
//   argmax    + lamina's argmax over the logits (what ctx.generate does for greedy)
//   argmax-avx2 + the AVX2 argmax
//   argmax-mt + the argmax split over helper threads that spin between tokens
//   backend   greedy sampler in the graph (llama_set_sampler), only the token id comes back
// usage: tg_probe MODEL [n_gen 128] [reps 10] [helper threads 3] [threads: all CPUs]
//
// H100 host, 1B Llama shape, 128k vocab (2026-11-26): bench 891-894 t/s; reading the logits costs
// nothing (0.996-1.000); the argmax 16-21 us per token (6 us on cached logits), 0.970-0.977 of
// bench; AVX2 and a software prefetch 4 KiB ahead (T0 or NTA; measured once, since removed) change
// nothing (memory-bound); 3 spinning helpers take it to 7 us
// (0.982-0.990), but inside lamina's loop, next to ggml's polling pool, helpers that sleep until
// the logits are due gained nothing measurable (0.996 vs 0.994 paired at 4 threads) and cost
// 3-5% at 16 threads, so lamina does not use them; backend sampling 0.968-0.973.
#include "llama.h"

#include "../cpp/argmax.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

using clk = std::chrono::steady_clock;

double us_since(clk::time_point t0) {
    return std::chrono::duration<double, std::micro>(clk::now() - t0).count();
}

// argmax over n floats split in k+1 chunks: the caller takes chunk 0, k helpers spin on a counter.
class split_argmax {
public:
    explicit split_argmax(int k) : res_(size_t(k) + 1) {
        for (int i = 0; i < k; ++i) workers_.emplace_back([this, i] { run(i + 1); });
    }
    ~split_argmax() {
        stop_ = true;
        gen_.fetch_add(1);
        for (auto & w : workers_) w.join();
    }
    int32_t operator()(const float * x, int32_t n) {
        x_ = x;
        n_ = n;
        pending_.store(int(workers_.size()));
        gen_.fetch_add(1, std::memory_order_release);
        res_[0] = part(0);
        while (pending_.load(std::memory_order_acquire) != 0) {}
        int32_t best = res_[0];
        for (size_t i = 1; i < res_.size(); ++i) {
            if (x_[res_[i]] > x_[best]) best = res_[i];  // later chunks win only when strictly larger
        }
        return best;
    }

private:
    int32_t part(int i) const {
        const int32_t parts = int32_t(res_.size());
        const int32_t chunk = (n_ / parts + 63) / 64 * 64;
        const int32_t lo = std::min(n_, chunk * i), hi = i + 1 == parts ? n_ : std::min(n_, chunk * (i + 1));
        return hi > lo ? lo + lamina::argmax(x_ + lo, hi - lo) : 0;
    }
    void run(int i) {
        unsigned seen = gen_.load();
        while (true) {
            unsigned g;
            while ((g = gen_.load(std::memory_order_acquire)) == seen) {}
            seen = g;
            if (stop_) return;
            res_[size_t(i)] = part(i);
            pending_.fetch_sub(1, std::memory_order_release);
        }
    }
    std::vector<std::thread> workers_;
    std::vector<int32_t> res_;
    std::atomic<unsigned> gen_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stop_{false};
    const float * x_ = nullptr;
    int32_t n_ = 0;
};

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL [n_gen] [reps] [helpers] [threads]\n", argv[0]);
        return 2;
    }
    const int n_gen = argc > 2 ? std::atoi(argv[2]) : 128;
    const int reps = argc > 3 ? std::atoi(argv[3]) : 10;
    const int helpers = argc > 4 ? std::atoi(argv[4]) : 3;
    const int threads = argc > 5 ? std::atoi(argv[5]) : int(std::thread::hardware_concurrency());
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 999;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { std::fprintf(stderr, "load failed\n"); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = uint32_t(n_gen);
    cp.n_batch = 2048;
    cp.n_ubatch = 512;
    cp.no_perf = false;
    cp.n_threads = cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    llama_context * ctx_bs = llama_init_from_model(model, cp);  // carries the backend sampler
    llama_sampler * greedy = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(greedy, llama_sampler_init_greedy());
    const bool bs_ok = llama_set_sampler(ctx_bs, 0, greedy);
    split_argmax mt(helpers);

    const std::vector<std::string> names = {"bench", "logits", "argmax", "argmax-avx2", "argmax-mt", "backend"};
    std::vector<std::vector<double>> tps(names.size());
    std::vector<double> argmax_us(names.size(), 0.0);
    std::vector<long> argmax_n(names.size(), 0);
    std::srand(1);
    for (int r = 0; r <= reps; ++r) {  // repetition 0 warms up
        for (size_t v = 0; v < names.size(); ++v) {
            if (names[v] == "backend" && !bs_ok) continue;
            llama_context * c = names[v] == "backend" ? ctx_bs : ctx;
            llama_memory_clear(llama_get_memory(c), true);
            llama_token tok = llama_vocab_get_add_bos(vocab) ? llama_vocab_bos(vocab) : std::rand() % n_vocab;
            double in_argmax = 0;
            const auto t0 = clk::now();
            for (int i = 0; i < n_gen; ++i) {
                if (llama_decode(c, llama_batch_get_one(&tok, 1)) != 0) { std::fprintf(stderr, "decode failed\n"); return 1; }
                if (v == 0) {
                    llama_synchronize(c);
                    tok = std::rand() % n_vocab;
                } else if (v == 1) {
                    (void) llama_get_logits_ith(c, -1);
                    tok = std::rand() % n_vocab;
                } else if (v == 2 || v == 3 || v == 4) {
                    const float * lg = llama_get_logits_ith(c, -1);
                    const auto a0 = clk::now();
                    tok = v == 2 ? lamina::argmax(lg, n_vocab) : v == 3 ? lamina::argmax_avx2(lg, n_vocab) : mt(lg, n_vocab);
                    in_argmax += us_since(a0);
                } else {
                    tok = llama_get_sampled_token_ith(c, -1);
                }
            }
            const double dt = us_since(t0);
            if (r > 0) {
                tps[v].push_back(n_gen / dt * 1e6);
                argmax_us[v] += in_argmax;
                argmax_n[v] += n_gen;
            }
        }
    }
    // warm-cache argmax on the last logits, for comparison with the timings above
    const float * lg = llama_get_logits_ith(ctx, -1);
    const auto w0 = clk::now();
    int32_t sink = 0;
    for (int i = 0; i < 200; ++i) {
        asm volatile("" : : "r"(lg) : "memory");  // one real argmax per iteration
        sink += lamina::argmax(lg, n_vocab);
    }
    const double warm = us_since(w0) / 200;

    std::printf("n_vocab %d, n_gen %d, reps %d, helpers %d, backend sampler %s\n", n_vocab, n_gen, reps, helpers,
                bs_ok ? "on" : "refused");
    std::printf("| variant | t/s (median) | vs bench | us/token | argmax us/token |\n|---|---|---|---|---|\n");
    double base = 0;
    for (size_t v = 0; v < names.size(); ++v) {
        if (tps[v].empty()) continue;
        std::vector<double> s = tps[v];
        std::sort(s.begin(), s.end());
        const double med = s[s.size() / 2];
        if (v == 0) base = med;
        std::printf("| %s | %.1f | %.3f | %.1f | %s |\n", names[v].c_str(), med, med / base, 1e6 / med,
                    argmax_n[v] ? std::to_string(argmax_us[v] / double(argmax_n[v])).substr(0, 5).c_str() : "-");
    }
    const auto w1 = clk::now();
    for (int i = 0; i < 200; ++i) {
        asm volatile("" : : "r"(lg) : "memory");
        sink += lamina::argmax_avx2(lg, n_vocab);
    }
    const double warm2 = us_since(w1) / 200;
    std::printf("argmax on warm (cached) logits: %.1f us, avx2 %.1f us (%d)\n", warm, warm2, sink & 1);
    for (llama_context * c : {ctx, ctx_bs}) {
        const llama_perf_context_data pd = llama_perf_context(c);
        std::printf("%s context: %d decodes, graph reused %d times\n", c == ctx ? "host-sampling" : "backend-sampling",
                    pd.n_eval + pd.n_p_eval, pd.n_reused);
    }
    llama_free(ctx_bs);
    llama_sampler_free(greedy);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
