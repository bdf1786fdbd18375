#include "ggml.h"
#include "ggml-cpu.h"
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <random>
// FA op on the CPU: q [D, N, H], k/v [D, KV, HKV] quantized from random floats, causal-like mask; prints output
int main(int argc, char ** argv) {
    const int D = 64, N = atoi(argv[1]), H = 3, HKV = 1, KV = 256;
    const int valid = atoi(argv[2]);
    ggml_cpu_init();
    ggml_init_params ip = { 256u << 20, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, N, H);
    ggml_tensor * kf = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, KV, HKV);
    ggml_tensor * vf = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, KV, HKV);
    ggml_tensor * k = ggml_new_tensor_3d(ctx, GGML_TYPE_Q8_0, D, KV, HKV);
    ggml_tensor * v = ggml_new_tensor_3d(ctx, GGML_TYPE_Q8_0, D, KV, HKV);
    ggml_tensor * m = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, KV, N);
    std::mt19937 rng(1); std::normal_distribution<float> nd(0, 1);
    for (int i = 0; i < D*N*H; ++i) ((float *) q->data)[i] = nd(rng);
    for (int i = 0; i < D*KV*HKV; ++i) { ((float *) kf->data)[i] = nd(rng); ((float *) vf->data)[i] = nd(rng); }
    ggml_fp16_t * mp = (ggml_fp16_t *) m->data;
    for (int r = 0; r < m->ne[1]; ++r) for (int c = 0; c < KV; ++c) mp[r*KV + c] = ggml_fp32_to_fp16(c < valid + r ? 0.0f : -INFINITY);
    ggml_tensor * kc = ggml_cpy(ctx, kf, k);
    ggml_tensor * vc = ggml_cpy(ctx, vf, v);
    ggml_cgraph * g0 = ggml_new_graph(ctx);
    ggml_build_forward_expand(g0, kc); ggml_build_forward_expand(g0, vc);
    ggml_graph_compute_with_ctx(ctx, g0, 1);
    ggml_tensor * o = ggml_flash_attn_ext(ctx, q, kc, vc, m, 0.125f, 0.0f, 0.0f);
    ggml_cgraph * g = ggml_new_graph(ctx);
    ggml_build_forward_expand(g, o);
    ggml_graph_compute_with_ctx(ctx, g, 1);
    // reference in double from the dequantized k/v
    std::vector<float> kd(D*KV), vd(D*KV);
    ggml_get_type_traits(GGML_TYPE_Q8_0)->to_float(k->data, kd.data(), D*KV);
    ggml_get_type_traits(GGML_TYPE_Q8_0)->to_float(v->data, vd.data(), D*KV);
    double maxerr = 0;
    for (int h = 0; h < H; ++h) for (int n = 0; n < N; ++n) {
        std::vector<double> s(KV); double mx = -1e300;
        int nv = valid + n;
        for (int c = 0; c < nv; ++c) { double a = 0; for (int d = 0; d < D; ++d) a += (double) ((float*) q->data)[(h*N + n)*D + d] * kd[c*D + d]; s[c] = a*0.125; mx = std::max(mx, s[c]); }
        double S = 0; std::vector<double> out(D, 0);
        for (int c = 0; c < nv; ++c) { double w = exp(s[c] - mx); S += w; for (int d = 0; d < D; ++d) out[d] += w*vd[c*D + d]; }
        for (int d = 0; d < D; ++d) {
            // o: [D, H, N] (permuted)
            const float got = ((float *) o->data)[(n*H + h)*D + d];
            maxerr = std::max(maxerr, std::fabs(got - out[d]/S));
        }
    }
    { FILE * f = fopen(argv[3], "wb"); fwrite(o->data, sizeof(float), (size_t) D*H*N, f); fclose(f); }
    printf("N %d valid %d max err vs double reference %.3g\n", N, valid, maxerr);
    return 0;
}
