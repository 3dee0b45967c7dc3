/* cpu_attn.c — blocked ("flash") multi-head attention on f32 rows, for the vision transformer
 * (one image = one segment of up to ~9k patches) and usable by the decoder's prefill:
 *     out[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, hk]) v[j, hk],   hk = h / (H / Hkv)
 * optionally causal (query i sees keys j <= i + causal_offset).
 *
 * Why blocked: the score matrix is never materialised. Each task (one head x BQ query rows) walks
 * the keys BK at a time: S = Q Kᵀ tile through the blocked GEMM (vlm_gemm_serial, packed, register
 * tiled), an online-softmax update of the running row max m and sum l (rescaling the partial output
 * by exp(m_old - m_new)), then O += P V through the same GEMM. Memory per thread is
 * BQ x BK + BQ x D floats plus the GEMM's packing buffer, whatever the sequence length.
 * Tasks are independent, so (head, query block) pairs are split over the OpenMP threads and each
 * GEMM runs on its own thread. exp is vectorised on AVX-512 and AVX2 (relative error ~2 ulp, see
 * vlm_exp512 / vlm_exp256). */
#include "runtime/cpu_internal.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ATT_BQ 128 /* query rows per task */
#define ATT_BK 256 /* keys per inner block: S tile 128 x 256 f32 = 128 KiB, in L2 */

static _Noreturn void attn_invariant_failed(const char *what) {
    fprintf(stderr, "vlmd: invariant failed in cpu_attn.c: %s\n", what);
    abort();
}
#define ATT_ASSERT(c)                                                                         \
    do {                                                                                      \
        if (!(c)) attn_invariant_failed(#c);                                                  \
    } while (0)

/* One score row s[0..nk) (already masked to -inf where not allowed): scale, update the running
 * max *m and sum *l, overwrite s with the probabilities exp(scale*s - m_new); returns the factor
 * the row's partial output must be multiplied by (exp(m_old - m_new); 1 if the row is still
 * entirely masked). */
static float softmax_row_scalar(float *s, int64_t nk, float scale, float *m, float *l) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < nk; j++) {
        s[j] *= scale;
        if (s[j] > mx) mx = s[j];
    }
    const float m_new = mx > *m ? mx : *m;
    if (m_new == -INFINITY) { /* nothing visible yet */
        for (int64_t j = 0; j < nk; j++) s[j] = 0.0f;
        return 1.0f;
    }
    const float corr = expf(*m - m_new);
    float sum = 0.0f;
    for (int64_t j = 0; j < nk; j++) {
        s[j] = expf(s[j] - m_new);
        sum += s[j];
    }
    *m = m_new;
    *l = *l * corr + sum;
    return corr;
}

__attribute__((target("avx512f"))) static float softmax_row_avx512(float *s, int64_t nk, float scale,
                                                                   float *m, float *l) {
    const __m512 vs = _mm512_set1_ps(scale);
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= nk; j += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(s + j), vs);
        _mm512_storeu_ps(s + j, v);
        vmx = _mm512_max_ps(vmx, v);
    }
    const __mmask16 tail = (__mmask16)((1u << (nk - j)) - 1);
    if (tail) {
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + j), vs);
        _mm512_mask_storeu_ps(s + j, tail, v);
        vmx = _mm512_mask_max_ps(vmx, tail, vmx, v);
    }
    const float mx = _mm512_reduce_max_ps(vmx);
    const float m_new = mx > *m ? mx : *m;
    if (m_new == -INFINITY) {
        memset(s, 0, (size_t)nk * sizeof(float));
        return 1.0f;
    }
    const float corr = expf(*m - m_new);
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= nk; j += 16) {
        const __m512 p = vlm_exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
        _mm512_storeu_ps(s + j, p);
        vsum = _mm512_add_ps(vsum, p);
    }
    if (tail) {
        const __m512 p = vlm_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), vm));
        _mm512_mask_storeu_ps(s + j, tail, p);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(tail, p));
    }
    *m = m_new;
    *l = *l * corr + _mm512_reduce_add_ps(vsum);
    return corr;
}

/* The same on AVX2; the tail (nk % 8) goes through the scalar steps. */
__attribute__((target("avx2,fma"))) static float softmax_row_avx2(float *s, int64_t nk, float scale, float *m,
                                                                 float *l) {
    const __m256 vs = _mm256_set1_ps(scale);
    __m256 vmx = _mm256_set1_ps(-INFINITY);
    const int64_t nv = nk / 8 * 8;
    for (int64_t j = 0; j < nv; j += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + j), vs);
        _mm256_storeu_ps(s + j, v);
        vmx = _mm256_max_ps(vmx, v);
    }
    float lane[8], mx = -INFINITY;
    _mm256_storeu_ps(lane, vmx);
    for (int i = 0; i < 8; i++) mx = lane[i] > mx ? lane[i] : mx;
    for (int64_t j = nv; j < nk; j++) {
        s[j] *= scale;
        if (s[j] > mx) mx = s[j];
    }
    const float m_new = mx > *m ? mx : *m;
    if (m_new == -INFINITY) {
        memset(s, 0, (size_t)nk * sizeof(float));
        return 1.0f;
    }
    const float corr = expf(*m - m_new);
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < nv; j += 8) {
        const __m256 p = vlm_exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, p);
        vsum = _mm256_add_ps(vsum, p);
    }
    _mm256_storeu_ps(lane, vsum);
    float sum = 0.0f;
    for (int i = 0; i < 8; i++) sum += lane[i];
    for (int64_t j = nv; j < nk; j++) {
        s[j] = expf(s[j] - m_new);
        sum += s[j];
    }
    *m = m_new;
    *l = *l * corr + sum;
    return corr;
}

static float (*softmax_row_for(vlm_cpu_path path))(float *, int64_t, float, float *, float *) {
    return path == VLM_CPU_AVX512 ? softmax_row_avx512 : path == VLM_CPU_AVX2 ? softmax_row_avx2 : softmax_row_scalar;
}

/* K and V of every KV head rounded to bf16 once, for the bf16 GEMM kernels: kb [Hkv][nk][D] (K rows
 * are the S product's weight rows as they are) and vt [Hkv][D][nk] (V transposed, so that V's
 * columns are the O product's weight rows). */
static void round_kv_bf16(int64_t nk, int Hkv, int D, const float *k, int64_t ldk, const float *v,
                          int64_t ldv, uint16_t *kb, uint16_t *vt) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < (int64_t)Hkv * nk; r++) {
        const int64_t hk = r / nk, t = r % nk;
        const float *kr = k + t * ldk + hk * D, *vr = v + t * ldv + hk * D;
        uint16_t *kd = kb + r * D, *vd = vt + hk * D * nk + t;
        for (int d = 0; d < D; d++) kd[d] = vlm_f32_to_bf16(kr[d]), vd[d * nk] = vlm_f32_to_bf16(vr[d]);
    }
}

static void attention(int64_t nq, int64_t nk, int H, int Hkv, int D, const float *q, int64_t ldq,
                      const float *k, int64_t ldk, const float *v, int64_t ldv, float scale,
                      int64_t causal_offset, float *out, int64_t ldo, vlm_bf16_kernel kern) {
    ATT_ASSERT(nq >= 0 && nk >= 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && D > 0);
    ATT_ASSERT(ldq >= (int64_t)H * D && ldk >= (int64_t)Hkv * D && ldv >= (int64_t)Hkv * D &&
               ldo >= (int64_t)H * D);
    if (nq == 0) return;
    const vlm_cpu_path path = vlm_cpu_active_path();
    uint16_t *kb = NULL, *vt = NULL;
    if (kern != VLM_BF16K_NONE && nk > 0) {
        kb = malloc((size_t)Hkv * (size_t)nk * (size_t)D * sizeof(uint16_t));
        vt = malloc((size_t)Hkv * (size_t)nk * (size_t)D * sizeof(uint16_t));
        if (kb && vt) round_kv_bf16(nk, Hkv, D, k, ldk, v, ldv, kb, vt);
        else free(kb), free(vt), kb = vt = NULL, kern = VLM_BF16K_NONE; /* the f32 products need nothing */
    }
    float (*const row_fn)(float *, int64_t, float, float *, float *) = softmax_row_for(path);
    const int64_t qblocks = (nq + ATT_BQ - 1) / ATT_BQ, tasks = qblocks * H;
    const int group = H / Hkv;
#pragma omp parallel
    {
        float *scratch = vlm_gemm_thread_scratch();
        float *S = malloc((size_t)ATT_BQ * ATT_BK * sizeof(float));
        float *O = malloc((size_t)ATT_BQ * (size_t)D * sizeof(float));
        float *mrow = malloc(ATT_BQ * sizeof(float)), *lrow = malloc(ATT_BQ * sizeof(float));
        ATT_ASSERT(S && O && mrow && lrow);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int h = (int)(task / qblocks), hk = h / group;
            const int64_t i0 = (task % qblocks) * ATT_BQ;
            const int64_t bq = nq - i0 < ATT_BQ ? nq - i0 : ATT_BQ;
            /* keys this block can see at all: j <= i0 + bq - 1 + causal_offset */
            int64_t kend = nk;
            if (causal_offset >= 0 && i0 + bq + causal_offset < kend) kend = i0 + bq + causal_offset;
            memset(O, 0, (size_t)bq * (size_t)D * sizeof(float));
            for (int64_t i = 0; i < bq; i++) mrow[i] = -INFINITY, lrow[i] = 0.0f;
            for (int64_t j0 = 0; j0 < kend; j0 += ATT_BK) {
                const int64_t bk = kend - j0 < ATT_BK ? kend - j0 : ATT_BK;
                // S[bq, bk] = Q_blk . K_blkᵀ (K rows are the GEMM's weight rows)
                vlm_gemm_args gs = {.n = bq, .m = bk, .k = D, .a = q + i0 * ldq + (int64_t)h * D,
                                    .lda = ldq, .b = k + j0 * ldk + (int64_t)hk * D,
                                    .bdt = VLM_F32, .ldb = ldk, .c = S, .ldc = bk};
                if (kb) gs.b = kb + ((int64_t)hk * nk + j0) * D, gs.bdt = VLM_BF16, gs.ldb = D, gs.bf16 = kern;
                vlm_gemm_serial(&gs, path, scratch);
                for (int64_t i = 0; i < bq; i++) {
                    float *srow = S + i * bk;
                    if (causal_offset >= 0) { /* keys past i0 + i + causal_offset are hidden */
                        const int64_t last = i0 + i + causal_offset - j0; /* last visible index */
                        for (int64_t j = last + 1 < 0 ? 0 : last + 1; j < bk; j++) srow[j] = -INFINITY;
                    }
                    const float corr = row_fn(srow, bk, scale, &mrow[i], &lrow[i]);
                    if (corr != 1.0f)
                        for (int d = 0; d < D; d++) O[i * D + d] *= corr;
                }
                // O[bq, D] += P[bq, bk] . V_blk[bk, D]
                vlm_gemm_args gv = {.n = bq, .m = D, .k = bk, .a = S, .lda = bk,
                                    .b = v + j0 * ldv + (int64_t)hk * D, .bdt = VLM_F32,
                                    .ldb = ldv, .b_kn = true, .c = O, .ldc = D, .accumulate = true};
                if (vt)
                    gv.b = vt + (int64_t)hk * D * nk + j0, gv.bdt = VLM_BF16, gv.ldb = nk, gv.b_kn = false,
                    gv.bf16 = kern;
                vlm_gemm_serial(&gv, path, scratch);
            }
            for (int64_t i = 0; i < bq; i++) {
                const float inv = lrow[i] > 0.0f ? 1.0f / lrow[i] : 0.0f;
                float *o = out + (i0 + i) * ldo + (int64_t)h * D;
                for (int d = 0; d < D; d++) o[d] = O[i * D + d] * inv;
            }
        }
        free(S), free(O), free(mrow), free(lrow);
    }
    free(kb), free(vt);
}

void vlm_attention_f32(int64_t nq, int64_t nk, int H, int Hkv, int D, const float *q, int64_t ldq,
                       const float *k, int64_t ldk, const float *v, int64_t ldv, float scale,
                       int64_t causal_offset, float *out, int64_t ldo) {
    attention(nq, nk, H, Hkv, D, q, ldq, k, ldk, v, ldv, scale, causal_offset, out, ldo, VLM_BF16K_NONE);
}

void vlm_attention_bf16(int64_t nq, int64_t nk, int H, int Hkv, int D, const float *q, int64_t ldq,
                        const float *k, int64_t ldk, const float *v, int64_t ldv, float scale,
                        int64_t causal_offset, float *out, int64_t ldo) {
    attention(nq, nk, H, Hkv, D, q, ldq, k, ldk, v, ldv, scale, causal_offset, out, ldo, vlm_cpu_bf16_kernel());
}

/* ---- decode attention: one query row per sequence, keys in the paged KV pool ----
 * The G query heads that share a KV head are done together, so each K and V row is read once per
 * step for all of them (G = 6 on Qwen2-VL-2B). Two passes over the keys: scores (q . k per key,
 * D-wide FMAs and one horizontal sum), a softmax per head, then out += p * v rows. On AVX-512 the
 * dot products, exp and the P.V accumulation are 16-wide; elsewhere the same loops in C (where
 * the compiler keeps the sums in order). */
static void decode_scores_scalar(int64_t nk, int G, int D, const float *q, const float *kpool,
                                 int64_t ld, const int32_t *pages, int64_t pt, float *s) {
    for (int64_t t = 0; t < nk; t++) {
        const float *kr = kpool + ((int64_t)pages[t / pt] * pt + t % pt) * ld;
        for (int g = 0; g < G; g++) {
            float d = 0.0f;
            for (int j = 0; j < D; j++) d += q[g * D + j] * kr[j];
            s[g * nk + t] = d;
        }
    }
}

static void decode_pv_scalar(int64_t nk, int G, int D, const float *p, const float *vpool,
                             int64_t ld, const int32_t *pages, int64_t pt, float *out) {
    for (int g = 0; g < G; g++)
        for (int j = 0; j < D; j++) out[g * D + j] = 0.0f;
    for (int64_t t = 0; t < nk; t++) {
        const float *vr = vpool + ((int64_t)pages[t / pt] * pt + t % pt) * ld;
        for (int g = 0; g < G; g++)
            for (int j = 0; j < D; j++) out[g * D + j] += p[g * nk + t] * vr[j];
    }
}

__attribute__((target("avx512f"))) static void decode_scores_avx512(int64_t nk, int G, int D,
                                                                    const float *q, const float *kpool,
                                                                    int64_t ld, const int32_t *pages,
                                                                    int64_t pt, float *s) {
    const __mmask16 tail = (__mmask16)((1u << (D % 16)) - 1);
    for (int64_t t = 0; t < nk; t++) {
        const float *kr = kpool + ((int64_t)pages[t / pt] * pt + t % pt) * ld;
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            __m512 acc = _mm512_setzero_ps();
            int j = 0;
            for (; j + 16 <= D; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + j), _mm512_loadu_ps(kr + j), acc);
            if (tail)
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, qg + j), _mm512_maskz_loadu_ps(tail, kr + j), acc);
            s[g * nk + t] = _mm512_reduce_add_ps(acc);
        }
    }
}

__attribute__((target("avx512f"))) static void decode_pv_avx512(int64_t nk, int G, int D, const float *p,
                                                                const float *vpool, int64_t ld,
                                                                const int32_t *pages, int64_t pt, float *out) {
    for (int j = 0; j < D; j += 16) {
        const __mmask16 m = D - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - j)) - 1);
        for (int g0 = 0; g0 < G; g0 += 8) { /* 8 heads' accumulators in registers at a time */
            const int gn = G - g0 < 8 ? G - g0 : 8;
            __m512 acc[8];
            for (int g = 0; g < 8; g++) acc[g] = _mm512_setzero_ps();
            for (int64_t t = 0; t < nk; t++) {
                const __m512 vv = _mm512_maskz_loadu_ps(m, vpool + ((int64_t)pages[t / pt] * pt + t % pt) * ld + j);
                for (int g = 0; g < gn; g++)
                    acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[(g0 + g) * nk + t]), vv, acc[g]);
            }
            for (int g = 0; g < gn; g++) _mm512_mask_storeu_ps(out + (g0 + g) * D + j, m, acc[g]);
        }
    }
}

/* AVX2 versions of the two decode products: 8-wide dots (scalar tail of D % 8) and 8 heads'
 * accumulators per 8 columns of V. */
__attribute__((target("avx2,fma"))) static void decode_scores_avx2(int64_t nk, int G, int D, const float *q,
                                                                  const float *kpool, int64_t ld,
                                                                  const int32_t *pages, int64_t pt, float *s) {
    const int Dv = D / 8 * 8;
    for (int64_t t = 0; t < nk; t++) {
        const float *kr = kpool + ((int64_t)pages[t / pt] * pt + t % pt) * ld;
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            __m256 acc = _mm256_setzero_ps();
            for (int j = 0; j < Dv; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + j), _mm256_loadu_ps(kr + j), acc);
            float lane[8], d = 0.0f;
            _mm256_storeu_ps(lane, acc);
            for (int i = 0; i < 8; i++) d += lane[i];
            for (int j = Dv; j < D; j++) d += qg[j] * kr[j];
            s[g * nk + t] = d;
        }
    }
}

__attribute__((target("avx2,fma"))) static void decode_pv_avx2(int64_t nk, int G, int D, const float *p,
                                                              const float *vpool, int64_t ld, const int32_t *pages,
                                                              int64_t pt, float *out) {
    const int Dv = D / 8 * 8;
    for (int j = 0; j < Dv; j += 8)
        for (int g0 = 0; g0 < G; g0 += 8) {
            const int gn = G - g0 < 8 ? G - g0 : 8;
            __m256 acc[8];
            for (int g = 0; g < 8; g++) acc[g] = _mm256_setzero_ps();
            for (int64_t t = 0; t < nk; t++) {
                const __m256 vv = _mm256_loadu_ps(vpool + ((int64_t)pages[t / pt] * pt + t % pt) * ld + j);
                for (int g = 0; g < gn; g++) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[(g0 + g) * nk + t]), vv, acc[g]);
            }
            for (int g = 0; g < gn; g++) _mm256_storeu_ps(out + (g0 + g) * D + j, acc[g]);
        }
    for (int g = 0; g < G; g++) /* the last D % 8 columns */
        for (int j = Dv; j < D; j++) {
            float a = 0.0f;
            for (int64_t t = 0; t < nk; t++) a += p[g * nk + t] * vpool[((int64_t)pages[t / pt] * pt + t % pt) * ld + j];
            out[g * D + j] = a;
        }
}

void vlm_attention_decode_f32(int64_t nk, int G, int D, const float *q, const float *kpool,
                              const float *vpool, int64_t ld, const int32_t *pages, int64_t pt,
                              float scale, float *sbuf, float *out) {
    ATT_ASSERT(nk > 0 && G > 0 && D > 0 && pt > 0);
    const vlm_cpu_path path = vlm_cpu_active_path();
    if (path == VLM_CPU_AVX512) decode_scores_avx512(nk, G, D, q, kpool, ld, pages, pt, sbuf);
    else if (path == VLM_CPU_AVX2) decode_scores_avx2(nk, G, D, q, kpool, ld, pages, pt, sbuf);
    else decode_scores_scalar(nk, G, D, q, kpool, ld, pages, pt, sbuf);
    float inv[64 * 4];
    ATT_ASSERT(G <= (int)(sizeof inv / sizeof inv[0]));
    float (*const row_fn)(float *, int64_t, float, float *, float *) = softmax_row_for(path);
    for (int g = 0; g < G; g++) {
        float m = -INFINITY, l = 0.0f;
        row_fn(sbuf + g * nk, nk, scale, &m, &l);
        inv[g] = l > 0.0f ? 1.0f / l : 0.0f;
    }
    if (path == VLM_CPU_AVX512) decode_pv_avx512(nk, G, D, sbuf, vpool, ld, pages, pt, out);
    else if (path == VLM_CPU_AVX2) decode_pv_avx2(nk, G, D, sbuf, vpool, ld, pages, pt, out);
    else decode_pv_scalar(nk, G, D, sbuf, vpool, ld, pages, pt, out);
    for (int g = 0; g < G; g++)
        for (int j = 0; j < D; j++) out[g * D + j] *= inv[g];
}
