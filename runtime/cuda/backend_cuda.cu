// backend_cuda.cu — the CUDA implementation of the backend table (runtime/backend.h): one vlm_backend per
// GPU rank, its kernels, cuBLAS GEMMs, the f32 paged KV pool, paged attention and the NCCL all-reduce,
// plus the three C entry points engine.c looks up weakly (vlm_backend_cuda_device_count / _comm_id /
// _create) and vlm_cuda_device_info for the GPU bench.
//
// Design (docs/cuda.md has the long form):
//  - One non-blocking stream per rank; every op is queued on it in the order the rank thread calls the
//    table, so ops need no synchronisation between them. download and logits_gather synchronise the stream
//    before returning (the contract). cuBLAS and NCCL run on the same stream.
//  - Activations f32 (the contract), weights as stored (bf16 stays bf16: half the bytes to read).
//  - linear: for n <= GEMV_MAX_ROWS rows (decode) a bandwidth-bound GEMV kernel reads each weight row once
//    with 16-byte loads and computes in f32 on the f32 activations (no activation rounding, so decode logits
//    match the CPU to f32 rounding). For more rows, bf16/f16 weights go through cublasGemmEx with the
//    activations first converted to bf16/f16 by a kernel and f32 accumulation (CUBLAS_COMPUTE_32F) on the
//    tensor cores. cublasGemmEx rather than cublasLt: Lt's only gain here is epilogue fusion (bias), which
//    saves one small element-wise pass per q/k/v projection, while GemmEx is one call with no descriptor,
//    layout or heuristic-cache management; Lt is the place to go for fused bias and FP8 later. f32 weights
//    use cublasSgemm (default math mode: no TF32). Bias is a separate kernel.
//  - Per-step host metadata (token ids, KV slots, page tables) goes through pinned staging buffers; each
//    upload is skipped when the bytes equal the last upload of that buffer, so the page tables and slots,
//    identical for every layer of a step, cross PCIe once per step rather than once per layer.
//  - attention: one kernel for decode rows and prefill chunks (flash-style: K/V tiles of ATT_KT tokens in
//    shared memory, f32 online softmax, causal mask per query row). A block owns ATT_QT query rows of one
//    KV head, where a "row" is a (token, query head) pair of that KV head's GQA group, so a decode token's
//    whole group shares one pass over the context (K/V read once per group, not once per query head).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// runtime.h is C11 (_Noreturn); backend.h declares the entry points without extern "C" of its own.
#define _Noreturn [[noreturn]]
extern "C" {
#include "runtime/backend.h"
#include "runtime/cuda/vlm_cuda.h"
}
#undef _Noreturn
#include "runtime/cuda/cu_check.h"

static_assert(sizeof(ncclUniqueId) == VLM_CUDA_COMM_ID_BYTES, "NCCL unique id size");

#define GEMV_MAX_ROWS 8   // decode batches up to this many rows use the f32 GEMV kernel
#define ATT_QT 16         // query rows per attention block (4 warps x 4 rows)
#define ATT_KT 32         // keys per shared-memory tile (one per lane in the score pass)
#define ATT_MAX_HD 256    // head_dim bound of the attention kernel (per-lane accumulators: 256 / 32)
#define ATT_THREADS 128
static_assert(ATT_KT == 32, "the score pass gives one key of a tile to each lane of a warp");
static_assert(ATT_QT == 4 * (ATT_THREADS / 32), "each warp owns 4 query rows of a tile");

// ---- per-rank state ----------------------------------------------------------------------------------
// A pinned host buffer and its device twin for one kind of step metadata (see stage_put).
typedef struct {
    void *host, *dev;
    size_t cap, bytes;
    cudaEvent_t ev;   // recorded after the last copy out of `host`
    bool used;
} stage_buf;

typedef struct {
    int dev;
    cudaStream_t st;
    cublasHandle_t blas;
    ncclComm_t comm;            // NULL when the engine has one rank
    void *xq;                   // activations converted to bf16/f16 for cublasGemmEx
    size_t xq_cap;
    stage_buf ids, slots, attn;
    int32_t *attn_host;         // packed attention metadata before staging
    size_t attn_host_cap;
} cuda_impl;

struct vlm_kv_pool {
    int n_layers;
    int64_t n_pages, pt, kvd;
    float *k, *v;               // device, [layer][page][slot][kvd]
};

static cuda_impl *impl_of(vlm_backend *b) { return (cuda_impl *)b->impl; }

// Every op starts here: the rank thread normally stays on its device, but a process may drive several
// backends from one thread (tests, tp 1 next to another engine), and cudaSetDevice is cheap.
static cuda_impl *enter(vlm_backend *b) {
    cuda_impl *p = impl_of(b);
    CU_FATAL(cudaSetDevice(p->dev));
    return p;
}

static unsigned grid_for(int64_t n, int threads) {
    int64_t g = (n + threads - 1) / threads;
    return (unsigned)(g < 1 ? 1 : g > 65535 ? 65535 : g);
}

// Copies `bytes` of host metadata to the device through the pinned buffer and returns the device copy.
// Skips the copy when the bytes equal the previous upload (the device twin still holds them: only this
// function writes it, and stream order keeps earlier readers ahead of a later overwrite).
static void *stage_put(cuda_impl *p, stage_buf *s, const void *src, size_t bytes) {
    if (bytes == 0) return s->dev;
    if (s->used && bytes == s->bytes && memcmp(s->host, src, bytes) == 0) return s->dev;
    if (s->used) CU_FATAL(cudaEventSynchronize(s->ev)); // the previous copy has left the host buffer
    if (bytes > s->cap) {
        size_t cap = s->cap * 2 > bytes ? s->cap * 2 : bytes;
        if (cap < 4096) cap = 4096;
        CU_FATAL(cudaStreamSynchronize(p->st)); // queued kernels may still read the old device buffer
        if (s->host) CU_FATAL(cudaFreeHost(s->host));
        if (s->dev) CU_FATAL(cudaFree(s->dev));
        s->host = s->dev = NULL;
        CU_FATAL(cudaMallocHost(&s->host, cap));
        CU_FATAL(cudaMalloc(&s->dev, cap));
        s->cap = cap;
    }
    memcpy(s->host, src, bytes);
    CU_FATAL(cudaMemcpyAsync(s->dev, s->host, bytes, cudaMemcpyHostToDevice, p->st));
    CU_FATAL(cudaEventRecord(s->ev, p->st));
    s->used = true;
    s->bytes = bytes;
    return s->dev;
}

// ---- device helpers ----------------------------------------------------------------------------------
// dt: VLM_F32 = 0, VLM_BF16 = 1, VLM_F16 = 2 (runtime.h)
static __device__ __forceinline__ float ldw(const void *p, int dt, int64_t i) {
    if (dt == VLM_F32) return ((const float *)p)[i];
    if (dt == VLM_BF16) return __uint_as_float(((unsigned)((const uint16_t *)p)[i]) << 16);
    return __half2float(((const __half *)p)[i]);
}

// Eight consecutive weights from a 16-byte-aligned address (32 bytes for f32).
template <int DT> static __device__ __forceinline__ void load8(const void *p, float w[8]);
template <> __device__ __forceinline__ void load8<VLM_F32>(const void *p, float w[8]) {
    float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}
template <> __device__ __forceinline__ void load8<VLM_BF16>(const void *p, float w[8]) {
    uint4 u = *(const uint4 *)p; // little endian: element 2i in the low half of word i
    unsigned v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        w[2 * i] = __uint_as_float(v[i] << 16);
        w[2 * i + 1] = __uint_as_float(v[i] & 0xffff0000u);
    }
}
template <> __device__ __forceinline__ void load8<VLM_F16>(const void *p, float w[8]) {
    uint4 u = *(const uint4 *)p;
    unsigned v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __half2 h = *(const __half2 *)&v[i];
        float2 f = __half22float2(h);
        w[2 * i] = f.x;
        w[2 * i + 1] = f.y;
    }
}

static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
static __device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); every thread gets the total.
static __device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    v = warp_sum(v);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) part[wid] = v;
    __syncthreads();
    if (wid == 0) {
        v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// ---- element-wise and row kernels --------------------------------------------------------------------
static __global__ void k_embed(float *out, const void *table, int dt, int64_t rows, int64_t H, int64_t v0,
                               const int32_t *ids) {
    int32_t id = ids[blockIdx.x];
    int64_t r = (int64_t)id - v0;
    bool ok = id >= 0 && r >= 0 && r < rows;
    float *o = out + (int64_t)blockIdx.x * H;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) o[j] = ok ? ldw(table, dt, r * H + j) : 0.0f;
}

static __global__ void k_rms_norm(float *y, const float *x, const void *w, int dt, int64_t d, float eps) {
    const float *xr = x + (int64_t)blockIdx.x * d;
    float *yr = y + (int64_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) yr[j] = (xr[j] * r) * ldw(w, dt, j);
}

static __global__ void k_rope(float *x, int64_t nh, int64_t hd, const float *cs, const float *sn) {
    int64_t r = blockIdx.x / nh, h = blockIdx.x % nh, half = hd / 2;
    float *v = x + (r * nh + h) * hd;
    const float *c = cs + r * half, *s = sn + r * half;
    for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
        float a = v[j], b = v[j + half];
        v[j] = a * c[j] - b * s[j];
        v[j + half] = b * c[j] + a * s[j];
    }
}

static __global__ void k_kv_write(float *kp, float *vp, int64_t layer_off, int64_t kvd, const int64_t *slots,
                                  const float *k, const float *v) {
    int64_t i = blockIdx.x, base = (layer_off + slots[i]) * kvd;
    for (int64_t j = threadIdx.x; j < kvd; j += blockDim.x) {
        kp[base + j] = k[i * kvd + j];
        vp[base + j] = v[i * kvd + j];
    }
}

static __global__ void k_swiglu(float *g, const float *u, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float z = g[i];
        g[i] = z / (1.0f + expf(-z)) * u[i];
    }
}

static __global__ void k_add(float *x, const float *a, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        x[i] += a[i];
}

static __global__ void k_bias(float *y, const void *bias, int dt, int64_t n, int64_t m) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * m; i += (int64_t)gridDim.x * blockDim.x)
        y[i] += ldw(bias, dt, i % m);
}

static __global__ void k_to_bf16(__nv_bfloat16 *o, const float *x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        o[i] = __float2bfloat16_rn(x[i]);
}
static __global__ void k_to_f16(__half *o, const float *x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        o[i] = __float2half_rn(x[i]);
}

// y[i, j] = x[i, :] . W[j, :] for i < n <= GEMV_MAX_ROWS: one warp per output column j, so each weight
// row is read exactly once for all n activation rows (decode is bound by reading the weights). VEC: k is
// a multiple of 8 and x, W are 16-byte aligned, so a lane reads 8 weights (16 B of bf16) per load.
template <int DT, bool VEC>
static __global__ void k_gemv(const float *x, int n, int64_t k, const void *W, int64_t m, float *y) {
    int64_t j = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (j >= m) return;
    const size_t es = DT == VLM_F32 ? 4 : 2;
    const char *wr = (const char *)W + (size_t)j * (size_t)k * es;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int i = 0; i < GEMV_MAX_ROWS; i++) acc[i] = 0.0f;
    if (VEC) {
#pragma unroll 4
        for (int64_t kk = (int64_t)lane * 8; kk < k; kk += 256) {
            float w[8];
            load8<DT>(wr + (size_t)kk * es, w);
#pragma unroll
            for (int i = 0; i < GEMV_MAX_ROWS; i++) {
                if (i < n) {
                    const float4 *xp = (const float4 *)(x + (int64_t)i * k + kk);
                    float4 a = xp[0], b = xp[1];
                    acc[i] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y +
                              w[6] * b.z + w[7] * b.w;
                }
            }
        }
    } else {
        for (int64_t kk = lane; kk < k; kk += 32) {
            float w = ldw(wr, DT, kk);
#pragma unroll
            for (int i = 0; i < GEMV_MAX_ROWS; i++)
                if (i < n) acc[i] += w * x[(int64_t)i * k + kk];
        }
    }
#pragma unroll
    for (int i = 0; i < GEMV_MAX_ROWS; i++) {
        if (i < n) {
            float s = warp_sum(acc[i]);
            if (lane == 0) y[(int64_t)i * m + j] = s;
        }
    }
}

// ---- paged attention -----------------------------------------------------------------------------------
// Packed metadata (int32, staged once per step): per sequence {start, n, row0, page_off}, then per block
// {sequence, tile}, then all page tables back to back. Tile t of a sequence covers its query rows
// t*ATT_QT .. (t+1)*ATT_QT-1 where row r = token i * grp + group member g (query head kh*grp + g).
#define ATT_SEQ_INTS 4

static size_t attn_smem_bytes(int64_t hd) {
    return sizeof(float) * (size_t)(ATT_QT * hd + ATT_KT * (hd + 1) + ATT_KT * hd);
}

static __global__ void __launch_bounds__(ATT_THREADS)
k_attention(const float *kpool, const float *vpool, int64_t layer_off, int64_t pt, int64_t kvd,
            const int32_t *seqinfo, const int32_t *items, const int32_t *pages, int hd, int grp, int nh,
            float scale, const float *q, float *out) {
    extern __shared__ float smem[];
    float *qs = smem;                          // [ATT_QT][hd], pre-scaled
    float *ks = qs + ATT_QT * hd;              // [ATT_KT][hd + 1] (padded: lane j reads row j, no conflicts)
    float *vs = ks + ATT_KT * (hd + 1);        // [ATT_KT][hd]
    const int kh = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int32_t *si = seqinfo + ATT_SEQ_INTS * items[2 * blockIdx.x];
    const int start = si[0], n = si[1], row0 = si[2];
    const int32_t *pg = pages + si[3];
    const int r0 = items[2 * blockIdx.x + 1] * ATT_QT;
    const int r1 = min(r0 + ATT_QT, n * grp);
    const int limit_max = start + (r1 - 1) / grp + 1; // keys the last row of the tile may see
    const int64_t Q = (int64_t)nh * hd;
    for (int idx = tid; idx < ATT_QT * hd; idx += ATT_THREADS) {
        int rr = idx / hd, d = idx % hd, r = r0 + rr;
        float v = 0.0f;
        if (r < r1) {
            int i = r / grp, h = kh * grp + r % grp;
            v = q[(int64_t)(row0 + i) * Q + (int64_t)h * hd + d] * scale;
        }
        qs[idx] = v;
    }
    const int dc = (hd + 31) / 32;
    float m[4], l[4], acc[4][ATT_MAX_HD / 32];
    int lim[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int r = r0 + warp * 4 + j;
        lim[j] = r < r1 ? start + r / grp + 1 : 0; // causal: query token start+i sees keys 0..start+i
        m[j] = -INFINITY;
        l[j] = 0.0f;
#pragma unroll
        for (int c = 0; c < ATT_MAX_HD / 32; c++) acc[j][c] = 0.0f;
    }
    for (int t0 = 0; t0 < limit_max; t0 += ATT_KT) {
        __syncthreads(); // the previous tile is consumed (and qs written, on the first pass)
        for (int idx = tid; idx < ATT_KT * hd; idx += ATT_THREADS) {
            int jj = idx / hd, d = idx % hd, t = t0 + jj;
            float kk = 0.0f, vv = 0.0f; // keys past every row's limit: zeros, never NaN garbage times 0
            if (t < limit_max) {
                int64_t off = ((layer_off + (int64_t)pg[t / pt] * pt + t % pt) * kvd) + (int64_t)kh * hd + d;
                kk = kpool[off];
                vv = vpool[off];
            }
            ks[jj * (hd + 1) + d] = kk;
            vs[jj * hd + d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int rr = warp * 4 + j;
            if (r0 + rr >= r1) continue; // warp-uniform
            int t = t0 + lane;
            float s = -INFINITY;
            if (t < lim[j]) {
                const float *qr = qs + rr * hd, *kr = ks + lane * (hd + 1);
                float dot = 0.0f;
                for (int d = 0; d < hd; d++) dot += qr[d] * kr[d];
                s = dot;
            }
            // m stays finite: the first tile (t0 = 0) always holds key 0, which every row sees
            float mnew = fmaxf(m[j], warp_max(s));
            float pr = t < lim[j] ? expf(s - mnew) : 0.0f;
            float corr = expf(m[j] - mnew);
            l[j] = l[j] * corr + warp_sum(pr);
            m[j] = mnew;
#pragma unroll
            for (int c = 0; c < ATT_MAX_HD / 32; c++) acc[j][c] *= corr;
            for (int jj = 0; jj < ATT_KT; jj++) {
                float pj = __shfl_sync(0xffffffffu, pr, jj);
                const float *vr = vs + jj * hd;
#pragma unroll
                for (int c = 0; c < ATT_MAX_HD / 32; c++) {
                    int d = lane + 32 * c;
                    if (c < dc && d < hd) acc[j][c] += pj * vr[d];
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int r = r0 + warp * 4 + j;
        if (r >= r1) continue;
        int i = r / grp, h = kh * grp + r % grp;
        float inv = 1.0f / l[j];
        float *o = out + (int64_t)(row0 + i) * Q + (int64_t)h * hd;
#pragma unroll
        for (int c = 0; c < ATT_MAX_HD / 32; c++) {
            int d = lane + 32 * c;
            if (c < dc && d < hd) o[d] = acc[j][c] * inv;
        }
    }
}

// ---- memory ------------------------------------------------------------------------------------------
static void *cu_alloc(vlm_backend *b, size_t bytes) {
    enter(b);
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError(); // out of memory is reported as NULL (contract), not left pending
        return NULL;
    }
    return p;
}

static void cu_release(vlm_backend *b, void *p) {
    enter(b);
    if (p) CU_FATAL(cudaFree(p));
}

// Pageable host source: cudaMemcpyAsync returns once the bytes are staged, so the caller may reuse them.
static void cu_upload(vlm_backend *b, void *dst, const void *src, size_t bytes) {
    cuda_impl *p = enter(b);
    if (bytes) CU_FATAL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, p->st));
}

static void cu_download(vlm_backend *b, void *dst, const void *src, size_t bytes) {
    cuda_impl *p = enter(b);
    if (bytes) CU_FATAL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, p->st));
    CU_FATAL(cudaStreamSynchronize(p->st));
}

static int64_t cu_mem_capacity(vlm_backend *b) {
    enter(b);
    size_t free_b = 0, total = 0;
    CU_FATAL(cudaMemGetInfo(&free_b, &total));
    return (int64_t)free_b;
}

// The shard goes from the mmapped file straight to the device: a row block is one contiguous copy, a
// column block one cudaMemcpy2D with the file's row pitch; nothing of the model is staged in host memory.
static vlm_status cu_weight_load(vlm_backend *b, const vlm_tensor *src, int64_t r0, int64_t nr, int64_t c0,
                                 int64_t nc, vlm_tensor *out, size_t *copied, char *err, size_t errlen) {
    enter(b);
    *copied = 0;
    if (src->dtype != VLM_F32 && src->dtype != VLM_BF16 && src->dtype != VLM_F16)
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "cuda backend: weight dtype %s is not f32/bf16/f16",
                        vlm_dtype_name(src->dtype));
    size_t es = vlm_dtype_size(src->dtype);
    *out = *src;
    out->data = NULL;
    if (src->ndim == 1) {
        VLM_ASSERT(r0 >= 0 && nr >= 0 && r0 + nr <= src->shape[0] && c0 == 0 && nc == 1);
        out->shape[0] = nr;
        out->nbytes = (size_t)nr * es;
        CU_CHECK(cudaMalloc(&out->data, out->nbytes ? out->nbytes : 1));
        if (out->nbytes) CU_CHECK(cudaMemcpy(out->data, (const char *)src->data + (size_t)r0 * es, out->nbytes,
                                             cudaMemcpyHostToDevice));
        *copied = out->nbytes;
        return VLM_OK;
    }
    VLM_ASSERT(src->ndim == 2 && r0 >= 0 && nr >= 0 && r0 + nr <= src->shape[0] && c0 >= 0 && nc >= 0 &&
               c0 + nc <= src->shape[1]);
    int64_t cols = src->shape[1];
    out->shape[0] = nr;
    out->shape[1] = nc;
    out->nbytes = (size_t)nr * (size_t)nc * es;
    CU_CHECK(cudaMalloc(&out->data, out->nbytes ? out->nbytes : 1));
    if (out->nbytes) {
        vlm_status st = VLM_OK;
        cudaError_t e = cudaMemcpy2D(out->data, (size_t)nc * es, (const char *)src->data + ((size_t)r0 * cols + c0) * es,
                                     (size_t)cols * es, (size_t)nc * es, (size_t)nr, cudaMemcpyHostToDevice);
        if (e != cudaSuccess) {
            cudaGetLastError();
            st = cu_fail(err, errlen, VLM_E_INTERNAL, __FILE__, __LINE__,
                         "cudaMemcpy2D(shard, nc * es, mmap + (r0 * cols + c0) * es, cols * es, nc * es, nr)",
                         cudaGetErrorString(e), cudaGetErrorName(e));
            cudaFree(out->data);
            out->data = NULL;
            return st;
        }
    }
    *copied = out->nbytes;
    return VLM_OK;
}

static void cu_weight_free(vlm_backend *b, vlm_tensor *w) {
    enter(b);
    if (w->data) CU_FATAL(cudaFree(w->data));
    memset(w, 0, sizeof *w);
}

static vlm_kv_pool *cu_kv_create(vlm_backend *b, int n_layers, int64_t n_pages, int64_t pt, int64_t kvd) {
    cuda_impl *p = enter(b);
    vlm_kv_pool *kv = (vlm_kv_pool *)calloc(1, sizeof *kv);
    if (!kv) return NULL;
    *kv = (vlm_kv_pool){n_layers, n_pages, pt, kvd, NULL, NULL};
    size_t n = (size_t)n_layers * (size_t)n_pages * (size_t)pt * (size_t)kvd * sizeof(float);
    if (cudaMalloc(&kv->k, n) != cudaSuccess || cudaMalloc(&kv->v, n) != cudaSuccess) {
        cudaGetLastError();
        if (kv->k) cudaFree(kv->k);
        free(kv);
        return NULL;
    }
    // zeros rather than whatever the allocator hands out: attention never reads an unwritten slot, but a
    // bug that did would then show up as a wrong number rather than a NaN poisoning a whole softmax
    CU_FATAL(cudaMemsetAsync(kv->k, 0, n, p->st));
    CU_FATAL(cudaMemsetAsync(kv->v, 0, n, p->st));
    return kv;
}

static void cu_kv_free(vlm_backend *b, vlm_kv_pool *kv) {
    enter(b);
    if (!kv) return;
    CU_FATAL(cudaFree(kv->k));
    CU_FATAL(cudaFree(kv->v));
    free(kv);
}

// ---- decoder ops -------------------------------------------------------------------------------------
static void cu_embed(vlm_backend *b, const vlm_tensor *t, int64_t v0, const int32_t *ids, int64_t n, float *out) {
    cuda_impl *p = enter(b);
    if (n <= 0) return;
    const int32_t *d_ids = (const int32_t *)stage_put(p, &p->ids, ids, (size_t)n * sizeof *ids);
    k_embed<<<(unsigned)n, 256, 0, p->st>>>(out, t->data, (int)t->dtype, t->shape[0], t->shape[1], v0, d_ids);
    CU_LAUNCHED(k_embed);
}

static void cu_rms_norm(vlm_backend *b, const float *x, const vlm_tensor *w, float eps, int64_t n, int64_t d, float *y) {
    cuda_impl *p = enter(b);
    if (n <= 0) return;
    k_rms_norm<<<(unsigned)n, 256, 0, p->st>>>(y, x, w->data, (int)w->dtype, d, eps);
    CU_LAUNCHED(k_rms_norm);
}

static void *xq_buffer(cuda_impl *p, size_t bytes) {
    if (bytes > p->xq_cap) {
        CU_FATAL(cudaStreamSynchronize(p->st)); // a queued GEMM may still read the old buffer
        if (p->xq) CU_FATAL(cudaFree(p->xq));
        p->xq = NULL;
        CU_FATAL(cudaMalloc(&p->xq, bytes));
        p->xq_cap = bytes;
    }
    return p->xq;
}

template <int DT>
static void launch_gemv(cuda_impl *p, const float *x, int n, int64_t k, const void *W, int64_t m, float *y) {
    bool vec = k % 8 == 0 && ((uintptr_t)x & 15) == 0 && ((uintptr_t)W & 15) == 0;
    unsigned blocks = (unsigned)((m + 7) / 8); // 8 warps of 256 threads, one output column per warp
    if (vec) k_gemv<DT, true><<<blocks, 256, 0, p->st>>>(x, n, k, W, m, y);
    else k_gemv<DT, false><<<blocks, 256, 0, p->st>>>(x, n, k, W, m, y);
    CU_LAUNCHED(k_gemv);
}

static void cu_linear(vlm_backend *b, const float *x, int64_t n, int64_t k, const vlm_tensor *w,
                      const vlm_tensor *bias, float *y) {
    cuda_impl *p = enter(b);
    int64_t m = w->shape[0];
    VLM_ASSERT(w->ndim == 2 && w->shape[1] == k);
    if (n <= 0 || m <= 0) return;
    if (n <= GEMV_MAX_ROWS) {
        switch (w->dtype) {
        case VLM_F32: launch_gemv<VLM_F32>(p, x, (int)n, k, w->data, m, y); break;
        case VLM_BF16: launch_gemv<VLM_BF16>(p, x, (int)n, k, w->data, m, y); break;
        case VLM_F16: launch_gemv<VLM_F16>(p, x, (int)n, k, w->data, m, y); break;
        default: VLM_ASSERT(!"linear: weight dtype");
        }
    } else {
        // row-major y[n, m] = x[n, k] . W[m, k]^T is column-major y^T[m, n] = W^T . x^T with W viewed as a
        // column-major [k, m] matrix (op T) and x as a column-major [k, n] one (op N)
        VLM_ASSERT(n <= INT32_MAX && k <= INT32_MAX && m <= INT32_MAX);
        const float one = 1.0f, zero = 0.0f;
        if (w->dtype == VLM_F32) {
            CUBLAS_FATAL(cublasSgemm(p->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)k, &one,
                                     (const float *)w->data, (int)k, x, (int)k, &zero, y, (int)m));
        } else {
            VLM_ASSERT(w->dtype == VLM_BF16 || w->dtype == VLM_F16);
            void *xq = xq_buffer(p, (size_t)(n * k) * 2);
            cudaDataType_t t = w->dtype == VLM_BF16 ? CUDA_R_16BF : CUDA_R_16F;
            if (w->dtype == VLM_BF16) k_to_bf16<<<grid_for(n * k, 256), 256, 0, p->st>>>((__nv_bfloat16 *)xq, x, n * k);
            else k_to_f16<<<grid_for(n * k, 256), 256, 0, p->st>>>((__half *)xq, x, n * k);
            CU_LAUNCHED(k_to_bf16 / k_to_f16);
            CUBLAS_FATAL(cublasGemmEx(p->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)k, &one, w->data, t,
                                      (int)k, xq, t, (int)k, &zero, y, CUDA_R_32F, (int)m, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
        }
    }
    if (bias && bias->data) {
        VLM_ASSERT(bias->shape[0] == m);
        k_bias<<<grid_for(n * m, 256), 256, 0, p->st>>>(y, bias->data, (int)bias->dtype, n, m);
        CU_LAUNCHED(k_bias);
    }
}

static void cu_rope(vlm_backend *b, float *x, int64_t n, int64_t nh, int64_t hd, const float *cs, const float *sn) {
    cuda_impl *p = enter(b);
    if (n <= 0 || nh <= 0) return;
    k_rope<<<(unsigned)(n * nh), 64, 0, p->st>>>(x, nh, hd, cs, sn);
    CU_LAUNCHED(k_rope);
}

static void cu_kv_write(vlm_backend *b, vlm_kv_pool *kv, int layer, const int64_t *slots, int64_t n, const float *k,
                        const float *v) {
    cuda_impl *p = enter(b);
    if (n <= 0) return;
    const int64_t *d_slots = (const int64_t *)stage_put(p, &p->slots, slots, (size_t)n * sizeof *slots);
    k_kv_write<<<(unsigned)n, 128, 0, p->st>>>(kv->k, kv->v, (int64_t)layer * kv->n_pages * kv->pt, kv->kvd, d_slots,
                                               k, v);
    CU_LAUNCHED(k_kv_write);
}

// one strided copy per pool: the layers are n_pages * pt slots apart, the n slots contiguous in each
static void cu_kv_copy(vlm_backend *b, vlm_kv_pool *kv, int64_t src, int64_t dst, int64_t n) {
    cuda_impl *p = enter(b);
    if (n <= 0) return;
    const size_t pitch = (size_t)(kv->n_pages * kv->pt * kv->kvd) * sizeof(float);
    const size_t width = (size_t)(n * kv->kvd) * sizeof(float);
    CU_FATAL(cudaMemcpy2DAsync(kv->k + dst * kv->kvd, pitch, kv->k + src * kv->kvd, pitch, width,
                               (size_t)kv->n_layers, cudaMemcpyDeviceToDevice, p->st));
    CU_FATAL(cudaMemcpy2DAsync(kv->v + dst * kv->kvd, pitch, kv->v + src * kv->kvd, pitch, width,
                               (size_t)kv->n_layers, cudaMemcpyDeviceToDevice, p->st));
}

static void cu_attention(vlm_backend *b, vlm_kv_pool *kv, int layer, const vlm_attn_seq *seqs, int n_seqs, int64_t nh,
                         int64_t nkv, int64_t hd, float scale, const float *q, float *out) {
    cuda_impl *p = enter(b);
    VLM_ASSERT(nkv > 0 && nh % nkv == 0 && nkv * hd == kv->kvd && hd <= ATT_MAX_HD);
    int64_t grp = nh / nkv, n_items = 0, n_page_ints = 0;
    for (int s = 0; s < n_seqs; s++) {
        VLM_ASSERT(seqs[s].n > 0 && seqs[s].start + seqs[s].n <= seqs[s].n_pages * kv->pt);
        n_items += (seqs[s].n * grp + ATT_QT - 1) / ATT_QT;
        n_page_ints += seqs[s].n_pages;
    }
    if (n_items == 0) return;
    VLM_ASSERT(n_items <= INT32_MAX);
    size_t ints = (size_t)(ATT_SEQ_INTS * n_seqs + 2 * n_items + n_page_ints);
    if (ints > p->attn_host_cap) {
        free(p->attn_host);
        p->attn_host = (int32_t *)malloc(ints * sizeof(int32_t));
        VLM_ASSERT(p->attn_host);
        p->attn_host_cap = ints;
    }
    int32_t *h = p->attn_host, *it = h + ATT_SEQ_INTS * n_seqs, *pg = it + 2 * n_items;
    int64_t poff = 0, ii = 0;
    for (int s = 0; s < n_seqs; s++) {
        const vlm_attn_seq *a = &seqs[s];
        VLM_ASSERT(a->start + a->n <= INT32_MAX && a->row0 <= INT32_MAX && a->n * grp <= INT32_MAX);
        h[ATT_SEQ_INTS * s + 0] = (int32_t)a->start;
        h[ATT_SEQ_INTS * s + 1] = (int32_t)a->n;
        h[ATT_SEQ_INTS * s + 2] = (int32_t)a->row0;
        h[ATT_SEQ_INTS * s + 3] = (int32_t)poff;
        memcpy(pg + poff, a->pages, (size_t)a->n_pages * sizeof(int32_t));
        poff += a->n_pages;
        for (int64_t t = 0; t < (a->n * grp + ATT_QT - 1) / ATT_QT; t++, ii++) {
            it[2 * ii] = s;
            it[2 * ii + 1] = (int32_t)t;
        }
    }
    const int32_t *d = (const int32_t *)stage_put(p, &p->attn, h, ints * sizeof(int32_t));
    dim3 grid((unsigned)n_items, (unsigned)nkv);
    k_attention<<<grid, ATT_THREADS, attn_smem_bytes(hd), p->st>>>(
        kv->k, kv->v, (int64_t)layer * kv->n_pages * kv->pt, kv->pt, kv->kvd, d, d + ATT_SEQ_INTS * n_seqs,
        d + ATT_SEQ_INTS * n_seqs + 2 * n_items, (int)hd, (int)grp, (int)nh, scale, q, out);
    CU_LAUNCHED(k_attention);
}

static void cu_swiglu(vlm_backend *b, float *g, const float *u, int64_t n) {
    cuda_impl *p = enter(b);
    if (n <= 0) return;
    k_swiglu<<<grid_for(n, 256), 256, 0, p->st>>>(g, u, n);
    CU_LAUNCHED(k_swiglu);
}

static void cu_add(vlm_backend *b, float *x, const float *a, int64_t n) {
    cuda_impl *p = enter(b);
    if (n <= 0) return;
    k_add<<<grid_for(n, 256), 256, 0, p->st>>>(x, a, n);
    CU_LAUNCHED(k_add);
}

// ---- collectives -------------------------------------------------------------------------------------
static void cu_all_reduce(vlm_backend *b, float *x, int64_t n) {
    if (b->n_ranks == 1 || n == 0) return;
    cuda_impl *p = enter(b);
    NCCL_FATAL(ncclAllReduce(x, x, (size_t)n, ncclFloat, ncclSum, p->comm, p->st));
}

static void cu_logits_gather(vlm_backend *b, const float *local, int64_t n, int64_t vl, int64_t v0, float *out,
                             int64_t V) {
    cuda_impl *p = enter(b);
    if (n > 0 && vl > 0)
        CU_FATAL(cudaMemcpy2DAsync(out + v0, (size_t)V * sizeof(float), local, (size_t)vl * sizeof(float),
                                   (size_t)vl * sizeof(float), (size_t)n, cudaMemcpyDeviceToHost, p->st));
    CU_FATAL(cudaStreamSynchronize(p->st));
}

static void stage_free(stage_buf *s) {
    if (s->host) cudaFreeHost(s->host);
    if (s->dev) cudaFree(s->dev);
    if (s->ev) cudaEventDestroy(s->ev);
    memset(s, 0, sizeof *s);
}

// Also the unwinding path of a create that failed half-way, so every field may still be unset.
static void cu_destroy(vlm_backend *b) {
    if (!b) return;
    cuda_impl *p = impl_of(b);
    if (p) {
        cudaSetDevice(p->dev);
        if (p->st) cudaStreamSynchronize(p->st);
        if (p->comm) ncclCommDestroy(p->comm);
        if (p->blas) cublasDestroy(p->blas);
        stage_free(&p->ids);
        stage_free(&p->slots);
        stage_free(&p->attn);
        if (p->xq) cudaFree(p->xq);
        if (p->st) cudaStreamDestroy(p->st);
        free(p->attn_host);
        free(p);
    }
    free(b);
}

static const vlm_backend_ops CUDA_OPS = {
    "cuda",
    cu_alloc,
    cu_release,
    cu_upload,
    cu_download,
    cu_mem_capacity,
    cu_weight_load,
    cu_weight_free,
    cu_kv_create,
    cu_kv_free,
    cu_embed,
    cu_rms_norm,
    cu_linear,
    cu_rope,
    cu_kv_write,
    cu_kv_copy,
    cu_attention,
    cu_swiglu,
    cu_add,
    cu_all_reduce,
    cu_logits_gather,
    cu_destroy,
};

// ---- entry points (C linkage, looked up weakly by engine.c) -------------------------------------------
extern "C" int vlm_backend_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0; // no driver, no device, or a broken install: "no GPU here" for the caller
    }
    return n;
}

// NCCL's bootstrap id. The engine asks for one even at tp 1, where no communicator is built; a failure
// here is therefore remembered rather than returned, and only a create with n_ranks > 1 reports it.
static char comm_id_error[512];

extern "C" vlm_status vlm_backend_cuda_comm_id(unsigned char id[VLM_CUDA_COMM_ID_BYTES], char *err, size_t errlen) {
    (void)err;
    (void)errlen;
    memset(id, 0, VLM_CUDA_COMM_ID_BYTES);
    comm_id_error[0] = 0;
    ncclUniqueId u;
    ncclResult_t r = ncclGetUniqueId(&u);
    if (r != ncclSuccess) {
        cu_fail(comm_id_error, sizeof comm_id_error, VLM_E_INTERNAL, __FILE__, __LINE__, "ncclGetUniqueId(&u)",
                ncclGetErrorString(r), "nccl");
        return VLM_OK;
    }
    memcpy(id, &u, sizeof u);
    return VLM_OK;
}

static vlm_status create_body(vlm_backend *b, cuda_impl *p, const unsigned char *id, char *err, size_t errlen) {
    CU_CHECK(cudaSetDevice(p->dev));
    CU_CHECK(cudaStreamCreateWithFlags(&p->st, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&p->blas));
    CUBLAS_CHECK(cublasSetStream(p->blas, p->st));
    // explicit: f32 GEMMs stay f32 (no TF32 tensor cores; NVIDIA_TF32_OVERRIDE=1 in the environment would
    // still force TF32, which the f32 tolerances of tests/unit/test_cuda.c would catch)
    CUBLAS_CHECK(cublasSetMathMode(p->blas, CUBLAS_DEFAULT_MATH));
    CU_CHECK(cudaEventCreateWithFlags(&p->ids.ev, cudaEventDisableTiming));
    CU_CHECK(cudaEventCreateWithFlags(&p->slots.ev, cudaEventDisableTiming));
    CU_CHECK(cudaEventCreateWithFlags(&p->attn.ev, cudaEventDisableTiming));
    // head_dim 256 needs ~80 KiB of shared memory, above the 48 KiB default (sm_80/sm_90 allow 164/227)
    CU_CHECK(cudaFuncSetAttribute(k_attention, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  (int)attn_smem_bytes(ATT_MAX_HD)));
    if (b->n_ranks > 1) {
        bool zero = true;
        for (int i = 0; i < VLM_CUDA_COMM_ID_BYTES; i++) zero = zero && id[i] == 0;
        if (zero)
            return vlm_errf(err, errlen, VLM_E_INTERNAL, "rank %d: no NCCL id for %d ranks: %s", b->rank, b->n_ranks,
                            comm_id_error[0] ? comm_id_error : "vlm_backend_cuda_comm_id was not called");
        ncclUniqueId u;
        memcpy(&u, id, sizeof u);
        NCCL_CHECK(ncclCommInitRank(&p->comm, b->n_ranks, u, b->rank));
    }
    return VLM_OK;
}

extern "C" vlm_status vlm_backend_cuda_create(int device, int rank, int n_ranks,
                                              const unsigned char id[VLM_CUDA_COMM_ID_BYTES], vlm_backend **out,
                                              char *err, size_t errlen) {
    *out = NULL;
    if (n_ranks < 1 || rank < 0 || rank >= n_ranks)
        return vlm_errf(err, errlen, VLM_E_INVALID, "cuda backend: rank %d of %d", rank, n_ranks);
    vlm_backend *b = (vlm_backend *)calloc(1, sizeof *b);
    cuda_impl *p = (cuda_impl *)calloc(1, sizeof *p);
    if (!b || !p) {
        free(b);
        free(p);
        return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    }
    p->dev = device;
    b->ops = &CUDA_OPS;
    b->rank = rank;
    b->n_ranks = n_ranks;
    b->impl = p;
    vlm_status st = create_body(b, p, id, err, errlen);
    if (st != VLM_OK) {
        // prefix the device so a multi-GPU failure says which one
        char tmp[512];
        snprintf(tmp, sizeof tmp, "%s", err ? err : "");
        if (err && errlen) snprintf(err, errlen, "GPU %d (rank %d): %s", device, rank, tmp);
        cu_destroy(b);
        return st;
    }
    *out = b;
    return VLM_OK;
}

extern "C" vlm_status vlm_cuda_device_info(int device, vlm_cuda_info *info, char *err, size_t errlen) {
    memset(info, 0, sizeof *info);
    cudaDeviceProp pr;
    CU_CHECK(cudaGetDeviceProperties(&pr, device));
    snprintf(info->name, sizeof info->name, "%s", pr.name);
    info->cc_major = pr.major;
    info->cc_minor = pr.minor;
    info->sm_count = pr.multiProcessorCount;
    info->total_mem = (int64_t)pr.totalGlobalMem;
    int mem_khz = 0, bus_bits = 0, sm_khz = 0;
    CU_CHECK(cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, device));
    CU_CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device));
    CU_CHECK(cudaDeviceGetAttribute(&sm_khz, cudaDevAttrClockRate, device));
    // HBM/GDDR transfer on both clock edges: bytes/s = 2 * clock * bus width / 8
    info->peak_bw = 2.0 * (double)mem_khz * 1e3 * (double)bus_bits / 8.0;
    // dense bf16 tensor-core FLOP per SM per clock: 2048 on sm_80 (A100: 312 TFLOPS = 108 SMs x 1.41 GHz x
    // 2048), 4096 on sm_90 (H100 SXM: 989 TFLOPS = 132 x 1.83 GHz x 4096); 0 = unknown for other parts
    double per_sm = pr.major == 8 && pr.minor == 0 ? 2048.0 : pr.major == 9 ? 4096.0 : 0.0;
    info->peak_bf16_flops = per_sm * (double)pr.multiProcessorCount * (double)sm_khz * 1e3;
    return VLM_OK;
}
