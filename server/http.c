/* http.c — the HTTP side of `vlmd serve` on libmicrohttpd.
 *
 * Threading decision: MHD runs thread-per-connection (MHD_USE_INTERNAL_POLLING_THREAD |
 * MHD_USE_THREAD_PER_CONNECTION), capped by --max-connections. A connection's thread parses,
 * validates, decodes images and tokenizes, then either blocks on the request's condition variable
 * until the engine thread has finished it (non-streaming) or serves an SSE stream from a content
 * reader callback that blocks on the same condition variable with a short timeout, writing a
 * ": ping" comment after --ping-interval without tokens. Blocking is safe because no other
 * connection shares the thread, so a slow or stalled client only ever holds its own thread.
 * While it waits, the thread polls its socket for a hang-up (POLLRDHUP) every WAIT_SLICE and marks
 * the request cancelled, so the engine drops the sequence at its next step; MHD's
 * NOTIFY_COMPLETED callback does the same for any other abnormal end.
 *
 * Limits as bytes arrive: Content-Length over --max-body-bytes is refused with 413 before the
 * body is read; a chunked body is refused the moment it crosses the limit; a body that takes
 * longer than --read-timeout gets 408; idle connections close after --idle-timeout. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <math.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "server/serve.h"

#define WAIT_SLICE_MS 50
#define HEADER_MEMORY_LIMIT (64 * 1024) /* request line + headers per connection */

struct vlmd_http {
    struct MHD_Daemon *d;
    const vlmd_serve_cfg *cfg;
    vlmd_metrics *m;
    _Atomic int state;
    atomic_bool unready; /* --drain-delay: /ready says draining while requests are still served */
    const vlmd_bundle *b;
    vlmd_sched *s;
    char model_name[256];
    vlmd_media_cfg media;
    vlmd_prompt_limits lim;
    vlm_sampling defaults;
    atomic_uint_fast64_t counter;
    uint64_t id_base;
    int64_t started;
};

typedef enum {
    R_NONE = 0, R_HEALTH, R_READY, R_METRICS, R_MODELS, R_MODEL, R_CHAT, R_CMPL, R_NOT_FOUND
} route_t;

typedef struct {
    vlmd_http *h;
    struct MHD_Connection *conn;
    double t0;
    char rid[80];
    char method[16];
    char path[128];
    route_t route;
    char *body;
    size_t len, cap;
    bool responded, too_large;
    int status;
    vlmd_req *req;
    /* streaming */
    bool stream;
    vlmd_buf out;
    size_t out_off;
    bool role_sent, stream_done;
    double last_write;
    int fd;
} conn_t;

/* ---- responses --------------------------------------------------------------------------- */

static enum MHD_Result send_body(conn_t *cx, int status, const char *ctype, char *body, size_t n,
                                 const char *h1, const char *v1) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(n, body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", ctype);
    MHD_add_response_header(resp, "X-Request-Id", cx->rid);
    if (h1) MHD_add_response_header(resp, h1, v1);
    /* A refused body may still be arriving: close rather than parse what follows as a request. */
    /* Draining: close keep-alive connections so their next request opens a new one elsewhere. */
    if (status == 413 || status == 408 || atomic_load(&cx->h->state) == VLMD_STATE_DRAINING)
        MHD_add_response_header(resp, "Connection", "close");
    enum MHD_Result rc = MHD_queue_response(cx->conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    cx->responded = true;
    cx->status = status;
    return rc;
}

static enum MHD_Result send_json(conn_t *cx, int status, char *json) {
    return send_body(cx, status, "application/json", json, strlen(json), NULL, NULL);
}

static enum MHD_Result send_error(conn_t *cx, vlmd_err e, const char *msg, const char *param) {
    const vlmd_err_info *in = vlmd_err_lookup(e);
    char *j = vlmd_err_json(e, msg, param);
    const char *h = NULL, *v = NULL;
    if (e == VLMD_ERR_QUEUE_FULL) h = "Retry-After", v = "1";
    else if (e == VLMD_ERR_UNAVAILABLE) h = "Retry-After", v = "5";
    else if (e == VLMD_ERR_METHOD) h = "Allow", v = (cx->route == R_CHAT || cx->route == R_CMPL) ? "POST" : "GET";
    else if (e == VLMD_ERR_AUTH) h = "WWW-Authenticate", v = "Bearer";
    return send_body(cx, in->http, "application/json", j, strlen(j), h, v);
}

/* ---- helpers ----------------------------------------------------------------------------- */

static bool client_gone(int fd) {
    if (fd < 0) return false;
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

static void wait_slice(vlmd_req *r) { /* r->mu held */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_nsec += WAIT_SLICE_MS * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&r->cv, &r->mu, &ts);
}

static void set_rid(conn_t *cx) {
    const char *in = MHD_lookup_connection_value(cx->conn, MHD_HEADER_KIND, "X-Request-Id");
    if (in) {
        size_t n = strlen(in);
        bool ok = n > 0 && n <= 64;
        for (size_t i = 0; ok && i < n; i++) {
            char c = in[i];
            ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                 c == '_' || c == '.' || c == ':';
        }
        if (ok) {
            snprintf(cx->rid, sizeof cx->rid, "%s", in);
            return;
        }
    }
    uint64_t k = atomic_fetch_add(&cx->h->counter, 1);
    snprintf(cx->rid, sizeof cx->rid, "req-%016llx", (unsigned long long)(cx->h->id_base + k));
}

static route_t route_of(const char *url) {
    if (!strcmp(url, "/health")) return R_HEALTH;
    if (!strcmp(url, "/ready")) return R_READY;
    if (!strcmp(url, "/metrics")) return R_METRICS;
    if (!strcmp(url, "/v1/models")) return R_MODELS;
    if (!strncmp(url, "/v1/models/", 11)) return R_MODEL;
    if (!strcmp(url, "/v1/chat/completions")) return R_CHAT;
    if (!strcmp(url, "/v1/completions")) return R_CMPL;
    return R_NOT_FOUND;
}

static bool auth_ok(conn_t *cx) {
    const char *key = cx->h->cfg->api_key;
    if (!key[0]) return true;
    const char *a = MHD_lookup_connection_value(cx->conn, MHD_HEADER_KIND, "Authorization");
    if (!a || strncasecmp(a, "Bearer ", 7)) return false;
    a += 7;
    size_t la = strlen(a), lk = strlen(key);
    unsigned diff = (unsigned)(la ^ lk);
    for (size_t i = 0; i < lk; i++) diff |= (unsigned char)key[i] ^ (unsigned char)(i < la ? a[i] : 0);
    return diff == 0; /* constant time in the key length */
}


/* MHD 0.9.75 cannot queue a response while a request body is still arriving. For a body that
 * stalls past --read-timeout the answer is written straight to the socket (this connection's own
 * thread is the only one using it, and there is no TLS), the write side is shut, pending input is
 * drained briefly so the close does not turn into a reset that eats the answer, and MHD then closes
 * the connection. */
static enum MHD_Result send_raw_and_close(conn_t *cx, vlmd_err e, const char *msg) {
    const vlmd_err_info *in = vlmd_err_lookup(e);
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(cx->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    cx->status = in->http;
    cx->responded = true;
    if (!ci) return MHD_NO;
    int fd = ci->connect_fd;
    char *j = vlmd_err_json(e, msg, NULL);
    char head[512];
    int hn = snprintf(head, sizeof head,
                      "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                      "X-Request-Id: %s\r\nConnection: close\r\n\r\n",
                      in->http, e == VLMD_ERR_READ_TIMEOUT ? "Request Timeout" : "Error", strlen(j), cx->rid);
    (void)!send(fd, head, (size_t)hn, MSG_NOSIGNAL);
    (void)!send(fd, j, strlen(j), MSG_NOSIGNAL);
    free(j);
    shutdown(fd, SHUT_WR);
    char sink[4096];
    double until = vlmd_now() + 0.2;
    while (vlmd_now() < until) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 20) <= 0) continue;
        if (recv(fd, sink, sizeof sink, MSG_DONTWAIT) <= 0) break;
    }
    return MHD_NO;
}

/* ---- simple GET endpoints --------------------------------------------------------------- */

static enum MHD_Result do_get(conn_t *cx, const char *url) {
    vlmd_http *h = cx->h;
    int st = atomic_load(&h->state);
    switch (cx->route) {
    case R_HEALTH: return send_json(cx, 200, strdup("{\"status\":\"ok\"}"));
    case R_READY:
        if (st == VLMD_STATE_READY && !atomic_load(&h->unready))
            return send_json(cx, 200, strdup("{\"status\":\"ready\"}"));
        return send_json(cx, 503, strdup(st == VLMD_STATE_LOADING ? "{\"status\":\"loading\"}"
                                                                  : "{\"status\":\"draining\"}"));
    case R_METRICS: {
        char *t = vlmd_metrics_render(h->m, vlmd_now());
        return send_body(cx, 200, "text/plain; version=0.0.4", t, strlen(t), NULL, NULL);
    }
    case R_MODELS:
    case R_MODEL: {
        if (!auth_ok(cx)) return send_error(cx, VLMD_ERR_AUTH, "missing or invalid API key", NULL);
        if (st == VLMD_STATE_LOADING) return send_error(cx, VLMD_ERR_UNAVAILABLE, "the model is loading", NULL);
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "id", h->model_name);
        cJSON_AddStringToObject(m, "object", "model");
        cJSON_AddNumberToObject(m, "created", (double)h->started);
        cJSON_AddStringToObject(m, "owned_by", "vlmd");
        cJSON_AddNumberToObject(m, "max_model_len", (double)vlmd_sched_max_seq_tokens(h->s));
        if (cx->route == R_MODEL) {
            if (strcmp(url + 11, h->model_name)) {
                cJSON_Delete(m);
                return send_error(cx, VLMD_ERR_MODEL_NOT_FOUND, "no such model", "model");
            }
            char *s = cJSON_PrintUnformatted(m);
            cJSON_Delete(m);
            return send_json(cx, 200, s);
        }
        cJSON *root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "object", "list");
        cJSON_AddItemToArray(cJSON_AddArrayToObject(root, "data"), m);
        char *s = cJSON_PrintUnformatted(root);
        cJSON_Delete(root);
        return send_json(cx, 200, s);
    }
    default: return send_error(cx, VLMD_ERR_NOT_FOUND, "not found", NULL);
    }
}

/* ---- generation -------------------------------------------------------------------------- */

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    conn_t *cx = cls;
    vlmd_req *r = cx->req;
    (void)pos;
    for (;;) {
        if (cx->out_off < cx->out.len) {
            size_t n = cx->out.len - cx->out_off;
            if (n > max) n = max;
            memcpy(buf, cx->out.buf + cx->out_off, n);
            cx->out_off += n;
            if (cx->out_off == cx->out.len) cx->out_off = cx->out.len = 0;
            cx->last_write = vlmd_now();
            return (ssize_t)n;
        }
        if (cx->stream_done) return MHD_CONTENT_READER_END_OF_STREAM;
        pthread_mutex_lock(&r->mu);
        bool done;
        if (r->failed) {
            char *j = vlmd_err_json(r->err_kind, r->err, NULL);
            vlmd_buf_add(&cx->out, "data: ", 6);
            vlmd_buf_add(&cx->out, j, strlen(j));
            vlmd_buf_add(&cx->out, "\n\ndata: [DONE]\n\n", 16);
            free(j);
            done = true;
        } else {
            done = vlmd_sse_collect(cx->h->b, cx->h->model_name, r, &cx->role_sent, &cx->out);
            if (!done && cx->out.len == 0) wait_slice(r);
        }
        pthread_mutex_unlock(&r->mu);
        if (done) cx->stream_done = true;
        if (cx->out.len == 0 && !done) {
            if (client_gone(cx->fd)) {
                pthread_mutex_lock(&r->mu);
                r->cancel = true;
                pthread_mutex_unlock(&r->mu);
                vlmd_sched_kick(cx->h->s);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
            if (vlmd_now() - cx->last_write >= cx->h->cfg->ping_interval)
                vlmd_buf_add(&cx->out, ": ping\n\n", 8);
        }
    }
}

static vlmd_err prompt_err(vlm_status st) {
    return st == VLM_E_LIMIT ? VLMD_ERR_LIMIT : vlmd_err_from_status(st);
}

/* Builds the completions prompt: string, [ids], or ["string"]; with `suffix`, Qwen2.5-Coder FIM. */
static enum MHD_Result build_cmpl_prompt(conn_t *cx, vlmd_req *r) {
    vlmd_http *h = cx->h;
    const cJSON *pr = r->p.prompt;
    char err[512];
    vlm_status st;
    if (cJSON_IsArray(pr) && cJSON_GetArraySize(pr) == 1 && cJSON_IsString(pr->child)) pr = pr->child;
    if (cJSON_IsString(pr)) {
        const char *text = pr->valuestring;
        char *fim = NULL;
        if (r->p.suffix) {
            int32_t a = vlm_tok_token_id(h->b->tok, "<|fim_prefix|>");
            int32_t bsuf = vlm_tok_token_id(h->b->tok, "<|fim_suffix|>");
            int32_t c = vlm_tok_token_id(h->b->tok, "<|fim_middle|>");
            if (a < 0 || bsuf < 0 || c < 0)
                return send_error(cx, VLMD_ERR_UNSUPPORTED,
                                  "'suffix' needs a tokenizer with <|fim_prefix|>, <|fim_suffix|> and <|fim_middle|>",
                                  "suffix");
            size_t n = strlen(text) + strlen(r->p.suffix) + 64;
            fim = malloc(n);
            snprintf(fim, n, "<|fim_prefix|>%s<|fim_suffix|>%s<|fim_middle|>", text, r->p.suffix);
            text = fim;
        }
        if (r->p.echo) r->echo_text = strdup(pr->valuestring);
        st = vlmd_prompt_from_text(h->b, text, strlen(text), &h->lim, &r->prompt, err, sizeof err);
        free(fim);
        if (st != VLM_OK) return send_error(cx, prompt_err(st), err, "prompt");
        return MHD_YES;
    }
    if (!cJSON_IsArray(pr) || cJSON_GetArraySize(pr) == 0)
        return send_error(cx, VLMD_ERR_INVALID, "'prompt' must be a string or a non-empty array of token ids", "prompt");
    if (r->p.suffix)
        return send_error(cx, VLMD_ERR_UNSUPPORTED, "'suffix' needs a string prompt", "suffix");
    int n = cJSON_GetArraySize(pr);
    if (n > h->lim.max_prompt_tokens)
        return send_error(cx, VLMD_ERR_LIMIT, "the prompt has too many tokens", "prompt");
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    int i = 0;
    for (const cJSON *e = pr->child; e; e = e->next, i++) {
        if (!cJSON_IsNumber(e) || !(e->valuedouble >= -2147483648.0 && e->valuedouble <= 2147483647.0) ||
            e->valuedouble != floor(e->valuedouble)) {
            free(ids);
            return send_error(cx, VLMD_ERR_INVALID,
                              "'prompt' must be a string, one string in an array, or an array of token ids "
                              "(batches of prompts are not supported)",
                              "prompt");
        }
        ids[i] = (int32_t)e->valuedouble;
    }
    st = vlmd_prompt_from_ids(h->b, ids, n, &h->lim, &r->prompt, err, sizeof err);
    if (st == VLM_OK && r->p.echo) r->echo_text = vlm_tok_decode(h->b->tok, ids, (size_t)n, false, NULL);
    free(ids);
    if (st != VLM_OK) return send_error(cx, prompt_err(st), err, "prompt");
    return MHD_YES;
}

static enum MHD_Result do_generate(conn_t *cx) {
    vlmd_http *h = cx->h;
    char err[512] = "", param[160] = "";
    if (!vlmd_utf8_valid(cx->body ? cx->body : "", cx->len))
        return send_error(cx, VLMD_ERR_BAD_JSON, "the request body is not valid UTF-8", NULL);
    const char *end = NULL;
    cJSON *body = cx->len ? cJSON_ParseWithLengthOpts(cx->body, cx->len, &end, false) : NULL;
    if (body && end) {
        while (end < cx->body + cx->len && (*end == ' ' || *end == '\n' || *end == '\r' || *end == '\t')) end++;
        if (end != cx->body + cx->len) {
            cJSON_Delete(body);
            body = NULL;
        }
    }
    if (!body) {
        const char *ep = end; /* cJSON sets it to the error position (its global error is not thread-safe) */
        size_t off = ep && cx->body && ep >= cx->body && ep <= cx->body + cx->len ? (size_t)(ep - cx->body) : 0;
        snprintf(err, sizeof err, "the request body is not valid JSON (near byte %zu)", off);
        return send_error(cx, VLMD_ERR_BAD_JSON, err, NULL);
    }
    vlmd_req *r = vlmd_req_new();
    if (!r) {
        cJSON_Delete(body);
        return send_error(cx, VLMD_ERR_INTERNAL, "out of memory", NULL);
    }
    r->body = body;
    cx->req = r;
    snprintf(r->rid, sizeof r->rid, "%s", cx->rid);
    vlmd_api api = cx->route == R_CHAT ? VLMD_API_CHAT : VLMD_API_COMPLETIONS;
    int rc = vlmd_params_parse(api, body, &h->defaults, h->cfg, &r->p, err, sizeof err, param, sizeof param);
    if (rc) return send_error(cx, (vlmd_err)(rc - 1), err, param);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(body, "model");
    if (cJSON_IsString(model) && strcmp(model->valuestring, h->model_name)) {
        snprintf(err, sizeof err, "The model '%.100s' does not exist (this server serves '%s')", model->valuestring,
                 h->model_name);
        return send_error(cx, VLMD_ERR_MODEL_NOT_FOUND, err, "model");
    }
    if (!r->p.seed_given) {
        uint64_t sd = 0;
        if (getrandom(&sd, sizeof sd, 0) != sizeof sd) sd = (uint64_t)(vlmd_wall() * 1e9);
        r->p.sampling.seed = sd;
    }
    if (api == VLMD_API_CHAT) {
        vlm_status st = vlmd_prompt_from_messages(h->b, r->p.messages, &h->lim, &r->prompt, err, sizeof err,
                                                  param, sizeof param);
        if (st != VLM_OK) return send_error(cx, prompt_err(st), err, param);
    } else {
        enum MHD_Result mr = build_cmpl_prompt(cx, r);
        if (cx->responded) return mr;
    }
    r->n_prompt = r->prompt.n_ids;
    int64_t room = vlmd_sched_max_seq_tokens(h->s) - r->n_prompt;
    if (room < 1 || (r->p.max_tokens > 0 && r->p.max_tokens > room)) {
        snprintf(err, sizeof err,
                 "This model's maximum context length is %lld tokens. However, you requested %lld tokens "
                 "(%lld in the prompt, %d for the completion).",
                 (long long)vlmd_sched_max_seq_tokens(h->s),
                 (long long)(r->n_prompt + (r->p.max_tokens > 0 ? r->p.max_tokens : 1)), (long long)r->n_prompt,
                 r->p.max_tokens > 0 ? r->p.max_tokens : 1);
        return send_error(cx, VLMD_ERR_CONTEXT, err, api == VLMD_API_CHAT ? "messages" : "prompt");
    }
    r->max_tokens = r->p.max_tokens > 0 ? r->p.max_tokens
                                        : (int)(room < h->cfg->max_tokens_default ? room : h->cfg->max_tokens_default);
    r->n_ch = r->p.n;
    r->ch = calloc((size_t)r->n_ch, sizeof *r->ch);
    if (!r->ch) return send_error(cx, VLMD_ERR_INTERNAL, "out of memory", NULL);
    for (int i = 0; i < r->n_ch; i++) r->ch[i].detok = vlm_detok_new(h->b->tok, true);
    uint64_t k = atomic_fetch_add(&h->counter, 1);
    snprintf(r->id, sizeof r->id, "%s-%016llx", api == VLMD_API_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)(h->id_base + k));
    r->created = (int64_t)vlmd_wall();
    r->t_arrival = cx->t0;
    r->deadline = h->cfg->request_timeout > 0 ? cx->t0 + h->cfg->request_timeout : 0;
    if (atomic_load(&h->state) != VLMD_STATE_READY)
        return send_error(cx, VLMD_ERR_UNAVAILABLE, "the server is draining", NULL);
    rc = vlmd_sched_submit(h->s, r);
    if (rc == VLMD_ERR_QUEUE_FULL + 1)
        return send_error(cx, VLMD_ERR_QUEUE_FULL, "the request queue is full; retry later", NULL);
    if (rc) return send_error(cx, VLMD_ERR_UNAVAILABLE, "the server is draining", NULL);

    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(cx->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    cx->fd = ci ? ci->connect_fd : -1;
    if (r->p.stream) {
        cx->stream = true;
        cx->last_write = vlmd_now();
        struct MHD_Response *resp =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, cx, NULL);
        if (!resp) return MHD_NO;
        MHD_add_response_header(resp, "Content-Type", "text/event-stream");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
        if (atomic_load(&h->state) == VLMD_STATE_DRAINING) MHD_add_response_header(resp, "Connection", "close");
        MHD_add_response_header(resp, "X-Request-Id", cx->rid);
        enum MHD_Result mr = MHD_queue_response(cx->conn, 200, resp);
        MHD_destroy_response(resp);
        cx->responded = true;
        cx->status = 200;
        return mr;
    }
    pthread_mutex_lock(&r->mu);
    while (!r->finished) {
        wait_slice(r);
        if (!r->finished && client_gone(cx->fd)) {
            r->cancel = true;
            pthread_mutex_unlock(&r->mu);
            vlmd_sched_kick(h->s);
            cx->status = 499; /* client closed the request (nginx's convention), for the log */
            return MHD_NO;
        }
    }
    int64_t gen = 0;
    for (int i = 0; i < r->n_ch; i++) gen += r->ch[i].n_tokens;
    if (r->failed) {
        vlmd_err e = r->err_kind;
        snprintf(err, sizeof err, "%s", r->err);
        pthread_mutex_unlock(&r->mu);
        return send_error(cx, e, err, NULL);
    }
    if (r->timed_out && gen == 0) {
        pthread_mutex_unlock(&r->mu);
        return send_error(cx, VLMD_ERR_TIMEOUT, "the request deadline passed before any token was generated", NULL);
    }
    char *j = vlmd_resp_json(h->b, h->model_name, r);
    pthread_mutex_unlock(&r->mu);
    return send_json(cx, 200, j);
}

/* ---- MHD callbacks ----------------------------------------------------------------------- */

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                 const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    vlmd_http *h = cls;
    conn_t *cx = *con_cls;
    (void)version;
    if (!cx) {
        cx = calloc(1, sizeof *cx);
        if (!cx) return MHD_NO;
        *con_cls = cx;
        cx->h = h;
        cx->conn = conn;
        cx->fd = -1;
        cx->t0 = vlmd_now();
        snprintf(cx->method, sizeof cx->method, "%s", method);
        snprintf(cx->path, sizeof cx->path, "%s", url);
        set_rid(cx);
        cx->route = route_of(url);
        bool post = !strcmp(method, "POST");
        bool get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
        if (cx->route == R_NOT_FOUND) return send_error(cx, VLMD_ERR_NOT_FOUND, "unknown path", NULL);
        if ((cx->route == R_CHAT || cx->route == R_CMPL) ? !post : !get) {
            char m[96];
            snprintf(m, sizeof m, "method %.16s is not allowed on %.40s", method, url);
            return send_error(cx, VLMD_ERR_METHOD, m, NULL);
        }
        if (cx->route == R_CHAT || cx->route == R_CMPL) {
            if (!auth_ok(cx)) return send_error(cx, VLMD_ERR_AUTH, "missing or invalid API key", NULL);
            int st = atomic_load(&h->state);
            if (st != VLMD_STATE_READY)
                return send_error(cx, VLMD_ERR_UNAVAILABLE,
                                  st == VLMD_STATE_LOADING ? "the model is loading" : "the server is draining", NULL);
            const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
            if (cl && strtoull(cl, NULL, 10) > (unsigned long long)h->cfg->max_body_bytes) {
                char m[128];
                snprintf(m, sizeof m, "the request body is larger than %lld bytes", (long long)h->cfg->max_body_bytes);
                return send_error(cx, VLMD_ERR_TOO_LARGE, m, NULL);
            }
        }
        return MHD_YES;
    }
    if (cx->responded) {
        *upload_size = 0; /* discard the rest of a refused body */
        return MHD_YES;
    }
    if (*upload_size) {
        if (vlmd_now() - cx->t0 > h->cfg->read_timeout)
            return send_raw_and_close(cx, VLMD_ERR_READ_TIMEOUT, "the request body was not received in time");
        if (cx->too_large || cx->len + *upload_size > (size_t)h->cfg->max_body_bytes) {
            /* MHD 0.9.75 queues responses only before or after the body; a chunked body that
             * crosses the limit is discarded as it arrives (no memory kept) and answered 413
             * at its end, or 408 if it never ends within --read-timeout. */
            cx->too_large = true;
            *upload_size = 0;
            return MHD_YES;
        }
        if (cx->len + *upload_size + 1 > cx->cap) {
            size_t nc = (cx->cap ? cx->cap * 2 : 4096) + *upload_size;
            char *nb = realloc(cx->body, nc);
            if (!nb) return MHD_NO;
            cx->body = nb;
            cx->cap = nc;
        }
        memcpy(cx->body + cx->len, upload, *upload_size);
        cx->len += *upload_size;
        cx->body[cx->len] = 0;
        *upload_size = 0;
        return MHD_YES;
    }
    if (cx->too_large) {
        char m[128];
        snprintf(m, sizeof m, "the request body is larger than %lld bytes", (long long)h->cfg->max_body_bytes);
        return send_error(cx, VLMD_ERR_TOO_LARGE, m, NULL);
    }
    if (cx->route == R_CHAT || cx->route == R_CMPL) return do_generate(cx);
    return do_get(cx, url);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    vlmd_http *h = cls;
    conn_t *cx = *con_cls;
    (void)conn;
    if (!cx) return;
    *con_cls = NULL;
    vlmd_req *r = cx->req;
    long long ptok = 0, ctok = 0;
    double ttft = -1, queue = -1;
    if (r) {
        pthread_mutex_lock(&r->mu);
        if (!r->finished && toe != MHD_REQUEST_TERMINATED_COMPLETED_OK) r->cancel = true;
        bool cancel = r->cancel && !r->finished;
        ptok = r->n_prompt;
        for (int i = 0; i < r->n_ch; i++) ctok += r->ch[i].n_tokens;
        if (r->t_first > 0) ttft = r->t_first - r->t_arrival;
        if (r->t_admit > 0) queue = r->t_admit - r->t_arrival;
        pthread_mutex_unlock(&r->mu);
        if (cancel && h->s) vlmd_sched_kick(h->s);
        if (cancel && cx->status == 200) cx->status = 499;
    }
    int status = cx->status ? cx->status : 499;
    vlmd_metrics_request(h->m, status);
    if (cx->route != R_HEALTH && cx->route != R_READY && cx->route != R_METRICS)
        fprintf(stderr,
                "level=info event=request id=%s method=%s path=%s status=%d stream=%d prompt_tokens=%lld "
                "completion_tokens=%lld queue_ms=%.1f ttft_ms=%.1f total_ms=%.1f term=%d\n",
                cx->rid, cx->method, cx->path, status, cx->stream, ptok, ctok, queue * 1e3, ttft * 1e3,
                (vlmd_now() - cx->t0) * 1e3, (int)toe);
    vlmd_req_release(r);
    free(cx->body);
    free(cx->out.buf);
    free(cx);
}

vlmd_http *vlmd_http_start(const vlmd_serve_cfg *cfg, vlmd_metrics *m, int *port_out, char *err, size_t errlen) {
    vlmd_http *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->cfg = cfg;
    h->m = m;
    atomic_store(&h->state, VLMD_STATE_LOADING);
    uint64_t base = 0;
    if (getrandom(&base, sizeof base, 0) != sizeof base) base = (uint64_t)(vlmd_wall() * 1e6);
    h->id_base = base & 0x0000ffffffffffffull;
    h->started = (int64_t)vlmd_wall();
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    /* MHD_USE_ITC: needed by MHD_quiesce_daemon and MHD_add_connection (vlmd_http_close_listener). */
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG |
                     MHD_USE_ITC;
    if (strchr(cfg->host, ':')) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)cfg->port);
        if (inet_pton(AF_INET6, cfg->host, &a6->sin6_addr) != 1) goto bad_host;
        flags |= MHD_USE_IPv6;
    } else {
        struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)cfg->port);
        if (inet_pton(AF_INET, cfg->host, &a4->sin_addr) != 1) goto bad_host;
    }
    h->d = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, on_access, h,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)cfg->idle_timeout,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned int)cfg->max_connections,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HEADER_MEMORY_LIMIT,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                            MHD_OPTION_LISTENING_ADDRESS_REUSE, 1u,
                            MHD_OPTION_END);
    if (!h->d) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", cfg->host, cfg->port, strerror(errno));
        free(h);
        return NULL;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    *port_out = di ? di->port : cfg->port;
    return h;
bad_host:
    snprintf(err, errlen, "--host '%s' is not a numeric IPv4 or IPv6 address", cfg->host);
    free(h);
    return NULL;
}

void vlmd_http_set_ready(vlmd_http *h, const vlmd_bundle *b, vlmd_sched *s, const char *model_name) {
    h->b = b;
    h->s = s;
    snprintf(h->model_name, sizeof h->model_name, "%s", model_name);
    vlmd_prompt_limits_default(&h->lim);
    h->lim.max_images = h->cfg->max_images;
    h->lim.img.max_pixels = h->cfg->max_image_pixels;
    h->lim.img.max_bytes = (size_t)h->cfg->max_image_bytes;
    int64_t cap = vlmd_sched_max_seq_tokens(s);
    if (cap > 0 && cap < h->lim.max_prompt_tokens) h->lim.max_prompt_tokens = cap;
    h->media.max_bytes = (size_t)h->cfg->max_image_bytes;
    h->media.timeout = h->cfg->media_timeout;
    h->media.allow_private = h->cfg->allow_private_media;
    if (h->cfg->allow_remote_media) {
        h->lim.fetch = vlmd_media_fetch;
        h->lim.fetch_ctx = &h->media;
    }
    /* Sampling defaults: the model's generation_config.json where it sets a field (as vLLM and
     * transformers do), OpenAI's defaults (temperature 1, no filters) elsewhere. */
    vlm_sampling_default(&h->defaults);
    h->defaults.temperature = 1.0f;
    const vlm_gen_defaults *g = vlm_model_gen_defaults(b->model);
    if (g) {
        /* transformers samples only with do_sample; a config that sets a temperature but not
         * do_sample means greedy there, so it means greedy here. */
        if (g->temperature >= 0) h->defaults.temperature = g->do_sample ? g->temperature : 0.0f;
        if (g->top_p > 0) h->defaults.top_p = g->top_p;
        if (g->top_k > 0) h->defaults.top_k = g->top_k;
        if (g->min_p > 0) h->defaults.min_p = g->min_p;
        if (g->repetition_penalty > 0) h->defaults.repetition_penalty = g->repetition_penalty;
    }
    atomic_store(&h->state, VLMD_STATE_READY);
}

void vlmd_http_set_draining(vlmd_http *h) { atomic_store(&h->state, VLMD_STATE_DRAINING); }

void vlmd_http_set_unready(vlmd_http *h) { atomic_store(&h->unready, true); }

int vlmd_http_close_listener(vlmd_http *h) {
    MHD_socket ls = MHD_quiesce_daemon(h->d);
    if (ls == MHD_INVALID_SOCKET) return -1;
    /* A connection the kernel completed but MHD had not accepted yet would be reset by close(),
     * after its client may already have sent the request: a load balancer could then neither
     * retry it safely nor get an answer. Take those over and let MHD serve them. */
    int fl = fcntl(ls, F_GETFL);
    if (fl >= 0) fcntl(ls, F_SETFL, fl | O_NONBLOCK);
    int taken = 0;
    for (;;) {
        struct sockaddr_storage sa;
        socklen_t sl = sizeof sa;
        int fd = accept4(ls, (struct sockaddr *)&sa, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) continue;
            break; /* EAGAIN: the backlog is empty */
        }
        if (MHD_add_connection(h->d, fd, (struct sockaddr *)&sa, sl) == MHD_YES) taken++;
    }
    close(ls);
    return taken;
}

void vlmd_http_stop(vlmd_http *h) {
    if (!h) return;
    if (h->d) MHD_stop_daemon(h->d);
    free(h);
}
