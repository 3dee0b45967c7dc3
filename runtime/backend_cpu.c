/* backend_cpu.c — the CPU implementation of the backend table (backend.h) and the in-process
 * communicator that CPU tensor-parallel ranks use.
 *
 * Device memory is host memory. Kernels are the runtime's CPU kernels (vlm_linear, vlm_rms_norm,
 * vlm_gemm_f32) plus the paged-KV attention that used to live in engine.c; each rank's kernels run
 * with the OpenMP team size its rank thread set (engine.c: threads / N per rank), so N ranks never
 * oversubscribe the cores with nested teams. */
#include "runtime/backend.h"
#include "runtime/cpu_internal.h"
#include "runtime/rt_internal.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- in-process communicator -------------------------------------------------------------- */
struct vlm_cpu_comm {
    int n;
    pthread_barrier_t bar;
    const float **slot;       /* each rank's published buffer for the current all-reduce */
};

vlm_cpu_comm *vlm_cpu_comm_create(int n_ranks) {
    vlm_cpu_comm *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->n = n_ranks;
    c->slot = calloc((size_t)n_ranks, sizeof *c->slot);
    if (!c->slot || pthread_barrier_init(&c->bar, NULL, (unsigned)n_ranks) != 0) {
        free(c->slot);
        free(c);
        return NULL;
    }
    return c;
}

void vlm_cpu_comm_free(vlm_cpu_comm *c) {
    if (!c) return;
    pthread_barrier_destroy(&c->bar);
    free(c->slot);
    free(c);
}

void vlm_cpu_comm_barrier(vlm_cpu_comm *c) { pthread_barrier_wait(&c->bar); }

typedef struct {
    vlm_cpu_comm *comm;
    float *tmp;               /* all-reduce accumulator */
    int64_t tmp_cap;
} cpu_impl;

static cpu_impl *impl_of(vlm_backend *b) { return b->impl; }

/* ---- memory ------------------------------------------------------------------------------- */
static void *cpu_alloc(vlm_backend *b, size_t bytes) {
    (void)b;
    return malloc(bytes ? bytes : 1);
}
static void cpu_release(vlm_backend *b, void *p) { (void)b; free(p); }
static void cpu_upload(vlm_backend *b, void *dst, const void *src, size_t bytes) {
    (void)b;
    if (bytes) memcpy(dst, src, bytes);
}
static void cpu_download(vlm_backend *b, void *dst, const void *src, size_t bytes) {
    (void)b;
    if (bytes) memcpy(dst, src, bytes);
}
static int64_t cpu_mem_capacity(vlm_backend *b) {
    (void)b;
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    return pages > 0 && psz > 0 ? (int64_t)pages * psz : INT64_MAX;
}

/* Row blocks of a 2-D tensor are contiguous in the mmap and are aliased (no copy); column blocks
 * are copied row by row into a buffer this rank owns. shape[VLM_MAX_DIMS-1] == -2 marks it owned. */
static vlm_status cpu_weight_load(vlm_backend *b, const vlm_tensor *src, int64_t r0, int64_t nr, int64_t c0,
                                  int64_t nc, vlm_tensor *out, size_t *copied, char *err, size_t errlen) {
    (void)b;
    size_t es = vlm_dtype_size(src->dtype);
    *out = *src;
    *copied = 0;
    if (src->ndim == 1) {
        VLM_ASSERT(r0 >= 0 && nr >= 0 && r0 + nr <= src->shape[0] && c0 == 0 && nc == 1);
        out->data = (char *)src->data + (size_t)r0 * es;
        out->shape[0] = nr;
        out->nbytes = (size_t)nr * es;
        return VLM_OK;
    }
    VLM_ASSERT(src->ndim == 2 && r0 >= 0 && nr >= 0 && r0 + nr <= src->shape[0] && c0 >= 0 && nc >= 0 &&
               c0 + nc <= src->shape[1]);
    int64_t cols = src->shape[1];
    out->shape[0] = nr;
    out->shape[1] = nc;
    out->nbytes = (size_t)(nr * nc) * es;
    if (c0 == 0 && nc == cols) {
        out->data = (char *)src->data + (size_t)(r0 * cols) * es;
        return VLM_OK;
    }
    char *d = malloc(out->nbytes ? out->nbytes : 1);
    if (!d) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory for a %zu-byte weight shard", out->nbytes);
    for (int64_t r = 0; r < nr; r++)
        memcpy(d + (size_t)(r * nc) * es, (const char *)src->data + (size_t)((r0 + r) * cols + c0) * es, (size_t)nc * es);
    out->data = d;
    out->shape[VLM_MAX_DIMS - 1] = -2;
    *copied = out->nbytes;
    return VLM_OK;
}

static void cpu_weight_free(vlm_backend *b, vlm_tensor *w) {
    (void)b;
    if (w->shape[VLM_MAX_DIMS - 1] == -2) free(w->data);
    memset(w, 0, sizeof *w);
}

struct vlm_kv_pool {
    int n_layers;
    int64_t n_pages, pt, kvd;
    float *k, *v;             /* [layer][page][slot][kvd] */
};

static vlm_kv_pool *cpu_kv_create(vlm_backend *b, int n_layers, int64_t n_pages, int64_t pt, int64_t kvd) {
    (void)b;
    vlm_kv_pool *kv = calloc(1, sizeof *kv);
    if (!kv) return NULL;
    *kv = (vlm_kv_pool){n_layers, n_pages, pt, kvd, NULL, NULL};
    size_t n = (size_t)n_layers * (size_t)n_pages * (size_t)pt * (size_t)kvd * sizeof(float);
    kv->k = malloc(n);
    kv->v = malloc(n);
    if (!kv->k || !kv->v) {
        free(kv->k);
        free(kv->v);
        free(kv);
        return NULL;
    }
    return kv;
}

static void cpu_kv_free(vlm_backend *b, vlm_kv_pool *kv) {
    (void)b;
    if (!kv) return;
    free(kv->k);
    free(kv->v);
    free(kv);
}

/* ---- decoder ops -------------------------------------------------------------------------- */
static inline float wval(const vlm_tensor *w, int64_t i) {
    switch (w->dtype) {
    case VLM_F32: return ((const float *)w->data)[i];
    case VLM_BF16: return vlm_bf16_to_f32(((const uint16_t *)w->data)[i]);
    default: return vlm_f16_to_f32(((const uint16_t *)w->data)[i]);
    }
}

static void cpu_embed(vlm_backend *b, const vlm_tensor *t, int64_t v0, const int32_t *ids, int64_t n, float *out) {
    (void)b;
    int64_t H = t->shape[1], rows = t->shape[0];
    for (int64_t i = 0; i < n; i++) {
        int64_t r = (int64_t)ids[i] - v0;
        if (ids[i] < 0 || r < 0 || r >= rows) memset(out + i * H, 0, (size_t)H * sizeof(float));
        else for (int64_t j = 0; j < H; j++) out[i * H + j] = wval(t, r * H + j);
    }
}

static void cpu_rms_norm(vlm_backend *b, const float *x, const vlm_tensor *w, float eps, int64_t n, int64_t d, float *y) {
    (void)b;
    vlm_rms_norm(x, w, eps, n, d, y);
}

static void cpu_linear(vlm_backend *b, const float *x, int64_t n, int64_t k, const vlm_tensor *w,
                       const vlm_tensor *bias, float *y) {
    (void)b;
    vlm_linear(x, n, k, w, bias, y);
}

/* rotate_half RoPE (SPEC §B, §C.1) with per-row, per-frequency cos/sin */
static void cpu_rope(vlm_backend *b, float *x, int64_t n, int64_t nh, int64_t hd, const float *cs, const float *sn) {
    (void)b;
    int64_t half = hd / 2;
    for (int64_t r = 0; r < n; r++)
        for (int64_t h = 0; h < nh; h++) {
            float *v = x + (r * nh + h) * hd;
            const float *c = cs + r * half, *s = sn + r * half;
            for (int64_t j = 0; j < half; j++) {
                float a = v[j], bb = v[j + half];
                v[j] = a * c[j] - bb * s[j];
                v[j + half] = bb * c[j] + a * s[j];
            }
        }
}

static inline float *kv_slot(const vlm_kv_pool *kv, float *pool, int layer, int64_t slot) {
    return pool + ((int64_t)layer * kv->n_pages * kv->pt + slot) * kv->kvd;
}
static inline float *kv_tok(const vlm_kv_pool *kv, float *pool, int layer, const vlm_attn_seq *s, int64_t t) {
    return kv_slot(kv, pool, layer, (int64_t)s->pages[t / kv->pt] * kv->pt + t % kv->pt);
}

static void cpu_kv_write(vlm_backend *b, vlm_kv_pool *kv, int layer, const int64_t *slots, int64_t n, const float *k,
                         const float *v) {
    (void)b;
    for (int64_t i = 0; i < n; i++) {
        memcpy(kv_slot(kv, kv->k, layer, slots[i]), k + i * kv->kvd, (size_t)kv->kvd * sizeof(float));
        memcpy(kv_slot(kv, kv->v, layer, slots[i]), v + i * kv->kvd, (size_t)kv->kvd * sizeof(float));
    }
}

static void cpu_kv_copy(vlm_backend *b, vlm_kv_pool *kv, int64_t src, int64_t dst, int64_t n) {
    (void)b;
    for (int l = 0; l < kv->n_layers; l++) {
        memcpy(kv_slot(kv, kv->k, l, dst), kv_slot(kv, kv->k, l, src), (size_t)(n * kv->kvd) * sizeof(float));
        memcpy(kv_slot(kv, kv->v, l, dst), kv_slot(kv, kv->v, l, src), (size_t)(n * kv->kvd) * sizeof(float));
    }
}

/* Attention of a prefill chunk: rows s->start.. of sequence s over its tokens 0..start+n-1.
 * q, out: rows of stride nh*hd. The context's K and V rows are gathered from the pages into
 * contiguous [T, kvd] buffers, then the blocked causal attention (cpu_attn.c: online softmax,
 * threads over (head, query block)) runs on them. */
static void chunk_attention(const vlm_kv_pool *kv, int l, const vlm_attn_seq *s, int64_t nh, int64_t nkv, int64_t hd,
                            const float *q, float *out, float scale) {
    const int64_t s0 = s->start, n = s->n, Q = nh * hd, T = s0 + n, kvd = kv->kvd;
    float *kc = malloc((size_t)(T * kvd) * sizeof(float)), *vc = malloc((size_t)(T * kvd) * sizeof(float));
    VLM_ASSERT(kc && vc);
    for (int64_t t = 0; t < T; t++) {
        memcpy(kc + t * kvd, kv_tok(kv, kv->k, l, s, t), (size_t)kvd * sizeof(float));
        memcpy(vc + t * kvd, kv_tok(kv, kv->v, l, s, t), (size_t)kvd * sizeof(float));
    }
    vlm_attention_f32(n, T, (int)nh, (int)nkv, (int)hd, q, Q, kc, kvd, vc, kvd, scale, s0, out, Q);
    free(kc);
    free(vc);
}

/* Decode rows: one task per (sequence, KV head), the query heads of its GQA group together
 * (vlm_attention_decode_f32 reads each K/V row once for all of them); prefill chunks use matrix
 * products per head. */
static void cpu_attention(vlm_backend *b, vlm_kv_pool *kv, int l, const vlm_attn_seq *seqs, int n_seqs, int64_t nh,
                          int64_t nkv, int64_t hd, float scale, const float *q, float *out) {
    (void)b;
    int64_t Q = nh * hd, grp = nh / nkv;
    VLM_ASSERT(nkv * hd == kv->kvd && nh % nkv == 0);
    int64_t max_keys = 0;
    for (int si = 0; si < n_seqs; si++)
        if (seqs[si].n == 1 && seqs[si].start + 1 > max_keys) max_keys = seqs[si].start + 1;
    if (max_keys > 0) {
        const float *k0 = kv_slot(kv, kv->k, l, 0), *v0 = kv_slot(kv, kv->v, l, 0);
#pragma omp parallel
        {
            float *sbuf = malloc((size_t)(grp * max_keys) * sizeof(float));
            VLM_ASSERT(sbuf);
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (int si = 0; si < n_seqs; si++)
                for (int64_t kh = 0; kh < nkv; kh++) {
                    const vlm_attn_seq *s = &seqs[si];
                    if (s->n != 1) continue;
                    const int64_t r = s->row0;
                    vlm_attention_decode_f32(s->start + 1, (int)grp, (int)hd, q + r * Q + kh * grp * hd,
                                             k0 + kh * hd, v0 + kh * hd, kv->kvd, s->pages, kv->pt, scale, sbuf,
                                             out + r * Q + kh * grp * hd);
                }
            free(sbuf);
        }
    }
    for (int si = 0; si < n_seqs; si++)
        if (seqs[si].n > 1)
            chunk_attention(kv, l, &seqs[si], nh, nkv, hd, q + seqs[si].row0 * Q, out + seqs[si].row0 * Q, scale);
}

static void cpu_swiglu(vlm_backend *b, float *g, const float *u, int64_t n) {
    (void)b;
    vlm_swiglu_f32(g, u, n);
}

static void cpu_add(vlm_backend *b, float *x, const float *a, int64_t n) {
    (void)b;
    for (int64_t i = 0; i < n; i++) x[i] += a[i];
}

/* Every rank publishes its buffer, then every rank sums all of them in rank order 0..N-1 into a
 * private accumulator (so all ranks hold bitwise-identical results, independent of timing), waits
 * until everyone has read, and only then overwrites its own buffer. */
static void cpu_all_reduce(vlm_backend *b, float *x, int64_t n) {
    if (b->n_ranks == 1 || n == 0) return;
    cpu_impl *p = impl_of(b);
    vlm_cpu_comm *c = p->comm;
    if (p->tmp_cap < n) {
        free(p->tmp);
        p->tmp = malloc((size_t)n * sizeof(float));
        VLM_ASSERT(p->tmp);
        p->tmp_cap = n;
    }
    c->slot[b->rank] = x;
    pthread_barrier_wait(&c->bar);
    memcpy(p->tmp, c->slot[0], (size_t)n * sizeof(float));
    for (int r = 1; r < c->n; r++) {
        const float *s = c->slot[r];
        for (int64_t i = 0; i < n; i++) p->tmp[i] += s[i];
    }
    pthread_barrier_wait(&c->bar);
    memcpy(x, p->tmp, (size_t)n * sizeof(float));
}

static void cpu_logits_gather(vlm_backend *b, const float *local, int64_t n, int64_t vl, int64_t v0, float *out,
                              int64_t V) {
    (void)b;
    for (int64_t i = 0; i < n; i++) memcpy(out + i * V + v0, local + i * vl, (size_t)vl * sizeof(float));
}

static void cpu_destroy(vlm_backend *b) {
    if (!b) return;
    cpu_impl *p = impl_of(b);
    free(p->tmp);
    free(p);
    free(b);
}

static const vlm_backend_ops CPU_OPS = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .release = cpu_release,
    .upload = cpu_upload,
    .download = cpu_download,
    .mem_capacity = cpu_mem_capacity,
    .weight_load = cpu_weight_load,
    .weight_free = cpu_weight_free,
    .kv_create = cpu_kv_create,
    .kv_free = cpu_kv_free,
    .embed = cpu_embed,
    .rms_norm = cpu_rms_norm,
    .linear = cpu_linear,
    .rope = cpu_rope,
    .kv_write = cpu_kv_write,
    .kv_copy = cpu_kv_copy,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .all_reduce = cpu_all_reduce,
    .logits_gather = cpu_logits_gather,
    .destroy = cpu_destroy,
};

vlm_backend *vlm_backend_cpu_create(vlm_cpu_comm *comm, int rank, int n_ranks) {
    VLM_ASSERT(rank >= 0 && rank < n_ranks && (n_ranks == 1 || comm));
    vlm_backend *b = calloc(1, sizeof *b);
    cpu_impl *p = calloc(1, sizeof *p);
    if (!b || !p) {
        free(b);
        free(p);
        return NULL;
    }
    p->comm = comm;
    b->ops = &CPU_OPS;
    b->rank = rank;
    b->n_ranks = n_ranks;
    b->impl = p;
    return b;
}
