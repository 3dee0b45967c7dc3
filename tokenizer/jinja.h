/* jinja.h — internal: the Jinja subset interpreter used for the chat templates models ship
 * (tokenizer/jinja.c). Public callers use vlm_chat_render / vlm_chat_render_template. */
#ifndef VLM_JINJA_H
#define VLM_JINJA_H

#include "tokenizer/tokenizer.h"

/* Renders tmpl with `messages`, `add_generation_prompt`, and bos_token/eos_token when non-NULL.
 * Returns a malloc'd string, or NULL with a message in err (syntax error, unsupported construct,
 * raise_exception). */
char *vlm_jinja_render(const char *tmpl, const vlm_chat_msg *msgs, size_t n_msgs, bool add_generation_prompt,
                       const char *bos, const char *eos, char *err, size_t errlen);

#endif
