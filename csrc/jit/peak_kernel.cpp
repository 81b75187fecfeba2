#include "jit/peak_kernel.h"

#include <cstring>
#include <string>

namespace dc {

namespace {

// Enough independent chains to cover FMA latency times the number of FMA pipes.
int chains(Isa isa) { return isa == Isa::avx512 ? 16 : 12; }

class PeakKernel : public JitGenerator {
 public:
  explicit PeakKernel(Isa isa)
      : JitGenerator(std::string("f32_fma_peak_") + std::to_string(chains(isa)) + "x4__" + isa_name(isa), 4096),
        isa_(isa) {
    check_fp32_isa(isa, "fma peak kernel");
  }

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

class Bf16DotPeakKernel : public JitGenerator {
 public:
  Bf16DotPeakKernel()
      : JitGenerator("bf16_dot_peak_" + std::to_string(kDotPeakChains) + "x" + std::to_string(kDotPeakUnroll) +
                         "__avx512_bf16",
                     4096) {}

 private:
  const Xbyak::Reg64 reg_iters = rdi;
  const Xbyak::Reg64 reg_in = rsi;
  const Xbyak::Reg64 reg_out = rdx;
  static Xbyak::Zmm zmm_acc(int i) { return Xbyak::Zmm(i); }
  const Xbyak::Zmm zmm_a = Xbyak::Zmm(kDotPeakChains);
  const Xbyak::Zmm zmm_b = Xbyak::Zmm(kDotPeakChains + 1);

  void generate() override {
    vmovups(zmm_a, ptr[reg_in]);
    vmovups(zmm_b, ptr[reg_in + 64]);
    for (int i = 0; i < kDotPeakChains; ++i) vpxord(zmm_acc(i), zmm_acc(i), zmm_acc(i));
    Xbyak::Label l_loop, l_end;
    test(reg_iters, reg_iters);
    jz(l_end, T_NEAR);
    L(l_loop);
    for (int u = 0; u < kDotPeakUnroll; ++u)
      for (int i = 0; i < kDotPeakChains; ++i) vdpbf16ps(zmm_acc(i), zmm_a, zmm_b);
    dec(reg_iters);
    jnz(l_loop, T_NEAR);
    L(l_end);
    for (int i = 0; i < kDotPeakChains; ++i) vmovups(ptr[reg_out + 64 * i], zmm_acc(i));
    vzeroupper();
    ret();
  }
};

// Tiles 0-3 accumulate (Cij), 4-5 hold A0 and A1, 6-7 B0 and B1; all 16 rows of 64 bytes.
class Bf16TilePeakKernel : public JitGenerator {
 public:
  explicit Bf16TilePeakKernel(bool from_l1)
      : JitGenerator(std::string("bf16_tile_peak_2x2_") + (from_l1 ? "l1" : "regs") + "__amx", 4096),
        from_l1_(from_l1) {}

 private:
  const Xbyak::Reg64 reg_iters = rdi;
  const Xbyak::Reg64 reg_in = rsi;
  const Xbyak::Reg64 reg_out = rdx;
  const Xbyak::Reg64 reg_stride = rcx;  // bytes per tile row
  static constexpr int kTileBytes = 16 * 64;
  static Xbyak::Tmm tmm_acc(int i, int j) { return Xbyak::Tmm(2 * i + j); }
  static Xbyak::Tmm tmm_a(int i) { return Xbyak::Tmm(4 + i); }
  static Xbyak::Tmm tmm_b(int j) { return Xbyak::Tmm(6 + j); }
  bool from_l1_;

  void load_inputs() {
    for (int i = 0; i < 2; ++i) tileloadd(tmm_a(i), ptr[reg_in + reg_stride + i * kTileBytes]);
    for (int j = 0; j < 2; ++j) tileloadd(tmm_b(j), ptr[reg_in + reg_stride + (2 + j) * kTileBytes]);
  }

  void generate() override {
    Xbyak::Label l_cfg, l_loop, l_end;
    ldtilecfg(ptr[rip + l_cfg]);
    mov(reg_stride, 64);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) tilezero(tmm_acc(i, j));
    if (!from_l1_) load_inputs();
    test(reg_iters, reg_iters);
    jz(l_end, T_NEAR);
    L(l_loop);
    if (from_l1_) load_inputs();
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) tdpbf16ps(tmm_acc(i, j), tmm_a(i), tmm_b(j));
    dec(reg_iters);
    jnz(l_loop, T_NEAR);
    L(l_end);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) tilestored(ptr[reg_out + reg_stride + (2 * i + j) * kTileBytes], tmm_acc(i, j));
    tilerelease();
    ret();
    tile_config(l_cfg);
  }
  // Palette 1, eight tiles of 16 rows x 64 bytes, the others unused.
  void tile_config(Xbyak::Label& l_cfg) {
    align(64);
    L(l_cfg);
    uint8_t cfg[64] = {};
    cfg[0] = 1;
    for (int t = 0; t < 8; ++t) {
      cfg[16 + 2 * t] = 64;  // colsb, little-endian uint16
      cfg[48 + t] = 16;      // rows
    }
    for (uint8_t byte : cfg) db(byte);
  }
};

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace

std::unique_ptr<JitGenerator> make_peak_kernel(Isa isa) { return std::make_unique<PeakKernel>(isa); }
int64_t fma_peak_flops_per_iter(Isa isa) { return 4LL * chains(isa) * vlen(isa) * 2; }

std::unique_ptr<JitGenerator> make_bf16_dot_peak_kernel() { return std::make_unique<Bf16DotPeakKernel>(); }
// Each vdpbf16ps: 16 lanes x 2 products x (multiply + add).
int64_t bf16_dot_peak_flops_per_iter() { return int64_t{kDotPeakUnroll} * kDotPeakChains * 16 * 2 * 2; }

void bf16_dot_peak_reference(int64_t iterations, const uint16_t* in, float* out) {
  for (int i = 0; i < kDotPeakChains; ++i)
    for (int l = 0; l < 16; ++l) {
      float acc = 0.f;
      for (int64_t it = 0; it < iterations * kDotPeakUnroll; ++it)
        for (int j = 0; j < 2; ++j) acc += bf16_to_float(in[2 * l + j]) * bf16_to_float(in[32 + 2 * l + j]);
      out[16 * i + l] = acc;
    }
}

std::unique_ptr<JitGenerator> make_bf16_tile_peak_kernel(bool from_l1) {
  return std::make_unique<Bf16TilePeakKernel>(from_l1);
}
// Each tdpbf16ps: 16 x 16 outputs x 32 products x (multiply + add).
int64_t bf16_tile_peak_flops_per_iter() { return 4LL * 16 * 16 * 32 * 2; }

void bf16_tile_peak_reference(int64_t iterations, const uint16_t* in, float* out) {
  const uint16_t* a[2] = {in, in + 16 * 32};
  const uint16_t* b[2] = {in + 2 * 16 * 32, in + 3 * 16 * 32};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 16; ++n) {
          float acc = 0.f;
          for (int64_t it = 0; it < iterations; ++it)
            for (int k = 0; k < 32; ++k)  // B row k/2 holds the pairs (k even, k odd) of each column
              acc += bf16_to_float(a[i][m * 32 + k]) * bf16_to_float(b[j][(k / 2) * 32 + 2 * n + k % 2]);
          out[(2 * i + j) * 256 + m * 16 + n] = acc;
        }
}

}  // namespace dc
