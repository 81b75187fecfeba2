// The Autograd kernels of conv2d, conv2d_blocked and conv2d_blocked_stats. A C++ autograd node can ask the engine
// which of its inputs' gradients the running backward will use (needs_input_grad answers
// from the graph task), so autograd.grad(y, [x]) runs no weight gradient and a frozen or
// leaf-without-grad input gets no input gradient, as torch's convolution does with its output
// mask. The backward calls the backward ops through the dispatcher, so torch.compile and
// AOTAutograd trace them, and a double backward meets their error.
//
// Under torch.func transforms, the Python autograd.Function of each op (_autograd.py) takes
// over: functorch refuses a C++ autograd Function.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "autograd_util.h"

namespace dc_torch {

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The tensor arguments every convolution op starts with.
enum ConvTensorArg : int64_t { kInput, kWeight, kBias, kResidual };

std::vector<int64_t> to_vector(at::IntArrayRef v) { return v.vec(); }

// The output gradient through the fused ReLU (no gradient where the output is <= 0, as
// torch.relu's backward), and the (data, weight) gradient ops of the convolution on it,
// each called only when the backward uses it.
struct ConvGrads {
  Tensor input, weight, output;  // output: the gradient after the ReLU mask
};

template <typename DataOp, typename WeightOp, typename Last>
ConvGrads conv_grads(AutogradContext* ctx, const Tensor& grad_output, const DataOp& data_op,
                     const WeightOp& weight_op, const Last& last) {
  const variable_list saved = ctx->get_saved_variables();
  const Tensor& x = saved[0];
  const Tensor& w = saved[1];
  ConvGrads g;
  g.output = ctx->saved_data["relu"].toBool() ? at::threshold_backward(grad_output, saved[2], 0) : grad_output;
  const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector(),
                             padding = ctx->saved_data["padding"].toIntVector(),
                             dilation = ctx->saved_data["dilation"].toIntVector();
  if (wanted(ctx, kInput)) g.input = call_backward(data_op, g.output, w, x.sym_sizes(), stride, padding, dilation, last);
  if (wanted(ctx, kWeight))
    g.weight = call_backward(weight_op, g.output, x, w.sym_sizes(), stride, padding, dilation, last);
  return g;
}

// The bias gradient: the output gradient summed over (N, H, W) in fp32 (a bf16 output's too,
// whose bf16 sum would lose the small terms), the first `size` channels, as the bias's type.
Tensor bias_grad(const Tensor& grad, int64_t size, int64_t dtype) {
  Tensor g = grad.sum({0, 2, 3}, false, at::kFloat).reshape({-1});
  if (g.size(0) != size) g = g.narrow(0, 0, size);
  return g.to(static_cast<at::ScalarType>(dtype));
}

void save_bias(AutogradContext* ctx, const std::optional<Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  ctx->saved_data["bias_size"] = has_bias ? bias->size(0) : int64_t{0};
  ctx->saved_data["bias_dtype"] = static_cast<int64_t>(has_bias ? bias->scalar_type() : at::kFloat);
}

Tensor saved_bias_grad(AutogradContext* ctx, const Tensor& grad) {
  return bias_grad(grad, ctx->saved_data["bias_size"].toInt(), ctx->saved_data["bias_dtype"].toInt());
}

void save_geometry(AutogradContext* ctx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                   bool relu) {
  ctx->saved_data["stride"] = to_vector(stride);
  ctx->saved_data["padding"] = to_vector(padding);
  ctx->saved_data["dilation"] = to_vector(dilation);
  ctx->saved_data["relu"] = relu;
}

// Saves the input, the weight and, with a fused ReLU, the output (for its mask).
void save_tensors(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& out, bool relu) {
  ctx->save_for_backward(relu ? variable_list{x, w, out} : variable_list{x, w});
}

// --- conv2d(input, weight, bias?, stride, padding, dilation, groups, relu) ----------------

using Conv2dFn = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, at::IntArrayRef, at::IntArrayRef,
                        at::IntArrayRef, int64_t, bool);
using Conv2dGradFn = Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, at::IntArrayRef, at::IntArrayRef,
                            at::IntArrayRef, int64_t);

const c10::TypedOperatorHandle<Conv2dFn>& conv2d_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("directconv::conv2d", "").typed<Conv2dFn>();
  return op;
}

class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static constexpr size_t kArgs = 8;

  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = conv2d_op().call(input, weight, bias, stride, padding, dilation, groups, relu);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["edges"] = edge_indices<3>({true, true, has_bias});
    ctx->saved_data["groups"] = groups;
    save_bias(ctx, bias);
    save_geometry(ctx, stride, padding, dilation, relu);
    save_tensors(ctx, input, weight, out, relu);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto data_op = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("directconv::conv2d_backward_data", "")
                                    .typed<Conv2dGradFn>();
    static const auto weight_op = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("directconv::conv2d_backward_weight", "")
                                      .typed<Conv2dGradFn>();
    const ConvGrads g = conv_grads(ctx, grads[0], data_op, weight_op, ctx->saved_data["groups"].toInt());
    variable_list out(kArgs);
    out[0] = g.input;
    out[1] = g.weight;
    if (wanted(ctx, kBias)) out[2] = saved_bias_grad(ctx, g.output);
    return out;
  }
};

Tensor conv2d_autograd(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       bool relu) {
  if (!records_graph(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups, relu);
  }
  return Conv2dFunction::apply(input, weight, bias, stride, padding, dilation, groups, relu);
}

// --- conv2d_blocked(xb, wb, bias?, stride, padding, dilation, relu, in_channels?, residual?) -
// The residual is added before the ReLU: its gradient is the output's after the mask.

using BlockedFn = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, at::IntArrayRef, at::IntArrayRef,
                         at::IntArrayRef, bool, std::optional<int64_t>, const std::optional<Tensor>&);
using BlockedGradFn = Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, at::IntArrayRef, at::IntArrayRef,
                             at::IntArrayRef, std::optional<int64_t>);

const c10::TypedOperatorHandle<BlockedFn>& blocked_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("directconv::conv2d_blocked", "").typed<BlockedFn>();
  return op;
}

class BlockedFunction : public torch::autograd::Function<BlockedFunction> {
 public:
  static constexpr size_t kArgs = 9;

  static Tensor forward(AutogradContext* ctx, const Tensor& xb, const Tensor& wb, const std::optional<Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                        std::optional<int64_t> in_channels, const std::optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = blocked_op().call(xb, wb, bias, stride, padding, dilation, relu, in_channels, residual);
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_residual = residual.has_value() && residual->defined();
    ctx->saved_data["edges"] = edge_indices<4>({true, true, has_bias, has_residual});
    ctx->saved_data["in_channels"] = in_channels;
    save_bias(ctx, bias);
    save_geometry(ctx, stride, padding, dilation, relu);
    save_tensors(ctx, xb, wb, out, relu);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto data_op = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("directconv::conv2d_blocked_backward_data", "")
                                    .typed<BlockedGradFn>();
    static const auto weight_op = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("directconv::conv2d_blocked_backward_weight", "")
                                      .typed<BlockedGradFn>();
    const ConvGrads g = conv_grads(ctx, grads[0], data_op, weight_op, ctx->saved_data["in_channels"].toOptional<int64_t>());
    variable_list out(kArgs);
    out[0] = g.input;
    out[1] = g.weight;
    if (wanted(ctx, kBias)) out[2] = saved_bias_grad(ctx, g.output);
    if (wanted(ctx, kResidual)) out[8] = g.output;
    return out;
  }
};

Tensor conv2d_blocked_autograd(const Tensor& xb, const Tensor& wb, const std::optional<Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                               std::optional<int64_t> in_channels, const std::optional<Tensor>& residual) {
  if (!records_graph(xb, wb, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return blocked_op().call(xb, wb, bias, stride, padding, dilation, relu, in_channels, residual);
  }
  return BlockedFunction::apply(xb, wb, bias, stride, padding, dilation, relu, in_channels, residual);
}

// --- conv2d_blocked_stats(xb, wb, bias?, stride, padding, dilation, in_channels?, shift, channels)
// -> (yb, mean, var). The statistics carry no gradient: a training batch norm's backward
// (bn_backward_blocked with train=True) already differentiates through its batch statistics.

using StatsFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                   at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                                   std::optional<int64_t>, const Tensor&, int64_t);

const c10::TypedOperatorHandle<StatsFn>& stats_op() {
  static const auto op = find_op<StatsFn>("directconv::conv2d_blocked_stats");
  return op;
}

class StatsFunction : public torch::autograd::Function<StatsFunction> {
 public:
  static constexpr size_t kArgs = 9;

  static variable_list forward(AutogradContext* ctx, const Tensor& xb, const Tensor& wb,
                               const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, std::optional<int64_t> in_channels, const Tensor& shift,
                               int64_t channels) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, mean, var] = stats_op().call(xb, wb, bias, stride, padding, dilation, in_channels, shift, channels);
    const bool has_bias = present(bias);
    ctx->saved_data["edges"] = edge_indices<4>({true, true, has_bias, true});
    ctx->saved_data["in_channels"] = in_channels;
    save_bias(ctx, bias);
    save_geometry(ctx, stride, padding, dilation, false);
    save_tensors(ctx, xb, wb, out, false);
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto data_op = find_op<BlockedGradFn>("directconv::conv2d_blocked_backward_data");
    static const auto weight_op = find_op<BlockedGradFn>("directconv::conv2d_blocked_backward_weight");
    variable_list out(kArgs);
    if (!grads[0].defined()) return out;  // only the statistics were used: nothing flows back
    const ConvGrads g = conv_grads(ctx, grads[0], data_op, weight_op, ctx->saved_data["in_channels"].toOptional<int64_t>());
    out[0] = g.input;
    out[1] = g.weight;
    if (wanted(ctx, kBias)) out[2] = saved_bias_grad(ctx, g.output);
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> conv2d_blocked_stats_autograd(const Tensor& xb, const Tensor& wb,
                                                                 const std::optional<Tensor>& bias,
                                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                                 at::IntArrayRef dilation,
                                                                 std::optional<int64_t> in_channels,
                                                                 const Tensor& shift, int64_t channels) {
  if (!records_graph(xb, wb, bias, shift)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return stats_op().call(xb, wb, bias, stride, padding, dilation, in_channels, shift, channels);
  }
  const variable_list r = StatsFunction::apply(xb, wb, bias, stride, padding, dilation, in_channels, shift, channels);
  return {r[0], r[1], r[2]};
}

}  // namespace

}  // namespace dc_torch

TORCH_LIBRARY_IMPL(directconv, Autograd, m) {
  m.impl("conv2d", &dc_torch::conv2d_autograd);
  m.impl("conv2d_blocked", &dc_torch::conv2d_blocked_autograd);
  m.impl("conv2d_blocked_stats", &dc_torch::conv2d_blocked_stats_autograd);
}
