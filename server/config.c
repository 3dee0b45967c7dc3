/* config.c — `vlmd serve` settings: one table gives each setting its flag (--max-queue), its JSON
 * config key (max_queue), its type, default and help line, so --help, --config FILE.json and the
 * startup log can never disagree. Order of precedence: defaults < --config file < flags; the API
 * key may also come from the environment (VLMD_API_KEY) when neither sets it. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "server/serve.h"

typedef enum { T_STR, T_INT, T_BYTES, T_SECONDS, T_BOOL } ctype_t;

typedef struct {
    const char *name;   /* flag without "--"; JSON key is the same with '_' */
    ctype_t type;
    size_t off;
    size_t size;        /* T_STR buffer size */
    double lo, hi;      /* numeric range */
    const char *help;
} opt_t;

#define O(f) offsetof(vlmd_serve_cfg, f)
#define S(f) sizeof(((vlmd_serve_cfg *)0)->f)
static const opt_t OPTS[] = {
    {"model", T_STR, O(model), S(model), 0, 0,
     "model directory (config.json, safetensors, tokenizer.json); default configs/models/vlmd-demo "
     "next to the binary's repository, then /usr/share/vlmd/models/vlmd-demo"},
    {"model-name", T_STR, O(model_name), S(model_name), 0, 0,
     "model id reported by /v1/models and accepted in requests (default: directory name)"},
    {"host", T_STR, O(host), S(host), 0, 0, "address to listen on (default 127.0.0.1)"},
    {"port", T_INT, O(port), 0, 0, 65535, "TCP port (default 8000; 0 picks a free one and logs it)"},
    {"api-key", T_STR, O(api_key), S(api_key), 0, 0,
     "require 'Authorization: Bearer KEY' on /v1/* (or set VLMD_API_KEY)"},
    {"threads", T_INT, O(threads), 0, 0, 1024, "compute threads (0 = all cores)"},
    {"kv-memory", T_BYTES, O(kv_memory), 0, 0, 1e15,
     "KV cache pool reserved at startup, e.g. 2G, 512M (0 = sized from the model)"},
    {"max-seqs", T_INT, O(max_seqs), 0, 1, 4096, "most sequences decoding at once (default 16)"},
    {"max-batch-tokens", T_INT, O(max_batch_tokens), 0, 16, 1 << 20,
     "tokens per engine step: decode tokens + one prefill chunk (default 512)"},
    {"max-queue", T_INT, O(max_queue), 0, 0, 1 << 20,
     "requests waiting for a slot before 429 (default 64)"},
    {"max-body-bytes", T_BYTES, O(max_body_bytes), 0, 1024, 1e12,
     "largest request body; 413 beyond (default 16M)"},
    {"max-images", T_INT, O(max_images), 0, 0, 4096, "images per request (default 16)"},
    {"max-image-pixels", T_BYTES, O(max_image_pixels), 0, 1, 1e12,
     "pixels per uploaded image (width*height from its header, checked before decoding; default 64M)"},
    {"max-image-bytes", T_BYTES, O(max_image_bytes), 0, 1, 1e12,
     "encoded bytes per image (default 16M)"},
    {"max-tokens-default", T_INT, O(max_tokens_default), 0, 1, 1 << 30,
     "max_tokens when a request gives none (default 256, capped by the context)"},
    {"max-tokens-limit", T_INT, O(max_tokens_limit), 0, 1, 1 << 30,
     "largest max_tokens accepted (default 8192)"},
    {"max-n", T_INT, O(max_n), 0, 1, 128, "largest n (choices per request, default 8)"},
    {"request-timeout", T_SECONDS, O(request_timeout), 0, 0, 1e9,
     "seconds from arrival to the end of generation (0 = none; default 600)"},
    {"drain-timeout", T_SECONDS, O(drain_timeout), 0, 0, 1e9,
     "on SIGTERM, seconds to let running requests finish before cancelling (default 30)"},
    {"drain-delay", T_SECONDS, O(drain_delay), 0, 0, 1e6,
     "on SIGTERM, seconds /ready answers 503 while requests are still served (so load balancers "
     "stop routing here), then the listening socket closes (new connections are refused) before "
     "the drain; 0 = keep listening and answer 503 (default 0)"},
    {"read-timeout", T_SECONDS, O(read_timeout), 0, 0.1, 1e9,
     "seconds to receive a whole request body; 408 beyond (default 30)"},
    {"idle-timeout", T_SECONDS, O(idle_timeout), 0, 1, 1e9,
     "close a connection idle this long (default 60)"},
    {"ping-interval", T_SECONDS, O(ping_interval), 0, 0.05, 1e9,
     "SSE ': ping' comment after this long without tokens (default 10)"},
    {"max-connections", T_INT, O(max_connections), 0, 1, 1 << 20,
     "open connections at most, one thread each (default 256)"},
    {"allow-remote-media", T_BOOL, O(allow_remote_media), 0, 0, 0,
     "fetch http(s):// image URLs with libcurl (size and time limits)"},
    {"allow-private-media", T_BOOL, O(allow_private_media), 0, 0, 0,
     "let remote image URLs resolve to private, loopback or link-local addresses"},
    {"media-timeout", T_SECONDS, O(media_timeout), 0, 0.1, 1e6,
     "seconds per remote image fetch (default 10)"},
    {"no-prefix-cache", T_BOOL, O(no_prefix_cache), 0, 0, 0,
     "recompute every prompt in full; by default KV pages of earlier prompts are reused for a prompt that "
     "starts with the same tokens and images (usage.prompt_tokens_details.cached_tokens counts them)"},
    {"image-cache-memory", T_BYTES, O(image_cache_memory), 0, 0, 1e15,
     "image embeddings kept across requests, so a picture sent again (every turn of a chat about it) "
     "skips the vision encoder; 0 = off (default 256M)"},
    {"tp", T_INT, O(tp), 0, 1, VLM_MAX_TP,
     "tensor-parallel ranks: the decoder is sharded over N CPU rank threads or N GPUs (default 1)"},
    {"backend", T_STR, O(backend), S(backend), 0, 0, "compute backend: cpu (default) or cuda (make CUDA=1)"},
    {"gpus", T_STR, O(gpus), S(gpus), 0, 0, "CUDA devices, one per rank, e.g. 0,1 (default 0..tp-1)"},
    {"config", T_STR, O(config), S(config), 0, 0,
     "JSON file of settings, keys as flags with '_' (\"max_queue\": 32); flags win"},
};
#define N_OPTS (sizeof OPTS / sizeof OPTS[0])

void vlmd_cfg_defaults(vlmd_serve_cfg *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->host, sizeof c->host, "127.0.0.1");
    c->port = 8000;
    c->max_seqs = 16;
    c->max_batch_tokens = 512;
    c->image_cache_memory = 256 << 20;
    c->max_queue = 64;
    c->max_body_bytes = 16 << 20;
    c->max_images = 16;
    c->max_image_pixels = 64 << 20;
    c->max_image_bytes = 16 << 20;
    c->max_tokens_default = 256;
    c->max_tokens_limit = 8192;
    c->max_n = 8;
    c->request_timeout = 600;
    c->drain_timeout = 30;
    c->drain_delay = 0;
    c->read_timeout = 30;
    c->idle_timeout = 60;
    c->ping_interval = 10;
    c->max_connections = 256;
    c->media_timeout = 10;
    c->tp = 1;
    snprintf(c->backend, sizeof c->backend, "cpu");
}

int vlmd_parallel_opts(int tp, const char *backend, const char *gpus, vlm_engine_opts *eo, char *err,
                       size_t errlen) {
    eo->tp = tp > 0 ? tp : 1;
    if (!backend || !*backend || !strcmp(backend, "cpu")) eo->backend = VLM_BACKEND_CPU;
    else if (!strcmp(backend, "cuda")) eo->backend = VLM_BACKEND_CUDA;
    else return snprintf(err, errlen, "backend: '%s' is not cpu or cuda", backend), -1;
    eo->n_gpus = 0;
    if (!gpus || !*gpus) return 0;
    if (eo->backend != VLM_BACKEND_CUDA) return snprintf(err, errlen, "--gpus needs --backend cuda"), -1;
    for (const char *p = gpus; *p;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 1023 || (*end && *end != ','))
            return snprintf(err, errlen, "gpus: bad device list '%s' (want e.g. 0,1,2,3)", gpus), -1;
        if (eo->n_gpus == VLM_MAX_TP) return snprintf(err, errlen, "gpus: more than %d devices", VLM_MAX_TP), -1;
        eo->gpus[eo->n_gpus++] = (int)v;
        p = *end ? end + 1 : end;
    }
    if (eo->n_gpus != eo->tp)
        return snprintf(err, errlen, "--gpus lists %d devices but --tp is %d", eo->n_gpus, eo->tp), -1;
    return 0;
}

static const opt_t *find_opt(const char *name, bool json) {
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *a = OPTS[i].name, *b = name;
        while (*a && *b && (*a == *b || (json && *a == '-' && *b == '_'))) a++, b++;
        if (!*a && !*b) return &OPTS[i];
    }
    return NULL;
}

/* "512M", "2G", "1.5g", "4096" -> bytes (binary multiples). */
static int parse_bytes(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || !isfinite(v)) return -1;
    double mul = 1;
    switch (tolower((unsigned char)*end)) {
    case 'k': mul = 1024.0; end++; break;
    case 'm': mul = 1024.0 * 1024; end++; break;
    case 'g': mul = 1024.0 * 1024 * 1024; end++; break;
    case 't': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (tolower((unsigned char)*end) == 'i') end++;
    if (tolower((unsigned char)*end) == 'b') end++;
    if (*end) return -1;
    *out = v * mul;
    return 0;
}

static int set_value(vlmd_serve_cfg *c, const opt_t *o, const char *sval, double nval, bool have_num,
                     char *err, size_t errlen) {
    char *p = (char *)c + o->off;
    double v = nval;
    if (o->type == T_STR) {
        if (!sval) return snprintf(err, errlen, "%s: expected a string", o->name), -1;
        if (strlen(sval) >= o->size) return snprintf(err, errlen, "%s: value too long", o->name), -1;
        snprintf(p, o->size, "%s", sval);
        return 0;
    }
    if (o->type == T_BOOL) {
        bool b;
        if (sval) {
            if (!strcmp(sval, "true") || !strcmp(sval, "1") || !strcmp(sval, "yes")) b = true;
            else if (!strcmp(sval, "false") || !strcmp(sval, "0") || !strcmp(sval, "no")) b = false;
            else return snprintf(err, errlen, "%s: expected true or false", o->name), -1;
        } else {
            b = have_num && nval != 0;
        }
        *(bool *)p = b;
        return 0;
    }
    if (!have_num) {
        if (!sval) return snprintf(err, errlen, "%s: expected a number", o->name), -1;
        if (o->type == T_BYTES) {
            if (parse_bytes(sval, &v)) return snprintf(err, errlen, "%s: bad size '%s'", o->name, sval), -1;
        } else {
            char *end;
            errno = 0;
            v = strtod(sval, &end);
            if (end == sval || *end || errno || !isfinite(v))
                return snprintf(err, errlen, "%s: bad number '%s'", o->name, sval), -1;
        }
    }
    if (!(v >= o->lo && v <= o->hi))
        return snprintf(err, errlen, "%s: %g is outside [%g, %g]", o->name, v, o->lo, o->hi), -1;
    if (o->type == T_INT) {
        if (v != floor(v)) return snprintf(err, errlen, "%s: expected an integer", o->name), -1;
        *(int *)p = (int)v;
    } else if (o->type == T_BYTES) {
        *(int64_t *)p = (int64_t)v;
    } else {
        *(double *)p = v;
    }
    return 0;
}

int vlmd_cfg_apply_json(vlmd_serve_cfg *c, const cJSON *obj, char *err, size_t errlen) {
    if (!cJSON_IsObject(obj)) return snprintf(err, errlen, "config: expected a JSON object"), -1;
    for (const cJSON *it = obj->child; it; it = it->next) {
        const opt_t *o = find_opt(it->string, true);
        if (!o || !strcmp(o->name, "config"))
            return snprintf(err, errlen, "config: unknown key '%s'", it->string), -1;
        int rc;
        if (cJSON_IsString(it)) rc = set_value(c, o, it->valuestring, 0, false, err, errlen);
        else if (cJSON_IsNumber(it)) rc = set_value(c, o, NULL, it->valuedouble, true, err, errlen);
        else if (cJSON_IsBool(it)) rc = set_value(c, o, NULL, cJSON_IsTrue(it) ? 1 : 0, true, err, errlen);
        else {
            snprintf(err, errlen, "config: '%s' has an unsupported type", it->string);
            rc = -1;
        }
        if (rc) return -1;
    }
    return 0;
}

static int load_config_file(vlmd_serve_cfg *c, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) return snprintf(err, errlen, "--config %s: %s", path, strerror(errno)), -1;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n + 4096 > cap) {
            cap = cap ? cap * 2 : 8192;
            char *nb = realloc(buf, cap);
            if (!nb) break;
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (!got) break;
    }
    fclose(f);
    if (!buf) return snprintf(err, errlen, "--config %s: out of memory", path), -1;
    buf[n] = 0;
    cJSON *j = cJSON_ParseWithLength(buf, n);
    free(buf);
    if (!j) return snprintf(err, errlen, "--config %s: invalid JSON", path), -1;
    char e2[256];
    int rc = vlmd_cfg_apply_json(c, j, e2, sizeof e2);
    cJSON_Delete(j);
    if (rc) snprintf(err, errlen, "--config %s: %s", path, e2);
    return rc;
}

int vlmd_cfg_parse(vlmd_serve_cfg *c, int argc, char **argv, char *err, size_t errlen) {
    /* Pass 1: --help and --config (so the file applies before every flag). */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return 1;
        const char *cf = NULL;
        if (!strcmp(argv[i], "--config") && i + 1 < argc) cf = argv[i + 1];
        else if (!strncmp(argv[i], "--config=", 9)) cf = argv[i] + 9;
        if (cf) {
            if (load_config_file(c, cf, err, errlen)) return -1;
            snprintf(c->config, sizeof c->config, "%s", cf);
        }
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2)) return snprintf(err, errlen, "unexpected argument '%s'", a), -1;
        char name[64];
        const char *eq = strchr(a, '=');
        size_t nl = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
        if (nl >= sizeof name) return snprintf(err, errlen, "unknown flag '%s'", a), -1;
        memcpy(name, a + 2, nl);
        name[nl] = 0;
        const opt_t *o = find_opt(name, false);
        bool neg = false;
        if (!o && !strncmp(name, "no-", 3)) {
            o = find_opt(name + 3, false);
            neg = o && o->type == T_BOOL;
            if (!neg) o = NULL;
        }
        if (!o) return snprintf(err, errlen, "unknown flag '--%s' (see vlmd serve --help)", name), -1;
        const char *val = eq ? eq + 1 : NULL;
        if (o->type == T_BOOL && !val) {
            *(bool *)((char *)c + o->off) = !neg;
            continue;
        }
        if (!val) {
            if (i + 1 >= argc) return snprintf(err, errlen, "--%s needs a value", name), -1;
            val = argv[++i];
        }
        if (!strcmp(o->name, "config")) continue; /* applied in pass 1 */
        if (set_value(c, o, val, 0, false, err, errlen)) return -1;
    }
    if (!c->api_key[0]) {
        const char *env = getenv("VLMD_API_KEY");
        if (env && env[0]) snprintf(c->api_key, sizeof c->api_key, "%s", env);
    }
    if (c->max_tokens_default > c->max_tokens_limit) c->max_tokens_default = c->max_tokens_limit;
    vlm_engine_opts eo;
    if (vlmd_parallel_opts(c->tp, c->backend, c->gpus, &eo, err, errlen)) return -1;
    return 0;
}

void vlmd_cfg_help(FILE *f) {
    fprintf(f, "usage: vlmd serve [--model DIR] [flags]\n\n"
               "OpenAI-compatible HTTP server: POST /v1/chat/completions, POST /v1/completions,\n"
               "GET /v1/models, /health, /ready, /metrics. Every flag is also a key of the JSON\n"
               "--config file (dashes become underscores). SIGTERM drains and exits 0.\n\n");
    for (size_t i = 0; i < N_OPTS; i++) {
        const opt_t *o = &OPTS[i];
        const char *arg = o->type == T_STR ? " S" : o->type == T_INT ? " N" : o->type == T_BYTES ? " SIZE"
                        : o->type == T_SECONDS ? " SEC" : "";
        char left[64];
        snprintf(left, sizeof left, "--%s%s", o->name, arg);
        fprintf(f, "  %-26s %s\n", left, o->help);
    }
}

void vlmd_cfg_log(const vlmd_serve_cfg *c, FILE *f) {
    fprintf(f, "event=config");
    for (size_t i = 0; i < N_OPTS; i++) {
        const opt_t *o = &OPTS[i];
        const char *p = (const char *)c + o->off;
        switch (o->type) {
        case T_STR:
            if (!strcmp(o->name, "api-key")) fprintf(f, " %s=%s", o->name, p[0] ? "<set>" : "<none>");
            else fprintf(f, " %s=\"%s\"", o->name, p);
            break;
        case T_INT: fprintf(f, " %s=%d", o->name, *(const int *)p); break;
        case T_BYTES: fprintf(f, " %s=%lld", o->name, (long long)*(const int64_t *)p); break;
        case T_SECONDS: fprintf(f, " %s=%g", o->name, *(const double *)p); break;
        case T_BOOL: fprintf(f, " %s=%s", o->name, *(const bool *)p ? "true" : "false"); break;
        }
    }
    fprintf(f, "\n");
}
