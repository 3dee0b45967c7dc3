/* kv_pages.c — the KV page pool's bookkeeping: which pages are free, which sequences hold which
 * page, and the automatic prefix cache (pages whose K/V can be reused by a later prompt).
 *
 * Prefix cache. A full page's K/V are a function of every token, image embedding and position up to
 * its last row, so a page is named by a chained key: key(page j) = SipHash over (key(page j-1), the
 * page's token ids, its M-RoPE positions and, for image rows, the embedding bits; engine.c computes
 * keys with vlm_hash, keyed per engine). A sequence that
 * starts (or resumes after preemption) walks its leading full pages through the table and takes every
 * page already present instead of recomputing it; pages are shared read-only, since a sequence only
 * ever writes rows at or past its own n_cached, which lies beyond every matched page. When the last
 * holder releases a registered page it stays in the table on an LRU list and is still counted as
 * available; it is recycled (dropped from the table) only when no never-used page is left.
 *
 * Why SipHash with a per-process random key rather than a plain 64-bit hash: another client's prompt
 * must never be able to pick up K/V that belong to different content. Token ids are also compared
 * exactly on a hit; image rows are covered by the keyed hash alone (storing the embeddings to compare
 * would cost as much memory as the K/V themselves). vLLM's automatic prefix caching follows the same
 * block-hash scheme.
 *
 * Partial pages. Prompts that share fewer tokens than a page after their last common full page (a
 * chat template's 14-token system preamble with 16-token pages, or the tail of an earlier turn) would
 * recompute those rows. So registered pages are also chained by their parent's key, and a sequence
 * whose next page has no full match takes the registered child of its last matched page (or, at the
 * start, any first page) whose leading token ids agree longest with its own, and gets those rows
 * copied into a page of its own (engine.c; the copy is per rank, in the backend). Equal parent key
 * and equal token ids mean equal K/V for those rows: positions of text rows follow from the history,
 * and engine.c never extends a partial match over an image row. SGLang's radix cache reuses at token
 * granularity too. */
#include "runtime/rt_internal.h"

#include <stdlib.h>
#include <string.h>

struct vlm_page_pool {
    int64_t n_pages;
    int pt;
    bool cache_on;
    int32_t *free;         /* pages that hold nothing reusable */
    int64_t n_free;
    int32_t *ref;          /* [n_pages] sequences holding the page */
    /* registered pages: hash chains and the idle (ref 0) LRU list, oldest at lru_head */
    bool *reg;
    uint64_t *key;
    int32_t *tok;          /* [n_pages][pt] token ids, compared on a hit */
    int32_t *bucket;       /* [n_buckets] first page of the chain, -1 when empty */
    int32_t *chain;        /* [n_pages] next page in the same bucket */
    uint64_t *parent;      /* [n_pages] key of the page before it */
    int32_t *pbucket;      /* [n_buckets] by parent key, as bucket */
    int32_t *pchain;       /* [n_pages] */
    int64_t n_buckets;
    int32_t *prev, *next;  /* LRU links */
    int32_t lru_head, lru_tail;
    int64_t n_idle;
};

vlm_page_pool *vlm_pages_create(int64_t n_pages, int page_tokens, bool prefix_cache) {
    vlm_page_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_pages = n_pages;
    p->pt = page_tokens;
    p->cache_on = prefix_cache;
    p->n_buckets = 1;
    while (p->n_buckets < 2 * n_pages) p->n_buckets *= 2;
    p->free = malloc((size_t)n_pages * sizeof *p->free);
    p->ref = calloc((size_t)n_pages, sizeof *p->ref);
    p->reg = calloc((size_t)n_pages, sizeof *p->reg);
    p->key = malloc((size_t)n_pages * sizeof *p->key);
    p->tok = malloc((size_t)(n_pages * page_tokens) * sizeof *p->tok);
    p->bucket = malloc((size_t)p->n_buckets * sizeof *p->bucket);
    p->chain = malloc((size_t)n_pages * sizeof *p->chain);
    p->prev = malloc((size_t)n_pages * sizeof *p->prev);
    p->next = malloc((size_t)n_pages * sizeof *p->next);
    p->parent = malloc((size_t)n_pages * sizeof *p->parent);
    p->pbucket = malloc((size_t)p->n_buckets * sizeof *p->pbucket);
    p->pchain = malloc((size_t)n_pages * sizeof *p->pchain);
    if (!p->free || !p->ref || !p->reg || !p->key || !p->tok || !p->bucket || !p->chain || !p->prev || !p->next ||
        !p->parent || !p->pbucket || !p->pchain) {
        vlm_pages_free(p);
        return NULL;
    }
    /* lowest page index handed out first (reverse stack) */
    for (int64_t i = 0; i < n_pages; i++) p->free[i] = (int32_t)(n_pages - 1 - i);
    p->n_free = n_pages;
    for (int64_t i = 0; i < p->n_buckets; i++) p->bucket[i] = p->pbucket[i] = -1;
    p->lru_head = p->lru_tail = -1;
    return p;
}

void vlm_pages_free(vlm_page_pool *p) {
    if (!p) return;
    free(p->free); free(p->ref); free(p->reg); free(p->key); free(p->tok); free(p->bucket); free(p->chain);
    free(p->prev); free(p->next); free(p->parent); free(p->pbucket); free(p->pchain);
    free(p);
}

bool vlm_pages_cache_on(const vlm_page_pool *p) { return p->cache_on; }
int64_t vlm_pages_available(const vlm_page_pool *p) { return p->n_free + p->n_idle; }
int64_t vlm_pages_idle_cached(const vlm_page_pool *p) { return p->n_idle; }
int64_t vlm_pages_held(const vlm_page_pool *p) { return p->n_pages - p->n_free - p->n_idle; }

static void lru_unlink(vlm_page_pool *p, int32_t g) {
    if (p->prev[g] >= 0) p->next[p->prev[g]] = p->next[g]; else p->lru_head = p->next[g];
    if (p->next[g] >= 0) p->prev[p->next[g]] = p->prev[g]; else p->lru_tail = p->prev[g];
    p->n_idle--;
}

static void lru_append(vlm_page_pool *p, int32_t g) {
    p->prev[g] = p->lru_tail;
    p->next[g] = -1;
    if (p->lru_tail >= 0) p->next[p->lru_tail] = g; else p->lru_head = g;
    p->lru_tail = g;
    p->n_idle++;
}

/* The two hash tables (by key, by parent key) share one layout: bucket heads and a next link per page. */
static void chain_push(vlm_page_pool *p, int32_t *bucket, int32_t *chain, uint64_t key, int32_t g) {
    int32_t *head = &bucket[key & (uint64_t)(p->n_buckets - 1)];
    chain[g] = *head;
    *head = g;
}

static void chain_unlink(vlm_page_pool *p, int32_t *bucket, int32_t *chain, uint64_t key, int32_t g) {
    int32_t *at = &bucket[key & (uint64_t)(p->n_buckets - 1)];
    while (*at != g) at = &chain[*at];
    *at = chain[g];
}

static void unregister(vlm_page_pool *p, int32_t g) {
    chain_unlink(p, p->bucket, p->chain, p->key[g], g);
    chain_unlink(p, p->pbucket, p->pchain, p->parent[g], g);
    p->reg[g] = false;
}

/* One more holder of registered page g (off the idle LRU if it was idle). */
static int32_t hold(vlm_page_pool *p, int32_t g) {
    if (p->ref[g]++ == 0) lru_unlink(p, g);
    return g;
}

int32_t vlm_pages_take(vlm_page_pool *p) {
    int32_t g;
    if (p->n_free > 0) {
        g = p->free[--p->n_free];
    } else if (p->n_idle > 0) {
        g = p->lru_head; /* the least recently released cached page */
        lru_unlink(p, g);
        unregister(p, g);
    } else {
        return -1;
    }
    p->ref[g] = 1;
    return g;
}

void vlm_pages_put(vlm_page_pool *p, int32_t g) {
    VLM_ASSERT(p->ref[g] > 0);
    if (--p->ref[g] > 0) return;
    if (p->reg[g]) lru_append(p, g);
    else p->free[p->n_free++] = g;
}

int32_t vlm_pages_lookup(vlm_page_pool *p, uint64_t key, const int32_t *tok) {
    if (!p->cache_on) return -1;
    for (int32_t g = p->bucket[key & (uint64_t)(p->n_buckets - 1)]; g >= 0; g = p->chain[g]) {
        if (p->key[g] != key || memcmp(p->tok + (int64_t)g * p->pt, tok, (size_t)p->pt * sizeof *tok)) continue;
        return hold(p, g);
    }
    return -1;
}

int32_t vlm_pages_lookup_partial(vlm_page_pool *p, uint64_t parent, const int32_t *tok, int64_t max_rows,
                                 int64_t *rows) {
    *rows = 0;
    if (!p->cache_on || max_rows <= 0) return -1;
    if (max_rows > p->pt) max_rows = p->pt;
    int32_t best = -1;
    for (int32_t g = p->pbucket[parent & (uint64_t)(p->n_buckets - 1)]; g >= 0 && *rows < max_rows; g = p->pchain[g]) {
        if (p->parent[g] != parent) continue;
        const int32_t *t = p->tok + (int64_t)g * p->pt;
        int64_t n = 0;
        while (n < max_rows && t[n] == tok[n]) n++;
        if (n > *rows) *rows = n, best = g;
    }
    return best < 0 ? -1 : hold(p, best);
}

void vlm_pages_register(vlm_page_pool *p, int32_t g, uint64_t key, uint64_t parent, const int32_t *tok) {
    if (!p->cache_on || p->reg[g]) return;
    int64_t b = (int64_t)(key & (uint64_t)(p->n_buckets - 1));
    for (int32_t h = p->bucket[b]; h >= 0; h = p->chain[h])
        if (p->key[h] == key && !memcmp(p->tok + (int64_t)h * p->pt, tok, (size_t)p->pt * sizeof *tok))
            return; /* the same content computed twice at once (two prompts admitted together): keep the first */
    p->key[g] = key;
    memcpy(p->tok + (int64_t)g * p->pt, tok, (size_t)p->pt * sizeof *tok);
    p->parent[g] = parent;
    chain_push(p, p->bucket, p->chain, key, g);
    chain_push(p, p->pbucket, p->pchain, parent, g);
    p->reg[g] = true;
}
