/* test_vision.c — image decoding, limits, PIL-compatible bicubic resize, smart_resize and the
 * Qwen2-VL pixel_values, all against reference fixtures made with Pillow / transformers 5.24:
 *   tests/fixtures/vision/      (tools/make_vision_fixtures.py: resize pairs, decode conversions)
 *   tests/fixtures/qwen2vl/     (tools/make_fixtures.py: resize.json, smart_resize.json, cases)
 * Fast and model-free; the ViT is tested in test_vision_vit.c. */
#include <dirent.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/test.h"
#include "tests/unit/vision_test_util.h"
#include "vision/vis_internal.h"
#include "vision/vision.h"

/* vlmd decodes JPEG with libjpeg-turbo, islow IDCT and fancy upsampling, like Pillow: exact.
 * (With stb_image it was up to 2 LSB.) */
#define JPEG_MAX_LSB 0
/* pixel_values of a non-JPEG case: same f32 operations as the reference, so bit-exact expected;
 * 1e-6 leaves room only for a last-ulp difference in the normalisation. */
#define PV_TOL 1e-6
/* A JPEG decode difference of JPEG_MAX_LSB, after bicubic resize (weights sum to 1, but
 * negative lobes can amplify by up to ~1.25 per pass), divided by the smallest CLIP std. */
#define PV_JPEG_TOL (JPEG_MAX_LSB * 1.25 * 1.25 / 255.0 / 0.26130258 + 1e-6)

static int max_abs_u8(const vlm_image *a, const vlm_image *b) {
    if (a->width != b->width || a->height != b->height) return 1000;
    int m = 0;
    for (size_t i = 0; i < (size_t)a->width * a->height * 3; i++) {
        int d = abs((int)a->rgb[i] - (int)b->rgb[i]);
        if (d > m) m = d;
    }
    return m;
}

static void load_or_fail(const char *path, vlm_image *img) {
    char err[256] = "";
    vlm_status st = vlm_img_load_file(path, NULL, img, err, sizeof err);
    CHECKF(st == VLM_OK, "%s: %s", path, err);
}

/* Resize every fixture pair; returns the worst byte difference and counts cases. */
static int resize_suite(const char *json, const char *src_key, int *ncases) {
    cJSON *j = vt_read_json(json);
    CHECKF(j != NULL, "cannot read %s", json);
    if (!j) return 1000;
    int worst = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(j, "cases")) {
        char sp[512], op[512];
        const char *src = cJSON_GetObjectItem(c, src_key)->valuestring;
        const char *file = cJSON_GetObjectItem(c, "file")->valuestring;
        snprintf(sp, sizeof sp, "%s%s", strncmp(src, "tests/", 6) ? "tests/fixtures/vision/" : "", src);
        snprintf(op, sizeof op, "%s%s", strncmp(file, "tests/", 6) ? "tests/fixtures/vision/" : "", file);
        int w, h;
        const cJSON *wh = cJSON_GetObjectItem(c, "target_wh"), *hw = cJSON_GetObjectItem(c, "target_hw");
        if (wh) {
            w = cJSON_GetArrayItem(wh, 0)->valueint;
            h = cJSON_GetArrayItem(wh, 1)->valueint;
        } else {
            h = cJSON_GetArrayItem(hw, 0)->valueint;
            w = cJSON_GetArrayItem(hw, 1)->valueint;
        }
        vlm_image s = {0}, e = {0}, r = {0};
        load_or_fail(sp, &s);
        load_or_fail(op, &e);
        if (s.rgb && e.rgb) {
            CHECK(vlm_img_resize_bicubic(&s, w, h, &r) == VLM_OK);
            int d = r.rgb ? max_abs_u8(&r, &e) : 1000;
            CHECKF(d == 0, "%s -> %dx%d: max |diff| %d", sp, w, h, d);
            if (d > worst) worst = d;
            (*ncases)++;
        }
        vlm_img_free(&s);
        vlm_img_free(&e);
        vlm_img_free(&r);
    }
    cJSON_Delete(j);
    return worst;
}

static void test_resize_bicubic_vs_pil(void) {
    int n = 0;
    int w1 = resize_suite("tests/fixtures/vision/resize.json", "source", &n);
    int w2 = resize_suite("tests/fixtures/qwen2vl/resize.json", "source", &n);
    printf("bicubic vs Pillow: %d resize pairs, max |diff| %d LSB\n", n, w1 > w2 ? w1 : w2);
    CHECK(n >= 40);
}

static void test_resize_bad_args(void) {
    uint8_t px[3] = {1, 2, 3};
    vlm_image s = {1, 1, px}, d;
    CHECK(vlm_img_resize_bicubic(&s, 0, 5, &d) == VLM_E_INVALID);
    CHECK(vlm_img_resize_bicubic(&s, 5, -1, &d) == VLM_E_INVALID);
    CHECK(vlm_img_resize_bicubic(&s, 4, 3, &d) == VLM_OK);
    for (int i = 0; i < 12; i++) CHECK_EQ_INT(d.rgb[i], px[i % 3]); /* constant stays constant */
    vlm_img_free(&d);
}

static void test_smart_resize_table(void) {
    cJSON *j = vt_read_json("tests/fixtures/qwen2vl/smart_resize.json");
    CHECK(j != NULL);
    if (!j) return;
    int n = 0, nerr = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(j, "cases")) {
        int64_t H = (int64_t)cJSON_GetObjectItem(c, "height")->valuedouble;
        int64_t W = (int64_t)cJSON_GetObjectItem(c, "width")->valuedouble;
        int64_t mn = (int64_t)cJSON_GetObjectItem(c, "min_pixels")->valuedouble;
        int64_t mx = (int64_t)cJSON_GetObjectItem(c, "max_pixels")->valuedouble;
        int64_t oh = -1, ow = -1;
        char err[200] = "";
        vlm_status st = vlm_qwen_smart_resize(H, W, 28, mn, mx, &oh, &ow, err, sizeof err);
        const cJSON *res = cJSON_GetObjectItem(c, "resized");
        if (res) {
            int64_t eh = (int64_t)cJSON_GetArrayItem(res, 0)->valuedouble;
            int64_t ew = (int64_t)cJSON_GetArrayItem(res, 1)->valuedouble;
            CHECKF(st == VLM_OK && oh == eh && ow == ew, "%lldx%lld [%lld,%lld]: got %lldx%lld (%s), want %lldx%lld",
                   (long long)H, (long long)W, (long long)mn, (long long)mx, (long long)oh,
                   (long long)ow, err, (long long)eh, (long long)ew);
        } else {
            CHECKF(st != VLM_OK, "%lldx%lld should fail", (long long)H, (long long)W);
            nerr++;
        }
        n++;
    }
    cJSON_Delete(j);
    printf("smart_resize: %d reference cases (%d errors) checked\n", n, nerr);
    CHECK(n >= 100);
    CHECK(nerr >= 1);
}

static void test_smart_resize_errors(void) {
    int64_t h, w;
    char err[200];
    CHECK(vlm_qwen_smart_resize(1, 100000, 28, 3136, 12845056, &h, &w, err, sizeof err) == VLM_E_LIMIT);
    CHECK(strstr(err, "aspect") != NULL);
    CHECK(vlm_qwen_smart_resize(0, 10, 28, 3136, 12845056, &h, &w, err, sizeof err) == VLM_E_INVALID);
    /* min_pixels 0 and a side that rounds to 0: the reference would return 0; we refuse. */
    CHECK(vlm_qwen_smart_resize(10, 100, 28, 0, 12845056, &h, &w, err, sizeof err) == VLM_E_INVALID);
    /* SPEC §E.2 worked sizes */
    CHECK(vlm_qwen_smart_resize(70, 100, 28, 3136, 1003520, &h, &w, err, sizeof err) == VLM_OK);
    CHECK(h == 56 && w == 112);
    CHECK(vlm_qwen_smart_resize(1080, 1920, 28, 3136, 1003520, &h, &w, err, sizeof err) == VLM_OK);
    CHECK(h == 728 && w == 1316);
    CHECK(vlm_qwen_smart_resize(4000, 3000, 28, 3136, 12845056, &h, &w, err, sizeof err) == VLM_OK);
    CHECK(h == 4004 && w == 2996);
    /* tiny max_pixels: 5.24 clamps each side to >= 28 instead of producing 0 */
    CHECK(vlm_qwen_smart_resize(28, 5000, 28, 1, 784, &h, &w, err, sizeof err) == VLM_OK);
    CHECK(h == 28 && w >= 28);
}

static void test_decode_conversions(void) {
    cJSON *j = vt_read_json("tests/fixtures/vision/decode.json");
    CHECK(j != NULL);
    if (!j) return;
    const cJSON *c;
    int n = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(j, "cases")) {
        char fp[512], ep[512];
        snprintf(fp, sizeof fp, "tests/fixtures/vision/%s", cJSON_GetObjectItem(c, "file")->valuestring);
        snprintf(ep, sizeof ep, "tests/fixtures/vision/%s", cJSON_GetObjectItem(c, "expected_rgb")->valuestring);
        vlm_image a = {0}, e = {0};
        load_or_fail(fp, &a);
        load_or_fail(ep, &e);
        if (a.rgb && e.rgb) {
            int d = max_abs_u8(&a, &e);
            CHECKF(d == 0, "%s (PIL mode %s): max |diff| %d vs Pillow+convert_to_rgb", fp,
                   cJSON_GetObjectItem(c, "pil_mode")->valuestring, d);
            n++;
        }
        vlm_img_free(&a);
        vlm_img_free(&e);
    }
    cJSON_Delete(j);
    printf("decode: %d PNG/GIF/BMP/WebP conversions bit-exact checked\n", n);
    CHECK(n >= 11);
}

static void test_decode_jpeg(void) {
    vlm_image a = {0}, e = {0};
    load_or_fail("tests/data/images/photo_112x84.jpg", &a);
    load_or_fail("tests/data/images/photo_112x84.jpg.rgb.png", &e);
    if (a.rgb && e.rgb) {
        int d = max_abs_u8(&a, &e);
        printf("jpeg: libjpeg-turbo vs Pillow max |diff| %d LSB\n", d);
        CHECK(d <= JPEG_MAX_LSB);
    }
    vlm_img_free(&a);
    vlm_img_free(&e);
}

/* ---- hand-made PNG headers: limits must be enforced from IHDR alone ----------------------- */
static uint32_t crc32_png(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
    }
    return ~c;
}
static void be32(uint8_t *p, uint32_t v) {
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}
/* Signature + IHDR (8-bit RGB) + a tiny IDAT that cannot hold the declared pixels. */
static size_t png_header(uint8_t *b, uint32_t w, uint32_t h) {
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    memcpy(b, sig, 8);
    be32(b + 8, 13);
    memcpy(b + 12, "IHDR", 4);
    be32(b + 16, w);
    be32(b + 20, h);
    b[24] = 8, b[25] = 2, b[26] = 0, b[27] = 0, b[28] = 0;
    be32(b + 29, crc32_png(b + 12, 17));
    static const uint8_t idat[] = {0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01};
    be32(b + 33, sizeof idat);
    memcpy(b + 37, "IDAT", 4);
    memcpy(b + 41, idat, sizeof idat);
    be32(b + 41 + sizeof idat, crc32_png(b + 37, 4 + sizeof idat));
    size_t n = 45 + sizeof idat;
    be32(b + n, 0);
    memcpy(b + n + 4, "IEND", 4);
    be32(b + n + 8, crc32_png(b + n + 4, 4));
    return n + 12;
}

/* tools/make_jpeg_variants.py: grayscale, Adobe CMYK, progressive 4:4:4 and 4:2:0 with restart
 * markers at odd sizes, each against Pillow's decode + convert("RGB"). */
static void test_decode_jpeg_variants(void) {
    const char *names[] = {"gray_48x36.jpg", "cmyk_adobe_48x36.jpg", "progressive_52x38.jpg",
                           "restart_420_61x45.jpg"};
    for (int i = 0; i < 4; i++) {
        char p[200], q[256];
        snprintf(p, sizeof p, "tests/data/images/jpeg/%s", names[i]);
        snprintf(q, sizeof q, "%s.rgb.png", p);
        vlm_image a = {0}, e = {0};
        load_or_fail(p, &a);
        load_or_fail(q, &e);
        if (a.rgb && e.rgb) {
            const int d = max_abs_u8(&a, &e);
            CHECKF(d == 0, "%s: max |diff| %d vs Pillow", names[i], d);
        }
        vlm_img_free(&a);
        vlm_img_free(&e);
    }
}

/* Files that broke stb_image 2.27 (tests/fuzz/fuzz_image.c: JPEG DHT tables with more than 256
 * codes, also after 0xFF fill bytes, a scan using an undefined Huffman table; a 1.9 KB PNG whose
 * IDAT declares ~2 GiB, which stb allocated before reading) are refused cleanly and without any
 * pixel-decoder allocation; a JPEG header declaring 30000x30000 is refused the same way. */
static void test_decode_hostile(void) {
    const char *files[] = {"tests/data/images/hostile/jpeg_dht_overflow.jpg",
                           "tests/data/images/hostile/jpeg_dht_overflow_fill.jpg",
                           "tests/data/images/hostile/jpeg_huff_symbol_oob.jpg",
                           "tests/data/images/hostile/png_idat_length_2gib.png"};
    char err[256];
    vlm_image img;
    for (int i = 0; i < 4; i++) {
        size_t n;
        uint8_t *b = vt_read_file(files[i], &n);
        CHECK(b != NULL);
        if (!b) continue;
        const size_t before0 = vlm_img_decoder_bytes();
        CHECKF(vlm_img_decode(b, n, NULL, &img, err, sizeof err) == VLM_E_FORMAT, "%s", files[i]);
        if (i == 3) CHECK_EQ_INT(vlm_img_decoder_bytes(), before0);
        printf("%s: %s\n", files[i], err);
        free(b);
    }
    size_t n;
    uint8_t *b = vt_read_file("tests/data/images/photo_112x84.jpg", &n);
    CHECK(b != NULL);
    if (!b) return;
    size_t sof = 0; /* the SOF0 segment: FF C0, length, precision, height, width */
    for (size_t i = 2; i + 9 < n && !sof; i++)
        if (b[i] == 0xFF && b[i + 1] == 0xC0) sof = i;
    CHECK(sof > 0);
    b[sof + 5] = 30000 >> 8, b[sof + 6] = 30000 & 255, b[sof + 7] = 30000 >> 8, b[sof + 8] = 30000 & 255;
    const size_t before = vlm_img_decoder_bytes();
    CHECK(vlm_img_decode(b, n, NULL, &img, err, sizeof err) == VLM_E_LIMIT);
    CHECK_EQ_INT(vlm_img_decoder_bytes(), before);
    printf("30000x30000 JPEG header: %s\n", err);
    free(b);
}

static void test_decode_limits_from_header(void) {
    uint8_t b[128];
    char err[256] = "";
    vlm_image img;
    vlm_img_limits lim;
    vlm_img_limits_default(&lim);
    size_t before = vlm_img_decoder_bytes();
    size_t n = png_header(b, 30000, 30000);
    CHECK(vlm_img_decode(b, n, &lim, &img, err, sizeof err) == VLM_E_LIMIT);
    CHECK(img.rgb == NULL);
    printf("30000x30000 PNG (%zu bytes): %s\n", n, err);
    n = png_header(b, 1, 100000);
    lim.max_height = 1 << 20;
    lim.max_width = 1 << 20;
    CHECK(vlm_img_decode(b, n, &lim, &img, err, sizeof err) == VLM_E_LIMIT);
    CHECK(strstr(err, "aspect") != NULL);
    n = png_header(b, 8000, 8000); /* 64 Mpx is within sides but over a 10 Mpx budget */
    lim.max_pixels = 10000000;
    CHECK(vlm_img_decode(b, n, &lim, &img, err, sizeof err) == VLM_E_LIMIT);
    /* None of the refusals reached the pixel decoder: it allocated nothing. */
    CHECK_EQ_INT(vlm_img_decoder_bytes(), before);
    /* Within limits, the same tiny file is refused as corrupt (its IDAT is far too short). */
    n = png_header(b, 64, 64);
    vlm_img_limits_default(&lim);
    CHECK(vlm_img_decode(b, n, &lim, &img, err, sizeof err) == VLM_E_FORMAT);
    lim.max_bytes = 10;
    CHECK(vlm_img_decode(b, n, &lim, &img, err, sizeof err) == VLM_E_LIMIT);
}

static void test_decode_bad_data(void) {
    char err[256] = "";
    vlm_image img;
    CHECK(vlm_img_decode((const uint8_t *)"", 0, NULL, &img, err, sizeof err) == VLM_E_FORMAT);
    CHECK(vlm_img_decode((const uint8_t *)"hello world, not an image", 25, NULL, &img, err, sizeof err) == VLM_E_FORMAT);
    const char *files[] = {"tests/data/images/grad_224.png", "tests/data/images/photo_112x84.jpg",
                           "tests/fixtures/vision/decode/lossless.webp", "tests/fixtures/vision/decode/two_frames.gif"};
    for (int f = 0; f < 4; f++) {
        size_t n;
        uint8_t *b = vt_read_file(files[f], &n);
        CHECK(b != NULL);
        if (!b) continue;
        /* Truncated: never a crash or leak. A cut header always fails; PNG (zlib stream and
         * IEND) and WebP (chunk sizes) must also be refused when cut later. libjpeg fills a
         * truncated JPEG scan (as Pillow's decoder does) and a GIF cut after its first frame
         * is complete, so for those two a late cut may decode. */
        size_t cuts[] = {4, 16, 40, n / 3, n / 2, n - 20};
        for (int k = 0; k < 6; k++) {
            vlm_status st = vlm_img_decode(b, cuts[k], NULL, &img, err, sizeof err);
            if (k < 3 || f == 0 || f == 2)
                CHECKF(st == VLM_E_FORMAT, "%s cut at %zu: %d", files[f], cuts[k], (int)st);
            else CHECK(st == VLM_OK || st == VLM_E_FORMAT);
            vlm_img_free(&img);
        }
        /* corrupted bytes in the middle of the data */
        uint8_t *c = malloc(n);
        memcpy(c, b, n);
        for (size_t i = n / 4; i < n / 4 + 64 && i < n; i++) c[i] ^= 0x5a;
        vlm_status st = vlm_img_decode(c, n, NULL, &img, err, sizeof err);
        CHECK(st == VLM_OK || st == VLM_E_FORMAT);
        if (f == 0) CHECK(st == VLM_E_FORMAT); /* a damaged zlib stream is detected */
        vlm_img_free(&img);
        free(c);
        free(b);
    }
    CHECK(vlm_img_load_file("tests/data/images/does-not-exist.png", NULL, &img, err, sizeof err) == VLM_E_IO);
}

/* ---- pixel_values vs transformers ---------------------------------------------------------- */
static void qwen_cfg(vlm_model_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->vision.patch_size = 14;
    cfg->vision.temporal_patch_size = 2;
    cfg->vision.spatial_merge_size = 2;
    cfg->vision.in_channels = 3;
    cfg->min_pixels = 3136; /* preprocessor_config.json written by tools/make_model.py (§A.7) */
    cfg->max_pixels = 12845056;
    const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    const float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    memcpy(cfg->image_mean, mean, sizeof mean);
    memcpy(cfg->image_std, std, sizeof std);
}

static void check_case(const char *dir, int *ncases, double *worst, double *worst_jpeg) {
    char p[1024];
    snprintf(p, sizeof p, "%s/case.json", dir);
    cJSON *j = vt_read_json(p);
    if (!j) return;
    const cJSON *pv = cJSON_GetObjectItem(j, "pixel_values");
    if (!pv) {
        cJSON_Delete(j);
        return;
    }
    vlm_model_config cfg;
    qwen_cfg(&cfg);
    int64_t shape[4];
    int nd = 0;
    float *ref = vt_read_npy(cJSON_GetObjectItem(pv, "file")->valuestring, shape, &nd);
    CHECKF(ref && nd == 2 && shape[1] == 1176, "%s: pixel_values.npy", dir);
    int64_t row = 0;
    int img_i = 0, jpeg = 0;
    double md = 0;
    const cJSON *msg, *part;
    cJSON_ArrayForEach(msg, cJSON_GetObjectItem(j, "messages")) {
        const cJSON *content = cJSON_GetObjectItem(msg, "content");
        if (!cJSON_IsArray(content)) continue;
        cJSON_ArrayForEach(part, content) {
            const cJSON *iu = cJSON_GetObjectItem(part, "image_url");
            if (!iu) continue;
            const char *url = cJSON_IsString(iu) ? iu->valuestring : cJSON_GetObjectItem(iu, "url")->valuestring;
            vlm_pp_opts o = {0, 0};
            const cJSON *x;
            if ((x = cJSON_GetObjectItem(part, "max_pixels"))) o.max_pixels = (int64_t)x->valuedouble;
            if ((x = cJSON_GetObjectItem(part, "min_pixels"))) o.min_pixels = (int64_t)x->valuedouble;
            if (strstr(url, ".jpg")) jpeg = 1;
            vlm_image img = {0};
            vlm_pixels px = {0};
            char err[256] = "";
            load_or_fail(url, &img);
            vlm_status st = img.rgb ? vlm_qwen_preprocess(&cfg, &img, &o, &px, err, sizeof err) : VLM_E_IO;
            CHECKF(st == VLM_OK, "%s: %s", url, err);
            const cJSON *g = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "image_grid_thw"), img_i);
            if (st == VLM_OK && g && ref) {
                for (int k = 0; k < 3; k++) CHECK_EQ_INT(px.grid_thw[k], cJSON_GetArrayItem(g, k)->valueint);
                CHECK_EQ_INT(px.n_tokens, (int64_t)px.grid_thw[1] * px.grid_thw[2] / 4);
                CHECK(row + px.n_patches <= shape[0]);
                if (row + px.n_patches <= shape[0])
                    for (int64_t i = 0; i < px.n_patches * 1176; i++) {
                        double d = fabs((double)px.pixel_values[i] - ref[row * 1176 + i]);
                        if (d > md) md = d;
                    }
                row += px.n_patches;
            }
            img_i++;
            vlm_img_free(&img);
            vlm_pixels_free(&px);
        }
    }
    if (ref) CHECKF(row == shape[0], "%s: %lld rows, reference %lld", dir, (long long)row, (long long)shape[0]);
    CHECKF(md <= (jpeg ? PV_JPEG_TOL : PV_TOL), "%s: pixel_values max |diff| %.3g", dir, md);
    if (jpeg) {
        if (md > *worst_jpeg) *worst_jpeg = md;
    } else if (md > *worst) *worst = md;
    (*ncases)++;
    free(ref);
    cJSON_Delete(j);
}

static void test_pixel_values_vs_transformers(void) {
    const char *root = "tests/fixtures/qwen2vl";
    DIR *d = opendir(root);
    CHECK(d != NULL);
    if (!d) return;
    int n = 0;
    double worst = 0, worst_jpeg = 0;
    struct dirent *m;
    while ((m = readdir(d))) {
        if (m->d_name[0] == '.') continue;
        char md[300];
        snprintf(md, sizeof md, "%s/%s", root, m->d_name);
        DIR *d2 = opendir(md);
        if (!d2) continue;
        struct dirent *c;
        while ((c = readdir(d2))) {
            if (c->d_name[0] == '.') continue;
            char cd[580];
            snprintf(cd, sizeof cd, "%s/%s", md, c->d_name);
            check_case(cd, &n, &worst, &worst_jpeg);
        }
        closedir(d2);
    }
    closedir(d);
    printf("pixel_values: %d image cases, max |diff| %.3g (non-JPEG), %.3g (JPEG)\n", n,
           worst, worst_jpeg);
    CHECK(n >= 13);
}

static void test_pixel_layout_small(void) {
    /* 56x56 image whose pixel (y, x) has R = x, G = y, B = 7: check the SPEC §E.4 index formula
     * directly (no resize happens at 56x56). */
    vlm_model_config cfg;
    qwen_cfg(&cfg);
    vlm_image img = {56, 56, malloc(56 * 56 * 3)};
    for (int y = 0; y < 56; y++)
        for (int x = 0; x < 56; x++) {
            img.rgb[(y * 56 + x) * 3 + 0] = (uint8_t)x;
            img.rgb[(y * 56 + x) * 3 + 1] = (uint8_t)y;
            img.rgb[(y * 56 + x) * 3 + 2] = 7;
        }
    vlm_pixels px;
    char err[200];
    CHECK(vlm_qwen_preprocess(&cfg, &img, NULL, &px, err, sizeof err) == VLM_OK);
    CHECK(px.n_patches == 16 && px.patch_dim == 1176 && px.n_tokens == 4);
    int bad = 0;
    for (int k = 0; k < 16; k++) {
        int bh = 0, bw = (k / 4) % 2, mh = (k % 4) / 2, mw = k % 2;
        bh = (k / 4) / 2;
        int r = 2 * bh + mh, c = 2 * bw + mw;
        for (int t = 0; t < 2; t++)
            for (int py = 0; py < 14; py++)
                for (int pxx = 0; pxx < 14; pxx++) {
                    float R = px.pixel_values[k * 1176 + 0 * 392 + t * 196 + py * 14 + pxx];
                    float G = px.pixel_values[k * 1176 + 1 * 392 + t * 196 + py * 14 + pxx];
                    float eR = ((float)((14 * c + pxx) / 255.0) - cfg.image_mean[0]) / cfg.image_std[0];
                    float eG = ((float)((14 * r + py) / 255.0) - cfg.image_mean[1]) / cfg.image_std[1];
                    if (R != eR || G != eG) bad++;
                }
    }
    CHECK_EQ_INT(bad, 0);
    vlm_pixels_free(&px);
    vlm_img_free(&img);
}

int main(void) {
    RUN(test_resize_bicubic_vs_pil);
    RUN(test_resize_bad_args);
    RUN(test_smart_resize_table);
    RUN(test_smart_resize_errors);
    RUN(test_decode_conversions);
    RUN(test_decode_jpeg);
    RUN(test_decode_jpeg_variants);
    RUN(test_decode_hostile);
    RUN(test_decode_limits_from_header);
    RUN(test_decode_bad_data);
    RUN(test_pixel_values_vs_transformers);
    RUN(test_pixel_layout_small);
    TEST_MAIN_END("vision");
}
