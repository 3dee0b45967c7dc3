/* vlm_cuda.h — C11 interface to vlmd's CUDA backend (runtime/cuda/ *.cu files).
 *
 * Only compiled/linked with `make CUDA=1` (which defines VLM_HAVE_CUDA). Every CUDA/cuBLAS call inside is
 * checked; a failure returns a vlm_status with a message naming the failing statement, file and line in
 * the caller's err buffer (never exit()). Activations are f32 in this first increment (simplest to verify
 * against the CPU engine, which is f32); weights are bf16 (uint16_t bit patterns, as in the checkpoint).
 * Status: compile/link verified only; no GPU has run this code yet (see docs/cuda.md). */
#ifndef VLM_CUDA_H
#define VLM_CUDA_H
#include <stddef.h>
#include <stdint.h>
#include "runtime/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable devices; 0 (and VLM_OK) when the driver reports none or no driver is present. */
vlm_status vlm_cuda_device_count(int *count, char *err, size_t errlen);
vlm_status vlm_cuda_select(int device, char *err, size_t errlen);

vlm_status vlm_cuda_malloc(void **ptr, size_t bytes, char *err, size_t errlen);
void vlm_cuda_free(void *ptr);
vlm_status vlm_cuda_h2d(void *dst, const void *src, size_t bytes, char *err, size_t errlen);
vlm_status vlm_cuda_d2h(void *dst, const void *src, size_t bytes, char *err, size_t errlen);
vlm_status vlm_cuda_sync(char *err, size_t errlen);

/* Kernels on device pointers (default stream). Shapes in elements. */
/* y[r,:] = x[r,:] / sqrt(mean(x[r,:]^2) + eps) * w (w bf16), r < rows, row length n. */
vlm_status vlm_cuda_rmsnorm(float *y, const float *x, const uint16_t *w, int rows, int n, float eps,
                            char *err, size_t errlen);
/* out[i] = silu(gate[i]) * up[i], i < n. */
vlm_status vlm_cuda_swiglu(float *out, const float *gate, const float *up, int64_t n, char *err,
                           size_t errlen);
/* x[i] += r[i], i < n. */
vlm_status vlm_cuda_add(float *x, const float *r, int64_t n, char *err, size_t errlen);
/* out[r] = argmax_j logits[r, j] (lowest index on ties, like the CPU sampler), r < rows. */
vlm_status vlm_cuda_argmax(int32_t *out, const float *logits, int rows, int vocab, char *err,
                           size_t errlen);
/* Rotate-half RoPE in place on x[rows, heads, hd] (same math as runtime/engine.c's rope_head): frequency
 * j < hd/2 uses position pos3[r*3 + s] with s = 0 for j < sec0, 1 for j < sec0+sec1, else 2 (M-RoPE);
 * 1-D RoPE is sec0 = hd/2, sec1 = 0 with any pos3 whose first entry is the position. inv_freq[hd/2] f32. */
vlm_status vlm_cuda_rope(float *x, int rows, int heads, int hd, const int64_t *pos3, const float *inv_freq,
                         int sec0, int sec1, char *err, size_t errlen);
/* out[i, :] = f32(table[ids[i], :]) for i < n (bf16 table [vocab, hidden]); ids outside [0, vocab) give
 * zero rows (the engine validates ids before this, so this only keeps a bad id from reading out of bounds). */
vlm_status vlm_cuda_embed(float *out, const uint16_t *table, const int32_t *ids, int n, int hidden, int vocab,
                          char *err, size_t errlen);
/* In-place numerically stable softmax over each row of x[rows, n]. */
vlm_status vlm_cuda_softmax(float *x, int rows, int n, char *err, size_t errlen);

/* Device facts for the GPU bench (runtime/cuda/backend_cuda.cu): peak memory bandwidth from the memory clock
 * and bus width, and the dense bf16 tensor-core peak where the part is known (sm_80, sm_90; else 0). */
typedef struct {
    char name[256];
    int cc_major, cc_minor, sm_count;
    int64_t total_mem;
    double peak_bw;          /* bytes/s */
    double peak_bf16_flops;  /* FLOP/s, 0 when unknown */
} vlm_cuda_info;
vlm_status vlm_cuda_device_info(int device, vlm_cuda_info *info, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
