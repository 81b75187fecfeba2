#include "conv/fwd_driver.h"

#include <cstdint>

#include "conv/driver_util.h"

namespace dc {

namespace {

std::shared_ptr<const FwdPrimitive> build(const ConvDesc& desc, Isa isa, int threads, const FwdPlanOptions& options) {
  auto prim = std::make_shared<FwdPrimitive>();
  prim->plan = make_fwd_plan(desc, isa, threads, options);
  prim->info = prim->plan.to_string();
  acquire_kernels(*prim);  // generate them now, at the first call
  return prim;
}

PrimitiveCache<FwdPrimitive>& primitives() {
  static auto* c = new PrimitiveCache<FwdPrimitive>();  // never destroyed, like the kernel cache
  return *c;
}

}  // namespace

std::shared_ptr<const FwdPrimitive> get_fwd_primitive(const ConvDesc& desc, Isa isa, int threads,
                                                      const FwdPlanOptions& options) {
  return primitives().get(desc.to_string() + "/" + isa_name(isa) + "/" + std::to_string(threads) + "/" + options.key(),
                          [&] { return build(desc, isa, threads, options); });
}
void clear_fwd_primitives() { primitives().clear(); }

FwdKernels acquire_kernels(const FwdPrimitive& prim) {
  FwdKernels k;
  for (const FwdKernelSpec& sp : prim.plan.kernels) {
    k.held.push_back(get_kernel(sp.name(), [&] { return make_fwd_kernel(sp); }, prim.info));
    k.fns.push_back(k.held.back()->entry<FwdKernelFn>());
  }
  return k;
}

void fwd_execute(const FwdPrimitive& prim, const FwdKernels& kernels, const float* src, const float* wei, const float* bias, float* dst, bool relu,
                 int tid) {
  if (tid < 0 || tid >= static_cast<int>(prim.plan.streams.size())) return;
  FwdCallArgs a = prim.plan.strides;
  const std::vector<FwdCall>& stream = prim.plan.streams[tid];
  for (size_t i = 0; i < stream.size(); ++i) {
    const FwdCall& c = stream[i];
    a.src = at_offset(src, c.src_off);
    a.pf_src = at_offset(src, stream[i + 1 < stream.size() ? i + 1 : i].src_off);
    a.wei = at_offset(wei, c.wei_off);
    a.dst = at_offset(dst, c.dst_off);
    a.bias = bias ? at_offset(bias, c.bias_off) : nullptr;
    a.n_r = c.n_r;
    a.n_cb = c.n_cb;
    a.flags = (c.flags & kAccumulate) | (relu && (c.flags & kLastChunk) ? kRelu : 0);
    kernels.fns[c.kernel](&a);
  }
}

}  // namespace dc
