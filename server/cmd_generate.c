/* cmd_generate.c — `vlmd generate`: one generation from the command line, through the same
 * prompt pipeline (server/prompt.c) and engine (runtime/) as the server, with a scheduler of one.
 * Used by people trying a model and by the fidelity tests (--json, --dump-logits). */
#include <cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/prompt.h"
#include "server/serve.h"
#include "server/server.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: vlmd generate --model DIR (--prompt TEXT [--image FILE]... | --messages FILE.json)\n"
            "                     [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--min-p P]\n"
            "                     [--repetition-penalty R] [--seed S] [--greedy] [--ignore-eos]\n"
            "                     [--threads N] [--json] [--dump-logits FILE.npy]\n"
            "                     [--tp N] [--backend cpu|cuda] [--gpus 0,1,...]\n"
            "\n"
            "  --prompt TEXT        user message text; each --image FILE is put before it\n"
            "  --messages FILE      an OpenAI-style messages array (or {\"messages\": [...]}) in JSON;\n"
            "                       image_url parts may be local paths, file:// or data: URLs\n"
            "  --max-tokens N       new tokens at most (default 256)\n"
            "  sampling             defaults come from the model's generation_config.json, as with\n"
            "                       transformers' generate(); flags override single fields\n"
            "  --greedy             plain argmax: no penalties, no temperature, no filters\n"
            "  --ignore-eos         keep generating past end-of-sequence tokens\n"
            "  --json               print {\"prompt_tokens\", \"token_ids\", \"text\", \"finish_reason\"}\n"
            "  --dump-logits FILE   write the float32 logits of every generated step, [steps, vocab], .npy\n"
            "  --threads N          compute threads (default: all cores)\n"
            "  --tp N               tensor-parallel ranks (CPU rank threads or GPUs; default 1)\n"
            "  --backend B          cpu (default) or cuda (needs a make CUDA=1 build and a GPU)\n"
            "  --gpus LIST          CUDA device per rank, e.g. 0,1 (default 0..tp-1)\n");
}

static char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += got;
        if (cap - len < 2) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) free(buf);
            buf = nb;
        }
    }
    fclose(f);
    if (buf) buf[len] = 0;
    *n = len;
    return buf;
}

static const char *finish_name(vlm_finish f) {
    switch (f) {
    case VLM_FINISH_STOP: return "stop";
    case VLM_FINISH_LENGTH: return "length";
    case VLM_FINISH_CANCELLED: return "cancelled";
    case VLM_FINISH_ERROR: return "error";
    default: return "none";
    }
}

enum {
    OPT_MODEL = 1000, OPT_PROMPT, OPT_IMAGE, OPT_MESSAGES, OPT_MAXTOK, OPT_TEMP, OPT_TOPP, OPT_TOPK,
    OPT_MINP, OPT_REP, OPT_SEED, OPT_GREEDY, OPT_IGNORE_EOS, OPT_THREADS, OPT_JSON, OPT_DUMP, OPT_HELP,
    OPT_TP, OPT_BACKEND, OPT_GPUS
};

static bool parse_num(const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) return false;
    *out = v;
    return true;
}

int vlmd_cmd_generate(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, OPT_MODEL},
        {"prompt", required_argument, 0, OPT_PROMPT},
        {"image", required_argument, 0, OPT_IMAGE},
        {"messages", required_argument, 0, OPT_MESSAGES},
        {"max-tokens", required_argument, 0, OPT_MAXTOK},
        {"temperature", required_argument, 0, OPT_TEMP},
        {"top-p", required_argument, 0, OPT_TOPP},
        {"top-k", required_argument, 0, OPT_TOPK},
        {"min-p", required_argument, 0, OPT_MINP},
        {"repetition-penalty", required_argument, 0, OPT_REP},
        {"seed", required_argument, 0, OPT_SEED},
        {"greedy", no_argument, 0, OPT_GREEDY},
        {"ignore-eos", no_argument, 0, OPT_IGNORE_EOS},
        {"threads", required_argument, 0, OPT_THREADS},
        {"json", no_argument, 0, OPT_JSON},
        {"dump-logits", required_argument, 0, OPT_DUMP},
        {"help", no_argument, 0, OPT_HELP},
        {"tp", required_argument, 0, OPT_TP},
        {"backend", required_argument, 0, OPT_BACKEND},
        {"gpus", required_argument, 0, OPT_GPUS},
        {0, 0, 0, 0},
    };
    const char *model_dir = NULL, *prompt = NULL, *messages_path = NULL, *dump = NULL;
    const char *images[64];
    int n_images = 0, threads = 0, max_tokens = 256, tp = 1;
    const char *backend = "cpu", *gpus = NULL;
    bool greedy = false, ignore_eos = false, json = false;
    /* Overrides: NaN means "not given". */
    double temp = NAN, top_p = NAN, top_k = NAN, min_p = NAN, rep = NAN, seed = NAN;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        double v;
        switch (c) {
        case OPT_MODEL: model_dir = optarg; break;
        case OPT_PROMPT: prompt = optarg; break;
        case OPT_IMAGE:
            if (n_images == (int)(sizeof images / sizeof *images)) {
                fprintf(stderr, "vlmd generate: too many --image flags\n");
                return 2;
            }
            images[n_images++] = optarg;
            break;
        case OPT_MESSAGES: messages_path = optarg; break;
        case OPT_MAXTOK:
            if (!parse_num(optarg, 0, 1 << 30, &v)) goto bad_value;
            max_tokens = (int)v;
            break;
        case OPT_TEMP: if (!parse_num(optarg, 0, 100, &temp)) goto bad_value; break;
        case OPT_TOPP: if (!parse_num(optarg, 0, 1, &top_p)) goto bad_value; break;
        case OPT_TOPK: if (!parse_num(optarg, 0, 1e9, &top_k)) goto bad_value; break;
        case OPT_MINP: if (!parse_num(optarg, 0, 1, &min_p)) goto bad_value; break;
        case OPT_REP: if (!parse_num(optarg, 1e-3, 100, &rep)) goto bad_value; break;
        case OPT_SEED: if (!parse_num(optarg, 0, 1.8e19, &seed)) goto bad_value; break;
        case OPT_GREEDY: greedy = true; break;
        case OPT_IGNORE_EOS: ignore_eos = true; break;
        case OPT_THREADS:
            if (!parse_num(optarg, 0, 4096, &v)) goto bad_value;
            threads = (int)v;
            break;
        case OPT_JSON: json = true; break;
        case OPT_DUMP: dump = optarg; break;
        case OPT_HELP: usage(stdout); return 0;
        case OPT_TP:
            if (!parse_num(optarg, 1, VLM_MAX_TP, &v) || v != floor(v)) goto bad_value;
            tp = (int)v;
            break;
        case OPT_BACKEND: backend = optarg; break;
        case OPT_GPUS: gpus = optarg; break;
        default: usage(stderr); return 2;
        }
        continue;
    bad_value:
        fprintf(stderr, "vlmd generate: bad value '%s' for --%s\n", optarg, opts[c - OPT_MODEL].name);
        return 2;
    }
    if (!model_dir || (!prompt && !messages_path) || (prompt && messages_path) ||
        (messages_path && n_images)) {
        usage(stderr);
        return 2;
    }

    char err[1024], param[256] = "";
    int rc = 1;
    vlmd_bundle *b = NULL;
    vlm_engine *e = NULL;
    cJSON *root = NULL;
    float *logits_all = NULL;
    int32_t *out_ids = NULL;
    vlmd_prompt p = {0};

    /* --tp/--backend/--gpus are checked before the model is loaded */
    vlm_engine_opts peo = {0};
    if (vlmd_parallel_opts(tp, backend, gpus, &peo, err, sizeof err) ||
        vlm_backend_available(peo.backend, err, sizeof err) != VLM_OK) {
        fprintf(stderr, "vlmd generate: %s\n", err);
        return 1;
    }
    vlm_status st = vlmd_bundle_load(model_dir, threads, &b, err, sizeof err);
    if (st == VLM_OK) st = vlmd_bundle_vision_tp(b, tp, err, sizeof err);
    if (st != VLM_OK) {
        vlmd_bundle_free(b);
        fprintf(stderr, "vlmd generate: %s\n", err);
        return 1;
    }

    /* The messages array: from the file, or built from --prompt/--image. */
    const cJSON *messages;
    if (messages_path) {
        size_t n;
        char *txt = read_file(messages_path, &n);
        if (!txt) {
            fprintf(stderr, "vlmd generate: cannot read %s: %s\n", messages_path, strerror(errno));
            goto out;
        }
        root = cJSON_ParseWithLength(txt, n);
        free(txt);
        if (!root) {
            fprintf(stderr, "vlmd generate: %s is not valid JSON\n", messages_path);
            goto out;
        }
        messages = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "messages") : root;
    } else {
        root = cJSON_CreateArray();
        cJSON *msg = cJSON_CreateObject(), *content = cJSON_CreateArray();
        cJSON_AddStringToObject(msg, "role", "user");
        for (int i = 0; i < n_images; i++) {
            cJSON *part = cJSON_CreateObject(), *iu = cJSON_CreateObject();
            cJSON_AddStringToObject(part, "type", "image_url");
            cJSON_AddStringToObject(iu, "url", images[i]);
            cJSON_AddItemToObject(part, "image_url", iu);
            cJSON_AddItemToArray(content, part);
        }
        cJSON *tp = cJSON_CreateObject();
        cJSON_AddStringToObject(tp, "type", "text");
        cJSON_AddStringToObject(tp, "text", prompt);
        cJSON_AddItemToArray(content, tp);
        cJSON_AddItemToObject(msg, "content", content);
        cJSON_AddItemToArray(root, msg);
        messages = root;
    }

    vlmd_prompt_limits lim;
    vlmd_prompt_limits_default(&lim);
    lim.allow_local_files = true;
    lim.max_prompt_tokens = b->cfg->max_position;
    st = vlmd_prompt_from_messages(b, messages, &lim, &p, err, sizeof err, param, sizeof param);
    if (st == VLM_OK) st = vlmd_prompt_encode_images(b, &p, NULL, err, sizeof err);
    if (st != VLM_OK) {
        fprintf(stderr, "vlmd generate: %s%s%s\n", param[0] ? param : "", param[0] ? ": " : "", err);
        goto out;
    }

    vlm_seq_desc d = {0};
    vlmd_prompt_to_desc(&p, &d);
    vlm_sampling_default(&d.sampling);
    if (!greedy) {
        /* generation_config.json first (as transformers' generate() does), then the flags. */
        const vlm_gen_defaults *g = vlm_model_gen_defaults(b->model);
        if (g->do_sample && g->temperature > 0) d.sampling.temperature = g->temperature;
        if (g->do_sample && g->top_k > 0) d.sampling.top_k = g->top_k;
        if (g->do_sample && g->top_p > 0) d.sampling.top_p = g->top_p;
        if (g->do_sample && g->min_p > 0) d.sampling.min_p = g->min_p;
        if (g->repetition_penalty > 0) d.sampling.repetition_penalty = g->repetition_penalty;
        if (!isnan(temp)) d.sampling.temperature = (float)temp;
        if (!isnan(top_p)) d.sampling.top_p = (float)top_p;
        if (!isnan(top_k)) d.sampling.top_k = (int)top_k;
        if (!isnan(min_p)) d.sampling.min_p = (float)min_p;
        if (!isnan(rep)) d.sampling.repetition_penalty = (float)rep;
    }
    if (!isnan(seed)) d.sampling.seed = (uint64_t)seed;
    d.max_tokens = max_tokens;
    d.ignore_eos = ignore_eos;
    d.want_logits = dump != NULL;

    vlm_engine_opts eo = {.threads = threads, .max_seqs = 1};
    if (vlmd_parallel_opts(tp, backend, gpus, &eo, err, sizeof err)) st = VLM_E_INVALID;
    else st = vlm_engine_create(b->model, &eo, &e, err, sizeof err);
    uint64_t id = 0;
    if (st == VLM_OK) st = vlm_engine_add(e, &d, &id, err, sizeof err);
    if (st != VLM_OK) {
        fprintf(stderr, "vlmd generate: %s\n", err);
        goto out;
    }

    const int64_t vocab = b->cfg->vocab;
    int64_t n_out = 0;
    out_ids = malloc(sizeof(int32_t) * (size_t)(max_tokens + 1));
    if (dump) logits_all = malloc(sizeof(float) * (size_t)vocab * (size_t)(max_tokens + 1));
    if (!out_ids || (dump && !logits_all)) {
        fprintf(stderr, "vlmd generate: out of memory\n");
        goto out;
    }
    vlm_detok *dt = json ? NULL : vlm_detok_new(b->tok, true);
    vlm_finish fin = VLM_FINISH_NONE;
    vlm_token_event ev[8];
    while (fin == VLM_FINISH_NONE) {
        int n = vlm_engine_step(e, ev, 8);
        if (n == 0 && vlm_engine_active(e) == 0) break;
        for (int i = 0; i < n; i++) {
            if (ev[i].seq_id != id) continue;
            if (ev[i].token >= 0) {
                if (dump) {
                    const float *lg = vlm_engine_logits(e, id);
                    VLM_ASSERT(lg != NULL);
                    memcpy(logits_all + (size_t)n_out * (size_t)vocab, lg, sizeof(float) * (size_t)vocab);
                }
                out_ids[n_out++] = ev[i].token;
                if (dt) {
                    char *s = NULL;
                    size_t sl = 0;
                    if (vlm_detok_push(dt, ev[i].token, &s, &sl) == 0 && sl) {
                        fwrite(s, 1, sl, stdout);
                        fflush(stdout);
                    }
                    free(s);
                }
            }
            if (ev[i].finish != VLM_FINISH_NONE) fin = ev[i].finish;
        }
    }
    if (dt) {
        char *s = NULL;
        size_t sl = 0;
        if (vlm_detok_flush(dt, &s, &sl) == 0 && sl) fwrite(s, 1, sl, stdout);
        free(s);
        vlm_detok_free(dt);
        fputc('\n', stdout);
    }
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON *pt = cJSON_AddArrayToObject(o, "prompt_tokens");
        for (int64_t i = 0; i < p.n_ids; i++) cJSON_AddItemToArray(pt, cJSON_CreateNumber(p.ids[i]));
        cJSON *ti = cJSON_AddArrayToObject(o, "token_ids");
        for (int64_t i = 0; i < n_out; i++) cJSON_AddItemToArray(ti, cJSON_CreateNumber(out_ids[i]));
        size_t tl = 0;
        char *text = vlm_tok_decode(b->tok, out_ids, (size_t)n_out, true, &tl);
        cJSON_AddStringToObject(o, "text", text ? text : "");
        free(text);
        cJSON_AddStringToObject(o, "finish_reason", finish_name(fin));
        char *s = cJSON_PrintUnformatted(o);
        puts(s);
        free(s);
        cJSON_Delete(o);
    }
    if (dump && vlm_npy_write_f32(dump, logits_all, n_out, vocab, err, sizeof err) != VLM_OK) {
        fprintf(stderr, "vlmd generate: %s\n", err);
        goto out;
    }
    rc = fin == VLM_FINISH_ERROR ? 1 : 0;
out:
    free(out_ids);
    free(logits_all);
    vlmd_prompt_free(&p);
    cJSON_Delete(root);
    vlm_engine_free(e);
    vlmd_bundle_free(b);
    return rc;
}
