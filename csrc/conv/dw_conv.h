// Depthwise convolution (groups == channels == output channels): plan and driver.
// Layouts: input (N, Cb, H, W, V), weights (Cb, R, S, V), output (N, Cb, P, Q, V).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "conv/conv_desc.h"
#include "jit/dw_kernel.h"
#include "jit/kernel_cache.h"

namespace dc {

struct DwCall {
  int32_t kernel;
  int32_t n_r;
  int64_t src_off, wei_off, dst_off, bias_off;
};

// desc.c is the channel count (desc.k must equal it).
struct DwPlan {
  ConvDesc desc;
  Isa isa = Isa::avx512;
  int threads = 1;
  int64_t cb = 0;
  int tile_ow = 1;
  std::vector<DwKernelSpec> kernels;
  std::vector<std::vector<DwCall>> streams;
  int64_t src_r_stride = 0;

  int v() const { return vlen(isa); }
  std::string to_string() const;
};

DwPlan make_dw_plan(const ConvDesc& desc, Isa isa, int threads);

// As FwdPrimitive and FwdKernels: the plan is cached, the kernels are held per run.
struct DwPrimitive {
  DwPlan plan;
  std::string info;
};
struct DwKernels {
  std::vector<KernelPtr> held;
  std::vector<DwKernelFn> fns;
};
DwKernels acquire_kernels(const DwPrimitive& prim);

std::shared_ptr<const DwPrimitive> get_dw_primitive(const ConvDesc& desc, Isa isa, int threads);
void clear_dw_primitives();
void dw_execute(const DwPrimitive& prim, const DwKernels& kernels, const float* src, const float* wei, const float* bias, float* dst, bool relu,
                int tid);

}  // namespace dc
