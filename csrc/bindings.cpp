// The extension module bsldm_fast._C: thin torch wrappers over the plain-C++ core in csrc/.
//
// Error convention: argument errors throw std::invalid_argument (pybind11 raises ValueError);
// TORCH_CHECK would raise RuntimeError, which callers could not tell apart from a real failure.

#include <torch/extension.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "philox.h"
#include "schedule.h"

namespace {

// A CPU float64 tensor that owns a copy of `values` (from_blob alone would dangle).
torch::Tensor to_float64_tensor(const std::vector<double>& values) {
  auto out = torch::empty({static_cast<int64_t>(values.size())},
                          torch::TensorOptions().dtype(torch::kFloat64).device(torch::kCPU));
  if (!values.empty()) {
    std::memcpy(out.data_ptr<double>(), values.data(), values.size() * sizeof(double));
  }
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> schedule_tables(int64_t num_timesteps,
                                                         const std::string& beta_schedule,
                                                         double beta_start, double beta_end) {
  const bsldm::ScheduleTables tables =
      bsldm::schedule_tables(num_timesteps, beta_schedule, beta_start, beta_end);
  return {to_float64_tensor(tables.betas), to_float64_tensor(tables.alphas_cumprod)};
}

std::tuple<uint32_t, uint32_t, uint32_t, uint32_t> philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                              uint32_t c3, uint32_t k0, uint32_t k1) {
  const bsldm::Philox4 r = bsldm::philox4x32_10(c0, c1, c2, c3, k0, k1);
  return {r.v[0], r.v[1], r.v[2], r.v[3]};
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled ops of bsldm_fast; each has a PyTorch reference it must match.";

  m.def("schedule_tables", &schedule_tables, py::arg("num_timesteps"), py::arg("beta_schedule"),
        py::arg("beta_start") = 0.0008, py::arg("beta_end") = 0.02,
        R"doc(Noise schedule tables (betas, alphas_cumprod) as float64 CPU tensors of shape [T].

Bit-exact twin of bsldm_fast.diffusion.schedule.reference_tables: the float32 values of diffusers'
DDPMScheduler, widened to float64. beta_schedule is 'squaredcos_cap_v2' (beta_start and beta_end
ignored) or 'linear'. Raises ValueError for invalid arguments.)doc");

  m.def("philox4x32_10", &philox4x32_10, py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
        py::arg("k0"), py::arg("k1"),
        "Philox4x32-10 of one counter (c0..c3) and key (k0, k1): the noise stream's generator "
        "(csrc/philox.h). The fused sampler ops are torch.ops.bsldm_fast.*.");

  m.def("with_cuda", &with_cuda, "Whether this build includes the CUDA sources.");
}
