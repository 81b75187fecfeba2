// A minimal check harness for the C++ tests: CHECK records failures, main reports them.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace dc_test {
inline int& failures() {
  static int f = 0;
  return f;
}
}  // namespace dc_test

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      ++dc_test::failures();                                          \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                              \
      std::fprintf(stderr, "\n");                                     \
    }                                                                 \
  } while (0)

#define TEST_MAIN_END(name)                                                      \
  do {                                                                           \
    std::printf("%s: %s\n", name, dc_test::failures() ? "FAILED" : "passed");  \
    return dc_test::failures() ? 1 : 0;                                          \
  } while (0)
