/* cpu_internal.h — internal interface between the CPU kernel dispatcher (cpu.c) and the
 * per-ISA kernel files (cpu_avx2.c, cpu_avx512.c). Not part of the public runtime API; tests and
 * benches include it to force a kernel path. */
#ifndef VLM_CPU_INTERNAL_H
#define VLM_CPU_INTERNAL_H

#include "runtime/runtime.h"

/* Kernel paths for vlm_linear, best last. */
typedef enum { VLM_CPU_SCALAR = 0, VLM_CPU_AVX2, VLM_CPU_AVX512, VLM_CPU_PATH_COUNT } vlm_cpu_path;

/* out[i] = dot(x[i*ldx .. +k], w[0..k)) for i < nx, 1 <= nx <= VLM_DOT_MAX_ROWS; w is one weight
 * row in dtype dt (F32, BF16 or F16). Accumulation is f32 in any order. */
#define VLM_DOT_MAX_ROWS 4
typedef void (*vlm_dot_rows_fn)(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                                vlm_dtype dt, float *out);

void vlm_dot_rows_scalar(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                         vlm_dtype dt, float *out);
void vlm_dot_rows_avx2(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                       vlm_dtype dt, float *out);
void vlm_dot_rows_avx512(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                         vlm_dtype dt, float *out);

/* Converts n weight elements of dtype dt to f32 (used by the GEMM path for large n). */
void vlm_cpu_convert_row(const void *w, vlm_dtype dt, int64_t n, float *out);

/* Forces the vlm_linear path: "scalar", "avx2", "avx512" or "auto". Returns 0, or -1 when the
 * name is unknown or this CPU lacks the features (the path is then unchanged). The environment
 * variable VLMD_CPU_PATH does the same at vlm_cpu_init. */
int vlm_cpu_force_path(const char *name);
/* Which vlm_linear path is active, and whether a path can run on this CPU. */
vlm_cpu_path vlm_cpu_active_path(void);
bool vlm_cpu_path_supported(vlm_cpu_path p);
const char *vlm_cpu_path_name(vlm_cpu_path p);

/* Rows of x at or above which vlm_linear uses the blocked GEMM (OpenBLAS sgemm on converted weight
 * panels) instead of the dot-row kernels; 0 disables the GEMM path (tests use this to cover both).
 * Returns the previous value. */
int64_t vlm_cpu_set_gemm_min_rows(int64_t rows);

#endif
