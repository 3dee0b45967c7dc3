/* image.c — encoded image bytes -> 8-bit RGB, with every limit checked from the header first.
 *
 * PNG, BMP, GIF (first frame) go through stb_image, JPEG through libjpeg-turbo, WebP through
 * libwebp. The header is read first (stbi_info_from_memory / jpeg_read_header / WebPGetFeatures)
 * and width, height, pixel count, aspect ratio and encoded size are checked before any pixel
 * buffer is allocated, so a decompression bomb (a tiny PNG declaring 30000x30000) costs nothing.
 *
 * JPEG is not left to stb_image: Debian's stb_image 2.27 writes past a Huffman table on a hostile
 * DHT segment and reads outside its tables on corrupt entropy data (tests/fuzz/fuzz_image.c found
 * both within seconds), and libjpeg-turbo is what Pillow decodes with, so the pixels now match the
 * reference exactly instead of within 2 LSB.
 *
 * Transparency follows the reference version the fixtures record (transformers 5.24
 * convert_to_rgb): any image with alpha is composited onto opaque white with Pillow's integer
 * alpha_composite; opaque images are unchanged (the formula is the identity at alpha 255), and
 * gray / palette images are expanded to RGB the way PIL's convert("RGB") does. */
#include <limits.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <webp/decode.h>

#include "vision/vis_internal.h"

/* Bytes requested by the pixel decoders (not by header probing), for vlm_img_decoder_bytes. */
static _Atomic size_t g_decoder_bytes;
static _Thread_local int t_in_pixel_decode;

size_t vlm_img_decoder_bytes(void) { return atomic_load(&g_decoder_bytes); }

static void *vis_stb_malloc(size_t n) {
    if (t_in_pixel_decode) atomic_fetch_add(&g_decoder_bytes, n);
    return malloc(n);
}
static void *vis_stb_realloc(void *p, size_t n) {
    if (t_in_pixel_decode) atomic_fetch_add(&g_decoder_bytes, n);
    return realloc(p, n);
}

#define STBI_MALLOC(sz) vis_stb_malloc(sz)
#define STBI_REALLOC(p, newsz) vis_stb_realloc(p, newsz)
#define STBI_FREE(p) free(p)
#define STBI_NO_STDIO
#define STBI_NO_LINEAR
#define STBI_NO_HDR
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#define STBI_ONLY_GIF
#define STB_IMAGE_IMPLEMENTATION
/* stb_image is third-party code; its own warnings are not ours to fix under -Werror. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wmisleading-indentation"
#pragma GCC diagnostic ignored "-Wshift-negative-value"
#pragma GCC diagnostic ignored "-Wtype-limits"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <stb/stb_image.h>
#pragma GCC diagnostic pop

void vlm_img_limits_default(vlm_img_limits *l) {
    l->max_width = 16384;
    l->max_height = 16384;
    l->max_pixels = 64ll * 1024 * 1024;
    l->max_aspect = 200.0;
    l->max_bytes = (size_t)32 << 20;
}

void vlm_img_free(vlm_image *img) {
    if (!img) return;
    free(img->rgb);
    img->rgb = NULL;
    img->width = img->height = 0;
}

static vlm_status check_dims(int64_t w, int64_t h, const vlm_img_limits *lim, const char *fmt,
                             char *err, size_t errlen) {
    if (w <= 0 || h <= 0)
        return vis_err(err, errlen, VLM_E_FORMAT, "%s image declares an empty size %lldx%lld", fmt,
                       (long long)w, (long long)h);
    if (w > lim->max_width || h > lim->max_height)
        return vis_err(err, errlen, VLM_E_LIMIT,
                       "image %lldx%lld exceeds the per-side limit %lldx%lld", (long long)w,
                       (long long)h, (long long)lim->max_width, (long long)lim->max_height);
    if (w * h > lim->max_pixels)
        return vis_err(err, errlen, VLM_E_LIMIT, "image %lldx%lld has %lld pixels, limit %lld",
                       (long long)w, (long long)h, (long long)(w * h), (long long)lim->max_pixels);
    double lo = (double)(w < h ? w : h), hi = (double)(w < h ? h : w);
    if (hi / lo > lim->max_aspect)
        return vis_err(err, errlen, VLM_E_LIMIT, "image %lldx%lld has aspect ratio %.1f, limit %.1f",
                       (long long)w, (long long)h, hi / lo, lim->max_aspect);
    return VLM_OK;
}

/* RGBA -> RGB over white, in place order-safe (reads 4 bytes ahead of the 3 it writes). */
static uint8_t *rgba_to_rgb(const uint8_t *rgba, int64_t npx) {
    uint8_t *rgb = malloc((size_t)npx * 3);
    if (!rgb) return NULL;
    for (int64_t i = 0; i < npx; i++) {
        unsigned a = rgba[4 * i + 3];
        rgb[3 * i + 0] = vis_over_white(rgba[4 * i + 0], a);
        rgb[3 * i + 1] = vis_over_white(rgba[4 * i + 1], a);
        rgb[3 * i + 2] = vis_over_white(rgba[4 * i + 2], a);
    }
    return rgb;
}

static uint32_t rd_be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint32_t rd_le32(const uint8_t *p) {
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

/* Declared size from a PNG IHDR, GIF logical screen or BMP info header (1 when found). */
static int header_dims(const uint8_t *b, size_t n, int64_t *w, int64_t *h) {
    if (n >= 24 && !memcmp(b, "\x89PNG\r\n\x1a\n", 8) && !memcmp(b + 12, "IHDR", 4)) {
        *w = rd_be32(b + 16);
        *h = rd_be32(b + 20);
        return 1;
    }
    if (n >= 10 && (!memcmp(b, "GIF87a", 6) || !memcmp(b, "GIF89a", 6))) {
        *w = b[6] | b[7] << 8;
        *h = b[8] | b[9] << 8;
        return 1;
    }
    if (n >= 26 && b[0] == 'B' && b[1] == 'M' && rd_le32(b + 14) >= 40) {
        *w = (int32_t)rd_le32(b + 18);
        int64_t hh = (int32_t)rd_le32(b + 22);
        *h = hh < 0 ? -hh : hh;
        return 1;
    }
    return 0;
}

/* ---- JPEG through libjpeg-turbo ----
 * Errors longjmp back to decode_jpeg (libjpeg's default error_exit calls exit()); warnings
 * (corrupt-data recoveries such as a truncated scan, filled with gray like Pillow's decode)
 * are not printed. A progress monitor caps the number of scans: a progressive JPEG may declare
 * thousands of tiny scans and cost minutes of CPU for a few kilobytes of input. */
#define JPEG_MAX_SCANS 1000

typedef struct {
    struct jpeg_error_mgr pub;
    struct jpeg_progress_mgr progress;
    jmp_buf jump;
    char msg[JMSG_LENGTH_MAX];
} jpeg_guard;

static void jpeg_on_error(j_common_ptr c) {
    jpeg_guard *g = (jpeg_guard *)c->err;
    c->err->format_message(c, g->msg);
    longjmp(g->jump, 1);
}
static void jpeg_on_message(j_common_ptr c) { (void)c; }
static void jpeg_on_progress(j_common_ptr c) {
    j_decompress_ptr d = (j_decompress_ptr)c;
    if (d->input_scan_number > JPEG_MAX_SCANS) {
        jpeg_guard *g = (jpeg_guard *)c->err;
        snprintf(g->msg, sizeof g->msg, "more than %d scans", JPEG_MAX_SCANS);
        longjmp(g->jump, 1);
    }
}

static int is_jpeg(const uint8_t *b, size_t n) { return n >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF; }

/* Pillow's CMYK -> RGB (Convert.c cmyk2rgb): nk = 255 - k; out = nk - c * nk / 255, rounded. */
static uint8_t cmyk_channel(unsigned c, unsigned k) {
    const unsigned nk = 255 - k, t = c * nk + 128;
    const int v = (int)nk - (int)((t + (t >> 8)) >> 8);
    return (uint8_t)(v < 0 ? 0 : v);
}

static vlm_status decode_jpeg(const uint8_t *bytes, size_t n, const vlm_img_limits *lim, vlm_image *out,
                              char *err, size_t errlen) {
    struct jpeg_decompress_struct d;
    jpeg_guard g;
    memset(&g, 0, sizeof g);
    d.err = jpeg_std_error(&g.pub);
    g.pub.error_exit = jpeg_on_error;
    g.pub.output_message = jpeg_on_message;
    uint8_t *volatile rgb = NULL, *volatile row = NULL;
    if (setjmp(g.jump)) {
        jpeg_destroy_decompress(&d);
        free(rgb);
        free(row);
        return vis_err(err, errlen, VLM_E_FORMAT, "corrupt or unsupported JPEG (%s)", g.msg);
    }
    jpeg_create_decompress(&d);
    g.progress.progress_monitor = jpeg_on_progress;
    d.progress = &g.progress;
    jpeg_mem_src(&d, bytes, (unsigned long)n);
    jpeg_read_header(&d, TRUE);
    vlm_status st = check_dims(d.image_width, d.image_height, lim, "JPEG", err, errlen);
    if (st != VLM_OK) {
        jpeg_destroy_decompress(&d);
        return st;
    }
    /* Pillow's defaults: islow IDCT, fancy upsampling; CMYK/YCCK come out as (Adobe-inverted
     * when marked so) CMYK and are converted below as Pillow's convert("RGB") does */
    const bool cmyk = d.jpeg_color_space == JCS_CMYK || d.jpeg_color_space == JCS_YCCK;
    d.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
    d.dct_method = JDCT_ISLOW;
    d.do_fancy_upsampling = TRUE;
    const int64_t w = d.image_width, h = d.image_height;
    atomic_fetch_add(&g_decoder_bytes, (size_t)(w * h * 3));
    rgb = malloc((size_t)(w * h * 3));
    row = malloc((size_t)w * 4);
    if (!rgb || !row) {
        jpeg_destroy_decompress(&d);
        free(rgb);
        free(row);
        return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for %lldx%lld image", (long long)w, (long long)h);
    }
    jpeg_start_decompress(&d);
    if ((int64_t)d.output_width != w || (int64_t)d.output_height != h ||
        d.output_components != (cmyk ? 4 : 3)) {
        snprintf(g.msg, sizeof g.msg, "unexpected output %ux%u x%d", d.output_width, d.output_height,
                 d.output_components);
        longjmp(g.jump, 1);
    }
    /* Adobe files store CMYK inverted; Pillow reads those as "CMYK;I" */
    const bool inverted = cmyk && d.saw_Adobe_marker;
    while (d.output_scanline < d.output_height) {
        const int64_t y = d.output_scanline;
        JSAMPROW r = cmyk ? row : rgb + y * w * 3;
        if (jpeg_read_scanlines(&d, &r, 1) != 1) break;
        if (cmyk)
            for (int64_t x = 0; x < w; x++) {
                uint8_t c[4];
                for (int i = 0; i < 4; i++) c[i] = inverted ? (uint8_t)(255 - row[4 * x + i]) : row[4 * x + i];
                for (int i = 0; i < 3; i++) rgb[(y * w + x) * 3 + i] = cmyk_channel(c[i], c[3]);
            }
    }
    jpeg_finish_decompress(&d);
    jpeg_destroy_decompress(&d);
    free(row);
    out->rgb = rgb;
    out->width = (int)w;
    out->height = (int)h;
    return VLM_OK;
}

/* stb_image grows its IDAT buffer to a chunk's declared length (up to 2 GiB) before checking that
 * the bytes exist, so a 2 KB PNG declaring a huge IDAT makes it allocate gigabytes
 * (tests/fuzz/fuzz_image.c). A well-formed PNG never declares a chunk longer than what follows
 * it, so every chunk up to IEND must fit in the data; 0 otherwise (then it is refused). */
static int png_chunks_fit(const uint8_t *b, size_t n) {
    if (n < 8 || memcmp(b, "\x89PNG\r\n\x1a\n", 8) != 0) return 1;
    size_t p = 8;
    while (p + 12 <= n) {
        const uint32_t len = rd_be32(b + p);
        if (len > n - p - 12) return 0;
        if (!memcmp(b + p + 4, "IEND", 4)) return 1;
        p += 12 + (size_t)len;
    }
    return 0; /* cut inside a chunk header, or no IEND */
}

/* The limits applied to the size a PNG/GIF/BMP header declares, for data stb will not decode:
 * a violation is reported as such rather than as corrupt data. VLM_OK when within the limits or
 * no size can be read. */
static vlm_status header_limits(const uint8_t *b, size_t n, const vlm_img_limits *lim, char *err,
                                size_t errlen) {
    int64_t w, h;
    return header_dims(b, n, &w, &h) ? check_dims(w, h, lim, "the", err, errlen) : VLM_OK;
}

static int is_webp(const uint8_t *b, size_t n) {
    return n >= 12 && !memcmp(b, "RIFF", 4) && !memcmp(b + 8, "WEBP", 4);
}

vlm_status vlm_img_decode(const uint8_t *bytes, size_t n, const vlm_img_limits *lim, vlm_image *out,
                          char *err, size_t errlen) {
    vlm_img_limits dl;
    if (!lim) {
        vlm_img_limits_default(&dl);
        lim = &dl;
    }
    memset(out, 0, sizeof *out);
    if (!bytes || n == 0) return vis_err(err, errlen, VLM_E_FORMAT, "empty image data");
    if (n > lim->max_bytes)
        return vis_err(err, errlen, VLM_E_LIMIT, "encoded image is %zu bytes, limit %zu", n,
                       lim->max_bytes);

    if (is_webp(bytes, n)) {
        WebPBitstreamFeatures f;
        if (WebPGetFeatures(bytes, n, &f) != VP8_STATUS_OK)
            return vis_err(err, errlen, VLM_E_FORMAT, "invalid WebP header");
        if (f.has_animation)
            return vis_err(err, errlen, VLM_E_UNSUPPORTED, "animated WebP is not supported");
        vlm_status st = check_dims(f.width, f.height, lim, "WebP", err, errlen);
        if (st != VLM_OK) return st;
        int w = 0, h = 0;
        atomic_fetch_add(&g_decoder_bytes, (size_t)f.width * (size_t)f.height * 4);
        uint8_t *rgba = WebPDecodeRGBA(bytes, n, &w, &h);
        if (!rgba) return vis_err(err, errlen, VLM_E_FORMAT, "corrupt or truncated WebP data");
        if (w != f.width || h != f.height) {
            WebPFree(rgba);
            return vis_err(err, errlen, VLM_E_FORMAT, "WebP size changed while decoding");
        }
        out->rgb = rgba_to_rgb(rgba, (int64_t)w * h);
        WebPFree(rgba);
        if (!out->rgb) return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for %dx%d image", w, h);
        out->width = w;
        out->height = h;
        return VLM_OK;
    }

    if (is_jpeg(bytes, n)) return decode_jpeg(bytes, n, lim, out, err, errlen);

    if (n > INT_MAX) return vis_err(err, errlen, VLM_E_LIMIT, "encoded image too large");
    if (!png_chunks_fit(bytes, n)) {
        /* limits first: a cut or lying PNG may still declare a size past them */
        vlm_status st = header_limits(bytes, n, lim, err, errlen);
        if (st != VLM_OK) return st;
        return vis_err(err, errlen, VLM_E_FORMAT, "corrupt or truncated PNG: a chunk runs past the end of the data");
    }
    int w = 0, h = 0, comp = 0;
    if (!stbi_info_from_memory(bytes, (int)n, &w, &h, &comp)) {
        /* stb refuses some huge declared sizes itself ("too large"); report those as limit
         * violations, with the size read from the header, rather than as corrupt data. */
        vlm_status st = header_limits(bytes, n, lim, err, errlen);
        if (st != VLM_OK) return st;
        return vis_err(err, errlen, VLM_E_FORMAT,
                       "unrecognised or corrupt image header (PNG, JPEG, BMP, GIF, WebP accepted)");
    }
    vlm_status st = check_dims(w, h, lim, "the", err, errlen);
    if (st != VLM_OK) return st;

    int w2 = 0, h2 = 0, c2 = 0;
    /* 4 components: stb expands gray (replicated), palette and tRNS transparency like PIL does. */
    t_in_pixel_decode = 1;
    uint8_t *rgba = stbi_load_from_memory(bytes, (int)n, &w2, &h2, &c2, 4);
    t_in_pixel_decode = 0;
    if (!rgba)
        return vis_err(err, errlen, VLM_E_FORMAT, "corrupt or truncated image data (%s)",
                       stbi_failure_reason() ? stbi_failure_reason() : "decoder error");
    if (w2 != w || h2 != h) {
        stbi_image_free(rgba);
        return vis_err(err, errlen, VLM_E_FORMAT, "image size changed while decoding");
    }
    out->rgb = rgba_to_rgb(rgba, (int64_t)w * h);
    stbi_image_free(rgba);
    if (!out->rgb) return vis_err(err, errlen, VLM_E_NOMEM, "out of memory for %dx%d image", w, h);
    out->width = w;
    out->height = h;
    return VLM_OK;
}

vlm_status vlm_img_load_file(const char *path, const vlm_img_limits *lim, vlm_image *out,
                             char *err, size_t errlen) {
    vlm_img_limits dl;
    if (!lim) {
        vlm_img_limits_default(&dl);
        lim = &dl;
    }
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "rb");
    if (!f) return vis_err(err, errlen, VLM_E_IO, "cannot open image %s", path);
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return vis_err(err, errlen, VLM_E_IO, "cannot seek in %s", path);
    }
    long sz = ftell(f);
    if (sz < 0) {
        fclose(f);
        return vis_err(err, errlen, VLM_E_IO, "cannot size %s", path);
    }
    if ((unsigned long)sz > lim->max_bytes) {
        fclose(f);
        return vis_err(err, errlen, VLM_E_LIMIT, "image file %s is %ld bytes, limit %zu", path, sz,
                       lim->max_bytes);
    }
    rewind(f);
    uint8_t *buf = malloc(sz ? (size_t)sz : 1);
    if (!buf) {
        fclose(f);
        return vis_err(err, errlen, VLM_E_NOMEM, "out of memory reading %s", path);
    }
    size_t got = fread(buf, 1, (size_t)sz, f);
    fclose(f);
    if (got != (size_t)sz) {
        free(buf);
        return vis_err(err, errlen, VLM_E_IO, "short read on %s", path);
    }
    vlm_status st = vlm_img_decode(buf, got, lim, out, err, errlen);
    free(buf);
    return st;
}
