// Minimal assertion helpers for the C++ kernel tests (run by ctest): no test
// framework to fetch, a readable message per failure, at most 20 printed.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace llmopt_test {
inline int& failures() {
  static int n = 0;
  return n;
}
// Prints the verdict; returns main()'s exit status.
inline int finish(const char* name) {
  if (failures() != 0) {
    std::fprintf(stderr, "%s: %d failure(s)\n", name, failures());
    return 1;
  }
  std::printf("%s: all passed\n", name);
  return 0;
}
}  // namespace llmopt_test

#define CHECK(cond, ...)                                            \
  do {                                                              \
    if (!(cond)) {                                                  \
      ++llmopt_test::failures();                                    \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);     \
      std::fprintf(stderr, __VA_ARGS__);                            \
      std::fprintf(stderr, "\n");                                   \
      if (llmopt_test::failures() > 20) std::exit(1);               \
    }                                                               \
  } while (0)
