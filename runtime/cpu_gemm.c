/* cpu_gemm.c — vlmd's own blocked GEMM for many-row products (prefill, vision, attention tiles):
 *     C[i, j] (+)= sum_t A[i, t] * B(j, t)      i < n, j < m, t < k
 * A is f32 row-major. B is either a weight matrix [m, k] (F32, BF16 or F16, row stride ldb) as
 * vlm_linear sees it, or an f32 row-major [k, m] matrix (attention's P·V).
 *
 * Structure (the classic Goto/BLIS one, docs/cpu-kernels.md has the measurements):
 *   - B is packed per call, KC x NC at a time, into f32 strips of NR columns ([kc][NR], zero
 *     padded). Packing converts BF16/F16 once per element per call; the packed block is reused by
 *     every row of A, so its cost is ~1/n of the multiply. Weights stay in their checkpoint dtype
 *     (2 bytes/weight for bf16): no persistent f32 copy.
 *   - A is packed KC x MC at a time into strips of MR rows ([kc][MR], zero padded).
 *   - A register-tile micro-kernel (AVX-512 14x32, AVX2 6x16, portable C 4x16) multiplies one A
 *     strip by one B strip with all MR x NR sums in registers, f32 FMA.
 *   - Threads: the output is split statically into one contiguous slab per thread (column slabs
 *     when there are enough NR strips, else row slabs); each thread packs its own blocks, so there
 *     is no synchronisation inside the product and 2 threads scale without contention.
 * Accumulation is f32; the order of the k sum is blocked (KC chunks), like any BLAS. */
#include "runtime/cpu_internal.h"

#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Noreturn void gemm_invariant_failed(const char *what) {
    fprintf(stderr, "vlmd: invariant failed in cpu_gemm.c: %s\n", what);
    abort();
}
#define GEMM_ASSERT(c)                                                                        \
    do {                                                                                      \
        if (!(c)) gemm_invariant_failed(#c);                                                  \
    } while (0)

/* Blocking. The A strip (KC x MR = 14 KiB for KC=256, MR=14) stays in L1 across the NC/NR B
 * strips of the packed B block (KC x NC = 512 KiB, L2), which is streamed once per A strip. The A
 * block (KC x MC, up to 1 MiB, L2/L3) is packed once per KC slice and reused by every NC block,
 * so for n <= MC each element of A and B is packed exactly once per call (packing was ~20% of
 * the time with A re-packed per NC block). */
#define GEMM_KC 256
#define GEMM_NC 512
#define GEMM_MC 1008 /* multiple of every MR (14, 6, 4) */
#define GEMM_MAX_MR 14
#define GEMM_MAX_NR 32

/* One micro-kernel: C[mr x nr tile at c, stride ldc] (= or +=) Ap[kc][MR] . Bp[kc][NR]ᵀ; only
 * the first mv rows and nv columns are written (edge tiles). */
typedef void (*ukr_fn)(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, int mv,
                       int nv, bool acc);
/* How a kernel wants its operands packed: f32 ([kc][MR] and [kc][NR]); bf16 k pairs, one per
 * 4-byte slot, A as [kd][MR] (the AVX512_BF16 kernel broadcasts one row's pair); or bf16 pairs
 * for AMX tiles, A as [MR][kdp] (a tile row is one A row's 16 pairs) with kdp padded to 16. */
typedef enum { PACK_F32, PACK_PAIRS, PACK_AMX } pack_kind;
typedef struct {
    int mr, nr;
    ukr_fn fn;
    const char *name;
    pack_kind pack;
    void (*begin)(void), (*end)(void); /* per-thread set-up around a block (AMX tile config) */
    /* columns per packed B block when not GEMM_NC (0): the AVX2 kernel uses 256, half of a Zen 2's
     * 512 KiB L2 for KC x NC floats (prefill 512 tokens, 2B-size: 60.5 -> 61.8-62.2 t/s) */
    int nc;
} gemm_kernel;

/* Writes the tile t[MR][NR] (row stride nr) into C, only the valid part. */
static inline void store_tile(const float *t, int nr, float *c, int64_t ldc, int mv, int nv,
                              bool acc) {
    for (int i = 0; i < mv; i++)
        for (int j = 0; j < nv; j++) c[i * ldc + j] = acc ? c[i * ldc + j] + t[i * nr + j] : t[i * nr + j];
}

/* ---- portable micro-kernel, 4 x 16: the reference the SIMD ones are tested against ---- */
static void ukr_c_4x16(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, int mv,
                       int nv, bool acc) {
    float t[4 * 16] = {0};
    for (int64_t p = 0; p < kc; p++, ap += 4, bp += 16)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 16; j++) t[i * 16 + j] += ap[i] * bp[j];
    store_tile(t, 16, c, ldc, mv, nv, acc);
}

/* ---- AVX2 + FMA micro-kernel, 6 x 16: 12 accumulators, 2 B vectors, 1 broadcast ---- */
__attribute__((target("avx2,fma"))) static void ukr_avx2_6x16(int64_t kc, const float *ap,
                                                                const float *bp, float *c,
                                                                int64_t ldc, int mv, int nv, bool acc) {
    __m256 c0[6], c1[6];
#pragma GCC unroll 6
    for (int i = 0; i < 6; i++) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int64_t p = 0; p < kc; p++, ap += 6, bp += 16) {
        const __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
#pragma GCC unroll 6
        for (int i = 0; i < 6; i++) {
            const __m256 a = _mm256_broadcast_ss(ap + i);
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
    if (mv == 6 && nv == 16) {
#pragma GCC unroll 6
        for (int i = 0; i < 6; i++) {
            float *ci = c + i * ldc;
            if (acc) {
                c0[i] = _mm256_add_ps(c0[i], _mm256_loadu_ps(ci));
                c1[i] = _mm256_add_ps(c1[i], _mm256_loadu_ps(ci + 8));
            }
            _mm256_storeu_ps(ci, c0[i]);
            _mm256_storeu_ps(ci + 8, c1[i]);
        }
        return;
    }
    float t[6 * 16];
#pragma GCC unroll 6
    for (int i = 0; i < 6; i++) _mm256_storeu_ps(t + i * 16, c0[i]), _mm256_storeu_ps(t + i * 16 + 8, c1[i]);
    store_tile(t, 16, c, ldc, mv, nv, acc);
}

/* The 14 x 32 kernels' accumulators c0[i] (columns 0..15) and c1[i] (16..31) of row i into C (=
 * or +=), only the first mv rows and nv columns: full rows with masked columns straight from the
 * registers, a row tail through a stack tile. Shared by the f32 and AVX512_BF16 kernels. */
__attribute__((target("avx512f"), always_inline)) static inline void store_14x32(
    __m512 *c0, __m512 *c1, float *c, int64_t ldc, int mv, int nv, bool acc) {
    if (mv == 14) {
        /* full rows; columns masked when nv < 32 */
        const __mmask16 k0 = nv >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nv) - 1);
        const __mmask16 k1 = nv >= 32 ? (__mmask16)0xffff : nv <= 16 ? 0 : (__mmask16)((1u << (nv - 16)) - 1);
#pragma GCC unroll 14
        for (int i = 0; i < 14; i++) {
            float *ci = c + i * ldc;
            if (acc) {
                c0[i] = _mm512_add_ps(c0[i], _mm512_maskz_loadu_ps(k0, ci));
                c1[i] = _mm512_add_ps(c1[i], _mm512_maskz_loadu_ps(k1, ci + 16));
            }
            _mm512_mask_storeu_ps(ci, k0, c0[i]);
            _mm512_mask_storeu_ps(ci + 16, k1, c1[i]);
        }
        return;
    }
    float t[14 * 32];
#pragma GCC unroll 14
    for (int i = 0; i < 14; i++) _mm512_storeu_ps(t + i * 32, c0[i]), _mm512_storeu_ps(t + i * 32 + 16, c1[i]);
    store_tile(t, 32, c, ldc, mv, nv, acc);
}

/* ---- AVX-512 micro-kernel, 14 x 32: 28 accumulators + 2 B vectors + 1 broadcast = 31 of the 32
 * zmm registers; per k step 2 loads + 14 broadcasts feed 28 FMAs, enough to keep both FMA ports
 * busy without being load bound. ---- */
__attribute__((target("avx512f"))) static void ukr_avx512_14x32(int64_t kc, const float *ap,
                                                                  const float *bp, float *c,
                                                                  int64_t ldc, int mv, int nv,
                                                                  bool acc) {
    __m512 c0[14], c1[14];
#pragma GCC unroll 14
    for (int i = 0; i < 14; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kc; p++, ap += 14, bp += 32) {
        const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
#pragma GCC unroll 14
        for (int i = 0; i < 14; i++) {
            const __m512 a = _mm512_set1_ps(ap[i]);
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
    store_14x32(c0, c1, c, ldc, mv, nv, acc);
}

/* ---- AVX512_BF16 micro-kernel, 14 x 32, for BF16 weights with A rounded to bf16 ----
 * The packed operands hold k pairs: each 4-byte slot of Ap is (A[i][2q], A[i][2q+1]) and of Bp
 * (B(j, 2q), B(j, 2q+1)) as two bf16, so one vdpbf16ps does 16 columns x 2 k steps, twice the
 * work of an FMA. Products of two bf16 are exact in f32, so the result differs from the f32
 * kernel only by A's rounding to bf16 (round to nearest even) and the order of the f32 sums.
 * Same register plan as the f32 kernel: 28 accumulators, 2 B vectors, 1 broadcast. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void ukr_bf16_14x32(
    int64_t kq, const float *ap, const float *bp, float *c, int64_t ldc, int mv, int nv, bool acc) {
    __m512 c0[14], c1[14];
#pragma GCC unroll 14
    for (int i = 0; i < 14; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (int64_t q = 0; q < kq; q++, ap += 14, bp += 32) {
        const __m512bh b0 = (__m512bh)_mm512_load_ps(bp), b1 = (__m512bh)_mm512_load_ps(bp + 16);
#pragma GCC unroll 14
        for (int i = 0; i < 14; i++) {
            /* a float broadcast moves the pair's bits unchanged (no NaN canonicalisation) */
            const __m512bh a = (__m512bh)_mm512_set1_ps(ap[i]);
            c0[i] = _mm512_dpbf16_ps(c0[i], a, b0);
            c1[i] = _mm512_dpbf16_ps(c1[i], a, b1);
        }
    }
    store_14x32(c0, c1, c, ldc, mv, nv, acc);
}
static const gemm_kernel s_gemm_bf16[] = {
    [VLM_BF16K_AVX512] = {14, 32, ukr_bf16_14x32, "avx512bf16-14x32", PACK_PAIRS, NULL, NULL},
    [VLM_BF16K_AMX] = {32, 32, vlm_amx_ukr_32x32, "amx-32x32", PACK_AMX, vlm_amx_begin, vlm_amx_end},
    [VLM_BF16K_AMX_EMULATED] = {32, 32, vlm_amx_ukr_32x32_emulated, "amx-emulated-32x32", PACK_AMX, NULL, NULL},
};

static const gemm_kernel s_gemm_kernels[VLM_CPU_PATH_COUNT] = {
    [VLM_CPU_SCALAR] = {4, 16, ukr_c_4x16, "c-4x16", PACK_F32, NULL, NULL},
    [VLM_CPU_AVX2] = {6, 16, ukr_avx2_6x16, "avx2-6x16", PACK_F32, NULL, NULL, 256},
    [VLM_CPU_AVX512] = {14, 32, ukr_avx512_14x32, "avx512-14x32", PACK_F32, NULL, NULL},
};

const char *vlm_gemm_kernel_name(vlm_cpu_path p) {
    return (p >= 0 && p < VLM_CPU_PATH_COUNT) ? s_gemm_kernels[p].name : "?";
}

/* ---- packing ---- */
static size_t dt_size(vlm_dtype dt) { return dt == VLM_F32 ? 4 : 2; }

/* Bp[s][p][jj] = B(j0 + s*NR + jj, p0 + p) for the nc x kc block, zero for j >= m. */
static void pack_b(const vlm_gemm_args *g, int64_t j0, int64_t nc, int64_t p0, int64_t kc, int nr,
                   float *bp) {
    const int64_t strips = (nc + nr - 1) / nr;
    if (g->b_kn) { /* f32 [k, m]: a strip row is NR consecutive floats */
        const float *b = (const float *)g->b;
        for (int64_t s = 0; s < strips; s++) {
            const int64_t js = j0 + s * nr, w = nc - s * nr < nr ? nc - s * nr : nr;
            float *dst = bp + s * kc * nr;
            for (int64_t p = 0; p < kc; p++) {
                const float *src = b + (p0 + p) * g->ldb + js;
                int64_t jj = 0;
                for (; jj < w; jj++) dst[p * nr + jj] = src[jj];
                for (; jj < nr; jj++) dst[p * nr + jj] = 0.0f;
            }
        }
        return;
    }
    const size_t esz = dt_size(g->bdt);
    for (int64_t s = 0; s < strips; s++) {
        const int64_t js = j0 + s * nr, w = nc - s * nr < nr ? nc - s * nr : nr;
        float *dst = bp + s * kc * nr;
        for (int64_t jj = 0; jj < w; jj++) { /* each weight row: kc contiguous elements */
            const char *src = (const char *)g->b + ((size_t)(js + jj) * (size_t)g->ldb + (size_t)p0) * esz;
            if (g->bdt == VLM_BF16) {
                const uint16_t *h = (const uint16_t *)src;
                for (int64_t p = 0; p < kc; p++) dst[p * nr + jj] = vlm_bf16_to_f32(h[p]);
            } else if (g->bdt == VLM_F32) {
                const float *f = (const float *)src;
                for (int64_t p = 0; p < kc; p++) dst[p * nr + jj] = f[p];
            } else {
                float tmp[GEMM_KC];
                vlm_cpu_convert_row(src, g->bdt, kc, tmp);
                for (int64_t p = 0; p < kc; p++) dst[p * nr + jj] = tmp[p];
            }
        }
        for (int64_t jj = w; jj < nr; jj++)
            for (int64_t p = 0; p < kc; p++) dst[p * nr + jj] = 0.0f;
    }
}

/* Ap[s][p][ii] = A(i0 + s*MR + ii, p0 + p) for the mc x kc block, zero for rows past mc. */
static void pack_a(const float *a, int64_t lda, int64_t i0, int64_t mc, int64_t p0, int64_t kc,
                   int mr, float *ap) {
    const int64_t strips = (mc + mr - 1) / mr;
    for (int64_t s = 0; s < strips; s++) {
        const int64_t h = mc - s * mr < mr ? mc - s * mr : mr;
        float *dst = ap + s * kc * mr;
        for (int64_t ii = 0; ii < h; ii++) {
            const float *src = a + (i0 + s * mr + ii) * lda + p0;
            for (int64_t p = 0; p < kc; p++) dst[p * mr + ii] = src[p];
        }
        for (int64_t ii = h; ii < mr; ii++)
            for (int64_t p = 0; p < kc; p++) dst[p * mr + ii] = 0.0f;
    }
}

/* AVX-512 packers for the 14x32 kernel: one gather per k step instead of 14 (A) or 32 (B) scalar
 * strided stores (packing was ~20% of a prefill GEMM in perf before). Lanes of rows past the
 * edge are masked off, so they read nothing and pack as zero. Return false when the gather
 * offsets would not fit int32 (then the portable packers run). */
__attribute__((target("avx512f"))) static bool pack_a_avx512(const float *a, int64_t lda, int64_t i0,
                                                              int64_t mc, int64_t p0, int64_t kc,
                                                              float *ap) {
    if (lda > INT32_MAX / 16) return false;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)lda));
    for (int64_t s = 0; s * 14 < mc; s++) {
        const int64_t h = mc - s * 14 < 14 ? mc - s * 14 : 14;
        const __mmask16 mask = (__mmask16)((1u << h) - 1);
        const float *base = a + (i0 + s * 14) * lda + p0;
        float *dst = ap + s * kc * 14;
        for (int64_t p = 0; p < kc; p++)
            _mm512_mask_storeu_ps(dst + p * 14, 0x3fff,
                                  _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, base + p, 4));
    }
    return true;
}

__attribute__((target("avx512f"))) static bool pack_b_avx512(const vlm_gemm_args *g, int64_t j0,
                                                              int64_t nc, int64_t p0, int64_t kc,
                                                              float *bp) {
    if (g->b_kn || g->bdt == VLM_F16 || g->ldb > INT32_MAX / 64) return false;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i idx0 = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)g->ldb));
    const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32((int)(16 * g->ldb)));
    for (int64_t s = 0; s * 32 < nc; s++) {
        const int64_t w = nc - s * 32 < 32 ? nc - s * 32 : 32;
        const __mmask16 m0 = w >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << w) - 1);
        const __mmask16 m1 = w >= 32 ? (__mmask16)0xffff : w <= 16 ? 0 : (__mmask16)((1u << (w - 16)) - 1);
        float *dst = bp + s * kc * 32;
        if (g->bdt == VLM_F32) {
            const float *base = (const float *)g->b + (j0 + s * 32) * g->ldb + p0;
            for (int64_t p = 0; p < kc; p++) {
                _mm512_store_ps(dst + p * 32, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, idx0, base + p, 4));
                _mm512_store_ps(dst + p * 32 + 16, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, idx1, base + p, 4));
            }
            continue;
        }
        /* BF16: a 32-bit gather at element p-1 holds element p in its high half, which is exactly
         * that element's f32 bit pattern once the low half is cleared; reading from p-1 (not p)
         * never touches memory past element p. Element 0 of each row is packed with scalars. */
        const uint16_t *base = (const uint16_t *)g->b + (j0 + s * 32) * g->ldb + p0;
        /* The 32 rows are 32 separate streams that the hardware prefetcher does not follow: without
         * this, packing waited on a DRAM miss per row and cache line (perf: ~20% of a prefill, most
         * of it on the first load of each row). So while strip s is packed, the same lines of
         * strip s + 1 are prefetched, one row per k step. */
        const int64_t wn = nc - (s + 1) * 32 < 32 ? nc - (s + 1) * 32 : 32;
        const uint16_t *next = base + 32 * g->ldb;
        for (int64_t jj = 0; jj < 32; jj++)
            dst[jj] = jj < w ? vlm_bf16_to_f32(base[jj * g->ldb]) : 0.0f;
        const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
        for (int64_t p = 1; p < kc; p++) {
            const int64_t r = p & 31, line = p & ~(int64_t)31;
            if (r < wn) _mm_prefetch((const char *)(next + r * g->ldb + line), _MM_HINT_T0);
            const __m512i v0 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m0, idx0, base + p - 1, 2);
            const __m512i v1 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m1, idx1, base + p - 1, 2);
            _mm512_store_ps(dst + p * 32, _mm512_castsi512_ps(_mm512_and_si512(v0, hi)));
            _mm512_store_ps(dst + p * 32 + 16, _mm512_castsi512_ps(_mm512_and_si512(v1, hi)));
        }
    }
    return true;
}

/* AVX2 packer for the 6x16 kernel's B (BF16 or F32 weight rows, [m, k]): per whole strip of 16
 * rows and 8 k, eight rows' 8 values are loaded (bf16 widened by a zero-extend and shift), and an
 * 8x8 transpose (unpack, shuffle, 128-bit permute) writes the 8 k steps of 8 columns; the k tail
 * and a partial last strip go through the portable packer. The scalar loop was ~8% of a 512-token
 * prefill on a Zen 2. While strip s is packed, strip s + 1's rows are prefetched one 64-byte line
 * ahead, as pack_b_avx512 does (16 separate row streams). */
__attribute__((target("avx2,fma"))) static inline __m256 load8_b(const vlm_gemm_args *g, int64_t row, int64_t p) {
    if (g->bdt == VLM_F32) return _mm256_loadu_ps((const float *)g->b + row * g->ldb + p);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)g->b + row * g->ldb + p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* dst[q * 16 + i] = r[i][q] for 8 rows r of 8 floats (q = 0..7): the transposed 8x8 block. */
__attribute__((target("avx2,fma"))) static inline void store_t8x8(__m256 r[8], float *dst) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) { /* rows 0-3 (h = 0) and 4-7 */
        u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
        u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
        u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int q = 0; q < 4; q++) {
        _mm256_store_ps(dst + q * 16, _mm256_permute2f128_ps(u[q], u[4 + q], 0x20));
        _mm256_store_ps(dst + (q + 4) * 16, _mm256_permute2f128_ps(u[q], u[4 + q], 0x31));
    }
}

__attribute__((target("avx2,fma"))) static bool pack_b_avx2(const vlm_gemm_args *g, int64_t j0, int64_t nc,
                                                           int64_t p0, int64_t kc, float *bp) {
    if (g->b_kn || (g->bdt != VLM_BF16 && g->bdt != VLM_F32)) return false;
    const int64_t whole = nc / 16, kv = kc / 8 * 8;
    for (int64_t s = 0; s < whole; s++) {
        const int64_t r0 = j0 + s * 16;
        float *dst = bp + s * kc * 16;
        const bool next = s + 1 < whole;
        for (int64_t p = 0; p < kv; p += 8) {
            if (next) { /* 4 of the next strip's rows per 8 k: all 16 per 64-byte line of bf16 */
                const int64_t line = (p & ~(int64_t)31), q = (p >> 3) & 3;
                for (int64_t i = 4 * q; i < 4 * q + 4; i++)
                    _mm_prefetch((const char *)g->b + ((r0 + 16 + i) * g->ldb + p0 + line) * (int64_t)dt_size(g->bdt),
                                 _MM_HINT_T0);
            }
            for (int half = 0; half < 2; half++) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = load8_b(g, r0 + 8 * half + i, p0 + p);
                store_t8x8(r, dst + p * 16 + 8 * half);
            }
        }
        for (int64_t p = kv; p < kc; p++)
            for (int64_t i = 0; i < 16; i++) {
                const char *src = (const char *)g->b + ((r0 + i) * g->ldb + p0 + p) * (int64_t)dt_size(g->bdt);
                dst[p * 16 + i] = g->bdt == VLM_F32 ? *(const float *)src : vlm_bf16_to_f32(*(const uint16_t *)src);
            }
    }
    if (whole * 16 < nc) pack_b(g, j0 + whole * 16, nc - whole * 16, p0, kc, 16, bp + whole * kc * 16);
    return true;
}

/* ---- packing for the AVX512_BF16 kernel: k pairs, kd = ceil(kc / 2) slots per row ----
 * Ap[s][q][ii] = (bf16(A[i][p0 + 2q]), bf16(A[i][p0 + 2q + 1])), zero past kc and past mc: each
 * row's 32 floats become 16 pairs with one vcvtne2ps2bf16 and are scattered into the strip. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void pack_a_bf16(
    const float *a, int64_t lda, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float *ap) {
    const int64_t kd = (kc + 1) / 2;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(14));
    for (int64_t s = 0; s * 14 < mc; s++) {
        const int64_t h = mc - s * 14 < 14 ? mc - s * 14 : 14;
        float *dst = ap + s * kd * 14;
        for (int64_t ii = 0; ii < 14; ii++) {
            if (ii >= h) {
                for (int64_t q = 0; q < kd; q++) dst[q * 14 + ii] = 0.0f;
                continue;
            }
            const float *src = a + (i0 + s * 14 + ii) * lda + p0;
            for (int64_t q0 = 0; q0 < kd; q0 += 16) {
                const int64_t ne = kc - 2 * q0 < 32 ? kc - 2 * q0 : 32, nq = kd - q0 < 16 ? kd - q0 : 16;
                const __m512i v = vlm_bf16x32(src + 2 * q0, ne);
                _mm512_mask_i32scatter_epi32(dst + q0 * 14 + ii, (__mmask16)((1u << nq) - 1), idx, v, 4);
            }
        }
    }
}

/* out[c] = column c of the 16x16 dword matrix v[0..15] (v[r] = row r), in registers: 32-bit
 * interleaves give each 128-bit lane 4x4 blocks, 64-bit interleaves finish them, two rounds
 * of 128-bit lane shuffles put the blocks in place (64 shuffles per 256 dwords). */
__attribute__((target("avx512f"))) static inline void transpose16_epi32(const __m512i *v, __m512i *out) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++)
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    /* u[4i + j], lane L: rows 4i..4i+3 of column 4L + j */
    for (int i = 0; i < 4; i++) {
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i a = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), b = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
        const __m512i c = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), d = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
        out[j] = _mm512_shuffle_i32x4(a, c, 0x88), out[4 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);
        out[8 + j] = _mm512_shuffle_i32x4(b, d, 0x88), out[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);
    }
}

/* B for the pair kernels: Bp[s][q][jj] = (B(j, p0 + 2q), B(j, p0 + 2q + 1)), j = j0 + s*32 + jj,
 * zero for j >= m and past kc; kds >= kd pair rows per strip (AMX pads to a multiple of 16), rows
 * kd..kds-1 zero. A BF16 weight row already stores its k pairs side by side, so each strip of 32
 * rows is a 32 x kd matrix of dwords and the packed strip is its transpose; an odd kc's last pair
 * is built with scalars (its second half would be past kc). The rows are read a cache line
 * (16 pairs) at a time and transposed in 16x16 blocks in registers: with dword gathers (the earlier
 * packer) this was a quarter of a 16-row batched decode step on a Xeon, where gathers are slow. */
__attribute__((target("avx512f,avx512bw"))) static void pack_b_bf16(const vlm_gemm_args *g, int64_t j0,
                                                                    int64_t nc, int64_t p0, int64_t kc,
                                                                    int64_t kds, float *bp) {
    const int64_t kd = (kc + 1) / 2, kfull = kc / 2;
    for (int64_t s = 0; s * 32 < nc; s++) {
        const int64_t w = nc - s * 32 < 32 ? nc - s * 32 : 32;
        float *dst = bp + s * kds * 32;
        const uint16_t *base = (const uint16_t *)g->b + (j0 + s * 32) * g->ldb + p0;
        const int64_t wn = nc - (s + 1) * 32 < 32 ? nc - (s + 1) * 32 : 32;
        const uint16_t *next = base + 32 * g->ldb;
        for (int64_t q0 = 0; q0 < kfull; q0 += 16) {
            const int64_t nq = kfull - q0 < 16 ? kfull - q0 : 16;
            const __mmask16 mq = nq == 16 ? (__mmask16)0xffff : (__mmask16)((1u << nq) - 1);
            for (int h = 0; h < 2; h++) {
                __m512i v[16], o[16];
                for (int r = 0; r < 16; r++) {
                    const int64_t jj = 16 * h + r;
                    /* the same line of the next strip's row, for the hardware's sake one strip ahead */
                    if (jj < wn) _mm_prefetch((const char *)(next + jj * g->ldb + 2 * q0), _MM_HINT_T0);
                    v[r] = jj < w ? _mm512_maskz_loadu_epi32(mq, base + jj * g->ldb + 2 * q0) : _mm512_setzero_si512();
                }
                transpose16_epi32(v, o);
                for (int64_t qq = 0; qq < nq; qq++) _mm512_store_si512(dst + (q0 + qq) * 32 + 16 * h, o[qq]);
            }
        }
        if (kfull < kd) { /* odd kc: (last element, 0) */
            uint32_t last[32];
            for (int64_t jj = 0; jj < 32; jj++) last[jj] = jj < w ? base[jj * g->ldb + 2 * kfull] : 0;
            _mm512_store_si512(dst + kfull * 32, _mm512_loadu_si512(last));
            _mm512_store_si512(dst + kfull * 32 + 16, _mm512_loadu_si512(last + 16));
        }
        for (int64_t q = kd; q < kds; q++) {
            _mm512_store_si512(dst + q * 32, _mm512_setzero_si512());
            _mm512_store_si512(dst + q * 32 + 16, _mm512_setzero_si512());
        }
    }
}

/* A for AMX tiles: Ap[s][ii][q] = (bf16(A[i][p0 + 2q]), bf16(A[i][p0 + 2q + 1])), i = i0 + s*32 + ii,
 * kdp slots per row (zero past kc), rows past mc zero. Each row converts with vcvtne2ps2bf16 where
 * the CPU has it (every AMX CPU does), else with the scalar rounding. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void pack_a_amx_row_simd(
    const float *src, int64_t kc, int64_t kdp, float *dst) {
    for (int64_t q0 = 0; q0 < kdp; q0 += 16)
        _mm512_store_si512(dst + q0, vlm_bf16x32(src + 2 * q0, kc - 2 * q0 < 32 ? kc - 2 * q0 : 32));
}
static void pack_a_amx(const float *a, int64_t lda, int64_t i0, int64_t mc, int64_t p0, int64_t kc,
                       int64_t kdp, bool simd, float *ap) {
    const int64_t strips = (mc + 31) / 32;
    for (int64_t r = 0; r < strips * 32; r++) {
        float *dst = ap + r * kdp;
        if (r >= mc) {
            memset(dst, 0, (size_t)kdp * 4);
            continue;
        }
        const float *src = a + (i0 + r) * lda + p0;
        if (simd) {
            pack_a_amx_row_simd(src, kc, kdp, dst);
            continue;
        }
        uint32_t *d = (uint32_t *)dst;
        for (int64_t q = 0; q < kdp; q++) {
            const uint32_t lo = 2 * q < kc ? vlm_f32_to_bf16(src[2 * q]) : 0;
            const uint32_t hi = 2 * q + 1 < kc ? vlm_f32_to_bf16(src[2 * q + 1]) : 0;
            d[q] = lo | hi << 16;
        }
    }
}

/* Bytes of packing buffer one thread needs (A block + B block), 64-byte aligned pieces. */
size_t vlm_gemm_scratch_bytes(void) {
    return ((size_t)GEMM_KC * GEMM_MC + (size_t)GEMM_KC * (GEMM_NC + GEMM_MAX_NR)) * sizeof(float) + 128;
}

float *vlm_gemm_thread_scratch(void) {
    return vlm_cpu_thread_buffer(VLM_CPU_BUF_GEMM, vlm_gemm_scratch_bytes());
}

/* The product restricted to rows [i_lo, i_hi) and columns [j_lo, j_hi), on the calling thread. */
static void gemm_block(const vlm_gemm_args *g, const gemm_kernel *kr, int64_t i_lo, int64_t i_hi,
                       int64_t j_lo, int64_t j_hi, float *scratch) {
    const int mr = kr->mr, nr = kr->nr;
    float *ap = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *bp = ap + (size_t)GEMM_KC * GEMM_MC;
    const bool simd_pack = kr->fn == ukr_avx512_14x32; /* packers laid out for 14 x 32 */
    /* bf16 kernels' 4-byte slots hold a k pair: same buffer bytes, twice the k per block */
    const int64_t kblock = kr->pack == PACK_F32 ? GEMM_KC : 2 * GEMM_KC;
    const int64_t mcmax = GEMM_MC / mr * mr; /* whole strips within the A buffer */
    const int64_t ncb = kr->nc > 0 ? kr->nc : GEMM_NC; /* at most GEMM_NC: the B buffer's size */
    if (kr->begin) kr->begin();
    for (int64_t pc = 0; pc < g->k; pc += kblock) {
        const int64_t kc = g->k - pc < kblock ? g->k - pc : kblock;
        /* packed depth in 4-byte slots */
        const int64_t kd = kr->pack == PACK_F32 ? kc : kr->pack == PACK_PAIRS ? (kc + 1) / 2 : (kc + 31) / 32 * 16;
        const bool acc = g->accumulate || pc > 0;
        for (int64_t ic = i_lo; ic < i_hi; ic += mcmax) {
            const int64_t mc = i_hi - ic < mcmax ? i_hi - ic : mcmax;
            if (kr->pack == PACK_PAIRS)
                pack_a_bf16(g->a, g->lda, ic, mc, pc, kc, ap);
            else if (kr->pack == PACK_AMX)
                pack_a_amx(g->a, g->lda, ic, mc, pc, kc, kd, vlm_cpu_has_avx512bf16(), ap);
            else if (!(simd_pack && pack_a_avx512(g->a, g->lda, ic, mc, pc, kc, ap)))
                pack_a(g->a, g->lda, ic, mc, pc, kc, mr, ap);
            for (int64_t jc = j_lo; jc < j_hi; jc += ncb) {
                const int64_t nc = j_hi - jc < ncb ? j_hi - jc : ncb;
                if (kr->pack != PACK_F32)
                    pack_b_bf16(g, jc, nc, pc, kc, kd, bp);
                else if (!(simd_pack && pack_b_avx512(g, jc, nc, pc, kc, bp)) &&
                         !(kr->fn == ukr_avx2_6x16 && pack_b_avx2(g, jc, nc, pc, kc, bp)))
                    pack_b(g, jc, nc, pc, kc, nr, bp);
                for (int64_t ir = 0; ir < mc; ir += mr) {
                    const int mv = (int)(mc - ir < mr ? mc - ir : mr);
                    const float *as = ap + (ir / mr) * kd * mr;
                    for (int64_t jr = 0; jr < nc; jr += nr) {
                        const int nv = (int)(nc - jr < nr ? nc - jr : nr);
                        kr->fn(kd, as, bp + (jr / nr) * kd * nr, g->c + (ic + ir) * g->ldc + jc + jr,
                               g->ldc, mv, nv, acc);
                    }
                }
            }
        }
    }
    if (kr->end) kr->end();
}

static void gemm_k0(const vlm_gemm_args *g, int64_t i_lo, int64_t i_hi) {
    if (g->accumulate) return;
    for (int64_t i = i_lo; i < i_hi; i++) memset(g->c + i * g->ldc, 0, (size_t)g->m * sizeof(float));
}

static const gemm_kernel *pick_kernel(const vlm_gemm_args *g, vlm_cpu_path path) {
    if (g->bf16 == VLM_BF16K_NONE) return &s_gemm_kernels[path];
    GEMM_ASSERT(g->bdt == VLM_BF16 && !g->b_kn && g->bf16 > 0 && g->bf16 < VLM_BF16K_COUNT);
    return &s_gemm_bf16[g->bf16];
}

const char *vlm_gemm_bf16_kernel_name(vlm_bf16_kernel k) {
    return k > VLM_BF16K_NONE && k < VLM_BF16K_COUNT ? s_gemm_bf16[k].name : "none";
}

void vlm_gemm_serial(const vlm_gemm_args *g, vlm_cpu_path path, float *scratch) {
    GEMM_ASSERT(path >= 0 && path < VLM_CPU_PATH_COUNT);
    GEMM_ASSERT(g->n >= 0 && g->m >= 0 && g->k >= 0 && g->ldc >= g->m && g->lda >= g->k);
    if (g->n == 0 || g->m == 0) return;
    if (g->k == 0) return gemm_k0(g, 0, g->n);
    gemm_block(g, pick_kernel(g, path), 0, g->n, 0, g->m, scratch ? scratch : vlm_gemm_thread_scratch());
}

void vlm_gemm_parallel(const vlm_gemm_args *g, vlm_cpu_path path) {
    GEMM_ASSERT(path >= 0 && path < VLM_CPU_PATH_COUNT);
    GEMM_ASSERT(g->n >= 0 && g->m >= 0 && g->k >= 0 && g->ldc >= g->m && g->lda >= g->k);
    if (g->n == 0 || g->m == 0) return;
    const gemm_kernel *kr = pick_kernel(g, path);
    const int64_t nstrips = (g->m + kr->nr - 1) / kr->nr, mstrips = (g->n + kr->mr - 1) / kr->mr;
    int nt = omp_get_max_threads();
    if (omp_in_parallel()) nt = 1;
    /* Column slabs when every thread gets >= 2 B strips: A is then re-packed per thread (cheap),
     * B (the weights) is read by one thread only. Else row slabs. */
    const bool by_cols = nstrips >= 2 * nt || nstrips >= mstrips;
    const int64_t units = by_cols ? nstrips : mstrips;
    if (units < nt) nt = (int)(units > 0 ? units : 1);
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t u0 = units * t / T, u1 = units * (t + 1) / T;
        int64_t i_lo = 0, i_hi = g->n, j_lo = 0, j_hi = g->m;
        if (by_cols) {
            j_lo = u0 * kr->nr;
            j_hi = u1 * kr->nr < g->m ? u1 * kr->nr : g->m;
        } else {
            i_lo = u0 * kr->mr;
            i_hi = u1 * kr->mr < g->n ? u1 * kr->mr : g->n;
        }
        if (i_lo < i_hi && j_lo < j_hi) {
            if (g->k == 0) {
                if (!g->accumulate)
                    for (int64_t i = i_lo; i < i_hi; i++)
                        memset(g->c + i * g->ldc + j_lo, 0, (size_t)(j_hi - j_lo) * sizeof(float));
            } else {
                gemm_block(g, kr, i_lo, i_hi, j_lo, j_hi, vlm_gemm_thread_scratch());
            }
        }
    }
}

/* ---- AVX512_BF16 probes (cpu.c decides with them whether the bf16 kernel runs) ---- */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) bool vlm_bf16_dot_selftest(void) {
    /* lane i: (1 + i/8) * 2 + (-0.5) * (i + 1), every value exact in bf16 */
    float a[32], b[32], out[16];
    for (int i = 0; i < 16; i++) {
        a[2 * i] = 1.0f + (float)i / 8, b[2 * i] = 2.0f;
        a[2 * i + 1] = -0.5f, b[2 * i + 1] = (float)(i + 1);
    }
    const __m512bh va = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(a + 16), _mm512_loadu_ps(a));
    const __m512bh vb = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(b + 16), _mm512_loadu_ps(b));
    _mm512_storeu_ps(out, _mm512_dpbf16_ps(_mm512_set1_ps(1.0f), va, vb));
    for (int i = 0; i < 16; i++)
        if (out[i] != 1.0f + (1.0f + (float)i / 8) * 2.0f - 0.5f * (float)(i + 1)) return false;
    return true;
}

static double probe_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Throughput of 8 independent chains of one instruction, best of 5 short runs (~20 us each):
 * instructions per second. The asm barrier keeps the operands in registers and the loop alive. */
#define PROBE_ITERS 4096
#define PROBE_LOOP(op)                                                                        \
    double best = 0;                                                                          \
    for (int rep = 0; rep < 5; rep++) {                                                       \
        __m512 c0 = z, c1 = z, c2 = z, c3 = z, c4 = z, c5 = z, c6 = z, c7 = z;                \
        const double t0 = probe_now();                                                        \
        for (int it = 0; it < PROBE_ITERS; it++) {                                            \
            c0 = op(c0), c1 = op(c1), c2 = op(c2), c3 = op(c3);                               \
            c4 = op(c4), c5 = op(c5), c6 = op(c6), c7 = op(c7);                               \
            __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), \
                             "+v"(c6), "+v"(c7));                                             \
        }                                                                                     \
        const double dt = probe_now() - t0, rate = dt > 0 ? 8.0 * PROBE_ITERS / dt : 0;       \
        if (rate > best) best = rate;                                                         \
    }                                                                                         \
    return best;

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static double probe_dpbf16(void) {
    const __m512 z = _mm512_setzero_ps();
    const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x20002000);
#define DP(c) _mm512_dpbf16_ps(c, a, b)
    PROBE_LOOP(DP)
#undef DP
}

__attribute__((target("avx512f"))) static double probe_fma(void) {
    const __m512 z = _mm512_setzero_ps(), a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1e-9f);
#define FMA(c) _mm512_fmadd_ps(a, b, c)
    PROBE_LOOP(FMA)
#undef FMA
}

double vlm_bf16_dot_gain(void) {
    const double fma = probe_fma(), dp = probe_dpbf16();
    return fma > 0 ? 2.0 * dp / fma : 0; /* a vdpbf16ps does twice an FMA's multiply-adds */
}
