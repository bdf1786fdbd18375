// kvtuner-edge: CPU dot products for the q3_kv / q2_kv KV cache formats.
// AVX2: the codes of a block unpacked into one 256-bit register and multiplied with maddubs; elsewhere
// plain C (codes unpacked to int8, then an int8 x int8 -> int32 reduction per 16 or 32 values). Both
// give the same integer sums and then evaluate the same float expression, so results are identical.
#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include "kvquants-cpu.h"
#include "ggml-kvquants.h"
#include "ggml-impl.h"
#include "simd-mappings.h"

#include <assert.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>

// the 32 2-bit codes of a block as 32 bytes in element order: the 8 bytes of qs in each 64-bit lane,
// lane s shifted right by 2s (element 8s + j is field s of byte j)
static inline __m256i kvq_codes2_avx2(const uint8_t * GGML_RESTRICT qs) {
    int64_t w;
    memcpy(&w, qs, 8);
    const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_setr_epi64x(0, 2, 4, 6));
    return _mm256_and_si256(v, _mm256_set1_epi8(3));
}

// the 32 bits of qh as 32 bytes of 0 or 4 (bit e -> byte e)
static inline __m256i kvq_high4_avx2(const uint8_t * GGML_RESTRICT qh) {
    uint32_t h;
    memcpy(&h, qh, 4);
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int) h),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i on  = _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit);
    return _mm256_and_si256(on, _mm256_set1_epi8(4));
}

// the int32 sum of each 128-bit half of 8 int32 lanes
static inline void kvq_hsum_halves(const __m256i v, int * lo, int * hi) {
    __m128i a = _mm256_castsi256_si128(v);
    __m128i b = _mm256_extracti128_si256(v, 1);
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, _MM_SHUFFLE(1, 0, 3, 2)));
    b = _mm_add_epi32(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(1, 0, 3, 2)));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, _MM_SHUFFLE(2, 3, 0, 1)));
    b = _mm_add_epi32(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(2, 3, 0, 1)));
    *lo = _mm_cvtsi128_si32(a);
    *hi = _mm_cvtsi128_si32(b);
}
#endif // __AVX2__

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
        int s0 = 0, s1 = 0;
#if defined(__AVX2__)
        // codes 0..7 (unsigned) x q (signed) in 16-bit pairs, minus 4*sum(q): sum((c - 4)*q), exact
        const __m256i c  = _mm256_or_si256(kvq_codes2_avx2(x[i].qs), kvq_high4_avx2(x[i].qh));
        const __m256i q  = _mm256_loadu_si256((const __m256i *) y[i].qs);
        const __m256i one16 = _mm256_set1_epi16(1);
        const __m256i cq = _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), one16);
        const __m256i sq = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(4), q), one16);
        kvq_hsum_halves(_mm256_sub_epi32(cq, sq), &s0, &s1);
#else
        int8_t c[QK3_KV];
        ggml_kvq_unpack2(x[i].qs, c);
        kvq_add_high(x[i].qh, c);
        for (int j = 0; j < 16; ++j) {
            s0 += c[j] * y[i].qs[j];
            s1 += c[j + 16] * y[i].qs[j + 16];
        }
#endif // __AVX2__
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
        int sumi = 0;
#if defined(__AVX2__)
        const __m256i q  = _mm256_loadu_si256((const __m256i *) y[i].qs);
        const __m256i cq = _mm256_madd_epi16(_mm256_maddubs_epi16(kvq_codes2_avx2(x[i].qs), q), _mm256_set1_epi16(1));
        int lo, hi;
        kvq_hsum_halves(cq, &lo, &hi);
        sumi = lo + hi;
#else
        int8_t c[QK2_KV];
        ggml_kvq_unpack2(x[i].qs, c);
        for (int j = 0; j < QK2_KV; ++j) {
            sumi += c[j] * y[i].qs[j];
        }
#endif // __AVX2__
        // x = d*c + m; y = dy*q with fp16 sy = dy*sum(q): sum(x*y) = d*dy*sum(c*q) + m*sy
        sumf += GGML_CPU_FP16_TO_FP32(x[i].d) * GGML_CPU_FP16_TO_FP32(y[i].d) * (float) sumi
              + GGML_CPU_FP16_TO_FP32(x[i].m) * GGML_CPU_FP16_TO_FP32(y[i].s);
    }
    *s = sumf;
}
