/* npy_read.h — a small NumPy .npy reader (little-endian f32, C order) for the unit tests' fixtures. */
#ifndef VLM_NPY_READ_H
#define VLM_NPY_READ_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Returns malloc'd data and the shape (up to 4 dims), or NULL when the file is missing or not <f4. */
static float *npy_read_f32(const char *path, int64_t shape[4], int *ndim) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    unsigned char pre[10];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6)) { fclose(f); return NULL; }
    size_t hl = pre[8] | (size_t)pre[9] << 8;
    if (pre[6] >= 2) { /* v2/v3: 4-byte header length */
        unsigned char b[2];
        if (fread(b, 1, 2, f) != 2) { fclose(f); return NULL; }
        hl = pre[8] | (size_t)pre[9] << 8 | (size_t)b[0] << 16 | (size_t)b[1] << 24;
    }
    char *h = calloc(1, hl + 1);
    if (!h || fread(h, 1, hl, f) != hl || !strstr(h, "'<f4'") || strstr(h, "'fortran_order': True")) {
        free(h); fclose(f); return NULL;
    }
    char *p = strchr(strstr(h, "'shape'"), '(');
    int64_t n = 1;
    *ndim = 0;
    while (p && *ndim < 4) {
        p++;
        while (*p == ' ') p++;
        if (*p == ')') break;
        int64_t v = strtoll(p, &p, 10);
        shape[(*ndim)++] = v;
        n *= v;
        p = strpbrk(p, ",)");
        if (!p || *p == ')') break;
    }
    free(h);
    float *d = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!d || fread(d, sizeof(float), (size_t)n, f) != (size_t)n) { free(d); fclose(f); return NULL; }
    fclose(f);
    return d;
}
#endif
