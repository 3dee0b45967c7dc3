/* matmul.c — benchmarks for the CPU kernels (docs/cpu-kernels.md quotes its output).
 *   1. memory read bandwidth: sum of a 512 MiB buffer with the configured threads (GB/s);
 *   2. vlm_linear GEMV over BF16 weights at n = 1, 4, 16, 64 for the decoder's shapes: GB/s of
 *      weight traffic and the fraction of (1);
 *   3. this machine's f32 FMA peak (AVX-512 or AVX2 FMA loop, all threads), GFLOP/s;
 *   4. crossover n = 2..96: dot-row kernels vs the small-n bf16 kernel vs the own blocked GEMM
 *      (picks smalln_max_rows and gemm_min_rows);
 *   5. prefill/vision shapes at n = 512: GFLOP/s and fraction of peak of the own GEMM and of
 *      OpenBLAS sgemm on converted panels (run once more with OPENBLAS_CORETYPE=SkylakeX to see
 *      OpenBLAS with its best kernel: 0.3.21 misdetects some virtualised Xeons).
 * Each figure is the best of several repetitions (the machine is shared; best-of filters noise).
 * Usage: bench/matmul [threads (default 2)] [--quick] [--gemv]. */
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

/* f32 FMA peak: 12 independent accumulator chains per thread (more than latency x ports). */
__attribute__((target("avx512f"))) static double fma_loop_avx512(long iters) {
    __m512 a[12], x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < iters; it++)
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], x, y);
    __m512 s = a[0];
    for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, a[i]);
    return (double)_mm512_reduce_add_ps(s);
}
__attribute__((target("avx2,fma"))) static double fma_loop_avx2(long iters) {
    __m256 a[12], x = _mm256_set1_ps(1.0000001f), y = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
    for (long it = 0; it < iters; it++)
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], x, y);
    __m256 s = a[0];
    for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, a[i]);
    float o[8];
    _mm256_storeu_ps(o, s);
    return o[0] + o[7];
}
static double fma_peak(int reps) {
    const bool w512 = vlm_cpu_active_path() == VLM_CPU_AVX512;
    const long iters = 20000000;
    double best = 0;
    volatile double sink = 0;
    for (int r = 0; r < reps; r++) {
        const double t0 = now();
        double s = 0;
#pragma omp parallel reduction(+ : s)
        s += w512 ? fma_loop_avx512(iters) : fma_loop_avx2(iters);
        const double dt = now() - t0;
        sink += s;
        const double gf = (double)omp_get_max_threads() * iters * 12 * (w512 ? 16 : 8) * 2 / dt / 1e9;
        if (gf > best) best = gf;
    }
    return best;
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
    bool quick = false, gemv_only = false; /* --gemv: bandwidth and the GEMV table only */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = true;
        else if (!strcmp(argv[i], "--gemv")) gemv_only = true;
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

    printf("\nGEMV bf16 (vlm_linear decode kernels: n = 1 gemv, small-n, dot-rows; path %s)\n",
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

    if (gemv_only) {
        free(x), free(y);
        return 0;
    }
    const double peak = fma_peak(quick ? 2 : 4);
    printf("\nf32 FMA peak (%s, %d threads, best of runs): %.1f GFLOP/s\n",
           vlm_cpu_active_path() == VLM_CPU_AVX512 ? "avx512" : "avx2", threads, peak);

    printf("\ncrossover, W 1536x1536 bf16: dot-row kernels vs small-n kernel vs own GEMM (GFLOP/s)\n");
    vlm_cpu_set_bf16_dot("off"); /* the f32 kernels in these columns; the bf16 ones forced per column */
    {
        const int64_t m = 1536, k = 1536;
        uint16_t *wd = malloc((size_t)(m * k) * 2);
        for (int64_t i = 0; i < m * k; i++) wd[i] = (uint16_t)(0x3c00 + (i * 40503u) % 0x300);
        vlm_tensor w = {.dtype = VLM_BF16, .ndim = 2, .shape = {m, k}, .data = wd,
                        .nbytes = (size_t)(m * k) * 2};
        const int64_t cn[] = {2, 3, 4, 8, 12, 16, 24, 32, 48, 64, 96};
        for (size_t i = 0; i < sizeof cn / sizeof cn[0]; i++) {
            const double flop = 2.0 * (double)cn[i] * (double)m * (double)k;
            const double mt = quick ? 0.1 : 0.3;
            const int64_t old = vlm_cpu_set_gemm_min_rows(0), old_small = vlm_cpu_set_smalln_max_rows(0);
            const double t_dot = time_linear(x, cn[i], k, &w, y, mt, 30);
            vlm_cpu_set_smalln_max_rows(1 << 20);
            const double t_small = time_linear(x, cn[i], k, &w, y, mt, 30);
            double t_small_bf16 = 0; /* the vdpbf16ps small-n kernel, where this CPU runs it */
            if (cn[i] >= 4 && vlm_cpu_set_bf16_dot("avx512bf16") == 0) {
                t_small_bf16 = time_linear(x, cn[i], k, &w, y, mt, 30);
                vlm_cpu_set_bf16_dot("off");
            }
            vlm_cpu_set_smalln_max_rows(0);
            vlm_cpu_set_gemm_min_rows(1);
            const double t_gemm = time_linear(x, cn[i], k, &w, y, mt, 30);
            double t_gemm_amx = 0; /* the AMX GEMM, where the tiles run */
            if (vlm_cpu_set_bf16_dot("amx") == 0) {
                t_gemm_amx = time_linear(x, cn[i], k, &w, y, mt, 30);
                vlm_cpu_set_bf16_dot("off");
            }
            vlm_cpu_set_gemm_min_rows(old);
            vlm_cpu_set_smalln_max_rows(old_small);
            printf("  n=%3lld  dot-rows %7.1f   small-n %7.1f   gemm %7.1f", (long long)cn[i],
                   flop / t_dot / 1e9, flop / t_small / 1e9, flop / t_gemm / 1e9);
            if (t_small_bf16 > 0) printf("   small-n vdpbf16ps %7.1f", flop / t_small_bf16 / 1e9);
            if (t_gemm_amx > 0) printf("   gemm amx %7.1f", flop / t_gemm_amx / 1e9);
            printf("\n");
        }
        free(wd);
    }

    /* the AVX512_BF16 GEMM where this CPU runs vdpbf16ps (forced on for the column; the
     * describe line says whether auto picks it) */
    const bool bf16_runs = vlm_cpu_set_bf16_dot("avx512bf16") == 0;
    const double bf16_gain = bf16_runs ? vlm_bf16_dot_gain() : 0;
    const bool amx_runs = vlm_cpu_set_bf16_dot("amx") == 0;
    vlm_cpu_set_bf16_dot("off");
    if (bf16_runs)
        printf("\nvdpbf16ps/FMA multiply-add rate on this core: %.2f (auto uses the bf16 GEMM at >= 1.15)\n",
               bf16_gain);
    const char *ct = getenv("OPENBLAS_CORETYPE");
    printf("\nn=%lld, bf16 weights: GFLOP/s (fraction of FMA peak)  [OPENBLAS_CORETYPE=%s]\n",
           (long long)max_n, ct ? ct : "(unset)");
    const int64_t pshapes[][2] = {{1536, 1536}, {8960, 1536}, {1536, 8960}, {3840, 1280}, {1280, 5120}};
    for (size_t s = 0; s < sizeof pshapes / sizeof pshapes[0]; s++) {
        const int64_t m = pshapes[s][0], k = pshapes[s][1];
        uint16_t *wd = malloc((size_t)(m * k) * 2);
        for (int64_t i = 0; i < m * k; i++) wd[i] = (uint16_t)(0x3c00 + (i * 40503u) % 0x300);
        vlm_tensor w = {.dtype = VLM_BF16, .ndim = 2, .shape = {m, k}, .data = wd,
                        .nbytes = (size_t)(m * k) * 2};
        const double flop = 2.0 * (double)max_n * (double)m * (double)k;
        int64_t old = vlm_cpu_set_gemm_min_rows(1);
        vlm_cpu_set_gemm_backend("own");
        const double t_own = time_linear(x, max_n, k, &w, y, quick ? 0.3 : 1.0, 6);
        printf("%6lldx%-7lld own %-13s %7.1f (%.2f)", (long long)m, (long long)k,
               vlm_gemm_kernel_name(vlm_cpu_active_path()), flop / t_own / 1e9, flop / t_own / 1e9 / peak);
        if (bf16_runs) {
            vlm_cpu_set_bf16_dot("avx512bf16");
            const double t_bf = time_linear(x, max_n, k, &w, y, quick ? 0.3 : 1.0, 6);
            vlm_cpu_set_bf16_dot("off");
            printf("   own avx512bf16 %7.1f (%.2fx f32)", flop / t_bf / 1e9, t_own / t_bf);
        }
        if (amx_runs) {
            vlm_cpu_set_bf16_dot("amx");
            const double t_amx = time_linear(x, max_n, k, &w, y, quick ? 0.3 : 1.0, 6);
            vlm_cpu_set_bf16_dot("off");
            printf("   own amx %7.1f (%.2fx f32)", flop / t_amx / 1e9, t_own / t_amx);
        }
#ifdef VLM_HAVE_OPENBLAS
        vlm_cpu_set_gemm_backend("openblas");
        const double t_blas = time_linear(x, max_n, k, &w, y, quick ? 0.3 : 1.0, 6);
        vlm_cpu_set_gemm_backend("own");
        printf("   openblas-panels %7.1f (%.2f)  own/openblas %.2fx", flop / t_blas / 1e9,
               flop / t_blas / 1e9 / peak, t_blas / t_own);
#endif
        printf("\n");
        vlm_cpu_set_gemm_min_rows(old);
        free(wd);
    }
    vlm_cpu_set_bf16_dot("auto");
    free(x), free(y);
    return 0;
}
