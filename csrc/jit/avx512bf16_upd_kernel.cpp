#include "jit/avx512bf16_upd_kernel.h"

#include <algorithm>
#include <cstddef>
#include <stdexcept>

namespace dc {

std::string Avx512Bf16UpdKernelSpec::name() const {
  return "bf16_conv_upd_a" + std::to_string(n_a) + "b" + std::to_string(n_b) + "g" + std::to_string(g) +
         "_of32__avx512_bf16";
}

namespace {

// Two broadcast registers let one channel's vpbroadcastd issue while the one before is
// still read; a single vector takes the pair as an embedded {1to16} operand and needs none.
int broadcast_registers(int n_b) { return n_b == 2 ? 2 : 0; }

}  // namespace

int avx512bf16_upd_vector_registers(const Avx512Bf16UpdKernelSpec& sp) {
  return sp.g * sp.n_b + sp.n_b + broadcast_registers(sp.n_b);
}

Avx512Bf16UpdKernelSpec avx512bf16_upd_spec(int n_a, int n_b) {
  Avx512Bf16UpdKernelSpec sp;
  sp.n_a = n_a;
  sp.n_b = n_b;
  const int channels = 16 * n_a;
  for (int groups = 1;; ++groups) {
    sp.g = (channels + groups - 1) / groups;
    if (avx512bf16_upd_vector_registers(sp) <= 32) return sp;
  }
}

namespace {

using namespace Xbyak;

constexpr int kChunkBytes = 2048;  // dy of 32 pixels: two halves
constexpr int kHalfBytes = 1024;   // one half: 16 pairs x 16 output channels x 2 pixels
constexpr int kRowBytes = 64;      // 32 pixels of one channel's row, or one pair's dy row
constexpr int kPairBytes = 4;      // a pixel pair of one channel
constexpr int kDwRowBytes = 128;   // one input channel's 32 fp32 sums in the dW block
constexpr int kMaxBases = 4;       // base registers: 4 channels each

class Avx512Bf16UpdKernel : public JitGenerator {
 public:
  explicit Avx512Bf16UpdKernel(const Avx512Bf16UpdKernelSpec& sp)
      : JitGenerator(sp.name(), code_size(sp)), sp_(sp) {
    if (sp.n_a < 1 || sp.n_a > 2 || sp.n_b < 1 || sp.n_b > 2 || sp.g < 1 || sp.g > 4 * kMaxBases)
      throw std::invalid_argument("avx512_bf16 upd kernel: unsupported spec " + sp.name());
    if (avx512bf16_upd_vector_registers(sp) > 32)
      throw std::invalid_argument("avx512_bf16 upd kernel: the group needs too many vector registers: " + sp.name());
  }

 private:
  static size_t code_size(const Avx512Bf16UpdKernelSpec& sp) {
    const size_t groups = (16 * sp.n_a + sp.g - 1) / sp.g;
    const size_t per_pair = sp.n_b * 10 + sp.g * (10 + sp.n_b * 8);
    return 4096 + groups * (16 * per_pair + 2 * sp.g * sp.n_b * 24 + 512);
  }

  // Registers, named by role. rdi carries the argument struct (System V); rbx and r12 are
  // callee-saved and pushed.
  const Reg64 reg_args = rdi;
  const Reg64 reg_img_src = rsi;   // the current image's transposed x, the group's first channel
  const Reg64 reg_img_ddst = rdx;  // the current image's first dy chunk
  const Reg64 reg_ddst = rcx;      // the current chunk of dy
  const Reg64 reg_cnt_chunk = rax;
  const Reg64 reg_stride = r8;     // bytes from one channel's row to the next
  const Reg64 reg_stride3 = r9;    // three of them
  // The current chunk of channels 4 j to 4 j + 3 of the group.
  Reg64 reg_base(int j) const {
    static const Reg64 bases[kMaxBases] = {r10, r11, rbx, r12};
    return bases[j];
  }
  // The block's sums, loaded before and stored after a group's reduction, when the
  // chunk's register is free.
  const Reg64 reg_dw = rcx;
  // The group's first channel times the stride, before the image loop needs the counter.
  const Reg64 reg_group_off = rax;

  int n_channels() const { return 16 * sp_.n_a; }
  int n_groups() const { return (n_channels() + sp_.g - 1) / sp_.g; }
  int n_bases(int g) const { return (g + 3) / 4; }
  Zmm zmm_acc(int c, int b) const { return Zmm(c * sp_.n_b + b); }
  Zmm zmm_dy(int b) const { return Zmm(sp_.g * sp_.n_b + b); }
  Zmm zmm_bcast(int i) const { return Zmm(sp_.g * sp_.n_b + sp_.n_b + i % broadcast_registers(sp_.n_b)); }

  Address arg(size_t offset) const { return qword[reg_args + static_cast<int64_t>(offset)]; }
  // Channel c of the group (c / 4 on its base, c % 4 strides on) at pixel pair `pair`.
  Address x_pair(int c, int pair) const {
    const int disp = pair * kPairBytes;
    const Reg64 base = reg_base(c / 4);
    switch (c % 4) {
      case 0: return ptr[base + disp];
      case 1: return ptr[base + reg_stride + disp];
      case 2: return ptr[base + reg_stride * 2 + disp];
      default: return ptr[base + reg_stride3 + disp];
    }
  }
  Address x_pair_b(int c, int pair) const {
    const int disp = pair * kPairBytes;
    const Reg64 base = reg_base(c / 4);
    switch (c % 4) {
      case 0: return ptr_b[base + disp];
      case 1: return ptr_b[base + reg_stride + disp];
      case 2: return ptr_b[base + reg_stride * 2 + disp];
      default: return ptr_b[base + reg_stride3 + disp];
    }
  }

  void generate() override {
    push(rbx);
    push(r12);
    mov(reg_stride, arg(offsetof(AmxUpdCallArgs, src_row_stride)));
    lea(reg_stride3, ptr[reg_stride + reg_stride * 2]);
    for (int grp = 0; grp < n_groups(); ++grp) {
      const int c0 = grp * sp_.g, g = std::min(sp_.g, n_channels() - c0);
      init_sums(c0, g);
      loop_img(c0, g, [&] { loop_chunk(g, [&] { compute_chunk(g); }); });
      store_sums(c0, g);
    }
    pop(r12);
    pop(rbx);
    vzeroupper();
    ret();
  }

  // Zeros, or the block's sums of the group's channels where the call accumulates.
  void init_sums(int c0, int g) {
    Label l_zero, l_done;
    cmp(arg(offsetof(AmxUpdCallArgs, accumulate)), 0);
    je(l_zero, T_NEAR);
    mov(reg_dw, arg(offsetof(AmxUpdCallArgs, dw)));
    for (int c = 0; c < g; ++c)
      for (int b = 0; b < sp_.n_b; ++b) vmovups(zmm_acc(c, b), ptr[reg_dw + (c0 + c) * kDwRowBytes + b * kRowBytes]);
    jmp(l_done, T_NEAR);
    L(l_zero);
    for (int c = 0; c < g; ++c)
      for (int b = 0; b < sp_.n_b; ++b) vpxord(zmm_acc(c, b), zmm_acc(c, b), zmm_acc(c, b));
    L(l_done);
  }

  // The image counter lives on the stack: every free register has a role.
  template <typename F>
  void loop_img(int c0, int g, F body) {
    Label l_img;
    mov(reg_img_src, arg(offsetof(AmxUpdCallArgs, src)));
    if (c0) {
      imul(reg_group_off, reg_stride, c0);
      add(reg_img_src, reg_group_off);
    }
    mov(reg_img_ddst, arg(offsetof(AmxUpdCallArgs, ddst)));
    push(arg(offsetof(AmxUpdCallArgs, n_imgs)));
    align(16);
    L(l_img);
    mov(reg_base(0), reg_img_src);
    for (int j = 1; j < n_bases(g); ++j) lea(reg_base(j), ptr[reg_base(j - 1) + reg_stride * 4]);
    mov(reg_ddst, reg_img_ddst);
    body();
    add(reg_img_src, arg(offsetof(AmxUpdCallArgs, src_img_stride)));
    add(reg_img_ddst, arg(offsetof(AmxUpdCallArgs, ddst_img_stride)));
    dec(qword[rsp]);
    jnz(l_img, T_NEAR);
    add(rsp, 8);
  }

  template <typename F>
  void loop_chunk(int g, F body) {
    Label l_chunk;
    mov(reg_cnt_chunk, arg(offsetof(AmxUpdCallArgs, n_chunks)));
    align(16);
    L(l_chunk);
    body();
    for (int j = 0; j < n_bases(g); ++j) add(reg_base(j), kRowBytes);
    add(reg_ddst, kChunkBytes);
    dec(reg_cnt_chunk);
    jnz(l_chunk, T_NEAR);
  }

  // The 16 pixel pairs of a chunk: the pair's dy rows once, each channel's pair broadcast
  // to every vector.
  void compute_chunk(int g) {
    int nb = 0;
    for (int pair = 0; pair < 16; ++pair) {
      for (int b = 0; b < sp_.n_b; ++b) vmovups(zmm_dy(b), ptr[reg_ddst + b * kHalfBytes + pair * kRowBytes]);
      for (int c = 0; c < g; ++c) {
        if (sp_.n_b == 1) {
          vdpbf16ps(zmm_acc(c, 0), zmm_dy(0), x_pair_b(c, pair));
          continue;
        }
        const Zmm bc = zmm_bcast(nb++);
        vpbroadcastd(bc, x_pair(c, pair));
        for (int b = 0; b < sp_.n_b; ++b) vdpbf16ps(zmm_acc(c, b), zmm_dy(b), bc);
      }
    }
  }

  void store_sums(int c0, int g) {
    mov(reg_dw, arg(offsetof(AmxUpdCallArgs, dw)));
    for (int c = 0; c < g; ++c)
      for (int b = 0; b < sp_.n_b; ++b) vmovups(ptr[reg_dw + (c0 + c) * kDwRowBytes + b * kRowBytes], zmm_acc(c, b));
  }

  Avx512Bf16UpdKernelSpec sp_;
};

}  // namespace

std::unique_ptr<JitGenerator> make_avx512bf16_upd_kernel(const Avx512Bf16UpdKernelSpec& spec) {
  return std::make_unique<Avx512Bf16UpdKernel>(spec);
}

}  // namespace dc
