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
 * Tensor-parallel sharding of the heads is not done here (docs/nvlm.md). */
#include <math.h>
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
};

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

/* Encodes one tile; writes the (S/P/2)^2 projected tokens to out. */
static vlm_status encode_tile(const vlm_internvit *v, const float *tile, float *out, char *err, size_t errlen) {
    const int E = v->E, G = v->S / v->P, N = 1 + G * G, P = v->P, S = v->S, HP = v->HP, D = v->D;
    const int64_t QD = (int64_t)HP * D, pd = 3ll * P * P;
    float *x = malloc(sizeof(float) * (size_t)N * E);
    float *h = malloc(sizeof(float) * (size_t)N * (size_t)(v->F > 3 * QD ? v->F : 3 * QD));
    int64_t aw = E;
    if (pd > aw) aw = pd;
    if (QD > aw) aw = QD;
    float *a = malloc(sizeof(float) * (size_t)N * (size_t)aw);
    float *sc = malloc(sizeof(float) * (size_t)N * N);
    float *o = malloc(sizeof(float) * (size_t)N * E);
    if (!x || !h || !a || !sc || !o) {
        free(x); free(h); free(a); free(sc); free(o);
        return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for an InternViT tile");
    }
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
    for (int l = 0; l < v->n_run; l++) {
        const ivit_layer *y = &v->layers[l];
        rms_norm(x, N, E, y->n1, v->eps, a);
        vlm_linear(a, N, E, &y->qkv_w, y->has_qkv_b ? &y->qkv_b : NULL, h); /* [N, 3*QD]: q | k | v */
        if (v->qk_norm)
            for (int64_t r = 0; r < N; r++)
                for (int part = 0; part < 2; part++) {
                    float *q = h + r * 3 * QD + part * QD;
                    const float *w = part ? y->kn : y->qn;
                    float ss = 0;
                    for (int i = 0; i < E; i++) ss += q[i] * q[i]; /* real heads only */
                    float inv = 1.0f / sqrtf(ss / (float)E + v->eps);
                    for (int64_t i = 0; i < QD; i++) q[i] = q[i] * inv * w[i];
                }
        for (int64_t r = 0; r < N; r++)
            for (int64_t i = 0; i < QD; i++) h[r * 3 * QD + i] *= scale;
        for (int hd = 0; hd < HP; hd++) {
            const float *q = h + (int64_t)hd * D, *k = h + QD + (int64_t)hd * D, *vv = h + 2 * QD + (int64_t)hd * D;
            vlm_gemm_f32(N, N, D, q, 3 * QD, k, 3 * QD, true, 0.0f, sc, N);
            for (int64_t r = 0; r < N; r++) {
                float *s = sc + r * N, mx = -INFINITY, sum = 0;
                for (int j = 0; j < N; j++) mx = fmaxf(mx, s[j]);
                for (int j = 0; j < N; j++) { s[j] = expf(s[j] - mx); sum += s[j]; }
                for (int j = 0; j < N; j++) s[j] /= sum;
            }
            vlm_gemm_f32(N, D, N, sc, N, vv, 3 * QD, false, 0.0f, a + (int64_t)hd * D, QD);
        }
        vlm_linear(a, N, QD, &y->proj_w, &y->proj_b, o);
        for (int64_t r = 0; r < N; r++)
            for (int i = 0; i < E; i++) x[r * E + i] += o[r * E + i] * y->ls1[i];
        rms_norm(x, N, E, y->n2, v->eps, a);
        vlm_linear(a, N, E, &y->fc1_w, &y->fc1_b, h);
        for (int64_t i = 0; i < (int64_t)N * v->F; i++) h[i] = gelu_erf(h[i]);
        vlm_linear(h, N, v->F, &y->fc2_w, &y->fc2_b, o);
        for (int64_t r = 0; r < N; r++)
            for (int i = 0; i < E; i++) x[r * E + i] += o[r * E + i] * y->ls2[i];
    }
    /* drop CLS; pixel shuffle: token (a2, b2) gathers x[2a2+i][2b2+j] at features (i*2 + j)*E + c.
     * v1 emits tokens in (b2, a2) order (the transposed grid), v2 in (a2, b2) order. */
    const int G2 = G / 2;
    const int64_t E4 = 4ll * E;
    free(h); free(a); free(sc); free(o);
    float *ps = malloc(sizeof(float) * (size_t)(G2 * G2) * (size_t)E4);
    if (!ps) {
        free(x);
        return vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
    }
    for (int a2 = 0; a2 < G2; a2++)
        for (int b2 = 0; b2 < G2; b2++) {
            int t = v->ps_version == 1 ? b2 * G2 + a2 : a2 * G2 + b2;
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++)
                    memcpy(ps + (int64_t)t * E4 + (int64_t)(i * 2 + j) * E,
                           x + (1 + (int64_t)(2 * a2 + i) * G + (2 * b2 + j)) * E, sizeof(float) * (size_t)E);
        }
    /* mlp1: LayerNorm(4E) (biased variance, eps 1e-5) -> Linear -> GELU -> Linear */
    const int64_t T = (int64_t)G2 * G2;
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
    float *mid = malloc(sizeof(float) * (size_t)T * (size_t)v->mlp_mid);
    if (!mid) {
        free(x); free(ps);
        return vis_err(err, errlen, VLM_E_NOMEM, "out of memory");
    }
    vlm_linear(ps, T, E4, &v->m1_w, NULL, mid);
    for (int64_t i = 0; i < T * v->mlp_mid; i++) mid[i] = gelu_erf(mid[i]);
    vlm_linear(mid, T, v->mlp_mid, &v->m3_w, NULL, out);
    free(mid); free(x); free(ps);
    return VLM_OK;
}

vlm_status vlm_internvit_encode(const vlm_internvit *v, const vlm_pixels *px, float *out, char *err, size_t errlen) {
    const int64_t tile_dim = 3ll * v->S * v->S, per = (int64_t)(v->S / v->P / 2) * (v->S / v->P / 2);
    if (px->patch_dim != tile_dim || px->n_tokens != px->n_patches * per)
        return vis_err(err, errlen, VLM_E_INVALID, "pixel_values are not %dx%d tiles", v->S, v->S);
    for (int64_t t = 0; t < px->n_patches; t++) {
        vlm_status st = encode_tile(v, px->pixel_values + t * tile_dim, out + t * per * v->out_dim, err, errlen);
        if (st) return st;
    }
    return VLM_OK;
}
