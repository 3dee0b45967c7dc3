/* vis_internal.h — helpers shared by the vision/ sources only (not part of the public API).
 *
 * vis_err formats an error message like vlm_errf; it is local so that the decode and
 * preprocessing code depends on nothing from runtime/ except the status enum. */
#ifndef VLM_VIS_INTERNAL_H
#define VLM_VIS_INTERNAL_H

#include <stdarg.h>
#include <stdio.h>

#include "vision/vision.h"

static inline vlm_status vis_err(char *buf, size_t len, vlm_status st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static inline vlm_status vis_err(char *buf, size_t len, vlm_status st, const char *fmt, ...) {
    if (buf && len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, len, fmt, ap);
        va_end(ap);
    }
    return st;
}

/* Bytes the image decoders (stb_image, libjpeg-turbo and libwebp output) asked for since start-up; lets tests prove
 * that a refused image never reached the pixel decoder. Monotonic, thread-safe. */
size_t vlm_img_decoder_bytes(void);

/* PIL's alpha_composite of (c, a) over opaque white, then convert("RGB"): transformers 5.24
 * convert_to_rgb. Exact integer form, checked against Pillow for all 65536 pairs (tools/README.md). */
static inline uint8_t vis_over_white(unsigned c, unsigned a) {
    if (a == 0) return 255;
    unsigned t = (c * a + 255u * (255u - a) + 128u) * 128u;
    return (uint8_t)((((t >> 8) + t) >> 8) >> 7);
}

#endif
