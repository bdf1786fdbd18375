// kvtuner-edge: low-bit KV cache formats q3_kv and q2_kv (reference quantisers, dequantisers).
// Copied into ggml/src/ by native/build.py; the block layouts are in ggml-common.h (patch 0004).
#pragma once

#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

GGML_API void quantize_row_q3_kv_ref(const float * GGML_RESTRICT x, block_q3_kv * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_q2_kv_ref(const float * GGML_RESTRICT x, block_q2_kv * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_q3_kv(const block_q3_kv * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_q2_kv(const block_q2_kv * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API size_t quantize_q3_kv(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_q2_kv(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);

#ifdef __cplusplus
}
#endif
