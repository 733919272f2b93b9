// What the CPU kernels share: 16-float vectors (one AVX-512 register, two AVX2 ones) through
// GCC's vector extensions, and bfloat16 conversions. No torch headers: the library builds in
// seconds and is called through ctypes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pdserve {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
    v16 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

inline float sum16(v16 v) {
    float s = 0.0f;
    for (int i = 0; i < 16; ++i) s += v[i];
    return s;
}

inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    return value;
}

// 16 bfloat16 values widened to float32: a shift per lane.
inline v16 load16_bf16(const uint16_t* p) {
    typedef uint16_t u16x16 __attribute__((vector_size(32)));
    typedef uint32_t u32x16 __attribute__((vector_size(64)));
    u16x16 narrow;
    std::memcpy(&narrow, p, sizeof(narrow));
    u32x16 wide = __builtin_convertvector(narrow, u32x16) << 16;
    v16 v;
    std::memcpy(&v, &wide, sizeof(v));
    return v;
}

inline uint16_t float_to_bf16(float value) {
    // Round to nearest even, as torch does; NaN stays NaN.
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

// exp(x) for x in [-87, 88] (clamped there), about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2
// (ln2 split in two for precision), exp(r) by a degree-6 minimax polynomial, 2^n put into
// the exponent bits. Plain arithmetic, so the compiler vectorises the loops that call it.
inline float exp_clamped(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    float n = std::floor(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return y * scale;
}

}  // namespace pdserve
