/* cpu_avx512.c — AVX-512 (F + BW) dot-row kernel for vlm_linear: one or two weight rows (F32,
 * BF16 or F16) against up to four f32 x rows, 32 weights per iteration with two accumulators per row so
 * the FMA latency stays hidden at n = 1. BF16 widens to f32 exactly (shift into the high half);
 * products and sums are f32. Compiled with per-function target attributes; cpu.c only calls it
 * when the CPU reports avx512f and avx512bw. */
#include "runtime/cpu_internal.h"
#include "runtime/cpu_smalln.h"

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
 * Bandwidth bound. Two weight rows are streamed side by side, 32 weights per step (two x loads
 * feed four FMAs into four independent chains), with one software prefetch per cache line
 * GEMV_PF_BYTES ahead in each stream. Rows are contiguous, so 8 KiB ahead of row r is the
 * start of a later row pair: the prefetch runs ahead across row boundaries and the hardware
 * prefetcher, which stops at 4 KiB pages, never has to restart the stream cold. Measured on a
 * 2-core Xeon (AMX kind) against a plain 2-thread sum over the same 1 GiB: 4 rows with a 1 KiB
 * lookahead (the previous kernel) 0.84 of it; 2 rows 8 KiB ahead 0.99-1.01; 4 rows 8 KiB 0.96. */
#ifndef GEMV_PF_BYTES
#define GEMV_PF_BYTES 8192
#endif

T512 __m512 load16m(const void *w, vlm_dtype dt, int64_t t, __mmask16 m) {
    if (dt == VLM_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + t);
    /* 512-bit masked load (AVX512BW; masked-off elements are not read) of which the low half is used */
    const __m256i h = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16((__mmask32)m, (const uint16_t *)w + t));
    if (dt == VLM_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

T512 void gemv2(const float *x, int64_t k, const char *w, size_t ldw, const vlm_dtype dt, float *out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    const char *w0 = w, *w1 = w + ldw;
    const int64_t esz = dt == VLM_F32 ? 4 : 2;
    int64_t t = 0;
    for (; t + 32 <= k; t += 32) {
        const int64_t pf = t * esz + GEMV_PF_BYTES;
        _mm_prefetch(w0 + pf, _MM_HINT_T0);
        _mm_prefetch(w1 + pf, _MM_HINT_T0);
        if (esz == 4) _mm_prefetch(w0 + pf + 64, _MM_HINT_T0), _mm_prefetch(w1 + pf + 64, _MM_HINT_T0);
        const __m512 x0 = _mm512_loadu_ps(x + t), x1 = _mm512_loadu_ps(x + t + 16);
        a0 = _mm512_fmadd_ps(x0, load16(w0, dt, t), a0);
        a1 = _mm512_fmadd_ps(x1, load16(w0, dt, t + 16), a1);
        b0 = _mm512_fmadd_ps(x0, load16(w1, dt, t), b0);
        b1 = _mm512_fmadd_ps(x1, load16(w1, dt, t + 16), b1);
    }
    for (; t < k; t += 16) {
        const int64_t left = k - t;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + t);
        a0 = _mm512_fmadd_ps(xv, load16m(w0, dt, t, m), a0);
        b0 = _mm512_fmadd_ps(xv, load16m(w1, dt, t, m), b0);
    }
    out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    out[1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
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
        for (; r + 2 <= rows; r += 2) gemv2(x, k, wr + r * ldw_bytes, ldw_bytes, VLM_F32, out + r);
        for (; r < rows; r++) out[r] = gemv1(x, k, wr + r * ldw_bytes, VLM_F32);
        break;
    case VLM_BF16:
        for (; r + 2 <= rows; r += 2) gemv2(x, k, wr + r * ldw_bytes, ldw_bytes, VLM_BF16, out + r);
        for (; r < rows; r++) out[r] = gemv1(x, k, wr + r * ldw_bytes, VLM_BF16);
        break;
    default:
        for (; r + 2 <= rows; r += 2) gemv2(x, k, wr + r * ldw_bytes, ldw_bytes, VLM_F16, out + r);
        for (; r < rows; r++) out[r] = gemv1(x, k, wr + r * ldw_bytes, VLM_F16);
        break;
    }
}

/* ---- small-n BF16 linear (batched decode: n = 2..~48 rows) ----
 * The dot-row kernel reuses each weight at most 4x from registers and the blocked GEMM repacks the
 * bf16 weights to f32 on every call (gathers: ~1 load per weight), which at n = 16 costs as much
 * as the multiply. This kernel reads the bf16 rows in place. A 512-bit load of 32 bf16 weights is
 * widened with one unpack per 16 (unpacklo/hi_epi16 against zero puts each weight in the high half
 * of a 32-bit lane, which is its f32 value), which leaves the weights in the order
 * [w0..w3, w8..w11, w16..w19, w24..w27 | w4..w7, w12..w15, ...]; x is permuted once per call into
 * the same order (vlm_smalln_permute_x), so no per-weight shuffle is needed, and laid out as
 * [group of 8 rows][block of 32 k][row][32], so a tile reads all its x from one pointer that moves
 * sequentially (with a row stride gcc ran out of registers and spilled). Register tile: 2
 * weight rows x 8 x rows = 16 f32 accumulators; per 32 weights 2 loads + 4 unpacks feed 32 FMAs.
 * k is cut into SMALLN_KC chunks so the x chunk (npad x KC floats, 32 KiB at n = 16) stays in L1
 * while every weight row streams through once; the 16 partial sums of a tile are reduced together
 * (reduce16) and added into y. Rows past n are zero padding (computed, never stored). */
#define SMALLN_R 8
#define SMALLN_KC 1024

void vlm_smalln_permute_x(const float *x, int64_t n, int64_t k, int64_t i0, int64_t i1, int64_t kp,
                          float *xp) {
    const int64_t nblk = kp / 32;
    for (int64_t i = i0; i < i1; i++)
        for (int64_t b = 0; b < nblk; b++) {
            float *d = xp + ((i / SMALLN_R) * nblk + b) * (32 * SMALLN_R) + (i % SMALLN_R) * 32;
            for (int L = 0; L < 4; L++)
                for (int q = 0; q < 4; q++) {
                    const int64_t lo = b * 32 + 8 * L + q, hi = lo + 4;
                    d[4 * L + q] = i < n && lo < k ? x[i * k + lo] : 0.0f;
                    d[16 + 4 * L + q] = i < n && hi < k ? x[i * k + hi] : 0.0f;
                }
        }
}

/* Lane i of the result = the sum of the 16 lanes of v[i]: pairwise interleave-and-add within
 * 128-bit lanes, then across them (45 shuffles/adds instead of 16 full reductions' ~130). */
T512 __m512 reduce16(const __m512 *v) {
    __m512 s2[8], s4[4];
    for (int p = 0; p < 8; p++)
        s2[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]),
                              _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
    for (int p = 0; p < 4; p++)
        s4[p] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * p], s2[2 * p + 1], 0x44),
                              _mm512_shuffle_ps(s2[2 * p], s2[2 * p + 1], 0xEE));
    /* s4[g], 128-bit lane L: the lane-L partial sums of v[4g..4g+3] */
    const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[0], s4[1], 0x44), _mm512_shuffle_f32x4(s4[0], s4[1], 0xEE));
    const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2], s4[3], 0x44), _mm512_shuffle_f32x4(s4[2], s4[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88), _mm512_shuffle_f32x4(t0, t1, 0xDD));
}

/* The next 32 weights of rows w0 and w1 at t (zero past k: masked), and a prefetch of the same
 * lines of the next pair (pf0, pf1). Shared by the f32 and the vdpbf16ps tiles. */
T512 void smalln_load_w(const uint16_t *w0, const uint16_t *w1, int64_t k, int64_t t, const uint16_t *pf0,
                        const uint16_t *pf1, __m512i *v0, __m512i *v1) {
    if (t + 32 <= k) {
        *v0 = _mm512_loadu_si512(w0 + t), *v1 = _mm512_loadu_si512(w1 + t);
    } else {
        const __mmask32 m = (__mmask32)((1ull << (k - t)) - 1);
        *v0 = _mm512_maskz_loadu_epi16(m, w0 + t), *v1 = _mm512_maskz_loadu_epi16(m, w1 + t);
    }
    _mm_prefetch((const char *)(pf0 + t), _MM_HINT_T0);
    _mm_prefetch((const char *)(pf1 + t), _MM_HINT_T0);
}

/* One x row i of the current 32-k block against both widened weight rows (a0/b0, a1/b1), into the
 * named accumulators c0i and c1i. The empty asm pins each x half in a register: otherwise gcc
 * folds the load into both FMAs that use it, 34 loads per 32 FMAs, and the kernel was load-port
 * bound (bench/matmul n=16 in cache: 217 -> 254 GFLOP/s with it; from DRAM the weight stream
 * still limits). */
#define SMALLN_ROW(i)                                                                             \
    do {                                                                                          \
        __m512 xl = _mm512_load_ps(x + (i) * 32), xh = _mm512_load_ps(x + (i) * 32 + 16);         \
        __asm__("" : "+v"(xl), "+v"(xh));                                                         \
        c0##i = _mm512_fmadd_ps(xh, b0, _mm512_fmadd_ps(xl, a0, c0##i));                          \
        c1##i = _mm512_fmadd_ps(xh, b1, _mm512_fmadd_ps(xl, a1, c1##i));                          \
    } while (0)
/* The two weight vectors widened to f32 (lane order matched by vlm_smalln_permute_x). */
#define SMALLN_WIDEN()                                                                            \
    const __m512 a0 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, v0));                          \
    const __m512 b0 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, v0));                          \
    const __m512 a1 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, v1));                          \
    const __m512 b1 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, v1))

/* out[r * 8 + i] = the group's x rows i < 8 (xp at the group's block 0) . weight rows w0, w1 over [t0, t1); weights past
 * k read as zero (masked), xp is zero there too. pf0/pf1: rows to prefetch (the next tile's). The
 * accumulators are local and reduced here: passed out through a pointer, gcc kept them in memory
 * and stored all 16 every iteration (store-bound at ~47% of the FMA peak). */
T512 void smalln_tile(const float *xp, const uint16_t *w0, const uint16_t *w1, int64_t k,
                      int64_t t0, int64_t t1, const uint16_t *pf0, const uint16_t *pf1, float *out) {
    const __m512i z = _mm512_setzero_si512();
    /* 16 named accumulators: with an array gcc kept them in memory and stored all 16 every
     * iteration (store-bound at ~47% of the FMA peak). */
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c04 = c00, c05 = c00, c06 = c00,
           c07 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00, c14 = c00, c15 = c00, c16 = c00, c17 = c00;
    for (int64_t t = t0; t < t1; t += 32) {
        __m512i v0, v1;
        smalln_load_w(w0, w1, k, t, pf0, pf1, &v0, &v1);
        SMALLN_WIDEN();
        const float *x = xp + t * SMALLN_R; /* this block's 8 rows x 32, contiguous */
        SMALLN_ROW(0); SMALLN_ROW(1); SMALLN_ROW(2); SMALLN_ROW(3);
        SMALLN_ROW(4); SMALLN_ROW(5); SMALLN_ROW(6); SMALLN_ROW(7);
    }
    const __m512 acc[2 * SMALLN_R] = {c00, c01, c02, c03, c04, c05, c06, c07,
                                      c10, c11, c12, c13, c14, c15, c16, c17};
    _mm512_storeu_ps(out, reduce16(acc));
}

/* The same tile for a group with at most 4 real rows (n = 4 in batched decode, or the last group of
 * n = 12, 20, ...): rows 4..7 of the group are zero padding, and the 8-row tile spent half its FMAs
 * on them. 8 accumulators; out[r * 8 + i] for i < 4, the other lanes zero. */
T512 void smalln_tile4(const float *xp, const uint16_t *w0, const uint16_t *w1, int64_t k, int64_t t0,
                       int64_t t1, const uint16_t *pf0, const uint16_t *pf1, float *out) {
    const __m512i z = _mm512_setzero_si512();
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
           c13 = c00;
    for (int64_t t = t0; t < t1; t += 32) {
        __m512i v0, v1;
        smalln_load_w(w0, w1, k, t, pf0, pf1, &v0, &v1);
        SMALLN_WIDEN();
        const float *x = xp + t * SMALLN_R;
        SMALLN_ROW(0); SMALLN_ROW(1); SMALLN_ROW(2); SMALLN_ROW(3);
    }
    const __m512 zf = _mm512_setzero_ps();
    const __m512 acc[2 * SMALLN_R] = {c00, c01, c02, c03, zf, zf, zf, zf, c10, c11, c12, c13, zf, zf, zf, zf};
    _mm512_storeu_ps(out, reduce16(acc));
}
#undef SMALLN_ROW
#undef SMALLN_WIDEN

__attribute__((target("avx512f,avx512bw"), always_inline)) static inline void smalln_tile_f32(
    const void *xg, int64_t rows, const uint16_t *w0, const uint16_t *w1, int64_t k, int64_t t0,
    int64_t t1, const uint16_t *pf0, const uint16_t *pf1, float *out) {
    if (rows <= 4)
        smalln_tile4(xg, w0, w1, k, t0, t1, pf0, pf1, out);
    else
        smalln_tile(xg, w0, w1, k, t0, t1, pf0, pf1, out);
}

__attribute__((target("avx512f,avx512bw"))) void vlm_linear_smalln_avx512(const float *xp, int64_t n, int64_t npad, int64_t kp, int64_t k,
                              const uint16_t *w, int64_t j0, int64_t j1, float *y, int64_t ldy) {
    smalln_drive(smalln_tile_f32, SMALLN_R, xp, sizeof(float), SMALLN_KC, n, npad, kp, k, w, j0, j1, y, ldy);
}

/* ---- small-n BF16 linear with AVX512_BF16 (vdpbf16ps), for CPUs where the throughput probe
 * found it faster than FMA (cpu.c) ----
 * Same tiling as the f32 small-n kernel (8 x rows x 2 weight rows, 16 accumulators, k chunks,
 * reduce16), but x is rounded to bf16 once per call and a weight row's 32 bf16 are used as they
 * lie in memory: vdpbf16ps pairs k and k+1 of x with k and k+1 of the weights, so neither the
 * widening unpacks nor a permutation are needed. xb: [row group][k block of 32][8 rows][32] bf16,
 * kp = k rounded up to 32, zero padded. */
#define SMALLN_BF16_KC 1024

__attribute__((target("avx512f,avx512bw,avx512bf16"))) void
vlm_smalln_pack_x_bf16(const float *x, int64_t n, int64_t k, int64_t i0, int64_t i1, int64_t kp,
                       uint16_t *xb) {
    const int64_t nblk = kp / 32;
    for (int64_t i = i0; i < i1; i++)
        for (int64_t b = 0; b < nblk; b++) {
            uint16_t *d = xb + ((i / SMALLN_R) * nblk + b) * (32 * SMALLN_R) + (i % SMALLN_R) * 32;
            const int64_t ne = i >= n ? 0 : k - b * 32 >= 32 ? 32 : k - b * 32;
            _mm512_store_si512(d, vlm_bf16x32(x + (i < n ? i : 0) * k + b * 32, ne));
        }
}

__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) static inline void
smalln_bf16_tile(const uint16_t *xb, const uint16_t *w0, const uint16_t *w1, int64_t k, int64_t t0,
                 int64_t t1, const uint16_t *pf0, const uint16_t *pf1, float *out) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c04 = c00, c05 = c00, c06 = c00,
           c07 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00, c14 = c00, c15 = c00, c16 = c00, c17 = c00;
    for (int64_t t = t0; t < t1; t += 32) {
        __m512i v0i, v1i;
        smalln_load_w(w0, w1, k, t, pf0, pf1, &v0i, &v1i); /* past k zero; so is x */
        const __m512bh v0 = (__m512bh)v0i, v1 = (__m512bh)v1i;
        const uint16_t *x = xb + t * SMALLN_R; /* this block's 8 rows x 32 bf16 */
#define SMALLN_BF16_ROW(i)                                                                        \
    do {                                                                                          \
        __m512i xv = _mm512_load_si512(x + (i) * 32);                                             \
        __asm__("" : "+v"(xv)); /* one load feeding both products, as in smalln_tile */           \
        c0##i = _mm512_dpbf16_ps(c0##i, (__m512bh)xv, v0);                                        \
        c1##i = _mm512_dpbf16_ps(c1##i, (__m512bh)xv, v1);                                        \
    } while (0)
        SMALLN_BF16_ROW(0); SMALLN_BF16_ROW(1); SMALLN_BF16_ROW(2); SMALLN_BF16_ROW(3);
        SMALLN_BF16_ROW(4); SMALLN_BF16_ROW(5); SMALLN_BF16_ROW(6); SMALLN_BF16_ROW(7);
#undef SMALLN_BF16_ROW
    }
    const __m512 acc[2 * SMALLN_R] = {c00, c01, c02, c03, c04, c05, c06, c07,
                                      c10, c11, c12, c13, c14, c15, c16, c17};
    _mm512_storeu_ps(out, reduce16(acc));
}

__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) static inline void smalln_tile_bf16(
    const void *xg, int64_t rows, const uint16_t *w0, const uint16_t *w1, int64_t k, int64_t t0,
    int64_t t1, const uint16_t *pf0, const uint16_t *pf1, float *out) {
    (void)rows; /* padding rows cost little next to the halved instruction count */
    smalln_bf16_tile(xg, w0, w1, k, t0, t1, pf0, pf1, out);
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) void vlm_linear_smalln_bf16(const uint16_t *xb, int64_t n, int64_t npad, int64_t kp, int64_t k,
                            const uint16_t *w, int64_t j0, int64_t j1, float *y, int64_t ldy) {
    smalln_drive(smalln_tile_bf16, SMALLN_R, xb, sizeof(uint16_t), SMALLN_BF16_KC, n, npad, kp, k, w, j0, j1, y, ldy);
}
