/* test_cuda.c — CUDA backend ops (runtime/cuda) against straightforward CPU references on random inputs
 * of awkward sizes. Compiles in every build: without VLM_HAVE_CUDA (normal `make`) it prints a skip line;
 * with `make CUDA=1` but no GPU (cudaGetDeviceCount reports 0) it also skips with a message. Where a GPU
 * exists, every check below is a real test. */
#include <stdint.h>
#include <stdlib.h>
#include "tests/unit/test.h"
#ifdef VLM_HAVE_CUDA
#include "runtime/cuda/vlm_cuda.h"

/* f32 reductions on the GPU sum in a different order than the serial CPU loop; for n <= ~5000 of
 * N(0,1)-sized values the relative difference stays well below 1e-5, so 1e-4 relative is a loose but
 * failing-on-real-bugs bound. */
#define TOL_REL 1e-4

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}
static uint16_t f32_to_bf16_bits(float f) { /* round to nearest even */
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf16_bits_to_f32(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }

static char err[512];
#define CK(st) CHECKF((st) == VLM_OK, "%s", err)

static void *dup_to_dev(const void *h, size_t bytes) {
    void *d = NULL;
    if (vlm_cuda_malloc(&d, bytes, err, sizeof err) != VLM_OK) return NULL;
    if (vlm_cuda_h2d(d, h, bytes, err, sizeof err) != VLM_OK) { vlm_cuda_free(d); return NULL; }
    return d;
}

static void test_rmsnorm(void) {
    const int rows = 7, n = 1537; /* not a multiple of 32 or of the block size */
    const float eps = 1e-6f;
    float *x = malloc(sizeof(float) * rows * n), *y = malloc(sizeof(float) * rows * n);
    uint16_t *w = malloc(2 * (size_t)n);
    for (int i = 0; i < rows * n; i++) x[i] = frand() * 3.0f;
    for (int i = 0; i < n; i++) w[i] = f32_to_bf16_bits(1.0f + 0.5f * frand());
    float *dx = dup_to_dev(x, sizeof(float) * rows * n), *dy = NULL;
    uint16_t *dw = dup_to_dev(w, 2 * (size_t)n);
    CK(vlm_cuda_malloc((void **)&dy, sizeof(float) * rows * n, err, sizeof err));
    CHECK(dx && dw && dy);
    if (dx && dw && dy) {
        CK(vlm_cuda_rmsnorm(dy, dx, dw, rows, n, eps, err, sizeof err));
        CK(vlm_cuda_d2h(y, dy, sizeof(float) * rows * n, err, sizeof err));
        double maxrel = 0;
        for (int r = 0; r < rows; r++) {
            double ss = 0;
            for (int i = 0; i < n; i++) ss += (double)x[r * n + i] * x[r * n + i];
            double inv = 1.0 / sqrt(ss / n + eps);
            for (int i = 0; i < n; i++) {
                double ref = x[r * n + i] * inv * bf16_bits_to_f32(w[i]);
                double rel = fabs(y[r * n + i] - ref) / (fabs(ref) + 1e-3);
                if (rel > maxrel) maxrel = rel;
            }
        }
        CHECKF(maxrel <= TOL_REL, "rmsnorm max rel err %g", maxrel);
    }
    vlm_cuda_free(dx); vlm_cuda_free(dy); vlm_cuda_free(dw);
    free(x); free(y); free(w);
}

static void test_swiglu_add(void) {
    const int64_t n = 8960 * 3 + 17;
    float *g = malloc(sizeof(float) * n), *u = malloc(sizeof(float) * n), *o = malloc(sizeof(float) * n);
    for (int64_t i = 0; i < n; i++) { g[i] = frand() * 8.0f; u[i] = frand() * 2.0f; }
    float *dg = dup_to_dev(g, sizeof(float) * n), *du = dup_to_dev(u, sizeof(float) * n), *dout = NULL;
    CK(vlm_cuda_malloc((void **)&dout, sizeof(float) * n, err, sizeof err));
    CHECK(dg && du && dout);
    if (dg && du && dout) {
        CK(vlm_cuda_swiglu(dout, dg, du, n, err, sizeof err));
        CK(vlm_cuda_add(dout, du, n, err, sizeof err)); /* out = silu(g)*u + u */
        CK(vlm_cuda_d2h(o, dout, sizeof(float) * n, err, sizeof err));
        double maxerr = 0;
        for (int64_t i = 0; i < n; i++) {
            double ref = g[i] / (1.0 + exp(-(double)g[i])) * u[i] + u[i];
            double e = fabs(o[i] - ref) / (fabs(ref) + 1e-3);
            if (e > maxerr) maxerr = e;
        }
        CHECKF(maxerr <= TOL_REL, "swiglu+add max rel err %g", maxerr);
    }
    vlm_cuda_free(dg); vlm_cuda_free(du); vlm_cuda_free(dout);
    free(g); free(u); free(o);
}

static void test_argmax(void) {
    const int rows = 5, vocab = 151655; /* Qwen2-VL-like vocabulary, odd size */
    float *l = malloc(sizeof(float) * rows * (size_t)vocab);
    for (size_t i = 0; i < (size_t)rows * vocab; i++) l[i] = frand();
    l[0 * (size_t)vocab + 3] = 5.0f;
    l[1 * (size_t)vocab + vocab - 1] = 5.0f;                    /* last index */
    l[2 * (size_t)vocab + 100] = 7.0f; l[2 * (size_t)vocab + 90000] = 7.0f; /* tie: lowest wins */
    int32_t got[5] = {0}, want[5];
    for (int r = 0; r < rows; r++) {
        int b = 0;
        for (int j = 1; j < vocab; j++) if (l[(size_t)r * vocab + j] > l[(size_t)r * vocab + b]) b = j;
        want[r] = b;
    }
    float *dl = dup_to_dev(l, sizeof(float) * rows * (size_t)vocab);
    int32_t *dout = NULL;
    CK(vlm_cuda_malloc((void **)&dout, sizeof got, err, sizeof err));
    CHECK(dl && dout);
    if (dl && dout) {
        CK(vlm_cuda_argmax(dout, dl, rows, vocab, err, sizeof err));
        CK(vlm_cuda_d2h(got, dout, sizeof got, err, sizeof err));
        for (int r = 0; r < rows; r++) CHECK_EQ_INT(got[r], want[r]);
        CHECK_EQ_INT(want[2], 100);
    }
    vlm_cuda_free(dl); vlm_cuda_free(dout);
    free(l);
}

/* M-RoPE with Qwen2-VL's section split scaled down, GQA-like head counts, odd row count. */
static void test_rope(void) {
    const int rows = 13, heads = 3, hd = 80, half = hd / 2, sec0 = 8, sec1 = 16; /* sec2 = 16 */
    const size_t nx = (size_t)rows * heads * hd;
    float *x = malloc(sizeof(float) * nx), *ref = malloc(sizeof(float) * nx), *got = malloc(sizeof(float) * nx);
    float inv_freq[40];
    int64_t pos3[13 * 3];
    for (int j = 0; j < half; j++) inv_freq[j] = 1.0f / powf(1000000.0f, (float)(2 * j) / (float)hd);
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < 3; k++) pos3[r * 3 + k] = 5 + r * (k + 1) + (r > 6 ? 3000 : 0);
    for (size_t i = 0; i < nx; i++) ref[i] = x[i] = frand();
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < heads; h++) {
            float *v = ref + ((size_t)r * heads + h) * hd;
            for (int j = 0; j < half; j++) {
                int st = j < sec0 ? 0 : j < sec0 + sec1 ? 1 : 2;
                double ang = (double)((float)pos3[r * 3 + st] * inv_freq[j]);
                double a = v[j], b = v[j + half];
                v[j] = (float)(a * cos(ang) - b * sin(ang));
                v[j + half] = (float)(b * cos(ang) + a * sin(ang));
            }
        }
    float *dx = dup_to_dev(x, sizeof(float) * nx), *df = dup_to_dev(inv_freq, sizeof inv_freq);
    int64_t *dp = dup_to_dev(pos3, sizeof pos3);
    CHECK(dx && df && dp);
    if (dx && df && dp) {
        CK(vlm_cuda_rope(dx, rows, heads, hd, dp, df, sec0, sec1, err, sizeof err));
        CK(vlm_cuda_d2h(got, dx, sizeof(float) * nx, err, sizeof err));
        double maxerr = 0;
        for (size_t i = 0; i < nx; i++) if (fabs(got[i] - ref[i]) > maxerr) maxerr = fabs(got[i] - ref[i]);
        /* |x| <= 1; f32 cosf/sinf of angles up to ~3000 rad agree with double to ~1e-6 */
        CHECKF(maxerr <= 1e-5, "rope max abs err %g", maxerr);
    }
    vlm_cuda_free(dx); vlm_cuda_free(df); vlm_cuda_free(dp);
    free(x); free(ref); free(got);
}

static void test_softmax(void) {
    const int rows = 6, n = 1031;
    float *x = malloc(sizeof(float) * rows * n), *got = malloc(sizeof(float) * rows * n);
    for (int i = 0; i < rows * n; i++) x[i] = frand() * 20.0f;
    float *dx = dup_to_dev(x, sizeof(float) * rows * n);
    CHECK(dx != NULL);
    if (dx) {
        CK(vlm_cuda_softmax(dx, rows, n, err, sizeof err));
        CK(vlm_cuda_d2h(got, dx, sizeof(float) * rows * n, err, sizeof err));
        double maxrel = 0;
        for (int r = 0; r < rows; r++) {
            double m = -1e30, s = 0;
            for (int i = 0; i < n; i++) if (x[r * n + i] > m) m = x[r * n + i];
            for (int i = 0; i < n; i++) s += exp(x[r * n + i] - m);
            for (int i = 0; i < n; i++) {
                double ref = exp(x[r * n + i] - m) / s;
                double rel = fabs(got[r * n + i] - ref) / (ref + 1e-12);
                if (rel > maxrel) maxrel = rel;
            }
        }
        CHECKF(maxrel <= TOL_REL, "softmax max rel err %g", maxrel);
    }
    vlm_cuda_free(dx);
    free(x); free(got);
}

/* Exact: widening bf16 to f32 is lossless, so the gathered rows must equal the CPU widening bit for bit. */
static void test_embed(void) {
    const int vocab = 1003, hidden = 333, n = 9;
    uint16_t *t = malloc(2 * (size_t)vocab * hidden);
    for (size_t i = 0; i < (size_t)vocab * hidden; i++) t[i] = f32_to_bf16_bits(frand());
    int32_t ids[9] = {0, 1002, 17, 17, 500, 3, 999, 1, 640};
    float *got = malloc(sizeof(float) * n * hidden);
    uint16_t *dt = dup_to_dev(t, 2 * (size_t)vocab * hidden);
    int32_t *di = dup_to_dev(ids, sizeof ids);
    float *dout = NULL;
    CK(vlm_cuda_malloc((void **)&dout, sizeof(float) * n * hidden, err, sizeof err));
    CHECK(dt && di && dout);
    if (dt && di && dout) {
        CK(vlm_cuda_embed(dout, dt, di, n, hidden, vocab, err, sizeof err));
        CK(vlm_cuda_d2h(got, dout, sizeof(float) * n * hidden, err, sizeof err));
        int bad = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < hidden; j++)
                bad += got[i * hidden + j] != bf16_bits_to_f32(t[(size_t)ids[i] * hidden + j]);
        CHECK_EQ_INT(bad, 0);
    }
    vlm_cuda_free(dt); vlm_cuda_free(di); vlm_cuda_free(dout);
    free(t); free(got);
}

/* An error must come back as a status naming the failing statement, not abort the process. */
static void test_error_reporting(void) {
    void *p = NULL;
    vlm_status st = vlm_cuda_malloc(&p, (size_t)1 << 62, err, sizeof err);
    CHECK(st != VLM_OK);
    CHECKF(strstr(err, "cudaMalloc") != NULL && strstr(err, "vlm_cuda.cu") != NULL, "message: %s", err);
}
#endif

int main(void) {
#ifndef VLM_HAVE_CUDA
    (void)t_cur_name; /* test.h's per-test state is unused when nothing runs */
    (void)t_cur_failed;
    printf("test_cuda: built without CUDA (make CUDA=1 to build runtime/cuda), skipping\n");
    TEST_MAIN_END("cuda");
#else
    int n = 0;
    if (vlm_cuda_device_count(&n, err, sizeof err) != VLM_OK || n == 0) {
        printf("test_cuda: no GPU present (%s), skipping\n", n == 0 && !err[0] ? "cudaGetDeviceCount = 0" : err);
        TEST_MAIN_END("cuda");
    }
    CK(vlm_cuda_select(0, err, sizeof err));
    RUN(test_rmsnorm);
    RUN(test_swiglu_add);
    RUN(test_argmax);
    RUN(test_rope);
    RUN(test_softmax);
    RUN(test_embed);
    RUN(test_error_reporting);
    TEST_MAIN_END("cuda");
#endif
}
