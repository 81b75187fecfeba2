#include "jit/peak_kernel.h"

#include <string>

namespace dc {

namespace {

// Enough independent chains to cover FMA latency times the number of FMA pipes.
int chains(Isa isa) { return isa == Isa::avx512 ? 16 : 12; }

class PeakKernel : public JitGenerator {
 public:
  explicit PeakKernel(Isa isa)
      : JitGenerator(std::string("f32_fma_peak_") + std::to_string(chains(isa)) + "x4__" + isa_name(isa), 4096),
        isa_(isa) {}

 private:
  Xbyak::Xmm vreg(int i) const {
    if (isa_ == Isa::avx512) return Xbyak::Zmm(i);
    return Xbyak::Ymm(i);
  }
  void generate() override {
    const Xbyak::Reg64 reg_iters = rdi;
    const int n = chains(isa_);
    for (int i = 0; i < n + 2; ++i) vxorps(Xbyak::Ymm(i), Xbyak::Ymm(i), Xbyak::Ymm(i));
    Xbyak::Label l_loop, l_end;
    test(reg_iters, reg_iters);
    jz(l_end, T_NEAR);
    L(l_loop);
    for (int u = 0; u < 4; ++u)
      for (int i = 0; i < n; ++i) vfmadd231ps(vreg(i), vreg(n), vreg(n + 1));
    dec(reg_iters);
    jnz(l_loop, T_NEAR);
    L(l_end);
    vzeroupper();
    ret();
  }
  Isa isa_;
};

}  // namespace

std::unique_ptr<JitGenerator> make_peak_kernel(Isa isa) { return std::make_unique<PeakKernel>(isa); }
int64_t fma_peak_flops_per_iter(Isa isa) { return 4LL * chains(isa) * vlen(isa) * 2; }

}  // namespace dc
