/* rt_internal.h — structures shared by the runtime's own files (checkpoint, model, decoder, engine).
 * Not part of the public contract; other layers use runtime.h only. */
#ifndef VLM_RT_INTERNAL_H
#define VLM_RT_INTERNAL_H
#include "runtime/runtime.h"

typedef struct {
    vlm_tensor *embed, *final_norm, *lm_head;
    struct vlm_layer {
        vlm_tensor *in_norm, *post_norm, *q, *k, *v, *qb, *kb, *vb, *o, *gate, *up, *down;
    } *layers;
} vlm_decoder_weights;

struct vlm_model {
    char *dir;
    vlm_ckpt *ckpt;
    vlm_model_config cfg;
    vlm_gen_defaults gen;
    vlm_decoder_weights w;
    float *inv_freq;          /* [head_dim/2] */
    vlm_tensor *owned;        /* f32 copies when convert_f32 (array, n_owned) */
    int n_owned;
    float *embed_f32_row_tmp; /* unused placeholder for alignment of future fields */
};

/* config.c */
vlm_status vlm_config_parse(const char *dir, vlm_model_config *cfg, vlm_gen_defaults *gen,
                            char *err, size_t errlen);
/* decoder.c: forward helpers */
void vlm_rms_norm(const float *x, const vlm_tensor *w, float eps, int64_t n, int64_t d, float *y);
void vlm_embed_rows(const vlm_tensor *e, const int32_t *ids, int64_t n, float *out);

/* kv_pages.c: the KV page pool (free pages, holders per page) and the automatic prefix cache */
typedef struct vlm_page_pool vlm_page_pool;
vlm_page_pool *vlm_pages_create(int64_t n_pages, int page_tokens, bool prefix_cache);
void vlm_pages_free(vlm_page_pool *p);
bool vlm_pages_cache_on(const vlm_page_pool *p);
int64_t vlm_pages_available(const vlm_page_pool *p);   /* free + idle cached (recyclable) */
int64_t vlm_pages_idle_cached(const vlm_page_pool *p); /* registered, held by no sequence */
int64_t vlm_pages_held(const vlm_page_pool *p);        /* held by at least one sequence */
/* A page for the caller alone (recycles the least recently used idle cached page when no free one
 * is left); -1 when none is available. */
int32_t vlm_pages_take(vlm_page_pool *p);
/* Drops one holder; the last one returns it to the free list, or to the idle LRU if registered. */
void vlm_pages_put(vlm_page_pool *p, int32_t page);
/* The registered page with this key and these page_tokens token ids, with one more holder; -1 if none. */
int32_t vlm_pages_lookup(vlm_page_pool *p, uint64_t key, const int32_t *tok);
/* Makes a full page findable by later prompts (no-op when the cache is off, the page is already
 * registered, or the same content is). parent: the key of the page before it in its sequence (0 for
 * a sequence's first page), for vlm_pages_lookup_partial. */
void vlm_pages_register(vlm_page_pool *p, int32_t page, uint64_t key, uint64_t parent, const int32_t *tok);
/* Of the registered pages that follow the page keyed parent (0: first pages), the one whose first
 * token ids agree longest with tok[0..max_rows), with one more holder; *rows receives the agreeing
 * count (>= 1). -1 when none agrees on its first token. */
int32_t vlm_pages_lookup_partial(vlm_page_pool *p, uint64_t parent, const int32_t *tok, int64_t max_rows,
                                 int64_t *rows);
#endif
