// What does a generator that must read its tokens back pay against llama-batched-bench's loop,
// which never does? A native probe of pl parallel sequences, built on the device machine against
// the lamina package's libllama (ci/gpu_run.sh stage "batchprobe").
//
// One context as lamina bench --parallel makes it: n_seq_max = pl, a KV stream per sequence,
// n_ctx = pl*(npp+ntg), n_batch = pl*npp. Each variant clears the cache, decodes pl prompts of npp
// random tokens in one batch, then times ntg steps of one token per sequence (a logits row each);
// repetitions of the variants are interleaved so drift hits all of them alike.
//   bench     llama-batched-bench's loop: the next tokens are random, nothing is read, one
//             llama_synchronize after the last step (the host builds step i+1 while the device runs i)
//   sync      + llama_synchronize after every step (the least any loop that reads results pays)
//   argmax    + every sequence's logits row and a host argmax: the next tokens (lamina's host path)
//   backend   a greedy sampler per sequence in the graph (llama_set_sampler); the next tokens are
//             llama_get_sampled_token_ith (lamina's path when the output layer is on a GPU)
// "decode us" is the time inside llama_decode per step: the host's part of the step; "graphs reused"
// counts the context's decodes that reused the previous graph (bench, sync, argmax share a context).
// usage: batch_probe MODEL pl[,pl...] [npp 128] [ntg 128] [reps 5] [threads: all CPUs]
#include "llama.h"

#include "../cpp/argmax.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using clk = std::chrono::steady_clock;

double us_since(clk::time_point t0) {
    return std::chrono::duration<double, std::micro>(clk::now() - t0).count();
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
}

void add(llama_batch & b, llama_token t, llama_pos p, llama_seq_id s, bool out) {
    b.token[b.n_tokens] = t;
    b.pos[b.n_tokens] = p;
    b.n_seq_id[b.n_tokens] = 1;
    b.seq_id[b.n_tokens][0] = s;
    b.logits[b.n_tokens] = out;
    ++b.n_tokens;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s MODEL pl[,pl...] [npp] [ntg] [reps] [threads]\n", argv[0]);
        return 2;
    }
    std::vector<int> levels;
    for (std::string s = argv[2]; !s.empty();) {
        const size_t k = s.find(',');
        levels.push_back(std::atoi(s.substr(0, k).c_str()));
        s = k == std::string::npos ? "" : s.substr(k + 1);
    }
    const int npp = argc > 3 ? std::atoi(argv[3]) : 128;
    const int ntg = argc > 4 ? std::atoi(argv[4]) : 128;
    const int reps = argc > 5 ? std::atoi(argv[5]) : 5;
    const int threads = argc > 6 ? std::atoi(argv[6]) : int(std::thread::hardware_concurrency());
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 999;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { std::fprintf(stderr, "load failed\n"); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    std::mt19937 rng(1);
    auto rnd = [&] { return llama_token(rng() % uint32_t(n_vocab)); };
    const std::vector<std::string> names = {"bench", "sync", "argmax", "backend"};
    std::printf("n_vocab %d, npp %d, ntg %d, reps %d, threads %d\n", n_vocab, npp, ntg, reps, threads);
    std::printf("| pl | variant | tg t/s (median) | vs bench | us/step | decode us/step | graphs reused |\n"
                "|---|---|---|---|---|---|---|\n");
    for (const int pl : levels) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = uint32_t(pl * (npp + ntg));
        cp.n_batch = uint32_t(pl * npp);
        cp.n_ubatch = std::min<uint32_t>(512, cp.n_batch);
        cp.n_seq_max = uint32_t(pl);
        cp.kv_unified = false;
        cp.no_perf = false;
        cp.n_threads = cp.n_threads_batch = threads;
        llama_context * ctx = llama_init_from_model(model, cp);
        llama_context * ctx_bs = llama_init_from_model(model, cp);
        if (!ctx || !ctx_bs) { std::fprintf(stderr, "context failed (pl %d)\n", pl); return 1; }
        std::vector<llama_sampler *> samplers;
        bool bs_ok = true;
        for (int s = 0; s < pl; ++s) {
            llama_sampler * g = llama_sampler_chain_init(llama_sampler_chain_default_params());
            llama_sampler_chain_add(g, llama_sampler_init_greedy());
            bs_ok = bs_ok && llama_set_sampler(ctx_bs, s, g);
            samplers.push_back(g);
        }
        llama_batch b = llama_batch_init(pl * npp, 0, 1);
        std::vector<std::vector<double>> tps(names.size()), dec(names.size());
        std::vector<llama_token> next(size_t(pl), 0);
        for (int r = 0; r <= reps; ++r) {  // repetition 0 warms up
            for (size_t v = 0; v < names.size(); ++v) {
                if (names[v] == "backend" && !bs_ok) continue;
                llama_context * c = names[v] == "backend" ? ctx_bs : ctx;
                llama_memory_clear(llama_get_memory(c), true);
                b.n_tokens = 0;
                for (int s = 0; s < pl; ++s) {
                    for (int i = 0; i < npp; ++i) add(b, rnd(), i, s, i + 1 == npp);
                }
                if (llama_decode(c, b) != 0) { std::fprintf(stderr, "prompt decode failed\n"); return 1; }
                llama_synchronize(c);
                for (int s = 0; s < pl; ++s) next[size_t(s)] = rnd();
                double in_decode = 0;
                const auto t0 = clk::now();
                for (int i = 0; i < ntg; ++i) {
                    b.n_tokens = 0;
                    for (int s = 0; s < pl; ++s) add(b, next[size_t(s)], npp + i, s, true);
                    const auto d0 = clk::now();
                    if (llama_decode(c, b) != 0) { std::fprintf(stderr, "decode failed\n"); return 1; }
                    in_decode += us_since(d0);
                    if (v == 0) {
                        for (int s = 0; s < pl; ++s) next[size_t(s)] = rnd();
                    } else if (v == 1) {
                        llama_synchronize(c);
                        for (int s = 0; s < pl; ++s) next[size_t(s)] = rnd();
                    } else if (v == 2) {
                        for (int s = 0; s < pl; ++s) next[size_t(s)] = lamina::argmax(llama_get_logits_ith(c, s), n_vocab);
                    } else {
                        for (int s = 0; s < pl; ++s) next[size_t(s)] = llama_get_sampled_token_ith(c, s);
                    }
                }
                llama_synchronize(c);
                const double dt = us_since(t0);
                if (r > 0) {
                    tps[v].push_back(double(pl) * ntg / dt * 1e6);
                    dec[v].push_back(in_decode / ntg);
                }
            }
        }
        const double base = median(tps[0]);
        for (size_t v = 0; v < names.size(); ++v) {
            if (tps[v].empty()) {
                std::printf("| %d | %s | refused | | | | |\n", pl, names[v].c_str());
                continue;
            }
            const double med = median(tps[v]);
            // decodes per context: (reps + 1) runs of its variants, each a prompt and ntg steps
            const llama_perf_context_data pd = llama_perf_context(v == 3 ? ctx_bs : ctx);
            const int n_decodes = (reps + 1) * (v == 3 ? 1 : 3) * (ntg + 1);
            std::printf("| %d | %s | %.1f | %.3f | %.0f | %.0f | %d of %d |\n", pl, names[v].c_str(), med, med / base,
                        1e6 * pl / med, median(dec[v]), pd.n_reused, n_decodes);
        }
        std::fflush(stdout);
        llama_batch_free(b);
        llama_free(ctx_bs);
        llama_free(ctx);
        for (llama_sampler * g : samplers) llama_sampler_free(g);
    }
    llama_model_free(model);
    return 0;
}
