/* generate.c — a one-sequence generate loop on top of the engine API (for `vlmd generate` and tests). */
#include "runtime/runtime.h"

vlm_status vlm_generate(vlm_engine *e, const vlm_seq_desc *d, vlm_token_cb cb, void *user, vlm_finish *finish,
                        char *err, size_t errlen) {
    uint64_t id;
    vlm_status st = vlm_engine_add(e, d, &id, err, errlen);
    if (st) return st;
    vlm_token_event ev[64];
    vlm_finish fin = VLM_FINISH_NONE;
    bool cancelled = false;
    while (fin == VLM_FINISH_NONE) {
        int n = vlm_engine_step(e, ev, 64);
        if (n == 0 && vlm_engine_active(e) == 0) {
            fin = VLM_FINISH_ERROR; /* cannot happen while the sequence is resident */
            break;
        }
        for (int i = 0; i < n; i++) {
            if (ev[i].seq_id != id) continue;
            if (ev[i].finish != VLM_FINISH_NONE) fin = ev[i].finish;
            if (cb && !cancelled && !cb(&ev[i], user)) {
                vlm_engine_cancel(e, id);
                cancelled = true;
            }
        }
    }
    if (finish) *finish = fin;
    if (fin == VLM_FINISH_ERROR) return vlm_errf(err, errlen, VLM_E_INTERNAL, "sequence vanished from the engine");
    return VLM_OK;
}
