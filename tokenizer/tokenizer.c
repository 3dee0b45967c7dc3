/* tokenizer.c — byte-level BPE tokenizer that reproduces Hugging Face `tokenizers` ids for the
 * Qwen2 / Qwen2.5 / Qwen2-VL / Qwen3 tokenizer.json family.
 *
 * Pipeline (as HF runs it): added tokens are found in the raw text first (leftmost, longest), the
 * segments between them are NFC-normalised (utf8proc), split by the pre-tokenizer regex taken from
 * the file (PCRE2, UTF+UCP, JIT), each piece's bytes are mapped to their initial byte tokens and
 * merged by BPE rank (binary heap over a linked list of symbols). Decoding maps tokens back to bytes
 * and replaces invalid UTF-8 the way Rust's String::from_utf8_lossy does (what HF returns).
 * A loaded vlm_tok is read-only except for the word cache, whose shards carry their own mutexes. */
#include <cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#include "tokenizer/tok_internal.h"

static void set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "vlmd: out of memory (%zu bytes)\n", n);
        abort();
    }
    return p;
}
static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p) {
        fprintf(stderr, "vlmd: out of memory\n");
        abort();
    }
    return p;
}
static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p) {
        fprintf(stderr, "vlmd: out of memory (%zu bytes)\n", n);
        abort();
    }
    return p;
}

/* ---- small helpers ------------------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t n, cap;
} sbuf;
static void sb_put(sbuf *b, const void *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap * 2 : 64;
        while (c < b->n + n + 1) c *= 2;
        b->p = xrealloc(b->p, c);
        b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static uint64_t hash_bytes(const void *data, size_t n) {
    /* FNV-1a 64 folded with a final mix; good enough for token strings. */
    const uint8_t *s = data;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ULL;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 32;
    return h;
}
static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static int put_utf8(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid UTF-8 sequence starting at s[0] (1..4), 0 if s[0..] is an invalid sequence
 * and -k if the k available bytes are a valid but incomplete prefix. *bad_len receives the length
 * of the maximal invalid subpart (what one U+FFFD replaces, as in Rust's from_utf8_lossy). */
static int utf8_seq(const uint8_t *s, size_t avail, size_t *bad_len) {
    uint8_t c = s[0];
    *bad_len = 1;
    if (c < 0x80) return 1;
    int need;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 0;
    for (int k = 1; k < need; k++) {
        if ((size_t)k >= avail) return -k;
        uint8_t b = s[k];
        uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
        if (b < l || b > h) {
            *bad_len = (size_t)k;
            return 0;
        }
    }
    return need;
}

static bool utf8_valid(const uint8_t *s, size_t n, size_t *bad_at) {
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) { i++; continue; }
        size_t bl;
        int k = utf8_seq(s + i, n - i, &bl);
        if (k <= 0) {
            if (bad_at) *bad_at = i;
            return false;
        }
        i += (size_t)k;
    }
    return true;
}

/* Appends the lossy decoding of s[0..n) to out; stops before a trailing incomplete (but so far
 * valid) sequence unless final. Returns the bytes consumed. */
static size_t lossy_append(const uint8_t *s, size_t n, bool final, sbuf *out) {
    static const char repl[3] = {(char)0xEF, (char)0xBF, (char)0xBD};
    size_t i = 0, run = 0;
    while (i < n) {
        if (s[i] < 0x80) { i++; continue; }
        size_t bl;
        int k = utf8_seq(s + i, n - i, &bl);
        if (k > 0) { i += (size_t)k; continue; }
        sb_put(out, s + run, i - run);
        if (k < 0) { /* incomplete at the end */
            if (!final) return i;
            sb_put(out, repl, 3);
            return n;
        }
        sb_put(out, repl, 3);
        i += bl;
        run = i;
    }
    sb_put(out, s + run, n - run);
    return n;
}

/* ---- vocab hash --------------------------------------------------------------------------- */

static int32_t vocab_find(const vlm_tok *t, const char *s, size_t n) {
    if (!t->vhash) return -1;
    size_t i = hash_bytes(s, n) & t->vhash_mask;
    for (;;) {
        int32_t id = t->vhash[i];
        if (id < 0) return -1;
        if (t->tok_len[id] == n && !memcmp(t->arena + t->tok_off[id], s, n)) return id;
        i = (i + 1) & t->vhash_mask;
    }
}

static void merge_put(vlm_tok *t, int32_t a, int32_t b, int32_t rank, int32_t nid) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t i = hash_u64(key) & t->mmask;
    while (t->mrank[i] >= 0) {
        if (t->mkeys[i] == key) return; /* duplicate merge: the first (lowest rank) wins */
        i = (i + 1) & t->mmask;
    }
    t->mkeys[i] = key;
    t->mrank[i] = rank;
    t->mnew[i] = nid;
}

static inline int32_t merge_get(const vlm_tok *t, int32_t a, int32_t b, int32_t *nid) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t i = hash_u64(key) & t->mmask;
    for (;;) {
        int32_t r = t->mrank[i];
        if (r < 0) return -1;
        if (t->mkeys[i] == key) {
            *nid = t->mnew[i];
            return r;
        }
        i = (i + 1) & t->mmask;
    }
}

/* ---- byte level map ----------------------------------------------------------------------- */

/* GPT-2 byte -> code point: printable bytes map to themselves, the other 68 to U+0100.. in order. */
static void byte_map(uint32_t b2cp[256]) {
    uint32_t next = 256;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        b2cp[b] = keep ? (uint32_t)b : next++;
    }
}

/* ---- loading ------------------------------------------------------------------------------ */

static char *read_file(const char *path, size_t *len, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        set_err(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (sz < 0) {
        fclose(f);
        set_err(err, errlen, "cannot size %s", path);
        return NULL;
    }
    char *buf = xmalloc((size_t)sz + 1);
    size_t got = fread(buf, 1, (size_t)sz, f);
    fclose(f);
    if (got != (size_t)sz) {
        free(buf);
        set_err(err, errlen, "short read on %s", path);
        return NULL;
    }
    buf[sz] = 0;
    if (len) *len = (size_t)sz;
    return buf;
}

static bool json_bool(const cJSON *o, const char *k, bool def) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (cJSON_IsBool(v)) return cJSON_IsTrue(v);
    return def;
}

static int load_normalizer(vlm_tok *t, const cJSON *n, char *err, size_t errlen) {
    if (!n || cJSON_IsNull(n)) return 0;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(n, "type");
    if (!cJSON_IsString(type)) {
        set_err(err, errlen, "normalizer without type");
        return -1;
    }
    if (!strcmp(type->valuestring, "NFC")) {
        t->has_nfc = true;
        return 0;
    }
    if (!strcmp(type->valuestring, "Sequence")) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        const cJSON *it;
        cJSON_ArrayForEach(it, arr) if (load_normalizer(t, it, err, errlen)) return -1;
        return 0;
    }
    set_err(err, errlen, "unsupported normalizer type %s", type->valuestring);
    return -1;
}

static int set_regex(vlm_tok *t, const char *pat, char *err, size_t errlen) {
    if (t->re) {
        set_err(err, errlen, "more than one Split pre-tokenizer is not supported");
        return -1;
    }
    int ec;
    PCRE2_SIZE eo;
    t->re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    if (!t->re) {
        char msg[256];
        pcre2_get_error_message(ec, (PCRE2_UCHAR *)msg, sizeof msg);
        set_err(err, errlen, "pre-tokenizer regex does not compile at %zu: %s", (size_t)eo, msg);
        return -1;
    }
    t->re_jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

static int load_pretok(vlm_tok *t, const cJSON *p, char *err, size_t errlen) {
    if (!p || cJSON_IsNull(p)) return 0;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
    if (!cJSON_IsString(type)) {
        set_err(err, errlen, "pre_tokenizer without type");
        return -1;
    }
    const char *ty = type->valuestring;
    if (!strcmp(ty, "Sequence")) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(p, "pretokenizers")) {
            if (load_pretok(t, it, err, errlen)) return -1;
        }
        return 0;
    }
    if (!strcmp(ty, "Split")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
        const cJSON *beh = cJSON_GetObjectItemCaseSensitive(p, "behavior");
        if (!cJSON_IsString(rx)) {
            set_err(err, errlen, "Split pre-tokenizer without a Regex pattern is not supported");
            return -1;
        }
        if (!cJSON_IsString(beh) || strcmp(beh->valuestring, "Isolated") || json_bool(p, "invert", false)) {
            set_err(err, errlen, "Split pre-tokenizer: only behavior Isolated without invert is supported");
            return -1;
        }
        return set_regex(t, rx->valuestring, err, errlen);
    }
    if (!strcmp(ty, "ByteLevel")) {
        if (json_bool(p, "add_prefix_space", false)) {
            set_err(err, errlen, "ByteLevel add_prefix_space=true is not supported");
            return -1;
        }
        /* use_regex=true: the GPT-2 regex; the Qwen files set false and carry their own Split. */
        if (json_bool(p, "use_regex", true))
            return set_regex(t, "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
                             err, errlen);
        return 0;
    }
    set_err(err, errlen, "unsupported pre_tokenizer type %s", ty);
    return -1;
}

static int load_postproc(vlm_tok *t, const cJSON *p, char *err, size_t errlen) {
    if (!p || cJSON_IsNull(p)) return 0;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
    if (!cJSON_IsString(type)) return 0;
    if (!strcmp(type->valuestring, "ByteLevel")) return 0; /* offsets only: no ids */
    if (!strcmp(type->valuestring, "TemplateProcessing")) {
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single");
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(p, "special_tokens");
        bool after = false;
        const cJSON *it;
        cJSON_ArrayForEach(it, single) {
            const cJSON *st = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
            if (!st) {
                after = true; /* the Sequence piece */
                continue;
            }
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(st, "id");
            const cJSON *ent = cJSON_IsString(name) ? cJSON_GetObjectItemCaseSensitive(sp, name->valuestring) : NULL;
            const cJSON *ids = cJSON_GetObjectItemCaseSensitive(ent, "ids");
            const cJSON *v;
            cJSON_ArrayForEach(v, ids) {
                int32_t **arr = after ? &t->post_ids : &t->pre_ids;
                size_t *n = after ? &t->n_post : &t->n_pre;
                *arr = xrealloc(*arr, (*n + 1) * sizeof(int32_t));
                (*arr)[(*n)++] = (int32_t)v->valuedouble;
            }
        }
        return 0;
    }
    set_err(err, errlen, "unsupported post_processor type %s", type->valuestring);
    return -1;
}

/* Converts a mapped token string to the bytes HF's ByteLevel decoder yields for it: every char
 * mapped back through the byte table, or, if any char is not in the table, the string's own bytes. */
static void token_bytes(const char *s, size_t n, const int32_t *cp2b, sbuf *out) {
    size_t start = out->n;
    size_t i = 0;
    while (i < n) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0 || cp >= 324 || cp2b[cp] < 0) {
            out->n = start;
            sb_put(out, s, n);
            return;
        }
        uint8_t b = (uint8_t)cp2b[cp];
        sb_put(out, &b, 1);
        i += (size_t)k;
    }
}

static int build_vocab(vlm_tok *t, const cJSON *vocab, const cJSON *added, char *err, size_t errlen) {
    int32_t max_id = -1;
    size_t n = 0, bytes = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, vocab) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > 2e9) {
            set_err(err, errlen, "vocab entry %s has a bad id", it->string ? it->string : "?");
            return -1;
        }
        int32_t id = (int32_t)it->valuedouble;
        if (id > max_id) max_id = id;
        bytes += strlen(it->string) + 1;
        n++;
    }
    cJSON_ArrayForEach(it, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(c) || id->valuedouble < 0 || id->valuedouble > 2e9) {
            set_err(err, errlen, "added_tokens entry without id/content");
            return -1;
        }
        if ((int32_t)id->valuedouble > max_id) max_id = (int32_t)id->valuedouble;
        bytes += strlen(c->valuestring) + 1;
        n++;
    }
    if (max_id < 0) {
        set_err(err, errlen, "empty vocabulary");
        return -1;
    }
    t->n_vocab_slots = max_id + 1;
    t->arena = xmalloc(bytes);
    t->tok_off = xmalloc((size_t)t->n_vocab_slots * sizeof(int64_t));
    t->tok_len = xcalloc((size_t)t->n_vocab_slots, sizeof(uint32_t));
    t->is_special = xcalloc((size_t)t->n_vocab_slots, sizeof(bool));
    for (int32_t i = 0; i < t->n_vocab_slots; i++) t->tok_off[i] = -1;
    size_t cap = 16;
    while (cap < n * 2) cap *= 2;
    t->vhash = xmalloc(cap * sizeof(int32_t));
    memset(t->vhash, 0xff, cap * sizeof(int32_t));
    t->vhash_mask = cap - 1;
    size_t off = 0;
    cJSON_ArrayForEach(it, vocab) {
        int32_t id = (int32_t)it->valuedouble;
        size_t l = strlen(it->string);
        if (t->tok_off[id] >= 0) {
            set_err(err, errlen, "vocab id %d used twice", id);
            return -1;
        }
        memcpy(t->arena + off, it->string, l + 1);
        t->tok_off[id] = (int64_t)off;
        t->tok_len[id] = (uint32_t)l;
        off += l + 1;
        size_t h = hash_bytes(it->string, l) & t->vhash_mask;
        while (t->vhash[h] >= 0) h = (h + 1) & t->vhash_mask;
        t->vhash[h] = id;
    }
    /* Added tokens: they take over the id's string (HF's added vocabulary wins for id_to_token). */
    t->n_added = (size_t)cJSON_GetArraySize(added);
    t->added = xcalloc(t->n_added, sizeof(tok_added));
    size_t k = 0;
    cJSON_ArrayForEach(it, added) {
        tok_added *a = &t->added[k++];
        const char *c = cJSON_GetObjectItemCaseSensitive(it, "content")->valuestring;
        a->len = strlen(c);
        a->content = xmalloc(a->len + 1);
        memcpy(a->content, c, a->len + 1);
        a->id = (int32_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble;
        a->special = json_bool(it, "special", false);
        a->lstrip = json_bool(it, "lstrip", false);
        a->rstrip = json_bool(it, "rstrip", false);
        a->normalized = json_bool(it, "normalized", !a->special);
        a->single_word = json_bool(it, "single_word", false);
        t->is_special[a->id] = a->special;
        if (a->len) t->added_first[(uint8_t)c[0]] |= a->normalized ? 2 : 1;
        if (t->tok_off[a->id] < 0 || t->tok_len[a->id] != a->len ||
            memcmp(t->arena + t->tok_off[a->id], c, a->len)) {
            memcpy(t->arena + off, c, a->len + 1);
            t->tok_off[a->id] = (int64_t)off;
            t->tok_len[a->id] = (uint32_t)a->len;
            off += a->len + 1;
            if (vocab_find(t, c, a->len) < 0) {
                size_t h = hash_bytes(c, a->len) & t->vhash_mask;
                while (t->vhash[h] >= 0) h = (h + 1) & t->vhash_mask;
                t->vhash[h] = a->id;
            }
        }
    }
    t->arena_len = off;
    return 0;
}

static int build_merges(vlm_tok *t, const cJSON *merges, char *err, size_t errlen) {
    size_t n = (size_t)cJSON_GetArraySize(merges);
    size_t cap = 16;
    while (cap < n * 2) cap *= 2;
    t->mkeys = xmalloc(cap * sizeof(uint64_t));
    t->mrank = xmalloc(cap * sizeof(int32_t));
    t->mnew = xmalloc(cap * sizeof(int32_t));
    memset(t->mrank, 0xff, cap * sizeof(int32_t));
    t->mmask = cap - 1;
    char buf[1024];
    int32_t rank = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, merges) {
        const char *a, *b;
        size_t la, lb;
        if (cJSON_IsString(it)) { /* "a b" */
            const char *s = it->valuestring, *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                set_err(err, errlen, "merge %d is not of the form \"a b\": %s", rank, s);
                return -1;
            }
            a = s; la = (size_t)(sp - s); b = sp + 1; lb = strlen(b);
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(it->child) &&
                   cJSON_IsString(it->child->next)) {
            a = it->child->valuestring; la = strlen(a);
            b = it->child->next->valuestring; lb = strlen(b);
        } else {
            set_err(err, errlen, "merge %d is neither \"a b\" nor [\"a\",\"b\"]", rank);
            return -1;
        }
        if (la + lb >= sizeof buf) {
            set_err(err, errlen, "merge %d too long", rank);
            return -1;
        }
        int32_t ia = vocab_find(t, a, la), ib = vocab_find(t, b, lb);
        memcpy(buf, a, la);
        memcpy(buf + la, b, lb);
        int32_t in = vocab_find(t, buf, la + lb);
        if (ia < 0 || ib < 0 || in < 0) {
            set_err(err, errlen, "merge %d refers to a token missing from the vocab", rank);
            return -1;
        }
        merge_put(t, ia, ib, rank, in);
        rank++;
    }
    return 0;
}

static void build_decode(vlm_tok *t) {
    uint32_t b2cp[256];
    byte_map(b2cp);
    int32_t cp2b[324];
    for (int i = 0; i < 324; i++) cp2b[i] = -1;
    for (int b = 0; b < 256; b++) cp2b[b2cp[b]] = b;
    sbuf out = {0};
    t->dec_off = xmalloc(((size_t)t->n_vocab_slots + 1) * sizeof(int64_t));
    for (int32_t id = 0; id < t->n_vocab_slots; id++) {
        t->dec_off[id] = (int64_t)out.n;
        if (t->tok_off[id] >= 0) token_bytes(t->arena + t->tok_off[id], t->tok_len[id], cp2b, &out);
    }
    t->dec_off[t->n_vocab_slots] = (int64_t)out.n;
    t->dec_arena = (uint8_t *)out.p;
    for (int b = 0; b < 256; b++) {
        char u[4];
        int k = put_utf8(b2cp[b], u);
        t->byte_id[b] = vocab_find(t, u, (size_t)k);
    }
}

static char *load_template(const char *dir) {
    char path[4096];
    char *tmpl = NULL;
    if (snprintf(path, sizeof path, "%s/chat_template.json", dir) >= (int)sizeof path) return NULL;
    char *txt = read_file(path, NULL, NULL, 0);
    if (txt) {
        cJSON *j = cJSON_Parse(txt);
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "chat_template");
        if (cJSON_IsString(c)) tmpl = strdup(c->valuestring);
        cJSON_Delete(j);
        free(txt);
        if (tmpl) return tmpl;
    }
    if (snprintf(path, sizeof path, "%s/tokenizer_config.json", dir) >= (int)sizeof path) return NULL;
    txt = read_file(path, NULL, NULL, 0);
    if (txt) {
        cJSON *j = cJSON_Parse(txt);
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "chat_template");
        if (cJSON_IsString(c)) tmpl = strdup(c->valuestring);
        cJSON_Delete(j);
        free(txt);
    }
    return tmpl;
}

int vlm_tok_load(const char *path, vlm_tok **out, char *err, size_t errlen) {
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0) {
        set_err(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    char file[4096], dir[4096];
    if (S_ISDIR(st.st_mode)) {
        snprintf(file, sizeof file, "%s/tokenizer.json", path);
        snprintf(dir, sizeof dir, "%s", path);
    } else {
        snprintf(file, sizeof file, "%s", path);
        snprintf(dir, sizeof dir, "%s", path);
        char *sl = strrchr(dir, '/');
        if (sl) *sl = 0;
        else snprintf(dir, sizeof dir, ".");
    }
    size_t len;
    char *txt = read_file(file, &len, err, errlen);
    if (!txt) return -1;
    cJSON *j = cJSON_ParseWithLength(txt, len);
    free(txt);
    if (!j) {
        set_err(err, errlen, "%s is not valid JSON", file);
        return -1;
    }
    vlm_tok *t = xcalloc(1, sizeof *t);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    const cJSON *mtype = cJSON_GetObjectItemCaseSensitive(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    int rc = -1;
    if (!model || (mtype && (!cJSON_IsString(mtype) || strcmp(mtype->valuestring, "BPE")))) {
        set_err(err, errlen, "%s: only BPE models are supported", file);
        goto done;
    }
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges)) {
        set_err(err, errlen, "%s: model.vocab / model.merges missing", file);
        goto done;
    }
    if (json_bool(model, "byte_fallback", false)) {
        set_err(err, errlen, "%s: byte_fallback BPE is not supported", file);
        goto done;
    }
    if (build_vocab(t, vocab, cJSON_GetObjectItemCaseSensitive(j, "added_tokens"), err, errlen)) goto done;
    if (build_merges(t, merges, err, errlen)) goto done;
    if (load_normalizer(t, cJSON_GetObjectItemCaseSensitive(j, "normalizer"), err, errlen)) goto done;
    if (load_pretok(t, cJSON_GetObjectItemCaseSensitive(j, "pre_tokenizer"), err, errlen)) goto done;
    if (load_postproc(t, cJSON_GetObjectItemCaseSensitive(j, "post_processor"), err, errlen)) goto done;
    build_decode(t);
    for (int b = 0; b < 256; b++) {
        if (t->byte_id[b] < 0) {
            set_err(err, errlen, "%s: vocab lacks the byte-level token for byte %d", file, b);
            goto done;
        }
    }
    t->chat_template = load_template(dir);
    t->cache = xcalloc(TOK_CACHE_SHARDS, sizeof(tok_cache_shard));
    for (int i = 0; i < TOK_CACHE_SHARDS; i++) pthread_mutex_init(&t->cache[i].mu, NULL);
    rc = 0;
done:
    cJSON_Delete(j);
    if (rc) vlm_tok_free(t);
    else *out = t;
    return rc;
}

void vlm_tok_free(vlm_tok *t) {
    if (!t) return;
    free(t->arena);
    free(t->tok_off);
    free(t->tok_len);
    free(t->vhash);
    free(t->dec_arena);
    free(t->dec_off);
    free(t->mkeys);
    free(t->mrank);
    free(t->mnew);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    free(t->is_special);
    if (t->re) pcre2_code_free(t->re);
    free(t->pre_ids);
    free(t->post_ids);
    free(t->chat_template);
    if (t->cache) {
        for (int s = 0; s < TOK_CACHE_SHARDS; s++) {
            for (int i = 0; i < TOK_CACHE_SLOTS; i++) free(t->cache[s].slots[i].blob);
            pthread_mutex_destroy(&t->cache[s].mu);
        }
        free(t->cache);
    }
    free(t);
}

int32_t vlm_tok_vocab_size(const vlm_tok *t) { return t->n_vocab_slots; }

int32_t vlm_tok_token_id(const vlm_tok *t, const char *s) {
    size_t n = strlen(s);
    for (size_t i = 0; i < t->n_added; i++)
        if (t->added[i].len == n && !memcmp(t->added[i].content, s, n)) return t->added[i].id;
    return vocab_find(t, s, n);
}

bool vlm_tok_is_special(const vlm_tok *t, int32_t id) {
    return id >= 0 && id < t->n_vocab_slots && t->is_special[id];
}

void vlm_ids_free(vlm_ids *v) {
    if (!v) return;
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

static void ids_push(vlm_ids *v, int32_t id) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 64;
        v->ids = xrealloc(v->ids, v->cap * sizeof(int32_t));
    }
    v->ids[v->n++] = id;
}

/* ---- BPE ---------------------------------------------------------------------------------- */

typedef struct {
    int32_t rank, pos; /* heap order: (rank, pos) */
    int32_t a, b;      /* ids the pair had when pushed; stale entries are detected by mismatch */
    int32_t nid;
} heap_ent;

static inline bool he_less(const heap_ent *x, const heap_ent *y) {
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}
static void heap_push(heap_ent *h, size_t *n, heap_ent e) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!he_less(&e, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}
static heap_ent heap_pop(heap_ent *h, size_t *n) {
    heap_ent top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const heap_ent *mv = &last;
        if (l < *n && he_less(&h[l], mv)) { m = l; mv = &h[l]; }
        if (r < *n && he_less(&h[r], mv)) { m = r; }
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (*n) h[i] = last;
    return top;
}

typedef struct {
    int32_t *id, *prev, *next;
    heap_ent *heap;
    size_t cap;
} bpe_work;

static void bpe_reserve(bpe_work *w, size_t n) {
    if (n <= w->cap) return;
    size_t c = w->cap ? w->cap : 64;
    while (c < n) c *= 2;
    w->id = xrealloc(w->id, c * sizeof(int32_t));
    w->prev = xrealloc(w->prev, c * sizeof(int32_t));
    w->next = xrealloc(w->next, c * sizeof(int32_t));
    w->heap = xrealloc(w->heap, 2 * c * sizeof(heap_ent));
    w->cap = c;
}

static void bpe_try_push(const vlm_tok *t, bpe_work *w, size_t *hn, int32_t pos) {
    int32_t nx = w->next[pos];
    if (nx < 0) return;
    int32_t nid, r = merge_get(t, w->id[pos], w->id[nx], &nid);
    if (r < 0) return;
    heap_push(w->heap, hn, (heap_ent){r, pos, w->id[pos], w->id[nx], nid});
}

/* Merges the bytes s[0..n) (n >= 2) into ids appended to out. Equivalent to HF's word merge loop:
 * always apply the lowest-rank pair, leftmost first among equal ranks. */
static void bpe_word(const vlm_tok *t, const uint8_t *s, size_t n, bpe_work *w, vlm_ids *out) {
    bpe_reserve(w, n);
    for (size_t i = 0; i < n; i++) {
        w->id[i] = t->byte_id[s[i]];
        w->prev[i] = (int32_t)i - 1;
        w->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    size_t hn = 0;
    for (size_t i = 0; i + 1 < n; i++) bpe_try_push(t, w, &hn, (int32_t)i);
    while (hn) {
        heap_ent e = heap_pop(w->heap, &hn);
        int32_t p = e.pos, nx = w->next[p];
        if (w->id[p] != e.a || nx < 0 || w->id[nx] != e.b) continue; /* stale */
        w->id[p] = e.nid;
        int32_t nn = w->next[nx];
        w->next[p] = nn;
        if (nn >= 0) w->prev[nn] = p;
        w->id[nx] = -1;
        if (w->prev[p] >= 0) bpe_try_push(t, w, &hn, w->prev[p]);
        bpe_try_push(t, w, &hn, p);
    }
    for (int32_t p = 0; p >= 0; p = w->next[p]) ids_push(out, w->id[p]);
}

static bool cache_get(const vlm_tok *t, const uint8_t *s, size_t n, uint64_t h, vlm_ids *out) {
    tok_cache_shard *sh = &t->cache[h % TOK_CACHE_SHARDS];
    bool hit = false;
    pthread_mutex_lock(&sh->mu);
    size_t i = (h >> 8) & (TOK_CACHE_SLOTS - 1);
    for (;;) {
        tok_cache_slot *sl = &sh->slots[i];
        if (!sl->blob) break;
        if (sl->hash == h && sl->klen == n && !memcmp(sl->blob, s, n)) {
            const uint8_t *p = sl->blob + n;
            for (size_t k = 0; k < sl->nids; k++) {
                int32_t id;
                memcpy(&id, p + 4 * k, 4);
                ids_push(out, id);
            }
            hit = true;
            break;
        }
        i = (i + 1) & (TOK_CACHE_SLOTS - 1);
    }
    pthread_mutex_unlock(&sh->mu);
    return hit;
}

static void cache_put(const vlm_tok *t, const uint8_t *s, size_t n, uint64_t h, const int32_t *ids, size_t nids) {
    tok_cache_shard *sh = &t->cache[h % TOK_CACHE_SHARDS];
    pthread_mutex_lock(&sh->mu);
    if (sh->used * 2 >= TOK_CACHE_SLOTS) {
        for (int i = 0; i < TOK_CACHE_SLOTS; i++) {
            free(sh->slots[i].blob);
            sh->slots[i].blob = NULL;
        }
        sh->used = 0;
    }
    size_t i = (h >> 8) & (TOK_CACHE_SLOTS - 1);
    while (sh->slots[i].blob) {
        if (sh->slots[i].hash == h && sh->slots[i].klen == n && !memcmp(sh->slots[i].blob, s, n)) goto out;
        i = (i + 1) & (TOK_CACHE_SLOTS - 1);
    }
    uint8_t *blob = xmalloc(n + 4 * nids);
    memcpy(blob, s, n);
    memcpy(blob + n, ids, 4 * nids);
    sh->slots[i] = (tok_cache_slot){h, blob, (uint16_t)n, (uint16_t)nids};
    sh->used++;
out:
    pthread_mutex_unlock(&sh->mu);
}

static void encode_piece(const vlm_tok *t, const uint8_t *s, size_t n, bpe_work *w, vlm_ids *out) {
    if (n == 0) return;
    if (n == 1) {
        ids_push(out, t->byte_id[s[0]]);
        return;
    }
    /* Whole piece already a token (most words): HF's BPE ends there as well because every token
     * of a byte-level vocab is reachable by merges; checked against the fixtures. */
    bool cacheable = n <= TOK_CACHE_MAX_WORD;
    uint64_t h = 0;
    if (cacheable) {
        h = hash_bytes(s, n);
        if (cache_get(t, s, n, h, out)) return;
    }
    size_t start = out->n;
    bpe_word(t, s, n, w, out);
    if (cacheable) cache_put(t, s, n, h, out->ids + start, out->n - start);
}

/* ---- pre-tokenize + BPE over one normalised segment ------------------------------------- */

typedef struct {
    bpe_work w;
    pcre2_match_data *md;
} enc_ctx;

static int encode_segment(const vlm_tok *t, const char *s, size_t n, enc_ctx *c, vlm_ids *out,
                          char *err, size_t errlen) {
    if (!t->re) {
        encode_piece(t, (const uint8_t *)s, n, &c->w, out);
        return 0;
    }
    size_t pos = 0, last = 0;
    while (pos < n) {
        int rc = t->re_jit ? pcre2_jit_match(t->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, c->md, NULL)
                           : pcre2_match(t->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, c->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            set_err(err, errlen, "pre-tokenizer regex failed (pcre2 error %d)", rc);
            return -1;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > last) encode_piece(t, (const uint8_t *)s + last, ms - last, &c->w, out);
        if (me == ms) { /* empty match: step one character so the loop progresses */
            pos = ms + 1;
            while (pos < n && ((uint8_t)s[pos] & 0xC0) == 0x80) pos++;
            last = ms;
            continue;
        }
        encode_piece(t, (const uint8_t *)s + ms, me - ms, &c->w, out);
        pos = last = me;
    }
    if (last < n) encode_piece(t, (const uint8_t *)s + last, n - last, &c->w, out);
    return 0;
}

static bool is_ascii(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((uint8_t)s[i] >= 0x80) return false;
    return true;
}

/* Unicode White_Space (what Rust's regex \s matches; HF strips it for lstrip/rstrip). */
static bool is_uspace(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
           c == 0x3000;
}
/* Rust regex \w: alphabetic, marks, decimal digits, connector punctuation, joiners. */
static bool is_uword(uint32_t c) {
    if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (c == 0x200C || c == 0x200D) return true;
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) || k == UTF8PROC_CATEGORY_NL ||
           (k >= UTF8PROC_CATEGORY_MN && k <= UTF8PROC_CATEGORY_ME) || k == UTF8PROC_CATEGORY_ND ||
           k == UTF8PROC_CATEGORY_PC;
}
/* The code point ending at s[at) (valid UTF-8), its start in *start. */
static uint32_t cp_before(const char *s, size_t at, size_t *start) {
    size_t i = at - 1;
    while (i > 0 && ((uint8_t)s[i] & 0xC0) == 0x80) i--;
    utf8proc_int32_t cp = 0;
    utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(at - i), &cp);
    *start = i;
    return (uint32_t)cp;
}
static uint32_t cp_at(const char *s, size_t n, size_t at, size_t *len) {
    utf8proc_int32_t cp = 0;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + at, (utf8proc_ssize_t)(n - at), &cp);
    *len = k > 0 ? (size_t)k : 1;
    return (uint32_t)cp;
}

/* Finds the next added token (of the given normalized class) in s[from..n) the way HF's
 * AddedVocabulary does: Aho-Corasick leftmost-longest, non-overlapping matches; a single_word
 * match touching a word character is dropped (scanning resumes after it, so no shorter token at
 * the same place is tried); lstrip/rstrip widen the span over Unicode whitespace (lstrip never
 * before `from`). Returns the token index or -1; *ms and *me receive the span. */
static long find_added(const vlm_tok *t, const char *s, size_t n, size_t from, bool normalized,
                       size_t *ms, size_t *me) {
    const uint8_t bit = normalized ? 2 : 1;
    for (size_t i = from; i < n; i++) {
        if (!(t->added_first[(uint8_t)s[i]] & bit)) continue; /* cheap skip: no token starts here */
        long best = -1;
        for (size_t k = 0; k < t->n_added; k++) {
            const tok_added *a = &t->added[k];
            if (a->normalized != normalized || a->len == 0 || a->len > n - i) continue;
            if ((uint8_t)s[i] != (uint8_t)a->content[0] || memcmp(s + i, a->content, a->len)) continue;
            if (best < 0 || a->len > t->added[best].len) best = (long)k;
        }
        if (best < 0) continue;
        const tok_added *a = &t->added[best];
        size_t b = i, e = i + a->len, l;
        if (a->single_word) {
            bool word_before = b > 0 && is_uword(cp_before(s, b, &l));
            bool word_after = e < n && is_uword(cp_at(s, n, e, &l));
            if (word_before || word_after) {
                i = e - 1; /* matches do not overlap: resume after this one */
                continue;
            }
        }
        if (a->lstrip)
            while (b > from) {
                size_t st;
                if (!is_uspace(cp_before(s, b, &st))) break;
                b = st;
            }
        if (a->rstrip)
            while (e < n && is_uspace(cp_at(s, n, e, &l))) e += l;
        *ms = b;
        *me = e;
        return best;
    }
    return -1;
}

/* Normalised-text level: split on normalized added tokens, encode the rest. */
static int encode_normalized(const vlm_tok *t, const char *s, size_t n, enc_ctx *c, vlm_ids *out,
                             char *err, size_t errlen, bool any_norm_added) {
    size_t pos = 0;
    while (any_norm_added && pos < n) {
        size_t ms, me;
        long k = find_added(t, s, n, pos, true, &ms, &me);
        if (k < 0) break;
        if (encode_segment(t, s + pos, ms - pos, c, out, err, errlen)) return -1;
        ids_push(out, t->added[k].id);
        pos = me;
    }
    return encode_segment(t, s + pos, n - pos, c, out, err, errlen);
}

static int encode_raw_segment(const vlm_tok *t, const char *s, size_t n, enc_ctx *c, vlm_ids *out,
                              char *err, size_t errlen, bool any_norm_added) {
    if (n == 0) return 0;
    if (!t->has_nfc || is_ascii(s, n)) return encode_normalized(t, s, n, c, out, err, errlen, any_norm_added);
    utf8proc_uint8_t *nfc = NULL;
    utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &nfc,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (m < 0) {
        set_err(err, errlen, "NFC normalisation failed: %s", utf8proc_errmsg(m));
        return -1;
    }
    int rc = encode_normalized(t, (const char *)nfc, (size_t)m, c, out, err, errlen, any_norm_added);
    free(nfc);
    return rc;
}

int vlm_tok_encode(const vlm_tok *t, const char *text, size_t len, bool add_special, vlm_ids *out,
                   char *err, size_t errlen) {
    size_t bad;
    if (!utf8_valid((const uint8_t *)text, len, &bad)) {
        set_err(err, errlen, "input is not valid UTF-8 (byte offset %zu)", bad);
        return -1;
    }
    enc_ctx c = {0};
    c.md = pcre2_match_data_create(4, NULL);
    bool any_norm = false, any_raw = false;
    for (size_t k = 0; k < t->n_added; k++) {
        if (t->added[k].normalized) any_norm = true;
        else any_raw = true;
    }
    int rc = 0;
    if (add_special)
        for (size_t i = 0; i < t->n_pre; i++) ids_push(out, t->pre_ids[i]);
    size_t pos = 0;
    while (any_raw && pos < len) {
        size_t ms, me;
        long k = find_added(t, text, len, pos, false, &ms, &me);
        if (k < 0) break;
        if ((rc = encode_raw_segment(t, text + pos, ms - pos, &c, out, err, errlen, any_norm))) goto done;
        ids_push(out, t->added[k].id);
        pos = me;
    }
    rc = encode_raw_segment(t, text + pos, len - pos, &c, out, err, errlen, any_norm);
    if (!rc && add_special)
        for (size_t i = 0; i < t->n_post; i++) ids_push(out, t->post_ids[i]);
done:
    pcre2_match_data_free(c.md);
    free(c.w.id);
    free(c.w.prev);
    free(c.w.next);
    free(c.w.heap);
    return rc;
}

/* ---- decoding ----------------------------------------------------------------------------- */

static bool id_ok(const vlm_tok *t, int32_t id) {
    return id >= 0 && id < t->n_vocab_slots && t->tok_off[id] >= 0;
}

char *vlm_tok_decode(const vlm_tok *t, const int32_t *ids, size_t n, bool skip_special, size_t *out_len) {
    sbuf raw = {0};
    for (size_t i = 0; i < n; i++) {
        if (!id_ok(t, ids[i])) {
            free(raw.p);
            return NULL;
        }
        if (skip_special && t->is_special[ids[i]]) continue;
        sb_put(&raw, t->dec_arena + t->dec_off[ids[i]], (size_t)(t->dec_off[ids[i] + 1] - t->dec_off[ids[i]]));
    }
    sbuf out = {0};
    sb_put(&out, "", 0);
    lossy_append((const uint8_t *)raw.p, raw.n, true, &out);
    free(raw.p);
    if (out_len) *out_len = out.n;
    return out.p;
}

struct vlm_detok {
    const vlm_tok *t;
    bool skip;
    uint8_t pend[8]; /* an incomplete UTF-8 prefix is at most 3 bytes */
    size_t npend;
};

vlm_detok *vlm_detok_new(const vlm_tok *t, bool skip_special) {
    vlm_detok *d = xcalloc(1, sizeof *d);
    d->t = t;
    d->skip = skip_special;
    return d;
}

static void detok_emit(vlm_detok *d, const uint8_t *s, size_t n, bool final, char **buf, size_t *len) {
    sbuf tmp = {0};
    sb_put(&tmp, d->pend, d->npend);
    sb_put(&tmp, s, n);
    sbuf out = {*buf, *len, *buf ? *len + 1 : 0};
    /* out.cap is unknown for a caller buffer; sb_put reallocs when needed, so claim only len+1. */
    size_t used = lossy_append((const uint8_t *)tmp.p, tmp.n, final, &out);
    d->npend = tmp.n - used;
    VLM_TOK_ASSERT(d->npend < sizeof d->pend);
    if (d->npend) memcpy(d->pend, tmp.p + used, d->npend);
    free(tmp.p);
    if (!out.p) { /* nothing appended and no buffer yet: hand back an empty string */
        out.p = xmalloc(1);
        out.p[0] = 0;
    }
    *buf = out.p;
    *len = out.n;
}

int vlm_detok_push(vlm_detok *d, int32_t id, char **buf, size_t *len) {
    if (!id_ok(d->t, id)) return -1;
    if (d->skip && d->t->is_special[id]) {
        detok_emit(d, NULL, 0, false, buf, len);
        return 0;
    }
    const vlm_tok *t = d->t;
    detok_emit(d, t->dec_arena + t->dec_off[id], (size_t)(t->dec_off[id + 1] - t->dec_off[id]), false, buf, len);
    return 0;
}

int vlm_detok_flush(vlm_detok *d, char **buf, size_t *len) {
    detok_emit(d, NULL, 0, true, buf, len);
    d->npend = 0;
    return 0;
}

void vlm_detok_free(vlm_detok *d) { free(d); }
