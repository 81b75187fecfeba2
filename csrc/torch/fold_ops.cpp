// to_blocked_folded: the entry of a blocked bf16 model for a layer that folds its kernel
// columns into its channels (conv1's 3 x 7 x 7; conv/bf16_fold.h), from the model's fp32
// or bf16 (N, C, H, W) input in one pass; and the rule that says which layers fold, for
// the engine to ask.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "common.h"
#include "conv/bf16_fold.h"
#include "conv/bf16_fwd.h"
#include "ops.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

namespace {

// The layer of weight (K, C, R, S) on x, as its description (K does not matter to the copy).
ConvDesc fold_desc(const char* op, const Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
              ": expected 'kernel_size' (R, S) of positive sizes, got ", kernel_size);
  return make_desc(op, x.size(0), x.size(1), x.size(2), x.size(3), 1, kernel_size[0], kernel_size[1], stride,
                   padding, dilation);
}

}  // namespace

bool folds_columns(int64_t in_channels, int64_t kernel_w) {
  ConvDesc d;
  d.c = in_channels;
  d.s = kernel_w;
  return dc::bf16_fwd_folds_columns(d);
}

Tensor to_blocked_folded(const Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "to_blocked_folded";
  check_conv_dtype_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D 'x' (N, C, H, W), got shape ", x.sizes());
  const ConvDesc d = fold_desc(op, x, kernel_size, stride, padding, dilation);
  TORCH_CHECK(dc::bf16_fwd_folds_columns(d), op, ": the layer does not fold its kernel columns: it needs a kernel ",
              "wider than 1 whose columns times the input's channels are at most ", dc::kAmxBlock, ", got ", d.c,
              " channels and ", d.s, " columns");
  Tensor out = new_tensor({d.n, 1, d.h + d.pad_t + d.pad_b, d.q(), dc::kAmxBlock}, x.options().dtype(at::kBFloat16));
  const auto st = strides4(x);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // A NaN as x.to(torch.bfloat16) would write it (the unfolded entry's bits too).
  const uint16_t nan = bf16 ? 0 : torch_bf16_nan(x);
  run_shares(num_threads(),
             [&](int tid, int nt) { dc::bf16_fold_nchw(d, x.data_ptr(), bf16, st.data(), nan, dst, tid, nt); });
  return out;
}

}  // namespace dc_torch

TORCH_LIBRARY_FRAGMENT(directconv, m) {
  m.def("to_blocked_folded(Tensor x, int[2] kernel_size, int[2] stride, int[4] padding, int[2] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(directconv, CPU, m) { m.impl("to_blocked_folded", &dc_torch::to_blocked_folded); }
