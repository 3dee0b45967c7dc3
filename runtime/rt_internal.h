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
#endif
