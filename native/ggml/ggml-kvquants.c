// kvtuner-edge: low-bit KV cache formats (see ggml-common.h for the block layouts).
//
// Designed by measurement (scripts/sim_formats.py): the cache is quantised after llama.cpp's
// Hadamard rotation, where values are close to Gaussian; what mattered most was per-block scale
// fitting by the block's own squared error, then small groups. Non-uniform levels gained nothing
// at 16 values per scale, so both formats use integer levels, which keeps the dot products integer.
//
// The scale search below is mirrored exactly by the CUDA set_rows kernel and by the torch
// fake-quantiser (kvtuner_edge/calibrate/quant.py): keep the order of float operations, one
// rounding per statement (no fused multiply-add), and the strict "<" that keeps the first best
// (the first candidate is always taken, so inf/NaN input still writes a whole block).
#include "ggml-kvquants.h"
#include "ggml-impl.h"

// no contraction into fused multiply-adds here, whatever the compiler's default: GCC contracts across
// statements under -ffp-contract=fast, its default for GNU C, and aarch64 has FMA in its base ISA, so
// without this an ARM build wrote other bytes than x86, CUDA and the torch model in some blocks
// (scripts/kvq_simd_check.sh compares the bytes across ISAs)
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <assert.h>
#include <math.h>
#include <string.h>

// (int) v clamped to 0..qmax, with x86's conversion on every ISA: NaN and values outside int32 give 0,
// as the CUDA quantizer and the torch model compute it. A plain cast is undefined there (ARM
// saturates: +inf gave qmax), so blocks with values beyond fp16's range were written differently on ARM.
static inline int kvq_trunc_clamp(const float v, const int qmax) {
    if (!(v >= -2147483648.0f && v < 2147483648.0f)) {
        return 0;
    }
    const int q = (int) v;
    return q < 0 ? 0 : (q > qmax ? qmax : q);
}

// q3_kv: candidate scales, as factors of the half-block's signed absmax / -4
static const float kvq3_scale_f[15] = {
    0.76f, 0.80f, 0.84f, 0.88f, 0.92f, 0.96f, 1.00f, 1.04f, 1.08f, 1.12f, 1.16f, 1.20f, 1.24f, 1.28f, 1.32f,
};

// q2_kv: candidate shrinks of the block's range at the low and high end
static const float kvq2_shrink_f[4] = { 0.00f, 0.04f, 0.08f, 0.12f };

static void kvq3_half(const float * GGML_RESTRICT x, ggml_half * GGML_RESTRICT dout, uint8_t * GGML_RESTRICT codes) {
    float amax = 0.0f;
    float mx   = 0.0f;
    for (int j = 0; j < 16; ++j) {
        const float ax = fabsf(x[j]);
        if (ax > amax) {
            amax = ax;
            mx   = x[j];
        }
    }
    if (amax == 0.0f) {
        *dout = GGML_FP32_TO_FP16(0.0f);
        memset(codes, 4, 16);
        return;
    }
    float best = INFINITY;
    for (int t = 0; t < 15; ++t) {
        const float     sm = -mx * kvq3_scale_f[t];
        const ggml_half dh = GGML_FP32_TO_FP16(sm * 0.25f);
        const float     d  = GGML_FP16_TO_FP32(dh);
        const float     id = d != 0.0f ? 1.0f / d : 0.0f;
        uint8_t c[16];
        float err = 0.0f;
        for (int j = 0; j < 16; ++j) {
            const float p = x[j] * id;
            const float v = p + 4.5f;
            const int q = kvq_trunc_clamp(v, 7);
            c[j] = (uint8_t) q;
            const float y = (float) (q - 4) * d;
            const float r = y - x[j];
            const float r2 = r * r;
            err = err + r2;
        }
        if (t == 0 || err < best) {   // the first try always counts (inf/NaN input: err is not < anything)
            best  = err;
            *dout = dh;
            memcpy(codes, c, 16);
        }
    }
}

void quantize_row_q3_kv_ref(const float * GGML_RESTRICT x, block_q3_kv * GGML_RESTRICT y, int64_t k) {
    assert(k % QK3_KV == 0);
    const int64_t nb = k / QK3_KV;
    for (int64_t i = 0; i < nb; ++i) {
        uint8_t c[QK3_KV];
        kvq3_half(x + i*QK3_KV,      &y[i].d[0], c);
        kvq3_half(x + i*QK3_KV + 16, &y[i].d[1], c + 16);
        memset(y[i].qs, 0, sizeof(y[i].qs));
        memset(y[i].qh, 0, sizeof(y[i].qh));
        for (int j = 0; j < QK3_KV; ++j) {
            y[i].qs[j % 8] |= (uint8_t) ((c[j] & 3) << (2 * (j / 8)));
            y[i].qh[j / 8] |= (uint8_t) (((c[j] >> 2) & 1) << (j % 8));
        }
    }
}

void dequantize_row_q3_kv(const block_q3_kv * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    assert(k % QK3_KV == 0);
    const int64_t nb = k / QK3_KV;
    for (int64_t i = 0; i < nb; ++i) {
        const float d0 = GGML_FP16_TO_FP32(x[i].d[0]);
        const float d1 = GGML_FP16_TO_FP32(x[i].d[1]);
        int8_t c[QK3_KV];
        ggml_kvq_unpack2(x[i].qs, c);
        for (int s = 0; s < 4; ++s) {
            // bit l of qh[s] -> +4 on element 8s + l (spread the byte's bits to 8 bytes), then -4
            uint64_t h = (uint64_t) x[i].qh[s] * 0x0101010101010101ULL & 0x8040201008040201ULL;
            h = ((h + 0x7F7F7F7F7F7F7F7FULL) >> 7) & 0x0101010101010101ULL;
            uint64_t v;
            memcpy(&v, c + 8*s, 8);
            v = v + (h << 2);
            v = ((v | 0x8080808080808080ULL) - 0x0404040404040404ULL) ^ 0x8080808080808080ULL;
            memcpy(c + 8*s, &v, 8);
        }
        for (int j = 0; j < 16; ++j) {
            y[i*QK3_KV + j]      = (float) c[j] * d0;
            y[i*QK3_KV + j + 16] = (float) c[j + 16] * d1;
        }
    }
}

void quantize_row_q2_kv_ref(const float * GGML_RESTRICT x, block_q2_kv * GGML_RESTRICT y, int64_t k) {
    assert(k % QK2_KV == 0);
    const int64_t nb = k / QK2_KV;
    for (int64_t i = 0; i < nb; ++i) {
        const float * xb = x + i*QK2_KV;
        float lo = xb[0];
        float hi = xb[0];
        for (int j = 1; j < QK2_KV; ++j) {
            lo = xb[j] < lo ? xb[j] : lo;
            hi = xb[j] > hi ? xb[j] : hi;
        }
        uint8_t c[QK2_KV];
        if (!(hi > lo)) {
            y[i].d = GGML_FP32_TO_FP16(0.0f);
            y[i].m = GGML_FP32_TO_FP16(lo);
            memset(c, 0, sizeof(c));
        } else {
            const float rng = hi - lo;
            float best = INFINITY;
            for (int a = 0; a < 4; ++a) {
                for (int b = 0; b < 4; ++b) {
                    const float     sa = kvq2_shrink_f[a] * rng;
                    const float     sb = kvq2_shrink_f[b] * rng;
                    const float     l2 = lo + sa;
                    const float     h2 = hi - sb;
                    const ggml_half dh = GGML_FP32_TO_FP16((h2 - l2) / 3.0f);
                    const ggml_half mh = GGML_FP32_TO_FP16(l2);
                    const float     d  = GGML_FP16_TO_FP32(dh);
                    const float     m  = GGML_FP16_TO_FP32(mh);
                    const float     id = d != 0.0f ? 1.0f / d : 0.0f;
                    uint8_t cc[QK2_KV];
                    float err = 0.0f;
                    for (int j = 0; j < QK2_KV; ++j) {
                        const float u = xb[j] - m;
                        const float p = u * id;
                        const float v = p + 0.5f;
                        const int q = kvq_trunc_clamp(v, 3);
                        cc[j] = (uint8_t) q;
                        const float dq = d * (float) q;
                        const float yv = dq + m;
                        const float r  = yv - xb[j];
                        const float r2 = r * r;
                        err = err + r2;
                    }
                    if ((a == 0 && b == 0) || err < best) {
                        best   = err;
                        y[i].d = dh;
                        y[i].m = mh;
                        memcpy(c, cc, sizeof(c));
                    }
                }
            }
        }
        memset(y[i].qs, 0, sizeof(y[i].qs));
        for (int j = 0; j < QK2_KV; ++j) {
            y[i].qs[j % 8] |= (uint8_t) ((c[j] & 3) << (2 * (j / 8)));
        }
    }
}

void dequantize_row_q2_kv(const block_q2_kv * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    assert(k % QK2_KV == 0);
    const int64_t nb = k / QK2_KV;
    for (int64_t i = 0; i < nb; ++i) {
        const float d = GGML_FP16_TO_FP32(x[i].d);
        const float m = GGML_FP16_TO_FP32(x[i].m);
        int8_t c[QK2_KV];
        ggml_kvq_unpack2(x[i].qs, c);
        for (int j = 0; j < QK2_KV; ++j) {
            y[i*QK2_KV + j] = d * (float) c[j] + m;
        }
    }
}

size_t quantize_q3_kv(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix) {
    GGML_UNUSED(imatrix);
    quantize_row_q3_kv_ref(src, (block_q3_kv *) dst, nrows * n_per_row);
    return nrows * ggml_row_size(GGML_TYPE_Q3_KV, n_per_row);
}

size_t quantize_q2_kv(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix) {
    GGML_UNUSED(imatrix);
    quantize_row_q2_kv_ref(src, (block_q2_kv *) dst, nrows * n_per_row);
    return nrows * ggml_row_size(GGML_TYPE_Q2_KV, n_per_row);
}
