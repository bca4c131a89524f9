// Unit test of the plain-C++ schedule core (no torch, no Python); run by ctest.
//
// Uses its own CHECK instead of assert() so that a Release build (-DNDEBUG) still tests.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "schedule.h"

namespace {

// Expected values for the cross-language agreement checks below, printed with Python's repr()
// (shortest round-trip form, so each literal parses back to exactly the same double).
constexpr double kCosineBeta0 = 4.128422369831242e-05;
constexpr double kCosineBeta1 = 4.614175122696906e-05;
constexpr double kCosineBeta499 = 0.003145886119455099;
constexpr double kCosineBeta998 = 0.7499994039535522;
constexpr double kCosineAlphaBar0 = 0.9999586939811707;
constexpr double kCosineAlphaBar1 = 0.9999125599861145;
constexpr double kCosineAlphaBar499 = 0.4938434660434723;
constexpr double kCosineAlphaBar998 = 2.428766265438753e-06;
constexpr double kCosineAlphaBar999 = 2.4287349909002387e-09;
constexpr double kCosineRawBeta0 = 4.128422482196914e-05;
constexpr double kCosineRawBeta499 = 0.0031458862304780677;
constexpr double kCosine4000RawBeta2286 = 0.000987956777433463;
constexpr double kCosine4000RawBeta2287 = 0.0009887484467376861;
constexpr double kLinearRawBeta1 = 0.0008192192192192192;
constexpr double kLinearRawBeta500 = 0.010409609609609611;
constexpr double kLinearRawBeta998 = 0.01998078078078078;
constexpr double kLinearAlphaBar999 = 2.837011925294064e-05;

// Compares bit patterns so that a mismatch in the last bit is reported with both values.
#define CHECK_BITS_EQ(actual, expected)                                                       \
  do {                                                                                        \
    const double a_ = (actual), e_ = (expected);                                              \
    if (std::memcmp(&a_, &e_, sizeof(double)) != 0) {                                         \
      std::fprintf(stderr, "%s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #actual, \
                   a_, e_);                                                                   \
      ++bsldm_test::failures;                                                                             \
    }                                                                                         \
  } while (0)

template <typename F>
bool throws_invalid_argument(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& error) {
    return std::strlen(error.what()) > 0;
  }
  return false;
}

bool is_float32(double x) { return static_cast<double>(static_cast<float>(x)) == x; }

// Properties every valid table must have, whatever the schedule.
void check_invariants(const bsldm::ScheduleTables& t, int64_t T) {
  CHECK(static_cast<int64_t>(t.betas.size()) == T);
  CHECK(static_cast<int64_t>(t.alphas_cumprod.size()) == T);
  for (size_t i = 0; i < t.betas.size(); ++i) {
    const double beta = t.betas[i], ab = t.alphas_cumprod[i];
    CHECK(beta > 0.0 && beta <= static_cast<double>(static_cast<float>(bsldm::kMaxBeta)));
    CHECK(ab > 0.0 && ab < 1.0);
    CHECK(is_float32(beta) && is_float32(ab));
    if (i > 0) CHECK(ab < t.alphas_cumprod[i - 1]);
  }
  const float beta0 = static_cast<float>(t.betas[0]);
  CHECK_BITS_EQ(t.alphas_cumprod[0], static_cast<double>(1.0f - beta0));
}

void test_cosine() {
  for (int64_t T : {1, 2, 10, 769, 1000, 4000}) {
    check_invariants(bsldm::schedule_tables(T, "squaredcos_cap_v2"), T);
  }
  // beta_start and beta_end mean nothing to the cosine schedule, even invalid ones.
  const auto a = bsldm::schedule_tables(1000, "squaredcos_cap_v2");
  const auto b = bsldm::schedule_tables(1000, "squaredcos_cap_v2", -5.0, 7.0);
  CHECK(a.betas == b.betas && a.alphas_cumprod == b.alphas_cumprod);

  // The last step is capped: alpha_bar(1) = cos(pi/2)^2 is ~1e-33.
  CHECK_BITS_EQ(a.betas.back(), static_cast<double>(static_cast<float>(bsldm::kMaxBeta)));
  CHECK_BITS_EQ(bsldm::cosine_betas(1)[0], bsldm::kMaxBeta);

  // Cross-language agreement only: these are repr() of
  // bsldm_fast.diffusion.schedule.reference_tables(1000, 'squaredcos_cap_v2') (numpy 2.4, glibc
  // 2.36, x86-64), not independently derived truths. A mismatch means the C++ and Python
  // computations diverged (evaluation order, pow vs x*x, FMA contraction, rounding).
  CHECK_BITS_EQ(a.betas[0], kCosineBeta0);
  CHECK_BITS_EQ(a.betas[1], kCosineBeta1);
  CHECK_BITS_EQ(a.betas[499], kCosineBeta499);
  CHECK_BITS_EQ(a.betas[998], kCosineBeta998);
  CHECK_BITS_EQ(a.alphas_cumprod[0], kCosineAlphaBar0);
  CHECK_BITS_EQ(a.alphas_cumprod[1], kCosineAlphaBar1);
  CHECK_BITS_EQ(a.alphas_cumprod[499], kCosineAlphaBar499);
  CHECK_BITS_EQ(a.alphas_cumprod[998], kCosineAlphaBar998);
  CHECK_BITS_EQ(a.alphas_cumprod[999], kCosineAlphaBar999);
  const std::vector<double> raw = bsldm::cosine_betas(1000);
  CHECK_BITS_EQ(raw[0], kCosineRawBeta0);
  CHECK_BITS_EQ(raw[499], kCosineRawBeta499);
  // With glibc 2.36, the two entries of T = 4000 whose last bit differs if cos(.)^2 is computed
  // as c * c instead of libm pow(c, 2) as Python's ** does.
  const std::vector<double> raw4000 = bsldm::cosine_betas(4000);
  CHECK_BITS_EQ(raw4000[2286], kCosine4000RawBeta2286);
  CHECK_BITS_EQ(raw4000[2287], kCosine4000RawBeta2287);
}

void test_linear() {
  for (int64_t T : {1, 2, 10, 769, 1000, 4000}) {
    check_invariants(bsldm::schedule_tables(T, "linear"), T);
  }
  // numpy.linspace puts both ends exactly, and a single step is just the start.
  const std::vector<double> lin = bsldm::linear_betas(769, 0.0008, 0.02);
  CHECK_BITS_EQ(lin.front(), 0.0008);
  CHECK_BITS_EQ(lin.back(), 0.02);
  CHECK_BITS_EQ(bsldm::linear_betas(1, 0.0008, 0.02)[0], 0.0008);
  const std::vector<double> flat = bsldm::linear_betas(5, 0.01, 0.01);
  for (double beta : flat) CHECK_BITS_EQ(beta, 0.01);

  // Cross-language agreement only: repr() of numpy.linspace(0.0008, 0.02, 1000) entries.
  const std::vector<double> l1000 = bsldm::linear_betas(1000, 0.0008, 0.02);
  CHECK_BITS_EQ(l1000[1], kLinearRawBeta1);
  CHECK_BITS_EQ(l1000[500], kLinearRawBeta500);
  CHECK_BITS_EQ(l1000[998], kLinearRawBeta998);
  const auto t = bsldm::schedule_tables(1000, "linear");
  CHECK_BITS_EQ(t.alphas_cumprod[999], kLinearAlphaBar999);
}

void test_invalid_inputs() {
  CHECK(throws_invalid_argument([] { bsldm::schedule_tables(0, "squaredcos_cap_v2"); }));
  CHECK(throws_invalid_argument([] { bsldm::schedule_tables(-3, "linear"); }));
  CHECK(throws_invalid_argument([] { bsldm::schedule_tables(10, "cosine"); }));
  CHECK(throws_invalid_argument([] { bsldm::schedule_tables(10, ""); }));
  CHECK(throws_invalid_argument([] { bsldm::schedule_tables(10, "linear", 0.0, 0.02); }));
  CHECK(throws_invalid_argument([] { bsldm::schedule_tables(10, "linear", 0.02, 0.001); }));
  CHECK(throws_invalid_argument([] { bsldm::schedule_tables(10, "linear", 0.1, 1.0); }));
  CHECK(throws_invalid_argument([] { bsldm::schedule_tables(10, "linear", std::nan(""), 0.02); }));
  try {
    bsldm::schedule_tables(10, "cosine");
  } catch (const std::invalid_argument& error) {
    CHECK(std::string(error.what()).find("cosine") != std::string::npos);
  }
}

}  // namespace

int main() {
  test_cosine();
  test_linear();
  test_invalid_inputs();
  return bsldm_test::report("test_schedule");
}
