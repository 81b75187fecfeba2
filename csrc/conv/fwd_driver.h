// Forward driver: replays one thread's recorded kernel stream. It loops and never emits code.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "conv/fwd_plan.h"
#include "jit/kernel_cache.h"

namespace dc {

// A plan, cached so that repeated calls skip planning. Its kernels are owned by the
// kernel cache alone, so TORCH_DIRECTCONV_CACHE_MB bounds the code kept alive.
struct FwdPrimitive {
  FwdPlan plan;
  std::string info;  // plan.to_string(), for the verbose log
};

// The primitive's kernels, generated or taken from the kernel cache, held for one run:
// the cache may drop them meanwhile, but never frees code that is in use.
struct FwdKernels {
  std::vector<KernelPtr> held;
  std::vector<FwdKernelFn> fns;
};
FwdKernels acquire_kernels(const FwdPrimitive& prim);

// Cached by (problem, ISA, threads); the primitive cache keeps the 256 most recently used.
std::shared_ptr<const FwdPrimitive> get_fwd_primitive(const ConvDesc& desc, Isa isa, int threads,
                                                      const FwdPlanOptions& options = {});
void clear_fwd_primitives();

// Runs thread tid's share. Blocked pointers: src (N, Cb, H, W, V), wei (Kb, Cb, R, S, V, V),
// bias (Kb * V) or null, dst (N, Kb, P, Q, V).
void fwd_execute(const FwdPrimitive& prim, const FwdKernels& kernels, const float* src, const float* wei, const float* bias, float* dst, bool relu,
                 int tid);

}  // namespace dc
