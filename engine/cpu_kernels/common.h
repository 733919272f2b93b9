// What the CPU kernels share: 16-float vectors (one AVX-512 register, two AVX2 ones) through
// GCC's vector extensions, and bfloat16 conversions. No torch headers: the library builds in
// seconds and is called through ctypes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// e4m3fn (bias 7, no infinities) to float32 in integer arithmetic the compiler vectorises: a
// normal value moves its exponent and mantissa into place with the bias raised by 120; a
// subnormal one is mantissa * 2^-9. The pool never holds NaN (quantization clamps to 448).
inline float fp8_to_float(uint8_t byte) {
    const uint32_t magnitude = byte & 0x7fu;
    const uint32_t sign = static_cast<uint32_t>(byte & 0x80u) << 24;
    const uint32_t normal = (magnitude << 20) + (120u << 23);
    float value;
    std::memcpy(&value, &normal, sizeof(value));
    const float subnormal = static_cast<float>(magnitude) * 0.001953125f;  // 2^-9
    value = (magnitude >> 3) ? value : subnormal;
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    bits |= sign;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
}

// 16 int8 values widened to float32 (GCC's generic vector conversion of int8 lanes came out
// as scalar shifts, about 8x slower, so AVX-512 and AVX2 get their instructions by name).
inline v16 load16_i8(const int8_t* p) {
    v16 v;
#if defined(__AVX512F__)
    const __m512 wide = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    std::memcpy(&v, &wide, sizeof(v));
#elif defined(__AVX2__)
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256 halves[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
                              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))};
    std::memcpy(&v, halves, sizeof(v));
#else
    for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
#endif
    return v;
}

// 16 e4m3fn values widened to float32: a byte sign-extended and shifted left by 20 has its
// sign in bit 31 and its exponent and mantissa in bits 26..20, the top of a float32's exponent
// and mantissa, once bits 30..27 are masked off; that float32 is the value times 2^-120 (a
// subnormal e4m3 lands on a float32 subnormal, so it comes out right too), and one multiply
// by 2^120 puts it back. Four instructions per 16 weights. NaN bytes are not expected
// (weights and activations are clamped to 448 when quantized).
inline v16 load16_fp8(const uint8_t* p) {
    constexpr float kTwoTo120 = 1.329227995784916e36f;
    constexpr int kKeep = static_cast<int>(0x87f00000u);
    v16 v;
#if defined(__AVX512F__)
    const __m512i bytes =
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i bits =
        _mm512_and_si512(_mm512_slli_epi32(bytes, 20), _mm512_set1_epi32(kKeep));
    const __m512 wide = _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(kTwoTo120));
    std::memcpy(&v, &wide, sizeof(v));
#elif defined(__AVX2__)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __m256 halves[2];
    for (int h = 0; h < 2; ++h) {
        const __m256i bytes = _mm256_cvtepi8_epi32(h ? _mm_srli_si128(raw, 8) : raw);
        const __m256i bits =
            _mm256_and_si256(_mm256_slli_epi32(bytes, 20), _mm256_set1_epi32(kKeep));
        halves[h] = _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(kTwoTo120));
    }
    std::memcpy(&v, halves, sizeof(v));
#else
    for (int i = 0; i < 16; ++i) v[i] = fp8_to_float(p[i]);
#endif
    return v;
}

// float32 to the nearest e4m3fn value (ties to even), returned as float32, for |x| <= 448:
// what torch's conversion to float8_e4m3fn and back gives. Normal values keep 3 mantissa bits;
// below 2^-6 the step is 2^-9.
inline float round_to_e4m3(float x) {
    const float magnitude = std::fabs(x);
    float rounded;
    if (magnitude < 0.015625f) {
        rounded = std::nearbyint(magnitude * 512.0f) * 0.001953125f;
    } else {
        uint32_t bits;
        std::memcpy(&bits, &magnitude, sizeof(bits));
        bits += 0x7ffffu + ((bits >> 20) & 1u);
        bits &= 0xfff00000u;
        std::memcpy(&rounded, &bits, sizeof(rounded));
    }
    return std::copysign(rounded, x);
}

}  // namespace pdserve
