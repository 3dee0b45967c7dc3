/* test.h — the tiny unit-test harness shared by tests/unit/test_*.c.
 *
 * Each test binary registers nothing: it calls its test functions from main() through RUN(), and
 * CHECK*() records failures without stopping the test. TEST_MAIN_END() prints the line that
 * tests/run.sh adds up ("unit-result: NAME passed=N failed=M") and sets the exit status.
 * Test data paths are relative to the repository root (tests run from there). */
#ifndef VLM_TEST_H
#define VLM_TEST_H
#include <stdio.h>
#include <string.h>
#include <math.h>

static int t_passed, t_failed, t_cur_failed;
static const char *t_cur_name;

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            t_cur_failed++;                                                         \
            fprintf(stderr, "  FAIL %s:%d in %s: %s\n", __FILE__, __LINE__,         \
                    t_cur_name, #cond);                                             \
        }                                                                           \
    } while (0)

#define CHECKF(cond, ...)                                                           \
    do {                                                                            \
        if (!(cond)) {                                                              \
            t_cur_failed++;                                                         \
            fprintf(stderr, "  FAIL %s:%d in %s: %s: ", __FILE__, __LINE__,         \
                    t_cur_name, #cond);                                             \
            fprintf(stderr, __VA_ARGS__);                                           \
            fputc('\n', stderr);                                                    \
        }                                                                           \
    } while (0)

#define CHECK_EQ_INT(a, b) CHECKF((long long)(a) == (long long)(b), "%lld != %lld", \
                                  (long long)(a), (long long)(b))
#define CHECK_NEAR(a, b, tol) CHECKF(fabs((double)(a) - (double)(b)) <= (tol),      \
                                     "%.9g vs %.9g (tol %.3g)", (double)(a), (double)(b), (double)(tol))

/* Runs one test function; a test that records any failure counts as one failed test. */
#define RUN(fn)                                                                     \
    do {                                                                            \
        t_cur_name = #fn;                                                           \
        t_cur_failed = 0;                                                           \
        fn();                                                                       \
        if (t_cur_failed) { t_failed++; fprintf(stderr, "not ok %s\n", #fn); }      \
        else { t_passed++; fprintf(stderr, "ok %s\n", #fn); }                       \
    } while (0)

#define TEST_MAIN_END(name)                                                         \
    do {                                                                            \
        printf("unit-result: %s passed=%d failed=%d\n", name, t_passed, t_failed);  \
        return t_failed ? 1 : 0;                                                    \
    } while (0)

#endif
