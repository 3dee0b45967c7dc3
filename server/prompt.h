/* prompt.h — from OpenAI-style chat messages (or raw text) to what the engine runs: the loaded
 * model bundle (model + tokenizer + vision encoder), message validation, chat template, image
 * fetching/decoding/preprocessing under limits, pad expansion, tokenization, image encoding.
 * Shared by `vlmd serve` (server/http*.c, server/openai*.c) and `vlmd generate`. Internal to server/. */
#ifndef VLMD_PROMPT_H
#define VLMD_PROMPT_H

#include <cJSON.h>

#include "runtime/runtime.h"
#include "tokenizer/tokenizer.h"
#include "vision/vision.h"

/* Everything loaded from one model directory; read-only after load, shared by all threads. */
typedef struct {
    vlm_model *model;
    vlm_tok *tok;
    vlm_vit *vit;            /* Qwen2-VL vision transformer; NULL for other families / text-only */
    vlm_internvit *ivit;     /* NVLM-D InternViT + mlp1 (cfg->arch == VLM_ARCH_NVLM_D); NULL otherwise */
    const vlm_model_config *cfg;
    char name[256];          /* model id reported by /v1/models (directory basename by default) */
    vlm_template_kind template_kind;
} vlmd_bundle;

vlm_status vlmd_bundle_load(const char *dir, int threads, vlmd_bundle **out, char *err, size_t errlen);
void vlmd_bundle_free(vlmd_bundle *b);
/* Splits the NVLM-D vision encoder over tp CPU rank threads, as --tp splits the decoder (no-op for other
 * families and tp <= 1). On the CUDA backend the vision encoder still runs on these CPU ranks. */
vlm_status vlmd_bundle_vision_tp(vlmd_bundle *b, int tp, char *err, size_t errlen);

/* Fetches a remote (http/https) image URL into a malloc'd buffer; provided by the server when
 * --allow-remote-media is on. Returns VLM_OK or an error with a message. */
typedef vlm_status (*vlmd_fetch_fn)(void *ctx, const char *url, uint8_t **bytes, size_t *n,
                                    char *err, size_t errlen);

typedef struct {
    vlm_img_limits img;       /* per image */
    int max_images;           /* per request */
    int64_t max_image_tokens; /* per image, after smart_resize (caps max_pixels) */
    int64_t max_prompt_tokens;/* the whole prompt, images included */
    bool allow_local_files;   /* plain paths and file:// URLs (vlmd generate only) */
    vlmd_fetch_fn fetch;      /* NULL: http(s) image URLs are refused */
    void *fetch_ctx;
} vlmd_prompt_limits;

void vlmd_prompt_limits_default(vlmd_prompt_limits *l);

typedef struct {
    int32_t *ids;             /* prompt token ids, image pads expanded */
    int64_t n_ids;
    char *text;               /* rendered prompt (before pad expansion; NVLM-D: before the tile-tag
                               * substitution, with one "<image>" per image) */
    vlm_pixels *pixels;       /* n_images preprocessed images, in prompt order */
    float **embeds;           /* n_images, filled by vlmd_prompt_encode_images */
    vlm_image_embeds *images; /* n_images, filled by vlmd_prompt_encode_images */
    int n_images;
    int64_t n_image_tokens;
    /* encode in progress (vlmd_prompt_encode_step): images [0, enc_i) are done, into enc_imgs;
     * enc_job runs image enc_i's vision transformer (Qwen2-VL), enc_key its image-cache key */
    int enc_i;
    vlm_image_embeds *enc_imgs;
    vlm_vit_job *enc_job;
    int64_t enc_tile;         /* NVLM-D: tiles of image enc_i encoded so far */
    uint64_t enc_key;
} vlmd_prompt;

/* Validates an OpenAI `messages` array and builds the prompt. On a client error returns
 * VLM_E_INVALID / VLM_E_LIMIT / VLM_E_FORMAT with a message and the offending parameter path in
 * `param` (e.g. "messages[1].content[0].image_url.url"). Accepted content parts: {"type":"text",
 * "text"}, {"type":"image_url","image_url":{"url", "detail"?, "min_pixels"?, "max_pixels"?}} with
 * data: URLs (base64), http(s) URLs via limits->fetch, local paths when allowed; roles system,
 * user, assistant (string or parts content; null content for assistant allowed). */
vlm_status vlmd_prompt_from_messages(const vlmd_bundle *b, const cJSON *messages,
                                     const vlmd_prompt_limits *lim, vlmd_prompt *out, char *err,
                                     size_t errlen, char *param, size_t paramlen);

/* Raw text prompt (no template; /v1/completions). */
vlm_status vlmd_prompt_from_text(const vlmd_bundle *b, const char *text, size_t len,
                                 const vlmd_prompt_limits *lim, vlmd_prompt *out, char *err,
                                 size_t errlen);
/* Token-id prompt (/v1/completions with an array of ids); ids are range-checked. */
vlm_status vlmd_prompt_from_ids(const vlmd_bundle *b, const int32_t *ids, int64_t n,
                                const vlmd_prompt_limits *lim, vlmd_prompt *out, char *err,
                                size_t errlen);

/* Image embeddings kept across requests, keyed by the preprocessed pixels (imgcache.c), least
 * recently used evicted past budget_bytes. NULL (no cache) when budget_bytes <= 0. One thread only. */
typedef struct vlmd_imgcache vlmd_imgcache;
typedef struct { int64_t entries, bytes, hits, misses; } vlmd_imgcache_counts;
vlmd_imgcache *vlmd_imgcache_new(int64_t budget_bytes);
void vlmd_imgcache_free(vlmd_imgcache *c);
uint64_t vlmd_imgcache_key(const vlmd_imgcache *c, const vlm_pixels *px);
/* Copies the n_floats cached embedding floats of px into out; false (a miss) when absent. */
bool vlmd_imgcache_get(vlmd_imgcache *c, uint64_t key, const vlm_pixels *px, float *out, int64_t n_floats);
void vlmd_imgcache_put(vlmd_imgcache *c, uint64_t key, const vlm_pixels *px, const float *emb, int64_t n_floats);
void vlmd_imgcache_stats(const vlmd_imgcache *c, vlmd_imgcache_counts *s); /* zeros for NULL */

/* Runs the vision encoder on every image of the prompt (CPU heavy: call from the thread that
 * owns compute), or takes its embeddings from cache (may be NULL). No-op for prompts without
 * images. */
vlm_status vlmd_prompt_encode_images(const vlmd_bundle *b, vlmd_prompt *p, vlmd_imgcache *cache, char *err,
                                     size_t errlen);
/* The same a slice at a time: at most max_blocks Qwen2-VL vision transformer blocks, or NVLM-D
 * InternViT 448x448 tiles, per call (<= 0: everything left; cache hits cost nothing). *done once
 * every image is encoded (p->images set). */
vlm_status vlmd_prompt_encode_step(const vlmd_bundle *b, vlmd_prompt *p, vlmd_imgcache *cache, int max_blocks,
                                   bool *done, char *err, size_t errlen);

/* Points a sequence descriptor at the prompt (ids and encoded images); the prompt must outlive
 * vlm_engine_add (which copies). Sampling/max_tokens are the caller's. */
void vlmd_prompt_to_desc(const vlmd_prompt *p, vlm_seq_desc *d);

void vlmd_prompt_free(vlmd_prompt *p);

#endif
