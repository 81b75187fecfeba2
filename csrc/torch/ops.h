// The convolution ops' CPU kernels, registered in library.cpp.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <tuple>
#include <utility>

namespace dc_torch {

using at::Tensor;

// conv_ops.cpp: the drop-in and packed NCHW convolutions.
Tensor pack_weight(const Tensor& weight, int64_t groups);
Tensor conv2d_packed(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, int64_t out_channels,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     bool relu, bool channels_last);
Tensor conv2d(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, at::IntArrayRef stride,
              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu);
// The NCHW 1x1 GEMM; an undefined Tensor when it does not apply.
Tensor conv2d_nchw_1x1(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu);

// bf16_ops.cpp: the drop-in convolutions on bf16 tensors (the AMX kernels).
Tensor conv2d_bf16(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu);
Tensor pack_weight_bf16(const Tensor& weight);
Tensor conv2d_packed_bf16(const Tensor& input, const Tensor& packed, const c10::optional<Tensor>& bias,
                          at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, bool relu, bool channels_last);
// The bf16 gradients (input, weight), each computed only when wanted.
std::tuple<Tensor, Tensor> bf16_conv2d_backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation, int64_t groups, bool want_input,
                                                bool want_weight);

// blocked_conv.cpp: the blocked convolution and its gradients.
Tensor conv2d_blocked(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                      c10::optional<int64_t> in_channels, const c10::optional<Tensor>& residual);
std::tuple<Tensor, Tensor, Tensor> conv2d_blocked_stats(const Tensor& input, const Tensor& weight,
                                                        const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        c10::optional<int64_t> in_channels, const Tensor& shift,
                                                        int64_t channels);
// conv2d_blocked_stats's exact recomputes (jit_stats).
extern std::atomic<int64_t> conv_stats_recomputed;
Tensor conv2d_blocked_backward_data(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    c10::optional<int64_t> in_channels);
Tensor conv2d_blocked_backward_weight(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      c10::optional<int64_t> in_channels);

// The weight geometry of a blocked op (blocked_conv.cpp): a blocked (Kb, Cb, R, S, V, V) or a
// (K, C, R, S) weight w checked against the input's cb channel blocks; (kb, the input
// channels read).
std::pair<int64_t, int64_t> blocked_weight_geometry(const char* op, const char* arg, at::IntArrayRef w, int64_t cb,
                                                    c10::optional<int64_t> in_channels, int64_t V);

// bf16_blocked_conv.cpp: the blocked ops on bf16 tensors (rows of 32 channels), which the ops
// above dispatch to on a bf16 'xb' or 'grad_output'.
Tensor conv2d_blocked_bf16(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                           c10::optional<int64_t> in_channels, const c10::optional<Tensor>& residual);
std::tuple<Tensor, Tensor, Tensor> conv2d_blocked_stats_bf16(const Tensor& input, const Tensor& weight,
                                                             const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, at::IntArrayRef dilation,
                                                             c10::optional<int64_t> in_channels, const Tensor& shift,
                                                             int64_t channels);
Tensor conv2d_blocked_backward_data_bf16(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                         c10::optional<int64_t> in_channels);
Tensor conv2d_blocked_backward_weight_bf16(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                           c10::optional<int64_t> in_channels);
Tensor to_blocked_weight_bf16(const Tensor& w);
Tensor from_blocked_weight_bf16(const Tensor& wb, int64_t k, int64_t c);

// backward_ops.cpp: the gradients of the drop-in convolution.
Tensor conv2d_backward_data(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
Tensor conv2d_backward_weight(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups);

// layout_ops.cpp.
Tensor to_blocked(const Tensor& x, int64_t vlen);
Tensor from_blocked(const Tensor& xb, int64_t channels);
Tensor to_blocked_weight(const Tensor& w, int64_t vlen);
Tensor from_blocked_weight(const Tensor& wb, int64_t k, int64_t c);
// The bits x.to(torch.bfloat16) gives a NaN of the fp32 x (torch's vectorized or scalar loop).
uint16_t torch_bf16_nan(const Tensor& x);

// fold_ops.cpp: the folded entry of the bf16 blocked model (conv/bf16_fold.h).
Tensor to_blocked_folded(const Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation);
bool folds_columns(int64_t in_channels, int64_t kernel_w);

}  // namespace dc_torch
