/* bench/vision.c — Qwen2-VL vision encode time (preprocess + ViT + merger) on a real-size model.
 *
 *   build/bench/vision MODEL_DIR [threads=2] [reps=1] [max_side=1344]
 *
 * Encodes a synthetic 448x448 and a 1344x1344 RGB image (smooth gradients plus noise; the ViT
 * cost depends only on the patch count) and prints one table row per size with the CPU and
 * kernel path. Baseline for comparison (llama.cpp mtmd, Qwen2-VL-2B vision, 2 threads, as given
 * in the task brief): 448x448 9.9 s (AMD) / 8.05 s (Intel AMX); 1344x1344 248 s. */
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
    uint32_t s = 12345;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++) {
                s = s * 1664525u + 1013904223u;
                int v = (x * 255 / w + y * 255 / h * (c + 1) / 3 + (int)(s >> 28)) & 255;
                img->rgb[((size_t)y * w + x) * 3 + c] = (uint8_t)v;
            }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [threads=2] [reps=1] [max_side=1344]\n", argv[0]);
        return 2;
    }
    int threads = argc > 2 ? atoi(argv[2]) : 2, reps = argc > 3 ? atoi(argv[3]) : 1;
    vlm_cpu_init(threads);
    char err[512] = "";
    vlm_model *m = NULL;
    vlm_load_opts lo = {0};
    lo.threads = threads;
    double t0 = now();
    if (vlm_model_load(argv[1], &lo, &m, err, sizeof err) != VLM_OK) {
        fprintf(stderr, "load %s: %s\n", argv[1], err);
        return 1;
    }
    vlm_vit *v = NULL;
    if (vlm_vit_load(m, &v, err, sizeof err) != VLM_OK) {
        fprintf(stderr, "vit: %s\n", err);
        vlm_model_free(m);
        return 1;
    }
    const vlm_model_config *cfg = vlm_model_cfg(m);
    printf("vision bench: model=%s load=%.2fs threads=%d cpu=\"%s\"\n", argv[1], now() - t0,
           vlm_cpu_threads(), vlm_cpu_describe());
    printf("vit: depth=%d embed=%d heads=%d mlp=%d out=%d\n", cfg->vision.depth, cfg->vision.embed_dim,
           cfg->vision.num_heads, cfg->vision.mlp_hidden, cfg->vision.out_hidden);
    printf("%-10s %8s %7s %12s %12s %14s\n", "image", "patches", "tokens", "preproc_s", "vit_s",
           "llama.cpp_s");
    { /* untimed warm-up: the first encode faults the mmapped weights in from the page cache (or
       * disk), which would be charged to whichever size runs first */
        vlm_image img;
        vlm_pixels px = {0};
        synth(&img, 224, 224);
        if (vlm_qwen_preprocess(cfg, &img, NULL, &px, err, sizeof err) == VLM_OK) {
            float *out = malloc((size_t)px.n_tokens * cfg->vision.out_hidden * sizeof(float));
            vlm_vit_encode(v, &px, out, err, sizeof err);
            free(out);
        }
        vlm_pixels_free(&px);
        vlm_img_free(&img);
    }
    const int sizes[2] = {448, 1344};
    const char *base[2] = {"9.9/8.05", "248"};
    int rc = 0;
    const int max_side = argc > 4 ? atoi(argv[4]) : 1344;
    for (int si = 0; si < 2 && sizes[si] <= max_side; si++) {
        vlm_image img;
        synth(&img, sizes[si], sizes[si]);
        double best_pp = 1e30, best_vit = 1e30;
        vlm_pixels px = {0};
        for (int r = 0; r < reps; r++) {
            vlm_pixels_free(&px);
            double a = now();
            if (vlm_qwen_preprocess(cfg, &img, NULL, &px, err, sizeof err) != VLM_OK) {
                fprintf(stderr, "preprocess: %s\n", err);
                rc = 1;
                break;
            }
            double b = now();
            float *out = malloc((size_t)px.n_tokens * cfg->vision.out_hidden * sizeof(float));
            if (vlm_vit_encode(v, &px, out, err, sizeof err) != VLM_OK) {
                fprintf(stderr, "encode: %s\n", err);
                rc = 1;
            }
            double c = now();
            free(out);
            if (b - a < best_pp) best_pp = b - a;
            if (c - b < best_vit) best_vit = c - b;
        }
        char name[32];
        snprintf(name, sizeof name, "%dx%d", sizes[si], sizes[si]);
        printf("%-10s %8lld %7lld %12.3f %12.2f %14s\n", name, (long long)px.n_patches,
               (long long)px.n_tokens, best_pp, best_vit, base[si]);
        fflush(stdout);
        vlm_pixels_free(&px);
        vlm_img_free(&img);
    }
    vlm_vit_free(v);
    vlm_model_free(m);
    return rc;
}
