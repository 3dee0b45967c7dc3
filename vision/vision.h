/* vision.h — the one public header of the vision layer.
 *
 * Image bytes -> RGB (limits checked from the header, before the full decode) -> Qwen2-VL
 * preprocessing (smart_resize, PIL-compatible bicubic, CLIP normalisation, patch flattening in the
 * reference order) -> the Qwen2-VL vision transformer -> embeddings for the <|image_pad|> slots.
 * Knows nothing of HTTP or JSON; uses runtime/ for status codes, tensors, kernels and weights.
 */
#ifndef VLM_VISION_H
#define VLM_VISION_H

#include "runtime/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t max_width, max_height; /* per side */
    int64_t max_pixels;            /* width * height of the decoded image */
    double max_aspect;             /* long side / short side; Qwen2-VL refuses > 200 */
    size_t max_bytes;              /* encoded size */
} vlm_img_limits;

void vlm_img_limits_default(vlm_img_limits *l); /* 16384 px sides, 64 Mpx, aspect 200, 32 MiB */

typedef struct {
    int width, height;
    uint8_t *rgb; /* [height][width][3], owned */
} vlm_image;

/* PNG, BMP, GIF (first frame) via stb_image, JPEG via libjpeg-turbo, WebP via libwebp. Transparency is composited
 * onto white exactly as transformers 5.24's convert_to_rgb (Pillow alpha_composite) does — the
 * reference the fixtures record; older transformers dropped alpha (SPEC §E.1). Dimensions are
 * checked against the limits from the header before pixels are decoded. VLM_E_FORMAT for corrupt
 * data, VLM_E_LIMIT for limit violations. lim NULL means vlm_img_limits_default. */
vlm_status vlm_img_decode(const uint8_t *bytes, size_t n, const vlm_img_limits *lim, vlm_image *out,
                          char *err, size_t errlen);
vlm_status vlm_img_load_file(const char *path, const vlm_img_limits *lim, vlm_image *out,
                             char *err, size_t errlen);
void vlm_img_free(vlm_image *img);

/* Qwen2-VL smart_resize as transformers 5.24 (SPEC §E.2 with its differences: sides < factor are
 * accepted, the max branch clamps each side to >= factor; only aspect > 200 is an error, VLM_E_LIMIT).
 * Python round-half-even. A side that would be 0 (min_pixels 0) is VLM_E_INVALID. */
vlm_status vlm_qwen_smart_resize(int64_t h, int64_t w, int factor, int64_t min_pixels,
                                 int64_t max_pixels, int64_t *out_h, int64_t *out_w,
                                 char *err, size_t errlen);

/* PIL Image.resize(BICUBIC) on uint8 RGB, bit-compatible with Pillow 13's fixed-point resampler
 * (including its pass-order rule). VLM_E_INVALID for empty sizes, VLM_E_NOMEM. */
vlm_status vlm_img_resize_bicubic(const vlm_image *src, int out_w, int out_h, vlm_image *dst);

/* Per-call preprocessing overrides; 0 means "use the model's preprocessor_config value". */
typedef struct {
    int64_t min_pixels, max_pixels;
} vlm_pp_opts;

/* One preprocessed image: pixel_values [n_patches, C*T*P*P] in the HF row order, plus its grid. */
typedef struct {
    float *pixel_values;
    int64_t n_patches, patch_dim;
    int32_t grid_thw[3];
    int64_t n_tokens; /* merged tokens = t*h*w / merge^2 */
} vlm_pixels;

vlm_status vlm_qwen_preprocess(const vlm_model_config *cfg, const vlm_image *img,
                               const vlm_pp_opts *opts, vlm_pixels *out, char *err, size_t errlen);
void vlm_pixels_free(vlm_pixels *p);

/* NVLM-D dynamic tiling (docs/nvlm.md): the (cols, rows) grid the source's find_closest_aspect_ratio picks,
 * including its candidate order and tie-break. Supports min_tiles 1 and max_tiles 1..12 (VLM_E_UNSUPPORTED
 * otherwise). */
vlm_status vlm_nvlm_tile_grid(int width, int height, int min_tiles, int max_tiles, int image_size,
                              int *cols, int *rows, char *err, size_t errlen);
/* NVLM-D preprocessing: out->pixel_values [n_tiles, 3, S, S] (grid tiles row-major, then the thumbnail
 * when use_thumbnail and more than one tile), out->n_patches = n_tiles, out->patch_dim = 3*S*S,
 * out->n_tokens = n_tiles * tokens_per_tile, grid_thw {1, n_tiles*S/P/2, S/P/2}. Note: alpha is composited
 * by vlm_img_decode; NVLM's own load_image uses PIL convert('RGB'), which drops it. */
vlm_status vlm_nvlm_preprocess(const vlm_model_config *cfg, const vlm_image *img, vlm_pixels *out,
                               char *err, size_t errlen);

/* NVLM-D prompt text for one image of n_tiles tiles (modeling_nvlm_d.py chat()): "<Image><tile_1>CTX...
 * <tile_global_thumbnail>CTX...</Image>", tokens_per_tile CTX copies per tag. Returns the length; writes
 * at most cap bytes including the NUL (out may be NULL to measure). Tokenize the whole prompt after the
 * substitution, as the source does: "<Image><tile" does not split on the tag boundaries. */
size_t vlm_nvlm_image_text(int n_tiles, int tokens_per_tile, const char *ctx_token, char *out, size_t cap);

/* NVLM-D's InternViT + pixel shuffle + mlp1 (vision/internvit.c). Weights `vision_model.*`, `mlp1.*`
 * from the model's checkpoint. Read-only after load; encode is re-entrant.
 * out: [px->n_tokens, cfg->hidden], caller-allocated; px from vlm_nvlm_preprocess. */
typedef struct vlm_internvit vlm_internvit;
vlm_status vlm_internvit_load(const vlm_model *m, vlm_internvit **out, char *err, size_t errlen);
void vlm_internvit_free(vlm_internvit *v);
vlm_status vlm_internvit_encode(const vlm_internvit *v, const vlm_pixels *px, float *out, char *err,
                                size_t errlen);
/* Only tiles [t0, t1) (each tile is independent), into their rows of the same out: the server
 * encodes an image a tile per engine step while other sequences decode. */
vlm_status vlm_internvit_encode_tiles(const vlm_internvit *v, const vlm_pixels *px, int64_t t0, int64_t t1,
                                      float *out, char *err, size_t errlen);
/* Tensor parallel over n CPU rank threads (default 1): rank r computes padded heads [r*HP/n, (r+1)*HP/n) — NVLM's
 * 25 + 7 dummy heads give 4 per rank at n = 8 — and 1/n of the MLP and of mlp1, all-reducing the QK-norm
 * partial sums of squares and the row-parallel outputs (docs/nvlm.md). Row blocks alias the checkpoint; column
 * blocks are copied. VLM_E_UNSUPPORTED when the padded heads, MLP width or mlp1 width do not divide by n.
 * Not thread-safe with a concurrent encode of the same encoder. */
vlm_status vlm_internvit_set_tp(vlm_internvit *v, int n, char *err, size_t errlen);
int vlm_internvit_tp(const vlm_internvit *v);

/* The Qwen2-VL vision transformer + PatchMerger. Weights are read from the model's checkpoint
 * (both `visual.*` and `model.visual.*` namings). Read-only after load; encode is re-entrant. */
typedef struct vlm_vit vlm_vit;
vlm_status vlm_vit_load(const vlm_model *m, vlm_vit **out, char *err, size_t errlen);
void vlm_vit_free(vlm_vit *v);
/* out: [px->n_tokens, cfg->vision.out_hidden], caller-allocated. */
vlm_status vlm_vit_encode(const vlm_vit *v, const vlm_pixels *px, float *out, char *err,
                          size_t errlen);
/* The same encode a few blocks at a time (the server interleaves it with decode steps): begin
 * validates px, embeds the patches and keeps what the blocks need (px may go after it returns);
 * each run does up to max_blocks transformer blocks (<= 0: all that are left) and, once past the
 * last, the PatchMerger into out, setting *done. Same arithmetic in the same order as
 * vlm_vit_encode, so the output is identical. */
typedef struct vlm_vit_job vlm_vit_job;
vlm_status vlm_vit_job_begin(const vlm_vit *v, const vlm_pixels *px, float *out, vlm_vit_job **job, char *err,
                             size_t errlen);
vlm_status vlm_vit_job_run(vlm_vit_job *j, int max_blocks, bool *done, char *err, size_t errlen);
void vlm_vit_job_free(vlm_vit_job *j);

#ifdef __cplusplus
}
#endif
#endif
