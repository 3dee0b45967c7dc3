/* bench/nvlm.c — NVLM-D path speed on a scaled-down model: InternViT encode time per 448x448 tile
 * (preprocess excluded and included) and decode tokens/s of the shared decoder with image rows in the prompt.
 *
 *   nice -n 15 python3 tools/make_nvlm.py --bench-model build/models/nvlm-bench
 *   build/bench/nvlm build/models/nvlm-bench [threads=2] [reps=2]
 *
 * The scaled model (tools/make_nvlm.py): InternViT hidden 640, 5 + 7 dummy heads of 128, 4 layers, MLP
 * 2560, full 1025-token tiles; mlp1 2560 -> 1536 -> 512; decoder 2 layers, hidden 512, bf16. The real
 * InternViT-6B is 3200 wide, 45 layers: per tile it costs roughly (3200/640)^2 * 45/4 = 281x the matmul
 * work of this one (attention 5x45/4 = 56x), which the table extrapolates from the measured split. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vision/vision.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void synth(vlm_image *img, int w, int h) {
    img->width = w;
    img->height = h;
    img->rgb = malloc((size_t)w * h * 3);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++)
                img->rgb[((size_t)y * w + x) * 3 + c] = (uint8_t)((7 * x + 13 * y + 50 * c + 3 * ((x * y) % 31)) & 255);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [threads=2] [reps=2]\n", argv[0]);
        return 2;
    }
    int threads = argc > 2 ? atoi(argv[2]) : 2, reps = argc > 3 ? atoi(argv[3]) : 2;
    if (reps < 1) reps = 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    char err[512];
    vlm_load_opts lo = {.threads = threads};
    vlm_model *m = NULL;
    if (vlm_model_load(argv[1], &lo, &m, err, sizeof err)) { fprintf(stderr, "load: %s\n", err); return 1; }
    const vlm_model_config *cfg = vlm_model_cfg(m);
    vlm_internvit *vit = NULL;
    if (vlm_internvit_load(m, &vit, err, sizeof err)) { fprintf(stderr, "vit: %s\n", err); return 1; }
    printf("cpu: %s, threads %d\n", vlm_cpu_describe(), threads);
    printf("model: InternViT hidden %d heads %d layers %d mlp %d, decoder hidden %d layers %d\n", cfg->nvlm.vit_hidden,
           cfg->nvlm.vit_heads, cfg->nvlm.vit_layers, cfg->nvlm.vit_intermediate, cfg->hidden, cfg->n_layers);
    printf("%-10s %6s %12s %12s %14s\n", "image", "tiles", "preproc_ms", "encode_ms", "encode_ms/tile");
    static const int sizes[][2] = {{448, 448}, {1344, 896}};
    float *emb = NULL;
    vlm_pixels keep = {0};
    for (int si = 0; si < 2; si++) {
        vlm_image img;
        synth(&img, sizes[si][0], sizes[si][1]);
        double best_pp = 1e30, best_enc = 1e30;
        vlm_pixels px = {0};
        for (int r = 0; r < reps; r++) {
            vlm_pixels_free(&px);
            double t0 = now();
            if (vlm_nvlm_preprocess(cfg, &img, &px, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
            double t1 = now();
            free(emb);
            emb = malloc(sizeof(float) * (size_t)px.n_tokens * cfg->hidden);
            if (vlm_internvit_encode(vit, &px, emb, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
            double t2 = now();
            if (t1 - t0 < best_pp) best_pp = t1 - t0;
            if (t2 - t1 < best_enc) best_enc = t2 - t1;
        }
        char name[32];
        snprintf(name, sizeof name, "%dx%d", sizes[si][0], sizes[si][1]);
        printf("%-10s %6lld %12.1f %12.1f %14.1f\n", name, (long long)px.n_patches, best_pp * 1e3, best_enc * 1e3,
               best_enc * 1e3 / (double)px.n_patches);
        vlm_img_free(&img);
        if (si == 0) keep = px;
        else vlm_pixels_free(&px);
    }
    /* decode with the first image (1 tile = 256 rows) in the prompt */
    free(emb);
    emb = malloc(sizeof(float) * (size_t)keep.n_tokens * cfg->hidden);
    vlm_internvit_encode(vit, &keep, emb, err, sizeof err);
    int n = 8 + (int)keep.n_tokens;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++) ids[i] = (i >= 4 && i < 4 + keep.n_tokens) ? cfg->image_token_id : 10 + i % 50;
    vlm_image_embeds im = {.grid_thw = {1, 16, 16}, .embeds = emb, .n_tokens = keep.n_tokens};
    vlm_seq_desc d = {0};
    d.prompt = ids;
    d.n_prompt = n;
    d.images = &im;
    d.n_images = 1;
    vlm_sampling_default(&d.sampling);
    d.max_tokens = 128;
    d.ignore_eos = true;
    vlm_engine_opts eo = {.threads = threads, .max_seqs = 1, .max_batch_tokens = 512};
    vlm_engine *e = NULL;
    if (vlm_engine_create(m, &eo, &e, err, sizeof err)) { fprintf(stderr, "engine: %s\n", err); return 1; }
    uint64_t id;
    vlm_engine_add(e, &d, &id, err, sizeof err);
    vlm_token_event ev[4];
    int got = 0;
    double t_first = 0, t0 = now();
    while (vlm_engine_active(e)) {
        int ne = vlm_engine_step(e, ev, 4);
        for (int i = 0; i < ne; i++)
            if (ev[i].token >= 0 && got++ == 0) t_first = now();
    }
    double t_end = now();
    printf("decode: prompt %d tokens (256 image rows), prefill+first %.1f ms, %d tokens at %.1f tokens/s\n", n,
           (t_first - t0) * 1e3, got - 1, (got - 1) / (t_end - t_first));
    vlm_engine_free(e);
    free(ids);
    free(emb);
    vlm_pixels_free(&keep);
    vlm_internvit_free(vit);
    vlm_model_free(m);
    return 0;
}
