// y [M, N] = x [M, K] @ w [N, K]^T for a few rows of x (decode: M is the batch, 1 to 8).
//
// At such M a linear layer is a stream over its weights: each weight is used M times and
// then never again this step, so the bound is memory bandwidth. BLAS GEMV reached about 11
// GB/s from DRAM on one thread of the development machine against about 26 GB/s for a plain
// sum over the same bytes; this kernel streams four weight rows at a time, keeps the rows'
// M dot products in registers, and reaches close to the sum's rate (docs/benchmarks.md).
// Weights in float32 or bfloat16 (widened in registers, so bf16 moves half the bytes);
// x and y in float32 or bfloat16; the sums are float32.
//
// Quantized weights (engine/quantization.py): int8 or fp8 e4m3 [N, K] with float32 scales
// [N, G], one per output row and group of ceil(K / G) inputs (G = 1: per channel). Up to 8
// rows widen the weights in registers and scale each group's sums, so a layer moves one byte
// per weight; more rows dequantize a tile of weight rows into cache once and run the float32
// kernel over it, 8 rows of x at a time, so DRAM still sees each weight byte once.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
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

// Calls f with M (1 to 8; more is 8) as a compile-time constant: every kernel is
// instantiated per row count, so its loops over rows unroll.
template <typename F>
inline void by_rows(int64_t M, F&& f) {
    switch (M) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 5: f(std::integral_constant<int, 5>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 7: f(std::integral_constant<int, 7>{}); break;
        default: f(std::integral_constant<int, 8>{}); break;
    }
}

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
    by_rows(M, [&](auto rows) {
        gemm_rows_bf16<decltype(rows)::value>(x, w, n_begin, n_end, K, y, N);
    });
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
    by_rows(M, [&](auto rows) {
        gemm_rows<W, decltype(rows)::value>(x, w, n_begin, n_end, K, y, N);
    });
}

enum QType { Q_INT8 = 0, Q_FP8 = 1 };

template <int Q>
inline v16 load_q(const void* w, int64_t index) {
    if constexpr (Q == Q_INT8) return load16_i8(static_cast<const int8_t*>(w) + index);
    else return load16_fp8(static_cast<const uint8_t*>(w) + index);
}

template <int Q>
inline float scalar_q(const void* w, int64_t index) {
    if constexpr (Q == Q_INT8) return static_cast<float>(static_cast<const int8_t*>(w)[index]);
    else return fp8_to_float(static_cast<const uint8_t*>(w)[index]);
}

struct QuantWeight {
    const void* w;        // [N, K]
    const float* scale;   // [N, groups]
    int64_t groups;       // ceil(K / group_size)
    int64_t group_size;
};

// Output column n for all M rows: each group's products summed, then scaled, in registers.
template <int Q, int M>
inline void quant_column(const float* x, const QuantWeight& q, int64_t n, int64_t K, float* y,
                         int64_t y_stride) {
    constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;
    v16 total[M];
    float tail[M];
    for (int m = 0; m < M; ++m) {
        total[m] = v16{};
        tail[m] = 0.0f;
    }
    const int64_t row = n * K;
    for (int64_t g = 0; g < q.groups; ++g) {
        const int64_t k0 = g * q.group_size;
        const int64_t k1 = std::min(K, k0 + q.group_size);
        v16 acc[U][M];
        for (int u = 0; u < U; ++u)
            for (int m = 0; m < M; ++m) acc[u][m] = v16{};
        int64_t k = k0;
        for (; k + 16 * U <= k1; k += 16 * U) {
            for (int u = 0; u < U; ++u) {
                const v16 wv = load_q<Q>(q.w, row + k + 16 * u);
                for (int m = 0; m < M; ++m) acc[u][m] += wv * load16(x + m * K + k + 16 * u);
            }
        }
        for (; k + 16 <= k1; k += 16) {
            const v16 wv = load_q<Q>(q.w, row + k);
            for (int m = 0; m < M; ++m) acc[0][m] += wv * load16(x + m * K + k);
        }
        const float s = q.scale[n * q.groups + g];
        for (int m = 0; m < M; ++m) {
            v16 sum = acc[0][m];
            for (int u = 1; u < U; ++u) sum += acc[u][m];
            total[m] += sum * s;
            float rest = 0.0f;
            for (int64_t kk = k; kk < k1; ++kk) rest += scalar_q<Q>(q.w, row + kk) * x[m * K + kk];
            tail[m] += rest * s;
        }
    }
    for (int m = 0; m < M; ++m) y[m * y_stride + n] = sum16(total[m]) + tail[m];
}

template <int Q, int M>
void quant_rows(const float* x, const QuantWeight& q, int64_t n_begin, int64_t n_end, int64_t K,
                float* y, int64_t N) {
    for (int64_t n = n_begin; n < n_end; ++n) quant_column<Q, M>(x, q, n, K, y, N);
}

template <int Q>
void quant_small(int64_t M, const float* x, const QuantWeight& q, int64_t n_begin, int64_t n_end,
                 int64_t K, float* y, int64_t N) {
    by_rows(M, [&](auto rows) {
        quant_rows<Q, decltype(rows)::value>(x, q, n_begin, n_end, K, y, N);
    });
}

// Weight rows [n0, n0 + rows) dequantized to float32 into out [rows, K].
template <int Q>
void dequantize_rows(const QuantWeight& q, int64_t n0, int64_t rows, int64_t K, float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        for (int64_t g = 0; g < q.groups; ++g) {
            const int64_t k0 = g * q.group_size;
            const int64_t k1 = std::min(K, k0 + q.group_size);
            const float s = q.scale[n * q.groups + g];
            int64_t k = k0;
            for (; k + 16 <= k1; k += 16) store16(out + r * K + k, load_q<Q>(q.w, n * K + k) * s);
            for (; k < k1; ++k) out[r * K + k] = scalar_q<Q>(q.w, n * K + k) * s;
        }
    }
}

constexpr int64_t kTileRows = 16;  // dequantized weight rows per tile: 16 x K floats in L2

template <int Q>
void quant_tiled(int64_t M, const float* x, const QuantWeight& q, int64_t n_begin, int64_t n_end,
                 int64_t K, float* y, int64_t N) {
    std::vector<float> tile(kTileRows * K);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, n_end - n0);
        dequantize_rows<Q>(q, n0, rows, K, tile.data());
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
            const int64_t count = std::min<int64_t>(kMaxRows, M - m0);
            gemm<F32>(count, x + m0 * K, tile.data(), 0, rows, K, y + m0 * N + n0, N);
        }
    }
}

// Every thread's share of N: contiguous, a multiple of 16 columns.
template <typename Body>
void split_columns(int64_t N, int num_threads, Body body) {
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
        body(begin, end);
    }
}

// x [M, K] and y [M, N] as float32 for the kernels: bfloat16 ones go through float32 copies,
// and finish() rounds y back.
struct FloatRows {
    FloatRows(int x_type, const void* x_in, void* y_in, int64_t M, int64_t N, int64_t K)
        : bf16(x_type == BF16), count(M * N), out(y_in) {
        x = static_cast<const float*>(x_in);
        y = static_cast<float*>(y_in);
        if (bf16) {
            x32.resize(M * K);
            const uint16_t* src = static_cast<const uint16_t*>(x_in);
            for (int64_t i = 0; i < M * K; ++i) x32[i] = bf16_to_float(src[i]);
            x = x32.data();
            y32.resize(count);
            y = y32.data();
        }
    }
    void finish() {
        if (!bf16) return;
        uint16_t* dst = static_cast<uint16_t*>(out);
        for (int64_t i = 0; i < count; ++i) dst[i] = float_to_bf16(y32[i]);
    }
    bool bf16;
    int64_t count;
    void* out;
    const float* x;
    float* y;
    std::vector<float> x32, y32;
};

}  // namespace

extern "C" {

// Returns 0 on success, 1 if M is outside [1, 8]. x [M, K] and y [M, N] contiguous in
// x_type (float32 or bfloat16); w [N, K] contiguous in w_type.
int pdserve_small_gemm(int w_type, int x_type, const void* x, const void* w, void* y, int64_t M,
                       int64_t N, int64_t K, int num_threads) {
    if (M < 1 || M > kMaxRows) return 1;
    FloatRows rows(x_type, x, y, M, N, K);
    split_columns(N, num_threads, [&](int64_t begin, int64_t end) {
#if defined(__AVX512BF16__)
        if (w_type == BF16 && x_type == BF16) {
            gemm_bf16(M, static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w), begin,
                      end, K, rows.y, N);
            return;
        }
#endif
        if (w_type == F32) gemm<F32>(M, rows.x, w, begin, end, K, rows.y, N);
        else gemm<BF16>(M, rows.x, w, begin, end, K, rows.y, N);
    });
    rows.finish();
    return 0;
}

// y [M, N] = x [M, K] @ dequantized(w)^T for any M >= 1; w int8 (q_type 0) or fp8 e4m3
// (1) [N, K], scale float32 [N, ceil(K / group_size)]; x and y in x_type (float32 or bfloat16).
int pdserve_quant_gemm(int q_type, int x_type, const void* x, const void* w, const float* scale,
                       int64_t group_size, void* y, int64_t M, int64_t N, int64_t K,
                       int num_threads) {
    if (M < 1 || group_size < 1) return 1;
    const QuantWeight q{w, scale, (K + group_size - 1) / group_size, group_size};
    FloatRows rows(x_type, x, y, M, N, K);
    const float* xf = rows.x;
    float* yf = rows.y;
    split_columns(N, num_threads, [&](int64_t begin, int64_t end) {
        if (M <= kMaxRows) {
            if (q_type == Q_INT8) quant_small<Q_INT8>(M, xf, q, begin, end, K, yf, N);
            else quant_small<Q_FP8>(M, xf, q, begin, end, K, yf, N);
        } else {
            if (q_type == Q_INT8) quant_tiled<Q_INT8>(M, xf, q, begin, end, K, yf, N);
            else quant_tiled<Q_FP8>(M, xf, q, begin, end, K, yf, N);
        }
    });
    rows.finish();
    return 0;
}

// out [N, K] (out_type float32 or bfloat16) = w * scale, as pdserve_quant_gemm reads them.
void pdserve_dequantize(int q_type, int out_type, const void* w, const float* scale,
                        int64_t group_size, void* out, int64_t N, int64_t K, int num_threads) {
    const QuantWeight q{w, scale, (K + group_size - 1) / group_size, group_size};
    split_columns(N, num_threads, [&](int64_t begin, int64_t end) {
        std::vector<float> row(out_type == BF16 ? K : 0);
        for (int64_t n = begin; n < end; ++n) {
            float* dst = out_type == BF16 ? row.data() : static_cast<float*>(out) + n * K;
            if (q_type == Q_INT8) dequantize_rows<Q_INT8>(q, n, 1, K, dst);
            else dequantize_rows<Q_FP8>(q, n, 1, K, dst);
            if (out_type == BF16) {
                uint16_t* target = static_cast<uint16_t*>(out) + n * K;
                for (int64_t k = 0; k < K; ++k) target[k] = float_to_bf16(row[k]);
            }
        }
    });
}

// Each row of x [M, K] quantized to fp8 e4m3 and back, into out: scale = the row's largest
// magnitude / 448, or scales[m * scale_stride] when scales is given (stride 0: one static
// scale); x / scale clamped to +-448 and rounded to e4m3, times scale. In bfloat16 every step
// rounds to bfloat16 as torch's bfloat16 ops do.
void pdserve_fp8_quant_dequant(int x_type, const void* x, void* out, int64_t M, int64_t K,
                               const float* scales, int64_t scale_stride) {
    const bool bf16 = x_type == BF16;
    auto round = [bf16](float v) { return bf16 ? bf16_to_float(float_to_bf16(v)) : v; };
    for (int64_t m = 0; m < M; ++m) {
        auto get = [&](int64_t k) {
            return bf16 ? bf16_to_float(static_cast<const uint16_t*>(x)[m * K + k])
                        : static_cast<const float*>(x)[m * K + k];
        };
        float scale = scales ? round(scales[m * scale_stride]) : 0.0f;
        if (!scales) {
            float largest = 0.0f;
            for (int64_t k = 0; k < K; ++k) largest = std::max(largest, std::fabs(get(k)));
            scale = round(largest / 448.0f);
            if (scale == 0.0f) scale = bf16 ? 0.0078125f : 1.1920928955078125e-07f;  // eps
        }
        for (int64_t k = 0; k < K; ++k) {
            const float scaled = std::min(448.0f, std::max(-448.0f, round(get(k) / scale)));
            const float value = round(round_to_e4m3(scaled) * scale);
            if (bf16) static_cast<uint16_t*>(out)[m * K + k] = float_to_bf16(value);
            else static_cast<float*>(out)[m * K + k] = value;
        }
    }
}

}  // extern "C"
