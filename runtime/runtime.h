/* runtime.h — the one public header of the runtime layer.
 *
 * What lives here: status codes, tensors and dtypes, safetensors checkpoints (mmapped, validated),
 * model configuration (config.json, generation_config.json), CPU kernels with run-time dispatch,
 * the Qwen2 decoder (M-RoPE or 1-D RoPE), the paged KV cache, sampling, and the batched engine
 * that the server's scheduler and `vlmd generate` drive.
 *
 * What does not: HTTP, OpenAI JSON, image files, tokenizers. vision/ builds on this header
 * (tensors, kernels, checkpoint access); server/ drives the engine.
 *
 * Threading contract: a vlm_model is read-only after vlm_model_load and may be shared by any
 * thread. A vlm_engine is owned by one thread (the engine thread); every vlm_engine_* call
 * comes from that thread. Kernels parallelise internally with OpenMP (vlm_cpu_init sets threads).
 */
#ifndef VLM_RUNTIME_H
#define VLM_RUNTIME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status ------------------------------------------------------------------------------
 * Expected failures return one of these and write a human message into the caller's buffer.
 * server/ maps each to an HTTP status in one table. */
typedef enum {
    VLM_OK = 0,
    VLM_E_INVALID,     /* a bad argument or bad user input (HTTP 400) */
    VLM_E_IO,          /* file missing or unreadable */
    VLM_E_FORMAT,      /* malformed checkpoint, config, image or fixture */
    VLM_E_UNSUPPORTED, /* well-formed but not something vlmd implements */
    VLM_E_NOMEM,       /* allocation failed */
    VLM_E_LIMIT,       /* exceeds a configured limit (pixels, tokens, context) */
    VLM_E_CAPACITY,    /* engine cannot take more now (KV pages, sequences) */
    VLM_E_CANCELLED,
    VLM_E_INTERNAL,
} vlm_status;

const char *vlm_status_name(vlm_status s);

/* Broken invariants (never user input) abort with the location and the condition. */
#define VLM_ASSERT(cond)                                                                      \
    do {                                                                                      \
        if (!(cond)) vlm_abort(__FILE__, __LINE__, #cond);                                    \
    } while (0)
_Noreturn void vlm_abort(const char *file, int line, const char *what);

/* Writes a formatted message into (buf, len) when buf is non-NULL; returns st for chaining:
 *   return vlm_errf(err, errlen, VLM_E_FORMAT, "tensor %s: offsets past end", name); */
vlm_status vlm_errf(char *buf, size_t len, vlm_status st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Keyed 64-bit hashing (SipHash-2-4 rounds over 64-bit words) for cache keys that a client must not
 * be able to collide on purpose: the engine's KV prefix cache and the server's image cache. Draw the
 * key once per cache with vlm_hash_random_key (getrandom). */
typedef struct { uint64_t v[4], n; } vlm_hash;
void vlm_hash_random_key(uint64_t key[2]);
void vlm_hash_begin(vlm_hash *h, const uint64_t key[2]);
void vlm_hash_word(vlm_hash *h, uint64_t m);
void vlm_hash_bytes(vlm_hash *h, const void *data, size_t n);
uint64_t vlm_hash_end(vlm_hash *h);

/* ---- tensors ------------------------------------------------------------------------------ */
typedef enum { VLM_F32 = 0, VLM_BF16, VLM_F16, VLM_I32, VLM_I64, VLM_U8, VLM_DTYPE_COUNT } vlm_dtype;

size_t vlm_dtype_size(vlm_dtype t);
const char *vlm_dtype_name(vlm_dtype t);

#define VLM_MAX_DIMS 6
typedef struct {
    vlm_dtype dtype;
    int ndim;
    int64_t shape[VLM_MAX_DIMS];
    void *data;    /* row-major, last dimension fastest; points into an mmap for checkpoint tensors */
    size_t nbytes;
} vlm_tensor;

int64_t vlm_tensor_numel(const vlm_tensor *t);

static inline float vlm_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}
/* Round-to-nearest-even, as torch's .to(torch.bfloat16). */
uint16_t vlm_f32_to_bf16(float f);
float vlm_f16_to_f32(uint16_t h);

/* ---- safetensors checkpoints --------------------------------------------------------------
 * Opens a single file or a directory (model.safetensors, or model.safetensors.index.json with its
 * shards). Every header is validated (size, offsets inside the file, shape x itemsize == bytes, no
 * overlap, no duplicates) before anything is trusted; data is mmapped read-only. */
typedef struct vlm_ckpt vlm_ckpt;
vlm_status vlm_ckpt_open(const char *path, vlm_ckpt **out, char *err, size_t errlen);
const vlm_tensor *vlm_ckpt_find(const vlm_ckpt *c, const char *name); /* NULL when absent */
size_t vlm_ckpt_count(const vlm_ckpt *c);
const char *vlm_ckpt_name_at(const vlm_ckpt *c, size_t i);
void vlm_ckpt_close(vlm_ckpt *c);

/* ---- model configuration ------------------------------------------------------------------ */
typedef enum { VLM_ARCH_QWEN2 = 0, VLM_ARCH_QWEN2_VL, VLM_ARCH_NVLM_D } vlm_arch;

typedef struct {
    int depth, embed_dim, num_heads, mlp_hidden, in_channels;
    int patch_size, temporal_patch_size, spatial_merge_size;
    int out_hidden;          /* merger output width == decoder hidden */
    char hidden_act[32];     /* "quick_gelu" */
} vlm_vision_config;

typedef struct {
    vlm_arch arch;
    int hidden, intermediate, n_layers, n_heads, n_kv_heads, head_dim, vocab;
    float rms_eps, rope_theta;
    int mrope_section[3];    /* {0,0,0} for 1-D RoPE */
    int max_position;
    bool tie_embeddings;
    int32_t bos_id, image_token_id, video_token_id, vision_start_id, vision_end_id;
    int32_t eos_ids[4];
    int n_eos;
    vlm_dtype weight_dtype;  /* dtype the decoder weights are stored in */
    bool has_vision;
    vlm_vision_config vision;
    /* NVLM-D only (arch VLM_ARCH_NVLM_D; zero otherwise): top-level keys of its config.json and the
     * InternViT `vision_config` (docs/nvlm.md lists where each value comes from). */
    struct {
        int image_size;            /* force_image_size (448): tile side in pixels */
        int min_tiles, max_tiles;  /* min_dynamic_patch, max_dynamic_patch */
        bool use_thumbnail, dynamic_image_size;
        int ps_version;            /* pixel shuffle: 1 leaves the grid transposed, 2 swaps back */
        int select_layer;          /* -1: last layer */
        float downsample_ratio;    /* 0.5 */
        int tokens_per_tile;       /* (image_size/patch)^2 * ratio^2 = 256 */
        /* InternViT */
        int vit_layers, vit_hidden, vit_heads, vit_intermediate, vit_patch;
        float vit_norm_eps;
        bool vit_rms_norm, vit_qk_norm, vit_qkv_bias;
    } nvlm;
    /* image preprocessing from preprocessor_config.json (class defaults when absent) */
    int64_t min_pixels, max_pixels;
    float image_mean[3], image_std[3];
} vlm_model_config;

/* generation_config.json defaults (fields absent in the file keep "unset" values: temperature < 0). */
typedef struct {
    float temperature, top_p, min_p, repetition_penalty;
    int top_k;
    bool do_sample;
} vlm_gen_defaults;

/* ---- model -------------------------------------------------------------------------------- */
typedef struct vlm_model vlm_model;

typedef struct {
    int threads;         /* 0: all online cores */
    bool convert_f32;    /* store decoder weights as f32 (exactness tests); default keeps file dtype */
} vlm_load_opts;

vlm_status vlm_model_load(const char *dir, const vlm_load_opts *opts, vlm_model **out,
                          char *err, size_t errlen);
void vlm_model_free(vlm_model *m);
const vlm_model_config *vlm_model_cfg(const vlm_model *m);
const vlm_gen_defaults *vlm_model_gen_defaults(const vlm_model *m);
const vlm_ckpt *vlm_model_ckpt(const vlm_model *m); /* for vision/ to find its tensors */
const char *vlm_model_dir(const vlm_model *m);

/* ---- CPU kernels (run-time dispatch on CPU features) --------------------------------------- */
void vlm_cpu_init(int threads);       /* idempotent; threads <= 0 means all cores */
int vlm_cpu_threads(void);
const char *vlm_cpu_describe(void);   /* "Intel Xeon ...; path=avx512f" */

/* y[n, m] = x[n, k] · W[m, k]^T (+ bias[m]); W in F32, BF16 or F16, bias F32/BF16 or NULL. */
void vlm_linear(const float *x, int64_t n, int64_t k, const vlm_tensor *w, const vlm_tensor *bias,
                float *y);

/* C[m, n] = A[m, k] · op(B) (+ beta·C) with op(B) = B[n, k]^T when b_trans, else B[k, n]; all f32,
 * row-major with leading dimensions. For attention scores/values and other activation products. */
void vlm_gemm_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b,
                  int64_t ldb, bool b_trans, float beta, float *c, int64_t ldc);

/* ---- sampling ----------------------------------------------------------------------------- */
typedef struct {
    float temperature;        /* 0 => greedy */
    float top_p;              /* 1 => off */
    int top_k;                /* 0 => off */
    float min_p;              /* 0 => off */
    float repetition_penalty; /* 1 => off; HF semantics over prompt + generated ids */
    float presence_penalty, frequency_penalty; /* OpenAI semantics over generated ids */
    uint64_t seed;
    int top_logprobs;         /* 0..20 alternatives reported per token */
    bool logprobs;            /* report the chosen token's logprob */
} vlm_sampling;

void vlm_sampling_default(vlm_sampling *s); /* greedy, all filters off */



/* ---- engine: continuous batching over a paged KV cache -------------------------------------- */
typedef struct vlm_engine vlm_engine;

typedef enum { VLM_BACKEND_CPU = 0, VLM_BACKEND_CUDA } vlm_backend_kind;
#define VLM_MAX_TP 64

typedef struct {
    int threads;
    int64_t kv_memory_bytes;  /* KV page pool size; 0 => a default sized from the model */
    int max_seqs;             /* most sequences resident at once */
    int max_batch_tokens;     /* tokens per step (prefill chunk + decode tokens) */
    int page_tokens;          /* tokens per KV page; 0 => 16 */
    bool no_prefix_cache;     /* recompute every prompt in full (the prefix cache is on by default) */
    /* tensor parallelism and backend (docs/runtime.md "Backends and tensor parallelism"). With tp = N
     * the decoder is sharded over N ranks (CPU: N rank threads sharing `threads`; CUDA: one GPU per
     * rank); kv_memory_bytes is then the KV pool of EACH rank. Zero values keep a 1-rank CPU engine. */
    int tp;                   /* ranks; 0 or 1 => no tensor parallelism */
    vlm_backend_kind backend;
    int gpus[VLM_MAX_TP];     /* CUDA device of each rank (backend CUDA); n_gpus == 0 => 0..tp-1 */
    int n_gpus;
} vlm_engine_opts;

vlm_status vlm_engine_create(vlm_model *m, const vlm_engine_opts *opts, vlm_engine **out,
                             char *err, size_t errlen);
void vlm_engine_free(vlm_engine *e);

/* One image already encoded by vision/: rows of embeddings that replace its pad tokens. */
typedef struct {
    int32_t grid_thw[3];      /* in patches, before merging (Qwen2-VL); NVLM: {1, tiles*16, 16} */
    const float *embeds;      /* [n_tokens, hidden]; copied by vlm_engine_add */
    int64_t n_tokens;         /* must equal the number of pad tokens this image owns */
} vlm_image_embeds;

typedef struct {
    const int32_t *prompt;    /* token ids, pads already expanded */
    int64_t n_prompt;
    const vlm_image_embeds *images; /* in order of appearance in the prompt */
    int n_images;
    vlm_sampling sampling;
    int max_tokens;           /* new tokens at most */
    bool ignore_eos;
    const int32_t *stop_ids;  /* extra stop token ids (besides the model's eos unless ignore_eos) */
    int n_stop_ids;
    bool want_logits;         /* keep this step's full logits readable by vlm_engine_logits */
} vlm_seq_desc;

/* Validates and queues a sequence (copies everything it needs). VLM_E_LIMIT when prompt +
 * max_tokens cannot fit the context or the whole KV pool; VLM_E_CAPACITY never here. */
vlm_status vlm_engine_add(vlm_engine *e, const vlm_seq_desc *d, uint64_t *seq_id,
                          char *err, size_t errlen);
/* Marks a sequence cancelled; it leaves at the next step with finish VLM_FINISH_CANCELLED. */
void vlm_engine_cancel(vlm_engine *e, uint64_t seq_id);

typedef enum {
    VLM_FINISH_NONE = 0, VLM_FINISH_STOP, VLM_FINISH_LENGTH, VLM_FINISH_CANCELLED, VLM_FINISH_ERROR
} vlm_finish;

#define VLM_MAX_TOP_LOGPROBS 20
typedef struct {
    uint64_t seq_id;
    int32_t token;            /* -1 when the event only reports a finish without a token */
    float logprob;            /* of the chosen token under the unfiltered softmax */
    int n_top;
    int32_t top_ids[VLM_MAX_TOP_LOGPROBS];
    float top_logprobs[VLM_MAX_TOP_LOGPROBS];
    vlm_finish finish;        /* set on the event that ends the sequence */
    int64_t n_prompt;         /* prompt tokens (for usage) */
    int64_t n_cached_prompt;  /* of those, read from the prefix cache when the sequence first ran */
} vlm_token_event;

/* Per-sequence random stream (xoshiro256**), seeded from vlm_sampling.seed. */
typedef struct { uint64_t s[4]; } vlm_rng;
void vlm_rng_seed(vlm_rng *r, uint64_t seed);
double vlm_rng_uniform(vlm_rng *r); /* [0, 1) */

/* Applies, in place, the repetition penalty (HF: every distinct id of ids[0..n_ids)) and the
 * presence/frequency penalties (OpenAI: counts over the generated ids[n_prompt..n_ids)). */
void vlm_apply_penalties(const vlm_sampling *s, float *logits, int64_t vocab, const int32_t *ids,
                         int64_t n_prompt, int64_t n_ids);
/* Chooses the next token from raw logits: penalties, then argmax when temperature == 0, else
 * temperature, top_k, top_p, min_p and a draw from r. When ev is non-NULL it gets the token, and
 * when s->logprobs or s->top_logprobs > 0 also logprob/top_* (log-softmax of the raw, unpenalised
 * logits; else logprob 0 and n_top 0). Returns the token. */
int32_t vlm_sample(const vlm_sampling *s, vlm_rng *r, const float *logits, int64_t vocab,
                   const int32_t *ids, int64_t n_prompt, int64_t n_ids, vlm_token_event *ev);

/* Runs one batched forward over the resident sequences (prefill chunks and decode tokens
 * together), samples, and writes up to max_events events. Returns the number written; 0 when
 * there was nothing to do. Sequences whose pages run out are preempted and resumed later. */
int vlm_engine_step(vlm_engine *e, vlm_token_event *ev, int max_events);
int vlm_engine_active(const vlm_engine *e);   /* queued + running sequences */
/* Full logits [vocab] of the last step for a sequence added with want_logits (NULL otherwise). */
const float *vlm_engine_logits(const vlm_engine *e, uint64_t seq_id);

typedef struct {
    int64_t kv_pages_total, kv_pages_used, page_tokens;
    int64_t kv_pages_cached;        /* held by no sequence, kept for the prefix cache (reusable) */
    int64_t prefix_query_tokens;    /* prompt tokens of sequences at their first step */
    int64_t prefix_hit_tokens;      /* of those, read from the prefix cache */
    int running, waiting, preempted_total;
    /* memory plan (per rank; every rank holds the same amounts) */
    int tp;
    int64_t weight_bytes_rank;      /* bytes of this rank's weight shards (mmap-aliased or copied) */
    int64_t kv_bytes_per_token_rank;/* K+V bytes one token takes in one rank's pool */
    int64_t work_bytes_rank;        /* activation buffers per rank */
} vlm_engine_stats;
/* One line describing the backend, ranks and memory plan, e.g. for the startup log. */
void vlm_engine_describe(const vlm_engine *e, char *buf, size_t len);
const char *vlm_backend_name(vlm_backend_kind k);
/* VLM_OK when this build and machine can run backend k (CUDA: built with make CUDA=1 and at least
 * one GPU visible); otherwise VLM_E_UNSUPPORTED with the reason. Cheap; call before loading a model. */
vlm_status vlm_backend_available(vlm_backend_kind k, char *err, size_t errlen);
void vlm_engine_get_stats(const vlm_engine *e, vlm_engine_stats *s);

/* Convenience for `vlmd generate` and tests: adds one sequence to an (otherwise idle or shared)
 * engine and steps until it finishes, calling cb for each of its events (other sequences' events
 * are dropped, so use a dedicated engine). cb returns false to cancel. *finish receives the reason. */
typedef bool (*vlm_token_cb)(const vlm_token_event *ev, void *user);
vlm_status vlm_generate(vlm_engine *e, const vlm_seq_desc *d, vlm_token_cb cb, void *user,
                        vlm_finish *finish, char *err, size_t errlen);

/* M-RoPE positions (SPEC §C.2): pos is [3][n] (t, h, w streams); returns rope_delta. Exposed for
 * tests and for chunked prefill. grids: n_images x {t,h,w} in patches; merge = spatial merge. */
int64_t vlm_rope_index(const vlm_model_config *cfg, const int32_t *ids, int64_t n,
                       const int32_t (*grids)[3], int n_grids, int64_t *pos);

/* Writes f32 data as a NumPy .npy file: shape (rows, cols), or (cols,) when rows < 0. */
vlm_status vlm_npy_write_f32(const char *path, const float *data, int64_t rows, int64_t cols,
                             char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
