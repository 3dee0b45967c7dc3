/* cpu_avx512.c — AVX-512 (F + BW) dot-row kernel for vlm_linear: one or two weight rows (F32,
 * BF16 or F16) against up to four f32 x rows, 32 weights per iteration with two accumulators per row so
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

/* nw weight rows (w, w + ldw bytes) x nx x rows; each x load feeds nw FMAs. */
T512 void dot_rows(const float *x, int64_t ldx, const int nx, int64_t k, const void *w,
                   size_t ldw, const int nw, const vlm_dtype dt, float *out) {
    __m512 a0[VLM_DOT_MAX_WROWS][VLM_DOT_MAX_ROWS], a1[VLM_DOT_MAX_WROWS][VLM_DOT_MAX_ROWS];
    const void *wr[VLM_DOT_MAX_WROWS] = {w, (const char *)w + ldw};
    for (int r = 0; r < nw; r++)
        for (int i = 0; i < nx; i++) a0[r][i] = a1[r][i] = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 32 <= k; t += 32) {
        __m512 w0[VLM_DOT_MAX_WROWS], w1[VLM_DOT_MAX_WROWS];
        for (int r = 0; r < nw; r++) w0[r] = load16(wr[r], dt, t), w1[r] = load16(wr[r], dt, t + 16);
        for (int i = 0; i < nx; i++) {
            const __m512 x0 = _mm512_loadu_ps(x + i * ldx + t), x1 = _mm512_loadu_ps(x + i * ldx + t + 16);
            for (int r = 0; r < nw; r++) {
                a0[r][i] = _mm512_fmadd_ps(x0, w0[r], a0[r][i]);
                a1[r][i] = _mm512_fmadd_ps(x1, w1[r], a1[r][i]);
            }
        }
    }
    for (; t + 16 <= k; t += 16)
        for (int r = 0; r < nw; r++) {
            const __m512 w0 = load16(wr[r], dt, t);
            for (int i = 0; i < nx; i++)
                a0[r][i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + t), w0, a0[r][i]);
        }
    for (int r = 0; r < nw; r++)
        for (int i = 0; i < nx; i++) {
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r][i], a1[r][i]));
            for (int64_t u = t; u < k; u++) s += x[i * ldx + u] * tail_elem(wr[r], dt, u);
            out[r * VLM_DOT_MAX_ROWS + i] = s;
        }
}

/* Each (dtype, x rows, weight rows) triple gets its own fully unrolled copy: the branches above
 * fold away. */
#define ROWS_CASES(DT, NW)                                                                    \
    switch (nx) {                                                                             \
    case 1: dot_rows(x, ldx, 1, k, w, ldw_bytes, NW, DT, out); return;                       \
    case 2: dot_rows(x, ldx, 2, k, w, ldw_bytes, NW, DT, out); return;                       \
    case 3: dot_rows(x, ldx, 3, k, w, ldw_bytes, NW, DT, out); return;                       \
    default: dot_rows(x, ldx, 4, k, w, ldw_bytes, NW, DT, out); return;                      \
    }
#define W_CASES(DT)                                                                           \
    if (nw == 1) ROWS_CASES(DT, 1) else ROWS_CASES(DT, 2)

__attribute__((target("avx512f,avx512bw"))) void
vlm_dot_rows_avx512(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                    size_t ldw_bytes, int nw, vlm_dtype dt, float *out) {
    switch (dt) {
    case VLM_F32: W_CASES(VLM_F32)
    case VLM_BF16: W_CASES(VLM_BF16)
    default: W_CASES(VLM_F16)
    }
}

/* ---- n = 1 (decode) GEMV: out[r] = dot(x, W row r) for r < rows ----
 * Bandwidth bound: four weight rows are streamed side by side (four sequential streams, 3 KiB
 * apart at k = 1536; rows are contiguous, so together they cover one contiguous 4-row block) with a
 * software prefetch GEMV_PF_BYTES ahead in each stream, and every x load feeds four FMAs. One
 * accumulator per row is enough: four independent FMA chains per 16 weights, and the loop is
 * limited by memory, not FMA latency. */
#define GEMV_PF_BYTES 1024

T512 __m512 load16m(const void *w, vlm_dtype dt, int64_t t, __mmask16 m) {
    if (dt == VLM_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + t);
    /* 512-bit masked load (AVX512BW; masked-off elements are not read) of which the low half is used */
    const __m256i h = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16((__mmask32)m, (const uint16_t *)w + t));
    if (dt == VLM_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

T512 void gemv4(const float *x, int64_t k, const char *w, size_t ldw, const vlm_dtype dt, float *out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const char *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
    const int64_t esz = dt == VLM_F32 ? 4 : 2;
    int64_t t = 0;
    for (; t + 16 <= k; t += 16) {
        const int64_t pf = t * esz + GEMV_PF_BYTES;
        _mm_prefetch(w0 + pf, _MM_HINT_T0);
        _mm_prefetch(w1 + pf, _MM_HINT_T0);
        _mm_prefetch(w2 + pf, _MM_HINT_T0);
        _mm_prefetch(w3 + pf, _MM_HINT_T0);
        const __m512 xv = _mm512_loadu_ps(x + t);
        a0 = _mm512_fmadd_ps(xv, load16(w0, dt, t), a0);
        a1 = _mm512_fmadd_ps(xv, load16(w1, dt, t), a1);
        a2 = _mm512_fmadd_ps(xv, load16(w2, dt, t), a2);
        a3 = _mm512_fmadd_ps(xv, load16(w3, dt, t), a3);
    }
    if (t < k) {
        const __mmask16 m = (__mmask16)((1u << (k - t)) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + t);
        a0 = _mm512_fmadd_ps(xv, load16m(w0, dt, t, m), a0);
        a1 = _mm512_fmadd_ps(xv, load16m(w1, dt, t, m), a1);
        a2 = _mm512_fmadd_ps(xv, load16m(w2, dt, t, m), a2);
        a3 = _mm512_fmadd_ps(xv, load16m(w3, dt, t, m), a3);
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
}

T512 float gemv1(const float *x, int64_t k, const char *w, const vlm_dtype dt) {
    __m512 a = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= k; t += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(x + t), load16(w, dt, t), a);
    if (t < k) {
        const __mmask16 m = (__mmask16)((1u << (k - t)) - 1);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + t), load16m(w, dt, t, m), a);
    }
    return _mm512_reduce_add_ps(a);
}

__attribute__((target("avx512f,avx512bw"))) void
vlm_gemv_avx512(const float *x, int64_t k, const void *w, size_t ldw_bytes, int64_t rows,
                vlm_dtype dt, float *out) {
    const char *wr = (const char *)w;
    int64_t r = 0;
    switch (dt) { /* one specialised copy per dtype */
    case VLM_F32:
        for (; r + 4 <= rows; r += 4) gemv4(x, k, wr + r * ldw_bytes, ldw_bytes, VLM_F32, out + r);
        for (; r < rows; r++) out[r] = gemv1(x, k, wr + r * ldw_bytes, VLM_F32);
        break;
    case VLM_BF16:
        for (; r + 4 <= rows; r += 4) gemv4(x, k, wr + r * ldw_bytes, ldw_bytes, VLM_BF16, out + r);
        for (; r < rows; r++) out[r] = gemv1(x, k, wr + r * ldw_bytes, VLM_BF16);
        break;
    default:
        for (; r + 4 <= rows; r += 4) gemv4(x, k, wr + r * ldw_bytes, ldw_bytes, VLM_F16, out + r);
        for (; r < rows; r++) out[r] = gemv1(x, k, wr + r * ldw_bytes, VLM_F16);
        break;
    }
}
