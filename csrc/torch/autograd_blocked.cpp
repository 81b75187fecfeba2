// The Autograd kernels of the layout, batch-norm and pooling ops of a blocked model, as
// autograd.cpp's for the convolutions: each backward computes only the gradients the engine
// asks for (the batch norm passes that output mask on to bn_backward_blocked), calls the
// backward ops through the dispatcher (torch.compile and AOTAutograd trace them), and costs
// no Python call. The backward math is that of the Python autograd.Functions in
// _autograd.py and _blocked_ops.py, which take over under torch.func transforms.
#include <ATen/ATen.h>
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

// A size the op's int argument takes: fixed under torch.compile (a guard on it) when symbolic.
int64_t int_size(const Tensor& t, int64_t dim) { return t.sym_size(dim).guard_int(__FILE__, __LINE__); }

std::optional<Tensor> if_defined(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

// The Autograd kernel of an op whose Function F takes the op's arguments: the op itself,
// below autograd, when no gradient can flow.
template <typename F, typename Op, typename... Args>
auto autograd_call(const Op& op, bool record, Args&&... args) {
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(std::forward<Args>(args)...);
  }
  return F::apply(std::forward<Args>(args)...);
}

// ---- layouts: to_blocked <-> from_blocked, to_blocked_weight <-> from_blocked_weight --------

using ToBlockedFn = Tensor(const Tensor&, int64_t);
using FromBlockedWeightFn = Tensor(const Tensor&, int64_t, int64_t);

const c10::TypedOperatorHandle<ToBlockedFn>& to_blocked_op() {
  static const auto op = find_op<ToBlockedFn>("directconv::to_blocked");
  return op;
}
const c10::TypedOperatorHandle<ToBlockedFn>& from_blocked_op() {
  static const auto op = find_op<ToBlockedFn>("directconv::from_blocked");
  return op;
}
const c10::TypedOperatorHandle<ToBlockedFn>& to_blocked_weight_op() {
  static const auto op = find_op<ToBlockedFn>("directconv::to_blocked_weight");
  return op;
}
const c10::TypedOperatorHandle<FromBlockedWeightFn>& from_blocked_weight_op() {
  static const auto op = find_op<FromBlockedWeightFn>("directconv::from_blocked_weight");
  return op;
}

class ToBlockedFunction : public torch::autograd::Function<ToBlockedFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, int64_t vlen) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["channels"] = int_size(x, 1);
    ctx->saved_data["dtype"] = x.scalar_type();
    return to_blocked_op().call(x, vlen);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // An fp32 x blocked in bf16 rows (vlen 32) gets its gradient back in fp32, as a cast's.
    const Tensor grad = call_backward(from_blocked_op(), grads[0], ctx->saved_data["channels"].toInt());
    return {grad.to(ctx->saved_data["dtype"].toScalarType()), Tensor()};
  }
};

class FromBlockedFunction : public torch::autograd::Function<FromBlockedFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& xb, int64_t channels) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["vlen"] = int_size(xb, 4);
    return from_blocked_op().call(xb, channels);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_backward(to_blocked_op(), grads[0], ctx->saved_data["vlen"].toInt()), Tensor()};
  }
};

class ToBlockedWeightFunction : public torch::autograd::Function<ToBlockedWeightFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& w, int64_t vlen) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["k"] = int_size(w, 0);
    ctx->saved_data["c"] = int_size(w, 1);
    return to_blocked_weight_op().call(w, vlen);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t k = ctx->saved_data["k"].toInt(), c = ctx->saved_data["c"].toInt();
    return {call_backward(from_blocked_weight_op(), grads[0], k, c), Tensor()};
  }
};

class FromBlockedWeightFunction : public torch::autograd::Function<FromBlockedWeightFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& wb, int64_t k, int64_t c) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["vlen"] = int_size(wb, 4);
    return from_blocked_weight_op().call(wb, k, c);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_backward(to_blocked_weight_op(), grads[0], ctx->saved_data["vlen"].toInt()), Tensor(), Tensor()};
  }
};

Tensor to_blocked_autograd(const Tensor& x, int64_t vlen) {
  return autograd_call<ToBlockedFunction>(to_blocked_op(), records_graph(x), x, vlen);
}
Tensor from_blocked_autograd(const Tensor& xb, int64_t channels) {
  return autograd_call<FromBlockedFunction>(from_blocked_op(), records_graph(xb), xb, channels);
}
Tensor to_blocked_weight_autograd(const Tensor& w, int64_t vlen) {
  return autograd_call<ToBlockedWeightFunction>(to_blocked_weight_op(), records_graph(w), w, vlen);
}
Tensor from_blocked_weight_autograd(const Tensor& wb, int64_t k, int64_t c) {
  return autograd_call<FromBlockedWeightFunction>(from_blocked_weight_op(), records_graph(wb), wb, k, c);
}

// ---- batch norm -----------------------------------------------------------------------------

using BnBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                                                const Tensor&, const Tensor&, const Tensor&,
                                                                const std::optional<Tensor>&, double, bool, int64_t,
                                                                std::array<bool, 4>);

// (grad_x, grad_weight, grad_bias, grad_residual) of relu?(bn(x) + residual?), undefined where
// not wanted: one bn_backward_blocked for what it computes; without a ReLU the residual's
// gradient is the output's.
std::array<Tensor, 4> bn_grads(const Tensor& grad, const Tensor& y, const Tensor& xb, const Tensor& mean,
                               const Tensor& var, const Tensor& weight, double eps, bool relu, bool train,
                               int64_t channels, std::array<bool, 4> want) {
  static const auto backward_op = find_op<BnBackwardFn>("directconv::bn_backward_blocked");
  const std::array<bool, 4> mask = {want[0], want[1], want[2], want[3] && relu};
  std::array<Tensor, 4> got;
  if (mask[0] || mask[1] || mask[2] || mask[3]) {
    auto [gx, gw, gb, gr] =
        call_backward(backward_op, grad, if_defined(y), xb, mean, var, if_defined(weight), eps, train, channels, mask);
    got = {mask[0] ? gx : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor(), mask[3] ? gr : Tensor()};
  }
  if (want[3] && !relu) got[3] = grad;
  return got;
}

using BatchNormFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                           const std::optional<Tensor>&, const std::optional<Tensor>&, double, bool, bool, int64_t);

const c10::TypedOperatorHandle<BatchNormFn>& batch_norm_op() {
  static const auto op = find_op<BatchNormFn>("directconv::batch_norm_blocked");
  return op;
}

// batch_norm_blocked(xb, mean, var, weight?, bias?, residual?, eps, relu, train, channels). In
// train mode mean and var are the batch statistics of xb, and their dependence on xb is part of
// grad_x; they get no gradient of their own (nor do running statistics in eval).
class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& xb, const Tensor& mean, const Tensor& var,
                        const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                        const std::optional<Tensor>& residual, double eps, bool relu, bool train, int64_t channels) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = batch_norm_op().call(xb, mean, var, weight, bias, residual, eps, relu, train, channels);
    ctx->saved_data["edges"] = edge_indices<6>({true, true, true, present(weight), present(bias), present(residual)});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["train"] = train;
    ctx->saved_data["channels"] = channels;
    ctx->save_for_backward({xb, mean, var, weight.value_or(Tensor()), relu ? out : Tensor()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::array<Tensor, 4> g =
        bn_grads(grads[0], s[4], s[0], s[1], s[2], s[3], ctx->saved_data["eps"].toDouble(),
                 ctx->saved_data["relu"].toBool(), ctx->saved_data["train"].toBool(),
                 ctx->saved_data["channels"].toInt(), {wanted(ctx, 0), wanted(ctx, 3), wanted(ctx, 4), wanted(ctx, 5)});
    variable_list out(10);
    out[0] = g[0];
    out[3] = g[1];
    out[4] = g[2];
    out[5] = g[3];
    return out;
  }
};

Tensor batch_norm_blocked_autograd(const Tensor& xb, const Tensor& mean, const Tensor& var,
                                   const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                   const std::optional<Tensor>& residual, double eps, bool relu, bool train,
                                   int64_t channels) {
  return autograd_call<BatchNormFunction>(batch_norm_op(), records_graph(xb, mean, var, weight, bias, residual), xb,
                                          mean, var, weight, bias, residual, eps, relu, train, channels);
}

using BnApplyFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, bool, int64_t);

const c10::TypedOperatorHandle<BnApplyFn>& bn_apply_op() {
  static const auto op = find_op<BnApplyFn>("directconv::bn_apply_blocked");
  return op;
}

// bn_apply_blocked(xb, scale, shift, residual?, relu, channels): y = x * scale + shift is batch
// norm with mean 0 and 1 / sqrt(var + eps) = 1, in eval mode.
class BnApplyFunction : public torch::autograd::Function<BnApplyFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& xb, const Tensor& scale, const Tensor& shift,
                        const std::optional<Tensor>& residual, bool relu, int64_t channels) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = bn_apply_op().call(xb, scale, shift, residual, relu, channels);
    ctx->saved_data["edges"] = edge_indices<4>({true, true, true, present(residual)});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["channels"] = channels;
    ctx->save_for_backward({xb, scale, relu ? out : Tensor()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const int64_t c = ctx->saved_data["channels"].toInt();
    const Tensor& scale = s[1];
    // The statistics of this batch norm are fp32, whatever the dtype of scale.
    const at::TensorOptions f32 = scale.options().dtype(at::kFloat);
    const std::array<Tensor, 4> g =
        bn_grads(grads[0], s[2], s[0], at::zeros({c}, f32), at::ones({c}, f32), scale, 0.0,
                 ctx->saved_data["relu"].toBool(), false, c,
                 {wanted(ctx, 0), wanted(ctx, 1), wanted(ctx, 2), wanted(ctx, 3)});
    return {g[0], g[1], g[2], g[3], Tensor(), Tensor()};
  }
};

Tensor bn_apply_blocked_autograd(const Tensor& xb, const Tensor& scale, const Tensor& shift,
                                 const std::optional<Tensor>& residual, bool relu, int64_t channels) {
  return autograd_call<BnApplyFunction>(bn_apply_op(), records_graph(xb, scale, shift, residual), xb, scale, shift,
                                        residual, relu, channels);
}

using BnStatsFn = std::tuple<Tensor, Tensor>(const Tensor&, int64_t);

const c10::TypedOperatorHandle<BnStatsFn>& bn_stats_op() {
  static const auto op = find_op<BnStatsFn>("directconv::bn_stats_blocked");
  return op;
}

// (C,) -> (1, Cb, 1, 1, V), zero-padded, to broadcast over a blocked tensor of that shape.
Tensor per_lane(const Tensor& t, const Tensor& like) {
  const int64_t cb = int_size(like, 1), v = int_size(like, 4);
  return at::constant_pad_nd(t, {0, cb * v - t.size(0)}).view({1, cb, 1, 1, v});
}

// bn_stats_blocked(xb, channels) -> (mean, var): d mean / dx = 1 / M and d var / dx =
// 2 (x - mean) / M, M = N * H * W (torch ops: this is not the training path, where
// batch_norm_blocked folds the statistics' gradient into grad_x).
class BnStatsFunction : public torch::autograd::Function<BnStatsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& xb, int64_t channels) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [mean, var] = bn_stats_op().call(xb, channels);
    ctx->save_for_backward({xb, mean});
    return {mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor& xb = s[0];
    const int64_t m = int_size(xb, 0) * int_size(xb, 2) * int_size(xb, 3);
    if (m == 0) return {at::zeros_like(xb), Tensor()};
    const Tensor gm = per_lane(grads[0], xb) / static_cast<double>(m);
    const Tensor gv = per_lane(grads[1], xb) * (2.0 / static_cast<double>(m));
    // Of xb's dtype (the statistics are fp32).
    return {(gm + gv * (xb - per_lane(s[1], xb))).to(xb.scalar_type()), Tensor()};
  }
};

std::tuple<Tensor, Tensor> bn_stats_blocked_autograd(const Tensor& xb, int64_t channels) {
  if (!records_graph(xb)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return bn_stats_op().call(xb, channels);
  }
  const variable_list r = BnStatsFunction::apply(xb, channels);
  return {r[0], r[1]};
}

// ---- pooling --------------------------------------------------------------------------------

using MaxPoolFn = Tensor(const Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool,
                         int64_t);
using MaxPoolBackwardFn = Tensor(const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, at::IntArrayRef, bool, int64_t);

const c10::TypedOperatorHandle<MaxPoolFn>& max_pool_op() {
  static const auto op = find_op<MaxPoolFn>("directconv::max_pool2d_blocked");
  return op;
}

// max_pool2d_blocked(xb, kernel_size, stride, padding, dilation, ceil_mode, channels). The
// output is saved too: the backward finds each window's argmax as the first tap equal to it
// (in a CNN the next layer keeps the output anyway, so this costs no memory there).
class MaxPoolFunction : public torch::autograd::Function<MaxPoolFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& xb, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, int64_t channels) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = max_pool_op().call(xb, kernel, stride, padding, dilation, ceil_mode, channels);
    ctx->saved_data["kernel"] = kernel.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["channels"] = channels;
    ctx->save_for_backward({xb, out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = find_op<MaxPoolBackwardFn>("directconv::max_pool2d_blocked_backward");
    const variable_list s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    Tensor gx = call_backward(backward_op, grads[0], s[0], s[1], d["kernel"].toIntVector(), d["stride"].toIntVector(),
                              d["padding"].toIntVector(), d["dilation"].toIntVector(), d["ceil_mode"].toBool(),
                              d["channels"].toInt());
    variable_list out(7);
    out[0] = gx;
    return out;
  }
};

Tensor max_pool2d_blocked_autograd(const Tensor& xb, at::IntArrayRef kernel, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode,
                                   int64_t channels) {
  return autograd_call<MaxPoolFunction>(max_pool_op(), records_graph(xb), xb, kernel, stride, padding, dilation,
                                        ceil_mode, channels);
}

using AvgPoolFn = Tensor(const Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, bool,
                         std::optional<int64_t>, int64_t);
using AvgPoolBackwardFn = Tensor(const Tensor&, c10::SymIntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, bool, bool, std::optional<int64_t>, int64_t);

const c10::TypedOperatorHandle<AvgPoolFn>& avg_pool_op() {
  static const auto op = find_op<AvgPoolFn>("directconv::avg_pool2d_blocked");
  return op;
}

// avg_pool2d_blocked(xb, kernel_size, stride, padding, ceil_mode, count_include_pad,
// divisor_override?, channels): the backward needs only the input's size.
class AvgPoolFunction : public torch::autograd::Function<AvgPoolFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& xb, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                        std::optional<int64_t> divisor_override, int64_t channels) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = avg_pool_op().call(xb, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override,
                                    channels);
    ctx->saved_data["input_size"] = xb.sym_sizes().vec();
    ctx->saved_data["kernel"] = kernel.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["count_include_pad"] = count_include_pad;
    ctx->saved_data["divisor_override"] = divisor_override;
    ctx->saved_data["channels"] = channels;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = find_op<AvgPoolBackwardFn>("directconv::avg_pool2d_blocked_backward");
    auto& d = ctx->saved_data;
    Tensor gx = call_backward(backward_op, grads[0], d["input_size"].toSymIntVector(), d["kernel"].toIntVector(),
                              d["stride"].toIntVector(), d["padding"].toIntVector(), d["ceil_mode"].toBool(),
                              d["count_include_pad"].toBool(), d["divisor_override"].toOptional<int64_t>(),
                              d["channels"].toInt());
    variable_list out(8);
    out[0] = gx;
    return out;
  }
};

Tensor avg_pool2d_blocked_autograd(const Tensor& xb, at::IntArrayRef kernel, at::IntArrayRef stride,
                                   at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                                   std::optional<int64_t> divisor_override, int64_t channels) {
  return autograd_call<AvgPoolFunction>(avg_pool_op(), records_graph(xb), xb, kernel, stride, padding, ceil_mode,
                                        count_include_pad, divisor_override, channels);
}

using GlobalPoolFn = Tensor(const Tensor&, int64_t);
using GlobalPoolBackwardFn = Tensor(const Tensor&, c10::SymIntArrayRef, int64_t);

const c10::TypedOperatorHandle<GlobalPoolFn>& global_pool_op() {
  static const auto op = find_op<GlobalPoolFn>("directconv::global_avg_pool_blocked");
  return op;
}

class GlobalPoolFunction : public torch::autograd::Function<GlobalPoolFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& xb, int64_t channels) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = global_pool_op().call(xb, channels);
    ctx->saved_data["input_size"] = xb.sym_sizes().vec();
    ctx->saved_data["channels"] = channels;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = find_op<GlobalPoolBackwardFn>("directconv::global_avg_pool_blocked_backward");
    auto& d = ctx->saved_data;
    return {call_backward(backward_op, grads[0], d["input_size"].toSymIntVector(), d["channels"].toInt()), Tensor()};
  }
};

Tensor global_avg_pool_blocked_autograd(const Tensor& xb, int64_t channels) {
  return autograd_call<GlobalPoolFunction>(global_pool_op(), records_graph(xb), xb, channels);
}

// ---- running statistics -----------------------------------------------------------------

using UpdateStatsFn = void(const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                           const Tensor&, const Tensor&, int64_t, std::optional<double>);

// bn_update_running_stats writes its buffers in place: as ATen's in-place ops, their version
// counters move (what a cache keyed on a buffer's version, as an eval model's folded weights,
// relies on).
void bn_update_running_stats_inplace(const std::optional<Tensor>& running_mean,
                                     const std::optional<Tensor>& running_var,
                                     const std::optional<Tensor>& num_batches_tracked, const Tensor& mean,
                                     const Tensor& var, int64_t count, std::optional<double> momentum) {
  static const auto op = find_op<UpdateStatsFn>("directconv::bn_update_running_stats");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(running_mean, running_var, num_batches_tracked, mean, var, count, momentum);
  }
  for (const auto* t : {&running_mean, &running_var, &num_batches_tracked})
    if (present(*t)) torch::autograd::impl::bump_version(**t);
}

}  // namespace

}  // namespace dc_torch

TORCH_LIBRARY_IMPL(directconv, Autograd, m) {
  m.impl("to_blocked", &dc_torch::to_blocked_autograd);
  m.impl("from_blocked", &dc_torch::from_blocked_autograd);
  m.impl("to_blocked_weight", &dc_torch::to_blocked_weight_autograd);
  m.impl("from_blocked_weight", &dc_torch::from_blocked_weight_autograd);
  m.impl("batch_norm_blocked", &dc_torch::batch_norm_blocked_autograd);
  m.impl("bn_apply_blocked", &dc_torch::bn_apply_blocked_autograd);
  m.impl("bn_stats_blocked", &dc_torch::bn_stats_blocked_autograd);
  m.impl("max_pool2d_blocked", &dc_torch::max_pool2d_blocked_autograd);
  m.impl("avg_pool2d_blocked", &dc_torch::avg_pool2d_blocked_autograd);
  m.impl("global_avg_pool_blocked", &dc_torch::global_avg_pool_blocked_autograd);
}

TORCH_LIBRARY_IMPL(directconv, ADInplaceOrView, m) {
  m.impl("bn_update_running_stats", &dc_torch::bn_update_running_stats_inplace);
}
