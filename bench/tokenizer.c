/* tokenizer.c (bench) — single-thread encode throughput of the vlmd tokenizer on a corpus file,
 * line by line (each line one vlm_tok_encode call, as a server tokenizes one prompt at a time),
 * plus the load time of tokenizer.json. Driven by bench/tokenizer.sh, which builds the corpus and
 * runs the Hugging Face reference in the same run.
 *
 *   build/bench/tokenizer TOKENIZER_DIR CORPUS [REPEATS]
 * Prints "load_s=..", "vlmd_mb_s=.." and "vlmd_tokens=..". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tokenizer/tokenizer.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s TOKENIZER_DIR CORPUS [REPEATS]\n", argv[0]);
        return 2;
    }
    int repeats = argc > 3 ? atoi(argv[3]) : 3;
    char err[256];
    vlm_tok *t;
    double t0 = now_s();
    if (vlm_tok_load(argv[1], &t, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    printf("load_s=%.3f\n", now_s() - t0);
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        perror(argv[2]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)sz + 1);
    if (fread(buf, 1, (size_t)sz, f) != (size_t)sz) return 1;
    fclose(f);
    buf[sz] = 0;
    double best = 1e30;
    size_t ntok = 0;
    vlm_ids ids = {0};
    for (int r = 0; r < repeats; r++) {
        /* First pass also warms the word cache, as a long-running server's would be. */
        double s = now_s();
        ntok = 0;
        for (char *p = buf, *end = buf + sz; p < end;) {
            char *nl = memchr(p, '\n', (size_t)(end - p));
            size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
            ids.n = 0;
            if (vlm_tok_encode(t, p, len, false, &ids, err, sizeof err)) {
                fprintf(stderr, "encode failed: %s\n", err);
                return 1;
            }
            ntok += ids.n;
            p += len + 1;
        }
        double dt = now_s() - s;
        if (dt < best) best = dt;
    }
    printf("vlmd_mb_s=%.2f\n", (double)sz / 1e6 / best);
    printf("vlmd_tokens=%zu\n", ntok);
    vlm_ids_free(&ids);
    free(buf);
    vlm_tok_free(t);
    return 0;
}
