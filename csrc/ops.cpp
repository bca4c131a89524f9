// Torch ops over the fused sampler kernels (sampler_kernels.h), registered with torch.library as
// torch.ops.bsldm_fast.*: CPU kernels always, CUDA kernels when built WITH_CUDA. Their fake
// (meta) implementations live in bsldm_fast/kernels/__init__.py. Every op writes into `out`
// tensors it is given and returns nothing, so a step can write into a slice of the U-Net input.
//
// Errors in arguments raise ValueError (TORCH_CHECK_VALUE), with the op's name.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "sampler_kernels.h"

#define CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace {

// Whether each sample t[b] is one contiguous block (any stride between samples).
bool samples_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

void check_batched(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  CHECK_VALUE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ", ref.device());
  CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected ", ref.sizes());
  CHECK_VALUE(samples_contiguous(t), op, ": each sample of ", name,
              " must be contiguous (a batch-strided slice such as U[:, :4] is fine)");
}

// [B, C, h, w] (or [B, N]): the per-sample layout.
bsldm::Layout layout_of(const char* op, const at::Tensor& t) {
  CHECK_VALUE(t.dim() >= 2, op, ": expected a batched tensor [B, ...], got shape ", t.sizes());
  const int64_t inner = t.numel() == 0 ? 0 : t[0].numel();
  CHECK_VALUE(inner < (int64_t(1) << 32), op, ": a sample of ", inner, " elements exceeds 2^32");
  const int64_t plane = t.dim() >= 4 ? t.size(-1) * t.size(-2) : 1;
  return bsldm::Layout{t.size(0), inner, plane > 0 ? plane : 1};
}

void check_seeds(const char* op, const at::Tensor& seeds, const at::Tensor& ref) {
  CHECK_VALUE(seeds.scalar_type() == at::kLong, op, ": seeds must be int64, got ", seeds.scalar_type());
  CHECK_VALUE(seeds.device() == ref.device(), op, ": seeds are on ", seeds.device(), ", expected ", ref.device());
  CHECK_VALUE(seeds.dim() == 1 && seeds.size(0) == ref.size(0), op, ": seeds must have shape [",
              ref.size(0), "], got ", seeds.sizes());
  CHECK_VALUE(seeds.is_contiguous(), op, ": seeds must be contiguous");
}

uint32_t check_u32(const char* op, const char* name, int64_t value) {
  CHECK_VALUE(value >= 0 && value <= int64_t(0xffffffff), op, ": ", name, " must be in [0, 2^32), got ", value);
  return static_cast<uint32_t>(value);
}

float clip_value(double clip) {
  CHECK_VALUE(!(clip <= 0.0), "clip must be positive (inf for no clipping), got ", clip);
  return static_cast<float>(clip);
}

bsldm::Strides strides_of(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& out,
                          const at::Tensor* aux_in = nullptr, const at::Tensor* aux_out = nullptr) {
  return bsldm::Strides{x.stride(0), eps.stride(0), out.stride(0),
                        aux_in ? aux_in->stride(0) : 0, aux_out ? aux_out->stride(0) : 0};
}

#ifdef WITH_CUDA
void* cuda_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
#endif

void philox_normal(const at::Tensor& seeds, int64_t stream, int64_t step, at::Tensor& out) {
  const char* op = "philox_normal";
  check_batched(op, "out", out, out);
  check_seeds(op, seeds, out);
  const auto layout = layout_of(op, out);
  const uint32_t s = check_u32(op, "stream", stream), k = check_u32(op, "step", step);
  if (out.numel() == 0) return;
#ifdef WITH_CUDA
  if (out.is_cuda()) {
    const c10::cuda::CUDAGuard guard(out.device());
    bsldm::philox_normal_cuda(out.data_ptr<float>(), out.stride(0), seeds.data_ptr<int64_t>(),
                              layout, s, k, cuda_stream(out));
    return;
  }
#endif
  bsldm::philox_normal_cpu(out.data_ptr<float>(), out.stride(0), seeds.data_ptr<int64_t>(), layout, s, k);
}

void initial_latent(const at::Tensor& seeds, double offset, at::Tensor& out) {
  const char* op = "initial_latent";
  check_batched(op, "out", out, out);
  check_seeds(op, seeds, out);
  const auto layout = layout_of(op, out);
  if (out.numel() == 0) return;
#ifdef WITH_CUDA
  if (out.is_cuda()) {
    const c10::cuda::CUDAGuard guard(out.device());
    bsldm::initial_latent_cuda(out.data_ptr<float>(), out.stride(0), seeds.data_ptr<int64_t>(),
                               layout, static_cast<float>(offset), cuda_stream(out));
    return;
  }
#endif
  bsldm::initial_latent_cpu(out.data_ptr<float>(), out.stride(0), seeds.data_ptr<int64_t>(), layout,
                            static_cast<float>(offset));
}

// DDPM and DDIM: the same checks and dispatch; `make_params` runs after the tensor checks, so
// those errors come first.
template <class MakeParams>
void noisy_step(const char* op, const at::Tensor& x, const at::Tensor& eps, const at::Tensor& seeds,
                int64_t step, double noise_std, double offset, at::Tensor& out, MakeParams make_params) {
  check_batched(op, "x", x, out);
  check_batched(op, "eps", eps, out);
  check_batched(op, "out", out, out);
  check_seeds(op, seeds, out);
  const auto layout = layout_of(op, out);
  const auto p = make_params();
  const bsldm::StepNoise noise{check_u32(op, "step", step), float(noise_std), float(offset)};
  if (out.numel() == 0) return;
#ifdef WITH_CUDA
  if (out.is_cuda()) {
    const c10::cuda::CUDAGuard guard(out.device());
    bsldm::noisy_step_cuda(x.data_ptr<float>(), eps.data_ptr<float>(), out.data_ptr<float>(),
                           strides_of(x, eps, out), seeds.data_ptr<int64_t>(), layout, p, noise,
                           cuda_stream(out));
    return;
  }
#endif
  bsldm::noisy_step_cpu(x.data_ptr<float>(), eps.data_ptr<float>(), out.data_ptr<float>(),
                        strides_of(x, eps, out), seeds.data_ptr<int64_t>(), layout, p, noise);
}

void ddpm_step(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& seeds, int64_t step,
               double sqrt_ab, double sqrt_1mab, double clip, double x0_coeff, double x_coeff,
               double noise_std, double offset, at::Tensor& out) {
  noisy_step("ddpm_step", x, eps, seeds, step, noise_std, offset, out, [&] {
    return bsldm::DDPMParams{float(sqrt_ab), float(sqrt_1mab), clip_value(clip), float(x0_coeff),
                             float(x_coeff)};
  });
}

void ddim_step(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& seeds, int64_t step,
               double sqrt_ab, double sqrt_1mab, double clip, double x0_coeff, double eps_coeff,
               double noise_std, double offset, at::Tensor& out) {
  noisy_step("ddim_step", x, eps, seeds, step, noise_std, offset, out, [&] {
    return bsldm::DDIMParams{float(sqrt_ab), float(sqrt_1mab), clip_value(clip), float(x0_coeff),
                             float(eps_coeff), std::isfinite(clip)};
  });
}

void dpmpp_2m_step(const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& prev_x0,
                   double sqrt_ab, double sqrt_1mab, double clip, double x_coeff, double d_coeff,
                   double w_cur, double w_prev, bool last, at::Tensor& out, at::Tensor& x0_out) {
  const char* op = "dpmpp_2m_step";
  check_batched(op, "x", x, out);
  check_batched(op, "eps", eps, out);
  check_batched(op, "out", out, out);
  check_batched(op, "x0_out", x0_out, out);
  const bool has_prev = prev_x0.has_value() && prev_x0->defined();
  if (has_prev) check_batched(op, "prev_x0", *prev_x0, out);
  const auto layout = layout_of(op, out);
  const bsldm::DPMParams p{float(sqrt_ab), float(sqrt_1mab), clip_value(clip), float(x_coeff),
                           float(d_coeff), float(w_cur), float(w_prev), has_prev, last};
  const at::Tensor* prev = has_prev ? &*prev_x0 : nullptr;
  const float* prev_ptr = has_prev ? prev->data_ptr<float>() : nullptr;
  const auto strides = strides_of(x, eps, out, prev, &x0_out);
  if (out.numel() == 0) return;
#ifdef WITH_CUDA
  if (out.is_cuda()) {
    const c10::cuda::CUDAGuard guard(out.device());
    bsldm::dpmpp_2m_step_cuda(x.data_ptr<float>(), eps.data_ptr<float>(), prev_ptr,
                              out.data_ptr<float>(), x0_out.data_ptr<float>(), strides, layout, p,
                              cuda_stream(out));
    return;
  }
#endif
  bsldm::dpmpp_2m_step_cpu(x.data_ptr<float>(), eps.data_ptr<float>(), prev_ptr,
                           out.data_ptr<float>(), x0_out.data_ptr<float>(), strides, layout, p);
}

void vq_quantize(const at::Tensor& z, const at::Tensor& codes, at::Tensor& out, at::Tensor& indices) {
  const char* op = "vq_quantize";
  CHECK_VALUE(z.dim() == 4, op, ": z must be [B, D, h, w], got ", z.sizes());
  check_batched(op, "z", z, z);
  check_batched(op, "out", out, z);
  CHECK_VALUE(codes.scalar_type() == at::kFloat && codes.dim() == 2 && codes.is_contiguous(), op,
              ": codes must be a contiguous float32 [K, D] tensor, got ", codes.sizes(), " ", codes.scalar_type());
  CHECK_VALUE(codes.size(1) == z.size(1) && codes.size(0) >= 1, op, ": codes ", codes.sizes(),
              " do not fit latents with ", z.size(1), " channels");
  CHECK_VALUE(codes.device() == z.device(), op, ": codes are on ", codes.device(), ", expected ", z.device());
  CHECK_VALUE(indices.scalar_type() == at::kLong && indices.is_contiguous() && indices.device() == z.device() &&
                  indices.dim() == 3 && indices.size(0) == z.size(0) && indices.size(1) == z.size(2) &&
                  indices.size(2) == z.size(3),
              op, ": indices must be a contiguous int64 [B, h, w] tensor on ", z.device());
  const int64_t plane = z.size(2) * z.size(3);
  if (z.numel() == 0) return;
#ifdef WITH_CUDA
  if (z.is_cuda()) {
    const c10::cuda::CUDAGuard guard(z.device());
    bsldm::vq_quantize_cuda(z.data_ptr<float>(), z.stride(0), codes.data_ptr<float>(), codes.size(0),
                            codes.size(1), z.size(0), plane, out.data_ptr<float>(), out.stride(0),
                            indices.data_ptr<int64_t>(), cuda_stream(z));
    return;
  }
#endif
  bsldm::vq_quantize_cpu(z.data_ptr<float>(), z.stride(0), codes.data_ptr<float>(), codes.size(0),
                         codes.size(1), z.size(0), plane, out.data_ptr<float>(), out.stride(0),
                         indices.data_ptr<int64_t>());
}

}  // namespace

TORCH_LIBRARY(bsldm_fast, m) {
  m.def("philox_normal(Tensor seeds, int stream, int step, Tensor(a!) out) -> ()");
  m.def("initial_latent(Tensor seeds, float offset, Tensor(a!) out) -> ()");
  m.def("ddpm_step(Tensor x, Tensor eps, Tensor seeds, int step, float sqrt_ab, float sqrt_1mab, "
        "float clip, float x0_coeff, float x_coeff, float noise_std, float offset, Tensor(a!) out) -> ()");
  m.def("ddim_step(Tensor x, Tensor eps, Tensor seeds, int step, float sqrt_ab, float sqrt_1mab, "
        "float clip, float x0_coeff, float eps_coeff, float noise_std, float offset, Tensor(a!) out) -> ()");
  m.def("dpmpp_2m_step(Tensor x, Tensor eps, Tensor? prev_x0, float sqrt_ab, float sqrt_1mab, "
        "float clip, float x_coeff, float d_coeff, float w_cur, float w_prev, bool last, "
        "Tensor(a!) out, Tensor(b!) x0_out) -> ()");
  m.def("vq_quantize(Tensor z, Tensor codes, Tensor(a!) out, Tensor(b!) indices) -> ()");
}

TORCH_LIBRARY_IMPL(bsldm_fast, CPU, m) {
  m.impl("philox_normal", &philox_normal);
  m.impl("initial_latent", &initial_latent);
  m.impl("ddpm_step", &ddpm_step);
  m.impl("ddim_step", &ddim_step);
  m.impl("dpmpp_2m_step", &dpmpp_2m_step);
  m.impl("vq_quantize", &vq_quantize);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(bsldm_fast, CUDA, m) {
  m.impl("philox_normal", &philox_normal);
  m.impl("initial_latent", &initial_latent);
  m.impl("ddpm_step", &ddpm_step);
  m.impl("ddim_step", &ddim_step);
  m.impl("dpmpp_2m_step", &dpmpp_2m_step);
  m.impl("vq_quantize", &vq_quantize);
}
#endif
