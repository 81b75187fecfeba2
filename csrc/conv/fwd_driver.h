// Forward driver: replays one thread's recorded kernel stream. It loops and never emits code.
#pragma once

#include <memory>
#include <vector>

#include "conv/fwd_plan.h"
#include "jit/kernel_cache.h"

namespace dc {

// A plan with its generated kernels.
struct FwdPrimitive {
  FwdPlan plan;
  std::vector<KernelPtr> kernels;
  std::vector<FwdKernelFn> fns;
};

// Cached by (problem, ISA, threads); the primitive cache keeps the 256 most recently used.
std::shared_ptr<const FwdPrimitive> get_fwd_primitive(const ConvDesc& desc, Isa isa, int threads,
                                                      const FwdPlanOptions& options = {});
void clear_fwd_primitives();

// Runs thread tid's share. Blocked pointers: src (N, Cb, H, W, V), wei (Kb, Cb, R, S, V, V),
// bias (Kb * V) or null, dst (N, Kb, P, Q, V).
void fwd_execute(const FwdPrimitive& prim, const float* src, const float* wei, const float* bias, float* dst, bool relu,
                 int tid);

}  // namespace dc
