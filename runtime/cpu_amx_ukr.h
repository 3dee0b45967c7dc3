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
    float t[32 * 32] __attribute__((aligned(64)));
    T_ZERO(0);
    T_ZERO(1);
    T_ZERO(2);
    T_ZERO(3);
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
    T_STORE(0, t, 128);
    T_STORE(1, t + 16, 128);
    T_STORE(2, t + 16 * 32, 128);
    T_STORE(3, t + 16 * 32 + 16, 128);
    for (int i = 0; i < mv; i++)
        for (int j = 0; j < nv; j++) c[i * ldc + j] = acc ? c[i * ldc + j] + t[i * 32 + j] : t[i * 32 + j];
}
