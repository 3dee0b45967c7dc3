/* cpu.c — CPU kernel dispatch: feature detection, thread setup, vlm_linear and vlm_gemm_f32.
 *
 * vlm_linear has two regimes (docs/cpu-kernels.md has the measurements behind them):
 *   - few rows (decode, n < gemm_min_rows): memory-bandwidth bound. Each thread streams its own
 *     contiguous block of weight rows once and applies every x row to a weight row while it is in
 *     L1 (up to VLM_DOT_MAX_ROWS x rows per kernel call), so n = 4..64 reads the weights once.
 *     The dot-row kernel is scalar, AVX2+FMA or AVX-512, picked at run time.
 *   - many rows (prefill, vision, n >= gemm_min_rows): compute bound. The own blocked GEMM
 *     (cpu_gemm.c: packed panels, 14x32 AVX-512 / 6x16 AVX2 register tiles, static thread split).
 *     OpenBLAS sgemm on converted panels stays selectable (VLMD_GEMM=openblas) for comparison;
 *     it runs single-threaded inside our OpenMP regions so OpenMP is the one thread pool.
 * All accumulation is f32. */
#include "runtime/cpu_internal.h"

#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef VLM_HAVE_OPENBLAS
#include <cblas.h>
#endif

/* Invariant check local to the kernels so this file links on its own (same contract as
 * VLM_ASSERT: a broken invariant, never user input, aborts with the location). */
#define CPU_ASSERT(cond)                                                                      \
    do {                                                                                      \
        if (!(cond)) cpu_invariant_failed(__FILE__, __LINE__, #cond);                         \
    } while (0)
static _Noreturn void cpu_invariant_failed(const char *file, int line, const char *what) {
    fprintf(stderr, "vlmd: invariant failed at %s:%d: %s\n", file, line, what);
    abort();
}

/* ---- state: detected once, then read-only except the forced path and the thread count ---- */
static pthread_once_t s_once = PTHREAD_ONCE_INIT;
static bool s_feat_avx2, s_feat_fma, s_feat_avx512f, s_feat_avx512bw, s_feat_avx512bf16,
    s_feat_avx512vnni, s_feat_amxbf16, s_feat_amxtile;
static vlm_cpu_path s_best = VLM_CPU_SCALAR;
static vlm_cpu_path s_path = VLM_CPU_SCALAR;
static int s_threads = 1;
/* Prefill threshold: at n >= this, the blocked GEMM (cpu_gemm.c) beats the dot-row kernels. The
 * GEMM's 14-row register tile reuses each weight 14x from registers where the dot-row kernel reuses
 * it at most 4x. bench/matmul on the dev machine, 1 thread, W 1536x1536 bf16, GFLOP/s dot/GEMM:
 * n=4 46/19, n=8 31/37, n=12 31/54, n=64 30/113 (docs/cpu-kernels.md). */
static int64_t s_gemm_min_rows = 8;
/* Batched decode: 4 <= n <= this with bf16 weights on the AVX-512 or AVX2 path takes the small-n
 * kernel (bf16 read in place, 8x2 / 4x2 register tiles); -1: the path's own crossover from
 * bench/matmul's table (AVX-512 48; AVX2 64 on a Zen 2, where n = 64 ran 127 GFLOP/s against the
 * GEMM's 115 and n = 96 114 against 130). */
static int64_t s_smalln_max_rows = -1;
static vlm_bf16_kernel s_bf16k;
/* The AMX small-n kernel runs wherever the bf16 kernel is AMX (or its C model, in tests) */
static bool amx_rows_on(void) { return s_bf16k == VLM_BF16K_AMX || s_bf16k == VLM_BF16K_AMX_EMULATED; }
static int64_t smalln_max_rows(void) {
    if (s_smalln_max_rows >= 0) return s_smalln_max_rows;
    /* AMX: the tile small-n kernel (W read in place as A tiles) handles up to 32 rows */
    if (s_bf16k == VLM_BF16K_AMX && s_path == VLM_CPU_AVX512) return 32;
    return s_path == VLM_CPU_AVX2 ? 64 : 48;
}
/* The own GEMM is the default for every many-row product; OpenBLAS stays selectable
 * (VLMD_GEMM=openblas) for comparison. */
static bool s_gemm_own = true;
/* The bf16 hardware GEMM kernel for BF16 weights (vlm_cpu_bf16_kernel in cpu_internal.h): the one
 * in use, auto's choice, the measured vdpbf16ps/FMA gain (0: not measured), why, and whether each
 * instruction set was found to run (-1: not tried yet). */
static vlm_bf16_kernel s_bf16k_auto;
static double s_bf16_gain;
static const char *s_bf16_why = "no avx512_bf16 or amx";
static const char *s_bf16_auto_why = "no avx512_bf16 or amx";
static int s_avx512bf16_runs = -1, s_amx_runs = -1;
#define BF16_MIN_GAIN 1.15
static char s_model[128] = "unknown CPU";
static char s_desc[1024];

static const vlm_dot_rows_fn s_kernels[VLM_CPU_PATH_COUNT] = {
    vlm_dot_rows_scalar, vlm_dot_rows_avx2, vlm_dot_rows_avx512};
static const char *const s_path_names[VLM_CPU_PATH_COUNT] = {"scalar", "avx2", "avx512"};

static void read_cpu_model(void) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0) continue;
        const char *p = strchr(line, ':');
        if (!p) break;
        p++;
        while (*p == ' ' || *p == '\t') p++;
        snprintf(s_model, sizeof s_model, "%s", p);
        s_model[strcspn(s_model, "\n")] = 0;
        break;
    }
    fclose(f);
}

/* F16C and AMX come from cpuid directly (gcc 12's __builtin_cpu_supports lacks some of them). */
static void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
    unsigned a = leaf, b = 0, c = sub, d = 0;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    r[0] = a, r[1] = b, r[2] = c, r[3] = d;
}

static bool s_feat_f16c;
static void detect_cpuid_bits(void) {
    unsigned r[4];
    cpuid(1, 0, r);
    s_feat_f16c = (r[2] >> 29) & 1; /* the AVX2 kernel converts F16 weights with vcvtph2ps */
    cpuid(0, 0, r);
    if (r[0] < 7) return;
    cpuid(7, 0, r);
    s_feat_amxbf16 = (r[3] >> 22) & 1;
    s_feat_amxtile = (r[3] >> 24) & 1;
}

/* The setters' bodies without ensure_init: detect_once applies the environment through them
 * (calling the public ones from inside pthread_once would wait on itself forever). */
static int force_path(const char *name);
static int set_bf16_dot(const char *mode);
static void bf16_auto(void);

static void detect_once(void) {
    __builtin_cpu_init();
    s_feat_avx2 = __builtin_cpu_supports("avx2");
    s_feat_fma = __builtin_cpu_supports("fma");
    s_feat_avx512f = __builtin_cpu_supports("avx512f");
    s_feat_avx512bw = __builtin_cpu_supports("avx512bw");
    s_feat_avx512bf16 = __builtin_cpu_supports("avx512bf16");
    s_feat_avx512vnni = __builtin_cpu_supports("avx512vnni");
    detect_cpuid_bits();
    read_cpu_model();
    if (s_feat_avx2 && s_feat_fma && s_feat_f16c) s_best = VLM_CPU_AVX2;
    if (s_best == VLM_CPU_AVX2 && s_feat_avx512f && s_feat_avx512bw) s_best = VLM_CPU_AVX512;
    s_path = s_best;
    s_threads = omp_get_max_threads();
    const char *env = getenv("VLMD_CPU_PATH");
    if (env && *env && force_path(env) != 0)
        fprintf(stderr, "vlmd: VLMD_CPU_PATH=%s not usable on this CPU; using %s\n", env,
                s_path_names[s_path]);
    bf16_auto();
    env = getenv("VLMD_BF16_DOT");
    if (env && *env && set_bf16_dot(env) != 0)
        fprintf(stderr, "vlmd: VLMD_BF16_DOT=%s not usable on this CPU; bf16 GEMM kernel: %s\n", env,
                vlm_gemm_bf16_kernel_name(s_bf16k));
    env = getenv("VLMD_GEMM");
    if (env && *env && !strcmp(env, "openblas")) {
#ifdef VLM_HAVE_OPENBLAS
        s_gemm_own = false;
#else
        fprintf(stderr, "vlmd: VLMD_GEMM=openblas but built without OpenBLAS; using own\n");
#endif
    }
}

static void ensure_init(void) { pthread_once(&s_once, detect_once); }

bool vlm_cpu_path_supported(vlm_cpu_path p) {
    ensure_init();
    return p >= VLM_CPU_SCALAR && p <= s_best;
}

const char *vlm_cpu_path_name(vlm_cpu_path p) {
    return (p >= 0 && p < VLM_CPU_PATH_COUNT) ? s_path_names[p] : "?";
}

int vlm_cpu_force_path(const char *name) {
    ensure_init();
    return force_path(name);
}

static int force_path(const char *name) {
    if (!strcmp(name, "auto")) {
        s_path = s_best;
        return 0;
    }
    for (int p = 0; p < VLM_CPU_PATH_COUNT; p++) {
        if (strcmp(name, s_path_names[p]) != 0) continue;
        if (p > (int)s_best) return -1;
        s_path = (vlm_cpu_path)p;
        return 0;
    }
    return -1;
}

/* Self-tests of the bf16 hardware kernels. A SIGILL (instruction missing, or state not enabled
 * by the OS) or SIGSEGV (a broken tile kernel) inside them jumps back and the answer is no; a
 * wrong result is a no as well. They run once, at init or on request, on the calling thread. */
static sigjmp_buf s_probe_env;
static void probe_fault(int sig) {
    (void)sig;
    siglongjmp(s_probe_env, 1);
}
typedef bool (*probe_fn)(void);
static bool run_guarded(probe_fn fn) {
    struct sigaction sa, old_ill, old_segv;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = probe_fault;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGILL, &sa, &old_ill) != 0) return false;
    if (sigaction(SIGSEGV, &sa, &old_segv) != 0) {
        sigaction(SIGILL, &old_ill, NULL);
        return false;
    }
    volatile bool ok = false;
    if (sigsetjmp(s_probe_env, 1) == 0) ok = fn();
    sigaction(SIGSEGV, &old_segv, NULL);
    sigaction(SIGILL, &old_ill, NULL);
    return ok;
}

/* A bf16 GEMM kernel (packers, tile config, kernel) on a product with row, column and k tails, against
 * the f32 kernel on the same bf16-rounded A: products of bf16 are exact in f32, so the two differ
 * only in summation order. */
static vlm_bf16_kernel s_selftest_kind;
static bool gemm_selftest(void) {
    enum { N = 45, M = 70, K = 1100 };
    float *a = malloc(sizeof(float) * N * K), *ar = malloc(sizeof(float) * N * K);
    float *c = malloc(sizeof(float) * N * M), *r = malloc(sizeof(float) * N * M);
    uint16_t *b = malloc(sizeof(uint16_t) * M * K);
    float *scratch = malloc(vlm_gemm_scratch_bytes());
    bool ok = a && ar && c && r && b && scratch;
    uint32_t x = 12345;
    for (int i = 0; ok && i < N * K; i++) {
        x = x * 1664525u + 1013904223u;
        a[i] = (float)((int)(x >> 8) % 2001 - 1000) / 997.0f;
        ar[i] = vlm_bf16_to_f32(vlm_f32_to_bf16(a[i]));
    }
    for (int i = 0; ok && i < M * K; i++) {
        x = x * 1664525u + 1013904223u;
        b[i] = vlm_f32_to_bf16((float)((int)(x >> 8) % 2001 - 1000) / 1013.0f);
    }
    if (ok) {
        vlm_gemm_args g = {.n = N, .m = M, .k = K, .a = a, .lda = K, .b = b, .bdt = VLM_BF16, .ldb = K,
                           .c = c, .ldc = M, .bf16 = s_selftest_kind};
        vlm_gemm_serial(&g, VLM_CPU_AVX512, scratch);
        g.a = ar, g.c = r, g.bf16 = VLM_BF16K_NONE;
        vlm_gemm_serial(&g, VLM_CPU_AVX512, scratch);
        for (int i = 0; i < N && ok; i++)
            for (int j = 0; j < M && ok; j++) {
                double mag = 0;
                for (int t = 0; t < K; t++) mag += fabs((double)ar[i * K + t] * vlm_bf16_to_f32(b[j * K + t]));
                ok = fabs((double)c[i * M + j] - r[i * M + j]) <= 1e-5 * mag + 1e-6;
            }
    }
    free(a), free(ar), free(c), free(r), free(b), free(scratch);
    return ok;
}

static bool bf16_selftest(vlm_bf16_kernel k) {
    if (k <= VLM_BF16K_NONE || k >= VLM_BF16K_COUNT || s_best != VLM_CPU_AVX512) return false;
    s_selftest_kind = k;
    return run_guarded(gemm_selftest);
}

bool vlm_cpu_bf16_selftest(vlm_bf16_kernel k) {
    ensure_init();
    return bf16_selftest(k);
}

static bool avx512bf16_runs(void) {
    if (s_avx512bf16_runs < 0)
        s_avx512bf16_runs = s_best == VLM_CPU_AVX512 &&
                            (s_feat_avx512bf16 ? vlm_bf16_dot_selftest() : run_guarded(vlm_bf16_dot_selftest));
    return s_avx512bf16_runs;
}

static bool amx_runs(void) {
    if (s_amx_runs < 0) {
        s_amx_runs = s_feat_amxbf16 && s_feat_amxtile && s_best == VLM_CPU_AVX512 && vlm_amx_request() &&
                     bf16_selftest(VLM_BF16K_AMX);
        if (s_feat_amxbf16 && s_feat_amxtile && !s_amx_runs)
            fprintf(stderr, "vlmd: cpuid reports AMX but the tile state or the AMX self-test failed; "
                            "AMX is not used\n");
    }
    return s_amx_runs;
}

/* No ensure_init: the GEMM packers ask this from inside the init-time AMX self-test (a nested
 * pthread_once would wait on itself); every kernel entry point has initialised before. */
bool vlm_cpu_has_avx512bf16(void) { return s_feat_avx512bf16 || s_avx512bf16_runs == 1; }

/* auto: AMX if it runs, else AVX512_BF16 if advertised and faster than FMA, else none */
static void bf16_auto(void) {
    s_bf16k_auto = VLM_BF16K_NONE;
    if (s_feat_amxbf16 && s_feat_amxtile && amx_runs()) {
        s_bf16k_auto = VLM_BF16K_AMX;
        s_bf16_auto_why = "amx tiles";
    } else if (s_feat_avx512bf16 && avx512bf16_runs()) {
        s_bf16_gain = vlm_bf16_dot_gain();
        const bool fast = s_bf16_gain >= BF16_MIN_GAIN;
        s_bf16k_auto = fast ? VLM_BF16K_AVX512 : VLM_BF16K_NONE;
        s_bf16_auto_why = fast ? "vdpbf16ps faster than FMA" : "vdpbf16ps not faster than FMA here";
    }
    s_bf16k = s_bf16k_auto;
    s_bf16_why = s_bf16_auto_why;
}

int vlm_cpu_set_bf16_dot(const char *mode) {
    ensure_init();
    return set_bf16_dot(mode);
}

static int set_bf16_dot(const char *mode) {
    vlm_bf16_kernel k;
    if (!strcmp(mode, "off")) {
        k = VLM_BF16K_NONE;
    } else if (!strcmp(mode, "auto")) {
        s_bf16k = s_bf16k_auto;
        s_bf16_why = s_bf16_auto_why;
        return 0;
    } else if (!strcmp(mode, "on")) {
        k = amx_runs() ? VLM_BF16K_AMX : avx512bf16_runs() ? VLM_BF16K_AVX512 : VLM_BF16K_NONE;
        if (k == VLM_BF16K_NONE) return -1;
    } else if (!strcmp(mode, "avx512bf16")) {
        if (!avx512bf16_runs()) return -1;
        k = VLM_BF16K_AVX512;
    } else if (!strcmp(mode, "amx")) {
        if (!amx_runs()) return -1;
        k = VLM_BF16K_AMX;
    } else if (!strcmp(mode, "amx-emulated")) {
        /* the same gate as real AMX (and, from VLMD_BF16_DOT, the same init-time call path) */
        if (!bf16_selftest(VLM_BF16K_AMX_EMULATED)) return -1;
        k = VLM_BF16K_AMX_EMULATED;
    } else {
        return -1;
    }
    if (k == VLM_BF16K_AVX512 && s_bf16_gain == 0) s_bf16_gain = vlm_bf16_dot_gain();
    s_bf16k = k;
    s_bf16_why = k == VLM_BF16K_NONE ? "turned off"
                 : k == VLM_BF16K_AVX512 && !s_feat_avx512bf16 ? "turned on; cpuid hides avx512_bf16 but it runs"
                                                               : "turned on";
    return 0;
}

vlm_bf16_kernel vlm_cpu_bf16_kernel(void) {
    ensure_init();
    return s_path == VLM_CPU_AVX512 ? s_bf16k : VLM_BF16K_NONE;
}

vlm_cpu_path vlm_cpu_active_path(void) {
    ensure_init();
    return s_path;
}

int64_t vlm_cpu_set_smalln_max_rows(int64_t rows) {
    int64_t old = s_smalln_max_rows;
    s_smalln_max_rows = rows < 0 ? -1 : rows;
    return old;
}

int64_t vlm_cpu_set_gemm_min_rows(int64_t rows) {
    int64_t old = s_gemm_min_rows;
    s_gemm_min_rows = rows < 0 ? 0 : rows;
    return old;
}

int vlm_cpu_set_gemm_backend(const char *name) {
    ensure_init();
    if (!strcmp(name, "own")) {
        s_gemm_own = true;
        return 0;
    }
#ifdef VLM_HAVE_OPENBLAS
    if (!strcmp(name, "openblas")) {
        s_gemm_own = false;
        return 0;
    }
#endif
    return -1;
}

const char *vlm_cpu_gemm_backend(void) {
    ensure_init();
    return s_gemm_own ? "own" : "openblas";
}

void vlm_cpu_init(int threads) {
    ensure_init();
    if (threads <= 0) threads = omp_get_num_procs();
    if (threads < 1) threads = 1;
    s_threads = threads;
    omp_set_num_threads(threads);
#ifdef VLM_HAVE_OPENBLAS
    /* OpenMP is the one thread pool: OpenBLAS (when selected) runs single-threaded inside our
     * parallel regions; its own pthreads would otherwise fight the OpenMP workers for cores. */
    openblas_set_num_threads(1);
#endif
}

int vlm_cpu_threads(void) {
    ensure_init();
    return s_threads;
}

const char *vlm_cpu_describe(void) {
    ensure_init();
    char feats[200] = "";
    const struct { bool on; const char *name; } f[] = {
        {s_feat_avx2, "avx2"},           {s_feat_fma, "fma"},
        {s_feat_avx512f, "avx512f"},     {s_feat_avx512bw, "avx512bw"},
        {s_feat_avx512bf16, "avx512_bf16"}, {s_feat_avx512vnni, "avx512_vnni"},
        {s_feat_amxbf16, "amx_bf16"},    {s_feat_amxtile, "amx_tile"},
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        if (!f[i].on) continue;
        size_t len = strlen(feats);
        snprintf(feats + len, sizeof feats - len, "%s%s", len ? "," : "", f[i].name);
    }
    char gemm[48], bf16[128];
    if (s_gemm_own)
        snprintf(gemm, sizeof gemm, "own-%s", vlm_gemm_kernel_name(s_path));
    else
        snprintf(gemm, sizeof gemm, "openblas");
    char batch[64] = "";
    const int64_t small_hi = s_path >= VLM_CPU_AVX2 ? smalln_max_rows() : 0;
    if (amx_rows_on() && small_hi >= 2)
        snprintf(batch, sizeof batch, " batch(2<=n<=%lld)=%s", (long long)(small_hi < 32 ? small_hi : 32),
                 s_bf16k == VLM_BF16K_AMX ? "amx-rows" : "amx-rows-emulated");
    else if (small_hi >= 4)
        snprintf(batch, sizeof batch, " batch(4<=n<=%lld)=%s", (long long)small_hi,
                 s_path == VLM_CPU_AVX2 ? "smalln-avx2-4x2"
                 : vlm_cpu_bf16_kernel() == VLM_BF16K_AVX512 ? "smalln-avx512bf16-8x2" : "smalln-avx512-8x2");
    const vlm_bf16_kernel bk = s_gemm_own ? vlm_cpu_bf16_kernel() : VLM_BF16K_NONE;
    const bool bf16_on = bk != VLM_BF16K_NONE;
    if (s_bf16_gain > 0)
        snprintf(bf16, sizeof bf16, "%s (%s; vdpbf16ps/fma gain %.2f)", bf16_on ? vlm_gemm_bf16_kernel_name(bk) : "off",
                 s_bf16_why, s_bf16_gain);
    else
        snprintf(bf16, sizeof bf16, "%s (%s)", bf16_on ? vlm_gemm_bf16_kernel_name(bk) : "off", s_bf16_why);
    snprintf(s_desc, sizeof s_desc,
             "%s; features=%s; linear_bf16=%s decode(n=1)=%s%s prefill(n>=%lld)=%s gemm_f32=%s; "
             "bf16_dot=%s; threads=%d",
             s_model, feats[0] ? feats : "none", s_path_names[s_path],
             s_path == VLM_CPU_AVX512 ? "gemv-avx512" : s_path == VLM_CPU_AVX2 ? "gemv-avx2" : s_path_names[s_path], batch,
             (long long)(small_hi >= s_gemm_min_rows ? small_hi + 1 : s_gemm_min_rows),
             s_gemm_min_rows > 0 ? (bf16_on ? vlm_gemm_bf16_kernel_name(bk) : gemm) : s_path_names[s_path],
             gemm, bf16, s_threads);
    return s_desc;
}

/* ---- element conversion (scalar; the SIMD kernels convert in registers) ---- */
static float cpu_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    union { uint32_t u; float f; } v = {bits};
    return v.f;
}

static size_t elem_size(vlm_dtype dt) {
    switch (dt) {
    case VLM_F32: return 4;
    case VLM_BF16:
    case VLM_F16: return 2;
    default: return 0;
    }
}

static float elem_at(const void *p, vlm_dtype dt, int64_t i) {
    switch (dt) {
    case VLM_F32: return ((const float *)p)[i];
    case VLM_BF16: return vlm_bf16_to_f32(((const uint16_t *)p)[i]);
    case VLM_F16: return cpu_f16_to_f32(((const uint16_t *)p)[i]);
    default: CPU_ASSERT(!"unsupported dtype"); return 0;
    }
}

void vlm_cpu_convert_row(const void *w, vlm_dtype dt, int64_t n, float *out) {
    if (dt == VLM_F32) {
        memcpy(out, w, (size_t)n * sizeof(float));
        return;
    }
    for (int64_t i = 0; i < n; i++) out[i] = elem_at(w, dt, i);
}

void vlm_dot_rows_scalar(const float *x, int64_t ldx, int nx, int64_t k, const void *w,
                         size_t ldw_bytes, int nw, vlm_dtype dt, float *out) {
    for (int r = 0; r < nw; r++) {
        const void *wr = (const char *)w + r * ldw_bytes;
        float acc[VLM_DOT_MAX_ROWS] = {0};
        for (int64_t t = 0; t < k; t++) {
            const float wv = elem_at(wr, dt, t);
            for (int i = 0; i < nx; i++) acc[i] += x[i * ldx + t] * wv;
        }
        for (int i = 0; i < nx; i++) out[r * VLM_DOT_MAX_ROWS + i] = acc[i];
    }
}

/* ---- vlm_linear ---- */
#ifdef VLM_HAVE_OPENBLAS
/* Weight rows per converted panel: 96 rows x k=1536 f32 = 576 KiB, inside a 1-2 MiB L2, and a
 * multiple of OpenBLAS's register tile. */
#define PANEL_ROWS 96

/* The OpenBLAS alternative to the own GEMM (kept for comparison, VLMD_GEMM=openblas): OpenBLAS
 * runs single-threaded (vlm_cpu_init) inside one OpenMP region, each thread converting and
 * multiplying its own contiguous share of weight panels, so OpenMP stays the only thread pool. */
static void linear_openblas(const float *x, int64_t n, int64_t k, const vlm_tensor *w, float *y) {
    const int64_t m = w->shape[0];
    const size_t esz = elem_size(w->dtype);
    CPU_ASSERT(n <= INT32_MAX && m <= INT32_MAX && k <= INT32_MAX); /* blasint may be 32-bit */
    const int64_t panels = (m + PANEL_ROWS - 1) / PANEL_ROWS;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        float *panel = malloc((size_t)PANEL_ROWS * (size_t)k * sizeof(float));
        CPU_ASSERT(panel != NULL);
        for (int64_t pi = panels * t / T; pi < panels * (t + 1) / T; pi++) {
            const int64_t j0 = pi * PANEL_ROWS, rows = m - j0 < PANEL_ROWS ? m - j0 : PANEL_ROWS;
            const char *src = (const char *)w->data + (size_t)j0 * (size_t)k * esz;
            for (int64_t r = 0; r < rows; r++) // panel: [rows, k] f32 copy of W[j0 : j0+rows]
                vlm_cpu_convert_row(src + (size_t)r * (size_t)k * esz, w->dtype, k,
                                    panel + (size_t)r * (size_t)k);
            // y[:, j0:j0+rows] = x[n, k] . panel^T
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)rows,
                        (blasint)k, 1.0f, x, (blasint)k, panel, (blasint)k, 0.0f, y + j0, (blasint)m);
        }
        free(panel);
    }
}
#endif

static void linear_gemm(const float *x, int64_t n, int64_t k, const vlm_tensor *w, float *y) {
#ifdef VLM_HAVE_OPENBLAS
    if (!s_gemm_own) return linear_openblas(x, n, k, w, y);
#endif
    const vlm_gemm_args g = {.n = n, .m = w->shape[0], .k = k, .a = x, .lda = k, .b = w->data,
                             .bdt = w->dtype, .ldb = k, .c = y, .ldc = w->shape[0],
                             .bf16 = w->dtype == VLM_BF16 ? vlm_cpu_bf16_kernel() : VLM_BF16K_NONE};
    vlm_gemm_parallel(&g, s_path);
}

/* ---- per-thread work buffers ----
 * Kept and grown across calls, freed when the thread exits (the key's destructor). Allocating them
 * per call (1-2 MB: the GEMM's packing buffer, the small-n path's permuted x) went back to the
 * kernel each time and every product page-faulted its buffer in again (clear_page was 7% of a
 * prefill in perf). */
typedef struct {
    void *p[VLM_CPU_BUF_COUNT];
    size_t cap[VLM_CPU_BUF_COUNT];
} thread_bufs;
static pthread_key_t s_buf_key;
static pthread_once_t s_buf_once = PTHREAD_ONCE_INIT;
static void thread_bufs_free(void *v) {
    thread_bufs *b = v;
    for (int i = 0; i < VLM_CPU_BUF_COUNT; i++) free(b->p[i]);
    free(b);
}
static void buf_key_create(void) { CPU_ASSERT(pthread_key_create(&s_buf_key, thread_bufs_free) == 0); }

void *vlm_cpu_thread_buffer(vlm_cpu_buf which, size_t bytes) {
    CPU_ASSERT(which >= 0 && which < VLM_CPU_BUF_COUNT);
    pthread_once(&s_buf_once, buf_key_create);
    thread_bufs *b = pthread_getspecific(s_buf_key);
    if (!b) {
        b = calloc(1, sizeof *b);
        CPU_ASSERT(b != NULL && pthread_setspecific(s_buf_key, b) == 0);
    }
    if (b->cap[which] < bytes) {
        free(b->p[which]);
        b->p[which] = aligned_alloc(64, (bytes + 63) / 64 * 64);
        CPU_ASSERT(b->p[which] != NULL);
        b->cap[which] = bytes;
    }
    return b->p[which];
}

/* Small-n path: x is permuted into the kernel's weight order once (each thread a share of its
 * rows), then each thread streams a contiguous block of weight-row pairs exactly once. */
/* Units (weight-row pairs, 32-row blocks) per dynamically scheduled chunk of a small-n product:
 * ~8 chunks per thread, at least `least` (16 pairs for the small-n kernel). Batch-16 decode, 2B-size, 2 threads: one static slab per thread 50.4-51.7
 * t/s, 2 chunks/thread 53.0, 4: 53.6-55.3, 8: 54.4-54.5, 16: 55.5 (same-minute runs). */
static int64_t dyn_chunk(int64_t units, int T, int64_t least) {
    const int64_t c = units / ((int64_t)T * 8);
    return c < least ? least : c;
}

/* y[i * m + j] += bias[j] for the rows i < n and the columns [j0, j1) one chunk wrote */
static void add_bias_cols(float *y, int64_t n, int64_t m, int64_t j0, int64_t j1, const vlm_tensor *bias) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = j0; j < j1; j++) y[i * m + j] += elem_at(bias->data, bias->dtype, j);
}


static void linear_smalln(const float *x, int64_t n, int64_t k, const vlm_tensor *w,
                          const vlm_tensor *bias, float *y) {
    const int64_t m = w->shape[0];
    /* AVX-512: 8-row groups, k blocks of 32; AVX2: 4-row groups, k blocks of 16 (cpu_internal.h);
     * vdpbf16ps where the bf16 kernel choice is AVX512_BF16 (the probe found it faster than FMA) */
    const bool avx2 = s_path == VLM_CPU_AVX2, bf16 = !avx2 && vlm_cpu_bf16_kernel() == VLM_BF16K_AVX512;
    const int64_t R = avx2 ? 4 : 8, KB = avx2 ? 16 : 32;
    const int64_t npad = (n + R - 1) / R * R, kp = (k + KB - 1) / KB * KB;
    float *xp = vlm_cpu_thread_buffer(VLM_CPU_BUF_SMALLN_X, (size_t)(npad * kp) * sizeof(float));
    const int64_t pairs = (m + 1) / 2;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t i0 = npad * t / T, i1 = npad * (t + 1) / T;
        if (avx2)
            vlm_smalln_permute_x_avx2(x, n, k, i0, i1, kp, xp);
        else if (bf16)
            vlm_smalln_pack_x_bf16(x, n, k, i0, i1, kp, (uint16_t *)xp);
        else
            vlm_smalln_permute_x(x, n, k, i0, i1, kp, xp);
#pragma omp barrier
        /* chunks of weight-row pairs, taken dynamically: a thread the OS preempts (HTTP threads,
         * the client on a small machine) no longer holds up the whole product at the barrier */
        const int64_t chunk = dyn_chunk(pairs, T, 16);
        const int64_t nchunks = (pairs + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t j0 = c * chunk * 2, j1e = (c + 1) * chunk * 2, j1 = j1e < m ? j1e : m;
            const uint16_t *wd = (const uint16_t *)w->data;
            if (avx2)
                vlm_linear_smalln_avx2(xp, n, npad, kp, k, wd, j0, j1, y, m);
            else if (bf16)
                vlm_linear_smalln_bf16((const uint16_t *)xp, n, npad, kp, k, wd, j0, j1, y, m);
            else
                vlm_linear_smalln_avx512(xp, n, npad, kp, k, wd, j0, j1, y, m);
            if (bias) add_bias_cols(y, n, m, j0, j1, bias);
        }
    }
}

/* Small n on AMX tiles: x packed once into the tile pair layout by the calling thread, then
 * 32-row blocks of W taken dynamically (as in linear_smalln), each read once, in place. */
static void linear_amx_rows(const float *x, int64_t n, int64_t k, const vlm_tensor *w,
                            const vlm_tensor *bias, float *y) {
    const int64_t m = w->shape[0], kdp = (k + 31) / 32 * 16;
    const bool real = s_bf16k == VLM_BF16K_AMX;
    float *xb = vlm_cpu_thread_buffer(VLM_CPU_BUF_SMALLN_X, (size_t)kdp * 32 * sizeof(float));
    vlm_amx_pack_x(x, n, k, kdp, xb);
    const int64_t blocks = (m + 31) / 32;
#pragma omp parallel
    {
        const int64_t chunk = dyn_chunk(blocks, omp_get_num_threads(), 1);
        if (real) vlm_amx_begin();
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < (blocks + chunk - 1) / chunk; c++) {
            const int64_t j0 = c * chunk * 32, j1e = (c + 1) * chunk * 32, j1 = j1e < m ? j1e : m;
            (real ? vlm_amx_rows : vlm_amx_rows_emulated)((const uint16_t *)w->data, k, j0, j1, xb, kdp, n, y, m);
            if (bias) add_bias_cols(y, n, m, j0, j1, bias);
        }
        if (real) vlm_amx_end();
    }
}

void vlm_linear(const float *x, int64_t n, int64_t k, const vlm_tensor *w, const vlm_tensor *bias,
                float *y) {
    ensure_init();
    CPU_ASSERT(w->ndim == 2 && w->shape[1] == k && n >= 0 && k >= 0);
    CPU_ASSERT(w->dtype == VLM_F32 || w->dtype == VLM_BF16 || w->dtype == VLM_F16);
    const int64_t m = w->shape[0];
    if (bias) {
        CPU_ASSERT(bias->dtype == VLM_F32 || bias->dtype == VLM_BF16);
        CPU_ASSERT(bias->ndim == 1 && bias->shape[0] == m);
    }
    if (n == 0 || m == 0) return;
    if (n >= 2 && n <= 32 && n <= smalln_max_rows() && k > 0 && w->dtype == VLM_BF16 && amx_rows_on())
        return linear_amx_rows(x, n, k, w, bias, y);
    if (n >= 4 && n <= smalln_max_rows() && k > 0 && w->dtype == VLM_BF16 && s_path >= VLM_CPU_AVX2)
        return linear_smalln(x, n, k, w, bias, y);
    if (s_gemm_min_rows > 0 && n >= s_gemm_min_rows && k > 0) {
        linear_gemm(x, n, k, w, y);
        if (bias) { /* bias decoded to f32 once, then a vectorisable add per row */
            float *bf = malloc((size_t)m * sizeof(float));
            CPU_ASSERT(bf != NULL);
            vlm_cpu_convert_row(bias->data, bias->dtype, m, bf);
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < n; i++) {
                float *yi = y + i * m;
                for (int64_t j = 0; j < m; j++) yi[j] += bf[j];
            }
            free(bf);
        }
        return;
    }
    const vlm_dot_rows_fn dot = s_kernels[s_path];
    const size_t esz = elem_size(w->dtype);
    const vlm_dtype dt = w->dtype;
    if (n == 1 && s_path >= VLM_CPU_AVX2) {
        /* decode: each thread streams one contiguous block of rows (a multiple of 4, so the
         * kernel's 4-row groups never straddle threads) straight into y */
        const int64_t groups = (m + 3) / 4;
#pragma omp parallel
        {
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t r0 = groups * t / T * 4, r1 = groups * (t + 1) / T * 4;
            const int64_t hi = r1 < m ? r1 : m;
            if (r0 < hi) {
                (s_path == VLM_CPU_AVX512 ? vlm_gemv_avx512 : vlm_gemv_avx2)(
                    x, k, (const char *)w->data + (size_t)r0 * (size_t)k * esz, (size_t)k * esz, hi - r0, dt, y + r0);
                if (bias)
                    for (int64_t j = r0; j < hi; j++) y[j] += elem_at(bias->data, bias->dtype, j);
            }
        }
        return;
    }
    // y: [n, m]; each thread owns a contiguous block of weight-row pairs and streams it once.
    // n = 1 takes one weight row per call (bandwidth bound, nothing to reuse); n > 1 takes two.
    const int nw = n > 1 ? VLM_DOT_MAX_WROWS : 1;
    const int64_t groups = (m + nw - 1) / nw;
    const size_t ldw = (size_t)k * esz;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t j = g * nw;
        const int rows = (int)(m - j < nw ? m - j : nw);
        const char *wr = (const char *)w->data + (size_t)j * ldw;
        float out[VLM_DOT_MAX_WROWS * VLM_DOT_MAX_ROWS];
        for (int64_t i0 = 0; i0 < n; i0 += VLM_DOT_MAX_ROWS) {
            const int nx = (int)(n - i0 < VLM_DOT_MAX_ROWS ? n - i0 : VLM_DOT_MAX_ROWS);
            dot(x + i0 * k, k, nx, k, wr, ldw, rows, dt, out);
            for (int r = 0; r < rows; r++) {
                const float b = bias ? elem_at(bias->data, bias->dtype, j + r) : 0.0f;
                for (int i = 0; i < nx; i++)
                    y[(i0 + i) * m + j + r] = out[r * VLM_DOT_MAX_ROWS + i] + b;
            }
        }
    }
}

/* ---- vlm_gemm_f32 ---- */
/* Below this many rows of a, vlm_gemm_f32 streams B instead of packing it (see the comment there). */
#define GEMM_F32_MIN_ROWS 4
void vlm_gemm_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b,
                  int64_t ldb, bool b_trans, float beta, float *c, int64_t ldc) {
    ensure_init();
    CPU_ASSERT(m >= 0 && n >= 0 && k >= 0 && lda >= k && ldc >= n);
    CPU_ASSERT(ldb >= (b_trans ? k : n));
    if (m == 0 || n == 0) return;
#ifdef VLM_HAVE_OPENBLAS
    if (!s_gemm_own && k > 0) {
        CPU_ASSERT(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX && lda <= INT32_MAX &&
                   ldb <= INT32_MAX && ldc <= INT32_MAX); /* blasint may be 32-bit */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, b_trans ? CblasTrans : CblasNoTrans, (blasint)m,
                    (blasint)n, (blasint)k, 1.0f, a, (blasint)lda, b, (blasint)ldb, beta, c,
                    (blasint)ldc);
        return;
    }
#endif
    if (m < GEMM_F32_MIN_ROWS) {
        /* decode-size products (per-head attention at one query row): a register tile of 14 rows
         * would do 14x the work and packing would copy the whole K/V once per call, so stream B
         * directly: the dot-row kernel for b_trans (K rows as f32 "weights"), an axpy otherwise. */
        const vlm_dot_rows_fn dot = s_kernels[s_path];
        for (int64_t i = 0; i < m; i++) {
            const float *ai = a + i * lda;
            float *ci = c + i * ldc;
            if (b_trans) {
                for (int64_t j = 0; j < n; j += VLM_DOT_MAX_WROWS) {
                    const int nw = (int)(n - j < VLM_DOT_MAX_WROWS ? n - j : VLM_DOT_MAX_WROWS);
                    float out[VLM_DOT_MAX_WROWS * VLM_DOT_MAX_ROWS];
                    dot(ai, k, 1, k, b + j * ldb, (size_t)ldb * sizeof(float), nw, VLM_F32, out);
                    for (int r = 0; r < nw; r++)
                        ci[j + r] = (beta == 0.0f ? 0.0f : beta * ci[j + r]) + out[r * VLM_DOT_MAX_ROWS];
                }
            } else {
                for (int64_t j = 0; j < n; j++) ci[j] = beta == 0.0f ? 0.0f : beta * ci[j];
                for (int64_t t = 0; t < k; t++) {
                    const float av = ai[t], *bt = b + t * ldb;
                    for (int64_t j = 0; j < n; j++) ci[j] += av * bt[j];
                }
            }
        }
        return;
    }
    if (beta != 0.0f && beta != 1.0f) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) c[i * ldc + j] *= beta;
    }
    // the GEMM's rows are this function's m; its B columns (weight rows) this function's n
    const vlm_gemm_args g = {.n = m, .m = n, .k = k, .a = a, .lda = lda, .b = b, .bdt = VLM_F32,
                             .ldb = ldb, .b_kn = !b_trans, .c = c, .ldc = ldc,
                             .accumulate = beta != 0.0f};
    vlm_gemm_parallel(&g, s_path);
}
