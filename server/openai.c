/* openai.c — the OpenAI request schema: validates every field of a /v1/chat/completions or
 * /v1/completions body into vlmd_params (types, ranges, combinations), naming the offending
 * parameter on failure. Unknown fields are ignored (SDKs add new ones), but a known field with a
 * bad value is always a 400. Response bodies and SSE chunks are built in openai_out.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/serve.h"

bool vlmd_utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int len;
        unsigned cp;
        if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
        else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
        else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
        else return false;
        if (i + (size_t)len > n) return false;
        for (int k = 1; k < len; k++) {
            if ((p[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += (size_t)len;
    }
    return true;
}

#define FAIL(kind, par, ...)                                                                   \
    do {                                                                                       \
        snprintf(err, errlen, __VA_ARGS__);                                                    \
        snprintf(param, paramlen, "%s", par);                                                  \
        return (int)(kind) + 1;                                                                \
    } while (0)

/* Optional number field: absent/null -> *present = false. */
static int get_num(const cJSON *body, const char *key, double lo, double hi, bool integer,
                   double *out, bool *present, char *err, size_t errlen, char *param,
                   size_t paramlen) {
    *present = false;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(body, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v)) FAIL(VLMD_ERR_INVALID, key, "'%s' must be a number", key);
    double d = v->valuedouble;
    if (!isfinite(d)) FAIL(VLMD_ERR_INVALID, key, "'%s' must be finite", key);
    if (integer && d != floor(d)) FAIL(VLMD_ERR_INVALID, key, "'%s' must be an integer", key);
    if (d < lo || d > hi) FAIL(VLMD_ERR_INVALID, key, "'%s' must be between %g and %g, got %g", key, lo, hi, d);
    *out = d;
    *present = true;
    return 0;
}

static int get_bool(const cJSON *body, const char *key, bool *out, char *err, size_t errlen,
                    char *param, size_t paramlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(body, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsBool(v)) FAIL(VLMD_ERR_INVALID, key, "'%s' must be a boolean", key);
    *out = cJSON_IsTrue(v);
    return 0;
}

void vlmd_params_free(vlmd_params *p) {
    for (int i = 0; i < p->n_stops; i++) free(p->stops[i]);
    free(p->suffix);
    memset(p, 0, sizeof *p);
}

static int parse_stop(const cJSON *body, vlmd_params *p, char *err, size_t errlen, char *param,
                      size_t paramlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(body, "stop");
    if (!v || cJSON_IsNull(v)) return 0;
    const cJSON *one = cJSON_IsString(v) ? v : NULL;
    if (!one && !cJSON_IsArray(v)) FAIL(VLMD_ERR_INVALID, "stop", "'stop' must be a string or an array of strings");
    if (!one && cJSON_GetArraySize(v) > VLMD_MAX_STOPS)
        FAIL(VLMD_ERR_INVALID, "stop", "'stop' has more than %d strings", VLMD_MAX_STOPS);
    for (const cJSON *s = one ? one : v->child; s; s = one ? NULL : s->next) {
        if (!cJSON_IsString(s)) FAIL(VLMD_ERR_INVALID, "stop", "'stop' must be a string or an array of strings");
        size_t l = strlen(s->valuestring);
        if (l == 0) FAIL(VLMD_ERR_INVALID, "stop", "stop strings must not be empty");
        if (l > VLMD_MAX_STOP_LEN) FAIL(VLMD_ERR_INVALID, "stop", "stop strings are at most %d bytes", VLMD_MAX_STOP_LEN);
        p->stops[p->n_stops] = strdup(s->valuestring);
        if (!p->stops[p->n_stops]) FAIL(VLMD_ERR_INTERNAL, "stop", "out of memory");
        p->n_stops++;
    }
    return 0;
}

int vlmd_params_parse(vlmd_api api, const cJSON *body, const vlm_sampling *defaults,
                      const vlmd_serve_cfg *cfg, vlmd_params *p, char *err, size_t errlen,
                      char *param, size_t paramlen) {
    memset(p, 0, sizeof *p);
    p->api = api;
    p->sampling = *defaults;
    p->n = 1;
    p->max_tokens = -1;
    int rc;
    double d;
    bool has;
    if (!cJSON_IsObject(body)) FAIL(VLMD_ERR_INVALID, "", "the request body must be a JSON object");

    if (api == VLMD_API_CHAT) {
        p->messages = cJSON_GetObjectItemCaseSensitive(body, "messages");
        if (!p->messages) FAIL(VLMD_ERR_INVALID, "messages", "'messages' is required");
        if (!cJSON_IsArray(p->messages)) FAIL(VLMD_ERR_INVALID, "messages", "'messages' must be an array");
    } else {
        p->prompt = cJSON_GetObjectItemCaseSensitive(body, "prompt");
        if (!p->prompt) FAIL(VLMD_ERR_INVALID, "prompt", "'prompt' is required");
        if (!cJSON_IsString(p->prompt) && !cJSON_IsArray(p->prompt))
            FAIL(VLMD_ERR_INVALID, "prompt", "'prompt' must be a string or an array of token ids");
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(body, "model");
    if (model && !cJSON_IsNull(model) && !cJSON_IsString(model))
        FAIL(VLMD_ERR_INVALID, "model", "'model' must be a string");

    /* max_completion_tokens is the newer name; both accepted, the newer wins. */
    const char *mt_keys[2] = {"max_tokens", "max_completion_tokens"};
    for (int k = 0; k < 2; k++) {
        if ((rc = get_num(body, mt_keys[k], -1e300, 1e300, true, &d, &has, err, errlen, param, paramlen))) return rc;
        if (!has) continue;
        if (d < 1) FAIL(VLMD_ERR_INVALID, mt_keys[k], "'%s' must be at least 1, got %g", mt_keys[k], d);
        if (d > cfg->max_tokens_limit)
            FAIL(VLMD_ERR_INVALID, mt_keys[k], "'%s' is %g, over this server's limit of %d", mt_keys[k], d,
                 cfg->max_tokens_limit);
        p->max_tokens = (int)d;
    }
    if ((rc = get_num(body, "n", 1, cfg->max_n, true, &d, &has, err, errlen, param, paramlen))) return rc;
    if (has) p->n = (int)d;
    if ((rc = get_num(body, "temperature", 0, 2, false, &d, &has, err, errlen, param, paramlen))) return rc;
    if (has) p->sampling.temperature = (float)d;
    if ((rc = get_num(body, "top_p", 0, 1, false, &d, &has, err, errlen, param, paramlen))) return rc;
    if (has) {
        if (d <= 0) FAIL(VLMD_ERR_INVALID, "top_p", "'top_p' must be greater than 0");
        p->sampling.top_p = (float)d;
    }
    if ((rc = get_num(body, "top_k", -1, 1 << 20, true, &d, &has, err, errlen, param, paramlen))) return rc;
    if (has) p->sampling.top_k = d < 0 ? 0 : (int)d; /* -1 = off, as vLLM */
    if ((rc = get_num(body, "min_p", 0, 1, false, &d, &has, err, errlen, param, paramlen))) return rc;
    if (has) p->sampling.min_p = (float)d;
    if ((rc = get_num(body, "presence_penalty", -2, 2, false, &d, &has, err, errlen, param, paramlen))) return rc;
    if (has) p->sampling.presence_penalty = (float)d;
    if ((rc = get_num(body, "frequency_penalty", -2, 2, false, &d, &has, err, errlen, param, paramlen))) return rc;
    if (has) p->sampling.frequency_penalty = (float)d;
    if ((rc = get_num(body, "repetition_penalty", 0, 10, false, &d, &has, err, errlen, param, paramlen))) return rc;
    if (has) {
        if (d <= 0) FAIL(VLMD_ERR_INVALID, "repetition_penalty", "'repetition_penalty' must be greater than 0");
        p->sampling.repetition_penalty = (float)d;
    }
    /* Seeds: any integer that fits int64 (OpenAI accepts negatives); used modulo 2^64. */
    if ((rc = get_num(body, "seed", -9.2e18, 1.8e19, true, &d, &has, err, errlen, param, paramlen))) return rc;
    if (has) {
        p->seed_given = true;
        p->sampling.seed = d < 0 ? (uint64_t)(int64_t)d : (uint64_t)d;
    }
    if ((rc = get_bool(body, "stream", &p->stream, err, errlen, param, paramlen))) return rc;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(body, "stream_options");
    if (so && !cJSON_IsNull(so)) {
        if (!cJSON_IsObject(so)) FAIL(VLMD_ERR_INVALID, "stream_options", "'stream_options' must be an object");
        if (!p->stream) FAIL(VLMD_ERR_INVALID, "stream_options", "'stream_options' is only allowed with 'stream': true");
        const cJSON *iu = cJSON_GetObjectItemCaseSensitive(so, "include_usage");
        if (iu && !cJSON_IsNull(iu) && !cJSON_IsBool(iu))
            FAIL(VLMD_ERR_INVALID, "stream_options.include_usage", "'include_usage' must be a boolean");
        p->include_usage = cJSON_IsTrue(iu);
    }
    if ((rc = parse_stop(body, p, err, errlen, param, paramlen))) return rc;
    const cJSON *user = cJSON_GetObjectItemCaseSensitive(body, "user");
    if (user && !cJSON_IsNull(user) && !cJSON_IsString(user)) FAIL(VLMD_ERR_INVALID, "user", "'user' must be a string");
    if ((rc = get_bool(body, "ignore_eos", &p->ignore_eos, err, errlen, param, paramlen))) return rc;

    const cJSON *lp = cJSON_GetObjectItemCaseSensitive(body, "logprobs");
    if (api == VLMD_API_CHAT) {
        if ((rc = get_bool(body, "logprobs", &p->logprobs, err, errlen, param, paramlen))) return rc;
        if ((rc = get_num(body, "top_logprobs", 0, VLM_MAX_TOP_LOGPROBS, true, &d, &has, err, errlen, param, paramlen)))
            return rc;
        if (has) {
            if (!p->logprobs) FAIL(VLMD_ERR_INVALID, "top_logprobs", "'top_logprobs' requires 'logprobs': true");
            p->top_logprobs = (int)d;
        }
        const cJSON *tools = cJSON_GetObjectItemCaseSensitive(body, "tools");
        if (cJSON_IsArray(tools) && cJSON_GetArraySize(tools) > 0)
            FAIL(VLMD_ERR_UNSUPPORTED, "tools", "tool calling is not supported by this server");
    } else {
        /* Legacy completions: logprobs is an integer 0..5 (we allow up to 20) = top alternatives. */
        if (lp && !cJSON_IsNull(lp)) {
            if (cJSON_IsBool(lp)) FAIL(VLMD_ERR_INVALID, "logprobs", "'logprobs' must be an integer for /v1/completions");
            if ((rc = get_num(body, "logprobs", 0, VLM_MAX_TOP_LOGPROBS, true, &d, &has, err, errlen, param, paramlen)))
                return rc;
            p->logprobs = true;
            p->top_logprobs = (int)d;
        }
        if ((rc = get_bool(body, "echo", &p->echo, err, errlen, param, paramlen))) return rc;
        if (p->echo && p->logprobs)
            FAIL(VLMD_ERR_UNSUPPORTED, "echo", "'echo' together with 'logprobs' (prompt logprobs) is not supported");
        const cJSON *sfx = cJSON_GetObjectItemCaseSensitive(body, "suffix");
        if (sfx && !cJSON_IsNull(sfx)) {
            if (!cJSON_IsString(sfx)) FAIL(VLMD_ERR_INVALID, "suffix", "'suffix' must be a string");
            p->suffix = strdup(sfx->valuestring);
        }
        const cJSON *bo = cJSON_GetObjectItemCaseSensitive(body, "best_of");
        if (bo && !cJSON_IsNull(bo) && !(cJSON_IsNumber(bo) && bo->valuedouble == p->n))
            FAIL(VLMD_ERR_UNSUPPORTED, "best_of", "'best_of' other than n is not supported");
    }
    p->sampling.logprobs = p->logprobs;
    p->sampling.top_logprobs = p->top_logprobs;
    return 0;
}
