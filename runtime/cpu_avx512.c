/* cpu_avx512.c — AVX-512 (F + BW) dot-row kernel for vlm_linear: one weight row (F32, BF16 or
 * F16) against up to four f32 x rows, 32 weights per iteration with two accumulators per row so
 * the FMA latency stays hidden at n = 1. BF16 widens to f32 exactly (shift into the high half);
 * products and sums are f32. Compiled with per-function target attributes; cpu.c only calls it
 * when the CPU reports avx512f and avx512bw. */
#include "runtime/cpu_internal.h"

#include <immintrin.h>

#define T512 __attribute__((target("avx512f,avx512bw"), always_inline)) static inline

T512 __m512 load16(const void *w, vlm_dtype dt, int64_t t) {
    if (dt == VLM_F32) return _mm512_loadu_ps((const float *)w + t);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + t));
    if (dt == VLM_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

T512 float tail_elem(const void *w, vlm_dtype dt, int64_t t) {
    if (dt == VLM_F32) return ((const float *)w)[t];
    const uint16_t h = ((const uint16_t *)w)[t];
    if (dt == VLM_BF16) return vlm_bf16_to_f32(h);
    return _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16((short)h)));
}

T512 void dot_rows(const float *x, int64_t ldx, const int nx, int64_t k, const void *w,
                   const vlm_dtype dt, float *out) {
    __m512 a0[VLM_DOT_MAX_ROWS], a1[VLM_DOT_MAX_ROWS];
    for (int i = 0; i < nx; i++) a0[i] = a1[i] = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 32 <= k; t += 32) {
        const __m512 w0 = load16(w, dt, t), w1 = load16(w, dt, t + 16);
        for (int i = 0; i < nx; i++) {
            a0[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + t), w0, a0[i]);
            a1[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + t + 16), w1, a1[i]);
        }
    }
    for (; t + 16 <= k; t += 16) {
        const __m512 w0 = load16(w, dt, t);
        for (int i = 0; i < nx; i++)
            a0[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + t), w0, a0[i]);
    }
    for (int i = 0; i < nx; i++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
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

__attribute__((target("avx512f,avx512bw"))) void
vlm_dot_rows_avx512(const float *x, int64_t ldx, int nx, int64_t k, const void *w, vlm_dtype dt,
                    float *out) {
    switch (dt) {
    case VLM_F32: ROWS_CASES(VLM_F32)
    case VLM_BF16: ROWS_CASES(VLM_BF16)
    default: ROWS_CASES(VLM_F16)
    }
}
