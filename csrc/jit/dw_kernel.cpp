#include "jit/dw_kernel.h"

#include <cstddef>
#include <sstream>
#include <stdexcept>

#include "jit/fwd_kernel.h"

namespace dc {

std::string DwKernelSpec::name() const {
  return std::string(dtype_name(dt)) + "_dwconv_fwd_" + taps_name() + "_ow" + std::to_string(ow) + border_name() + "__" + isa_name(isa);
}

int dw_max_ow(Isa isa) { return isa_vector_registers(isa) - 2; }

namespace {

using namespace Xbyak;

class DwKernel : public JitGenerator {
 public:
  explicit DwKernel(const DwKernelSpec& sp) : JitGenerator(sp.name(), 4096 + sp.s * sp.ow * 16 + sp.ow * 32), sp_(sp) {
    check_fp32_isa(sp.isa, "dw kernel");
    if (sp.ow < 1 || sp.ow > dw_max_ow(sp.isa) || sp.s < 1 || sp.stride_w < 1 || sp.dil_w < 1)
      throw std::invalid_argument("dw kernel: unsupported tile " + sp.name());
  }

 private:
  const Reg64 reg_args = rdi;
  const Reg64 reg_src = rsi;
  const Reg64 reg_wei = rdx;
  const Reg64 reg_cnt_r = rcx;
  const Reg64 reg_ptr = r8;  // bias or output, outside the loop

  int vbytes() const { return sp_.v() * sp_.es(); }
  Xmm vreg(int idx) const {
    if (sp_.isa == Isa::avx512) return Zmm(idx);
    return Ymm(idx);
  }
  Xmm vmm_acc(int px) const { return vreg(px); }
  Xmm vmm_wei() const { return vreg(sp_.ow); }
  Address arg(size_t offset) const { return qword[reg_args + static_cast<int64_t>(offset)]; }

  void generate() override {
    init_accumulators();
    loop_r([&] { compute_kernel_row(); });
    apply_relu();
    store();
    vzeroupper();
    ret();
  }

  void zero(const Xmm& x) {
    if (sp_.isa == Isa::avx512) vpxord(x, x, x);
    else vxorps(x, x, x);
  }

  void init_accumulators() {
    Label l_zero, l_done;
    mov(reg_ptr, arg(offsetof(DwCallArgs, bias)));
    test(reg_ptr, reg_ptr);
    jz(l_zero, T_NEAR);
    for (int px = 0; px < sp_.ow; ++px) vmovups(vmm_acc(px), ptr[reg_ptr]);
    jmp(l_done, T_NEAR);
    L(l_zero);
    for (int px = 0; px < sp_.ow; ++px) zero(vmm_acc(px));
    L(l_done);
  }

  template <typename F>
  void loop_r(F body) {
    Label l_r, l_end;
    mov(reg_src, arg(offsetof(DwCallArgs, src)));
    mov(reg_wei, arg(offsetof(DwCallArgs, wei)));
    mov(reg_cnt_r, arg(offsetof(DwCallArgs, n_r)));
    test(reg_cnt_r, reg_cnt_r);
    jz(l_end, T_NEAR);
    L(l_r);
    body();
    add(reg_src, arg(offsetof(DwCallArgs, src_r_stride)));
    add(reg_wei, sp_.s * vbytes());
    dec(reg_cnt_r);
    jnz(l_r, T_NEAR);
    L(l_end);
  }

  void compute_kernel_row() {
    for (int col = 0; col < sp_.s; ++col) {
      bool any = false;
      for (int px = 0; px < sp_.ow; ++px) any = any || sp_.tap_valid(px, col);
      if (!any) continue;
      vmovups(vmm_wei(), ptr[reg_wei + col * vbytes()]);
      for (int px = 0; px < sp_.ow; ++px) {
        if (!sp_.tap_valid(px, col)) continue;
        int64_t disp = static_cast<int64_t>(px * sp_.stride_w + col * sp_.dil_w) * vbytes();
        vfmadd231ps(vmm_acc(px), vmm_wei(), ptr[reg_src + disp]);
      }
    }
  }

  void apply_relu() {
    Label l_skip;
    test(arg(offsetof(DwCallArgs, flags)), kRelu);
    jz(l_skip, T_NEAR);
    zero(vmm_wei());  // x second, so NaN propagates (see FwdKernel::apply_relu)
    for (int px = 0; px < sp_.ow; ++px) vmaxps(vmm_acc(px), vmm_wei(), vmm_acc(px));
    L(l_skip);
  }

  void store() {
    mov(reg_ptr, arg(offsetof(DwCallArgs, dst)));
    for (int px = 0; px < sp_.ow; ++px) vmovups(ptr[reg_ptr + px * vbytes()], vmm_acc(px));
  }

  DwKernelSpec sp_;
};

}  // namespace

std::unique_ptr<JitGenerator> make_dw_kernel(const DwKernelSpec& spec) { return std::make_unique<DwKernel>(spec); }

}  // namespace dc
