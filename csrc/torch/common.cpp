// The pieces that every op family of the torch layer shares: argument checks, Tensor ->
// ConvDesc, torch's convolution for what the kernels do not take, and the layout helpers.
#include "common.h"

#include <algorithm>

#include "conv/paths.h"
#include "jit/isa.h"
#include "tensor_pool.h"

namespace dc_torch {

dc::Isa jit_isa(const char* op) {
  const dc::Isa isa = dc::fp32_isa(dc::active_isa());
  TORCH_CHECK(isa != dc::Isa::none, op,
              ": no JIT ISA is active (the CPU lacks AVX2, or TORCH_DIRECTCONV_ISA=none); "
              "the Python API falls back to torch's convolution");
  return isa;
}

void check_conv_dtype_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected '", name, "' on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": expected '", name,
              "' of dtype float32 or bfloat16, got ", t.scalar_type());
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
  return torch_conv2d(input, weight, bias, stride, padding, dilation, groups, relu, format);
}

Tensor torch_conv2d(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                    at::MemoryFormat format) {
  const AtenPadding pad = aten_padding(padding);
  Tensor x = pad.any_extra() ? at::constant_pad_nd(input, pad.extra, 0) : input;
  Tensor y = at::conv2d(x, weight, bias, stride, pad.symmetric, dilation, groups);
  if (relu) y = at::relu(y);
  return y.contiguous(format);
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
namespace {

// A contiguous copy of a view, in a tensor of the pool.
Tensor copy_to_new(const Tensor& view) { return new_tensor(view.sizes(), view.options()).copy_(view); }

}  // namespace

Tensor unblock(const Tensor& xb, int64_t channels) {
  return xb.permute({0, 1, 4, 2, 3}).reshape({xb.size(0), xb.size(1) * xb.size(4), xb.size(2), xb.size(3)})
      .narrow(1, 0, channels);
}

Tensor block(const Tensor& x, int64_t V) {
  const int64_t cb = dc::div_up(x.size(1), V);
  return copy_to_new(at::constant_pad_nd(x, {0, 0, 0, 0, 0, cb * V - x.size(1)})
                         .view({x.size(0), cb, V, x.size(2), x.size(3)})
                         .permute({0, 1, 3, 4, 2}));
}

Tensor unblock_weight(const Tensor& wb) {
  const int64_t V = wb.size(4);
  return wb.permute({0, 5, 1, 4, 2, 3}).reshape({wb.size(0) * V, wb.size(1) * V, wb.size(2), wb.size(3)});
}

Tensor block_weight(const Tensor& w, int64_t V) {
  const int64_t kb = dc::div_up(w.size(0), V), cb = dc::div_up(w.size(1), V);
  return copy_to_new(at::constant_pad_nd(w, {0, 0, 0, 0, 0, cb * V - w.size(1), 0, kb * V - w.size(0)})
                         .view({kb, V, cb, V, w.size(2), w.size(3)})
                         .permute({0, 2, 4, 5, 3, 1}));
}

// Bias padded with zeros to kb * V, as the kernels read whole blocks.
Tensor padded_bias(const c10::optional<Tensor>& bias, int64_t k, int64_t padded, const char* op) {
  if (!bias.has_value() || !bias->defined()) return Tensor();
  check_float_cpu(*bias, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == k, op, ": expected 'bias' of shape (", k, "), got ",
              bias->sizes());
  if (padded == k && bias->is_contiguous()) return *bias;
  Tensor b = new_zeros({padded}, bias->options());
  b.narrow(0, 0, k).copy_(*bias);
  return b;
}

// Plan choices forced by the benchmark (set_fwd_options); defaults let the plan decide.
dc::FwdPlanOptions& fwd_options() {
  static dc::FwdPlanOptions options;
  return options;
}
dc::FwdPlanOptions fwd_options(bool bias, bool residual, bool relu) {
  dc::FwdPlanOptions options = fwd_options();
  options.post = {bias, residual, relu};
  return options;
}

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
  return dc::is_depthwise(groups, weight.size(0), weight.size(1));
}

}  // namespace dc_torch
