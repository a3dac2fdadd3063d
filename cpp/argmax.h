// Greedy sampling's argmax over one row of logits, shared by the decode loops and ci/tg_probe.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LAMINA_ARGMAX_AVX2 1
#endif

namespace lamina {

// A block [i, i + len) whose largest value is m: if m beats best, the first index holding it wins.
inline void take_block(const float * x, int32_t i, int32_t len, float m, float & best, int32_t & best_i) {
    if (m > best) {
        best = m;
        for (int32_t j = 0; j < len; ++j) {
            if (x[i + j] == m) { best_i = i + j; break; }
        }
    }
}

// The values after the last whole block.
inline int32_t argmax_tail(const float * x, int32_t i, int32_t n, float best, int32_t best_i) {
    for (; i < n; ++i) {
        if (x[i] > best) { best = x[i]; best_i = i; }
    }
    return best_i;
}

// Index of the first largest value (what llama.cpp's greedy sampler picks), without building the
// vocab-sized candidate array the chain needs.
// One pass: the max of each 64-float block (SIMD), and a rescan of a block only when it beats
// the best so far, which random-order logits do O(log n) times.
inline int32_t argmax_sse2(const float * x, int32_t n) {
    constexpr int32_t B = 64;
    float best = -std::numeric_limits<float>::infinity();
    int32_t best_i = 0;
    int32_t i = 0;
    for (; i + B <= n; i += B) {
#if defined(__SSE2__)
        __m128 m0 = _mm_loadu_ps(x + i), m1 = _mm_loadu_ps(x + i + 4);
        __m128 m2 = _mm_loadu_ps(x + i + 8), m3 = _mm_loadu_ps(x + i + 12);
        for (int32_t j = 16; j < B; j += 16) {
            m0 = _mm_max_ps(m0, _mm_loadu_ps(x + i + j));
            m1 = _mm_max_ps(m1, _mm_loadu_ps(x + i + j + 4));
            m2 = _mm_max_ps(m2, _mm_loadu_ps(x + i + j + 8));
            m3 = _mm_max_ps(m3, _mm_loadu_ps(x + i + j + 12));
        }
        float lanes[4];
        _mm_storeu_ps(lanes, _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3)));
        float m = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
#else
        float m = x[i];
        for (int32_t j = 1; j < B; ++j) m = x[i + j] > m ? x[i + j] : m;
#endif
        take_block(x, i, B, m, best, best_i);
    }
    return argmax_tail(x, i, n, best, best_i);  // NaN and -inf only: 0, as llama.cpp's greedy sampler
}

#if defined(LAMINA_ARGMAX_AVX2)
// The same with 256-bit registers and 256-float blocks, for CPUs with AVX2 (checked by the caller).
__attribute__((target("avx2"))) inline int32_t argmax_avx2(const float * x, int32_t n) {
    constexpr int32_t B = 256;
    float best = -std::numeric_limits<float>::infinity();
    int32_t best_i = 0;
    int32_t i = 0;
    for (; i + B <= n; i += B) {
        __m256 m0 = _mm256_loadu_ps(x + i), m1 = _mm256_loadu_ps(x + i + 8);
        __m256 m2 = _mm256_loadu_ps(x + i + 16), m3 = _mm256_loadu_ps(x + i + 24);
        for (int32_t j = 32; j < B; j += 32) {
            m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i + j));
            m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + j + 8));
            m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + i + j + 16));
            m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + i + j + 24));
        }
        __m256 m8 = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        take_block(x, i, B, _mm_cvtss_f32(m4), best, best_i);
    }
    return argmax_tail(x, i, n, best, best_i);
}
#endif

inline bool has_avx2() {
#if defined(LAMINA_ARGMAX_AVX2)
    static const bool yes = __builtin_cpu_supports("avx2");
    return yes;
#else
    return false;
#endif
}

// The fastest exact argmax this CPU runs. AVX2 takes 262k cached logits from 30 to 22 us on this
// project's 2-core EPYC; logits a GPU has just written are memory-bound (16-21 us for 128k on an
// H100 host, either version: ci/tg_probe.cpp).
inline int32_t argmax(const float * x, int32_t n) {
#if defined(LAMINA_ARGMAX_AVX2)
    if (has_avx2()) return argmax_avx2(x, n);
#endif
    return argmax_sse2(x, n);
}

}  // namespace lamina
