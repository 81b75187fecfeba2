// Forward driver: replays one thread's recorded kernel stream. It loops and never emits code.
#pragma once

#include <atomic>
#include <functional>
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
// Forgets every primitive and handle (the handles at their threads' next call).
void clear_fwd_primitives();

// What a call of one convolution needs, made once per (problem, ISA, threads, options) and
// calling thread: its primitive (plan, streams, scratch sizes) and its kernels. A call finds
// it by comparing integers, with no string built and no lock taken; it holds its kernels, so
// evicting them from the kernel cache never invalidates a handle in use. Each thread keeps
// its kThreadHandles most recently made, and the code they hold (a few pages each) on top of
// the kernel cache's cap.
struct FwdHandle {
  std::shared_ptr<const FwdPrimitive> prim;
  FwdKernels kernels;
};
constexpr int kThreadHandles = 32;
std::shared_ptr<const FwdHandle> get_fwd_handle(const ConvDesc& desc, Isa isa, int threads,
                                                const FwdPlanOptions& options = {});
// The same for make_fwd_plan_nchw_1x1.
std::shared_ptr<const FwdPrimitive> get_fwd_nchw_1x1_primitive(const ConvDesc& desc, Isa isa, int threads,
                                                               bool accumulate, bool relu);

// Shared by the threads of one run: how many units of each thread's stream are taken.
class FwdWorkQueue {
 public:
  explicit FwdWorkQueue(int threads) : next_(new std::atomic<int64_t>[threads]) {
    for (int i = 0; i < threads; ++i) next_[i] = 0;
  }
  int64_t take(int stream) { return next_[stream].fetch_add(1, std::memory_order_relaxed); }

 private:
  std::unique_ptr<std::atomic<int64_t>[]> next_;
};

// The operands of the plan's post-ops (FwdPostOps): each is read or written only when the
// post-ops name it, and must then be given.
struct FwdPostArgs {
  const float* bias = nullptr;         // (Kb * V)
  const float* residual = nullptr;     // laid out as dst
  const float* stats_shift = nullptr;  // (Kb * V)
  float* stats = nullptr;              // the tile sums, plan.stats_floats (conv/fwd_stats.h)
};

// Runs thread tid's share. With a queue, a thread that finishes its own stream early takes
// the remaining units of the others, whole, so a thread slowed down by the machine does
// not hold the run up; without one, it runs exactly its own stream. Blocked pointers: src (N, Cb, H, W, V), wei (Kb, Cb, R, S, V, V),
// dst (N, Kb, P, Q, V).
void fwd_execute(const FwdPrimitive& prim, const FwdKernels& kernels, const float* src, const float* wei,
                 const FwdPostArgs& post, float* dst, int tid, FwdWorkQueue* queue = nullptr);

// As fwd_execute, with each work unit's weights prepared just before its calls:
// prepare(the unit's first call) returns the base that the unit's calls add their weight
// offsets to (its output-channel group's weights, which are all the unit reads).
using FwdPrepare = std::function<const float*(const FwdCall& first)>;
void fwd_execute_prepared(const FwdPrimitive& prim, const FwdKernels& kernels, const float* src,
                          const FwdPrepare& prepare, const FwdPostArgs& post, float* dst, int tid,
                          FwdWorkQueue* queue = nullptr);

}  // namespace dc
