// Process-wide cache of generated kernels, keyed by the kernel's parameter name.
//
// - Each kernel is generated once, at first request, even when many threads ask for it at
//   the same moment (the others wait for the first one's result).
// - The cache is bounded (TORCH_DIRECTCONV_CACHE_MB, default 64) by the memory its kernels
//   keep, whole pages each: past the cap the least recently used kernels are dropped.
//   Callers hold shared_ptrs, so a kernel that is in use stays alive until its last user
//   lets go: eviction never frees running code.
// - fork() may come while other threads use the cache: the child keeps the finished kernels
//   and generates anew any that another thread was generating.
// - TORCH_DIRECTCONV_VERBOSE=1 logs every generation; TORCH_DIRECTCONV_JIT_DUMP=<dir>
//   writes each kernel to <dir>/<name>.bin.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "jit/jit_kernel.h"

namespace dc {

struct KernelCacheStats {
  int64_t generated = 0;  // kernels generated since start
  int64_t hits = 0;       // requests served from the cache
  int64_t evicted = 0;
  int64_t entries = 0;    // kernels in the cache now
  int64_t bytes = 0;      // the pages they keep mapped (code rounded up to pages, per kernel)
  int64_t cap_bytes = 0;
  double generate_ms = 0;  // total generation time
};

using KernelPtr = std::shared_ptr<const JitKernel>;

// Returns the cached kernel named `name`, or builds it with `make` (which returns the
// generator of that name). `plan` is logged in verbose mode.
KernelPtr get_kernel(const std::string& name, const std::function<std::unique_ptr<JitGenerator>()>& make,
                     const std::string& plan);

KernelCacheStats kernel_cache_stats();
void set_kernel_cache_cap_bytes(int64_t cap);
void clear_kernel_cache();
bool verbose();

}  // namespace dc
