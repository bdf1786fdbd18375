// kvtuner-edge: flash-attention decode on tensor cores that reads quantized K/V in place.
//
// One token per sequence (decode), the Q heads of a GQA group (up to 8) as the N = 8 columns of
// mma.sync m16n8k16 (f16 in, f32 accumulate). Per warp and 16-token tile:
//   S^T (16 tokens x 8 heads) = K (16 x D, dequantized to f16 in registers) . Q^T (D x 8)
//   O^T (D x 8)              += V^T (D x 16, dequantized in registers)     . P^T (16 x 8)
// Each warp copies its tiles of raw K/V rows into shared memory (coalesced cp.async, double-buffered)
// and dequantizes them there with per-type dequantizers straight into the MMA fragments: no f16
// scratch copy of the cache. The reduction index of each product may be permuted freely, so every
// lane reads contiguous runs of a row (D/4 dims of 2 K rows, D/8 dims of 4 V rows) and the fragments
// are filled without shuffles. P^T is the transpose of S^T's accumulator layout, one movmatrix per
// 8x8 block. Each warp keeps its own online softmax over its own tiles; the warps of a block and the
// parallel blocks (launch_fattn's gridDim.y) are combined at the end exactly as the vector kernel's
// partial results are.
#pragma once

#include "common.cuh"
#include "fattn-common.cuh"

// a launch configuration: warps per block, raw K/V tiles in flight per warp (stages), KV positions per
// warp and iteration, the blocks per SM the registers are sized for. mmaq_cfg<0> is the default;
// KVTUNER_CUDA_FA_MMAQ_VARIANT=1.. selects the others for head size 128 (measuring them in one build).
// RB: bytes of one K row plus one V row. Measured on an H200 (8 KV heads of 128, 16 and 64 sequences at
// depth 4096): 16 positions per iteration beat 32 for q8_0/q8_0 (234 vs 290 us at 64 sequences) and lost
// for q4_0/q4_0 (203 vs 178) and q8_0/q4_0 (220 vs 199) (not profiled; wide rows make 32-position
// stages large); 3 stages, 2 warps per block and a 128-register cap were no better.
template <int variant, int D, int RB>
struct mmaq_cfg {
    static constexpr int nw     = variant == 3 ? 2 : 4;
    static constexpr int stages = variant == 1 ? 3 : 2;
    static constexpr int T      = variant == 2 ? 16 : (D <= 128 && RB < 2*D ? 32 : 16);
    static constexpr int minb   = variant == 4 ? 4 : variant == 3 ? 6 : (D <= 128 ? 3 : 2);
};
#define FATTN_MMAQ_NVARIANTS 5

// bytes of one row of D values of `type`
static constexpr __host__ __device__ int fattn_mmaq_row_bytes(const ggml_type type, const int D) {
    return type == GGML_TYPE_F16  ? 2*D :
           type == GGML_TYPE_Q8_0 ? D/32*34 : type == GGML_TYPE_Q5_1 ? D/32*24 : type == GGML_TYPE_Q5_0 ? D/32*22 :
           type == GGML_TYPE_Q4_1 ? D/32*20 : type == GGML_TYPE_Q4_0 ? D/32*18 : type == GGML_TYPE_Q3_KV ? D/32*16 :
           type == GGML_TYPE_Q2_KV ? D/32*12 : 0;
}

// dynamic shared memory of a block: the warps' staged tiles, reused for the final combine
template <int variant, int D, ggml_type type_K, ggml_type type_V>
static constexpr size_t fattn_mmaq_smem_bytes() {
    using cfg = mmaq_cfg<variant, D, fattn_mmaq_row_bytes(type_K, D) + fattn_mmaq_row_bytes(type_V, D)>;
    const size_t stage   = size_t(cfg::T)*(fattn_mmaq_row_bytes(type_K, D) + fattn_mmaq_row_bytes(type_V, D));
    const size_t staging = size_t(cfg::nw)*cfg::stages*stage;
    const size_t combine = size_t(cfg::nw)*8*D*sizeof(float);
    return staging > combine ? staging : combine;
}

typedef void (* fattn_mmaq_case_t)(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// the decode case of (head size, K type, V type), nullptr if it is not compiled
fattn_mmaq_case_t ggml_cuda_fattn_mmaq_get_case_d64 (ggml_type type_K, ggml_type type_V);
fattn_mmaq_case_t ggml_cuda_fattn_mmaq_get_case_d128(ggml_type type_K, ggml_type type_V);
fattn_mmaq_case_t ggml_cuda_fattn_mmaq_get_case_d256(ggml_type type_K, ggml_type type_V);

// true if the kernel ran (else the caller takes another path)
bool ggml_cuda_flash_attn_ext_mmaq(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// the configuration asked for by KVTUNER_CUDA_FA_MMAQ_VARIANT (0: the default)
int ggml_cuda_fattn_mmaq_variant();

// ---------------------------------------------------------------------------------------------
// device helpers

static __device__ __forceinline__ uint32_t mmaq_h2u(const half2 h) {
    return *(const uint32_t *) &h;
}

static __device__ __forceinline__ half2 mmaq_u2h(const uint32_t u) {
    return *(const half2 *) &u;
}

// 8 bytes at a 2-byte aligned address as two little-endian words: aligned 4-byte loads and a funnel
// shift (every word read holds at least one byte of the 8, so nothing outside the data is touched
// beyond its own aligned words)
static __device__ __forceinline__ void mmaq_load8_a2(const uint8_t * p, uint32_t & w0, uint32_t & w1) {
    const uintptr_t  a  = (uintptr_t) p;
    const uint32_t * b  = (const uint32_t *) (a & ~uintptr_t(3));
    const uint32_t   sh = uint32_t(a & 3)*8; // 0 or 16
    const uint32_t   x0 = b[0];
    const uint32_t   x1 = b[1];
    const uint32_t   x2 = sh ? b[2] : 0u;
    w0 = __funnelshift_r(x0, x1, sh);
    w1 = __funnelshift_r(x1, x2, sh);
}

static __device__ __forceinline__ uint32_t mmaq_load4_a2(const uint8_t * p) {
    const uint16_t * h = (const uint16_t *) p;
    return uint32_t(h[0]) | (uint32_t(h[1]) << 16);
}

// the 4 bytes of w (unsigned, < 256) as two half2 of 1024 + byte (exact): byte order 0,1 | 2,3
static __device__ __forceinline__ void mmaq_u8x4_to_h2(const uint32_t w, half2 & lo, half2 & hi) {
    lo = mmaq_u2h(__byte_perm(w, 0x64646464u, 0x4140));
    hi = mmaq_u2h(__byte_perm(w, 0x64646464u, 0x4342));
}

// bits 0..3 of x to bit `bit` of bytes 0..3
template <int bit>
static __device__ __forceinline__ uint32_t mmaq_spread4(const uint32_t x) {
    return ((x & 0xFu) * (0x00204081u << bit)) & (0x01010101u << bit);
}

// out[l] = values 2l, 2l+1 of the 8 codes in (w0, w1) as d*(code - bias): exact integers first
static __device__ __forceinline__ void mmaq_sym(const uint32_t w0, const uint32_t w1, const half d, const float bias, half2 * out) {
    const half2 b  = __half2half2(__float2half(1024.0f + bias));
    const half2 d2 = __half2half2(d);
    half2 h0, h1, h2, h3;
    mmaq_u8x4_to_h2(w0, h0, h1);
    mmaq_u8x4_to_h2(w1, h2, h3);
    out[0] = __hmul2(__hsub2(h0, b), d2);
    out[1] = __hmul2(__hsub2(h1, b), d2);
    out[2] = __hmul2(__hsub2(h2, b), d2);
    out[3] = __hmul2(__hsub2(h3, b), d2);
}

// ... as d*code + m
static __device__ __forceinline__ void mmaq_asym(const uint32_t w0, const uint32_t w1, const half2 dm, half2 * out) {
    const half2 b  = __half2half2(__float2half(1024.0f));
    const half2 d2 = __half2half2(__low2half(dm));
    const half2 m2 = __half2half2(__high2half(dm));
    half2 h0, h1, h2, h3;
    mmaq_u8x4_to_h2(w0, h0, h1);
    mmaq_u8x4_to_h2(w1, h2, h3);
    out[0] = __hfma2(__hsub2(h0, b), d2, m2);
    out[1] = __hfma2(__hsub2(h1, b), d2, m2);
    out[2] = __hfma2(__hsub2(h2, b), d2, m2);
    out[3] = __hfma2(__hsub2(h3, b), d2, m2);
}

// the 8 values i0 .. i0+7 (i0 % 8 == 0) of a row of `type` as 4 half2, in the same rounding as the
// vector kernel's dequantizers (d*q in f16, d*q + m as one f16 fma)
template <ggml_type type>
static __device__ __forceinline__ void mmaq_dq8(const char * __restrict__ row, const int i0, half2 * out) {
    if constexpr (type == GGML_TYPE_F16) {
        const uint4 v = *(const uint4 *) ((const half *) row + i0);
        out[0] = mmaq_u2h(v.x); out[1] = mmaq_u2h(v.y); out[2] = mmaq_u2h(v.z); out[3] = mmaq_u2h(v.w);
    } else if constexpr (type == GGML_TYPE_Q8_0) {
        const block_q8_0 * x = (const block_q8_0 *) row + i0/QK8_0;
        uint32_t w0, w1;
        mmaq_load8_a2((const uint8_t *) x->qs + i0 % QK8_0, w0, w1);
        mmaq_sym(w0 ^ 0x80808080u, w1 ^ 0x80808080u, x->d, 128.0f, out);
    } else if constexpr (type == GGML_TYPE_Q4_0) {
        const block_q4_0 * x = (const block_q4_0 *) row + i0/QK4_0;
        uint32_t w0, w1;
        mmaq_load8_a2(x->qs + i0 % (QK4_0/2), w0, w1);
        const int sh = 4*((i0 % QK4_0) / (QK4_0/2));
        mmaq_sym((w0 >> sh) & 0x0F0F0F0Fu, (w1 >> sh) & 0x0F0F0F0Fu, x->d, 8.0f, out);
    } else if constexpr (type == GGML_TYPE_Q4_1) {
        const block_q4_1 * x = (const block_q4_1 *) row + i0/QK4_1;
        const uint32_t * q = (const uint32_t *) (x->qs + i0 % (QK4_1/2));
        const int sh = 4*((i0 % QK4_1) / (QK4_1/2));
        mmaq_asym((q[0] >> sh) & 0x0F0F0F0Fu, (q[1] >> sh) & 0x0F0F0F0Fu, x->dm, out);
    } else if constexpr (type == GGML_TYPE_Q5_0) {
        const block_q5_0 * x = (const block_q5_0 *) row + i0/QK5_0;
        uint32_t w0, w1;
        mmaq_load8_a2(x->qs + i0 % (QK5_0/2), w0, w1);
        const int sh = 4*((i0 % QK5_0) / (QK5_0/2));
        const uint32_t qh = mmaq_load4_a2(x->qh) >> (i0 % QK5_0);
        w0 = ((w0 >> sh) & 0x0F0F0F0Fu) | mmaq_spread4<4>(qh);
        w1 = ((w1 >> sh) & 0x0F0F0F0Fu) | mmaq_spread4<4>(qh >> 4);
        mmaq_sym(w0, w1, x->d, 16.0f, out);
    } else if constexpr (type == GGML_TYPE_Q5_1) {
        const block_q5_1 * x = (const block_q5_1 *) row + i0/QK5_1;
        const uint32_t * q = (const uint32_t *) (x->qs + i0 % (QK5_1/2));
        const int sh = 4*((i0 % QK5_1) / (QK5_1/2));
        const uint32_t qh = *(const uint32_t *) x->qh >> (i0 % QK5_1);
        const uint32_t w0 = ((q[0] >> sh) & 0x0F0F0F0Fu) | mmaq_spread4<4>(qh);
        const uint32_t w1 = ((q[1] >> sh) & 0x0F0F0F0Fu) | mmaq_spread4<4>(qh >> 4);
        mmaq_asym(w0, w1, x->dm, out);
    } else if constexpr (type == GGML_TYPE_Q3_KV) {
        const block_q3_kv * x = (const block_q3_kv *) row + i0/QK3_KV;
        const int idq = i0 % QK3_KV;
        const uint32_t * q = (const uint32_t *) x->qs; // byte j: elements j, j+8, j+16, j+24
        const int sh = 2*(idq/8);
        const uint32_t qh = *(const uint32_t *) x->qh >> idq;
        const uint32_t w0 = ((q[0] >> sh) & 0x03030303u) | mmaq_spread4<2>(qh);
        const uint32_t w1 = ((q[1] >> sh) & 0x03030303u) | mmaq_spread4<2>(qh >> 4);
        mmaq_sym(w0, w1, x->d[idq / (QK3_KV/2)], 4.0f, out);
    } else if constexpr (type == GGML_TYPE_Q2_KV) {
        const block_q2_kv * x = (const block_q2_kv *) row + i0/QK2_KV;
        const uint32_t * q = (const uint32_t *) x->qs;
        const int sh = 2*((i0 % QK2_KV)/8);
        mmaq_asym((q[0] >> sh) & 0x03030303u, (q[1] >> sh) & 0x03030303u, x->dm, out);
    } else {
        static_assert(type == GGML_TYPE_COUNT, "fattn-mmaq: unsupported type");
    }
}

template <ggml_type type>
static constexpr bool mmaq_type_supported() {
    return type == GGML_TYPE_F16  || type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0 || type == GGML_TYPE_Q4_1 ||
           type == GGML_TYPE_Q5_0 || type == GGML_TYPE_Q5_1 || type == GGML_TYPE_Q3_KV || type == GGML_TYPE_Q2_KV;
}

static __device__ __forceinline__ void mmaq_mma(float * c, const uint32_t a0, const uint32_t a1, const uint32_t a2,
                                                const uint32_t a3, const uint32_t b0, const uint32_t b1) {
#ifdef AMPERE_MMA_AVAILABLE
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    GGML_UNUSED_VARS(c, a0, a1, a2, a3, b0, b1);
    NO_DEVICE_CODE;
#endif // AMPERE_MMA_AVAILABLE
}

static __device__ __forceinline__ uint32_t mmaq_transpose8x8(const uint32_t x) {
#ifdef TURING_MMA_AVAILABLE
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
#else
    GGML_UNUSED(x);
    NO_DEVICE_CODE;
    return 0;
#endif // TURING_MMA_AVAILABLE
}

// copies `nrows` rows of RB bytes (global stride `stride`, 4-byte aligned) into a packed shared tile, all
// lanes of a warp, in chunks of W bytes (W divides RB, the stride and the base address)
template <int RB, int W, int nrows>
static __device__ __forceinline__ void mmaq_stage_rows(char * __restrict__ dst, const char * __restrict__ src,
                                                       const int64_t stride, const int lane) {
#ifdef CP_ASYNC_AVAILABLE
    constexpr int nch = RB/W;
    const unsigned int d0 = (unsigned int) __cvta_generic_to_shared(dst);
#pragma unroll
    for (int i0 = 0; i0 < nrows*nch; i0 += WARP_SIZE) {
        const int i = i0 + lane;
        if (nrows*nch % WARP_SIZE == 0 || i < nrows*nch) {
            const int r  = i / nch;
            const int ch = i - r*nch;
            const char * s = src + stride*r + ch*W;
            const unsigned int d = d0 + r*RB + ch*W;
            if constexpr (W == 16) {
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" : : "r"(d), "l"(s));
            } else {
                asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" : : "r"(d), "l"(s), "n"(W));
            }
        }
    }
#else
    GGML_UNUSED_VARS(dst, src, stride, lane);
    NO_DEVICE_CODE;
#endif // CP_ASYNC_AVAILABLE
}

// the widest chunk (16, 8 or 4 bytes) that divides RB and the runtime strides/base: 0..2
template <int RB>
static __device__ __forceinline__ int mmaq_chunk_kind(const char * base, const int64_t stride) {
    const uint64_t a = uint64_t((uintptr_t) base) | uint64_t(stride);
    return (RB % 16 == 0 && a % 16 == 0) ? 2 : (RB % 8 == 0 && a % 8 == 0) ? 1 : 0;
}

template <int RB, int nrows>
static __device__ __forceinline__ void mmaq_stage(char * dst, const char * src, const int64_t stride, const int kind, const int lane) {
    if (kind == 2) {
        if constexpr (RB % 16 == 0) { mmaq_stage_rows<RB, 16, nrows>(dst, src, stride, lane); }
    } else if (kind == 1) {
        if constexpr (RB % 8 == 0)  { mmaq_stage_rows<RB,  8, nrows>(dst, src, stride, lane); }
    } else {
        mmaq_stage_rows<RB, 4, nrows>(dst, src, stride, lane);
    }
}

static __device__ __forceinline__ void mmaq_cp_async_commit() {
#ifdef CP_ASYNC_AVAILABLE
    asm volatile("cp.async.commit_group;");
#endif // CP_ASYNC_AVAILABLE
}

template <int n>
static __device__ __forceinline__ void mmaq_cp_async_wait() {
#ifdef CP_ASYNC_AVAILABLE
    asm volatile("cp.async.wait_group %0;" : : "n"(n));
#endif // CP_ASYNC_AVAILABLE
}

// ---------------------------------------------------------------------------------------------
// the kernel: grid as the vector kernel's with ncols1 = 1, ncols2 = 8 (launch_fattn<D, 1, 8>)

template <int D, ggml_type type_K, ggml_type type_V, int variant>
__launch_bounds__((mmaq_cfg<variant, D, fattn_mmaq_row_bytes(type_K, D) + fattn_mmaq_row_bytes(type_V, D)>::nw*WARP_SIZE),
                  (mmaq_cfg<variant, D, fattn_mmaq_row_bytes(type_K, D) + fattn_mmaq_row_bytes(type_V, D)>::minb))
static __global__ void flash_attn_ext_mmaq(
        const char * __restrict__ Q,
        const char * __restrict__ K,
        const char * __restrict__ V,
        const char * __restrict__ mask,
        const char * __restrict__ sinks,
        const int  * __restrict__ KV_max,
        float      * __restrict__ dst,
        float2     * __restrict__ dst_meta,
        const float scale,
        const float max_bias,
        const float m0,
        const float m1,
        const uint32_t n_head_log2,
        const float logit_softcap,
        const int32_t ne00, const uint3   ne01, const int32_t ne02, const int32_t ne03,
                            const int32_t nb01, const int32_t nb02, const int32_t nb03,
        const int32_t ne10, const int32_t ne11, const int32_t ne12, const int32_t ne13,
                            const int32_t nb11, const int32_t nb12, const int64_t nb13,
                            const int32_t nb21, const int32_t nb22, const int64_t nb23,
                            const int32_t ne31, const int32_t ne32, const int32_t ne33,
                            const int32_t nb31, const int32_t nb32, const int64_t nb33) {
    ggml_cuda_pdl_lc();
#if defined(FLASH_ATTN_AVAILABLE) && defined(AMPERE_MMA_AVAILABLE)
    constexpr int   RBK   = fattn_mmaq_row_bytes(type_K, D);
    constexpr int   RBV   = fattn_mmaq_row_bytes(type_V, D);
    using cfg = mmaq_cfg<variant, D, RBK + RBV>;
    constexpr int   nw    = cfg::nw;
    constexpr int   NS    = cfg::stages;
    constexpr int   T     = cfg::T;
    constexpr float LOG2E = 1.4426950408889634f;
    constexpr float LN2   = 0.6931471805599453f;
    static_assert(D % 64 == 0, "fattn-mmaq: D must be a multiple of 64");

    const int warp = threadIdx.y;
    const int lane = threadIdx.x;
    const int g    = lane >> 2; // MMA group: K row / Q head / V dim row
    const int c    = lane & 3;  // thread in group

    // block -> (sequence, KV head, group of up to 8 Q heads)
    const int gqa      = ne02 / ne12;
    const int ntz      = (gqa + 7) / 8;
    const int sequence = blockIdx.z / (ne12*ntz);
    const int rem      = blockIdx.z - sequence*(ne12*ntz);
    const int head_kv  = rem / ntz;
    const int sub      = rem - head_kv*ntz;
    const int head0    = head_kv*gqa + sub*8;
    const int ncols    = min(8, gqa - sub*8); // valid Q heads (columns) of this block
    const int ic0      = blockIdx.x;          // the token

    Q += int64_t(nb03)*sequence + int64_t(nb02)*head0 + int64_t(nb01)*ic0;
    K += nb13*sequence + int64_t(nb12)*head_kv;
    V += nb23*sequence + int64_t(nb22)*head_kv;
    const half * maskh = mask ? (const half *) (mask + nb33*(sequence % ne33) + int64_t(nb31)*ic0) : nullptr;

    ggml_cuda_pdl_sync();

    // Q^T as the B operand of S^T = K Q^T: k-tile kt, lane (g, c) holds head g, dims (D/4)c + 4kt + {0,1} and {2,3}
    uint32_t qf[D/16][2];
    {
        const float qs = scale*LOG2E;
        const float * Qg = (const float *) (Q + int64_t(nb02)*g);
#pragma unroll
        for (int kt = 0; kt < D/16; ++kt) {
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (g < ncols) {
                v = *(const float4 *) (Qg + (D/4)*c + 4*kt);
            }
            qf[kt][0] = mmaq_h2u(__floats2half2_rn(v.x*qs, v.y*qs));
            qf[kt][1] = mmaq_h2u(__floats2half2_rn(v.z*qs, v.w*qs));
        }
    }

    float M[2] = {-FLT_MAX/2.0f, -FLT_MAX/2.0f}; // running max of heads 2c, 2c+1 (log2 units)
    float L[2] = {0.0f, 0.0f};                   // this lane's part of their softmax sums
    // O^T, m-tile mt: {dim (D/8)g + 2mt: head 2c, head 2c+1; dim (D/8)g + 2mt + 1: head 2c, head 2c+1}
    float O[D/16][4];
#pragma unroll
    for (int mt = 0; mt < D/16; ++mt) {
        O[mt][0] = O[mt][1] = O[mt][2] = O[mt][3] = 0.0f;
    }

    const int k_max = KV_max ? KV_max[sequence*gridDim.x + blockIdx.x] : ne11;

    // each warp streams its own tiles of T positions through NS shared buffers: coalesced cp.async copies of
    // the raw rows, NS-1 tiles in flight while one is multiplied
    extern __shared__ char mmaq_smem[];
    constexpr int stage_bytes = T*(RBK + RBV);
    char * stage_base = mmaq_smem + warp*(NS*stage_bytes);
    const int kindK  = mmaq_chunk_kind<RBK>(K, nb11);
    const int kindV  = mmaq_chunk_kind<RBV>(V, nb21);
    const int k_step = gridDim.y*nw*T;
    const int kstart = (blockIdx.y*nw + warp)*T;
#pragma unroll
    for (int j = 0; j < NS - 1; ++j) {
        const int kj = kstart + j*k_step;
        if (kj < k_max) {
            mmaq_stage<RBK, T>(stage_base + j*stage_bytes,         K + int64_t(nb11)*kj, nb11, kindK, lane);
            mmaq_stage<RBV, T>(stage_base + j*stage_bytes + T*RBK, V + int64_t(nb21)*kj, nb21, kindV, lane);
        }
        mmaq_cp_async_commit();
    }

    int it = 0;
    for (int k0 = kstart; k0 < k_max; k0 += k_step, ++it) {
        {
            const int kn = k0 + (NS - 1)*k_step;
            char * next = stage_base + ((it + NS - 1) % NS)*stage_bytes;
            if (kn < k_max) {
                mmaq_stage<RBK, T>(next,         K + int64_t(nb11)*kn, nb11, kindK, lane);
                mmaq_stage<RBV, T>(next + T*RBK, V + int64_t(nb21)*kn, nb21, kindV, lane);
            }
            mmaq_cp_async_commit();
            mmaq_cp_async_wait<NS - 1>(); // this tile's copies, not the later ones'
            __syncwarp();
        }
        const char * Ks = stage_base + (it % NS)*stage_bytes;
        const char * Vs = Ks + T*RBK;

        float S[T/16][4];
#pragma unroll
        for (int m = 0; m < T/16; ++m) {
            S[m][0] = S[m][1] = S[m][2] = S[m][3] = 0.0f;
            const char * K0 = Ks + RBK*(16*m + g);
            const char * K8 = K0 + RBK*8;
#pragma unroll
            for (int kb = 0; kb < D/4; kb += 8) {
                half2 a0[4], a8[4];
                mmaq_dq8<type_K>(K0, (D/4)*c + kb, a0);
                mmaq_dq8<type_K>(K8, (D/4)*c + kb, a8);
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int kt = kb/4 + j;
                    mmaq_mma(S[m], mmaq_h2u(a0[2*j]), mmaq_h2u(a8[2*j]), mmaq_h2u(a0[2*j + 1]), mmaq_h2u(a8[2*j + 1]),
                             qf[kt][0], qf[kt][1]);
                }
            }
            if (maskh) {
                const float mg = __half2float(maskh[k0 + 16*m + g    ])*LOG2E;
                const float m8 = __half2float(maskh[k0 + 16*m + g + 8])*LOG2E;
                S[m][0] += mg; S[m][1] += mg;
                S[m][2] += m8; S[m][3] += m8;
            }
        }

        // online softmax per head column: the max over the tile's tokens (lanes with the same c)
        float mx0 = fmaxf(S[0][0], S[0][2]);
        float mx1 = fmaxf(S[0][1], S[0][3]);
#pragma unroll
        for (int m = 1; m < T/16; ++m) {
            mx0 = fmaxf(mx0, fmaxf(S[m][0], S[m][2]));
            mx1 = fmaxf(mx1, fmaxf(S[m][1], S[m][3]));
        }
#pragma unroll
        for (int off = 4; off < WARP_SIZE; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xFFFFFFFF, mx0, off, WARP_SIZE));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xFFFFFFFF, mx1, off, WARP_SIZE));
        }
        const float n0 = fmaxf(M[0], mx0);
        const float n1 = fmaxf(M[1], mx1);
        const float r0 = exp2f(M[0] - n0);
        const float r1 = exp2f(M[1] - n1);
        M[0] = n0;
        M[1] = n1;
        L[0] *= r0;
        L[1] *= r1;
#pragma unroll
        for (int mt = 0; mt < D/16; ++mt) {
            O[mt][0] *= r0; O[mt][1] *= r1; O[mt][2] *= r0; O[mt][3] *= r1;
        }

#pragma unroll
        for (int m = 0; m < T/16; ++m) {
            S[m][0] = exp2f(S[m][0] - n0);
            S[m][1] = exp2f(S[m][1] - n1);
            S[m][2] = exp2f(S[m][2] - n0);
            S[m][3] = exp2f(S[m][3] - n1);
            L[0] += S[m][0] + S[m][2];
            L[1] += S[m][1] + S[m][3];

            // P^T (16 tokens x 8 heads) as the B operand: lane (g, c) needs tokens 2c, 2c+1 (+8) of head g
            const uint32_t b0 = mmaq_transpose8x8(mmaq_h2u(__floats2half2_rn(S[m][0], S[m][1])));
            const uint32_t b1 = mmaq_transpose8x8(mmaq_h2u(__floats2half2_rn(S[m][2], S[m][3])));

            // V^T (dims x 16 tokens): lane (g, c) reads dims (D/8)g .. of tokens 2c, 2c+1, 2c+8, 2c+9
            const char * V0 = Vs + RBV*(16*m + 2*c);
            const char * V1 = V0 + RBV;
            const char * V8 = V0 + RBV*8;
            const char * V9 = V8 + RBV;
#pragma unroll
            for (int vb = 0; vb < D/8; vb += 8) {
                half2 v0[4], v1[4], v8[4], v9[4];
                mmaq_dq8<type_V>(V0, (D/8)*g + vb, v0);
                mmaq_dq8<type_V>(V1, (D/8)*g + vb, v1);
                mmaq_dq8<type_V>(V8, (D/8)*g + vb, v8);
                mmaq_dq8<type_V>(V9, (D/8)*g + vb, v9);
#pragma unroll
                for (int l = 0; l < 4; ++l) {
                    const int mt = vb/2 + l;
                    mmaq_mma(O[mt], mmaq_h2u(__lows2half2(v0[l], v1[l])), mmaq_h2u(__highs2half2(v0[l], v1[l])),
                                    mmaq_h2u(__lows2half2(v8[l], v9[l])), mmaq_h2u(__highs2half2(v8[l], v9[l])), b0, b1);
                }
            }
        }
        __syncwarp(); // every lane is done with this buffer before it is refilled
    }
    mmaq_cp_async_wait<0>();

    // the lanes' parts of the softmax sums
#pragma unroll
    for (int off = 4; off < WARP_SIZE; off <<= 1) {
        L[0] += __shfl_xor_sync(0xFFFFFFFF, L[0], off, WARP_SIZE);
        L[1] += __shfl_xor_sync(0xFFFFFFFF, L[1], off, WARP_SIZE);
    }

    // combine the warps of the block
    __shared__ float sM[nw][8];
    __shared__ float sL[nw][8];
    float (*sO)[8][D] = (float (*)[8][D]) mmaq_smem; // the staging buffers, free once every warp is done
    __syncthreads();
    if (g == 0) {
        sM[warp][2*c] = M[0]; sM[warp][2*c + 1] = M[1];
        sL[warp][2*c] = L[0]; sL[warp][2*c + 1] = L[1];
    }
#pragma unroll
    for (int mt = 0; mt < D/16; ++mt) {
        const int d = (D/8)*g + 2*mt;
        sO[warp][2*c    ][d    ] = O[mt][0];
        sO[warp][2*c + 1][d    ] = O[mt][1];
        sO[warp][2*c    ][d + 1] = O[mt][2];
        sO[warp][2*c + 1][d + 1] = O[mt][3];
    }
    __syncthreads();

    const int tid = warp*WARP_SIZE + lane;
    for (int idx = tid; idx < 8*D; idx += nw*WARP_SIZE) {
        const int h = idx / D;
        const int d = idx % D;
        if (h >= ncols) {
            break; // idx grows with h
        }
        float mmax = sM[0][h];
#pragma unroll
        for (int w = 1; w < nw; ++w) {
            mmax = fmaxf(mmax, sM[w][h]);
        }
        float sink = -FLT_MAX/2.0f;
        if (sinks && blockIdx.y == 0) {
            sink  = ((const float *) sinks)[head0 + h]*LOG2E;
            mmax  = fmaxf(mmax, sink);
        }
        float num = 0.0f;
        float den = 0.0f;
#pragma unroll
        for (int w = 0; w < nw; ++w) {
            const float f = exp2f(sM[w][h] - mmax);
            num += f*sO[w][h][d];
            den += f*sL[w][h];
        }
        if (sinks && blockIdx.y == 0) {
            den += exp2f(sink - mmax);
        }
        const int64_t j_dst = (int64_t(sequence)*int(ne01.z) + ic0)*ne02 + head0 + h;
        if (gridDim.y == 1) {
            dst[j_dst*D + d] = num/den;
        } else {
            dst[(j_dst*gridDim.y + blockIdx.y)*D + d] = num;
            if (d == 0) {
                dst_meta[j_dst*gridDim.y + blockIdx.y] = make_float2(mmax*LN2, den);
            }
        }
    }
#else
    GGML_UNUSED_VARS(Q, K, V, mask, sinks, KV_max, dst, dst_meta, scale,
        max_bias, m0, m1, n_head_log2, logit_softcap,
        ne00, ne01, ne02, ne03,
              nb01, nb02, nb03,
        ne10, ne11, ne12, ne13,
              nb11, nb12, nb13,
              nb21, nb22, nb23,
              ne31, ne32, ne33,
              nb31, nb32, nb33);
    NO_DEVICE_CODE;
#endif // defined(FLASH_ATTN_AVAILABLE) && defined(AMPERE_MMA_AVAILABLE)
}

template <int D, ggml_type type_K, ggml_type type_V, int variant>
static void ggml_cuda_flash_attn_ext_mmaq_launch(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    using cfg = mmaq_cfg<variant, D, fattn_mmaq_row_bytes(type_K, D) + fattn_mmaq_row_bytes(type_V, D)>;
    constexpr int    nbatch = cfg::nw*cfg::T; // KV positions per block and iteration
    constexpr size_t nbytes = fattn_mmaq_smem_bytes<variant, D, type_K, type_V>();
    const int id = ggml_cuda_get_device();
    static bool smem_limit_set[GGML_CUDA_MAX_DEVICES] = {false};
    if (!smem_limit_set[id]) {
        CUDA_CHECK(cudaFuncSetAttribute(flash_attn_ext_mmaq<D, type_K, type_V, variant>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, nbytes));
        smem_limit_set[id] = true;
    }
    launch_fattn<D, 1, 8>(ctx, dst, flash_attn_ext_mmaq<D, type_K, type_V, variant>, cfg::nw, nbytes, nbatch,
                          false, false, false, false);
}

#ifndef FATTN_MMAQ_WITH_VARIANTS
#define FATTN_MMAQ_WITH_VARIANTS 0
#endif

template <int D, ggml_type type_K, ggml_type type_V>
static void ggml_cuda_flash_attn_ext_mmaq_case(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
#if FATTN_MMAQ_WITH_VARIANTS
    // measuring builds only (-DFATTN_MMAQ_WITH_VARIANTS=1): the other configurations at head size 128
    if constexpr (D == 128) {
        switch (ggml_cuda_fattn_mmaq_variant()) {
            case 1: ggml_cuda_flash_attn_ext_mmaq_launch<D, type_K, type_V, 1>(ctx, dst); return;
            case 2: ggml_cuda_flash_attn_ext_mmaq_launch<D, type_K, type_V, 2>(ctx, dst); return;
            case 3: ggml_cuda_flash_attn_ext_mmaq_launch<D, type_K, type_V, 3>(ctx, dst); return;
            case 4: ggml_cuda_flash_attn_ext_mmaq_launch<D, type_K, type_V, 4>(ctx, dst); return;
            default: break;
        }
    }
#endif // FATTN_MMAQ_WITH_VARIANTS
    ggml_cuda_flash_attn_ext_mmaq_launch<D, type_K, type_V, 0>(ctx, dst);
}

// the compiled (K, V) pairs of head size D: the same list as the vector kernel's (GGML_CUDA_FA_QUANTS);
// a template, so that the pairs left out are not instantiated
template <int D, ggml_type type_K, ggml_type type_V, bool compiled>
static constexpr fattn_mmaq_case_t ggml_cuda_fattn_mmaq_case_ptr() {
    if constexpr (compiled && mmaq_type_supported<type_K>() && mmaq_type_supported<type_V>() &&
                  !(type_K == GGML_TYPE_F16 && type_V == GGML_TYPE_F16)) { // f16/f16 keeps llama.cpp's own kernels
        return ggml_cuda_flash_attn_ext_mmaq_case<D, type_K, type_V>;
    } else {
        return nullptr;
    }
}

#define FATTN_MMAQ_CASE(D, tK, tV)                                                                             \
    if (type_K == GGML_TYPE_##tK && type_V == GGML_TYPE_##tV) {                                                 \
        return ggml_cuda_fattn_mmaq_case_ptr<D, GGML_TYPE_##tK, GGML_TYPE_##tV, GGML_CUDA_FA_##tK##_##tV>();    \
    }

#define FATTN_MMAQ_CASES_K(D, tK)  \
    FATTN_MMAQ_CASE(D, tK, F16)    \
    FATTN_MMAQ_CASE(D, tK, Q8_0)   \
    FATTN_MMAQ_CASE(D, tK, Q5_1)   \
    FATTN_MMAQ_CASE(D, tK, Q5_0)   \
    FATTN_MMAQ_CASE(D, tK, Q4_1)   \
    FATTN_MMAQ_CASE(D, tK, Q4_0)   \
    FATTN_MMAQ_CASE(D, tK, Q3_KV)  \
    FATTN_MMAQ_CASE(D, tK, Q2_KV)

#define FATTN_MMAQ_GET_CASE(D)                                                                  \
fattn_mmaq_case_t ggml_cuda_fattn_mmaq_get_case_d##D(ggml_type type_K, ggml_type type_V) {     \
    FATTN_MMAQ_CASES_K(D, F16)                                                                  \
    FATTN_MMAQ_CASES_K(D, Q8_0)                                                                 \
    FATTN_MMAQ_CASES_K(D, Q5_1)                                                                 \
    FATTN_MMAQ_CASES_K(D, Q5_0)                                                                 \
    FATTN_MMAQ_CASES_K(D, Q4_1)                                                                 \
    FATTN_MMAQ_CASES_K(D, Q4_0)                                                                 \
    FATTN_MMAQ_CASES_K(D, Q3_KV)                                                                \
    FATTN_MMAQ_CASES_K(D, Q2_KV)                                                                \
    return nullptr;                                                                             \
}
