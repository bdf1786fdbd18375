// kvtuner-edge: the CPU kernels of native/ggml/ggml-cpu/kvquants-cpu.c against the same file built with
// no SIMD path (-DKVQ_SCALAR_ONLY, its symbols renamed ref_*), on random blocks:
//   dot products (q3_kv x q8_0, q2_kv x q8_1): bit for bit;
//   cache writes (from_float of q3_kv / q2_kv): byte for byte with the reference quantizers;
//   V accumulation (q3_kv / q2_kv): bit for bit with dequantize_row + one fma per element, where the
//   build has one (ggml_kvq_get_mad != NULL); the chunked V sum of the grouped decode kernel
//   (ggml_kvq_get_mad_rows: 1-32 rows into 1-8 accumulators, its own rounding) within 1e-6 of the
//   sum's magnitude of the same sum in double; its K side (ggml_kvq_get_dot_heads: a q3_kv row against
//   1-8 q8_0 rows) within 1e-6 of the products' magnitude of the exact dot product;
// and prints a hash of the cache bytes, which must be the same on every ISA (the inputs are made with
// exact float operations; the script builds this file with -ffp-contract=off).
// Built and run by scripts/kvq_simd_check.sh for this machine and, under qemu-user, for aarch64 (NEON,
// with and without the dotprod extension). Prints one line per check and exits non-zero on a mismatch.
#define GGML_COMMON_DECL_C
#include "ggml-common.h"
#include "ggml-impl.h"
#include "ggml-kvquants.h"
#include "kvquants-cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ref_ggml_vec_dot_q3_kv_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ref_ggml_vec_dot_q2_kv_q8_1(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ref_ggml_kvq_quantize_row_q3_kv(const float * x, void * y, int64_t k);
void ref_ggml_kvq_quantize_row_q2_kv(const float * x, void * y, int64_t k);

// the few symbols of libggml-base / libggml-cpu the three sources use, so that they link on their own
float ggml_table_f32_f16[1 << 16];
ggml_fp16_t ggml_fp32_to_fp16(float x) { return GGML_COMPUTE_FP32_TO_FP16(x); }
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "abort at %s:%d (%s)\n", file, line, fmt);
    abort();
}
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void) type; (void) ne; abort(); } // quantize_* only

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static uint32_t next_u32(void) { // xorshift64*
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return (uint32_t) ((rng * 0x2545F4914F6CDD1DULL) >> 32);
}
static float next_f(void) { return (float) next_u32() / 4294967296.0f * 2.0f - 1.0f; }
// 2^e for e in [lo, hi], times [1, 2): exact, unlike powf, whose last bits may differ between libms
// (one draw per statement: the order in which a call's arguments are evaluated is the compiler's)
static float next_scale(int lo, int hi) {
    const float m = 1.0f + 0.5f*(next_f() + 1.0f);
    const int   e = lo + (int) (next_u32() % (uint32_t) (hi - lo + 1));
    return ldexpf(m, e);
}
static uint64_t fnv1a(uint64_t h, const void * p, size_t n) {
    for (size_t i = 0; i < n; ++i) { h ^= ((const uint8_t *) p)[i]; h *= 0x100000001B3ULL; }
    return h;
}
static void fill_bytes(void * p, size_t n) { for (size_t i = 0; i < n; ++i) ((uint8_t *) p)[i] = (uint8_t) next_u32(); }
static ggml_half rand_half(float scale) { return GGML_FP32_TO_FP16(next_f() * scale); }

static int bits_equal(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

int main(void) {
    enum { N = 256, ROWS = 2000 };
    int fails = 0;
    for (uint32_t i = 0; i < (1u << 16); ++i) {
        ggml_table_f32_f16[i] = GGML_COMPUTE_FP16_TO_FP32((ggml_fp16_t) i);
    }
    static block_q3_kv k3[N/32];
    static block_q2_kv k2[N/32];
    static block_q8_0  q80[N/32];
    static block_q8_1  q81[N/32];

    // dot products: random codes, finite scales from 1e-3 to 10
    long diff3 = 0, diff2 = 0;
    for (int r = 0; r < ROWS; ++r) {
        const float sc = next_scale(-10, 3);
        for (int b = 0; b < N/32; ++b) {
            fill_bytes(k3[b].qs, sizeof k3[b].qs); fill_bytes(k3[b].qh, sizeof k3[b].qh);
            k3[b].d[0] = rand_half(sc); k3[b].d[1] = rand_half(sc);
            fill_bytes(k2[b].qs, sizeof k2[b].qs);
            k2[b].d = rand_half(sc); k2[b].m = rand_half(sc);
            fill_bytes(q80[b].qs, sizeof q80[b].qs); q80[b].d = rand_half(sc);
            fill_bytes(q81[b].qs, sizeof q81[b].qs); q81[b].d = rand_half(sc); q81[b].s = rand_half(sc*32.0f);
        }
        float a, b;
        ggml_vec_dot_q3_kv_q8_0(N, &a, 0, k3, 0, q80, 0, 1);
        ref_ggml_vec_dot_q3_kv_q8_0(N, &b, 0, k3, 0, q80, 0, 1);
        diff3 += !bits_equal(a, b);
        ggml_vec_dot_q2_kv_q8_1(N, &a, 0, k2, 0, q81, 0, 1);
        ref_ggml_vec_dot_q2_kv_q8_1(N, &b, 0, k2, 0, q81, 0, 1);
        diff2 += !bits_equal(a, b);
    }
    printf("vec_dot q3_kv x q8_0: %d rows of %d, %ld differ\n", ROWS, N, diff3);
    printf("vec_dot q2_kv x q8_1: %d rows of %d, %ld differ\n", ROWS, N, diff2);
    fails += diff3 != 0 || diff2 != 0;

    // cache writes: rows of several scales, zeros, ties (repeated values) and outliers
    static float x[N];
    static block_q3_kv w3a[N/32], w3b[N/32];
    static block_q2_kv w2a[N/32], w2b[N/32];
    long dq3 = 0, dq2 = 0;
    uint64_t h3 = 0xCBF29CE484222325ULL, h2 = h3;
    for (int r = 0; r < ROWS; ++r) {
        const float sc = next_scale(-14, 14);
        for (int i = 0; i < N; ++i) {
            const uint32_t kind = next_u32() % 16;
            x[i] = kind == 0 ? 0.0f : kind == 1 ? (i > 0 ? x[i - 1] : sc) : kind == 2 ? 20.0f*sc*next_f() : sc*next_f();
        }
        ggml_kvq_quantize_row_q3_kv(x, w3a, N); ref_ggml_kvq_quantize_row_q3_kv(x, w3b, N);
        ggml_kvq_quantize_row_q2_kv(x, w2a, N); ref_ggml_kvq_quantize_row_q2_kv(x, w2b, N);
        dq3 += memcmp(w3a, w3b, sizeof w3a) != 0;
        dq2 += memcmp(w2a, w2b, sizeof w2a) != 0;
        h3 = fnv1a(h3, w3b, sizeof w3b);
        h2 = fnv1a(h2, w2b, sizeof w2b);
    }
    printf("from_float q3_kv: %d rows of %d, %ld differ\n", ROWS, N, dq3);
    printf("from_float q2_kv: %d rows of %d, %ld differ\n", ROWS, N, dq2);
    printf("reference bytes: q3_kv %016llx q2_kv %016llx\n", (unsigned long long) h3, (unsigned long long) h2);
    fails += dq3 != 0 || dq2 != 0;

    // V accumulation y += v * dequantize(x), against dequantize_row + one fma per element
    const enum ggml_type vt[2] = {GGML_TYPE_Q3_KV, GGML_TYPE_Q2_KV};
    for (int t = 0; t < 2; ++t) {
        const ggml_kvq_mad_t mad = ggml_kvq_get_mad(vt[t], N);
        if (mad == NULL) {
            printf("mad %s: no SIMD path in this build\n", vt[t] == GGML_TYPE_Q3_KV ? "q3_kv" : "q2_kv");
            continue;
        }
        long dm = 0;
        static float ya[N], yb[N], deq[N];
        for (int r = 0; r < ROWS; ++r) {
            const float sc = next_scale(-7, 7);
            for (int b = 0; b < N/32; ++b) {
                fill_bytes(k3[b].qs, sizeof k3[b].qs); fill_bytes(k3[b].qh, sizeof k3[b].qh);
                k3[b].d[0] = rand_half(sc); k3[b].d[1] = rand_half(sc);
                fill_bytes(k2[b].qs, sizeof k2[b].qs); k2[b].d = rand_half(sc); k2[b].m = rand_half(sc);
            }
            for (int i = 0; i < N; ++i) ya[i] = yb[i] = next_f();
            const float v = next_f();
            const void * src = t == 0 ? (const void *) k3 : (const void *) k2;
            mad(N, ya, src, v);
            if (t == 0) dequantize_row_q3_kv(k3, deq, N); else dequantize_row_q2_kv(k2, deq, N);
            for (int i = 0; i < N; ++i) yb[i] = fmaf(deq[i], v, yb[i]);
            for (int i = 0; i < N; ++i) dm += !bits_equal(ya[i], yb[i]);
        }
        printf("mad %s: %d rows of %d, %ld values differ\n", t == 0 ? "q3_kv" : "q2_kv", ROWS, N, dm);
        fails += dm != 0;
    }
    // the grouped kernel's chunk of V rows into several heads' accumulators, against the sum in double
    for (int t = 0; t < 2; ++t) {
        const ggml_kvq_mad_rows_t rows = ggml_kvq_get_mad_rows(vt[t], N);
        const char * name = vt[t] == GGML_TYPE_Q3_KV ? "q3_kv" : "q2_kv";
        if (rows == NULL) {
            printf("mad_rows %s: no SIMD path in this build\n", name);
            continue;
        }
        enum { NC = 32, NH = 8 };
        static block_q3_kv r3[NC][N/32];
        static block_q2_kv r2[NC][N/32];
        static float acc[NH][N], deq[NC][N], w[NH*NC];
        double worst = 0.0, worst_seq = 0.0;
        int cases = 0;
        const int ncs[3] = {1, 7, NC}, nhs[3] = {1, 3, NH};
        for (int r = 0; r < ROWS/20; ++r) {
            const float sc = next_scale(-7, 7);
            for (int c = 0; c < NC; ++c) {
                for (int b = 0; b < N/32; ++b) {
                    fill_bytes(r3[c][b].qs, sizeof r3[c][b].qs); fill_bytes(r3[c][b].qh, sizeof r3[c][b].qh);
                    r3[c][b].d[0] = rand_half(sc); r3[c][b].d[1] = rand_half(sc);
                    fill_bytes(r2[c][b].qs, sizeof r2[c][b].qs); r2[c][b].d = rand_half(sc); r2[c][b].m = rand_half(sc);
                }
                if (t == 0) dequantize_row_q3_kv(r3[c], deq[c], N); else dequantize_row_q2_kv(r2[c], deq[c], N);
            }
            for (int a = 0; a < 3; ++a) for (int b = 0; b < 3; ++b) {
                const int nc = ncs[a], nh = nhs[b];
                float * y[NH];
                for (int h = 0; h < nh; ++h) {
                    y[h] = acc[h];
                    for (int i = 0; i < N; ++i) acc[h][i] = next_f();
                    for (int c = 0; c < nc; ++c) w[h*NC + c] = c % 5 == 3 ? 0.0f : 0.5f + 0.5f*next_f();
                }
                static double exact[NH][N], mag[NH][N];
                for (int h = 0; h < nh; ++h) for (int i = 0; i < N; ++i) {
                    exact[h][i] = acc[h][i]; mag[h][i] = fabs(acc[h][i]);
                    for (int c = 0; c < nc; ++c) {
                        exact[h][i] += (double) w[h*NC + c]*deq[c][i];
                        mag[h][i]   += fabs((double) w[h*NC + c]*deq[c][i]);
                    }
                }
                // the one-row kernel's sum: the dequantized value, one fma per row in row order
                static float seq[NH][N];
                for (int h = 0; h < nh; ++h) for (int i = 0; i < N; ++i) {
                    seq[h][i] = acc[h][i];
                    for (int c = 0; c < nc; ++c) seq[h][i] = fmaf(deq[c][i], w[h*NC + c], seq[h][i]);
                }
                const void * src = t == 0 ? (const void *) r3 : (const void *) r2;
                rows(N, nh, nc, y, (const char *) src, t == 0 ? sizeof r3[0] : sizeof r2[0], w, NC);
                for (int h = 0; h < nh; ++h) for (int i = 0; i < N; ++i) {
                    const double e  = fabs(acc[h][i] - exact[h][i])/(mag[h][i] + 1e-30);
                    const double es = fabs(seq[h][i] - exact[h][i])/(mag[h][i] + 1e-30);
                    worst = e > worst ? e : worst;
                    worst_seq = es > worst_seq ? es : worst_seq;
                }
                ++cases;
            }
        }
        printf("mad_rows %s: %d chunks of %d, worst error %.2e of the sum's magnitude (one fma per row: %.2e)\n",
               name, cases, N, worst, worst_seq);
        fails += !(worst <= 1e-6);
    }
    // the grouped kernel's K side: one q3_kv row against several heads' q8_0 rows, against exact sums
    {
        const ggml_kvq_dot_heads_t dot = ggml_kvq_get_dot_heads(GGML_TYPE_Q3_KV, N);
        if (dot == NULL) {
            printf("dot_heads q3_kv: no SIMD path in this build\n");
        } else {
            enum { NH = 8 };
            static block_q8_0 qh8[NH][N/32];
            static float kd[N];
            double worst = 0.0;
            int cases = 0;
            for (int r = 0; r < ROWS/10; ++r) {
                const float sc = next_scale(-10, 3);
                for (int b = 0; b < N/32; ++b) {
                    fill_bytes(k3[b].qs, sizeof k3[b].qs); fill_bytes(k3[b].qh, sizeof k3[b].qh);
                    k3[b].d[0] = rand_half(sc); k3[b].d[1] = rand_half(sc);
                    for (int h = 0; h < NH; ++h) {
                        // Q codes as quantize_row_q8_0 writes them: -127..127 (the AVX2 sign trick, like
                        // ggml's own q8_0 dot products, relies on it)
                        fill_bytes(qh8[h][b].qs, sizeof qh8[h][b].qs);
                        for (int j = 0; j < 32; ++j) qh8[h][b].qs[j] = qh8[h][b].qs[j] == -128 ? -127 : qh8[h][b].qs[j];
                        qh8[h][b].d = rand_half(sc);
                    }
                }
                dequantize_row_q3_kv(k3, kd, N);
                const int nh = 1 + r % NH;
                float sres[NH*3];
                dot(N, nh, sres, 3, k3, (const char *) qh8, sizeof qh8[0]);
                for (int h = 0; h < nh; ++h) {
                    double exact = 0.0, mag = 0.0;
                    for (int i = 0; i < N; ++i) {
                        const double qv = (double) GGML_COMPUTE_FP16_TO_FP32(qh8[h][i/32].d)*qh8[h][i/32].qs[i%32];
                        exact += kd[i]*qv;
                        mag   += fabs(kd[i]*qv);
                    }
                    const double e = fabs(sres[3*h] - exact)/(mag + 1e-30);
                    worst = e > worst ? e : worst;
                    ++cases;
                }
            }
            printf("dot_heads q3_kv: %d rows of %d, worst error %.2e of the products' magnitude\n", cases, N, worst);
            fails += !(worst <= 1e-6);
        }
    }
    printf("%s\n", fails ? "FAIL" : "all equal");
    return fails ? 1 : 0;
}
