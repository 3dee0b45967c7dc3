// cu_check.h — checked-call macros for the CUDA backend's .cu files (CUDA runtime, cuBLAS, NCCL).
//
// Two flavours, because the backend has two kinds of callers:
//  - CU_CHECK / CUBLAS_CHECK / NCCL_CHECK return a vlm_status from the enclosing function, with
//    "<file>:<line>: <statement> failed: <library error>" written into the function's `err, errlen`
//    (used where the interface has an error channel: device setup, weight loading, the C kernel API);
//  - CU_FATAL / CUBLAS_FATAL / NCCL_FATAL / CU_LAUNCHED abort through vlm_abort with the same text,
//    for the per-step ops of backend.h, which return void: a failing kernel launch or copy in the
//    middle of a decoder step is a broken device, not bad input, and there is no status to return.
// Every message names the failing statement, so a log line points at the exact call.
#ifndef VLM_CU_CHECK_H
#define VLM_CU_CHECK_H

#include <cuda_runtime.h>
#include <stdio.h>

static inline vlm_status cu_fail(char *err, size_t errlen, vlm_status st, const char *file, int line,
                                 const char *stmt, const char *what, const char *name) {
    if (err && errlen) snprintf(err, errlen, "%s:%d: %s failed: %s (%s)", file, line, stmt, what, name);
    return st;
}

[[noreturn]] static inline void cu_die(const char *file, int line, const char *stmt, const char *what,
                                       const char *name) {
    char msg[768];
    snprintf(msg, sizeof msg, "%s failed: %s (%s)", stmt, what, name);
    vlm_abort(file, line, msg);
}

#define CU_CHECK(stmt)                                                                                   \
    do {                                                                                                 \
        cudaError_t e_ = (stmt);                                                                         \
        if (e_ != cudaSuccess) {                                                                         \
            cudaGetLastError(); /* clear a non-sticky error so later calls are not blamed for it */     \
            return cu_fail(err, errlen, e_ == cudaErrorMemoryAllocation ? VLM_E_NOMEM : VLM_E_INTERNAL, \
                           __FILE__, __LINE__, #stmt, cudaGetErrorString(e_), cudaGetErrorName(e_));     \
        }                                                                                                \
    } while (0)

#define CU_FATAL(stmt)                                                                                   \
    do {                                                                                                 \
        cudaError_t e_ = (stmt);                                                                         \
        if (e_ != cudaSuccess) cu_die(__FILE__, __LINE__, #stmt, cudaGetErrorString(e_), cudaGetErrorName(e_)); \
    } while (0)

// After a kernel launch: catches bad launch configurations without forcing a synchronisation.
#define CU_LAUNCHED(kernel)                                                                              \
    do {                                                                                                 \
        cudaError_t e_ = cudaGetLastError();                                                             \
        if (e_ != cudaSuccess)                                                                           \
            cu_die(__FILE__, __LINE__, "launch of " #kernel, cudaGetErrorString(e_), cudaGetErrorName(e_)); \
    } while (0)

#ifdef CUBLAS_API_H_
#define CUBLAS_CHECK(stmt)                                                                               \
    do {                                                                                                 \
        cublasStatus_t s_ = (stmt);                                                                      \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                                 \
            return cu_fail(err, errlen, s_ == CUBLAS_STATUS_ALLOC_FAILED ? VLM_E_NOMEM : VLM_E_INTERNAL, \
                           __FILE__, __LINE__, #stmt, cublasGetStatusString(s_), cublasGetStatusName(s_)); \
    } while (0)
#define CUBLAS_FATAL(stmt)                                                                               \
    do {                                                                                                 \
        cublasStatus_t s_ = (stmt);                                                                      \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                                 \
            cu_die(__FILE__, __LINE__, #stmt, cublasGetStatusString(s_), cublasGetStatusName(s_));       \
    } while (0)
#endif

#ifdef NCCL_H_
#define NCCL_CHECK(stmt)                                                                                 \
    do {                                                                                                 \
        ncclResult_t r_ = (stmt);                                                                        \
        if (r_ != ncclSuccess)                                                                           \
            return cu_fail(err, errlen, VLM_E_INTERNAL, __FILE__, __LINE__, #stmt, ncclGetErrorString(r_), "nccl"); \
    } while (0)
#define NCCL_FATAL(stmt)                                                                                 \
    do {                                                                                                 \
        ncclResult_t r_ = (stmt);                                                                        \
        if (r_ != ncclSuccess) cu_die(__FILE__, __LINE__, #stmt, ncclGetErrorString(r_), "nccl");        \
    } while (0)
#endif

#endif
