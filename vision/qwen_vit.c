/* qwen_vit.c — the Qwen2-VL vision transformer and PatchMerger (SPEC §D), f32 activations.
 *
 * pixel_values [Np, C·T·P·P] -> patch embed (the Conv3d as a matmul) -> depth × pre-norm blocks
 * (LayerNorm, qkv, 2-D rotary, attention confined to each temporal slice, proj; LayerNorm,
 * fc1, QuickGELU/GELU, fc2) -> PatchMerger (ln_q, 2×2 windows concatenated, Linear, erf GELU,
 * Linear) -> [Np/M², out_hidden].
 *
 * Weights stay in the checkpoint's dtype (BF16 or F32, mmapped) and go through vlm_linear;
 * only the small LayerNorm vectors are converted to f32 at load. Attention is the runtime's blocked
 * (flash-style) vlm_attention_f32: scores exist only as 128x256 tiles, so a 9216-patch image never
 * materialises a 9216² matrix. */
#include "runtime/cpu_internal.h" /* vlm_attention_f32 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "vision/vis_internal.h"

#define VIT_LN_EPS 1e-6f         /* nn.LayerNorm(eps=1e-6) in the reference blocks and ln_q */
#define VIT_ROPE_THETA 10000.0f  /* VisionRotaryEmbedding default theta */

typedef struct {
    float *n1w, *n1b, *n2w, *n2b; /* [E] */
    vlm_tensor qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b;
} vit_block;

struct vlm_vit {
    vlm_vision_config vc;
    int E, H, D, mlp, pd, out_dim;
    int act_quick; /* 1: quick_gelu, 0: exact gelu */
    vlm_tensor patch_w; /* [E, pd] view of the Conv3d weight */
    vit_block *blocks;
    float *lnq_w, *lnq_b;
    vlm_tensor m0_w, m0_b, m2_w, m2_b;
    float *inv_freq; /* [D/4] */
};

static const vlm_tensor *find_t(const vlm_ckpt *c, const char *prefix, const char *name) {
    char full[256];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    return vlm_ckpt_find(c, full);
}

/* Fetches a tensor, checks its element count against the expected 1-D or 2-D shape, and stores
 * a 2-D (or 1-D) view with the expected shape in *out. */
static vlm_status get_t(const vlm_ckpt *c, const char *prefix, const char *name, int64_t d0,
                        int64_t d1, vlm_tensor *out, char *err, size_t errlen) {
    const vlm_tensor *t = find_t(c, prefix, name);
    if (!t) return vis_err(err, errlen, VLM_E_FORMAT, "checkpoint lacks %s%s", prefix, name);
    if (t->dtype != VLM_F32 && t->dtype != VLM_BF16 && t->dtype != VLM_F16)
        return vis_err(err, errlen, VLM_E_UNSUPPORTED, "%s%s: dtype %s not supported", prefix,
                       name, vlm_dtype_name(t->dtype));
    int64_t want = d1 > 0 ? d0 * d1 : d0;
    if (vlm_tensor_numel(t) != want || (d1 > 0 && t->shape[0] != d0))
        return vis_err(err, errlen, VLM_E_FORMAT, "%s%s: %lld elements (dim0 %lld), expected %lld x %lld",
                       prefix, name, (long long)vlm_tensor_numel(t), (long long)t->shape[0],
                       (long long)d0, (long long)(d1 > 0 ? d1 : 1));
    *out = *t;
    memset(out->shape, 0, sizeof out->shape);
    out->shape[0] = d0;
    if (d1 > 0) {
        out->ndim = 2;
        out->shape[1] = d1;
    } else {
        out->ndim = 1;
    }
    return VLM_OK;
}

static float t_at(const vlm_tensor *t, int64_t i) {
    switch (t->dtype) {
    case VLM_F32: return ((const float *)t->data)[i];
    case VLM_BF16: return vlm_bf16_to_f32(((const uint16_t *)t->data)[i]);
    case VLM_F16: return vlm_f16_to_f32(((const uint16_t *)t->data)[i]);
    default: VLM_ASSERT(!"unsupported dtype");
    }
    return 0.0f;
}

static vlm_status get_vec(const vlm_ckpt *c, const char *prefix, const char *name, int64_t n,
                          float **out, char *err, size_t errlen) {
    vlm_tensor t;
    vlm_status st = get_t(c, prefix, name, n, 0, &t, err, errlen);
    if (st != VLM_OK) return st;
    float *v = malloc((size_t)n * sizeof(float));
    if (!v) return vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
    for (int64_t i = 0; i < n; i++) v[i] = t_at(&t, i);
    *out = v;
    return VLM_OK;
}

void vlm_vit_free(vlm_vit *v) {
    if (!v) return;
    if (v->blocks)
        for (int i = 0; i < v->vc.depth; i++) {
            free(v->blocks[i].n1w);
            free(v->blocks[i].n1b);
            free(v->blocks[i].n2w);
            free(v->blocks[i].n2b);
        }
    free(v->blocks);
    free(v->lnq_w);
    free(v->lnq_b);
    free(v->inv_freq);
    free(v);
}

vlm_status vlm_vit_load(const vlm_model *m, vlm_vit **out, char *err, size_t errlen) {
    *out = NULL;
    const vlm_model_config *cfg = vlm_model_cfg(m);
    const vlm_ckpt *ck = vlm_model_ckpt(m);
    if (!cfg->has_vision)
        return vis_err(err, errlen, VLM_E_UNSUPPORTED, "model has no vision tower");
    const vlm_vision_config *vc = &cfg->vision;
    const char *prefix = "visual.";
    if (!find_t(ck, prefix, "patch_embed.proj.weight")) prefix = "model.visual.";
    if (!find_t(ck, prefix, "patch_embed.proj.weight"))
        return vis_err(err, errlen, VLM_E_FORMAT,
                       "checkpoint has neither visual.* nor model.visual.* vision weights");
    if (vc->embed_dim <= 0 || vc->num_heads <= 0 || vc->embed_dim % vc->num_heads ||
        (vc->embed_dim / vc->num_heads) % 4 || vc->depth <= 0 || vc->mlp_hidden <= 0 ||
        vc->spatial_merge_size <= 0 || vc->out_hidden <= 0)
        return vis_err(err, errlen, VLM_E_FORMAT,
                       "vision config: embed_dim %d, heads %d (head_dim must be a multiple of 4), depth %d",
                       vc->embed_dim, vc->num_heads, vc->depth);
    vlm_vit *v = calloc(1, sizeof *v);
    if (!v) return vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
    v->vc = *vc;
    v->E = vc->embed_dim;
    v->H = vc->num_heads;
    v->D = v->E / v->H;
    v->mlp = vc->mlp_hidden;
    v->pd = vc->in_channels * vc->temporal_patch_size * vc->patch_size * vc->patch_size;
    v->out_dim = vc->out_hidden;
    if (!strcmp(vc->hidden_act, "quick_gelu")) v->act_quick = 1;
    else if (!strcmp(vc->hidden_act, "gelu")) v->act_quick = 0;
    else {
        vlm_vit_free(v);
        return vis_err(err, errlen, VLM_E_UNSUPPORTED, "vision hidden_act \"%s\" not supported",
                       vc->hidden_act);
    }
    const int E = v->E, M2 = vc->spatial_merge_size * vc->spatial_merge_size;
    vlm_status st = get_t(ck, prefix, "patch_embed.proj.weight", E, v->pd, &v->patch_w, err, errlen);
    v->blocks = calloc((size_t)vc->depth, sizeof *v->blocks);
    if (!v->blocks && st == VLM_OK) st = vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
    for (int i = 0; i < vc->depth && st == VLM_OK; i++) {
        vit_block *b = &v->blocks[i];
        char p[96];
        snprintf(p, sizeof p, "%sblocks.%d.", prefix, i);
        if (st == VLM_OK) st = get_vec(ck, p, "norm1.weight", E, &b->n1w, err, errlen);
        if (st == VLM_OK) st = get_vec(ck, p, "norm1.bias", E, &b->n1b, err, errlen);
        if (st == VLM_OK) st = get_vec(ck, p, "norm2.weight", E, &b->n2w, err, errlen);
        if (st == VLM_OK) st = get_vec(ck, p, "norm2.bias", E, &b->n2b, err, errlen);
        if (st == VLM_OK) st = get_t(ck, p, "attn.qkv.weight", 3 * E, E, &b->qkv_w, err, errlen);
        if (st == VLM_OK) st = get_t(ck, p, "attn.qkv.bias", 3 * E, 0, &b->qkv_b, err, errlen);
        if (st == VLM_OK) st = get_t(ck, p, "attn.proj.weight", E, E, &b->proj_w, err, errlen);
        if (st == VLM_OK) st = get_t(ck, p, "attn.proj.bias", E, 0, &b->proj_b, err, errlen);
        if (st == VLM_OK) st = get_t(ck, p, "mlp.fc1.weight", v->mlp, E, &b->fc1_w, err, errlen);
        if (st == VLM_OK) st = get_t(ck, p, "mlp.fc1.bias", v->mlp, 0, &b->fc1_b, err, errlen);
        if (st == VLM_OK) st = get_t(ck, p, "mlp.fc2.weight", E, v->mlp, &b->fc2_w, err, errlen);
        if (st == VLM_OK) st = get_t(ck, p, "mlp.fc2.bias", E, 0, &b->fc2_b, err, errlen);
    }
    if (st == VLM_OK) st = get_vec(ck, prefix, "merger.ln_q.weight", E, &v->lnq_w, err, errlen);
    if (st == VLM_OK) st = get_vec(ck, prefix, "merger.ln_q.bias", E, &v->lnq_b, err, errlen);
    if (st == VLM_OK)
        st = get_t(ck, prefix, "merger.mlp.0.weight", (int64_t)E * M2, (int64_t)E * M2, &v->m0_w, err, errlen);
    if (st == VLM_OK) st = get_t(ck, prefix, "merger.mlp.0.bias", (int64_t)E * M2, 0, &v->m0_b, err, errlen);
    if (st == VLM_OK)
        st = get_t(ck, prefix, "merger.mlp.2.weight", v->out_dim, (int64_t)E * M2, &v->m2_w, err, errlen);
    if (st == VLM_OK) st = get_t(ck, prefix, "merger.mlp.2.bias", v->out_dim, 0, &v->m2_b, err, errlen);
    if (st == VLM_OK) {
        /* HF VisionRotaryEmbedding(dim = head_dim/2): inv_freq = 1 / θ^(arange(0, dim, 2)/dim),
         * every step in f32. */
        int rd = v->D / 2, nf = rd / 2;
        v->inv_freq = malloc((size_t)nf * sizeof(float));
        if (!v->inv_freq) st = vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
        else
            for (int j = 0; j < nf; j++)
                v->inv_freq[j] = 1.0f / powf(VIT_ROPE_THETA, (float)(2 * j) / (float)rd);
    }
    if (st != VLM_OK) {
        vlm_vit_free(v);
        return st;
    }
    *out = v;
    return VLM_OK;
}

/* y[n, E] = LayerNorm(x) with weight/bias; statistics accumulated in double. */
static void layer_norm(const float *x, int64_t n, int E, const float *w, const float *b, float *y) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xr = x + i * E;
        double s = 0, ss = 0;
        for (int j = 0; j < E; j++) s += xr[j];
        double mean = s / E;
        for (int j = 0; j < E; j++) ss += (xr[j] - mean) * (xr[j] - mean);
        float r = (float)(1.0 / sqrt(ss / E + (double)VIT_LN_EPS));
        float mf = (float)mean;
        float *yr = y + i * E;
        for (int j = 0; j < E; j++) yr[j] = (xr[j] - mf) * r * w[j] + b[j];
    }
}

/* Rotates q and k of every head in place (SPEC §D.4). qkv: [n, 3E]; rc: [n][2] = (row, col). */
static void apply_rope(const vlm_vit *v, float *qkv, int64_t n, const int32_t *rc) {
    const int E = v->E, D = v->D, half = D / 2, nf = D / 4;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float cs[256], sn[256]; /* half <= 256 is checked by the caller */
        for (int j = 0; j < half; j++) {
            int pos = j < nf ? rc[2 * i] : rc[2 * i + 1];
            float a = (float)pos * v->inv_freq[j % nf];
            cs[j] = cosf(a);
            sn[j] = sinf(a);
        }
        for (int part = 0; part < 2; part++) /* q, then k */
            for (int h = 0; h < v->H; h++) {
                float *p = qkv + i * 3 * E + (int64_t)part * E + (int64_t)h * D;
                for (int j = 0; j < half; j++) {
                    float a = p[j], b = p[j + half];
                    p[j] = a * cs[j] - b * sn[j];
                    p[j + half] = b * cs[j] + a * sn[j];
                }
            }
    }
}

/* out rows [s0, s0+L) = softmax(Q Kᵀ · scale) V per head, for one segment (no mask), with the
 * runtime's blocked attention (runtime/cpu_attn.c): Q, K, V are read in place from the fused qkv
 * rows [q | k | v] and the [L, L] scores are never materialised (L is 9,216 for 1344x1344). */
static vlm_status attention_segment(const vlm_vit *v, const float *qkv, int64_t s0, int64_t L,
                                    float *out) {
    const int64_t E = v->E;
    const float *base = qkv + s0 * 3 * E;
    /* bf16 weights: the products in bf16 as the linears do (AMX / AVX512_BF16 where they run) */
    (v->blocks[0].qkv_w.dtype == VLM_BF16 ? vlm_attention_bf16 : vlm_attention_f32)(
        L, L, v->H, v->H, v->D, base, 3 * E, base + E, 3 * E, base + 2 * E, 3 * E, 1.0f / sqrtf((float)v->D), -1,
        out + s0 * E, E);
    return VLM_OK;
}

static inline float quick_gelu(float z) { return z / (1.0f + expf(-1.702f * z)); }
static inline float gelu_erf(float z) { return 0.5f * z * (1.0f + erff(z * (float)M_SQRT1_2)); }

/* An encode in progress: the residual stream x after `layer` blocks, and the buffers the next
 * block needs. Lets the server run the encoder a block at a time between decode steps. */
struct vlm_vit_job {
    const vlm_vit *v;
    float *out;
    int64_t N, gt, seg;
    int layer;
    float *x, *h, *a, *buf;
    int32_t *rc;
};

void vlm_vit_job_free(vlm_vit_job *j) {
    if (!j) return;
    free(j->x);
    free(j->h);
    free(j->a);
    free(j->buf);
    free(j->rc);
    free(j);
}

vlm_status vlm_vit_job_begin(const vlm_vit *v, const vlm_pixels *px, float *out, vlm_vit_job **job, char *err,
                             size_t errlen) {
    *job = NULL;
    const int E = v->E, Mg = v->vc.spatial_merge_size, M2 = Mg * Mg;
    const int64_t gt = px->grid_thw[0], gh = px->grid_thw[1], gw = px->grid_thw[2];
    const int64_t N = px->n_patches, seg = gh * gw;
    if (px->patch_dim != v->pd || gt <= 0 || gh <= 0 || gw <= 0 || gh % Mg || gw % Mg ||
        N != gt * seg || px->n_tokens * M2 != N)
        return vis_err(err, errlen, VLM_E_INVALID,
                       "pixel_values [%lld, %lld] do not match grid (%lld,%lld,%lld) / patch dim %d",
                       (long long)N, (long long)px->patch_dim, (long long)gt, (long long)gh,
                       (long long)gw, v->pd);
    if (v->D / 2 > 256) return vis_err(err, errlen, VLM_E_UNSUPPORTED, "vision head_dim %d too large", v->D);

    const int64_t big = (int64_t)(v->mlp > 3 * E ? v->mlp : 3 * E);
    vlm_vit_job *j = calloc(1, sizeof *j);
    if (!j) return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for a vision encode");
    *j = (vlm_vit_job){v, out, N, gt, seg, 0, NULL, NULL, NULL, NULL, NULL};
    j->x = malloc((size_t)N * E * sizeof(float));
    j->h = malloc((size_t)N * E * sizeof(float));
    j->a = malloc((size_t)N * E * sizeof(float));
    j->buf = malloc((size_t)N * big * sizeof(float));
    j->rc = malloc((size_t)N * 2 * sizeof(int32_t));
    if (!j->x || !j->h || !j->a || !j->buf || !j->rc) {
        vlm_vit_job_free(j);
        return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for %lld vision patches", (long long)N);
    }
    /* (row, col) of each pixel_values row: merge-window order, repeated per temporal slice. */
    for (int64_t k = 0; k < N; k++) {
        int64_t kk = k % seg, win = kk / M2, inw = kk % M2, bwn = gw / Mg;
        j->rc[2 * k] = (int32_t)((win / bwn) * Mg + inw / Mg);
        j->rc[2 * k + 1] = (int32_t)((win % bwn) * Mg + inw % Mg);
    }
    /* x: [N, E] = pixel_values · W_pᵀ (Conv3d with kernel = stride, no bias) */
    vlm_linear(px->pixel_values, N, v->pd, &v->patch_w, NULL, j->x);
    *job = j;
    return VLM_OK;
}

vlm_status vlm_vit_job_run(vlm_vit_job *j, int max_blocks, bool *done, char *err, size_t errlen) {
    const vlm_vit *v = j->v;
    const int E = v->E, Mg = v->vc.spatial_merge_size, M2 = Mg * Mg;
    const int64_t N = j->N, gt = j->gt, seg = j->seg;
    float *x = j->x, *h = j->h, *a = j->a, *buf = j->buf;
    vlm_status st = VLM_OK;
    *done = false;
    for (int ran = 0; j->layer < v->vc.depth && (max_blocks <= 0 || ran < max_blocks); j->layer++, ran++) {
        const vit_block *b = &v->blocks[j->layer];
        layer_norm(x, N, E, b->n1w, b->n1b, h);              /* h: [N, E] */
        vlm_linear(h, N, E, &b->qkv_w, &b->qkv_b, buf);      /* buf: [N, 3E] = [q | k | v] */
        apply_rope(v, buf, N, j->rc);
        for (int64_t t = 0; t < gt && st == VLM_OK; t++)     /* cu_seqlens: one segment per slice */
            st = attention_segment(v, buf, t * seg, seg, a); /* a: [N, E] */
        if (st != VLM_OK) return vis_err(err, errlen, st, "out of memory in vision attention");
        vlm_linear(a, N, E, &b->proj_w, &b->proj_b, h);      /* h: [N, E] */
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < N * E; i++) x[i] += h[i];
        layer_norm(x, N, E, b->n2w, b->n2b, h);
        vlm_linear(h, N, E, &b->fc1_w, &b->fc1_b, buf);      /* buf: [N, mlp] */
        const int64_t nm = N * (int64_t)v->mlp;
        if (v->act_quick) {
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < nm; i++) buf[i] = quick_gelu(buf[i]);
        } else {
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < nm; i++) buf[i] = gelu_erf(buf[i]);
        }
        vlm_linear(buf, N, v->mlp, &b->fc2_w, &b->fc2_b, h); /* h: [N, E] */
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < N * E; i++) x[i] += h[i];
    }
    if (j->layer < v->vc.depth) return VLM_OK;
    /* PatchMerger: ln_q, then each M² consecutive rows (one window) form one [M²·E] row. */
    layer_norm(x, N, E, v->lnq_w, v->lnq_b, h);              /* h: [N/M², M²E] */
    const int64_t nt = N / M2, w4 = (int64_t)E * M2;
    float *m1 = a; /* [nt, M²E] fits in a ([N, E]) */
    vlm_linear(h, nt, w4, &v->m0_w, &v->m0_b, m1);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nt * w4; i++) m1[i] = gelu_erf(m1[i]);
    vlm_linear(m1, nt, w4, &v->m2_w, &v->m2_b, j->out);      /* out: [nt, out_hidden] */
    *done = true;
    return VLM_OK;
}

vlm_status vlm_vit_encode(const vlm_vit *v, const vlm_pixels *px, float *out, char *err,
                          size_t errlen) {
    vlm_vit_job *j;
    vlm_status st = vlm_vit_job_begin(v, px, out, &j, err, errlen);
    if (st != VLM_OK) return st;
    bool done;
    st = vlm_vit_job_run(j, 0, &done, err, errlen);
    vlm_vit_job_free(j);
    return st;
}
