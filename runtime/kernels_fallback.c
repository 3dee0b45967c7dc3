/* kernels_fallback.c — plain C versions of the CPU kernel entry points, compiled only while the
 * kernels layer (runtime/cpu*.c, which owns runtime/cpu_internal.h) is not in the tree. They keep the
 * runtime buildable and testable on its own; once cpu_internal.h exists this file compiles to nothing. */
#include "runtime/runtime.h"

#if !__has_include("cpu_internal.h")
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#ifdef VLM_HAVE_OPENBLAS
#include <cblas.h>
#endif

static int g_threads = 1;

void vlm_cpu_init(int threads) {
    if (threads <= 0) threads = omp_get_num_procs();
    g_threads = threads;
    omp_set_num_threads(threads);
}
int vlm_cpu_threads(void) { return g_threads; }
const char *vlm_cpu_describe(void) { return "generic CPU; path=scalar-fallback"; }

static inline float w_at(const vlm_tensor *w, int64_t i) {
    switch (w->dtype) {
    case VLM_F32: return ((const float *)w->data)[i];
    case VLM_BF16: return vlm_bf16_to_f32(((const uint16_t *)w->data)[i]);
    case VLM_F16: return vlm_f16_to_f32(((const uint16_t *)w->data)[i]);
    default: VLM_ASSERT(!"unsupported weight dtype");
    }
    return 0;
}

void vlm_linear(const float *x, int64_t n, int64_t k, const vlm_tensor *w, const vlm_tensor *bias,
                float *y) {
    int64_t m = w->shape[0];
    VLM_ASSERT(w->ndim == 2 && w->shape[1] == k);
#ifdef VLM_HAVE_OPENBLAS
    /* blocks of 1024 weight rows, widened to f32 when stored as bf16/f16, then one sgemm each */
    const int64_t BR = 1024;
    float *tmp = w->dtype == VLM_F32 ? NULL : malloc((size_t)(BR * k) * sizeof(float));
    for (int64_t j0 = 0; j0 < m; j0 += BR) {
        int64_t nb = m - j0 < BR ? m - j0 : BR;
        const float *wb = (const float *)w->data + j0 * k;
        if (tmp) {
#pragma omp parallel for schedule(static)
            for (int64_t t = 0; t < nb * k; t++) tmp[t] = w_at(w, j0 * k + t);
            wb = tmp;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)nb, (int)k, 1.0f, x, (int)k, wb, (int)k,
                    0.0f, y + j0, (int)m);
    }
    free(tmp);
    if (bias)
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < m; j++) y[i * m + j] += w_at(bias, j);
    return;
#endif
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < m; j++) {
        float wrow[k > 0 ? k : 1];
        for (int64_t t = 0; t < k; t++) wrow[t] = w_at(w, j * k + t);
        float b = bias ? w_at(bias, j) : 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const float *xr = x + i * k;
            float s = 0;
            for (int64_t t = 0; t < k; t++) s += xr[t] * wrow[t];
            y[i * m + j] = s + b;
        }
    }
}

void vlm_gemm_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b,
                  int64_t ldb, bool b_trans, float beta, float *c, int64_t ldc) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float s = 0;
            for (int64_t t = 0; t < k; t++)
                s += a[i * lda + t] * (b_trans ? b[j * ldb + t] : b[t * ldb + j]);
            c[i * ldc + j] = s + (beta != 0 ? beta * c[i * ldc + j] : 0);
        }
}
#endif
