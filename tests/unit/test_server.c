/* test_server.c — unit tests of the server's pure parts: the error table, stop-string scanning
 * (including the streaming hold-back), strict UTF-8 checking, OpenAI parameter validation, the
 * settings parser (flags, JSON config, precedence, size suffixes) and the Prometheus renderer.
 * The HTTP/engine path is exercised end to end by tests/integration (pytest). */
#include <cJSON.h>
#include <stdlib.h>

#include "server/serve.h"
#include "tests/unit/test.h"

static void test_error_table(void) {
    for (int e = 0; e < VLMD_ERR_COUNT; e++) {
        const vlmd_err_info *in = vlmd_err_lookup((vlmd_err)e);
        CHECK_EQ_INT(in->kind, e);
        CHECK(in->http >= 400 && in->http < 600);
        CHECK(in->type && in->type[0] && in->code && in->code[0]);
    }
    CHECK_EQ_INT(vlmd_err_lookup(VLMD_ERR_BAD_JSON)->http, 400);
    CHECK_EQ_INT(vlmd_err_lookup(VLMD_ERR_AUTH)->http, 401);
    CHECK_EQ_INT(vlmd_err_lookup(VLMD_ERR_MODEL_NOT_FOUND)->http, 404);
    CHECK_EQ_INT(vlmd_err_lookup(VLMD_ERR_METHOD)->http, 405);
    CHECK_EQ_INT(vlmd_err_lookup(VLMD_ERR_TOO_LARGE)->http, 413);
    CHECK_EQ_INT(vlmd_err_lookup(VLMD_ERR_QUEUE_FULL)->http, 429);
    CHECK_EQ_INT(vlmd_err_lookup(VLMD_ERR_UNAVAILABLE)->http, 503);
    CHECK_EQ_INT(vlmd_err_from_status(VLM_E_INVALID), VLMD_ERR_INVALID);
    CHECK_EQ_INT(vlmd_err_from_status(VLM_E_FORMAT), VLMD_ERR_IMAGE);
    CHECK_EQ_INT(vlmd_err_from_status(VLM_E_LIMIT), VLMD_ERR_LIMIT);
    CHECK_EQ_INT(vlmd_err_from_status(VLM_E_INTERNAL), VLMD_ERR_INTERNAL);
    char *j = vlmd_err_json(VLMD_ERR_INVALID, "bad \"n\"", "n");
    cJSON *o = cJSON_Parse(j);
    const cJSON *e = cJSON_GetObjectItem(o, "error");
    CHECK(cJSON_IsObject(e) && cJSON_GetArraySize(o) == 1 && cJSON_GetArraySize(e) == 4);
    CHECK(!strcmp(cJSON_GetObjectItem(e, "message")->valuestring, "bad \"n\""));
    CHECK(!strcmp(cJSON_GetObjectItem(e, "param")->valuestring, "n"));
    CHECK(!strcmp(cJSON_GetObjectItem(e, "type")->valuestring, "invalid_request_error"));
    cJSON_Delete(o);
    free(j);
    j = vlmd_err_json(VLMD_ERR_INTERNAL, "x", NULL);
    o = cJSON_Parse(j);
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "error"), "param")));
    cJSON_Delete(o);
    free(j);
}

/* Feeds text in pieces like a token stream and returns what would have been sent. */
static void stream_through(const char *const *pieces, int n, char *const *stops, int n_stops, char *sent,
                           int64_t *hit_at) {
    char text[512] = "";
    size_t len = 0, emit = 0, sent_n = 0;
    *hit_at = -1;
    sent[0] = 0;
    for (int i = 0; i < n; i++) {
        size_t l = strlen(pieces[i]);
        memcpy(text + len, pieces[i], l);
        len += l;
        text[len] = 0;
        int64_t hit = vlmd_stop_scan(text, len, stops, n_stops, &emit);
        /* Invariant: never send past emit, and emit never moves back. */
        CHECK(emit >= sent_n && emit <= len);
        memcpy(sent + sent_n, text + sent_n, emit - sent_n);
        sent_n = emit;
        sent[sent_n] = 0;
        if (hit >= 0) {
            *hit_at = hit;
            return;
        }
    }
}

static void test_stop_scan(void) {
    char *stops[] = {"END", "\n\n"};
    char sent[512];
    int64_t hit;
    const char *p1[] = {"hello ", "wor", "ld E", "N", "D more"};
    stream_through(p1, 5, stops, 2, sent, &hit);
    CHECK_EQ_INT(hit, 12);
    CHECK(!strcmp(sent, "hello world "));
    /* A prefix that turns out not to be a stop string is released. */
    const char *p2[] = {"a E", "N", "x b"};
    stream_through(p2, 3, stops, 2, sent, &hit);
    CHECK_EQ_INT(hit, -1);
    CHECK(!strcmp(sent, "a ENx b"));
    /* Stop string split over three pieces, second stop wins if earlier. */
    const char *p3[] = {"x\n", "\nEND"};
    stream_through(p3, 2, stops, 2, sent, &hit);
    CHECK_EQ_INT(hit, 1);
    CHECK(!strcmp(sent, "x"));
    /* Stop at the very beginning. */
    const char *p4[] = {"EN", "D"};
    stream_through(p4, 2, stops, 2, sent, &hit);
    CHECK_EQ_INT(hit, 0);
    CHECK(!strcmp(sent, ""));
    /* Multi-byte stop string: held-back bytes stay on a character boundary. */
    char *s2[] = {"é!"};
    const char *p5[] = {"caf", "é", "?"};
    stream_through(p5, 3, s2, 1, sent, &hit);
    CHECK_EQ_INT(hit, -1);
    CHECK(!strcmp(sent, "café?"));
    /* No stops: everything is sent at once. */
    size_t emit = 0;
    CHECK_EQ_INT(vlmd_stop_scan("abc", 3, NULL, 0, &emit), -1);
    CHECK_EQ_INT(emit, 3);
}

static void test_utf8(void) {
    CHECK(vlmd_utf8_valid("plain", 5));
    CHECK(vlmd_utf8_valid("caf\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x98\x80", 14));
    CHECK(!vlmd_utf8_valid("\xff", 1));
    CHECK(!vlmd_utf8_valid("\xc0\xaf", 2));            /* overlong '/' */
    CHECK(!vlmd_utf8_valid("\xe0\x80\xaf", 3));        /* overlong */
    CHECK(!vlmd_utf8_valid("\xed\xa0\x80", 3));        /* surrogate */
    CHECK(!vlmd_utf8_valid("\xf4\x90\x80\x80", 4));    /* > U+10FFFF */
    CHECK(!vlmd_utf8_valid("\xe2\x9c", 2));            /* truncated */
    CHECK(vlmd_utf8_valid("a\0b", 3));                 /* NUL is valid UTF-8 (JSON rejects it later) */
}

static int parse(vlmd_api api, const char *json, vlmd_params *p, char *param) {
    vlmd_serve_cfg cfg;
    vlmd_cfg_defaults(&cfg);
    vlm_sampling d;
    memset(&d, 0, sizeof d);
    d.temperature = 0.7f;
    d.top_p = 1;
    d.repetition_penalty = 1.05f;
    cJSON *b = cJSON_Parse(json);
    VLM_ASSERT(b);
    char err[256];
    int rc = vlmd_params_parse(api, b, &d, &cfg, p, err, sizeof err, param, 128);
    p->messages = p->prompt = NULL; /* borrowed from b */
    cJSON_Delete(b);
    return rc;
}

static void test_params(void) {
    vlmd_params p;
    char param[128];
    const char *msgs = "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]";
    char buf[1024];
#define J(...) (snprintf(buf, sizeof buf, __VA_ARGS__), buf)
    CHECK_EQ_INT(parse(VLMD_API_CHAT, J("{%s}", msgs), &p, param), 0);
    CHECK_EQ_INT(p.n, 1);
    CHECK_EQ_INT(p.max_tokens, -1);
    CHECK_NEAR(p.sampling.temperature, 0.7, 1e-6); /* model default kept */
    CHECK_NEAR(p.sampling.repetition_penalty, 1.05, 1e-6);
    vlmd_params_free(&p);

    CHECK_EQ_INT(parse(VLMD_API_CHAT,
                       J("{%s,\"max_tokens\":5,\"max_completion_tokens\":7,\"temperature\":0,\"top_p\":0.5,"
                         "\"top_k\":-1,\"seed\":-3,\"n\":3,\"stop\":[\"a\",\"bc\"],\"logprobs\":true,"
                         "\"top_logprobs\":4,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
                         "\"unknown_field\":{\"x\":1}}", msgs),
                       &p, param),
                 0);
    CHECK_EQ_INT(p.max_tokens, 7);
    CHECK_NEAR(p.sampling.temperature, 0, 0);
    CHECK_EQ_INT(p.sampling.top_k, 0);
    CHECK(p.seed_given && p.sampling.seed == (uint64_t)(int64_t)-3);
    CHECK_EQ_INT(p.n, 3);
    CHECK_EQ_INT(p.n_stops, 2);
    CHECK(!strcmp(p.stops[1], "bc"));
    CHECK(p.logprobs && p.sampling.logprobs && p.top_logprobs == 4 && p.sampling.top_logprobs == 4);
    CHECK(p.stream && p.include_usage);
    vlmd_params_free(&p);

    struct { const char *extra; const char *param; int kind; } bad[] = {
        {"\"max_tokens\":0", "max_tokens", VLMD_ERR_INVALID},
        {"\"max_tokens\":-1", "max_tokens", VLMD_ERR_INVALID},
        {"\"max_tokens\":2.5", "max_tokens", VLMD_ERR_INVALID},
        {"\"max_tokens\":\"5\"", "max_tokens", VLMD_ERR_INVALID},
        {"\"max_tokens\":1e300", "max_tokens", VLMD_ERR_INVALID},
        {"\"temperature\":2.5", "temperature", VLMD_ERR_INVALID},
        {"\"top_p\":0", "top_p", VLMD_ERR_INVALID},
        {"\"top_k\":-2", "top_k", VLMD_ERR_INVALID},
        {"\"n\":0", "n", VLMD_ERR_INVALID},
        {"\"stop\":[1]", "stop", VLMD_ERR_INVALID},
        {"\"stop\":\"\"", "stop", VLMD_ERR_INVALID},
        {"\"top_logprobs\":1", "top_logprobs", VLMD_ERR_INVALID},
        {"\"logprobs\":true,\"top_logprobs\":21", "top_logprobs", VLMD_ERR_INVALID},
        {"\"stream_options\":{}", "stream_options", VLMD_ERR_INVALID},
        {"\"stream\":true,\"stream_options\":{\"include_usage\":1}", "stream_options.include_usage", VLMD_ERR_INVALID},
        {"\"model\":5", "model", VLMD_ERR_INVALID},
        {"\"tools\":[{}]", "tools", VLMD_ERR_UNSUPPORTED},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = parse(VLMD_API_CHAT, J("{%s,%s}", msgs, bad[i].extra), &p, param);
        CHECKF(rc == bad[i].kind + 1 && !strcmp(param, bad[i].param), "%s -> rc %d param %s", bad[i].extra, rc, param);
        vlmd_params_free(&p);
    }
    CHECK_EQ_INT(parse(VLMD_API_CHAT, "{}", &p, param), VLMD_ERR_INVALID + 1);
    CHECK(!strcmp(param, "messages"));
    vlmd_params_free(&p);
    CHECK_EQ_INT(parse(VLMD_API_CHAT, "[1]", &p, param), VLMD_ERR_INVALID + 1);
    vlmd_params_free(&p);

    /* completions: logprobs is an integer, echo, suffix */
    CHECK_EQ_INT(parse(VLMD_API_COMPLETIONS, "{\"prompt\":\"x\",\"logprobs\":3,\"suffix\":\"s\"}", &p, param), 0);
    CHECK(p.logprobs && p.top_logprobs == 3 && p.suffix && !strcmp(p.suffix, "s"));
    vlmd_params_free(&p);
    CHECK_EQ_INT(parse(VLMD_API_COMPLETIONS, "{\"prompt\":\"x\",\"logprobs\":true}", &p, param), VLMD_ERR_INVALID + 1);
    vlmd_params_free(&p);
    CHECK_EQ_INT(parse(VLMD_API_COMPLETIONS, "{\"prompt\":\"x\",\"echo\":true,\"logprobs\":1}", &p, param),
                 VLMD_ERR_UNSUPPORTED + 1);
    vlmd_params_free(&p);
    CHECK_EQ_INT(parse(VLMD_API_COMPLETIONS, "{\"prompt\":{}}", &p, param), VLMD_ERR_INVALID + 1);
    CHECK(!strcmp(param, "prompt"));
    vlmd_params_free(&p);
#undef J
}

static void test_config(void) {
    vlmd_serve_cfg c;
    char err[256];
    vlmd_cfg_defaults(&c);
    char *argv1[] = {"serve", "--port", "0", "--kv-memory", "1.5G", "--max-queue=3", "--allow-remote-media",
                     "--drain-timeout", "2.5", "--model", "/m"};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 11, argv1, err, sizeof err), 0);
    CHECK_EQ_INT(c.port, 0);
    CHECK_EQ_INT(c.kv_memory, (int64_t)(1.5 * 1024 * 1024 * 1024));
    CHECK_EQ_INT(c.max_queue, 3);
    CHECK(c.allow_remote_media && !c.allow_private_media);
    CHECK_NEAR(c.drain_timeout, 2.5, 0);
    CHECK(!strcmp(c.model, "/m"));
    CHECK_NEAR(c.drain_delay, 0, 0); /* default: keep listening during the drain */
    char *argv_dd[] = {"serve", "--drain-delay", "1.5"};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 3, argv_dd, err, sizeof err), 0);
    CHECK_NEAR(c.drain_delay, 1.5, 0);
    char *bad_dd[] = {"serve", "--drain-delay", "-1"};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 3, bad_dd, err, sizeof err), -1);

    vlmd_cfg_defaults(&c);
    char *bad1[] = {"serve", "--max-seqs", "0"};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 3, bad1, err, sizeof err), -1);
    char *bad2[] = {"serve", "--no-such-flag"};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 2, bad2, err, sizeof err), -1);
    char *bad3[] = {"serve", "--port"};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 2, bad3, err, sizeof err), -1);
    char *bad4[] = {"serve", "--max-body-bytes", "12Q"};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 3, bad4, err, sizeof err), -1);
    char *help[] = {"serve", "--help"};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 2, help, err, sizeof err), 1);

    /* JSON config: same names with underscores; then flags win over the file. */
    const char *path = "/tmp/vlmd_test_server_cfg.json";
    FILE *f = fopen(path, "w");
    VLM_ASSERT(f);
    fputs("{\"max_queue\": 9, \"max_seqs\": 4, \"kv_memory\": \"256M\", \"allow_private_media\": true}", f);
    fclose(f);
    vlmd_cfg_defaults(&c);
    char *argv2[] = {"serve", "--max-seqs", "8", "--config", (char *)path};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 5, argv2, err, sizeof err), 0);
    CHECK_EQ_INT(c.max_queue, 9);
    CHECK_EQ_INT(c.max_seqs, 8);
    CHECK_EQ_INT(c.kv_memory, 256 << 20);
    CHECK(c.allow_private_media);
    f = fopen(path, "w");
    fputs("{\"max_queue\": 9, \"bogus\": 1}", f);
    fclose(f);
    vlmd_cfg_defaults(&c);
    char *argv3[] = {"serve", "--config", (char *)path};
    CHECK_EQ_INT(vlmd_cfg_parse(&c, 3, argv3, err, sizeof err), -1);
    CHECK(strstr(err, "bogus") != NULL);
    remove(path);

    /* Every preset under configs/server parses. */
    const char *presets[] = {"configs/server/default.json", "configs/server/small-cpu.json",
                             "configs/server/production.json"};
    for (size_t i = 0; i < 3; i++) {
        vlmd_cfg_defaults(&c);
        char *a[] = {"serve", "--config", (char *)presets[i]};
        CHECKF(vlmd_cfg_parse(&c, 3, a, err, sizeof err) == 0, "%s: %s", presets[i], err);
    }
}

static void test_metrics(void) {
    vlmd_metrics *m = vlmd_metrics_new();
    vlmd_metrics_request(m, 200);
    vlmd_metrics_request(m, 200);
    vlmd_metrics_request(m, 429);
    vlmd_metrics_ttft(m, 0.02);
    vlmd_metrics_itl(m, 0.003);
    vlmd_metrics_tokens(m, 10, 5, 100.5);
    vlmd_metrics_tokens(m, 0, 15, 101.5);
    vlm_engine_stats s = {.kv_pages_total = 100, .kv_pages_used = 25, .page_tokens = 16, .running = 3, .waiting = 1};
    vlmd_metrics_engine(m, 2, &s);
    char *t = vlmd_metrics_render(m, 102.2);
    CHECK(strstr(t, "vlmd_requests_total{code=\"200\"} 2\n") != NULL);
    CHECK(strstr(t, "vlmd_requests_total{code=\"429\"} 1\n") != NULL);
    CHECK(strstr(t, "vlmd_queue_depth 2\n") != NULL);
    CHECK(strstr(t, "vlmd_running_sequences 3\n") != NULL);
    CHECK(strstr(t, "vlmd_kv_cache_usage 0.2500\n") != NULL);
    CHECK(strstr(t, "vlmd_generation_tokens_total 20\n") != NULL);
    CHECK(strstr(t, "vlmd_prompt_tokens_total 10\n") != NULL);
    CHECK(strstr(t, "vlmd_generation_tokens_per_second 2.000\n") != NULL); /* 20 tokens / 10 s window */
    CHECK(strstr(t, "vlmd_time_to_first_token_seconds_bucket{le=\"0.025\"} 1\n") != NULL);
    CHECK(strstr(t, "vlmd_time_to_first_token_seconds_bucket{le=\"0.01\"} 0\n") != NULL);
    CHECK(strstr(t, "vlmd_inter_token_latency_seconds_count 1\n") != NULL);
    free(t);
    vlmd_metrics_free(m);
}


/* Splits an SSE buffer into its data payloads; returns the count. */
static int sse_events(const char *buf, char ev[][1024], int max) {
    int n = 0;
    const char *p = buf;
    while (*p && n < max) {
        const char *e = strstr(p, "\n\n");
        if (!e) break;
        CHECK(!strncmp(p, "data: ", 6));
        size_t l = (size_t)(e - p - 6);
        if (l >= 1024) l = 1023;
        memcpy(ev[n], p + 6, l);
        ev[n][l] = 0;
        n++;
        p = e + 2;
    }
    CHECK(*p == 0);
    return n;
}

static void set_text(vlmd_choice *c, const char *t, size_t emit) {
    free(c->text);
    c->text = strdup(t);
    c->len = strlen(t);
    c->emit = emit;
}

static void test_sse_framing(void) {
    vlmd_req *r = vlmd_req_new();
    snprintf(r->id, sizeof r->id, "chatcmpl-1");
    r->p.api = VLMD_API_CHAT;
    r->p.include_usage = true;
    r->n_prompt = 7;
    r->n_ch = 2;
    r->ch = calloc(2, sizeof *r->ch);
    set_text(&r->ch[0], "Hello", 5);
    r->ch[0].n_tokens = 2;
    set_text(&r->ch[1], "Hi", 1); /* 'i' held back (could start a stop string) */
    r->ch[1].n_tokens = 1;
    vlmd_buf out = {0};
    bool role = false;
    CHECK(!vlmd_sse_collect(NULL, "m", r, &role, &out));
    char ev[16][1024];
    int n = sse_events(out.buf, ev, 16);
    CHECK_EQ_INT(n, 4); /* two role chunks, two content chunks */
    cJSON *o = cJSON_Parse(ev[0]);
    const cJSON *ch0 = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0);
    CHECK(!strcmp(cJSON_GetObjectItem(cJSON_GetObjectItem(ch0, "delta"), "role")->valuestring, "assistant"));
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(ch0, "finish_reason")));
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(o, "usage")));
    CHECK(!strcmp(cJSON_GetObjectItem(o, "object")->valuestring, "chat.completion.chunk"));
    cJSON_Delete(o);
    o = cJSON_Parse(ev[3]);
    ch0 = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0);
    CHECK_EQ_INT(cJSON_GetObjectItem(ch0, "index")->valueint, 1);
    CHECK(!strcmp(cJSON_GetObjectItem(cJSON_GetObjectItem(ch0, "delta"), "content")->valuestring, "H"));
    cJSON_Delete(o);

    /* Nothing new: nothing written. */
    out.len = 0;
    CHECK(!vlmd_sse_collect(NULL, "m", r, &role, &out));
    CHECK_EQ_INT(out.len, 0);

    /* Both finish: the rest of the text with the finish reason, usage, [DONE]. */
    r->ch[0].done = true;
    r->ch[0].finish = "length";
    r->ch[1].emit = 2;
    r->ch[1].done = true;
    r->ch[1].finish = "stop";
    r->finished = true;
    out.len = 0;
    CHECK(vlmd_sse_collect(NULL, "m", r, &role, &out));
    n = sse_events(out.buf, ev, 16);
    CHECK_EQ_INT(n, 4);
    o = cJSON_Parse(ev[0]);
    ch0 = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0);
    CHECK(!strcmp(cJSON_GetObjectItem(ch0, "finish_reason")->valuestring, "length"));
    CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(ch0, "delta")) == 0); /* {} */
    cJSON_Delete(o);
    o = cJSON_Parse(ev[1]);
    ch0 = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0);
    CHECK(!strcmp(cJSON_GetObjectItem(cJSON_GetObjectItem(ch0, "delta"), "content")->valuestring, "i"));
    CHECK(!strcmp(cJSON_GetObjectItem(ch0, "finish_reason")->valuestring, "stop"));
    cJSON_Delete(o);
    o = cJSON_Parse(ev[2]);
    CHECK_EQ_INT(cJSON_GetArraySize(cJSON_GetObjectItem(o, "choices")), 0);
    const cJSON *u = cJSON_GetObjectItem(o, "usage");
    CHECK_EQ_INT(cJSON_GetObjectItem(u, "prompt_tokens")->valueint, 7);
    CHECK_EQ_INT(cJSON_GetObjectItem(u, "completion_tokens")->valueint, 3);
    CHECK_EQ_INT(cJSON_GetObjectItem(u, "total_tokens")->valueint, 10);
    cJSON_Delete(o);
    CHECK(!strcmp(ev[3], "[DONE]"));

    /* The non-streaming body of the same request. */
    char *j = vlmd_resp_json(NULL, "m", r);
    o = cJSON_Parse(j);
    CHECK(!strcmp(cJSON_GetObjectItem(o, "object")->valuestring, "chat.completion"));
    const cJSON *chs = cJSON_GetObjectItem(o, "choices");
    CHECK(!strcmp(cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetArrayItem(chs, 1), "message"), "content")->valuestring, "Hi"));
    CHECK(!strcmp(cJSON_GetObjectItem(cJSON_GetArrayItem(chs, 0), "finish_reason")->valuestring, "length"));
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetArrayItem(chs, 0), "logprobs")));
    cJSON_Delete(o);
    free(j);

    /* Completions with echo: the prompt text leads the text. */
    r->p.api = VLMD_API_COMPLETIONS;
    r->p.echo = true;
    r->echo_text = strdup("Say: ");
    j = vlmd_resp_json(NULL, "m", r);
    o = cJSON_Parse(j);
    chs = cJSON_GetObjectItem(o, "choices");
    CHECK(!strcmp(cJSON_GetObjectItem(o, "object")->valuestring, "text_completion"));
    CHECK(!strcmp(cJSON_GetObjectItem(cJSON_GetArrayItem(chs, 0), "text")->valuestring, "Say: Hello"));
    cJSON_Delete(o);
    free(j);
    free(out.buf);
    vlmd_req_release(r);
}

/* The image-embedding cache (server/imgcache.c): hits only on the same pixels and grid, copies the
 * stored floats, evicts least recently used past its byte budget, never stores an entry larger than
 * the budget, and is absent at budget 0. */
static void test_imgcache(void) {
    CHECK(vlmd_imgcache_new(0) == NULL);
    vlmd_imgcache_counts st;
    vlmd_imgcache_stats(NULL, &st);
    CHECK(st.entries == 0 && st.hits == 0);
    enum { NP = 8, PD = 12, NF = 64 };
    float pix[4][NP * PD], emb[4][NF], out[NF];
    vlm_pixels px[4];
    for (int k = 0; k < 4; k++) {
        for (int i = 0; i < NP * PD; i++) pix[k][i] = (float)(i % 7) * 0.25f;
        pix[k][5] += (float)k; /* four different images */
        for (int i = 0; i < NF; i++) emb[k][i] = (float)(k * 1000 + i);
        px[k] = (vlm_pixels){.pixel_values = pix[k], .n_patches = NP, .patch_dim = PD, .grid_thw = {1, 2, 4},
                             .n_tokens = 2};
    }
    vlmd_imgcache *c = vlmd_imgcache_new(2 * NF * (int64_t)sizeof(float)); /* room for two entries */
    CHECK(c != NULL);
    if (!c) return;
    uint64_t key[4];
    for (int k = 0; k < 4; k++) key[k] = vlmd_imgcache_key(c, &px[k]);
    CHECK(key[0] != key[1] && key[0] == vlmd_imgcache_key(c, &px[0]));
    CHECK(!vlmd_imgcache_get(c, key[0], &px[0], out, NF));
    vlmd_imgcache_put(c, key[0], &px[0], emb[0], NF);
    vlmd_imgcache_put(c, key[1], &px[1], emb[1], NF);
    memset(out, 0, sizeof out);
    CHECK(vlmd_imgcache_get(c, key[0], &px[0], out, NF) && !memcmp(out, emb[0], sizeof out)); /* 0 most recent */
    vlmd_imgcache_put(c, key[2], &px[2], emb[2], NF);                                        /* evicts 1 */
    CHECK(!vlmd_imgcache_get(c, key[1], &px[1], out, NF));
    CHECK(vlmd_imgcache_get(c, key[2], &px[2], out, NF) && !memcmp(out, emb[2], sizeof out));
    CHECK(vlmd_imgcache_get(c, key[0], &px[0], out, NF) && !memcmp(out, emb[0], sizeof out));
    /* the same key with another grid is not a hit */
    vlm_pixels other = px[0];
    other.grid_thw[1] = 4;
    other.grid_thw[2] = 2;
    CHECK(!vlmd_imgcache_get(c, key[0], &other, out, NF));
    /* one pixel changed: another key */
    memcpy(pix[3], pix[0], sizeof pix[3]);
    pix[3][NP * PD - 1] += 1e-6f;
    CHECK(vlmd_imgcache_key(c, &px[3]) != key[0]);
    /* larger than the whole budget: not stored, nothing evicted */
    float big[3 * NF] = {0};
    vlmd_imgcache_put(c, key[3], &px[3], big, 3 * NF);
    vlmd_imgcache_stats(c, &st);
    CHECK(st.entries == 2 && st.bytes == 2 * NF * (int64_t)sizeof(float));
    CHECK_EQ_INT(st.hits, 3);
    CHECK_EQ_INT(st.misses, 3);
    vlmd_imgcache_free(c);
}

int main(void) {
    RUN(test_error_table);
    RUN(test_stop_scan);
    RUN(test_utf8);
    RUN(test_params);
    RUN(test_config);
    RUN(test_metrics);
    RUN(test_sse_framing);
    RUN(test_imgcache);
    TEST_MAIN_END("server");
}
