/* sched.c — admission queue and the engine thread (continuous batching).
 *
 * HTTP threads build a complete request (validated params, token ids, preprocessed images) and
 * submit it; the queue is bounded (--max-queue, 429 beyond). The single engine thread owns the
 * vlm_engine: between steps it admits queued requests while the number of resident sequences stays
 * within --max-seqs (running the vision encoder for their images first), applies cancellations
 * (client gone, stop string hit, deadline passed) and then runs one vlm_engine_step — which mixes
 * one prefill chunk with the decode tokens of every running sequence, so a long prompt never
 * stalls running streams for more than one chunk. Each token event is turned into text here with
 * the streaming detokenizer and checked against the stop strings, so a stop string cancels its
 * sequence before the next step. HTTP threads read each choice's text/logprobs under the request
 * mutex and are woken by its condition variable. Requests are reference-counted: the HTTP side and
 * the engine side each hold one reference. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "server/serve.h"

struct vlmd_sched {
    const vlmd_bundle *b;
    const vlmd_serve_cfg *cfg;
    vlmd_metrics *m;
    pthread_t th;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    vlmd_req *q_head, *q_tail;
    int q_len;
    bool draining, stop, cancel_all;
    /* engine start handshake */
    int start_state; /* 0 pending, 1 ok, -1 failed */
    char start_err[512];
    int64_t max_seq_tokens;
    /* engine-thread only */
    vlm_engine *eng;
    vlmd_imgcache *imgcache;     /* NULL with --image-cache-memory 0 */
    vlmd_req **active;
    int n_active, cap_active;
    int active_seqs;
    /* admitted requests whose images are being encoded, oldest first; written by the engine
     * thread only, n_enc changed under mu (vlmd_sched_busy reads it) */
    vlmd_req **enc;
    int n_enc, cap_enc;
};

/* Vision transformer blocks run per engine step while sequences are decoding: a picture that
 * misses the image cache used to be encoded whole inside admission, and every running stream
 * waited for it (448x448 on a 2-core CPU: ~10 s, c4 ITL p99 24.9 s). One block of that image is
 * ~0.3 s there. With nothing decoding the encode runs whole. */
#define ENC_BLOCKS_PER_STEP 1

vlmd_req *vlmd_req_new(void) {
    vlmd_req *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    pthread_mutex_init(&r->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cv, &ca);
    pthread_condattr_destroy(&ca);
    r->refs = 1;
    return r;
}

void vlmd_req_retain(vlmd_req *r) {
    pthread_mutex_lock(&r->mu);
    r->refs++;
    pthread_mutex_unlock(&r->mu);
}

void vlmd_req_release(vlmd_req *r) {
    if (!r) return;
    pthread_mutex_lock(&r->mu);
    int left = --r->refs;
    pthread_mutex_unlock(&r->mu);
    if (left > 0) return;
    for (int i = 0; i < r->n_ch; i++) {
        vlm_detok_free(r->ch[i].detok);
        free(r->ch[i].text);
        free(r->ch[i].lps);
    }
    free(r->ch);
    vlmd_prompt_free(&r->prompt);
    vlmd_params_free(&r->p);
    cJSON_Delete(r->body);
    free(r->echo_text);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

vlmd_sched *vlmd_sched_new(const vlmd_bundle *b, const vlmd_serve_cfg *cfg, vlmd_metrics *m) {
    vlmd_sched *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->b = b;
    s->cfg = cfg;
    s->m = m;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    return s;
}

int64_t vlmd_sched_max_seq_tokens(const vlmd_sched *s) { return s->max_seq_tokens; }

int vlmd_sched_submit(vlmd_sched *s, vlmd_req *r) {
    pthread_mutex_lock(&s->mu);
    if (s->draining || s->stop) {
        pthread_mutex_unlock(&s->mu);
        return VLMD_ERR_UNAVAILABLE + 1;
    }
    if (s->q_len >= s->cfg->max_queue && (s->q_len > 0 || s->active_seqs >= s->cfg->max_seqs)) {
        pthread_mutex_unlock(&s->mu);
        return VLMD_ERR_QUEUE_FULL + 1;
    }
    vlmd_req_retain(r); /* the engine side's reference */
    r->next = NULL;
    if (s->q_tail) s->q_tail->next = r;
    else s->q_head = r;
    s->q_tail = r;
    s->q_len++;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

void vlmd_sched_kick(vlmd_sched *s) {
    pthread_mutex_lock(&s->mu);
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void vlmd_sched_set_draining(vlmd_sched *s) {
    pthread_mutex_lock(&s->mu);
    s->draining = true;
    pthread_mutex_unlock(&s->mu);
}

int vlmd_sched_busy(vlmd_sched *s) {
    pthread_mutex_lock(&s->mu);
    int n = s->q_len + s->n_active + s->n_enc; /* waiting for their images too */
    pthread_mutex_unlock(&s->mu);
    return n;
}

void vlmd_sched_cancel_all(vlmd_sched *s) {
    pthread_mutex_lock(&s->mu);
    s->cancel_all = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* ---- engine-thread helpers ------------------------------------------------------------------ */

static void log_line(const vlmd_req *r, const char *event, const char *extra) {
    fprintf(stderr, "level=info event=%s id=%s%s%s\n", event, r->rid, extra ? " " : "", extra ? extra : "");
}

/* Fails a request that has produced nothing visible yet (r->mu held). */
static void fail_req(vlmd_req *r, vlmd_err kind, const char *msg) {
    r->failed = true;
    r->err_kind = kind;
    snprintf(r->err, sizeof r->err, "%s", msg);
    r->finished = true;
    r->t_done = vlmd_now();
    pthread_cond_broadcast(&r->cv);
}

static void fail_locked(vlmd_req *r, vlmd_err kind, const char *msg) {
    pthread_mutex_lock(&r->mu);
    fail_req(r, kind, msg);
    pthread_mutex_unlock(&r->mu);
}

static void text_append(vlmd_choice *c, const char *s, size_t n) {
    if (!n) return;
    if (c->len + n + 1 > c->cap) {
        size_t nc = (c->cap ? c->cap * 2 : 256) + n;
        char *nb = realloc(c->text, nc);
        VLM_ASSERT(nb);
        c->text = nb;
        c->cap = nc;
    }
    memcpy(c->text + c->len, s, n);
    c->len += n;
    c->text[c->len] = 0;
}

static void check_finished(vlmd_req *r) {
    for (int i = 0; i < r->n_ch; i++)
        if (!r->ch[i].done) return;
    if (!r->finished) {
        r->finished = true;
        r->t_done = vlmd_now();
    }
}

/* Ends a choice's output (r->mu held): flush the detokenizer, apply stops one last time. */
static void finish_choice(vlmd_req *r, vlmd_choice *c, const char *reason) {
    if (c->done) return;
    if (c->detok) {
        char *buf = NULL;
        size_t n = 0;
        if (vlm_detok_flush(c->detok, &buf, &n) == 0) text_append(c, buf, n);
        free(buf);
    }
    int64_t hit = vlmd_stop_scan(c->text ? c->text : "", c->len, r->p.stops, r->p.n_stops, &c->emit);
    if (hit >= 0) {
        c->len = (size_t)hit;
        reason = "stop";
    }
    c->emit = c->len;
    c->finish = reason;
    c->done = true;
}

static void cancel_choice(vlmd_sched *s, vlmd_choice *c) {
    if (c->added && !c->ended && !c->cancel_sent) {
        vlm_engine_cancel(s->eng, c->seq_id);
        c->cancel_sent = true;
    }
}

static uint64_t splitmix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* False when the client went away or the deadline passed while the request waited (then it is
 * answered here). */
static bool still_wanted(vlmd_req *r) {
    pthread_mutex_lock(&r->mu);
    bool cancelled = r->cancel;
    if (!cancelled && r->deadline > 0 && vlmd_now() > r->deadline) {
        fail_req(r, VLMD_ERR_TIMEOUT, "the request deadline passed while it was queued");
        cancelled = true;
    }
    pthread_mutex_unlock(&r->mu);
    return !cancelled;
}

/* Adds every choice of a request whose images are encoded to the engine; false when it failed
 * (request answered). */
static bool admit(vlmd_sched *s, vlmd_req *r) {
    char err[512];
    vlm_status st;
    vlm_seq_desc d;
    memset(&d, 0, sizeof d);
    vlmd_prompt_to_desc(&r->prompt, &d);
    d.max_tokens = r->max_tokens;
    d.ignore_eos = r->p.ignore_eos;
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->n_ch; i++) {
        vlmd_choice *c = &r->ch[i];
        d.sampling = r->p.sampling;
        /* Choice 0 keeps the request's seed; the others get well-mixed derived seeds. */
        if (i > 0) d.sampling.seed = splitmix(r->p.sampling.seed + (uint64_t)i);
        st = vlm_engine_add(s->eng, &d, &c->seq_id, err, sizeof err);
        if (st != VLM_OK) {
            for (int k = 0; k < i; k++) cancel_choice(s, &r->ch[k]);
            for (int k = i; k < r->n_ch; k++) r->ch[k].ended = true;
            vlmd_err kind = st == VLM_E_LIMIT ? VLMD_ERR_CONTEXT : vlmd_err_from_status(st);
            fail_req(r, kind, err);
            pthread_mutex_unlock(&r->mu);
            return i > 0; /* keep it active so the cancelled sequences' ends are collected */
        }
        c->added = true;
        c->t_last = vlmd_now();
    }
    r->admitted = true;
    r->t_admit = vlmd_now();
    pthread_mutex_unlock(&r->mu);
    /* The engine copied ids and embeddings; the pixels and embeddings can go now. */
    vlmd_prompt_free(&r->prompt);
    vlmd_metrics_tokens(s->m, r->n_prompt, 0, vlmd_now());
    char extra[128];
    snprintf(extra, sizeof extra, "prompt_tokens=%lld n=%d queue_ms=%.1f", (long long)r->n_prompt, r->n_ch,
             (r->t_admit - r->t_arrival) * 1e3);
    log_line(r, "admitted", extra);
    return true;
}

/* A request that leaves before it ran: its sequence budget back, the scheduler's reference gone. */
static void drop_req(vlmd_sched *s, vlmd_req *r, bool cancel_all) {
    pthread_mutex_lock(&s->mu);
    if (!cancel_all) s->active_seqs -= r->n_ch;
    pthread_mutex_unlock(&s->mu);
    vlmd_req_release(r);
}

/* Appends r to one of the engine thread's lists (grown here; the count changes under mu, which
 * other threads read). */
static void list_push(vlmd_sched *s, vlmd_req ***list, int *n, int *cap, vlmd_req *r) {
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 16;
        *list = realloc(*list, sizeof **list * (size_t)*cap);
        VLM_ASSERT(*list);
    }
    pthread_mutex_lock(&s->mu);
    (*list)[(*n)++] = r;
    pthread_mutex_unlock(&s->mu);
}

static void activate(vlmd_sched *s, vlmd_req *r) { list_push(s, &s->active, &s->n_active, &s->cap_active, r); }
static void enc_push(vlmd_sched *s, vlmd_req *r) { list_push(s, &s->enc, &s->n_enc, &s->cap_enc, r); }

static void enc_pop(vlmd_sched *s) {
    pthread_mutex_lock(&s->mu);
    memmove(s->enc, s->enc + 1, sizeof *s->enc * (size_t)(s->n_enc - 1));
    s->n_enc--;
    pthread_mutex_unlock(&s->mu);
}

/* Encodes the oldest waiting request's images by one slice (all of them when no sequence is
 * running), then admits it once they are done. Shutdown, a gone client or a passed deadline
 * ends waiting requests here. */
static void encode_some(vlmd_sched *s, bool cancel_all) {
    while (s->n_enc > 0) {
        vlmd_req *r = s->enc[0];
        /* asked per request: one admitted just before makes the engine busy */
        const int slice = vlm_engine_active(s->eng) > 0 ? ENC_BLOCKS_PER_STEP : 0;
        char err[512];
        bool done = false, gone = true;
        if (cancel_all) {
            fail_locked(r, VLMD_ERR_UNAVAILABLE, "the server is shutting down");
        } else if (still_wanted(r)) {
            vlm_status st = vlmd_prompt_encode_step(s->b, &r->prompt, s->imgcache, slice, &done, err, sizeof err);
            if (st != VLM_OK) fail_locked(r, vlmd_err_from_status(st), err);
            else gone = false;
        }
        if (!gone && !done) return; /* this step's slice is used */
        enc_pop(s);
        if (!gone && admit(s, r)) activate(s, r);
        else drop_req(s, r, cancel_all);
        if (!gone && slice > 0) return; /* one slice per step while others decode */
    }
}

static void on_event(vlmd_sched *s, const vlm_token_event *ev) {
    vlmd_req *r = NULL;
    vlmd_choice *c = NULL;
    for (int i = 0; i < s->n_active && !c; i++)
        for (int k = 0; k < s->active[i]->n_ch; k++)
            if (s->active[i]->ch[k].added && s->active[i]->ch[k].seq_id == ev->seq_id) {
                r = s->active[i];
                c = &r->ch[k];
                break;
            }
    if (!c) return; /* a sequence of a request that already left */
    double now = vlmd_now();
    pthread_mutex_lock(&r->mu);
    if (c == &r->ch[0]) r->n_cached_prompt = ev->n_cached_prompt;
    if (ev->token >= 0 && !c->done) {
        c->n_tokens++;
        vlmd_metrics_tokens(s->m, 0, 1, now);
        if (r->t_first == 0) {
            r->t_first = now;
            vlmd_metrics_ttft(s->m, now - r->t_arrival);
        } else if (c->n_tokens > 1) {
            vlmd_metrics_itl(s->m, now - c->t_last);
        }
        c->t_last = now;
        if (r->p.logprobs) {
            if (c->n_lps == c->cap_lps) {
                c->cap_lps = c->cap_lps ? c->cap_lps * 2 : 32;
                c->lps = realloc(c->lps, sizeof *c->lps * (size_t)c->cap_lps);
                VLM_ASSERT(c->lps);
            }
            vlmd_lp *l = &c->lps[c->n_lps++];
            l->id = ev->token;
            l->lp = ev->logprob;
            l->n_top = ev->n_top < r->p.top_logprobs ? ev->n_top : r->p.top_logprobs;
            memcpy(l->top_ids, ev->top_ids, sizeof(int32_t) * (size_t)l->n_top);
            memcpy(l->top_lp, ev->top_logprobs, sizeof(float) * (size_t)l->n_top);
        }
        char *buf = NULL;
        size_t n = 0;
        if (c->detok && vlm_detok_push(c->detok, ev->token, &buf, &n) == 0) text_append(c, buf, n);
        free(buf);
        int64_t hit = vlmd_stop_scan(c->text ? c->text : "", c->len, r->p.stops, r->p.n_stops, &c->emit);
        if (hit >= 0) {
            c->len = (size_t)hit;
            c->emit = c->len;
            c->finish = "stop";
            c->done = true;
            cancel_choice(s, c);
        }
    }
    if (ev->finish != VLM_FINISH_NONE) {
        c->ended = true;
        switch (ev->finish) {
        case VLM_FINISH_STOP: finish_choice(r, c, "stop"); break;
        case VLM_FINISH_LENGTH: finish_choice(r, c, "length"); break;
        case VLM_FINISH_CANCELLED: finish_choice(r, c, r->timed_out ? "length" : "cancelled"); break;
        default:
            if (!c->done) {
                finish_choice(r, c, "error");
                r->failed = true;
                r->err_kind = VLMD_ERR_INTERNAL;
                snprintf(r->err, sizeof r->err, "the engine failed while generating");
            }
            break;
        }
    }
    check_finished(r);
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static void drop_finished(vlmd_sched *s) {
    int w = 0;
    for (int i = 0; i < s->n_active; i++) {
        vlmd_req *r = s->active[i];
        pthread_mutex_lock(&r->mu);
        bool all_ended = true;
        int seqs = 0;
        for (int k = 0; k < r->n_ch; k++) {
            if (!r->ch[k].ended) all_ended = false;
            else seqs++;
        }
        if (all_ended) check_finished(r);
        pthread_mutex_unlock(&r->mu);
        if (all_ended) {
            pthread_mutex_lock(&s->mu);
            s->active_seqs -= r->n_ch;
            pthread_mutex_unlock(&s->mu);
            if (r->t_first > 0) vlmd_metrics_e2e(s->m, r->t_done - r->t_arrival);
            vlmd_req_release(r);
        } else {
            s->active[w++] = r;
        }
    }
    pthread_mutex_lock(&s->mu);
    s->n_active = w;
    pthread_mutex_unlock(&s->mu);
}

static void *engine_main(void *arg) {
    vlmd_sched *s = arg;
    vlm_engine_opts eo = {.threads = s->cfg->threads,
                          .kv_memory_bytes = s->cfg->kv_memory,
                          .max_seqs = s->cfg->max_seqs,
                          .max_batch_tokens = s->cfg->max_batch_tokens,
                          .page_tokens = 0,
                          .no_prefix_cache = s->cfg->no_prefix_cache};
    char err[512];
    vlm_status st = VLM_OK;
    if (vlmd_parallel_opts(s->cfg->tp, s->cfg->backend, s->cfg->gpus, &eo, s->start_err, sizeof s->start_err))
        st = VLM_E_INVALID;
    if (st == VLM_OK) st = vlm_engine_create(s->b->model, &eo, &s->eng, s->start_err, sizeof s->start_err);
    vlm_engine_stats es;
    if (st == VLM_OK) {
        char plan[512];
        vlm_engine_describe(s->eng, plan, sizeof plan);
        fprintf(stderr, "level=info event=engine plan=\"%s\"\n", plan);
        vlm_engine_get_stats(s->eng, &es);
        int64_t cap = es.kv_pages_total * es.page_tokens;
        int64_t ctx = s->b->cfg->max_position > 0 ? s->b->cfg->max_position : cap;
        s->max_seq_tokens = cap < ctx ? cap : ctx;
    }
    pthread_mutex_lock(&s->mu);
    s->start_state = st == VLM_OK ? 1 : -1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (st != VLM_OK) return NULL;
    s->imgcache = vlmd_imgcache_new(s->cfg->image_cache_memory);

    int max_ev = 2 * (s->cfg->max_seqs + s->cfg->max_n) + 16;
    vlm_token_event *ev = calloc((size_t)max_ev, sizeof *ev);
    VLM_ASSERT(ev);
    for (;;) {
        vlmd_req *batch[64];
        int nb = 0;
        bool cancel_all;
        pthread_mutex_lock(&s->mu);
        while (!s->stop && !s->q_head && s->n_active == 0 && s->n_enc == 0)
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->stop && s->n_active == 0 && !s->q_head && s->n_enc == 0) {
            pthread_mutex_unlock(&s->mu);
            break;
        }
        cancel_all = s->cancel_all || s->stop;
        /* Admit in arrival order while the sequence budget allows (one request always fits
         * when nothing runs, so n > max_seqs cannot starve). */
        while (s->q_head && nb < 64 &&
               (cancel_all || s->active_seqs + s->q_head->p.n <= s->cfg->max_seqs || s->active_seqs == 0)) {
            vlmd_req *r = s->q_head;
            s->q_head = r->next;
            if (!s->q_head) s->q_tail = NULL;
            s->q_len--;
            batch[nb++] = r;
            if (!cancel_all) s->active_seqs += r->n_ch;
        }
        int qlen = s->q_len;
        pthread_mutex_unlock(&s->mu);

        for (int i = 0; i < nb; i++) {
            vlmd_req *r = batch[i];
            bool keep = false;
            if (cancel_all) {
                fail_locked(r, VLMD_ERR_UNAVAILABLE, "the server is shutting down");
            } else if (!still_wanted(r)) {
                keep = false;
            } else if (r->prompt.n_images > 0 && !r->prompt.images) {
                enc_push(s, r); /* its images are encoded a slice per step below */
                continue;
            } else {
                keep = admit(s, r);
            }
            if (keep) activate(s, r);
            else drop_req(s, r, cancel_all);
        }
        encode_some(s, cancel_all);

        /* Cancellations: client gone, deadline passed, shutdown. */
        double now = vlmd_now();
        for (int i = 0; i < s->n_active; i++) {
            vlmd_req *r = s->active[i];
            pthread_mutex_lock(&r->mu);
            bool expired = r->deadline > 0 && now > r->deadline && !r->finished;
            if (expired && !r->timed_out) {
                r->timed_out = true;
                log_line(r, "deadline", NULL);
            }
            for (int k = 0; k < r->n_ch; k++) {
                vlmd_choice *c = &r->ch[k];
                if (r->cancel || cancel_all || c->done || expired) cancel_choice(s, c);
                if ((expired || cancel_all) && !c->done) finish_choice(r, c, "length");
            }
            check_finished(r);
            pthread_cond_broadcast(&r->cv);
            pthread_mutex_unlock(&r->mu);
        }

        int n = vlm_engine_step(s->eng, ev, max_ev);
        for (int i = 0; i < n; i++) on_event(s, &ev[i]);
        /* A sequence the engine no longer knows (should not happen) must not hang its client. */
        if (vlm_engine_active(s->eng) == 0) {
            for (int i = 0; i < s->n_active; i++) {
                vlmd_req *r = s->active[i];
                pthread_mutex_lock(&r->mu);
                for (int k = 0; k < r->n_ch; k++) {
                    if (!r->ch[k].ended) {
                        r->ch[k].ended = true;
                        finish_choice(r, &r->ch[k], "length");
                    }
                }
                check_finished(r);
                pthread_cond_broadcast(&r->cv);
                pthread_mutex_unlock(&r->mu);
            }
        }
        drop_finished(s);
        vlm_engine_get_stats(s->eng, &es);
        vlmd_metrics_engine(s->m, qlen, &es);
        vlmd_imgcache_counts ic;
        vlmd_imgcache_stats(s->imgcache, &ic);
        vlmd_metrics_imgcache(s->m, &ic);
        (void)err;
    }
    free(ev);
    vlmd_imgcache_free(s->imgcache);
    s->imgcache = NULL;
    free(s->active);
    free(s->enc);
    s->enc = NULL;
    s->active = NULL;
    vlm_engine_free(s->eng);
    s->eng = NULL;
    return NULL;
}

int vlmd_sched_start(vlmd_sched *s, char *err, size_t errlen) {
    if (pthread_create(&s->th, NULL, engine_main, s) != 0)
        return snprintf(err, errlen, "cannot start the engine thread"), -1;
    s->started = true;
    pthread_mutex_lock(&s->mu);
    while (s->start_state == 0) pthread_cond_wait(&s->cv, &s->mu);
    int ok = s->start_state;
    pthread_mutex_unlock(&s->mu);
    if (ok < 0) {
        snprintf(err, errlen, "engine: %s", s->start_err);
        pthread_join(s->th, NULL);
        s->started = false;
        return -1;
    }
    return 0;
}

void vlmd_sched_free(vlmd_sched *s) {
    if (!s) return;
    if (s->started) {
        pthread_mutex_lock(&s->mu);
        s->stop = true;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->th, NULL);
    }
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}
