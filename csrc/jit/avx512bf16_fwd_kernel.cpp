#include "jit/avx512bf16_fwd_kernel.h"

#include <algorithm>
#include <cstddef>
#include <sstream>
#include <stdexcept>

#include "jit/bf16_fwd_loops.h"

namespace dc {

std::string Avx512Bf16FwdKernelSpec::name() const {
  std::ostringstream o;
  o << "bf16_conv_fwd_kw" << s << "d" << dil_w << "_px" << px << "_m" << m << "a" << n_a << "b" << n_b << "_p"
    << pairs << "_o" << dtype_name(out_dt) << post.name() << "__avx512_bf16";
  return o.str();
}

namespace {

// Two broadcast registers let one pixel's vpbroadcastd issue while the one before is still
// read; a single vector takes its pair as an embedded {1to16} operand and needs none.
int broadcast_registers(const Avx512Bf16FwdKernelSpec& sp) {
  if (sp.n_b == 1) return 0;
  return sp.n_a * sp.m * sp.n_b + sp.n_b + 2 <= 32 ? 2 : 1;
}

}  // namespace

int avx512bf16_fwd_vector_registers(const Avx512Bf16FwdKernelSpec& sp) {
  return sp.n_a * sp.m * sp.n_b + std::max(2, sp.n_b + broadcast_registers(sp));
}

namespace {

using namespace Xbyak;

constexpr int kHalfTapBytes = 1024;  // one B tile: the 16 pairs of 16 output channels
constexpr int kTapBytes = 2048;      // a tap's two
constexpr int kPixelBytes = 64;      // one activation pixel: 32 bf16
constexpr int kPairBytes = 4;        // two bf16 channels, one dword

class Avx512Bf16FwdKernel : public JitGenerator {
 public:
  explicit Avx512Bf16FwdKernel(const Avx512Bf16FwdKernelSpec& sp)
      : JitGenerator(sp.name(), code_size(sp)), sp_(sp) {
    if (sp.m < 1 || sp.n_a < 1 || sp.n_a > 2 || sp.n_b < 1 || sp.n_b > 2 || sp.s < 1 || sp.dil_w < 1 || sp.px < 1 ||
        sp.pairs < 1 || sp.pairs > 16 || sp.post.stats ||
        (sp.out_dt != DataType::f32 && sp.out_dt != DataType::bf16) ||
        // Every displacement fits an int32: the last pixel's last column, the last tap.
        (static_cast<int64_t>(sp.m - 1) * sp.px + static_cast<int64_t>(sp.s - 1) * sp.dil_w + 1) * kPixelBytes >
            (1ll << 30) ||
        static_cast<int64_t>(sp.s) * kTapBytes > (1ll << 30))
      throw std::invalid_argument("avx512_bf16 fwd kernel: unsupported spec " + sp.name());
    if (avx512bf16_fwd_vector_registers(sp) > 32)
      throw std::invalid_argument("avx512_bf16 fwd kernel: the tile needs too many vector registers: " + sp.name());
  }

 private:
  static size_t code_size(const Avx512Bf16FwdKernelSpec& sp) {
    const size_t px = static_cast<size_t>(sp.n_a) * sp.m;
    const size_t per_pair = sp.n_b * 12 + px * (12 + sp.n_b * 12);
    return 4096 + static_cast<size_t>(sp.s) * sp.pairs * per_pair + px * 2 * 96;
  }

  // Registers, named by role; all caller-saved. rdi carries the argument struct (System V).
  const Reg64 reg_args = rdi;
  // The reduction.
  const Reg64 reg_src_cb0 = r8;  // input block of run 0 (1), tap (0, 0)
  const Reg64 reg_src_cb1 = r9;
  const Reg64 reg_src0 = rsi;    // kernel row of run 0 (1)
  const Reg64 reg_src1 = rdx;
  const Reg64 reg_wei = r10;     // the current kernel row's first tap
  const Reg64 reg_cnt_cb = rcx;
  const Reg64 reg_cnt_r = r11;
  // The epilogue, once the reduction's registers are dead.
  const Reg64 reg_dst = rsi;   // the next pixel to store
  const Reg64 reg_res = rdx;   // its residual
  const Reg64 reg_rows = r8;   // the mask of pixels stored
  const Reg64 reg_bias = r9;

  int n_px() const { return sp_.n_a * sp_.m; }
  int n_acc() const { return n_px() * sp_.n_b; }
  Zmm zmm_acc(int a, int i, int b) const { return Zmm((a * sp_.m + i) * sp_.n_b + b); }
  Zmm zmm_wei(int b) const { return Zmm(n_acc() + b); }
  Zmm zmm_bcast(int i) const { return Zmm(n_acc() + sp_.n_b + i % broadcast_registers(sp_)); }
  // The epilogue's, over the weight and broadcast registers.
  Zmm zmm_zero() const { return Zmm(n_acc()); }
  Zmm zmm_tmp() const { return Zmm(n_acc() + 1); }

  Address arg(size_t offset) const { return qword[reg_args + static_cast<int64_t>(offset)]; }
  int out_bytes() const { return elem_bytes(sp_.out_dt); }

  void generate() override {
    load_args();
    for (int i = 0; i < n_acc(); ++i) vpxord(Zmm(i), Zmm(i), Zmm(i));
    loop_cb([&] { loop_r([&] { compute_kernel_row(); }); });
    for (int a = 0; a < sp_.n_a; ++a) store_run(a);
    vzeroupper();
    ret();
  }

  const Bf16FwdLoopRegs loop_regs{reg_args, {reg_src_cb0, reg_src_cb1}, {reg_src0, reg_src1}, reg_wei, reg_cnt_cb,
                                   reg_cnt_r};

  void load_args() {
    emit_bf16_fwd_load_args(*this, loop_regs, sp_.n_a);
  }
  template <typename F>
  void loop_cb(F body) {
    emit_bf16_fwd_loop_cb(*this, loop_regs, sp_.n_a, body);
  }
  template <typename F>
  void loop_r(F body) {
    emit_bf16_fwd_loop_r(*this, loop_regs, sp_.n_a, static_cast<uint32_t>(sp_.s * kTapBytes), body);
  }

  // Every kernel column and channel pair of one kernel row: the pair's weight rows once,
  // then each pixel's pair broadcast to every vector.
  void compute_kernel_row() {
    int nb = 0;
    for (int col = 0; col < sp_.s; ++col)
      for (int pair = 0; pair < sp_.pairs; ++pair) {
        const int wdisp = col * kTapBytes + pair * kPixelBytes;
        for (int b = 0; b < sp_.n_b; ++b) vmovups(zmm_wei(b), ptr[reg_wei + wdisp + b * kHalfTapBytes]);
        for (int a = 0; a < sp_.n_a; ++a) {
          const Reg64& src = a == 0 ? reg_src0 : reg_src1;
          for (int i = 0; i < sp_.m; ++i) {
            const int sdisp = (i * sp_.px + col * sp_.dil_w) * kPixelBytes + pair * kPairBytes;
            if (sp_.n_b == 1) {
              vdpbf16ps(zmm_acc(a, i, 0), zmm_wei(0), ptr_b[src + sdisp]);
              continue;
            }
            const Zmm bc = zmm_bcast(nb++);
            vpbroadcastd(bc, ptr[src + sdisp]);
            for (int b = 0; b < sp_.n_b; ++b) vdpbf16ps(zmm_acc(a, i, b), zmm_wei(b), bc);
          }
        }
      }
  }

  // Run a's pixels, each stored where its bit of the mask is set, the destination (and the
  // residual) moving on by dst_px_stride per pixel stored.
  void store_run(int a) {
    mov(reg_dst, arg(offsetof(AmxFwdCallArgs, dst) + 8 * a));
    if (sp_.post.add) mov(reg_res, arg(offsetof(AmxFwdCallArgs, res) + 8 * a));
    if (sp_.post.bias) mov(reg_bias, arg(offsetof(AmxFwdCallArgs, bias)));
    mov(reg_rows, arg(offsetof(AmxFwdCallArgs, rows) + 8 * a));
    vpxord(zmm_zero(), zmm_zero(), zmm_zero());
    for (int i = 0; i < sp_.m; ++i) {
      Label l_not_stored;
      bt(reg_rows, i);
      jnc(l_not_stored, T_NEAR);
      store_pixel(a, i);
      add(reg_dst, arg(offsetof(AmxFwdCallArgs, dst_px_stride)));
      if (sp_.post.add) add(reg_res, arg(offsetof(AmxFwdCallArgs, dst_px_stride)));
      L(l_not_stored);
    }
  }

  // One pixel's 32 output channels: the post-ops, in their order, and the store.
  void store_pixel(int a, int i) {
    const bool bf16 = sp_.out_dt == DataType::bf16;
    const int half_bytes = 16 * out_bytes();
    for (int b = 0; b < 2; ++b) {
      if (b >= sp_.n_b) {
        if (bf16) vmovups(ptr[reg_dst + b * half_bytes], Ymm(zmm_zero().getIdx()));
        else vmovups(ptr[reg_dst + b * half_bytes], zmm_zero());
        continue;
      }
      const Zmm acc = zmm_acc(a, i, b);
      if (sp_.post.bias) vaddps(acc, acc, ptr[reg_bias + b * 64]);
      if (sp_.post.add) {
        if (bf16) {
          vpmovzxwd(zmm_tmp(), ptr[reg_res + b * half_bytes]);
          vpslld(zmm_tmp(), zmm_tmp(), 16);
          vaddps(acc, acc, zmm_tmp());
        } else {
          vaddps(acc, acc, ptr[reg_res + b * half_bytes]);
        }
      }
      // max(0, x) with x second, so NaN propagates as torch.relu does.
      if (sp_.post.relu) vmaxps(acc, zmm_zero(), acc);
      if (bf16) {
        vcvtneps2bf16(Ymm(acc.getIdx()), acc);
        vmovups(ptr[reg_dst + b * half_bytes], Ymm(acc.getIdx()));
      } else {
        vmovups(ptr[reg_dst + b * half_bytes], acc);
      }
    }
  }

  Avx512Bf16FwdKernelSpec sp_;
};

}  // namespace

std::unique_ptr<JitGenerator> make_avx512bf16_fwd_kernel(const Avx512Bf16FwdKernelSpec& spec) {
  return std::make_unique<Avx512Bf16FwdKernel>(spec);
}

}  // namespace dc
