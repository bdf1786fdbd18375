// kvtuner-edge: low-bit KV cache formats q3_kv and q2_kv (reference quantisers, dequantisers).
// Copied into ggml/src/ by native/build.py; the block layouts are in ggml-common.h (patch 0004).
#pragma once

#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include "ggml.h"

#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

// the 2-bit fields of a block's 32 codes, SWAR: byte j of qs holds elements j, j+8, j+16, j+24, so
// one 64-bit load shifted by 2*s and masked gives elements 8s .. 8s+7 (no per-element shifts);
// the reference dequantisers and the CPU dot products share it
static inline void ggml_kvq_unpack2(const uint8_t * GGML_RESTRICT qs, int8_t * GGML_RESTRICT c) {
    uint64_t w;
    memcpy(&w, qs, 8);
    for (int s = 0; s < 4; ++s) {
        const uint64_t v = (w >> (2*s)) & 0x0303030303030303ULL;
        memcpy(c + 8*s, &v, 8);
    }
}

GGML_API void quantize_row_q3_kv_ref(const float * GGML_RESTRICT x, block_q3_kv * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_q2_kv_ref(const float * GGML_RESTRICT x, block_q2_kv * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_q3_kv(const block_q3_kv * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_q2_kv(const block_q2_kv * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API size_t quantize_q3_kv(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_q2_kv(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);

#ifdef __cplusplus
}
#endif
