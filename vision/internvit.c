/* internvit.c — NVLM-D's vision tower: InternViT-6B (NVLM variant) + pixel shuffle + the mlp1 projector,
 * f32 activations. Semantics follow nvidia/NVLM-D-72B modeling_intern_vit.py / modeling_nvlm_d.py
 * (docs/nvlm.md lists each fact):
 *   tile [3, S, S] -> Conv2d(P, stride P, bias) as a matmul over (c, ky, kx)-flattened patches, class token
 *   in front, + position_embedding [1 + (S/P)^2, E] -> layers: x += ls1 * attn(RMSNorm(x)); x += ls2 *
 *   fc2(GELU(fc1(RMSNorm(x)))) -> hidden_states[select_layer] -> drop CLS -> pixel shuffle 0.5 (ps_version
 *   v1 leaves the 2x-downsampled grid transposed, v2 swaps it back) -> LayerNorm(4E, eps 1e-5) -> Linear
 *   (no bias) -> GELU(erf) -> Linear (no bias) -> [tiles * (S/P/2)^2, decoder hidden].
 * Attention: qkv without bias (qkv_bias false), heads padded with the checkpoint's dummy heads (NVLM stores
 * 25 + 7 heads; the padded head count is read from the qkv weight's rows), QK-norm = RMSNorm whose variance
 * is taken over the first E channels only (the real heads) and whose weight covers all padded channels,
 * scale head_dim^-0.5 applied to q, softmax over all N = 1 + (S/P)^2 tokens of a tile, proj with bias.
 * Tensor parallel (vlm_internvit_set_tp): the padded heads, the MLP and mlp1 are split over N CPU rank
 * threads (see "tensor-parallel shards" below); one rank (the default) is the same code with one shard. */
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "vision/vis_internal.h"

#define MLP1_LN_EPS 1e-5f /* nn.LayerNorm default in NVLM_D_Model.mlp1 */

typedef struct {
    float *n1, *n2, *ls1, *ls2, *qn, *kn; /* f32 copies of the small vectors */
    vlm_tensor qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b;
    bool has_qkv_b;
} ivit_layer;

struct vlm_internvit {
    int E, H, HP, D, F, P, S, L, n_run, ps_version, out_dim, mlp_mid;
    float eps;
    bool qk_norm;
    vlm_tensor patch_w, patch_b;
    float *cls, *pos; /* [E], [N, E] */
    ivit_layer *layers;
    float *ln_w, *ln_b; /* mlp1.0 */
    vlm_tensor m1_w, m3_w;
    int tp;             /* ranks of the head/MLP split (1: one shard holding everything) */
    struct ivit_shard *shards;
};
typedef struct ivit_shard ivit_shard;
static void shards_free(vlm_internvit *v);

static float t_at(const vlm_tensor *t, int64_t i) {
    switch (t->dtype) {
    case VLM_F32: return ((const float *)t->data)[i];
    case VLM_BF16: return vlm_bf16_to_f32(((const uint16_t *)t->data)[i]);
    case VLM_F16: return vlm_f16_to_f32(((const uint16_t *)t->data)[i]);
    default: VLM_ASSERT(!"unsupported dtype");
    }
    return 0.0f;
}

/* A 2-D (d1 > 0) or 1-D view of `name` with the expected element count and leading dim. */
static vlm_status get_t(const vlm_ckpt *c, const char *name, int64_t d0, int64_t d1, vlm_tensor *out, char *err,
                        size_t errlen) {
    const vlm_tensor *t = vlm_ckpt_find(c, name);
    if (!t) return vis_err(err, errlen, VLM_E_FORMAT, "checkpoint lacks %s", name);
    if (t->dtype != VLM_F32 && t->dtype != VLM_BF16 && t->dtype != VLM_F16)
        return vis_err(err, errlen, VLM_E_UNSUPPORTED, "%s: dtype %s not supported", name, vlm_dtype_name(t->dtype));
    int64_t want = d1 > 0 ? d0 * d1 : d0;
    if (vlm_tensor_numel(t) != want || (d1 > 0 && t->shape[0] != d0))
        return vis_err(err, errlen, VLM_E_FORMAT, "%s: %lld elements, expected %lld x %lld", name,
                       (long long)vlm_tensor_numel(t), (long long)d0, (long long)(d1 > 0 ? d1 : 1));
    *out = *t;
    memset(out->shape, 0, sizeof out->shape);
    out->shape[0] = d0;
    out->ndim = d1 > 0 ? 2 : 1;
    if (d1 > 0) out->shape[1] = d1;
    return VLM_OK;
}

static vlm_status get_vec(const vlm_ckpt *c, const char *name, int64_t n, float **out, char *err, size_t errlen) {
    vlm_tensor t;
    vlm_status st = get_t(c, name, n, 0, &t, err, errlen);
    if (st) return st;
    float *v = malloc((size_t)n * sizeof(float));
    if (!v) return vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
    for (int64_t i = 0; i < n; i++) v[i] = t_at(&t, i);
    *out = v;
    return VLM_OK;
}

void vlm_internvit_free(vlm_internvit *v) {
    if (!v) return;
    shards_free(v);
    if (v->layers)
        for (int l = 0; l < v->n_run; l++) {
            ivit_layer *y = &v->layers[l];
            free(y->n1); free(y->n2); free(y->ls1); free(y->ls2); free(y->qn); free(y->kn);
        }
    free(v->layers);
    free(v->cls);
    free(v->pos);
    free(v->ln_w);
    free(v->ln_b);
    free(v);
}

vlm_status vlm_internvit_load(const vlm_model *m, vlm_internvit **out, char *err, size_t errlen) {
    *out = NULL;
    const vlm_model_config *cfg = vlm_model_cfg(m);
    if (cfg->arch != VLM_ARCH_NVLM_D) return vis_err(err, errlen, VLM_E_INVALID, "InternViT needs an NVLM-D model");
    const vlm_ckpt *c = vlm_model_ckpt(m);
    vlm_internvit *v = calloc(1, sizeof *v);
    if (!v) return vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
    v->E = cfg->nvlm.vit_hidden;
    v->H = cfg->nvlm.vit_heads;
    v->D = v->E / v->H;
    v->F = cfg->nvlm.vit_intermediate;
    v->P = cfg->nvlm.vit_patch;
    v->S = cfg->nvlm.image_size;
    v->L = cfg->nvlm.vit_layers;
    v->eps = cfg->nvlm.vit_norm_eps;
    v->qk_norm = cfg->nvlm.vit_qk_norm;
    v->ps_version = cfg->nvlm.ps_version;
    v->out_dim = cfg->hidden;
    v->mlp_mid = cfg->intermediate;
    /* hidden_states[k]: k >= 0 is after k layers, negative counts from the end of the L + 1 states */
    v->n_run = cfg->nvlm.select_layer >= 0 ? cfg->nvlm.select_layer : v->L + 1 + cfg->nvlm.select_layer;
    if (!cfg->nvlm.vit_rms_norm) {
        free(v);
        return vis_err(err, errlen, VLM_E_UNSUPPORTED, "InternViT norm_type other than rms_norm");
    }
    const int E = v->E, G = v->S / v->P, N = 1 + G * G;
    char name[256];
    vlm_status st = VLM_OK;
    /* padded heads: qkv rows = 3 * HP * D */
    const vlm_tensor *q0 = vlm_ckpt_find(c, "vision_model.encoder.layers.0.attn.qkv.weight");
    if (!q0 || q0->ndim != 2 || q0->shape[0] % (3ll * v->D) || q0->shape[0] / (3ll * v->D) < v->H) {
        int hd = v->D;
        free(v);
        return vis_err(err, errlen, VLM_E_FORMAT, "vision_model.encoder.layers.0.attn.qkv.weight missing or not [3*heads*%d, %d]",
                       hd, E);
    }
    v->HP = (int)(q0->shape[0] / (3ll * v->D));
    const int64_t QD = (int64_t)v->HP * v->D;
    st = get_t(c, "vision_model.embeddings.patch_embedding.weight", E, 3ll * v->P * v->P, &v->patch_w, err, errlen);
    if (!st) st = get_t(c, "vision_model.embeddings.patch_embedding.bias", E, 0, &v->patch_b, err, errlen);
    if (!st) st = get_vec(c, "vision_model.embeddings.class_embedding", E, &v->cls, err, errlen);
    if (!st) st = get_vec(c, "vision_model.embeddings.position_embedding", (int64_t)N * E, &v->pos, err, errlen);
    if (!st) {
        v->layers = calloc((size_t)(v->n_run > 0 ? v->n_run : 1), sizeof *v->layers);
        if (!v->layers) st = vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
    }
    for (int l = 0; l < v->n_run && !st; l++) {
        ivit_layer *y = &v->layers[l];
#define NM(s) (snprintf(name, sizeof name, "vision_model.encoder.layers.%d.%s", l, s), name)
        st = get_vec(c, NM("norm1.weight"), E, &y->n1, err, errlen);
        if (!st) st = get_vec(c, NM("norm2.weight"), E, &y->n2, err, errlen);
        if (!st) st = get_vec(c, NM("ls1"), E, &y->ls1, err, errlen);
        if (!st) st = get_vec(c, NM("ls2"), E, &y->ls2, err, errlen);
        if (!st) st = get_t(c, NM("attn.qkv.weight"), 3 * QD, E, &y->qkv_w, err, errlen);
        if (!st && vlm_ckpt_find(c, NM("attn.qkv.bias"))) {
            y->has_qkv_b = true;
            st = get_t(c, NM("attn.qkv.bias"), 3 * QD, 0, &y->qkv_b, err, errlen);
        }
        if (!st && v->qk_norm) st = get_vec(c, NM("attn.q_norm.weight"), QD, &y->qn, err, errlen);
        if (!st && v->qk_norm) st = get_vec(c, NM("attn.k_norm.weight"), QD, &y->kn, err, errlen);
        if (!st) st = get_t(c, NM("attn.proj.weight"), E, QD, &y->proj_w, err, errlen);
        if (!st) st = get_t(c, NM("attn.proj.bias"), E, 0, &y->proj_b, err, errlen);
        if (!st) st = get_t(c, NM("mlp.fc1.weight"), v->F, E, &y->fc1_w, err, errlen);
        if (!st) st = get_t(c, NM("mlp.fc1.bias"), v->F, 0, &y->fc1_b, err, errlen);
        if (!st) st = get_t(c, NM("mlp.fc2.weight"), E, v->F, &y->fc2_w, err, errlen);
        if (!st) st = get_t(c, NM("mlp.fc2.bias"), E, 0, &y->fc2_b, err, errlen);
#undef NM
    }
    if (!st) st = get_vec(c, "mlp1.0.weight", 4ll * E, &v->ln_w, err, errlen);
    if (!st) st = get_vec(c, "mlp1.0.bias", 4ll * E, &v->ln_b, err, errlen);
    if (!st) st = get_t(c, "mlp1.1.weight", v->mlp_mid, 4ll * E, &v->m1_w, err, errlen);
    if (!st) st = get_t(c, "mlp1.3.weight", v->out_dim, v->mlp_mid, &v->m3_w, err, errlen);
    if (!st) st = vlm_internvit_set_tp(v, 1, err, errlen);
    if (st) {
        vlm_internvit_free(v);
        return st;
    }
    *out = v;
    return VLM_OK;
}

static float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

/* x[n, E] -> y = x * rsqrt(mean(x^2) + eps) * w (InternRMSNorm, f32) */
static void rms_norm(const float *x, int64_t n, int E, const float *w, float eps, float *y) {
    for (int64_t r = 0; r < n; r++) {
        const float *a = x + r * E;
        float *b = y + r * E;
        float ss = 0;
        for (int i = 0; i < E; i++) ss += a[i] * a[i];
        float inv = 1.0f / sqrtf(ss / (float)E + eps);
        for (int i = 0; i < E; i++) b[i] = a[i] * inv * w[i];
    }
}

/* ---- tensor-parallel shards ------------------------------------------------------------------
 * Rank r of N holds padded heads [h0, h0+hn) (hn = HP/N: the q, k and v row blocks of qkv, the same
 * channels of q_norm/k_norm, and the column block of proj), fc1 rows [f0, f0+fn) with their biases and the
 * fc2 column block, and mlp1.1 rows [m0, m0+mn) with the mlp1.3 column block. The residual stream, the
 * RMSNorms, layer scales, pixel shuffle and mlp1's LayerNorm are replicated. Per layer the ranks all-reduce
 * (1) the partial sums of squares of q and k over the real channels they hold — QK-norm's variance is over
 * all E real channels, which span ranks — (2) proj's partial output, (3) fc2's partial output, and once per
 * tile (4) mlp1.3's partial output; biases are added after the reduction. Row blocks are views into the
 * checkpoint (contiguous); column blocks are copied per rank unless the rank holds every column (N = 1). */
typedef struct {
    vlm_tensor q, k, vv, qb, kb, vb; /* row blocks of qkv weight / bias */
    vlm_tensor proj;                  /* [E, hn*D] */
    vlm_tensor fc1, fc1b;             /* [fn, E], [fn] */
    vlm_tensor fc2;                   /* [E, fn] */
    bool proj_own, fc2_own;
} ivit_shard_layer;

struct ivit_shard {
    int rank, n, h0, hn;
    int64_t f0, fn, m0, mn;
    ivit_shard_layer *L;
    vlm_tensor m1, m3;                /* [mn, 4E], [out, mn] */
    bool m3_own;
};

static vlm_tensor rows_view(const vlm_tensor *t, int64_t r0, int64_t nr) {
    vlm_tensor o = *t;
    int64_t cols = t->ndim == 2 ? t->shape[1] : 1;
    size_t es = vlm_dtype_size(t->dtype);
    o.data = (char *)t->data + (size_t)(r0 * cols) * es;
    o.shape[0] = nr;
    o.nbytes = (size_t)(nr * cols) * es;
    return o;
}

/* Column block [c0, c0+nc) of a 2-D tensor; a view when it is the whole tensor, else a copy (*own). */
static vlm_status cols_block(const vlm_tensor *t, int64_t c0, int64_t nc, vlm_tensor *o, bool *own) {
    *o = *t;
    *own = false;
    const int64_t R = t->shape[0], C = t->shape[1];
    if (c0 == 0 && nc == C) return VLM_OK;
    size_t es = vlm_dtype_size(t->dtype);
    char *d = malloc((size_t)(R * nc) * es);
    if (!d) return VLM_E_NOMEM;
    for (int64_t r = 0; r < R; r++) memcpy(d + (size_t)(r * nc) * es, (const char *)t->data + (size_t)(r * C + c0) * es,
                                           (size_t)nc * es);
    o->data = d;
    o->shape[1] = nc;
    o->nbytes = (size_t)(R * nc) * es;
    *own = true;
    return VLM_OK;
}

static void shards_free(vlm_internvit *v) {
    if (!v->shards) return;
    for (int r = 0; r < v->tp; r++) {
        ivit_shard *sh = &v->shards[r];
        if (sh->L)
            for (int l = 0; l < v->n_run; l++) {
                if (sh->L[l].proj_own) free(sh->L[l].proj.data);
                if (sh->L[l].fc2_own) free(sh->L[l].fc2.data);
            }
        if (sh->m3_own) free(sh->m3.data);
        free(sh->L);
    }
    free(v->shards);
    v->shards = NULL;
    v->tp = 0;
}

vlm_status vlm_internvit_set_tp(vlm_internvit *v, int n, char *err, size_t errlen) {
    if (n < 1) return vis_err(err, errlen, VLM_E_INVALID, "InternViT tensor parallel: %d ranks", n);
    if (v->HP % n || v->F % n || v->mlp_mid % n)
        return vis_err(err, errlen, VLM_E_UNSUPPORTED,
                       "InternViT tensor parallel over %d ranks: the %d padded heads, MLP width %d and mlp1 width %d "
                       "must all divide by it", n, v->HP, v->F, v->mlp_mid);
    shards_free(v);
    v->shards = calloc((size_t)n, sizeof *v->shards);
    if (!v->shards) return vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
    v->tp = n;
    const int64_t D = v->D, QD = (int64_t)v->HP * D;
    for (int r = 0; r < n; r++) {
        ivit_shard *sh = &v->shards[r];
        sh->rank = r;
        sh->n = n;
        sh->hn = v->HP / n;
        sh->h0 = r * sh->hn;
        sh->fn = v->F / n;
        sh->f0 = r * sh->fn;
        sh->mn = v->mlp_mid / n;
        sh->m0 = r * sh->mn;
        sh->L = calloc((size_t)(v->n_run > 0 ? v->n_run : 1), sizeof *sh->L);
        if (!sh->L) goto oom;
        const int64_t c0 = sh->h0 * D, cn = sh->hn * D;
        for (int l = 0; l < v->n_run; l++) {
            const ivit_layer *y = &v->layers[l];
            ivit_shard_layer *o = &sh->L[l];
            o->q = rows_view(&y->qkv_w, c0, cn);
            o->k = rows_view(&y->qkv_w, QD + c0, cn);
            o->vv = rows_view(&y->qkv_w, 2 * QD + c0, cn);
            if (y->has_qkv_b) {
                o->qb = rows_view(&y->qkv_b, c0, cn);
                o->kb = rows_view(&y->qkv_b, QD + c0, cn);
                o->vb = rows_view(&y->qkv_b, 2 * QD + c0, cn);
            }
            if (cols_block(&y->proj_w, c0, cn, &o->proj, &o->proj_own)) goto oom;
            o->fc1 = rows_view(&y->fc1_w, sh->f0, sh->fn);
            o->fc1b = rows_view(&y->fc1_b, sh->f0, sh->fn);
            if (cols_block(&y->fc2_w, sh->f0, sh->fn, &o->fc2, &o->fc2_own)) goto oom;
        }
        sh->m1 = rows_view(&v->m1_w, sh->m0, sh->mn);
        if (cols_block(&v->m3_w, sh->m0, sh->mn, &sh->m3, &sh->m3_own)) goto oom;
    }
    return VLM_OK;
oom:
    shards_free(v);
    return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for InternViT shards");
}

int vlm_internvit_tp(const vlm_internvit *v) { return v->tp; }

/* In-process all-reduce for the rank threads: every rank sums the N partials in rank order 0..N-1 (so all
 * ranks hold bitwise the same result and a run is reproducible). */
typedef struct {
    pthread_barrier_t bar;
    int n;
    float **bufs;
    volatile int failed;
} ivit_comm;

static void all_reduce(ivit_comm *c, int rank, float *x, float *tmp, int64_t len) {
    if (!c || c->n == 1) return;
    c->bufs[rank] = x;
    pthread_barrier_wait(&c->bar);
    for (int64_t i = 0; i < len; i++) {
        float s = 0;
        for (int r = 0; r < c->n; r++) s += c->bufs[r][i];
        tmp[i] = s;
    }
    pthread_barrier_wait(&c->bar); /* everyone has read every partial before any is overwritten */
    memcpy(x, tmp, sizeof(float) * (size_t)len);
}

/* Encodes one tile on one rank's shard; with N ranks every rank calls this for the same tile at the same time.
 * Rank 0 writes the (S/P/2)^2 projected tokens to out. Buffers come from the caller (w). */
typedef struct {
    float *x, *h, *a, *sc, *o, *ss, *red, *ps, *mid, *fin;
} ivit_work;

static void work_free(ivit_work *w) {
    free(w->x); free(w->h); free(w->a); free(w->sc); free(w->o); free(w->ss); free(w->red); free(w->ps);
    free(w->mid); free(w->fin);
    memset(w, 0, sizeof *w);
}

static bool work_alloc(const vlm_internvit *v, const ivit_shard *sh, ivit_work *w) {
    const int E = v->E, G = v->S / v->P, N = 1 + G * G, D = v->D;
    const int64_t pd = 3ll * v->P * v->P, cn = (int64_t)sh->hn * D, T = (int64_t)(G / 2) * (G / 2);
    int64_t hw = 3 * cn > sh->fn ? 3 * cn : sh->fn;
    int64_t aw = E > pd ? E : pd;
    if (cn > aw) aw = cn;
    int64_t red = (int64_t)N * E > T * v->out_dim ? (int64_t)N * E : T * v->out_dim;
    if (2ll * N > red) red = 2ll * N;
    w->x = malloc(sizeof(float) * (size_t)N * E);
    w->h = malloc(sizeof(float) * (size_t)N * (size_t)hw);
    w->a = malloc(sizeof(float) * (size_t)N * (size_t)aw);
    w->sc = malloc(sizeof(float) * (size_t)N * N);
    w->o = malloc(sizeof(float) * (size_t)N * E);
    w->ss = malloc(sizeof(float) * 2 * (size_t)N);
    w->red = malloc(sizeof(float) * (size_t)red);
    w->ps = malloc(sizeof(float) * (size_t)T * 4 * (size_t)E);
    w->mid = malloc(sizeof(float) * (size_t)T * (size_t)sh->mn);
    w->fin = malloc(sizeof(float) * (size_t)T * (size_t)v->out_dim);
    return w->x && w->h && w->a && w->sc && w->o && w->ss && w->red && w->ps && w->mid && w->fin;
}

static void encode_tile_rank(const vlm_internvit *v, const ivit_shard *sh, ivit_comm *cm, ivit_work *w,
                             const float *tile, float *out) {
    const int E = v->E, G = v->S / v->P, N = 1 + G * G, P = v->P, S = v->S, D = v->D, hn = sh->hn;
    const int64_t pd = 3ll * P * P, cn = (int64_t)hn * D, c0 = (int64_t)sh->h0 * D;
    float *x = w->x, *h = w->h, *a = w->a, *sc = w->sc, *o = w->o;
    /* patches flattened as the Conv2d weight [E, 3, P, P]: (c, ky, kx) */
    for (int gy = 0; gy < G; gy++)
        for (int gx = 0; gx < G; gx++) {
            float *row = a + ((int64_t)gy * G + gx) * pd;
            for (int c = 0; c < 3; c++)
                for (int ky = 0; ky < P; ky++)
                    memcpy(row + ((int64_t)c * P + ky) * P, tile + ((int64_t)c * S + gy * P + ky) * S + gx * P,
                           sizeof(float) * (size_t)P);
        }
    vlm_linear(a, (int64_t)G * G, pd, &v->patch_w, &v->patch_b, x + E);
    memcpy(x, v->cls, sizeof(float) * (size_t)E);
    for (int64_t i = 0; i < (int64_t)N * E; i++) x[i] += v->pos[i];
    const float scale = 1.0f / sqrtf((float)D);
    /* this rank's channels that belong to real heads (QK-norm's variance is over the E real channels) */
    const int64_t real_n = c0 >= E ? 0 : (c0 + cn <= E ? cn : E - c0);
    for (int l = 0; l < v->n_run; l++) {
        const ivit_layer *y = &v->layers[l];
        const ivit_shard_layer *z = &sh->L[l];
        rms_norm(x, N, E, y->n1, v->eps, a);
        /* h: [N, 3*cn] = this rank's q | k | v */
        float *q = h, *k = h + (int64_t)N * cn, *vv = h + 2ll * N * cn;
        vlm_linear(a, N, E, &z->q, y->has_qkv_b ? &z->qb : NULL, q);
        vlm_linear(a, N, E, &z->k, y->has_qkv_b ? &z->kb : NULL, k);
        vlm_linear(a, N, E, &z->vv, y->has_qkv_b ? &z->vb : NULL, vv);
        if (v->qk_norm) {
            for (int64_t r = 0; r < N; r++)
                for (int part = 0; part < 2; part++) {
                    const float *t = (part ? k : q) + r * cn;
                    float s = 0;
                    for (int64_t i = 0; i < real_n; i++) s += t[i] * t[i];
                    w->ss[r * 2 + part] = s;
                }
            all_reduce(cm, sh->rank, w->ss, w->red, 2ll * N);
            for (int64_t r = 0; r < N; r++)
                for (int part = 0; part < 2; part++) {
                    float *t = (part ? k : q) + r * cn;
                    const float *wn = (part ? y->kn : y->qn) + c0;
                    float inv = 1.0f / sqrtf(w->ss[r * 2 + part] / (float)E + v->eps);
                    for (int64_t i = 0; i < cn; i++) t[i] = t[i] * inv * wn[i];
                }
        }
        for (int64_t i = 0; i < (int64_t)N * cn; i++) q[i] *= scale;
        for (int hd = 0; hd < hn; hd++) {
            vlm_gemm_f32(N, N, D, q + (int64_t)hd * D, cn, k + (int64_t)hd * D, cn, true, 0.0f, sc, N);
            for (int64_t r = 0; r < N; r++) {
                float *s = sc + r * N, mx = -INFINITY, sum = 0;
                for (int j = 0; j < N; j++) mx = fmaxf(mx, s[j]);
                for (int j = 0; j < N; j++) { s[j] = expf(s[j] - mx); sum += s[j]; }
                for (int j = 0; j < N; j++) s[j] /= sum;
            }
            vlm_gemm_f32(N, D, N, sc, N, vv + (int64_t)hd * D, cn, false, 0.0f, a + (int64_t)hd * D, cn);
        }
        vlm_linear(a, N, cn, &z->proj, NULL, o);
        all_reduce(cm, sh->rank, o, w->red, (int64_t)N * E);
        for (int64_t r = 0; r < N; r++)
            for (int i = 0; i < E; i++)
                x[r * E + i] += (o[r * E + i] + t_at(&y->proj_b, i)) * y->ls1[i];
        rms_norm(x, N, E, y->n2, v->eps, a);
        vlm_linear(a, N, E, &z->fc1, &z->fc1b, h);
        for (int64_t i = 0; i < (int64_t)N * sh->fn; i++) h[i] = gelu_erf(h[i]);
        vlm_linear(h, N, sh->fn, &z->fc2, NULL, o);
        all_reduce(cm, sh->rank, o, w->red, (int64_t)N * E);
        for (int64_t r = 0; r < N; r++)
            for (int i = 0; i < E; i++)
                x[r * E + i] += (o[r * E + i] + t_at(&y->fc2_b, i)) * y->ls2[i];
    }
    /* drop CLS; pixel shuffle: token (a2, b2) gathers x[2a2+i][2b2+j] at features (i*2 + j)*E + c.
     * v1 emits tokens in (b2, a2) order (the transposed grid), v2 in (a2, b2) order. */
    const int G2 = G / 2;
    const int64_t E4 = 4ll * E, T = (int64_t)G2 * G2;
    float *ps = w->ps;
    for (int a2 = 0; a2 < G2; a2++)
        for (int b2 = 0; b2 < G2; b2++) {
            int t = v->ps_version == 1 ? b2 * G2 + a2 : a2 * G2 + b2;
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++)
                    memcpy(ps + (int64_t)t * E4 + (int64_t)(i * 2 + j) * E,
                           x + (1 + (int64_t)(2 * a2 + i) * G + (2 * b2 + j)) * E, sizeof(float) * (size_t)E);
        }
    /* mlp1: LayerNorm(4E) (biased variance, eps 1e-5) -> Linear -> GELU -> Linear */
    for (int64_t t = 0; t < T; t++) {
        float *r = ps + t * E4;
        double mean = 0, var = 0;
        for (int64_t i = 0; i < E4; i++) mean += r[i];
        mean /= (double)E4;
        for (int64_t i = 0; i < E4; i++) var += (r[i] - mean) * (r[i] - mean);
        var /= (double)E4;
        float inv = (float)(1.0 / sqrt(var + MLP1_LN_EPS));
        for (int64_t i = 0; i < E4; i++) r[i] = ((float)(r[i] - mean)) * inv * v->ln_w[i] + v->ln_b[i];
    }
    vlm_linear(ps, T, E4, &sh->m1, NULL, w->mid);
    for (int64_t i = 0; i < T * sh->mn; i++) w->mid[i] = gelu_erf(w->mid[i]);
    float *dst = sh->n == 1 ? out : w->fin;
    vlm_linear(w->mid, T, sh->mn, &sh->m3, NULL, dst);
    all_reduce(cm, sh->rank, dst, w->red, T * v->out_dim);
    if (sh->n > 1 && sh->rank == 0) memcpy(out, dst, sizeof(float) * (size_t)(T * v->out_dim));
}

typedef struct {
    const vlm_internvit *v;
    const ivit_shard *sh;
    ivit_comm *cm;
    const vlm_pixels *px;
    int64_t t0, t1; /* the tiles to encode */
    float *out;
    int omp_threads;
    bool ok;
} ivit_rank_job;

static void *rank_run(void *arg) {
    ivit_rank_job *j = arg;
    const vlm_internvit *v = j->v;
    if (j->omp_threads > 0) omp_set_num_threads(j->omp_threads);
    ivit_work w = {0};
    j->ok = work_alloc(v, j->sh, &w);
    if (!j->ok) j->cm->failed = 1;
    pthread_barrier_wait(&j->cm->bar); /* all ranks agree whether to go on */
    if (!j->cm->failed) {
        const int64_t tile_dim = 3ll * v->S * v->S, per = (int64_t)(v->S / v->P / 2) * (v->S / v->P / 2);
        for (int64_t t = j->t0; t < j->t1; t++)
            encode_tile_rank(v, j->sh, j->cm, &w, j->px->pixel_values + t * tile_dim, j->out + t * per * v->out_dim);
    }
    work_free(&w);
    return NULL;
}

vlm_status vlm_internvit_encode(const vlm_internvit *v, const vlm_pixels *px, float *out, char *err, size_t errlen) {
    return vlm_internvit_encode_tiles(v, px, 0, px->n_patches, out, err, errlen);
}

vlm_status vlm_internvit_encode_tiles(const vlm_internvit *v, const vlm_pixels *px, int64_t t0, int64_t t1,
                                      float *out, char *err, size_t errlen) {
    const int64_t tile_dim = 3ll * v->S * v->S, per = (int64_t)(v->S / v->P / 2) * (v->S / v->P / 2);
    if (px->patch_dim != tile_dim || px->n_tokens != px->n_patches * per)
        return vis_err(err, errlen, VLM_E_INVALID, "pixel_values are not %dx%d tiles", v->S, v->S);
    if (t0 < 0 || t1 > px->n_patches || t0 > t1)
        return vis_err(err, errlen, VLM_E_INVALID, "tiles [%lld, %lld) of %lld", (long long)t0, (long long)t1,
                       (long long)px->n_patches);
    const int n = v->tp;
    if (n == 1) {
        ivit_work w = {0};
        if (!work_alloc(v, &v->shards[0], &w)) {
            work_free(&w);
            return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for an InternViT tile");
        }
        for (int64_t t = t0; t < t1; t++)
            encode_tile_rank(v, &v->shards[0], NULL, &w, px->pixel_values + t * tile_dim, out + t * per * v->out_dim);
        work_free(&w);
        return VLM_OK;
    }
    ivit_comm cm = {.n = n};
    float **bufs = calloc((size_t)n, sizeof *bufs);
    ivit_rank_job *jobs = calloc((size_t)n, sizeof *jobs);
    pthread_t *th = calloc((size_t)n, sizeof *th);
    if (!bufs || !jobs || !th || pthread_barrier_init(&cm.bar, NULL, (unsigned)n)) {
        free(bufs); free(jobs); free(th);
        return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for InternViT ranks");
    }
    cm.bufs = bufs;
    /* the rank threads are not OpenMP threads: each starts its own team, so split the cores */
    int per_rank = vlm_cpu_threads() / n > 0 ? vlm_cpu_threads() / n : 1;
    int started = 0;
    for (int r = 0; r < n; r++) {
        jobs[r] = (ivit_rank_job){.v = v, .sh = &v->shards[r], .cm = &cm, .px = px, .t0 = t0, .t1 = t1, .out = out,
                                  .omp_threads = per_rank};
        if (r > 0 && pthread_create(&th[r], NULL, rank_run, &jobs[r]) != 0) break;
        started = r + 1;
    }
    vlm_status st = VLM_OK;
    if (started != n) {
        /* a barrier sized for n ranks cannot complete: this only happens when thread creation fails, before
         * rank 0 has entered any barrier, so the started ranks are stopped by failing their agreement step */
        cm.failed = 1;
        for (int r = started; r < n; r++) pthread_barrier_wait(&cm.bar);
        st = vis_err(err, errlen, VLM_E_NOMEM, "cannot start InternViT rank threads");
    }
    rank_run(&jobs[0]);
    for (int r = 1; r < started; r++) pthread_join(th[r], NULL);
    if (st == VLM_OK && cm.failed) st = vis_err(err, errlen, VLM_E_NOMEM, "out of memory for an InternViT tile");
    pthread_barrier_destroy(&cm.bar);
    free(bufs); free(jobs); free(th);
    return st;
}
