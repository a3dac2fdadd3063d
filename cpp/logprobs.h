// Log-probabilities of one logits row, as the model gave it (before the sampler chain: no
// temperature, penalties, bias or grammar; llama-server's default and OpenAI's logprobs): the
// chosen token's, and the k most likely tokens'. Two passes over the row, no vocab-sized copy:
// the largest values (blocks whose max cannot enter the top are skipped), then the sum of exp()
// (AVX2 when the CPU has it). Gemma 3's 262,144 logits: about 0.2 ms with AVX2.
#pragma once

#include "argmax.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace lamina {

// The largest of 64 values (SIMD: AVX2 where the CPU has it).
inline float max64_sse2(const float * x) {
#if defined(__SSE2__)
    __m128 m0 = _mm_loadu_ps(x), m1 = _mm_loadu_ps(x + 4);
    for (int32_t j = 8; j < 64; j += 8) m0 = _mm_max_ps(m0, _mm_loadu_ps(x + j)), m1 = _mm_max_ps(m1, _mm_loadu_ps(x + j + 4));
    float l[4];
    _mm_storeu_ps(l, _mm_max_ps(m0, m1));
    return std::max(std::max(l[0], l[1]), std::max(l[2], l[3]));
#else
    float m = x[0];
    for (int32_t j = 1; j < 64; ++j) m = x[j] > m ? x[j] : m;
    return m;
#endif
}
#if defined(LAMINA_ARGMAX_AVX2)
__attribute__((target("avx2"))) inline float max64_avx2(const float * x) {
    __m256 m0 = _mm256_loadu_ps(x), m1 = _mm256_loadu_ps(x + 8);
    for (int32_t j = 16; j < 64; j += 16) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j)), m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + j + 8));
    float l[8];
    _mm256_storeu_ps(l, _mm256_max_ps(m0, m1));
    return *std::max_element(l, l + 8);
}
#endif

// The row's k largest values, largest first (ties: the lower token first), into ids / vals. A
// block of 64 is looked into only when its largest value would enter.
inline void top_k(const float * x, int32_t n, int32_t k, std::vector<int32_t> & ids, std::vector<float> & vals) {
    ids.assign(size_t(k), -1);
    vals.assign(size_t(k), -std::numeric_limits<float>::infinity());
    if (k == 0) return;
    auto take = [&](int32_t i) {
        if (!(x[i] > vals[size_t(k - 1)])) return;
        int32_t j = k - 1;
        for (; j > 0 && x[i] > vals[size_t(j - 1)]; --j) vals[size_t(j)] = vals[size_t(j - 1)], ids[size_t(j)] = ids[size_t(j - 1)];
        vals[size_t(j)] = x[i];
        ids[size_t(j)] = i;
    };
    const bool avx2 = has_avx2();
    int32_t i = 0;
    for (; i + 64 <= n; i += 64) {
#if defined(LAMINA_ARGMAX_AVX2)
        const float m = avx2 ? max64_avx2(x + i) : max64_sse2(x + i);
#else
        (void)avx2;
        const float m = max64_sse2(x + i);
#endif
        if (m > vals[size_t(k - 1)]) {
            for (int32_t j = 0; j < 64; ++j) take(i + j);
        }
    }
    for (; i < n; ++i) take(i);
}

// exp(x) for x <= 0 (Cephes' expf, as exp256_nonpos below: relative error about 1e-7; x below
// -87 gives about 1.6e-38), branch-free so that compilers vectorize the loop over a row.
inline float exp_nonpos(float x) {
    x = x > -87.0f ? x : -87.0f;
    const float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // rounded: 1.5 * 2^23
    float r = x - fx * 0.693359375f;
    r = r - fx * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const int32_t e = (int32_t(fx) + 127) << 23;
    float p;
    std::memcpy(&p, &e, sizeof p);
    return y * p;
}

// sum of exp(x[i] - m) over the row, x[i] <= m (m: its largest value): blocks of 256 summed in
// floats, the blocks in doubles.
inline double sum_exp_scalar(const float * x, int32_t n, float m) {
    double s = 0;
    int32_t i = 0;
    for (; i + 256 <= n; i += 256) {
        float b[8] = {};  // eight lanes: a loop compilers vectorize without reordering a sum
        for (int32_t j = i; j < i + 256; j += 8) {
            for (int32_t k = 0; k < 8; ++k) b[k] += exp_nonpos(x[j + k] - m);
        }
        for (float v : b) s += double(v);
    }
    for (; i < n; ++i) s += double(exp_nonpos(x[i] - m));
    return s;
}

#if defined(LAMINA_ARGMAX_AVX2)
// exp for x in [-87, 0] (Cephes' expf: 2^n by the exponent bits, a degree-5 polynomial for the
// rest; relative error about 1e-7); smaller x give about 1.6e-38, as good as 0 in a sum.
__attribute__((target("avx2,fma"))) inline __m256 exp256_nonpos(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) inline double sum_exp_avx2(const float * x, int32_t n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256d d = _mm256_setzero_pd();  // blocks of 256 summed in floats, the blocks in doubles
    int32_t i = 0;
    while (i + 16 <= n) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (const int32_t end = std::min(n, i + 256); i + 16 <= end; i += 16) {
            s0 = _mm256_add_ps(s0, exp256_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm)));
            s1 = _mm256_add_ps(s1, exp256_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm)));
        }
        const __m256 s = _mm256_add_ps(s0, s1);
        d = _mm256_add_pd(d, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(s)), _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1))));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, d);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] + sum_exp_scalar(x + i, n - i, m);
}
#endif

// What one sampled token's row says: its logprob, and the top k tokens with theirs.
struct row_logprobs {
    float logprob = 0;
    std::vector<int32_t> top_ids;
    std::vector<float> top;

    void compute(const float * x, int32_t n, llama_token chosen, int32_t k) {
        top_k(x, n, k, top_ids, top);
        const float m = k > 0 ? top[0] : x[argmax(x, n)];
        double s;
#if defined(LAMINA_ARGMAX_AVX2)
        static const bool fma = has_avx2() && __builtin_cpu_supports("fma");
        s = fma ? sum_exp_avx2(x, n, m) : sum_exp_scalar(x, n, m);
#else
        s = sum_exp_scalar(x, n, m);
#endif
        const double lse = double(m) + std::log(s);
        logprob = float(double(x[chosen]) - lse);
        for (float & v : top) v = float(double(v) - lse);
    }
};

}  // namespace lamina
