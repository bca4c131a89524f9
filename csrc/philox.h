// The one noise stream of bsldm_fast, shared by the CPU and CUDA kernels (and mirrored, operation
// for operation, by bsldm_fast/kernels/triton_kernels.py and the PyTorch reference
// bsldm_fast/kernels/reference.py; bsldm_fast/diffusion/noise.py documents the stream).
//
//   bits   = Philox4x32-10(counter = (index >> 2, 0, step, stream), key = (seed & 0xffffffff, seed >> 32))
//   (a, b) = (bits[0], bits[1]) for index & 2 == 0, else (bits[2], bits[3])
//   u1     = ((a >> 8) + 1) * 2^-24                in (0, 1], exact in float32
//   u2     = (b >> 8) * 2^-24                      in [0, 1), exact in float32
//   normal = sqrt(-2 log u1) * (index & 1 ? sin : cos)(float32(2 pi) * u2)
//            (Box-Muller, every operation in float32: one Philox call gives four normals)
//
// `index` is the element's position in its sample's [C, h, w] block, so a sample's noise depends
// on its own seed only, never on its batch. Philox4x32-10 is Salmon et al. 2011 (Random123).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BSLDM_HD __host__ __device__ __forceinline__
#else
#define BSLDM_HD inline
#endif

namespace bsldm {

inline constexpr uint32_t kInitStream = 0;  // x_T
inline constexpr uint32_t kStepStream = 1;  // per-step noise of ancestral samplers
// The offset term of a draw on stream s comes from stream s + kOffsetStreamDelta, element index
// = channel: one value per sample and channel.
inline constexpr uint32_t kOffsetStreamDelta = 2;

struct Philox4 {
  uint32_t v[4];
};

BSLDM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

// Philox4x32 with 10 rounds, the key bumped between rounds (Random123's philox4x32_R).
BSLDM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, &hi0, &lo0);
    mulhilo32(0xCD9E8D57u, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

inline constexpr float kTwoPiF = 6.28318530717958647692f;  // float32(2 pi) = 6.2831855f
inline constexpr float kInv2Pow24 = 5.9604644775390625e-08f;  // 2^-24

// The Box-Muller uniforms (u1, u2) of the two pairs of one Philox call (counter `group`).
BSLDM_HD void philox_uniforms4(uint64_t seed, uint32_t stream, uint32_t step, uint32_t group,
                               float* u1_pair0, float* u2_pair0, float* u1_pair1, float* u2_pair1) {
  const Philox4 bits = philox4x32_10(group, 0u, step, stream, static_cast<uint32_t>(seed),
                                     static_cast<uint32_t>(seed >> 32));
  *u1_pair0 = static_cast<float>((bits.v[0] >> 8) + 1u) * kInv2Pow24;
  *u2_pair0 = static_cast<float>(bits.v[1] >> 8) * kInv2Pow24;
  *u1_pair1 = static_cast<float>((bits.v[2] >> 8) + 1u) * kInv2Pow24;
  *u2_pair1 = static_cast<float>(bits.v[3] >> 8) * kInv2Pow24;
}

BSLDM_HD float box_muller_radius(float u1) {
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * logf(u1));
#else
  return std::sqrt(-2.0f * std::log(u1));
#endif
}

BSLDM_HD float box_muller_cos(float radius, float u2) {
#if defined(__CUDA_ARCH__)
  return radius * cosf(kTwoPiF * u2);
#else
  return radius * std::cos(kTwoPiF * u2);
#endif
}

BSLDM_HD float box_muller_sin(float radius, float u2) {
#if defined(__CUDA_ARCH__)
  return radius * sinf(kTwoPiF * u2);
#else
  return radius * std::sin(kTwoPiF * u2);
#endif
}

// One standard normal of the stream: element `index`.
BSLDM_HD float philox_normal(uint64_t seed, uint32_t stream, uint32_t step, uint32_t index) {
  float u1[2], u2[2];
  philox_uniforms4(seed, stream, step, index >> 2, &u1[0], &u2[0], &u1[1], &u2[1]);
  const int pair = (index >> 1) & 1;
  const float radius = box_muller_radius(u1[pair]);
  return (index & 1) ? box_muller_sin(radius, u2[pair]) : box_muller_cos(radius, u2[pair]);
}

// The noise of one element: z, plus offset * z_c (z_c: one normal per sample and channel).
BSLDM_HD float philox_noise(uint64_t seed, uint32_t stream, uint32_t step, uint32_t index,
                            uint32_t channel, float offset) {
  float z = philox_normal(seed, stream, step, index);
  if (offset != 0.0f) {
    z = z + offset * philox_normal(seed, stream + kOffsetStreamDelta, step, channel);
  }
  return z;
}

// x0 = (x - sqrt(1 - a) eps) / sqrt(a), clamped to [-clip, clip] (clip = inf: no clipping).
// Same operations and order as bsldm_fast.diffusion.samplers.predict_x0 in float32.
BSLDM_HD float predict_x0(float x, float eps, float sqrt_ab, float sqrt_1mab, float clip) {
  float x0 = (x - sqrt_1mab * eps) / sqrt_ab;
  x0 = x0 < -clip ? -clip : x0;
  return x0 > clip ? clip : x0;
}

}  // namespace bsldm
