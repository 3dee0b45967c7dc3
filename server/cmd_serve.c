/* cmd_serve.c — `vlmd serve`: reads settings, starts listening at once (so /health answers and
 * /ready says 503 while the model loads), loads the model bundle, starts the engine thread, then
 * waits for SIGTERM/SIGINT. On the signal: /ready turns 503 and new generation requests get 503,
 * running and queued requests get up to --drain-timeout to finish, the rest are cancelled, and the
 * process exits 0. */
#include <curl/curl.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "server/serve.h"
#include "server/server.h"

/* After the listener closes, time for requests on connections taken from its backlog to arrive and
 * be admitted before new requests get 503 (loopback and LAN bodies arrive well within it). */
#define LISTEN_CLOSE_GRACE_MS 200

static bool is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

/* --model absent: configs/models/vlmd-demo in the repository the binary was built in
 * (<repo>/build/vlmd -> <repo>), then the installed copy. */
static int default_model(char *out, size_t n) {
    char exe[PATH_MAX];
    ssize_t l = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (l > 0) {
        exe[l] = 0;
        char *dir = dirname(exe);      /* <repo>/build */
        char up[PATH_MAX];
        snprintf(up, sizeof up, "%s", dir);
        char *repo = dirname(up);      /* <repo> */
        snprintf(out, n, "%s/configs/models/vlmd-demo", repo);
        if (is_dir(out)) return 0;
    }
    snprintf(out, n, "/usr/share/vlmd/models/vlmd-demo");
    return is_dir(out) ? 0 : -1;
}

int vlmd_cmd_serve(int argc, char **argv) {
    static vlmd_serve_cfg cfg;
    char err[1024];
    vlmd_cfg_defaults(&cfg);
    int rc = vlmd_cfg_parse(&cfg, argc, argv, err, sizeof err);
    if (rc == 1) {
        vlmd_cfg_help(stdout);
        return 0;
    }
    if (rc < 0) {
        fprintf(stderr, "vlmd serve: %s\n", err);
        return 2;
    }
    if (!cfg.model[0] && default_model(cfg.model, sizeof cfg.model) != 0) {
        fprintf(stderr, "vlmd serve: no --model given and no demo model installed "
                        "(looked for configs/models/vlmd-demo next to the binary and "
                        "/usr/share/vlmd/models/vlmd-demo); pass --model DIR\n");
        return 2;
    }
    setvbuf(stderr, NULL, _IOLBF, 0);
    vlmd_cfg_log(&cfg, stderr);
    curl_global_init(CURL_GLOBAL_DEFAULT);

    /* Signals are taken synchronously by this thread only; every thread started below inherits
     * the mask. SIGPIPE is ignored: a client hanging up is a write error, not a death. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    vlmd_metrics *m = vlmd_metrics_new();
    int port = 0;
    vlmd_http *h = vlmd_http_start(&cfg, m, &port, err, sizeof err);
    if (!h) {
        fprintf(stderr, "level=error event=listen msg=\"%s\"\n", err);
        vlmd_metrics_free(m);
        return 1;
    }
    fprintf(stderr, "level=info event=listening host=%s port=%d\n", cfg.host, port);

    double t0 = vlmd_now();
    vlmd_bundle *b = NULL;
    vlm_engine_opts peo;
    vlm_status st = vlmd_parallel_opts(cfg.tp, cfg.backend, cfg.gpus, &peo, err, sizeof err) ? VLM_E_INVALID
                    : vlm_backend_available(peo.backend, err, sizeof err);
    if (st != VLM_OK) { /* before loading: a wrong backend should not cost a model load */
        fprintf(stderr, "level=error event=backend msg=\"%s\"\n", err);
        vlmd_http_stop(h);
        vlmd_metrics_free(m);
        return 1;
    }
    st = vlmd_bundle_load(cfg.model, cfg.threads, &b, err, sizeof err);
    if (st == VLM_OK) st = vlmd_bundle_vision_tp(b, cfg.tp, err, sizeof err);
    if (st != VLM_OK) {
        fprintf(stderr, "level=error event=load model=\"%s\" msg=\"%s\"\n", cfg.model, err);
        vlmd_bundle_free(b);
        vlmd_http_stop(h);
        vlmd_metrics_free(m);
        return 1;
    }
    if (cfg.model_name[0]) snprintf(b->name, sizeof b->name, "%s", cfg.model_name);
    vlmd_sched *s = vlmd_sched_new(b, &cfg, m);
    if (!s || vlmd_sched_start(s, err, sizeof err) != 0) {
        fprintf(stderr, "level=error event=engine msg=\"%s\"\n", s ? err : "out of memory");
        vlmd_sched_free(s);
        vlmd_bundle_free(b);
        vlmd_http_stop(h);
        vlmd_metrics_free(m);
        return 1;
    }
    vlmd_http_set_ready(h, b, s, b->name);
    fprintf(stderr, "level=info event=ready model=\"%s\" name=%s max_seq_tokens=%lld load_s=%.2f cpu=\"%s\"\n",
            cfg.model, b->name, (long long)vlmd_sched_max_seq_tokens(s), vlmd_now() - t0, vlm_cpu_describe());

    int sig = 0;
    sigwait(&set, &sig);
    if (cfg.drain_delay > 0) {
        /* Lame duck: /ready says draining so health-checking load balancers (and Kubernetes
         * endpoints) stop routing here, while what still arrives is served normally. Then the
         * listener closes: a new connection is refused, which every load balancer may retry on
         * another replica because the request never reached this one. */
        fprintf(stderr, "level=info event=drain_delay signal=%d delay_s=%g\n", sig, cfg.drain_delay);
        vlmd_http_set_unready(h);
        struct timespec ts = {(time_t)cfg.drain_delay,
                              (long)((cfg.drain_delay - (double)(time_t)cfg.drain_delay) * 1e9)};
        while (nanosleep(&ts, &ts) != 0) {}
        int taken = vlmd_http_close_listener(h);
        fprintf(stderr, "level=info event=listener_closed backlog_taken=%d\n", taken);
        /* Requests on connections just taken from the backlog are admitted, not refused. */
        struct timespec g = {0, LISTEN_CLOSE_GRACE_MS * 1000000L};
        nanosleep(&g, NULL);
    }
    fprintf(stderr, "level=info event=drain signal=%d busy=%d timeout_s=%g\n", sig, vlmd_sched_busy(s),
            cfg.drain_timeout);
    vlmd_http_set_draining(h);
    vlmd_sched_set_draining(s);
    double deadline = vlmd_now() + cfg.drain_timeout;
    while (vlmd_sched_busy(s) > 0 && vlmd_now() < deadline) {
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    int left = vlmd_sched_busy(s);
    if (left > 0) {
        fprintf(stderr, "level=warn event=drain_timeout cancelled=%d\n", left);
        vlmd_sched_cancel_all(s);
        while (vlmd_sched_busy(s) > 0) {
            struct timespec ts = {0, 20 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    /* Let connection threads write their last bytes, then stop MHD (joins them) and the engine. */
    vlmd_http_stop(h);
    vlmd_sched_free(s);
    vlmd_bundle_free(b);
    vlmd_metrics_free(m);
    curl_global_cleanup();
    fprintf(stderr, "level=info event=exit code=0\n");
    return 0;
}
