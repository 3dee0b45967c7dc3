/* bench/gpu.c — decoder throughput of the CUDA backend (built only with `make CUDA=1`): prefill tokens/s on
 * one long prompt and decode tokens/s at batch 1 and 32, each set against the device's limits:
 *  - decode: bytes read per step (every decoder weight and the LM head once, plus the K/V the batch's
 *    attention reads at its mean context length) / measured step time, as a fraction of the peak HBM
 *    bandwidth (cudaDevAttrMemoryClockRate x 2 x bus width): the "fraction of the bandwidth floor";
 *  - prefill: GEMM + attention FLOPs / measured time as a fraction of the dense bf16 tensor-core peak
 *    (known for sm_80 and sm_90 only; see vlm_cuda_device_info).
 * Issue 8 targets on an H100: batch-1 decode >= 70% of the bandwidth floor, prefill >= 50% of bf16 peak,
 * on the 2B-size checkpoint:
 *   python3 tools/make_model.py --out /tmp/models --name 2b-size --dtype bf16
 *   build-cuda/bench/gpu --model /tmp/models/2b-size [--gpu 0] [--tp 1] [--prompt 512] [--steps 32]
 * Without a GPU it prints why and exits with status 2 (nothing measured); 1 on errors. */
#include "runtime/cuda/vlm_cuda.h"
#include "runtime/runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void prompt_ids(int32_t *p, int n, unsigned seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (int32_t)((seed >> 8) % 150000u); /* below Qwen2-VL's special/image token ids */
    }
}

static vlm_engine *make_engine(vlm_model *m, int tp, int gpu, int max_seqs, int max_batch_tokens) {
    vlm_engine_opts eo = {.max_seqs = max_seqs, .max_batch_tokens = max_batch_tokens, .tp = tp,
                          .backend = VLM_BACKEND_CUDA};
    if (tp <= 1) {
        eo.n_gpus = 1;
        eo.gpus[0] = gpu;
    }
    vlm_engine *e = NULL;
    char err[512];
    if (vlm_engine_create(m, &eo, &e, err, sizeof err)) {
        fprintf(stderr, "gpu bench: engine: %s\n", err);
        return NULL;
    }
    return e;
}

/* One prompt of n tokens in one step (max_batch_tokens = n); best of `reps` after one warm-up run. */
static double prefill_seconds(vlm_model *m, int tp, int gpu, int n, int reps) {
    vlm_engine *e = make_engine(m, tp, gpu, 1, n);
    if (!e) return 0;
    int32_t *p = malloc((size_t)n * sizeof *p);
    double best = 1e30;
    char err[512];
    for (int r = 0; r <= reps; r++) {
        prompt_ids(p, n, 1u + (unsigned)r);
        vlm_seq_desc d = {.prompt = p, .n_prompt = n, .max_tokens = 1, .ignore_eos = true};
        vlm_sampling_default(&d.sampling);
        if (vlm_engine_add(e, &d, NULL, err, sizeof err)) {
            fprintf(stderr, "gpu bench: %s\n", err);
            best = 0;
            break;
        }
        vlm_token_event ev[4];
        double t0 = now();
        while (vlm_engine_active(e)) vlm_engine_step(e, ev, 4);
        double dt = now() - t0;
        if (r > 0 && dt < best) best = dt; /* r == 0 warms up cuBLAS heuristics and module loading */
    }
    free(p);
    vlm_engine_free(e);
    return best;
}

/* n sequences of a 32-token prompt; after every one is prefilled (and one warm-up step), times `steps`
 * decode steps. Returns seconds per step; *tokens gets the tokens those steps produced. */
static double decode_step_seconds(vlm_model *m, int tp, int gpu, int n, int steps, int *tokens) {
    vlm_engine *e = make_engine(m, tp, gpu, n, n * 33 > 512 ? n * 33 : 512); /* all prompts in one step */
    *tokens = 0;
    if (!e) return 0;
    int32_t p[32];
    char err[512];
    for (int k = 0; k < n; k++) {
        prompt_ids(p, 32, 7u + (unsigned)k);
        vlm_seq_desc d = {.prompt = p, .n_prompt = 32, .max_tokens = steps + 8, .ignore_eos = true};
        vlm_sampling_default(&d.sampling);
        if (vlm_engine_add(e, &d, NULL, err, sizeof err)) {
            fprintf(stderr, "gpu bench: %s\n", err);
            vlm_engine_free(e);
            return 0;
        }
    }
    vlm_token_event *ev = malloc((size_t)(n + 4) * sizeof *ev);
    int produced = 0;
    while (produced < n) produced += vlm_engine_step(e, ev, n + 4); /* prefill + first tokens */
    vlm_engine_step(e, ev, n + 4);                                   /* one warm decode step */
    double t0 = now();
    for (int s = 0; s < steps; s++) *tokens += vlm_engine_step(e, ev, n + 4);
    double dt = now() - t0;
    free(ev);
    vlm_engine_free(e);
    return dt / steps;
}

int main(int argc, char **argv) {
    const char *dir = NULL;
    int gpu = 0, tp = 1, prompt = 512, steps = 32;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--gpu") && i + 1 < argc) gpu = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tp") && i + 1 < argc) tp = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--prompt") && i + 1 < argc) prompt = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s --model DIR [--gpu N] [--tp N] [--prompt TOKENS] [--steps N]\n", argv[0]);
            return 1;
        }
    }
    if (!dir || prompt < 1 || steps < 1 || tp < 1) {
        fprintf(stderr, "usage: %s --model DIR [--gpu N] [--tp N] [--prompt TOKENS] [--steps N]\n", argv[0]);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    char err[512];
    if (vlm_backend_available(VLM_BACKEND_CUDA, err, sizeof err) != VLM_OK) {
        printf("gpu bench: no GPU to measure on (%s); nothing measured\n", err);
        return 2;
    }
    vlm_cuda_info info;
    if (vlm_cuda_device_info(tp > 1 ? 0 : gpu, &info, err, sizeof err)) {
        fprintf(stderr, "gpu bench: %s\n", err);
        return 1;
    }
    /* with tp N every rank reads its 1/N of the weights from its own HBM at the same time */
    double peak_bw = info.peak_bw * tp, peak_flops = info.peak_bf16_flops * tp;
    printf("device: %s (sm_%d%d, %d SMs, %.1f GiB), peak HBM %.0f GB/s, dense bf16 peak %.0f TFLOP/s%s; tp %d\n",
           info.name, info.cc_major, info.cc_minor, info.sm_count, (double)info.total_mem / (1 << 30),
           info.peak_bw / 1e9, info.peak_bf16_flops / 1e12, info.peak_bf16_flops > 0 ? "" : " (unknown part)", tp);

    vlm_load_opts lo = {.threads = 2};
    vlm_model *m = NULL;
    double t0 = now();
    if (vlm_model_load(dir, &lo, &m, err, sizeof err)) {
        fprintf(stderr, "gpu bench: %s\n", err);
        return 1;
    }
    const vlm_model_config *c = vlm_model_cfg(m);
    /* weight bytes read per decode step: every decoder tensor once, the LM head once (tied: the embedding;
     * untied: the embedding table is only gathered from, not read whole) */
    const vlm_ckpt *ck = vlm_model_ckpt(m);
    double wbytes = 0;
    for (size_t i = 0; i < vlm_ckpt_count(ck); i++) {
        const char *nm = vlm_ckpt_name_at(ck, i);
        if (strstr(nm, "visual") || strstr(nm, "vision")) continue;
        if (strstr(nm, "embed_tokens") && !c->tie_embeddings) continue;
        wbytes += (double)vlm_ckpt_find(ck, nm)->nbytes;
    }
    const double L = c->n_layers, H = c->hidden, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    const double F = c->intermediate, V = c->vocab;
    /* multiply-adds per token in the decoder's projections, and the K/V bytes one cached token costs */
    const double proj_macs = L * (H * nh * hd + 2 * H * nkv * hd + nh * hd * H + 3 * H * F);
    const double kv_token_bytes = L * 2 * nkv * hd * 4; /* f32 K and V */
    printf("model: %s  hidden=%d layers=%d heads=%d/%d dtype=%s  loaded in %.1fs; weight bytes/step %.3f GB\n", dir,
           c->hidden, c->n_layers, c->n_heads, c->n_kv_heads, vlm_dtype_name(c->weight_dtype), now() - t0, wbytes / 1e9);

    double pt = prefill_seconds(m, tp, gpu, prompt, 3);
    if (pt > 0) {
        /* 2 FLOP per multiply-add: projections, causal attention (QK^T and PV over half the square on
         * average), and the LM head for the one sampled row */
        double flops = 2 * proj_macs * prompt + 2 * L * nh * hd * (double)prompt * prompt + 2 * H * V;
        printf("prefill %d tokens: %.2f ms  %.0f tokens/s  %.1f TFLOP/s", prompt, pt * 1e3, prompt / pt, flops / pt / 1e12);
        if (peak_flops > 0) printf("  = %.1f%% of dense bf16 peak", 100 * flops / pt / peak_flops);
        printf("\n");
    }
    int batches[2] = {1, 32};
    for (int bi = 0; bi < 2; bi++) {
        int n = batches[bi], tokens = 0;
        double st = decode_step_seconds(m, tp, gpu, n, steps, &tokens);
        if (st <= 0) continue;
        /* mean context over the timed steps: 32 prompt tokens, the first token, the warm step, then steps */
        double ctx = 32 + 2 + (steps + 1) / 2.0;
        double bytes = wbytes + n * ctx * kv_token_bytes;
        printf("decode batch %d: %.3f ms/step  %.0f tokens/s  reads %.3f GB/step -> %.0f GB/s = %.1f%% of the HBM "
               "bandwidth floor\n",
               n, st * 1e3, tokens / (st * steps), bytes / 1e9, bytes / st / 1e9, 100 * bytes / st / peak_bw);
    }
    vlm_model_free(m);
    return 0;
}
