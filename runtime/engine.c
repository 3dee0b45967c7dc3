/* engine.c — the batched Qwen2 decoder over a paged KV cache, and continuous batching.
 *
 * One vlm_engine_step = one forward over every scheduled row: decode tokens of running sequences plus
 * prefill chunks of newer ones, bounded by max_batch_tokens. Every projection is one vlm_linear call
 * over all rows (the weights are read once per step); attention runs per sequence over its pages.
 *
 * KV cache: a pool of pages, each holding page_tokens tokens of K and V for every layer, stored in f32
 * (exactness first: the f32 fixtures' 1e-3 logits tolerance leaves no room for bf16 rounding of K/V,
 * which would add ~4e-3 relative error per element; the cost is 2x memory of a bf16 cache).
 * Layout: k_pool[layer][page][slot][kv_dim], same for v_pool.
 *
 * Preemption: when a sequence needs a page and none is free, the newest sequence holding pages (newer
 * than the one asking) loses all of them; its tokens so far are kept and recomputed when it is
 * scheduled again, so the output is unchanged. Decoder math follows SPEC §B/§C exactly in f32.
 *
 * Prefix cache (kv_pages.c): when a sequence starts or resumes, its leading full pages whose content
 * (tokens, positions, image embeddings, and everything before them) was computed before are taken from
 * the cache instead of recomputed; every page a sequence fills is offered to later prompts. A shared
 * system prompt, a multi-turn chat's history, n > 1 choices and a preempted sequence's own pages are
 * the cases this saves.
 *
 * Backends and tensor parallelism: the layer loop (rank_forward) is written against the backend
 * operation table of backend.h and runs once per rank on that rank's weight shard: q/k/v/gate/up
 * column-parallel, o/down row-parallel followed by an all-reduce, embedding and LM head
 * vocab-parallel. With one rank it runs on the calling thread; with N ranks each rank has its own
 * thread (created here, kept for the engine's life) and the engine thread only schedules, prepares
 * the step's host metadata (ids, positions, KV slots, page tables), releases the ranks and waits. */
#include "runtime/backend.h"
#include "runtime/rt_internal.h"

#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct seq {
    uint64_t id;
    int32_t *tok;          /* prompt + generated */
    int64_t n_prompt, n_tok, cap_tok;
    int64_t n_cached;      /* tokens whose K/V are in the cache */
    int64_t *pos;          /* [3][n_prompt] M-RoPE positions of the prompt */
    int64_t delta;         /* rope delta: position of token i >= n_prompt is i + delta */
    float *img;            /* [n_img_rows][hidden] image embeddings */
    int64_t *img_row;      /* [n_prompt] row in img or -1 */
    int32_t *pages;        /* page table */
    int64_t n_pages, cap_pages;
    uint64_t *key;         /* [cap_pages] prefix-cache keys of full pages, computed lazily */
    int64_t n_keyed;
    bool started;          /* scheduled at least once */
    int64_t n_reused;      /* prompt tokens taken from the prefix cache when first scheduled */
    /* a partial page taken from the prefix cache: rows [0, cp_rows) of registered page cp_src (held
     * until copied) are copied into s's page cp_dst at the start of the next step s is in */
    int32_t cp_src, cp_dst;
    int64_t cp_rows;
    vlm_sampling sp;
    vlm_rng rng;
    int max_tokens, n_gen;
    bool ignore_eos, want_logits, cancelled;
    int32_t *stop;
    int n_stop;
    float *logits;         /* [vocab] when want_logits */
    bool has_logits;
} seq;

/* One rank's shard of the decoder and its working state. */
typedef struct {
    vlm_tensor in_norm, post_norm, q, k, v, qb, kb, vb, o, gate, up, down;
} rank_layer;

typedef struct rank {
    struct vlm_engine *e;
    int idx;
    vlm_backend *b;
    int64_t nh, nkv, kvd, F;   /* local query heads, KV heads, KV width, FFN width */
    int64_t q_head0, kv_head0; /* first global query / KV head of this rank */
    int64_t v0, vl;            /* vocab slice [v0, v0 + vl) of embedding and LM head */
    vlm_tensor embed, lm_head, final_norm;
    bool lm_is_embed;          /* tied: lm_head is the embedding shard */
    rank_layer *L;
    vlm_kv_pool *kv;
    float *x, *a, *q, *k, *v, *att, *g, *u, *lg, *cs, *sn; /* backend memory */
    int64_t copied_bytes;      /* weight bytes this rank copied into its own memory */
    vlm_status st;
    char err[512];
    pthread_t th;
    bool th_started;
} rank;

struct vlm_engine {
    vlm_model *m;
    vlm_engine_opts o;
    int tp;
    int64_t n_pages;
    vlm_page_pool *pool;
    uint64_t hash_key[2];        /* prefix-cache page keys; random per engine */
    int64_t pc_query_tokens, pc_hit_tokens; /* prompt tokens at first scheduling, and of those reused */
    seq **seqs;                  /* in arrival order */
    int n_seqs, cap_seqs;
    uint64_t next_id;
    int preempted_total;
    /* memory plan, per rank */
    int64_t weight_bytes_rank, kv_token_bytes_rank, page_bytes_rank, work_bytes_rank;
    /* ranks: N backends; with N > 1 N threads, a communicator and start/finish barriers */
    rank *ranks;
    vlm_cpu_comm *comm;
    unsigned char cuda_id[VLM_CUDA_COMM_ID_BYTES];
    int omp_per_rank;
    pthread_barrier_t go, done;
    bool barriers, quit;
    /* the step's host metadata, read by every rank during rank_forward */
    int64_t R;
    int32_t *row_ids;            /* [R] token id, -1 for image rows */
    int64_t *row_slot;           /* [R] KV slot (page * page_tokens + offset) */
    float *h_cs, *h_sn;          /* [R, head_dim / 2] */
    int64_t n_img;
    int64_t *img_rows;           /* rows whose input is an image embedding */
    const float **img_src;       /* [n_img] host rows of hidden floats */
    vlm_attn_seq *aseq;
    int n_aseq;
    int64_t (*copies)[3];        /* [max_seqs] partial-page copies: src slot, dst slot, rows */
    int n_copies;
    int64_t *sample_rows;
    int64_t n_sample;
    float *logits;               /* [max_seqs, vocab] host, gathered from all ranks */
    /* logits of the last sequence that finished with want_logits: its final step's logits stay
     * readable through vlm_engine_logits after the sequence itself is gone */
    uint64_t done_id;
    float *done_logits;
    int32_t *row_seq;            /* index into step's scheduled list */
    int64_t *row_idx;            /* token index within its sequence */
};

static void seq_free(seq *s) {
    if (!s) return;
    free(s->tok); free(s->pos); free(s->img); free(s->img_row); free(s->pages); free(s->key); free(s->stop);
    free(s->logits);
    free(s);
}

static void rank_forward(rank *rk);

vlm_status vlm_backend_available(vlm_backend_kind k, char *err, size_t errlen) {
    if (k == VLM_BACKEND_CPU) return VLM_OK;
    if (k != VLM_BACKEND_CUDA) return vlm_errf(err, errlen, VLM_E_INVALID, "unknown backend %d", (int)k);
    /* the CUDA entry points are weak (backend.h): absent unless runtime/cuda was linked in */
    if (!vlm_backend_cuda_create || !vlm_backend_cuda_device_count || !vlm_backend_cuda_comm_id)
#ifdef VLM_HAVE_CUDA
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED,
                        "--backend cuda: this vlmd was built with CUDA=1 but without the CUDA backend "
                        "(runtime/cuda provides no vlm_backend_cuda_create)");
#else
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED,
                        "--backend cuda: this vlmd was built without the CUDA backend (rebuild with make CUDA=1)");
#endif
    if (vlm_backend_cuda_device_count() <= 0)
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "--backend cuda: no CUDA GPU found");
    return VLM_OK;
}

const char *vlm_backend_name(vlm_backend_kind k) { return k == VLM_BACKEND_CUDA ? "cuda" : "cpu"; }

/* Loads one weight shard and adds its size to the plan. */
static vlm_status shard(rank *rk, const vlm_tensor *src, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                        vlm_tensor *out) {
    size_t copied = 0;
    vlm_status st = rk->b->ops->weight_load(rk->b, src, r0, nr, c0, nc, out, &copied, rk->err, sizeof rk->err);
    rk->copied_bytes += (int64_t)copied;
    return st;
}

static void rank_release(rank *rk) {
    vlm_backend *b = rk->b;
    if (!b) return;
    const vlm_backend_ops *op = b->ops;
    float **bufs[] = {&rk->x, &rk->a, &rk->q, &rk->k, &rk->v, &rk->att, &rk->g, &rk->u, &rk->lg, &rk->cs, &rk->sn};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        if (*bufs[i]) { op->release(b, *bufs[i]); *bufs[i] = NULL; }
    op->kv_free(b, rk->kv);
    rk->kv = NULL;
    if (rk->L) {
        for (int l = 0; l < rk->e->m->cfg.n_layers; l++) {
            vlm_tensor *t = &rk->L[l].in_norm;
            for (int j = 0; j < 12; j++) if (t[j].data) op->weight_free(b, &t[j]);
        }
        free(rk->L);
        rk->L = NULL;
    }
    if (rk->lm_is_embed) memset(&rk->lm_head, 0, sizeof rk->lm_head);
    if (rk->lm_head.data) op->weight_free(b, &rk->lm_head);
    if (rk->embed.data) op->weight_free(b, &rk->embed);
    if (rk->final_norm.data) op->weight_free(b, &rk->final_norm);
    op->destroy(b);
    rk->b = NULL;
}

/* Creates this rank's backend, cuts its weight shards from the model, and allocates its KV pool and
 * work buffers after checking the memory plan against what the backend can hold. Runs on the rank's
 * own thread (N > 1) or on the engine thread (N == 1). */
static vlm_status rank_init(rank *rk) {
    vlm_engine *e = rk->e;
    const vlm_model *m = e->m;
    const vlm_model_config *c = &m->cfg;
    const int N = e->tp, r = rk->idx;
    char *err = rk->err;
    size_t el = sizeof rk->err;
    if (N > 1 && e->o.backend == VLM_BACKEND_CPU) omp_set_num_threads(e->omp_per_rank);
    if (e->o.backend == VLM_BACKEND_CUDA) {
        int dev = e->o.n_gpus > 0 ? e->o.gpus[r] : r;
        vlm_status st = vlm_backend_cuda_create(dev, r, N, e->cuda_id, &rk->b, err, el);
        if (st) return st;
    } else {
        rk->b = vlm_backend_cpu_create(e->comm, r, N);
        if (!rk->b) return vlm_errf(err, el, VLM_E_NOMEM, "rank %d: out of memory", r);
    }
    const vlm_backend_ops *op = rk->b->ops;
    int64_t H = c->hidden, hd = c->head_dim, R = e->o.max_batch_tokens;
    int64_t pool_bytes = e->n_pages * e->page_bytes_rank;
    int64_t need = e->weight_bytes_rank + pool_bytes + e->work_bytes_rank;
    int64_t cap = op->mem_capacity(rk->b);
    /* CPU ranks share the host's memory; each may count on its share of it */
    if (e->o.backend == VLM_BACKEND_CPU) cap /= N;
    if (need > cap)
        return vlm_errf(err, el, VLM_E_LIMIT,
                        "rank %d (%s): weights %lld B + KV pool %lld pages x %lld B (%lld B) + work buffers %lld B "
                        "= %lld B exceeds the %lld B this rank can use; lower --kv-memory, --max-batch-tokens or "
                        "raise --tp",
                        r, op->name, (long long)e->weight_bytes_rank, (long long)e->n_pages,
                        (long long)e->page_bytes_rank, (long long)pool_bytes, (long long)e->work_bytes_rank,
                        (long long)need, (long long)cap);
    /* ---- weight shards ---- */
    rk->L = calloc((size_t)c->n_layers, sizeof *rk->L);
    if (!rk->L) return vlm_errf(err, el, VLM_E_NOMEM, "out of memory");
    int64_t q0 = rk->q_head0 * hd, nq = rk->nh * hd, k0 = rk->kv_head0 * hd, nk = rk->kvd;
    int64_t f0 = (int64_t)r * rk->F, nf = rk->F;
    vlm_status st = shard(rk, m->w.embed, rk->v0, rk->vl, 0, H, &rk->embed);
    if (!st) st = shard(rk, m->w.final_norm, 0, H, 0, 1, &rk->final_norm);
    if (!st) {
        if (m->w.lm_head == m->w.embed) { rk->lm_head = rk->embed; rk->lm_is_embed = true; }
        else st = shard(rk, m->w.lm_head, rk->v0, rk->vl, 0, H, &rk->lm_head);
    }
    for (int l = 0; l < c->n_layers && !st; l++) {
        const struct vlm_layer *w = &m->w.layers[l];
        rank_layer *o = &rk->L[l];
        if (!st) st = shard(rk, w->in_norm, 0, H, 0, 1, &o->in_norm);
        if (!st) st = shard(rk, w->post_norm, 0, H, 0, 1, &o->post_norm);
        if (!st) st = shard(rk, w->q, q0, nq, 0, H, &o->q);        /* column-parallel: row blocks */
        if (!st) st = shard(rk, w->qb, q0, nq, 0, 1, &o->qb);
        if (!st) st = shard(rk, w->k, k0, nk, 0, H, &o->k);
        if (!st) st = shard(rk, w->kb, k0, nk, 0, 1, &o->kb);
        if (!st) st = shard(rk, w->v, k0, nk, 0, H, &o->v);
        if (!st) st = shard(rk, w->vb, k0, nk, 0, 1, &o->vb);
        if (!st) st = shard(rk, w->o, 0, H, q0, nq, &o->o);        /* row-parallel: column blocks */
        if (!st) st = shard(rk, w->gate, f0, nf, 0, H, &o->gate);
        if (!st) st = shard(rk, w->up, f0, nf, 0, H, &o->up);
        if (!st) st = shard(rk, w->down, 0, H, f0, nf, &o->down);
    }
    if (st) return st;
    /* ---- KV pool and work buffers ---- */
    rk->kv = op->kv_create(rk->b, c->n_layers, e->n_pages, e->o.page_tokens, rk->kvd);
    if (!rk->kv)
        return vlm_errf(err, el, VLM_E_NOMEM, "rank %d: cannot allocate the KV pool (%lld pages, %lld B)", r,
                        (long long)e->n_pages, (long long)pool_bytes);
    int64_t Q = rk->nh * hd, half = hd / 2;
    struct { float **p; int64_t n; } want[] = {
        {&rk->x, R * H}, {&rk->a, R * H}, {&rk->q, R * Q}, {&rk->k, R * rk->kvd}, {&rk->v, R * rk->kvd},
        {&rk->att, R * Q}, {&rk->g, R * rk->F}, {&rk->u, R * rk->F}, {&rk->lg, (int64_t)e->o.max_seqs * rk->vl},
        {&rk->cs, R * half}, {&rk->sn, R * half}};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        *want[i].p = op->alloc(rk->b, (size_t)want[i].n * sizeof(float));
        if (!*want[i].p) return vlm_errf(err, el, VLM_E_NOMEM, "rank %d: out of memory for work buffers", r);
    }
    return VLM_OK;
}

static void *rank_main(void *arg) {
    rank *rk = arg;
    vlm_engine *e = rk->e;
    rk->st = rank_init(rk);
    pthread_barrier_wait(&e->done); /* init finished (ok or not) */
    for (;;) {
        pthread_barrier_wait(&e->go);
        if (e->quit) break;
        rank_forward(rk);
        pthread_barrier_wait(&e->done);
    }
    rank_release(rk);
    return NULL;
}

/* Stops the rank threads (N > 1) or releases rank 0 (N == 1). */
static void stop_ranks(vlm_engine *e) {
    if (!e->ranks) return;
    if (e->barriers) {
        e->quit = true;
        pthread_barrier_wait(&e->go);
        for (int r = 0; r < e->tp; r++)
            if (e->ranks[r].th_started) pthread_join(e->ranks[r].th, NULL);
        pthread_barrier_destroy(&e->go);
        pthread_barrier_destroy(&e->done);
        e->barriers = false;
    } else {
        rank_release(&e->ranks[0]);
    }
    free(e->ranks);
    e->ranks = NULL;
}

/* Checks that the heads, FFN and vocabulary split evenly over N ranks (docs/runtime.md). */
static vlm_status check_split(const vlm_model_config *c, int N, char *err, size_t errlen) {
    if (c->n_heads % N)
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "--tp %d: n_heads (%d) is not divisible by %d", N, c->n_heads, N);
    if (c->n_kv_heads % N && N % c->n_kv_heads)
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED,
                        "--tp %d: n_kv_heads (%d) must divide by %d or divide %d (KV heads are split or replicated)",
                        N, c->n_kv_heads, N, N);
    if (c->intermediate % N)
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "--tp %d: intermediate size (%d) is not divisible by %d", N,
                        c->intermediate, N);
    if (c->vocab < N)
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "--tp %d: vocabulary (%d) smaller than the ranks", N, c->vocab);
    return VLM_OK;
}

vlm_status vlm_engine_create(vlm_model *m, const vlm_engine_opts *opts, vlm_engine **out, char *err, size_t errlen) {
    *out = NULL;
    const vlm_model_config *c = &m->cfg;
    vlm_engine_opts o = {0};
    if (opts) o = *opts;
    int N = o.tp > 0 ? o.tp : 1;
    if (N > VLM_MAX_TP) return vlm_errf(err, errlen, VLM_E_INVALID, "--tp %d: at most %d ranks", N, VLM_MAX_TP);
    vlm_status st = check_split(c, N, err, errlen);
    if (st) return st;
    if (o.backend == VLM_BACKEND_CUDA) {
        st = vlm_backend_available(o.backend, err, errlen);
        if (st) return st;
        int nd = vlm_backend_cuda_device_count();
        if (o.n_gpus > 0 && o.n_gpus != N)
            return vlm_errf(err, errlen, VLM_E_INVALID, "--gpus lists %d devices but --tp is %d", o.n_gpus, N);
        for (int r = 0; r < N; r++) {
            int dev = o.n_gpus > 0 ? o.gpus[r] : r;
            if (dev < 0 || dev >= nd)
                return vlm_errf(err, errlen, VLM_E_INVALID, "--backend cuda: GPU %d does not exist (%d visible)", dev, nd);
        }
    } else if (o.backend != VLM_BACKEND_CPU) {
        return vlm_errf(err, errlen, VLM_E_INVALID, "unknown backend %d", (int)o.backend);
    } else if (o.n_gpus > 0) {
        return vlm_errf(err, errlen, VLM_E_INVALID, "--gpus needs --backend cuda");
    }
    vlm_engine *e = calloc(1, sizeof *e);
    if (!e) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    e->m = m;
    e->o = o;
    e->tp = N;
    if (e->o.page_tokens <= 0) e->o.page_tokens = 16;
    if (e->o.max_seqs <= 0) e->o.max_seqs = 16;
    if (e->o.max_batch_tokens <= 0) e->o.max_batch_tokens = 512;
    if (e->o.max_batch_tokens < e->o.max_seqs) e->o.max_batch_tokens = e->o.max_seqs;
    if (e->o.threads > 0) vlm_cpu_init(e->o.threads);
    /* OpenMP threads per CPU rank: the rank threads are not OpenMP threads, so each starts its own
     * team; splitting the threads keeps N ranks from oversubscribing the cores. */
    e->omp_per_rank = vlm_cpu_threads() / N > 0 ? vlm_cpu_threads() / N : 1;
    /* ---- shard geometry and the memory plan (identical for every rank) ---- */
    e->ranks = calloc((size_t)N, sizeof *e->ranks);
    if (!e->ranks) { free(e); return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory"); }
    int64_t hd = c->head_dim, H = c->hidden, V = c->vocab, L = c->n_layers;
    int64_t nh = c->n_heads / N, nkv = c->n_kv_heads >= N ? c->n_kv_heads / N : 1, F = c->intermediate / N;
    int64_t vl_max = (V + N - 1) / N;
    for (int r = 0; r < N; r++) {
        rank *rk = &e->ranks[r];
        rk->e = e;
        rk->idx = r;
        rk->nh = nh;
        rk->nkv = nkv;
        rk->kvd = nkv * hd;
        rk->F = F;
        rk->q_head0 = (int64_t)r * nh;
        /* KV heads split when n_kv_heads >= N; otherwise each rank keeps the one its query heads use */
        rk->kv_head0 = c->n_kv_heads >= N ? (int64_t)r * nkv : rk->q_head0 / (c->n_heads / c->n_kv_heads);
        rk->v0 = (int64_t)r * vl_max;
        rk->vl = V - rk->v0 < vl_max ? V - rk->v0 : vl_max;
    }
    size_t wes = vlm_dtype_size(m->w.layers[0].q->dtype);
    int64_t per_layer = 2 * H                                      /* norms */
                        + (nh * hd + 2 * nkv * hd) * (H + 1)       /* q, k, v + biases */
                        + H * nh * hd                              /* o */
                        + 3 * F * H;                               /* gate, up, down */
    e->weight_bytes_rank = (int64_t)wes * (L * per_layer + H + vl_max * H * (m->w.lm_head == m->w.embed ? 1 : 2));
    e->kv_token_bytes_rank = 2 * L * nkv * hd * (int64_t)sizeof(float);
    e->page_bytes_rank = e->kv_token_bytes_rank * e->o.page_tokens;
    int64_t R = e->o.max_batch_tokens;
    e->work_bytes_rank = (int64_t)sizeof(float) *
                         (R * (2 * H + 2 * nh * hd + 2 * nkv * hd + 2 * F + hd) + (int64_t)e->o.max_seqs * vl_max);
    /* default pool: 8192 tokens of f32 K/V per rank (56 KiB/token for the 2B shape at tp 1 -> 448 MiB) */
    if (e->o.kv_memory_bytes <= 0)
        e->o.kv_memory_bytes = e->page_bytes_rank * ((8192 + e->o.page_tokens - 1) / e->o.page_tokens);
    e->n_pages = e->o.kv_memory_bytes / e->page_bytes_rank;
    if (e->n_pages < 1) {
        st = vlm_errf(err, errlen, VLM_E_LIMIT,
                      "kv_memory_bytes %lld is less than one KV page per rank (%lld bytes = %d tokens x %lld B/token "
                      "at tp %d)",
                      (long long)e->o.kv_memory_bytes, (long long)e->page_bytes_rank, e->o.page_tokens,
                      (long long)e->kv_token_bytes_rank, N);
        free(e->ranks);
        free(e);
        return st;
    }
    /* ---- host state ---- */
    e->pool = vlm_pages_create(e->n_pages, e->o.page_tokens, !e->o.no_prefix_cache);
    vlm_hash_random_key(e->hash_key);
    e->logits = malloc((size_t)e->o.max_seqs * (size_t)V * sizeof(float));
    e->row_seq = malloc((size_t)R * sizeof *e->row_seq);
    e->row_idx = malloc((size_t)R * sizeof *e->row_idx);
    e->row_ids = malloc((size_t)R * sizeof *e->row_ids);
    e->row_slot = malloc((size_t)R * sizeof *e->row_slot);
    e->h_cs = malloc((size_t)(R * (hd / 2)) * sizeof(float) + 1);
    e->h_sn = malloc((size_t)(R * (hd / 2)) * sizeof(float) + 1);
    e->img_rows = malloc((size_t)R * sizeof *e->img_rows);
    e->img_src = malloc((size_t)R * sizeof *e->img_src);
    e->aseq = malloc((size_t)e->o.max_seqs * sizeof *e->aseq);
    e->copies = malloc((size_t)e->o.max_seqs * sizeof *e->copies);
    e->sample_rows = malloc((size_t)e->o.max_seqs * sizeof *e->sample_rows);
    if (!e->pool || !e->logits || !e->row_seq || !e->row_idx || !e->row_ids || !e->row_slot || !e->h_cs ||
        !e->h_sn || !e->img_rows || !e->img_src || !e->aseq || !e->copies || !e->sample_rows) {
        vlm_engine_free(e);
        return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory for the engine");
    }
    e->next_id = 1;
    /* ---- ranks ---- */
    if (o.backend == VLM_BACKEND_CUDA) {
        st = vlm_backend_cuda_comm_id(e->cuda_id, err, errlen);
        if (st) { vlm_engine_free(e); return st; }
    }
    if (N == 1) {
        st = rank_init(&e->ranks[0]);
        if (st) {
            snprintf(err, errlen, "%s", e->ranks[0].err);
            vlm_engine_free(e);
            return st;
        }
        *out = e;
        return VLM_OK;
    }
    if (o.backend == VLM_BACKEND_CPU && !(e->comm = vlm_cpu_comm_create(N))) {
        vlm_engine_free(e);
        return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    }
    if (pthread_barrier_init(&e->go, NULL, (unsigned)N + 1) || pthread_barrier_init(&e->done, NULL, (unsigned)N + 1)) {
        vlm_engine_free(e);
        return vlm_errf(err, errlen, VLM_E_INTERNAL, "cannot create the rank barriers");
    }
    e->barriers = true;
    for (int r = 0; r < N; r++) {
        if (pthread_create(&e->ranks[r].th, NULL, rank_main, &e->ranks[r]) != 0)
            VLM_ASSERT(!"cannot start a rank thread"); /* partially started barriers cannot be unwound */
        e->ranks[r].th_started = true;
    }
    pthread_barrier_wait(&e->done);
    for (int r = 0; r < N; r++)
        if (e->ranks[r].st) {
            st = e->ranks[r].st;
            snprintf(err, errlen, "%s", e->ranks[r].err);
            vlm_engine_free(e);
            return st;
        }
    *out = e;
    return VLM_OK;
}

void vlm_engine_free(vlm_engine *e) {
    if (!e) return;
    stop_ranks(e);
    vlm_cpu_comm_free(e->comm);
    for (int i = 0; i < e->n_seqs; i++) seq_free(e->seqs[i]);
    free(e->seqs);
    vlm_pages_free(e->pool);
    free(e->logits); free(e->row_seq); free(e->row_idx); free(e->done_logits);
    free(e->row_ids); free(e->row_slot); free(e->h_cs); free(e->h_sn); free(e->img_rows); free(e->img_src);
    free(e->aseq); free(e->copies); free(e->sample_rows);
    free(e);
}

void vlm_engine_describe(const vlm_engine *e, char *buf, size_t len) {
    snprintf(buf, len,
             "backend %s, tp %d; per rank: weights %.1f MiB, KV %lld B/token, %lld KV pages of %d tokens "
             "(%lld tokens, %.1f MiB), prefix cache %s, work buffers %.1f MiB",
             vlm_backend_name(e->o.backend), e->tp, (double)e->weight_bytes_rank / 1048576.0,
             (long long)e->kv_token_bytes_rank, (long long)e->n_pages, e->o.page_tokens,
             (long long)(e->n_pages * e->o.page_tokens), (double)(e->n_pages * e->page_bytes_rank) / 1048576.0,
             vlm_pages_cache_on(e->pool) ? "on" : "off",
             (double)e->work_bytes_rank / 1048576.0);
}

static int64_t pages_for(const vlm_engine *e, int64_t tokens) {
    return (tokens + e->o.page_tokens - 1) / e->o.page_tokens;
}

vlm_status vlm_engine_add(vlm_engine *e, const vlm_seq_desc *d, uint64_t *seq_id, char *err, size_t errlen) {
    const vlm_model_config *c = &e->m->cfg;
    if (!d || !d->prompt || d->n_prompt <= 0) return vlm_errf(err, errlen, VLM_E_INVALID, "empty prompt");
    if (d->max_tokens <= 0) return vlm_errf(err, errlen, VLM_E_INVALID, "max_tokens must be positive");
    if (d->n_images < 0 || (d->n_images > 0 && !d->images)) return vlm_errf(err, errlen, VLM_E_INVALID, "bad image list");
    int64_t total = d->n_prompt + d->max_tokens;
    if (total > c->max_position)
        return vlm_errf(err, errlen, VLM_E_LIMIT, "prompt (%lld tokens) + max_tokens (%d) exceeds the context of %d",
                        (long long)d->n_prompt, d->max_tokens, c->max_position);
    if (pages_for(e, total) > e->n_pages)
        return vlm_errf(err, errlen, VLM_E_LIMIT,
                        "prompt (%lld tokens) + max_tokens (%d) needs %lld KV pages; the pool has %lld",
                        (long long)d->n_prompt, d->max_tokens, (long long)pages_for(e, total), (long long)e->n_pages);
    int64_t n_pads = 0;
    for (int64_t i = 0; i < d->n_prompt; i++) {
        if (d->prompt[i] < 0 || d->prompt[i] >= c->vocab)
            return vlm_errf(err, errlen, VLM_E_INVALID, "token id %d at %lld outside the vocabulary (%d)", d->prompt[i],
                            (long long)i, c->vocab);
        if (d->prompt[i] == c->image_token_id) n_pads++;
    }
    int64_t n_rows = 0;
    int merge = c->vision.spatial_merge_size > 0 ? c->vision.spatial_merge_size : 1;
    for (int i = 0; i < d->n_images; i++) {
        const vlm_image_embeds *im = &d->images[i];
        if (!im->embeds || im->n_tokens <= 0)
            return vlm_errf(err, errlen, VLM_E_INVALID, "image %d has no embeddings", i);
        if (c->mrope_section[0] + c->mrope_section[1] + c->mrope_section[2] > 0) {
            int64_t want = (int64_t)im->grid_thw[0] * (im->grid_thw[1] / merge) * (im->grid_thw[2] / merge);
            if (im->grid_thw[0] <= 0 || im->grid_thw[1] % merge || im->grid_thw[2] % merge || want != im->n_tokens)
                return vlm_errf(err, errlen, VLM_E_INVALID, "image %d: grid %dx%dx%d gives %lld tokens, embeddings have %lld",
                                i, im->grid_thw[0], im->grid_thw[1], im->grid_thw[2], (long long)want,
                                (long long)im->n_tokens);
        }
        n_rows += im->n_tokens;
    }
    if (n_rows != n_pads)
        return vlm_errf(err, errlen, VLM_E_INVALID, "prompt has %lld image pad tokens but the images provide %lld embeddings",
                        (long long)n_pads, (long long)n_rows);
    seq *s = calloc(1, sizeof *s);
    if (!s) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    s->cap_tok = total;
    s->tok = malloc((size_t)total * sizeof *s->tok);
    s->pos = malloc((size_t)(3 * d->n_prompt) * sizeof *s->pos);
    s->img_row = malloc((size_t)d->n_prompt * sizeof *s->img_row);
    s->cap_pages = pages_for(e, total);
    s->pages = malloc((size_t)s->cap_pages * sizeof *s->pages);
    s->key = malloc((size_t)s->cap_pages * sizeof *s->key);
    if (n_rows) s->img = malloc((size_t)(n_rows * c->hidden) * sizeof(float));
    if (d->n_stop_ids > 0) s->stop = malloc((size_t)d->n_stop_ids * sizeof *s->stop);
    if (d->want_logits) s->logits = malloc((size_t)c->vocab * sizeof(float));
    if (!s->tok || !s->pos || !s->img_row || !s->pages || !s->key || (n_rows && !s->img) || (d->n_stop_ids > 0 && !s->stop) ||
        (d->want_logits && !s->logits)) {
        seq_free(s);
        return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    }
    memcpy(s->tok, d->prompt, (size_t)d->n_prompt * sizeof *s->tok);
    s->n_prompt = s->n_tok = d->n_prompt;
    int32_t (*grids)[3] = d->n_images ? malloc((size_t)d->n_images * sizeof *grids) : NULL;
    int64_t r = 0;
    for (int i = 0; i < d->n_images; i++) {
        memcpy(grids[i], d->images[i].grid_thw, sizeof grids[i]);
        memcpy(s->img + r * c->hidden, d->images[i].embeds, (size_t)(d->images[i].n_tokens * c->hidden) * sizeof(float));
        r += d->images[i].n_tokens;
    }
    r = 0;
    for (int64_t i = 0; i < d->n_prompt; i++) s->img_row[i] = d->prompt[i] == c->image_token_id ? r++ : -1;
    if (c->mrope_section[0] + c->mrope_section[1] + c->mrope_section[2] > 0) {
        s->delta = vlm_rope_index(c, d->prompt, d->n_prompt, (const int32_t(*)[3])grids, d->n_images, s->pos);
    } else {
        for (int64_t i = 0; i < d->n_prompt; i++) s->pos[i] = s->pos[d->n_prompt + i] = s->pos[2 * d->n_prompt + i] = i;
        s->delta = 0;
    }
    free(grids);
    s->sp = d->sampling;
    vlm_rng_seed(&s->rng, d->sampling.seed);
    s->max_tokens = d->max_tokens;
    s->ignore_eos = d->ignore_eos;
    s->want_logits = d->want_logits;
    if (d->n_stop_ids > 0) memcpy(s->stop, d->stop_ids, (size_t)d->n_stop_ids * sizeof *s->stop);
    s->n_stop = d->n_stop_ids > 0 ? d->n_stop_ids : 0;
    if (e->n_seqs == e->cap_seqs) {
        int nc = e->cap_seqs ? e->cap_seqs * 2 : 16;
        seq **ns = realloc(e->seqs, (size_t)nc * sizeof *ns);
        if (!ns) { seq_free(s); return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory"); }
        e->seqs = ns;
        e->cap_seqs = nc;
    }
    s->id = e->next_id++;
    e->seqs[e->n_seqs++] = s;
    if (seq_id) *seq_id = s->id;
    return VLM_OK;
}

static seq *find_seq(const vlm_engine *e, uint64_t id) {
    for (int i = 0; i < e->n_seqs; i++) if (e->seqs[i]->id == id) return e->seqs[i];
    return NULL;
}

void vlm_engine_cancel(vlm_engine *e, uint64_t id) {
    seq *s = find_seq(e, id);
    if (s) s->cancelled = true;
}

int vlm_engine_active(const vlm_engine *e) { return e->n_seqs; }

const float *vlm_engine_logits(const vlm_engine *e, uint64_t id) {
    seq *s = find_seq(e, id);
    if (!s) return e->done_logits && e->done_id == id ? e->done_logits : NULL;
    return s->want_logits && s->has_logits ? s->logits : NULL;
}

void vlm_engine_get_stats(const vlm_engine *e, vlm_engine_stats *st) {
    memset(st, 0, sizeof *st);
    st->kv_pages_total = e->n_pages;
    st->kv_pages_used = vlm_pages_held(e->pool);
    st->kv_pages_cached = vlm_pages_idle_cached(e->pool);
    st->prefix_query_tokens = e->pc_query_tokens;
    st->prefix_hit_tokens = e->pc_hit_tokens;
    st->page_tokens = e->o.page_tokens;
    for (int i = 0; i < e->n_seqs; i++) {
        if (e->seqs[i]->n_pages > 0) st->running++;
        else st->waiting++;
    }
    st->preempted_total = e->preempted_total;
    st->tp = e->tp;
    st->weight_bytes_rank = e->weight_bytes_rank;
    st->kv_bytes_per_token_rank = e->kv_token_bytes_rank;
    st->work_bytes_rank = e->work_bytes_rank;
}

/* The source page of a partial-page copy stays held until the copy has run (or is dropped). */
static void drop_copy(vlm_engine *e, seq *s) {
    if (s->cp_rows > 0) vlm_pages_put(e->pool, s->cp_src);
    s->cp_rows = 0;
}

static void release_pages(vlm_engine *e, seq *s) {
    drop_copy(e, s);
    /* last page first: the idle LRU then recycles a sequence's tail before its prefix, which is
     * the part other prompts are likelier to share */
    for (int64_t i = s->n_pages - 1; i >= 0; i--) vlm_pages_put(e->pool, s->pages[i]);
    s->n_pages = 0;
    s->n_cached = 0;
}

static void remove_seq(vlm_engine *e, int idx) {
    release_pages(e, e->seqs[idx]);
    seq_free(e->seqs[idx]);
    memmove(e->seqs + idx, e->seqs + idx + 1, (size_t)(e->n_seqs - idx - 1) * sizeof *e->seqs);
    e->n_seqs--;
}

/* ---- decoder pieces ---------------------------------------------------------------------------- */

static inline float wval(const vlm_tensor *w, int64_t i) {
    switch (w->dtype) {
    case VLM_F32: return ((const float *)w->data)[i];
    case VLM_BF16: return vlm_bf16_to_f32(((const uint16_t *)w->data)[i]);
    default: return vlm_f16_to_f32(((const uint16_t *)w->data)[i]);
    }
}

/* HF Qwen2RMSNorm in f32: y = (x * rsqrt(mean(x^2) + eps)) * w. x, y: [n, d] */
void vlm_rms_norm(const float *x, const vlm_tensor *w, float eps, int64_t n, int64_t d, float *y) {
    for (int64_t i = 0; i < n; i++) {
        const float *xr = x + i * d;
        double ss = 0;
        for (int64_t j = 0; j < d; j++) ss += (double)xr[j] * xr[j];
        float r = 1.0f / sqrtf((float)(ss / (double)d) + eps);
        for (int64_t j = 0; j < d; j++) y[i * d + j] = (xr[j] * r) * wval(w, j);
    }
}

void vlm_embed_rows(const vlm_tensor *emb, const int32_t *ids, int64_t n, float *out) {
    int64_t H = emb->shape[1];
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < H; j++) out[i * H + j] = wval(emb, (int64_t)ids[i] * H + j);
}

typedef struct { seq *s; int64_t start, n; bool sample; } sched;

/* M-RoPE position (t, h, w) of token i: the prompt's precomputed ones, then i + rope delta */
static inline void seq_pos(const seq *s, int64_t i, int64_t p3[3]) {
    for (int k = 0; k < 3; k++) p3[k] = i < s->n_prompt ? s->pos[k * s->n_prompt + i] : i + s->delta;
}

/* One rank's forward over the step's R rows (SPEC §B/§C). Every rank holds the full residual stream
 * x; the partial sums of the row-parallel o/down projections and of the vocab-parallel embedding are
 * all-reduced, so x stays identical on all ranks. */
static void rank_forward(rank *rk) {
    vlm_engine *e = rk->e;
    vlm_backend *b = rk->b;
    const vlm_backend_ops *op = b->ops;
    const vlm_model_config *c = &e->m->cfg;
    const int64_t R = e->R, H = c->hidden, hd = c->head_dim, half = hd / 2;
    const int64_t Q = rk->nh * hd, F = rk->F;
    for (int i = 0; i < e->n_copies; i++) op->kv_copy(b, rk->kv, e->copies[i][0], e->copies[i][1], e->copies[i][2]);
    op->upload(b, rk->cs, e->h_cs, (size_t)(R * half) * sizeof(float));
    op->upload(b, rk->sn, e->h_sn, (size_t)(R * half) * sizeof(float));
    /* embeddings: this rank's vocab slice (zeros elsewhere and for image rows); image rows come from
     * rank 0 only, so the sum over ranks has exactly one non-zero term per element (exact). */
    op->embed(b, &rk->embed, rk->v0, e->row_ids, R, rk->x);
    if (rk->idx == 0)
        for (int64_t i = 0; i < e->n_img; i++)
            op->upload(b, rk->x + e->img_rows[i] * H, e->img_src[i], (size_t)H * sizeof(float));
    op->all_reduce(b, rk->x, R * H);
    const float scale = 1.0f / sqrtf((float)hd);
    for (int l = 0; l < c->n_layers; l++) {
        const rank_layer *w = &rk->L[l];
        op->rms_norm(b, rk->x, &w->in_norm, c->rms_eps, R, H, rk->a);   // a: [R, H]
        op->linear(b, rk->a, R, H, &w->q, &w->qb, rk->q);               // q: [R, nh_l*hd]
        op->linear(b, rk->a, R, H, &w->k, &w->kb, rk->k);               // k, v: [R, nkv_l*hd]
        op->linear(b, rk->a, R, H, &w->v, &w->vb, rk->v);
        op->rope(b, rk->q, R, rk->nh, hd, rk->cs, rk->sn);
        op->rope(b, rk->k, R, rk->nkv, hd, rk->cs, rk->sn);
        op->kv_write(b, rk->kv, l, e->row_slot, R, rk->k, rk->v);
        op->attention(b, rk->kv, l, e->aseq, e->n_aseq, rk->nh, rk->nkv, hd, scale, rk->q, rk->att);
        op->linear(b, rk->att, R, Q, &w->o, NULL, rk->a);               // partial o: [R, H]
        op->all_reduce(b, rk->a, R * H);
        op->add(b, rk->x, rk->a, R * H);
        op->rms_norm(b, rk->x, &w->post_norm, c->rms_eps, R, H, rk->a);
        op->linear(b, rk->a, R, H, &w->gate, NULL, rk->g);              // g, u: [R, F/N]
        op->linear(b, rk->a, R, H, &w->up, NULL, rk->u);
        op->swiglu(b, rk->g, rk->u, R * F);
        op->linear(b, rk->g, R, F, &w->down, NULL, rk->a);              // partial down: [R, H]
        op->all_reduce(b, rk->a, R * H);
        op->add(b, rk->x, rk->a, R * H);
    }
    /* final norm + this rank's LM head slice, only for rows that produce a token */
    if (e->n_sample == 0) return;
    for (int64_t i = 0; i < e->n_sample; i++)
        op->rms_norm(b, rk->x + e->sample_rows[i] * H, &rk->final_norm, c->rms_eps, 1, H, rk->a + i * H);
    op->linear(b, rk->a, e->n_sample, H, &rk->lm_head, NULL, rk->lg);  // lg: [n_sample, vl]
    op->logits_gather(b, rk->lg, e->n_sample, rk->vl, rk->v0, e->logits, c->vocab);
}

/* Host-side preparation of a step: per-row token ids, image rows, RoPE cos/sin, KV slots, the
 * sequences' extents for attention and the rows whose logits are needed. */
static void prepare_step(vlm_engine *e, const sched *sc, int n_sc, int64_t R) {
    const vlm_model *m = e->m;
    const vlm_model_config *c = &m->cfg;
    int64_t H = c->hidden, half = c->head_dim / 2, pt = e->o.page_tokens;
    int sec0 = c->mrope_section[0], sec1 = c->mrope_section[1];
    if (sec0 + sec1 + c->mrope_section[2] == 0) { sec0 = (int)half; sec1 = 0; }
    e->R = R;
    e->n_img = 0;
    for (int64_t r = 0; r < R; r++) {
        const seq *s = sc[e->row_seq[r]].s;
        int64_t i = e->row_idx[r];
        if (i < s->n_prompt && s->img_row[i] >= 0) {
            e->row_ids[r] = -1;
            e->img_rows[e->n_img] = r;
            e->img_src[e->n_img++] = s->img + s->img_row[i] * H;
        } else {
            e->row_ids[r] = s->tok[i];
        }
        e->row_slot[r] = (int64_t)s->pages[i / pt] * pt + i % pt;
        int64_t p3[3];
        seq_pos(s, i, p3);
        for (int64_t j = 0; j < half; j++) {
            int st = j < sec0 ? 0 : j < sec0 + sec1 ? 1 : 2;
            float ang = (float)p3[st] * m->inv_freq[j];
            e->h_cs[r * half + j] = cosf(ang);
            e->h_sn[r * half + j] = sinf(ang);
        }
    }
    e->n_aseq = n_sc;
    e->n_sample = 0;
    e->n_copies = 0;
    int64_t r0 = 0;
    for (int k = 0; k < n_sc; k++) {
        const seq *s = sc[k].s;
        if (s->cp_rows > 0) {
            int64_t *cp = e->copies[e->n_copies++];
            cp[0] = (int64_t)s->cp_src * pt, cp[1] = (int64_t)s->cp_dst * pt, cp[2] = s->cp_rows;
        }
        e->aseq[k] = (vlm_attn_seq){sc[k].s->pages, sc[k].s->n_pages, sc[k].start, sc[k].n, r0};
        r0 += sc[k].n;
        if (sc[k].sample) e->sample_rows[e->n_sample++] = r0 - 1; /* the last row of its chunk */
    }
}

static void run_step(vlm_engine *e, const sched *sc, int n_sc, int64_t R) {
    prepare_step(e, sc, n_sc, R);
    if (e->tp == 1) {
        rank_forward(&e->ranks[0]);
        return;
    }
    pthread_barrier_wait(&e->go);   /* ranks run rank_forward */
    pthread_barrier_wait(&e->done); /* all logits gathered */
}

static bool ensure_pages(vlm_engine *e, seq *s, int64_t tokens) {
    int64_t need = pages_for(e, tokens) - s->n_pages;
    if (need <= 0) return true;
    if (need > vlm_pages_available(e->pool)) return false;
    for (int64_t i = 0; i < need; i++) s->pages[s->n_pages++] = vlm_pages_take(e->pool);
    return true;
}

/* Prefix-cache key of s's full page j: its rows' token ids, positions and image embedding bits,
 * chained through page j-1's key, so equal keys mean equal K/V. */
static uint64_t page_key(vlm_engine *e, seq *s, int64_t j) {
    const int64_t pt = e->o.page_tokens, H = e->m->cfg.hidden;
    for (; s->n_keyed <= j; s->n_keyed++) {
        int64_t q = s->n_keyed;
        vlm_hash h;
        vlm_hash_begin(&h, e->hash_key);
        vlm_hash_word(&h, q ? s->key[q - 1] : 0);
        for (int64_t i = q * pt; i < (q + 1) * pt; i++) {
            int64_t p3[3];
            seq_pos(s, i, p3);
            vlm_hash_word(&h, (uint64_t)(uint32_t)s->tok[i]);
            vlm_hash_bytes(&h, p3, sizeof p3);
            if (i < s->n_prompt && s->img_row[i] >= 0)
                vlm_hash_bytes(&h, s->img + s->img_row[i] * H, (size_t)H * sizeof(float));
        }
        s->key[q] = vlm_hash_end(&h);
    }
    return s->key[j];
}

/* Rows of s from token i0 on (at most max) that a partial-page match may cover: text rows only (an
 * image row's K/V depend on its embedding, which the page table does not store), and never the
 * last token, whose row must be computed for its logits. */
static int64_t partial_rows(const vlm_engine *e, const seq *s, int64_t i0, int64_t max) {
    const vlm_model_config *c = &e->m->cfg;
    int64_t n = s->n_tok - 1 - i0 < max ? s->n_tok - 1 - i0 : max;
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = i0 + i;
        if ((t < s->n_prompt && s->img_row[t] >= 0) || s->tok[t] == c->image_token_id ||
            s->tok[t] == c->video_token_id)
            return i;
    }
    return n;
}

/* For a sequence holding no pages (new, or preempted): takes the longest run of its leading full
 * pages that the cache holds, then the longest agreeing start of a registered page that follows
 * the last of them (copied into a page of s's own, kv_pages.c "Partial pages"). The page with the
 * last token is never shared, since that row must be computed for its logits. */
static void prefix_match(vlm_engine *e, seq *s) {
    const int64_t pt = e->o.page_tokens;
    int64_t j = 0, part = 0;
    if (vlm_pages_cache_on(e->pool)) {
        for (int64_t full = (s->n_tok - 1) / pt; j < full; j++) {
            int32_t g = vlm_pages_lookup(e->pool, page_key(e, s, j), s->tok + j * pt);
            if (g < 0) break;
            s->pages[s->n_pages++] = g;
        }
        const int64_t max = partial_rows(e, s, j * pt, pt);
        int32_t g = max > 0 && vlm_pages_available(e->pool) > 0
                        ? vlm_pages_lookup_partial(e->pool, j ? page_key(e, s, j - 1) : 0, s->tok + j * pt, max, &part)
                        : -1;
        int32_t d = g >= 0 ? vlm_pages_take(e->pool) : -1; /* g is held: never the page recycled */
        if (d >= 0) {
            s->pages[s->n_pages++] = d;
            s->cp_src = g, s->cp_dst = d, s->cp_rows = part;
        } else {
            if (g >= 0) vlm_pages_put(e->pool, g);
            part = 0;
        }
    }
    s->n_cached = j * pt + part;
    if (!s->started) {
        s->started = true;
        s->n_reused = s->n_cached < s->n_prompt ? s->n_cached : s->n_prompt;
        e->pc_query_tokens += s->n_prompt;
        e->pc_hit_tokens += s->n_reused;
    }
}

static bool is_stop(const vlm_engine *e, const seq *s, int32_t t) {
    if (!s->ignore_eos)
        for (int i = 0; i < e->m->cfg.n_eos; i++) if (e->m->cfg.eos_ids[i] == t) return true;
    for (int i = 0; i < s->n_stop; i++) if (s->stop[i] == t) return true;
    return false;
}

int vlm_engine_step(vlm_engine *e, vlm_token_event *ev, int max_events) {
    int n_ev = 0;
    /* cancelled sequences leave first */
    for (int i = 0; i < e->n_seqs && n_ev < max_events;) {
        seq *s = e->seqs[i];
        if (s->cancelled) {
            memset(&ev[n_ev], 0, sizeof ev[n_ev]);
            ev[n_ev].seq_id = s->id;
            ev[n_ev].token = -1;
            ev[n_ev].finish = VLM_FINISH_CANCELLED;
            ev[n_ev].n_prompt = s->n_prompt;
            ev[n_ev].n_cached_prompt = s->n_reused;
            n_ev++;
            remove_seq(e, i);
        } else i++;
    }
    int cap_sc = e->n_seqs < e->o.max_seqs ? e->n_seqs : e->o.max_seqs;
    if (cap_sc > max_events - n_ev) cap_sc = max_events - n_ev;
    sched *sc = malloc((size_t)(cap_sc > 0 ? cap_sc : 1) * sizeof *sc);
    VLM_ASSERT(sc);
    int n_sc = 0;
    int64_t budget = e->o.max_batch_tokens, R = 0;
    /* decode rows first (one token each, oldest first), then prefill chunks, oldest first */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < e->n_seqs && n_sc < cap_sc && budget > 0; i++) {
            seq *s = e->seqs[i];
            int64_t remaining = s->n_tok - s->n_cached;
            bool decode = remaining == 1 && s->n_cached > 0;
            if ((pass == 0) != decode) continue;
            bool already = false;
            for (int k = 0; k < n_sc; k++) if (sc[k].s == s) already = true;
            if (already || remaining <= 0) continue;
            if (s->n_pages == 0) {
                prefix_match(e, s);
                remaining = s->n_tok - s->n_cached;
            }
            int64_t chunk = remaining < budget ? remaining : budget;
            while (!ensure_pages(e, s, s->n_cached + chunk)) {
                /* preempt the newest sequence holding pages that is newer than s and not scheduled */
                int victim = -1;
                for (int j = e->n_seqs - 1; j > i; j--) {
                    bool sched_j = false;
                    for (int k = 0; k < n_sc; k++) if (sc[k].s == e->seqs[j]) sched_j = true;
                    if (!sched_j && e->seqs[j]->n_pages > 0) { victim = j; break; }
                }
                if (victim < 0) break;
                release_pages(e, e->seqs[victim]);
                e->preempted_total++;
            }
            if (pages_for(e, s->n_cached + chunk) > s->n_pages) {
                /* still no room: shrink the chunk to the pages s holds plus what is free */
                int64_t room = (s->n_pages + vlm_pages_available(e->pool)) * e->o.page_tokens - s->n_cached;
                if (room <= 0) {
                    if (n_sc == 0 && s->n_pages > 0) { release_pages(e, s); e->preempted_total++; }
                    continue;
                }
                chunk = room < chunk ? room : chunk;
                VLM_ASSERT(ensure_pages(e, s, s->n_cached + chunk));
            }
            sc[n_sc].s = s;
            sc[n_sc].start = s->n_cached;
            sc[n_sc].n = chunk;
            sc[n_sc].sample = s->n_cached + chunk == s->n_tok;
            for (int64_t t = 0; t < chunk; t++) {
                e->row_seq[R + t] = n_sc;
                e->row_idx[R + t] = s->n_cached + t;
            }
            R += chunk;
            budget -= chunk;
            n_sc++;
        }
    }
    if (R == 0) { free(sc); return n_ev; }
    run_step(e, sc, n_sc, R);
    for (int k = 0; k < n_sc; k++) drop_copy(e, sc[k].s); /* copied in this step */
    int64_t li = 0;
    const int64_t V = e->m->cfg.vocab;
    const int64_t pt = e->o.page_tokens;
    for (int k = 0; k < n_sc; k++) {
        seq *s = sc[k].s;
        s->n_cached += sc[k].n;
        if (vlm_pages_cache_on(e->pool))
            for (int64_t j = sc[k].start / pt; j < s->n_cached / pt; j++)
                vlm_pages_register(e->pool, s->pages[j], page_key(e, s, j), j ? page_key(e, s, j - 1) : 0,
                                   s->tok + j * pt);
        if (!sc[k].sample) continue;
        const float *lg = e->logits + li * V;
        li++;
        if (s->want_logits) { memcpy(s->logits, lg, (size_t)V * sizeof(float)); s->has_logits = true; }
        vlm_token_event *E = &ev[n_ev++];
        memset(E, 0, sizeof *E);
        E->seq_id = s->id;
        E->n_prompt = s->n_prompt;
        E->n_cached_prompt = s->n_reused;
        int32_t t = vlm_sample(&s->sp, &s->rng, lg, V, s->tok, s->n_prompt, s->n_tok, E);
        s->tok[s->n_tok++] = t;
        s->n_gen++;
        if (is_stop(e, s, t)) E->finish = VLM_FINISH_STOP;
        else if (s->n_gen >= s->max_tokens) E->finish = VLM_FINISH_LENGTH;
    }
    free(sc);
    for (int i = 0; i < e->n_seqs;) {
        seq *s = e->seqs[i];
        bool done = false;
        for (int k = 0; k < n_ev; k++) if (ev[k].seq_id == s->id && ev[k].finish != VLM_FINISH_NONE) done = true;
        if (done && s->want_logits && s->has_logits) {
            /* swap buffers rather than copy: the sequence is freed next */
            free(e->done_logits);
            e->done_logits = s->logits;
            e->done_id = s->id;
            s->logits = NULL;
        }
        if (done) remove_seq(e, i);
        else i++;
    }
    return n_ev;
}
