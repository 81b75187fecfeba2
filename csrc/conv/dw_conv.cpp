#include "conv/dw_conv.h"

#include <algorithm>
#include <map>
#include <sstream>
#include <stdexcept>

#include "conv/driver_util.h"
#include "jit/fwd_kernel.h"

namespace dc {

std::string DwPlan::to_string() const {
  std::ostringstream o;
  o << desc.to_string() << " depthwise " << isa_name(isa) << " threads=" << threads << " tile=" << tile_ow
    << " kernels=" << kernels.size();
  return o.str();
}

DwPlan make_dw_plan(const ConvDesc& desc, Isa isa, int threads) {
  std::string err = desc.validate();
  if (!err.empty()) throw std::invalid_argument("conv2d: " + err);
  if (desc.k != desc.c) throw std::invalid_argument("depthwise conv2d: needs as many output channels as input channels");
  check_fp32_isa(isa, "depthwise conv2d");
  if (isa == Isa::none) throw std::invalid_argument("conv2d: no JIT ISA available");
  DwPlan plan;
  plan.desc = desc;
  plan.isa = isa;
  plan.threads = std::max(1, threads);
  const int V = plan.v();
  const int64_t P = desc.p(), Q = desc.q();
  plan.cb = div_up(desc.c, V);
  plan.tile_ow = std::min<int>(dw_max_ow(isa), static_cast<int>(Q));
  plan.src_r_stride = desc.dil_h * desc.w * V * desc.elem_bytes();

  std::map<std::string, int> index;
  auto kernel_index = [&](const DwKernelSpec& sp) {
    auto it = index.find(sp.name());
    if (it != index.end()) return it->second;
    plan.kernels.push_back(sp);
    return index[sp.name()] = static_cast<int>(plan.kernels.size()) - 1;
  };
  // Output rows of all images and channel blocks, in that order, dealt out in equal runs.
  const int64_t rows = desc.n * plan.cb * P;
  plan.streams.assign(plan.threads, {});
  for (int t = 0; t < plan.threads; ++t)
    for (int64_t i = rows * t / plan.threads; i < rows * (t + 1) / plan.threads; ++i) {
      const int64_t oh = i % P, cb = (i / P) % plan.cb, n = i / (P * plan.cb);
      int64_t r_lo, n_r;
      valid_kernel_rows(desc, oh, &r_lo, &n_r);
      const int64_t ih = oh * desc.stride_h - desc.pad_t + r_lo * desc.dil_h;
      int64_t ow0 = 0;
      for (int w : split_even(Q, plan.tile_ow)) {
        DwKernelSpec sp;
        sp.dt = desc.dt;
        sp.isa = isa;
        sp.s = static_cast<int>(desc.s);
        sp.stride_w = static_cast<int>(desc.stride_w);
        sp.dil_w = static_cast<int>(desc.dil_w);
        sp.ow = w;
        const int64_t iw0 = ow0 * desc.stride_w - desc.pad_l;
        if (iw0 < 0 || iw0 + (w - 1) * desc.stride_w + (desc.s - 1) * desc.dil_w >= desc.w) {
          sp.border = true;
          sp.iw0 = static_cast<int>(iw0);
          sp.w = static_cast<int>(desc.w);
        }
        DwCall c{};
        c.kernel = kernel_index(sp);
        c.n_r = static_cast<int32_t>(n_r);
        c.src_off = ((n * plan.cb + cb) * desc.h + ih) * desc.w * V + iw0 * V;
        c.wei_off = (cb * desc.r + r_lo) * desc.s * V;
        c.dst_off = ((n * plan.cb + cb) * P + oh) * Q * V + ow0 * V;
        c.bias_off = cb * V;
        plan.streams[t].push_back(c);
        ow0 += w;
      }
    }
  return plan;
}

namespace {

PrimitiveCache<DwPrimitive>& primitives() {
  static auto* c = new PrimitiveCache<DwPrimitive>();
  return *c;
}
// Made at load, before another thread can be inside it: no fork() finds it half made.
[[maybe_unused]] PrimitiveCache<DwPrimitive>& g_primitives_at_load = primitives();

std::shared_ptr<const DwPrimitive> build(const ConvDesc& desc, Isa isa, int threads) {
  auto prim = std::make_shared<DwPrimitive>();
  prim->plan = make_dw_plan(desc, isa, threads);
  prim->info = prim->plan.to_string();
  acquire_kernels(*prim);
  return prim;
}

}  // namespace

std::shared_ptr<const DwPrimitive> get_dw_primitive(const ConvDesc& desc, Isa isa, int threads) {
  return primitives().get("dw/" + desc.to_string() + "/" + isa_name(isa) + "/" + std::to_string(threads),
                          [&] { return build(desc, isa, threads); });
}
void clear_dw_primitives() { primitives().clear(); }

DwKernels acquire_kernels(const DwPrimitive& prim) {
  DwKernels k;
  for (const DwKernelSpec& sp : prim.plan.kernels) {
    k.held.push_back(get_kernel(sp.name(), [&] { return make_dw_kernel(sp); }, prim.info));
    k.fns.push_back(k.held.back()->entry<DwKernelFn>());
  }
  return k;
}

void dw_execute(const DwPrimitive& prim, const DwKernels& kernels, const float* src, const float* wei, const float* bias, float* dst, bool relu,
                int tid) {
  if (tid < 0 || tid >= static_cast<int>(prim.plan.streams.size())) return;
  DwCallArgs a{};
  a.src_r_stride = prim.plan.src_r_stride;
  a.flags = relu ? kRelu : 0;
  for (const DwCall& c : prim.plan.streams[tid]) {
    a.src = at_offset(src, c.src_off);
    a.wei = at_offset(wei, c.wei_off);
    a.dst = at_offset(dst, c.dst_off);
    a.bias = bias ? at_offset(bias, c.bias_off) : nullptr;
    a.n_r = c.n_r;
    kernels.fns[c.kernel](&a);
  }
}

}  // namespace dc
