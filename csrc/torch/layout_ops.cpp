// The layout ops: NCHW to blocked and back (fp32, and bf16 in the bf16 kernels' rows of 32
// channels), and weights to the blocked layout.
#include <ATen/ATen.h>

#include <vector>

#include "common.h"
#include "conv/bf16_layout.h"
#include "conv/reorder.h"
#include "jit/amx_fwd_kernel.h"
#include "ops.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

namespace {

const uint16_t* bf16_ptr(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* bf16_mutable_ptr(const Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

}  // namespace

// The bits x.to(torch.bfloat16) gives a NaN of x: 0xffff from torch's vectorized loop, 0x7fc0
// from its scalar one. The result's strides are inferred from x's, so torch's innermost loop
// is the first dimension of size > 1 in the order TensorIterator sorts x's strides into (an
// insertion sort, innermost first, that leaves broadcast dimensions where they are; equal
// strides put the smaller size first), and it vectorizes where x's stride there is 1.
uint16_t torch_bf16_nan(const Tensor& x) {
  const int64_t nd = x.dim();
  std::vector<int64_t> perm(nd);
  for (int64_t i = 0; i < nd; ++i) perm[i] = nd - 1 - i;
  // 1: a goes after b, -1: before it, 0: no order.
  auto order = [&](int64_t a, int64_t b) {
    const int64_t sa = x.stride(a), sb = x.stride(b);
    if (sa == 0 || sb == 0) return 0;
    if (sa != sb) return sa < sb ? -1 : 1;
    return x.size(a) > x.size(b) ? 1 : 0;
  };
  for (int64_t i = 1; i < nd; ++i) {
    int64_t moving = i;
    for (int64_t j = i - 1; j >= 0; --j) {
      const int cmp = order(perm[j], perm[moving]);
      if (cmp > 0) {
        std::swap(perm[j], perm[moving]);
        moving = j;
      } else if (cmp < 0) {
        break;
      }
    }
  }
  for (int64_t d : perm)
    if (x.size(d) > 1) return x.stride(d) == 1 ? 0xffff : 0x7fc0;
  return 0xffff;
}

// fp32 x into blocks of vlen 8 or 16; bf16 x into the bf16 kernels' rows of 32 (vlen 32); fp32 x
// with vlen 32 into bf16 rows of 32 in one pass, rounded as x.to(torch.bfloat16) rounds.
Tensor to_blocked(const Tensor& x, int64_t vlen) {
  const char* op = "to_blocked";
  check_conv_dtype_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D 'x' (N, C, H, W), got shape ", x.sizes());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (bf16) {
    TORCH_CHECK(vlen == dc::kAmxBlock, op, ": expected 'vlen' ", dc::kAmxBlock, " for a bfloat16 'x', got ", vlen);
  } else {
    TORCH_CHECK(vlen == 8 || vlen == 16 || vlen == dc::kAmxBlock, op,
                ": expected 'vlen' 8 or 16 (float32 blocks) or ", dc::kAmxBlock,
                " (bfloat16 rows) for a float32 'x', got ", vlen);
  }
  const bool rows32 = vlen == dc::kAmxBlock;
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor out = new_tensor({n, dc::div_up(c, vlen), h, w, vlen}, x.options().dtype(rows32 ? at::kBFloat16 : at::kFloat));
  auto st = strides4(x);
  const uint16_t nan = rows32 && !bf16 ? torch_bf16_nan(x) : 0;
  run_shares(num_threads(), [&](int tid, int nt) {
    if (bf16)
      dc::bf16_to_rows32(bf16_ptr(x), st.data(), n, c, h, w, bf16_mutable_ptr(out), tid, nt);
    else if (rows32)
      dc::f32_to_rows32(x.data_ptr<float>(), st.data(), n, c, h, w, nan, bf16_mutable_ptr(out), tid, nt);
    else
      dc::reorder_to_blocked(x.data_ptr<float>(), st.data(), n, c, h, w, static_cast<int>(vlen),
                             out.data_ptr<float>(), tid, nt);
  });
  return out;
}

// The inverse of to_blocked: fp32 blocks of 8 or 16, or bf16 rows of 32.
Tensor from_blocked(const Tensor& xb, int64_t channels) {
  const char* op = "from_blocked";
  check_conv_dtype_cpu(xb, op, "xb");
  const bool bf16 = xb.scalar_type() == at::kBFloat16;
  if (bf16) {
    TORCH_CHECK(xb.dim() == 5 && xb.size(4) == dc::kAmxBlock, op, ": expected a blocked bfloat16 'xb' (N, C/",
                dc::kAmxBlock, ", H, W, ", dc::kAmxBlock, "), got shape ", xb.sizes());
  } else {
    TORCH_CHECK(xb.dim() == 5 && (xb.size(4) == 8 || xb.size(4) == 16), op,
                ": expected a blocked float32 'xb' (N, C/V, H, W, V) with V 8 or 16, got shape ", xb.sizes());
  }
  const int64_t v = xb.size(4);
  TORCH_CHECK(channels > (xb.size(1) - 1) * v && channels <= xb.size(1) * v, op, ": 'channels' (", channels,
              ") does not fit ", xb.size(1), " blocks of ", v);
  Tensor x = xb.contiguous();
  Tensor out = new_tensor({xb.size(0), channels, xb.size(2), xb.size(3)}, xb.options());
  auto st = strides4(out);
  run_shares(num_threads(), [&](int tid, int nt) {
    if (bf16)
      dc::rows32_to_bf16(bf16_ptr(x), xb.size(0), channels, xb.size(2), xb.size(3), bf16_mutable_ptr(out), st.data(),
                         tid, nt);
    else
      dc::reorder_from_blocked(x.data_ptr<float>(), xb.size(0), channels, xb.size(2), xb.size(3),
                               static_cast<int>(v), out.data_ptr<float>(), st.data(), tid, nt);
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
