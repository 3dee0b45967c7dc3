/* media.c — fetches http(s) image URLs for --allow-remote-media with libcurl: http/https only,
 * at most 3 redirects, a byte limit enforced while downloading, a total time limit, and (unless
 * --allow-private-media) a refusal to connect to private, loopback, link-local or unspecified
 * addresses. The address check runs in CURLOPT_OPENSOCKETFUNCTION, i.e. on the address actually
 * connected to, so DNS tricks and redirects cannot bypass it. */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "server/serve.h"

bool vlmd_addr_is_private(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET) {
        uint32_t a = ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr);
        return (a >> 24) == 0 || (a >> 24) == 10 || (a >> 24) == 127 || (a >> 16) == 0xA9FE ||
               (a >> 20) == 0xAC1 || (a >> 16) == 0xC0A8 || (a >> 22) == (0x64400000u >> 22) ||
               a >= 0xE0000000u;
    }
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (IN6_IS_ADDR_V4MAPPED(a)) {
            struct sockaddr_in v4 = {.sin_family = AF_INET};
            memcpy(&v4.sin_addr, a->s6_addr + 12, 4);
            return vlmd_addr_is_private((const struct sockaddr *)&v4);
        }
        return IN6_IS_ADDR_LOOPBACK(a) || IN6_IS_ADDR_UNSPECIFIED(a) || IN6_IS_ADDR_LINKLOCAL(a) ||
               IN6_IS_ADDR_SITELOCAL(a) || IN6_IS_ADDR_MULTICAST(a) || (a->s6_addr[0] & 0xFE) == 0xFC;
    }
    return true;
}

typedef struct {
    const vlmd_media_cfg *cfg;
    uint8_t *buf;
    size_t n, cap;
    bool too_big, blocked;
} fetch_t;

static size_t on_data(char *p, size_t sz, size_t nm, void *ud) {
    fetch_t *f = ud;
    size_t n = sz * nm;
    if (f->n + n > f->cfg->max_bytes) {
        f->too_big = true;
        return 0;
    }
    if (f->n + n > f->cap) {
        size_t nc = (f->cap ? f->cap * 2 : 65536) + n;
        uint8_t *nb = realloc(f->buf, nc);
        if (!nb) return 0;
        f->buf = nb;
        f->cap = nc;
    }
    memcpy(f->buf + f->n, p, n);
    f->n += n;
    return n;
}

static curl_socket_t on_open(void *ud, curlsocktype purpose, struct curl_sockaddr *a) {
    fetch_t *f = ud;
    (void)purpose;
    if (!f->cfg->allow_private && vlmd_addr_is_private(&a->addr)) {
        f->blocked = true;
        return CURL_SOCKET_BAD;
    }
    return socket(a->family, a->socktype, a->protocol);
}

vlm_status vlmd_media_fetch(void *ctx, const char *url, uint8_t **bytes, size_t *n, char *err,
                            size_t errlen) {
    const vlmd_media_cfg *cfg = ctx;
    fetch_t f = {.cfg = cfg};
    CURL *c = curl_easy_init();
    if (!c) return vlm_errf(err, errlen, VLM_E_INTERNAL, "cannot start a fetch");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(c, CURLOPT_MAXREDIRS, 3L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)(cfg->timeout * 1000));
    curl_easy_setopt(c, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)cfg->max_bytes);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "vlmd");
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &f);
    curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, on_open);
    curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, &f);
    CURLcode rc = curl_easy_perform(c);
    curl_easy_cleanup(c);
    if (rc != CURLE_OK) {
        free(f.buf);
        if (f.blocked)
            return vlm_errf(err, errlen, VLM_E_INVALID,
                            "image URL resolves to a private or loopback address (refused)");
        if (f.too_big || rc == CURLE_FILESIZE_EXCEEDED)
            return vlm_errf(err, errlen, VLM_E_LIMIT, "remote image is larger than %zu bytes", cfg->max_bytes);
        return vlm_errf(err, errlen, VLM_E_IO, "cannot fetch image URL: %s", curl_easy_strerror(rc));
    }
    if (!f.n) {
        free(f.buf);
        return vlm_errf(err, errlen, VLM_E_IO, "remote image is empty");
    }
    *bytes = f.buf;
    *n = f.n;
    return VLM_OK;
}
