/* npy.c — minimal NumPy .npy writer (f32, C order) used by `vlmd generate --dump-logits` and tests. */
#include "runtime/runtime.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

vlm_status vlm_npy_write_f32(const char *path, const float *data, int64_t rows, int64_t cols, char *err,
                             size_t errlen) {
    char hdr[128];
    int hl;
    if (rows < 0) hl = snprintf(hdr, sizeof hdr, "{'descr': '<f4', 'fortran_order': False, 'shape': (%lld,), }",
                                (long long)cols);
    else hl = snprintf(hdr, sizeof hdr, "{'descr': '<f4', 'fortran_order': False, 'shape': (%lld, %lld), }",
                       (long long)rows, (long long)cols);
    int total = 10 + hl + 1;
    int pad = (64 - total % 64) % 64;
    FILE *f = fopen(path, "wb");
    if (!f) return vlm_errf(err, errlen, VLM_E_IO, "%s: %s", path, strerror(errno));
    unsigned short hlen = (unsigned short)(hl + pad + 1);
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff), (unsigned char)(hlen >> 8)};
    fwrite(pre, 1, 10, f);
    fwrite(hdr, 1, (size_t)hl, f);
    for (int i = 0; i < pad; i++) fputc(' ', f);
    fputc('\n', f);
    size_t n = (size_t)(rows < 0 ? 1 : rows) * (size_t)cols;
    size_t w = fwrite(data, sizeof(float), n, f);
    if (fclose(f) != 0 || w != n) return vlm_errf(err, errlen, VLM_E_IO, "%s: write failed", path);
    return VLM_OK;
}
