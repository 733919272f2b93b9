// The small element-wise ops of a decoder layer, each one pass over its rows: RMSNorm,
// rotary embedding (in place, on the fused q/k/v output), SiLU(gate) * up.
//
// In eager torch each is five to ten ops, each a dispatch and a pass over memory; at decode
// sizes the dispatch costs more than the arithmetic. Arithmetic is float32 whatever the
// model dtype; bfloat16 results are rounded once, at the store.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace {

using namespace pdserve;

enum DType { F32 = 0, BF16 = 1 };

template <int T>
inline float get(const void* base, int64_t index) {
    if constexpr (T == F32) return static_cast<const float*>(base)[index];
    else return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
}

template <int T>
inline void put(void* base, int64_t index, float value) {
    if constexpr (T == F32) static_cast<float*>(base)[index] = value;
    else static_cast<uint16_t*>(base)[index] = float_to_bf16(value);
}

template <int T>
void rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t size,
              int64_t x_stride, float eps) {
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t base = row * x_stride;
        float squares = 0.0f;
        for (int64_t i = 0; i < size; ++i) {
            const float v = get<T>(x, base + i);
            squares += v * v;
        }
        const float inv = 1.0f / std::sqrt(squares / static_cast<float>(size) + eps);
        for (int64_t i = 0; i < size; ++i) {
            // As the reference: normalise in float32, round to the model dtype, then scale.
            float normed = get<T>(x, base + i) * inv;
            if constexpr (T == BF16) normed = bf16_to_float(float_to_bf16(normed));
            put<T>(out, row * size + i, get<T>(weight, i) * normed);
        }
    }
}

template <int T>
void rotary(void* qkv, int64_t tokens, int64_t row_stride, int64_t heads, int64_t head_dim,
            const int64_t* positions, const float* cos, const float* sin) {
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < tokens; ++t) {
        const float* c = cos + positions[t] * head_dim;
        const float* s = sin + positions[t] * head_dim;
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t base = t * row_stride + h * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                const float a = get<T>(qkv, base + i);
                const float b = get<T>(qkv, base + half + i);
                put<T>(qkv, base + i, a * c[i] - b * s[i]);
                put<T>(qkv, base + half + i, b * c[half + i] + a * s[half + i]);
            }
        }
    }
}

template <int T>
void silu_mul(const void* gate_up, void* out, int64_t rows, int64_t size) {
    for (int64_t row = 0; row < rows; ++row) {
        for (int64_t i = 0; i < size; ++i) {
            const float g = get<T>(gate_up, row * 2 * size + i);
            const float u = get<T>(gate_up, row * 2 * size + size + i);
            // sigmoid through exp of a non-positive number: no overflow either side.
            const float e = exp_clamped(-std::fabs(g));
            const float sigmoid = g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
            float silu = g * sigmoid;
            if constexpr (T == BF16) silu = bf16_to_float(float_to_bf16(silu));
            put<T>(out, row * size + i, silu * u);
        }
    }
}

}  // namespace

extern "C" {

// out [rows, size] = weight * normalise(x); x rows ``x_stride`` elements apart.
void pdserve_rms_norm(int dtype, const void* x, const void* weight, void* out, int64_t rows,
                      int64_t size, int64_t x_stride, float eps) {
    if (dtype == F32) rms_norm<F32>(x, weight, out, rows, size, x_stride, eps);
    else rms_norm<BF16>(x, weight, out, rows, size, x_stride, eps);
}

// Rotate, in place, the first ``heads`` heads of each token's row of ``qkv`` (rows
// ``row_stride`` elements apart) by the token's position; rotate-half form, cos/sin tables
// float32 [max_positions, head_dim].
void pdserve_rotary(int dtype, void* qkv, int64_t tokens, int64_t row_stride, int64_t heads,
                    int64_t head_dim, const int64_t* positions, const float* cos,
                    const float* sin) {
    if (dtype == F32) rotary<F32>(qkv, tokens, row_stride, heads, head_dim, positions, cos, sin);
    else rotary<BF16>(qkv, tokens, row_stride, heads, head_dim, positions, cos, sin);
}

// out [rows, size] = silu(gate_up[:, :size]) * gate_up[:, size:].
void pdserve_silu_mul(int dtype, const void* gate_up, void* out, int64_t rows, int64_t size) {
    if (dtype == F32) silu_mul<F32>(gate_up, out, rows, size);
    else silu_mul<BF16>(gate_up, out, rows, size);
}

}  // extern "C"
