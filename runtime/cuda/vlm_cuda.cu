// vlm_cuda.cu — device management, checked-call plumbing and the first element-wise / reduction kernels
// of vlmd's CUDA backend (C interface in vlm_cuda.h). Compile/link verified with nvcc; not yet run on a GPU.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdio.h>
#include <stdarg.h>
// runtime.h is C11; _Noreturn is spelled [[noreturn]] in C++.
#define _Noreturn [[noreturn]]
#include "runtime/cuda/vlm_cuda.h"
#undef _Noreturn

#include "runtime/cuda/cu_check.h"

// The C kernel API returns a status, so a bad launch configuration is reported, not fatal.
#define CU_LAUNCH_STATUS(name) CU_CHECK(cudaGetLastError())

extern "C" vlm_status vlm_cuda_device_count(int *count, char *err, size_t errlen) {
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    // No driver / no device is not an error for the caller: it means "no GPU here".
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) { *count = 0; cudaGetLastError(); return VLM_OK; }
    if (e != cudaSuccess) { *count = 0; return cu_fail(err, errlen, VLM_E_INTERNAL, __FILE__, __LINE__, "cudaGetDeviceCount(count)", cudaGetErrorString(e), cudaGetErrorName(e)); }
    return VLM_OK;
}

extern "C" vlm_status vlm_cuda_select(int device, char *err, size_t errlen) {
    CU_CHECK(cudaSetDevice(device));
    return VLM_OK;
}

extern "C" vlm_status vlm_cuda_malloc(void **ptr, size_t bytes, char *err, size_t errlen) {
    *ptr = NULL;
    CU_CHECK(cudaMalloc(ptr, bytes ? bytes : 1));
    return VLM_OK;
}

extern "C" void vlm_cuda_free(void *ptr) {
    if (ptr) cudaFree(ptr);
}

extern "C" vlm_status vlm_cuda_h2d(void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    CU_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    return VLM_OK;
}

extern "C" vlm_status vlm_cuda_d2h(void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    CU_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return VLM_OK;
}

extern "C" vlm_status vlm_cuda_sync(char *err, size_t errlen) {
    CU_CHECK(cudaDeviceSynchronize());
    return VLM_OK;
}

static __device__ __forceinline__ float bf16_bits_to_f32(uint16_t b) {
    return __uint_as_float(((unsigned)b) << 16);
}

// Block-wide sum; blockDim.x is a multiple of 32 and <= 1024.
static __device__ float block_sum(float v) {
    __shared__ float warp_part[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) warp_part[wid] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = (threadIdx.x < nw) ? warp_part[threadIdx.x] : 0.0f;
    if (wid == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __shared__ float total;
    if (threadIdx.x == 0) total = v;
    __syncthreads();
    return total;
}

// One block per row; f32 accumulation of the sum of squares like the CPU engine.
static __global__ void k_rmsnorm(float *y, const float *x, const uint16_t *w, int n, float eps) {
    const float *xr = x + (int64_t)blockIdx.x * n;
    float *yr = y + (int64_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    float inv = rsqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * inv * bf16_bits_to_f32(w[i]);
}

extern "C" vlm_status vlm_cuda_rmsnorm(float *y, const float *x, const uint16_t *w, int rows, int n,
                                       float eps, char *err, size_t errlen) {
    if (rows <= 0 || n <= 0) return VLM_OK;
    k_rmsnorm<<<rows, 256>>>(y, x, w, n, eps);
    CU_LAUNCH_STATUS(k_rmsnorm);
    return VLM_OK;
}

static __global__ void k_swiglu(float *out, const float *g, const float *u, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float a = g[i];
        out[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

static __global__ void k_add(float *x, const float *r, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        x[i] += r[i];
}

static unsigned grid_for(int64_t n) {
    int64_t b = (n + 255) / 256;
    return (unsigned)(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

extern "C" vlm_status vlm_cuda_swiglu(float *out, const float *gate, const float *up, int64_t n, char *err,
                                      size_t errlen) {
    if (n <= 0) return VLM_OK;
    k_swiglu<<<grid_for(n), 256>>>(out, gate, up, n);
    CU_LAUNCH_STATUS(k_swiglu);
    return VLM_OK;
}

extern "C" vlm_status vlm_cuda_add(float *x, const float *r, int64_t n, char *err, size_t errlen) {
    if (n <= 0) return VLM_OK;
    k_add<<<grid_for(n), 256>>>(x, r, n);
    CU_LAUNCH_STATUS(k_add);
    return VLM_OK;
}

// One block per row; ties resolve to the lowest index (matches runtime/sampling.c's greedy path).
static __global__ void k_argmax(int32_t *out, const float *logits, int vocab) {
    const float *l = logits + (int64_t)blockIdx.x * vocab;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (l[i] > best) { best = l[i]; bi = i; }  // strided ascending: first max per thread is lowest
    __shared__ float sv[256];
    __shared__ int si[256];
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ov = sv[threadIdx.x + s];
            int oi = si[threadIdx.x + s];
            if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
                sv[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = si[0] == 0x7fffffff ? 0 : si[0];
}

extern "C" vlm_status vlm_cuda_argmax(int32_t *out, const float *logits, int rows, int vocab, char *err,
                                      size_t errlen) {
    if (rows <= 0 || vocab <= 0) return VLM_OK;
    k_argmax<<<rows, 256>>>(out, logits, vocab);
    CU_LAUNCH_STATUS(k_argmax);
    return VLM_OK;
}

// One block per (row, head); thread j handles the frequency pair (j, j + hd/2).
static __global__ void k_rope(float *x, int heads, int hd, const int64_t *pos3, const float *inv_freq, int sec0,
                              int sec1) {
    int r = blockIdx.x / heads, h = blockIdx.x % heads, half = hd / 2;
    float *v = x + ((int64_t)r * heads + h) * hd;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        int st = j < sec0 ? 0 : j < sec0 + sec1 ? 1 : 2;
        float ang = (float)pos3[(int64_t)r * 3 + st] * inv_freq[j];
        float cs = cosf(ang), sn = sinf(ang);
        float a = v[j], b = v[j + half];
        v[j] = a * cs - b * sn;
        v[j + half] = b * cs + a * sn;
    }
}

extern "C" vlm_status vlm_cuda_rope(float *x, int rows, int heads, int hd, const int64_t *pos3,
                                    const float *inv_freq, int sec0, int sec1, char *err, size_t errlen) {
    if (rows <= 0 || heads <= 0 || hd < 2) return VLM_OK;
    k_rope<<<(unsigned)((int64_t)rows * heads), 64>>>(x, heads, hd, pos3, inv_freq, sec0, sec1);
    CU_LAUNCH_STATUS(k_rope);
    return VLM_OK;
}

static __device__ float block_max(float v) {
    __shared__ float warp_part[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) warp_part[wid] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = (threadIdx.x < nw) ? warp_part[threadIdx.x] : -INFINITY;
    if (wid == 0)
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __shared__ float total;
    if (threadIdx.x == 0) total = v;
    __syncthreads();
    return total;
}

static __global__ void k_softmax(float *x, int n) {
    float *xr = x + (int64_t)blockIdx.x * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m);
    __syncthreads(); // block_sum reuses its own shared slots; keep the two reductions apart
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float e = expf(xr[i] - m); xr[i] = e; s += e; }
    s = block_sum(s);
    float inv = 1.0f / s;
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] *= inv;
}

extern "C" vlm_status vlm_cuda_softmax(float *x, int rows, int n, char *err, size_t errlen) {
    if (rows <= 0 || n <= 0) return VLM_OK;
    k_softmax<<<rows, 256>>>(x, n);
    CU_LAUNCH_STATUS(k_softmax);
    return VLM_OK;
}

static __global__ void k_embed(float *out, const uint16_t *table, const int32_t *ids, int hidden, int vocab) {
    int32_t id = ids[blockIdx.x];
    float *o = out + (int64_t)blockIdx.x * hidden;
    bool ok = id >= 0 && id < vocab;
    const uint16_t *t = table + (ok ? (int64_t)id * hidden : 0);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) o[j] = ok ? bf16_bits_to_f32(t[j]) : 0.0f;
}

extern "C" vlm_status vlm_cuda_embed(float *out, const uint16_t *table, const int32_t *ids, int n, int hidden,
                                     int vocab, char *err, size_t errlen) {
    if (n <= 0 || hidden <= 0) return VLM_OK;
    k_embed<<<n, 256>>>(out, table, ids, hidden, vocab);
    CU_LAUNCH_STATUS(k_embed);
    return VLM_OK;
}
