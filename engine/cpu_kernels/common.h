// What the CPU kernels share: 16-float vectors (one AVX-512 register, two AVX2 ones) through
// GCC's vector extensions, and bfloat16 conversions. No torch headers: the library builds in
// seconds and is called through ctypes.
#pragma once

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

}  // namespace pdserve
