/* test_cpu.c — CPU kernels against a double-precision reference: vlm_linear on every kernel path
 * this CPU supports (scalar, avx2, avx512) and on the OpenBLAS GEMM path, for F32/BF16/F16
 * weights, awkward shapes, with and without bias (F32, BF16); vlm_gemm_f32 with and without
 * transpose, padded leading dimensions, beta 0 and 1; feature description and threads. */
#include "runtime/cpu_internal.h"
#include "tests/unit/test.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* f32 accumulation of k products differs from the exact sum by at most k*eps*sum|x_t w_t| in the
 * worst case and about sqrt(k)*eps*sum|x_t w_t| in practice (eps = 2^-24 ~ 6e-8). 1e-5 of
 * sum|x_t w_t| is ~170 eps: above sqrt(1536) = 39 eps for our largest k, and below the error of a
 * single wrong or missing term (~sum/k = 6.5e-4 of the sum at k = 1536). */
#define LINEAR_REL_TOL 1e-5
#define LINEAR_ABS_TOL 1e-6

static uint64_t s_rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd_u32(void) {
    s_rng ^= s_rng << 13, s_rng ^= s_rng >> 7, s_rng ^= s_rng << 17;
    return (uint32_t)(s_rng >> 11);
}
static float rnd_unit(void) { return (float)((double)rnd_u32() / 2147483648.0 - 1.0); } /* [-1,1) */

/* Test-local decoders, written independently of the kernels. */
static double bf16_val(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}
static double f16_val(uint16_t h) {
    int sign = h >> 15, e = (h >> 10) & 31, man = h & 1023;
    double v = e == 0 ? ldexp(man, -24) : ldexp(1024 + man, e - 25);
    return sign ? -v : v;
}
/* Random F16 with exponents 2^-5..2^4 plus some subnormals (exercises every conversion branch). */
static uint16_t rnd_f16(void) {
    uint32_t r = rnd_u32();
    unsigned e = (r % 16 == 0) ? 0 : 10 + (r >> 4) % 10;
    return (uint16_t)(((r >> 9) & 1) << 15 | e << 10 | ((r >> 12) & 1023));
}

typedef struct {
    vlm_dtype dt;
    void *data;
    double *val; /* decoded, for the reference */
} wbuf;

static wbuf make_w(vlm_dtype dt, int64_t count) {
    wbuf b = {dt, malloc((size_t)(count ? count : 1) * 4), malloc((size_t)(count ? count : 1) * 8)};
    for (int64_t i = 0; i < count; i++) {
        if (dt == VLM_F32) {
            ((float *)b.data)[i] = rnd_unit();
            b.val[i] = ((float *)b.data)[i];
        } else if (dt == VLM_BF16) {
            union { float f; uint32_t u; } v = {rnd_unit()};
            ((uint16_t *)b.data)[i] = (uint16_t)(v.u >> 16);
            b.val[i] = bf16_val((uint16_t)(v.u >> 16));
        } else {
            ((uint16_t *)b.data)[i] = rnd_f16();
            b.val[i] = f16_val(((uint16_t *)b.data)[i]);
        }
    }
    return b;
}
static void free_w(wbuf *b) { free(b->data), free(b->val); }

static vlm_tensor tensor2(const wbuf *b, int64_t rows, int64_t cols) {
    vlm_tensor t = {.dtype = b->dt, .ndim = 2, .shape = {rows, cols}, .data = b->data};
    t.nbytes = (size_t)(rows * cols) * (b->dt == VLM_F32 ? 4 : 2);
    return t;
}

static const int64_t NS[] = {1, 2, 3, 7, 17, 64, 130};
static const int64_t KS[] = {1, 15, 16, 17, 64, 100, 1536};
static const int64_t MS[] = {1, 5, 31, 257};
#define LEN(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* x rounded to bf16, nearest even (what the AVX512_BF16 kernel multiplies), written here
 * independently of the kernels; the test values are finite. */
static double round_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    const uint32_t r = v.u + 0x7fffu + ((v.u >> 16) & 1u);
    return bf16_val((uint16_t)(r >> 16));
}

/* One shape through the currently selected path; returns the worst error as a fraction of the
 * tolerance. round_x: the reference rounds x to bf16 first (the bf16-dot kernel does). */
static double linear_case(const char *label, vlm_dtype dt, int64_t n, int64_t k, int64_t m, int bk,
                          bool round_x) {
    double worst = 0;
    wbuf w = make_w(dt, m * k);
    wbuf b = make_w(bk == 2 ? VLM_BF16 : VLM_F32, m); /* bk: 0 none, 1 f32, 2 bf16 */
    float *x = malloc((size_t)(n * k) * 4), *y = malloc((size_t)(n * m) * 4);
    for (int64_t i = 0; i < n * k; i++) x[i] = rnd_unit();
    vlm_tensor wt = tensor2(&w, m, k);
    vlm_tensor bt = {.dtype = b.dt, .ndim = 1, .shape = {m}, .data = b.data};
    vlm_linear(x, n, k, &wt, bk ? &bt : NULL, y);
    int bad = 0;
    for (int64_t i = 0; i < n && bad < 3; i++)
        for (int64_t j = 0; j < m && bad < 3; j++) {
            double ref = bk ? b.val[j] : 0, mag = bk ? fabs(b.val[j]) : 0;
            for (int64_t t = 0; t < k; t++) {
                const double xv = round_x ? round_bf16(x[i * k + t]) : (double)x[i * k + t];
                const double p = xv * w.val[j * k + t];
                ref += p, mag += fabs(p);
            }
            const double tol = LINEAR_REL_TOL * mag + LINEAR_ABS_TOL;
            const double err = fabs(y[i * m + j] - ref);
            if (err / tol > worst) worst = err / tol;
            if (!(err <= tol)) {
                bad++;
                CHECKF(0, "%s dt=%d n=%lld k=%lld m=%lld bias=%d y[%lld,%lld]=%.9g ref=%.9g", label,
                       (int)dt, (long long)n, (long long)k, (long long)m, bk, (long long)i,
                       (long long)j, y[i * m + j], ref);
            }
        }
    free(x), free(y);
    free_w(&w), free_w(&b);
    return worst;
}

/* Runs every shape/dtype/bias case through the currently selected path; returns the worst
 * error as a fraction of the tolerance (for the log). round_from_n: at n >= this, BF16 weights'
 * reference rounds x to bf16 (where a bf16 hardware kernel runs); only_bf16: BF16 weights only. */
static double linear_cases_x(const char *label, int64_t round_from_n, bool only_bf16) {
    double worst = 0;
    int bias_kind = 0;
    for (int dti = only_bf16 ? 1 : 0; dti < (only_bf16 ? 2 : 3); dti++) {
        const vlm_dtype dt = dti == 0 ? VLM_F32 : dti == 1 ? VLM_BF16 : VLM_F16;
        for (int ni = 0; ni < LEN(NS); ni++)
            for (int ki = 0; ki < LEN(KS); ki++)
                for (int mi = 0; mi < LEN(MS); mi++) {
                    const int64_t n = NS[ni], k = KS[ki], m = MS[mi];
                    /* keep the suite quick: the largest n only with the largest k every other m */
                    if (n == 130 && k == 1536 && mi % 2) continue;
                    const double e = linear_case(label, dt, n, k, m, bias_kind++ % 3,
                                                 n >= round_from_n && dt == VLM_BF16);
                    if (e > worst) worst = e;
                }
    }
    fprintf(stderr, "  %s: worst error %.3f of tolerance\n", label, worst);
    return worst;
}
static double linear_cases(const char *label) { return linear_cases_x(label, INT64_MAX, false); }

static void test_linear_every_path(void) {
    const int64_t old = vlm_cpu_set_gemm_min_rows(0); /* dot-row kernels for every n */
    const int64_t old_small = vlm_cpu_set_smalln_max_rows(0);
    int covered = 0;
    for (int p = 0; p < VLM_CPU_PATH_COUNT; p++) {
        const char *name = vlm_cpu_path_name((vlm_cpu_path)p);
        if (!vlm_cpu_path_supported((vlm_cpu_path)p)) {
            CHECK(vlm_cpu_force_path(name) == -1);
            fprintf(stderr, "  path %s: not supported by this CPU, skipped\n", name);
            continue;
        }
        CHECK_EQ_INT(vlm_cpu_force_path(name), 0);
        CHECK_EQ_INT(vlm_cpu_active_path(), p);
        linear_cases(name);
        covered++;
    }
    CHECK(covered >= 1);
    CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
    CHECK(vlm_cpu_force_path("no-such-path") == -1);
    vlm_cpu_set_gemm_min_rows(old);
    vlm_cpu_set_smalln_max_rows(old_small);
}

/* Small-n shapes {n, k, m} beyond the table: more than one SMALLN_JB block of weight rows per
 * thread with a partial last block, and groups with at most 4 real rows (the 4-row tile): n = 4,
 * 5, 12, 20. */
static const int64_t SMALLN_SHAPES[][3] = {{16, 100, 1100}, {23, 1536, 777}, {9, 33, 2050}, {4, 1536, 301},
                                           {5, 100, 64},    {12, 47, 600},   {20, 1536, 33}};

/* The small-n bf16 kernels (AVX-512: 8-row groups, AVX2: 4-row groups) at every n of the table
 * (odd m, k not a multiple of the k block, k < the block, n not a multiple of the row group, bias),
 * each on every path this CPU runs. */
static void test_linear_smalln_path(void) {
    const int64_t old = vlm_cpu_set_smalln_max_rows(1 << 20);
    const char *paths[] = {"avx512", "avx2"};
    for (int p = 0; p < LEN(paths); p++) {
        if (vlm_cpu_force_path(paths[p]) != 0) {
            fprintf(stderr, "  smalln-%s: not supported by this CPU, skipped\n", paths[p]);
            continue;
        }
        char label[64];
        snprintf(label, sizeof label, "smalln-%s", paths[p]);
        linear_cases(label);
        /* SMALLN_SHAPES: several row blocks per thread and the 4-row tile */
        double worst = 0;
        for (int i = 0; i < LEN(SMALLN_SHAPES); i++) {
            const double e = linear_case(label, VLM_BF16, SMALLN_SHAPES[i][0], SMALLN_SHAPES[i][1],
                                         SMALLN_SHAPES[i][2], i % 3, false);
            if (e > worst) worst = e;
        }
        fprintf(stderr, "  %s several row blocks: worst error %.3f of tolerance\n", label, worst);
    }
    vlm_cpu_set_smalln_max_rows(old);
    CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
}

/* The blocked GEMM (cpu_gemm.c) with every micro-kernel this CPU runs, then OpenBLAS. */
static void test_linear_gemm_path(void) {
    const int64_t old = vlm_cpu_set_gemm_min_rows(1); /* every n through the GEMM */
    const int64_t old_small = vlm_cpu_set_smalln_max_rows(0);
    CHECK_EQ_INT(vlm_cpu_set_gemm_backend("own"), 0);
    for (int p = 0; p < VLM_CPU_PATH_COUNT; p++) {
        char label[64];
        snprintf(label, sizeof label, "gemm-%s", vlm_gemm_kernel_name((vlm_cpu_path)p));
        if (vlm_cpu_force_path(vlm_cpu_path_name((vlm_cpu_path)p)) != 0) {
            fprintf(stderr, "  %s: not supported by this CPU, skipped\n", label);
            continue;
        }
        linear_cases(label);
    }
    CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
#ifdef VLM_HAVE_OPENBLAS
    CHECK_EQ_INT(vlm_cpu_set_gemm_backend("openblas"), 0);
    linear_cases("openblas-panels");
    CHECK_EQ_INT(vlm_cpu_set_gemm_backend("own"), 0);
#else
    CHECK(vlm_cpu_set_gemm_backend("openblas") == -1);
    fprintf(stderr, "  built without OpenBLAS: openblas backend not tested\n");
#endif
    CHECK(vlm_cpu_set_gemm_backend("nope") == -1);
    vlm_cpu_set_gemm_min_rows(old);
    vlm_cpu_set_smalln_max_rows(old_small);
}

/* The bf16 hardware GEMM kernels for BF16 weights: AVX512_BF16 where this CPU runs vdpbf16ps
 * (cpuid, or the guarded self-test when a VM hides it), AMX where it has tiles, and always the AMX
 * kernel on the C model of the tile instructions (its packing, tile shapes and strides). Against a
 * reference on bf16-rounded x the only error left is f32 summation order, so LINEAR_REL_TOL still
 * applies; plus shapes with an odd k spanning several k blocks (512) and row/column tails. */
static void test_linear_bf16_kernels(void) {
    CHECK(vlm_cpu_set_bf16_dot("bogus") == -1);
    if (vlm_cpu_force_path("avx512") != 0) {
        fprintf(stderr, "  bf16 kernels: no AVX-512 on this CPU, skipped\n");
        CHECK(vlm_cpu_set_bf16_dot("amx-emulated") == -1);
        CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
        return;
    }
    /* amx-emulated first and last: before the AVX512_BF16 self-test has run (a VM hiding the flag)
     * its A packer rounds with scalars, after it with vcvtne2ps2bf16 */
    const char *modes[] = {"amx-emulated", "avx512bf16", "amx", "amx-emulated"};
    const vlm_bf16_kernel kinds[] = {VLM_BF16K_AMX_EMULATED, VLM_BF16K_AVX512, VLM_BF16K_AMX,
                                     VLM_BF16K_AMX_EMULATED};
    const int64_t old = vlm_cpu_set_gemm_min_rows(1), old_small = vlm_cpu_set_smalln_max_rows(0);
    for (int mi = 0; mi < LEN(modes); mi++) {
        char label[64];
        snprintf(label, sizeof label, "gemm-%s", vlm_gemm_bf16_kernel_name(kinds[mi]));
        if (vlm_cpu_set_bf16_dot(modes[mi]) != 0) {
            CHECK(kinds[mi] != VLM_BF16K_AMX_EMULATED);
            /* cpuid has the tiles and Linux grants their state: then the kernel must run (a tile
             * configuration the compiler dropped once made every tile instruction fault here) */
            if (kinds[mi] == VLM_BF16K_AMX && strstr(vlm_cpu_describe(), "amx_bf16,amx_tile"))
                CHECK(!vlm_amx_request());
            fprintf(stderr, "  %s: this CPU does not run it, skipped\n", label);
            continue;
        }
        CHECK_EQ_INT(vlm_cpu_bf16_kernel(), kinds[mi]);
        CHECK(vlm_cpu_bf16_selftest(kinds[mi])); /* the gate AMX passes at init, on this kernel */
        CHECK(strstr(vlm_cpu_describe(), vlm_gemm_bf16_kernel_name(kinds[mi])) != NULL);
        linear_cases_x(label, 1, true);
        const int64_t shapes[][3] = {{37, 1101, 70}, {15, 1025, 33}, {200, 1280, 96}, {1, 3, 1}};
        double worst = 0;
        for (int i = 0; i < LEN(shapes); i++) {
            const double e = linear_case(label, VLM_BF16, shapes[i][0], shapes[i][1], shapes[i][2], i % 3, true);
            if (e > worst) worst = e;
        }
        fprintf(stderr, "  %s multi-block odd k: worst error %.3f of tolerance\n", label, worst);
        if (kinds[mi] == VLM_BF16K_AVX512) continue;
        /* the AMX small-n kernel (W rows as A tiles, 2 <= n <= 32): row blocks cut by m, k tails
         * (the zero-padded edge copy: ASan sees a load past the weights), one or two x tiles */
        vlm_cpu_set_smalln_max_rows(32);
        snprintf(label, sizeof label, "%s", kinds[mi] == VLM_BF16K_AMX ? "amx-rows" : "amx-rows-emulated");
        CHECK(strstr(vlm_cpu_describe(), label) != NULL);
        linear_cases_x(label, 1, true);
        const int64_t rows_shapes[][3] = {{2, 1536, 70}, {17, 1101, 33}, {32, 40, 100}, {3, 31, 64},
                                          {16, 1025, 96}, {31, 64, 1}};
        worst = 0;
        for (int i = 0; i < LEN(rows_shapes); i++) {
            const double e = linear_case(label, VLM_BF16, rows_shapes[i][0], rows_shapes[i][1],
                                         rows_shapes[i][2], i % 3, true);
            if (e > worst) worst = e;
        }
        for (int i = 0; i < LEN(SMALLN_SHAPES); i++) {
            const double e = linear_case(label, VLM_BF16, SMALLN_SHAPES[i][0], SMALLN_SHAPES[i][1],
                                         SMALLN_SHAPES[i][2], i % 3, true);
            if (e > worst) worst = e;
        }
        fprintf(stderr, "  %s edges: worst error %.3f of tolerance\n", label, worst);
        vlm_cpu_set_smalln_max_rows(0);
    }
    /* the vdpbf16ps small-n kernel (batched decode) at every n of the table: n < 4 stays on the
     * f32 dot-row kernels, so only n >= 4 has bf16-rounded x */
    if (vlm_cpu_set_bf16_dot("avx512bf16") == 0) {
        vlm_cpu_set_gemm_min_rows(0);
        vlm_cpu_set_smalln_max_rows(1 << 20);
        linear_cases_x("smalln-avx512bf16", 4, true);
        for (int i = 0; i < LEN(SMALLN_SHAPES); i++)
            linear_case("smalln-avx512bf16 blocks", VLM_BF16, SMALLN_SHAPES[i][0], SMALLN_SHAPES[i][1],
                        SMALLN_SHAPES[i][2], i % 3, true);
    } else {
        fprintf(stderr, "  smalln-avx512bf16: this CPU does not run it, skipped\n");
    }
    vlm_cpu_set_gemm_min_rows(old);
    vlm_cpu_set_smalln_max_rows(old_small);
    CHECK_EQ_INT(vlm_cpu_set_bf16_dot("off"), 0);
    CHECK_EQ_INT(vlm_cpu_bf16_kernel(), VLM_BF16K_NONE);
    CHECK_EQ_INT(vlm_cpu_set_bf16_dot("auto"), 0);
    CHECK_EQ_INT(vlm_cpu_set_bf16_dot("off"), 0); /* the suite's default, as above */
    CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
}

static void gemm_f32_cases(void) {
    const int64_t dims[][3] = {{1, 1, 1}, {3, 5, 7}, {17, 31, 64}, {64, 130, 100}, {5, 257, 15},
                               {29, 33, 300}, {400, 70, 80}, {15, 600, 17}, {2, 259, 128},
                               {1, 300, 64}};
    for (int di = 0; di < LEN(dims); di++)
        for (int trans = 0; trans < 2; trans++)
            for (int bi = 0; bi < 2; bi++) { /* beta 0, then 1 or 0.5 */
                const int64_t m = dims[di][0], n = dims[di][1], k = dims[di][2];
                const int64_t lda = k + 3, ldb = (trans ? k : n) + 5, ldc = n + 2;
                const float beta = bi ? 0.5f * (float)bi + 0.5f * (float)(di % 2) : 0.0f;
                const int64_t brows = trans ? n : k;
                float *a = malloc((size_t)(m * lda) * 4), *b = malloc((size_t)(brows * ldb) * 4);
                float *c = malloc((size_t)(m * ldc) * 4), *c0 = malloc((size_t)(m * ldc) * 4);
                for (int64_t i = 0; i < m * lda; i++) a[i] = rnd_unit();
                for (int64_t i = 0; i < brows * ldb; i++) b[i] = rnd_unit();
                for (int64_t i = 0; i < m * ldc; i++)
                    c0[i] = c[i] = (bi == 0 && i % ldc < n) ? NAN : rnd_unit(); /* beta 0 ignores C */
                vlm_gemm_f32(m, n, k, a, lda, b, ldb, trans, beta, c, ldc);
                int bad = 0;
                for (int64_t i = 0; i < m; i++)
                    for (int64_t j = 0; j < ldc; j++) {
                        if (j >= n) { /* padding untouched */
                            if (memcmp(&c[i * ldc + j], &c0[i * ldc + j], 4)) bad++;
                            continue;
                        }
                        double ref = bi ? beta * c0[i * ldc + j] : 0, mag = fabs(ref);
                        for (int64_t t = 0; t < k; t++) {
                            const double bv = trans ? b[j * ldb + t] : b[t * ldb + j];
                            ref += (double)a[i * lda + t] * bv, mag += fabs((double)a[i * lda + t] * bv);
                        }
                        if (!(fabs(c[i * ldc + j] - ref) <= LINEAR_REL_TOL * mag + LINEAR_ABS_TOL)) bad++;
                    }
                CHECKF(bad == 0, "m=%lld n=%lld k=%lld trans=%d beta=%g: %d bad", (long long)m,
                       (long long)n, (long long)k, trans, beta, bad);
                free(a), free(b), free(c), free(c0);
            }
}

static void test_gemm_f32(void) {
    for (int p = 0; p < VLM_CPU_PATH_COUNT; p++) {
        if (vlm_cpu_force_path(vlm_cpu_path_name((vlm_cpu_path)p)) != 0) continue;
        gemm_f32_cases();
    }
    CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
#ifdef VLM_HAVE_OPENBLAS
    CHECK_EQ_INT(vlm_cpu_set_gemm_backend("openblas"), 0);
    gemm_f32_cases();
    CHECK_EQ_INT(vlm_cpu_set_gemm_backend("own"), 0);
#endif
}

/* vlm_gemm_serial inside a parallel region (how attention uses it): each thread its own product
 * and scratch, results equal to the parallel entry point's bit for bit (same blocking). */
static void test_gemm_serial_in_parallel(void) {
    const int64_t n = 45, m = 70, k = 300;
    float *a = malloc((size_t)(n * k) * 4), *b = malloc((size_t)(m * k) * 4);
    float *c_par = malloc((size_t)(n * m) * 4), *c_ser = malloc((size_t)(4 * n * m) * 4);
    for (int64_t i = 0; i < n * k; i++) a[i] = rnd_unit();
    for (int64_t i = 0; i < m * k; i++) b[i] = rnd_unit();
    const vlm_cpu_path path = vlm_cpu_active_path();
    vlm_gemm_args g = {.n = n, .m = m, .k = k, .a = a, .lda = k, .b = b, .bdt = VLM_F32, .ldb = k,
                       .c = c_par, .ldc = m};
    vlm_gemm_parallel(&g, path);
    int bad = 0;
#pragma omp parallel for reduction(+ : bad)
    for (int r = 0; r < 4; r++) {
        float *scratch = malloc(vlm_gemm_scratch_bytes());
        vlm_gemm_args gs = g;
        gs.c = c_ser + (size_t)r * (size_t)(n * m);
        vlm_gemm_serial(&gs, path, r % 2 ? scratch : NULL);
        bad += memcmp(gs.c, c_par, (size_t)(n * m) * 4) != 0;
        free(scratch);
    }
    CHECK_EQ_INT(bad, 0);
    free(a), free(b), free(c_par), free(c_ser);
}

/* Error of o against a double-precision softmax attention over q, k, v (layouts as in
 * vlm_attention_f32, v at k's stride): returns the largest (NaN if any output is NaN) and adds
 * every output's error into *sum_err. */
static double attn_ref_err(int64_t nq, int64_t nk, int H, int Hkv, int D, const float *q, int64_t ldq,
                           const float *k, const float *v, int64_t ldk, int64_t causal, const float *o,
                           int64_t ldo, double *sum_err) {
    const float scale = 1.0f / sqrtf((float)D);
    double *p = malloc((size_t)nk * sizeof(double)), worst = 0;
    for (int h = 0; h < H; h++) {
        const int hk = h / (H / Hkv);
        for (int64_t i = 0; i < nq; i++) {
            const int64_t vis = causal < 0 ? nk : (i + causal + 1 < nk ? i + causal + 1 : nk);
            double mx = -INFINITY, sum = 0;
            for (int64_t j = 0; j < vis; j++) {
                double dot = 0;
                for (int d = 0; d < D; d++) dot += (double)q[i * ldq + h * D + d] * k[j * ldk + hk * D + d];
                p[j] = dot * scale;
                if (p[j] > mx) mx = p[j];
            }
            for (int64_t j = 0; j < vis; j++) sum += (p[j] = exp(p[j] - mx));
            for (int d = 0; d < D; d++) {
                double ref = 0;
                for (int64_t j = 0; j < vis; j++) ref += p[j] / sum * v[j * ldk + hk * D + d];
                const double err = fabs(o[i * ldo + h * D + d] - ref);
                if (!(err <= worst)) worst = err; /* NaN propagates into worst */
                *sum_err += err;
            }
        }
    }
    free(p);
    return worst;
}

/* Blocked attention vs a double-precision softmax reference: several query/key blocks with
 * ragged ends, GQA, causal with a cached prefix, every path this CPU runs. The output is a convex
 * combination of v rows (|v| <= 1), so an absolute tolerance fits: f32 sums of <= 300 terms plus
 * the vectorised exp (~2 ulp) stay far below 1e-5; a wrong or missing key moves the output by
 * ~1/nk >= 3e-3. */
#define ATTN_ABS_TOL 1e-5
static void attn_case(int64_t nq, int64_t nk, int H, int Hkv, int D, int64_t causal) {
    const int64_t ldq = (int64_t)H * D + 3, ldk = (int64_t)Hkv * D + 5, ldo = (int64_t)H * D + 1;
    float *q = malloc((size_t)(nq * ldq) * 4), *k = malloc((size_t)(nk * ldk) * 4);
    float *v = malloc((size_t)(nk * ldk) * 4), *o = malloc((size_t)(nq * ldo) * 4);
    for (int64_t i = 0; i < nq * ldq; i++) q[i] = 2.0f * rnd_unit();
    for (int64_t i = 0; i < nk * ldk; i++) k[i] = 2.0f * rnd_unit(), v[i] = rnd_unit();
    const float scale = 1.0f / sqrtf((float)D);
    for (int path = 0; path < VLM_CPU_PATH_COUNT; path++) {
        if (vlm_cpu_force_path(vlm_cpu_path_name((vlm_cpu_path)path)) != 0) continue;
        for (int64_t i = 0; i < nq * ldo; i++) o[i] = NAN;
        vlm_attention_f32(nq, nk, H, Hkv, D, q, ldq, k, ldk, v, ldk, scale, causal, o, ldo);
        double sum_err = 0;
        const double worst = attn_ref_err(nq, nk, H, Hkv, D, q, ldq, k, v, ldk, causal, o, ldo, &sum_err);
        CHECKF(worst <= ATTN_ABS_TOL, "attention %s nq=%lld nk=%lld H=%d Hkv=%d D=%d causal=%lld: max err %g",
               vlm_cpu_path_name((vlm_cpu_path)path), (long long)nq, (long long)nk, H, Hkv, D,
               (long long)causal, worst);
    }
    CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
    free(q), free(k), free(v), free(o);
}

/* vlm_attention_bf16 with each bf16 GEMM kernel this CPU runs (and the AMX C model on a small
 * case), against a double reference on bf16-rounded q, k and v. What is left is the bf16 rounding
 * of the probabilities entering P.V: each term's relative error is <= 2^-9, so |err| <= 2^-9 max|v|
 * (< 1.96e-3) bounds every output; the errors have random signs, so their mean is far smaller, and
 * that is what catches a lost or doubled key (~1/nk of |v| on every output of a row). */
static void attn_bf16_case(const char *mode, int64_t nq, int64_t nk, int H, int Hkv, int D, int64_t causal) {
    if (vlm_cpu_set_bf16_dot(mode) != 0) return;
    const int64_t ldq = (int64_t)H * D + 3, ldk = (int64_t)Hkv * D + 5, ldo = (int64_t)H * D + 1;
    float *q = malloc((size_t)(nq * ldq) * 4), *k = malloc((size_t)(nk * ldk) * 4);
    float *v = malloc((size_t)(nk * ldk) * 4), *o = malloc((size_t)(nq * ldo) * 4);
    for (int64_t i = 0; i < nq * ldq; i++) q[i] = 2.0f * rnd_unit();
    for (int64_t i = 0; i < nk * ldk; i++) k[i] = 2.0f * rnd_unit(), v[i] = rnd_unit();
    for (int64_t i = 0; i < nq * ldo; i++) o[i] = NAN;
    const float scale = 1.0f / sqrtf((float)D);
    vlm_attention_bf16(nq, nk, H, Hkv, D, q, ldq, k, ldk, v, ldk, scale, causal, o, ldo);
    const float *const qkv[3] = {q, k, v};
    const int64_t len[3] = {nq * ldq, nk * ldk, nk * ldk};
    for (int t = 0; t < 3; t++)
        for (int64_t i = 0; i < len[t]; i++) ((float *)qkv[t])[i] = vlm_bf16_to_f32(vlm_f32_to_bf16(qkv[t][i]));
    double sum_err = 0;
    const double worst = attn_ref_err(nq, nk, H, Hkv, D, q, ldq, k, v, ldk, causal, o, ldo, &sum_err);
    const double mean = sum_err / (double)(nq * H * D);
    CHECKF(worst <= 1.96e-3 && mean <= 3e-4, "attention bf16 %s nq=%lld nk=%lld H=%d D=%d causal=%lld: max err %g mean %g",
           mode, (long long)nq, (long long)nk, H, D, (long long)causal, worst, mean);
    fprintf(stderr, "  attention bf16 (%s) nq=%lld nk=%lld D=%d: max err %.2g, mean %.2g\n",
            vlm_gemm_bf16_kernel_name(vlm_cpu_bf16_kernel()), (long long)nq, (long long)nk, D, worst, mean);
    CHECK_EQ_INT(vlm_cpu_set_bf16_dot("off"), 0);
    free(q), free(k), free(v), free(o);
}

static void test_attention(void) {
    const char *bf16_modes[] = {"amx", "avx512bf16"};
    for (int m = 0; m < LEN(bf16_modes); m++) {
        attn_bf16_case(bf16_modes[m], 130, 300, 2, 1, 80, -1); /* the ViT's D = 80 pads k to 96 on AMX */
        attn_bf16_case(bf16_modes[m], 140, 140, 2, 2, 64, 0);
        attn_bf16_case(bf16_modes[m], 37, 290, 4, 2, 16, 253);
    }
    attn_bf16_case("amx-emulated", 40, 70, 1, 1, 24, -1);
    /* no bf16 kernel: exactly the f32 attention */
    {
        const int64_t nq = 50, nk = 90, H = 2, D = 32, ld = H * D;
        float *q = malloc((size_t)(nq * ld) * 4), *k = malloc((size_t)(nk * ld) * 4),
              *v = malloc((size_t)(nk * ld) * 4), *o1 = malloc((size_t)(nq * ld) * 4),
              *o2 = malloc((size_t)(nq * ld) * 4);
        for (int64_t i = 0; i < nq * ld; i++) q[i] = rnd_unit();
        for (int64_t i = 0; i < nk * ld; i++) k[i] = rnd_unit(), v[i] = rnd_unit();
        vlm_cpu_set_bf16_dot("off");
        vlm_attention_f32(nq, nk, H, H, D, q, ld, k, ld, v, ld, 0.2f, -1, o1, ld);
        vlm_attention_bf16(nq, nk, H, H, D, q, ld, k, ld, v, ld, 0.2f, -1, o2, ld);
        CHECK(memcmp(o1, o2, (size_t)(nq * ld) * 4) == 0);
        free(q), free(k), free(v), free(o1), free(o2);
    }
    attn_case(1, 1, 1, 1, 8, -1);
    attn_case(130, 300, 2, 1, 80, -1);   /* 2 query blocks, 2 key blocks, GQA 2:1 */
    attn_case(140, 140, 2, 2, 64, 0);    /* causal prefill from position 0 */
    attn_case(37, 290, 4, 2, 16, 253);   /* causal chunk after 253 cached tokens */
    attn_case(3, 259, 1, 1, 33, 256);    /* decode-like: few queries, odd head_dim */
}

/* Decode attention over a shuffled page table (keys of one sequence scattered over the pool),
 * GQA groups of 1, 6 and 7 heads, head dims that are and are not multiples of 16, on every path. */
static void decode_attn_case(int64_t nk, int G, int D, int64_t pt) {
    const int Hkv = 2, kvd = Hkv * D;
    const int64_t npages = (nk + pt - 1) / pt + 3, slots = npages * pt;
    int32_t *pages = malloc((size_t)npages * sizeof *pages);
    for (int64_t i = 0; i < npages; i++) pages[i] = (int32_t)((i * 5 + 2) % npages); /* scattered (may repeat: the reference reads the same table) */
    float *kp = malloc((size_t)(slots * kvd) * 4), *vp = malloc((size_t)(slots * kvd) * 4);
    for (int64_t i = 0; i < slots * kvd; i++) kp[i] = rnd_unit(), vp[i] = rnd_unit();
    float *q = malloc((size_t)(G * D) * 4), *out = malloc((size_t)(G * D) * 4);
    float *sbuf = malloc((size_t)(G * nk) * 4);
    for (int i = 0; i < G * D; i++) q[i] = 2.0f * rnd_unit();
    const float scale = 1.0f / sqrtf((float)D);
    for (int p = 0; p < VLM_CPU_PATH_COUNT; p++) {
        if (vlm_cpu_force_path(vlm_cpu_path_name((vlm_cpu_path)p)) != 0) continue;
        for (int kh = 0; kh < Hkv; kh++) {
            vlm_attention_decode_f32(nk, G, D, q, kp + kh * D, vp + kh * D, kvd, pages, pt, scale, sbuf, out);
            double worst = 0;
            for (int g = 0; g < G; g++) {
                double *sc = malloc((size_t)nk * sizeof(double)), mx = -1e300, sum = 0;
                for (int64_t t = 0; t < nk; t++) {
                    const float *kr = kp + ((int64_t)pages[t / pt] * pt + t % pt) * kvd + kh * D;
                    double d = 0;
                    for (int j = 0; j < D; j++) d += (double)q[g * D + j] * kr[j];
                    sc[t] = d * scale;
                    if (sc[t] > mx) mx = sc[t];
                }
                for (int64_t t = 0; t < nk; t++) sum += (sc[t] = exp(sc[t] - mx));
                for (int j = 0; j < D; j++) {
                    double o = 0;
                    for (int64_t t = 0; t < nk; t++)
                        o += sc[t] / sum * vp[((int64_t)pages[t / pt] * pt + t % pt) * kvd + kh * D + j];
                    const double err = fabs(o - out[g * D + j]);
                    if (err > worst) worst = err;
                }
                free(sc);
            }
            CHECKF(worst < 2e-5, "decode attention path %s nk=%lld G=%d D=%d kh=%d: max err %.3g",
                   vlm_cpu_path_name((vlm_cpu_path)p), (long long)nk, G, D, kh, worst);
        }
    }
    CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
    free(pages), free(kp), free(vp), free(q), free(out), free(sbuf);
}

static void test_attention_decode(void) {
    decode_attn_case(1, 1, 16, 16);
    decode_attn_case(5, 6, 128, 16);
    decode_attn_case(100, 7, 80, 16);
    decode_attn_case(300, 6, 33, 32);
    decode_attn_case(47, 9, 64, 8); /* > 8 heads: two register groups in P.V */
}

/* The vectorised exp of each path this CPU runs (vlm_exp512, vlm_exp256) against exp() in double:
 * relative error within 6 ulp (observed 3.5 on AVX2) over [-87, 88], and exactly 0 for -inf (masked scores) and below. */
__attribute__((target("avx2,fma"))) static void exp256_at(const float *x, float *y) {
    _mm256_storeu_ps(y, vlm_exp256(_mm256_loadu_ps(x)));
}
__attribute__((target("avx512f"))) static void exp512_at(const float *x, float *y) {
    _mm512_storeu_ps(y, vlm_exp512(_mm512_loadu_ps(x)));
}
static void test_exp_kernels(void) {
    const bool has[2] = {vlm_cpu_path_supported(VLM_CPU_AVX2), vlm_cpu_path_supported(VLM_CPU_AVX512)};
    for (int which = 0; which < 2; which++) {
        if (!has[which]) continue;
        double worst = 0;
        float x[16], y[16];
        for (int64_t i = 0; i < 175 * 64; i += 16) {
            for (int l = 0; l < 16; l++) x[l] = -87.0f + (float)(i + l) / 64.0f + 0.37f * (float)(l & 1) / 64.0f;
            if (which == 0) { exp256_at(x, y); exp256_at(x + 8, y + 8); }
            else exp512_at(x, y);
            for (int l = 0; l < 16; l++) {
                if (x[l] > 88.0f) continue;
                const double want = exp((double)x[l]), rel = fabs(y[l] - want) / want;
                if (!(rel <= worst)) worst = rel;
            }
        }
        CHECKF(worst <= 6 * 5.96e-8, "exp %s: worst relative error %g", which ? "avx512" : "avx2", worst);
        const float edge[16] = {-INFINITY, -1e30f, -120.0f, -104.5f, 0.0f, 1.0f, -1.0f, 10.0f,
                                -INFINITY, -INFINITY, 0, 0, 0, 0, 0, 0};
        if (which == 0) { exp256_at(edge, y); exp256_at(edge + 8, y + 8); }
        else exp512_at(edge, y);
        CHECK(y[0] == 0.0f && y[1] == 0.0f && y[2] == 0.0f && y[3] == 0.0f && y[4] == 1.0f && y[8] == 0.0f);
        fprintf(stderr, "  exp %s: worst relative error %.3g over [-87, 88]\n", which ? "avx512" : "avx2", worst);
    }
}

/* SwiGLU against a double reference: one thread (small n) and split over threads (large n),
 * arguments from -100 to 100 (exp over- and underflow at both ends), on every path. */
static void test_swiglu(void) {
    const int64_t ns[] = {1, 17, 9000, 100003};
    for (int p = 0; p < VLM_CPU_PATH_COUNT; p++) {
        if (vlm_cpu_force_path(vlm_cpu_path_name((vlm_cpu_path)p)) != 0) continue;
        for (int ni = 0; ni < LEN(ns); ni++) {
            const int64_t n = ns[ni];
            float *g = malloc((size_t)n * 4), *u = malloc((size_t)n * 4), *g0 = malloc((size_t)n * 4);
            for (int64_t i = 0; i < n; i++) {
                g0[i] = g[i] = (i % 7 == 0 ? 100.0f : 8.0f) * rnd_unit();
                u[i] = rnd_unit();
            }
            vlm_swiglu_f32(g, u, n);
            double worst = 0;
            for (int64_t i = 0; i < n; i++) {
                const double ref = (double)g0[i] / (1.0 + exp(-(double)g0[i])) * u[i];
                const double rel = fabs(g[i] - ref) / (fabs(ref) + 1e-30);
                if (rel > worst && fabs(ref) > 1e-30) worst = rel;
            }
            CHECKF(worst < 2e-6, "swiglu path %s n=%lld: max relative error %.3g",
                   vlm_cpu_path_name((vlm_cpu_path)p), (long long)n, worst);
            free(g), free(u), free(g0);
        }
    }
    CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
}

static void test_describe_threads(void) {
    vlm_cpu_init(2);
    CHECK_EQ_INT(vlm_cpu_threads(), 2);
    vlm_cpu_init(0); /* all online cores */
    CHECK(vlm_cpu_threads() >= 1);
    const char *d = vlm_cpu_describe();
    fprintf(stderr, "  %s\n", d);
    CHECK(strstr(d, "features=") != NULL);
    CHECK(strstr(d, "linear_bf16=") != NULL);
    CHECK(strstr(d, "bf16_dot=") != NULL);
    CHECK(strstr(d, vlm_cpu_path_name(vlm_cpu_active_path())) != NULL);
}

/* The environment overrides are applied inside the one-time detection (they used to call the
 * public setters from inside pthread_once, which waits on itself: the process hung). main sets
 * them before the first call into the CPU layer. */
static void test_env_overrides(void) {
    CHECK_EQ_INT(vlm_cpu_active_path(), VLM_CPU_SCALAR);
    /* amx-emulated from the environment runs the AMX gate's self-test inside the one-time
     * detection, the call path real AMX takes at init (it must not re-enter initialisation) */
    if (vlm_cpu_force_path("avx512") == 0) {
        CHECK_EQ_INT(vlm_cpu_bf16_kernel(), VLM_BF16K_AMX_EMULATED);
        CHECK(strstr(vlm_cpu_describe(), "bf16_dot=amx-emulated-32x32 (turned on") != NULL);
    }
    CHECK_EQ_INT(vlm_cpu_set_bf16_dot("off"), 0);
    /* no closing paren: where vdpbf16ps runs, the gain follows ("turned off; vdpbf16ps/fma gain 2.00") */
    CHECK(strstr(vlm_cpu_describe(), "bf16_dot=off (turned off") != NULL);
    CHECK_EQ_INT(vlm_cpu_force_path("auto"), 0);
    CHECK_EQ_INT(vlm_cpu_set_bf16_dot("auto"), 0);
    /* back to the suite's default (tests/run.sh): auto turns vdpbf16ps on where it is fast, and the
     * f32-reference tolerances of the linear tests that follow assume unrounded activations */
    CHECK_EQ_INT(vlm_cpu_set_bf16_dot("off"), 0);
}

int main(void) {
    setenv("VLMD_CPU_PATH", "scalar", 1);
    setenv("VLMD_BF16_DOT", "amx-emulated", 1);
    vlm_cpu_init(0);
    RUN(test_env_overrides);
    RUN(test_describe_threads);
    RUN(test_linear_every_path);
    RUN(test_linear_gemm_path);
    RUN(test_linear_smalln_path);
    RUN(test_linear_bf16_kernels);
    RUN(test_gemm_f32);
    RUN(test_gemm_serial_in_parallel);
    RUN(test_attention);
    RUN(test_attention_decode);
    RUN(test_exp_kernels);
    RUN(test_swiglu);
    TEST_MAIN_END("cpu");
}
