/* bench/model.c — decoder throughput on a checkpoint: decode tokens/s at batch 1, prefill tokens/s on a
 * 512-token prompt, batched decode aggregate at 4 and 16 sequences, and the memory read bandwidth
 * measured in the same run, so decode can be stated as a fraction of its bandwidth floor
 * (weight bytes read per step / bandwidth).
 *
 *   build/bench/model MODEL_DIR [threads=2] [--prefill-only|--decode-only]
 * e.g. python3 tools/make_model.py --name 2b-size --dtype bf16 --out /tmp/models; build/bench/model /tmp/models/2b-size */
#include "runtime/runtime.h"

#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Read bandwidth: every thread sums its contiguous share of a 1 GiB buffer (far larger than any
 * LLC seen so far, 260 MiB on the dev VM) with 4 independent AVX2 accumulators, so the loop is
 * limited by memory, not by add latency (a scalar double sum measured ~40% low); best of 5. */
__attribute__((target("avx2"))) static float sum_avx2(const float *p, size_t n) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        a = _mm256_add_ps(a, _mm256_loadu_ps(p + i));
        b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
        c = _mm256_add_ps(c, _mm256_loadu_ps(p + i + 16));
        d = _mm256_add_ps(d, _mm256_loadu_ps(p + i + 24));
    }
    float o[8];
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    return o[0] + o[1] + o[2] + o[3] + o[4] + o[5] + o[6] + o[7];
}

static double read_bandwidth(void) {
    const size_t n = (size_t)1 << 28; /* 2^28 floats = 1 GiB */
    float *b = malloc(n * sizeof *b);
    if (!b) return 0;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) b[i] = (float)(i & 7);
    double best = 0, sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now(), s = 0;
#pragma omp parallel reduction(+ : s)
        {
            const size_t nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
            const size_t lo = n / nt * id, hi = id + 1 == nt ? n : n / nt * (id + 1);
            s += sum_avx2(b + lo, hi - lo);
        }
        double dt = now() - t0;
        sink += s;
        if ((double)(n * sizeof *b) / dt > best) best = (double)(n * sizeof *b) / dt;
    }
    free(b);
    if (sink < 0) printf("%g\n", sink);
    return best;
}

static void prompt_ids(int32_t *p, int n, unsigned seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (int32_t)((seed >> 8) % 150000u);
    }
}

/* Adds n sequences, runs until all are prefilled, then times `steps` decode steps. Returns tokens/s. */
static double decode_rate(vlm_model *m, int n, int steps) {
    vlm_engine_opts eo = {.max_seqs = n, .max_batch_tokens = 512};
    vlm_engine *e;
    char err[256];
    if (vlm_engine_create(m, &eo, &e, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 0; }
    int32_t p[32];
    for (int k = 0; k < n; k++) {
        prompt_ids(p, 32, 7u + (unsigned)k);
        vlm_seq_desc d = {.prompt = p, .n_prompt = 32, .max_tokens = steps + 4, .ignore_eos = true};
        vlm_sampling_default(&d.sampling);
        if (vlm_engine_add(e, &d, NULL, err, sizeof err)) { fprintf(stderr, "%s\n", err); vlm_engine_free(e); return 0; }
    }
    vlm_token_event ev[64];
    int produced = 0;
    while (produced < n) produced += vlm_engine_step(e, ev, 64); /* prefill (+ first tokens) */
    double t0 = now();
    int tok = 0;
    for (int s = 0; s < steps; s++) tok += vlm_engine_step(e, ev, 64);
    double dt = now() - t0;
    vlm_engine_free(e);
    return tok / dt;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [threads] [--prefill-only|--decode-only]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0); /* lines appear as each measurement ends */
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    vlm_cpu_init(threads);
    printf("cpu: %s\n", vlm_cpu_describe());
    double bw = read_bandwidth();
    printf("memory read bandwidth: %.2f GB/s (1 GiB sum, best of 5)\n", bw / 1e9);
    vlm_model *m;
    char err[512];
    vlm_load_opts lo = {.threads = threads};
    double t0 = now();
    if (vlm_model_load(argv[1], &lo, &m, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
    const vlm_model_config *c = vlm_model_cfg(m);
    /* bytes read per decode step: every decoder weight once, the LM head once (tied: the embedding) */
    const vlm_ckpt *ck = vlm_model_ckpt(m);
    double wbytes = 0;
    for (size_t i = 0; i < vlm_ckpt_count(ck); i++) {
        const char *nm = vlm_ckpt_name_at(ck, i);
        if (strstr(nm, "visual")) continue;
        if (strstr(nm, "embed_tokens") && !c->tie_embeddings) continue;
        wbytes += (double)vlm_ckpt_find(ck, nm)->nbytes;
    }
    printf("model: %s  hidden=%d layers=%d dtype=%s  load %.2fs  decoder weight bytes/step %.3f GB\n", argv[1],
           c->hidden, c->n_layers, vlm_dtype_name(c->weight_dtype), now() - t0, wbytes / 1e9);

    /* prefill: one 512-token prompt */
    if (!(argc > 3 && !strcmp(argv[3], "--decode-only"))) {
        vlm_engine_opts eo = {.max_seqs = 1, .max_batch_tokens = 512};
        vlm_engine *e;
        if (vlm_engine_create(m, &eo, &e, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
        int32_t *p = malloc(512 * sizeof *p);
        prompt_ids(p, 512, 1);
        vlm_seq_desc d = {.prompt = p, .n_prompt = 512, .max_tokens = 1, .ignore_eos = true};
        vlm_sampling_default(&d.sampling);
        vlm_token_event ev[4];
        /* untimed warm-up on a short prompt: faults the mmapped weights in, as llama-bench's
         * warm-up run does, so that a cold page cache is not charged to the prefill figure */
        int32_t wp[64]; /* other ids: the prefix cache must not serve the timed prompt */
        prompt_ids(wp, 64, 99);
        vlm_seq_desc wd = d;
        wd.prompt = wp, wd.n_prompt = 64;
        vlm_engine_add(e, &wd, NULL, err, sizeof err);
        while (vlm_engine_active(e)) vlm_engine_step(e, ev, 4);
        vlm_engine_add(e, &d, NULL, err, sizeof err);
        double t1 = now();
        while (vlm_engine_active(e)) vlm_engine_step(e, ev, 4);
        double dt = now() - t1;
        printf("prefill 512 tokens: %.2fs  %.1f tokens/s\n", dt, 512 / dt);
        free(p);
        vlm_engine_free(e);
    }
    if (argc > 3 && !strcmp(argv[3], "--prefill-only")) {
        vlm_model_free(m);
        return 0;
    }
    double floor_tps = bw / wbytes;
    double r1 = decode_rate(m, 1, 16);
    printf("decode batch 1: %.2f tokens/s  (bandwidth floor %.2f tokens/s -> %.2f of floor)\n", r1, floor_tps,
           r1 / floor_tps);
    int ns[2] = {4, 16};
    for (int i = 0; i < 2; i++) {
        double r = decode_rate(m, ns[i], 8);
        printf("decode batch %d: %.2f tokens/s aggregate (%.2fx batch 1)\n", ns[i], r, r / r1);
    }
    vlm_model_free(m);
    return 0;
}
