// kvtuner-edge: CPU dot products for the q3_kv / q2_kv KV cache formats.
// Plain C written so the compiler vectorises it (the codes are unpacked to int8 first, then an
// int8 x int8 -> int32 reduction per 16 or 32 values, the pattern gcc/clang turn into SIMD).
#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include "kvquants-cpu.h"
#include "ggml-kvquants.h"
#include "ggml-impl.h"
#include "simd-mappings.h"

#include <assert.h>
#include <string.h>

// q3_kv: add the high bits (bit i of qh -> +4 on element i) and centre: codes 0..7 -> -4..3
static inline void kvq_add_high(const uint8_t * GGML_RESTRICT qh, int8_t * GGML_RESTRICT c) {
    for (int s = 0; s < 4; ++s) {
        // spread the 8 bits of qh[s] to the 8 bytes (byte l gets bit l), as 0 or 4
        uint64_t b = (uint64_t) qh[s] * 0x0101010101010101ULL & 0x8040201008040201ULL;
        b = ((b + 0x7F7F7F7F7F7F7F7FULL) >> 7) & 0x0101010101010101ULL;
        uint64_t v;
        memcpy(&v, c + 8*s, 8);
        v = v + (b << 2);                                     // 0..7 per byte, no carries
        v = ((v | 0x8080808080808080ULL) - 0x0404040404040404ULL) ^ 0x8080808080808080ULL;  // - 4 per byte
        memcpy(c + 8*s, &v, 8);
    }
}

void ggml_vec_dot_q3_kv_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(n % QK3_KV == 0);
    assert(nrc == 1);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);
    const block_q3_kv * GGML_RESTRICT x = (const block_q3_kv *) vx;
    const block_q8_0  * GGML_RESTRICT y = (const block_q8_0  *) vy;
    const int nb = n / QK3_KV;
    float sumf = 0.0f;
    for (int i = 0; i < nb; ++i) {
        int8_t c[QK3_KV];
        ggml_kvq_unpack2(x[i].qs, c);
        kvq_add_high(x[i].qh, c);
        int s0 = 0, s1 = 0;
        for (int j = 0; j < 16; ++j) {
            s0 += c[j] * y[i].qs[j];
            s1 += c[j + 16] * y[i].qs[j + 16];
        }
        sumf += GGML_CPU_FP16_TO_FP32(y[i].d) *
                (GGML_CPU_FP16_TO_FP32(x[i].d[0]) * (float) s0 + GGML_CPU_FP16_TO_FP32(x[i].d[1]) * (float) s1);
    }
    *s = sumf;
}

void ggml_vec_dot_q2_kv_q8_1(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(n % QK2_KV == 0);
    assert(nrc == 1);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);
    const block_q2_kv * GGML_RESTRICT x = (const block_q2_kv *) vx;
    const block_q8_1  * GGML_RESTRICT y = (const block_q8_1  *) vy;
    const int nb = n / QK2_KV;
    float sumf = 0.0f;
    for (int i = 0; i < nb; ++i) {
        int8_t c[QK2_KV];
        ggml_kvq_unpack2(x[i].qs, c);
        int sumi = 0;
        for (int j = 0; j < QK2_KV; ++j) {
            sumi += c[j] * y[i].qs[j];
        }
        // x = d*c + m; y = dy*q with fp16 sy = dy*sum(q): sum(x*y) = d*dy*sum(c*q) + m*sy
        sumf += GGML_CPU_FP16_TO_FP32(x[i].d) * GGML_CPU_FP16_TO_FP32(y[i].d) * (float) sumi
              + GGML_CPU_FP16_TO_FP32(x[i].m) * GGML_CPU_FP16_TO_FP32(y[i].s);
    }
    *s = sumf;
}
