// kvtuner-edge: the CPU flash-attention op with quantized and mixed K/V against the stock one-row kernel
// (the graph plan's use_ref) and against attention in double from the dequantized K/V. Cases cover GQA
// groups (1-16 Q heads per KV head, so sub-groups too), head sizes 64/128, 1-32 query rows, positions in
// partial chunks and past 512 (one query row: the positions split over the threads), masked rows and
// chunks, masks per head (every third case, one per Q head or two alternating: each mask row sees a
// prefix of another length), ALiBi,
// logit softcap and sinks. One line of JSON per case on stdout:
//   {"case": ..., "diff": max |op - stock|, "ref": max |stock|, "err_op": max |op - double|, "err_stock": ...}
// Build: g++ -O2 -std=c++17 -I$SRC/ggml/include cpu_fa_check.cpp -L$LIB -lggml -lggml-base -lggml-cpu
#include "ggml.h"
#include "ggml-cpu.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static ggml_type type_by_name(const char * name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * n = ggml_type_name((ggml_type) t);
        if (n && strcmp(n, name) == 0 && ggml_get_type_traits((ggml_type) t)->blck_size > 0) {
            return (ggml_type) t;
        }
    }
    fprintf(stderr, "unknown type %s\n", name);
    exit(2);
}

static std::vector<float> compute(ggml_context * ctx, ggml_tensor * out, int n_threads, bool use_ref) {
    ggml_cgraph * g = ggml_new_graph(ctx);
    ggml_build_forward_expand(g, out);
    ggml_cplan plan = ggml_graph_plan(g, n_threads, nullptr);
    std::vector<uint8_t> work(plan.work_size + 64);
    plan.work_data = work.data();
    plan.use_ref   = use_ref;
    if (ggml_graph_compute(g, &plan) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "compute failed\n");
        exit(3);
    }
    const float * o = (const float *) out->data;
    return std::vector<float>(o, o + ggml_nelements(out));
}

struct Case {
    const char * tk; const char * tv;
    int D, H, HKV, N, KV;
    float softcap, max_bias;
    bool sinks;
};

int main(int argc, char ** argv) {
    const int n_threads = argc > 1 ? atoi(argv[1]) : 2;
    std::vector<Case> cases;
    const char * pairs[][2] = { {"q8_0", "q8_0"}, {"q4_0", "q3_kv"}, {"f16", "q4_0"}, {"q3_kv", "q2_kv"},
                                {"q5_1", "iq4_nl"}, {"q4_1", "q5_0"}, {"q8_0", "q5_1"}, {"q2_kv", "q4_1"},
                                {"q5_0", "q8_0"}, {"iq4_nl", "q4_0"} };
    const int heads[][2] = { {3, 1}, {4, 2}, {16, 1}, {12, 2}, {6, 2} };
    int i = 0;
    for (auto & p : pairs) {
        for (auto & h : heads) {
            for (int N : {1, 4, 32}) {
                for (int KV : {100, 700}) {
                    const int D = (i % 3 == 2) ? 128 : 64;
                    const float softcap  = (i % 5 == 3) ? 30.0f : 0.0f;
                    const float max_bias = (i % 7 == 4) ? 8.0f : 0.0f;
                    const bool  sinks    = (i % 4 == 1);
                    cases.push_back({p[0], p[1], D, h[0], h[1], N, KV, softcap, max_bias, sinks});
                    ++i;
                }
            }
        }
    }
    ggml_cpu_init();
    for (size_t ci = 0; ci < cases.size(); ++ci) {
        const Case & c = cases[ci];
        ggml_init_params ip = { (size_t) 512 << 20, nullptr, false };
        ggml_context * ctx = ggml_init(ip);
        const ggml_type tk = type_by_name(c.tk), tv = type_by_name(c.tv);
        ggml_tensor * q  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, c.D, c.N, c.H);
        ggml_tensor * kf = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, c.D, c.KV, c.HKV);
        ggml_tensor * vf = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, c.D, c.KV, c.HKV);
        ggml_tensor * k  = ggml_new_tensor_3d(ctx, tk, c.D, c.KV, c.HKV);
        ggml_tensor * v  = ggml_new_tensor_3d(ctx, tv, c.D, c.KV, c.HKV);
        // mask heads: one (broadcast), or per Q head, or two (so a group of 3 heads reads rows 0, 1, 0)
        const int MH = ci % 3 != 1 ? 1 : c.H % 2 == 0 ? 2 : c.H;
        ggml_tensor * m  = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, c.KV, c.N, MH);
        ggml_tensor * sk = c.sinks ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, c.H) : nullptr;
        std::mt19937 rng(1234 + ci);
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (int j = 0; j < c.D*c.N*c.H; ++j) ((float *) q->data)[j] = 2.0f*nd(rng);
        std::vector<float> off(c.D);
        for (auto & o : off) o = nd(rng);          // a per-channel offset in K, as K projections with a bias have
        for (int j = 0; j < c.D*c.KV*c.HKV; ++j) {
            ((float *) kf->data)[j] = nd(rng) + off[j % c.D];
            ((float *) vf->data)[j] = nd(rng);
        }
        if (sk) for (int j = 0; j < c.H; ++j) ((float *) sk->data)[j] = nd(rng);
        // each row sees a prefix of its own length; row 0 of a multi-row case sees none past 40 (whole
        // masked chunks), one row of four cases nothing at all (an empty row: output 0)
        ggml_fp16_t * mp = (ggml_fp16_t *) m->data;
        for (int mh = 0; mh < MH; ++mh) {
            for (int r = 0; r < c.N; ++r) {
                int valid = (c.N > 1 && r == 0) ? 40 : c.KV - (c.N - 1 - r)*3 - 7*mh;
                if (ci % 4 == 2 && c.N > 1 && r == 1) valid = 0;
                for (int col = 0; col < c.KV; ++col) {
                    // masked positions -inf, every fifth of the visible ones gets a finite bias
                    const float mv = col < valid ? (col % 5 == 0 ? -1.5f : 0.0f) : -INFINITY;
                    mp[(mh*c.N + r)*c.KV + col] = ggml_fp32_to_fp16(mv);
                }
            }
        }
        // K and V quantized once (the op's graph below reads them as leaves)
        ggml_tensor * kc = ggml_cpy(ctx, kf, k);
        ggml_tensor * vc = ggml_cpy(ctx, vf, v);
        {
            ggml_cgraph * g0 = ggml_new_graph(ctx);
            ggml_build_forward_expand(g0, kc);
            ggml_build_forward_expand(g0, vc);
            ggml_graph_compute_with_ctx(ctx, g0, n_threads);
        }
        const float scale = 1.0f/sqrtf((float) c.D);
        ggml_tensor * o = ggml_flash_attn_ext(ctx, q, k, v, m, scale, c.max_bias, c.softcap);
        ggml_flash_attn_ext_add_sinks(o, sk);
        const std::vector<float> got = compute(ctx, o, n_threads, false);
        const std::vector<float> ref = compute(ctx, o, n_threads, true);

        // attention in double from the dequantized rows (Q as float: both kernels round Q to K's vec_dot type)
        std::vector<float> kd(c.D*c.KV*c.HKV), vd(c.D*c.KV*c.HKV);
        if (tk == GGML_TYPE_F16) {
            for (size_t j = 0; j < kd.size(); ++j) kd[j] = ggml_fp16_to_fp32(((ggml_fp16_t *) k->data)[j]);
        } else {
            ggml_get_type_traits(tk)->to_float(k->data, kd.data(), kd.size());
        }
        ggml_get_type_traits(tv)->to_float(v->data, vd.data(), vd.size());
        const int n_head_log2 = 1 << (int) floor(log2(c.H));
        const double m0 = pow(2.0, -c.max_bias/n_head_log2), m1 = pow(2.0, -(c.max_bias/2.0)/n_head_log2);
        double diff = 0, mref = 0, err_op = 0, err_stock = 0;
        for (int h = 0; h < c.H; ++h) {
            const int hk = h / (c.H / c.HKV);
            const double slope = c.max_bias > 0 ? (h < n_head_log2 ? pow(m0, h + 1) : pow(m1, 2*(h - n_head_log2) + 1)) : 1.0;
            for (int r = 0; r < c.N; ++r) {
                std::vector<double> s(c.KV, -INFINITY);
                double mx = -INFINITY;
                for (int col = 0; col < c.KV; ++col) {
                    const float mv = ggml_fp16_to_fp32(mp[((h % MH)*c.N + r)*c.KV + col]);
                    if (mv == -INFINITY) continue;
                    double a = 0;
                    for (int d = 0; d < c.D; ++d) a += (double) ((float *) q->data)[(h*c.N + r)*c.D + d]*kd[(hk*c.KV + col)*c.D + d];
                    a *= scale;
                    if (c.softcap != 0) a = c.softcap*tanh(a/c.softcap);
                    s[col] = a + slope*mv;
                    mx = std::max(mx, s[col]);
                }
                if (sk) mx = std::max(mx, (double) ((float *) sk->data)[h]);
                double S = 0;
                std::vector<double> acc(c.D, 0.0);
                for (int col = 0; col < c.KV; ++col) {
                    if (s[col] == -INFINITY) continue;
                    const double w = exp(s[col] - mx);
                    S += w;
                    for (int d = 0; d < c.D; ++d) acc[d] += w*vd[(hk*c.KV + col)*c.D + d];
                }
                if (sk) S += exp(((float *) sk->data)[h] - mx);
                for (int d = 0; d < c.D; ++d) {
                    const size_t idx = ((size_t) r*c.H + h)*c.D + d;   // output [D, H, N]
                    const double exact = S > 0 ? acc[d]/S : 0.0;
                    diff      = std::max(diff, (double) fabsf(got[idx] - ref[idx]));
                    mref      = std::max(mref, (double) fabsf(ref[idx]));
                    err_op    = std::max(err_op, fabs(got[idx] - exact));
                    err_stock = std::max(err_stock, fabs(ref[idx] - exact));
                    if (!std::isfinite(got[idx])) err_op = INFINITY;
                }
            }
        }
        printf("{\"case\": \"%s/%s D=%d H=%d/%d N=%d KV=%d softcap=%g alibi=%g sinks=%d\", \"diff\": %.3g, \"ref\": %.4g, \"err_op\": %.3g, \"err_stock\": %.3g}\n",
               c.tk, c.tv, c.D, c.H, c.HKV, c.N, c.KV, c.softcap, c.max_bias, (int) c.sinks, diff, mref, err_op, err_stock);
        fflush(stdout);
        ggml_free(ctx);
    }
    return 0;
}
