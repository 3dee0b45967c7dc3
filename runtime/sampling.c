/* sampling.c — token choice: HF-order logits processing (repetition penalty, then temperature, top_k,
 * top_p, min_p), OpenAI presence/frequency penalties, greedy argmax, a per-sequence xoshiro256** stream,
 * and logprobs from the log-softmax of the raw logits (before any penalty or temperature). */
#include "runtime/runtime.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void vlm_sampling_default(vlm_sampling *s) {
    memset(s, 0, sizeof *s);
    s->temperature = 0.0f;
    s->top_p = 1.0f;
    s->top_k = 0;
    s->min_p = 0.0f;
    s->repetition_penalty = 1.0f;
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void vlm_rng_seed(vlm_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

double vlm_rng_uniform(vlm_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return (double)(result >> 11) * 0x1.0p-53;
}

void vlm_apply_penalties(const vlm_sampling *s, float *logits, int64_t vocab, const int32_t *ids, int64_t n_prompt,
                         int64_t n_ids) {
    bool rep = s->repetition_penalty != 1.0f && s->repetition_penalty > 0;
    bool pf = s->presence_penalty != 0 || s->frequency_penalty != 0;
    if (!rep && !pf) return;
    uint32_t *cnt = calloc((size_t)vocab, sizeof *cnt); /* bit 31: seen anywhere; low bits: generated count */
    VLM_ASSERT(cnt);
    for (int64_t i = 0; i < n_ids; i++) {
        int32_t t = ids[i];
        if (t < 0 || t >= vocab) continue;
        cnt[t] |= 0x80000000u;
        if (i >= n_prompt) cnt[t]++;
    }
    for (int64_t t = 0; t < vocab; t++) {
        if (!cnt[t]) continue;
        float x = logits[t];
        if (rep) x = x < 0 ? x * s->repetition_penalty : x / s->repetition_penalty;
        uint32_t c = cnt[t] & 0x7fffffffu;
        if (pf && c) x -= (float)c * s->frequency_penalty + s->presence_penalty;
        logits[t] = x;
    }
    free(cnt);
}

typedef struct { float v; int32_t id; } vid;
static int cmp_desc(const void *a, const void *b) {
    const vid *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->id - y->id; /* ties: lower id first, like argmax */
}

int32_t vlm_sample(const vlm_sampling *s, vlm_rng *r, const float *logits, int64_t vocab, const int32_t *ids,
                   int64_t n_prompt, int64_t n_ids, vlm_token_event *ev) {
    float *l = malloc((size_t)vocab * sizeof *l);
    VLM_ASSERT(l);
    memcpy(l, logits, (size_t)vocab * sizeof *l);
    vlm_apply_penalties(s, l, vocab, ids, n_prompt, n_ids);
    int32_t tok = 0;
    if (s->temperature <= 0 || s->top_k == 1) {
        /* greedy (top_k 1 is greedy over the penalised logits whatever the temperature, SPEC §A.6) */
        for (int64_t i = 1; i < vocab; i++) if (l[i] > l[tok]) tok = (int32_t)i;
    } else {
        vid *c = malloc((size_t)vocab * sizeof *c);
        VLM_ASSERT(c);
        for (int64_t i = 0; i < vocab; i++) { c[i].v = l[i] / s->temperature; c[i].id = (int32_t)i; }
        qsort(c, (size_t)vocab, sizeof *c, cmp_desc);
        int64_t n = vocab;
        if (s->top_k > 0 && s->top_k < n) {
            float kth = c[s->top_k - 1].v; /* HF keeps every value >= the k-th largest */
            int64_t m = s->top_k;
            while (m < n && c[m].v >= kth) m++;
            n = m;
        }
        double mx = c[0].v, sum = 0;
        double *p = malloc((size_t)n * sizeof *p);
        VLM_ASSERT(p);
        for (int64_t i = 0; i < n; i++) sum += (p[i] = exp((double)c[i].v - mx));
        for (int64_t i = 0; i < n; i++) p[i] /= sum;
        if (s->top_p > 0 && s->top_p < 1) {
            /* keep the smallest prefix whose mass reaches top_p (at least one token) */
            double cum = 0;
            int64_t m = 0;
            while (m < n) { cum += p[m++]; if (cum >= s->top_p) break; }
            n = m;
        }
        if (s->min_p > 0) {
            double thr = s->min_p * p[0];
            int64_t m = 1;
            while (m < n && p[m] >= thr) m++;
            n = m;
        }
        double tot = 0;
        for (int64_t i = 0; i < n; i++) tot += p[i];
        double u = vlm_rng_uniform(r) * tot, acc = 0;
        tok = c[n - 1].id;
        for (int64_t i = 0; i < n; i++) { acc += p[i]; if (u < acc) { tok = c[i].id; break; } }
        free(p);
        free(c);
    }
    if (ev) {
        ev->token = tok;
        ev->logprob = 0;
        ev->n_top = 0;
    }
    /* The log-softmax is one exp per vocabulary entry (151,936 for Qwen2): ~7% of a batch-16 decode
     * step when done for every row, so only for requests that report logprobs. */
    if (ev && (s->logprobs || s->top_logprobs > 0)) {
        double mx = logits[0];
        for (int64_t i = 1; i < vocab; i++) if (logits[i] > mx) mx = logits[i];
        double sum = 0;
        for (int64_t i = 0; i < vocab; i++) sum += exp((double)logits[i] - mx);
        double lse = mx + log(sum);
        ev->logprob = (float)((double)logits[tok] - lse);
        int k = s->top_logprobs < 0 ? 0 : s->top_logprobs > VLM_MAX_TOP_LOGPROBS ? VLM_MAX_TOP_LOGPROBS : s->top_logprobs;
        ev->n_top = 0;
        for (int j = 0; j < k; j++) { /* partial selection: k <= 20 passes over the vocabulary */
            int32_t best = -1;
            for (int64_t i = 0; i < vocab; i++) {
                bool taken = false;
                for (int q = 0; q < j; q++) if (ev->top_ids[q] == i) { taken = true; break; }
                if (!taken && (best < 0 || logits[i] > logits[best])) best = (int32_t)i;
            }
            ev->top_ids[j] = best;
            ev->top_logprobs[j] = (float)((double)logits[best] - lse);
            ev->n_top = j + 1;
        }
    }
    free(l);
    return tok;
}
