// The runtime loops of a bf16 forward kernel's reduction, shared by the AMX and AVX512_BF16
// kernels (both read AmxFwdCallArgs): over the call's input-channel blocks, then over its
// kernel rows, each kernel's own body (its kernel columns, unrolled) inside. Each kernel names
// the registers it keeps the loops in.
#pragma once

#include <cstddef>
#include <cstdint>

#include "jit/amx_fwd_kernel.h"
#include "jit/jit_kernel.h"

namespace dc {

struct Bf16FwdLoopRegs {
  Xbyak::Reg64 args;        // the AmxFwdCallArgs
  Xbyak::Reg64 src_cb[2];   // run (A tile) j's input block, tap (0, 0)
  Xbyak::Reg64 src[2];      // run j's kernel row in that block
  Xbyak::Reg64 wei;         // the current kernel row's first tap
  Xbyak::Reg64 cnt_cb, cnt_r;
};

inline Xbyak::Address bf16_fwd_arg(const Bf16FwdLoopRegs& r, size_t offset) {
  return Xbyak::util::qword[r.args + static_cast<int64_t>(offset)];
}

// The first sources of the n_a runs and the weights, from the arguments.
inline void emit_bf16_fwd_load_args(JitGenerator& g, const Bf16FwdLoopRegs& r, int n_a) {
  g.mov(r.src_cb[0], bf16_fwd_arg(r, offsetof(AmxFwdCallArgs, src)));
  if (n_a == 2) g.mov(r.src_cb[1], bf16_fwd_arg(r, offsetof(AmxFwdCallArgs, src) + 8));
  g.mov(r.wei, bf16_fwd_arg(r, offsetof(AmxFwdCallArgs, wei)));
}

// body() once per input block (n_cb), the runs' sources stepping by src_cb_stride.
template <typename F>
void emit_bf16_fwd_loop_cb(JitGenerator& g, const Bf16FwdLoopRegs& r, int n_a, F body) {
  Xbyak::Label l_cb;
  g.mov(r.cnt_cb, bf16_fwd_arg(r, offsetof(AmxFwdCallArgs, n_cb)));
  g.align(64);
  g.L(l_cb);
  body();
  g.add(r.src_cb[0], bf16_fwd_arg(r, offsetof(AmxFwdCallArgs, src_cb_stride)));
  if (n_a == 2) g.add(r.src_cb[1], bf16_fwd_arg(r, offsetof(AmxFwdCallArgs, src_cb_stride)));
  g.dec(r.cnt_cb);
  g.jnz(l_cb, Xbyak::CodeGenerator::T_NEAR);
}

// body() once per kernel row (n_r) of the current block, the runs' sources stepping by
// src_r_stride and the weights by a row's taps (row_wei_bytes).
template <typename F>
void emit_bf16_fwd_loop_r(JitGenerator& g, const Bf16FwdLoopRegs& r, int n_a, uint32_t row_wei_bytes, F body) {
  Xbyak::Label l_r;
  g.mov(r.src[0], r.src_cb[0]);
  if (n_a == 2) g.mov(r.src[1], r.src_cb[1]);
  g.mov(r.cnt_r, bf16_fwd_arg(r, offsetof(AmxFwdCallArgs, n_r)));
  g.align(64);
  g.L(l_r);
  body();
  g.add(r.wei, row_wei_bytes);
  g.add(r.src[0], bf16_fwd_arg(r, offsetof(AmxFwdCallArgs, src_r_stride)));
  if (n_a == 2) g.add(r.src[1], bf16_fwd_arg(r, offsetof(AmxFwdCallArgs, src_r_stride)));
  g.dec(r.cnt_r);
  g.jnz(l_r, Xbyak::CodeGenerator::T_NEAR);
}

}  // namespace dc
