// The CUDA cache-write quantizers (SET_ROWS into q3_kv / q2_kv / the other cache types) against the CPU
// backend, byte for byte: test-backend-ops only bounds their error, but the engine's CUDA and CPU
// caches are meant to hold the same bytes (patch 0005's ports are bit-exact; patch 0008 spreads the
// q3_kv/q2_kv searches over a warp and must keep them so).
//
// Data: per row a different scale (1e-4 .. 1e4), Gaussian values, and rows made to hit the searches'
// corner cases: all zeros, one nonzero value, constant rows, ties (repeated values), one outlier,
// inf, -inf and NaN entries. No subnormals (CUDA flushes them; the C code keeps them).
//
//   g++ -O1 -std=c++17 -Iggml/include scripts/cuda_kvquant_exact.cpp -Llib -lggml -lggml-base -o cuda_kvquant_exact
//   ./cuda_kvquant_exact [type ...]      (default: q3_kv q2_kv q8_0 q4_0 q4_1 q5_0 q5_1)
// Also against CUDA's CPY of the same rows, which keeps the serial per-thread quantizers, for every
// type: patch 0008's warp-per-block SET_ROWS kernels must reproduce them exactly.
// Exit status 1 when a q3_kv or q2_kv block differs from the CPU's, or any block from CPY's. ggml's
// own CUDA quantizers of its types are not bit-exact ports of the CPU ones (rounding, NaN handling),
// so for those the count of blocks that differ from the CPU is only printed.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

// SET_ROWS (use_cpy = false) or CPY (the serial per-thread quantizers) of x into a tensor of type
static std::vector<uint8_t> run(ggml_backend_t be, ggml_type type, const std::vector<float> & x,
                                const std::vector<int64_t> & idx, int64_t ne0, int64_t nrows, bool use_cpy = false) {
    ggml_init_params ip = { 8 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * src = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, nrows);
    ggml_tensor * ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, nrows);
    ggml_tensor * dst = ggml_new_tensor_2d(ctx, type, ne0, nrows);
    ggml_tensor * out = use_cpy ? ggml_cpy(ctx, src, dst) : ggml_set_rows(ctx, dst, src, ids);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, be);
    ggml_backend_tensor_set(src, x.data(), 0, ggml_nbytes(src));
    ggml_backend_tensor_set(ids, idx.data(), 0, ggml_nbytes(ids));
    std::vector<uint8_t> zero(ggml_nbytes(dst), 0xA5);
    ggml_backend_tensor_set(dst, zero.data(), 0, zero.size());
    if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph_compute failed on %s\n", ggml_backend_name(be));
        exit(2);
    }
    std::vector<uint8_t> res(ggml_nbytes(dst));
    ggml_backend_tensor_get(dst, res.data(), 0, res.size());
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return res;
}

int main(int argc, char ** argv) {
    std::vector<std::string> names;
    for (int i = 1; i < argc; ++i) names.push_back(argv[i]);
    if (names.empty()) names = { "q3_kv", "q2_kv", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1" };

    ggml_backend_load_all();
    ggml_backend_t cpu  = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    ggml_backend_t cuda = ggml_backend_init_by_name("CUDA0", nullptr);
    if (!cpu || !cuda) {
        fprintf(stderr, "need the CPU and CUDA0 backends\n");
        return 2;
    }
    const int64_t ne0 = 128, nrows = 8192;
    std::mt19937 rng(1234);
    std::normal_distribution<float> gauss(0.0f, 1.0f);
    std::vector<float> x(ne0 * nrows);
    for (int64_t r = 0; r < nrows; ++r) {
        float * row = x.data() + r * ne0;
        const float scale = std::pow(10.0f, -4.0f + 8.0f * float(r % 97) / 96.0f);
        for (int64_t j = 0; j < ne0; ++j) row[j] = scale * gauss(rng);
        switch (r % 16) {
            case 1: for (int64_t j = 0; j < ne0; ++j) row[j] = 0.0f; break;
            case 2: for (int64_t j = 0; j < ne0; ++j) row[j] = (j % 32 == 5) ? scale : 0.0f; break;
            case 3: for (int64_t j = 0; j < ne0; ++j) row[j] = -scale; break;
            case 4: for (int64_t j = 0; j < ne0; ++j) row[j] = scale * float(int(j % 5) - 2); break;
            case 5: row[rng() % ne0] = 1000.0f * scale; break;
            case 6: row[rng() % ne0] = INFINITY; break;
            case 7: row[rng() % ne0] = -INFINITY; break;
            case 8: row[rng() % ne0] = NAN; break;
            case 9: for (int64_t j = 0; j < ne0; ++j) row[j] = std::round(row[j] / scale * 2.0f) * scale; break;
            case 10: for (int64_t j = 0; j < ne0; ++j) row[j] = 1.0f + 1e-3f * row[j] / scale; break;
            case 11: for (int64_t j = 0; j < ne0; ++j) row[j] = (rng() & 1) ? -0.0f : 0.0f; break;   // signed zeros
            case 12: for (int64_t j = 0; j < ne0; ++j) row[j] = (rng() & 1) ? -scale : scale; break; // +-max ties
            case 13: for (int64_t j = 0; j < ne0; ++j) row[j] = (j % 7 == 0) ? ((rng() & 1) ? -0.0f : 0.0f) : std::fabs(row[j]); break;
            default: break;
        }
    }
    std::vector<int64_t> idx(nrows);
    for (int64_t r = 0; r < nrows; ++r) idx[r] = (r * 7919) % nrows; // a permutation: scattered rows

    int bad_types = 0;
    for (const std::string & n : names) {
        ggml_type type = GGML_TYPE_COUNT;
        for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
            const char * tn = ggml_type_name((ggml_type) t);
            if (tn && n == tn) type = (ggml_type) t;
        }
        if (type == GGML_TYPE_COUNT) {
            fprintf(stderr, "unknown type %s\n", n.c_str());
            return 2;
        }
        const std::vector<uint8_t> a = run(cpu, type, x, idx, ne0, nrows);
        const std::vector<uint8_t> b = run(cuda, type, x, idx, ne0, nrows);
        const size_t bs = ggml_type_size(type);
        size_t nblocks = a.size() / bs, ndiff = 0, first = SIZE_MAX;
        for (size_t i = 0; i < nblocks; ++i) {
            if (memcmp(a.data() + i * bs, b.data() + i * bs, bs) != 0) {
                if (first == SIZE_MAX) first = i;
                ++ndiff;
            }
        }
        printf("%-6s %zu blocks, %zu differ", n.c_str(), nblocks, ndiff);
        if (ndiff) {
            printf(" (first: block %zu, CPU", first);
            for (size_t k = 0; k < bs; ++k) printf(" %02x", a[first * bs + k]);
            printf(" / CUDA");
            for (size_t k = 0; k < bs; ++k) printf(" %02x", b[first * bs + k]);
            printf(")");
            if (type == GGML_TYPE_Q3_KV || type == GGML_TYPE_Q2_KV) {
                ++bad_types;
            }
        }
        // the same rows through CPY: on CUDA the serial one-thread-per-block functions, which the
        // warp-per-block SET_ROWS kernels of patch 0008 must reproduce exactly (set_rows row r sits at idx[r])
        const std::vector<uint8_t> c = run(cuda, type, x, idx, ne0, nrows, true);
        const size_t row_bytes = ggml_row_size(type, ne0);
        size_t ndiff_cpy = 0;
        for (int64_t r = 0; r < nrows; ++r) {
            const uint8_t * pr = b.data() + idx[r] * row_bytes;
            const uint8_t * pc = c.data() + r * row_bytes;
            for (size_t k = 0; k < row_bytes / bs; ++k) {
                ndiff_cpy += memcmp(pr + k * bs, pc + k * bs, bs) != 0;
            }
        }
        printf("; CUDA SET_ROWS vs CUDA CPY: %zu differ\n", ndiff_cpy);
        if (ndiff_cpy) {
            ++bad_types;
        }
    }
    ggml_backend_free(cuda);
    ggml_backend_free(cpu);
    return bad_types ? 1 : 0;
}
