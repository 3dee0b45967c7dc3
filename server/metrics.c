/* metrics.c — Prometheus text metrics for GET /metrics: requests by status code, token counters,
 * a tokens/s gauge over a sliding window, TTFT / inter-token / end-to-end latency histograms, and
 * the engine's queue, sequence and KV page gauges (snapshotted by the engine thread each step). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/serve.h"

double vlmd_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

double vlmd_wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define NB 14
static const double BUCKETS[NB] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                   1, 2.5, 5, 10, 30, 60, 120};
typedef struct {
    uint64_t counts[NB + 1];
    double sum;
    uint64_t n;
} hist_t;

#define MAX_CODES 16
#define RATE_SLOTS 10 /* one-second slots: tokens/s over the last 10 s */

struct vlmd_metrics {
    pthread_mutex_t mu;
    int codes[MAX_CODES];
    uint64_t code_n[MAX_CODES];
    int n_codes;
    hist_t ttft, itl, e2e;
    uint64_t prompt_tokens, gen_tokens;
    int64_t slot_sec[RATE_SLOTS];
    uint64_t slot_tok[RATE_SLOTS];
    int queue_depth;
    vlm_engine_stats es;
    vlmd_imgcache_counts ic;
};

vlmd_metrics *vlmd_metrics_new(void) {
    vlmd_metrics *m = calloc(1, sizeof *m);
    if (m) pthread_mutex_init(&m->mu, NULL);
    return m;
}

void vlmd_metrics_free(vlmd_metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static void hist_add(hist_t *h, double v) {
    int i = 0;
    while (i < NB && v > BUCKETS[i]) i++;
    h->counts[i]++;
    h->sum += v;
    h->n++;
}

void vlmd_metrics_request(vlmd_metrics *m, int code) {
    pthread_mutex_lock(&m->mu);
    int i = 0;
    while (i < m->n_codes && m->codes[i] != code) i++;
    if (i == m->n_codes && m->n_codes < MAX_CODES) m->codes[m->n_codes++] = code;
    if (i < m->n_codes) m->code_n[i]++;
    pthread_mutex_unlock(&m->mu);
}

#define HIST_FN(name, field)                                                                   \
    void vlmd_metrics_##name(vlmd_metrics *m, double s) {                                      \
        pthread_mutex_lock(&m->mu);                                                            \
        hist_add(&m->field, s);                                                                \
        pthread_mutex_unlock(&m->mu);                                                          \
    }
HIST_FN(ttft, ttft)
HIST_FN(itl, itl)
HIST_FN(e2e, e2e)

void vlmd_metrics_tokens(vlmd_metrics *m, int64_t prompt, int64_t generated, double now) {
    pthread_mutex_lock(&m->mu);
    m->prompt_tokens += (uint64_t)prompt;
    m->gen_tokens += (uint64_t)generated;
    int64_t sec = (int64_t)now;
    int slot = (int)(sec % RATE_SLOTS);
    if (m->slot_sec[slot] != sec) {
        m->slot_sec[slot] = sec;
        m->slot_tok[slot] = 0;
    }
    m->slot_tok[slot] += (uint64_t)generated;
    pthread_mutex_unlock(&m->mu);
}

void vlmd_metrics_imgcache(vlmd_metrics *m, const vlmd_imgcache_counts *c) {
    pthread_mutex_lock(&m->mu);
    m->ic = *c;
    pthread_mutex_unlock(&m->mu);
}

void vlmd_metrics_engine(vlmd_metrics *m, int queue_depth, const vlm_engine_stats *s) {
    pthread_mutex_lock(&m->mu);
    m->queue_depth = queue_depth;
    if (s) m->es = *s;
    pthread_mutex_unlock(&m->mu);
}

typedef struct {
    char *buf;
    size_t len, cap;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->buf ? b->buf + b->len : NULL, b->buf ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if (b->buf && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t nc = (b->cap ? b->cap * 2 : 4096) + (size_t)n;
        char *nb = realloc(b->buf, nc);
        if (!nb) return;
        b->buf = nb;
        b->cap = nc;
    }
}

/* One unlabelled sample with its HELP and TYPE lines. */
static void scalar(sbuf *b, const char *name, const char *type, const char *help, long long v) {
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %lld\n", name, help, name, type, name, v);
}

static void hist_render(sbuf *b, const char *name, const char *help, const hist_t *h) {
    sb_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < NB; i++) {
        cum += h->counts[i];
        sb_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, BUCKETS[i], (unsigned long long)cum);
    }
    cum += h->counts[NB];
    sb_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
              (unsigned long long)cum, name, h->sum, name, (unsigned long long)h->n);
}

char *vlmd_metrics_render(vlmd_metrics *m, double now) {
    sbuf b = {0};
    pthread_mutex_lock(&m->mu);
    sb_printf(&b, "# HELP vlmd_requests_total HTTP requests answered, by status code.\n"
                  "# TYPE vlmd_requests_total counter\n");
    for (int i = 0; i < m->n_codes; i++)
        sb_printf(&b, "vlmd_requests_total{code=\"%d\"} %llu\n", m->codes[i],
                  (unsigned long long)m->code_n[i]);
    scalar(&b, "vlmd_queue_depth", "gauge", "Requests waiting for admission.", m->queue_depth);
    scalar(&b, "vlmd_running_sequences", "gauge", "Sequences resident in the engine.", m->es.running);
    scalar(&b, "vlmd_waiting_sequences", "gauge", "Sequences queued inside the engine (incl. preempted).",
           m->es.waiting);
    scalar(&b, "vlmd_preemptions_total", "counter", "Sequences preempted for lack of KV pages.",
           m->es.preempted_total);
    scalar(&b, "vlmd_kv_pages_used", "gauge", "KV cache pages in use.", m->es.kv_pages_used);
    scalar(&b, "vlmd_kv_pages_total", "gauge", "KV cache pages reserved.", m->es.kv_pages_total);
    double use = m->es.kv_pages_total ? (double)m->es.kv_pages_used / (double)m->es.kv_pages_total : 0;
    sb_printf(&b, "# HELP vlmd_kv_cache_usage Fraction of KV pages in use.\n# TYPE vlmd_kv_cache_usage gauge\n"
                  "vlmd_kv_cache_usage %.4f\n", use);
    scalar(&b, "vlmd_kv_pages_cached", "gauge", "KV pages held by no sequence, kept for the prefix cache.",
           m->es.kv_pages_cached);
    scalar(&b, "vlmd_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           m->es.prefix_query_tokens);
    scalar(&b, "vlmd_prefix_cache_hits_total", "counter", "Prompt tokens read from the prefix cache.",
           m->es.prefix_hit_tokens);
    scalar(&b, "vlmd_image_cache_hits_total", "counter", "Images whose embeddings came from the image cache.",
           m->ic.hits);
    scalar(&b, "vlmd_image_cache_misses_total", "counter",
           "Images run through the vision encoder with the cache on.", m->ic.misses);
    scalar(&b, "vlmd_image_cache_bytes", "gauge", "Bytes of image embeddings held by the image cache.", m->ic.bytes);
    scalar(&b, "vlmd_prompt_tokens_total", "counter", "Prompt tokens admitted (image tokens included).",
           (long long)m->prompt_tokens);
    scalar(&b, "vlmd_generation_tokens_total", "counter", "Tokens generated.", (long long)m->gen_tokens);
    /* Completed one-second slots of the last RATE_SLOTS seconds (the current one is partial). */
    int64_t cur = (int64_t)now;
    uint64_t tok = 0;
    for (int i = 0; i < RATE_SLOTS; i++)
        if (m->slot_sec[i] < cur && m->slot_sec[i] >= cur - RATE_SLOTS) tok += m->slot_tok[i];
    sb_printf(&b, "# HELP vlmd_generation_tokens_per_second Tokens generated per second, last %d s.\n"
                  "# TYPE vlmd_generation_tokens_per_second gauge\nvlmd_generation_tokens_per_second %.3f\n",
              RATE_SLOTS, (double)tok / RATE_SLOTS);
    hist_render(&b, "vlmd_time_to_first_token_seconds", "Arrival to first generated token.", &m->ttft);
    hist_render(&b, "vlmd_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.",
                &m->itl);
    hist_render(&b, "vlmd_request_duration_seconds", "Arrival to last token.", &m->e2e);
    pthread_mutex_unlock(&m->mu);
    return b.buf;
}
