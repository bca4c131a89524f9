#include "schedule.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

// Bit-exactness with the Python reference relies on every operation being rounded on its own:
// build with -ffp-contract=off (CMakeLists.txt and setup.py do), or a fused multiply-add (the GCC
// default on targets with FMA, e.g. aarch64) changes the last bit of the linear schedule.

// Validation failures are the caller's fault, so they throw std::invalid_argument, which pybind11
// turns into a Python ValueError.
#define BSLDM_CHECK(cond, ...)                                              \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::ostringstream bsldm_check_msg_;                                  \
      bsldm_check_msg_ << __VA_ARGS__;                                      \
      throw std::invalid_argument(bsldm_check_msg_.str());                  \
    }                                                                       \
  } while (0)

namespace bsldm {
namespace {

// Python's `x ** 2` on floats calls libm pow(), which in glibc is not always correctly rounded
// (it differs from x * x for roughly 1 in 1000 inputs). GCC folds pow(x, 2.0) into x * x, so the
// call goes through a volatile pointer the optimiser cannot see through.
double (*volatile libm_pow)(double, double) = [](double x, double y) { return std::pow(x, y); };

// Same expression and evaluation order as the Python reference; math.pi is this double.
double cosine_alpha_bar(double t) {
  constexpr double kPi = 3.141592653589793;
  return libm_pow(std::cos((t + 0.008) / 1.008 * kPi / 2.0), 2.0);
}

void check_num_timesteps(int64_t num_timesteps) {
  BSLDM_CHECK(num_timesteps >= 1, "num_timesteps must be >= 1, got " << num_timesteps);
}

}  // namespace

std::vector<double> cosine_betas(int64_t num_timesteps) {
  check_num_timesteps(num_timesteps);
  // Python's int / int is the correctly rounded quotient, as is double / double for these sizes.
  const double T = static_cast<double>(num_timesteps);
  std::vector<double> betas(static_cast<size_t>(num_timesteps));
  for (int64_t i = 0; i < num_timesteps; ++i) {
    const double beta = 1.0 - cosine_alpha_bar(static_cast<double>(i + 1) / T) /
                                  cosine_alpha_bar(static_cast<double>(i) / T);
    // Python's min(beta, cap) keeps beta unless the cap is strictly smaller.
    betas[static_cast<size_t>(i)] = kMaxBeta < beta ? kMaxBeta : beta;
  }
  return betas;
}

std::vector<double> linear_betas(int64_t num_timesteps, double beta_start, double beta_end) {
  check_num_timesteps(num_timesteps);
  // Written so that NaN fails too.
  BSLDM_CHECK(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0,
              "linear schedule needs 0 < beta_start <= beta_end < 1, got beta_start="
                  << beta_start << ", beta_end=" << beta_end);
  // numpy.linspace(start, stop, num): y[i] = i * step + start, each op rounded separately (not
  // start + i * (stop - start) / div, and not an FMA), with the last element forced to stop.
  std::vector<double> betas(static_cast<size_t>(num_timesteps));
  const int64_t div = num_timesteps - 1;
  const double delta = beta_end - beta_start;
  if (div == 0) {
    betas[0] = beta_start;  // numpy: 0 * delta + start
    return betas;
  }
  const double step = delta / static_cast<double>(div);
  for (int64_t i = 0; i < num_timesteps; ++i) {
    const double x = static_cast<double>(i);
    // numpy's fallback when delta / div underflows to zero (gh-5437): scale by delta last.
    const double y = step == 0.0 ? x / static_cast<double>(div) * delta : x * step;
    betas[static_cast<size_t>(i)] = y + beta_start;
  }
  betas.back() = beta_end;
  return betas;
}

ScheduleTables schedule_tables(int64_t num_timesteps, const std::string& beta_schedule,
                               double beta_start, double beta_end) {
  std::vector<double> betas64;
  if (beta_schedule == "squaredcos_cap_v2") {
    betas64 = cosine_betas(num_timesteps);
  } else if (beta_schedule == "linear") {
    betas64 = linear_betas(num_timesteps, beta_start, beta_end);
  } else {
    BSLDM_CHECK(false, "unknown beta_schedule '" << beta_schedule
                                                 << "' (expected 'squaredcos_cap_v2' or 'linear')");
  }

  // diffusers' float32 DDPMScheduler: betas and alphas in float32, cumprod accumulated in double
  // and rounded to float32 at each entry (not a float32 running product).
  ScheduleTables tables;
  tables.betas.resize(betas64.size());
  tables.alphas_cumprod.resize(betas64.size());
  double running = 1.0;
  for (size_t i = 0; i < betas64.size(); ++i) {
    const float beta = static_cast<float>(betas64[i]);
    const float alpha = 1.0f - beta;
    running *= static_cast<double>(alpha);
    tables.betas[i] = static_cast<double>(beta);
    tables.alphas_cumprod[i] = static_cast<double>(static_cast<float>(running));
  }
  return tables;
}

}  // namespace bsldm
