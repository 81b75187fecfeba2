// The convolution ops' schemas (TORCH_LIBRARY) and CPU kernels.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(directconv, m) {
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, "
        "int groups, bool relu) -> Tensor");
  m.def("conv2d_packed(Tensor input, Tensor weight, Tensor? bias, int out_channels, int[2] stride, int[4] padding, "
        "int[2] dilation, int groups, bool relu, bool channels_last) -> Tensor");
  m.def("pack_weight(Tensor weight, int groups) -> Tensor");
  m.def("pack_weight_bf16(Tensor weight) -> Tensor");
  m.def("conv2d_packed_bf16(Tensor input, Tensor weight, Tensor? bias, int[4] weight_size, int[2] stride, "
        "int[4] padding, int[2] dilation, bool relu, bool channels_last) -> Tensor");
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
  // vlen 8 / 16: fp32 blocks; vlen 32: bf16 rows of 32, from bf16 x (moved) or fp32 x (rounded
  // as x.to(torch.bfloat16) rounds, in the same pass).
  m.def("to_blocked(Tensor x, int vlen) -> Tensor");
  m.def("from_blocked(Tensor xb, int channels) -> Tensor");
  m.def("to_blocked_weight(Tensor w, int vlen) -> Tensor");
  m.def("from_blocked_weight(Tensor wb, int k, int c) -> Tensor");
}

TORCH_LIBRARY_IMPL(directconv, CPU, m) {
  m.impl("conv2d", &dc_torch::conv2d);
  m.impl("conv2d_packed", &dc_torch::conv2d_packed);
  m.impl("pack_weight", &dc_torch::pack_weight);
  m.impl("pack_weight_bf16", &dc_torch::pack_weight_bf16);
  m.impl("conv2d_packed_bf16", &dc_torch::conv2d_packed_bf16);
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
