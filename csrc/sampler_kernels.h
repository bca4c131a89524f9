// Fused sampler-step, initial-latent and VQ kernels on raw float32 buffers: the CPU versions
// (sampler_kernels.cpp, OpenMP) and the CUDA launchers (sampler_kernels.cu). Free of torch and
// Python so that CMake builds and tests them alone; csrc/ops.cpp wraps them as torch ops.
//
// Layout: a tensor of B samples whose per-sample block [C, h, w] is contiguous, samples `stride`
// floats apart. That covers U[:, :4] and U[:, 4:] of the U-Net input buffer U [B, 8, h, w] and the
// first channels of the U-Net output, so a step reads eps and x_t where they are and writes x_{t-1}
// straight into U. `x` and `out` may be the same memory (in-place update, element by element).
#pragma once

#include <cstdint>

#include "philox.h"

namespace bsldm {

struct Layout {
  int64_t batch;      // B
  int64_t inner;      // C * h * w, the contiguous per-sample block
  int64_t plane;      // h * w, so that channel = index / plane
};

// The noise term of a step: noise_std * (z + offset * z_c) with z from (seeds[b], kStepStream,
// step); noise_std = 0 draws nothing.
struct StepNoise {
  uint32_t step;
  float noise_std;
  float offset;
};

// DDPM ancestral step (diffusers' DDPMScheduler.step with clip_sample):
//   x0 = clamp((x - sqrt_1mab eps) / sqrt_ab);  out = x0_coeff x0 + x_coeff x + noise.
struct DDPMParams {
  float sqrt_ab, sqrt_1mab, clip, x0_coeff, x_coeff;
};

// DDIM step (Song et al. 2021, Eq. 12): x0 as above; when `rederive`, eps = (x - sqrt_ab x0) /
// sqrt_1mab; out = x0_coeff x0 + eps_coeff eps + noise.
struct DDIMParams {
  float sqrt_ab, sqrt_1mab, clip, x0_coeff, eps_coeff;
  bool rederive;
};

// DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2): x0 as above, written to x0_out;
//   d = has_prev ? w_cur x0 - w_prev prev_x0 : x0;   out = last ? x0 : x_coeff x - d_coeff d.
struct DPMParams {
  float sqrt_ab, sqrt_1mab, clip, x_coeff, d_coeff, w_cur, w_prev;
  bool has_prev, last;
};

struct Strides {
  int64_t x, eps, out, aux_in, aux_out;  // per-sample strides; aux = prev_x0 / x0_out for DPM
};

// Per-element updates, shared by the CPU and CUDA kernels: the same float32 operations in the same
// order as the PyTorch references in bsldm_fast/diffusion/samplers.py.
BSLDM_HD float ddpm_mean(float x, float eps, const DDPMParams& p) {
  const float x0 = predict_x0(x, eps, p.sqrt_ab, p.sqrt_1mab, p.clip);
  return p.x0_coeff * x0 + p.x_coeff * x;
}

BSLDM_HD float ddim_mean(float x, float eps, const DDIMParams& p) {
  const float x0 = predict_x0(x, eps, p.sqrt_ab, p.sqrt_1mab, p.clip);
  if (p.rederive) eps = (x - p.sqrt_ab * x0) / p.sqrt_1mab;
  return p.x0_coeff * x0 + p.eps_coeff * eps;
}

// One name for both noisy updates, so that the CPU and CUDA loops are written once for the two.
BSLDM_HD float step_mean(float x, float eps, const DDPMParams& p) { return ddpm_mean(x, eps, p); }
BSLDM_HD float step_mean(float x, float eps, const DDIMParams& p) { return ddim_mean(x, eps, p); }

// Returns x_next; stores x0 in *x0_out.
BSLDM_HD float dpmpp_2m_update(float x, float eps, float prev_x0, const DPMParams& p,
                               float* x0_out) {
  const float x0 = predict_x0(x, eps, p.sqrt_ab, p.sqrt_1mab, p.clip);
  *x0_out = x0;
  if (p.last) return x0;
  const float d = p.has_prev ? p.w_cur * x0 - p.w_prev * prev_x0 : x0;
  return p.x_coeff * x - p.d_coeff * d;
}

// CPU kernels: OpenMP over samples and blocks of each sample.
void initial_latent_cpu(float* out, int64_t out_stride, const int64_t* seeds, const Layout& layout,
                        float offset);
// DDPM and DDIM (Params: DDPMParams or DDIMParams): out = step_mean(x, eps) + noise_std * (z + offset z_c).
template <class Params>
void noisy_step_cpu(const float* x, const float* eps, float* out, const Strides& strides,
                    const int64_t* seeds, const Layout& layout, const Params& p,
                    const StepNoise& noise);
void dpmpp_2m_step_cpu(const float* x, const float* eps, const float* prev_x0, float* out,
                       float* x0_out, const Strides& strides, const Layout& layout,
                       const DPMParams& p);
// Standard normals of the stream: out[b * out_stride + i] for i < layout.inner.
void philox_normal_cpu(float* out, int64_t out_stride, const int64_t* seeds, const Layout& layout,
                       uint32_t stream, uint32_t step);

// VQ: for each of the B * h * w vectors z[b, :, y, x] (D channels, plane = h * w apart), the
// nearest of the K codes (rows of `codes`, [K, D]) by d = (|z|^2 + |c|^2) - 2 z.c, ties to the
// lowest index (as models/vqgan.py's Codebook); writes the code to out (same layout as z,
// `out_stride` apart) and, when indices is not null, its index to indices[b * plane + p].
void vq_quantize_cpu(const float* z, int64_t z_stride, const float* codes, int64_t num_codes,
                     int64_t dim, int64_t batch, int64_t plane, float* out, int64_t out_stride,
                     int64_t* indices);

#ifdef WITH_CUDA
// CUDA launchers (sampler_kernels.cu), on `stream` (a cudaStream_t); pointers are device memory.
void initial_latent_cuda(float* out, int64_t out_stride, const int64_t* seeds,
                         const Layout& layout, float offset, void* stream);
template <class Params>
void noisy_step_cuda(const float* x, const float* eps, float* out, const Strides& strides,
                     const int64_t* seeds, const Layout& layout, const Params& p,
                     const StepNoise& noise, void* stream);
void dpmpp_2m_step_cuda(const float* x, const float* eps, const float* prev_x0, float* out,
                        float* x0_out, const Strides& strides, const Layout& layout,
                        const DPMParams& p, void* stream);
void philox_normal_cuda(float* out, int64_t out_stride, const int64_t* seeds,
                        const Layout& layout, uint32_t stream_id, uint32_t step, void* stream);
void vq_quantize_cuda(const float* z, int64_t z_stride, const float* codes, int64_t num_codes,
                      int64_t dim, int64_t batch, int64_t plane, float* out, int64_t out_stride,
                      int64_t* indices, void* stream);
#endif

}  // namespace bsldm
