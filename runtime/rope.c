/* rope.c — M-RoPE position ids (transformers get_rope_index, SPEC §C.2) for text and images. */
#include "runtime/rt_internal.h"

int64_t vlm_rope_index(const vlm_model_config *cfg, const int32_t *ids, int64_t n, const int32_t (*grids)[3],
                       int n_grids, int64_t *pos) {
    int64_t *pt = pos, *ph = pos + n, *pw = pos + 2 * n;
    int merge = cfg->vision.spatial_merge_size > 0 ? cfg->vision.spatial_merge_size : 2;
    int64_t st = 0, maxpos = -1;
    for (int g = 0; g < n_grids; g++) {
        int64_t ed = st;
        while (ed < n && ids[ed] != cfg->image_token_id) ed++;
        if (ed >= n) break; /* fewer pads than grids: the caller validates counts */
        int64_t base = maxpos + 1;
        for (int64_t i = st; i < ed; i++) pt[i] = ph[i] = pw[i] = base + (i - st);
        int64_t L = ed - st;
        int64_t gt = grids[g][0], gh = grids[g][1] / merge, gw = grids[g][2] / merge;
        if (L > 0) maxpos = base + L - 1;
        int64_t k = ed;
        for (int64_t a = 0; a < gt; a++)
            for (int64_t b = 0; b < gh; b++)
                for (int64_t c = 0; c < gw && k < n; c++, k++) {
                    pt[k] = base + L + a;
                    ph[k] = base + L + b;
                    pw[k] = base + L + c;
                    int64_t m = pt[k] > ph[k] ? pt[k] : ph[k];
                    if (pw[k] > m) m = pw[k];
                    if (m > maxpos) maxpos = m;
                }
        st = ed + gt * gh * gw;
    }
    int64_t base = maxpos + 1;
    for (int64_t i = st; i < n; i++) pt[i] = ph[i] = pw[i] = base + (i - st);
    if (st < n) maxpos = base + (n - st) - 1;
    return (maxpos + 1) - n;
}
