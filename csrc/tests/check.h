// The C++ unit tests' check macro: a failed check is reported with its line and counted, so one
// run lists every failure; `report` turns the count into the exit status.
#pragma once

#include <cstdio>

namespace bsldm_test {

inline int failures = 0;

inline int report(const char* test) {
  if (failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", test);
  return 0;
}

}  // namespace bsldm_test

#define CHECK(cond)                                                                \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++bsldm_test::failures;                                                      \
    }                                                                              \
  } while (0)
