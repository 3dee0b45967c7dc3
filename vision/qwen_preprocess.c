/* qwen_preprocess.c — Qwen2-VL image preprocessing: RGB image -> pixel_values + grid_thw.
 *
 * Follows the reference the fixtures record (transformers 5.24, PIL path, SPEC §E with the
 * differences listed in tools/README.md): smart_resize, PIL bicubic resize (resize.c), x/255 via
 * an exact table, (x - mean) / std in f32, the still image repeated to temporal_patch_size
 * frames, and the patch flattening of SPEC §E.4 (merge-window row order, (c, τ, y, x) columns). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "vision/vis_internal.h"

vlm_status vlm_qwen_smart_resize(int64_t h, int64_t w, int factor, int64_t min_pixels,
                                 int64_t max_pixels, int64_t *out_h, int64_t *out_w,
                                 char *err, size_t errlen) {
    if (h <= 0 || w <= 0 || factor <= 0)
        return vis_err(err, errlen, VLM_E_INVALID, "smart_resize: bad size %lldx%lld (factor %d)",
                       (long long)h, (long long)w, factor);
    double H = (double)h, W = (double)w, F = (double)factor;
    double aspect = (H > W ? H : W) / (H < W ? H : W);
    if (aspect > 200.0)
        return vis_err(err, errlen, VLM_E_LIMIT,
                       "absolute aspect ratio must be smaller than 200, got %.6g", aspect);
    /* Python round(): half to even; nearbyint uses the default (to-nearest-even) mode. */
    int64_t hb = (int64_t)nearbyint(H / F) * factor;
    int64_t wb = (int64_t)nearbyint(W / F) * factor;
    if ((double)hb * (double)wb > (double)max_pixels) {
        double beta = sqrt(H * W / (double)max_pixels);
        hb = (int64_t)floor(H / beta / F) * factor;
        wb = (int64_t)floor(W / beta / F) * factor;
        if (hb < factor) hb = factor; /* 5.24 clamps each side to >= factor in this branch */
        if (wb < factor) wb = factor;
    } else if ((double)hb * (double)wb < (double)min_pixels) {
        double beta = sqrt((double)min_pixels / (H * W));
        hb = (int64_t)ceil(H * beta / F) * factor;
        wb = (int64_t)ceil(W * beta / F) * factor;
    }
    if (hb <= 0 || wb <= 0) /* e.g. min_pixels 0 with a side below factor/2 */
        return vis_err(err, errlen, VLM_E_INVALID,
                       "smart_resize: %lldx%lld with min_pixels %lld gives an empty side",
                       (long long)h, (long long)w, (long long)min_pixels);
    *out_h = hb;
    *out_w = wb;
    return VLM_OK;
}

void vlm_pixels_free(vlm_pixels *p) {
    if (!p) return;
    free(p->pixel_values);
    memset(p, 0, sizeof *p);
}

vlm_status vlm_qwen_preprocess(const vlm_model_config *cfg, const vlm_image *img,
                               const vlm_pp_opts *opts, vlm_pixels *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    const vlm_vision_config *vc = &cfg->vision;
    const int P = vc->patch_size, T = vc->temporal_patch_size, M = vc->spatial_merge_size;
    const int C = 3;
    if (P <= 0 || T <= 0 || M <= 0)
        return vis_err(err, errlen, VLM_E_INVALID, "vision config lacks patch/merge sizes");
    if (!img || !img->rgb || img->width <= 0 || img->height <= 0)
        return vis_err(err, errlen, VLM_E_INVALID, "empty image");
    int64_t minp = cfg->min_pixels, maxp = cfg->max_pixels;
    if (opts && opts->min_pixels > 0) minp = opts->min_pixels;
    if (opts && opts->max_pixels > 0) maxp = opts->max_pixels;
    if (minp > maxp)
        return vis_err(err, errlen, VLM_E_INVALID, "min_pixels %lld exceeds max_pixels %lld",
                       (long long)minp, (long long)maxp);
    int64_t rh, rw;
    vlm_status st = vlm_qwen_smart_resize(img->height, img->width, P * M, minp, maxp, &rh, &rw,
                                          err, errlen);
    if (st != VLM_OK) return st;
    if (rh > 65536 || rw > 65536)
        return vis_err(err, errlen, VLM_E_LIMIT, "resized image %lldx%lld too large",
                       (long long)rh, (long long)rw);

    vlm_image rs;
    st = vlm_img_resize_bicubic(img, (int)rw, (int)rh, &rs);
    if (st != VLM_OK) return vis_err(err, errlen, st, "resize to %lldx%lld failed", (long long)rw,
                                     (long long)rh);

    /* value[c][byte] = (f32(byte / 255 in f64) - mean_c) / std_c, all in f32 as the reference. */
    float table[3][256];
    for (int c = 0; c < C; c++)
        for (int b = 0; b < 256; b++) {
            float x = (float)((double)b / 255.0);
            table[c][b] = (x - cfg->image_mean[c]) / cfg->image_std[c];
        }

    const int64_t gh = rh / P, gw = rw / P;
    const int64_t np = gh * gw; /* one temporal slice: t = 1 for a still image */
    const int64_t pd = (int64_t)C * T * P * P;
    float *pv = malloc((size_t)np * (size_t)pd * sizeof(float));
    if (!pv) {
        vlm_img_free(&rs);
        return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for %lld patches", (long long)np);
    }
    /* row k = (bh·(gw/M) + bw)·M² + mh·M + mw; column j = c·T·P² + τ·P² + py·P + px. */
    const int64_t bwn = gw / M;
#pragma omp parallel for schedule(static) if (np > 1024)
    for (int64_t k = 0; k < np; k++) {
        int64_t win = k / (M * M), inw = k % (M * M);
        int64_t r = (win / bwn) * M + inw / M, cc = (win % bwn) * M + inw % M;
        float *row = pv + k * pd;
        for (int c = 0; c < C; c++)
            for (int py = 0; py < P; py++) {
                const uint8_t *src = rs.rgb + ((size_t)(r * P + py) * rw + (size_t)cc * P) * 3 + c;
                float *d0 = row + (int64_t)c * T * P * P + py * P;
                for (int px = 0; px < P; px++) d0[px] = table[c][src[3 * px]];
                for (int t = 1; t < T; t++) memcpy(d0 + (int64_t)t * P * P, d0, P * sizeof(float));
            }
    }
    vlm_img_free(&rs);
    out->pixel_values = pv;
    out->n_patches = np;
    out->patch_dim = pd;
    out->grid_thw[0] = 1;
    out->grid_thw[1] = (int32_t)gh;
    out->grid_thw[2] = (int32_t)gw;
    out->n_tokens = np / (M * M);
    return VLM_OK;
}
