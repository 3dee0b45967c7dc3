/* imgcache.c — the vision encoder's output cache: image embeddings kept across requests, keyed by
 * the preprocessed pixels.
 *
 * The OpenAI API is stateless, so a chat about one picture re-sends the picture with every turn, and
 * without this cache every turn re-runs the vision encoder (seconds per image on a CPU) before the
 * KV prefix cache can even recognise the prompt. The key is a keyed hash (vlm_hash, random key per
 * server) of the exact encoder input: grid (t, h, w), patch count and size, and every pixel_values
 * float, so any change in the image, its resize budget (min/max_pixels, detail) or its crop gives
 * another key; a hit also checks the grid and sizes. Entries are evicted least recently used first
 * once the bytes held would pass the budget (--image-cache-memory). Used by the engine thread only. */
#include "server/prompt.h"

#include <stdlib.h>
#include <string.h>

typedef struct ent {
    uint64_t key;
    int32_t grid[3];
    int64_t n_patches, patch_dim, n_floats;
    float *emb;
    struct ent *prev, *next; /* LRU: head = most recently used */
} ent;

struct vlmd_imgcache {
    int64_t budget, bytes;
    uint64_t hkey[2];
    ent *head, *tail;
    int64_t n, hits, misses;
};

vlmd_imgcache *vlmd_imgcache_new(int64_t budget_bytes) {
    if (budget_bytes <= 0) return NULL;
    vlmd_imgcache *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->budget = budget_bytes;
    vlm_hash_random_key(c->hkey);
    return c;
}

static void unlink_ent(vlmd_imgcache *c, ent *e) {
    if (e->prev) e->prev->next = e->next; else c->head = e->next;
    if (e->next) e->next->prev = e->prev; else c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void push_front(vlmd_imgcache *c, ent *e) {
    e->prev = NULL;
    e->next = c->head;
    if (c->head) c->head->prev = e; else c->tail = e;
    c->head = e;
}

static void drop(vlmd_imgcache *c, ent *e) {
    unlink_ent(c, e);
    c->bytes -= e->n_floats * (int64_t)sizeof(float);
    c->n--;
    free(e->emb);
    free(e);
}

void vlmd_imgcache_free(vlmd_imgcache *c) {
    if (!c) return;
    while (c->head) drop(c, c->head);
    free(c);
}

uint64_t vlmd_imgcache_key(const vlmd_imgcache *c, const vlm_pixels *px) {
    vlm_hash h;
    vlm_hash_begin(&h, c->hkey);
    vlm_hash_bytes(&h, px->grid_thw, sizeof px->grid_thw);
    vlm_hash_word(&h, (uint64_t)px->n_patches);
    vlm_hash_word(&h, (uint64_t)px->patch_dim);
    vlm_hash_bytes(&h, px->pixel_values, (size_t)(px->n_patches * px->patch_dim) * sizeof(float));
    return vlm_hash_end(&h);
}

static bool same_input(const ent *e, uint64_t key, const vlm_pixels *px, int64_t n_floats) {
    return e->key == key && !memcmp(e->grid, px->grid_thw, sizeof e->grid) && e->n_patches == px->n_patches &&
           e->patch_dim == px->patch_dim && e->n_floats == n_floats;
}

bool vlmd_imgcache_get(vlmd_imgcache *c, uint64_t key, const vlm_pixels *px, float *out, int64_t n_floats) {
    for (ent *e = c->head; e; e = e->next) {
        if (!same_input(e, key, px, n_floats)) continue;
        memcpy(out, e->emb, (size_t)n_floats * sizeof(float));
        unlink_ent(c, e);
        push_front(c, e);
        c->hits++;
        return true;
    }
    c->misses++;
    return false;
}

void vlmd_imgcache_put(vlmd_imgcache *c, uint64_t key, const vlm_pixels *px, const float *emb, int64_t n_floats) {
    int64_t sz = n_floats * (int64_t)sizeof(float);
    if (sz > c->budget) return; /* larger than the whole cache: not worth evicting everything for */
    for (ent *e = c->head; e; e = e->next)
        if (same_input(e, key, px, n_floats)) return;
    ent *e = calloc(1, sizeof *e);
    float *copy = malloc((size_t)sz);
    if (!e || !copy) { free(e); free(copy); return; } /* a cache miss later, nothing worse */
    while (c->tail && c->bytes + sz > c->budget) drop(c, c->tail);
    e->key = key;
    memcpy(e->grid, px->grid_thw, sizeof e->grid);
    e->n_patches = px->n_patches;
    e->patch_dim = px->patch_dim;
    e->n_floats = n_floats;
    e->emb = copy;
    memcpy(copy, emb, (size_t)sz);
    push_front(c, e);
    c->bytes += sz;
    c->n++;
}

void vlmd_imgcache_stats(const vlmd_imgcache *c, vlmd_imgcache_counts *s) {
    memset(s, 0, sizeof *s);
    if (!c) return;
    s->entries = c->n;
    s->bytes = c->bytes;
    s->hits = c->hits;
    s->misses = c->misses;
}
