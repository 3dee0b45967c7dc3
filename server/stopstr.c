/* stopstr.c — stop strings applied to decoded text (OpenAI `stop`): find the first stop string,
 * and while streaming hold back the tail that could still become one, so no text past a stop
 * string is ever sent. Pure functions; the engine thread calls them after every token. */
#include <string.h>

#include "server/serve.h"

int64_t vlmd_stop_scan(const char *text, size_t len, char *const *stops, int n_stops,
                       size_t *emit) {
    if (n_stops <= 0) {
        *emit = len;
        return -1;
    }
    size_t maxl = 0;
    for (int i = 0; i < n_stops; i++) {
        size_t l = strlen(stops[i]);
        if (l > maxl) maxl = l;
    }
    /* Text before *emit was checked already (a stop string inside it would have been found),
     * but a stop string may start in the held-back tail; start maxl-1 bytes before emit. */
    size_t from = *emit + 1 > maxl ? *emit + 1 - maxl : 0;
    int64_t best = -1;
    for (int i = 0; i < n_stops; i++) {
        size_t l = strlen(stops[i]);
        if (l == 0 || l > len) continue;
        for (size_t p = from; p + l <= len; p++) {
            if (best >= 0 && (int64_t)p >= best) break;
            if (text[p] == stops[i][0] && !memcmp(text + p, stops[i], l)) {
                best = (int64_t)p;
                break;
            }
        }
    }
    if (best >= 0) {
        *emit = (size_t)best;
        return best;
    }
    /* Longest suffix of text that is a proper prefix of some stop string. */
    size_t hold = 0;
    for (int i = 0; i < n_stops; i++) {
        size_t l = strlen(stops[i]);
        if (l == 0) continue;
        for (size_t k = (l - 1 < len ? l - 1 : len); k > hold; k--) {
            if (!memcmp(text + len - k, stops[i], k)) {
                hold = k;
                break;
            }
        }
    }
    size_t e = len - hold;
    if (e > *emit) *emit = e;
    return -1;
}
