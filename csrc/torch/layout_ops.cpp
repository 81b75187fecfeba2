// The layout ops: NCHW to blocked and back, and weights to the blocked layout.
#include <ATen/ATen.h>

#include "common.h"
#include "conv/reorder.h"
#include "jit/amx_fwd_kernel.h"
#include "ops.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

Tensor to_blocked(const Tensor& x, int64_t vlen) {
  const char* op = "to_blocked";
  check_float_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D 'x' (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(vlen == 8 || vlen == 16, op, ": expected 'vlen' 8 or 16, got ", vlen);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor out = new_tensor({n, dc::div_up(c, vlen), h, w, vlen}, x.options());
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
  Tensor out = new_tensor({xb.size(0), channels, xb.size(2), xb.size(3)}, xb.options());
  auto st = strides4(out);
  run_shares(num_threads(), [&](int tid, int nt) {
    dc::reorder_from_blocked(x.data_ptr<float>(), xb.size(0), channels, xb.size(2), xb.size(3), static_cast<int>(v),
                             out.data_ptr<float>(), st.data(), tid, nt);
  });
  return out;
}

// vlen 32: the bf16 kernels' blocked weight (to_blocked_weight_bf16), from fp32 or bf16.
Tensor to_blocked_weight(const Tensor& w, int64_t vlen) {
  const char* op = "to_blocked_weight";
  if (vlen == dc::kAmxBlock) return to_blocked_weight_bf16(w);
  check_float_cpu(w, op, "w");
  TORCH_CHECK(w.dim() == 4, op, ": expected a 4-D 'w' (K, C, R, S), got shape ", w.sizes());
  TORCH_CHECK(vlen == 8 || vlen == 16, op, ": expected 'vlen' 8 or 16 (float32), or 32 (the bf16 layout), got ", vlen);
  const int64_t k = w.size(0), c = w.size(1), r = w.size(2), s = w.size(3);
  Tensor out = new_tensor({dc::div_up(k, vlen), dc::div_up(c, vlen), r, s, vlen, vlen}, w.options());
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
  if (wb.device().is_cpu() && wb.scalar_type() == at::kBFloat16) return from_blocked_weight_bf16(wb, k, c);
  check_float_cpu(wb, op, "wb");
  TORCH_CHECK(wb.dim() == 6 && wb.size(4) == wb.size(5) && (wb.size(4) == 8 || wb.size(4) == 16), op,
              ": expected a blocked 'wb' (K/V, C/V, R, S, V, V) with V 8 or 16, got shape ", wb.sizes());
  const int64_t v = wb.size(4);
  TORCH_CHECK(k > (wb.size(0) - 1) * v && k <= wb.size(0) * v, op, ": 'k' (", k, ") does not fit ", wb.size(0),
              " blocks of ", v);
  TORCH_CHECK(c > (wb.size(1) - 1) * v && c <= wb.size(1) * v, op, ": 'c' (", c, ") does not fit ", wb.size(1),
              " blocks of ", v);
  Tensor src = wb.contiguous();
  Tensor out = new_tensor({k, c, wb.size(2), wb.size(3)}, wb.options());
  auto st = strides4(out);
  run_shares(num_threads(), [&](int tid, int nt) {
    dc::reorder_weight_from_blocked(src.data_ptr<float>(), k, c, wb.size(2), wb.size(3), static_cast<int>(v),
                                    out.data_ptr<float>(), st.data(), tid, nt);
  });
  return out;
}

}  // namespace dc_torch
