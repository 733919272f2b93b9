// y [M, N] = x [M, K] @ w [N, K]^T for a few rows of x (decode: M is the batch, 1 to 8).
//
// At such M a linear layer is a stream over its weights: each weight is used M times and
// then never again this step, so the bound is memory bandwidth. BLAS GEMV reached about 11
// GB/s from DRAM on one thread of the development machine against about 26 GB/s for a plain
// sum over the same bytes; this kernel streams four weight rows at a time, keeps the rows'
// M dot products in registers, and reaches close to the sum's rate (docs/benchmarks.md).
// Weights in float32 or bfloat16 (widened in registers, so bf16 moves half the bytes);
// x and y in float32 or bfloat16; the sums are float32.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using namespace pdserve;

enum DType { F32 = 0, BF16 = 1 };

constexpr int kMaxRows = 8;

template <int W>
inline v16 load_w(const void* w, int64_t index) {
    if constexpr (W == F32) return load16(static_cast<const float*>(w) + index);
    else return load16_bf16(static_cast<const uint16_t*>(w) + index);
}

template <int W>
inline float scalar_w(const void* w, int64_t index) {
    if constexpr (W == F32) return static_cast<const float*>(w)[index];
    else return bf16_to_float(static_cast<const uint16_t*>(w)[index]);
}

// Output columns [n, n + R) for all M rows; x is float32 [M, K] (in cache). Weight rows are
// read front to back, as few side by side as the arithmetic allows: one sequential stream is
// what the hardware prefetcher follows best (four rows side by side reached about half the
// rate at M = 1). With few rows of x the k loop is unrolled U times instead, so the FMAs do
// not wait on one another; with more, R = 2 weight rows share each load of x.
template <int W, int M, int R>
inline void columns(const float* x, const void* w, int64_t n, int64_t K, float* y,
                    int64_t y_stride) {
    constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;
    v16 acc[R][U][M];
    for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u)
            for (int m = 0; m < M; ++m) acc[r][u][m] = v16{};
    const int64_t step = 16 * U;
    const int64_t body = K - K % step;
    for (int64_t k = 0; k < body; k += step) {
        for (int u = 0; u < U; ++u) {
            v16 weights[R];
            for (int r = 0; r < R; ++r) weights[r] = load_w<W>(w, (n + r) * K + k + 16 * u);
            for (int m = 0; m < M; ++m) {
                const v16 xv = load16(x + m * K + k + 16 * u);
                for (int r = 0; r < R; ++r) acc[r][u][m] += weights[r] * xv;
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int m = 0; m < M; ++m) {
            v16 total = acc[r][0][m];
            for (int u = 1; u < U; ++u) total += acc[r][u][m];
            float sum = sum16(total);
            for (int64_t k = body; k < K; ++k) sum += scalar_w<W>(w, (n + r) * K + k) * x[m * K + k];
            y[m * y_stride + n + r] = sum;
        }
    }
}

#if defined(__AVX512BF16__)
// bfloat16 weights and rows: VDPBF16PS multiplies 32 bf16 pairs into 16 float32 sums per
// instruction, twice the work of widening then FMA.
template <int M>
inline void column_bf16(const uint16_t* x, const uint16_t* w, int64_t n, int64_t K, float* y,
                        int64_t y_stride) {
    constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;
    __m512 acc[U][M];
    for (int u = 0; u < U; ++u)
        for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
    const int64_t step = 32 * U;
    const int64_t body = K - K % step;
    const uint16_t* row = w + n * K;
    for (int64_t k = 0; k < body; k += step) {
        for (int u = 0; u < U; ++u) {
            const __m512bh weights = (__m512bh)_mm512_loadu_si512(row + k + 32 * u);
            for (int m = 0; m < M; ++m) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u);
                acc[u][m] = _mm512_dpbf16_ps(acc[u][m], weights, xv);
            }
        }
    }
    for (int m = 0; m < M; ++m) {
        __m512 total = acc[0][m];
        for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[u][m]);
        float sum = _mm512_reduce_add_ps(total);
        for (int64_t k = body; k < K; ++k) sum += bf16_to_float(row[k]) * bf16_to_float(x[m * K + k]);
        y[m * y_stride + n] = sum;
    }
}

template <int M>
void gemm_rows_bf16(const uint16_t* x, const uint16_t* w, int64_t n_begin, int64_t n_end,
                    int64_t K, float* y, int64_t N) {
    for (int64_t n = n_begin; n < n_end; ++n) column_bf16<M>(x, w, n, K, y, N);
}

void gemm_bf16(int64_t M, const uint16_t* x, const uint16_t* w, int64_t n_begin, int64_t n_end,
               int64_t K, float* y, int64_t N) {
    switch (M) {
        case 1: gemm_rows_bf16<1>(x, w, n_begin, n_end, K, y, N); break;
        case 2: gemm_rows_bf16<2>(x, w, n_begin, n_end, K, y, N); break;
        case 3: gemm_rows_bf16<3>(x, w, n_begin, n_end, K, y, N); break;
        case 4: gemm_rows_bf16<4>(x, w, n_begin, n_end, K, y, N); break;
        case 5: gemm_rows_bf16<5>(x, w, n_begin, n_end, K, y, N); break;
        case 6: gemm_rows_bf16<6>(x, w, n_begin, n_end, K, y, N); break;
        case 7: gemm_rows_bf16<7>(x, w, n_begin, n_end, K, y, N); break;
        default: gemm_rows_bf16<8>(x, w, n_begin, n_end, K, y, N); break;
    }
}
#endif

template <int W, int M>
void gemm_rows(const float* x, const void* w, int64_t n_begin, int64_t n_end, int64_t K,
               float* y, int64_t N) {
    constexpr int R = 1;  // two rows side by side measured slower at every M up to 8
    int64_t n = n_begin;
    for (; n + R <= n_end; n += R) columns<W, M, R>(x, w, n, K, y, N);
    for (; n < n_end; ++n) columns<W, M, 1>(x, w, n, K, y, N);
}

template <int W>
void gemm(int64_t M, const float* x, const void* w, int64_t n_begin, int64_t n_end, int64_t K,
          float* y, int64_t N) {
    switch (M) {
        case 1: gemm_rows<W, 1>(x, w, n_begin, n_end, K, y, N); break;
        case 2: gemm_rows<W, 2>(x, w, n_begin, n_end, K, y, N); break;
        case 3: gemm_rows<W, 3>(x, w, n_begin, n_end, K, y, N); break;
        case 4: gemm_rows<W, 4>(x, w, n_begin, n_end, K, y, N); break;
        case 5: gemm_rows<W, 5>(x, w, n_begin, n_end, K, y, N); break;
        case 6: gemm_rows<W, 6>(x, w, n_begin, n_end, K, y, N); break;
        case 7: gemm_rows<W, 7>(x, w, n_begin, n_end, K, y, N); break;
        default: gemm_rows<W, 8>(x, w, n_begin, n_end, K, y, N); break;
    }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 if M is outside [1, 8]. x [M, K] and y [M, N] contiguous in
// x_type (float32 or bfloat16); w [N, K] contiguous in w_type.
int pdserve_small_gemm(int w_type, int x_type, const void* x, const void* w, void* y, int64_t M,
                       int64_t N, int64_t K, int num_threads) {
    if (M < 1 || M > kMaxRows) return 1;
    std::vector<float> x32;
    const float* xf = static_cast<const float*>(x);
    if (x_type == BF16) {
        x32.resize(M * K);
        const uint16_t* src = static_cast<const uint16_t*>(x);
        for (int64_t i = 0; i < M * K; ++i) x32[i] = bf16_to_float(src[i]);
        xf = x32.data();
    }
    std::vector<float> y32;
    float* yf = static_cast<float*>(y);
    if (x_type == BF16) {
        y32.resize(M * N);
        yf = y32.data();
    }
    // Threads take contiguous column ranges, a multiple of 16 columns each.
    const int threads = std::max(1, std::min<int>(num_threads, static_cast<int>(N / 64)));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#ifdef _OPENMP
        const int id = omp_get_thread_num();
        const int count = omp_get_num_threads();
#else
        const int id = 0, count = 1;
#endif
        const int64_t chunk = ((N + count - 1) / count + 15) / 16 * 16;
        const int64_t begin = std::min<int64_t>(N, id * chunk);
        const int64_t end = std::min<int64_t>(N, begin + chunk);
#if defined(__AVX512BF16__)
        if (w_type == BF16 && x_type == BF16) {
            gemm_bf16(M, static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w), begin,
                      end, K, yf, N);
        } else
#endif
        if (w_type == F32) gemm<F32>(M, xf, w, begin, end, K, yf, N);
        else gemm<BF16>(M, xf, w, begin, end, K, yf, N);
    }
    if (x_type == BF16) {
        uint16_t* dst = static_cast<uint16_t*>(y);
        for (int64_t i = 0; i < M * N; ++i) dst[i] = float_to_bf16(y32[i]);
    }
    return 0;
}

}  // extern "C"
