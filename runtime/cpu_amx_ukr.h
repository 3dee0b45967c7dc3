/* cpu_amx_ukr.h — the AMX micro-kernel body, included twice by cpu_amx.c: once on the real tile
 * instructions and once on a C model of them (cpu_amx.c's emu_*), so the kernel's use of tile
 * shapes, strides and the pair layout is tested on machines without AMX. Not a header to include
 * anywhere else. Expects AMX_UKR_NAME, AMX_UKR_ATTR and the T_* macros:
 *   T_ZERO(t)  T_LOAD(t, ptr, stride_bytes)  T_DP(c, a, b)  T_STORE(t, ptr, stride_bytes)
 * Tiles (configured by the caller): 0..3 C 16x16 f32; 4, 5 A 16 rows x 16 pairs; 6, 7 B 16 pairs x
 * 16 columns. One call: C[32 x 32] (=/+=) Ap . Bp over kdp pairs (a multiple of 16), Ap rows at a
 * stride of kdp 4-byte slots, Bp [kdp][32] slots. */
AMX_UKR_ATTR void AMX_UKR_NAME(int64_t kdp, const float *ap, const float *bp, float *c, int64_t ldc,
                               int mv, int nv, bool acc) {
    /* A whole 32x32 block lives in C itself: its tiles load from and store to C at C's stride, so
     * the k blocks accumulate in the tiles. Only a block cut by the matrix edge goes through t
     * (a tile always spans 16 rows x 16 columns). */
    const bool whole = mv == 32 && nv == 32;
    const size_t sc = (size_t)ldc * 4;
    float t[32 * 32] __attribute__((aligned(64)));
    if (whole && acc) {
        T_LOAD(0, c, sc);
        T_LOAD(1, c + 16, sc);
        T_LOAD(2, c + 16 * ldc, sc);
        T_LOAD(3, c + 16 * ldc + 16, sc);
    } else {
        T_ZERO(0);
        T_ZERO(1);
        T_ZERO(2);
        T_ZERO(3);
    }
    const size_t sa = (size_t)kdp * 4;
    for (int64_t q0 = 0; q0 < kdp; q0 += 16) {
        T_LOAD(4, ap + q0, sa);
        T_LOAD(5, ap + 16 * kdp + q0, sa);
        T_LOAD(6, bp + q0 * 32, 128);
        T_LOAD(7, bp + q0 * 32 + 16, 128);
        T_DP(0, 4, 6);
        T_DP(1, 4, 7);
        T_DP(2, 5, 6);
        T_DP(3, 5, 7);
    }
    if (whole) {
        T_STORE(0, c, sc);
        T_STORE(1, c + 16, sc);
        T_STORE(2, c + 16 * ldc, sc);
        T_STORE(3, c + 16 * ldc + 16, sc);
        return;
    }
    T_STORE(0, t, 128);
    T_STORE(1, t + 16, 128);
    T_STORE(2, t + 16 * 32, 128);
    T_STORE(3, t + 16 * 32 + 16, 128);
    for (int i = 0; i < mv; i++)
        for (int j = 0; j < nv; j++) c[i * ldc + j] = acc ? c[i * ldc + j] + t[i * 32 + j] : t[i * 32 + j];
}

/* The small-n kernel (batched decode, 2 <= n <= 32 rows of x): the weight rows themselves are
 * the A tiles, loaded straight from the checkpoint at the row stride (a BF16 row already holds
 * its k pairs side by side, which is A's layout), and x, packed once per call into B's pair
 * layout (xb [kdp][32] slots, zero past n and k), is the B operand. Nothing of W is repacked, so W
 * streams from memory once, as in the GEMV. C tiles hold y transposed (W row x x row) and go
 * through t to y[i * ldy + r]. Rows [r0, r1) of W (row stride k elements); a block cut by r1 or
 * the k tail is copied into a zero-padded edge buffer first, so no load reads past a row or
 * the tensor (and 0 * NaN from whatever lies beyond never reaches y). */
#ifndef AMX_ROWS_PF
#define AMX_ROWS_PF 256 /* prefetch distance along each row, in elements (512 bytes) */
#endif
AMX_UKR_ATTR void AMX_ROWS_NAME(const uint16_t *w, int64_t k, int64_t r0, int64_t r1, const float *xb,
                                int64_t kdp, int64_t n, float *y, int64_t ldy) {
    const size_t sw = (size_t)k * 2;
    const bool two = n > 16;
    float t[32 * 32] __attribute__((aligned(64)));
    uint16_t edge[32 * 32] __attribute__((aligned(64)));
    for (int64_t rb = r0; rb < r1; rb += 32) {
        const int64_t rows = r1 - rb < 32 ? r1 - rb : 32;
        T_ZERO(0);
        T_ZERO(1);
        T_ZERO(2);
        T_ZERO(3);
        const uint16_t *wb = w + rb * k;
        for (int64_t q0 = 0; q0 < kdp; q0 += 16) {
            const int64_t kk = 2 * q0;
            if (rows == 32 && kk + 32 <= k) {
                /* the same rows AMX_ROWS_PF further on; past a row's end, the next block's rows
                 * (contiguous: 31 rows further) */
                const int64_t ahead = kk + AMX_ROWS_PF < k ? kk + AMX_ROWS_PF : kk + AMX_ROWS_PF + 31 * k;
                for (int r = 0; r < 32; r++) __builtin_prefetch(wb + r * k + ahead);
                T_LOAD(4, wb + kk, sw);
                T_LOAD(5, wb + 16 * k + kk, sw);
            } else {
                const int64_t cols = k - kk < 32 ? k - kk : 32;
                memset(edge, 0, sizeof edge);
                for (int64_t r = 0; r < rows; r++) memcpy(edge + r * 32, wb + r * k + kk, (size_t)cols * 2);
                T_LOAD(4, edge, 64);
                T_LOAD(5, edge + 16 * 32, 64);
            }
            T_LOAD(6, xb + q0 * 32, 128);
            T_DP(0, 4, 6);
            T_DP(2, 5, 6);
            if (two) {
                T_LOAD(7, xb + q0 * 32 + 16, 128);
                T_DP(1, 4, 7);
                T_DP(3, 5, 7);
            }
        }
        T_STORE(0, t, 128);
        T_STORE(2, t + 16 * 32, 128);
        if (two) {
            T_STORE(1, t + 16, 128);
            T_STORE(3, t + 16 * 32 + 16, 128);
        }
        for (int64_t i = 0; i < n; i++)
            for (int64_t r = 0; r < rows; r++) y[i * ldy + rb + r] = t[r * 32 + i];
    }
}
