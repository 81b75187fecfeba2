#include "jit/amx_upd_kernel.h"

#include <cstddef>
#include <stdexcept>

namespace dc {

std::string AmxUpdKernelSpec::name() const {
  return "bf16_conv_upd_a" + std::to_string(n_a) + "b" + std::to_string(n_b) + "_of32__amx";
}

namespace {

using namespace Xbyak;

constexpr int kChunkBytes = 2048;  // the two B tiles of 32 pixels
constexpr int kTileBytes = 1024;
constexpr int kRowBytes = 64;
constexpr int kDwRowBytes = 128;  // one input channel's 32 fp32 sums in the dW block

class AmxUpdKernel : public JitGenerator {
 public:
  explicit AmxUpdKernel(const AmxUpdKernelSpec& sp) : JitGenerator(sp.name(), 4096), sp_(sp) {
    if (sp.n_a < 1 || sp.n_a > 2 || sp.n_b < 1 || sp.n_b > 2)
      throw std::invalid_argument("amx upd kernel: unsupported spec " + sp.name());
  }

 private:
  // Registers, named by role; every one caller-saved. rdi carries the argument struct.
  const Reg64 reg_args = rdi;
  const Reg64 reg_img_src = rsi;   // the current image's transposed x, channel 0
  const Reg64 reg_img_ddst = rdx;  // the current image's first dy chunk
  const Reg64 reg_src0 = rcx;      // the current chunk of A tile 0 (channels 0-15)
  const Reg64 reg_src1 = r8;       // ... of A tile 1 (channels 16-31)
  const Reg64 reg_ddst = r9;       // the current chunk of dy
  const Reg64 reg_stride = r10;    // A-tile row stride (tileloadd's index)
  const Reg64 reg_row64 = r11;     // B-tile row stride
  const Reg64 reg_cnt_chunk = rax;
  // The block's sums, loaded before and stored after the reduction, whose registers are
  // free then.
  const Reg64 reg_dw = rsi;
  const Reg64 reg_dw_row = rdx;    // 128: a dW block row

  const Tmm tmm_c(int a, int b) const { return Tmm(a * 2 + b); }
  const Tmm tmm_a(int a) const { return Tmm(4 + a); }
  const Tmm tmm_b(int b) const { return Tmm(6 + b); }

  Address arg(size_t offset) const { return qword[reg_args + static_cast<int64_t>(offset)]; }

  void generate() override {
    init_c_tiles();
    load_args();
    loop_img([&] { loop_chunk([&] { compute_chunk(); }); });
    store_c_tiles();
    ret();
  }

  // Zeros, or the block's sums where the call accumulates.
  void init_c_tiles() {
    Label l_zero, l_done;
    cmp(arg(offsetof(AmxUpdCallArgs, accumulate)), 0);
    je(l_zero, T_NEAR);
    mov(reg_dw, arg(offsetof(AmxUpdCallArgs, dw)));
    mov(reg_dw_row, kDwRowBytes);
    for (int a = 0; a < sp_.n_a; ++a)
      for (int b = 0; b < sp_.n_b; ++b)
        tileloadd(tmm_c(a, b), ptr[reg_dw + reg_dw_row + a * 16 * kDwRowBytes + b * kRowBytes]);
    jmp(l_done, T_NEAR);
    L(l_zero);
    for (int a = 0; a < sp_.n_a; ++a)
      for (int b = 0; b < sp_.n_b; ++b) tilezero(tmm_c(a, b));
    L(l_done);
  }

  void load_args() {
    mov(reg_img_src, arg(offsetof(AmxUpdCallArgs, src)));
    mov(reg_img_ddst, arg(offsetof(AmxUpdCallArgs, ddst)));
    mov(reg_stride, arg(offsetof(AmxUpdCallArgs, src_row_stride)));
    mov(reg_row64, kRowBytes);
  }

  // The image counter lives on the stack: every free register has a role.
  template <typename F>
  void loop_img(F body) {
    Label l_img;
    push(arg(offsetof(AmxUpdCallArgs, n_imgs)));
    align(16);
    L(l_img);
    mov(reg_src0, reg_img_src);
    if (sp_.n_a == 2) {
      mov(reg_src1, reg_stride);
      shl(reg_src1, 4);
      add(reg_src1, reg_src0);
    }
    mov(reg_ddst, reg_img_ddst);
    body();
    add(reg_img_src, arg(offsetof(AmxUpdCallArgs, src_img_stride)));
    add(reg_img_ddst, arg(offsetof(AmxUpdCallArgs, ddst_img_stride)));
    dec(qword[rsp]);
    jnz(l_img, T_NEAR);
    add(rsp, 8);
  }

  template <typename F>
  void loop_chunk(F body) {
    Label l_chunk;
    mov(reg_cnt_chunk, arg(offsetof(AmxUpdCallArgs, n_chunks)));
    align(16);
    L(l_chunk);
    body();
    add(reg_src0, kRowBytes);
    if (sp_.n_a == 2) add(reg_src1, kRowBytes);
    add(reg_ddst, kChunkBytes);
    dec(reg_cnt_chunk);
    jnz(l_chunk, T_NEAR);
  }

  // Each load as late as possible after the last product that read its tile: A0, B0, C00,
  // B1, C01, A1, C10, C11.
  void compute_chunk() {
    tileloadd(tmm_a(0), ptr[reg_src0 + reg_stride]);
    for (int b = 0; b < sp_.n_b; ++b) {
      tileloadd(tmm_b(b), ptr[reg_ddst + reg_row64 + b * kTileBytes]);
      tdpbf16ps(tmm_c(0, b), tmm_a(0), tmm_b(b));
    }
    if (sp_.n_a == 2) {
      tileloadd(tmm_a(1), ptr[reg_src1 + reg_stride]);
      for (int b = 0; b < sp_.n_b; ++b) tdpbf16ps(tmm_c(1, b), tmm_a(1), tmm_b(b));
    }
  }

  void store_c_tiles() {
    mov(reg_dw, arg(offsetof(AmxUpdCallArgs, dw)));
    mov(reg_dw_row, kDwRowBytes);
    for (int a = 0; a < sp_.n_a; ++a)
      for (int b = 0; b < sp_.n_b; ++b)
        tilestored(ptr[reg_dw + reg_dw_row + a * 16 * kDwRowBytes + b * kRowBytes], tmm_c(a, b));
  }

  AmxUpdKernelSpec sp_;
};

}  // namespace

std::unique_ptr<JitGenerator> make_amx_upd_kernel(const AmxUpdKernelSpec& spec) {
  return std::make_unique<AmxUpdKernel>(spec);
}

}  // namespace dc
