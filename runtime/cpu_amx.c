/* cpu_amx.c — Intel AMX (TMUL, bf16) micro-kernel for the blocked GEMM in cpu_gemm.c, and the
 * pieces around it: asking Linux for the tile state (arch_prctl), the per-thread tile
 * configuration, and a C model of the four tile instructions the kernel uses so the same kernel
 * source (cpu_amx_ukr.h) runs in tests on machines without AMX.
 *
 * One TDPBF16PS multiplies a 16 x 32 bf16 A tile by a 32 x 16 bf16 B tile (B in pairs: row q holds
 * (B(j, 2q), B(j, 2q+1)) for 16 columns j) into a 16 x 16 f32 C tile: 8192 multiply-adds, 16x a
 * 512-bit FMA. The kernel keeps a 2 x 2 block of C tiles (32 x 32) and per 16 k pairs loads two A
 * and two B tiles. cpu.c turns this path on only after a self-test on real tiles passed. */
#include "runtime/cpu_internal.h"

#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- the tile configuration: palette 1, tiles 0..7 all 16 rows x 64 bytes ---- */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;
_Static_assert(sizeof(tile_config) == 64, "LDTILECFG reads 64 bytes");

static void config_fill(tile_config *c) {
    memset(c, 0, sizeof *c);
    c->palette = 1;
    for (int t = 0; t < 8; t++) c->colsb[t] = 64, c->rows[t] = 16;
}

/* Not _tile_loadconfig: GCC 12's version gives its asm an 8-byte memory operand, so the stores that
 * fill rows and colsb were dead to the compiler and dropped; LDTILECFG then read an all-zero shape
 * and the first tile instruction raised #UD (seen on a Xeon with AMX). This operand is all 64 bytes. */
__attribute__((target("amx-tile"))) void vlm_amx_begin(void) {
    tile_config c;
    config_fill(&c);
    __asm__ volatile("ldtilecfg %0" ::"m"(c));
}
__attribute__((target("amx-tile"))) void vlm_amx_end(void) { _tile_release(); }

bool vlm_amx_request(void) {
    /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it the first tile instruction faults */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

/* ---- the kernel on real tiles ---- */
#define AMX_UKR_NAME vlm_amx_ukr_32x32
#define AMX_ROWS_NAME vlm_amx_rows
#define AMX_UKR_ATTR __attribute__((target("amx-tile,amx-bf16")))
#define T_ZERO(t) _tile_zero(t)
#define T_LOAD(t, p, s) _tile_loadd(t, p, s)
#define T_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#define T_STORE(t, p, s) _tile_stored(t, p, s)
#include "runtime/cpu_amx_ukr.h"
#undef AMX_UKR_NAME
#undef AMX_ROWS_NAME
#undef AMX_UKR_ATTR
#undef T_ZERO
#undef T_LOAD
#undef T_DP
#undef T_STORE

/* ---- a C model of the same instructions (Intel SDM pseudocode for TILELOADD, TILESTORED,
 * TILEZERO, TDPBF16PS with the configuration above), one register file per thread ---- */
static _Thread_local uint8_t emu_tiles[8][16][64];

static void emu_zero(int t) { memset(emu_tiles[t], 0, sizeof emu_tiles[t]); }
static void emu_load(int t, const void *p, size_t stride) {
    for (int r = 0; r < 16; r++) memcpy(emu_tiles[t][r], (const char *)p + r * stride, 64);
}
static void emu_store(int t, void *p, size_t stride) {
    for (int r = 0; r < 16; r++) memcpy((char *)p + r * stride, emu_tiles[t][r], 64);
}
static float emu_bf16(const uint8_t *row, int i) {
    uint16_t h;
    memcpy(&h, row + 2 * i, 2);
    return vlm_bf16_to_f32(h);
}
static void emu_dp(int c, int a, int b) {
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float acc;
            memcpy(&acc, emu_tiles[c][m] + 4 * n, 4);
            for (int k = 0; k < 16; k++) {
                acc += emu_bf16(emu_tiles[a][m], 2 * k) * emu_bf16(emu_tiles[b][k], 2 * n);
                acc += emu_bf16(emu_tiles[a][m], 2 * k + 1) * emu_bf16(emu_tiles[b][k], 2 * n + 1);
            }
            memcpy(emu_tiles[c][m] + 4 * n, &acc, 4);
        }
}

#define AMX_UKR_NAME vlm_amx_ukr_32x32_emulated
#define AMX_ROWS_NAME vlm_amx_rows_emulated
#define AMX_UKR_ATTR
#define T_ZERO(t) emu_zero(t)
#define T_LOAD(t, p, s) emu_load(t, p, s)
#define T_DP(c, a, b) emu_dp(c, a, b)
#define T_STORE(t, p, s) emu_store(t, p, s)
#include "runtime/cpu_amx_ukr.h"

void vlm_amx_pack_x(const float *x, int64_t n, int64_t k, int64_t kdp, float *xb) {
    uint32_t *o = (uint32_t *)xb; /* read back only through tile loads */
    memset(o, 0, (size_t)kdp * 32 * sizeof *o);
    for (int64_t i = 0; i < n; i++)
        for (int64_t q = 0; 2 * q < k; q++) {
            const uint32_t lo = vlm_f32_to_bf16(x[i * k + 2 * q]);
            const uint32_t hi = 2 * q + 1 < k ? vlm_f32_to_bf16(x[i * k + 2 * q + 1]) : 0;
            o[q * 32 + i] = lo | hi << 16;
        }
}
