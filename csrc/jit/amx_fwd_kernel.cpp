#include "jit/amx_fwd_kernel.h"

#include <cstddef>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "jit/bf16_fwd_loops.h"

namespace dc {

std::string AmxFwdKernelSpec::name() const {
  std::ostringstream o;
  o << "bf16_conv_fwd_kw" << s << "d" << dil_w << "_m" << m << "a" << n_a << "b" << n_b << "_o" << dtype_name(out_dt)
    << post.name() << "__amx";
  return o.str();
}

namespace {

using namespace Xbyak;

constexpr int kTileBytes = 1024;          // one B tile, one C tile
constexpr int kTapBytes = 2 * kTileBytes;  // the two B tiles of a tap
constexpr int kRowBytes = 64;              // one tile row

class AmxFwdKernel : public JitGenerator {
 public:
  explicit AmxFwdKernel(const AmxFwdKernelSpec& sp) : JitGenerator(sp.name(), code_size(sp)), sp_(sp) {
    if (sp.m < 1 || sp.m > kAmxMaxRows || sp.n_a < 1 || sp.n_a > 2 || sp.n_b < 1 || sp.n_b > 2 || sp.s < 1 ||
        sp.dil_w < 1 || (sp.out_dt != DataType::f32 && sp.out_dt != DataType::bf16) ||
        static_cast<int64_t>(sp.s) * sp.dil_w * kRowBytes > (1ll << 30) ||
        static_cast<int64_t>(sp.s) * kTapBytes > (1ll << 30))
      throw std::invalid_argument("amx fwd kernel: unsupported spec " + sp.name());
  }

 private:
  static size_t code_size(const AmxFwdKernelSpec& sp) {
    return 4096 + static_cast<size_t>(sp.s) * 160 + static_cast<size_t>(sp.n_a) * sp.m * (sp.post.stats ? 512 : 256);
  }

  // Registers, named by role. rdi carries the argument struct (System V ABI).
  const Reg64 reg_args = rdi;
  // The reduction.
  const Reg64 reg_src_cb0 = r8;  // input block of A tile 0 (1), tap (0, 0)
  const Reg64 reg_src_cb1 = r9;
  const Reg64 reg_src0 = rsi;    // kernel row of A tile 0 (1)
  const Reg64 reg_src1 = rdx;
  const Reg64 reg_wei = r10;     // the current tap's two B tiles
  const Reg64 reg_px = r11;      // A-tile row stride (tileloadd's index)
  const Reg64 reg_row64 = rax;   // B- and C-tile row stride: 64
  const Reg64 reg_cnt_cb = rbx;  // callee-saved
  const Reg64 reg_cnt_r = r12;   // callee-saved
  // The epilogue, once the reduction's registers are dead.
  const Reg64 reg_dst = rsi;     // the next row to store
  const Reg64 reg_res = rdx;     // its residual
  const Reg64 reg_c = r8;        // its fp32 sums in the C scratch
  const Reg64 reg_rows = r9;     // the mask of rows stored
  const Reg64 reg_bias = r11;
  const Reg64 reg_shift = rcx;   // the block's shifts (stats)
  const Reg64 reg_slot = r10;    // the call's stats slot

  const Tmm tmm_c(int a, int b) const { return Tmm(a * 2 + b); }
  const Tmm tmm_a(int a) const { return Tmm(4 + a); }
  const Tmm tmm_b(int b) const { return Tmm(6 + b); }
  const Zmm zmm_out(int b) const { return Zmm(b); }
  const Zmm zmm_tmp = zmm2;
  const Zmm zmm_zero = zmm3;
  const Zmm zmm_packed = zmm4;  // a bf16 row's 32 channels
  // The stats post-op's, per half h of the block's lanes: its shifts, d = y - shift, and
  // the sums of d and d^2 of tile a's rows of parity `odd` (independent chains). A half is
  // a B tile's 16 channels for an fp32 output; for a bf16 one, the channels of the rounded
  // row that vpunpck{l,h}wd widen: per 128-bit lane i, 8i..8i+3 (h = 0) or 8i+4..8i+7.
  const Zmm zmm_shift(int h) const { return Zmm(5 + h); }
  const Zmm zmm_d(int h) const { return Zmm(7 + h); }
  const Zmm zmm_sum(int a, int odd, int h) const { return Zmm(9 + (a * 2 + odd) * 2 + h); }
  const Zmm zmm_squares(int a, int odd, int h) const { return Zmm(17 + (a * 2 + odd) * 2 + h); }

  Address arg(size_t offset) const { return qword[reg_args + static_cast<int64_t>(offset)]; }
  int out_bytes() const { return elem_bytes(sp_.out_dt); }

  void generate() override {
    preamble();
    load_args();
    for (int a = 0; a < sp_.n_a; ++a)
      for (int b = 0; b < sp_.n_b; ++b) tilezero(tmm_c(a, b));
    loop_cb([&] { loop_r([&] { compute_kernel_row(); }); });
    store_c_tiles();
    vpxord(zmm_zero, zmm_zero, zmm_zero);
    start_stats();
    for (int a = 0; a < sp_.n_a; ++a) store_rows(a);
    store_stats();
    postamble();
  }

  // A 64-byte aligned scratch of the four C tiles on the stack, rbp keeping the frame.
  void preamble() {
    push(rbp);
    push(rbx);
    push(r12);
    mov(rbp, rsp);
    sub(rsp, 4 * kTileBytes);
    and_(rsp, -64);
  }
  void postamble() {
    mov(rsp, rbp);
    pop(r12);
    pop(rbx);
    pop(rbp);
    vzeroupper();
    ret();
  }

  const Bf16FwdLoopRegs loop_regs{reg_args, {reg_src_cb0, reg_src_cb1}, {reg_src0, reg_src1}, reg_wei, reg_cnt_cb,
                                   reg_cnt_r};

  void load_args() {
    emit_bf16_fwd_load_args(*this, loop_regs, sp_.n_a);
    mov(reg_px, arg(offsetof(AmxFwdCallArgs, src_px_stride)));
    mov(reg_row64, kRowBytes);
  }
  template <typename F>
  void loop_cb(F body) {
    emit_bf16_fwd_loop_cb(*this, loop_regs, sp_.n_a, body);
  }
  template <typename F>
  void loop_r(F body) {
    emit_bf16_fwd_loop_r(*this, loop_regs, sp_.n_a, static_cast<uint32_t>(sp_.s * kTapBytes), body);
  }

  // Every kernel column of one kernel row. Each load goes as late as possible after the
  // last product that read its tile: A0, B0, C00, B1, C01, A1, C10, C11.
  void compute_kernel_row() {
    for (int col = 0; col < sp_.s; ++col) {
      const int wdisp = col * kTapBytes;
      const int sdisp = col * sp_.dil_w * kRowBytes;
      tileloadd(tmm_a(0), ptr[reg_src0 + reg_px + sdisp]);
      for (int b = 0; b < sp_.n_b; ++b) {
        tileloadd(tmm_b(b), ptr[reg_wei + reg_row64 + wdisp + b * kTileBytes]);
        tdpbf16ps(tmm_c(0, b), tmm_a(0), tmm_b(b));
      }
      if (sp_.n_a == 2) {
        tileloadd(tmm_a(1), ptr[reg_src1 + reg_px + sdisp]);
        for (int b = 0; b < sp_.n_b; ++b) tdpbf16ps(tmm_c(1, b), tmm_a(1), tmm_b(b));
      }
    }
  }

  void store_c_tiles() {
    for (int a = 0; a < sp_.n_a; ++a)
      for (int b = 0; b < sp_.n_b; ++b) tilestored(ptr[rsp + reg_row64 + (a * 2 + b) * kTileBytes], tmm_c(a, b));
  }

  void load_epilogue_args(int a) {
    mov(reg_dst, arg(offsetof(AmxFwdCallArgs, dst) + 8 * a));
    if (sp_.post.add) mov(reg_res, arg(offsetof(AmxFwdCallArgs, res) + 8 * a));
    if (sp_.post.bias) mov(reg_bias, arg(offsetof(AmxFwdCallArgs, bias)));
    lea(reg_c, ptr[rsp + a * 2 * kTileBytes]);
  }

  // Tile a's rows, each stored where its bit of the mask is set, the destination moving
  // on by the rows stored.
  void store_rows(int a) {
    load_epilogue_args(a);
    mov(reg_rows, arg(offsetof(AmxFwdCallArgs, rows) + 8 * a));
    for (int row = 0; row < sp_.m; ++row) {
      Label l_not_stored;
      bt(reg_rows, row);
      jnc(l_not_stored, T_NEAR);
      store_row(a, row);
      add(reg_dst, arg(offsetof(AmxFwdCallArgs, dst_px_stride)));
      if (sp_.post.add) add(reg_res, arg(offsetof(AmxFwdCallArgs, dst_px_stride)));
      L(l_not_stored);
    }
  }

  bool bf16_out() const { return sp_.out_dt == DataType::bf16; }

  // The shifts in the halves' lane order (a bf16 output's: vshuff32x4 picks the 128-bit
  // lanes 0, 2 or 1, 3 of each B tile's 16), the lanes of a missing B tile zero; every
  // sum zero.
  void start_stats() {
    if (!sp_.post.stats) return;
    mov(reg_shift, arg(offsetof(AmxFwdCallArgs, stats_shift)));
    if (bf16_out()) {
      const Zmm lower = zmm_d(0), upper = sp_.n_b == 2 ? zmm_d(1) : zmm_zero;
      vmovups(lower, ptr[reg_shift]);
      if (sp_.n_b == 2) vmovups(upper, ptr[reg_shift + 64]);
      vshuff32x4(zmm_shift(0), lower, upper, 0x88);
      vshuff32x4(zmm_shift(1), lower, upper, 0xdd);
    } else {
      for (int h = 0; h < sp_.n_b; ++h) vmovups(zmm_shift(h), ptr[reg_shift + h * 64]);
    }
    for (int a = 0; a < sp_.n_a; ++a)
      for (int odd = 0; odd < 2; ++odd)
        for (int h = 0; h < 2; ++h) {
          vpxord(zmm_sum(a, odd, h), zmm_sum(a, odd, h), zmm_sum(a, odd, h));
          vpxord(zmm_squares(a, odd, h), zmm_squares(a, odd, h), zmm_squares(a, odd, h));
        }
  }

  // Half h of row `row` of tile a: y, its values as stored in fp32 (a bf16 output's widened).
  void add_stats(int a, int row, int h, const Zmm& y) {
    const Zmm d = zmm_d(h);
    vsubps(d, y, zmm_shift(h));
    vaddps(zmm_sum(a, row % 2, h), zmm_sum(a, row % 2, h), d);
    vfmadd231ps(zmm_squares(a, row % 2, h), d, d);
  }

  // The chains added up, (tile 0 even + odd) + (tile 1 even + odd); for a bf16 output the
  // halves back in channel order; then the slot: 32 sums, then 32 sums of squares.
  void store_stats() {
    if (!sp_.post.stats) return;
    mov(reg_slot, arg(offsetof(AmxFwdCallArgs, stats)));
    for (int squares = 0; squares < 2; ++squares) {
      auto acc = [&](int a, int odd, int h) { return squares ? zmm_squares(a, odd, h) : zmm_sum(a, odd, h); };
      for (int h = 0; h < 2; ++h) {
        for (int a = 0; a < sp_.n_a; ++a) vaddps(acc(a, 0, h), acc(a, 0, h), acc(a, 1, h));
        if (sp_.n_a == 2) vaddps(acc(0, 0, h), acc(0, 0, h), acc(1, 0, h));
      }
      const int disp = squares * kAmxBlock * 4;
      if (bf16_out()) {
        // Halves [lo0 lo1 lo2 lo3], [hi0 hi1 hi2 hi3] to channels [lo0 hi0 lo1 hi1], [lo2 hi2 lo3 hi3].
        for (int b = 0; b < 2; ++b) {
          vshuff32x4(zmm_tmp, acc(0, 0, 0), acc(0, 0, 1), b ? 0xee : 0x44);
          vshuff32x4(zmm_tmp, zmm_tmp, zmm_tmp, 0xd8);
          vmovups(ptr[reg_slot + disp + b * 64], zmm_tmp);
        }
      } else {
        for (int h = 0; h < 2; ++h) vmovups(ptr[reg_slot + disp + h * 64], acc(0, 0, h));
      }
    }
  }

  // One pixel's 32 output channels: the post-ops, in their order, and the store (a bf16
  // row in one: both B tiles rounded by one vcvtne2ps2bf16, a missing one as zeros).
  void store_row(int a, int row) {
    const int half_bytes = 16 * out_bytes();
    const int c_disp = row * kRowBytes;
    for (int b = 0; b < sp_.n_b; ++b) {
      const Zmm acc = zmm_out(b);
      vmovups(acc, ptr[reg_c + c_disp + b * kTileBytes]);
      if (sp_.post.bias) vaddps(acc, acc, ptr[reg_bias + b * 64]);
      if (sp_.post.add) {
        if (bf16_out()) {
          vpmovzxwd(zmm_tmp, ptr[reg_res + b * half_bytes]);
          vpslld(zmm_tmp, zmm_tmp, 16);
          vaddps(acc, acc, zmm_tmp);
        } else {
          vaddps(acc, acc, ptr[reg_res + b * half_bytes]);
        }
      }
      // max(0, x) with x second, so NaN propagates as torch.relu does.
      if (sp_.post.relu) vmaxps(acc, zmm_zero, acc);
    }
    if (bf16_out()) {
      vcvtne2ps2bf16(zmm_packed, sp_.n_b == 2 ? zmm_out(1) : zmm_zero, zmm_out(0));
      vmovups(ptr[reg_dst], zmm_packed);
      if (!sp_.post.stats) return;
      vpunpcklwd(zmm_d(0), zmm_zero, zmm_packed);
      vpunpckhwd(zmm_d(1), zmm_zero, zmm_packed);
      for (int h = 0; h < 2; ++h) add_stats(a, row, h, zmm_d(h));
    } else {
      for (int b = 0; b < 2; ++b) vmovups(ptr[reg_dst + b * half_bytes], b < sp_.n_b ? zmm_out(b) : zmm_zero);
      if (sp_.post.stats)
        for (int h = 0; h < sp_.n_b; ++h) add_stats(a, row, h, zmm_out(h));
    }
  }

  AmxFwdKernelSpec sp_;
};

// Palette 1: C tiles tmm0-3 and A tiles tmm4-5 of m rows, B tiles tmm6-7 of 16; every
// row 64 bytes.
class AmxTileConfig : public JitGenerator {
 public:
  explicit AmxTileConfig(int m) : JitGenerator("amx_tilecfg_m" + std::to_string(m), 4096), m_(m) {
    if (m < 1 || m > kAmxMaxRows) throw std::invalid_argument("amx tile config: rows must be in [1, 16]");
  }

 private:
  void generate() override {
    sub(rsp, 64);
    for (int i = 0; i < 8; ++i) mov(qword[rsp + i * 8], 0);
    mov(byte[rsp], 1);
    for (int t = 0; t < 8; ++t) {
      mov(word[rsp + 16 + 2 * t], kRowBytes);
      mov(byte[rsp + 48 + t], t < 6 ? m_ : 16);
    }
    ldtilecfg(ptr[rsp]);
    add(rsp, 64);
    ret();
  }
  int m_;
};

class AmxTileRelease : public JitGenerator {
 public:
  AmxTileRelease() : JitGenerator("amx_tilerelease", 4096) {}

 private:
  void generate() override {
    tilerelease();
    ret();
  }
};

}  // namespace

std::unique_ptr<JitGenerator> make_amx_fwd_kernel(const AmxFwdKernelSpec& spec) {
  return std::make_unique<AmxFwdKernel>(spec);
}
std::unique_ptr<JitGenerator> make_amx_tile_config_kernel(int m) { return std::make_unique<AmxTileConfig>(m); }
std::unique_ptr<JitGenerator> make_amx_tile_release_kernel() { return std::make_unique<AmxTileRelease>(); }

}  // namespace dc
