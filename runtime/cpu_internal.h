/* cpu_internal.h — internal interface between the CPU kernel dispatcher (cpu.c) and the
 * per-ISA kernel files (cpu_avx2.c, cpu_avx512.c). Not part of the public runtime API; tests and
 * benches include it to force a kernel path. */
#ifndef VLM_CPU_INTERNAL_H
#define VLM_CPU_INTERNAL_H

#include "runtime/runtime.h"

#include <immintrin.h>

/* Kernel paths for vlm_linear, best last. */
typedef enum { VLM_CPU_SCALAR = 0, VLM_CPU_AVX2, VLM_CPU_AVX512, VLM_CPU_PATH_COUNT } vlm_cpu_path;

/* out[r * VLM_DOT_MAX_ROWS + i] = dot(x[i*ldx .. +k], weight row r) for i < nx and r < nw, with
 * 1 <= nx <= VLM_DOT_MAX_ROWS and 1 <= nw <= VLM_DOT_MAX_WROWS; weight row r starts at
 * w + r * ldw_bytes, in dtype dt (F32, BF16 or F16). Accumulation is f32 in any order. Taking two
 * weight rows per call lets a kernel reuse each x load twice (n > 1 is compute bound). */
#define VLM_DOT_MAX_ROWS 4
#define VLM_DOT_MAX_WROWS 2
typedef void (*vlm_dot_rows_fn)(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                                size_t ldw_bytes, int nw, vlm_dtype dt, float *out);

void vlm_dot_rows_scalar(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                         size_t ldw_bytes, int nw, vlm_dtype dt, float *out);
void vlm_dot_rows_avx2(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                       size_t ldw_bytes, int nw, vlm_dtype dt, float *out);
void vlm_dot_rows_avx512(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                         size_t ldw_bytes, int nw, vlm_dtype dt, float *out);

/* n = 1 GEMV (AVX-512 F+BW): out[r] = dot(x[0..k), weight row r) for r < rows, rows at
 * w + r * ldw_bytes in dtype dt; four rows streamed side by side with software prefetch. */
void vlm_gemv_avx512(const float *x, int64_t k, const void *w, size_t ldw_bytes, int64_t rows,
                     vlm_dtype dt, float *out);
/* The same with AVX2 + FMA (+ F16C), cpu_avx2.c. */
void vlm_gemv_avx2(const float *x, int64_t k, const void *w, size_t ldw_bytes, int64_t rows,
                   vlm_dtype dt, float *out);

/* The calling thread's work buffer `which`, at least `bytes`, 64-byte aligned; kept (and grown)
 * across calls and freed when the thread exits (cpu.c). Contents are undefined on return. */
typedef enum { VLM_CPU_BUF_GEMM = 0, VLM_CPU_BUF_SMALLN_X, VLM_CPU_BUF_COUNT } vlm_cpu_buf;
void *vlm_cpu_thread_buffer(vlm_cpu_buf which, size_t bytes);

/* Small-n BF16 linear (AVX-512 F+BW, cpu_avx512.c), for batched decode. x [n, k] is first permuted
 * into xp (npad x kp floats: npad = n rounded up to 8, kp = k rounded up to 32, zero padded, 64-byte
 * aligned, in the kernel's [row group][k block][8][32] order) by vlm_smalln_permute_x for rows [i0, i1); then vlm_linear_smalln_avx512 writes
 * y[i * ldy + j] = dot(x row i, W row j) for i < n and j0 <= j < j1, W = bf16 [m, k] rows. */
void vlm_smalln_permute_x(const float *x, int64_t n, int64_t k, int64_t i0, int64_t i1, int64_t kp,
                          float *xp);
void vlm_linear_smalln_avx512(const float *xp, int64_t n, int64_t npad, int64_t kp, int64_t k,
                              const uint16_t *w, int64_t j0, int64_t j1, float *y, int64_t ldy);

/* The same product with AVX512_BF16 (cpu_avx512.c), where the bf16 kernel choice is AVX512_BF16
 * (vdpbf16ps faster than FMA): x rounded to bf16 into xb (npad x kp bf16, [row group][k block]
 * [8][32], 64-byte aligned) by vlm_smalln_pack_x_bf16 for rows [i0, i1), weights used in place. */
void vlm_smalln_pack_x_bf16(const float *x, int64_t n, int64_t k, int64_t i0, int64_t i1, int64_t kp,
                            uint16_t *xb);
void vlm_linear_smalln_bf16(const uint16_t *xb, int64_t n, int64_t npad, int64_t kp, int64_t k,
                            const uint16_t *w, int64_t j0, int64_t j1, float *y, int64_t ldy);

/* The small-n BF16 product on AVX2 (cpu_avx2.c): x permuted into xp (npad = n rounded up to 4,
 * kp = k rounded up to 16, zero padded, 32-byte aligned, [row group of 4][k block of 16][4][16])
 * by vlm_smalln_permute_x_avx2 for rows [i0, i1), then the same y as vlm_linear_smalln_avx512. */
void vlm_smalln_permute_x_avx2(const float *x, int64_t n, int64_t k, int64_t i0, int64_t i1, int64_t kp,
                               float *xp);
void vlm_linear_smalln_avx2(const float *xp, int64_t n, int64_t npad, int64_t kp, int64_t k,
                            const uint16_t *w, int64_t j0, int64_t j1, float *y, int64_t ldy);

/* Largest n for which vlm_linear takes the small-n kernel (bf16 weights on the AVX-512 or AVX2
 * path); 0 disables it (tests use this to cover the other paths), -1 is each path's default.
 * Returns the previous value. */
int64_t vlm_cpu_set_smalln_max_rows(int64_t rows);

/* Converts n weight elements of dtype dt to f32 (used by the GEMM path for large n). */
void vlm_cpu_convert_row(const void *w, vlm_dtype dt, int64_t n, float *out);

/* Forces the vlm_linear path: "scalar", "avx2", "avx512" or "auto". Returns 0, or -1 when the
 * name is unknown or this CPU lacks the features (the path is then unchanged). The environment
 * variable VLMD_CPU_PATH does the same at vlm_cpu_init. */
int vlm_cpu_force_path(const char *name);
/* Which vlm_linear path is active, and whether a path can run on this CPU. */
vlm_cpu_path vlm_cpu_active_path(void);
bool vlm_cpu_path_supported(vlm_cpu_path p);
const char *vlm_cpu_path_name(vlm_cpu_path p);

/* Rows of x at or above which vlm_linear uses the blocked GEMM instead of the dot-row kernels;
 * 0 disables the GEMM path (tests use this to cover both). Returns the previous value. */
int64_t vlm_cpu_set_gemm_min_rows(int64_t rows);

/* BF16-weight GEMM kernels that multiply bf16 x bf16 in hardware (A, the activations, rounded to
 * bf16 nearest-even; sums in f32): AVX512_BF16 vdpbf16ps (cpu_gemm.c), AMX TDPBF16PS tiles
 * (cpu_amx.c), and the AMX kernel on a C model of the tile instructions (tests only). */
typedef enum {
    VLM_BF16K_NONE = 0,
    VLM_BF16K_AVX512,
    VLM_BF16K_AMX,
    VLM_BF16K_AMX_EMULATED,
    VLM_BF16K_COUNT
} vlm_bf16_kernel;

/* ---- blocked GEMM (cpu_gemm.c) ----
 * C[i, j] = (accumulate ? C[i, j] : 0) + sum_t A[i, t] * B(j, t), i < n, j < m, t < k, where
 * B(j, t) = b[j * ldb + t] in dtype bdt (F32/BF16/F16; a weight matrix [m, k]) when !b_kn, or
 * ((const float *)b)[t * ldb + j] (an f32 [k, m] matrix) when b_kn. With accumulate false, C's
 * previous contents (even NaN) are ignored. */
typedef struct {
    int64_t n, m, k;
    const float *a;
    int64_t lda;
    const void *b;
    vlm_dtype bdt;
    int64_t ldb;
    bool b_kn;
    float *c;
    int64_t ldc;
    bool accumulate;
    /* A bf16 hardware kernel (bdt must be BF16, !b_kn), or NONE for the path's f32 kernel. Only
     * one the CPU runs (vlm_cpu_bf16_kernel()). */
    vlm_bf16_kernel bf16;
} vlm_gemm_args;
/* On the calling thread only (for callers that parallelise over independent products, e.g.
 * attention heads), with the micro-kernel of `path`; scratch is vlm_gemm_scratch_bytes() bytes
 * the caller owns (reused across calls), or NULL to allocate one for this call. */
void vlm_gemm_serial(const vlm_gemm_args *g, vlm_cpu_path path, float *scratch);
size_t vlm_gemm_scratch_bytes(void);
/* The calling thread's own scratch of that size (vlm_cpu_thread_buffer). */
float *vlm_gemm_thread_scratch(void);
/* Split statically over the OpenMP threads (one output slab each); runs serially when called
 * inside a parallel region. */
void vlm_gemm_parallel(const vlm_gemm_args *g, vlm_cpu_path path);
const char *vlm_gemm_kernel_name(vlm_cpu_path p);
const char *vlm_gemm_bf16_kernel_name(vlm_bf16_kernel k);

/* AMX (cpu_amx.c). vlm_amx_request asks Linux for the tile state (once per process; false where
 * the kernel or CPU has none). vlm_amx_begin/end load and release the tile configuration on the
 * calling thread around a block of kernel calls. The micro-kernels: C[32 x 32] (=/+=) over kdp
 * bf16 pairs (a multiple of 16); Ap [32][kdp] slots, Bp [kdp][32] slots (cpu_gemm.c packs them). */
bool vlm_amx_request(void);
void vlm_amx_begin(void);
void vlm_amx_end(void);
void vlm_amx_ukr_32x32(int64_t kdp, const float *ap, const float *bp, float *c, int64_t ldc, int mv,
                       int nv, bool acc);
void vlm_amx_ukr_32x32_emulated(int64_t kdp, const float *ap, const float *bp, float *c, int64_t ldc,
                                int mv, int nv, bool acc);
/* Small-n (2..32 rows of x) y[i * ldy + r] = x_i . W_r for rows [r0, r1) of W [.][k] bf16, with
 * x packed by vlm_amx_pack_x (cpu_amx_ukr.h: W's rows are the A tiles, read in place). */
void vlm_amx_rows(const uint16_t *w, int64_t k, int64_t r0, int64_t r1, const float *xb, int64_t kdp,
                  int64_t n, float *y, int64_t ldy);
void vlm_amx_rows_emulated(const uint16_t *w, int64_t k, int64_t r0, int64_t r1, const float *xb,
                           int64_t kdp, int64_t n, float *y, int64_t ldy);
/* xb[q * 32 + i] = (bf16(x[i][2q]), bf16(x[i][2q + 1])) for i < n <= 32, zero past n and k;
 * kdp = (k + 31) / 32 * 16 pair rows. */
void vlm_amx_pack_x(const float *x, int64_t n, int64_t k, int64_t kdp, float *xb);

/* Blocked ("flash") attention, cpu_attn.c: for each head h < H and query row i < nq,
 *   out[i*ldo + h*D + d] = sum_j p_ij v[j*ldv + hk*D + d],  p_i = softmax_j(scale * q_i . k_j)
 * with q_i = q + i*ldq + h*D, k_j = k + j*ldk + hk*D, hk = h / (H / Hkv) (GQA). causal_offset < 0:
 * every key j < nk is visible; >= 0: only j <= i + causal_offset (prefill chunk after
 * causal_offset cached tokens: nk = causal_offset + nq). Never materialises [nq, nk]; threads
 * split (head, query block) pairs. */
void vlm_attention_f32(int64_t nq, int64_t nk, int H, int Hkv, int D, const float *q, int64_t ldq,
                       const float *k, int64_t ldk, const float *v, int64_t ldv, float scale,
                       int64_t causal_offset, float *out, int64_t ldo);
/* The same with Q, K, P and V rounded to bf16 for the two products and the bf16 hardware GEMM
 * kernel that vlm_linear uses (vlm_cpu_bf16_kernel(); plain vlm_attention_f32 where that is NONE).
 * For callers whose weights are bf16: the transformers bf16 run rounds at the same points (its
 * q, k, v and probabilities are bf16; scores and softmax are f32 here as there). */
void vlm_attention_bf16(int64_t nq, int64_t nk, int H, int Hkv, int D, const float *q, int64_t ldq,
                        const float *k, int64_t ldk, const float *v, int64_t ldv, float scale,
                        int64_t causal_offset, float *out, int64_t ldo);

/* Decode attention (cpu_attn.c) for one sequence's single query row and one KV head: the G query
 * heads q[g * D ..] sharing it attend over nk keys; key/value t is at kpool/vpool + (pages[t / pt] *
 * pt + t % pt) * ld (the caller points kpool/vpool at the layer and KV head). sbuf holds G * nk
 * floats; out[g * D + d] gets head g's output (G <= 256). */
void vlm_attention_decode_f32(int64_t nk, int G, int D, const float *q, const float *kpool,
                              const float *vpool, int64_t ld, const int32_t *pages, int64_t pt,
                              float scale, float *sbuf, float *out);

/* AVX512_BF16 (cpu_gemm.c). vlm_bf16_dot_selftest runs one vdpbf16ps on known values and says
 * whether the result is exact (SIGILL where the CPU lacks the instruction: callers guard it).
 * vlm_bf16_dot_gain measures (multiply-adds per second with vdpbf16ps) / (with f32 FMA) on the
 * calling core in ~0.2 ms: 2.0 where both issue at the same rate, below 1 where vdpbf16ps is slow
 * (measured 0.5 on an Emerald Rapids VM). */
bool vlm_bf16_dot_selftest(void);
double vlm_bf16_dot_gain(void);
/* Which bf16 hardware kernel vlm_linear uses for BF16 weights at n >= gemm_min_rows (NONE: the
 * path's f32 kernel on bf16 weights converted in packing). Decided once at init ("auto"): AMX
 * where cpuid has amx_bf16/amx_tile, Linux grants the tile state and a self-test on real tiles
 * matches the reference; else AVX512_BF16 where cpuid has it and vdpbf16ps beats FMA
 * (vlm_bf16_dot_gain() >= 1.15); else none. VLMD_BF16_DOT (or vlm_cpu_set_bf16_dot) overrides:
 * "off", "auto", "on" (the best kernel that runs, even where auto declined), "avx512bf16",
 * "amx", "amx-emulated" (tests). Where a VM hides avx512_bf16 from cpuid, "on"/"avx512bf16" run
 * its self-test under a SIGILL guard first. Returns 0, or -1 when the kernel cannot run here. */
vlm_bf16_kernel vlm_cpu_bf16_kernel(void);
int vlm_cpu_set_bf16_dot(const char *mode);
/* The self-test that gates AMX (a 45x70x1100 product with tails against the f32 kernel on the
 * same bf16-rounded A, under a SIGILL/SIGSEGV guard) for kernel k: true when it matches. */
bool vlm_cpu_bf16_selftest(vlm_bf16_kernel k);
/* Whether vcvtne2ps2bf16/vdpbf16ps run on this CPU (cpuid, or the guarded self-test passed). */
bool vlm_cpu_has_avx512bf16(void);

/* Which library does the many-row products (vlm_linear at n >= gemm_min_rows, vlm_gemm_f32):
 * "own" (cpu_gemm.c) or "openblas" (only when built with it). Returns 0, or -1 when unknown or
 * not built. Env VLMD_GEMM does the same at init. */
int vlm_cpu_set_gemm_backend(const char *name);
const char *vlm_cpu_gemm_backend(void);

/* The shared core of vlm_exp512 / vlm_exp256, written once for both vector widths: with n =
 * round(x / ln2), r = x - n ln2 (ln2 split in a high part exact in float and a low part) and
 * p = e^r by its degree-6 Taylor polynomial (Horner). */
#define VLM_EXP_REDUCE_POLY(FNMADD, FMADD, SET1, x, n, r, p)                                      \
    do {                                                                                          \
        r = FNMADD(n, SET1(0.693145751953125f), x);                                               \
        r = FNMADD(n, SET1(1.428606765330187e-06f), r);                                           \
        p = SET1(1.0f / 720);                                                                     \
        p = FMADD(p, r, SET1(1.0f / 120));                                                        \
        p = FMADD(p, r, SET1(1.0f / 24));                                                         \
        p = FMADD(p, r, SET1(1.0f / 6));                                                          \
        p = FMADD(p, r, SET1(0.5f));                                                              \
        p = FMADD(p, r, SET1(1.0f));                                                              \
        p = FMADD(p, r, SET1(1.0f));                                                              \
    } while (0)

/* ---- shared AVX-512 helpers ---- */
/* e^x for 16 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 Taylor/minimax polynomial
 * (truncation error r^7/7! < 1.3e-7 relative, ~2 ulp, on that interval), then scaled by 2^n with vscalefps, which
 * also gives 0 for very negative x (x = -inf -> 0, the masked-score case). */
__attribute__((target("avx512f"))) static inline __m512 vlm_exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* e^-104 underflows to 0 via scalef */
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r, p;
    VLM_EXP_REDUCE_POLY(_mm512_fnmadd_ps, _mm512_fmadd_ps, _mm512_set1_ps, x, n, r, p);
    return _mm512_scalef_ps(p, n);
}

/* ---- shared AVX2 helpers ---- */
/* e^x for 8 lanes, the same reduction and polynomial as vlm_exp512; 2^n is built in the exponent
 * bits (no vscalefps), so x is clamped to [-87, 88.3] (n in [-126, 127]) and lanes below -87
 * (e^x < 1.7e-38; -inf, the masked-score case) give exactly 0. */
__attribute__((target("avx2,fma"))) static inline __m256 vlm_exp256(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r, p;
    VLM_EXP_REDUCE_POLY(_mm256_fnmadd_ps, _mm256_fmadd_ps, _mm256_set1_ps, x, n, r, p);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

/* The first ne (0..32) floats at src rounded to bf16 (nearest even) as 32 bf16 in order, i.e. 16 k
 * pairs, zero past ne (nothing past ne is read). Used by every AVX512_BF16 packer. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static inline __m512i vlm_bf16x32(const float *src,
                                                                                       int64_t ne) {
    const __mmask16 mlo = ne >= 16 ? (__mmask16)0xffff : ne <= 0 ? 0 : (__mmask16)((1u << ne) - 1);
    const __mmask16 mhi = ne >= 32 ? (__mmask16)0xffff : ne <= 16 ? 0 : (__mmask16)((1u << (ne - 16)) - 1);
    const __m512 lo = _mm512_maskz_loadu_ps(mlo, src), hi = _mm512_maskz_loadu_ps(mhi, src + 16);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); /* lo's 16 in the low half */
}

/* g[i] = silu(g[i]) * u[i] (SwiGLU), cpu_vec.c: AVX-512 with vlm_exp512 where the path allows,
 * threads for large n. */
void vlm_swiglu_f32(float *g, const float *u, int64_t n);

#endif
