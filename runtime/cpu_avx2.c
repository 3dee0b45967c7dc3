/* cpu_avx2.c — AVX2 + FMA (+ F16C) dot-row kernel for vlm_linear, the fallback for CPUs without
 * AVX-512: one weight row (F32, BF16 or F16) against up to four f32 x rows, 16 weights per
 * iteration with two accumulators per row. BF16 widens to f32 exactly; sums are f32. cpu.c only
 * calls it when the CPU reports avx2, fma and f16c. */
#include "runtime/cpu_internal.h"

#include <immintrin.h>

#define T256 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

T256 __m256 load8(const void *w, vlm_dtype dt, int64_t t) {
    if (dt == VLM_F32) return _mm256_loadu_ps((const float *)w + t);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + t));
    if (dt == VLM_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

T256 float tail_elem(const void *w, vlm_dtype dt, int64_t t) {
    if (dt == VLM_F32) return ((const float *)w)[t];
    const uint16_t h = ((const uint16_t *)w)[t];
    if (dt == VLM_BF16) return vlm_bf16_to_f32(h);
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

T256 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

T256 void dot_rows(const float *x, int64_t ldx, const int nx, int64_t k, const void *w,
                   const vlm_dtype dt, float *out) {
    __m256 a0[VLM_DOT_MAX_ROWS], a1[VLM_DOT_MAX_ROWS];
    for (int i = 0; i < nx; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= k; t += 16) {
        const __m256 w0 = load8(w, dt, t), w1 = load8(w, dt, t + 8);
        for (int i = 0; i < nx; i++) {
            a0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + t), w0, a0[i]);
            a1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + t + 8), w1, a1[i]);
        }
    }
    for (; t + 8 <= k; t += 8) {
        const __m256 w0 = load8(w, dt, t);
        for (int i = 0; i < nx; i++)
            a0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + t), w0, a0[i]);
    }
    for (int i = 0; i < nx; i++) {
        float s = hsum8(_mm256_add_ps(a0[i], a1[i]));
        for (int64_t u = t; u < k; u++) s += x[i * ldx + u] * tail_elem(w, dt, u);
        out[i] = s;
    }
}

/* Each (dtype, rows) pair gets its own fully unrolled copy: the branches above fold away. */
#define ROWS_CASES(DT)                                                                        \
    switch (nx) {                                                                             \
    case 1: dot_rows(x, ldx, 1, k, w, DT, out); return;                                      \
    case 2: dot_rows(x, ldx, 2, k, w, DT, out); return;                                      \
    case 3: dot_rows(x, ldx, 3, k, w, DT, out); return;                                      \
    default: dot_rows(x, ldx, 4, k, w, DT, out); return;                                     \
    }

__attribute__((target("avx2,fma,f16c"))) void
vlm_dot_rows_avx2(const float *x, int64_t ldx, int nx, int64_t k, const void *w, vlm_dtype dt,
                  float *out) {
    switch (dt) {
    case VLM_F32: ROWS_CASES(VLM_F32)
    case VLM_BF16: ROWS_CASES(VLM_BF16)
    default: ROWS_CASES(VLM_F16)
    }
}
