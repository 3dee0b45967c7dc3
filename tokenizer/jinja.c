/* jinja.c — a small Jinja2 subset interpreter for the chat templates models ship in
 * tokenizer_config.json / chat_template.json, rendering the way transformers' apply_chat_template
 * does (trim_blocks and lstrip_blocks on, `-` whitespace control, raise_exception, namespace).
 *
 * Supported: {{ expr }}, {% if/elif/else %}, {% for x in xs %} (also `for a, b in`, loop.index,
 * index0, first, last, length, revindex), {% set x = e %} and {% set ns.attr = e %}, comments,
 * break/continue; expressions with literals, lists, dicts, names, .attr, [i], [a:b:c], calls,
 * filters (length, trim, string, lower, upper, first, last, tojson for strings/numbers/lists/dicts),
 * tests (defined, undefined, none, string, number, mapping, sequence, iterable, true, false),
 * `not and or in not-in == != < > <= >= + - * / // % ~`, string methods (startswith, endswith,
 * split, strip, lstrip, rstrip, upper, lower, replace) and dict get/items/keys.
 * All values live in one arena per render and are freed together. */
#include <ctype.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/jinja.h"
#include "tokenizer/tok_internal.h"

/* ---- arena + values ----------------------------------------------------------------------- */

typedef struct arena_blk {
    struct arena_blk *next;
    size_t used, cap;
    char data[];
} arena_blk;

typedef struct {
    arena_blk *head;
    jmp_buf fail;
    char *err;
    size_t errlen;
} jctx;

static void *jalloc(jctx *c, size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (!c->head || c->head->used + n > c->head->cap) {
        size_t cap = n > 65536 ? n : 65536;
        arena_blk *b = malloc(sizeof *b + cap);
        VLM_TOK_ASSERT(b != NULL);
        b->next = c->head;
        b->used = 0;
        b->cap = cap;
        c->head = b;
    }
    void *p = c->head->data + c->head->used;
    c->head->used += n;
    memset(p, 0, n);
    return p;
}

static void jfail(jctx *c, const char *fmt, ...) {
    if (c->err && c->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, c->errlen, fmt, ap);
        va_end(ap);
    }
    longjmp(c->fail, 1);
}

typedef enum { V_UNDEF, V_NONE, V_BOOL, V_INT, V_STR, V_LIST, V_DICT, V_FUNC } vkind;
typedef struct jval jval;
typedef jval *(*jfunc)(jctx *c, jval *self, jval **args, int nargs);
struct jval {
    vkind k;
    bool ns; /* namespace object (attribute assignment allowed) */
    long long i;
    const char *s;
    size_t slen;
    jval **items; /* list items, or dict values */
    const char **keys;
    size_t n, cap;
    jfunc fn;
    jval *self;
};

static jval UNDEF = {.k = V_UNDEF};
static jval NONEV = {.k = V_NONE};

static jval *mk(jctx *c, vkind k) {
    jval *v = jalloc(c, sizeof *v);
    v->k = k;
    return v;
}
static jval *mk_str(jctx *c, const char *s, size_t n) {
    jval *v = mk(c, V_STR);
    char *p = jalloc(c, n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    v->s = p;
    v->slen = n;
    return v;
}
static jval *mk_int(jctx *c, long long i) {
    jval *v = mk(c, V_INT);
    v->i = i;
    return v;
}
static jval *mk_bool(jctx *c, bool b) {
    jval *v = mk(c, V_BOOL);
    v->i = b;
    return v;
}
static void list_push(jctx *c, jval *l, jval *x) {
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 8;
        jval **ni = jalloc(c, nc * sizeof *ni);
        if (l->n) memcpy(ni, l->items, l->n * sizeof *ni);
        l->items = ni;
        if (l->k == V_DICT) {
            const char **nk = jalloc(c, nc * sizeof *nk);
            if (l->n) memcpy(nk, l->keys, l->n * sizeof *nk);
            l->keys = nk;
        }
        l->cap = nc;
    }
    l->items[l->n++] = x;
}
static jval *dict_get(jval *d, const char *k) {
    for (size_t i = 0; i < d->n; i++)
        if (!strcmp(d->keys[i], k)) return d->items[i];
    return NULL;
}
static void dict_set(jctx *c, jval *d, const char *k, jval *v) {
    for (size_t i = 0; i < d->n; i++)
        if (!strcmp(d->keys[i], k)) {
            d->items[i] = v;
            return;
        }
    list_push(c, d, v);
    d->keys[d->n - 1] = k;
}

static bool truthy(const jval *v) {
    switch (v->k) {
    case V_UNDEF: case V_NONE: return false;
    case V_BOOL: case V_INT: return v->i != 0;
    case V_STR: return v->slen > 0;
    case V_LIST: case V_DICT: return v->n > 0 || v->ns;
    default: return true;
    }
}

/* ---- output buffer ------------------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t n, cap;
} obuf;
static void ob_put(obuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap * 2 : 1024;
        while (c < b->n + n + 1) c *= 2;
        char *np = realloc(b->p, c);
        VLM_TOK_ASSERT(np != NULL);
        b->p = np;
        b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void json_str(obuf *b, const char *s, size_t n) {
    ob_put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char e[8];
        if (ch == '"' || ch == '\\') { e[0] = '\\'; e[1] = (char)ch; ob_put(b, e, 2); }
        else if (ch == '\n') ob_put(b, "\\n", 2);
        else if (ch == '\t') ob_put(b, "\\t", 2);
        else if (ch == '\r') ob_put(b, "\\r", 2);
        else if (ch < 0x20) { snprintf(e, sizeof e, "\\u%04x", ch); ob_put(b, e, 6); }
        else if (ch >= 0x80) { /* Python json.dumps ensure_ascii=False keeps UTF-8 as is */ ob_put(b, (const char *)&s[i], 1); }
        else ob_put(b, (const char *)&s[i], 1);
    }
    ob_put(b, "\"", 1);
}

static void to_json(obuf *b, const jval *v) {
    char num[32];
    switch (v->k) {
    case V_STR: json_str(b, v->s, v->slen); break;
    case V_INT: snprintf(num, sizeof num, "%lld", v->i); ob_put(b, num, strlen(num)); break;
    case V_BOOL: ob_put(b, v->i ? "true" : "false", v->i ? 4 : 5); break;
    case V_LIST:
        ob_put(b, "[", 1);
        for (size_t i = 0; i < v->n; i++) {
            if (i) ob_put(b, ", ", 2);
            to_json(b, v->items[i]);
        }
        ob_put(b, "]", 1);
        break;
    case V_DICT:
        ob_put(b, "{", 1);
        for (size_t i = 0; i < v->n; i++) {
            if (i) ob_put(b, ", ", 2);
            json_str(b, v->keys[i], strlen(v->keys[i]));
            ob_put(b, ": ", 2);
            to_json(b, v->items[i]);
        }
        ob_put(b, "}", 1);
        break;
    default: ob_put(b, "null", 4);
    }
}

static void to_text(obuf *b, const jval *v) {
    char num[32];
    switch (v->k) {
    case V_UNDEF: break;
    case V_NONE: ob_put(b, "None", 4); break;
    case V_BOOL: ob_put(b, v->i ? "True" : "False", v->i ? 4 : 5); break;
    case V_INT: snprintf(num, sizeof num, "%lld", v->i); ob_put(b, num, strlen(num)); break;
    case V_STR: ob_put(b, v->s, v->slen); break;
    default: to_json(b, v); break; /* Python repr differs; templates do not print containers */
    }
}

static jval *stringify(jctx *c, const jval *v) {
    if (v->k == V_STR) return (jval *)v;
    obuf b = {0};
    to_text(&b, v);
    jval *r = mk_str(c, b.p ? b.p : "", b.n);
    free(b.p);
    return r;
}

/* ---- lexer: template -> text / tag chunks -------------------------------------------------- */

typedef enum { N_TEXT, N_OUT, N_IF, N_FOR, N_SET, N_BREAK, N_CONTINUE } nkind;
typedef struct expr expr;
typedef struct node node;
struct node {
    nkind k;
    const char *text;
    size_t tlen;
    expr *e;          /* OUT value, IF cond, FOR iterable, SET value */
    node **body, **els;
    size_t nbody, nels;
    const char *var, *var2; /* FOR targets; SET name */
    const char *attr;       /* SET ns.attr */
};

typedef enum { T_EOF, T_NAME, T_STR, T_INT, T_OP } ttype;
typedef struct {
    ttype t;
    const char *s;
    size_t n;
    long long iv;
} tok_t;

typedef struct {
    jctx *c;
    const char *src;
    size_t len, pos;
    /* expression-level token stream within a tag */
    const char *tp, *tend;
    tok_t cur;
} parser;

static void lex_next(parser *p) {
    const char *s = p->tp;
    while (s < p->tend && isspace((unsigned char)*s)) s++;
    tok_t t = {T_EOF, s, 0, 0};
    if (s >= p->tend) {
        p->cur = t;
        p->tp = s;
        return;
    }
    if (isalpha((unsigned char)*s) || *s == '_') {
        const char *e = s;
        while (e < p->tend && (isalnum((unsigned char)*e) || *e == '_')) e++;
        t.t = T_NAME;
        t.n = (size_t)(e - s);
        p->tp = e;
    } else if (isdigit((unsigned char)*s)) {
        const char *e = s;
        long long v = 0;
        while (e < p->tend && isdigit((unsigned char)*e)) v = v * 10 + (*e++ - '0');
        t.t = T_INT;
        t.iv = v;
        t.n = (size_t)(e - s);
        p->tp = e;
    } else if (*s == '"' || *s == '\'') {
        char q = *s;
        const char *e = s + 1;
        while (e < p->tend && *e != q) e += (*e == '\\' && e + 1 < p->tend) ? 2 : 1;
        if (e >= p->tend) jfail(p->c, "unterminated string literal in template");
        t.t = T_STR;
        t.s = s;
        t.n = (size_t)(e + 1 - s);
        p->tp = e + 1;
    } else {
        static const char *ops2[] = {"==", "!=", "<=", ">=", "//", "**"};
        t.t = T_OP;
        t.n = 1;
        for (size_t i = 0; i < sizeof ops2 / sizeof ops2[0]; i++)
            if (s + 1 < p->tend && s[0] == ops2[i][0] && s[1] == ops2[i][1]) t.n = 2;
        p->tp = s + t.n;
    }
    p->cur = t;
}

static bool is_op(parser *p, const char *op) {
    return p->cur.t == T_OP && p->cur.n == strlen(op) && !memcmp(p->cur.s, op, p->cur.n);
}
static bool is_kw(parser *p, const char *kw) {
    return p->cur.t == T_NAME && p->cur.n == strlen(kw) && !memcmp(p->cur.s, kw, p->cur.n);
}
static void expect_op(parser *p, const char *op) {
    if (!is_op(p, op)) jfail(p->c, "template: expected '%s' near '%.20s'", op, p->cur.s);
    lex_next(p);
}
static const char *take_name(parser *p) {
    if (p->cur.t != T_NAME) jfail(p->c, "template: expected a name near '%.20s'", p->cur.s);
    char *s = jalloc(p->c, p->cur.n + 1);
    memcpy(s, p->cur.s, p->cur.n);
    lex_next(p);
    return s;
}

/* ---- expressions -------------------------------------------------------------------------- */

typedef enum {
    E_LIT, E_NAME, E_ATTR, E_INDEX, E_SLICE, E_CALL, E_FILTER, E_TEST, E_NOT, E_NEG, E_BIN, E_AND, E_OR,
    E_LIST, E_DICT, E_COND
} ekind;
struct expr {
    ekind k;
    jval *lit;
    const char *name; /* NAME, ATTR attribute, FILTER/TEST name, BIN operator */
    expr *a, *b, *c2;
    expr **args;
    size_t nargs;
    bool neg; /* TEST is not / not in */
};

static expr *mk_e(parser *p, ekind k) {
    expr *e = jalloc(p->c, sizeof *e);
    e->k = k;
    return e;
}
static void e_addarg(parser *p, expr *e, expr *a) {
    expr **na = jalloc(p->c, (e->nargs + 1) * sizeof *na);
    if (e->nargs) memcpy(na, e->args, e->nargs * sizeof *na);
    na[e->nargs++] = a;
    e->args = na;
}

static expr *parse_expr(parser *p);

static jval *unescape(jctx *c, const char *s, size_t n) {
    char *o = jalloc(c, n + 1);
    size_t k = 0;
    for (size_t i = 1; i + 1 < n; i++) {
        if (s[i] == '\\' && i + 2 < n) {
            char e = s[++i];
            o[k++] = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        } else o[k++] = s[i];
    }
    jval *v = mk(c, V_STR);
    v->s = o;
    v->slen = k;
    return v;
}

static void parse_call_args(parser *p, expr *e) {
    expect_op(p, "(");
    while (!is_op(p, ")")) {
        /* keyword arguments (namespace(a=1)) are kept as a NAME-tagged pair: name in c2->name */
        if (p->cur.t == T_NAME) {
            const char *save = p->tp;
            tok_t st = p->cur;
            lex_next(p);
            if (is_op(p, "=")) {
                expr *kw = mk_e(p, E_LIT);
                char *nm = jalloc(p->c, st.n + 1);
                memcpy(nm, st.s, st.n);
                kw->name = nm;
                lex_next(p);
                kw->a = parse_expr(p);
                e_addarg(p, e, kw);
                if (is_op(p, ",")) lex_next(p);
                continue;
            }
            p->tp = save;
            p->cur = st;
        }
        e_addarg(p, e, parse_expr(p));
        if (is_op(p, ",")) lex_next(p);
        else if (!is_op(p, ")")) jfail(p->c, "template: expected ',' or ')' in call");
    }
    lex_next(p);
}

static expr *parse_primary(parser *p) {
    expr *e;
    if (p->cur.t == T_STR) {
        e = mk_e(p, E_LIT);
        e->lit = unescape(p->c, p->cur.s, p->cur.n);
        lex_next(p);
        while (p->cur.t == T_STR) { /* adjacent literals concatenate */
            jval *b = unescape(p->c, p->cur.s, p->cur.n);
            obuf o = {0};
            ob_put(&o, e->lit->s, e->lit->slen);
            ob_put(&o, b->s, b->slen);
            e->lit = mk_str(p->c, o.p, o.n);
            free(o.p);
            lex_next(p);
        }
    } else if (p->cur.t == T_INT) {
        e = mk_e(p, E_LIT);
        e->lit = mk_int(p->c, p->cur.iv);
        lex_next(p);
    } else if (p->cur.t == T_NAME) {
        if (is_kw(p, "true") || is_kw(p, "True")) { e = mk_e(p, E_LIT); e->lit = mk_bool(p->c, true); lex_next(p); }
        else if (is_kw(p, "false") || is_kw(p, "False")) { e = mk_e(p, E_LIT); e->lit = mk_bool(p->c, false); lex_next(p); }
        else if (is_kw(p, "none") || is_kw(p, "None")) { e = mk_e(p, E_LIT); e->lit = &NONEV; lex_next(p); }
        else { e = mk_e(p, E_NAME); e->name = take_name(p); }
    } else if (is_op(p, "(")) {
        lex_next(p);
        e = parse_expr(p);
        expect_op(p, ")");
    } else if (is_op(p, "[")) {
        lex_next(p);
        e = mk_e(p, E_LIST);
        while (!is_op(p, "]")) {
            e_addarg(p, e, parse_expr(p));
            if (is_op(p, ",")) lex_next(p);
        }
        lex_next(p);
    } else if (is_op(p, "{")) {
        lex_next(p);
        e = mk_e(p, E_DICT);
        while (!is_op(p, "}")) {
            e_addarg(p, e, parse_expr(p));
            expect_op(p, ":");
            e_addarg(p, e, parse_expr(p));
            if (is_op(p, ",")) lex_next(p);
        }
        lex_next(p);
    } else {
        jfail(p->c, "template: unexpected '%.20s'", p->cur.s);
        return NULL;
    }
    /* postfix */
    for (;;) {
        if (is_op(p, ".")) {
            lex_next(p);
            expr *a = mk_e(p, E_ATTR);
            a->a = e;
            a->name = take_name(p);
            e = a;
        } else if (is_op(p, "[")) {
            lex_next(p);
            expr *lo = NULL, *hi = NULL, *st = NULL;
            bool slice = false;
            if (!is_op(p, ":")) lo = parse_expr(p);
            if (is_op(p, ":")) {
                slice = true;
                lex_next(p);
                if (!is_op(p, "]") && !is_op(p, ":")) hi = parse_expr(p);
                if (is_op(p, ":")) {
                    lex_next(p);
                    if (!is_op(p, "]")) st = parse_expr(p);
                }
            }
            expect_op(p, "]");
            expr *x = mk_e(p, slice ? E_SLICE : E_INDEX);
            x->a = e;
            x->b = lo;
            x->c2 = hi;
            if (slice) {
                x->args = jalloc(p->c, sizeof *x->args);
                x->args[0] = st;
            }
            e = x;
        } else if (is_op(p, "(")) {
            expr *x = mk_e(p, E_CALL);
            x->a = e;
            parse_call_args(p, x);
            e = x;
        } else break;
    }
    return e;
}

static expr *parse_filtered(parser *p) {
    expr *e = parse_primary(p);
    while (is_op(p, "|")) {
        lex_next(p);
        expr *f = mk_e(p, E_FILTER);
        f->a = e;
        f->name = take_name(p);
        if (is_op(p, "(")) parse_call_args(p, f);
        e = f;
    }
    return e;
}

static expr *parse_unary(parser *p) {
    if (is_op(p, "-")) {
        lex_next(p);
        expr *e = mk_e(p, E_NEG);
        e->a = parse_unary(p);
        return e;
    }
    return parse_filtered(p);
}

static expr *parse_mul(parser *p) {
    expr *e = parse_unary(p);
    while (is_op(p, "*") || is_op(p, "/") || is_op(p, "//") || is_op(p, "%")) {
        expr *b = mk_e(p, E_BIN);
        b->name = is_op(p, "*") ? "*" : is_op(p, "/") ? "/" : is_op(p, "//") ? "//" : "%";
        lex_next(p);
        b->a = e;
        b->b = parse_unary(p);
        e = b;
    }
    return e;
}
static expr *parse_add(parser *p) {
    expr *e = parse_mul(p);
    while (is_op(p, "+") || is_op(p, "-") || is_op(p, "~")) {
        expr *b = mk_e(p, E_BIN);
        b->name = is_op(p, "+") ? "+" : is_op(p, "-") ? "-" : "~";
        lex_next(p);
        b->a = e;
        b->b = parse_mul(p);
        e = b;
    }
    return e;
}
static expr *parse_cmp(parser *p) {
    expr *e = parse_add(p);
    for (;;) {
        const char *op = NULL;
        bool neg = false;
        if (is_op(p, "==")) op = "==";
        else if (is_op(p, "!=")) op = "!=";
        else if (is_op(p, "<=")) op = "<=";
        else if (is_op(p, ">=")) op = ">=";
        else if (is_op(p, "<")) op = "<";
        else if (is_op(p, ">")) op = ">";
        else if (is_kw(p, "in")) op = "in";
        else if (is_kw(p, "not")) {
            const char *save = p->tp;
            tok_t st = p->cur;
            lex_next(p);
            if (is_kw(p, "in")) { op = "in"; neg = true; }
            else { p->tp = save; p->cur = st; break; }
        } else if (is_kw(p, "is")) {
            lex_next(p);
            expr *t = mk_e(p, E_TEST);
            if (is_kw(p, "not")) { t->neg = true; lex_next(p); }
            t->a = e;
            t->name = take_name(p);
            e = t;
            continue;
        }
        if (!op) break;
        lex_next(p);
        expr *b = mk_e(p, E_BIN);
        b->name = op;
        b->neg = neg;
        b->a = e;
        b->b = parse_add(p);
        e = b;
    }
    return e;
}
static expr *parse_not(parser *p) {
    if (is_kw(p, "not")) {
        lex_next(p);
        expr *e = mk_e(p, E_NOT);
        e->a = parse_not(p);
        return e;
    }
    return parse_cmp(p);
}
static expr *parse_and(parser *p) {
    expr *e = parse_not(p);
    while (is_kw(p, "and")) {
        lex_next(p);
        expr *b = mk_e(p, E_AND);
        b->a = e;
        b->b = parse_not(p);
        e = b;
    }
    return e;
}
static expr *parse_or(parser *p) {
    expr *e = parse_and(p);
    while (is_kw(p, "or")) {
        lex_next(p);
        expr *b = mk_e(p, E_OR);
        b->a = e;
        b->b = parse_and(p);
        e = b;
    }
    return e;
}
static expr *parse_expr(parser *p) {
    expr *e = parse_or(p);
    if (is_kw(p, "if")) { /* a if cond else b */
        lex_next(p);
        expr *x = mk_e(p, E_COND);
        x->a = e;
        x->b = parse_or(p);
        if (is_kw(p, "else")) {
            lex_next(p);
            x->c2 = parse_expr(p);
        }
        return x;
    }
    return e;
}

/* ---- statements --------------------------------------------------------------------------- */

typedef struct {
    const char *s;
    size_t n;
    bool is_tag; /* {% %} */
    bool is_out; /* {{ }} */
} chunk;

typedef struct {
    chunk *v;
    size_t n, pos;
} chunks;

/* Splits the template into text and tag chunks applying -, trim_blocks and lstrip_blocks. */
static chunks split_chunks(jctx *c, const char *src, size_t len) {
    chunks ch = {0};
    size_t cap = 64;
    ch.v = jalloc(c, cap * sizeof(chunk));
    size_t i = 0;
    bool trim_next_ws = false, trim_next_nl = false;
    while (i <= len) {
        const char *o = NULL;
        for (size_t k = i; k + 1 < len; k++)
            if (src[k] == '{' && (src[k + 1] == '{' || src[k + 1] == '%' || src[k + 1] == '#')) {
                o = src + k;
                break;
            }
        size_t tend = o ? (size_t)(o - src) : len;
        size_t ts = i;
        if (trim_next_ws)
            while (ts < tend && isspace((unsigned char)src[ts])) ts++;
        else if (trim_next_nl && ts < tend && src[ts] == '\n') ts++;
        size_t te = tend;
        if (o) {
            bool dash = o[2] == '-';
            bool block = o[1] != '{';
            if (dash) {
                while (te > ts && isspace((unsigned char)src[te - 1])) te--;
            } else if (block && o[2] != '+') {
                /* lstrip_blocks: a block tag alone after indentation drops that indentation */
                size_t k = tend;
                while (k > 0 && (src[k - 1] == ' ' || src[k - 1] == '\t')) k--;
                if (k == 0 || src[k - 1] == '\n') te = k > ts ? k : ts;
            }
        }
        if (ch.n + 2 > cap) {
            chunk *nv = jalloc(c, cap * 2 * sizeof(chunk));
            memcpy(nv, ch.v, ch.n * sizeof(chunk));
            ch.v = nv;
            cap *= 2;
        }
        if (te > ts) ch.v[ch.n++] = (chunk){src + ts, te - ts, false, false};
        if (!o) break;
        char kind = o[1];
        const char *close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
        const char *e = strstr(o + 2, close);
        if (!e) jfail(c, "template: unclosed tag");
        const char *in_s = o + 2, *in_e = e;
        if (*in_s == '-' || *in_s == '+') in_s++;
        bool rdash = in_e > in_s && in_e[-1] == '-';
        if (rdash) in_e--;
        if (kind != '#') ch.v[ch.n++] = (chunk){in_s, (size_t)(in_e - in_s), kind == '%', kind == '{'};
        trim_next_ws = rdash;
        trim_next_nl = kind != '{'; /* trim_blocks */
        i = (size_t)(e + 2 - src);
    }
    return ch;
}

static node **parse_body(parser *p, chunks *ch, size_t *nout, const char **stop, const char **which);

static bool tag_starts(const chunk *k, const char *kw) {
    const char *s = k->s, *e = k->s + k->n;
    while (s < e && isspace((unsigned char)*s)) s++;
    size_t l = strlen(kw);
    return (size_t)(e - s) >= l && !memcmp(s, kw, l) && (s + l == e || !(isalnum((unsigned char)s[l]) || s[l] == '_'));
}

static void begin_tag(parser *p, const chunk *k) {
    p->tp = k->s;
    p->tend = k->s + k->n;
    lex_next(p);
}

static void node_push(parser *p, node ***v, size_t *n, node *x) {
    node **nv = jalloc(p->c, (*n + 1) * sizeof *nv);
    if (*n) memcpy(nv, *v, *n * sizeof *nv);
    nv[(*n)++] = x;
    *v = nv;
}

static node *parse_if(parser *p, chunks *ch) {
    node *nd = jalloc(p->c, sizeof *nd);
    nd->k = N_IF;
    nd->e = parse_expr(p);
    static const char *stops[] = {"elif", "else", "endif", NULL};
    const char *which;
    nd->body = parse_body(p, ch, &nd->nbody, stops, &which);
    if (!strcmp(which, "elif")) {
        node *sub = parse_if(p, ch);
        node_push(p, &nd->els, &nd->nels, sub);
    } else if (!strcmp(which, "else")) {
        static const char *stops2[] = {"endif", NULL};
        nd->els = parse_body(p, ch, &nd->nels, stops2, &which);
    }
    return nd;
}

static node **parse_body(parser *p, chunks *ch, size_t *nout, const char **stop, const char **which) {
    node **v = NULL;
    size_t n = 0;
    while (ch->pos < ch->n) {
        chunk *k = &ch->v[ch->pos++];
        if (!k->is_tag && !k->is_out) {
            node *nd = jalloc(p->c, sizeof *nd);
            nd->k = N_TEXT;
            nd->text = k->s;
            nd->tlen = k->n;
            node_push(p, &v, &n, nd);
            continue;
        }
        if (k->is_out) {
            begin_tag(p, k);
            node *nd = jalloc(p->c, sizeof *nd);
            nd->k = N_OUT;
            nd->e = parse_expr(p);
            node_push(p, &v, &n, nd);
            continue;
        }
        for (int s = 0; stop && stop[s]; s++)
            if (tag_starts(k, stop[s])) {
                *which = stop[s];
                begin_tag(p, k);
                lex_next(p); /* past the keyword */
                *nout = n;
                return v;
            }
        begin_tag(p, k);
        node *nd = jalloc(p->c, sizeof *nd);
        if (is_kw(p, "if")) {
            lex_next(p);
            nd = parse_if(p, ch);
        } else if (is_kw(p, "for")) {
            lex_next(p);
            nd->k = N_FOR;
            nd->var = take_name(p);
            if (is_op(p, ",")) {
                lex_next(p);
                nd->var2 = take_name(p);
            }
            if (!is_kw(p, "in")) jfail(p->c, "template: expected 'in' in for");
            lex_next(p);
            nd->e = parse_or(p);
            static const char *stops[] = {"else", "endfor", NULL};
            const char *w;
            nd->body = parse_body(p, ch, &nd->nbody, stops, &w);
            if (!strcmp(w, "else")) {
                static const char *stops2[] = {"endfor", NULL};
                nd->els = parse_body(p, ch, &nd->nels, stops2, &w);
            }
        } else if (is_kw(p, "set")) {
            lex_next(p);
            nd->k = N_SET;
            nd->var = take_name(p);
            if (is_op(p, ".")) {
                lex_next(p);
                nd->attr = take_name(p);
            }
            expect_op(p, "=");
            nd->e = parse_expr(p);
        } else if (is_kw(p, "break")) {
            nd->k = N_BREAK;
        } else if (is_kw(p, "continue")) {
            nd->k = N_CONTINUE;
        } else {
            jfail(p->c, "template: unsupported tag '%.*s'", (int)(k->n < 30 ? k->n : 30), k->s);
        }
        node_push(p, &v, &n, nd);
    }
    if (stop) jfail(p->c, "template: missing {%% %s %%}", stop[0]);
    *nout = n;
    return v;
}

/* ---- evaluation --------------------------------------------------------------------------- */

typedef struct scope {
    struct scope *up;
    jval *vars; /* dict */
} scope;

typedef struct {
    jctx *c;
    obuf out;
    int brk; /* 1 break, 2 continue */
} rstate;

static jval *lookup(scope *s, const char *name) {
    for (; s; s = s->up) {
        jval *v = dict_get(s->vars, name);
        if (v) return v;
    }
    return &UNDEF;
}

static jval *eval(rstate *r, scope *s, expr *e);

static bool jequal(const jval *a, const jval *b) {
    if ((a->k == V_INT || a->k == V_BOOL) && (b->k == V_INT || b->k == V_BOOL)) return a->i == b->i;
    if (a->k != b->k) return false;
    if (a->k == V_STR) return a->slen == b->slen && !memcmp(a->s, b->s, a->slen);
    if (a->k == V_NONE || a->k == V_UNDEF) return true;
    if (a->k == V_LIST) {
        if (a->n != b->n) return false;
        for (size_t i = 0; i < a->n; i++)
            if (!jequal(a->items[i], b->items[i])) return false;
        return true;
    }
    return a == b;
}

static bool jcontains(jctx *c, const jval *hay, const jval *needle) {
    if (hay->k == V_STR) {
        if (needle->k != V_STR) jfail(c, "template: 'in <string>' needs a string");
        return memmem(hay->s, hay->slen, needle->s, needle->slen) != NULL;
    }
    if (hay->k == V_LIST) {
        for (size_t i = 0; i < hay->n; i++)
            if (jequal(hay->items[i], needle)) return true;
        return false;
    }
    if (hay->k == V_DICT) return needle->k == V_STR && dict_get((jval *)hay, needle->s) != NULL;
    if (hay->k == V_UNDEF) jfail(c, "template: 'in' on an undefined value");
    return false;
}

/* string methods */
static bool is_pyspace(char ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f'; }
static bool in_set(char ch, const jval *chars) {
    if (!chars || chars->k != V_STR) return is_pyspace(ch);
    return memchr(chars->s, ch, chars->slen) != NULL;
}
static jval *m_strip(jctx *c, jval *self, jval **a, int n, bool l, bool rr) {
    const char *s = self->s, *e = self->s + self->slen;
    const jval *chars = n > 0 ? a[0] : NULL;
    if (l) while (s < e && in_set(*s, chars)) s++;
    if (rr) while (e > s && in_set(e[-1], chars)) e--;
    return mk_str(c, s, (size_t)(e - s));
}
static jval *f_strip(jctx *c, jval *self, jval **a, int n) { return m_strip(c, self, a, n, true, true); }
static jval *f_lstrip(jctx *c, jval *self, jval **a, int n) { return m_strip(c, self, a, n, true, false); }
static jval *f_rstrip(jctx *c, jval *self, jval **a, int n) { return m_strip(c, self, a, n, false, true); }
static jval *f_startswith(jctx *c, jval *self, jval **a, int n) {
    if (n < 1 || a[0]->k != V_STR) jfail(c, "startswith needs a string");
    return mk_bool(c, self->slen >= a[0]->slen && !memcmp(self->s, a[0]->s, a[0]->slen));
}
static jval *f_endswith(jctx *c, jval *self, jval **a, int n) {
    if (n < 1 || a[0]->k != V_STR) jfail(c, "endswith needs a string");
    return mk_bool(c, self->slen >= a[0]->slen && !memcmp(self->s + self->slen - a[0]->slen, a[0]->s, a[0]->slen));
}
static jval *f_split(jctx *c, jval *self, jval **a, int n) {
    jval *l = mk(c, V_LIST);
    if (n < 1 || a[0]->k != V_STR || a[0]->slen == 0) { /* whitespace split */
        const char *s = self->s, *e = s + self->slen;
        while (s < e) {
            while (s < e && is_pyspace(*s)) s++;
            const char *w = s;
            while (s < e && !is_pyspace(*s)) s++;
            if (s > w) list_push(c, l, mk_str(c, w, (size_t)(s - w)));
        }
        return l;
    }
    const char *s = self->s, *e = s + self->slen;
    for (;;) {
        const char *f = memmem(s, (size_t)(e - s), a[0]->s, a[0]->slen);
        if (!f) break;
        list_push(c, l, mk_str(c, s, (size_t)(f - s)));
        s = f + a[0]->slen;
    }
    list_push(c, l, mk_str(c, s, (size_t)(e - s)));
    return l;
}
static jval *f_case(jctx *c, jval *self, bool up) {
    jval *v = mk_str(c, self->s, self->slen);
    char *p = (char *)v->s;
    for (size_t i = 0; i < v->slen; i++) p[i] = (char)(up ? toupper((unsigned char)p[i]) : tolower((unsigned char)p[i]));
    return v;
}
static jval *f_upper(jctx *c, jval *self, jval **a, int n) { (void)a; (void)n; return f_case(c, self, true); }
static jval *f_lower(jctx *c, jval *self, jval **a, int n) { (void)a; (void)n; return f_case(c, self, false); }
static jval *f_replace(jctx *c, jval *self, jval **a, int n) {
    if (n < 2 || a[0]->k != V_STR || a[1]->k != V_STR || !a[0]->slen) jfail(c, "replace needs two strings");
    obuf o = {0};
    const char *s = self->s, *e = s + self->slen;
    for (;;) {
        const char *f = memmem(s, (size_t)(e - s), a[0]->s, a[0]->slen);
        if (!f) break;
        ob_put(&o, s, (size_t)(f - s));
        ob_put(&o, a[1]->s, a[1]->slen);
        s = f + a[0]->slen;
    }
    ob_put(&o, s, (size_t)(e - s));
    jval *v = mk_str(c, o.p ? o.p : "", o.n);
    free(o.p);
    return v;
}
static jval *f_get(jctx *c, jval *self, jval **a, int n) {
    (void)c;
    if (n < 1 || a[0]->k != V_STR) return &NONEV;
    jval *v = dict_get(self, a[0]->s);
    return v ? v : n > 1 ? a[1] : &NONEV;
}
static jval *f_items(jctx *c, jval *self, jval **a, int n) {
    (void)a; (void)n;
    jval *l = mk(c, V_LIST);
    for (size_t i = 0; i < self->n; i++) {
        jval *pair = mk(c, V_LIST);
        list_push(c, pair, mk_str(c, self->keys[i], strlen(self->keys[i])));
        list_push(c, pair, self->items[i]);
        list_push(c, l, pair);
    }
    return l;
}
static jval *f_keys(jctx *c, jval *self, jval **a, int n) {
    (void)a; (void)n;
    jval *l = mk(c, V_LIST);
    for (size_t i = 0; i < self->n; i++) list_push(c, l, mk_str(c, self->keys[i], strlen(self->keys[i])));
    return l;
}

static jval *bound(jctx *c, jval *self, jfunc fn) {
    jval *v = mk(c, V_FUNC);
    v->fn = fn;
    v->self = self;
    return v;
}

static jval *get_attr(jctx *c, jval *o, const char *name) {
    if (o->k == V_DICT) {
        jval *v = dict_get(o, name);
        if (v) return v;
        if (!o->ns) {
            if (!strcmp(name, "get")) return bound(c, o, f_get);
            if (!strcmp(name, "items")) return bound(c, o, f_items);
            if (!strcmp(name, "keys")) return bound(c, o, f_keys);
        }
        return &UNDEF;
    }
    if (o->k == V_STR) {
        static const struct { const char *n; jfunc f; } m[] = {
            {"strip", f_strip}, {"lstrip", f_lstrip}, {"rstrip", f_rstrip}, {"startswith", f_startswith},
            {"endswith", f_endswith}, {"split", f_split}, {"upper", f_upper}, {"lower", f_lower},
            {"replace", f_replace},
        };
        for (size_t i = 0; i < sizeof m / sizeof m[0]; i++)
            if (!strcmp(name, m[i].n)) return bound(c, o, m[i].f);
    }
    return &UNDEF;
}

static jval *get_index(jctx *c, jval *o, jval *idx) {
    if (o->k == V_DICT) {
        if (idx->k != V_STR) return &UNDEF;
        jval *v = dict_get(o, idx->s);
        return v ? v : &UNDEF;
    }
    if ((o->k == V_LIST || o->k == V_STR) && idx->k == V_INT) {
        long long n = o->k == V_LIST ? (long long)o->n : (long long)o->slen, i = idx->i;
        if (i < 0) i += n;
        if (i < 0 || i >= n) return &UNDEF;
        return o->k == V_LIST ? o->items[i] : mk_str(c, o->s + i, 1);
    }
    if (o->k == V_UNDEF) jfail(c, "template: subscript of an undefined value");
    return &UNDEF;
}

static jval *do_slice(jctx *c, jval *o, jval *lo, jval *hi, jval *st) {
    long long n = o->k == V_LIST ? (long long)o->n : o->k == V_STR ? (long long)o->slen : -1;
    if (n < 0) jfail(c, "template: slice of a non-sequence");
    long long step = st && st->k == V_INT ? st->i : 1;
    if (step == 0) jfail(c, "template: slice step 0");
    long long a, b;
    if (step > 0) {
        a = lo && lo->k == V_INT ? lo->i : 0;
        b = hi && hi->k == V_INT ? hi->i : n;
        if (a < 0) a += n;
        if (b < 0) b += n;
        if (a < 0) a = 0;
        if (b > n) b = n;
    } else {
        a = lo && lo->k == V_INT ? lo->i : n - 1;
        b = hi && hi->k == V_INT ? hi->i : -n - 1;
        if (a < 0) a += n;
        if (b < 0) b += n;
        if (a >= n) a = n - 1;
    }
    if (o->k == V_LIST) {
        jval *l = mk(c, V_LIST);
        for (long long i = a; step > 0 ? i < b : i > b; i += step) list_push(c, l, o->items[i]);
        return l;
    }
    obuf ob = {0};
    for (long long i = a; step > 0 ? i < b : i > b; i += step) ob_put(&ob, o->s + i, 1);
    jval *v = mk_str(c, ob.p ? ob.p : "", ob.n);
    free(ob.p);
    return v;
}

static long long as_int(jctx *c, jval *v) {
    if (v->k == V_INT || v->k == V_BOOL) return v->i;
    jfail(c, "template: arithmetic on a non-number");
    return 0;
}

static jval *apply_filter(rstate *r, scope *s, expr *e) {
    jctx *c = r->c;
    jval *v = eval(r, s, e->a);
    const char *f = e->name;
    if (!strcmp(f, "length") || !strcmp(f, "count")) {
        if (v->k == V_STR) return mk_int(c, (long long)v->slen); /* bytes; templates only compare with 0 */
        if (v->k == V_LIST || v->k == V_DICT) return mk_int(c, (long long)v->n);
        jfail(c, "template: length of a non-sequence");
    }
    if (!strcmp(f, "trim")) {
        jval *sv = stringify(c, v);
        return f_strip(c, sv, NULL, 0);
    }
    if (!strcmp(f, "string")) return stringify(c, v);
    if (!strcmp(f, "lower")) return f_case(c, stringify(c, v), false);
    if (!strcmp(f, "upper")) return f_case(c, stringify(c, v), true);
    if (!strcmp(f, "first")) return v->k == V_LIST && v->n ? v->items[0] : &UNDEF;
    if (!strcmp(f, "last")) return v->k == V_LIST && v->n ? v->items[v->n - 1] : &UNDEF;
    if (!strcmp(f, "tojson")) {
        obuf o = {0};
        to_json(&o, v);
        jval *sv = mk_str(c, o.p ? o.p : "", o.n);
        free(o.p);
        return sv;
    }
    jfail(c, "template: unsupported filter '%s'", f);
    return NULL;
}

static jval *eval(rstate *r, scope *s, expr *e) {
    jctx *c = r->c;
    switch (e->k) {
    case E_LIT: return e->lit;
    case E_NAME: return lookup(s, e->name);
    case E_ATTR: {
        jval *o = eval(r, s, e->a);
        return get_attr(c, o, e->name);
    }
    case E_INDEX: return get_index(c, eval(r, s, e->a), eval(r, s, e->b));
    case E_SLICE:
        return do_slice(c, eval(r, s, e->a), e->b ? eval(r, s, e->b) : NULL, e->c2 ? eval(r, s, e->c2) : NULL,
                        e->args[0] ? eval(r, s, e->args[0]) : NULL);
    case E_FILTER: return apply_filter(r, s, e);
    case E_NOT: return mk_bool(c, !truthy(eval(r, s, e->a)));
    case E_NEG: return mk_int(c, -as_int(c, eval(r, s, e->a)));
    case E_AND: {
        jval *a = eval(r, s, e->a);
        return truthy(a) ? eval(r, s, e->b) : a;
    }
    case E_OR: {
        jval *a = eval(r, s, e->a);
        return truthy(a) ? a : eval(r, s, e->b);
    }
    case E_COND:
        if (truthy(eval(r, s, e->b))) return eval(r, s, e->a);
        return e->c2 ? eval(r, s, e->c2) : &UNDEF;
    case E_LIST: {
        jval *l = mk(c, V_LIST);
        for (size_t i = 0; i < e->nargs; i++) list_push(c, l, eval(r, s, e->args[i]));
        return l;
    }
    case E_DICT: {
        jval *d = mk(c, V_DICT);
        for (size_t i = 0; i + 1 < e->nargs; i += 2) {
            jval *k = stringify(c, eval(r, s, e->args[i]));
            dict_set(c, d, k->s, eval(r, s, e->args[i + 1]));
        }
        return d;
    }
    case E_TEST: {
        jval *v = eval(r, s, e->a);
        const char *t = e->name;
        bool res;
        if (!strcmp(t, "defined")) res = v->k != V_UNDEF;
        else if (!strcmp(t, "undefined")) res = v->k == V_UNDEF;
        else if (!strcmp(t, "none")) res = v->k == V_NONE;
        else if (!strcmp(t, "string")) res = v->k == V_STR;
        else if (!strcmp(t, "number")) res = v->k == V_INT;
        else if (!strcmp(t, "mapping")) res = v->k == V_DICT;
        else if (!strcmp(t, "sequence") || !strcmp(t, "iterable")) res = v->k == V_LIST || v->k == V_STR || v->k == V_DICT;
        else if (!strcmp(t, "true")) res = v->k == V_BOOL && v->i;
        else if (!strcmp(t, "false")) res = v->k == V_BOOL && !v->i;
        else { jfail(c, "template: unsupported test '%s'", t); res = false; }
        return mk_bool(c, e->neg ? !res : res);
    }
    case E_BIN: {
        const char *op = e->name;
        jval *a = eval(r, s, e->a), *b = eval(r, s, e->b);
        if (!strcmp(op, "==")) return mk_bool(c, jequal(a, b));
        if (!strcmp(op, "!=")) return mk_bool(c, !jequal(a, b));
        if (!strcmp(op, "in")) return mk_bool(c, jcontains(c, b, a) != e->neg);
        if (!strcmp(op, "~")) {
            obuf o = {0};
            to_text(&o, a);
            to_text(&o, b);
            jval *v = mk_str(c, o.p ? o.p : "", o.n);
            free(o.p);
            return v;
        }
        if (!strcmp(op, "+") && a->k == V_STR && b->k == V_STR) {
            obuf o = {0};
            ob_put(&o, a->s, a->slen);
            ob_put(&o, b->s, b->slen);
            jval *v = mk_str(c, o.p ? o.p : "", o.n);
            free(o.p);
            return v;
        }
        if (!strcmp(op, "+") && a->k == V_LIST && b->k == V_LIST) {
            jval *l = mk(c, V_LIST);
            for (size_t i = 0; i < a->n; i++) list_push(c, l, a->items[i]);
            for (size_t i = 0; i < b->n; i++) list_push(c, l, b->items[i]);
            return l;
        }
        if (a->k == V_STR && b->k == V_STR) {
            int cmp = strcmp(a->s, b->s);
            if (!strcmp(op, "<")) return mk_bool(c, cmp < 0);
            if (!strcmp(op, ">")) return mk_bool(c, cmp > 0);
            if (!strcmp(op, "<=")) return mk_bool(c, cmp <= 0);
            if (!strcmp(op, ">=")) return mk_bool(c, cmp >= 0);
        }
        if ((a->k == V_STR || b->k == V_STR) && !strcmp(op, "+"))
            jfail(c, "template: cannot add a string and a non-string");
        long long x = as_int(c, a), y = as_int(c, b);
        if (!strcmp(op, "+")) return mk_int(c, x + y);
        if (!strcmp(op, "-")) return mk_int(c, x - y);
        if (!strcmp(op, "*")) return mk_int(c, x * y);
        if (!strcmp(op, "<")) return mk_bool(c, x < y);
        if (!strcmp(op, ">")) return mk_bool(c, x > y);
        if (!strcmp(op, "<=")) return mk_bool(c, x <= y);
        if (!strcmp(op, ">=")) return mk_bool(c, x >= y);
        if (y == 0) jfail(c, "template: division by zero");
        if (!strcmp(op, "//") || !strcmp(op, "/")) return mk_int(c, x / y);
        if (!strcmp(op, "%")) return mk_int(c, x % y);
        jfail(c, "template: unsupported operator %s", op);
        return NULL;
    }
    case E_CALL: {
        /* builtins by name */
        if (e->a->k == E_NAME) {
            const char *fn = e->a->name;
            if (!strcmp(fn, "raise_exception")) {
                jval *m = e->nargs ? stringify(c, eval(r, s, e->args[0])) : mk_str(c, "error", 5);
                jfail(c, "chat template error: %s", m->s);
            }
            if (!strcmp(fn, "namespace")) {
                jval *d = mk(c, V_DICT);
                d->ns = true;
                for (size_t i = 0; i < e->nargs; i++)
                    if (e->args[i]->name) dict_set(c, d, e->args[i]->name, eval(r, s, e->args[i]->a));
                return d;
            }
            if (!strcmp(fn, "range")) {
                long long a = 0, b = 0;
                if (e->nargs == 1) b = as_int(c, eval(r, s, e->args[0]));
                else if (e->nargs >= 2) {
                    a = as_int(c, eval(r, s, e->args[0]));
                    b = as_int(c, eval(r, s, e->args[1]));
                }
                jval *l = mk(c, V_LIST);
                for (long long i = a; i < b; i++) list_push(c, l, mk_int(c, i));
                return l;
            }
        }
        jval *f = eval(r, s, e->a);
        if (f->k != V_FUNC) jfail(c, "template: call of a non-function");
        jval *args[8];
        int na = 0;
        for (size_t i = 0; i < e->nargs && na < 8; i++) args[na++] = eval(r, s, e->args[i]->name ? e->args[i]->a : e->args[i]);
        return f->fn(c, f->self, args, na);
    }
    }
    return &UNDEF;
}

static void exec_nodes(rstate *r, scope *s, node **v, size_t n);

static void exec_node(rstate *r, scope *s, node *nd) {
    jctx *c = r->c;
    switch (nd->k) {
    case N_TEXT: ob_put(&r->out, nd->text, nd->tlen); break;
    case N_OUT: to_text(&r->out, eval(r, s, nd->e)); break;
    case N_IF:
        if (truthy(eval(r, s, nd->e))) exec_nodes(r, s, nd->body, nd->nbody);
        else exec_nodes(r, s, nd->els, nd->nels);
        break;
    case N_SET: {
        jval *v = eval(r, s, nd->e);
        if (nd->attr) {
            jval *o = lookup(s, nd->var);
            if (o->k != V_DICT || !o->ns) jfail(c, "template: set %s.%s on a non-namespace", nd->var, nd->attr);
            dict_set(c, o, nd->attr, v);
        } else dict_set(c, s->vars, nd->var, v);
        break;
    }
    case N_FOR: {
        jval *it = eval(r, s, nd->e);
        if (it->k == V_DICT) it = f_items(c, it, NULL, 0);
        if (it->k == V_UNDEF || it->k == V_NONE) it = mk(c, V_LIST);
        if (it->k != V_LIST) jfail(c, "template: for over a non-list");
        if (it->n == 0) {
            exec_nodes(r, s, nd->els, nd->nels);
            break;
        }
        /* A for loop has its own scope (Jinja): plain sets inside do not leak out. */
        scope inner = {s, mk(c, V_DICT)};
        jval *loop = mk(c, V_DICT);
        for (size_t i = 0; i < it->n; i++) {
            dict_set(c, loop, "index", mk_int(c, (long long)i + 1));
            dict_set(c, loop, "index0", mk_int(c, (long long)i));
            dict_set(c, loop, "first", mk_bool(c, i == 0));
            dict_set(c, loop, "last", mk_bool(c, i + 1 == it->n));
            dict_set(c, loop, "length", mk_int(c, (long long)it->n));
            dict_set(c, loop, "revindex", mk_int(c, (long long)(it->n - i)));
            dict_set(c, loop, "revindex0", mk_int(c, (long long)(it->n - i - 1)));
            dict_set(c, inner.vars, "loop", loop);
            jval *x = it->items[i];
            if (nd->var2) {
                dict_set(c, inner.vars, nd->var, x->k == V_LIST && x->n > 0 ? x->items[0] : &UNDEF);
                dict_set(c, inner.vars, nd->var2, x->k == V_LIST && x->n > 1 ? x->items[1] : &UNDEF);
            } else dict_set(c, inner.vars, nd->var, x);
            exec_nodes(r, &inner, nd->body, nd->nbody);
            if (r->brk == 1) { r->brk = 0; break; }
            r->brk = 0;
        }
        break;
    }
    case N_BREAK: r->brk = 1; break;
    case N_CONTINUE: r->brk = 2; break;
    }
}

static void exec_nodes(rstate *r, scope *s, node **v, size_t n) {
    for (size_t i = 0; i < n && !r->brk; i++) exec_node(r, s, v[i]);
}

/* ---- entry -------------------------------------------------------------------------------- */

static jval *msgs_value(jctx *c, const vlm_chat_msg *m, size_t n) {
    jval *l = mk(c, V_LIST);
    for (size_t i = 0; i < n; i++) {
        jval *d = mk(c, V_DICT);
        dict_set(c, d, "role", m[i].role ? mk_str(c, m[i].role, strlen(m[i].role)) : &NONEV);
        if (m[i].content) {
            dict_set(c, d, "content", mk_str(c, m[i].content, strlen(m[i].content)));
        } else {
            jval *parts = mk(c, V_LIST);
            for (size_t k = 0; k < m[i].n_parts; k++) {
                const vlm_chat_part *p = &m[i].parts[k];
                jval *pd = mk(c, V_DICT);
                const char *ty = p->kind == VLM_PART_IMAGE ? "image" : p->kind == VLM_PART_VIDEO ? "video" : "text";
                dict_set(c, pd, "type", mk_str(c, ty, strlen(ty)));
                if (p->kind == VLM_PART_TEXT) dict_set(c, pd, "text", mk_str(c, p->text ? p->text : "", p->text ? strlen(p->text) : 0));
                list_push(c, parts, pd);
            }
            dict_set(c, d, "content", parts);
        }
        list_push(c, l, d);
    }
    return l;
}

char *vlm_jinja_render(const char *tmpl, const vlm_chat_msg *msgs, size_t n_msgs, bool add_generation_prompt,
                       const char *bos, const char *eos, char *err, size_t errlen) {
    jctx c = {0};
    c.err = err;
    c.errlen = errlen;
    rstate r = {0};
    r.c = &c;
    if (setjmp(c.fail)) {
        free(r.out.p);
        for (arena_blk *b = c.head, *nx; b; b = nx) {
            nx = b->next;
            free(b);
        }
        return NULL;
    }
    parser p = {0};
    p.c = &c;
    chunks ch = split_chunks(&c, tmpl, strlen(tmpl));
    size_t nn;
    const char *which = NULL;
    node **prog = parse_body(&p, &ch, &nn, NULL, &which);
    scope g = {NULL, mk(&c, V_DICT)};
    dict_set(&c, g.vars, "messages", msgs_value(&c, msgs, n_msgs));
    dict_set(&c, g.vars, "add_generation_prompt", mk_bool(&c, add_generation_prompt));
    if (bos) dict_set(&c, g.vars, "bos_token", mk_str(&c, bos, strlen(bos)));
    if (eos) dict_set(&c, g.vars, "eos_token", mk_str(&c, eos, strlen(eos)));
    ob_put(&r.out, "", 0);
    exec_nodes(&r, &g, prog, nn);
    for (arena_blk *b = c.head, *nx; b; b = nx) {
        nx = b->next;
        free(b);
    }
    return r.out.p;
}
