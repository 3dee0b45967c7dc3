/* vision_test_util.h — helpers shared by the vision unit tests: whole-file reads, a minimal .npy
 * reader (little-endian f32, C order) and JSON loading through cJSON. Test-only code. */
#ifndef VLM_VISION_TEST_UTIL_H
#define VLM_VISION_TEST_UTIL_H
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint8_t *vt_read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    rewind(f);
    uint8_t *b = malloc(sz > 0 ? (size_t)sz + 1 : 1);
    if (b && fread(b, 1, (size_t)sz, f) != (size_t)sz) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) b[sz > 0 ? sz : 0] = 0;
    *n = (size_t)(sz > 0 ? sz : 0);
    return b;
}

static cJSON *vt_read_json(const char *path) {
    size_t n;
    char *t = (char *)vt_read_file(path, &n);
    if (!t) return NULL;
    cJSON *j = cJSON_Parse(t);
    free(t);
    return j;
}

/* Loads an f32 .npy (v1/v2 header, '<f4', C order). shape[0..ndim-1]; returns malloc'd data. */
static float *vt_read_npy(const char *path, int64_t *shape, int *ndim) {
    size_t n;
    uint8_t *b = vt_read_file(path, &n);
    if (!b || n < 12 || memcmp(b, "\x93NUMPY", 6)) {
        free(b);
        return NULL;
    }
    size_t hl = b[6] == 1 ? (size_t)(b[8] | b[9] << 8) : (size_t)(b[8] | b[9] << 8 | b[10] << 16 | b[11] << 24);
    size_t off = b[6] == 1 ? 10 : 12;
    char *hdr = strndup((const char *)b + off, hl);
    float *out = NULL;
    if (strstr(hdr, "'<f4'") && strstr(hdr, "'fortran_order': False")) {
        char *s = strstr(hdr, "'shape': (");
        *ndim = 0;
        if (s) {
            s += 10;
            while (*s && *s != ')') {
                shape[(*ndim)++] = strtoll(s, &s, 10);
                while (*s == ',' || *s == ' ') s++;
            }
        }
        int64_t cnt = 1;
        for (int i = 0; i < *ndim; i++) cnt *= shape[i];
        if (off + hl + (size_t)cnt * 4 == n) {
            out = malloc((size_t)cnt * 4 + 4);
            memcpy(out, b + off + hl, (size_t)cnt * 4);
        }
    }
    free(hdr);
    free(b);
    return out;
}
#endif
