/* serve.h — internal header of `vlmd serve` (not installed, not used outside server/).
 *
 * One request's path through the files declared here:
 *   http.c     socket -> route, auth, body limit (413 as bytes arrive), read deadline
 *   openai.c   JSON -> vlmd_params (every field validated, one error shape), JSON/SSE out
 *   prompt.c   messages -> token ids + preprocessed images (the integrator's contract, prompt.h)
 *   sched.c    bounded admission queue -> engine thread (continuous batching, stop strings,
 *              detokenisation, cancellation, deadlines) -> per-choice output read by http.c
 *   metrics.c  Prometheus counters/gauges/histograms
 *   errors.c   the one table: internal error kind -> HTTP status, OpenAI type and code
 *   config.c   flags == JSON config keys, defaults, --help text
 *   media.c    libcurl fetcher for http(s) image URLs (--allow-remote-media)
 */
#ifndef VLMD_SERVE_H
#define VLMD_SERVE_H

#include <cJSON.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>

#include "runtime/runtime.h"
#include "server/prompt.h"

/* ---- configuration (config.c) ------------------------------------------------------------ */
typedef struct {
    char model[1024];
    char model_name[256];
    char host[128];
    int port;
    char api_key[256];
    int threads;
    int64_t kv_memory;
    int max_seqs;
    int max_batch_tokens;
    int max_queue;
    int64_t max_body_bytes;
    int max_images;
    int64_t max_image_pixels;
    int64_t max_image_bytes;
    int max_tokens_default;
    int max_tokens_limit;
    int max_n;
    double request_timeout;   /* seconds from arrival to the end of generation; 0 = none */
    double drain_timeout;
    double drain_delay;       /* SIGTERM: seconds of 'unready but serving', then close the listener */
    double read_timeout;      /* seconds to receive the whole request body */
    double idle_timeout;      /* MHD connection idle timeout */
    double ping_interval;     /* SSE ": ping" comment after this many idle seconds */
    int max_connections;
    bool allow_remote_media;
    bool allow_private_media;
    double media_timeout;
    bool no_prefix_cache;     /* engine: recompute every prompt (no KV reuse across requests) */
    int64_t image_cache_memory; /* bytes of image embeddings kept across requests; 0 = none */
    char config[1024];
    int tp;                   /* tensor-parallel ranks */
    char backend[16];         /* "cpu" or "cuda" */
    char gpus[256];           /* "0,1,..." CUDA devices, one per rank */
} vlmd_serve_cfg;

/* Fills eo->tp, backend, gpus/n_gpus from the --tp/--backend/--gpus values (serve and generate);
 * -1 with a message for an unknown backend, a malformed list, or --gpus without --backend cuda. */
int vlmd_parallel_opts(int tp, const char *backend, const char *gpus, vlm_engine_opts *eo, char *err,
                       size_t errlen);

void vlmd_cfg_defaults(vlmd_serve_cfg *c);
/* Parses argv (argv[0] = "serve"); --config FILE is applied first, flags after it win.
 * Returns 0 ok, 1 when --help was printed, -1 with a message in err. */
int vlmd_cfg_parse(vlmd_serve_cfg *c, int argc, char **argv, char *err, size_t errlen);
/* Applies one JSON object of settings (keys are flag names with '_' for '-'). */
int vlmd_cfg_apply_json(vlmd_serve_cfg *c, const cJSON *obj, char *err, size_t errlen);
void vlmd_cfg_help(FILE *f);
/* Writes the settings as one log line (api key redacted). */
void vlmd_cfg_log(const vlmd_serve_cfg *c, FILE *f);

/* ---- error table (errors.c) --------------------------------------------------------------- */
typedef enum {
    VLMD_ERR_BAD_JSON = 0,
    VLMD_ERR_INVALID,        /* wrong type, out of range, bad value */
    VLMD_ERR_IMAGE,          /* an image that cannot be fetched or decoded */
    VLMD_ERR_LIMIT,          /* over a configured limit (images, pixels, prompt length) */
    VLMD_ERR_CONTEXT,        /* prompt + max_tokens over the context */
    VLMD_ERR_UNSUPPORTED,
    VLMD_ERR_AUTH,
    VLMD_ERR_NOT_FOUND,
    VLMD_ERR_MODEL_NOT_FOUND,
    VLMD_ERR_METHOD,
    VLMD_ERR_READ_TIMEOUT,
    VLMD_ERR_TOO_LARGE,
    VLMD_ERR_QUEUE_FULL,
    VLMD_ERR_INTERNAL,
    VLMD_ERR_UNAVAILABLE,    /* loading or draining */
    VLMD_ERR_TIMEOUT,        /* request deadline passed before any output */
    VLMD_ERR_COUNT
} vlmd_err;

typedef struct {
    vlmd_err kind;
    int http;
    const char *type;
    const char *code;
} vlmd_err_info;

const vlmd_err_info *vlmd_err_lookup(vlmd_err e);
/* Internal status of a lower layer -> error kind (for client-caused failures). */
vlmd_err vlmd_err_from_status(vlm_status st);
/* {"error": {"message", "type", "param", "code"}} as a malloc'd string. */
char *vlmd_err_json(vlmd_err e, const char *message, const char *param);

/* ---- request parameters (openai.c) --------------------------------------------------------- */
typedef enum { VLMD_API_CHAT = 0, VLMD_API_COMPLETIONS } vlmd_api;

#define VLMD_MAX_STOPS 16
#define VLMD_MAX_STOP_LEN 256

typedef struct {
    vlmd_api api;
    int n;
    int max_tokens;           /* -1: not given */
    vlm_sampling sampling;    /* seed of choice 0; others derived */
    bool seed_given;
    bool stream, include_usage;
    char *stops[VLMD_MAX_STOPS];
    int n_stops;
    bool logprobs;
    int top_logprobs;
    bool echo;                /* completions */
    char *suffix;             /* completions: fill-in-the-middle */
    bool ignore_eos;
    const cJSON *messages;    /* chat: borrowed from the parsed body */
    const cJSON *prompt;      /* completions: borrowed */
} vlmd_params;

/* Validates a parsed body against the endpoint's schema. defaults: sampling defaults of the
 * model (generation_config). On failure fills err/param and returns the error kind + 1
 * (0 on success) — callers test `if (rc)`. */
int vlmd_params_parse(vlmd_api api, const cJSON *body, const vlm_sampling *defaults,
                      const vlmd_serve_cfg *cfg, vlmd_params *p, char *err, size_t errlen,
                      char *param, size_t paramlen);
void vlmd_params_free(vlmd_params *p);

/* Strict UTF-8 check (no overlongs, surrogates or code points past U+10FFFF). */
bool vlmd_utf8_valid(const char *s, size_t n);

/* ---- stop strings (stopstr.c, pure functions) ----------------------------------------------
 * text[0..len) is everything decoded so far; *emit is how much of it is already safe to send.
 * Looks for the earliest occurrence of a stop string that could not have been seen before; on a
 * hit returns its offset (the text is cut there). Otherwise returns -1 and moves *emit to len
 * minus the longest tail that is a prefix of some stop string (held back). */
int64_t vlmd_stop_scan(const char *text, size_t len, char *const *stops, int n_stops,
                       size_t *emit);

/* ---- metrics (metrics.c) ------------------------------------------------------------------ */
typedef struct vlmd_metrics vlmd_metrics;
vlmd_metrics *vlmd_metrics_new(void);
void vlmd_metrics_free(vlmd_metrics *m);
void vlmd_metrics_request(vlmd_metrics *m, int http_status);
void vlmd_metrics_ttft(vlmd_metrics *m, double seconds);
void vlmd_metrics_itl(vlmd_metrics *m, double seconds);
void vlmd_metrics_e2e(vlmd_metrics *m, double seconds);
void vlmd_metrics_tokens(vlmd_metrics *m, int64_t prompt, int64_t generated, double now);
void vlmd_metrics_engine(vlmd_metrics *m, int queue_depth, const vlm_engine_stats *s);
void vlmd_metrics_imgcache(vlmd_metrics *m, const vlmd_imgcache_counts *c);
/* Prometheus text exposition format, malloc'd. */
char *vlmd_metrics_render(vlmd_metrics *m, double now);

double vlmd_now(void); /* CLOCK_MONOTONIC seconds */
double vlmd_wall(void); /* CLOCK_REALTIME seconds */

/* ---- requests and the scheduler (sched.c) -------------------------------------------------- */
typedef struct {
    int32_t id;
    float lp;
    int n_top;
    int32_t top_ids[VLM_MAX_TOP_LOGPROBS];
    float top_lp[VLM_MAX_TOP_LOGPROBS];
} vlmd_lp;

/* One choice (one engine sequence). Written by the engine thread, read by the HTTP thread, both
 * under the request's mutex. */
typedef struct {
    uint64_t seq_id;
    bool added, ended, cancel_sent;
    bool done;               /* output complete: finish is set, no more text will come */
    const char *finish;      /* "stop" / "length" */
    vlm_detok *detok;
    char *text;              /* decoded text so far, held-back tail included */
    size_t len, cap;
    size_t emit;             /* text[0..emit) may be sent */
    vlmd_lp *lps;
    int n_lps, cap_lps;
    int n_tokens;            /* generated tokens counted for usage */
    double t_last;
    /* HTTP-side cursors */
    size_t sent;
    int lps_sent;
    bool finish_sent;
} vlmd_choice;

typedef struct vlmd_req {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;                /* HTTP side + engine side; last release frees */
    char id[64];             /* chatcmpl-... / cmpl-... */
    char rid[80];            /* X-Request-Id */
    vlmd_params p;
    cJSON *body;             /* parsed request (params borrow from it) */
    vlmd_prompt prompt;      /* freed by the engine thread once added */
    int64_t n_prompt;
    int64_t n_cached_prompt; /* prompt tokens the first choice read from the prefix cache */
    int max_tokens;
    char *echo_text;         /* completions echo: the prompt text */
    vlmd_choice *ch;
    int n_ch;
    bool cancel;             /* client went away */
    bool admitted, finished, failed, timed_out, in_active;
    vlmd_err err_kind;
    char err[512];
    double t_arrival, t_admit, t_first, t_done, deadline;
    int64_t created;         /* unix seconds for "created" */
    struct vlmd_req *next;
} vlmd_req;

vlmd_req *vlmd_req_new(void);
void vlmd_req_retain(vlmd_req *r);
void vlmd_req_release(vlmd_req *r);

typedef struct vlmd_sched vlmd_sched;
vlmd_sched *vlmd_sched_new(const vlmd_bundle *b, const vlmd_serve_cfg *cfg, vlmd_metrics *m);
/* Starts the engine thread (which creates the engine); waits for the engine to exist. */
int vlmd_sched_start(vlmd_sched *s, char *err, size_t errlen);
/* Tokens one sequence may hold at most (KV pool and context), known after start. */
int64_t vlmd_sched_max_seq_tokens(const vlmd_sched *s);
/* Queues a request (the scheduler takes its own reference). Returns 0, or the error kind + 1
 * (queue full, draining). */
int vlmd_sched_submit(vlmd_sched *s, vlmd_req *r);
/* Wakes the engine thread so it notices r->cancel. */
void vlmd_sched_kick(vlmd_sched *s);
void vlmd_sched_set_draining(vlmd_sched *s);
int vlmd_sched_busy(vlmd_sched *s);       /* queued + running requests */
void vlmd_sched_cancel_all(vlmd_sched *s);
void vlmd_sched_free(vlmd_sched *s);      /* stops and joins the engine thread */

/* ---- OpenAI responses (openai_out.c) ------------------------------------------------------- */
/* Whole non-streaming response body (r->mu held by the caller). */
char *vlmd_resp_json(const vlmd_bundle *b, const char *model, vlmd_req *r);
/* Appends the SSE events that became available (r->mu held): role chunks first, text/logprob
 * deltas, finish reasons, then usage and [DONE] when everything is finished. Returns true when the
 * stream is complete. */
typedef struct {
    char *buf;
    size_t len, cap;
} vlmd_buf;
void vlmd_buf_add(vlmd_buf *b, const char *s, size_t n);
bool vlmd_sse_collect(const vlmd_bundle *b, const char *model, vlmd_req *r, bool *role_sent,
                      vlmd_buf *out);

/* ---- remote media (media.c) ---------------------------------------------------------------- */
typedef struct {
    size_t max_bytes;
    double timeout;
    bool allow_private;
} vlmd_media_cfg;
vlm_status vlmd_media_fetch(void *ctx /* vlmd_media_cfg */, const char *url, uint8_t **bytes,
                            size_t *n, char *err, size_t errlen);
bool vlmd_addr_is_private(const struct sockaddr *sa);

/* ---- HTTP (http.c) ------------------------------------------------------------------------- */
typedef struct vlmd_http vlmd_http;
typedef enum { VLMD_STATE_LOADING = 0, VLMD_STATE_READY, VLMD_STATE_DRAINING } vlmd_state;
vlmd_http *vlmd_http_start(const vlmd_serve_cfg *cfg, vlmd_metrics *m, int *port_out, char *err,
                           size_t errlen);
/* Hands the loaded model and running scheduler to the HTTP side (state becomes READY). */
void vlmd_http_set_ready(vlmd_http *h, const vlmd_bundle *b, vlmd_sched *s, const char *model_name);
void vlmd_http_set_draining(vlmd_http *h);
/* /ready answers 503 {"status":"draining"} while requests are still admitted (--drain-delay). */
void vlmd_http_set_unready(vlmd_http *h);
/* Stops accepting: connections already waiting in the listen backlog are still taken (and served),
 * then the listening socket is closed, so a new connection is refused and a load balancer can
 * retry it on another replica knowing it never reached this one. Returns the number taken from
 * the backlog, -1 when MHD could not hand the socket back. */
int vlmd_http_close_listener(vlmd_http *h);
void vlmd_http_stop(vlmd_http *h);

#endif
