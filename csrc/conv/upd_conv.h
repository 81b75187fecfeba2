// Weight update (the gradient of the weights): plan and driver (DESIGN.md section 6).
// Layouts: input (N, Cb, H, W, V), output gradient (N, Kb, P, Q, V), dW (Kb, Cb, R, S, V, V).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "conv/conv_desc.h"
#include "jit/kernel_cache.h"
#include "jit/upd_kernel.h"

namespace dc {

struct UpdCall {
  int32_t kernel;
  int32_t flags;  // kAccumulate except on a tile's first call
  int32_t n_imgs, n_rows, n_px;
  int32_t part;   // which private copy of dW (minibatch split), else 0
  int64_t x_off, dy_off, dw_off;
};

struct UpdPlan {
  ConvDesc desc;
  Isa isa = Isa::avx512;
  int threads = 1;
  int64_t cb = 0, kb = 0;
  int n_c = 1, n_kb = 1;       // register tile
  int64_t cb_group = 1;        // input-channel blocks of one work unit
  int64_t rows_per_block = 1;  // output rows whose gradient stays in L2 while every tap uses it
  // Work units are (output-channel group, input-channel-block group); when that is faster by the
  // plan's estimate (few units for the threads), the minibatch is also split into `parts`,
  // each reducing into a private copy of dW that the caller sums afterwards.
  int parts = 1;
  std::vector<UpdKernelSpec> kernels;
  std::vector<std::vector<UpdCall>> streams;
  UpdCallArgs strides{};

  int v() const { return vlen(isa); }
  int64_t dw_elements() const { return kb * cb * desc.r * desc.s * v() * v(); }
  std::string to_string() const;
};

UpdPlan make_upd_plan(const ConvDesc& desc, Isa isa, int threads);

struct UpdPrimitive {
  UpdPlan plan;
  std::string info;
};
struct UpdKernels {
  std::vector<KernelPtr> held;
  std::vector<UpdKernelFn> fns;
};
std::shared_ptr<const UpdPrimitive> get_upd_primitive(const ConvDesc& desc, Isa isa, int threads);
UpdKernels acquire_kernels(const UpdPrimitive& prim);
void clear_upd_primitives();

// Thread tid's share. dw holds plan.parts copies of dW, one after the other; every element
// of each is written (no need to zero them first).
void upd_execute(const UpdPrimitive& prim, const UpdKernels& kernels, const float* x, const float* dy, float* dw,
                 int tid);

}  // namespace dc
