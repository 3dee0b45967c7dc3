/* matmul.c — benchmarks for the CPU kernels (docs/cpu-kernels.md quotes its output).
 *   1. memory read bandwidth: sum of a 512 MiB buffer with the configured threads (GB/s);
 *   2. vlm_linear GEMV over BF16 weights at n = 1, 4, 16, 64 for the decoder's shapes: GB/s of
 *      weight traffic and the fraction of (1);
 *   3. prefill n = 512: GFLOP/s of the dot-row kernel path and of the OpenBLAS panel path.
 * Each figure is the best of several repetitions (the machine is shared; best-of filters noise).
 * Usage: bench/matmul [threads (default 2)] [--quick]. */
#include "runtime/cpu_internal.h"

#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

__attribute__((target("avx2"))) static float sum_avx2(const float *p, size_t n) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        a = _mm256_add_ps(a, _mm256_loadu_ps(p + i));
        b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
        c = _mm256_add_ps(c, _mm256_loadu_ps(p + i + 16));
        d = _mm256_add_ps(d, _mm256_loadu_ps(p + i + 24));
    }
    float o[8];
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    return o[0] + o[1] + o[2] + o[3] + o[4] + o[5] + o[6] + o[7];
}

/* Read bandwidth: each thread sums its contiguous share, like vlm_linear streams its rows. */
static double membw(int reps) {
    const size_t n = (size_t)512 << 20 >> 2;
    float *buf = malloc(n * sizeof(float));
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 7);
    double best = 1e30;
    volatile float sink = 0;
    for (int r = 0; r < reps; r++) {
        const double t0 = now();
        float total = 0;
#pragma omp parallel reduction(+ : total)
        {
            const size_t nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
            const size_t lo = n / nt * id, hi = id + 1 == nt ? n : n / nt * (id + 1);
            total += sum_avx2(buf + lo, hi - lo);
        }
        sink += total;
        const double dt = now() - t0;
        if (dt < best) best = dt;
    }
    free(buf);
    return (double)n * sizeof(float) / best / 1e9;
}

static double time_linear(const float *x, int64_t n, int64_t k, const vlm_tensor *w, float *y,
                          double min_time, int max_reps) {
    vlm_linear(x, n, k, w, NULL, y); /* warm */
    double best = 1e30, spent = 0;
    for (int r = 0; r < max_reps && (r < 2 || spent < min_time); r++) {
        const double t0 = now();
        vlm_linear(x, n, k, w, NULL, y);
        const double dt = now() - t0;
        spent += dt;
        if (dt < best) best = dt;
    }
    return best;
}

int main(int argc, char **argv) {
    int threads = 2;
    bool quick = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = true;
        else threads = atoi(argv[i]);
    }
    vlm_cpu_init(threads);
    printf("cpu: %s\n", vlm_cpu_describe());
    const double bw = membw(quick ? 3 : 8);
    printf("memory read bandwidth (%d threads, 512 MiB sum, best of runs): %.2f GB/s\n", threads, bw);

    const int64_t shapes[][2] = {{1536, 1536}, {8960, 1536}, {1536, 8960}, {151936, 1536}};
    const int64_t ns[] = {1, 4, 16, 64};
    const int64_t max_k = 8960, max_n = 512;
    float *x = malloc((size_t)(max_n * max_k) * sizeof(float));
    for (int64_t i = 0; i < max_n * max_k; i++) x[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    float *y = malloc((size_t)max_n * 151936 * sizeof(float));

    printf("\nGEMV bf16 (vlm_linear, path %s; n >= gemm_min_rows goes to OpenBLAS panels)\n",
           vlm_cpu_path_name(vlm_cpu_active_path()));
    printf("%-14s %4s %10s %9s %8s\n", "W [m x k]", "n", "ms", "GB/s", "of bw");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int64_t m = shapes[s][0], k = shapes[s][1];
        if (quick && m > 100000) continue;
        uint16_t *wd = malloc((size_t)(m * k) * 2);
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < m * k; i++) wd[i] = (uint16_t)(0x3c00 + (i * 40503u) % 0x300);
        vlm_tensor w = {.dtype = VLM_BF16, .ndim = 2, .shape = {m, k}, .data = wd,
                        .nbytes = (size_t)(m * k) * 2};
        for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
            const int64_t n = ns[ni];
            const int64_t old = vlm_cpu_set_gemm_min_rows(0); /* the decode kernels at every n */
            const double t = time_linear(x, n, k, &w, y, quick ? 0.2 : 0.5, 50);
            vlm_cpu_set_gemm_min_rows(old);
            const double gbs = (double)w.nbytes / t / 1e9;
            printf("%6lldx%-7lld %4lld %10.3f %9.2f %8.2f\n", (long long)m, (long long)k,
                   (long long)n, t * 1e3, gbs, gbs / bw);
        }
        free(wd);
    }

    printf("\nprefill n=%lld (GFLOP/s, bf16 weights)\n", (long long)max_n);
    for (size_t s = 0; s < 2; s++) {
        const int64_t m = shapes[s][0], k = shapes[s][1];
        uint16_t *wd = malloc((size_t)(m * k) * 2);
        for (int64_t i = 0; i < m * k; i++) wd[i] = (uint16_t)(0x3c00 + (i * 40503u) % 0x300);
        vlm_tensor w = {.dtype = VLM_BF16, .ndim = 2, .shape = {m, k}, .data = wd,
                        .nbytes = (size_t)(m * k) * 2};
        const double flop = 2.0 * (double)max_n * (double)m * (double)k;
        int64_t old = vlm_cpu_set_gemm_min_rows(0);
        const double t_dot = time_linear(x, max_n, k, &w, y, quick ? 0.3 : 1.5, 5);
        printf("%6lldx%-7lld dot-rows %-7s %8.1f GFLOP/s\n", (long long)m, (long long)k,
               vlm_cpu_path_name(vlm_cpu_active_path()), flop / t_dot / 1e9);
#ifdef VLM_HAVE_OPENBLAS
        vlm_cpu_set_gemm_min_rows(1);
        const double t_blas = time_linear(x, max_n, k, &w, y, quick ? 0.3 : 1.5, 5);
        printf("%6lldx%-7lld openblas-panels  %8.1f GFLOP/s\n", (long long)m, (long long)k,
               flop / t_blas / 1e9);
#endif
        vlm_cpu_set_gemm_min_rows(old);
        free(wd);
    }
    free(x), free(y);
    return 0;
}
