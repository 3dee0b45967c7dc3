/* config.c — reads config.json (Qwen2-VL old flat and new nested layouts, plain Qwen2),
 * generation_config.json and preprocessor_config.json into vlm_model_config / vlm_gen_defaults.
 * SPEC §A.3, §A.6, §A.7, §E.2. Every decoder value is read from the file (class defaults of the decoder
 * describe 72B and are never used); the vision config falls back to the class defaults of §A.3. */
#include "runtime/rt_internal.h"

#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static cJSON *read_json(const char *dir, const char *name, bool required, vlm_status *st, char *err,
                        size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    *st = VLM_OK;
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (required) *st = vlm_errf(err, errlen, VLM_E_IO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (len < 0 || len > (16l << 20)) {
        fclose(f);
        *st = vlm_errf(err, errlen, VLM_E_FORMAT, "%s: unreasonable size", path);
        return NULL;
    }
    char *buf = malloc((size_t)len + 1);
    if (!buf) { fclose(f); *st = VLM_E_NOMEM; return NULL; }
    size_t got = fread(buf, 1, (size_t)len, f);
    fclose(f);
    buf[got] = 0;
    cJSON *j = cJSON_ParseWithLength(buf, got);
    free(buf);
    if (!j || !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        *st = vlm_errf(err, errlen, VLM_E_FORMAT, "%s: not a JSON object", path);
        return NULL;
    }
    return j;
}

static const cJSON *get(const cJSON *o, const char *k) { return o ? cJSON_GetObjectItemCaseSensitive(o, k) : NULL; }

/* text key lookup: text_config.<k> (Qwen2-VL new layout), llm_config.<k> (NVLM-D), else top-level <k> */
static const cJSON *tkey(const cJSON *root, const char *k) {
    const cJSON *v = get(get(root, "text_config"), k);
    if (!v) v = get(get(root, "llm_config"), k);
    return v ? v : get(root, k);
}

static bool num(const cJSON *j, double *out);
static int opt_int(const cJSON *o, const char *k, int def);

static bool names_arch(const cJSON *archs, const char *name) {
    if (!cJSON_IsArray(archs)) return false;
    for (const cJSON *x = archs->child; x; x = x->next)
        if (cJSON_IsString(x) && !strcmp(x->valuestring, name)) return true;
    return false;
}

/* NVLM-D top-level keys + InternViT vision_config. Defaults are NVLM_D_Config's class defaults; the
 * shipped nvidia/NVLM-D-72B config.json overrides ps_version "v2" and use_thumbnail true. */
static vlm_status parse_nvlm(const cJSON *root, vlm_model_config *c, const char *dir, char *err, size_t errlen) {
    const cJSON *llm = get(root, "llm_config");
    /* the shipped llm_config says model_type "llama" next to Qwen2ForCausalLM: the modeling code picks the
     * class from architectures[0], so do we */
    if (!cJSON_IsObject(llm) || !names_arch(get(llm, "architectures"), "Qwen2ForCausalLM"))
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED,
                        "%s/config.json: NVLM-D llm_config must name architectures [\"Qwen2ForCausalLM\"]", dir);
    double d;
    c->nvlm.image_size = opt_int(root, "force_image_size", 0);
    const cJSON *vc = get(root, "vision_config");
    if (c->nvlm.image_size <= 0) c->nvlm.image_size = opt_int(vc, "image_size", 448);
    c->nvlm.min_tiles = opt_int(root, "min_dynamic_patch", 1);
    c->nvlm.max_tiles = opt_int(root, "max_dynamic_patch", 6);
    const cJSON *th = get(root, "use_thumbnail");
    c->nvlm.use_thumbnail = th ? cJSON_IsTrue(th) : false;
    const cJSON *dy = get(root, "dynamic_image_size");
    c->nvlm.dynamic_image_size = dy ? cJSON_IsTrue(dy) : false;
    const cJSON *ps = get(root, "ps_version");
    const char *psv = cJSON_IsString(ps) ? ps->valuestring : "v1";
    if (!strcmp(psv, "v1")) c->nvlm.ps_version = 1;
    else if (!strcmp(psv, "v2")) c->nvlm.ps_version = 2;
    else return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "%s/config.json: ps_version \"%s\" (v1, v2)", dir, psv);
    c->nvlm.select_layer = num(get(root, "select_layer"), &d) ? (int)d : -1;
    c->nvlm.downsample_ratio = num(get(root, "downsample_ratio"), &d) ? (float)d : 0.5f;
    c->nvlm.vit_layers = opt_int(vc, "num_hidden_layers", 45);
    c->nvlm.vit_hidden = opt_int(vc, "hidden_size", 3200);
    c->nvlm.vit_heads = opt_int(vc, "num_attention_heads", 25);
    c->nvlm.vit_intermediate = opt_int(vc, "intermediate_size", 12800);
    c->nvlm.vit_patch = opt_int(vc, "patch_size", 14);
    c->nvlm.vit_norm_eps = num(get(vc, "layer_norm_eps"), &d) ? (float)d : 1e-6f;
    const cJSON *nt = get(vc, "norm_type");
    c->nvlm.vit_rms_norm = !cJSON_IsString(nt) || !strcmp(nt->valuestring, "rms_norm");
    c->nvlm.vit_qk_norm = cJSON_IsTrue(get(vc, "qk_normalization"));
    c->nvlm.vit_qkv_bias = cJSON_IsTrue(get(vc, "qkv_bias"));
    const int S = c->nvlm.image_size, P = c->nvlm.vit_patch;
    /* only the 0.5 shuffle (2x2 patches -> 1 token) is implemented; the modeling code would accept others */
    if (c->nvlm.downsample_ratio != 0.5f)
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "%s/config.json: downsample_ratio %g (only 0.5)", dir,
                        (double)c->nvlm.downsample_ratio);
    if (S <= 0 || P <= 0 || S % P || (S / P) % 2 || c->nvlm.min_tiles < 1 || c->nvlm.max_tiles < c->nvlm.min_tiles ||
        c->nvlm.vit_layers <= 0 || c->nvlm.vit_hidden <= 0 || c->nvlm.vit_heads <= 0 ||
        c->nvlm.vit_hidden % c->nvlm.vit_heads || c->nvlm.vit_intermediate <= 0 ||
        c->nvlm.select_layer >= c->nvlm.vit_layers || c->nvlm.select_layer < -c->nvlm.vit_layers)
        return vlm_errf(err, errlen, VLM_E_FORMAT, "%s/config.json: inconsistent NVLM-D vision settings", dir);
    c->nvlm.tokens_per_tile = (S / P / 2) * (S / P / 2);
    return VLM_OK;
}

static bool num(const cJSON *j, double *out) {
    if (!cJSON_IsNumber(j)) return false;
    *out = j->valuedouble;
    return true;
}

static vlm_status need_int(const cJSON *root, const char *k, int *out, const char *path, char *err, size_t errlen) {
    double d;
    if (!num(tkey(root, k), &d) || d != (double)(int)d || d <= 0)
        return vlm_errf(err, errlen, VLM_E_FORMAT, "%s/config.json: %s missing or not a positive integer", path, k);
    *out = (int)d;
    return VLM_OK;
}

static int opt_int(const cJSON *o, const char *k, int def) {
    double d;
    return num(get(o, k), &d) ? (int)d : def;
}

static void add_eos(vlm_model_config *c, int32_t id) {
    for (int i = 0; i < c->n_eos; i++) if (c->eos_ids[i] == id) return;
    if (c->n_eos < 4) c->eos_ids[c->n_eos++] = id;
}

static void eos_from(vlm_model_config *c, const cJSON *e) {
    if (cJSON_IsNumber(e)) add_eos(c, (int32_t)e->valuedouble);
    else if (cJSON_IsArray(e))
        for (const cJSON *x = e->child; x; x = x->next) if (cJSON_IsNumber(x)) add_eos(c, (int32_t)x->valuedouble);
}

vlm_status vlm_config_parse(const char *dir, vlm_model_config *c, vlm_gen_defaults *g, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    vlm_status st;
    cJSON *root = read_json(dir, "config.json", true, &st, err, errlen);
    if (!root) return st;
    const cJSON *mt = get(root, "model_type");
    const char *model_type = cJSON_IsString(mt) ? mt->valuestring : "";
    if (!strcmp(model_type, "qwen2_vl")) c->arch = VLM_ARCH_QWEN2_VL;
    else if (!strcmp(model_type, "qwen2")) c->arch = VLM_ARCH_QWEN2;
    else if (!strcmp(model_type, "NVLM_D") || names_arch(get(root, "architectures"), "NVLM_D")) c->arch = VLM_ARCH_NVLM_D;
    else {
        cJSON_Delete(root);
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "%s/config.json: model_type \"%s\" is not supported (qwen2_vl, qwen2, NVLM_D)",
                        dir, model_type);
    }
    if ((st = need_int(root, "hidden_size", &c->hidden, dir, err, errlen)) ||
        (st = need_int(root, "intermediate_size", &c->intermediate, dir, err, errlen)) ||
        (st = need_int(root, "num_hidden_layers", &c->n_layers, dir, err, errlen)) ||
        (st = need_int(root, "num_attention_heads", &c->n_heads, dir, err, errlen)) ||
        (st = need_int(root, "vocab_size", &c->vocab, dir, err, errlen))) {
        cJSON_Delete(root);
        return st;
    }
    double d;
    c->n_kv_heads = num(tkey(root, "num_key_value_heads"), &d) ? (int)d : c->n_heads;
    c->head_dim = num(tkey(root, "head_dim"), &d) && d > 0 ? (int)d : c->hidden / c->n_heads;
    if (c->n_kv_heads <= 0 || c->n_heads % c->n_kv_heads || c->head_dim % 2 || c->head_dim > 1024 ||
        (!get(get(root, "text_config"), "head_dim") && !get(root, "head_dim") && c->hidden % c->n_heads)) {
        cJSON_Delete(root);
        return vlm_errf(err, errlen, VLM_E_FORMAT, "%s/config.json: inconsistent heads (%d q heads, %d kv heads, head_dim %d)",
                        dir, c->n_heads, c->n_kv_heads, c->head_dim);
    }
    if (!num(tkey(root, "rms_norm_eps"), &d)) {
        cJSON_Delete(root);
        return vlm_errf(err, errlen, VLM_E_FORMAT, "%s/config.json: rms_norm_eps missing", dir);
    }
    c->rms_eps = (float)d;
    c->max_position = num(tkey(root, "max_position_embeddings"), &d) ? (int)d : 32768;
    const cJSON *rp = tkey(root, "rope_parameters");
    const cJSON *rs = tkey(root, "rope_scaling");
    if (num(get(rp, "rope_theta"), &d) || num(tkey(root, "rope_theta"), &d)) c->rope_theta = (float)d;
    else c->rope_theta = 10000.0f; /* HF Qwen2 class default when the file omits it */
    const cJSON *sec = get(rp, "mrope_section");
    if (!sec) sec = get(rs, "mrope_section");
    if (sec) {
        int sum = 0;
        if (!cJSON_IsArray(sec) || cJSON_GetArraySize(sec) != 3) st = VLM_E_FORMAT;
        for (int i = 0; st == VLM_OK && i < 3; i++) {
            const cJSON *x = cJSON_GetArrayItem(sec, i);
            if (!cJSON_IsNumber(x) || x->valuedouble < 0) { st = VLM_E_FORMAT; break; }
            c->mrope_section[i] = (int)x->valuedouble;
            sum += c->mrope_section[i];
        }
        if (st == VLM_OK && sum * 2 != c->head_dim) st = VLM_E_FORMAT;
        if (st) {
            cJSON_Delete(root);
            return vlm_errf(err, errlen, st, "%s/config.json: mrope_section must be 3 non-negative ints summing to head_dim/2 (%d)",
                            dir, c->head_dim / 2);
        }
    }
    const cJSON *ty = get(rs, "type");
    if (!ty) ty = get(rs, "rope_type");
    if (!ty) ty = get(rp, "rope_type");
    /* NVLM-D's llm_config carries {"type": "dynamic", "factor": 3.0}: transformers' dynamic NTK scaling changes
     * inv_freq only once a sequence grows past max_position_embeddings, which the engine never allows (context
     * is capped at max_position), so it is plain RoPE here. */
    bool dyn_ok = c->arch == VLM_ARCH_NVLM_D && cJSON_IsString(ty) && !strcmp(ty->valuestring, "dynamic");
    if (cJSON_IsString(ty) && strcmp(ty->valuestring, "mrope") && strcmp(ty->valuestring, "default") && !dyn_ok) {
        cJSON_Delete(root);
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "%s/config.json: rope type \"%s\" not supported", dir,
                        ty->valuestring);
    }
    const cJSON *tie = get(root, "tie_word_embeddings");
    if (!tie) tie = tkey(root, "tie_word_embeddings");
    c->tie_embeddings = tie ? cJSON_IsTrue(tie) : false;
    const cJSON *sw = tkey(root, "use_sliding_window");
    if (cJSON_IsTrue(sw)) {
        cJSON_Delete(root);
        return vlm_errf(err, errlen, VLM_E_UNSUPPORTED, "%s/config.json: use_sliding_window true is not supported", dir);
    }
    c->bos_id = num(tkey(root, "bos_token_id"), &d) ? (int32_t)d : -1;
    c->image_token_id = opt_int(root, "image_token_id", 151655);
    c->video_token_id = opt_int(root, "video_token_id", 151656);
    c->vision_start_id = opt_int(root, "vision_start_token_id", 151652);
    c->vision_end_id = opt_int(root, "vision_end_token_id", 151653);
    eos_from(c, tkey(root, "eos_token_id"));
    const cJSON *dt = get(root, "torch_dtype");
    if (!dt) dt = get(root, "dtype");
    if (!dt) dt = tkey(root, "dtype");
    c->weight_dtype = VLM_F32;
    if (cJSON_IsString(dt)) {
        if (!strcmp(dt->valuestring, "bfloat16")) c->weight_dtype = VLM_BF16;
        else if (!strcmp(dt->valuestring, "float16")) c->weight_dtype = VLM_F16;
    }

    /* vision tower: class defaults of SPEC §A.3, overridden by whatever the file carries */
    const cJSON *vc = get(root, "vision_config");
    c->has_vision = c->arch == VLM_ARCH_QWEN2_VL || c->arch == VLM_ARCH_NVLM_D;
    if (c->arch == VLM_ARCH_NVLM_D) {
        if ((st = parse_nvlm(root, c, dir, err, errlen))) {
            cJSON_Delete(root);
            return st;
        }
        /* IMG_CONTEXT is <|vision_pad|> (modeling_nvlm_d.py chat()); 151654 in the Qwen2 vocabulary. The
         * server looks the id up in the tokenizer; this is the fallback. <Image>/</Image> are plain text. */
        c->image_token_id = opt_int(root, "image_token_id", 151654);
        c->video_token_id = c->vision_start_id = c->vision_end_id = -1;
    } else if (c->has_vision) {
        vlm_vision_config *v = &c->vision;
        v->depth = opt_int(vc, "depth", 32);
        v->embed_dim = opt_int(vc, "embed_dim", 1280);
        v->num_heads = opt_int(vc, "num_heads", 16);
        int ratio = opt_int(vc, "mlp_ratio", 4);
        v->mlp_hidden = v->embed_dim * ratio;
        v->in_channels = opt_int(vc, "in_channels", 3);
        v->patch_size = opt_int(vc, "patch_size", 14);
        v->temporal_patch_size = opt_int(vc, "temporal_patch_size", 2);
        v->spatial_merge_size = opt_int(vc, "spatial_merge_size", 2);
        int vh = opt_int(vc, "hidden_size", -1);
        if (vh > 0 && vh != c->hidden) {
            cJSON_Delete(root);
            return vlm_errf(err, errlen, VLM_E_FORMAT, "%s/config.json: vision_config.hidden_size %d != decoder hidden_size %d",
                            dir, vh, c->hidden);
        }
        v->out_hidden = c->hidden;
        const cJSON *act = get(vc, "hidden_act");
        snprintf(v->hidden_act, sizeof v->hidden_act, "%s", cJSON_IsString(act) ? act->valuestring : "quick_gelu");
        if (v->depth <= 0 || v->embed_dim <= 0 || v->num_heads <= 0 || v->embed_dim % v->num_heads ||
            v->patch_size <= 0 || v->temporal_patch_size <= 0 || v->spatial_merge_size <= 0) {
            cJSON_Delete(root);
            return vlm_errf(err, errlen, VLM_E_FORMAT, "%s/config.json: inconsistent vision_config", dir);
        }
    }
    cJSON_Delete(root);

    /* generation_config.json (optional): unset values stay "unset" (temperature < 0, others neutral) */
    g->temperature = -1.0f;
    g->top_p = 1.0f;
    g->min_p = 0.0f;
    g->repetition_penalty = 1.0f;
    g->top_k = 0;
    g->do_sample = false;
    cJSON *gj = read_json(dir, "generation_config.json", false, &st, err, errlen);
    if (st) return st;
    if (gj) {
        if (num(get(gj, "temperature"), &d)) g->temperature = (float)d;
        if (num(get(gj, "top_p"), &d)) g->top_p = (float)d;
        if (num(get(gj, "min_p"), &d)) g->min_p = (float)d;
        if (num(get(gj, "repetition_penalty"), &d)) g->repetition_penalty = (float)d;
        if (num(get(gj, "top_k"), &d)) g->top_k = (int)d;
        g->do_sample = cJSON_IsTrue(get(gj, "do_sample"));
        eos_from(c, get(gj, "eos_token_id"));
        cJSON_Delete(gj);
    }

    /* preprocessor_config.json (optional): class defaults of SPEC §E.2 when absent */
    c->min_pixels = 56 * 56;
    c->max_pixels = 28 * 28 * 1280;
    static const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    static const float stdv[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    /* NVLM-D: IMAGENET_MEAN/STD of the model card's build_transform; it ships no preprocessor_config.json */
    static const float in_mean[3] = {0.485f, 0.456f, 0.406f};
    static const float in_std[3] = {0.229f, 0.224f, 0.225f};
    bool nv = c->arch == VLM_ARCH_NVLM_D;
    memcpy(c->image_mean, nv ? in_mean : mean, sizeof mean);
    memcpy(c->image_std, nv ? in_std : stdv, sizeof stdv);
    cJSON *pj = read_json(dir, "preprocessor_config.json", false, &st, err, errlen);
    if (st) return st;
    if (pj) {
        if (num(get(pj, "min_pixels"), &d)) c->min_pixels = (int64_t)d;
        if (num(get(pj, "max_pixels"), &d)) c->max_pixels = (int64_t)d;
        const cJSON *sz = get(pj, "size");
        if (num(get(sz, "shortest_edge"), &d) && !get(pj, "min_pixels")) c->min_pixels = (int64_t)d;
        if (num(get(sz, "longest_edge"), &d) && !get(pj, "max_pixels")) c->max_pixels = (int64_t)d;
        const cJSON *m = get(pj, "image_mean"), *s = get(pj, "image_std");
        for (int i = 0; i < 3; i++) {
            if (cJSON_IsNumber(cJSON_GetArrayItem(m, i))) c->image_mean[i] = (float)cJSON_GetArrayItem(m, i)->valuedouble;
            if (cJSON_IsNumber(cJSON_GetArrayItem(s, i))) c->image_std[i] = (float)cJSON_GetArrayItem(s, i)->valuedouble;
        }
        cJSON_Delete(pj);
    }
    return VLM_OK;
}
