/* cpu_smalln.h — the loop nest shared by the small-n BF16 linear kernels (batched decode:
 * y = x W^T for n = 4..~48 x rows, bf16 weights read in place): cpu_avx512.c (8-row groups, f32
 * FMA or vdpbf16ps tiles) and cpu_avx2.c (4-row groups). Each file supplies a tile kernel; the
 * functions here are always inlined into the file's target-attributed entry point, so the tile call
 * is direct there (as an indirect call per tile it cost ~4% in cache) and R, the rows per group,
 * is a constant. Internal to runtime/; included only by the kernel files. */
#ifndef VLM_CPU_SMALLN_H
#define VLM_CPU_SMALLN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A tile kernel: out[r * R + i] = x row g + i . weight row w0 (r = 0) / w1 (r = 1) over [t0, t1),
 * xg the group's block 0 in the file's x layout, rows the group's real rows (at most R); weights
 * past k read as zero, and so does x. pf0/pf1: the next tile's rows, to prefetch. */
typedef void (*smalln_tile_fn)(const void *xg, int64_t rows, const uint16_t *w0, const uint16_t *w1,
                               int64_t k, int64_t t0, int64_t t1, const uint16_t *pf0,
                               const uint16_t *pf1, float *out);

/* Weight rows per block when the x chunks of all rows do not fit L1: every group runs over one
 * block (256 rows x a 1-2 KiB chunk, L2) before the next, so the weights come from DRAM once
 * instead of once per group. AVX-512 batch-16 decode in the 2B-size model: 46.4 -> 50.6 t/s;
 * lm_head at n = 16: 55 -> 43 ms (bench in docs/cpu-kernels.md). */
#define SMALLN_JB 256

/* A tile's sums s[r * R + i] (weight row j + r, x row g + i) into y: written for the first k
 * chunk (tc == 0), added after; rows past n and a missing second column are skipped. */
__attribute__((always_inline)) static inline void smalln_store(const float *s, int R, int64_t n, int64_t g, int64_t j,
                                                               bool pair, int64_t tc, float *y, int64_t ldy) {
    const int64_t rows = n - g < R ? n - g : R;
    for (int64_t i = 0; i < rows; i++) {
        float *yi = y + (g + i) * ldy + j;
        yi[0] = tc ? yi[0] + s[i] : s[i];
        if (pair) yi[1] = tc ? yi[1] + s[R + i] : s[R + i];
    }
}

/* One R-row x 2-column tile (x rows g.., weight rows j, j+1) over the k chunk [tc, te), into y. */
__attribute__((always_inline)) static inline void smalln_one(smalln_tile_fn tile, int R, const void *x, size_t esz,
                                                             int64_t n, int64_t kp, int64_t k, const uint16_t *w,
                                                             int64_t j, int64_t j1, int64_t g, int64_t tc,
                                                             int64_t te, float *y, int64_t ldy) {
    const bool pair = j + 1 < j1;
    const uint16_t *w0 = w + j * k, *w1 = pair ? w0 + k : w0;
    const int64_t jn = j + 2 < j1 ? j + 2 : j; /* prefetch the next pair's chunk */
    const uint16_t *p0 = w + jn * k, *p1 = jn + 1 < j1 ? p0 + k : p0;
    float s[16];
    /* group g / R starts at row g's block 0 */
    tile((const char *)x + (size_t)(g * kp) * esz, n - g, w0, w1, k, tc, te, p0, p1, s);
    smalln_store(s, R, n, g, j, pair, tc, y, ldy);
}

/* y[i * ldy + j] = x row i . W row j for i < n, j0 <= j < j1, x in the tile kernel's layout (esz
 * bytes per element, npad x kp, npad a multiple of R), k in chunks of kc. Loop order: while the x
 * chunk of all rows fits L1 (32 KiB), each weight pair's chunk is used by every row group right
 * after it arrives (weights read once from memory). Beyond that the row groups go inside blocks of
 * SMALLN_JB weight rows, so one group's x chunk stays in L1 while it runs over the block and the
 * later groups find the block in L2. */
__attribute__((always_inline)) static inline void smalln_drive(smalln_tile_fn tile, int R, const void *x, size_t esz,
                                                               int64_t kc, int64_t n, int64_t npad, int64_t kp,
                                                               int64_t k, const uint16_t *w, int64_t j0, int64_t j1,
                                                               float *y, int64_t ldy) {
    const bool x_in_l1 = npad * kc * (int64_t)esz <= 32768;
    for (int64_t tc = 0; tc < k; tc += kc) {
        const int64_t te = tc + kc < kp ? tc + kc : kp;
        if (x_in_l1) {
            for (int64_t j = j0; j < j1; j += 2)
                for (int64_t g = 0; g < npad; g += R)
                    smalln_one(tile, R, x, esz, n, kp, k, w, j, j1, g, tc, te, y, ldy);
        } else {
            for (int64_t jb = j0; jb < j1; jb += SMALLN_JB) {
                const int64_t je = jb + SMALLN_JB < j1 ? jb + SMALLN_JB : j1;
                for (int64_t g = 0; g < npad; g += R)
                    for (int64_t j = jb; j < je; j += 2)
                        smalln_one(tile, R, x, esz, n, kp, k, w, j, j1, g, tc, te, y, ldy);
            }
        }
    }
}

#endif
