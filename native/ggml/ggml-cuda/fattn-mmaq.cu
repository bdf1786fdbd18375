// kvtuner-edge: the tensor-core decode kernel for quantized K/V (fattn-mmaq.cuh): head size 128 and
// the dispatch, which keeps llama.cpp's own kernels wherever this one does not apply.
#include "fattn-mmaq.cuh"

#include <cstdlib>

FATTN_MMAQ_GET_CASE(128)

int ggml_cuda_fattn_mmaq_variant() {
    static const int variant = [] {
        const char * env = getenv("KVTUNER_CUDA_FA_MMAQ_VARIANT");
        const int v = env ? atoi(env) : 0;
        return v >= 0 && v < FATTN_MMAQ_NVARIANTS ? v : 0;
    }();
    return variant;
}

// KVTUNER_CUDA_FA_MMAQ=0 turns the kernel off (comparisons in one build)
static bool ggml_cuda_fattn_mmaq_enabled() {
    static const bool enabled = [] {
        const char * env = getenv("KVTUNER_CUDA_FA_MMAQ");
        return env == nullptr || atoi(env) != 0;
    }();
    return enabled;
}

static bool ggml_cuda_fattn_mmaq_aligned(const ggml_tensor * t, const size_t align) {
    if ((uintptr_t) t->data % align != 0) {
        return false;
    }
    for (int i = 1; i < GGML_MAX_DIMS; ++i) {
        if (t->nb[i] % align != 0) {
            return false;
        }
    }
    return true;
}

static fattn_mmaq_case_t ggml_cuda_fattn_mmaq_select(const ggml_tensor * dst) {
    const ggml_tensor * Q     = dst->src[0];
    const ggml_tensor * K     = dst->src[1];
    const ggml_tensor * V     = dst->src[2];
    const ggml_tensor * mask  = dst->src[3];

    const int cc = ggml_cuda_info().devices[ggml_cuda_get_device()].cc;
    if (!ggml_cuda_fattn_mmaq_enabled() || !GGML_CUDA_CC_IS_NVIDIA(cc) || !ampere_mma_available(cc)) {
        return nullptr;
    }

    float max_bias      = 0.0f;
    float logit_softcap = 0.0f;
    memcpy(&max_bias,      (const float *) dst->op_params + 1, sizeof(float));
    memcpy(&logit_softcap, (const float *) dst->op_params + 2, sizeof(float));

    // decode: one token per sequence, grouped-query attention, no ALiBi or softcapping
    if (Q->type != GGML_TYPE_F32 || Q->ne[1] != 1 || max_bias != 0.0f || logit_softcap != 0.0f) {
        return nullptr;
    }
    if (K->ne[0] != Q->ne[0] || V->ne[0] != Q->ne[0] || K->ne[2] == 0 || Q->ne[2] % K->ne[2] != 0 ||
            Q->ne[2] / K->ne[2] < 2 || K->ne[1] % FATTN_KQ_STRIDE != 0 || K->ne[3] != Q->ne[3]) {
        return nullptr;
    }
    if (mask && (mask->ne[0] < K->ne[1] || mask->ne[2] != 1)) {
        return nullptr;
    }
    // 16-byte loads of Q (and f16 K/V), 4-byte loads of quantized K/V
    if (!ggml_cuda_fattn_mmaq_aligned(Q, 16) ||
            !ggml_cuda_fattn_mmaq_aligned(K, K->type == GGML_TYPE_F16 ? 16 : 4) ||
            !ggml_cuda_fattn_mmaq_aligned(V, V->type == GGML_TYPE_F16 ? 16 : 4)) {
        return nullptr;
    }
    switch (Q->ne[0]) {
        case  64: return ggml_cuda_fattn_mmaq_get_case_d64 (K->type, V->type);
        case 128: return ggml_cuda_fattn_mmaq_get_case_d128(K->type, V->type);
        case 256: return ggml_cuda_fattn_mmaq_get_case_d256(K->type, V->type);
        default:  return nullptr;
    }
}

bool ggml_cuda_flash_attn_ext_mmaq(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const fattn_mmaq_case_t mmaq_case = ggml_cuda_fattn_mmaq_select(dst);
    if (mmaq_case == nullptr) {
        return false;
    }
    mmaq_case(ctx, dst);
    return true;
}
