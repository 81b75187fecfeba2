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
    return 4096 + static_cast<size_t>(sp.s) * 160 + static_cast<size_t>(sp.n_a) * sp.m * (sp.post.stats ? 384 : 256);
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
  // The stats post-op's, per B tile b: its 16 shifts, sums of d = y - shift and of d^2;
  // and d itself.
  const Zmm zmm_shift(int b) const { return Zmm(4 + b); }
  const Zmm zmm_sum(int b) const { return Zmm(6 + b); }
  const Zmm zmm_squares(int b) const { return Zmm(8 + b); }
  const Zmm zmm_d = zmm10;

  Address arg(size_t offset) const { return qword[reg_args + static_cast<int64_t>(offset)]; }
  int out_bytes() const { return elem_bytes(sp_.out_dt); }

  void generate() override {
    preamble();
    load_args();
    for (int a = 0; a < sp_.n_a; ++a)
      for (int b = 0; b < sp_.n_b; ++b) tilezero(tmm_c(a, b));
    loop_cb([&] { loop_r([&] { compute_kernel_row(); }); });
    store_c_tiles();
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
    vpxord(zmm_zero, zmm_zero, zmm_zero);
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
      store_row(row);
      add(reg_dst, arg(offsetof(AmxFwdCallArgs, dst_px_stride)));
      if (sp_.post.add) add(reg_res, arg(offsetof(AmxFwdCallArgs, dst_px_stride)));
      L(l_not_stored);
    }
  }

  void start_stats() {
    if (!sp_.post.stats) return;
    mov(reg_shift, arg(offsetof(AmxFwdCallArgs, stats_shift)));
    for (int b = 0; b < sp_.n_b; ++b) {
      vmovups(zmm_shift(b), ptr[reg_shift + b * 64]);
      vpxord(zmm_sum(b), zmm_sum(b), zmm_sum(b));
      vpxord(zmm_squares(b), zmm_squares(b), zmm_squares(b));
    }
  }

  // y as stored, in acc (fp32) or, for a bf16 output, in acc's lower half.
  void add_stats(int b, const Zmm& acc) {
    if (!sp_.post.stats) return;
    if (sp_.out_dt == DataType::bf16) {
      vpmovzxwd(zmm_d, Ymm(acc.getIdx()));
      vpslld(zmm_d, zmm_d, 16);
      vsubps(zmm_d, zmm_d, zmm_shift(b));
    } else {
      vsubps(zmm_d, acc, zmm_shift(b));
    }
    vaddps(zmm_sum(b), zmm_sum(b), zmm_d);
    vfmadd231ps(zmm_squares(b), zmm_d, zmm_d);
  }

  // The slot: 32 sums, then 32 sums of squares; lanes without a B tile zero (zmm_zero, as
  // the epilogue left it).
  void store_stats() {
    if (!sp_.post.stats) return;
    mov(reg_slot, arg(offsetof(AmxFwdCallArgs, stats)));
    for (int b = 0; b < 2; ++b) {
      vmovups(ptr[reg_slot + b * 64], b < sp_.n_b ? zmm_sum(b) : zmm_zero);
      vmovups(ptr[reg_slot + kAmxBlock * 4 + b * 64], b < sp_.n_b ? zmm_squares(b) : zmm_zero);
    }
  }

  // One pixel's 32 output channels: the post-ops, in their order, and the store.
  void store_row(int row) {
    const bool bf16 = sp_.out_dt == DataType::bf16;
    const int half_bytes = 16 * out_bytes();
    const int c_disp = row * kRowBytes;
    for (int b = 0; b < 2; ++b) {
      if (b >= sp_.n_b) {
        if (bf16) vmovups(ptr[reg_dst + b * half_bytes], Ymm(zmm_zero.getIdx()));
        else vmovups(ptr[reg_dst + b * half_bytes], zmm_zero);
        continue;
      }
      const Zmm acc = zmm_out(b);
      vmovups(acc, ptr[reg_c + c_disp + b * kTileBytes]);
      if (sp_.post.bias) vaddps(acc, acc, ptr[reg_bias + b * 64]);
      if (sp_.post.add) {
        if (bf16) {
          vpmovzxwd(zmm_tmp, ptr[reg_res + b * half_bytes]);
          vpslld(zmm_tmp, zmm_tmp, 16);
          vaddps(acc, acc, zmm_tmp);
        } else {
          vaddps(acc, acc, ptr[reg_res + b * half_bytes]);
        }
      }
      // max(0, x) with x second, so NaN propagates as torch.relu does.
      if (sp_.post.relu) vmaxps(acc, zmm_zero, acc);
      if (bf16) {
        vcvtneps2bf16(Ymm(acc.getIdx()), acc);
        vmovups(ptr[reg_dst + b * half_bytes], Ymm(acc.getIdx()));
      } else {
        vmovups(ptr[reg_dst + b * half_bytes], acc);
      }
      add_stats(b, acc);
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
