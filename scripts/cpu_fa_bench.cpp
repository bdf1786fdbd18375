// kvtuner-edge: time the CPU flash-attention op alone, the kernel the engine picks against the stock
// one-row kernel (the graph plan's use_ref) in one process, alternated, best and median of many runs (the
// machine is shared: the best is the steadiest figure). Decode shapes: one or a few query rows over a
// deep cache, each K/V type pair given, f16/f16 (the stock split kernel) for scale. LAYERS ops on their own
// K/V in one graph, as a model's layers are, so a cache larger than the CPU's caches streams from memory
// as in the engine; times are per op.
//   cpu_fa_bench THREADS D H HKV N_ROWS KV LAYERS REPS TK/TV [TK/TV ...]
// Build: g++ -O2 -std=c++17 -I$SRC/ggml/include cpu_fa_bench.cpp -L$LIB -lggml -lggml-base -lggml-cpu
#include "ggml.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static ggml_type type_by_name(const std::string & name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * n = ggml_type_name((ggml_type) t);
        if (n && name == n && ggml_get_type_traits((ggml_type) t)->blck_size > 0) {
            return (ggml_type) t;
        }
    }
    fprintf(stderr, "unknown type %s\n", name.c_str());
    exit(2);
}

int main(int argc, char ** argv) {
    if (argc < 10) {
        fprintf(stderr, "usage: %s THREADS D H HKV N_ROWS KV LAYERS REPS TK/TV [TK/TV ...]\n", argv[0]);
        return 2;
    }
    const int nt = atoi(argv[1]), D = atoi(argv[2]), H = atoi(argv[3]), HKV = atoi(argv[4]);
    const int N = atoi(argv[5]), KV = atoi(argv[6]), L = atoi(argv[7]), reps = atoi(argv[8]);
    ggml_cpu_init();
    for (int a = 9; a < argc; ++a) {
        const std::string pair = argv[a];
        const size_t sl = pair.find('/');
        const ggml_type tk = type_by_name(pair.substr(0, sl)), tv = type_by_name(pair.substr(sl + 1));
        const size_t per_layer = 2*(ggml_row_size(GGML_TYPE_F32, D) + ggml_row_size(tk, D) + ggml_row_size(tv, D))*KV*HKV;
        ggml_init_params ip = { (size_t) L*per_layer + ((size_t) 64 << 20), nullptr, false };
        ggml_context * ctx = ggml_init(ip);
        ggml_tensor * q  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, N, H);
        ggml_tensor * m  = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, KV, N);
        std::mt19937 rng(7);
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (int j = 0; j < D*N*H; ++j) ((float *) q->data)[j] = nd(rng);
        for (int j = 0; j < KV*N; ++j) ((ggml_fp16_t *) m->data)[j] = ggml_fp32_to_fp16(0.0f);
        ggml_cgraph * g = ggml_new_graph(ctx);
        for (int l = 0; l < L; ++l) {
            ggml_tensor * kf = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, KV, HKV);
            ggml_tensor * vf = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, KV, HKV);
            ggml_tensor * k  = ggml_new_tensor_3d(ctx, tk, D, KV, HKV);
            ggml_tensor * v  = ggml_new_tensor_3d(ctx, tv, D, KV, HKV);
            for (int j = 0; j < D*KV*HKV; ++j) { ((float *) kf->data)[j] = nd(rng); ((float *) vf->data)[j] = nd(rng); }
            // K and V quantized once (the timed graph reads them as leaves)
            ggml_cgraph * g0 = ggml_new_graph(ctx);
            ggml_build_forward_expand(g0, ggml_cpy(ctx, kf, k));
            ggml_build_forward_expand(g0, ggml_cpy(ctx, vf, v));
            ggml_graph_compute_with_ctx(ctx, g0, nt);
            ggml_build_forward_expand(g, ggml_flash_attn_ext(ctx, q, k, v, m, 1.0f/sqrtf((float) D), 0.0f, 0.0f));
        }
        ggml_cplan plan = ggml_graph_plan(g, nt, nullptr);
        std::vector<uint8_t> work(plan.work_size + 64);
        plan.work_data = work.data();
        std::vector<double> t[2];
        for (int r = 0; r < 2*reps + 4; ++r) {
            const int which = r % 2;      // 0: the engine's pick, 1: the stock one-row kernel
            plan.use_ref = which == 1;
            const auto t0 = std::chrono::steady_clock::now();
            ggml_graph_compute(g, &plan);
            const auto t1 = std::chrono::steady_clock::now();
            if (r >= 4) t[which].push_back(std::chrono::duration<double, std::micro>(t1 - t0).count()/L);
        }
        for (auto & x : t) std::sort(x.begin(), x.end());
        printf("%-14s D=%d H=%d/%d N=%d KV=%d layers=%d threads=%d: op best %8.1f us median %8.1f | stock one-row best %8.1f median %8.1f | %.2fx\n",
               pair.c_str(), D, H, HKV, N, KV, L, nt, t[0][0], t[0][t[0].size()/2], t[1][0], t[1][t[1].size()/2], t[1][0]/t[0][0]);
        fflush(stdout);
        ggml_free(ctx);
    }
    return 0;
}
