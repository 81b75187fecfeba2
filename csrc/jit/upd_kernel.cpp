#include "jit/upd_kernel.h"

#include <cstddef>
#include <stdexcept>

#include "jit/fwd_kernel.h"

namespace dc {

std::string UpdKernelSpec::name() const {
  return std::string(dtype_name(dt)) + "_conv_upd_c" + std::to_string(n_c) + "kb" + std::to_string(n_kb) + "__" + isa_name(isa);
}

int upd_vector_registers(const UpdKernelSpec& sp) { return sp.n_c * sp.n_kb + sp.n_kb + 1; }

namespace {

using namespace Xbyak;

class UpdKernel : public JitGenerator {
 public:
  explicit UpdKernel(const UpdKernelSpec& sp) : JitGenerator(sp.name(), 4096 + sp.n_c * sp.n_kb * 64), sp_(sp) {
    check_fp32_isa(sp.isa, "upd kernel");
    if (sp.n_c < 1 || sp.n_c > sp.v() || sp.n_kb < 1 || sp.n_kb > 4 ||
        upd_vector_registers(sp) > isa_vector_registers(sp.isa))
      throw std::invalid_argument("upd kernel: unsupported tile " + sp.name());
  }

 private:
  const Reg64 reg_args = rdi;
  const Reg64 reg_x_row = rsi;
  const Reg64 reg_dy_row = rdx;
  const Reg64 reg_x = rcx;
  const Reg64 reg_dy = r8;
  const Reg64 reg_cnt_row = r9;
  const Reg64 reg_cnt_px = r10;
  const Reg64 reg_dy_kbs = r11;  // gradient bytes per output-channel block
  const Reg64 reg_dw = rax;
  const Reg64 reg_kbs3 = rbx;    // 3x a block stride (callee-saved)
  const Reg64 reg_x_img = r12;   // (callee-saved)
  const Reg64 reg_dy_img = r13;  // (callee-saved)
  const Reg64 reg_cnt_img = r14; // (callee-saved)

  int vbytes() const { return sp_.v() * sp_.es(); }
  Xmm vreg(int idx) const {
    if (sp_.isa == Isa::avx512) return Zmm(idx);
    return Ymm(idx);
  }
  Xmm vmm_acc(int c, int kb) const { return vreg(c * sp_.n_kb + kb); }
  Xmm vmm_dy(int kb) const { return vreg(sp_.n_c * sp_.n_kb + kb); }
  Xmm vmm_bcast() const { return vreg(sp_.n_c * sp_.n_kb + sp_.n_kb); }
  Address arg(size_t offset) const { return qword[reg_args + static_cast<int64_t>(offset)]; }
  // [base + kb * stride + disp], the stride in `stride` and 3x it in reg_kbs3.
  Address block(const Reg64& base, const Reg64& stride, int kb, int64_t disp) const {
    switch (kb) {
      case 0: return ptr[base + disp];
      case 1: return ptr[base + stride + disp];
      case 2: return ptr[base + stride * 2 + disp];
      default: return ptr[base + reg_kbs3 + disp];
    }
  }

  void generate() override {
    push(rbx);
    push(r12);
    push(r13);
    push(r14);
    init_accumulators();
    loop_pixels();
    store();
    pop(r14);
    pop(r13);
    pop(r12);
    pop(rbx);
    vzeroupper();
    ret();
  }

  // dW's block stride lives in reg_cnt_row until the loops need it.
  void load_dw_strides() {
    mov(reg_dw, arg(offsetof(UpdCallArgs, dw)));
    mov(reg_cnt_row, arg(offsetof(UpdCallArgs, dw_kb_stride)));
    lea(reg_kbs3, ptr[reg_cnt_row + reg_cnt_row * 2]);
  }
  void zero(const Xmm& x) {
    if (sp_.isa == Isa::avx512) vpxord(x, x, x);
    else vxorps(x, x, x);
  }

  void init_accumulators() {
    Label l_zero, l_done;
    load_dw_strides();
    test(arg(offsetof(UpdCallArgs, flags)), kAccumulate);
    jz(l_zero, T_NEAR);
    for (int c = 0; c < sp_.n_c; ++c)
      for (int kb = 0; kb < sp_.n_kb; ++kb) vmovups(vmm_acc(c, kb), block(reg_dw, reg_cnt_row, kb, c * vbytes()));
    jmp(l_done, T_NEAR);
    L(l_zero);
    for (int c = 0; c < sp_.n_c; ++c)
      for (int kb = 0; kb < sp_.n_kb; ++kb) zero(vmm_acc(c, kb));
    L(l_done);
  }

  // Images, rows, pixels; nothing when the rectangle is empty.
  void loop_pixels() {
    Label l_img, l_row, l_px, l_end;
    mov(reg_dy_kbs, arg(offsetof(UpdCallArgs, dy_kb_stride)));
    lea(reg_kbs3, ptr[reg_dy_kbs + reg_dy_kbs * 2]);
    cmp(arg(offsetof(UpdCallArgs, n_rows)), 0);
    je(l_end, T_NEAR);
    mov(reg_x_img, arg(offsetof(UpdCallArgs, x)));
    mov(reg_dy_img, arg(offsetof(UpdCallArgs, dy)));
    mov(reg_cnt_img, arg(offsetof(UpdCallArgs, n_imgs)));
    L(l_img);
    mov(reg_x_row, reg_x_img);
    mov(reg_dy_row, reg_dy_img);
    mov(reg_cnt_row, arg(offsetof(UpdCallArgs, n_rows)));
    L(l_row);
    mov(reg_x, reg_x_row);
    mov(reg_dy, reg_dy_row);
    mov(reg_cnt_px, arg(offsetof(UpdCallArgs, n_px)));
    L(l_px);
    for (int kb = 0; kb < sp_.n_kb; ++kb) vmovups(vmm_dy(kb), block(reg_dy, reg_dy_kbs, kb, 0));
    for (int c = 0; c < sp_.n_c; ++c) {
      vbroadcastss(vmm_bcast(), ptr[reg_x + c * sp_.es()]);
      for (int kb = 0; kb < sp_.n_kb; ++kb) vfmadd231ps(vmm_acc(c, kb), vmm_dy(kb), vmm_bcast());
    }
    add(reg_x, arg(offsetof(UpdCallArgs, x_px_stride)));
    add(reg_dy, vbytes());
    dec(reg_cnt_px);
    jnz(l_px, T_NEAR);
    add(reg_x_row, arg(offsetof(UpdCallArgs, x_row_stride)));
    add(reg_dy_row, arg(offsetof(UpdCallArgs, dy_row_stride)));
    dec(reg_cnt_row);
    jnz(l_row, T_NEAR);
    add(reg_x_img, arg(offsetof(UpdCallArgs, x_img_stride)));
    add(reg_dy_img, arg(offsetof(UpdCallArgs, dy_img_stride)));
    dec(reg_cnt_img);
    jnz(l_img, T_NEAR);
    L(l_end);
  }

  void store() {
    load_dw_strides();
    for (int c = 0; c < sp_.n_c; ++c)
      for (int kb = 0; kb < sp_.n_kb; ++kb) vmovups(block(reg_dw, reg_cnt_row, kb, c * vbytes()), vmm_acc(c, kb));
  }

  UpdKernelSpec sp_;
};

}  // namespace

std::unique_ptr<JitGenerator> make_upd_kernel(const UpdKernelSpec& spec) { return std::make_unique<UpdKernel>(spec); }

}  // namespace dc
