/* openai_out.c — what clients read: the non-streaming chat.completion / text_completion body and
 * the SSE stream (chat.completion.chunk / text_completion chunks) exactly in OpenAI's shape:
 * the first chunk of each choice carries the role, then text deltas as they become safe to send
 * (UTF-8 complete, not a possible stop-string prefix), finish_reason on the last content chunk,
 * an optional usage chunk with empty choices, then `data: [DONE]`. Logprobs carry the token text
 * and its UTF-8 bytes like OpenAI's. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/serve.h"

void vlmd_buf_add(vlmd_buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t nc = (b->cap ? b->cap * 2 : 1024) + n;
        char *nb = realloc(b->buf, nc);
        VLM_ASSERT(nb);
        b->buf = nb;
        b->cap = nc;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = 0;
}

static cJSON *token_text(const vlmd_bundle *b, int32_t id, const char *key, cJSON *obj) {
    size_t n = 0;
    char *s = vlm_tok_decode(b->tok, &id, 1, false, &n);
    cJSON_AddStringToObject(obj, key, s ? s : "");
    free(s);
    return obj;
}

static double finite_lp(float v) { return isfinite(v) ? v : -9999.0; }

static void add_bytes(cJSON *obj, const char *s) {
    cJSON *arr = cJSON_AddArrayToObject(obj, "bytes");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        cJSON_AddItemToArray(arr, cJSON_CreateNumber(*p));
}

/* Chat logprobs: {"content": [{"token","logprob","bytes","top_logprobs":[...]}, ...]} */
static cJSON *chat_logprobs(const vlmd_bundle *b, const vlmd_lp *lps, int n) {
    cJSON *o = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(o, "content");
    for (int i = 0; i < n; i++) {
        cJSON *e = cJSON_CreateObject();
        token_text(b, lps[i].id, "token", e);
        cJSON_AddNumberToObject(e, "logprob", finite_lp(lps[i].lp));
        add_bytes(e, cJSON_GetObjectItem(e, "token")->valuestring);
        cJSON *tops = cJSON_AddArrayToObject(e, "top_logprobs");
        for (int k = 0; k < lps[i].n_top; k++) {
            cJSON *t = cJSON_CreateObject();
            token_text(b, lps[i].top_ids[k], "token", t);
            cJSON_AddNumberToObject(t, "logprob", finite_lp(lps[i].top_lp[k]));
            add_bytes(t, cJSON_GetObjectItem(t, "token")->valuestring);
            cJSON_AddItemToArray(tops, t);
        }
        cJSON_AddItemToArray(arr, e);
    }
    return o;
}

/* Legacy completions logprobs: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}. */
static cJSON *cmpl_logprobs(const vlmd_bundle *b, const vlmd_lp *lps, int n, size_t offset0) {
    cJSON *o = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(o, "tokens");
    cJSON *lp = cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON *tops = cJSON_AddArrayToObject(o, "top_logprobs");
    cJSON *offs = cJSON_AddArrayToObject(o, "text_offset");
    size_t off = offset0;
    for (int i = 0; i < n; i++) {
        size_t tl = 0;
        char *s = vlm_tok_decode(b->tok, &lps[i].id, 1, false, &tl);
        cJSON_AddItemToArray(toks, cJSON_CreateString(s ? s : ""));
        free(s);
        cJSON_AddItemToArray(lp, cJSON_CreateNumber(finite_lp(lps[i].lp)));
        cJSON *t = cJSON_CreateObject();
        for (int k = 0; k < lps[i].n_top; k++) {
            char *ts = vlm_tok_decode(b->tok, &lps[i].top_ids[k], 1, false, NULL);
            if (!cJSON_GetObjectItemCaseSensitive(t, ts ? ts : ""))
                cJSON_AddNumberToObject(t, ts ? ts : "", finite_lp(lps[i].top_lp[k]));
            free(ts);
        }
        cJSON_AddItemToArray(tops, t);
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        off += tl;
    }
    return o;
}

static cJSON *usage_json(const vlmd_req *r) {
    int64_t gen = 0;
    for (int i = 0; i < r->n_ch; i++) gen += r->ch[i].n_tokens;
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", (double)r->n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", (double)gen);
    cJSON_AddNumberToObject(u, "total_tokens", (double)(r->n_prompt + gen));
    cJSON *d = cJSON_AddObjectToObject(u, "prompt_tokens_details");
    cJSON_AddNumberToObject(d, "cached_tokens", (double)r->n_cached_prompt);
    return u;
}

/* Logprob entries that belong to text already sent: when a stop string cut the text, the
 * entries of tokens after the cut are not reported (their text was never sent). */
static int lps_visible(const vlmd_choice *c) { return c->n_lps; }

char *vlmd_resp_json(const vlmd_bundle *b, const char *model, vlmd_req *r) {
    bool chat = r->p.api == VLMD_API_CHAT;
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "id", r->id);
    cJSON_AddStringToObject(root, "object", chat ? "chat.completion" : "text_completion");
    cJSON_AddNumberToObject(root, "created", (double)r->created);
    cJSON_AddStringToObject(root, "model", model);
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    for (int i = 0; i < r->n_ch; i++) {
        vlmd_choice *c = &r->ch[i];
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", i);
        char *txt = strndup(c->text ? c->text : "", c->emit);
        if (chat) {
            cJSON *msg = cJSON_AddObjectToObject(ch, "message");
            cJSON_AddStringToObject(msg, "role", "assistant");
            cJSON_AddStringToObject(msg, "content", txt ? txt : "");
            if (r->p.logprobs) cJSON_AddItemToObject(ch, "logprobs", chat_logprobs(b, c->lps, lps_visible(c)));
            else cJSON_AddNullToObject(ch, "logprobs");
        } else {
            vlmd_buf t = {0};
            if (r->p.echo && r->echo_text) vlmd_buf_add(&t, r->echo_text, strlen(r->echo_text));
            vlmd_buf_add(&t, txt ? txt : "", txt ? strlen(txt) : 0);
            cJSON_AddStringToObject(ch, "text", t.buf);
            free(t.buf);
            if (r->p.logprobs) cJSON_AddItemToObject(ch, "logprobs", cmpl_logprobs(b, c->lps, lps_visible(c), 0));
            else cJSON_AddNullToObject(ch, "logprobs");
        }
        free(txt);
        cJSON_AddStringToObject(ch, "finish_reason", c->finish ? c->finish : "length");
        cJSON_AddItemToArray(choices, ch);
    }
    cJSON_AddItemToObject(root, "usage", usage_json(r));
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

static cJSON *chunk_base(const vlmd_req *r, const char *model) {
    bool chat = r->p.api == VLMD_API_CHAT;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", r->id);
    cJSON_AddStringToObject(o, "object", chat ? "chat.completion.chunk" : "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)r->created);
    cJSON_AddStringToObject(o, "model", model);
    return o;
}

static void emit_event(vlmd_buf *out, cJSON *o) {
    char *s = cJSON_PrintUnformatted(o);
    vlmd_buf_add(out, "data: ", 6);
    vlmd_buf_add(out, s, strlen(s));
    vlmd_buf_add(out, "\n\n", 2);
    free(s);
    cJSON_Delete(o);
}

bool vlmd_sse_collect(const vlmd_bundle *b, const char *model, vlmd_req *r, bool *role_sent,
                      vlmd_buf *out) {
    bool chat = r->p.api == VLMD_API_CHAT;
    if (!*role_sent) {
        *role_sent = true;
        for (int i = 0; i < r->n_ch; i++) {
            cJSON *o = chunk_base(r, model);
            cJSON *chs = cJSON_AddArrayToObject(o, "choices");
            cJSON *ch = cJSON_CreateObject();
            cJSON_AddNumberToObject(ch, "index", i);
            if (chat) {
                cJSON *d = cJSON_AddObjectToObject(ch, "delta");
                cJSON_AddStringToObject(d, "role", "assistant");
                cJSON_AddStringToObject(d, "content", "");
            } else {
                cJSON_AddStringToObject(ch, "text", r->p.echo && r->echo_text ? r->echo_text : "");
            }
            cJSON_AddNullToObject(ch, "logprobs");
            cJSON_AddNullToObject(ch, "finish_reason");
            cJSON_AddItemToArray(chs, ch);
            if (r->p.include_usage) cJSON_AddNullToObject(o, "usage");
            emit_event(out, o);
        }
    }
    bool all_sent = true;
    for (int i = 0; i < r->n_ch; i++) {
        vlmd_choice *c = &r->ch[i];
        if (c->finish_sent) continue;
        bool has_text = c->emit > c->sent;
        bool has_lp = r->p.logprobs && c->n_lps > c->lps_sent;
        bool fin = c->done;
        if (!has_text && !has_lp && !fin) {
            all_sent = false;
            continue;
        }
        cJSON *o = chunk_base(r, model);
        cJSON *chs = cJSON_AddArrayToObject(o, "choices");
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", i);
        char *txt = strndup(c->text ? c->text + c->sent : "", has_text ? c->emit - c->sent : 0);
        if (chat) {
            cJSON *d = cJSON_AddObjectToObject(ch, "delta");
            if (has_text) cJSON_AddStringToObject(d, "content", txt ? txt : "");
        } else {
            cJSON_AddStringToObject(ch, "text", txt ? txt : "");
        }
        free(txt);
        if (has_lp) {
            int n = c->n_lps - c->lps_sent;
            cJSON_AddItemToObject(ch, "logprobs", chat ? chat_logprobs(b, c->lps + c->lps_sent, n)
                                                       : cmpl_logprobs(b, c->lps + c->lps_sent, n, c->sent));
            c->lps_sent = c->n_lps;
        } else {
            cJSON_AddNullToObject(ch, "logprobs");
        }
        if (fin) cJSON_AddStringToObject(ch, "finish_reason", c->finish ? c->finish : "length");
        else cJSON_AddNullToObject(ch, "finish_reason");
        cJSON_AddItemToArray(chs, ch);
        if (r->p.include_usage) cJSON_AddNullToObject(o, "usage");
        emit_event(out, o);
        c->sent = c->emit;
        if (fin) c->finish_sent = true;
        else all_sent = false;
    }
    if (!all_sent || !r->finished) return false;
    if (r->p.include_usage) {
        cJSON *o = chunk_base(r, model);
        cJSON_AddArrayToObject(o, "choices");
        cJSON_AddItemToObject(o, "usage", usage_json(r));
        emit_event(out, o);
    }
    vlmd_buf_add(out, "data: [DONE]\n\n", 14);
    return true;
}
