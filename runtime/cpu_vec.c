/* cpu_vec.c — element-wise CPU kernels of the decoder that are worth vectorising: SwiGLU
 * (silu(g) * u over [rows, ffn]; with scalar expf it was ~2-4% of a prefill and ran on one thread).
 * AVX-512 uses vlm_exp512 and AVX2 vlm_exp256 (~2 ulp); the scalar path the libm loop. */
#include "runtime/cpu_internal.h"

#include <math.h>
#include <omp.h>

/* Below this many elements one thread does it (a decode step's 8960: an OpenMP region would
 * cost more than the work). */
#define VEC_PAR_MIN (1 << 16)

static void swiglu_scalar(float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

__attribute__((target("avx512f"))) static void swiglu_avx512(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 z = _mm512_loadu_ps(g + i);
        const __m512 e = vlm_exp512(_mm512_sub_ps(_mm512_setzero_ps(), z));
        _mm512_storeu_ps(g + i, _mm512_div_ps(_mm512_mul_ps(z, _mm512_loadu_ps(u + i)), _mm512_add_ps(one, e)));
    }
    swiglu_scalar(g + i, u + i, n - i);
}

__attribute__((target("avx2,fma"))) static void swiglu_avx2(float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 z = _mm256_loadu_ps(g + i);
        const __m256 e = vlm_exp256(_mm256_sub_ps(_mm256_setzero_ps(), z));
        _mm256_storeu_ps(g + i, _mm256_div_ps(_mm256_mul_ps(z, _mm256_loadu_ps(u + i)), _mm256_add_ps(one, e)));
    }
    swiglu_scalar(g + i, u + i, n - i);
}

void vlm_swiglu_f32(float *g, const float *u, int64_t n) {
    const vlm_cpu_path path = vlm_cpu_active_path();
    void (*fn)(float *, const float *, int64_t) =
        path == VLM_CPU_AVX512 ? swiglu_avx512 : path == VLM_CPU_AVX2 ? swiglu_avx2 : swiglu_scalar;
    if (n < VEC_PAR_MIN || omp_in_parallel()) return fn(g, u, n);
#pragma omp parallel
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t lo = n * t / T / 16 * 16, hi = t + 1 == T ? n : n * (t + 1) / T / 16 * 16;
        fn(g + lo, u + lo, hi - lo);
    }
}
