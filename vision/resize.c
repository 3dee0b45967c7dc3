/* resize.c — PIL-compatible BICUBIC resize of 8-bit RGB images.
 *
 * Qwen2-VL's reference preprocessing calls Pillow's Image.resize(BICUBIC) on the uint8 image, so
 * matching the reference bit for bit means reproducing Pillow's fixed-point separable resampler
 * (libImaging/Resample.c), described in SPEC §E.6:
 *   - Keys cubic kernel, a = -0.5, support 2, widened by the scale factor when downscaling
 *     (antialiasing); coefficients computed in double, normalised to sum 1;
 *   - taps for output i: centre = (i + 0.5)·scale, first tap (int)(centre - support + 0.5),
 *     last tap (int)(centre + support + 0.5), clamped to the image;
 *   - coefficients quantised to 22-bit fixed point, rounding half away from zero;
 *   - accumulation starts at 2^21 (rounding), result clip8(sum >> 22);
 *   - two passes through a uint8 intermediate: horizontal first, except that Pillow 13 runs
 *     the vertical pass first when the height shrinks much more than the width (see below);
 *   - a pass whose size does not change is skipped; same size overall is a plain copy. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "vision/vis_internal.h"

#define PRECISION_BITS 22 /* Pillow: 32 - 8 - 2 */

static double bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* Per output position: first tap, tap count, and ksize fixed-point weights. Returns ksize, or -1
 * on allocation failure. */
static int precompute(int in_size, int out_size, int **bounds_out, int32_t **k_out) {
    const double support0 = 2.0;
    double scale = (double)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = support0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *kk = calloc((size_t)out_size * ksize, sizeof(double));
    int *bounds = malloc((size_t)out_size * 2 * sizeof(int));
    int32_t *kq = calloc((size_t)out_size * ksize, sizeof(int32_t));
    if (!kk || !bounds || !kq) {
        free(kk);
        free(bounds);
        free(kq);
        return -1;
    }
    double ss = 1.0 / filterscale;
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double *k = kk + (size_t)xx * ksize;
        double ww = 0.0;
        for (int x = 0; x < xmax; x++) {
            double w = bicubic((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (int x = 0; x < xmax; x++)
            if (ww != 0.0) k[x] /= ww;
        bounds[xx * 2 + 0] = xmin;
        bounds[xx * 2 + 1] = xmax;
    }
    for (size_t i = 0; i < (size_t)out_size * ksize; i++) {
        double v = kk[i] * (1 << PRECISION_BITS);
        kq[i] = (int32_t)(kk[i] < 0 ? -0.5 + v : 0.5 + v);
    }
    free(kk);
    *bounds_out = bounds;
    *k_out = kq;
    return ksize;
}

static inline uint8_t clip8(int64_t v) {
    v >>= PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* in: [h][in_w][3] -> out: [h][out_w][3] */
static vlm_status pass_h(const uint8_t *in, int in_w, int h, uint8_t *out, int out_w) {
    int *bounds;
    int32_t *kq;
    int ksize = precompute(in_w, out_w, &bounds, &kq);
    if (ksize < 0) return VLM_E_NOMEM;
#pragma omp parallel for schedule(static) if ((int64_t)h * out_w > 65536)
    for (int y = 0; y < h; y++) {
        const uint8_t *row = in + (size_t)y * in_w * 3;
        uint8_t *orow = out + (size_t)y * out_w * 3;
        for (int xx = 0; xx < out_w; xx++) {
            int xmin = bounds[2 * xx], xn = bounds[2 * xx + 1];
            const int32_t *k = kq + (size_t)xx * ksize;
            int64_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
            for (int x = 0; x < xn; x++) {
                const uint8_t *p = row + (size_t)(x + xmin) * 3;
                s0 += p[0] * (int64_t)k[x];
                s1 += p[1] * (int64_t)k[x];
                s2 += p[2] * (int64_t)k[x];
            }
            orow[3 * xx + 0] = clip8(s0);
            orow[3 * xx + 1] = clip8(s1);
            orow[3 * xx + 2] = clip8(s2);
        }
    }
    free(bounds);
    free(kq);
    return VLM_OK;
}

/* in: [in_h][w][3] -> out: [out_h][w][3] */
static vlm_status pass_v(const uint8_t *in, int w, int in_h, uint8_t *out, int out_h) {
    int *bounds;
    int32_t *kq;
    int ksize = precompute(in_h, out_h, &bounds, &kq);
    if (ksize < 0) return VLM_E_NOMEM;
    size_t stride = (size_t)w * 3;
#pragma omp parallel for schedule(static) if ((int64_t)out_h * w > 65536)
    for (int yy = 0; yy < out_h; yy++) {
        int ymin = bounds[2 * yy], yn = bounds[2 * yy + 1];
        const int32_t *k = kq + (size_t)yy * ksize;
        uint8_t *orow = out + (size_t)yy * stride;
        for (size_t i = 0; i < stride; i++) {
            int64_t s = 1 << (PRECISION_BITS - 1);
            for (int y = 0; y < yn; y++) s += in[(size_t)(y + ymin) * stride + i] * (int64_t)k[y];
            orow[i] = clip8(s);
        }
    }
    free(bounds);
    free(kq);
    return VLM_OK;
}

vlm_status vlm_img_resize_bicubic(const vlm_image *src, int out_w, int out_h, vlm_image *dst) {
    memset(dst, 0, sizeof *dst);
    if (!src || !src->rgb || src->width <= 0 || src->height <= 0 || out_w <= 0 || out_h <= 0)
        return VLM_E_INVALID;
    int iw = src->width, ih = src->height;
    uint8_t *out = malloc((size_t)out_w * out_h * 3);
    if (!out) return VLM_E_NOMEM;
    vlm_status st = VLM_OK;
    if (out_w == iw && out_h == ih) {
        memcpy(out, src->rgb, (size_t)iw * ih * 3); /* PIL returns a copy without filtering */
    } else if (out_w == iw) {
        st = pass_v(src->rgb, iw, ih, out, out_h);
    } else if (out_h == ih) {
        st = pass_h(src->rgb, iw, ih, out, out_w);
    } else if (out_h < ih && ih - out_h > 2 * (int64_t)(iw - out_w)) {
        /* Pillow 13 (PR 9549) runs the vertical pass first when the height shrinks by more
         * than twice as many pixels as the width: out_h < in_h and (in_h - out_h) > 2 (in_w - out_w). Derived
         * and checked against Pillow 13.0 on ~480 random and boundary (±1) size pairs. */
        uint8_t *tmp = malloc((size_t)iw * out_h * 3);
        if (!tmp) st = VLM_E_NOMEM;
        else {
            st = pass_v(src->rgb, iw, ih, tmp, out_h);
            if (st == VLM_OK) st = pass_h(tmp, iw, out_h, out, out_w);
            free(tmp);
        }
    } else {
        uint8_t *tmp = malloc((size_t)out_w * ih * 3); /* uint8 intermediate, as Pillow */
        if (!tmp) st = VLM_E_NOMEM;
        else {
            st = pass_h(src->rgb, iw, ih, tmp, out_w);
            if (st == VLM_OK) st = pass_v(tmp, out_w, ih, out, out_h);
            free(tmp);
        }
    }
    if (st != VLM_OK) {
        free(out);
        return st;
    }
    dst->rgb = out;
    dst->width = out_w;
    dst->height = out_h;
    return VLM_OK;
}
