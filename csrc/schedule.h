// Diffusion noise-schedule tables, bit-exact twin of
// bsldm_fast.diffusion.schedule.reference_tables.
//
// Deliberately free of torch and Python so that the core can be built and unit-tested with plain
// CMake; csrc/bindings.cpp wraps it for the extension module.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bsldm {

// The largest beta of the cosine schedule; the cap keeps alpha_bar from reaching zero at t = T - 1.
inline constexpr double kMaxBeta = 0.999;

struct ScheduleTables {
  // Both hold float32 values widened to double: the model was trained against diffusers' float32
  // DDPMScheduler tables, and every later coefficient is derived from these in double.
  std::vector<double> betas;
  std::vector<double> alphas_cumprod;
};

// beta_schedule is "squaredcos_cap_v2" (beta_start and beta_end are then ignored) or "linear".
// Throws std::invalid_argument for num_timesteps < 1, an unknown schedule name, or (linear only)
// betas outside 0 < beta_start <= beta_end < 1.
ScheduleTables schedule_tables(int64_t num_timesteps, const std::string& beta_schedule,
                               double beta_start = 0.0008, double beta_end = 0.02);

// The float64 betas before rounding to float32, exposed for tests.
std::vector<double> cosine_betas(int64_t num_timesteps);
std::vector<double> linear_betas(int64_t num_timesteps, double beta_start, double beta_end);

}  // namespace bsldm
