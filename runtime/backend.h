/* backend.h — the compute-backend interface of the runtime (internal; not part of runtime.h).
 *
 * The per-rank decoder step in engine.c is written only against the operation table below, so the
 * same layer loop (and the same tensor-parallel sharding) runs on the CPU backend (backend_cpu.c,
 * wrapping vlm_linear / vlm_rms_norm / the paged-KV attention) and on a CUDA backend that fills the
 * same table (runtime/cuda, built with `make CUDA=1`).
 *
 * Ranks. A tensor-parallel engine over N ranks holds N vlm_backend instances, one per rank (one GPU,
 * or one CPU rank thread). Every call on a vlm_backend comes from that rank's own thread, in program
 * order; a backend may queue work asynchronously (a CUDA stream) as long as results are visible to
 * the next op on the same backend and `download`/`logits_gather` complete before they return.
 *
 * Memory. "Device" buffers (activations, weights, the KV pool) are allocated by the backend and are
 * opaque to engine.c: it never dereferences them, it only does pointer arithmetic on float buffers to
 * address rows (x + r * H), which is valid for CUDA device pointers too. For the CPU backend device
 * memory is host memory.
 *
 * Host metadata. Small per-step integer arrays (token ids, KV slot indices, page tables, sequence
 * extents) are passed as HOST pointers, valid only for the duration of the call; a device backend
 * copies what it needs (they are a few KiB per step).
 *
 * Weights. vlm_tensor is reused as the device tensor handle: dtype and shape are as on the host, data
 * is a device pointer. A rank's shard is cut from the mmapped checkpoint tensor by `weight_load` as
 * the 2-D block rows [r0, r0+nr) x cols [c0, c0+nc): column-parallel projections take a row block
 * (contiguous in the file: the CPU backend aliases the mmap, a GPU backend copies it straight to the
 * device), row-parallel ones a column block (the CPU backend copies it into a per-rank buffer). So no
 * backend ever needs the whole model in host memory beyond the mmap.
 *
 * Collectives. `all_reduce` sums a buffer over all ranks of the engine and leaves the identical
 * result on every rank (the CPU backend adds the ranks' partials in fixed rank order 0..N-1, so a
 * run is bitwise reproducible; NCCL's ring order is also fixed for a given communicator).
 * `logits_gather` writes this rank's vocab slice of the logits into the shared host array; the
 * engine synchronises the ranks after the step.
 *
 * Layouts (row-major, f32 activations):
 *   x, a        [R, hidden]           residual stream / normed input, replicated on every rank
 *   q, att      [R, nh_local * hd]    this rank's query heads, attention output
 *   k, v        [R, nkv_local * hd]   this rank's KV heads
 *   g, u        [R, ffn / N]          gate / up shards
 *   cs, sn      [R, hd / 2]           per-row RoPE cos / sin (M-RoPE sections already applied)
 *   KV pool     [layer][page][slot][nkv_local * hd] for K and for V, f32
 */
#ifndef VLM_BACKEND_H
#define VLM_BACKEND_H

#include "runtime/runtime.h"

typedef struct vlm_backend vlm_backend;
typedef struct vlm_kv_pool vlm_kv_pool; /* backend-owned paged KV storage of one rank */

/* One sequence's part of a step, for attention: rows row0..row0+n-1 of the step hold its tokens
 * start..start+n-1, which attend causally to tokens 0..start+n-1 stored in its pages. n == 1 is a
 * decode row, n > 1 a prefill chunk. */
typedef struct {
    const int32_t *pages;   /* host page table */
    int64_t n_pages;
    int64_t start, n, row0;
} vlm_attn_seq;

typedef struct vlm_backend_ops {
    const char *name;       /* "cpu", "cuda" */
    /* ---- memory ---- */
    void *(*alloc)(vlm_backend *b, size_t bytes);           /* NULL when out of memory */
    void (*release)(vlm_backend *b, void *p);
    void (*upload)(vlm_backend *b, void *dst, const void *host_src, size_t bytes);
    void (*download)(vlm_backend *b, void *host_dst, const void *src, size_t bytes);
    /* bytes this rank may still allocate (GPU: free device memory; CPU: physical memory) */
    int64_t (*mem_capacity)(vlm_backend *b);
    /* shard [r0, r0+nr) x [c0, c0+nc) of host tensor src (1-D tensors: elements [r0, r0+nr), c0 = 0,
     * nc = 1) into *out; *copied_bytes receives the bytes that now live in backend memory */
    vlm_status (*weight_load)(vlm_backend *b, const vlm_tensor *src, int64_t r0, int64_t nr, int64_t c0,
                              int64_t nc, vlm_tensor *out, size_t *copied_bytes, char *err, size_t errlen);
    void (*weight_free)(vlm_backend *b, vlm_tensor *w);
    vlm_kv_pool *(*kv_create)(vlm_backend *b, int n_layers, int64_t n_pages, int64_t page_tokens,
                              int64_t kv_dim);
    void (*kv_free)(vlm_backend *b, vlm_kv_pool *kv);

    /* ---- decoder ops (all f32 activations) ---- */
    /* out[i] = table row ids[i] - v0 when v0 <= ids[i] < v0 + table rows, else zeros (ids < 0: zeros) */
    void (*embed)(vlm_backend *b, const vlm_tensor *table, int64_t v0, const int32_t *host_ids, int64_t n,
                  float *out);
    void (*rms_norm)(vlm_backend *b, const float *x, const vlm_tensor *w, float eps, int64_t n, int64_t d,
                     float *y);
    /* y[n, m] = x[n, k] . W[m, k]^T (+ bias) with this rank's shard W */
    void (*linear)(vlm_backend *b, const float *x, int64_t n, int64_t k, const vlm_tensor *w,
                   const vlm_tensor *bias, float *y);
    /* rotate_half RoPE in place on n rows of n_heads heads of hd (row stride n_heads * hd) */
    void (*rope)(vlm_backend *b, float *x, int64_t n, int64_t n_heads, int64_t hd, const float *cs,
                 const float *sn);
    /* row i's k/v go to KV slot host_slots[i] (= page * page_tokens + offset) of layer */
    void (*kv_write)(vlm_backend *b, vlm_kv_pool *kv, int layer, const int64_t *host_slots, int64_t n,
                     const float *k, const float *v);
    /* K and V of n consecutive slots from src_slot to dst_slot (same page-relative offsets, no
     * overlap), in every layer: the prefix cache's partial-page reuse */
    void (*kv_copy)(vlm_backend *b, vlm_kv_pool *kv, int64_t src_slot, int64_t dst_slot, int64_t n);
    /* causal attention over paged KV for decode rows and prefill chunks: q, out [R, n_heads * hd];
     * query head h uses KV head h / (n_heads / n_kv_heads); softmax in f32 with scores * scale */
    void (*attention)(vlm_backend *b, vlm_kv_pool *kv, int layer, const vlm_attn_seq *host_seqs, int n_seqs,
                      int64_t n_heads, int64_t n_kv_heads, int64_t hd, float scale, const float *q, float *out);
    void (*swiglu)(vlm_backend *b, float *g, const float *u, int64_t n);  /* g = silu(g) * u */
    void (*add)(vlm_backend *b, float *x, const float *a, int64_t n);     /* x += a */
    /* ---- collectives ---- */
    void (*all_reduce)(vlm_backend *b, float *x, int64_t n);
    /* host_out[i * V + v0 + j] = local[i * vl + j] for i < n, j < vl */
    void (*logits_gather)(vlm_backend *b, const float *local, int64_t n, int64_t vl, int64_t v0,
                          float *host_out, int64_t V);
    void (*destroy)(vlm_backend *b);
} vlm_backend_ops;

struct vlm_backend {
    const vlm_backend_ops *ops;
    int rank, n_ranks;
    void *impl;             /* backend private state */
};

/* ---- CPU backend (backend_cpu.c) ----
 * An in-process communicator for n_ranks CPU rank threads: all_reduce is barrier, every rank adds the
 * ranks' partials in rank order 0..N-1 into its own buffer, barrier. */
typedef struct vlm_cpu_comm vlm_cpu_comm;
vlm_cpu_comm *vlm_cpu_comm_create(int n_ranks);
void vlm_cpu_comm_free(vlm_cpu_comm *c);
void vlm_cpu_comm_barrier(vlm_cpu_comm *c);
/* the engine calls this on the rank's own thread; that thread sets its OpenMP team size */
vlm_backend *vlm_backend_cpu_create(vlm_cpu_comm *comm, int rank, int n_ranks);

/* ---- CUDA backend (runtime/cuda, only with `make CUDA=1`) ----
 * Declared weak so a build without the CUDA objects links; engine.c checks the address before use.
 * device: CUDA ordinal; ranks of one engine share a communicator built from an id the engine creates
 * with vlm_backend_cuda_comm_id (NCCL unique id, opaque bytes). The engine calls create on each
 * rank's own thread, all ranks concurrently (NCCL's communicator setup blocks until all have joined),
 * and every later op of that rank from the same thread. */
#define VLM_CUDA_COMM_ID_BYTES 128
vlm_status vlm_backend_cuda_comm_id(unsigned char id[VLM_CUDA_COMM_ID_BYTES], char *err, size_t errlen)
    __attribute__((weak));
vlm_status vlm_backend_cuda_create(int device, int rank, int n_ranks,
                                   const unsigned char id[VLM_CUDA_COMM_ID_BYTES], vlm_backend **out,
                                   char *err, size_t errlen) __attribute__((weak));
/* number of CUDA devices visible (0 when no driver/GPU) */
int vlm_backend_cuda_device_count(void) __attribute__((weak));

#endif
