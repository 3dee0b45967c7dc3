/* qwen_fixture.h — shared by the C tests that replay the transformers fixtures of tools/make_fixtures.py
 * (tests/fixtures/qwen2vl/<model>/<case>/) on the checkpoints tools/make_model.py writes into
 * $VLMD_TEST_MODELS: case loading (prompt ids, image embeds, reference tokens), the sequence descriptor,
 * model loading and one greedy run of a case on a given backend and tp.
 * Header-only (static functions), like the other tests/unit helpers; include after npy_read.h. */
#ifndef VLMD_TEST_QWEN_FIXTURE_H
#define VLMD_TEST_QWEN_FIXTURE_H

#include "runtime/runtime.h"
#include "tests/unit/npy_read.h"
#include "tests/unit/test.h"

#include <cJSON.h>
#include <stdlib.h>

static const char *models_dir;
static const char *FIX = "tests/fixtures/qwen2vl";

static cJSON *load_json(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    size_t got = fread(b, 1, (size_t)n, f);
    b[got] = 0;
    fclose(f);
    cJSON *j = cJSON_Parse(b);
    free(b);
    return j;
}

static int32_t *ids_of(const cJSON *a, int64_t *n) {
    *n = cJSON_GetArraySize(a);
    int32_t *r = malloc((size_t)(*n > 0 ? *n : 1) * sizeof *r);
    int64_t i = 0;
    for (const cJSON *x = a->child; x; x = x->next) r[i++] = (int32_t)x->valuedouble;
    return r;
}

typedef struct {
    char dir[512];
    cJSON *j;
    int32_t *prompt;
    int64_t n_prompt;
    int n_images;
    vlm_image_embeds img[8];
    float *embeds;
    bool bf16;
} fcase;

static bool case_load(fcase *c, const char *model, const char *name) {
    memset(c, 0, sizeof *c);
    snprintf(c->dir, sizeof c->dir, "%s/%s/%s", FIX, model, name);
    char p[600];
    snprintf(p, sizeof p, "%s/case.json", c->dir);
    c->j = load_json(p);
    if (!c->j) return false;
    c->prompt = ids_of(cJSON_GetObjectItem(c->j, "prompt_ids"), &c->n_prompt);
    c->bf16 = !strcmp(cJSON_GetObjectItem(c->j, "dtype")->valuestring, "bf16");
    const cJSON *g = cJSON_GetObjectItem(c->j, "image_grid_thw");
    c->n_images = cJSON_GetArraySize(g);
    if (c->n_images) {
        /* a runtime computing in f32 takes the f32 reference embeddings of the bf16 model */
        snprintf(p, sizeof p, "%s/image_embeds%s.npy", c->dir, c->bf16 ? "_f32ref" : "");
        int64_t sh[4];
        int nd;
        c->embeds = npy_read_f32(p, sh, &nd);
        if (!c->embeds) return false;
        int64_t off = 0;
        for (int i = 0; i < c->n_images; i++) {
            const cJSON *t = cJSON_GetArrayItem(g, i);
            for (int k = 0; k < 3; k++) c->img[i].grid_thw[k] = (int32_t)cJSON_GetArrayItem(t, k)->valuedouble;
            c->img[i].n_tokens = (int64_t)c->img[i].grid_thw[0] * c->img[i].grid_thw[1] * c->img[i].grid_thw[2] / 4;
            c->img[i].embeds = c->embeds + off * sh[1];
            off += c->img[i].n_tokens;
        }
    }
    return true;
}

static void case_free(fcase *c) {
    cJSON_Delete(c->j);
    free(c->prompt);
    free(c->embeds);
}

static vlm_seq_desc desc_of(const fcase *c, int max_tokens) {
    vlm_seq_desc d = {0};
    d.prompt = c->prompt;
    d.n_prompt = c->n_prompt;
    d.images = c->n_images ? c->img : NULL;
    d.n_images = c->n_images;
    vlm_sampling_default(&d.sampling);
    d.max_tokens = max_tokens;
    d.ignore_eos = true;
    return d;
}

/* The checkpoint $VLMD_TEST_MODELS/<name> (models_dir), loaded for 2 threads; NULL (and a failed check)
 * when it cannot be loaded. */
static inline vlm_model *fixture_model_load(const char *name) {
    char dir[600], err[512];
    snprintf(dir, sizeof dir, "%s/%s", models_dir, name);
    vlm_load_opts o = {.threads = 2};
    vlm_model *m = NULL;
    vlm_status st = vlm_model_load(dir, &o, &m, err, sizeof err);
    CHECKF(st == VLM_OK, "load %s: %s", name, err);
    return m;
}

/* One sequence alone on an engine of backend `be` over tp ranks: its first n greedy tokens and the logits
 * of every step ([n][vocab]). False (and a failed check) when the engine refuses or stops early. */
/* static inline: not every includer calls these, and unused inline functions draw no warning */
static inline bool fixture_run_greedy(vlm_model *m, vlm_backend_kind be, int tp, const fcase *c, int n,
                                      int32_t *toks, float *logits) {
    vlm_engine_opts eo = {.threads = 2, .max_seqs = 4, .max_batch_tokens = 256, .tp = tp, .backend = be};
    vlm_engine *e = NULL;
    char err[512];
    vlm_status st = vlm_engine_create(m, &eo, &e, err, sizeof err);
    CHECKF(st == VLM_OK, "%s tp %d: %s", vlm_backend_name(be), tp, err);
    if (st) return false;
    vlm_seq_desc d = desc_of(c, n);
    d.want_logits = true;
    uint64_t id;
    st = vlm_engine_add(e, &d, &id, err, sizeof err);
    CHECKF(st == VLM_OK, "%s: %s", c->dir, err);
    int64_t V = vlm_model_cfg(m)->vocab;
    int nt = 0;
    vlm_token_event ev[4];
    while (st == VLM_OK && vlm_engine_active(e)) {
        int ne = vlm_engine_step(e, ev, 4);
        for (int i = 0; i < ne; i++)
            if (ev[i].token >= 0 && nt < n) {
                const float *lg = vlm_engine_logits(e, id);
                VLM_ASSERT(lg);
                memcpy(logits + (int64_t)nt * V, lg, (size_t)V * sizeof(float));
                toks[nt++] = ev[i].token;
            }
    }
    vlm_engine_free(e);
    CHECK_EQ_INT(nt, n);
    return nt == n;
}

#endif
