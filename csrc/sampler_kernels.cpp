// CPU versions of the fused sampler kernels (see sampler_kernels.h). Each sample is cut into
// blocks of kBlock elements, spread over OpenMP threads; within a block the noise is drawn in two
// passes (Philox bits, then Box-Muller) and the update is one branch-free loop the compiler
// vectorises.
#include "sampler_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace bsldm {
namespace {

constexpr int64_t kBlock = 1024;
// Below these many elements a kernel runs on one thread: waking an OpenMP team costs more than the
// work saved (and far more on an oversubscribed machine). A plain update moves ~12 bytes per
// element at memory speed; drawing noise costs ~30 ns per element, so it pays off much earlier.
constexpr int64_t kParallelMinPlain = int64_t(1) << 20;
constexpr int64_t kParallelMinNoise = int64_t(1) << 13;

// Runs body(b, start, n) over every block of every sample, in parallel when the batch holds at
// least `parallel_min` elements.
template <typename Body>
void for_blocks(const Layout& layout, int64_t parallel_min, Body&& body) {
  const int64_t blocks = (layout.inner + kBlock - 1) / kBlock;
  const int64_t total = layout.batch * blocks;
#pragma omp parallel for schedule(static) if (layout.batch * layout.inner >= parallel_min)
  for (int64_t job = 0; job < total; ++job) {
    const int64_t b = job / blocks;
    const int64_t start = (job % blocks) * kBlock;
    body(b, start, std::min(kBlock, layout.inner - start));
  }
}

// z[i] = the noise of elements start .. start + n - 1 of a sample (philox_noise, block-wise):
// Philox once per four elements, then one Box-Muller pair (radius, cos, sin) per two elements.
void fill_noise(float* z, uint64_t seed, uint32_t stream, uint32_t step, int64_t start, int64_t n,
                int64_t plane, float offset) {
  const int64_t first_group = start >> 2, end_group = (start + n + 3) >> 2;
  const int64_t groups = end_group - first_group;
  float u1[kBlock / 2 + 4], u2[kBlock / 2 + 4], pairs[kBlock + 8];
  for (int64_t g = 0; g < groups; ++g) {
    philox_uniforms4(seed, stream, step, static_cast<uint32_t>(first_group + g), &u1[2 * g],
                     &u2[2 * g], &u1[2 * g + 1], &u2[2 * g + 1]);
  }
  for (int64_t p = 0; p < 2 * groups; ++p) {
    const float radius = box_muller_radius(u1[p]);
    pairs[2 * p] = box_muller_cos(radius, u2[p]);
    pairs[2 * p + 1] = box_muller_sin(radius, u2[p]);
  }
  const float* mine = pairs + (start - 4 * first_group);
  for (int64_t i = 0; i < n; ++i) z[i] = mine[i];
  if (offset == 0.0f) return;
  // The offset term is constant over a channel: one draw per channel the block touches.
  for (int64_t c = start / plane; c * plane < start + n; ++c) {
    const float zc = philox_normal(seed, stream + kOffsetStreamDelta, step, static_cast<uint32_t>(c));
    const int64_t lo = std::max(c * plane, start) - start;
    const int64_t hi = std::min((c + 1) * plane, start + n) - start;
    for (int64_t i = lo; i < hi; ++i) z[i] = z[i] + offset * zc;
  }
}

}  // namespace

void philox_normal_cpu(float* out, int64_t out_stride, const int64_t* seeds, const Layout& layout,
                       uint32_t stream, uint32_t step) {
  for_blocks(layout, kParallelMinNoise, [&](int64_t b, int64_t start, int64_t n) {
    fill_noise(out + b * out_stride + start, static_cast<uint64_t>(seeds[b]), stream, step, start,
               n, layout.plane, 0.0f);
  });
}

void initial_latent_cpu(float* out, int64_t out_stride, const int64_t* seeds, const Layout& layout,
                        float offset) {
  for_blocks(layout, kParallelMinNoise, [&](int64_t b, int64_t start, int64_t n) {
    fill_noise(out + b * out_stride + start, static_cast<uint64_t>(seeds[b]), kInitStream, 0u,
               start, n, layout.plane, offset);
  });
}

template <class Params>
void noisy_step_cpu(const float* x, const float* eps, float* out, const Strides& strides,
                    const int64_t* seeds, const Layout& layout, const Params& p,
                    const StepNoise& noise) {
  const int64_t parallel_min = noise.noise_std == 0.0f ? kParallelMinPlain : kParallelMinNoise;
  for_blocks(layout, parallel_min, [&](int64_t b, int64_t start, int64_t n) {
    const float* xb = x + b * strides.x + start;
    const float* eb = eps + b * strides.eps + start;
    float* ob = out + b * strides.out + start;
    if (noise.noise_std == 0.0f) {
      for (int64_t i = 0; i < n; ++i) ob[i] = step_mean(xb[i], eb[i], p);
      return;
    }
    float z[kBlock];
    fill_noise(z, static_cast<uint64_t>(seeds[b]), kStepStream, noise.step, start, n,
               layout.plane, noise.offset);
    for (int64_t i = 0; i < n; ++i) ob[i] = step_mean(xb[i], eb[i], p) + noise.noise_std * z[i];
  });
}

template void noisy_step_cpu(const float*, const float*, float*, const Strides&, const int64_t*,
                             const Layout&, const DDPMParams&, const StepNoise&);
template void noisy_step_cpu(const float*, const float*, float*, const Strides&, const int64_t*,
                             const Layout&, const DDIMParams&, const StepNoise&);

void dpmpp_2m_step_cpu(const float* x, const float* eps, const float* prev_x0, float* out,
                       float* x0_out, const Strides& strides, const Layout& layout,
                       const DPMParams& p) {
  for_blocks(layout, kParallelMinPlain, [&](int64_t b, int64_t start, int64_t n) {
    const float* xb = x + b * strides.x + start;
    const float* eb = eps + b * strides.eps + start;
    const float* pb = p.has_prev ? prev_x0 + b * strides.aux_in + start : nullptr;
    float* ob = out + b * strides.out + start;
    float* x0b = x0_out + b * strides.aux_out + start;
    for (int64_t i = 0; i < n; ++i) {
      ob[i] = dpmpp_2m_update(xb[i], eb[i], pb ? pb[i] : 0.0f, p, &x0b[i]);
    }
  });
}

void vq_quantize_cpu(const float* z, int64_t z_stride, const float* codes, int64_t num_codes,
                     int64_t dim, int64_t batch, int64_t plane, float* out, int64_t out_stride,
                     int64_t* indices) {
  // Codes transposed to [D, K] so that the distance loop over codes vectorises.
  std::vector<float> codes_t(static_cast<size_t>(dim * num_codes));
  std::vector<float> norms(static_cast<size_t>(num_codes));
  for (int64_t k = 0; k < num_codes; ++k) {
    float norm = 0.0f;
    for (int64_t d = 0; d < dim; ++d) {
      const float c = codes[k * dim + d];
      codes_t[d * num_codes + k] = c;
      norm = norm + c * c;
    }
    norms[k] = norm;
  }
  const int64_t total = batch * plane;
#pragma omp parallel if (total * num_codes >= kParallelMinNoise * 64)
  {
    std::vector<float> dot(static_cast<size_t>(num_codes));
    std::vector<float> v(static_cast<size_t>(dim));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < total; ++job) {
      const int64_t b = job / plane, pos = job % plane;
      float norm = 0.0f;
      for (int64_t d = 0; d < dim; ++d) {
        v[d] = z[b * z_stride + d * plane + pos];
        norm = norm + v[d] * v[d];
      }
      std::fill(dot.begin(), dot.end(), 0.0f);
      for (int64_t d = 0; d < dim; ++d) {
        const float vd = v[d];
        const float* row = &codes_t[d * num_codes];
        for (int64_t k = 0; k < num_codes; ++k) dot[k] = dot[k] + vd * row[k];
      }
      int64_t best = 0;
      float best_distance = std::numeric_limits<float>::infinity();
      for (int64_t k = 0; k < num_codes; ++k) {
        const float distance = (norm + norms[k]) - 2.0f * dot[k];
        if (distance < best_distance) {  // strict: ties keep the lowest index
          best_distance = distance;
          best = k;
        }
      }
      for (int64_t d = 0; d < dim; ++d) out[b * out_stride + d * plane + pos] = codes[best * dim + d];
      if (indices != nullptr) indices[job] = best;
    }
  }
}

}  // namespace bsldm
