/* test_vision_vit.c — the Qwen2-VL vision transformer + PatchMerger against transformers 5.24.
 *
 * For every fixture case with images (tests/fixtures/qwen2vl/<model>/<case>/), the case's own
 * pixel_values.npy is split per image by image_grid_thw, encoded, and the rows are compared with
 * image_embeds.npy (f32 models) or image_embeds_f32ref.npy (the bf16 model's weights upcast to f32
 * and run in f32 by HF: what a runtime computing in f32 from bf16 weights must reproduce).
 * Models come from $VLMD_TEST_MODELS (tests/run.sh generates them with tools/make_model.py). */
#include <dirent.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/test.h"
#include "tests/unit/vision_test_util.h"
#include "vision/vision.h"

/* f32 weights and activations. The float64 numpy re-implementation in tools/make_fixtures.py agrees
 * with HF to 2.4e-6 (tools/README.md); our f32 path uses other summation orders (BLAS, blocked
 * softmax), measured max |diff| 2.4e-6..2.6e-6 on the three models; 5e-5 leaves a 20x margin while
 * staying far below any real error (a wrong rotary or window order moves values by > 1e-1). */
#define VIT_F32_TOL 5e-5
/* bf16 model vs image_embeds_f32ref: the same computation (f32 from bf16 weights), same bound. */
#define VIT_BF16_F32REF_TOL 5e-5

static const char *models_dir(void) { return getenv("VLMD_TEST_MODELS"); }

static void run_model(const char *name, int *ncases) {
    char path[512], err[512] = "";
    snprintf(path, sizeof path, "%s/%s", models_dir(), name);
    vlm_model *m = NULL;
    vlm_load_opts lo = {0};
    vlm_status st = vlm_model_load(path, &lo, &m, err, sizeof err);
    CHECKF(st == VLM_OK, "load %s: %s", path, err);
    if (st != VLM_OK) return;
    vlm_vit *v = NULL;
    st = vlm_vit_load(m, &v, err, sizeof err);
    CHECKF(st == VLM_OK, "vit load %s: %s", name, err);
    if (st != VLM_OK) {
        vlm_model_free(m);
        return;
    }
    const vlm_model_config *cfg = vlm_model_cfg(m);
    const int hid = cfg->vision.out_hidden;
    int bf16 = strstr(name, "bf16") != NULL;
    char fdir[512];
    snprintf(fdir, sizeof fdir, "tests/fixtures/qwen2vl/%s", name);
    DIR *d = opendir(fdir);
    CHECK(d != NULL);
    struct dirent *e;
    double worst = 0, worst_bf16 = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char cj[1024];
        snprintf(cj, sizeof cj, "%s/%s/case.json", fdir, e->d_name);
        cJSON *j = vt_read_json(cj);
        if (!j) continue;
        const cJSON *pv = cJSON_GetObjectItem(j, "pixel_values");
        if (!pv) {
            cJSON_Delete(j);
            continue;
        }
        int64_t ps[4], es[4], es2[4];
        int pn = 0, en = 0, en2 = 0;
        float *pix = vt_read_npy(cJSON_GetObjectItem(pv, "file")->valuestring, ps, &pn);
        char ep[1024];
        snprintf(ep, sizeof ep, "%s/%s/%s", fdir, e->d_name, bf16 ? "image_embeds_f32ref.npy" : "image_embeds.npy");
        float *ref = vt_read_npy(ep, es, &en);
        float *ref_bf16 = NULL;
        if (bf16) {
            snprintf(ep, sizeof ep, "%s/%s/image_embeds.npy", fdir, e->d_name);
            ref_bf16 = vt_read_npy(ep, es2, &en2);
        }
        CHECKF(pix && ref && pn == 2 && en == 2 && es[1] == hid, "%s: fixture arrays", cj);
        if (pix && ref) {
            int64_t row = 0, orow = 0;
            double md = 0, md2 = 0;
            const cJSON *g;
            cJSON_ArrayForEach(g, cJSON_GetObjectItem(j, "image_grid_thw")) {
                vlm_pixels px = {0};
                px.grid_thw[0] = cJSON_GetArrayItem(g, 0)->valueint;
                px.grid_thw[1] = cJSON_GetArrayItem(g, 1)->valueint;
                px.grid_thw[2] = cJSON_GetArrayItem(g, 2)->valueint;
                px.n_patches = (int64_t)px.grid_thw[0] * px.grid_thw[1] * px.grid_thw[2];
                px.patch_dim = ps[1];
                px.n_tokens = px.n_patches / 4;
                px.pixel_values = pix + row * ps[1];
                CHECK(row + px.n_patches <= ps[0] && orow + px.n_tokens <= es[0]);
                if (row + px.n_patches > ps[0] || orow + px.n_tokens > es[0]) break;
                float *out = malloc((size_t)px.n_tokens * hid * sizeof(float));
                st = vlm_vit_encode(v, &px, out, err, sizeof err);
                CHECKF(st == VLM_OK, "%s: %s", cj, err);
                for (int64_t i = 0; st == VLM_OK && i < px.n_tokens * hid; i++) {
                    double dd = fabs((double)out[i] - ref[orow * hid + i]);
                    if (dd > md || dd != dd) md = dd != dd ? 1e30 : dd;
                    if (ref_bf16) {
                        dd = fabs((double)out[i] - ref_bf16[orow * hid + i]);
                        if (dd > md2) md2 = dd;
                    }
                }
                free(out);
                row += px.n_patches;
                orow += px.n_tokens;
            }
            CHECKF(row == ps[0] && orow == es[0], "%s: consumed %lld/%lld rows", cj, (long long)row, (long long)ps[0]);
            CHECKF(md <= (bf16 ? VIT_BF16_F32REF_TOL : VIT_F32_TOL), "%s: max |diff| %.3g", cj, md);
            if (md > worst) worst = md;
            if (md2 > worst_bf16) worst_bf16 = md2;
            (*ncases)++;
        }
        free(pix);
        free(ref);
        free(ref_bf16);
        cJSON_Delete(j);
    }
    if (d) closedir(d);
    printf("vit %s: image_embeds max |diff| %.3g vs %s%s", name, worst,
           bf16 ? "image_embeds_f32ref" : "image_embeds", bf16 ? "" : "\n");
    if (bf16) printf(" (%.3g vs HF's own bf16 run)\n", worst_bf16);
    vlm_vit_free(v);
    vlm_model_free(m);
}

static void test_vit_vs_transformers(void) {
    if (!models_dir()) {
        printf("SKIP test_vit_vs_transformers: VLMD_TEST_MODELS unset\n");
        return;
    }
    int n = 0;
    run_model("tiny-f32-tied", &n);
    run_model("small-f32-hd32", &n);
    run_model("tiny-bf16-untied", &n);
    CHECK(n >= 14);
}

/* Preprocess + encode from the image file: the path the server takes. */
static void test_vit_end_to_end(void) {
    if (!models_dir()) return;
    char path[512], err[512] = "";
    snprintf(path, sizeof path, "%s/tiny-f32-tied", models_dir());
    vlm_model *m = NULL;
    vlm_load_opts lo = {0};
    if (vlm_model_load(path, &lo, &m, err, sizeof err) != VLM_OK) {
        CHECKF(0, "%s", err);
        return;
    }
    vlm_vit *v = NULL;
    CHECK(vlm_vit_load(m, &v, err, sizeof err) == VLM_OK);
    vlm_image img;
    CHECK(vlm_img_load_file("tests/data/images/odd_150x97.png", NULL, &img, err, sizeof err) == VLM_OK);
    vlm_pixels px;
    CHECK(vlm_qwen_preprocess(vlm_model_cfg(m), &img, NULL, &px, err, sizeof err) == VLM_OK);
    int64_t es[4];
    int en = 0;
    float *ref = vt_read_npy("tests/fixtures/qwen2vl/tiny-f32-tied/image_odd/image_embeds.npy", es, &en);
    CHECK(ref && es[0] == px.n_tokens);
    if (ref && v && es[0] == px.n_tokens) {
        int hid = vlm_model_cfg(m)->vision.out_hidden;
        float *out = malloc((size_t)px.n_tokens * hid * sizeof(float));
        CHECK(vlm_vit_encode(v, &px, out, err, sizeof err) == VLM_OK);
        double md = 0;
        for (int64_t i = 0; i < px.n_tokens * hid; i++) md = fmax(md, fabs((double)out[i] - ref[i]));
        printf("vit end-to-end (file -> embeds) odd_150x97: max |diff| %.3g\n", md);
        CHECK(md <= VIT_F32_TOL);
        /* the same encode one block per call (the server's slices between decode steps): one run
         * per block plus nothing more, and the very same floats */
        float *out2 = malloc((size_t)px.n_tokens * hid * sizeof(float));
        vlm_vit_job *job = NULL;
        CHECK(vlm_vit_job_begin(v, &px, out2, &job, err, sizeof err) == VLM_OK);
        int runs = 0;
        bool done = false;
        while (job && !done && runs < 1000) {
            CHECK(vlm_vit_job_run(job, 1, &done, err, sizeof err) == VLM_OK);
            runs++;
        }
        vlm_vit_job_free(job);
        CHECKF(runs == vlm_model_cfg(m)->vision.depth && done, "sliced encode: %d runs for %d blocks", runs,
               vlm_model_cfg(m)->vision.depth);
        CHECK(!memcmp(out, out2, (size_t)px.n_tokens * hid * sizeof(float)));
        free(out2);
        /* a grid that does not match the pixel rows is refused, not read out of bounds */
        px.grid_thw[1] += 2;
        CHECK(vlm_vit_encode(v, &px, out, err, sizeof err) == VLM_E_INVALID);
        CHECK(vlm_vit_job_begin(v, &px, out, &job, err, sizeof err) == VLM_E_INVALID && job == NULL);
        free(out);
    }
    free(ref);
    vlm_pixels_free(&px);
    vlm_img_free(&img);
    vlm_vit_free(v);
    vlm_model_free(m);
}

int main(void) {
    vlm_cpu_init(0);
    RUN(test_vit_vs_transformers);
    RUN(test_vit_end_to_end);
    TEST_MAIN_END("vision_vit");
}
