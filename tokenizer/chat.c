/* chat.c — chat templates: renders messages to the prompt string the model was trained on.
 *
 * VLM_TEMPLATE_QWEN2_VL follows the Qwen2-VL template (SPEC §F.2): default system prompt
 * "You are a helpful assistant." when the first message is not a system message, image parts as
 * <|vision_start|><|image_pad|><|vision_end|>, video parts with <|video_pad|>, parts joined with
 * nothing between them. VLM_TEMPLATE_CHATML is Qwen2-Instruct's ChatML template (same default
 * system prompt "You are a helpful assistant.", string content only). Qwen2.5-Instruct's template
 * gives the same layout for plain messages without tools but a different default system prompt
 * ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."), and Qwen3's has none:
 * those models ship their template, which VLM_TEMPLATE_AUTO renders exactly. Both are checked against transformers' apply_chat_template
 * output in tests/fixtures/tokenizer/chat.jsonl.
 *
 * VLM_TEMPLATE_AUTO renders the template the model ships (tokenizer_config.json or
 * chat_template.json) with the Jinja subset interpreter in jinja.c; without one it renders Qwen2-VL.
 * vlm_chat_render_template renders any template text the same way. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/jinja.h"
#include "tokenizer/tok_internal.h"

#define SYS_QWEN2 "You are a helpful assistant."

typedef struct {
    char *p;
    size_t n, cap;
} cbuf;

static void cb_put(cbuf *b, const char *s) {
    size_t n = strlen(s);
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap * 2 : 256;
        while (c < b->n + n + 1) c *= 2;
        char *np = realloc(b->p, c);
        VLM_TOK_ASSERT(np != NULL);
        b->p = np;
        b->cap = c;
    }
    memcpy(b->p + b->n, s, n + 1);
    b->n += n;
}

static void cerr(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static char *render_qwen2vl(const vlm_chat_msg *m, size_t n, bool gen, char *err, size_t errlen) {
    cbuf b = {0};
    cb_put(&b, "");
    for (size_t i = 0; i < n; i++) {
        if (!m[i].role) {
            cerr(err, errlen, "message %zu has no role", i);
            free(b.p);
            return NULL;
        }
        if (i == 0 && strcmp(m[i].role, "system")) cb_put(&b, "<|im_start|>system\n" SYS_QWEN2 "<|im_end|>\n");
        cb_put(&b, "<|im_start|>");
        cb_put(&b, m[i].role);
        cb_put(&b, "\n");
        if (m[i].content) {
            cb_put(&b, m[i].content);
        } else {
            for (size_t k = 0; k < m[i].n_parts; k++) {
                const vlm_chat_part *p = &m[i].parts[k];
                if (p->kind == VLM_PART_IMAGE) cb_put(&b, "<|vision_start|><|image_pad|><|vision_end|>");
                else if (p->kind == VLM_PART_VIDEO) cb_put(&b, "<|vision_start|><|video_pad|><|vision_end|>");
                else if (p->text) cb_put(&b, p->text);
            }
        }
        cb_put(&b, "<|im_end|>\n");
    }
    if (gen) cb_put(&b, "<|im_start|>assistant\n");
    return b.p;
}

static char *render_chatml(const vlm_chat_msg *m, size_t n, bool gen, const char *sys, char *err,
                           size_t errlen) {
    cbuf b = {0};
    cb_put(&b, "");
    for (size_t i = 0; i < n; i++) {
        if (!m[i].role) {
            cerr(err, errlen, "message %zu has no role", i);
            free(b.p);
            return NULL;
        }
        if (i == 0 && sys && strcmp(m[0].role, "system")) {
            cb_put(&b, "<|im_start|>system\n");
            cb_put(&b, sys);
            cb_put(&b, "<|im_end|>\n");
        }
        cb_put(&b, "<|im_start|>");
        cb_put(&b, m[i].role);
        cb_put(&b, "\n");
        if (m[i].content) {
            cb_put(&b, m[i].content);
        } else {
            /* The text template concatenates strings only: text parts are joined, media refused. */
            for (size_t k = 0; k < m[i].n_parts; k++) {
                if (m[i].parts[k].kind != VLM_PART_TEXT) {
                    cerr(err, errlen, "message %zu: this model's chat template takes no images or videos", i);
                    free(b.p);
                    return NULL;
                }
                if (m[i].parts[k].text) cb_put(&b, m[i].parts[k].text);
            }
        }
        cb_put(&b, "<|im_end|>\n");
    }
    if (gen) cb_put(&b, "<|im_start|>assistant\n");
    return b.p;
}

char *vlm_chat_render_template(const vlm_tok *t, const char *tmpl, const vlm_chat_msg *msgs, size_t n_msgs,
                               bool add_generation_prompt, char *err, size_t errlen) {
    (void)t;
    for (size_t i = 0; i < n_msgs; i++)
        if (!msgs[i].role) {
            cerr(err, errlen, "message %zu has no role", i);
            return NULL;
        }
    return vlm_jinja_render(tmpl, msgs, n_msgs, add_generation_prompt, NULL, NULL, err, errlen);
}

char *vlm_chat_render(const vlm_tok *t, vlm_template_kind kind, const vlm_chat_msg *msgs, size_t n_msgs,
                      bool add_generation_prompt, char *err, size_t errlen) {
    if (kind == VLM_TEMPLATE_AUTO) {
        if (t && t->chat_template)
            return vlm_chat_render_template(t, t->chat_template, msgs, n_msgs, add_generation_prompt, err, errlen);
        kind = VLM_TEMPLATE_QWEN2_VL;
    }
    switch (kind) {
    case VLM_TEMPLATE_QWEN2_VL: return render_qwen2vl(msgs, n_msgs, add_generation_prompt, err, errlen);
    case VLM_TEMPLATE_CHATML: return render_chatml(msgs, n_msgs, add_generation_prompt, SYS_QWEN2, err, errlen);
    default: cerr(err, errlen, "unknown chat template kind %d", (int)kind); return NULL;
    }
}
