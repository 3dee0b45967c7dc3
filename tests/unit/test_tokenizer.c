/* test_tokenizer.c — the tokenizer against Hugging Face goldens (tests/fixtures/tokenizer/, written
 * by tools/make_tokenizer_fixtures.py from `tokenizers` / `transformers`): exact ids for every encode
 * fixture (also with the merges rewritten to the older "a b" form), exact decode strings with and
 * without skip_special, streaming detokenization equal to full decode, chat templates equal to
 * apply_chat_template, a seeded round-trip fuzz, bad input, and the `vlmd tokenize/detokenize` CLI. */
#include <cJSON.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>
#include <utf8proc.h>

#include "tests/unit/test.h"
#include "tokenizer/tokenizer.h"

#define TOK_DIR "tests/data/tokenizer/qwen"
#define FIX_DIR "tests/fixtures/tokenizer"
#define FUZZ_N 10000 /* brief: 10,000 seeded random strings */

static vlm_tok *g_tok;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Reads a JSON-lines fixture; returns the parsed lines (caller frees with free_lines). */
static cJSON **read_lines(const char *path, size_t *n) {
    FILE *f = fopen(path, "r");
    *n = 0;
    if (!f) {
        fprintf(stderr, "  cannot open %s\n", path);
        return NULL;
    }
    cJSON **v = NULL;
    size_t cap = 0;
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    while ((len = getline(&line, &lcap, f)) > 0) {
        if (*n == cap) {
            cap = cap ? cap * 2 : 1024;
            v = realloc(v, cap * sizeof *v);
        }
        v[(*n)++] = cJSON_ParseWithLength(line, (size_t)len);
    }
    free(line);
    fclose(f);
    return v;
}
static void free_lines(cJSON **v, size_t n) {
    for (size_t i = 0; i < n; i++) cJSON_Delete(v[i]);
    free(v);
}

static int32_t *json_ids(const cJSON *a, size_t *n) {
    *n = (size_t)cJSON_GetArraySize(a);
    int32_t *ids = malloc((*n + 1) * sizeof(int32_t));
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, a) ids[i++] = (int32_t)it->valuedouble;
    return ids;
}

static int ids_equal(const vlm_ids *got, const int32_t *want, size_t n) {
    return got->n == n && (n == 0 || !memcmp(got->ids, want, n * sizeof(int32_t)));
}

static void check_encode_fixtures(const vlm_tok *t, const char *label) {
    size_t n;
    cJSON **lines = read_lines(FIX_DIR "/encode.jsonl", &n);
    CHECKF(n >= 3000, "%zu encode fixtures", n);
    int shown = 0;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        const cJSON *text = cJSON_GetObjectItem(lines[i], "text");
        size_t nw;
        int32_t *want = json_ids(cJSON_GetObjectItem(lines[i], "ids"), &nw);
        vlm_ids got = {0};
        char err[256];
        int rc = vlm_tok_encode(t, text->valuestring, strlen(text->valuestring), false, &got, err, sizeof err);
        if (rc || !ids_equal(&got, want, nw)) {
            bad++;
            if (shown++ < 5) {
                fprintf(stderr, "  %s encode mismatch line %zu rc=%d (%s) got %zu ids want %zu: ", label, i + 1, rc,
                        rc ? err : "", got.n, nw);
                for (size_t k = 0; k < got.n && k < 12; k++) fprintf(stderr, "%d ", got.ids[k]);
                fprintf(stderr, "| ");
                for (size_t k = 0; k < nw && k < 12; k++) fprintf(stderr, "%d ", want[k]);
                fprintf(stderr, "\n");
            }
        }
        vlm_ids_free(&got);
        free(want);
    }
    CHECKF(bad == 0, "%s: %zu of %zu encode fixtures differ", label, bad, n);
    free_lines(lines, n);
}

static void test_load(void) {
    char err[256] = "";
    double t0 = now_s();
    int rc = vlm_tok_load(TOK_DIR, &g_tok, err, sizeof err);
    double dt = now_s() - t0;
    CHECKF(rc == 0, "%s", err);
    fprintf(stderr, "  loaded %s in %.3f s\n", TOK_DIR, dt);
    if (rc) return;
    CHECK_EQ_INT(vlm_tok_vocab_size(g_tok), 151669);
    CHECK_EQ_INT(vlm_tok_token_id(g_tok, "<|im_end|>"), 151645);
    CHECK_EQ_INT(vlm_tok_token_id(g_tok, "<tool_call>"), 151657);
    CHECK_EQ_INT(vlm_tok_token_id(g_tok, "Hello"), 9707);
    CHECK_EQ_INT(vlm_tok_token_id(g_tok, "no such token here"), -1);
    CHECK(vlm_tok_is_special(g_tok, 151655));
    CHECK(!vlm_tok_is_special(g_tok, 151657)); /* <tool_call> is added but not special */
    CHECK(!vlm_tok_is_special(g_tok, 9707));
    /* SPEC §F.3/§F.4 examples. */
    static const struct { const char *s; int32_t ids[8]; size_t n; } ex[] = {
        {"Hello world", {9707, 1879}, 2},
        {"don't", {15007, 944}, 2},
        {" 12345", {220, 16, 17, 18, 19, 20}, 6},
        {"<Image><tile_1>", {46465, 1784, 21094, 62, 16, 29}, 6},
    };
    for (size_t i = 0; i < sizeof ex / sizeof ex[0]; i++) {
        vlm_ids v = {0};
        CHECK(vlm_tok_encode(g_tok, ex[i].s, strlen(ex[i].s), true, &v, err, sizeof err) == 0);
        CHECKF(ids_equal(&v, ex[i].ids, ex[i].n), "example %zu", i);
        vlm_ids_free(&v);
    }
}

static void test_encode_fixtures(void) {
    if (!g_tok) { CHECK(0); return; }
    double t0 = now_s();
    check_encode_fixtures(g_tok, "array-merges");
    fprintf(stderr, "  encode fixtures in %.3f s\n", now_s() - t0);
}

/* Rewrites the tokenizer's ["a","b"] merges as "a b" strings in a temp file and expects identical ids. */
static void test_string_merges(void) {
    FILE *f = fopen(TOK_DIR "/tokenizer.json", "rb");
    CHECK(f != NULL);
    if (!f) return;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *txt = malloc((size_t)sz + 1);
    CHECK(fread(txt, 1, (size_t)sz, f) == (size_t)sz);
    fclose(f);
    txt[sz] = 0;
    cJSON *j = cJSON_Parse(txt);
    free(txt);
    cJSON *model = cJSON_GetObjectItem(j, "model");
    cJSON *merges = cJSON_GetObjectItem(model, "merges");
    cJSON *sm = cJSON_CreateArray();
    cJSON *it;
    size_t nm = 0;
    cJSON_ArrayForEach(it, merges) {
        CHECK(cJSON_IsArray(it)); /* the committed file uses the newer pair form */
        if (!cJSON_IsArray(it)) break;
        const char *a = it->child->valuestring, *b = it->child->next->valuestring;
        size_t la = strlen(a), lb = strlen(b);
        char *s = malloc(la + lb + 2);
        memcpy(s, a, la);
        s[la] = ' ';
        memcpy(s + la + 1, b, lb + 1);
        cJSON_AddItemToArray(sm, cJSON_CreateString(s));
        free(s);
        nm++;
    }
    CHECK_EQ_INT(nm, 151387);
    cJSON_ReplaceItemInObject(model, "merges", sm);
    char *out = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    char path[] = "/tmp/vlmd-tok-merges-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0) { free(out); return; }
    size_t ol = strlen(out);
    CHECK(write(fd, out, ol) == (ssize_t)ol);
    close(fd);
    free(out);
    vlm_tok *t2 = NULL;
    char err[256];
    CHECKF(vlm_tok_load(path, &t2, err, sizeof err) == 0, "%s", err);
    unlink(path);
    if (t2) check_encode_fixtures(t2, "string-merges");
    vlm_tok_free(t2);
}

/* lstrip / rstrip / single_word / normalized on added tokens: the fixture's first line names the
 * flags switched on; apply them to a temp copy of tokenizer.json and expect HF's ids. */
static void test_added_flags(void) {
    size_t n;
    cJSON **lines = read_lines(FIX_DIR "/encode_flags.jsonl", &n);
    CHECK(n > 500);
    if (n < 2) { free_lines(lines, n); return; }
    const cJSON *mods = cJSON_GetObjectItem(lines[0], "mods");
    FILE *f = fopen(TOK_DIR "/tokenizer.json", "rb");
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *txt = malloc((size_t)sz + 1);
    CHECK(fread(txt, 1, (size_t)sz, f) == (size_t)sz);
    fclose(f);
    txt[sz] = 0;
    cJSON *j = cJSON_Parse(txt);
    free(txt);
    cJSON *a;
    int applied = 0;
    cJSON_ArrayForEach(a, cJSON_GetObjectItem(j, "added_tokens")) {
        const cJSON *m = cJSON_GetObjectItem(mods, cJSON_GetObjectItem(a, "content")->valuestring);
        const cJSON *fl;
        cJSON_ArrayForEach(fl, m) {
            cJSON_ReplaceItemInObject(a, fl->string, cJSON_CreateBool(cJSON_IsTrue(fl)));
            applied++;
        }
    }
    CHECK(applied >= 5);
    char *out = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    char path[] = "/tmp/vlmd-tok-flags-XXXXXX";
    int fd = mkstemp(path);
    size_t ol = strlen(out);
    CHECK(fd >= 0 && write(fd, out, ol) == (ssize_t)ol);
    close(fd);
    free(out);
    vlm_tok *t2 = NULL;
    char err[256];
    CHECKF(vlm_tok_load(path, &t2, err, sizeof err) == 0, "%s", err);
    unlink(path);
    size_t bad = 0, differs = 0;
    for (size_t i = 1; t2 && i < n; i++) {
        const char *text = cJSON_GetObjectItem(lines[i], "text")->valuestring;
        size_t nw;
        int32_t *want = json_ids(cJSON_GetObjectItem(lines[i], "ids"), &nw);
        vlm_ids got = {0};
        if (vlm_tok_encode(t2, text, strlen(text), false, &got, err, sizeof err) || !ids_equal(&got, want, nw)) {
            if (bad++ < 3) fprintf(stderr, "  flags mismatch line %zu\n", i + 1);
        }
        vlm_ids plain = {0};
        if (g_tok && !vlm_tok_encode(g_tok, text, strlen(text), false, &plain, err, sizeof err) &&
            !ids_equal(&plain, want, nw))
            differs++;
        vlm_ids_free(&plain);
        vlm_ids_free(&got);
        free(want);
    }
    CHECKF(bad == 0, "%zu of %zu added-token flag fixtures differ", bad, n - 1);
    /* Not vacuous: the flags change the ids of many of these strings. */
    CHECKF(differs > 100, "only %zu fixtures depend on the flags", differs);
    fprintf(stderr, "  %zu of %zu flag fixtures differ from the unmodified tokenizer\n", differs, n - 1);
    vlm_tok_free(t2);
    free_lines(lines, n);
}

static void test_decode_fixtures(void) {
    if (!g_tok) { CHECK(0); return; }
    size_t n;
    cJSON **lines = read_lines(FIX_DIR "/decode.jsonl", &n);
    CHECK(n > 1000);
    size_t bad = 0, bad_stream = 0;
    for (size_t i = 0; i < n; i++) {
        size_t nid;
        int32_t *ids = json_ids(cJSON_GetObjectItem(lines[i], "ids"), &nid);
        bool skip = cJSON_IsTrue(cJSON_GetObjectItem(lines[i], "skip"));
        const char *hex = cJSON_GetObjectItem(lines[i], "hex")->valuestring;
        size_t wl = strlen(hex) / 2;
        char *want = malloc(wl + 1);
        for (size_t k = 0; k < wl; k++) {
            unsigned v;
            sscanf(hex + 2 * k, "%2x", &v);
            want[k] = (char)v;
        }
        want[wl] = 0;
        size_t len;
        char *got = vlm_tok_decode(g_tok, ids, nid, skip, &len);
        if (!got || len != wl || memcmp(got, want, len)) {
            if (bad++ < 5) fprintf(stderr, "  decode mismatch line %zu: got '%s' want '%s'\n", i + 1, got ? got : "(null)", want);
        }
        /* Streaming: the concatenated pushes + flush equal the full decode, and every chunk is valid UTF-8. */
        vlm_detok *d = vlm_detok_new(g_tok, skip);
        char *acc = NULL;
        size_t acc_len = 0;
        bool chunk_ok = true;
        for (size_t k = 0; k < nid; k++) {
            size_t before = acc_len;
            if (vlm_detok_push(d, ids[k], &acc, &acc_len)) chunk_ok = false;
            if (utf8proc_decompose((const utf8proc_uint8_t *)acc + before, (utf8proc_ssize_t)(acc_len - before), NULL, 0, 0) < 0)
                chunk_ok = false;
        }
        vlm_detok_flush(d, &acc, &acc_len);
        vlm_detok_free(d);
        if (!chunk_ok || !got || acc_len != len || memcmp(acc, got, len)) bad_stream++;
        free(acc);
        free(got);
        free(want);
        free(ids);
    }
    CHECKF(bad == 0, "%zu of %zu decode fixtures differ", bad, n);
    CHECKF(bad_stream == 0, "%zu of %zu streaming decodes differ from full decode", bad_stream, n);
    free_lines(lines, n);
}

/* Streaming over every encode fixture's ids too (longer sequences, all scripts). */
static void test_stream_encode_ids(void) {
    if (!g_tok) { CHECK(0); return; }
    size_t n;
    cJSON **lines = read_lines(FIX_DIR "/encode.jsonl", &n);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        size_t nid;
        int32_t *ids = json_ids(cJSON_GetObjectItem(lines[i], "ids"), &nid);
        size_t len;
        char *full = vlm_tok_decode(g_tok, ids, nid, false, &len);
        vlm_detok *d = vlm_detok_new(g_tok, false);
        char *acc = NULL;
        size_t acc_len = 0;
        for (size_t k = 0; k < nid; k++) vlm_detok_push(d, ids[k], &acc, &acc_len);
        vlm_detok_flush(d, &acc, &acc_len);
        vlm_detok_free(d);
        if (!full || acc_len != len || memcmp(acc, full, len)) bad++;
        free(acc);
        free(full);
        free(ids);
    }
    CHECKF(bad == 0, "%zu of %zu streaming decodes differ", bad, n);
    free_lines(lines, n);
}

static void test_chat_fixtures(void) {
    if (!g_tok) { CHECK(0); return; }
    size_t n;
    cJSON **lines = read_lines(FIX_DIR "/chat.jsonl", &n);
    CHECK(n >= 100);
    size_t bad = 0, bad_ids = 0, bad_jinja = 0, n_vl = 0, n_ml = 0, n_sh = 0;
    FILE *tf = fopen(FIX_DIR "/templates.json", "rb");
    char tbuf[1 << 16];
    size_t tl = tf ? fread(tbuf, 1, sizeof tbuf - 1, tf) : 0;
    if (tf) fclose(tf);
    tbuf[tl] = 0;
    cJSON *tmpls = cJSON_Parse(tbuf);
    CHECK(tmpls != NULL);
    for (size_t i = 0; i < n; i++) {
        const char *kind = cJSON_GetObjectItem(lines[i], "kind")->valuestring;
        bool gen = cJSON_IsTrue(cJSON_GetObjectItem(lines[i], "gen"));
        const cJSON *msgs = cJSON_GetObjectItem(lines[i], "messages");
        size_t nm = (size_t)cJSON_GetArraySize(msgs);
        vlm_chat_msg *m = calloc(nm, sizeof *m);
        vlm_chat_part *parts = calloc(64 * nm + 1, sizeof *parts);
        size_t np = 0, k = 0;
        const cJSON *msg;
        cJSON_ArrayForEach(msg, msgs) {
            m[k].role = cJSON_GetObjectItem(msg, "role")->valuestring;
            const cJSON *c = cJSON_GetObjectItem(msg, "content");
            if (cJSON_IsString(c)) {
                m[k].content = c->valuestring;
            } else {
                m[k].parts = parts + np;
                const cJSON *p;
                cJSON_ArrayForEach(p, c) {
                    const char *ty = cJSON_GetObjectItem(p, "type")->valuestring;
                    vlm_chat_part *pp = &parts[np++];
                    pp->kind = !strcmp(ty, "image") ? VLM_PART_IMAGE : !strcmp(ty, "video") ? VLM_PART_VIDEO : VLM_PART_TEXT;
                    if (pp->kind == VLM_PART_TEXT) pp->text = cJSON_GetObjectItem(p, "text")->valuestring;
                    m[k].n_parts++;
                }
            }
            k++;
        }
        bool vl = !strcmp(kind, "qwen2_vl"), sh = !strcmp(kind, "shipped");
        n_vl += vl;
        n_sh += sh;
        n_ml += !vl && !sh;
        char err[256];
        /* built-in renderers for qwen2_vl/chatml; the shipped (Qwen3) template through AUTO = Jinja */
        char *got = vlm_chat_render(g_tok, sh ? VLM_TEMPLATE_AUTO : vl ? VLM_TEMPLATE_QWEN2_VL : VLM_TEMPLATE_CHATML, m, nm,
                                    gen, err, sizeof err);
        const char *want = cJSON_GetObjectItem(lines[i], "text")->valuestring;
        if (!sh) { /* the same template text through the Jinja subset must agree too */
            const cJSON *tt = cJSON_GetObjectItem(tmpls, kind);
            char *gj = tt ? vlm_chat_render_template(g_tok, tt->valuestring, m, nm, gen, err, sizeof err) : NULL;
            if (!gj || strcmp(gj, want)) {
                if (bad_jinja++ < 2) fprintf(stderr, "  jinja %s mismatch line %zu:\n---got\n%s\n---want\n%s\n", kind, i + 1, gj ? gj : err, want);
            }
            free(gj);
        }
        if (!got || strcmp(got, want)) {
            if (bad++ < 3) fprintf(stderr, "  chat mismatch line %zu:\n---got\n%s\n---want\n%s\n", i + 1, got ? got : err, want);
        } else {
            size_t nw;
            int32_t *wid = json_ids(cJSON_GetObjectItem(lines[i], "ids"), &nw);
            vlm_ids v = {0};
            if (vlm_tok_encode(g_tok, got, strlen(got), false, &v, err, sizeof err) || !ids_equal(&v, wid, nw)) bad_ids++;
            vlm_ids_free(&v);
            free(wid);
        }
        free(got);
        free(parts);
        free(m);
    }
    CHECKF(bad == 0, "%zu of %zu chat renders differ", bad, n);
    CHECKF(bad_jinja == 0, "%zu Jinja renders differ", bad_jinja);
    CHECK(n_sh >= 50);
    cJSON_Delete(tmpls);
    CHECKF(bad_ids == 0, "%zu chat prompts tokenize differently", bad_ids);
    CHECK(n_vl >= 50 && n_ml >= 50);
    free_lines(lines, n);
}

/* Jinja subset: errors come back as NULL + message, never a crash; a few constructs by hand. */
static void test_jinja_misc(void) {
    vlm_chat_msg m[2] = {{.role = "user", .content = "hi"}, {.role = "assistant", .content = "  yo  "}};
    char err[256] = "";
    char *r = vlm_chat_render_template(g_tok, "{{ raise_exception('boom ' ~ messages|length) }}", m, 2, false, err, sizeof err);
    CHECK(r == NULL && strstr(err, "boom 2"));
    CHECK(vlm_chat_render_template(g_tok, "{% if x %}open", m, 2, false, err, sizeof err) == NULL);
    CHECK(vlm_chat_render_template(g_tok, "{{ 'a' + 1 }}", m, 2, false, err, sizeof err) == NULL);
    CHECK(vlm_chat_render_template(g_tok, "{% frobnicate %}", m, 2, false, err, sizeof err) == NULL);
    static const struct { const char *t, *want; } cases[] = {
        {"{% for x in messages %}{{ loop.index }}{{ x.role[0] }}{% if not loop.last %},{% endif %}{% endfor %}", "1u,2a"},
        {"{% set ns = namespace(n=0) %}{% for x in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}", "2"},
        {"{{ messages[-1].content | trim }}|{{ messages[1]['content'].strip() }}|{{ 'a,b'.split(',')[1] }}", "yo|yo|b"},
        {"{% for x in messages[::-1] %}{{ x.role }} {% endfor %}", "assistant user "},
        {"{{ 'y' if 'i' in messages[0].content else 'n' }}{{ messages[0].nope is defined }}", "yFalse"},
        {"  {%- if true %}\n  A\n  {% endif %}\nB", "  A\nB"},
        {"{% if add_generation_prompt %}G{% elif messages|length > 1 %}M{% else %}E{% endif %}", "M"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        r = vlm_chat_render_template(g_tok, cases[i].t, m, 2, false, err, sizeof err);
        CHECKF(r && !strcmp(r, cases[i].want), "case %zu: got '%s' want '%s' (%s)", i, r ? r : "(null)", cases[i].want, err);
        free(r);
    }
}

/* Seeded random strings over mixed scripts, raw bytes (made valid), specials excluded:
 * decode(encode(s)) must equal NFC(s). */
static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static void test_fuzz_roundtrip(void) {
    if (!g_tok) { CHECK(0); return; }
    static const uint32_t ranges[][2] = {
        {0x20, 0x7E}, {0x09, 0x0D}, {0xA0, 0x17F}, {0x300, 0x36F}, {0x370, 0x3FF}, {0x400, 0x4FF},
        {0x600, 0x6FF}, {0x900, 0x97F}, {0xE00, 0xE7F}, {0x1100, 0x11FF}, {0x3040, 0x30FF},
        {0x4E00, 0x9FFF}, {0xAC00, 0xD7A3}, {0x1F300, 0x1F6FF}, {0x1F3FB, 0x1F3FF}, {0x200B, 0x200D},
        {0x2000, 0x206F}, {0x1, 0x1F}, {0x80, 0x9F}, {0xFFF0, 0xFFFD}, {0x10000, 0x10FFFF},
    };
    const size_t nr = sizeof ranges / sizeof ranges[0];
    size_t bad = 0;
    char buf[1024];
    for (int it = 0; it < FUZZ_N; it++) {
        size_t len = 0, nch = rnd() % 60;
        for (size_t c = 0; c < nch; c++) {
            const uint32_t *r = ranges[rnd() % nr];
            uint32_t cp = r[0] + rnd() % (r[1] - r[0] + 1);
            if ((cp >= 0xD800 && cp <= 0xDFFF) || cp == 0) cp = 'x';
            len += (size_t)utf8proc_encode_char((utf8proc_int32_t)cp, (utf8proc_uint8_t *)buf + len);
        }
        buf[len] = 0;
        vlm_ids v = {0};
        char err[256];
        if (vlm_tok_encode(g_tok, buf, len, false, &v, err, sizeof err)) {
            bad++;
            continue;
        }
        size_t dl;
        char *dec = vlm_tok_decode(g_tok, v.ids, v.n, false, &dl);
        utf8proc_uint8_t *nfc = NULL;
        utf8proc_ssize_t nl = len ? utf8proc_map((const utf8proc_uint8_t *)buf, (utf8proc_ssize_t)len, &nfc,
                                                 UTF8PROC_STABLE | UTF8PROC_COMPOSE) : 0;
        if (!dec || nl < 0 || dl != (size_t)nl || (nl && memcmp(dec, nfc, dl))) {
            if (bad++ < 3) fprintf(stderr, "  fuzz round-trip failed at iteration %d\n", it);
        }
        free(nfc);
        free(dec);
        vlm_ids_free(&v);
    }
    CHECKF(bad == 0, "%zu of %d fuzz strings do not round-trip", bad, FUZZ_N);
}

static void test_bad_input(void) {
    if (!g_tok) { CHECK(0); return; }
    char err[256] = "";
    vlm_ids v = {0};
    static const char *bad[] = {"\xff", "ab\xc3", "\xc0\xaf", "\xed\xa0\x80", "x\xf4\x90\x80\x80", "\xe2\x82"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        CHECK(vlm_tok_encode(g_tok, bad[i], strlen(bad[i]), false, &v, err, sizeof err) == -1);
        CHECK(strstr(err, "UTF-8") != NULL);
    }
    vlm_ids_free(&v);
    int32_t ids[] = {9707, -1};
    CHECK(vlm_tok_decode(g_tok, ids, 2, false, NULL) == NULL);
    ids[1] = vlm_tok_vocab_size(g_tok);
    CHECK(vlm_tok_decode(g_tok, ids, 2, false, NULL) == NULL);
    vlm_detok *d = vlm_detok_new(g_tok, false);
    char *b = NULL;
    size_t bl = 0;
    CHECK(vlm_detok_push(d, 1 << 30, &b, &bl) == -1);
    CHECK(vlm_detok_push(d, 9707, &b, &bl) == 0);
    CHECK(bl == 5 && !memcmp(b, "Hello", 5));
    free(b);
    vlm_detok_free(d);
    vlm_tok *t2 = NULL;
    CHECK(vlm_tok_load("tests/data/tokenizer/does-not-exist", &t2, err, sizeof err) == -1 && !t2);
    CHECK(vlm_tok_load(TOK_DIR "/README.md", &t2, err, sizeof err) == -1 && !t2);
    /* Empty text encodes to nothing; decoding nothing gives "". */
    CHECK(vlm_tok_encode(g_tok, "", 0, false, &v, err, sizeof err) == 0 && v.n == 0);
    char *e = vlm_tok_decode(g_tok, NULL, 0, false, NULL);
    CHECK(e && e[0] == 0);
    free(e);
}

/* Drives the real binary: tokenize/detokenize JSON lines, and the error path (line number, status 1). */
static void test_cli(void) {
    const char *build = getenv("BUILD");
    if (!build) build = "build";
    char vlmd[512], cmd[2048];
    snprintf(vlmd, sizeof vlmd, "%s/vlmd", build);
    if (access(vlmd, X_OK)) {
        fprintf(stderr, "  skip: %s not built\n", vlmd);
        return;
    }
    snprintf(cmd, sizeof cmd,
             "printf '%%s\\n' '{\"text\": \"Hello world\"}' '{\"text\": \"<|im_start|>x\\n\"}' | %s tokenize --tokenizer " TOK_DIR,
             vlmd);
    FILE *p = popen(cmd, "r");
    char out[4096] = "";
    size_t got = fread(out, 1, sizeof out - 1, p);
    out[got] = 0;
    CHECK(pclose(p) == 0);
    CHECKF(!strcmp(out, "{\"ids\":[9707,1879]}\n{\"ids\":[151644,87,198]}\n"), "got %s", out);
    snprintf(cmd, sizeof cmd,
             "printf '%%s\\n' '{\"ids\": [151644, 9707, 1879, 151645]}' | %s detokenize --skip-special --tokenizer " TOK_DIR,
             vlmd);
    p = popen(cmd, "r");
    got = fread(out, 1, sizeof out - 1, p);
    out[got] = 0;
    CHECK(pclose(p) == 0);
    CHECKF(!strcmp(out, "{\"text\":\"Hello world\"}\n"), "got %s", out);
    /* Invalid JSON on line 2 and invalid UTF-8: exit 1 with the line number on stderr. */
    snprintf(cmd, sizeof cmd,
             "printf '{\"text\":\"a\"}\\n{bad\\n' | %s tokenize --tokenizer " TOK_DIR " 2>&1 >/dev/null | grep -c 'line 2'", vlmd);
    p = popen(cmd, "r");
    got = fread(out, 1, sizeof out - 1, p);
    out[got] = 0;
    pclose(p);
    CHECKF(atoi(out) == 1, "stderr did not name line 2: %s", out);
    snprintf(cmd, sizeof cmd, "printf '{\"text\":\"a\\xff\"}\\n' | %s tokenize --tokenizer " TOK_DIR " >/dev/null 2>&1", vlmd);
    int rc = system(cmd);
    CHECKF(WIFEXITED(rc) && WEXITSTATUS(rc) == 1, "rc %d", rc);
    snprintf(cmd, sizeof cmd, "printf '{\"ids\":[1,-5]}\\n' | %s detokenize --tokenizer " TOK_DIR " >/dev/null 2>&1", vlmd);
    rc = system(cmd);
    CHECKF(WIFEXITED(rc) && WEXITSTATUS(rc) == 1, "rc %d", rc);
}

/* Concurrent encoders share one vlm_tok (and its word cache): every thread must still get the
 * fixture ids. Threads start at different offsets so they insert and evict the same cache shards. */
#define N_THREADS 4
typedef struct {
    cJSON **lines;
    size_t n, start, bad;
} thr_arg;

static void *thr_encode(void *p) {
    thr_arg *a = p;
    char err[256];
    for (size_t r = 0; r < a->n; r++) {
        size_t i = (a->start + r) % a->n;
        const char *text = cJSON_GetObjectItem(a->lines[i], "text")->valuestring;
        size_t nw;
        int32_t *want = json_ids(cJSON_GetObjectItem(a->lines[i], "ids"), &nw);
        vlm_ids got = {0};
        if (vlm_tok_encode(g_tok, text, strlen(text), false, &got, err, sizeof err) || !ids_equal(&got, want, nw)) a->bad++;
        vlm_ids_free(&got);
        free(want);
    }
    return NULL;
}

static void test_threads(void) {
    if (!g_tok) { CHECK(0); return; }
    size_t n;
    cJSON **lines = read_lines(FIX_DIR "/encode.jsonl", &n);
    pthread_t th[N_THREADS];
    thr_arg args[N_THREADS];
    for (int k = 0; k < N_THREADS; k++) {
        args[k] = (thr_arg){lines, n, (size_t)k * n / N_THREADS, 0};
        CHECK(pthread_create(&th[k], NULL, thr_encode, &args[k]) == 0);
    }
    size_t bad = 0;
    for (int k = 0; k < N_THREADS; k++) {
        pthread_join(th[k], NULL);
        bad += args[k].bad;
    }
    CHECKF(bad == 0, "%zu concurrent encodes differ", bad);
    free_lines(lines, n);
}

int main(void) {
    RUN(test_load);
    RUN(test_encode_fixtures);
    RUN(test_decode_fixtures);
    RUN(test_stream_encode_ids);
    RUN(test_chat_fixtures);
    RUN(test_jinja_misc);
    RUN(test_fuzz_roundtrip);
    RUN(test_bad_input);
    RUN(test_threads);
    RUN(test_string_merges);
    RUN(test_added_flags);
    RUN(test_cli);
    vlm_tok_free(g_tok);
    TEST_MAIN_END("tokenizer");
}
