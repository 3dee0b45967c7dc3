/* tokenizer.h — the one public header of the tokenizer layer.
 *
 * Hugging Face tokenizer.json (byte-level BPE as used by Qwen2/2.5/2-VL/3): NFC normaliser, the
 * Split pre-tokenizer regex exactly as written in the file (PCRE2 with JIT), ByteLevel mapping,
 * BPE merges ("a b" or ["a","b"] form), added tokens matched before BPE. Decoding, a streaming
 * detokenizer that never emits a partial UTF-8 character, and chat templates (Qwen2-VL, ChatML,
 * and a Jinja subset for the template a model ships).
 * Knows nothing of models or HTTP. Functions return 0 on success, -1 with a message in err.
 * A loaded vlm_tok is read-only and may be shared by threads; encode is re-entrant.
 */
#ifndef VLM_TOKENIZER_H
#define VLM_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct vlm_tok vlm_tok;

/* path: a tokenizer.json file or a directory holding tokenizer.json (+ tokenizer_config.json,
 * chat_template.json when present). */
int vlm_tok_load(const char *path, vlm_tok **out, char *err, size_t errlen);
void vlm_tok_free(vlm_tok *t);

int32_t vlm_tok_vocab_size(const vlm_tok *t);            /* highest id + 1 */
int32_t vlm_tok_token_id(const vlm_tok *t, const char *s); /* exact token lookup, -1 if absent */
bool vlm_tok_is_special(const vlm_tok *t, int32_t id);

/* Growable id array. */
typedef struct {
    int32_t *ids;
    size_t n, cap;
} vlm_ids;
void vlm_ids_free(vlm_ids *v);

/* Encodes UTF-8 text (must be valid UTF-8, else -1). Special/added tokens in the text are matched
 * (as HF does by default). add_special: apply the post-processor's special tokens (none for Qwen). */
int vlm_tok_encode(const vlm_tok *t, const char *text, size_t len, bool add_special, vlm_ids *out,
                   char *err, size_t errlen);

/* Decodes ids to a malloc'd NUL-terminated UTF-8 string; skip_special drops special tokens.
 * Invalid UTF-8 from byte tokens is replaced with U+FFFD, as HF does. NULL on bad ids. */
char *vlm_tok_decode(const vlm_tok *t, const int32_t *ids, size_t n, bool skip_special,
                     size_t *out_len);

/* Streaming detokenizer: push ids one at a time, get only complete characters back. */
typedef struct vlm_detok vlm_detok;
vlm_detok *vlm_detok_new(const vlm_tok *t, bool skip_special);
/* Appends the text that became complete to (*buf,*len) (malloc'd by the callee, caller frees). */
int vlm_detok_push(vlm_detok *d, int32_t id, char **buf, size_t *len);
/* Flushes held bytes (incomplete UTF-8 at the end becomes U+FFFD). */
int vlm_detok_flush(vlm_detok *d, char **buf, size_t *len);
void vlm_detok_free(vlm_detok *d);

/* ---- chat templates ----------------------------------------------------------------------- */
typedef enum { VLM_PART_TEXT = 0, VLM_PART_IMAGE, VLM_PART_VIDEO } vlm_part_kind;
typedef struct {
    vlm_part_kind kind;
    const char *text; /* VLM_PART_TEXT */
} vlm_chat_part;
typedef struct {
    const char *role;           /* system, user, assistant, tool */
    const char *content;        /* string content, or NULL when parts are given */
    const vlm_chat_part *parts; /* list content */
    size_t n_parts;
} vlm_chat_msg;

typedef enum {
    VLM_TEMPLATE_AUTO = 0, /* the model's own template when it ships one, else by model type */
    VLM_TEMPLATE_QWEN2_VL,
    VLM_TEMPLATE_CHATML,
} vlm_template_kind;

/* Renders messages to the prompt string (malloc'd). add_generation_prompt appends the assistant
 * header. Image parts render as <|vision_start|><|image_pad|><|vision_end|> (one pad; the caller
 * expands pads to the image's token count). */
char *vlm_chat_render(const vlm_tok *t, vlm_template_kind kind, const vlm_chat_msg *msgs,
                      size_t n_msgs, bool add_generation_prompt, char *err, size_t errlen);

/* Renders a Jinja chat template text (e.g. a --chat-template file) the way transformers'
 * apply_chat_template does, with the Jinja subset in tokenizer/jinja.c. NULL + err on a syntax
 * error, an unsupported construct, or the template's raise_exception. */
char *vlm_chat_render_template(const vlm_tok *t, const char *tmpl, const vlm_chat_msg *msgs,
                               size_t n_msgs, bool add_generation_prompt, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
