// kvtuner-edge: CPU dot products for the q3_kv / q2_kv KV cache formats.
// AVX2: the codes of a block unpacked into one 256-bit register and multiplied with maddubs (with
// AVX512-VNNI: vpdpbusd, the same integer sums in one instruction); aarch64
// NEON: the codes as two 16-byte registers, sdot where the build has the dotprod extension, else
// widening multiplies with pairwise adds; elsewhere plain C (codes unpacked to int8, then an int8 x
// int8 -> int32 reduction per 16 or 32 values). All give the same integer sums and then evaluate the
// same float expression, so results are identical (scripts/kvq_simd_check.sh checks it bit for bit).
#define GGML_COMMON_IMPL_C
#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include "kvquants-cpu.h"
#include "ggml-kvquants.h"
#include "ggml-impl.h"
#include "simd-mappings.h"

#include <assert.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

// the SIMD paths of this build; KVQ_SCALAR_ONLY builds none (the reference of scripts/kvq_simd_check.c)
#if defined(__AVX2__) && !defined(KVQ_SCALAR_ONLY)
#define KVQ_AVX2 1
#else
#define KVQ_AVX2 0
#endif
#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(KVQ_SCALAR_ONLY)
#define KVQ_NEON 1
#else
#define KVQ_NEON 0
#endif
// AVX-512 (F, BW, DQ, VL: the build's --cpu-isa avx512): 16-lane float work in the V sums; VNNI: u8 x s8 dot
// products in one instruction. Both give the AVX2 paths' results bit for bit (the same integer sums, the
// same operations per float element).
#if KVQ_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define KVQ_AVX512 1
#else
#define KVQ_AVX512 0
#endif
#if KVQ_AVX512 && defined(__AVX512VNNI__)
#define KVQ_VNNI 1
#else
#define KVQ_VNNI 0
#endif

#if KVQ_AVX2
#include <immintrin.h>

// the 32 2-bit codes of a block as 32 bytes in element order: the 8 bytes of qs in each 64-bit lane,
// lane s shifted right by 2s (element 8s + j is field s of byte j)
static inline __m256i kvq_codes2_avx2(const uint8_t * GGML_RESTRICT qs) {
    int64_t w;
    memcpy(&w, qs, 8);
    const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_setr_epi64x(0, 2, 4, 6));
    return _mm256_and_si256(v, _mm256_set1_epi8(3));
}

// the 32 bits of qh as 32 bytes of 0xFF or 0 (bit e -> byte e)
static inline __m256i kvq_bits_avx2(const uint8_t * GGML_RESTRICT qh) {
    uint32_t h;
    memcpy(&h, qh, 4);
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int) h),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit);
}

// the 32 bits of qh as 32 bytes of 0 or 4 (bit e -> byte e)
static inline __m256i kvq_high4_avx2(const uint8_t * GGML_RESTRICT qh) {
    return _mm256_and_si256(kvq_bits_avx2(qh), _mm256_set1_epi8(4));
}

// int32 lane j: the sum of the products of bytes 4j..4j+3, u unsigned, s signed (|u*s| pairs within int16:
// maddubs does not saturate for the codes here)
static inline __m256i kvq_dot_u8s8(const __m256i u, const __m256i s) {
#if KVQ_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
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
#endif // KVQ_AVX2

#if KVQ_NEON
#include <arm_neon.h>

// the 32 2-bit codes of a block in element order: elements 0-15 in lo, 16-31 in hi (element 8s + j is
// field s of byte j)
static inline void kvq_codes2_neon(const uint8_t * GGML_RESTRICT qs, uint8x16_t * lo, uint8x16_t * hi) {
    const uint8x8_t b = vld1_u8(qs);
    const uint8x8_t m = vdup_n_u8(3);
    *lo = vcombine_u8(vand_u8(b, m), vand_u8(vshr_n_u8(b, 2), m));
    *hi = vcombine_u8(vand_u8(vshr_n_u8(b, 4), m), vshr_n_u8(b, 6));
}

// the 32 bits of qh as bytes of 0 or 4 (bit l of qh[s] -> element 8s + l)
static inline void kvq_high4_neon(const uint8_t * GGML_RESTRICT qh, uint8x16_t * lo, uint8x16_t * hi) {
    static const uint8_t bits[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t bit  = vld1q_u8(bits);
    const uint8x16_t four = vdupq_n_u8(4);
    *lo = vandq_u8(vtstq_u8(vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1])), bit), four);
    *hi = vandq_u8(vtstq_u8(vcombine_u8(vdup_n_u8(qh[2]), vdup_n_u8(qh[3])), bit), four);
}

// the int32 sum of 16 int8 products
static inline int kvq_dot16_neon(const int8x16_t a, const int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vaddvq_s32(vdotq_s32(vdupq_n_s32(0), a, b));
#else
    const int16x8_t p0 = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    const int16x8_t p1 = vmull_high_s8(a, b); // |code x q| <= 4*128: no int16 overflow
    return vaddvq_s32(vpadalq_s16(vpaddlq_s16(p0), p1));
#endif
}
#endif // KVQ_NEON

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
#if KVQ_AVX2
        // codes 0..7 (unsigned) x q (signed) in 16-bit pairs, minus 4*sum(q): sum((c - 4)*q), exact
        const __m256i c  = _mm256_or_si256(kvq_codes2_avx2(x[i].qs), kvq_high4_avx2(x[i].qh));
        const __m256i q  = _mm256_loadu_si256((const __m256i *) y[i].qs);
        const __m256i cq = kvq_dot_u8s8(c, q);
        const __m256i sq = kvq_dot_u8s8(_mm256_set1_epi8(4), q);
        kvq_hsum_halves(_mm256_sub_epi32(cq, sq), &s0, &s1);
#elif KVQ_NEON
        uint8x16_t c0, c1, h0, h1;
        kvq_codes2_neon(x[i].qs, &c0, &c1);
        kvq_high4_neon(x[i].qh, &h0, &h1);
        const int8x16_t four = vdupq_n_s8(4);
        s0 = kvq_dot16_neon(vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(c0, h0)), four), vld1q_s8(y[i].qs));
        s1 = kvq_dot16_neon(vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(c1, h1)), four), vld1q_s8(y[i].qs + 16));
#else
        int8_t c[QK3_KV];
        ggml_kvq_unpack2(x[i].qs, c);
        kvq_add_high(x[i].qh, c);
        for (int j = 0; j < 16; ++j) {
            s0 += c[j] * y[i].qs[j];
            s1 += c[j + 16] * y[i].qs[j + 16];
        }
#endif
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
#if KVQ_AVX2
        const __m256i q  = _mm256_loadu_si256((const __m256i *) y[i].qs);
        const __m256i cq = kvq_dot_u8s8(kvq_codes2_avx2(x[i].qs), q);
        int lo, hi;
        kvq_hsum_halves(cq, &lo, &hi);
        sumi = lo + hi;
#elif KVQ_NEON
        uint8x16_t c0, c1;
        kvq_codes2_neon(x[i].qs, &c0, &c1);
        sumi = kvq_dot16_neon(vreinterpretq_s8_u8(c0), vld1q_s8(y[i].qs)) +
               kvq_dot16_neon(vreinterpretq_s8_u8(c1), vld1q_s8(y[i].qs + 16));
#else
        int8_t c[QK2_KV];
        ggml_kvq_unpack2(x[i].qs, c);
        for (int j = 0; j < QK2_KV; ++j) {
            sumi += c[j] * y[i].qs[j];
        }
#endif
        // x = d*c + m; y = dy*q with fp16 sy = dy*sum(q): sum(x*y) = d*dy*sum(c*q) + m*sy
        sumf += GGML_CPU_FP16_TO_FP32(x[i].d) * GGML_CPU_FP16_TO_FP32(y[i].d) * (float) sumi
              + GGML_CPU_FP16_TO_FP32(x[i].m) * GGML_CPU_FP16_TO_FP32(y[i].s);
    }
    *s = sumf;
}

// ---------------------------------------------------------------------------------------------
// The V side of the CPU flash attention: y += v * dequantize(x) for one row of n values. The stock
// kernel dequantizes the row with the base library's scalar to_float into a buffer, then runs
// ggml_vec_mad_f32 (one fma per element). These do both in registers, per block, with the same
// float operations (code -> float, times d, plus m as a separate rounding where the scalar code
// adds one, then fma(value, v, y)), so the accumulator is bit for bit the stock one; only where
// ggml_vec_mad_f32 is exactly one fma per element (AVX2 + FMA or AVX-512, n a multiple of its step).
#if KVQ_AVX2 && defined(__FMA__) && defined(__F16C__)
#define KVQ_MAD 1
#if defined(__AVX512F__)
#define KVQ_MAD_STEP 64 // ggml_vec_mad_f32's GGML_F32_STEP: below it scalar leftovers
#else
#define KVQ_MAD_STEP 32
#endif

// a product that the compiler must not fuse with the following add (the scalar code rounds twice)
static inline __m256 kvq_mul_nofma(const __m256 a, const __m256 b) {
    __m256 p = _mm256_mul_ps(a, b);
    __asm__("" : "+x"(p));
    return p;
}

#if KVQ_AVX512
static inline __m512 kvq_mul_nofma512(const __m512 a, const __m512 b) {
    __m512 p = _mm512_mul_ps(a, b);
    __asm__("" : "+v"(p));
    return p;
}

// y[0..31] += v * ((float) c[j] * d + m): the two halves of 16 (d0, d1) in one register each
static inline void kvq_mad32(float * GGML_RESTRICT y, const __m256i c, const float d0, const float d1,
                             const int has_m, const float m, const __m256 vv) {
    const __m512 v16 = _mm512_broadcastss_ps(_mm256_castps256_ps128(vv));
    const __m512 vm  = _mm512_set1_ps(m);
    for (int k = 0; k < 2; ++k) {
        const __m128i part = k == 0 ? _mm256_castsi256_si128(c) : _mm256_extracti128_si256(c, 1);
        const __m512  f    = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(part));
        __m512 x = kvq_mul_nofma512(f, _mm512_set1_ps(k == 0 ? d0 : d1));
        if (has_m) {
            x = _mm512_add_ps(x, vm);
        }
        _mm512_storeu_ps(y + 16*k, _mm512_fmadd_ps(x, v16, _mm512_loadu_ps(y + 16*k)));
    }
}
#else
// y[0..31] += v * ((float) c[j] * d + m) for 32 int8 codes (m: NULL for none; d0/d1 per half)
static inline void kvq_mad32(float * GGML_RESTRICT y, const __m256i c, const float d0, const float d1,
                             const int has_m, const float m, const __m256 vv) {
    const __m128i clo = _mm256_castsi256_si128(c);
    const __m128i chi = _mm256_extracti128_si256(c, 1);
    const __m128i part[4] = { clo, _mm_srli_si128(clo, 8), chi, _mm_srli_si128(chi, 8) };
    const __m256 vm = _mm256_set1_ps(m);
    for (int k = 0; k < 4; ++k) {
        const __m256 f  = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[k]));
        const __m256 vd = _mm256_set1_ps(k < 2 ? d0 : d1);
        __m256 x = kvq_mul_nofma(f, vd);
        if (has_m) {
            x = _mm256_add_ps(x, vm);
        }
        _mm256_storeu_ps(y + 8*k, _mm256_fmadd_ps(x, vv, _mm256_loadu_ps(y + 8*k)));
    }
}
#endif // KVQ_AVX512

// 16 bytes of nibbles as 32 bytes: low nibbles (elements 0-15), then high nibbles (16-31)
static inline __m256i kvq_nibbles_avx2(const uint8_t * GGML_RESTRICT qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *) qs);
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

static void kvq_mad_q8_0(int n, float * GGML_RESTRICT y, const void * GGML_RESTRICT vx, float v) {
    const block_q8_0 * GGML_RESTRICT x = (const block_q8_0 *) vx;
    const __m256 vv = _mm256_set1_ps(v);
    for (int i = 0; i < n/QK8_0; ++i) {
        const float d = GGML_CPU_FP16_TO_FP32(x[i].d);
        kvq_mad32(y + i*QK8_0, _mm256_loadu_si256((const __m256i *) x[i].qs), d, d, 0, 0.0f, vv);
    }
}

static void kvq_mad_q4_0(int n, float * GGML_RESTRICT y, const void * GGML_RESTRICT vx, float v) {
    const block_q4_0 * GGML_RESTRICT x = (const block_q4_0 *) vx;
    const __m256 vv = _mm256_set1_ps(v);
    for (int i = 0; i < n/QK4_0; ++i) {
        const float d = GGML_CPU_FP16_TO_FP32(x[i].d);
        const __m256i c = _mm256_sub_epi8(kvq_nibbles_avx2(x[i].qs), _mm256_set1_epi8(8));
        kvq_mad32(y + i*QK4_0, c, d, d, 0, 0.0f, vv);
    }
}

static void kvq_mad_q4_1(int n, float * GGML_RESTRICT y, const void * GGML_RESTRICT vx, float v) {
    const block_q4_1 * GGML_RESTRICT x = (const block_q4_1 *) vx;
    const __m256 vv = _mm256_set1_ps(v);
    for (int i = 0; i < n/QK4_1; ++i) {
        const float d = GGML_CPU_FP16_TO_FP32(x[i].d);
        const float m = GGML_CPU_FP16_TO_FP32(x[i].m);
        kvq_mad32(y + i*QK4_1, kvq_nibbles_avx2(x[i].qs), d, d, 1, m, vv);
    }
}

static void kvq_mad_q5_0(int n, float * GGML_RESTRICT y, const void * GGML_RESTRICT vx, float v) {
    const block_q5_0 * GGML_RESTRICT x = (const block_q5_0 *) vx;
    const __m256 vv = _mm256_set1_ps(v);
    for (int i = 0; i < n/QK5_0; ++i) {
        const float d = GGML_CPU_FP16_TO_FP32(x[i].d);
        const __m256i hi = _mm256_and_si256(kvq_bits_avx2(x[i].qh), _mm256_set1_epi8(0x10));
        const __m256i c  = _mm256_sub_epi8(_mm256_or_si256(kvq_nibbles_avx2(x[i].qs), hi), _mm256_set1_epi8(16));
        kvq_mad32(y + i*QK5_0, c, d, d, 0, 0.0f, vv);
    }
}

static void kvq_mad_q5_1(int n, float * GGML_RESTRICT y, const void * GGML_RESTRICT vx, float v) {
    const block_q5_1 * GGML_RESTRICT x = (const block_q5_1 *) vx;
    const __m256 vv = _mm256_set1_ps(v);
    for (int i = 0; i < n/QK5_1; ++i) {
        const float d = GGML_CPU_FP16_TO_FP32(x[i].d);
        const float m = GGML_CPU_FP16_TO_FP32(x[i].m);
        const __m256i hi = _mm256_and_si256(kvq_bits_avx2(x[i].qh), _mm256_set1_epi8(0x10));
        kvq_mad32(y + i*QK5_1, _mm256_or_si256(kvq_nibbles_avx2(x[i].qs), hi), d, d, 1, m, vv);
    }
}

static void kvq_mad_iq4_nl(int n, float * GGML_RESTRICT y, const void * GGML_RESTRICT vx, float v) {
    const block_iq4_nl * GGML_RESTRICT x = (const block_iq4_nl *) vx;
    const __m256 vv = _mm256_set1_ps(v);
    const __m256i values = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) kvalues_iq4nl));
    for (int i = 0; i < n/QK4_NL; ++i) {
        const float d = GGML_CPU_FP16_TO_FP32(x[i].d);
        kvq_mad32(y + i*QK4_NL, _mm256_shuffle_epi8(values, kvq_nibbles_avx2(x[i].qs)), d, d, 0, 0.0f, vv);
    }
}

static void kvq_mad_q3_kv(int n, float * GGML_RESTRICT y, const void * GGML_RESTRICT vx, float v) {
    const block_q3_kv * GGML_RESTRICT x = (const block_q3_kv *) vx;
    const __m256 vv = _mm256_set1_ps(v);
    for (int i = 0; i < n/QK3_KV; ++i) {
        const __m256i c = _mm256_sub_epi8(_mm256_or_si256(kvq_codes2_avx2(x[i].qs), kvq_high4_avx2(x[i].qh)),
                                          _mm256_set1_epi8(4));
        kvq_mad32(y + i*QK3_KV, c, GGML_CPU_FP16_TO_FP32(x[i].d[0]), GGML_CPU_FP16_TO_FP32(x[i].d[1]), 0, 0.0f, vv);
    }
}

static void kvq_mad_q2_kv(int n, float * GGML_RESTRICT y, const void * GGML_RESTRICT vx, float v) {
    const block_q2_kv * GGML_RESTRICT x = (const block_q2_kv *) vx;
    const __m256 vv = _mm256_set1_ps(v);
    for (int i = 0; i < n/QK2_KV; ++i) {
        const float d = GGML_CPU_FP16_TO_FP32(x[i].d);
        kvq_mad32(y + i*QK2_KV, kvq_codes2_avx2(x[i].qs), d, d, 1, GGML_CPU_FP16_TO_FP32(x[i].m), vv);
    }
}

// ---------------------------------------------------------------------------------------------
// The grouped decode kernel (ops.cpp, patch 0015), AVX2 pieces: the decode of a block's codes to 32
// signed bytes (the offset of a symmetric type applied; scales d0/d1 of the halves, minimum m), the
// 8-value part of the chunked V sum and the K dot of one block against the heads' q8_0 rows. The
// drivers, shared with NEON, follow both ISA sections.
#define KVQ_GROUP 1
#define KVQ_CODES_DECL          __m256i cv;
#define KVQ_CODES_STORE(p)      _mm256_storeu_si256((__m256i *) (p), cv)
#define KVQ_DECODE_Q8_0   d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); cv = _mm256_loadu_si256((const __m256i *) b->qs);
#define KVQ_DECODE_Q4_0   d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); cv = _mm256_sub_epi8(kvq_nibbles_avx2(b->qs), _mm256_set1_epi8(8));
#define KVQ_DECODE_Q4_1   d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); m = GGML_CPU_FP16_TO_FP32(b->m); cv = kvq_nibbles_avx2(b->qs);
#define KVQ_DECODE_Q5_0   d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); \
    cv = _mm256_sub_epi8(_mm256_or_si256(kvq_nibbles_avx2(b->qs), _mm256_and_si256(kvq_bits_avx2(b->qh), _mm256_set1_epi8(0x10))), \
                         _mm256_set1_epi8(16));
#define KVQ_DECODE_Q5_1   d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); m = GGML_CPU_FP16_TO_FP32(b->m); \
    cv = _mm256_or_si256(kvq_nibbles_avx2(b->qs), _mm256_and_si256(kvq_bits_avx2(b->qh), _mm256_set1_epi8(0x10)));
#define KVQ_DECODE_IQ4_NL d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); \
    cv = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) kvalues_iq4nl)), kvq_nibbles_avx2(b->qs));
#define KVQ_DECODE_Q3_KV  d0 = GGML_CPU_FP16_TO_FP32(b->d[0]); d1 = GGML_CPU_FP16_TO_FP32(b->d[1]); \
    cv = _mm256_sub_epi8(_mm256_or_si256(kvq_codes2_avx2(b->qs), kvq_high4_avx2(b->qh)), _mm256_set1_epi8(4));
#define KVQ_DECODE_Q2_KV  d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); m = GGML_CPU_FP16_TO_FP32(b->m); cv = kvq_codes2_avx2(b->qs);

// 8 values (part k of a block) of nc rows into nh accumulators; has_m: dm = (d, m) per row, dw = w per
// head and row; else dw = w*d per head and row
static inline __attribute__((always_inline)) void kvq_rows_part(const int nh, const int has_m, float * const * GGML_RESTRICT y,
        const int off, const int8_t * GGML_RESTRICT codes, const int nc, const float * GGML_RESTRICT dw, const float * GGML_RESTRICT dm) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int h = 0; h < nh; ++h) {
        acc[h] = _mm256_loadu_ps(y[h] + off);
    }
    for (int c = 0; c < nc; ++c) {
        __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (codes + 32*c))));
        if (has_m) {
            f = _mm256_fmadd_ps(f, _mm256_broadcast_ss(dm + 2*c), _mm256_broadcast_ss(dm + 2*c + 1));
        }
#pragma GCC unroll 8
        for (int h = 0; h < nh; ++h) {
            acc[h] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(dw + h*32 + c), acc[h]);
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < nh; ++h) {
        _mm256_storeu_ps(y[h] + off, acc[h]);
    }
}

#if KVQ_AVX512
// the same for 16 values (half k of a block): the same operations per element in 16 lanes
static inline __attribute__((always_inline)) void kvq_rows_part16(const int nh, const int has_m, float * const * GGML_RESTRICT y,
        const int off, const int8_t * GGML_RESTRICT codes, const int nc, const float * GGML_RESTRICT dw, const float * GGML_RESTRICT dm) {
    __m512 acc[8];
#pragma GCC unroll 8
    for (int h = 0; h < nh; ++h) {
        acc[h] = _mm512_loadu_ps(y[h] + off);
    }
    for (int c = 0; c < nc; ++c) {
        __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (codes + 32*c))));
        if (has_m) {
            f = _mm512_fmadd_ps(f, _mm512_set1_ps(dm[2*c]), _mm512_set1_ps(dm[2*c + 1]));
        }
#pragma GCC unroll 8
        for (int h = 0; h < nh; ++h) {
            acc[h] = _mm512_fmadd_ps(f, _mm512_set1_ps(dw[h*32 + c]), acc[h]);
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < nh; ++h) {
        _mm512_storeu_ps(y[h] + off, acc[h]);
    }
}
#endif // KVQ_AVX512

// the K side: Q's codes are -127..127 as quantize_row_q8_0 writes them (the sign trick, as in ggml's
// own q8_0 dot products, needs it); byte pairs into 16 and 32 bits (exact integer sums of each 4
// products), one fma per block and head with the product of the scales (q3_kv: one per half)
typedef __m256 kvq_dot_acc;
static inline kvq_dot_acc kvq_dot_acc_zero(void) { return _mm256_setzero_ps(); }

static inline float kvq_dot_acc_sum(const kvq_dot_acc v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static inline __attribute__((always_inline)) void kvq_dot_heads_block(const int nh, kvq_dot_acc * GGML_RESTRICT acc,
        const int8_t * GGML_RESTRICT codes, const float dk0, const float dk1, const char * GGML_RESTRICT q, const size_t qrow, const int i) {
    const __m256i kx  = _mm256_loadu_si256((const __m256i *) codes);
    const __m256i ax  = _mm256_sign_epi8(kx, kx);
#pragma GCC unroll 8
    for (int h = 0; h < nh; ++h) {
        const block_q8_0 * GGML_RESTRICT qb = (const block_q8_0 *) (q + h*qrow) + i;
        const __m256i qy = _mm256_loadu_si256((const __m256i *) qb->qs);
        const __m256i p  = kvq_dot_u8s8(ax, _mm256_sign_epi8(qy, kx));
        const float   dq = GGML_CPU_FP16_TO_FP32(qb->d);
        const __m256  dd = _mm256_set_m128(_mm_set1_ps(dk1*dq), _mm_set1_ps(dk0*dq));
        acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dd, acc[h]);
    }
}
#endif

#if KVQ_NEON
// The grouped decode kernel's NEON pieces: the same decode of a block's codes (elements 0-15 in lo,
// 16-31 in hi) and the same float operations per element as the AVX2 ones above.
#define KVQ_GROUP 1
#define KVQ_CODES_DECL          int8x16_t lo, hi;
#define KVQ_CODES_STORE(p)      (vst1q_s8((p), lo), vst1q_s8((p) + 16, hi))

// bit e of the 32 bits at qh (little endian: byte s holds elements 8s..8s+7) as bytes of v or 0
static inline void kvq_highbits_neon(const uint8_t * GGML_RESTRICT qh, const uint8_t v, uint8x16_t * lo, uint8x16_t * hi) {
    static const uint8_t bits[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t bit = vld1q_u8(bits);
    const uint8x16_t vv  = vdupq_n_u8(v);
    *lo = vandq_u8(vtstq_u8(vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1])), bit), vv);
    *hi = vandq_u8(vtstq_u8(vcombine_u8(vdup_n_u8(qh[2]), vdup_n_u8(qh[3])), bit), vv);
}

// the nibbles of 16 bytes: low ones (elements 0-15), high ones (16-31)
static inline void kvq_nibbles_neon(const uint8_t * GGML_RESTRICT qs, uint8x16_t * lo, uint8x16_t * hi) {
    const uint8x16_t b = vld1q_u8(qs);
    *lo = vandq_u8(b, vdupq_n_u8(0x0F));
    *hi = vshrq_n_u8(b, 4);
}

#define KVQ_DECODE_Q8_0 \
    d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); lo = vld1q_s8(b->qs); hi = vld1q_s8(b->qs + 16);
#define KVQ_DECODE_Q4_0 { uint8x16_t l, h; kvq_nibbles_neon(b->qs, &l, &h); \
    d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); \
    lo = vsubq_s8(vreinterpretq_s8_u8(l), vdupq_n_s8(8)); hi = vsubq_s8(vreinterpretq_s8_u8(h), vdupq_n_s8(8)); }
#define KVQ_DECODE_Q4_1 { uint8x16_t l, h; kvq_nibbles_neon(b->qs, &l, &h); \
    d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); m = GGML_CPU_FP16_TO_FP32(b->m); \
    lo = vreinterpretq_s8_u8(l); hi = vreinterpretq_s8_u8(h); }
#define KVQ_DECODE_Q5_0 { uint8x16_t l, h, bl, bh; kvq_nibbles_neon(b->qs, &l, &h); kvq_highbits_neon(b->qh, 0x10, &bl, &bh); \
    d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); \
    lo = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l, bl)), vdupq_n_s8(16)); hi = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(h, bh)), vdupq_n_s8(16)); }
#define KVQ_DECODE_Q5_1 { uint8x16_t l, h, bl, bh; kvq_nibbles_neon(b->qs, &l, &h); kvq_highbits_neon(b->qh, 0x10, &bl, &bh); \
    d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); m = GGML_CPU_FP16_TO_FP32(b->m); \
    lo = vreinterpretq_s8_u8(vorrq_u8(l, bl)); hi = vreinterpretq_s8_u8(vorrq_u8(h, bh)); }
#define KVQ_DECODE_IQ4_NL { uint8x16_t l, h; kvq_nibbles_neon(b->qs, &l, &h); const int8x16_t t = vld1q_s8(kvalues_iq4nl); \
    d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); lo = vqtbl1q_s8(t, l); hi = vqtbl1q_s8(t, h); }
#define KVQ_DECODE_Q3_KV { uint8x16_t l, h, bl, bh; kvq_codes2_neon(b->qs, &l, &h); kvq_highbits_neon(b->qh, 4, &bl, &bh); \
    d0 = GGML_CPU_FP16_TO_FP32(b->d[0]); d1 = GGML_CPU_FP16_TO_FP32(b->d[1]); \
    lo = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l, bl)), vdupq_n_s8(4)); hi = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(h, bh)), vdupq_n_s8(4)); }
#define KVQ_DECODE_Q2_KV { uint8x16_t l, h; kvq_codes2_neon(b->qs, &l, &h); \
    d0 = d1 = GGML_CPU_FP16_TO_FP32(b->d); m = GGML_CPU_FP16_TO_FP32(b->m); \
    lo = vreinterpretq_s8_u8(l); hi = vreinterpretq_s8_u8(h); }

// 8 values (part k of a block) of nc rows into nh accumulators (two float32x4 per head)
static inline __attribute__((always_inline)) void kvq_rows_part(const int nh, const int has_m, float * const * GGML_RESTRICT y,
        const int off, const int8_t * GGML_RESTRICT codes, const int nc, const float * GGML_RESTRICT dw, const float * GGML_RESTRICT dm) {
    float32x4_t a0[8], a1[8];
    for (int h = 0; h < nh; ++h) {
        a0[h] = vld1q_f32(y[h] + off);
        a1[h] = vld1q_f32(y[h] + off + 4);
    }
    for (int c = 0; c < nc; ++c) {
        const int16x8_t q = vmovl_s8(vld1_s8(codes + 32*c));
        float32x4_t f0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(q)));
        float32x4_t f1 = vcvtq_f32_s32(vmovl_high_s16(q));
        if (has_m) {
            f0 = vfmaq_n_f32(vdupq_n_f32(dm[2*c + 1]), f0, dm[2*c]);
            f1 = vfmaq_n_f32(vdupq_n_f32(dm[2*c + 1]), f1, dm[2*c]);
        }
        for (int h = 0; h < nh; ++h) {
            const float wv = dw[h*32 + c];
            a0[h] = vfmaq_n_f32(a0[h], f0, wv);
            a1[h] = vfmaq_n_f32(a1[h], f1, wv);
        }
    }
    for (int h = 0; h < nh; ++h) {
        vst1q_f32(y[h] + off, a0[h]);
        vst1q_f32(y[h] + off + 4, a1[h]);
    }
}

// the K side: exact integer sums per half block (sdot with the dotprod extension), then the scales
typedef float kvq_dot_acc;
static inline kvq_dot_acc kvq_dot_acc_zero(void) { return 0.0f; }
static inline float kvq_dot_acc_sum(const kvq_dot_acc v) { return v; }

static inline __attribute__((always_inline)) void kvq_dot_heads_block(const int nh, kvq_dot_acc * GGML_RESTRICT acc,
        const int8_t * GGML_RESTRICT codes, const float dk0, const float dk1, const char * GGML_RESTRICT q, const size_t qrow, const int i) {
    const int8x16_t lo = vld1q_s8(codes), hi = vld1q_s8(codes + 16);
    for (int h = 0; h < nh; ++h) {
        const block_q8_0 * GGML_RESTRICT qb = (const block_q8_0 *) (q + h*qrow) + i;
        const int s0 = kvq_dot16_neon(lo, vld1q_s8(qb->qs));
        const int s1 = kvq_dot16_neon(hi, vld1q_s8(qb->qs + 16));
        const float dq = GGML_CPU_FP16_TO_FP32(qb->d);
        acc[h] += (dk0*dq)*(float) s0 + (dk1*dq)*(float) s1;
    }
}
#endif // KVQ_NEON
#ifndef KVQ_GROUP
#define KVQ_GROUP 0 // neither: the stock kernels
#endif

#if KVQ_GROUP
// The grouped decode kernel's drivers. V side: a chunk of nc <= 32 V rows into nh <= 8 Q heads'
// accumulators, y[h][0..n) += sum_c w[h*ws + c] * dequantize(row c). Per 32-value block the rows' codes
// go to a small buffer once, then per 8 values every head's accumulator stays in registers over the nc
// rows: a row is dequantized once for all heads and an accumulator is loaded and stored once per chunk
// instead of once per row. Symmetric types fold the block scale into the weight (fma(code, w*d, y):
// code*d is exact in float, so this is one rounding more than the one-row kernel's, of the same size);
// types with a minimum make the value as the one-row kernel does (fma(code, d, m), exactly its rounded
// sum) and then fma(value, w, y). Another rounding order than the one-row kernel, not its bits.
// K side: one K row against the nh <= 8 Q heads that share it, Q in q8_0 blocks (the vec_dot type of
// q8_0, q4_0, q5_0, iq4_nl and q3_kv), the row's codes decoded once per block for all heads.
#define KVQ_ROWS_MAX  32
#define KVQ_HEADS_MAX 8

// the four 8-value parts of one block (dw0: the first half's weights, dw1 the second's), the head count
// a constant in each case (registers, unrolled)
static inline void kvq_rows_block(const int nh, const int has_m, float * const * GGML_RESTRICT y, const int off,
        const int8_t * GGML_RESTRICT codes, const int nc, const float * GGML_RESTRICT dw0, const float * GGML_RESTRICT dw1,
        const float * GGML_RESTRICT dm) {
#if KVQ_AVX512
#define KVQ_ROWS_NH(N) \
    case N: for (int k = 0; k < 2; ++k) kvq_rows_part16(N, has_m, y, off + 16*k, codes + 16*k, nc, k < 1 ? dw0 : dw1, dm); break;
#else
#define KVQ_ROWS_NH(N) \
    case N: for (int k = 0; k < 4; ++k) kvq_rows_part(N, has_m, y, off + 8*k, codes + 8*k, nc, k < 2 ? dw0 : dw1, dm); break;
#endif
    switch (nh) {
        KVQ_ROWS_NH(1) KVQ_ROWS_NH(2) KVQ_ROWS_NH(3) KVQ_ROWS_NH(4)
        KVQ_ROWS_NH(5) KVQ_ROWS_NH(6) KVQ_ROWS_NH(7) KVQ_ROWS_NH(8)
        default: GGML_ABORT("kvq rows: %d heads", nh);
    }
#undef KVQ_ROWS_NH
}

#define KVQ_ROWS_FN(NAME, BLOCK, HAS_M, HALVES, DECODE)                                                               \
static void kvq_rows_##NAME(int n, int nh, int nc, float * const * GGML_RESTRICT y, const char * GGML_RESTRICT vx,     \
                            size_t stride, const float * GGML_RESTRICT w, int ws) {                                   \
    int8_t codes[KVQ_ROWS_MAX*32];                                                                                    \
    float dw0[KVQ_HEADS_MAX*KVQ_ROWS_MAX], dw1[KVQ_HEADS_MAX*KVQ_ROWS_MAX], dm[2*KVQ_ROWS_MAX];                       \
    if (HAS_M) { /* the weights as they are; the rows' (d, m) per block */                                            \
        for (int h = 0; h < nh; ++h) {                                                                                \
            memcpy(dw0 + h*KVQ_ROWS_MAX, w + h*ws, nc*sizeof(float));                                                 \
        }                                                                                                             \
    }                                                                                                                 \
    for (int i = 0; i < n/32; ++i) {                                                                                  \
        for (int c = 0; c < nc; ++c) {                                                                                \
            const BLOCK * GGML_RESTRICT b = (const BLOCK *) (vx + c*stride) + i;                                       \
            float d0, d1, m = 0.0f;                                                                                    \
            KVQ_CODES_DECL                                                                                            \
            DECODE                                                                                                    \
            (void) d1; (void) m;                                                                                      \
            KVQ_CODES_STORE(codes + 32*c);                                                                            \
            if (HAS_M) {                                                                                              \
                dm[2*c] = d0;                                                                                         \
                dm[2*c + 1] = m;                                                                                      \
            } else {                                                                                                  \
                for (int h = 0; h < nh; ++h) {                                                                        \
                    dw0[h*KVQ_ROWS_MAX + c] = w[h*ws + c]*d0;                                                         \
                    if (HALVES) dw1[h*KVQ_ROWS_MAX + c] = w[h*ws + c]*d1;                                             \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
        kvq_rows_block(nh, HAS_M, y, 32*i, codes, nc, dw0, HALVES ? dw1 : dw0, dm);                                   \
    }                                                                                                                 \
}

KVQ_ROWS_FN(q8_0,   block_q8_0,   0, 0, KVQ_DECODE_Q8_0)
KVQ_ROWS_FN(q4_0,   block_q4_0,   0, 0, KVQ_DECODE_Q4_0)
KVQ_ROWS_FN(q4_1,   block_q4_1,   1, 0, KVQ_DECODE_Q4_1)
KVQ_ROWS_FN(q5_0,   block_q5_0,   0, 0, KVQ_DECODE_Q5_0)
KVQ_ROWS_FN(q5_1,   block_q5_1,   1, 0, KVQ_DECODE_Q5_1)
KVQ_ROWS_FN(iq4_nl, block_iq4_nl, 0, 0, KVQ_DECODE_IQ4_NL)
KVQ_ROWS_FN(q3_kv,  block_q3_kv,  0, 1, KVQ_DECODE_Q3_KV)
KVQ_ROWS_FN(q2_kv,  block_q2_kv,  1, 0, KVQ_DECODE_Q2_KV)
#undef KVQ_ROWS_FN

// s[h*ss] = K . Q[h] for one K row of n values
#define KVQ_DOT_HEADS_FN(NAME, BLOCK, DECODE)                                                                         \
static inline __attribute__((always_inline)) void kvq_dot_heads_##NAME##_n(const int nh, int n, float * GGML_RESTRICT s,\
        size_t ss, const void * GGML_RESTRICT vk, const char * GGML_RESTRICT q, size_t qrow) {                           \
    kvq_dot_acc acc[KVQ_HEADS_MAX];                                                                                   \
    for (int h = 0; h < nh; ++h) {                                                                                    \
        acc[h] = kvq_dot_acc_zero();                                                                                  \
    }                                                                                                                 \
    for (int i = 0; i < n/32; ++i) {                                                                                  \
        const BLOCK * GGML_RESTRICT b = (const BLOCK *) vk + i;                                                       \
        float d0, d1, m = 0.0f;                                                                                        \
        int8_t codes[32];                                                                                             \
        KVQ_CODES_DECL                                                                                                \
        DECODE                                                                                                        \
        (void) m;                                                                                                     \
        KVQ_CODES_STORE(codes);                                                                                       \
        kvq_dot_heads_block(nh, acc, codes, d0, d1, q, qrow, i);                                                      \
    }                                                                                                                 \
    for (int h = 0; h < nh; ++h) {                                                                                    \
        s[h*ss] = kvq_dot_acc_sum(acc[h]);                                                                            \
    }                                                                                                                 \
}                                                                                                                     \
static void kvq_dot_heads_##NAME(int n, int nh, float * GGML_RESTRICT s, size_t ss, const void * GGML_RESTRICT vk,     \
                                 const char * GGML_RESTRICT q, size_t qrow) {                                         \
    switch (nh) {                                                                                                     \
        case 1: kvq_dot_heads_##NAME##_n(1, n, s, ss, vk, q, qrow); break;                                            \
        case 2: kvq_dot_heads_##NAME##_n(2, n, s, ss, vk, q, qrow); break;                                            \
        case 3: kvq_dot_heads_##NAME##_n(3, n, s, ss, vk, q, qrow); break;                                            \
        case 4: kvq_dot_heads_##NAME##_n(4, n, s, ss, vk, q, qrow); break;                                            \
        case 5: kvq_dot_heads_##NAME##_n(5, n, s, ss, vk, q, qrow); break;                                            \
        case 6: kvq_dot_heads_##NAME##_n(6, n, s, ss, vk, q, qrow); break;                                            \
        case 7: kvq_dot_heads_##NAME##_n(7, n, s, ss, vk, q, qrow); break;                                            \
        case 8: kvq_dot_heads_##NAME##_n(8, n, s, ss, vk, q, qrow); break;                                            \
        default: GGML_ABORT("kvq dot heads: %d heads", nh);                                                           \
    }                                                                                                                 \
}

KVQ_DOT_HEADS_FN(q8_0,   block_q8_0,   KVQ_DECODE_Q8_0)
KVQ_DOT_HEADS_FN(q4_0,   block_q4_0,   KVQ_DECODE_Q4_0)
KVQ_DOT_HEADS_FN(q5_0,   block_q5_0,   KVQ_DECODE_Q5_0)
KVQ_DOT_HEADS_FN(iq4_nl, block_iq4_nl, KVQ_DECODE_IQ4_NL)
KVQ_DOT_HEADS_FN(q3_kv,  block_q3_kv,  KVQ_DECODE_Q3_KV)
#undef KVQ_DOT_HEADS_FN
#endif // KVQ_GROUP

// KVTUNER_CPU_KV_SIMD=0: the stock paths (for comparisons)
static int kvq_simd_enabled(void) {
    static int enabled = -1;
    if (enabled < 0) {
        const char * e = getenv("KVTUNER_CPU_KV_SIMD");
        enabled = !(e && e[0] == '0');
    }
    return enabled;
}

ggml_kvq_mad_t ggml_kvq_get_mad(enum ggml_type type, int64_t n) {
#if defined(KVQ_MAD)
    if (!kvq_simd_enabled() || n % KVQ_MAD_STEP != 0) { // ggml_vec_mad_f32's step: no scalar leftovers
        return NULL;
    }
    switch (type) {
        case GGML_TYPE_Q8_0:  return kvq_mad_q8_0;
        case GGML_TYPE_Q4_0:  return kvq_mad_q4_0;
        case GGML_TYPE_Q4_1:  return kvq_mad_q4_1;
        case GGML_TYPE_Q5_0:  return kvq_mad_q5_0;
        case GGML_TYPE_Q5_1:  return kvq_mad_q5_1;
        case GGML_TYPE_IQ4_NL: return kvq_mad_iq4_nl;
        case GGML_TYPE_Q3_KV: return kvq_mad_q3_kv;
        case GGML_TYPE_Q2_KV: return kvq_mad_q2_kv;
        default:              return NULL;
    }
#else
    GGML_UNUSED(type);
    GGML_UNUSED(n);
    return NULL;
#endif
}

ggml_kvq_mad_rows_t ggml_kvq_get_mad_rows(enum ggml_type type, int64_t n) {
#if KVQ_GROUP
    if (!kvq_simd_enabled() || n % 32 != 0) {
        return NULL;
    }
    switch (type) {
        case GGML_TYPE_Q8_0:  return kvq_rows_q8_0;
        case GGML_TYPE_Q4_0:  return kvq_rows_q4_0;
        case GGML_TYPE_Q4_1:  return kvq_rows_q4_1;
        case GGML_TYPE_Q5_0:  return kvq_rows_q5_0;
        case GGML_TYPE_Q5_1:  return kvq_rows_q5_1;
        case GGML_TYPE_IQ4_NL: return kvq_rows_iq4_nl;
        case GGML_TYPE_Q3_KV: return kvq_rows_q3_kv;
        case GGML_TYPE_Q2_KV: return kvq_rows_q2_kv;
        default:              return NULL;
    }
#else
    GGML_UNUSED(type);
    GGML_UNUSED(n);
    return NULL;
#endif
}

ggml_kvq_dot_heads_t ggml_kvq_get_dot_heads(enum ggml_type type, int64_t n) {
#if KVQ_GROUP
    if (!kvq_simd_enabled() || n % 32 != 0) {
        return NULL;
    }
    switch (type) {
        case GGML_TYPE_Q8_0:   return kvq_dot_heads_q8_0;
        case GGML_TYPE_Q4_0:   return kvq_dot_heads_q4_0;
        case GGML_TYPE_Q5_0:   return kvq_dot_heads_q5_0;
        case GGML_TYPE_IQ4_NL: return kvq_dot_heads_iq4_nl;
        case GGML_TYPE_Q3_KV:  return kvq_dot_heads_q3_kv;
        default:               return NULL;
    }
#else
    GGML_UNUSED(type);
    GGML_UNUSED(n);
    return NULL;
#endif
}

// ---------------------------------------------------------------------------------------------
// The cache writes of q3_kv / q2_kv (SET_ROWS' from_float): the reference code's scale search with the
// candidates in SIMD lanes. Each lane runs one candidate's operations in the reference order (one
// rounding per operation: products kept apart from the following add, errors summed in element
// order), the fp16 roundings by F16C (round to nearest even, as ggml's software conversion for
// finite values), and the first strict minimum over the candidates in order wins: the same bytes
// as quantize_row_q{3,2}_kv_ref. Blocks with inf or NaN take the reference code.
#if KVQ_AVX2 && defined(__F16C__)

static inline __m256 kvq_nofuse(__m256 p) {
    __asm__("" : "+x"(p));
    return p;
}

// the first candidate with the least error (the reference's `t == 0 || err < best` over candidates in
// order), of the first n lanes of err[0], err[1]
static int kvq_first_min(const __m256 err[2], const int n) {
    float e[16];
    _mm256_storeu_ps(e, err[0]);
    _mm256_storeu_ps(e + 8, err[1]);
    int bt = 0;
    for (int t = 1; t < n; ++t) {
        bt = e[t] < e[bt] ? t : bt;
    }
    return bt;
}

// lane t of two 8 x fp16 vectors
static uint16_t kvq_lane_u16(const __m128i v[2], const int t) {
    uint16_t u[16];
    _mm_storeu_si128((__m128i *) u, v[0]);
    _mm_storeu_si128((__m128i *) (u + 8), v[1]);
    return u[t];
}

static const float kvq3_scale_c[16] = {
    0.76f, 0.80f, 0.84f, 0.88f, 0.92f, 0.96f, 1.00f, 1.04f, 1.08f, 1.12f, 1.16f, 1.20f, 1.24f, 1.28f, 1.32f, 1.32f,
};

// one half block of q3_kv (16 values): scale and 16 codes 0..7; returns 0 where the reference must run
static int kvq3_half_avx2(const float * GGML_RESTRICT x, ggml_half * GGML_RESTRICT dout, uint8_t * GGML_RESTRICT codes) {
    float amax = 0.0f;
    float mx   = 0.0f;
    for (int j = 0; j < 16; ++j) {
        const float ax = fabsf(x[j]);
        if (!(ax <= FLT_MAX)) {
            return 0; // inf or NaN
        }
        if (ax > amax) {
            amax = ax;
            mx   = x[j];
        }
    }
    if (amax == 0.0f) {
        *dout = ggml_fp32_to_fp16(0.0f);
        memset(codes, 4, 16);
        return 1;
    }
    __m256  d[2], id[2], err[2];
    __m128i dh[2];
    const __m256 nmx = _mm256_set1_ps(-mx);
    for (int h = 0; h < 2; ++h) {
        const __m256 sm = kvq_nofuse(_mm256_mul_ps(nmx, _mm256_loadu_ps(kvq3_scale_c + 8*h)));
        const __m256 s4 = _mm256_mul_ps(sm, _mm256_set1_ps(0.25f));
        dh[h]  = _mm256_cvtps_ph(s4, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        d[h]   = _mm256_cvtph_ps(dh[h]);
        const __m256 nz = _mm256_cmp_ps(d[h], _mm256_setzero_ps(), _CMP_NEQ_OQ);
        id[h]  = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), d[h]), nz);
        err[h] = _mm256_setzero_ps();
    }
    __m256i q[16][2];
    for (int j = 0; j < 16; ++j) {
        const __m256 xj = _mm256_set1_ps(x[j]);
        for (int h = 0; h < 2; ++h) {
            const __m256  p  = kvq_nofuse(_mm256_mul_ps(xj, id[h]));
            const __m256  v  = _mm256_add_ps(p, _mm256_set1_ps(4.5f));
            __m256i       qi = _mm256_cvttps_epi32(v);
            qi = _mm256_min_epi32(_mm256_max_epi32(qi, _mm256_setzero_si256()), _mm256_set1_epi32(7));
            q[j][h] = qi;
            const __m256  y  = kvq_nofuse(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(qi, _mm256_set1_epi32(4))), d[h]));
            const __m256  r  = _mm256_sub_ps(y, xj);
            const __m256  r2 = kvq_nofuse(_mm256_mul_ps(r, r));
            err[h] = _mm256_add_ps(err[h], r2);
        }
    }
    const int      bt  = kvq_first_min(err, 15);
    const uint16_t dbt = kvq_lane_u16(dh, bt);
    memcpy(dout, &dbt, sizeof(ggml_half));
    for (int j = 0; j < 16; ++j) {
        int32_t qs[8];
        _mm256_storeu_si256((__m256i *) qs, q[j][bt / 8]);
        codes[j] = (uint8_t) qs[bt % 8];
    }
    return 1;
}

void ggml_kvq_quantize_row_q3_kv(const float * GGML_RESTRICT x, void * GGML_RESTRICT vy, int64_t k) {
    assert(k % QK3_KV == 0);
    block_q3_kv * GGML_RESTRICT y = (block_q3_kv *) vy;
    const int64_t nb = k / QK3_KV;
    for (int64_t i = 0; i < nb; ++i) {
        uint8_t c[QK3_KV];
        if (!kvq3_half_avx2(x + i*QK3_KV, &y[i].d[0], c) || !kvq3_half_avx2(x + i*QK3_KV + 16, &y[i].d[1], c + 16)) {
            quantize_row_q3_kv_ref(x + i*QK3_KV, &y[i], QK3_KV);
            continue;
        }
        memset(y[i].qs, 0, sizeof(y[i].qs));
        memset(y[i].qh, 0, sizeof(y[i].qh));
        for (int j = 0; j < QK3_KV; ++j) {
            y[i].qs[j % 8] |= (uint8_t) ((c[j] & 3) << (2 * (j / 8)));
            y[i].qh[j / 8] |= (uint8_t) (((c[j] >> 2) & 1) << (j % 8));
        }
    }
}

// q2_kv: candidate (a, b) = (t / 4, t % 4) in lane t
static const float kvq2_sa_c[16] = { 0.00f, 0.00f, 0.00f, 0.00f, 0.04f, 0.04f, 0.04f, 0.04f,
                                     0.08f, 0.08f, 0.08f, 0.08f, 0.12f, 0.12f, 0.12f, 0.12f };
static const float kvq2_sb_c[16] = { 0.00f, 0.04f, 0.08f, 0.12f, 0.00f, 0.04f, 0.08f, 0.12f,
                                     0.00f, 0.04f, 0.08f, 0.12f, 0.00f, 0.04f, 0.08f, 0.12f };

void ggml_kvq_quantize_row_q2_kv(const float * GGML_RESTRICT x, void * GGML_RESTRICT vy, int64_t k) {
    assert(k % QK2_KV == 0);
    block_q2_kv * GGML_RESTRICT y = (block_q2_kv *) vy;
    const int64_t nb = k / QK2_KV;
    for (int64_t i = 0; i < nb; ++i) {
        const float * xb = x + i*QK2_KV;
        float lo = xb[0];
        float hi = xb[0];
        int finite = 1;
        for (int j = 0; j < QK2_KV; ++j) {
            finite &= fabsf(xb[j]) <= FLT_MAX;
            lo = xb[j] < lo ? xb[j] : lo;
            hi = xb[j] > hi ? xb[j] : hi;
        }
        const float rng = hi - lo;
        if (!finite || !(hi > lo) || !(fabsf(rng) <= FLT_MAX)) {
            quantize_row_q2_kv_ref(xb, &y[i], QK2_KV); // degenerate or non-finite: the reference
            continue;
        }
        __m256  d[2], m[2], id[2], err[2];
        __m128i dh[2], mh[2];
        const __m256 vr = _mm256_set1_ps(rng);
        for (int h = 0; h < 2; ++h) {
            const __m256 sa = kvq_nofuse(_mm256_mul_ps(_mm256_loadu_ps(kvq2_sa_c + 8*h), vr));
            const __m256 sb = kvq_nofuse(_mm256_mul_ps(_mm256_loadu_ps(kvq2_sb_c + 8*h), vr));
            const __m256 l2 = _mm256_add_ps(_mm256_set1_ps(lo), sa);
            const __m256 h2 = _mm256_sub_ps(_mm256_set1_ps(hi), sb);
            const __m256 dd = _mm256_div_ps(_mm256_sub_ps(h2, l2), _mm256_set1_ps(3.0f));
            dh[h] = _mm256_cvtps_ph(dd, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            mh[h] = _mm256_cvtps_ph(l2, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            d[h]  = _mm256_cvtph_ps(dh[h]);
            m[h]  = _mm256_cvtph_ps(mh[h]);
            const __m256 nz = _mm256_cmp_ps(d[h], _mm256_setzero_ps(), _CMP_NEQ_OQ);
            id[h]  = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), d[h]), nz);
            err[h] = _mm256_setzero_ps();
        }
        __m256i q[QK2_KV][2];
        for (int j = 0; j < QK2_KV; ++j) {
            const __m256 xj = _mm256_set1_ps(xb[j]);
            for (int h = 0; h < 2; ++h) {
                const __m256 u  = _mm256_sub_ps(xj, m[h]);
                const __m256 p  = kvq_nofuse(_mm256_mul_ps(u, id[h]));
                const __m256 v  = _mm256_add_ps(p, _mm256_set1_ps(0.5f));
                __m256i      qi = _mm256_cvttps_epi32(v);
                qi = _mm256_min_epi32(_mm256_max_epi32(qi, _mm256_setzero_si256()), _mm256_set1_epi32(3));
                q[j][h] = qi;
                const __m256 dq = kvq_nofuse(_mm256_mul_ps(d[h], _mm256_cvtepi32_ps(qi)));
                const __m256 yv = _mm256_add_ps(dq, m[h]);
                const __m256 r  = _mm256_sub_ps(yv, xj);
                const __m256 r2 = kvq_nofuse(_mm256_mul_ps(r, r));
                err[h] = _mm256_add_ps(err[h], r2);
            }
        }
        const int      bt  = kvq_first_min(err, 16);
        const uint16_t dbt = kvq_lane_u16(dh, bt);
        const uint16_t mbt = kvq_lane_u16(mh, bt);
        memcpy(&y[i].d, &dbt, sizeof(ggml_half));
        memcpy(&y[i].m, &mbt, sizeof(ggml_half));
        memset(y[i].qs, 0, sizeof(y[i].qs));
        for (int j = 0; j < QK2_KV; ++j) {
            int32_t qs[8];
            _mm256_storeu_si256((__m256i *) qs, q[j][bt / 8]);
            y[i].qs[j % 8] |= (uint8_t) ((qs[bt % 8] & 3) << (2 * (j / 8)));
        }
    }
}

#else

void ggml_kvq_quantize_row_q3_kv(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_q3_kv_ref(x, (block_q3_kv *) y, k);
}

void ggml_kvq_quantize_row_q2_kv(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_q2_kv_ref(x, (block_q2_kv *) y, k);
}

#endif
