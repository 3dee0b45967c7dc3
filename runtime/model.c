/* model.c — vlm_model_load: opens the checkpoint, parses the configs, binds the decoder weights under
 * either naming (SPEC §A.4), resolves the tied/untied LM head (§A.5) and checks every expected tensor's
 * presence, dtype and shape before anything runs. Weights stay in the mmap in their stored dtype unless
 * convert_f32 asks for f32 copies. */
#include "runtime/rt_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    vlm_model *m;
    const char *prefix; /* "model." or "model.language_model." */
    bool convert;
    int n_cap;
    char *err;
    size_t errlen;
} binder;

/* Finds `prefix + suffix`, checks dtype family and shape, returns a tensor the model may use. */
static vlm_status bind(binder *b, const char *suffix, int64_t d0, int64_t d1, vlm_tensor **out) {
    char name[256];
    snprintf(name, sizeof name, "%s%s", b->prefix, suffix);
    const vlm_tensor *t = vlm_ckpt_find(b->m->ckpt, name);
    if (!t) return vlm_errf(b->err, b->errlen, VLM_E_FORMAT, "%s: tensor %s is missing", b->m->dir, name);
    if (t->dtype != VLM_F32 && t->dtype != VLM_BF16 && t->dtype != VLM_F16)
        return vlm_errf(b->err, b->errlen, VLM_E_FORMAT, "%s: tensor %s has dtype %s (want F32, BF16 or F16)",
                        b->m->dir, name, vlm_dtype_name(t->dtype));
    int nd = d1 > 0 ? 2 : 1;
    if (t->ndim != nd || t->shape[0] != d0 || (nd == 2 && t->shape[1] != d1))
        return vlm_errf(b->err, b->errlen, VLM_E_FORMAT, "%s: tensor %s has shape [%lld%s%lld] (ndim %d), expected [%lld%s%lld]",
                        b->m->dir, name, (long long)t->shape[0], t->ndim > 1 ? ", " : "",
                        t->ndim > 1 ? (long long)t->shape[1] : 0LL, t->ndim, (long long)d0, nd == 2 ? ", " : "",
                        nd == 2 ? (long long)d1 : 0LL);
    vlm_model *m = b->m;
    VLM_ASSERT(m->n_owned < b->n_cap);
    vlm_tensor *o = &m->owned[m->n_owned++];
    *o = *t;
    if (b->convert && t->dtype != VLM_F32) {
        int64_t n = vlm_tensor_numel(t);
        float *f = malloc((size_t)n * sizeof(float));
        if (!f) return vlm_errf(b->err, b->errlen, VLM_E_NOMEM, "out of memory converting %s to f32", name);
        const uint16_t *h = t->data;
        for (int64_t i = 0; i < n; i++) f[i] = t->dtype == VLM_BF16 ? vlm_bf16_to_f32(h[i]) : vlm_f16_to_f32(h[i]);
        o->data = f;
        o->dtype = VLM_F32;
        o->nbytes = (size_t)n * sizeof(float);
        o->shape[VLM_MAX_DIMS - 1] = -1; /* marks an owned buffer (shape slots past ndim are unused) */
    }
    *out = o;
    return VLM_OK;
}

static bool same_tensor_values(const vlm_tensor *a, const vlm_tensor *b) {
    return a->dtype == b->dtype && a->nbytes == b->nbytes && !memcmp(a->data, b->data, a->nbytes);
}

vlm_status vlm_model_load(const char *dir, const vlm_load_opts *opts, vlm_model **out, char *err, size_t errlen) {
    *out = NULL;
    vlm_load_opts def = {0};
    if (!opts) opts = &def;
    vlm_model *m = calloc(1, sizeof *m);
    if (!m) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    m->dir = strdup(dir);
    vlm_status st = vlm_config_parse(dir, &m->cfg, &m->gen, err, errlen);
    if (st == VLM_OK) st = vlm_ckpt_open(dir, &m->ckpt, err, errlen);
    if (st) { vlm_model_free(m); return st; }
    vlm_cpu_init(opts->threads);
    const vlm_model_config *c = &m->cfg;
    int L = c->n_layers;
    int cap = 3 + 12 * L;
    m->owned = calloc((size_t)cap, sizeof *m->owned);
    m->w.layers = calloc((size_t)L, sizeof *m->w.layers);
    if (!m->owned || !m->w.layers) { vlm_model_free(m); return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory"); }
    binder b = {m, "model.language_model.", opts->convert_f32, cap, err, errlen};
    if (!vlm_ckpt_find(m->ckpt, "model.language_model.embed_tokens.weight")) b.prefix = "model.";
    /* NVLM-D: NVLM_D_Model.language_model is a Qwen2ForCausalLM -> language_model.model.* / language_model.lm_head */
    if (c->arch == VLM_ARCH_NVLM_D) b.prefix = "language_model.model.";
    int64_t H = c->hidden, q = (int64_t)c->n_heads * c->head_dim, kv = (int64_t)c->n_kv_heads * c->head_dim;
    int64_t F = c->intermediate;
    st = bind(&b, "embed_tokens.weight", c->vocab, H, &m->w.embed);
    if (!st) st = bind(&b, "norm.weight", H, 0, &m->w.final_norm);
    for (int l = 0; l < L && !st; l++) {
        struct vlm_layer *ly = &m->w.layers[l];
        char s[128];
#define B(field, suf, d0, d1) \
    if (!st) { snprintf(s, sizeof s, "layers.%d.%s", l, suf); st = bind(&b, s, d0, d1, &ly->field); }
        B(in_norm, "input_layernorm.weight", H, 0)
        B(post_norm, "post_attention_layernorm.weight", H, 0)
        B(q, "self_attn.q_proj.weight", q, H)
        B(k, "self_attn.k_proj.weight", kv, H)
        B(v, "self_attn.v_proj.weight", kv, H)
        B(qb, "self_attn.q_proj.bias", q, 0)
        B(kb, "self_attn.k_proj.bias", kv, 0)
        B(vb, "self_attn.v_proj.bias", kv, 0)
        B(o, "self_attn.o_proj.weight", H, q)
        B(gate, "mlp.gate_proj.weight", F, H)
        B(up, "mlp.up_proj.weight", F, H)
        B(down, "mlp.down_proj.weight", H, F)
#undef B
    }
    if (!st) {
        const vlm_tensor *lm = vlm_ckpt_find(m->ckpt, "lm_head.weight");
        if (c->tie_embeddings) {
            m->w.lm_head = m->w.embed;
            if (lm && !same_tensor_values(lm, vlm_ckpt_find(m->ckpt, b.prefix[6] == 'l'
                                                                         ? "model.language_model.embed_tokens.weight"
                                                                         : "model.embed_tokens.weight")))
                fprintf(stderr, "vlmd: warning: %s: tie_word_embeddings is true but lm_head.weight differs from "
                                "embed_tokens; using embed_tokens (as transformers does)\n", dir);
        } else {
            b.prefix = c->arch == VLM_ARCH_NVLM_D ? "language_model." : "";
            st = bind(&b, "lm_head.weight", c->vocab, H, &m->w.lm_head);
        }
    }
    if (!st && c->weight_dtype != m->w.layers[0].q->dtype && !opts->convert_f32) m->cfg.weight_dtype = m->w.layers[0].q->dtype;
    if (st) { vlm_model_free(m); return st; }
    int half = c->head_dim / 2;
    m->inv_freq = malloc((size_t)half * sizeof(float));
    if (!m->inv_freq) { vlm_model_free(m); return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory"); }
    /* HF: inv_freq = 1 / theta ** (arange(0, dim, 2).float() / dim), all f32 (pow in f32) */
    for (int j = 0; j < half; j++) m->inv_freq[j] = 1.0f / powf(c->rope_theta, (float)(2 * j) / (float)c->head_dim);
    *out = m;
    return VLM_OK;
}

void vlm_model_free(vlm_model *m) {
    if (!m) return;
    for (int i = 0; i < m->n_owned; i++)
        if (m->owned[i].shape[VLM_MAX_DIMS - 1] == -1) free(m->owned[i].data);
    free(m->owned);
    free(m->w.layers);
    free(m->inv_freq);
    vlm_ckpt_close(m->ckpt);
    free(m->dir);
    free(m);
}

const vlm_model_config *vlm_model_cfg(const vlm_model *m) { return &m->cfg; }
const vlm_gen_defaults *vlm_model_gen_defaults(const vlm_model *m) { return &m->gen; }
const vlm_ckpt *vlm_model_ckpt(const vlm_model *m) { return m->ckpt; }
const char *vlm_model_dir(const vlm_model *m) { return m->dir; }
