/* core.c — status names, error formatting, dtypes, scalar conversions and keyed hashing shared by the
 * runtime (and the server's caches). */
#include "runtime/runtime.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

const char *vlm_status_name(vlm_status s) {
    switch (s) {
    case VLM_OK: return "ok";
    case VLM_E_INVALID: return "invalid";
    case VLM_E_IO: return "io";
    case VLM_E_FORMAT: return "format";
    case VLM_E_UNSUPPORTED: return "unsupported";
    case VLM_E_NOMEM: return "nomem";
    case VLM_E_LIMIT: return "limit";
    case VLM_E_CAPACITY: return "capacity";
    case VLM_E_CANCELLED: return "cancelled";
    case VLM_E_INTERNAL: return "internal";
    }
    return "unknown";
}

_Noreturn void vlm_abort(const char *file, int line, const char *what) {
    fprintf(stderr, "vlmd: invariant broken at %s:%d: %s\n", file, line, what);
    fflush(stderr);
    abort();
}

vlm_status vlm_errf(char *buf, size_t len, vlm_status st, const char *fmt, ...) {
    if (buf && len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, len, fmt, ap);
        va_end(ap);
    }
    return st;
}

size_t vlm_dtype_size(vlm_dtype t) {
    switch (t) {
    case VLM_F32: case VLM_I32: return 4;
    case VLM_BF16: case VLM_F16: return 2;
    case VLM_I64: return 8;
    case VLM_U8: return 1;
    default: return 0;
    }
}

const char *vlm_dtype_name(vlm_dtype t) {
    switch (t) {
    case VLM_F32: return "F32";
    case VLM_BF16: return "BF16";
    case VLM_F16: return "F16";
    case VLM_I32: return "I32";
    case VLM_I64: return "I64";
    case VLM_U8: return "U8";
    default: return "?";
    }
}

int64_t vlm_tensor_numel(const vlm_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

uint16_t vlm_f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* quiet NaN */
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u); /* ties to even */
    return (uint16_t)((v.u + rounding) >> 16);
}

float vlm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    union { uint32_t u; float f; } v;
    if (exp == 0) {
        /* zero or subnormal: value = man * 2^-24 */
        float m = (float)man * 5.9604644775390625e-8f;
        return sign ? -m : m;
    } else if (exp == 31) {
        v.u = sign | 0x7f800000u | (man << 13);
    } else {
        v.u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    return v.f;
}

/* ---- keyed hashing: SipHash-2-4 rounds (Aumasson & Bernstein) over a stream of 64-bit words ---- */
#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
static inline void sipround(uint64_t v[4]) {
    v[0] += v[1]; v[1] = ROTL(v[1], 13); v[1] ^= v[0]; v[0] = ROTL(v[0], 32);
    v[2] += v[3]; v[3] = ROTL(v[3], 16); v[3] ^= v[2];
    v[0] += v[3]; v[3] = ROTL(v[3], 21); v[3] ^= v[0];
    v[2] += v[1]; v[1] = ROTL(v[1], 17); v[1] ^= v[2]; v[2] = ROTL(v[2], 32);
}

void vlm_hash_random_key(uint64_t key[2]) {
    if (getrandom(key, 2 * sizeof *key, 0) == (ssize_t)(2 * sizeof *key)) return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    key[0] = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)ts.tv_sec;
    key[1] = (uint64_t)(uintptr_t)key * 0xC2B2AE3D27D4EB4Full ^ (uint64_t)clock();
}

void vlm_hash_begin(vlm_hash *h, const uint64_t key[2]) {
    h->v[0] = key[0] ^ 0x736f6d6570736575ull;
    h->v[1] = key[1] ^ 0x646f72616e646f6dull;
    h->v[2] = key[0] ^ 0x6c7967656e657261ull;
    h->v[3] = key[1] ^ 0x7465646279746573ull;
    h->n = 0;
}

void vlm_hash_word(vlm_hash *h, uint64_t m) {
    h->v[3] ^= m;
    sipround(h->v);
    sipround(h->v);
    h->v[0] ^= m;
    h->n++;
}

void vlm_hash_bytes(vlm_hash *h, const void *data, size_t n) {
    const unsigned char *c = data;
    for (; n >= 8; n -= 8, c += 8) {
        uint64_t m;
        memcpy(&m, c, 8);
        vlm_hash_word(h, m);
    }
    if (n) {
        uint64_t m = 0;
        memcpy(&m, c, n);
        vlm_hash_word(h, m ^ ((uint64_t)n << 56));
    }
}

uint64_t vlm_hash_end(vlm_hash *h) {
    vlm_hash_word(h, h->n << 56);
    h->v[2] ^= 0xff;
    for (int i = 0; i < 4; i++) sipround(h->v);
    return h->v[0] ^ h->v[1] ^ h->v[2] ^ h->v[3];
}
