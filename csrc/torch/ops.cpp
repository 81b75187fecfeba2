// The torch layer: op schemas and CPU kernels (TORCH_LIBRARY), Tensor -> raw pointers and
// ConvDesc, and a few pybind11 utilities. The only C++ that includes torch.
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "conv/bwd_data.h"
#include "conv/dw_conv.h"
#include "conv/fwd_driver.h"
#include "conv/fwd_stats.h"
#include "conv/reorder.h"
#include "conv/scratch.h"
#include "conv/upd_conv.h"
#include "jit/isa.h"
#include "jit/kernel_cache.h"
#include "jit/peak_kernel.h"
#include "op_timers.h"
#include "threading.h"

namespace dc_torch {

using at::Tensor;
using dc::ConvDesc;

namespace {

dc::Isa jit_isa() {
  dc::Isa isa = dc::active_isa();
  TORCH_CHECK(isa != dc::Isa::none,
              "torch_directconv: no JIT ISA is active (the CPU lacks AVX2, or TORCH_DIRECTCONV_ISA=none); "
              "the Python API falls back to torch's convolution");
  return isa;
}

void check_float_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected '", name, "' on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": expected '", name, "' of dtype float32, got ", t.scalar_type());
}

std::vector<int64_t> strides4(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The geometry as given, checked only for what any convolution needs; jit_takes says
// whether the kernels take it, make_desc also validates it for them.
ConvDesc fill_desc(const char* op, int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t r, int64_t s,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2, op, ": expected 'stride' of 2 values, got ", stride);
  TORCH_CHECK(padding.size() == 4, op, ": expected 'padding' of 4 values (top, bottom, left, right), got ", padding);
  TORCH_CHECK(dilation.size() == 2, op, ": expected 'dilation' of 2 values, got ", dilation);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": expected 'stride' >= 1, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": expected 'dilation' >= 1, got ", dilation);
  for (int64_t p : padding) TORCH_CHECK(p >= 0, op, ": expected non-negative 'padding', got ", padding);
  ConvDesc d;
  d.n = n;
  d.c = c;
  d.h = h;
  d.w = w;
  d.k = k;
  d.r = r;
  d.s = s;
  d.stride_h = stride[0];
  d.stride_w = stride[1];
  d.pad_t = padding[0];
  d.pad_b = padding[1];
  d.pad_l = padding[2];
  d.pad_r = padding[3];
  d.dil_h = dilation[0];
  d.dil_w = dilation[1];
  return d;
}

const ConvDesc& validated(const char* op, const ConvDesc& d) {
  std::string err = d.validate();
  TORCH_CHECK(err.empty(), op, ": ", err);
  return d;
}

ConvDesc make_desc(const char* op, int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t r, int64_t s,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return validated(op, fill_desc(op, n, c, h, w, k, r, s, stride, padding, dilation));
}

// Whether the JIT kernels take this geometry (empty channels, or offsets beyond 32 bits, go
// to torch's convolution).
bool jit_takes(const ConvDesc& d) {
  return dc::active_isa() != dc::Isa::none && dc::jit_fits(d, dc::vlen(dc::active_isa()));
}

std::atomic<int64_t> aten_fallbacks{0};

// ATen takes one padding per dimension: an asymmetric (top, bottom, left, right) padding is
// the symmetric part, given to ATen, plus the rest, applied to the input explicitly (only the
// difference, as torch does for padding='same', so that a huge padding is not materialised).
struct AtenPadding {
  std::vector<int64_t> symmetric;  // (rows, columns)
  std::vector<int64_t> extra;      // constant_pad_nd's (left, right, top, bottom)
  bool any_extra() const { return extra[0] || extra[1] || extra[2] || extra[3]; }
};
AtenPadding aten_padding(at::IntArrayRef padding) {
  const int64_t ph = std::min(padding[0], padding[1]), pw = std::min(padding[2], padding[3]);
  return {{ph, pw}, {padding[2] - pw, padding[3] - pw, padding[0] - ph, padding[1] - ph}};
}

// Torch's own convolution, for what the kernels do not take: the same answer, or the same
// error, as F.conv2d. An asymmetric padding is applied to the input first.
Tensor aten_conv2d(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                   at::MemoryFormat format) {
  ++aten_fallbacks;
  TORCH_WARN_ONCE("torch_directconv: a convolution with empty channels, or with a stride, padding or dilation whose "
                  "offsets exceed the kernels' 32 bits, runs on PyTorch's convolution");
  const AtenPadding pad = aten_padding(padding);
  Tensor x = pad.any_extra() ? at::constant_pad_nd(input, pad.extra, 0) : input;
  Tensor y = at::conv2d(x, weight, bias, stride, pad.symmetric, dilation, groups);
  if (relu) y = at::relu(y);
  return y.contiguous(format);
}

// (G, Kb, Cb, R, S, V(c), V(k)) packed weights back to (G * kg, cg, R, S), for torch's convolution.
Tensor unpack_weight(const Tensor& packed, int64_t kg, int64_t cg) {
  const int64_t g = packed.size(0), kb = packed.size(1), cb = packed.size(2), V = packed.size(5);
  return packed.permute({0, 1, 6, 2, 5, 3, 4})
      .reshape({g, kb * V, cb * V, packed.size(3), packed.size(4)})
      .narrow(1, 0, kg)
      .narrow(2, 0, cg)
      .reshape({g * kg, cg, packed.size(3), packed.size(4)});
}

// The blocked layouts and back, for the blocked ops' geometries that torch's convolution
// takes: (N, Cb, H, W, V) <-> (N, C, H, W), and (Kb, Cb, R, S, V(c), V(k)) <-> (K, C, R, S).
Tensor unblock(const Tensor& xb, int64_t channels) {
  return xb.permute({0, 1, 4, 2, 3}).reshape({xb.size(0), xb.size(1) * xb.size(4), xb.size(2), xb.size(3)})
      .narrow(1, 0, channels);
}
Tensor block(const Tensor& x, int64_t V) {
  const int64_t cb = dc::div_up(x.size(1), V);
  return at::constant_pad_nd(x, {0, 0, 0, 0, 0, cb * V - x.size(1)})
      .view({x.size(0), cb, V, x.size(2), x.size(3)})
      .permute({0, 1, 3, 4, 2})
      .contiguous();
}
Tensor unblock_weight(const Tensor& wb) {
  const int64_t V = wb.size(4);
  return wb.permute({0, 5, 1, 4, 2, 3}).reshape({wb.size(0) * V, wb.size(1) * V, wb.size(2), wb.size(3)});
}
Tensor block_weight(const Tensor& w, int64_t V) {
  const int64_t kb = dc::div_up(w.size(0), V), cb = dc::div_up(w.size(1), V);
  return at::constant_pad_nd(w, {0, 0, 0, 0, 0, cb * V - w.size(1), 0, kb * V - w.size(0)})
      .view({kb, V, cb, V, w.size(2), w.size(3)})
      .permute({0, 2, 4, 5, 3, 1})
      .contiguous();
}

// Bias padded with zeros to kb * V, as the kernels read whole blocks.
Tensor padded_bias(const c10::optional<Tensor>& bias, int64_t k, int64_t padded, const char* op) {
  if (!bias.has_value() || !bias->defined()) return Tensor();
  check_float_cpu(*bias, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == k, op, ": expected 'bias' of shape (", k, "), got ",
              bias->sizes());
  if (padded == k && bias->is_contiguous()) return *bias;
  Tensor b = at::zeros({padded}, bias->options());
  b.narrow(0, 0, k).copy_(*bias);
  return b;
}

// Scratch of the calling thread (conv/scratch.h): kept between calls up to a process-wide
// cap, so repeated calls do not fault in fresh pages, and returned to the OS beyond it.
float* scratch(dc::ScratchSlot slot, int64_t floats) { return dc::scratch_floats(slot, floats); }

// Plan choices forced by the benchmark (set_fwd_options); defaults let the plan decide.
dc::FwdPlanOptions& fwd_options() {
  static dc::FwdPlanOptions options;
  return options;
}
// Those, with a call's epilogue.
dc::FwdPlanOptions fwd_options(bool bias, bool residual, bool relu) {
  dc::FwdPlanOptions options = fwd_options();
  options.post = {bias, residual, relu};
  return options;
}

// Writes blocks [begin, end) of one group's packed weights from dst on, in the order of
// the layer's weight blocks.
using PackBlockRange = std::function<void(int64_t begin, int64_t end, float* dst)>;

// Whether each output-channel group of the plan is one work unit (every image, every
// row), whose weights no other unit reads: the unit may then pack them itself.
bool one_unit_per_kgroup(const dc::FwdPlan& plan) {
  return plan.images_per_unit == plan.desc.n && plan.rows_per_group >= plan.desc.p();
}

// fwd_execute_prepared's prepare for a unit that packs its own output-channel group's
// weights just before its calls, into a per-thread buffer that stays in cache: the weights
// are read once, not packed, written and read again.
dc::FwdPrepare pack_per_unit(const dc::FwdPlan& plan, const PackBlockRange& pack) {
  return [&plan, &pack](const dc::FwdCall& first) {
    const int64_t V = plan.v(), per_kb = plan.cb * plan.desc.r * plan.desc.s * V * V;
    // The unit's first output-channel block (bias_off, unlike wei_off, has no tap in it).
    const int64_t kb0 = first.bias_off / V, n = std::min<int64_t>(plan.n_oc, plan.kb - kb0);
    float* buffer = scratch(dc::kScratchUnit, plan.n_oc * per_kb);
    pack(kb0 * plan.cb, (kb0 + n) * plan.cb, buffer);
    // The unit's calls add offsets counted from the first output-channel block.
    return reinterpret_cast<const float*>(reinterpret_cast<intptr_t>(buffer) - kb0 * per_kb * 4);
  };
}

// The forward of every group on blocked tensors. With `pack` (one group, wei null) each
// work unit packs its own weights (one_unit_per_kgroup must hold).
void run_fwd(const dc::FwdHandle& handle, const float* src, const float* wei, const dc::FwdPostArgs& post,
             float* dst, int64_t groups, int64_t src_group, int64_t wei_group, int64_t bias_group, int64_t dst_group,
             const PackBlockRange& pack = nullptr) {
  const dc::FwdPrimitive& prim = *handle.prim;
  const dc::FwdKernels& kernels = handle.kernels;
  if (prim.plan.desc.n == 0) return;
  // The plan's thread count, never a fresh num_threads(): another thread may have changed
  // torch's since the plan was made, and a stream left unrun is output left unwritten.
  const int nt = prim.plan.threads;
  std::vector<dc::FwdWorkQueue> queues;
  queues.reserve(groups);
  for (int64_t g = 0; g < groups; ++g) queues.emplace_back(nt);
  if (pack) {
    const dc::FwdPrepare prepare = pack_per_unit(prim.plan, pack);
    run_shares(nt, [&](int tid, int) {
      dc::ScratchScope share;  // the pool thread's own packing buffer
      dc::fwd_execute_prepared(prim, kernels, src, prepare, post, dst, tid, nt > 1 ? &queues[0] : nullptr);
    });
    return;
  }
  run_shares(nt, [&](int tid, int) {
    for (int64_t g = 0; g < groups; ++g)
      dc::fwd_execute(prim, kernels, src + g * src_group, wei + g * wei_group,
                      {post.bias ? post.bias + g * bias_group : nullptr,
                       post.residual ? post.residual + g * dst_group : nullptr, post.stats_shift, post.stats},
                      dst + g * dst_group, tid, nt > 1 ? &queues[g] : nullptr);
  });
}

}  // namespace

// As torch: channels_last output when the input or the (unpacked) weight is channels_last.
// An empty batch suggests no format, but torch still follows its channels_last strides.
bool is_channels_last(const Tensor& t) {
  if (t.suggest_memory_format() == at::MemoryFormat::ChannelsLast) return true;
  return t.numel() == 0 && t.size(1) > 1 && t.stride(1) == 1 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}
at::MemoryFormat output_format(const Tensor& input, bool weight_channels_last) {
  return weight_channels_last || is_channels_last(input) ? at::MemoryFormat::ChannelsLast
                                                         : at::MemoryFormat::Contiguous;
}

bool is_depthwise(const Tensor& weight, int64_t groups) {
  return groups > 1 && weight.size(1) == 1 && weight.size(0) == groups;
}

// (G, Kb, Cb, R, S, V, V) from (K, C/G, R, S); depthwise weights (C, 1, R, S), with one
// output channel per group, become (Cb, R, S, V) instead.
Tensor pack_weight(const Tensor& weight, int64_t groups) {
  const char* op = "pack_weight";
  check_float_cpu(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 4, op, ": expected a 4-D 'weight' (K, C/groups, R, S), got shape ", weight.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, op, ": 'groups' (", groups,
              ") must divide the output channels (", weight.size(0), ")");
  const int V = dc::vlen(jit_isa());
  if (is_depthwise(weight, groups)) {
    const int64_t c = weight.size(0), r = weight.size(2), s = weight.size(3);
    Tensor out = at::empty({dc::div_up(c, V), r, s, V}, weight.options());
    auto st = strides4(weight);
    run_shares(num_threads(), [&](int tid, int nt) {
      dc::reorder_dw_weight_to_blocked(weight.data_ptr<float>(), st.data(), c, r, s, V, out.data_ptr<float>(), tid, nt);
    });
    return out;
  }
  const int64_t kg = weight.size(0) / groups, c = weight.size(1), r = weight.size(2), s = weight.size(3);
  const int64_t kb = dc::div_up(kg, V), cb = dc::div_up(c, V);
  Tensor out = at::empty({groups, kb, cb, r, s, V, V}, weight.options());
  auto st = strides4(weight);
  const float* src = weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t per_group = kb * cb * r * s * V * V;
  run_shares(num_threads(), [&](int tid, int nt) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_weight_to_blocked(src + g * kg * st[0], st.data(), kg, c, r, s, V, dst + g * per_group, tid, nt);
  });
  return out;
}

// Depthwise: input (N, C, H, W) any strides, packed weight (Cb, R, S, V).
Tensor depthwise_packed(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                        int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups, bool relu, bool channels_last, int V) {
  const char* op = "conv2d";
  const int64_t c = input.size(1);
  TORCH_CHECK(groups == c && out_channels == c, op, ": a packed depthwise 'weight' needs groups == input channels == ",
              "output channels, got groups=", groups, ", ", c, " input and ", out_channels, " output channels");
  TORCH_CHECK(weight.size(0) == dc::div_up(c, V) && weight.size(3) == V && weight.is_contiguous(), op,
              ": expected a packed depthwise 'weight' (C/", V, ", R, S, ", V, ") for ", c, " channels, got shape ",
              weight.sizes());
  ConvDesc d = make_desc(op, input.size(0), c, input.size(2), input.size(3), c, weight.size(1), weight.size(2), stride,
                         padding, dilation);
  const int64_t cb = weight.size(0), P = d.p(), Q = d.q();
  Tensor b = padded_bias(bias, c, cb * V, op);
  Tensor out = at::empty({d.n, c, P, Q}, input.options().memory_format(output_format(input, channels_last)));
  if (d.n == 0) return out;
  float* src_blk = scratch(dc::kScratchSrc, d.n * cb * d.h * d.w * V);
  float* dst_blk = scratch(dc::kScratchDst, d.n * cb * P * Q * V);
  auto xs = strides4(input), ys = strides4(out);
  auto prim = dc::get_dw_primitive(d, jit_isa(), num_threads());
  const int nt = prim->plan.threads;
  const dc::DwKernels kernels = dc::acquire_kernels(*prim);
  const float* x = input.data_ptr<float>();
  float* y = out.data_ptr<float>();
  run_shares(nt, [&](int tid, int n_threads) { dc::reorder_to_blocked(x, xs.data(), d.n, c, d.h, d.w, V, src_blk, tid, n_threads); });
  run_shares(nt, [&](int tid, int) {
    dc::dw_execute(*prim, kernels, src_blk, weight.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, dst_blk, relu,
                   tid);
  });
  run_shares(nt, [&](int tid, int n_threads) { dc::reorder_from_blocked(dst_blk, d.n, c, P, Q, V, y, ys.data(), tid, n_threads); });
  return out;
}

namespace {

// NCHW (any strides) in, NCHW out (channels_last when asked), through the blocked kernels:
// the input converted to blocks, the kernels run, the output converted back. The weights
// are `packed` (every group, as pack_weight gives them), or, when that is null, packed at
// this call by `pack` (one group): by each work unit just before its calls when the plan
// allows (one_unit_per_kgroup), else beside the input's conversion.
Tensor conv2d_via_blocks(const Tensor& input, const ConvDesc& d, int64_t groups, int64_t out_channels,
                         const c10::optional<Tensor>& bias, bool relu, bool channels_last, const float* packed,
                         const PackBlockRange& pack) {
  const char* op = "conv2d";
  const int V = dc::vlen(jit_isa());
  const int64_t cg = d.c, kg = d.k, cb = dc::div_up(cg, V), kb = dc::div_up(kg, V), P = d.p(), Q = d.q();
  Tensor b = padded_bias(bias, out_channels, out_channels, op);
  Tensor bias_blk;
  if (b.defined() && groups == 1 && kg == kb * V) {
    bias_blk = b;  // whole blocks already (padded_bias made it contiguous)
  } else if (b.defined()) {
    bias_blk = at::zeros({groups, kb * V}, b.options());
    bias_blk.narrow(1, 0, kg).copy_(b.view({groups, kg}));
  }
  Tensor out = at::empty({d.n, out_channels, P, Q}, input.options().memory_format(output_format(input, channels_last)));
  if (d.n == 0) return out;

  const int nt = num_threads();
  auto handle = dc::get_fwd_handle(d, jit_isa(), nt, fwd_options(b.defined(), false, relu));
  const dc::FwdPrimitive* prim = handle->prim.get();
  const bool per_unit = !packed && one_unit_per_kgroup(prim->plan);
  const int64_t src_group = d.n * cb * d.h * d.w * V, dst_group = d.n * kb * P * Q * V;
  const int64_t wei_group = kb * cb * d.r * d.s * V * V;
  float* src_blk = scratch(dc::kScratchSrc, groups * src_group);
  float* dst_blk = scratch(dc::kScratchDst, groups * dst_group);
  float* wei_blk = packed || per_unit ? nullptr : scratch(dc::kScratchWei, wei_group);
  const float* x = input.data_ptr<float>();
  float* y = out.data_ptr<float>();
  auto xs = strides4(input), ys = strides4(out);
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_to_blocked(x + g * cg * xs[1], xs.data(), d.n, cg, d.h, d.w, V, src_blk + g * src_group, tid,
                             n_threads);
    if (wei_blk) {
      const int64_t blocks = kb * cb, begin = blocks * tid / n_threads, end = blocks * (tid + 1) / n_threads;
      pack(begin, end, wei_blk + begin * d.r * d.s * V * V);
    }
  });
  run_fwd(*handle, src_blk, packed ? packed : wei_blk, {bias_blk.defined() ? bias_blk.data_ptr<float>() : nullptr},
          dst_blk, groups, src_group, wei_group, kb * V, dst_group, per_unit ? pack : nullptr);
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_from_blocked(dst_blk + g * dst_group, d.n, kg, P, Q, V, y + g * kg * ys[1], ys.data(), tid,
                               n_threads);
  });
  return out;
}

}  // namespace

// NCHW (any strides) in, NCHW out (channels_last when the input is), weights pre-packed.
Tensor conv2d_packed(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, int64_t out_channels,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     bool relu, bool channels_last) {
  dc::ScratchScope call;
  const char* op = "conv2d";
  check_float_cpu(input, op, "input");
  check_float_cpu(weight, op, "weight");
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D 'input' (N, C, H, W), got shape ", input.sizes());
  const int V = dc::vlen(jit_isa());
  if (weight.dim() == 4) {
    // Depthwise (Cb, R, S, V): back to (C, 1, R, S) where the kernels cannot take it.
    const int64_t c = input.size(1), r = weight.size(1), s = weight.size(2);
    if (!jit_takes(fill_desc(op, input.size(0), c, input.size(2), input.size(3), c, r, s, stride, padding, dilation)))
      return aten_conv2d(input, weight.permute({0, 3, 1, 2}).reshape({-1, r, s}).narrow(0, 0, c).unsqueeze(1), bias,
                         stride, padding, dilation, groups, relu, output_format(input, channels_last));
    return depthwise_packed(input, weight, bias, out_channels, stride, padding, dilation, groups, relu, channels_last, V);
  }
  TORCH_CHECK(weight.dim() == 7 && weight.size(5) == V && weight.size(6) == V, op,
              ": expected a packed 'weight' (groups, K/", V, ", C/", V, ", R, S, ", V, ", ", V, "), got shape ",
              weight.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) == groups, op, ": packed 'weight' holds ", weight.size(0),
              " groups, but 'groups' is ", groups);
  TORCH_CHECK(input.size(1) % groups == 0, op, ": 'groups' (", groups, ") must divide the input channels (",
              input.size(1), ")");
  TORCH_CHECK(out_channels % groups == 0, op, ": 'groups' (", groups, ") must divide the output channels (",
              out_channels, ")");
  const int64_t cg = input.size(1) / groups, kg = out_channels / groups;
  TORCH_CHECK(dc::div_up(cg, V) == weight.size(2) && dc::div_up(kg, V) == weight.size(1), op, ": 'input' has ",
              input.size(1), " channels and ", out_channels, " output channels in ", groups,
              " groups, which does not match the packed 'weight' of shape ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": the packed 'weight' must be contiguous");
  if (!jit_takes(fill_desc(op, input.size(0), cg, input.size(2), input.size(3), kg, weight.size(3), weight.size(4),
                           stride, padding, dilation)))
    return aten_conv2d(input, unpack_weight(weight, kg, cg), bias, stride, padding, dilation, groups, relu,
                       output_format(input, channels_last));
  ConvDesc d = make_desc(op, input.size(0), cg, input.size(2), input.size(3), kg, weight.size(3), weight.size(4),
                         stride, padding, dilation);
  return conv2d_via_blocks(input, d, groups, out_channels, bias, relu, channels_last, weight.data_ptr<float>(),
                           nullptr);
}

namespace {

constexpr int64_t kNchwGemmMinPixels = 28 * 28;

// 1x1, stride 1, no padding, NCHW in and out: the GEMM plan (make_fwd_plan_nchw_1x1) reads
// the weights and the input as they are and writes the output in place, with no packing
// and no layout conversion. Empty when it does not apply.
Tensor conv2d_nchw_1x1(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const dc::Isa isa = jit_isa();
  if (weight.size(2) != 1 || weight.size(3) != 1 || !input.is_contiguous() || !weight.is_contiguous() ||
      output_format(input, weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast) !=
          at::MemoryFormat::Contiguous)
    return Tensor();
  const int64_t k = weight.size(0);
  ConvDesc d = make_desc("conv2d", input.size(0), input.size(1), input.size(2), input.size(3), k, 1, 1, stride,
                         padding, dilation);
  if (!dc::nchw_1x1_applies(d, isa)) return Tensor();
  Tensor b = padded_bias(bias, k, k, "conv2d");
  Tensor out = at::empty({d.n, k, d.h, d.w}, input.options());
  if (b.defined()) out.copy_(b.view({1, k, 1, 1}).expand_as(out));  // the kernels add to it
  auto prim = dc::get_fwd_nchw_1x1_primitive(d, isa, num_threads(), b.defined(), relu);
  const int nt = prim->plan.threads;
  const dc::FwdKernels kernels = dc::acquire_kernels(*prim);
  dc::FwdWorkQueue queue(nt);
  const float* w = weight.data_ptr<float>();
  const float* x = input.data_ptr<float>();
  float* y = out.data_ptr<float>();
  run_shares(nt, [&](int tid, int) {
    dc::fwd_execute(*prim, kernels, w, x, {}, y, tid, nt > 1 ? &queue : nullptr);
  });
  return out;
}

}  // namespace

Tensor conv2d(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, at::IntArrayRef stride,
              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  dc::ScratchScope call;
  const char* op = "conv2d";
  check_float_cpu(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 4, op, ": expected a 4-D 'weight' (K, C/groups, R, S), got shape ", weight.sizes());
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D 'input' (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(groups >= 1, op, ": expected 'groups' >= 1, got ", groups);
  TORCH_CHECK(input.size(1) == weight.size(1) * groups, op, ": 'input' has ", input.size(1),
              " channels, but 'weight' expects ", weight.size(1) * groups, " (", weight.size(1), " per group x ",
              groups, " groups)");
  check_float_cpu(input, op, "input");
  TORCH_CHECK(weight.size(0) >= 1, op, ": expected 'weight' with at least one output channel, got shape ",
              weight.sizes());
  const bool weight_channels_last = weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  if (weight.size(0) % groups != 0 ||
      !jit_takes(fill_desc(op, input.size(0), weight.size(1), input.size(2), input.size(3), weight.size(0) / groups,
                           weight.size(2), weight.size(3), stride, padding, dilation)))
    return aten_conv2d(input, weight, bias, stride, padding, dilation, groups, relu,
                       output_format(input, weight_channels_last));
  // The NCHW 1x1 GEMM on images of 28x28 and more; on smaller ones it has too few pixels
  // per output channel, and the blocked kernels with their conversions measured faster.
  if (groups == 1 && input.size(2) * input.size(3) >= kNchwGemmMinPixels)
    if (Tensor y = conv2d_nchw_1x1(input, weight, bias, stride, padding, dilation, relu); y.defined()) return y;
  if (groups > 1)
    return conv2d_packed(input, pack_weight(weight, groups), bias, weight.size(0), stride, padding, dilation, groups,
                         relu, weight_channels_last);
  // One group: the weights are packed within the call, by the work units where they can.
  const int64_t k = weight.size(0), c = weight.size(1), r = weight.size(2), s = weight.size(3);
  ConvDesc d = make_desc(op, input.size(0), c, input.size(2), input.size(3), k, r, s, stride, padding, dilation);
  auto ws = strides4(weight);
  const float* w = weight.data_ptr<float>();
  const int V = dc::vlen(jit_isa());
  return conv2d_via_blocks(input, d, 1, k, bias, relu, weight_channels_last, nullptr,
                           [&](int64_t begin, int64_t end, float* dst) {
                             dc::reorder_weight_to_blocked_blocks(w, ws.data(), k, c, r, s, V, begin, end, dst);
                           });
}

namespace {

// The weight of a blocked op: blocked (Kb, Cb, R, S, V, V), or (K, C, R, S) as a module holds
// it, which the op packs within its call (no packing pass before it, no blocked weight
// gradient to unpack after it). Checks it against the input's cb channel blocks and returns
// (kb, the input channels read: in_channels, else those of a 4-D weight, else cb * V).
std::pair<int64_t, int64_t> blocked_weight_geometry(const char* op, const char* arg, at::IntArrayRef w, int64_t cb,
                                                    c10::optional<int64_t> in_channels, int64_t V) {
  if (w.size() == 4) {
    TORCH_CHECK(w[0] >= 1 && w[1] > (cb - 1) * V && w[1] <= cb * V, op, ": a (K, C, R, S) '", arg, "' of shape ", w,
                " does not fit ", cb, " input channel blocks of ", V);
    TORCH_CHECK(!in_channels.has_value() || *in_channels == w[1], op, ": 'in_channels' (", in_channels.value_or(0),
                ") differs from the ", w[1], " input channels of the (K, C, R, S) '", arg, "'");
    return {dc::div_up(w[0], V), w[1]};
  }
  TORCH_CHECK(w.size() == 6 && w[4] == V && w[5] == V, op, ": expected a blocked '", arg, "' (K/", V, ", C/", V, ", R, S, ",
              V, ", ", V, ") or a (K, C, R, S) one, got ", w);
  TORCH_CHECK(w[1] == cb, op, ": 'xb' has ", cb, " channel blocks, but '", arg, "' has ", w[1]);
  int64_t c = cb * V;
  if (in_channels.has_value()) {
    TORCH_CHECK(*in_channels > (cb - 1) * V && *in_channels <= cb * V, op, ": 'in_channels' (", *in_channels,
                ") does not fit ", cb, " channel blocks of ", V);
    c = *in_channels;
  }
  return {w[0], c};
}

// A (K, C, R, S) weight with its output channels zero-padded to kb * V, for torch's convolution.
Tensor padded_out_channels(const Tensor& w, int64_t kb, int64_t V) {
  return at::constant_pad_nd(w, {0, 0, 0, 0, 0, 0, 0, kb * V - w.size(0)});
}

// The checked operands of a blocked convolution: its geometry (validated only when the
// kernels take it), its bias padded to whole blocks, and whether its weight is (K, C, R, S).
struct BlockedConv {
  ConvDesc d;
  Tensor bias;
  int64_t c, cb, kb;
  int V;
  bool kcrs;
};
BlockedConv check_blocked_conv(const char* op, const Tensor& input, const Tensor& weight,
                               const c10::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, c10::optional<int64_t> in_channels) {
  check_float_cpu(input, op, "xb");
  check_float_cpu(weight, op, "wb");
  const int V = dc::vlen(jit_isa());
  TORCH_CHECK(input.dim() == 5 && input.size(4) == V, op, ": expected a blocked 'xb' (N, C/", V, ", H, W, ", V,
              "), got shape ", input.sizes());
  const int64_t cb = input.size(1);
  const auto [kb, c] = blocked_weight_geometry(op, "wb", weight.sizes(), cb, in_channels, V);
  BlockedConv bc{fill_desc(op, input.size(0), c, input.size(2), input.size(3), kb * V, weight.size(2),
                           weight.size(3), stride, padding, dilation),
                 Tensor(), c, cb, kb, V, weight.dim() == 4};
  if (bias.has_value() && bias->defined()) {
    check_float_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) <= kb * V && bias->size(0) > (kb - 1) * V, op,
                ": expected 'bias' of at most ", kb * V, " values (", kb, " blocks), got shape ", bias->sizes());
    bc.bias = padded_bias(bias, bias->size(0), kb * V, op);
  }
  return bc;
}

// Torch's convolution for the blocked geometries the kernels do not take, blocked again.
Tensor aten_conv2d_blocked(const BlockedConv& bc, const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Tensor w = bc.kcrs ? padded_out_channels(weight, bc.kb, bc.V) : unblock_weight(weight).narrow(1, 0, bc.c);
  return block(aten_conv2d(unblock(input, bc.c), w, bc.bias, stride, padding, dilation, 1, false,
                           at::MemoryFormat::Contiguous),
               bc.V);
}

// The forward of a checked blocked convolution into out: a blocked weight as it is; a
// (K, C, R, S) one packed within the call, by each work unit for its own output channels
// where the plan allows, else in one pass into scratch (kept between calls, so no fresh pages
// to fault in).
void run_blocked_fwd(const BlockedConv& bc, const dc::FwdHandle& handle, const Tensor& x, const Tensor& weight,
                     const dc::FwdPostArgs& post, float* out) {
  const ConvDesc& d = bc.d;
  const int64_t V = bc.V;
  if (!bc.kcrs) {
    const Tensor w = weight.contiguous();
    run_fwd(handle, x.data_ptr<float>(), w.data_ptr<float>(), post, out, 1, 0, 0, 0, 0);
    return;
  }
  const float* w = weight.data_ptr<float>();
  const auto ws = strides4(weight);
  const int64_t k = weight.size(0);
  const PackBlockRange pack = [&](int64_t begin, int64_t end, float* dst) {
    dc::reorder_weight_to_blocked_blocks(w, ws.data(), k, bc.c, d.r, d.s, V, begin, end, dst);
  };
  if (one_unit_per_kgroup(handle.prim->plan)) {
    run_fwd(handle, x.data_ptr<float>(), nullptr, post, out, 1, 0, 0, 0, 0, pack);
    return;
  }
  float* wei = scratch(dc::kScratchWei, bc.kb * bc.cb * d.r * d.s * V * V);
  run_shares(num_threads(), [&](int tid, int n_threads) {
    const int64_t blocks = bc.kb * bc.cb, begin = blocks * tid / n_threads, end = blocks * (tid + 1) / n_threads;
    pack(begin, end, wei + begin * d.r * d.s * V * V);
  });
  run_fwd(handle, x.data_ptr<float>(), wei, post, out, 1, 0, 0, 0, 0);
}

std::atomic<int64_t> conv_stats_recomputed{0};

}  // namespace

// Blocked in, blocked out: no layout conversion at all.
Tensor conv2d_blocked(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                      c10::optional<int64_t> in_channels, const c10::optional<Tensor>& residual) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked";
  const BlockedConv bc = check_blocked_conv(op, input, weight, bias, stride, padding, dilation, in_channels);
  const ConvDesc& d = bc.d;
  // The residual is added after the bias and before the ReLU, in the epilogue.
  Tensor res;
  auto check_residual = [&](at::IntArrayRef out_shape) {
    TORCH_CHECK(res.sizes() == out_shape, op, ": expected a blocked 'residual' of the output's shape ", out_shape,
                ", got ", res.sizes());
  };
  if (residual.has_value() && residual->defined()) {
    check_float_cpu(*residual, op, "residual");
    res = residual->contiguous();
  }
  if (!jit_takes(d)) {
    Tensor y = aten_conv2d_blocked(bc, input, weight, stride, padding, dilation);
    if (res.defined()) {
      check_residual(y.sizes());
      y.add_(res);
    }
    return relu ? y.relu_() : y;
  }
  validated(op, d);
  if (res.defined()) check_residual({d.n, bc.kb, d.p(), d.q(), bc.V});
  Tensor x = input.contiguous();
  Tensor out = at::empty({d.n, bc.kb, d.p(), d.q(), bc.V}, input.options());
  auto handle = dc::get_fwd_handle(d, jit_isa(), num_threads(), fwd_options(bc.bias.defined(), res.defined(), relu));
  run_blocked_fwd(bc, *handle, x, weight,
                  {bc.bias.defined() ? bc.bias.data_ptr<float>() : nullptr, res.defined() ? res.data_ptr<float>() : nullptr},
                  out.data_ptr<float>());
  return out;
}

// The same (no ReLU, no residual) with the per-channel batch statistics of the output, biased
// variance, from the kernels' epilogue (conv/fwd_stats.h); where a mean lies too far from its
// `shift` for the fp32 tile sums, they are recomputed exactly by bn_stats_blocked.
std::tuple<Tensor, Tensor, Tensor> conv2d_blocked_stats(const Tensor& input, const Tensor& weight,
                                                        const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        c10::optional<int64_t> in_channels, const Tensor& shift,
                                                        int64_t channels) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_stats";
  const BlockedConv bc = check_blocked_conv(op, input, weight, bias, stride, padding, dilation, in_channels);
  const ConvDesc& d = bc.d;
  TORCH_CHECK(channels > (bc.kb - 1) * bc.V && channels <= bc.kb * bc.V, op, ": 'channels' (", channels,
              ") does not fit ", bc.kb, " output blocks of ", bc.V);
  check_float_cpu(shift, op, "shift");
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == channels, op, ": expected 'shift' of shape (", channels, "), got ",
              shift.sizes());
  static const auto bn_stats = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("directconv::bn_stats_blocked", "")
                                   .typed<std::tuple<Tensor, Tensor>(const Tensor&, int64_t)>();
  if (!jit_takes(d)) {
    Tensor y = aten_conv2d_blocked(bc, input, weight, stride, padding, dilation);
    auto [mean, var] = bn_stats.call(y, channels);
    return {y, mean, var};
  }
  validated(op, d);
  Tensor x = input.contiguous();
  Tensor out = at::empty({d.n, bc.kb, d.p(), d.q(), bc.V}, input.options());
  Tensor mean = at::empty({channels}, input.options()), var = at::empty({channels}, input.options());
  if (d.n == 0) return {out, mean.fill_(NAN), var.fill_(NAN)};
  dc::FwdPlanOptions options = fwd_options(bc.bias.defined(), false, false);
  options.post.stats = true;
  auto handle = dc::get_fwd_handle(d, jit_isa(), num_threads(), options);
  const dc::FwdPrimitive* prim = handle->prim.get();
  Tensor shift_blk = padded_bias(shift, channels, bc.kb * bc.V, op);
  // The tiles' sums, in the calling thread's scratch (this op converts no layout, and packs a
  // (K, C, R, S) weight into another slot): no fresh pages at every call.
  float* sums = scratch(dc::kScratchDst, prim->plan.stats_floats);
  run_blocked_fwd(bc, *handle, x, weight,
                  {bc.bias.defined() ? bc.bias.data_ptr<float>() : nullptr, nullptr, shift_blk.data_ptr<float>(), sums},
                  out.data_ptr<float>());
  if (!dc::fwd_stats_finish(prim->plan, sums, shift_blk.data_ptr<float>(), channels, mean.data_ptr<float>(),
                            var.data_ptr<float>())) {
    ++conv_stats_recomputed;
    std::tie(mean, var) = bn_stats.call(out, channels);
  }
  return {out, mean, var};
}

Tensor to_blocked(const Tensor& x, int64_t vlen) {
  const char* op = "to_blocked";
  check_float_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D 'x' (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(vlen == 8 || vlen == 16, op, ": expected 'vlen' 8 or 16, got ", vlen);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor out = at::empty({n, dc::div_up(c, vlen), h, w, vlen}, x.options());
  auto st = strides4(x);
  run_shares(num_threads(), [&](int tid, int nt) {
    dc::reorder_to_blocked(x.data_ptr<float>(), st.data(), n, c, h, w, static_cast<int>(vlen), out.data_ptr<float>(),
                           tid, nt);
  });
  return out;
}

Tensor from_blocked(const Tensor& xb, int64_t channels) {
  const char* op = "from_blocked";
  check_float_cpu(xb, op, "xb");
  TORCH_CHECK(xb.dim() == 5 && (xb.size(4) == 8 || xb.size(4) == 16), op,
              ": expected a blocked 'xb' (N, C/V, H, W, V) with V 8 or 16, got shape ", xb.sizes());
  const int64_t v = xb.size(4);
  TORCH_CHECK(channels > (xb.size(1) - 1) * v && channels <= xb.size(1) * v, op, ": 'channels' (", channels,
              ") does not fit ", xb.size(1), " blocks of ", v);
  Tensor x = xb.contiguous();
  Tensor out = at::empty({xb.size(0), channels, xb.size(2), xb.size(3)}, xb.options());
  auto st = strides4(out);
  run_shares(num_threads(), [&](int tid, int nt) {
    dc::reorder_from_blocked(x.data_ptr<float>(), xb.size(0), channels, xb.size(2), xb.size(3), static_cast<int>(v),
                             out.data_ptr<float>(), st.data(), tid, nt);
  });
  return out;
}

Tensor to_blocked_weight(const Tensor& w, int64_t vlen) {
  const char* op = "to_blocked_weight";
  check_float_cpu(w, op, "w");
  TORCH_CHECK(w.dim() == 4, op, ": expected a 4-D 'w' (K, C, R, S), got shape ", w.sizes());
  TORCH_CHECK(vlen == 8 || vlen == 16, op, ": expected 'vlen' 8 or 16, got ", vlen);
  const int64_t k = w.size(0), c = w.size(1), r = w.size(2), s = w.size(3);
  Tensor out = at::empty({dc::div_up(k, vlen), dc::div_up(c, vlen), r, s, vlen, vlen}, w.options());
  auto st = strides4(w);
  run_shares(num_threads(), [&](int tid, int nt) {
    dc::reorder_weight_to_blocked(w.data_ptr<float>(), st.data(), k, c, r, s, static_cast<int>(vlen),
                                  out.data_ptr<float>(), tid, nt);
  });
  return out;
}

// (K/V, C/V, R, S, V(c), V(k)) -> (K, C, R, S), dropping the padding: the inverse of
// to_blocked_weight, and its backward.
Tensor from_blocked_weight(const Tensor& wb, int64_t k, int64_t c) {
  const char* op = "from_blocked_weight";
  check_float_cpu(wb, op, "wb");
  TORCH_CHECK(wb.dim() == 6 && wb.size(4) == wb.size(5) && (wb.size(4) == 8 || wb.size(4) == 16), op,
              ": expected a blocked 'wb' (K/V, C/V, R, S, V, V) with V 8 or 16, got shape ", wb.sizes());
  const int64_t v = wb.size(4);
  TORCH_CHECK(k > (wb.size(0) - 1) * v && k <= wb.size(0) * v, op, ": 'k' (", k, ") does not fit ", wb.size(0),
              " blocks of ", v);
  TORCH_CHECK(c > (wb.size(1) - 1) * v && c <= wb.size(1) * v, op, ": 'c' (", c, ") does not fit ", wb.size(1),
              " blocks of ", v);
  Tensor src = wb.contiguous();
  Tensor out = at::empty({k, c, wb.size(2), wb.size(3)}, wb.options());
  auto st = strides4(out);
  run_shares(num_threads(), [&](int tid, int nt) {
    dc::reorder_weight_from_blocked(src.data_ptr<float>(), k, c, wb.size(2), wb.size(3), static_cast<int>(v),
                                    out.data_ptr<float>(), st.data(), tid, nt);
  });
  return out;
}

// --- backward passes --------------------------------------------------------------------
// For now these run on ATen's convolution_backward: exact, and the autograd wiring,
// fake kernels and torch.compile support are in place for the JIT kernels of issue 3.
// ATen takes one padding per dimension, so an asymmetric padding (padding='same' with an
// even kernel) is applied to the input explicitly and cut off the gradient again.

namespace {

void check_backward_args(const char* op, const Tensor& grad_output, const Tensor& other, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_float_cpu(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.dim() == 4, op, ": expected a 4-D 'grad_output', got shape ", grad_output.sizes());
  TORCH_CHECK(other.dim() == 4, op, ": expected 4-D tensors, got shape ", other.sizes());
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4, op,
              ": expected 2 strides, 4 paddings and 2 dilations");
  TORCH_CHECK(groups >= 1, op, ": expected 'groups' >= 1, got ", groups);
}

// The convolution whose gradient a backward op computes, checked against 'grad_output'.
ConvDesc backward_desc(const char* op, const Tensor& grad_output, at::IntArrayRef input_size,
                       at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input_size.size() == 4, op, ": expected an input size of 4 values, got ", input_size);
  TORCH_CHECK(weight_size.size() == 4, op, ": expected a weight size of 4 values, got ", weight_size);
  const int64_t k = weight_size[0], cg = weight_size[1];
  TORCH_CHECK(k % groups == 0 && input_size[1] == cg * groups, op, ": an input of ", input_size[1],
              " channels does not match a weight of shape ", weight_size, " with groups=", groups);
  ConvDesc d = fill_desc(op, input_size[0], cg, input_size[2], input_size[3], k / groups, weight_size[2],
                         weight_size[3], stride, padding, dilation);
  TORCH_CHECK(grad_output.size(0) == d.n && grad_output.size(1) == k && grad_output.size(2) == d.p() &&
                  grad_output.size(3) == d.q(),
              op, ": 'grad_output' of shape ", grad_output.sizes(), " does not match the convolution's output (", d.n,
              ", ", k, ", ", d.p(), ", ", d.q(), ")");
  return d;
}

// Whether the grouped problem of kg x cg channels per group fills at least half of its blocks.
bool groups_fit_blocks(int64_t groups, int64_t kg, int64_t cg, int64_t V) {
  return groups == 1 || dc::div_up(kg, V) * V * dc::div_up(cg, V) * V <= 2 * kg * cg;
}

// Writes one thread's share of a phase's weights (Cb, Kb, n_r, n_s, V, V) for every group.
using PackPhase = std::function<void(const dc::BwdDataPhase&, float* dst, int tid, int nthreads)>;
// Writes blocks [begin, end) of a phase's weights (one group) from dst on.
using PackBlocks = std::function<void(const dc::BwdDataPhase&, int64_t begin, int64_t end, float* dst)>;

// The input gradient on blocked tensors, group after group: dy (N, Kb, P, Q, V) at dy_group
// floats per group, dx (N, Cb, H, W, V) at dx_group. Every pixel of dx is written: each
// phase with taps by the forward kernels through a strided output view, the others with
// zeros. Two parallel regions in all: one packs the weights of every phase (and zeroes the
// phases no tap reaches), one runs every phase; a thread done with its share of a phase
// goes on to the next, as the phases' pixels are disjoint.
//
// With pack_blocks, one group and plans that give each output-channel group a single work
// unit (every image and row: one image, or the deep layers), every unit packs its own
// weights just before its calls, into a per-thread buffer that stays in cache: the weights
// are read once, not packed, written and read again (the 7x7 layers, where that traffic
// costs about as much as the convolution).
void run_bwd_data(const ConvDesc& d, const std::vector<dc::BwdDataPhase>& phases, const float* dy, float* dx,
                  int64_t groups, int64_t dy_group, int64_t dx_group, const PackPhase& pack,
                  const PackBlocks& pack_blocks = nullptr) {
  if (d.n == 0) return;
  const dc::Isa isa = jit_isa();
  const int64_t V = dc::vlen(isa), cb = dc::div_up(d.c, V), kb = dc::div_up(d.k, V);
  const int nt = num_threads();
  struct Job {
    const dc::BwdDataPhase* phase;
    std::shared_ptr<const dc::FwdPrimitive> prim;
    dc::FwdKernels kernels;
    int64_t src_off, dst_off, wei_off, wei_group;
  };
  std::vector<Job> jobs;
  int64_t wei_total = 0;
  for (const dc::BwdDataPhase& ph : phases) {
    if (ph.empty()) continue;
    Job j;
    j.phase = &ph;
    dc::FwdPlanOptions options = fwd_options();
    dc::bwd_data_phase_layout(d, ph, static_cast<int>(V), &options, &j.src_off, &j.dst_off);
    const auto handle = dc::get_fwd_handle(ph.sub, isa, nt, options);
    j.prim = handle->prim;
    j.kernels = handle->kernels;
    j.wei_group = cb * kb * ph.sub.r * ph.sub.s * V * V;
    j.wei_off = wei_total;
    wei_total += groups * j.wei_group;
    jobs.push_back(std::move(j));
  }
  bool per_unit = pack_blocks && groups == 1;
  for (const Job& j : jobs) per_unit = per_unit && one_unit_per_kgroup(j.prim->plan);
  float* wei = per_unit ? nullptr : scratch(dc::kScratchWei, std::max<int64_t>(1, wei_total));
  run_shares(nt, [&](int tid, int n_threads) {
    if (!per_unit)
      for (const Job& j : jobs) pack(*j.phase, wei + j.wei_off, tid, n_threads);
    for (const dc::BwdDataPhase& ph : phases) {
      if (!ph.empty()) continue;
      const int64_t lines = groups * d.n * cb * ph.rows;
      for (int64_t i = lines * tid / n_threads; i < lines * (tid + 1) / n_threads; ++i) {
        const int64_t y = i % ph.rows, blk = i / ph.rows;  // blk runs over (group, image, channel block)
        float* row = dx + (blk / (d.n * cb)) * dx_group + (blk % (d.n * cb)) * d.h * d.w * V +
                     ((ph.a + y * d.stride_h) * d.w + ph.b) * V;
        for (int64_t x = 0; x < ph.cols; ++x) std::memset(row + x * d.stride_w * V, 0, sizeof(float) * V);
      }
    }
  });
  if (jobs.empty()) return;
  std::vector<dc::FwdWorkQueue> queues;
  queues.reserve(jobs.size() * groups);
  for (size_t i = 0; i < jobs.size() * groups; ++i) queues.emplace_back(nt);
  if (per_unit) {
    run_shares(nt, [&](int tid, int) {
      dc::ScratchScope share;  // the pool thread's own packing buffer
      for (size_t i = 0; i < jobs.size(); ++i) {
        const Job& j = jobs[i];
        const PackBlockRange pack_phase = [&](int64_t begin, int64_t end, float* dst) {
          pack_blocks(*j.phase, begin, end, dst);
        };
        const dc::FwdPrepare prepare = pack_per_unit(j.prim->plan, pack_phase);
        dc::fwd_execute_prepared(*j.prim, j.kernels, dy + j.src_off, prepare, {}, dx + j.dst_off, tid,
                                 nt > 1 ? &queues[i] : nullptr);
      }
    });
    return;
  }
  run_shares(nt, [&](int tid, int) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      const Job& j = jobs[i];
      for (int64_t g = 0; g < groups; ++g)
        dc::fwd_execute(*j.prim, j.kernels, dy + g * dy_group + j.src_off, wei + j.wei_off + g * j.wei_group, {},
                        dx + g * dx_group + j.dst_off, tid, nt > 1 ? &queues[i * groups + g] : nullptr);
    }
  });
}

// The phases of the JIT input gradient; empty when it does not take the problem.
std::vector<dc::BwdDataPhase> jit_bwd_data_phases(const ConvDesc& d, int64_t groups) {
  if (dc::active_isa() == dc::Isa::none || !groups_fit_blocks(groups, d.k, d.c, dc::vlen(dc::active_isa())))
    return {};
  return dc::bwd_data_phases(d);
}

// Depthwise, stride 1: the duality on the depthwise forward kernels.
Tensor depthwise_backward_data(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  if (dc::active_isa() == dc::Isa::none || stride[0] != 1 || stride[1] != 1 || !is_depthwise(weight, groups))
    return Tensor();
  const int64_t r = weight.size(2), s = weight.size(3);
  const std::vector<int64_t> pad = {dilation[0] * (r - 1) - padding[0], dilation[0] * (r - 1) - padding[1],
                                    dilation[1] * (s - 1) - padding[2], dilation[1] * (s - 1) - padding[3]};
  for (int64_t p : pad)
    if (p < 0) return Tensor();
  Tensor gi = conv2d(grad_output, weight.flip({2, 3}), c10::nullopt, {1, 1}, pad, dilation, groups, false);
  TORCH_CHECK(gi.sizes() == input_size, "conv2d_backward_data: internal shape mismatch ", gi.sizes(), " vs ",
              input_size);
  return gi;
}

// Empty when the JIT does not take the problem (see conv2d_backward_data).
Tensor backward_data_jit(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_data";
  if (dc::active_isa() == dc::Isa::none) return Tensor();
  const int64_t k = weight.size(0), cg = weight.size(1), kg = k / groups;
  ConvDesc d = make_desc(op, input_size[0], cg, input_size[2], input_size[3], kg, weight.size(2), weight.size(3),
                         stride, padding, dilation);
  const int64_t P = d.p(), Q = d.q();
  const std::vector<dc::BwdDataPhase> phases = jit_bwd_data_phases(d, groups);
  if (phases.empty()) return Tensor();
  // Each phase is a convolution of its own, over grad_output, that the kernels must take too.
  for (const dc::BwdDataPhase& ph : phases)
    if (!ph.empty() && !jit_takes(ph.sub)) return Tensor();
  const int V = dc::vlen(jit_isa());
  const int64_t cb = dc::div_up(cg, V), kb = dc::div_up(kg, V);
  Tensor out = at::empty(input_size, grad_output.options().memory_format(output_format(
                                         grad_output, weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast)));
  if (d.n == 0) return out;
  const int64_t dy_group = d.n * kb * P * Q * V, dx_group = d.n * cb * d.h * d.w * V;
  float* dy_blk = scratch(dc::kScratchSrc, groups * dy_group);
  float* dx_blk = scratch(dc::kScratchDst, groups * dx_group);
  const float* gy = grad_output.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* gx = out.data_ptr<float>();
  auto gs = strides4(grad_output), ws = strides4(weight), xs = strides4(out);
  const int nt = num_threads();
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_to_blocked(gy + g * kg * gs[1], gs.data(), d.n, kg, P, Q, V, dy_blk + g * dy_group, tid, n_threads);
  });
  run_bwd_data(
      d, phases, dy_blk, dx_blk, groups, dy_group, dx_group,
      [&](const dc::BwdDataPhase& ph, float* dst, int tid, int n_threads) {
        const int64_t per_group = cb * kb * ph.sub.r * ph.sub.s * V * V;
        for (int64_t g = 0; g < groups; ++g)
          dc::reorder_weight_to_blocked_bwd(w + g * kg * ws[0], ws.data(), kg, cg, d.r, d.s, ph.taps_r.data(),
                                            ph.sub.r, ph.taps_s.data(), ph.sub.s, V, dst + g * per_group, tid,
                                            n_threads);
      },
      [&](const dc::BwdDataPhase& ph, int64_t begin, int64_t end, float* dst) {  // one group
        dc::reorder_weight_to_blocked_bwd_blocks(w, ws.data(), kg, cg, d.r, d.s, ph.taps_r.data(), ph.sub.r,
                                                 ph.taps_s.data(), ph.sub.s, V, begin, end, dst);
      });
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_from_blocked(dx_blk + g * dx_group, d.n, cg, d.h, d.w, V, gx + g * cg * xs[1], xs.data(), tid,
                               n_threads);
  });
  return out;
}

// The weight gradient of every group on blocked tensors, x (N, Cb, H, W, V) at x_group
// floats per group and dy (N, Kb, P, Q, V) at dy_group. Returns dW (Kb, Cb, R, S, V, V) of
// group g at the returned pointer + g * (its second member) floats: straight in `out`
// (dense, one group) when given and no private copies are needed, else in scratch slot 2.
std::pair<const float*, int64_t> run_upd(const ConvDesc& d, int64_t groups, const float* x_blk, int64_t x_group,
                                         const float* dy_blk, int64_t dy_group, float* out = nullptr) {
  auto prim = dc::get_upd_primitive(d, jit_isa(), num_threads());
  const int nt = prim->plan.threads;
  const dc::UpdKernels kernels = dc::acquire_kernels(*prim);
  const dc::UpdPlan& plan = prim->plan;
  const int64_t dw_elems = plan.dw_elements(), group_stride = plan.parts * dw_elems;
  // The kernels write all of it.
  float* dw = out && groups == 1 && plan.parts == 1 ? out : scratch(dc::kScratchWei, groups * group_stride);
  run_shares(nt, [&](int tid, int) {
    for (int64_t g = 0; g < groups; ++g)
      dc::upd_execute(*prim, kernels, x_blk + g * x_group, dy_blk + g * dy_group, dw + g * group_stride, tid);
  });
  // The private copies of a minibatch split add into the first.
  if (plan.parts > 1)
    run_shares(nt, [&](int tid, int n_threads) {
      const int64_t total = groups * dw_elems;
      for (int64_t i = total * tid / n_threads; i < total * (tid + 1) / n_threads; ++i) {
        float* first = dw + (i / dw_elems) * group_stride + i % dw_elems;
        for (int p = 1; p < plan.parts; ++p) *first += first[p * dw_elems];
      }
    });
  return {dw, group_stride};
}

// Empty when the JIT does not take the problem (see conv2d_backward_weight).
Tensor backward_weight_jit(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_weight";
  const dc::Isa isa = dc::active_isa();
  if (isa == dc::Isa::none) return Tensor();
  const int64_t k = weight_size[0], cg = weight_size[1], kg = k / groups, V = dc::vlen(isa);
  if (!groups_fit_blocks(groups, kg, cg, V)) return Tensor();
  ConvDesc d = make_desc(op, input.size(0), cg, input.size(2), input.size(3), kg, weight_size[2], weight_size[3],
                         stride, padding, dilation);
  Tensor out = at::empty(weight_size, grad_output.options());
  if (d.n == 0) return out.zero_();
  const int nt = num_threads();
  const int64_t P = d.p(), Q = d.q(), cb = dc::div_up(cg, V), kb = dc::div_up(kg, V);
  const int64_t x_group = d.n * cb * d.h * d.w * V, dy_group = d.n * kb * P * Q * V;
  float* x_blk = scratch(dc::kScratchSrc, groups * x_group);
  float* dy_blk = scratch(dc::kScratchDst, groups * dy_group);
  const float* x = input.data_ptr<float>();
  const float* gy = grad_output.data_ptr<float>();
  auto xs = strides4(input), gs = strides4(grad_output), ws = strides4(out);
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g) {
      dc::reorder_to_blocked(x + g * cg * xs[1], xs.data(), d.n, cg, d.h, d.w, static_cast<int>(V), x_blk + g * x_group,
                             tid, n_threads);
      dc::reorder_to_blocked(gy + g * kg * gs[1], gs.data(), d.n, kg, P, Q, static_cast<int>(V),
                             dy_blk + g * dy_group, tid, n_threads);
    }
  });
  auto [dw, group_stride] = run_upd(d, groups, x_blk, x_group, dy_blk, dy_group);
  float* o = out.data_ptr<float>();
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_weight_from_blocked(dw + g * group_stride, kg, cg, d.r, d.s, static_cast<int>(V), o + g * kg * ws[0],
                                      ws.data(), tid, n_threads);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> aten_backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups, bool want_input,
                                                 bool want_weight) {
  const AtenPadding pad = aten_padding(padding);
  Tensor x = pad.any_extra() ? at::constant_pad_nd(input, pad.extra, 0) : input;
  auto grads = at::convolution_backward(grad_output, x, weight, c10::nullopt, stride, pad.symmetric, dilation, false,
                                        {0, 0}, groups, {want_input, want_weight, false});
  Tensor gi = std::get<0>(grads);
  if (want_input && pad.any_extra())
    gi = gi.narrow(2, pad.extra[2], input.size(2)).narrow(3, pad.extra[0], input.size(3)).contiguous(
        input.suggest_memory_format());
  return {gi, std::get<1>(grads), Tensor()};
}

}  // namespace

namespace {
Tensor backward_data_any_path(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups);
}  // namespace

// The gradient of conv2d with respect to its input, of shape input_size.
//
// On the forward JIT kernels (DESIGN.md section 5): stride 1 by duality, a forward
// convolution of grad_output with the weights flipped in R and S and C and K swapped in
// each group; strided layers by phases (conv/bwd_data.h), one such convolution per phase of
// the input pixels. 1x1 stride-1 NCHW layers take the NCHW 1x1 GEMM with the transposed
// weight matrix, stride-1 depthwise layers the depthwise kernels. Strided depthwise layers
// and groups that would waste most of a channel block take ATen's convolution_backward.
Tensor conv2d_backward_data(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  dc::ScratchScope call;
  const char* op = "conv2d_backward_data";
  check_backward_args(op, grad_output, weight, stride, padding, dilation, groups);
  check_float_cpu(weight, op, "weight");
  // Channels_last when grad_output or the weight is, whatever the path (the fake kernel says so).
  const at::MemoryFormat format = is_channels_last(grad_output) || is_channels_last(weight)
                                      ? at::MemoryFormat::ChannelsLast
                                      : at::MemoryFormat::Contiguous;
  // No input or no output channels: an empty or zero gradient (and torch's forward then
  // gives an output of 0 channels, whatever the weight says).
  if (input_size.size() == 4 && (input_size[1] == 0 || weight.size(0) == 0))
    return at::zeros(input_size, grad_output.options()).contiguous(format);
  const ConvDesc d = backward_desc(op, grad_output, input_size, weight.sizes(), stride, padding, dilation, groups);
  if (!jit_takes(d)) {
    ++aten_fallbacks;
    Tensor input = at::empty(input_size, grad_output.options());
    return std::get<0>(aten_backward(grad_output, input, weight, stride, padding, dilation, groups, true, false))
        .contiguous(format);
  }
  return backward_data_any_path(grad_output, weight, input_size, stride, padding, dilation, groups).contiguous(format);
}

namespace {

Tensor backward_data_any_path(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  if (Tensor gi = depthwise_backward_data(grad_output, weight, input_size, stride, padding, dilation, groups);
      gi.defined())
    return gi;
  // 1x1, stride 1, unpadded, NCHW: the input gradient is W^T dY per image, the NCHW 1x1
  // GEMM with the (small) transposed weight matrix.
  if (groups == 1 && weight.size(2) == 1 && weight.size(3) == 1 && dc::active_isa() != dc::Isa::none &&
      weight.size(1) == input_size[1] && grad_output.size(2) == input_size[2] && grad_output.size(3) == input_size[3])
    if (Tensor gi = conv2d_nchw_1x1(grad_output, weight.view({weight.size(0), weight.size(1)}).t().contiguous().view(
                                                     {weight.size(1), weight.size(0), 1, 1}),
                                    c10::nullopt, stride, padding, dilation, false);
        gi.defined())
      return gi;
  if (Tensor gi = backward_data_jit(grad_output, weight, input_size, stride, padding, dilation, groups); gi.defined())
    return gi;
  // Only the input's shape matters for this gradient.
  Tensor input = at::empty(input_size, grad_output.options());
  return std::get<0>(aten_backward(grad_output, input, weight, stride, padding, dilation, groups, true, false));
}

}  // namespace

// The gradient of conv2d with respect to its weight, of shape weight_size: the JIT
// weight-update kernels, except for groups that would waste most of a channel block
// (depthwise included), which take ATen's convolution_backward for now.
Tensor conv2d_backward_weight(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  dc::ScratchScope call;
  const char* op = "conv2d_backward_weight";
  check_backward_args(op, grad_output, input, stride, padding, dilation, groups);
  check_float_cpu(input, op, "input");
  if (weight_size.size() == 4 && (input.size(1) == 0 || weight_size[0] == 0))
    return at::zeros(weight_size, grad_output.options());
  const ConvDesc d = backward_desc(op, grad_output, input.sizes(), weight_size, stride, padding, dilation, groups);
  if (!jit_takes(d))
    ++aten_fallbacks;
  else if (Tensor gw = backward_weight_jit(grad_output, input, weight_size, stride, padding, dilation, groups);
           gw.defined())
    return gw;
  Tensor weight = at::empty(weight_size, grad_output.options());
  return std::get<1>(aten_backward(grad_output, input, weight, stride, padding, dilation, groups, false, true))
      .contiguous();
}

namespace {

// The geometry of a blocked convolution (conv2d_blocked): input (N, Cb, H, W, V) of c
// channels (blocked_weight_geometry), output (N, Kb, P, Q, V).
ConvDesc blocked_desc(const char* op, at::IntArrayRef x_size, int64_t kb, int64_t r, int64_t s,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t c,
                      int64_t V) {
  return fill_desc(op, x_size[0], c, x_size[2], x_size[3], kb * V, r, s, stride, padding, dilation);
}

void check_blocked_grad_output(const char* op, const Tensor& gy, const ConvDesc& d, int64_t kb, int64_t V) {
  check_float_cpu(gy, op, "grad_output");
  TORCH_CHECK(gy.dim() == 5 && gy.size(0) == d.n && gy.size(1) == kb && gy.size(2) == d.p() && gy.size(3) == d.q() &&
                  gy.size(4) == V,
              op, ": 'grad_output' of shape ", gy.sizes(), " does not match the blocked output (", d.n, ", ", kb, ", ",
              d.p(), ", ", d.q(), ", ", V, ")");
}

}  // namespace

// The input gradient of conv2d_blocked, blocked like its input (input_size: N, Cb, H, W, V),
// with its weight blocked or (K, C, R, S) as conv2d_blocked takes it.
// Channels past in_channels get a zero gradient, as the forward does not read them.
Tensor conv2d_blocked_backward_data(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    c10::optional<int64_t> in_channels) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_backward_data";
  const int64_t V = dc::vlen(jit_isa());
  check_float_cpu(weight, op, "wb");
  TORCH_CHECK(input_size.size() == 5 && input_size[4] == V, op, ": expected a blocked 'input_size' (N, C/", V,
              ", H, W, ", V, "), got ", input_size);
  const int64_t cb = input_size[1];
  const std::pair<int64_t, int64_t> geometry = blocked_weight_geometry(op, "wb", weight.sizes(), cb, in_channels, V);
  const int64_t kb = geometry.first, c = geometry.second;
  const bool kcrs = weight.dim() == 4;
  ConvDesc d = blocked_desc(op, input_size, kb, weight.size(2), weight.size(3), stride, padding, dilation, c, V);
  check_blocked_grad_output(op, grad_output, d, kb, V);
  if (!jit_takes(d)) {
    ++aten_fallbacks;
    Tensor input = at::empty({d.n, d.c, d.h, d.w}, grad_output.options());
    Tensor w = kcrs ? padded_out_channels(weight, kb, V) : unblock_weight(weight).narrow(1, 0, d.c);
    return block(std::get<0>(aten_backward(unblock(grad_output, kb * V), input, w, stride, padding, dilation, 1, true,
                                           false)),
                 V);
  }
  validated(op, d);
  Tensor gy = grad_output.contiguous(), w = kcrs ? weight : weight.contiguous();
  Tensor out = at::empty(input_size, gy.options());
  const float* wp = w.data_ptr<float>();
  auto ws = strides4(w);
  const int64_t k = w.size(0);
  // One group always fits its blocks, so every geometry has its phases.
  run_bwd_data(
      d, dc::bwd_data_phases(d), gy.data_ptr<float>(), out.data_ptr<float>(), 1, 0, 0,
      [&](const dc::BwdDataPhase& ph, float* dst, int tid, int n_threads) {
        if (kcrs)
          dc::reorder_weight_to_blocked_bwd(wp, ws.data(), k, c, d.r, d.s, ph.taps_r.data(), ph.sub.r,
                                            ph.taps_s.data(), ph.sub.s, static_cast<int>(V), dst, tid, n_threads);
        else
          dc::reorder_blocked_weight_to_bwd(wp, kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r, ph.taps_s.data(),
                                            ph.sub.s, static_cast<int>(V), dst, tid, n_threads);
      },
      [&](const dc::BwdDataPhase& ph, int64_t begin, int64_t end, float* dst) {
        if (kcrs)
          dc::reorder_weight_to_blocked_bwd_blocks(wp, ws.data(), k, c, d.r, d.s, ph.taps_r.data(), ph.sub.r,
                                                   ph.taps_s.data(), ph.sub.s, static_cast<int>(V), begin, end, dst);
        else
          dc::reorder_blocked_weight_to_bwd_blocks(wp, kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r, ph.taps_s.data(),
                                                   ph.sub.s, static_cast<int>(V), begin, end, dst);
      });
  if (d.c < cb * V && d.n > 0) out.select(1, cb - 1).narrow(3, d.c - (cb - 1) * V, cb * V - d.c).zero_();
  return out;
}

// The weight gradient of conv2d_blocked: blocked when weight_size is (Kb, Cb, R, S, V, V),
// (K, C, R, S) when it is that, written straight from the kernels' blocks (no blocked
// gradient to unpack). Input channels past in_channels get a zero gradient.
Tensor conv2d_blocked_backward_weight(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      c10::optional<int64_t> in_channels) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_backward_weight";
  const int64_t V = dc::vlen(jit_isa());
  check_float_cpu(input, op, "xb");
  TORCH_CHECK(input.dim() == 5 && input.size(4) == V, op, ": expected a blocked 'xb' (N, C/", V, ", H, W, ", V,
              "), got shape ", input.sizes());
  TORCH_CHECK(weight_size.size() == 4 || weight_size.size() == 6, op,
              ": expected a 'weight_size' of 6 values (blocked) or 4 (K, C, R, S), got ", weight_size);
  const int64_t cb = input.size(1);
  const std::pair<int64_t, int64_t> geometry = blocked_weight_geometry(op, "weight_size", weight_size, cb, in_channels, V);
  const int64_t kb = geometry.first, c = geometry.second;
  const bool kcrs = weight_size.size() == 4;
  ConvDesc d = blocked_desc(op, input.sizes(), kb, weight_size[2], weight_size[3], stride, padding, dilation, c, V);
  check_blocked_grad_output(op, grad_output, d, kb, V);
  if (!jit_takes(d)) {
    ++aten_fallbacks;
    Tensor weight = at::empty({kb * V, d.c, d.r, d.s}, grad_output.options());
    Tensor gw = std::get<1>(aten_backward(unblock(grad_output, kb * V), unblock(input, d.c), weight, stride, padding,
                                          dilation, 1, false, true));
    return kcrs ? gw.narrow(0, 0, weight_size[0]).contiguous() : block_weight(gw, V);
  }
  validated(op, d);
  Tensor out = at::empty(weight_size, input.options());
  if (d.n == 0) return out.zero_();
  Tensor x = input.contiguous(), gy = grad_output.contiguous();
  if (kcrs) {
    const float* dw = run_upd(d, 1, x.data_ptr<float>(), 0, gy.data_ptr<float>(), 0).first;
    auto ws = strides4(out);
    run_shares(num_threads(), [&](int tid, int n_threads) {
      dc::reorder_weight_from_blocked(dw, weight_size[0], c, d.r, d.s, static_cast<int>(V), out.data_ptr<float>(),
                                      ws.data(), tid, n_threads);
    });
    return out;
  }
  const float* dw = run_upd(d, 1, x.data_ptr<float>(), 0, gy.data_ptr<float>(), 0, out.data_ptr<float>()).first;
  if (dw != out.data_ptr<float>()) std::memcpy(out.data_ptr<float>(), dw, sizeof(float) * out.numel());
  if (d.c < cb * V) out.select(1, cb - 1).narrow(3, d.c - (cb - 1) * V, cb * V - d.c).zero_();
  return out;
}

// --- utilities (pybind11): never on the compute path -------------------------------------

double fma_peak_gflops(int64_t threads, double seconds) {
  dc::Isa isa = jit_isa();
  auto k = dc::get_kernel(dc::make_peak_kernel(isa)->name(), [&] { return dc::make_peak_kernel(isa); }, "fma peak");
  auto fn = k->entry<dc::PeakKernelFn>();
  const int nt = static_cast<int>(std::max<int64_t>(1, threads));
  int64_t iters = 1 << 16;
  // Grow the loop until one run lasts long enough to time.
  for (;;) {
    auto t0 = std::chrono::steady_clock::now();
    run_shares(nt, [&](int, int) { fn(iters); });
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt >= seconds) return static_cast<double>(iters) * dc::fma_peak_flops_per_iter(isa) * nt / dt * 1e-9;
    iters *= 2;
  }
}

pybind11::dict jit_stats() {
  auto s = dc::kernel_cache_stats();
  pybind11::dict d;
  d["kernels"] = s.generated;
  d["cache_hits"] = s.hits;
  d["cache_entries"] = s.entries;
  d["cache_bytes"] = s.bytes;
  d["cache_cap_bytes"] = s.cap_bytes;
  d["evicted"] = s.evicted;
  d["generate_ms"] = s.generate_ms;
  d["aten_fallbacks"] = aten_fallbacks.load();
  d["conv_stats_recomputed"] = conv_stats_recomputed.load();
  d["scratch_kept_bytes"] = dc::scratch_kept_bytes();
  d["scratch_cap_bytes"] = dc::scratch_cap_bytes();
  return d;
}

std::string fwd_plan(const std::string& problem, int64_t threads) {
  return dc::get_fwd_primitive(dc::parse_conv_desc(problem), jit_isa(), static_cast<int>(threads), fwd_options())
      ->plan.to_string();
}

}  // namespace dc_torch

TORCH_LIBRARY(directconv, m) {
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, "
        "int groups, bool relu) -> Tensor");
  m.def("conv2d_packed(Tensor input, Tensor weight, Tensor? bias, int out_channels, int[2] stride, int[4] padding, "
        "int[2] dilation, int groups, bool relu, bool channels_last) -> Tensor");
  m.def("pack_weight(Tensor weight, int groups) -> Tensor");
  m.def("conv2d_blocked(Tensor xb, Tensor wb, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, "
        "bool relu, int? in_channels, Tensor? residual=None) -> Tensor");
  m.def("conv2d_blocked_stats(Tensor xb, Tensor wb, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, "
        "int? in_channels, Tensor shift, int channels) -> (Tensor out, Tensor mean, Tensor var)");
  m.def("conv2d_backward_data(Tensor grad_output, Tensor weight, SymInt[4] input_size, int[2] stride, int[4] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_backward_weight(Tensor grad_output, Tensor input, SymInt[4] weight_size, int[2] stride, "
        "int[4] padding, int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_blocked_backward_data(Tensor grad_output, Tensor wb, SymInt[5] input_size, int[2] stride, "
        "int[4] padding, int[2] dilation, int? in_channels) -> Tensor");
  m.def("conv2d_blocked_backward_weight(Tensor grad_output, Tensor xb, SymInt[] weight_size, int[2] stride, "
        "int[4] padding, int[2] dilation, int? in_channels) -> Tensor");
  m.def("to_blocked(Tensor x, int vlen) -> Tensor");
  m.def("from_blocked(Tensor xb, int channels) -> Tensor");
  m.def("to_blocked_weight(Tensor w, int vlen) -> Tensor");
  m.def("from_blocked_weight(Tensor wb, int k, int c) -> Tensor");
}

TORCH_LIBRARY_IMPL(directconv, CPU, m) {
  m.impl("conv2d", &dc_torch::conv2d);
  m.impl("conv2d_packed", &dc_torch::conv2d_packed);
  m.impl("pack_weight", &dc_torch::pack_weight);
  m.impl("conv2d_blocked", &dc_torch::conv2d_blocked);
  m.impl("conv2d_blocked_stats", &dc_torch::conv2d_blocked_stats);
  m.impl("conv2d_backward_data", &dc_torch::conv2d_backward_data);
  m.impl("conv2d_backward_weight", &dc_torch::conv2d_backward_weight);
  m.impl("conv2d_blocked_backward_data", &dc_torch::conv2d_blocked_backward_data);
  m.impl("conv2d_blocked_backward_weight", &dc_torch::conv2d_blocked_backward_weight);
  m.impl("to_blocked", &dc_torch::to_blocked);
  m.impl("from_blocked", &dc_torch::from_blocked);
  m.impl("to_blocked_weight", &dc_torch::to_blocked_weight);
  m.impl("from_blocked_weight", &dc_torch::from_blocked_weight);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_directconv utilities; the compute path is in torch.ops.directconv";
  m.def("isa", [] { return std::string(dc::isa_name(dc::active_isa())); });
  m.def("detected_isa", [] { return std::string(dc::isa_name(dc::detected_isa())); });
  m.def("set_isa_cap", [](const std::string& name) {
    try {
      dc::set_isa_cap(dc::parse_isa(name));
    } catch (const std::invalid_argument& e) {
      throw pybind11::value_error(e.what());
    }
    dc::clear_fwd_primitives();
    dc::clear_dw_primitives();
    dc::clear_upd_primitives();
  });
  m.def("jit_stats", &dc_torch::jit_stats);
  m.def("set_cache_mb", [](double mb) { dc::set_kernel_cache_cap_bytes(static_cast<int64_t>(mb * 1024 * 1024)); });
  m.def(
      "set_scratch_mb", [](double mb) { dc::set_scratch_cap_bytes(static_cast<int64_t>(std::max(0.0, mb) * 1024 * 1024)); },
      "The cap of the scratch kept between calls over all threads (TORCH_DIRECTCONV_SCRATCH_MB); buffers past it "
      "are returned to the OS at the end of their call.");
  m.def("clear_cache", [] {
    dc::clear_fwd_primitives();
    dc::clear_dw_primitives();
    dc::clear_upd_primitives();
    dc::clear_kernel_cache();
  });
  m.def("fma_peak_gflops", &dc_torch::fma_peak_gflops, pybind11::arg("threads"), pybind11::arg("seconds") = 0.2);
  m.def(
      "set_fwd_options",
      [](int prefetch, int c_chunk) {
        dc_torch::fwd_options().prefetch = prefetch;
        dc_torch::fwd_options().c_chunk = c_chunk;
      },
      pybind11::arg("prefetch") = -1, pybind11::arg("c_chunk") = -1,
      "For benchmarks: force software prefetch on (1) or off (0), and the input-channel blocks per kernel call; "
      "-1 lets the plan decide.");
  m.def("fwd_plan", &dc_torch::fwd_plan, pybind11::arg("problem"), pybind11::arg("threads") = 1);
  m.def(
      "upd_plan",
      [](const std::string& problem, int64_t threads) {
        return dc::get_upd_primitive(dc::parse_conv_desc(problem), dc_torch::jit_isa(), static_cast<int>(threads))
            ->plan.to_string();
      },
      pybind11::arg("problem"), pybind11::arg("threads") = 1,
      "The weight-update plan of a benchdnn problem string: its tile, rows per block and minibatch parts.");
  dc_torch::register_op_timers(m);
}
