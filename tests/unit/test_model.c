/* test_model.c — the Qwen2 decoder, M-RoPE, paged KV cache, engine and sampler against the transformers
 * fixtures of tools/make_fixtures.py (tests/fixtures/qwen2vl/<model>/<case>/) on the checkpoints that
 * tools/make_model.py writes into $VLMD_TEST_MODELS. Image cases feed the fixture's image_embeds.npy (the
 * vision tower's reference output), so the decoder is tested without vision/. */
#include "runtime/cpu_internal.h" /* vlm_cpu_set_bf16_dot */
#include "runtime/runtime.h"
#include "tests/unit/npy_read.h"
#include "tests/unit/test.h"

#include <cJSON.h>
#include <stdlib.h>

/* f32 logits tolerance: the brief's bound; transformers vs a float64 numpy re-implementation differ by
 * <= 4.3e-5 (tools/README.md), so 1e-3 leaves room only for f32 summation-order noise. */
#define LOGITS_TOL_F32 1e-3
/* bf16 checkpoints are computed in f32 from the exact bf16 weights, so they are held to the same bound
 * against the fixture's f32 upcast reference (logits0_f32ref.npy). Against HF's own bf16 run we can only
 * be as close as that run is to the f32 reference: case.json's logits0_bf16_vs_f32ref_max_abs (0.63) plus
 * the f32 bound. */

#include "tests/unit/qwen_fixture.h"

/* Runs the engine until every listed sequence finished; out[k] receives sequence k's tokens.
 * add_at[k] > 0 delays adding sequence k until that many steps ran. */
static void run_engine(vlm_engine *e, const vlm_seq_desc *d, int n, const int *add_at, int32_t out[][64],
                       int *n_out) {
    uint64_t ids[16];
    bool added[16] = {0};
    char err[256];
    for (int k = 0; k < n; k++) n_out[k] = 0;
    vlm_token_event ev[32];
    for (int step = 0; step < 10000; step++) {
        for (int k = 0; k < n; k++)
            if (!added[k] && (!add_at || add_at[k] <= step)) {
                vlm_status st = vlm_engine_add(e, &d[k], &ids[k], err, sizeof err);
                CHECKF(st == VLM_OK, "add: %s", err);
                added[k] = true;
            }
        int ne = vlm_engine_step(e, ev, 32);
        for (int i = 0; i < ne; i++)
            for (int k = 0; k < n; k++)
                if (added[k] && ev[i].seq_id == ids[k] && ev[i].token >= 0 && n_out[k] < 64) out[k][n_out[k]++] = ev[i].token;
        bool all = true;
        for (int k = 0; k < n; k++) all = all && added[k];
        if (all && vlm_engine_active(e) == 0) break;
    }
}

static const char *MODELS[] = {"tiny-f32-tied", "tiny-bf16-untied", "small-f32-hd32"};
static const char *CASES[] = {"text", "image", "image_odd", "image_tiny", "two_images", "multiturn", "max_pixels",
                              "rgba", "jpeg"};

static vlm_model *load_model(const char *name, bool convert) {
    char dir[600], err[512];
    snprintf(dir, sizeof dir, "%s/%s", models_dir, name);
    vlm_load_opts o = {.threads = 2, .convert_f32 = convert};
    vlm_model *m = NULL;
    vlm_status st = vlm_model_load(dir, &o, &m, err, sizeof err);
    CHECKF(st == VLM_OK, "load %s: %s", name, err);
    return m;
}

static double worst_f32_diff, worst_bf16_ref_diff;

/* bf16_dot: the pass with the AVX512_BF16 GEMM (runtime/cpu_gemm.c), bf16 models only. It rounds
 * the activations entering each many-row product to bf16, as HF's bf16 run does everywhere, so
 * the bound against the f32 reference becomes that run's own distance from it (dev, from
 * case.json) plus the f32 bound, and against HF bf16 twice dev (triangle inequality). */
static void fixture_cases(bool bf16_dot) {
    for (size_t mi = 0; mi < sizeof MODELS / sizeof *MODELS; mi++) {
        vlm_model *m = load_model(MODELS[mi], false);
        if (!m) continue;
        const vlm_model_config *cfg = vlm_model_cfg(m);
        for (size_t ci = 0; ci < sizeof CASES / sizeof *CASES; ci++) {
            fcase c;
            if (!case_load(&c, MODELS[mi], CASES[ci]) || (bf16_dot && !c.bf16)) { case_free(&c); continue; }
            const double dev = c.bf16 ? cJSON_GetObjectItem(c.j, "logits0_bf16_vs_f32ref_max_abs")->valuedouble : 0;
            /* positions */
            int64_t *pos = malloc((size_t)(3 * c.n_prompt) * sizeof *pos);
            int32_t grids[8][3];
            for (int i = 0; i < c.n_images; i++) memcpy(grids[i], c.img[i].grid_thw, sizeof grids[i]);
            int64_t delta = vlm_rope_index(cfg, c.prompt, c.n_prompt, (const int32_t(*)[3])grids, c.n_images, pos);
            CHECKF(delta == (int64_t)cJSON_GetObjectItem(c.j, "rope_delta")->valuedouble, "%s rope_delta", c.dir);
            const cJSON *pj = cJSON_GetObjectItem(c.j, "position_ids");
            int bad = 0;
            for (int s = 0; s < 3; s++)
                for (int64_t i = 0; i < c.n_prompt; i++)
                    if (pos[s * c.n_prompt + i] != (int64_t)cJSON_GetArrayItem(cJSON_GetArrayItem(pj, s), (int)i)->valuedouble) bad++;
            CHECKF(bad == 0, "%s: %d position ids differ", c.dir, bad);
            free(pos);
            /* logits of the first step and the 32-token greedy continuation */
            vlm_engine_opts eo = {.threads = 2, .max_seqs = 4, .max_batch_tokens = 256};
            vlm_engine *e = NULL;
            char err[256];
            CHECK(vlm_engine_create(m, &eo, &e, err, sizeof err) == VLM_OK);
            vlm_seq_desc d = desc_of(&c, 32);
            d.want_logits = true;
            uint64_t id;
            vlm_status st = vlm_engine_add(e, &d, &id, err, sizeof err);
            CHECKF(st == VLM_OK, "%s: %s", c.dir, err);
            vlm_token_event ev[4];
            int32_t toks[32];
            int nt = 0;
            for (int step = 0; step < 100 && vlm_engine_active(e); step++) {
                int ne = vlm_engine_step(e, ev, 4);
                if (nt == 0 && ne > 0) {
                    char p[600];
                    int64_t sh[4];
                    int nd;
                    snprintf(p, sizeof p, "%s/logits0%s.npy", c.dir, c.bf16 ? "_f32ref" : "");
                    float *ref = npy_read_f32(p, sh, &nd);
                    const float *lg = vlm_engine_logits(e, id);
                    CHECK(ref && lg);
                    if (ref && lg) {
                        double md = 0;
                        for (int64_t i = 0; i < cfg->vocab; i++) md = fmax(md, fabs((double)lg[i] - ref[i]));
                        const double tol = (bf16_dot ? dev : 0) + LOGITS_TOL_F32;
                        CHECKF(md <= tol, "%s logits0%s max |diff| %.3g > %.3g", c.dir, c.bf16 ? "_f32ref" : "", md, tol);
                        if (!bf16_dot) worst_f32_diff = fmax(worst_f32_diff, md);
                        fprintf(stderr, "  %s%s: logits0 max|diff| %.3g\n", c.dir, bf16_dot ? " (bf16 dot)" : "", md);
                    }
                    free(ref);
                    if (c.bf16 && lg) {
                        snprintf(p, sizeof p, "%s/logits0.npy", c.dir);
                        ref = npy_read_f32(p, sh, &nd);
                        double md = 0;
                        for (int64_t i = 0; ref && i < cfg->vocab; i++) md = fmax(md, fabs((double)lg[i] - ref[i]));
                        const double tol = (bf16_dot ? 2 : 1) * dev + LOGITS_TOL_F32;
                        CHECKF(ref && md <= tol, "%s vs HF bf16 logits0: %.3g > %.3g", c.dir, md, tol);
                        if (!bf16_dot) worst_bf16_ref_diff = fmax(worst_bf16_ref_diff, md);
                        else fprintf(stderr, "  %s (bf16 dot) vs HF bf16: %.3g (HF bf16 vs f32: %.3g)\n", c.dir, md, dev);
                        free(ref);
                    }
                }
                for (int i = 0; i < ne; i++) if (ev[i].token >= 0 && nt < 32) toks[nt++] = ev[i].token;
            }
            int64_t ng;
            int32_t *want = ids_of(cJSON_GetObjectItem(c.j, c.bf16 ? "greedy_ids_f32ref" : "greedy_ids"), &ng);
            CHECK_EQ_INT(nt, ng);
            int first_bad = -1;
            for (int i = 0; i < nt && i < ng; i++) if (toks[i] != want[i]) { first_bad = i; break; }
            CHECKF(first_bad < 0, "%s: greedy differs at step %d", c.dir, first_bad);
            free(want);
            vlm_engine_free(e);
            case_free(&c);
        }
        vlm_model_free(m);
    }
    if (!bf16_dot)
        fprintf(stderr, "  worst f32 logits0 diff %.3g; bf16 model vs HF bf16 logits0 %.3g\n", worst_f32_diff,
                worst_bf16_ref_diff);
}

static void test_fixture_cases(void) { fixture_cases(false); }

static void test_fixture_cases_bf16_dot(void) {
    if (vlm_cpu_set_bf16_dot("on") != 0) {
        fprintf(stderr, "  this CPU does not run AVX512_BF16: skipped\n");
        return;
    }
    fixture_cases(true);
    CHECK_EQ_INT(vlm_cpu_set_bf16_dot("off"), 0);
}

/* generation_config defaults (penalty 1.05, top_k 1, temperature 0.1) and greedy with penalty 1.5 */
static void test_penalised_generations(void) {
    const char *models[] = {"tiny-f32-tied", "small-f32-hd32"};
    for (int mi = 0; mi < 2; mi++) {
        vlm_model *m = load_model(models[mi], false);
        if (!m) continue;
        const char *cases[] = {"text", "image"};
        for (int ci = 0; ci < 2; ci++) {
            fcase c;
            if (!case_load(&c, models[mi], cases[ci])) { case_free(&c); continue; }
            const char *gens[] = {"default_generation", "penalty_generation"};
            for (int g = 0; g < 2; g++) {
                const cJSON *gj = cJSON_GetObjectItem(c.j, gens[g]);
                vlm_seq_desc d = desc_of(&c, 32);
                d.sampling.repetition_penalty = (float)cJSON_GetObjectItem(gj, "repetition_penalty")->valuedouble;
                const cJSON *tk = cJSON_GetObjectItem(gj, "top_k");
                if (g == 0) {
                    d.sampling.temperature = (float)cJSON_GetObjectItem(gj, "temperature")->valuedouble;
                    d.sampling.top_k = cJSON_IsNumber(tk) ? (int)tk->valuedouble : 0;
                    d.sampling.top_p = (float)cJSON_GetObjectItem(gj, "top_p")->valuedouble;
                }
                vlm_engine_opts eo = {.threads = 2};
                vlm_engine *e = NULL;
                char err[256];
                CHECK(vlm_engine_create(m, &eo, &e, err, sizeof err) == VLM_OK);
                int32_t out[1][64];
                int n_out[1];
                run_engine(e, &d, 1, NULL, out, n_out);
                int64_t ng;
                int32_t *want = ids_of(cJSON_GetObjectItem(gj, "ids"), &ng);
                CHECK_EQ_INT(n_out[0], ng);
                int bad = -1;
                for (int i = 0; i < n_out[0] && i < ng; i++) if (out[0][i] != want[i]) { bad = i; break; }
                CHECKF(bad < 0, "%s %s: differs at step %d", c.dir, gens[g], bad);
                free(want);
                vlm_engine_free(e);
            }
            case_free(&c);
        }
        vlm_model_free(m);
    }
}

/* several prompts together, one joining mid-way, small chunks, and a KV pool that forces preemption:
 * every sequence must produce exactly its fixture's greedy tokens. */
static void batch_check(const char *model, vlm_engine_opts eo, bool late, bool expect_preempt) {
    vlm_model *m = load_model(model, false);
    if (!m) return;
    const char *names[] = {"text", "image", "two_images", "image_odd"};
    fcase c[4];
    vlm_seq_desc d[4];
    int n = 0;
    for (int i = 0; i < 4; i++) {
        if (!case_load(&c[n], model, names[i])) { case_free(&c[n]); continue; }
        d[n] = desc_of(&c[n], 24);
        n++;
    }
    CHECK(n >= 3);
    vlm_engine *e = NULL;
    char err[256];
    vlm_status st = vlm_engine_create(m, &eo, &e, err, sizeof err);
    CHECKF(st == VLM_OK, "%s", err);
    if (st == VLM_OK) {
        int add_at[4] = {0, 0, late ? 5 : 0, late ? 9 : 0};
        int32_t out[4][64];
        int n_out[4];
        run_engine(e, d, n, add_at, out, n_out);
        for (int k = 0; k < n; k++) {
            int64_t ng;
            int32_t *want = ids_of(cJSON_GetObjectItem(c[k].j, "greedy_ids"), &ng);
            CHECK_EQ_INT(n_out[k], 24);
            int bad = -1;
            for (int i = 0; i < n_out[k]; i++) if (out[k][i] != want[i]) { bad = i; break; }
            CHECKF(bad < 0, "%s batched: differs at step %d", c[k].dir, bad);
            free(want);
        }
        vlm_engine_stats s;
        vlm_engine_get_stats(e, &s);
        if (expect_preempt) CHECKF(s.preempted_total > 0, "no preemption happened (pool %lld pages)", (long long)s.kv_pages_total);
        CHECK_EQ_INT(s.kv_pages_used, 0);
        vlm_engine_free(e);
    }
    for (int k = 0; k < n; k++) case_free(&c[k]);
    vlm_model_free(m);
}

static void test_batching_invariance(void) {
    batch_check("tiny-f32-tied", (vlm_engine_opts){.threads = 2, .max_seqs = 8, .max_batch_tokens = 512}, true, false);
}
static void test_chunked_prefill(void) {
    batch_check("small-f32-hd32", (vlm_engine_opts){.threads = 2, .max_seqs = 8, .max_batch_tokens = 7, .page_tokens = 4},
                true, false);
}
static void test_preemption(void) {
    /* tiny-f32-tied: 2 layers x 2 kv heads x 16 dims; a page of 16 tokens = 2*2*16*32*4 = 8 KiB.
     * 12 pages (192 tokens) hold the largest sequence (image: 89 + 24 tokens, 8 pages) but not all four
     * (23 pages together). */
    batch_check("tiny-f32-tied", (vlm_engine_opts){.threads = 2, .max_seqs = 8, .max_batch_tokens = 64,
                                                   .kv_memory_bytes = 12 * 8192}, false, true);
}
static void test_preemption_no_prefix_cache(void) {
    batch_check("tiny-f32-tied", (vlm_engine_opts){.threads = 2, .max_seqs = 8, .max_batch_tokens = 64,
                                                   .kv_memory_bytes = 12 * 8192, .no_prefix_cache = true}, false, true);
}

/* One sequence to the end on e: its tokens, the prompt tokens it read from the prefix cache, and
 * (when lg0 is non-NULL) its first step's logits. */
static int run_one(vlm_engine *e, const vlm_seq_desc *d0, int32_t *toks, int64_t *cached, float *lg0, int64_t vocab) {
    vlm_seq_desc d = *d0;
    d.want_logits = lg0 != NULL;
    uint64_t id;
    char err[256];
    vlm_status st = vlm_engine_add(e, &d, &id, err, sizeof err);
    CHECKF(st == VLM_OK, "add: %s", err);
    if (st) return 0;
    vlm_token_event ev[8];
    int nt = 0;
    *cached = -1;
    for (int step = 0; step < 1000 && vlm_engine_active(e); step++) {
        int ne = vlm_engine_step(e, ev, 8);
        for (int i = 0; i < ne; i++) {
            if (ev[i].seq_id != id || ev[i].token < 0) continue;
            if (nt == 0 && lg0) memcpy(lg0, vlm_engine_logits(e, id), (size_t)vocab * sizeof(float));
            *cached = ev[i].n_cached_prompt;
            if (nt < 64) toks[nt++] = ev[i].token;
        }
    }
    return nt;
}

static double max_abs_diff(const float *a, const float *b, int64_t n) {
    double md = 0;
    for (int64_t i = 0; i < n; i++) md = fmax(md, fabs((double)a[i] - b[i]));
    return md;
}

/* Automatic prefix cache (runtime/kv_pages.c), pages of 4 tokens:
 * - the same prompt again reuses every token but its last (the full pages, then the start of the
 *   page the first run's output filled, copied), and gives the fixture's greedy tokens and the
 *   first run's logits (within f32 summation noise);
 * - the same layout with the last image row changed reuses only the pages before that row and the
 *   text rows that start its page, and gives what an engine without the cache gives for it;
 * - a prompt that shares a start not aligned to a page with an earlier one, then differs, reuses
 *   exactly the shared tokens and equals the uncached engine;
 * - a prompt that extends a finished sequence's prompt + output reuses the pages its generated tokens
 *   filled;
 * - with no_prefix_cache nothing is reused. */
static void test_prefix_cache(void) {
    vlm_model *m = load_model("tiny-f32-tied", false);
    if (!m) return;
    const int64_t V = vlm_model_cfg(m)->vocab;
    const int32_t pad = vlm_model_cfg(m)->image_token_id;
    const int pt = 4;
    float *lg_a = malloc((size_t)V * sizeof(float)), *lg_b = malloc((size_t)V * sizeof(float));
    const char *names[] = {"image", "two_images", "multiturn", "text"};
    for (size_t ci = 0; ci < sizeof names / sizeof *names; ci++) {
        fcase c;
        if (!case_load(&c, "tiny-f32-tied", names[ci])) { case_free(&c); continue; }
        char err[256];
        vlm_engine *e = NULL, *ref = NULL;
        vlm_engine_opts eo = {.threads = 2, .max_seqs = 4, .max_batch_tokens = 256, .page_tokens = pt};
        CHECK(vlm_engine_create(m, &eo, &e, err, sizeof err) == VLM_OK);
        eo.no_prefix_cache = true;
        CHECK(vlm_engine_create(m, &eo, &ref, err, sizeof err) == VLM_OK);
        if (!e || !ref) { vlm_engine_free(e); vlm_engine_free(ref); case_free(&c); continue; }
        vlm_seq_desc d = desc_of(&c, 24);
        int64_t ng;
        int32_t *want = ids_of(cJSON_GetObjectItem(c.j, "greedy_ids"), &ng);
        int32_t t1[64], t2[64], t3[64];
        int64_t k1, k2, k3;
        int n1 = run_one(e, &d, t1, &k1, lg_a, V);
        int n2 = run_one(e, &d, t2, &k2, lg_b, V);
        const int64_t full = (c.n_prompt - 1) / pt * pt;
        CHECKF(k1 == 0 && k2 == c.n_prompt - 1, "%s: reused %lld then %lld prompt tokens, want 0 then %lld", c.dir,
               (long long)k1, (long long)k2, (long long)(c.n_prompt - 1));
        CHECK(n1 == 24 && n2 == 24 && !memcmp(t1, want, sizeof(int32_t) * 24) && !memcmp(t2, want, sizeof(int32_t) * 24));
        double md = max_abs_diff(lg_a, lg_b, V);
        CHECKF(md <= 1e-4, "%s: logits with the cached prefix differ by %.3g", c.dir, md);
        fprintf(stderr, "  %s: %lld of %lld prompt tokens from the cache, logits0 max|diff| %.3g\n", c.dir,
                (long long)k2, (long long)c.n_prompt, md);
        vlm_engine_stats st;
        vlm_engine_get_stats(e, &st);
        CHECK(st.prefix_hit_tokens == c.n_prompt - 1 && st.prefix_query_tokens == 2 * c.n_prompt &&
              st.kv_pages_used == 0 && st.kv_pages_cached > 0);
        if (c.n_images > 0) {
            /* change the last image row: the pages before it still match, the rest must not */
            vlm_image_embeds im[8];
            memcpy(im, c.img, sizeof im);
            const vlm_image_embeds *last = &c.img[c.n_images - 1];
            const int64_t H = vlm_model_cfg(m)->hidden;
            float *emb = malloc((size_t)(last->n_tokens * H) * sizeof(float));
            memcpy(emb, last->embeds, (size_t)(last->n_tokens * H) * sizeof(float));
            emb[(last->n_tokens - 1) * H + 3] += 0.5f;
            im[c.n_images - 1].embeds = emb;
            int64_t row = c.n_prompt - 1;
            while (c.prompt[row] != pad) row--;
            vlm_seq_desc dp = d;
            dp.images = im;
            int n3 = run_one(e, &dp, t3, &k3, lg_a, V);
            /* the pages before row's, then the text rows that start row's page (a partial match
             * never covers an image row) */
            int64_t want_k = row / pt * pt < full ? row / pt * pt : full;
            while (want_k < row && c.prompt[want_k] != pad) want_k++;
            CHECKF(k3 == want_k, "%s changed image: reused %lld, want %lld", c.dir, (long long)k3, (long long)want_k);
            int32_t tr[64];
            int64_t kr;
            int nr = run_one(ref, &dp, tr, &kr, lg_b, V);
            md = max_abs_diff(lg_a, lg_b, V);
            CHECKF(kr == 0 && n3 == nr && !memcmp(t3, tr, sizeof(int32_t) * (size_t)nr) && md <= 1e-4,
                   "%s changed image: differs from the uncached engine (logits %.3g)", c.dir, md);
            free(emb);
        } else {
            /* continue the conversation: prompt + the 24 generated tokens + 3 more */
            int64_t n4 = c.n_prompt + 27;
            int32_t *p4 = malloc((size_t)n4 * sizeof *p4);
            memcpy(p4, c.prompt, (size_t)c.n_prompt * sizeof *p4);
            memcpy(p4 + c.n_prompt, t1, 24 * sizeof *p4);
            for (int i = 0; i < 3; i++) p4[c.n_prompt + 24 + i] = c.prompt[i];
            vlm_seq_desc d4 = d;
            d4.prompt = p4;
            d4.n_prompt = n4;
            d4.max_tokens = 8;
            int64_t kr;
            int32_t tr[64];
            int n3 = run_one(e, &d4, t3, &k3, lg_a, V);
            int nr = run_one(ref, &d4, tr, &kr, lg_b, V);
            /* the first run computed rows up to its 23rd generated token (the 24th was never fed back) */
            int64_t want_k = (c.n_prompt + 23) / pt * pt;
            CHECKF(k3 == want_k, "%s continued: reused %lld, want %lld", c.dir, (long long)k3, (long long)want_k);
            md = max_abs_diff(lg_a, lg_b, V);
            CHECKF(n3 == 8 && n3 == nr && !memcmp(t3, tr, sizeof(int32_t) * 8) && md <= 1e-4,
                   "%s continued: differs from the uncached engine (logits %.3g)", c.dir, md);
            /* a new prompt: the first 2 pages + 3 tokens of this one, then tokens of its own. The 3
             * rows come from a copy of the first run's third page: without the copy their K/V would
             * be whatever the new page held before. */
            const int64_t shared = 2 * pt + 3;
            for (int64_t i = shared; i < n4; i++) p4[i] = c.prompt[(i * 7 + 1) % c.n_prompt];
            p4[shared] = c.prompt[shared] + 1; /* differs right after the shared tokens */
            d4.n_prompt = shared + 9;
            run_one(e, &d4, t3, &k3, lg_a, V);
            nr = run_one(ref, &d4, tr, &kr, lg_b, V);
            md = max_abs_diff(lg_a, lg_b, V);
            CHECKF(k3 == shared && kr == 0 && !memcmp(t3, tr, sizeof(int32_t) * 8) && md <= 1e-4,
                   "%s shared start: reused %lld (want %lld), logits vs uncached %.3g", c.dir, (long long)k3,
                   (long long)shared, md);
            free(p4);
        }
        int64_t k4;
        run_one(ref, &d, t3, &k4, NULL, V);
        CHECKF(k4 == 0, "no_prefix_cache engine reused %lld tokens", (long long)k4);
        vlm_engine_get_stats(ref, &st);
        CHECK(st.prefix_hit_tokens == 0 && st.kv_pages_cached == 0);
        free(want);
        vlm_engine_free(e);
        vlm_engine_free(ref);
        case_free(&c);
    }
    free(lg_a);
    free(lg_b);
    vlm_model_free(m);
}

/* Identical prompts admitted together, more arriving while they run, and a pool too small for all of
 * them: pages are shared, recycled and preempted, and every sequence still gives the fixture's tokens. */
static void test_prefix_cache_shared_preempted(void) {
    vlm_model *m = load_model("tiny-f32-tied", false);
    if (!m) return;
    fcase c;
    if (case_load(&c, "tiny-f32-tied", "image")) {
        vlm_seq_desc d[6];
        for (int k = 0; k < 6; k++) d[k] = desc_of(&c, 24);
        /* image: 89 prompt + 24 tokens = 29 pages of 4 alone; 40 pages hold one and a shared prefix */
        vlm_engine_opts eo = {.threads = 2, .max_seqs = 8, .max_batch_tokens = 64, .page_tokens = 4,
                              .kv_memory_bytes = 40 * 2048};
        vlm_engine *e = NULL;
        char err[256];
        vlm_status st = vlm_engine_create(m, &eo, &e, err, sizeof err);
        CHECKF(st == VLM_OK, "%s", err);
        if (st == VLM_OK) {
            int add_at[6] = {0, 0, 0, 3, 7, 30};
            int32_t out[6][64];
            int n_out[6];
            run_engine(e, d, 6, add_at, out, n_out);
            int64_t ng;
            int32_t *want = ids_of(cJSON_GetObjectItem(c.j, "greedy_ids"), &ng);
            for (int k = 0; k < 6; k++)
                CHECKF(n_out[k] == 24 && !memcmp(out[k], want, 24 * sizeof(int32_t)), "sequence %d differs", k);
            vlm_engine_stats s;
            vlm_engine_get_stats(e, &s);
            CHECKF(s.preempted_total > 0 && s.prefix_hit_tokens > 0, "preempted %d, reused %lld", s.preempted_total,
                   (long long)s.prefix_hit_tokens);
            CHECK_EQ_INT(s.kv_pages_used, 0);
            fprintf(stderr, "  6 identical prompts in 40 pages: %d preemptions, %lld of %lld prompt tokens reused\n",
                    s.preempted_total, (long long)s.prefix_hit_tokens, (long long)s.prefix_query_tokens);
            free(want);
            vlm_engine_free(e);
        }
    }
    case_free(&c);
    vlm_model_free(m);
}

static void test_add_errors(void) {
    vlm_model *m = load_model("tiny-f32-tied", false);
    if (!m) return;
    fcase c;
    if (!case_load(&c, "tiny-f32-tied", "image")) { case_free(&c); vlm_model_free(m); return; }
    vlm_engine *e = NULL;
    char err[256];
    vlm_engine_opts eo = {.threads = 2};
    CHECK(vlm_engine_create(m, &eo, &e, err, sizeof err) == VLM_OK);
    vlm_seq_desc d = desc_of(&c, 8);
    d.n_images = 0;
    d.images = NULL;
    CHECK_EQ_INT(vlm_engine_add(e, &d, NULL, err, sizeof err), VLM_E_INVALID);
    CHECK(strstr(err, "image pad") != NULL);
    d = desc_of(&c, 8);
    vlm_image_embeds im = c.img[0];
    im.n_tokens -= 4;
    d.images = &im;
    CHECK_EQ_INT(vlm_engine_add(e, &d, NULL, err, sizeof err), VLM_E_INVALID);
    d = desc_of(&c, 40000);
    CHECK_EQ_INT(vlm_engine_add(e, &d, NULL, err, sizeof err), VLM_E_LIMIT);
    int32_t badtok = 999999;
    d = desc_of(&c, 8);
    d.prompt = &badtok;
    d.n_prompt = 1;
    d.n_images = 0;
    CHECK_EQ_INT(vlm_engine_add(e, &d, NULL, err, sizeof err), VLM_E_INVALID);
    /* cancel: the sequence leaves with a CANCELLED event and frees its pages */
    d = desc_of(&c, 8);
    uint64_t id;
    CHECK_EQ_INT(vlm_engine_add(e, &d, &id, err, sizeof err), VLM_OK);
    vlm_token_event ev[4];
    vlm_engine_step(e, ev, 4);
    vlm_engine_cancel(e, id);
    int ne = vlm_engine_step(e, ev, 4);
    CHECK(ne >= 1 && ev[0].finish == VLM_FINISH_CANCELLED && ev[0].seq_id == id);
    CHECK_EQ_INT(vlm_engine_active(e), 0);
    vlm_engine_stats s;
    vlm_engine_get_stats(e, &s);
    CHECK_EQ_INT(s.kv_pages_used, 0);
    /* eos stops: the model's first greedy token listed as an extra stop id ends after one token */
    d = desc_of(&c, 8);
    int32_t stop = (int32_t)cJSON_GetArrayItem(cJSON_GetObjectItem(c.j, "greedy_ids"), 0)->valuedouble;
    d.stop_ids = &stop;
    d.n_stop_ids = 1;
    CHECK_EQ_INT(vlm_engine_add(e, &d, &id, err, sizeof err), VLM_OK);
    ne = vlm_engine_step(e, ev, 4);
    CHECK(ne == 1 && ev[0].token == stop && ev[0].finish == VLM_FINISH_STOP);
    /* max_tokens -> LENGTH */
    d = desc_of(&c, 2);
    CHECK_EQ_INT(vlm_engine_add(e, &d, &id, err, sizeof err), VLM_OK);
    int last = VLM_FINISH_NONE, count = 0;
    while (vlm_engine_active(e)) {
        ne = vlm_engine_step(e, ev, 4);
        for (int i = 0; i < ne; i++) { count++; last = ev[i].finish; }
    }
    CHECK_EQ_INT(count, 2);
    CHECK_EQ_INT(last, VLM_FINISH_LENGTH);
    vlm_engine_free(e);
    case_free(&c);
    vlm_model_free(m);
}

static bool collect(const vlm_token_event *ev, void *user) {
    int32_t *buf = user;
    if (ev->token >= 0 && buf[0] < 8) buf[1 + buf[0]++] = ev->token;
    return buf[0] < 5; /* cancel after 5 tokens */
}

/* vlm_generate: tokens through the callback; returning false cancels */
static void test_generate_loop(void) {
    vlm_model *m = load_model("tiny-f32-tied", false);
    if (!m) return;
    fcase c;
    if (case_load(&c, "tiny-f32-tied", "text")) {
        vlm_engine *e = NULL;
        char err[256];
        vlm_engine_opts eo = {.threads = 2};
        CHECK(vlm_engine_create(m, &eo, &e, err, sizeof err) == VLM_OK);
        vlm_seq_desc d = desc_of(&c, 16);
        int32_t buf[9] = {0};
        vlm_finish fin = VLM_FINISH_NONE;
        CHECK_EQ_INT(vlm_generate(e, &d, collect, buf, &fin, err, sizeof err), VLM_OK);
        CHECK_EQ_INT(fin, VLM_FINISH_CANCELLED);
        CHECK_EQ_INT(buf[0], 5);
        const cJSON *g = cJSON_GetObjectItem(c.j, "greedy_ids");
        for (int i = 0; i < buf[0]; i++) CHECK_EQ_INT(buf[1 + i], (int)cJSON_GetArrayItem(g, i)->valuedouble);
        CHECK_EQ_INT(vlm_engine_active(e), 0);
        vlm_engine_free(e);
    }
    case_free(&c);
    vlm_model_free(m);
}

/* convert_f32 gives the same tokens as the mmapped bf16 weights (both compute in f32) */
static void test_convert_f32(void) {
    vlm_model *m = load_model("tiny-bf16-untied", true);
    if (!m) return;
    CHECK_EQ_INT(vlm_model_cfg(m)->weight_dtype, VLM_BF16);
    fcase c;
    if (case_load(&c, "tiny-bf16-untied", "text")) {
        vlm_engine *e = NULL;
        char err[256];
        vlm_engine_opts eo = {.threads = 2};
        CHECK(vlm_engine_create(m, &eo, &e, err, sizeof err) == VLM_OK);
        vlm_seq_desc d = desc_of(&c, 16);
        int32_t out[1][64];
        int n_out[1];
        run_engine(e, &d, 1, NULL, out, n_out);
        int64_t ng;
        int32_t *want = ids_of(cJSON_GetObjectItem(c.j, "greedy_ids_f32ref"), &ng);
        for (int i = 0; i < n_out[0]; i++) CHECK_EQ_INT(out[0][i], want[i]);
        free(want);
        vlm_engine_free(e);
    }
    case_free(&c);
    vlm_model_free(m);
}

int main(void) {
    models_dir = getenv("VLMD_TEST_MODELS");
    if (!models_dir) {
        printf("test_model: VLMD_TEST_MODELS unset, skipping (run through tests/run.sh)\n");
        TEST_MAIN_END("model");
    }
    /* The fixtures are f32-reference comparisons: the AVX512_BF16 GEMM (auto-on where vdpbf16ps
     * beats FMA) stays off except in its own pass, which states its own bounds. */
    if (vlm_cpu_set_bf16_dot("off") != 0) CHECK(!"bf16 dot off");
    RUN(test_fixture_cases);
    RUN(test_fixture_cases_bf16_dot);
    RUN(test_penalised_generations);
    RUN(test_batching_invariance);
    RUN(test_chunked_prefill);
    RUN(test_preemption);
    RUN(test_preemption_no_prefix_cache);
    RUN(test_prefix_cache);
    RUN(test_prefix_cache_shared_preempted);
    RUN(test_add_errors);
    RUN(test_convert_f32);
    RUN(test_generate_loop);
    TEST_MAIN_END("model");
}
