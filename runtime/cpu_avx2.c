/* cpu_avx2.c — AVX2 + FMA (+ F16C) kernels for vlm_linear, the fallback for CPUs without
 * AVX-512: the dot-row kernel (one weight row, F32, BF16 or F16, against up to four f32 x rows, 16
 * weights per iteration with two accumulators per row) and the small-n BF16 kernel for batched
 * decode. BF16 widens to f32 exactly; sums are f32. cpu.c only calls them when the CPU reports
 * avx2, fma and f16c. */
#include "runtime/cpu_internal.h"
#include "runtime/cpu_smalln.h"

#include <string.h>

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

__attribute__((target("avx2,fma,f16c"))) static void
dot_rows_1w(const float *x, int64_t ldx, int nx, int64_t k, const void *w, vlm_dtype dt, float *out) {
    switch (dt) {
    case VLM_F32: ROWS_CASES(VLM_F32)
    case VLM_BF16: ROWS_CASES(VLM_BF16)
    default: ROWS_CASES(VLM_F16)
    }
}

/* AVX2 has 16 vector registers: two weight rows x four x rows x two accumulators would spill, so
 * weight rows are taken one at a time. */
__attribute__((target("avx2,fma,f16c"))) void
vlm_dot_rows_avx2(const float *x, int64_t ldx, int nx, int64_t k, const void *w, size_t ldw_bytes,
                  int nw, vlm_dtype dt, float *out) {
    for (int r = 0; r < nw; r++)
        dot_rows_1w(x, ldx, nx, k, (const char *)w + r * ldw_bytes, dt, out + r * VLM_DOT_MAX_ROWS);
}

/* ---- n = 1 (decode) GEMV: out[r] = dot(x, W row r) for r < rows ----
 * Four weight rows streamed side by side, every x load feeding four FMAs, two accumulators per
 * row (16 weights per row per iteration). No software prefetch, unlike vlm_gemv_avx512: on a
 * 2-core Zen 2 it cost bandwidth from DRAM (lm_head 151936x1536 bf16: 25.9 GB/s without, 20.9
 * with 1 KiB ahead, 22.8 with 4 KiB), the hardware prefetchers follow four streams. */

T256 void gemv2_4(const float *x, int64_t k, const char *w, size_t ldw, const vlm_dtype dt, float *out) {
    __m256 a[4][2];
    for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    const char *wr[4] = {w, w + ldw, w + 2 * ldw, w + 3 * ldw};
    int64_t t = 0;
    if (dt == VLM_BF16) {
        /* one 256-bit load per 16 weights, widened by unpacking against zero into the order
         * [w0..w3, w8..w11 | w4..w7, w12..w15]; x is brought into the same order once for all
         * four rows (half the load uops of a widening load per 8 weights) */
        const __m256i z = _mm256_setzero_si256();
        for (; t + 16 <= k; t += 16) {
            const __m256 xl = _mm256_loadu_ps(x + t), xh = _mm256_loadu_ps(x + t + 8);
            const __m256 x0 = _mm256_permute2f128_ps(xl, xh, 0x20), x1 = _mm256_permute2f128_ps(xl, xh, 0x31);
            for (int r = 0; r < 4; r++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wr[r] + 2 * t));
                a[r][0] = _mm256_fmadd_ps(x0, _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v)), a[r][0]);
                a[r][1] = _mm256_fmadd_ps(x1, _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v)), a[r][1]);
            }
        }
    }
    for (; t + 16 <= k; t += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + t), x1 = _mm256_loadu_ps(x + t + 8);
        for (int r = 0; r < 4; r++) {
            a[r][0] = _mm256_fmadd_ps(x0, load8(wr[r], dt, t), a[r][0]);
            a[r][1] = _mm256_fmadd_ps(x1, load8(wr[r], dt, t + 8), a[r][1]);
        }
    }
    for (int r = 0; r < 4; r++) {
        float s = hsum8(_mm256_add_ps(a[r][0], a[r][1]));
        for (int64_t u = t; u < k; u++) s += x[u] * tail_elem(wr[r], dt, u);
        out[r] = s;
    }
}

__attribute__((target("avx2,fma,f16c"))) void vlm_gemv_avx2(const float *x, int64_t k, const void *w,
                                                             size_t ldw_bytes, int64_t rows, vlm_dtype dt,
                                                             float *out) {
    const char *wr = (const char *)w;
    int64_t r = 0;
    switch (dt) { /* one specialised copy per dtype */
    case VLM_F32:
        for (; r + 4 <= rows; r += 4) gemv2_4(x, k, wr + r * ldw_bytes, ldw_bytes, VLM_F32, out + r);
        break;
    case VLM_BF16:
        for (; r + 4 <= rows; r += 4) gemv2_4(x, k, wr + r * ldw_bytes, ldw_bytes, VLM_BF16, out + r);
        break;
    default:
        for (; r + 4 <= rows; r += 4) gemv2_4(x, k, wr + r * ldw_bytes, ldw_bytes, VLM_F16, out + r);
        break;
    }
    for (; r < rows; r++) dot_rows_1w(x, k, 1, k, wr + r * ldw_bytes, dt, out + r);
}

/* ---- small-n BF16 linear (batched decode: n = 4..~48 rows) ----
 * The dot-row kernel above reuses each weight at most 4x and reduces every dot product
 * horizontally: ~52 GFLOP/s at any n on a 2-core Zen 2 (0.24 of its 214 GFLOP/s FMA peak), and the
 * GEMM's weight packing costs as much as the multiply at n = 16 (61 GFLOP/s). This kernel keeps a
 * register tile of 2 weight rows x 4 x rows (8 accumulators, 4 widened weight vectors, 2 x halves:
 * 14 of the 16 ymm registers) over a k chunk, so per 16 weights of each row 2 loads and 4 integer
 * ops feed 16 FMAs, and reduces the 8 accumulators once per chunk. A 256-bit load of 16 bf16 is
 * widened without shuffles: a 32-bit lane holds an even weight in its low half and the next odd
 * one in its high half, so a shift left by 16 gives the even weight's f32 value and masking off
 * the low half the odd one's; x is split once per call into the same even/odd order and laid out
 * [group of 4 rows][block of 16 k][row][even 8 | odd 8] (vlm_smalln_permute_x_avx2), so the tile
 * reads its x from one sequential pointer. 126 GFLOP/s at n = 4..48 on that Zen 2 (bench/matmul);
 * batch-16 decode of the 2B-size model 13.7 -> 36.0 t/s, batch 4 15.3 -> 31.5 t/s. */
#define SMALLN2_R 4
/* k chunk. The per-chunk cost (zeroing, reduction, the add into y) is ~6 iterations' worth:
 * n = 16 at k = 1536 ran 105 / 113 / 120 / 126 / 127 GFLOP/s with chunks of 256 / 512 / 1024 /
 * 2048 / all of k, although past 512 the x of 16 rows no longer fits L1 (the driver then blocks
 * weight rows, and the x of one group, 32 KiB, streams from L2). */
#define SMALLN2_KC 2048

/* x row i's 16-k blocks split into [even 8 | odd 8]: for whole blocks two loads, two shuffles and
 * a lane permute per half (the scalar index loop was ~15% of a batch-16 k/v projection, m = 256). */
__attribute__((target("avx2,fma,f16c"))) void vlm_smalln_permute_x_avx2(const float *x, int64_t n, int64_t k,
                                                                         int64_t i0, int64_t i1, int64_t kp,
                                                                         float *xp) {
    const int64_t nblk = kp / 16, whole = k / 16;
    for (int64_t i = i0; i < i1; i++) {
        const float *xi = x + i * k;
        float *grp = xp + (i / SMALLN2_R) * nblk * (16 * SMALLN2_R) + (i % SMALLN2_R) * 16;
        int64_t b = 0;
        if (i < n)
            for (; b < whole; b++) {
                const __m256 lo = _mm256_loadu_ps(xi + b * 16), hi = _mm256_loadu_ps(xi + b * 16 + 8);
                /* shuffle 0x88 / 0xDD: [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6] and the odd ones; the
                 * 64-bit lane permute (0, 2, 1, 3) puts them in order */
                const __m256 ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8));
                const __m256 od = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8));
                _mm256_store_ps(grp + b * (16 * SMALLN2_R), ev);
                _mm256_store_ps(grp + b * (16 * SMALLN2_R) + 8, od);
            }
        for (; b < nblk; b++) /* k's tail block, and padding rows past n (zeros) */
            for (int p = 0; p < 16; p++) {
                const int64_t src = b * 16 + 2 * (p & 7) + (p >> 3);
                grp[b * (16 * SMALLN2_R) + p] = i < n && src < k ? xi[src] : 0.0f;
            }
    }
}

/* Lane i of the result = the sum of the 8 lanes of v[i]. */
T256 __m256 reduce8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6, __m256 v7) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
    /* u0: 128-bit lane L holds the lane-L partial sums of v0..v3; u1 of v4..v7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* The 16 weights of row w at t, zero past k (AVX2 has no 16-bit masked load: the tail goes
 * through a zeroed copy). */
T256 __m256i smalln2_load_w(const uint16_t *w, int64_t k, int64_t t) {
    if (t + 16 <= k) return _mm256_loadu_si256((const __m256i *)(w + t));
    uint16_t tail[16] = {0};
    if (t < k) memcpy(tail, w + t, (size_t)(k - t) * sizeof(uint16_t));
    return _mm256_loadu_si256((const __m256i *)tail);
}

/* One x row i of the current 16-k block (even half xl, odd half xh) against both widened weight
 * rows (a0/b0, a1/b1). The empty asm keeps each x half in a register for its two FMAs (otherwise
 * gcc folds the load into both, as in the AVX-512 tile). */
#define SMALLN2_ROW(i)                                                                            \
    do {                                                                                          \
        __m256 xl = _mm256_load_ps(x + (i) * 16), xh = _mm256_load_ps(x + (i) * 16 + 8);          \
        __asm__("" : "+x"(xl), "+x"(xh));                                                         \
        c0##i = _mm256_fmadd_ps(xh, b0, _mm256_fmadd_ps(xl, a0, c0##i));                          \
        c1##i = _mm256_fmadd_ps(xh, b1, _mm256_fmadd_ps(xl, a1, c1##i));                          \
    } while (0)

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void smalln2_tile(
    const void *xg, int64_t rows, const uint16_t *w0, const uint16_t *w1, int64_t k, int64_t t0,
    int64_t t1, const uint16_t *pf0, const uint16_t *pf1, float *out) {
    (void)rows; /* padding rows of the last group are zeros: computed, never stored */
    const float *xp = xg;
    const __m256i hi16 = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
           c13 = c00;
    for (int64_t t = t0; t < t1; t += 16) {
        const __m256i v0 = smalln2_load_w(w0, k, t), v1 = smalln2_load_w(w1, k, t);
        if (!(t & 31)) { /* one prefetch per 64-byte line of the next pair */
            _mm_prefetch((const char *)(pf0 + t), _MM_HINT_T0);
            _mm_prefetch((const char *)(pf1 + t), _MM_HINT_T0);
        }
        const __m256 a0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        const __m256 b0 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi16));
        const __m256 a1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
        const __m256 b1 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi16));
        const float *x = xp + t * SMALLN2_R; /* this block's 4 rows x 16, contiguous */
        SMALLN2_ROW(0); SMALLN2_ROW(1); SMALLN2_ROW(2); SMALLN2_ROW(3);
    }
    _mm256_storeu_ps(out, reduce8(c00, c01, c02, c03, c10, c11, c12, c13));
}
#undef SMALLN2_ROW

__attribute__((target("avx2,fma,f16c"))) void vlm_linear_smalln_avx2(const float *xp, int64_t n, int64_t npad,
                                                                      int64_t kp, int64_t k, const uint16_t *w,
                                                                      int64_t j0, int64_t j1, float *y, int64_t ldy) {
    smalln_drive(smalln2_tile, SMALLN2_R, xp, sizeof(float), SMALLN2_KC, n, npad, kp, k, w, j0, j1, y, ldy);
}
