// Unit test of the plain-C++ sampler kernels (no torch, no Python); run by ctest. The Python suite
// (tests/kernels) compares them with the PyTorch references; this checks them on their own terms.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "check.h"
#include "philox.h"
#include "sampler_kernels.h"

namespace {

void test_philox_known_answers() {
  // Random123's kat_vectors for philox4x32_10.
  const bsldm::Philox4 zero = bsldm::philox4x32_10(0, 0, 0, 0, 0, 0);
  CHECK(zero.v[0] == 0x6627e8d5u && zero.v[1] == 0xe169c58du && zero.v[2] == 0xbc57ac4cu &&
        zero.v[3] == 0x9b00dbd8u);
  const bsldm::Philox4 pi = bsldm::philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu,
                                                 0x03707344u, 0xa4093822u, 0x299f31d0u);
  CHECK(pi.v[0] == 0xd16cfe09u && pi.v[1] == 0x94fdccebu && pi.v[2] == 0x5001e420u &&
        pi.v[3] == 0x24126ea1u);
}

void test_normals_are_standard() {
  const int64_t n = 1 << 16;
  double sum = 0.0, sum2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double z = bsldm::philox_normal(12345u, bsldm::kStepStream, 7u, static_cast<uint32_t>(i));
    CHECK(std::isfinite(z));
    sum += z;
    sum2 += z * z;
  }
  const double mean = sum / n, var = sum2 / n - mean * mean;
  CHECK(std::fabs(mean) < 0.02);  // ~5 standard errors
  CHECK(std::fabs(var - 1.0) < 0.03);
}

// A DDPM step with noise, in place on a batch-strided slice, against the per-element formula.
void test_ddpm_step_in_place() {
  const int64_t batch = 2, channels = 3, plane = 5 * 7, inner = channels * plane, stride = 2 * inner;
  std::vector<float> u(batch * stride), eps(batch * inner);
  for (size_t i = 0; i < u.size(); ++i) u[i] = std::sin(0.37f * i) * 2.0f;
  for (size_t i = 0; i < eps.size(); ++i) eps[i] = std::cos(0.11f * i);
  const std::vector<float> before = u;
  const int64_t seeds[2] = {3, -5};
  const bsldm::Layout layout{batch, inner, plane};
  const bsldm::Strides strides{stride, inner, stride, 0, 0};
  const bsldm::DDPMParams p{0.6f, 0.8f, 1.4f, 0.3f, 0.7f};
  const bsldm::StepNoise noise{9u, 0.2f, 0.1f};
  bsldm::noisy_step_cpu(u.data(), eps.data(), u.data(), strides, seeds, layout, p, noise);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < inner; ++i) {
      const float x = before[b * stride + i], e = eps[b * inner + i];
      const float x0 = std::fmin(std::fmax((x - 0.8f * e) / 0.6f, -1.4f), 1.4f);
      const float z = bsldm::philox_normal(static_cast<uint64_t>(seeds[b]), bsldm::kStepStream, 9u,
                                           static_cast<uint32_t>(i));
      const float zc = bsldm::philox_normal(static_cast<uint64_t>(seeds[b]),
                                            bsldm::kStepStream + bsldm::kOffsetStreamDelta, 9u,
                                            static_cast<uint32_t>(i / plane));
      const float expected = (0.3f * x0 + 0.7f * x) + 0.2f * (z + 0.1f * zc);
      CHECK(u[b * stride + i] == expected);
      CHECK(u[b * stride + inner + i] == before[b * stride + inner + i]);  // condition untouched
    }
  }
}

void test_vq_nearest_code() {
  const int64_t batch = 2, dim = 4, plane = 6, codes_n = 9;
  std::vector<float> z(batch * dim * plane), codes(codes_n * dim), out(z.size());
  std::vector<int64_t> indices(batch * plane);
  for (size_t i = 0; i < z.size(); ++i) z[i] = std::sin(1.3f * i);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = std::cos(0.7f * i);
  bsldm::vq_quantize_cpu(z.data(), dim * plane, codes.data(), codes_n, dim, batch, plane,
                         out.data(), dim * plane, indices.data());
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t p = 0; p < plane; ++p) {
      int64_t best = 0;
      double best_d = INFINITY;
      for (int64_t k = 0; k < codes_n; ++k) {
        double d = 0.0;
        for (int64_t c = 0; c < dim; ++c) {
          const double diff = double(z[b * dim * plane + c * plane + p]) - codes[k * dim + c];
          d += diff * diff;
        }
        if (d < best_d) best_d = d, best = k;
      }
      CHECK(indices[b * plane + p] == best);
      for (int64_t c = 0; c < dim; ++c) CHECK(out[b * dim * plane + c * plane + p] == codes[best * dim + c]);
    }
  }
}

}  // namespace

int main() {
  test_philox_known_answers();
  test_normals_are_standard();
  test_ddpm_step_in_place();
  test_vq_nearest_code();
  return bsldm_test::report("test_kernels");
}
