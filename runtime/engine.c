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
 * scheduled again, so the output is unchanged. Decoder math follows SPEC §B/§C exactly in f32. */
#include "runtime/rt_internal.h"

#include <math.h>
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
    vlm_sampling sp;
    vlm_rng rng;
    int max_tokens, n_gen;
    bool ignore_eos, want_logits, cancelled;
    int32_t *stop;
    int n_stop;
    float *logits;         /* [vocab] when want_logits */
    bool has_logits;
} seq;

struct vlm_engine {
    vlm_model *m;
    vlm_engine_opts o;
    int64_t kvd;                 /* n_kv_heads * head_dim */
    int64_t n_pages;
    float *k_pool, *v_pool;
    int32_t *free_pages;
    int64_t n_free;
    seq **seqs;                  /* in arrival order */
    int n_seqs, cap_seqs;
    uint64_t next_id;
    int preempted_total;
    /* work buffers for max_batch_tokens rows */
    float *x, *a, *q, *k, *v, *att, *g, *u, *logits;
    /* logits of the last sequence that finished with want_logits: its final step's logits stay
     * readable through vlm_engine_logits after the sequence itself is gone */
    uint64_t done_id;
    float *done_logits;
    int32_t *row_seq;            /* index into step's scheduled list */
    int64_t *row_idx;            /* token index within its sequence */
};

static void seq_free(seq *s) {
    if (!s) return;
    free(s->tok); free(s->pos); free(s->img); free(s->img_row); free(s->pages); free(s->stop); free(s->logits);
    free(s);
}

vlm_status vlm_engine_create(vlm_model *m, const vlm_engine_opts *opts, vlm_engine **out, char *err, size_t errlen) {
    *out = NULL;
    vlm_engine *e = calloc(1, sizeof *e);
    if (!e) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    e->m = m;
    if (opts) e->o = *opts;
    const vlm_model_config *c = &m->cfg;
    if (e->o.page_tokens <= 0) e->o.page_tokens = 16;
    if (e->o.max_seqs <= 0) e->o.max_seqs = 16;
    if (e->o.max_batch_tokens <= 0) e->o.max_batch_tokens = 512;
    if (e->o.max_batch_tokens < e->o.max_seqs) e->o.max_batch_tokens = e->o.max_seqs;
    if (e->o.threads > 0) vlm_cpu_init(e->o.threads);
    e->kvd = (int64_t)c->n_kv_heads * c->head_dim;
    int64_t page_bytes = 2 * (int64_t)c->n_layers * e->o.page_tokens * e->kvd * (int64_t)sizeof(float);
    /* default pool: 8192 tokens of f32 K/V (56 KiB/token for the 2B shape -> 448 MiB) */
    if (e->o.kv_memory_bytes <= 0) e->o.kv_memory_bytes = page_bytes * ((8192 + e->o.page_tokens - 1) / e->o.page_tokens);
    e->n_pages = e->o.kv_memory_bytes / page_bytes;
    if (e->n_pages < 1) {
        free(e);
        return vlm_errf(err, errlen, VLM_E_LIMIT, "kv_memory_bytes %lld is less than one KV page (%lld bytes)",
                        (long long)opts->kv_memory_bytes, (long long)page_bytes);
    }
    size_t pool = (size_t)(e->n_pages * page_bytes / 2);
    e->k_pool = malloc(pool);
    e->v_pool = malloc(pool);
    e->free_pages = malloc((size_t)e->n_pages * sizeof *e->free_pages);
    int64_t R = e->o.max_batch_tokens, H = c->hidden, Q = (int64_t)c->n_heads * c->head_dim, F = c->intermediate;
    e->x = malloc((size_t)(R * H) * sizeof(float));
    e->a = malloc((size_t)(R * (H > Q ? H : Q)) * sizeof(float));
    e->q = malloc((size_t)(R * Q) * sizeof(float));
    e->k = malloc((size_t)(R * e->kvd) * sizeof(float));
    e->v = malloc((size_t)(R * e->kvd) * sizeof(float));
    e->att = malloc((size_t)(R * Q) * sizeof(float));
    e->g = malloc((size_t)(R * F) * sizeof(float));
    e->u = malloc((size_t)(R * F) * sizeof(float));
    e->logits = malloc((size_t)e->o.max_seqs * (size_t)c->vocab * sizeof(float));
    e->row_seq = malloc((size_t)R * sizeof *e->row_seq);
    e->row_idx = malloc((size_t)R * sizeof *e->row_idx);
    if (!e->k_pool || !e->v_pool || !e->free_pages || !e->x || !e->a || !e->q || !e->k || !e->v || !e->att ||
        !e->g || !e->u || !e->logits || !e->row_seq || !e->row_idx) {
        vlm_engine_free(e);
        return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory for the engine (KV pool %lld bytes)",
                        (long long)(2 * pool));
    }
    for (int64_t i = 0; i < e->n_pages; i++) e->free_pages[i] = (int32_t)(e->n_pages - 1 - i);
    e->n_free = e->n_pages;
    e->next_id = 1;
    *out = e;
    return VLM_OK;
}

void vlm_engine_free(vlm_engine *e) {
    if (!e) return;
    for (int i = 0; i < e->n_seqs; i++) seq_free(e->seqs[i]);
    free(e->seqs);
    free(e->k_pool); free(e->v_pool); free(e->free_pages);
    free(e->x); free(e->a); free(e->q); free(e->k); free(e->v); free(e->att); free(e->g); free(e->u);
    free(e->logits); free(e->row_seq); free(e->row_idx); free(e->done_logits);
    free(e);
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
    if (n_rows) s->img = malloc((size_t)(n_rows * c->hidden) * sizeof(float));
    if (d->n_stop_ids > 0) s->stop = malloc((size_t)d->n_stop_ids * sizeof *s->stop);
    if (d->want_logits) s->logits = malloc((size_t)c->vocab * sizeof(float));
    if (!s->tok || !s->pos || !s->img_row || !s->pages || (n_rows && !s->img) || (d->n_stop_ids > 0 && !s->stop) ||
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
    st->kv_pages_used = e->n_pages - e->n_free;
    st->page_tokens = e->o.page_tokens;
    for (int i = 0; i < e->n_seqs; i++) {
        if (e->seqs[i]->n_pages > 0) st->running++;
        else st->waiting++;
    }
    st->preempted_total = e->preempted_total;
}

static void release_pages(vlm_engine *e, seq *s) {
    for (int64_t i = 0; i < s->n_pages; i++) e->free_pages[e->n_free++] = s->pages[i];
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

/* rotate_half RoPE on one head vector h[head_dim] with per-frequency positions (SPEC §B, §C.1). */
static void rope_head(float *h, int hd, const float *cs, const float *sn) {
    int half = hd / 2;
    for (int j = 0; j < half; j++) {
        float a = h[j], b = h[j + half];
        h[j] = a * cs[j] - b * sn[j];
        h[j + half] = b * cs[j] + a * sn[j];
    }
}

typedef struct { seq *s; int64_t start, n; bool sample; } sched;

static float *kv_at(const vlm_engine *e, float *pool, int layer, const seq *s, int64_t t) {
    int64_t pt = e->o.page_tokens;
    int64_t page = s->pages[t / pt];
    return pool + (((int64_t)layer * e->n_pages + page) * pt + t % pt) * e->kvd;
}

/* Attention of a prefill chunk: rows s0..s0+n-1 of sequence s over its tokens 0..s0+n-1.
 * q, out: [n, nh*hd] (row stride nh*hd). Per KV head the context is gathered from the pages into
 * contiguous K/V, then per query head S = Q·Kᵀ (scaled, causal mask, f32 softmax) and O = S·V. */
static void chunk_attention(vlm_engine *e, int l, const seq *s, int64_t s0, int64_t n, const float *q, float *out,
                            float scale) {
    const vlm_model_config *c = &e->m->cfg;
    int64_t hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads, Q = nh * hd, T = s0 + n, grp = nh / nkv;
    float *kc = malloc((size_t)(T * hd) * sizeof(float)), *vc = malloc((size_t)(T * hd) * sizeof(float));
    float *S = malloc((size_t)(n * T) * sizeof(float));
    VLM_ASSERT(kc && vc && S);
    for (int64_t kh = 0; kh < nkv; kh++) {
        for (int64_t t = 0; t < T; t++) {
            memcpy(kc + t * hd, kv_at(e, e->k_pool, l, s, t) + kh * hd, (size_t)hd * sizeof(float));
            memcpy(vc + t * hd, kv_at(e, e->v_pool, l, s, t) + kh * hd, (size_t)hd * sizeof(float));
        }
        for (int64_t h = kh * grp; h < (kh + 1) * grp; h++) {
            vlm_gemm_f32(n, T, hd, q + h * hd, Q, kc, hd, true, 0.0f, S, T); // S: [n, T]
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < n; i++) {
                float *row = S + i * T;
                int64_t lim = s0 + i + 1; /* causal: keys 0..s0+i */
                float mx = -INFINITY;
                for (int64_t t = 0; t < lim; t++) { row[t] *= scale; if (row[t] > mx) mx = row[t]; }
                float sum = 0;
                for (int64_t t = 0; t < lim; t++) { row[t] = expf(row[t] - mx); sum += row[t]; }
                float inv = 1.0f / sum;
                for (int64_t t = 0; t < lim; t++) row[t] *= inv;
                for (int64_t t = lim; t < T; t++) row[t] = 0.0f;
            }
            vlm_gemm_f32(n, hd, T, S, T, vc, hd, false, 0.0f, out + h * hd, Q); // out: [n, hd] per head
        }
    }
    free(kc);
    free(vc);
    free(S);
}

static void forward(vlm_engine *e, sched *sc, int n_sc, int64_t R) {
    const vlm_model *m = e->m;
    const vlm_model_config *c = &m->cfg;
    int64_t H = c->hidden, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads, F = c->intermediate;
    int64_t Q = nh * hd, KV = e->kvd, half = hd / 2;
    int sec0 = c->mrope_section[0], sec1 = c->mrope_section[1];
    if (sec0 + sec1 + c->mrope_section[2] == 0) { sec0 = (int)half; sec1 = 0; }
    /* embeddings, image rows scattered in; cos/sin per row */
    float *cs = malloc((size_t)(R * half) * sizeof(float)), *sn = malloc((size_t)(R * half) * sizeof(float));
    VLM_ASSERT(cs && sn);
    for (int64_t r = 0; r < R; r++) {
        seq *s = sc[e->row_seq[r]].s;
        int64_t i = e->row_idx[r];
        int32_t id = s->tok[i];
        if (i < s->n_prompt && s->img_row[i] >= 0) memcpy(e->x + r * H, s->img + s->img_row[i] * H, (size_t)H * sizeof(float));
        else vlm_embed_rows(m->w.embed, &id, 1, e->x + r * H);
        int64_t p3[3];
        for (int k = 0; k < 3; k++) p3[k] = i < s->n_prompt ? s->pos[k * s->n_prompt + i] : i + s->delta;
        for (int64_t j = 0; j < half; j++) {
            int st = j < sec0 ? 0 : j < sec0 + sec1 ? 1 : 2;
            float ang = (float)p3[st] * m->inv_freq[j];
            cs[r * half + j] = cosf(ang);
            sn[r * half + j] = sinf(ang);
        }
    }
    float scale = 1.0f / sqrtf((float)hd);
    for (int l = 0; l < c->n_layers; l++) {
        const struct vlm_layer *w = &m->w.layers[l];
        vlm_rms_norm(e->x, w->in_norm, c->rms_eps, R, H, e->a); // a: [R, H]
        vlm_linear(e->a, R, H, w->q, w->qb, e->q);              // q: [R, nh*hd]
        vlm_linear(e->a, R, H, w->k, w->kb, e->k);              // k: [R, nkv*hd]
        vlm_linear(e->a, R, H, w->v, w->vb, e->v);
        for (int64_t r = 0; r < R; r++) {
            for (int64_t h = 0; h < nh; h++) rope_head(e->q + r * Q + h * hd, (int)hd, cs + r * half, sn + r * half);
            for (int64_t h = 0; h < nkv; h++) rope_head(e->k + r * KV + h * hd, (int)hd, cs + r * half, sn + r * half);
            seq *s = sc[e->row_seq[r]].s;
            memcpy(kv_at(e, e->k_pool, l, s, e->row_idx[r]), e->k + r * KV, (size_t)KV * sizeof(float));
            memcpy(kv_at(e, e->v_pool, l, s, e->row_idx[r]), e->v + r * KV, (size_t)KV * sizeof(float));
        }
        /* attention: row r at index i of its sequence attends to tokens 0..i (causal over all pages).
         * Single rows (decode) take the per-row loop; prefill chunks use matrix products per head. */
        int64_t grp = nh / nkv;
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
        for (int64_t r = 0; r < R; r++)
            for (int64_t h = 0; h < nh; h++) {
                if (sc[e->row_seq[r]].n > 1) continue;
                seq *s = sc[e->row_seq[r]].s;
                int64_t n = e->row_idx[r] + 1, kh = h / grp;
                const float *qh = e->q + r * Q + h * hd;
                float *sc_buf = malloc((size_t)n * sizeof(float));
                VLM_ASSERT(sc_buf);
                float mx = -INFINITY;
                for (int64_t t = 0; t < n; t++) {
                    const float *kk = kv_at(e, e->k_pool, l, s, t) + kh * hd;
                    float d = 0;
                    for (int64_t j = 0; j < hd; j++) d += qh[j] * kk[j];
                    sc_buf[t] = d * scale;
                    if (sc_buf[t] > mx) mx = sc_buf[t];
                }
                float sum = 0;
                for (int64_t t = 0; t < n; t++) { sc_buf[t] = expf(sc_buf[t] - mx); sum += sc_buf[t]; }
                float inv = 1.0f / sum;
                float *o = e->att + r * Q + h * hd;
                for (int64_t j = 0; j < hd; j++) o[j] = 0;
                for (int64_t t = 0; t < n; t++) {
                    const float *vv = kv_at(e, e->v_pool, l, s, t) + kh * hd;
                    float p = sc_buf[t] * inv;
                    for (int64_t j = 0; j < hd; j++) o[j] += p * vv[j];
                }
                free(sc_buf);
            }
        for (int k = 0, r0 = 0; k < n_sc; r0 += (int)sc[k].n, k++)
            if (sc[k].n > 1) chunk_attention(e, l, sc[k].s, sc[k].start, sc[k].n, e->q + (int64_t)r0 * Q,
                                             e->att + (int64_t)r0 * Q, scale);
        vlm_linear(e->att, R, Q, w->o, NULL, e->a); // a: [R, H]
        for (int64_t i = 0; i < R * H; i++) e->x[i] += e->a[i];
        vlm_rms_norm(e->x, w->post_norm, c->rms_eps, R, H, e->a);
        vlm_linear(e->a, R, H, w->gate, NULL, e->g); // g, u: [R, F]
        vlm_linear(e->a, R, H, w->up, NULL, e->u);
        for (int64_t i = 0; i < R * F; i++) {
            float z = e->g[i];
            e->g[i] = z / (1.0f + expf(-z)) * e->u[i];
        }
        vlm_linear(e->g, R, F, w->down, NULL, e->a);
        for (int64_t i = 0; i < R * H; i++) e->x[i] += e->a[i];
    }
    free(cs);
    free(sn);
    /* final norm + LM head only for rows that produce a token */
    int64_t nl = 0;
    for (int k = 0; k < n_sc; k++) {
        if (!sc[k].sample) continue;
        /* the last row of this sequence's chunk */
        int64_t r = 0;
        for (int j = 0; j < k; j++) r += sc[j].n;
        r += sc[k].n - 1;
        memcpy(e->u + nl * H, e->x + r * H, (size_t)H * sizeof(float));
        nl++;
    }
    if (nl) {
        vlm_rms_norm(e->u, m->w.final_norm, c->rms_eps, nl, H, e->a);
        vlm_linear(e->a, nl, H, m->w.lm_head, NULL, e->logits); // logits: [nl, vocab]
    }
}

static bool ensure_pages(vlm_engine *e, seq *s, int64_t tokens) {
    int64_t need = pages_for(e, tokens) - s->n_pages;
    if (need <= 0) return true;
    if (need > e->n_free) return false;
    for (int64_t i = 0; i < need; i++) s->pages[s->n_pages++] = e->free_pages[--e->n_free];
    return true;
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
                int64_t room = (s->n_pages + e->n_free) * e->o.page_tokens - s->n_cached;
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
    forward(e, sc, n_sc, R);
    int64_t li = 0;
    const int64_t V = e->m->cfg.vocab;
    for (int k = 0; k < n_sc; k++) {
        seq *s = sc[k].s;
        s->n_cached += sc[k].n;
        if (!sc[k].sample) continue;
        const float *lg = e->logits + li * V;
        li++;
        if (s->want_logits) { memcpy(s->logits, lg, (size_t)V * sizeof(float)); s->has_logits = true; }
        vlm_token_event *E = &ev[n_ev++];
        memset(E, 0, sizeof *E);
        E->seq_id = s->id;
        E->n_prompt = s->n_prompt;
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
