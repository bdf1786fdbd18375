// kvtuner-edge: CPU dot products of the q3_kv / q2_kv KV cache formats with the quantised Q row
// (flash attention converts Q to the K type's vec_dot_type: q8_0 for q3_kv, q8_1 for q2_kv), and the
// V side of flash attention for the quantized cache types.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

void ggml_vec_dot_q3_kv_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_q2_kv_q8_1(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// flash attention's V accumulation y[0..n) += v * dequantize(x) for a row of a quantized V cache type
// (ggml's q8_0/q4_0/q4_1/q5_0/q5_1/iq4_nl and q3_kv/q2_kv), bit for bit the stock to_float + ggml_vec_mad_f32;
// NULL where there is none for the type, the build or n (then the stock path runs)
typedef void (*ggml_kvq_mad_t)(int n, float * GGML_RESTRICT y, const void * GGML_RESTRICT x, float v);
ggml_kvq_mad_t ggml_kvq_get_mad(enum ggml_type type, int64_t n);

// a chunk of nc <= 32 V rows (row c at x + c*stride) into nh <= 8 accumulators: y[h][0..n) += sum_c
// w[h*ws + c] * dequantize(row c), each row dequantized once (its own rounding order, not the stock
// bits); NULL where ggml_kvq_get_mad is NULL
typedef void (*ggml_kvq_mad_rows_t)(int n, int nh, int nc, float * const * GGML_RESTRICT y, const char * GGML_RESTRICT x,
                                    size_t stride, const float * GGML_RESTRICT w, int ws);
ggml_kvq_mad_rows_t ggml_kvq_get_mad_rows(enum ggml_type type, int64_t n);

// scores of one K row (n values) against nh <= 8 Q rows in q8_0 blocks (row h at q + h*qrow): s[h*ss] =
// K . Q[h], the row's codes decoded once for all heads; for the K types whose vec_dot type is q8_0
// (q8_0, q4_0, q5_0, iq4_nl, q3_kv), NULL for the others and where ggml_kvq_get_mad is NULL
typedef void (*ggml_kvq_dot_heads_t)(int n, int nh, float * GGML_RESTRICT s, size_t ss, const void * GGML_RESTRICT k,
                                     const char * GGML_RESTRICT q, size_t qrow);
ggml_kvq_dot_heads_t ggml_kvq_get_dot_heads(enum ggml_type type, int64_t n);

// the cache writes (from_float) of q3_kv / q2_kv: the reference code's bytes, the scale search in SIMD
// lanes where the build has AVX2 + F16C, else the reference code itself
void ggml_kvq_quantize_row_q3_kv(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);
void ggml_kvq_quantize_row_q2_kv(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);

#ifdef __cplusplus
}
#endif
