/* test_runtime.c — runtime pieces that need no model: dtype conversions, status names, the .npy writer,
 * get_rope_index against transformers (tests/fixtures/qwen2vl/rope_index.json), and the sampler
 * (hand-worked penalties, greedy/top_k, seeded reproducibility, top_p/min_p filters, logprobs). */
#include "runtime/runtime.h"
#include "tests/unit/npy_read.h"
#include "tests/unit/test.h"

#include <cJSON.h>
#include <stdlib.h>
#include <unistd.h>

static void test_conversions(void) {
    CHECK_EQ_INT(vlm_f32_to_bf16(1.0f), 0x3f80);
    /* 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties to even -> 1.0 */
    CHECK_EQ_INT(vlm_f32_to_bf16(1.00390625f), 0x3f80);
    /* 1 + 3*2^-8 is halfway between 0x3f81 and 0x3f82: ties to even -> 0x3f82 */
    CHECK_EQ_INT(vlm_f32_to_bf16(1.01171875f), 0x3f82);
    CHECK_EQ_INT(vlm_f32_to_bf16(1.0040f), 0x3f81); /* above halfway rounds up */
    CHECK_EQ_INT(vlm_f32_to_bf16(-2.0f), 0xc000);
    CHECK_EQ_INT(vlm_f32_to_bf16(INFINITY), 0x7f80);
    CHECK(isnan(vlm_bf16_to_f32(vlm_f32_to_bf16(NAN))));
    CHECK_EQ_INT(vlm_bf16_to_f32(0x3fc0) == 1.5f, 1);
    CHECK(vlm_f16_to_f32(0x3c00) == 1.0f);
    CHECK(vlm_f16_to_f32(0xc000) == -2.0f);
    CHECK(vlm_f16_to_f32(0x0001) == 5.9604644775390625e-8f); /* smallest subnormal */
    CHECK(vlm_f16_to_f32(0x7bff) == 65504.0f);
    CHECK(isinf(vlm_f16_to_f32(0x7c00)));
    CHECK_EQ_INT(vlm_dtype_size(VLM_BF16), 2);
    CHECK_EQ_INT(vlm_dtype_size(VLM_I64), 8);
    CHECK(!strcmp(vlm_dtype_name(VLM_F16), "F16"));
    CHECK(!strcmp(vlm_status_name(VLM_E_CAPACITY), "capacity"));
    char buf[32];
    CHECK_EQ_INT(vlm_errf(buf, sizeof buf, VLM_E_IO, "x=%d", 5), VLM_E_IO);
    CHECK(!strcmp(buf, "x=5"));
}

static void test_npy_write(void) {
    char p[] = "/tmp/vlmd-npy-XXXXXX";
    int fd = mkstemp(p);
    CHECK(fd >= 0);
    close(fd);
    float d[6] = {1, 2, 3, 4, 5, -6.5f};
    CHECK_EQ_INT(vlm_npy_write_f32(p, d, 2, 3, NULL, 0), VLM_OK);
    int64_t sh[4];
    int nd = 0;
    float *r = npy_read_f32(p, sh, &nd);
    CHECK(r && nd == 2 && sh[0] == 2 && sh[1] == 3 && r[5] == -6.5f);
    free(r);
    CHECK_EQ_INT(vlm_npy_write_f32(p, d, -1, 6, NULL, 0), VLM_OK);
    r = npy_read_f32(p, sh, &nd);
    CHECK(r && nd == 1 && sh[0] == 6 && r[0] == 1);
    free(r);
    unlink(p);
}

static void test_rope_index_fixture(void) {
    FILE *f = fopen("tests/fixtures/qwen2vl/rope_index.json", "rb");
    CHECK(f);
    if (!f) return;
    char *b = malloc(1 << 20);
    size_t n = fread(b, 1, (1 << 20) - 1, f);
    b[n] = 0;
    fclose(f);
    cJSON *j = cJSON_Parse(b);
    free(b);
    vlm_model_config cfg = {0};
    cfg.image_token_id = 151655;
    cfg.video_token_id = 151656;
    cfg.vision_start_id = 151652;
    int count = 0;
    for (const cJSON *c = cJSON_GetObjectItem(j, "cases")->child; c; c = c->next, count++) {
        const cJSON *ids = cJSON_GetObjectItem(c, "input_ids"), *g = cJSON_GetObjectItem(c, "image_grid_thw");
        int64_t L = cJSON_GetArraySize(ids);
        int32_t *tok = malloc((size_t)L * sizeof *tok);
        int64_t *pos = malloc((size_t)(3 * L) * sizeof *pos);
        int i = 0;
        for (const cJSON *x = ids->child; x; x = x->next) tok[i++] = (int32_t)x->valuedouble;
        int32_t grids[8][3];
        int ng = cJSON_GetArraySize(g);
        for (int k = 0; k < ng && k < 8; k++)
            for (int q = 0; q < 3; q++) grids[k][q] = (int32_t)cJSON_GetArrayItem(cJSON_GetArrayItem(g, k), q)->valuedouble;
        cfg.vision.spatial_merge_size = (int)cJSON_GetObjectItem(c, "spatial_merge_size")->valuedouble;
        int64_t delta = vlm_rope_index(&cfg, tok, L, (const int32_t(*)[3])grids, ng, pos);
        const char *name = cJSON_GetObjectItem(c, "name")->valuestring;
        CHECKF(delta == (int64_t)cJSON_GetObjectItem(c, "rope_delta")->valuedouble, "%s: delta %lld", name, (long long)delta);
        const cJSON *pj = cJSON_GetObjectItem(c, "position_ids");
        int bad = 0;
        for (int s = 0; s < 3; s++)
            for (int64_t t = 0; t < L; t++)
                if (pos[s * L + t] != (int64_t)cJSON_GetArrayItem(cJSON_GetArrayItem(pj, s), (int)t)->valuedouble) bad++;
        CHECKF(bad == 0, "%s: %d positions differ", name, bad);
        free(tok);
        free(pos);
    }
    CHECK_EQ_INT(count, 8);
    cJSON_Delete(j);
}

static void test_penalties_hand_worked(void) {
    /* vocab 6; prompt {1, 2}, generated {2, 3, 3} */
    float l[6] = {2.0f, -1.0f, 3.0f, 0.5f, -2.0f, 1.0f};
    int32_t ids[5] = {1, 2, 2, 3, 3};
    vlm_sampling s;
    vlm_sampling_default(&s);
    s.repetition_penalty = 2.0f;
    vlm_apply_penalties(&s, l, 6, ids, 2, 5);
    /* HF: each distinct id once: negative * p, positive / p */
    CHECK(l[0] == 2.0f && l[1] == -2.0f && l[2] == 1.5f && l[3] == 0.25f && l[4] == -2.0f && l[5] == 1.0f);
    float m[6] = {2.0f, -1.0f, 3.0f, 0.5f, -2.0f, 1.0f};
    vlm_sampling_default(&s);
    s.presence_penalty = 0.5f;
    s.frequency_penalty = 0.25f;
    vlm_apply_penalties(&s, m, 6, ids, 2, 5);
    /* OpenAI: generated counts only: id 2 once (-0.25 - 0.5), id 3 twice (-0.5 - 0.5); prompt id 1 untouched */
    CHECK(m[1] == -1.0f);
    CHECK_NEAR(m[2], 2.25, 1e-6);
    CHECK_NEAR(m[3], -0.5, 1e-6);
    CHECK(m[0] == 2.0f);
}

static void test_sampling(void) {
    enum { V = 1000 };
    float *l = malloc(V * sizeof *l);
    vlm_rng r;
    vlm_rng_seed(&r, 1);
    for (int i = 0; i < V; i++) l[i] = (float)(vlm_rng_uniform(&r) * 6.0);
    l[417] = 9.0f;
    int32_t hist[1] = {5};
    vlm_sampling s;
    vlm_sampling_default(&s);
    vlm_token_event ev;
    s.top_logprobs = 3;
    CHECK_EQ_INT(vlm_sample(&s, &r, l, V, hist, 1, 1, &ev), 417);
    CHECK_EQ_INT(ev.n_top, 3);
    CHECK_EQ_INT(ev.top_ids[0], 417);
    CHECK(ev.top_logprobs[0] >= ev.top_logprobs[1] && ev.top_logprobs[1] >= ev.top_logprobs[2]);
    double z = 0;
    for (int i = 0; i < V; i++) z += exp((double)l[i] - 9.0);
    CHECK_NEAR(ev.logprob, -log(z), 1e-5);
    /* without logprobs or top_logprobs the log-softmax is skipped (it costs ~7% of a batched step) */
    s.top_logprobs = 0;
    CHECK_EQ_INT(vlm_sample(&s, &r, l, V, hist, 1, 1, &ev), 417);
    CHECK(ev.logprob == 0.0f && ev.n_top == 0);
    s.logprobs = true;
    CHECK_EQ_INT(vlm_sample(&s, &r, l, V, hist, 1, 1, &ev), 417);
    CHECK_NEAR(ev.logprob, -log(z), 1e-5);
    CHECK_EQ_INT(ev.n_top, 0);
    s.logprobs = false;
    /* top_k = 1 is greedy at any temperature */
    s.temperature = 1.5f;
    s.top_k = 1;
    for (int t = 0; t < 20; t++) CHECK_EQ_INT(vlm_sample(&s, &r, l, V, hist, 1, 1, NULL), 417);
    /* seeded reproducibility; different seeds give different streams */
    s.top_k = 0;
    s.temperature = 1.0f;
    int32_t a[50], b[50], c[50];
    vlm_rng ra, rb, rc;
    vlm_rng_seed(&ra, 42);
    vlm_rng_seed(&rb, 42);
    vlm_rng_seed(&rc, 43);
    int diff = 0;
    for (int t = 0; t < 50; t++) {
        a[t] = vlm_sample(&s, &ra, l, V, hist, 1, 1, NULL);
        b[t] = vlm_sample(&s, &rb, l, V, hist, 1, 1, NULL);
        c[t] = vlm_sample(&s, &rc, l, V, hist, 1, 1, NULL);
        CHECK_EQ_INT(a[t], b[t]);
        diff += a[t] != c[t];
    }
    CHECK(diff > 0);
    /* top_k 3: only the three largest appear */
    s.top_k = 3;
    s.temperature = 5.0f;
    int32_t top3[3] = {417, -1, -1};
    for (int i = 0; i < V; i++)
        if (i != 417 && (top3[1] < 0 || l[i] > l[top3[1]])) top3[1] = i;
    for (int i = 0; i < V; i++)
        if (i != 417 && i != top3[1] && (top3[2] < 0 || l[i] > l[top3[2]])) top3[2] = i;
    bool seen[3] = {0};
    for (int t = 0; t < 300; t++) {
        int32_t x = vlm_sample(&s, &r, l, V, hist, 1, 1, NULL);
        bool ok = x == top3[0] || x == top3[1] || x == top3[2];
        CHECK(ok);
        for (int q = 0; q < 3; q++) seen[q] |= x == top3[q];
    }
    CHECK(seen[0] && seen[1] && seen[2]);
    /* top_p tiny keeps only the argmax; min_p 0.5 at temperature 1 keeps only tokens within ln 2 of the max */
    s.top_k = 0;
    s.temperature = 1.0f;
    s.top_p = 0.001f;
    for (int t = 0; t < 20; t++) CHECK_EQ_INT(vlm_sample(&s, &r, l, V, hist, 1, 1, NULL), 417);
    s.top_p = 1.0f;
    s.min_p = 0.5f;
    float two[4] = {0.0f, log(0.6f), log(0.4f), -10.0f}; /* probs ~ 1 : 0.6 : 0.4 : 0 */
    int cnt[4] = {0};
    for (int t = 0; t < 400; t++) cnt[vlm_sample(&s, &r, two, 4, hist, 0, 0, NULL)]++;
    CHECK(cnt[0] > 0 && cnt[1] > 0 && cnt[2] == 0 && cnt[3] == 0);
    /* the empirical frequency follows the renormalised probabilities 1/1.6 and 0.6/1.6 */
    CHECK_NEAR(cnt[0] / 400.0, 1 / 1.6, 0.08);
    free(l);
}

int main(void) {
    RUN(test_conversions);
    RUN(test_npy_write);
    RUN(test_rope_index_fixture);
    RUN(test_penalties_hand_worked);
    RUN(test_sampling);
    TEST_MAIN_END("runtime");
}
