// CUDA versions of the fused sampler kernels (see sampler_kernels.h): one thread per element, the
// per-element math shared with the CPU through sampler_kernels.h and philox.h. Free of torch, so
// the test suite compiles this file with nvcc alone; csrc/ops.cpp launches it on torch's stream.
#ifndef WITH_CUDA
#define WITH_CUDA
#endif
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "sampler_kernels.h"

namespace bsldm {
namespace {

constexpr int kThreads = 256;

void check_launch(const char* name) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string(name) + ": CUDA launch failed: " + cudaGetErrorString(error));
  }
}

dim3 grid_for(const Layout& layout) {
  return dim3(static_cast<unsigned>((layout.inner + kThreads - 1) / kThreads),
              static_cast<unsigned>(layout.batch));
}

__global__ void normal_kernel(float* out, int64_t out_stride, const int64_t* seeds, Layout layout,
                              uint32_t stream, uint32_t step) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (i >= layout.inner) return;
  out[b * out_stride + i] =
      philox_normal(static_cast<uint64_t>(seeds[b]), stream, step, static_cast<uint32_t>(i));
}

__global__ void initial_latent_kernel(float* out, int64_t out_stride, const int64_t* seeds,
                                      Layout layout, float offset) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (i >= layout.inner) return;
  out[b * out_stride + i] =
      philox_noise(static_cast<uint64_t>(seeds[b]), kInitStream, 0u, static_cast<uint32_t>(i),
                   static_cast<uint32_t>(i / layout.plane), offset);
}

// DDPM and DDIM: out = mean(x, eps) + noise_std * (z + offset z_c), one thread per element.
template <class Params>
__global__ void noisy_step_kernel(const float* x, const float* eps, float* out, Strides strides,
                                  const int64_t* seeds, Layout layout, Params p, StepNoise noise) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (i >= layout.inner) return;
  float value = step_mean(x[b * strides.x + i], eps[b * strides.eps + i], p);
  if (noise.noise_std != 0.0f) {
    value = value + noise.noise_std *
                        philox_noise(static_cast<uint64_t>(seeds[b]), kStepStream, noise.step,
                                     static_cast<uint32_t>(i),
                                     static_cast<uint32_t>(i / layout.plane), noise.offset);
  }
  out[b * strides.out + i] = value;
}

__global__ void dpmpp_2m_kernel(const float* x, const float* eps, const float* prev_x0, float* out,
                                float* x0_out, Strides strides, Layout layout, DPMParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (i >= layout.inner) return;
  const float prev = p.has_prev ? prev_x0[b * strides.aux_in + i] : 0.0f;
  float x0;
  out[b * strides.out + i] =
      dpmpp_2m_update(x[b * strides.x + i], eps[b * strides.eps + i], prev, p, &x0);
  x0_out[b * strides.aux_out + i] = x0;
}

// One thread per latent vector; the codebook and its norms sit in shared memory.
__global__ void vq_kernel(const float* z, int64_t z_stride, const float* codes, int64_t num_codes,
                          int64_t dim, int64_t batch, int64_t plane, float* out, int64_t out_stride,
                          int64_t* indices) {
  extern __shared__ float shared[];
  float* codes_s = shared;                   // [K, D]
  float* norms_s = shared + num_codes * dim;  // [K]
  for (int64_t j = threadIdx.x; j < num_codes * dim; j += blockDim.x) codes_s[j] = codes[j];
  __syncthreads();
  for (int64_t k = threadIdx.x; k < num_codes; k += blockDim.x) {
    float norm = 0.0f;
    for (int64_t d = 0; d < dim; ++d) norm = norm + codes_s[k * dim + d] * codes_s[k * dim + d];
    norms_s[k] = norm;
  }
  __syncthreads();
  const int64_t job = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (job >= batch * plane) return;
  const int64_t b = job / plane, pos = job % plane;
  const float* v = z + b * z_stride + pos;
  float norm = 0.0f;
  for (int64_t d = 0; d < dim; ++d) norm = norm + v[d * plane] * v[d * plane];
  int64_t best = 0;
  float best_distance = INFINITY;
  for (int64_t k = 0; k < num_codes; ++k) {
    float dot = 0.0f;
    for (int64_t d = 0; d < dim; ++d) dot = dot + v[d * plane] * codes_s[k * dim + d];
    const float distance = (norm + norms_s[k]) - 2.0f * dot;
    if (distance < best_distance) {  // strict: ties keep the lowest index
      best_distance = distance;
      best = k;
    }
  }
  for (int64_t d = 0; d < dim; ++d) out[b * out_stride + d * plane + pos] = codes_s[best * dim + d];
  if (indices != nullptr) indices[job] = best;
}

}  // namespace

void philox_normal_cuda(float* out, int64_t out_stride, const int64_t* seeds,
                        const Layout& layout, uint32_t stream_id, uint32_t step, void* stream) {
  normal_kernel<<<grid_for(layout), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, out_stride, seeds, layout, stream_id, step);
  check_launch("philox_normal");
}

void initial_latent_cuda(float* out, int64_t out_stride, const int64_t* seeds,
                         const Layout& layout, float offset, void* stream) {
  initial_latent_kernel<<<grid_for(layout), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, out_stride, seeds, layout, offset);
  check_launch("initial_latent");
}

static const char* step_name(const DDPMParams&) { return "ddpm_step"; }
static const char* step_name(const DDIMParams&) { return "ddim_step"; }

template <class Params>
void noisy_step_cuda(const float* x, const float* eps, float* out, const Strides& strides,
                     const int64_t* seeds, const Layout& layout, const Params& p,
                     const StepNoise& noise, void* stream) {
  noisy_step_kernel<Params><<<grid_for(layout), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, eps, out, strides, seeds, layout, p, noise);
  check_launch(step_name(p));
}

template void noisy_step_cuda(const float*, const float*, float*, const Strides&, const int64_t*,
                              const Layout&, const DDPMParams&, const StepNoise&, void*);
template void noisy_step_cuda(const float*, const float*, float*, const Strides&, const int64_t*,
                              const Layout&, const DDIMParams&, const StepNoise&, void*);

void dpmpp_2m_step_cuda(const float* x, const float* eps, const float* prev_x0, float* out,
                        float* x0_out, const Strides& strides, const Layout& layout,
                        const DPMParams& p, void* stream) {
  dpmpp_2m_kernel<<<grid_for(layout), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, eps, prev_x0, out, x0_out, strides, layout, p);
  check_launch("dpmpp_2m_step");
}

void vq_quantize_cuda(const float* z, int64_t z_stride, const float* codes, int64_t num_codes,
                      int64_t dim, int64_t batch, int64_t plane, float* out, int64_t out_stride,
                      int64_t* indices, void* stream) {
  const int64_t total = batch * plane;
  if (total == 0) return;
  const size_t shared = static_cast<size_t>(num_codes * (dim + 1)) * sizeof(float);
  vq_kernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, shared,
              static_cast<cudaStream_t>(stream)>>>(z, z_stride, codes, num_codes, dim, batch,
                                                  plane, out, out_stride, indices);
  check_launch("vq_quantize");
}

}  // namespace bsldm
