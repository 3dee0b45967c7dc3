/* prompt.c — turns OpenAI-style messages (or raw text / ids) into an engine-ready prompt.
 *
 * Path of one chat request through this file: validate the messages array and every content part
 * (vlmd_prompt_from_messages) -> fetch image bytes (data: URL, remote via the server's fetcher,
 * local file for `vlmd generate`) -> decode under limits and preprocess (vision/) -> render the
 * chat template and tokenize (tokenizer/) -> expand each <|image_pad|> to the image's token count.
 * The vision encoder runs separately (vlmd_prompt_encode_images) so the caller decides which
 * thread pays for it. Every client error names the offending parameter path. */
#include "server/prompt.h"

#include <errno.h>
#include <stdarg.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Pixel budgets for OpenAI's `detail`: "low" gives at most 256 merged tokens (16x16 grid of 28 px
 * cells), like the low-detail budget other servers use; "high"/"auto" use the model/server cap. */
#define DETAIL_LOW_MAX_PIXELS (256 * 28 * 28)
#define MAX_LOCAL_FILE_BYTES ((size_t)256 << 20)
/* NVLM-D: the IMG_CONTEXT token string of modeling_nvlm_d.py chat(), and the per-image placeholder a
 * message's text carries before the tile-tag substitution (chat() and vLLM's NVLM-D processor both use
 * "<image>"). "detail": "low" caps an NVLM-D image at one tile (256 tokens, the same budget as Qwen2-VL's
 * low detail). */
#define NVLM_IMG_CONTEXT "<|vision_pad|>"
#define NVLM_IMAGE_PLACEHOLDER "<image>"
#define NVLM_DETAIL_LOW_TILES 1

/* ---- bundle -------------------------------------------------------------------------------- */

vlm_status vlmd_bundle_load(const char *dir, int threads, vlmd_bundle **out, char *err,
                            size_t errlen) {
    *out = NULL;
    vlmd_bundle *b = calloc(1, sizeof *b);
    if (!b) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    vlm_cpu_init(threads);
    vlm_load_opts lo = {.threads = threads, .convert_f32 = false};
    vlm_status st = vlm_model_load(dir, &lo, &b->model, err, errlen);
    if (st != VLM_OK) goto fail;
    b->cfg = vlm_model_cfg(b->model);
    char terr[512];
    if (vlm_tok_load(dir, &b->tok, terr, sizeof terr) != 0) {
        st = vlm_errf(err, errlen, VLM_E_FORMAT, "tokenizer in %s: %s", dir, terr);
        goto fail;
    }
    if (b->cfg->has_vision && b->cfg->arch == VLM_ARCH_NVLM_D) {
        /* The image rows replace the ids the tokenizer gives "<|vision_pad|>"; the engine scatters them at
         * cfg->image_token_id, so the two must agree. */
        int32_t ctx = vlm_tok_token_id(b->tok, NVLM_IMG_CONTEXT);
        if (ctx != b->cfg->image_token_id) {
            st = vlm_errf(err, errlen, VLM_E_FORMAT,
                          "%s: the tokenizer maps %s to %d but the model's image token id is %d", dir,
                          NVLM_IMG_CONTEXT, ctx, b->cfg->image_token_id);
            goto fail;
        }
        st = vlm_internvit_load(b->model, &b->ivit, err, errlen);
        if (st != VLM_OK) goto fail;
    } else if (b->cfg->has_vision) {
        st = vlm_vit_load(b->model, &b->vit, err, errlen);
        if (st != VLM_OK) goto fail;
    }
    b->template_kind = VLM_TEMPLATE_AUTO;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", dir);
    size_t L = strlen(tmp);
    while (L > 1 && tmp[L - 1] == '/') tmp[--L] = 0;
    snprintf(b->name, sizeof b->name, "%s", basename(tmp));
    *out = b;
    return VLM_OK;
fail:
    vlmd_bundle_free(b);
    return st;
}

vlm_status vlmd_bundle_vision_tp(vlmd_bundle *b, int tp, char *err, size_t errlen) {
    if (!b->ivit || tp <= 1) return VLM_OK;
    return vlm_internvit_set_tp(b->ivit, tp, err, errlen);
}

void vlmd_bundle_free(vlmd_bundle *b) {
    if (!b) return;
    vlm_vit_free(b->vit);
    vlm_internvit_free(b->ivit);
    vlm_tok_free(b->tok);
    vlm_model_free(b->model);
    free(b);
}

void vlmd_prompt_limits_default(vlmd_prompt_limits *l) {
    memset(l, 0, sizeof *l);
    vlm_img_limits_default(&l->img);
    l->max_images = 16;
    l->max_image_tokens = 16384;
    l->max_prompt_tokens = 32768;
}

/* ---- small helpers ------------------------------------------------------------------------- */

static void set_param(char *param, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_param(char *param, size_t len, const char *fmt, ...) {
    if (!param || !len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(param, len, fmt, ap);
    va_end(ap);
}

static int b64_value(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62; /* '-' and '_' : URL-safe alphabet, as Python accepts */
    if (c == '/' || c == '_') return 63;
    return -1;
}

/* Strict base64 (standard or URL-safe alphabet, optional padding, ASCII whitespace ignored). */
static vlm_status b64_decode(const char *s, size_t n, size_t max_out, uint8_t **out, size_t *out_n,
                             char *err, size_t errlen) {
    if (n / 4 * 3 > max_out + 3)
        return vlm_errf(err, errlen, VLM_E_LIMIT, "image data is larger than the %zu byte limit",
                        max_out);
    uint8_t *buf = malloc(n / 4 * 3 + 3);
    if (!buf) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0, pad = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
        if (c == '=') {
            pad++;
            continue;
        }
        int v = b64_value(c);
        if (v < 0 || pad) {
            free(buf);
            return vlm_errf(err, errlen, VLM_E_INVALID, "invalid base64 in image data URL at byte %zu",
                            i);
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            buf[o++] = (uint8_t)(acc >> bits);
        }
    }
    if (pad > 2 || bits >= 6) {
        free(buf);
        return vlm_errf(err, errlen, VLM_E_INVALID, "invalid base64 length in image data URL");
    }
    if (o == 0) {
        free(buf);
        return vlm_errf(err, errlen, VLM_E_INVALID, "empty image data URL");
    }
    *out = buf;
    *out_n = o;
    return VLM_OK;
}

static vlm_status read_local(const char *path, size_t max_bytes, uint8_t **out, size_t *n, char *err,
                             size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) return vlm_errf(err, errlen, VLM_E_IO, "cannot open image '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return vlm_errf(err, errlen, VLM_E_IO, "image '%s' is not a regular file", path);
    }
    if ((size_t)sb.st_size > max_bytes) {
        fclose(f);
        return vlm_errf(err, errlen, VLM_E_LIMIT, "image '%s' is %lld bytes, over the %zu byte limit",
                        path, (long long)sb.st_size, max_bytes);
    }
    uint8_t *buf = malloc((size_t)sb.st_size + 1);
    if (!buf) {
        fclose(f);
        return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    }
    size_t got = fread(buf, 1, (size_t)sb.st_size, f);
    fclose(f);
    if (got != (size_t)sb.st_size) {
        free(buf);
        return vlm_errf(err, errlen, VLM_E_IO, "short read on image '%s'", path);
    }
    *out = buf;
    *n = got;
    return VLM_OK;
}

/* Resolves an image URL to bytes: data: URLs, http(s) through the server's fetcher, local files. */
static vlm_status fetch_image(const char *url, const vlmd_prompt_limits *lim, uint8_t **bytes,
                              size_t *n, char *err, size_t errlen) {
    size_t max_bytes = lim->img.max_bytes ? lim->img.max_bytes : MAX_LOCAL_FILE_BYTES;
    if (!strncmp(url, "data:", 5)) {
        const char *comma = strchr(url, ',');
        if (!comma)
            return vlm_errf(err, errlen, VLM_E_INVALID, "malformed data URL: no ',' separator");
        const char *meta = url + 5;
        size_t mlen = (size_t)(comma - meta);
        if (mlen < 7 || memcmp(comma - 7, ";base64", 7) != 0)
            return vlm_errf(err, errlen, VLM_E_INVALID,
                            "data URL images must be base64-encoded (data:image/png;base64,...)");
        if (mlen > 7 && strncmp(meta, "image/", 6) != 0 && strncmp(meta, "application/octet-stream", 24))
            return vlm_errf(err, errlen, VLM_E_INVALID, "data URL media type must be image/*");
        return b64_decode(comma + 1, strlen(comma + 1), max_bytes, bytes, n, err, errlen);
    }
    if (!strncmp(url, "http://", 7) || !strncmp(url, "https://", 8)) {
        if (!lim->fetch)
            return vlm_errf(err, errlen, VLM_E_INVALID,
                            "remote image URLs are disabled on this server (start it with "
                            "--allow-remote-media); send the image as a base64 data: URL");
        return lim->fetch(lim->fetch_ctx, url, bytes, n, err, errlen);
    }
    if (lim->allow_local_files) {
        const char *path = !strncmp(url, "file://", 7) ? url + 7 : url;
        return read_local(path, max_bytes, bytes, n, err, errlen);
    }
    return vlm_errf(err, errlen, VLM_E_INVALID,
                    "unsupported image URL scheme: expected a data: URL%s",
                    lim->fetch ? " or http(s)://" : "");
}

/* Reads an optional positive integer field of an image part; 0 when absent. The key may sit in the
 * image_url object (vLLM style) or on the part itself (qwen-vl-utils style). */
static vlm_status opt_pixels(const cJSON *obj, const cJSON *part, const char *key, int64_t *out,
                             char *err, size_t errlen) {
    *out = 0;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) v = cJSON_GetObjectItemCaseSensitive(part, key);
    if (!v || cJSON_IsNull(v)) return VLM_OK;
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 1 && v->valuedouble <= 1e12) ||
        v->valuedouble != (double)(int64_t)v->valuedouble)
        return vlm_errf(err, errlen, VLM_E_INVALID, "'%s' must be a positive integer", key);
    *out = (int64_t)v->valuedouble;
    return VLM_OK;
}

void vlmd_prompt_free(vlmd_prompt *p) {
    if (!p) return;
    free(p->ids);
    free(p->text);
    for (int i = 0; i < p->n_images; i++) {
        if (p->pixels) vlm_pixels_free(&p->pixels[i]);
        if (p->embeds) free(p->embeds[i]);
    }
    free(p->pixels);
    free(p->embeds);
    free(p->images);
    free(p->enc_imgs);
    vlm_vit_job_free(p->enc_job);
    memset(p, 0, sizeof *p);
}

/* Decodes and preprocesses one image part into p->pixels[p->n_images]. */
static vlm_status add_image(const vlmd_bundle *b, const cJSON *part, const vlmd_prompt_limits *lim,
                            vlmd_prompt *p, char *err, size_t errlen, char *param, size_t paramlen,
                            const char *where) {
    const cJSON *iu = cJSON_GetObjectItemCaseSensitive(part, "image_url");
    const cJSON *urlv = NULL, *opts = part;
    if (cJSON_IsString(iu)) {
        urlv = iu;
    } else if (cJSON_IsObject(iu)) {
        urlv = cJSON_GetObjectItemCaseSensitive(iu, "url");
        opts = iu;
    } else {
        set_param(param, paramlen, "%s.image_url", where);
        return vlm_errf(err, errlen, VLM_E_INVALID, "'image_url' must be an object with a 'url'");
    }
    if (!cJSON_IsString(urlv) || !urlv->valuestring[0]) {
        set_param(param, paramlen, "%s.image_url.url", where);
        return vlm_errf(err, errlen, VLM_E_INVALID, "'image_url.url' must be a non-empty string");
    }
    if (!b->vit && !b->ivit) {
        set_param(param, paramlen, "%s", where);
        return vlm_errf(err, errlen, VLM_E_INVALID, "model '%s' does not accept images", b->name);
    }
    if (p->n_images >= lim->max_images) {
        set_param(param, paramlen, "%s", where);
        return vlm_errf(err, errlen, VLM_E_LIMIT, "too many images: at most %d per request",
                        lim->max_images);
    }

    /* Pixel budget: the model's preprocessor values, narrowed by `detail`, the part's own
     * min/max_pixels and the server's per-image token cap (never widened past the cap). */
    int64_t minp = 0, maxp = 0;
    vlm_status st = opt_pixels(opts, part, "min_pixels", &minp, err, errlen);
    if (st == VLM_OK) st = opt_pixels(opts, part, "max_pixels", &maxp, err, errlen);
    if (st != VLM_OK) {
        set_param(param, paramlen, "%s.image_url", where);
        return st;
    }
    const cJSON *detail = cJSON_GetObjectItemCaseSensitive(opts, "detail");
    if (!detail) detail = cJSON_GetObjectItemCaseSensitive(part, "detail");
    if (detail && !cJSON_IsNull(detail)) {
        if (!cJSON_IsString(detail) || (strcmp(detail->valuestring, "low") &&
                                        strcmp(detail->valuestring, "high") &&
                                        strcmp(detail->valuestring, "auto"))) {
            set_param(param, paramlen, "%s.image_url.detail", where);
            return vlm_errf(err, errlen, VLM_E_INVALID, "'detail' must be 'low', 'high' or 'auto'");
        }
        if (!strcmp(detail->valuestring, "low") && (!maxp || maxp > DETAIL_LOW_MAX_PIXELS))
            maxp = DETAIL_LOW_MAX_PIXELS;
    }
    bool low_detail = detail && cJSON_IsString(detail) && !strcmp(detail->valuestring, "low");
    int64_t cap = lim->max_image_tokens > 0 ? lim->max_image_tokens * 28 * 28 : 0;
    int64_t model_max = b->cfg->max_pixels;
    if (!maxp) maxp = model_max;
    if (cap && maxp > cap) maxp = cap;
    if (minp && minp > maxp) {
        set_param(param, paramlen, "%s.image_url.min_pixels", where);
        return vlm_errf(err, errlen, VLM_E_INVALID, "min_pixels %lld exceeds max_pixels %lld",
                        (long long)minp, (long long)maxp);
    }

    uint8_t *bytes = NULL;
    size_t nbytes = 0;
    st = fetch_image(urlv->valuestring, lim, &bytes, &nbytes, err, errlen);
    if (st != VLM_OK) {
        set_param(param, paramlen, "%s.image_url.url", where);
        return st;
    }
    vlm_image img = {0};
    st = vlm_img_decode(bytes, nbytes, &lim->img, &img, err, errlen);
    free(bytes);
    if (st != VLM_OK) {
        set_param(param, paramlen, "%s.image_url.url", where);
        return st;
    }
    vlm_pixels px = {0};
    if (b->ivit) {
        /* NVLM-D: dynamic tiling decides the size; min/max_pixels have no meaning there (validated above,
         * then ignored); detail "low" keeps one tile. */
        vlm_model_config c = *b->cfg;
        if (low_detail) c.nvlm.max_tiles = NVLM_DETAIL_LOW_TILES;
        st = vlm_nvlm_preprocess(&c, &img, &px, err, errlen);
        if (st == VLM_OK && lim->max_image_tokens > 0 && px.n_tokens > lim->max_image_tokens) {
            st = vlm_errf(err, errlen, VLM_E_LIMIT, "the image needs %lld tokens, over the per-image limit of %lld",
                          (long long)px.n_tokens, (long long)lim->max_image_tokens);
            vlm_pixels_free(&px);
        }
    } else {
        vlm_pp_opts po = {.min_pixels = minp, .max_pixels = maxp};
        st = vlm_qwen_preprocess(b->cfg, &img, &po, &px, err, errlen);
    }
    vlm_img_free(&img);
    if (st != VLM_OK) {
        set_param(param, paramlen, "%s.image_url.url", where);
        return st;
    }
    vlm_pixels *np = realloc(p->pixels, sizeof *np * (size_t)(p->n_images + 1));
    if (!np) {
        vlm_pixels_free(&px);
        return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    }
    p->pixels = np;
    p->pixels[p->n_images++] = px;
    p->n_image_tokens += px.n_tokens;
    return VLM_OK;
}

static size_t count_sub(const char *s, size_t n, const char *pat) {
    size_t k = 0, pl = strlen(pat);
    for (const char *q = s; (q = memmem(q, n - (size_t)(q - s), pat, pl)) != NULL; q += pl) k++;
    return k;
}

/* NVLM-D: replaces each "<image>" of the rendered prompt, in order, by its image's tile-tag text
 * (vlm_nvlm_image_text: <Image><tile_1>CTX×256 ... <tile_global_thumbnail>CTX×256</Image>) and tokenizes the
 * whole string, as modeling_nvlm_d.py chat() does — the tags are plain text and "<Image><tile" does not
 * tokenize on the tag boundaries, so per-image ids cannot be spliced into a tokenized prompt. */
static vlm_status nvlm_tokenize(const vlmd_bundle *b, const char *text, size_t len,
                                const vlmd_prompt_limits *lim, vlmd_prompt *p, char *err, size_t errlen) {
    const size_t phl = strlen(NVLM_IMAGE_PLACEHOLDER);
    const int tpt = b->cfg->nvlm.tokens_per_tile;
    size_t n_ph = count_sub(text, len, NVLM_IMAGE_PLACEHOLDER);
    if (n_ph != (size_t)p->n_images)
        return vlm_errf(err, errlen, VLM_E_INVALID,
                        "the prompt holds %zu '" NVLM_IMAGE_PLACEHOLDER "' placeholders but %d images were given",
                        n_ph, p->n_images);
    size_t total = len - n_ph * phl;
    for (int i = 0; i < p->n_images; i++)
        total += vlm_nvlm_image_text((int)p->pixels[i].n_patches, tpt, NVLM_IMG_CONTEXT, NULL, 0);
    char *buf = malloc(total + 1);
    if (!buf) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    size_t o = 0;
    const char *q = text, *end = text + len;
    for (int i = 0; i < p->n_images; i++) {
        const char *hit = memmem(q, (size_t)(end - q), NVLM_IMAGE_PLACEHOLDER, phl);
        VLM_ASSERT(hit != NULL);
        memcpy(buf + o, q, (size_t)(hit - q));
        o += (size_t)(hit - q);
        o += vlm_nvlm_image_text((int)p->pixels[i].n_patches, tpt, NVLM_IMG_CONTEXT, buf + o, total + 1 - o);
        q = hit + phl;
    }
    memcpy(buf + o, q, (size_t)(end - q));
    o += (size_t)(end - q);
    VLM_ASSERT(o == total);
    buf[o] = 0;
    vlm_ids ids = {0};
    char terr[256];
    int rc = vlm_tok_encode(b->tok, buf, total, false, &ids, terr, sizeof terr);
    free(buf);
    if (rc != 0) return vlm_errf(err, errlen, VLM_E_INVALID, "cannot tokenize the prompt: %s", terr);
    int64_t n_ctx = 0;
    for (size_t i = 0; i < ids.n; i++) n_ctx += ids.ids[i] == b->cfg->image_token_id;
    vlm_status st = VLM_OK;
    if (n_ctx != p->n_image_tokens)
        st = vlm_errf(err, errlen, VLM_E_INVALID,
                      "the prompt holds %lld image context tokens but its images need %lld "
                      "(is '" NVLM_IMG_CONTEXT "' written in the text?)",
                      (long long)n_ctx, (long long)p->n_image_tokens);
    else if ((int64_t)ids.n > lim->max_prompt_tokens)
        st = vlm_errf(err, errlen, VLM_E_LIMIT,
                      "the prompt is %lld tokens (%lld of them image tokens), over the limit of %lld",
                      (long long)ids.n, (long long)p->n_image_tokens, (long long)lim->max_prompt_tokens);
    else if (!(p->ids = malloc(sizeof(int32_t) * (ids.n ? ids.n : 1))))
        st = vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    if (st == VLM_OK) {
        memcpy(p->ids, ids.ids, sizeof(int32_t) * ids.n);
        p->n_ids = (int64_t)ids.n;
    }
    vlm_ids_free(&ids);
    return st;
}

/* Tokenizes the rendered text and expands each image pad into its image's token count. */
static vlm_status tokenize_and_expand(const vlmd_bundle *b, const char *text, size_t len,
                                      const vlmd_prompt_limits *lim, vlmd_prompt *p, char *err,
                                      size_t errlen) {
    if (b->ivit && p->n_images > 0) return nvlm_tokenize(b, text, len, lim, p, err, errlen);
    vlm_ids ids = {0};
    char terr[256];
    if (vlm_tok_encode(b->tok, text, len, false, &ids, terr, sizeof terr) != 0)
        return vlm_errf(err, errlen, VLM_E_INVALID, "cannot tokenize the prompt: %s", terr);
    const int32_t pad = b->cfg->image_token_id;
    int n_pads = 0;
    for (size_t i = 0; i < ids.n; i++) n_pads += ids.ids[i] == pad;
    if (n_pads != p->n_images) {
        vlm_ids_free(&ids);
        return vlm_errf(err, errlen, VLM_E_INVALID,
                        "the prompt holds %d image placeholder tokens but %d images were given "
                        "(is '<|image_pad|>' written in the text?)",
                        n_pads, p->n_images);
    }
    int64_t total = (int64_t)ids.n - n_pads + p->n_image_tokens;
    if (total > lim->max_prompt_tokens) {
        vlm_ids_free(&ids);
        return vlm_errf(err, errlen, VLM_E_LIMIT,
                        "the prompt is %lld tokens (%lld of them image tokens), over the limit of %lld",
                        (long long)total, (long long)p->n_image_tokens,
                        (long long)lim->max_prompt_tokens);
    }
    p->ids = malloc(sizeof(int32_t) * (size_t)(total > 0 ? total : 1));
    if (!p->ids) {
        vlm_ids_free(&ids);
        return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    }
    int64_t o = 0;
    int img = 0;
    for (size_t i = 0; i < ids.n; i++) {
        if (ids.ids[i] == pad) {
            for (int64_t k = 0; k < p->pixels[img].n_tokens; k++) p->ids[o++] = pad;
            img++;
        } else {
            p->ids[o++] = ids.ids[i];
        }
    }
    VLM_ASSERT(o == total);
    p->n_ids = total;
    vlm_ids_free(&ids);
    return VLM_OK;
}

/* NVLM-D renders string content with the tokenizer's (text) chat template, so a message's parts become one
 * string the way vLLM builds NVLM-D prompts: one "<image>" per image the text does not already place, each
 * followed by "\n", in front of the text parts joined with "\n" — for one image and a question this is
 * chat()'s "<image>\n" + question. flat[i] owns the string; msgs[i].content points at it. */
static vlm_status nvlm_flatten(vlm_chat_msg *msgs, size_t n, char **flat, char *err, size_t errlen, char *param,
                               size_t paramlen) {
    for (size_t i = 0; i < n; i++) {
        if (msgs[i].content) continue;
        size_t need = 1, n_img = 0;
        for (size_t k = 0; k < msgs[i].n_parts; k++) {
            const vlm_chat_part *pt = &msgs[i].parts[k];
            if (pt->kind == VLM_PART_IMAGE) n_img++;
            else if (pt->kind == VLM_PART_TEXT) need += strlen(pt->text) + 1;
        }
        size_t placed = 0;
        for (size_t k = 0; k < msgs[i].n_parts; k++)
            if (msgs[i].parts[k].kind == VLM_PART_TEXT)
                placed += count_sub(msgs[i].parts[k].text, strlen(msgs[i].parts[k].text), NVLM_IMAGE_PLACEHOLDER);
        if (placed > n_img) {
            set_param(param, paramlen, "messages[%zu].content", i);
            return vlm_errf(err, errlen, VLM_E_INVALID,
                            "the text places %zu '" NVLM_IMAGE_PLACEHOLDER "' placeholders but the message has %zu images",
                            placed, n_img);
        }
        size_t missing = n_img - placed;
        need += missing * (strlen(NVLM_IMAGE_PLACEHOLDER) + 1);
        char *s = malloc(need);
        if (!s) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
        size_t o = 0;
        for (size_t k = 0; k < missing; k++) o += (size_t)sprintf(s + o, "%s\n", NVLM_IMAGE_PLACEHOLDER);
        size_t t = 0;
        for (size_t k = 0; k < msgs[i].n_parts; k++) {
            const vlm_chat_part *pt = &msgs[i].parts[k];
            if (pt->kind != VLM_PART_TEXT) continue;
            if (t++) s[o++] = '\n';
            size_t L = strlen(pt->text);
            memcpy(s + o, pt->text, L);
            o += L;
        }
        s[o] = 0;
        VLM_ASSERT(o < need);
        flat[i] = s;
        msgs[i].content = s;
        msgs[i].parts = NULL;
        msgs[i].n_parts = 0;
    }
    return VLM_OK;
}

static bool valid_role(const char *r) {
    return !strcmp(r, "system") || !strcmp(r, "user") || !strcmp(r, "assistant") ||
           !strcmp(r, "developer");
}

vlm_status vlmd_prompt_from_messages(const vlmd_bundle *b, const cJSON *messages,
                                     const vlmd_prompt_limits *lim, vlmd_prompt *out, char *err,
                                     size_t errlen, char *param, size_t paramlen) {
    memset(out, 0, sizeof *out);
    set_param(param, paramlen, "messages");
    if (!cJSON_IsArray(messages))
        return vlm_errf(err, errlen, VLM_E_INVALID, "'messages' must be an array");
    int n = cJSON_GetArraySize(messages);
    if (n == 0) return vlm_errf(err, errlen, VLM_E_INVALID, "'messages' must not be empty");

    vlm_chat_msg *msgs = calloc((size_t)n, sizeof *msgs);
    vlm_chat_part **parts = calloc((size_t)n, sizeof *parts);
    char **flat = calloc((size_t)n, sizeof *flat);
    vlm_status st = VLM_OK;
    if (!msgs || !parts || !flat) {
        st = vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
        goto done;
    }
    int i = 0;
    for (const cJSON *m = messages->child; m; m = m->next, i++) {
        char where[64];
        snprintf(where, sizeof where, "messages[%d]", i);
        if (!cJSON_IsObject(m)) {
            set_param(param, paramlen, "%s", where);
            st = vlm_errf(err, errlen, VLM_E_INVALID, "each message must be an object");
            goto done;
        }
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsString(role) || !valid_role(role->valuestring)) {
            set_param(param, paramlen, "%s.role", where);
            st = vlm_errf(err, errlen, VLM_E_INVALID,
                          "'role' must be one of 'system', 'developer', 'user', 'assistant'");
            goto done;
        }
        /* OpenAI's newer "developer" role is the system role for these models. */
        msgs[i].role = !strcmp(role->valuestring, "developer") ? "system" : role->valuestring;
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (cJSON_IsString(content)) {
            msgs[i].content = content->valuestring;
            continue;
        }
        if ((!content || cJSON_IsNull(content)) && !strcmp(msgs[i].role, "assistant")) {
            msgs[i].content = "";
            continue;
        }
        if (!cJSON_IsArray(content)) {
            set_param(param, paramlen, "%s.content", where);
            st = vlm_errf(err, errlen, VLM_E_INVALID,
                          "'content' must be a string or an array of content parts");
            goto done;
        }
        int np = cJSON_GetArraySize(content);
        parts[i] = calloc((size_t)(np > 0 ? np : 1), sizeof **parts);
        if (!parts[i]) {
            st = vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
            goto done;
        }
        msgs[i].parts = parts[i];
        msgs[i].n_parts = (size_t)np;
        int j = 0;
        for (const cJSON *part = content->child; part; part = part->next, j++) {
            char pwhere[96];
            snprintf(pwhere, sizeof pwhere, "%s.content[%d]", where, j);
            const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
            if (!cJSON_IsObject(part) || !cJSON_IsString(type)) {
                set_param(param, paramlen, "%s.type", pwhere);
                st = vlm_errf(err, errlen, VLM_E_INVALID,
                              "each content part must be an object with a string 'type'");
                goto done;
            }
            if (!strcmp(type->valuestring, "text")) {
                const cJSON *t = cJSON_GetObjectItemCaseSensitive(part, "text");
                if (!cJSON_IsString(t)) {
                    set_param(param, paramlen, "%s.text", pwhere);
                    st = vlm_errf(err, errlen, VLM_E_INVALID, "a text part needs a string 'text'");
                    goto done;
                }
                parts[i][j].kind = VLM_PART_TEXT;
                parts[i][j].text = t->valuestring;
            } else if (!strcmp(type->valuestring, "image_url")) {
                if (strcmp(msgs[i].role, "user")) {
                    set_param(param, paramlen, "%s", pwhere);
                    st = vlm_errf(err, errlen, VLM_E_INVALID, "images are only accepted in user messages");
                    goto done;
                }
                st = add_image(b, part, lim, out, err, errlen, param, paramlen, pwhere);
                if (st != VLM_OK) goto done;
                parts[i][j].kind = VLM_PART_IMAGE;
            } else {
                set_param(param, paramlen, "%s.type", pwhere);
                st = vlm_errf(err, errlen, VLM_E_INVALID,
                              "unsupported content part type '%.40s' (expected 'text' or 'image_url')",
                              type->valuestring);
                goto done;
            }
        }
    }

    if (b->ivit) {
        st = nvlm_flatten(msgs, (size_t)n, flat, err, errlen, param, paramlen);
        if (st != VLM_OK) goto done;
    }
    char rerr[256];
    out->text = vlm_chat_render(b->tok, b->template_kind, msgs, (size_t)n, true, rerr, sizeof rerr);
    if (!out->text) {
        set_param(param, paramlen, "messages");
        st = vlm_errf(err, errlen, VLM_E_INVALID, "chat template: %s", rerr);
        goto done;
    }
    set_param(param, paramlen, "messages");
    st = tokenize_and_expand(b, out->text, strlen(out->text), lim, out, err, errlen);

done:
    if (parts)
        for (int k = 0; k < n; k++) free(parts[k]);
    if (flat)
        for (int k = 0; k < n; k++) free(flat[k]);
    free(flat);
    free(parts);
    free(msgs);
    if (st != VLM_OK) vlmd_prompt_free(out);
    return st;
}

vlm_status vlmd_prompt_from_text(const vlmd_bundle *b, const char *text, size_t len,
                                 const vlmd_prompt_limits *lim, vlmd_prompt *out, char *err,
                                 size_t errlen) {
    memset(out, 0, sizeof *out);
    out->text = strndup(text, len);
    if (!out->text) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    vlm_status st = tokenize_and_expand(b, text, len, lim, out, err, errlen);
    if (st != VLM_OK) vlmd_prompt_free(out);
    return st;
}

vlm_status vlmd_prompt_from_ids(const vlmd_bundle *b, const int32_t *ids, int64_t n,
                                const vlmd_prompt_limits *lim, vlmd_prompt *out, char *err,
                                size_t errlen) {
    memset(out, 0, sizeof *out);
    if (n <= 0) return vlm_errf(err, errlen, VLM_E_INVALID, "the prompt is empty");
    if (n > lim->max_prompt_tokens)
        return vlm_errf(err, errlen, VLM_E_LIMIT, "the prompt is %lld tokens, over the limit of %lld",
                        (long long)n, (long long)lim->max_prompt_tokens);
    int32_t vocab = vlm_tok_vocab_size(b->tok);
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= vocab || ids[i] >= b->cfg->vocab)
            return vlm_errf(err, errlen, VLM_E_INVALID, "token id %d at index %lld is out of range",
                            ids[i], (long long)i);
        if (ids[i] == b->cfg->image_token_id || ids[i] == b->cfg->video_token_id)
            return vlm_errf(err, errlen, VLM_E_INVALID,
                            "token id %d at index %lld is an image/video placeholder", ids[i],
                            (long long)i);
    }
    out->ids = malloc(sizeof(int32_t) * (size_t)n);
    if (!out->ids) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    memcpy(out->ids, ids, sizeof(int32_t) * (size_t)n);
    out->n_ids = n;
    return VLM_OK;
}

vlm_status vlmd_prompt_encode_step(const vlmd_bundle *b, vlmd_prompt *p, vlmd_imgcache *cache, int max_blocks,
                                   bool *done, char *err, size_t errlen) {
    *done = p->n_images == 0 || p->images;
    if (*done) return VLM_OK;
    if (!p->embeds) p->embeds = calloc((size_t)p->n_images, sizeof *p->embeds);
    if (!p->enc_imgs) p->enc_imgs = calloc((size_t)p->n_images, sizeof *p->enc_imgs);
    if (!p->embeds || !p->enc_imgs) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory");
    const int64_t hidden = b->ivit ? b->cfg->hidden : b->cfg->vision.out_hidden;
    for (; p->enc_i < p->n_images; p->enc_i++) {
        const int i = p->enc_i;
        const vlm_pixels *px = &p->pixels[i];
        const int64_t n_floats = px->n_tokens * hidden;
        bool fin = false; /* image i's embeddings are complete */
        if (!p->enc_job && p->enc_tile == 0) { /* image i not started */
            if (!p->embeds[i]) p->embeds[i] = malloc(sizeof(float) * (size_t)n_floats);
            if (!p->embeds[i]) return vlm_errf(err, errlen, VLM_E_NOMEM, "out of memory for image %d embeddings", i);
            p->enc_key = cache ? vlmd_imgcache_key(cache, px) : 0;
            fin = cache && vlmd_imgcache_get(cache, p->enc_key, px, p->embeds[i], n_floats);
            if (!fin && !b->ivit) {
                vlm_status st = vlm_vit_job_begin(b->vit, px, p->embeds[i], &p->enc_job, err, errlen);
                if (st != VLM_OK) return st;
            }
        }
        if (!fin) {
            if (b->ivit) { /* a slice is max_blocks tiles */
                const int64_t nt = px->n_patches;
                const int64_t t1 = max_blocks > 0 && p->enc_tile + max_blocks < nt ? p->enc_tile + max_blocks : nt;
                vlm_status st = vlm_internvit_encode_tiles(b->ivit, px, p->enc_tile, t1, p->embeds[i], err, errlen);
                if (st != VLM_OK) return st;
                fin = t1 == nt;
                p->enc_tile = fin ? 0 : t1;
            } else {
                vlm_status st = vlm_vit_job_run(p->enc_job, max_blocks, &fin, err, errlen);
                if (st != VLM_OK) return st;
                if (fin) {
                    vlm_vit_job_free(p->enc_job);
                    p->enc_job = NULL;
                }
            }
            if (!fin) return VLM_OK; /* the slice is used up */
            if (cache) vlmd_imgcache_put(cache, p->enc_key, px, p->embeds[i], n_floats);
        }
        memcpy(p->enc_imgs[i].grid_thw, px->grid_thw, sizeof p->enc_imgs[i].grid_thw);
        p->enc_imgs[i].embeds = p->embeds[i];
        p->enc_imgs[i].n_tokens = px->n_tokens;
    }
    p->images = p->enc_imgs;
    p->enc_imgs = NULL;
    *done = true;
    return VLM_OK;
}

vlm_status vlmd_prompt_encode_images(const vlmd_bundle *b, vlmd_prompt *p, vlmd_imgcache *cache, char *err,
                                     size_t errlen) {
    bool done;
    return vlmd_prompt_encode_step(b, p, cache, 0, &done, err, errlen);
}

void vlmd_prompt_to_desc(const vlmd_prompt *p, vlm_seq_desc *d) {
    d->prompt = p->ids;
    d->n_prompt = p->n_ids;
    d->images = p->images;
    d->n_images = p->images ? p->n_images : 0;
}
