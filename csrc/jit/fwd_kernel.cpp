#include "jit/fwd_kernel.h"

#include <cstddef>
#include <sstream>
#include <stdexcept>

namespace dc {

std::string FwdPostOps::name() const {
  if (!any()) return "";
  return std::string("_post") + (bias ? "_bias" : "") + (add ? "_add" : "") + (relu ? "_relu" : "") +
         (stats ? "_stats" : "");
}

std::string FwdKernelSpec::name() const {
  std::ostringstream o;
  o << dtype_name(dt) << "_conv_fwd_" << taps_name() << "_oh" << oh << "ow" << ow << "oc" << n_oc << "_c" << c_valid
     << border_name() << (prefetch ? "_pf" : "");
  if (dst_px != 1) o << "_dpx" << dst_px;
  if (wei_c_stride) o << "_wc" << wei_c_stride;
  if (dst_px_bytes) o << "_dpb" << dst_px_bytes;
  if (last_oc_lanes) o << "_m" << last_oc_lanes;
  o << post.name() << "__" << isa_name(isa);
  return o.str();
}

int isa_vector_registers(Isa isa) { return isa == Isa::avx512 ? 32 : 16; }

namespace {
// Embedded broadcast (one memory operand per FMA) needs no broadcast register, and is
// used only for single-block tiles on AVX-512 where nothing could share a broadcast.
bool uses_embedded_broadcast(const FwdKernelSpec& sp) { return sp.isa == Isa::avx512 && sp.n_oc == 1; }
int broadcast_registers(const FwdKernelSpec& sp) {
  if (uses_embedded_broadcast(sp)) return 0;
  int spare = isa_vector_registers(sp.isa) - sp.oh * sp.ow * sp.n_oc - sp.n_oc;
  return spare >= 2 ? 2 : 1;
}
}  // namespace

int fwd_vector_registers(const FwdKernelSpec& sp) {
  return sp.oh * sp.ow * sp.n_oc + sp.n_oc + (uses_embedded_broadcast(sp) ? 0 : 1);
}

namespace {

using namespace Xbyak;

class FwdKernel : public JitGenerator {
 public:
  explicit FwdKernel(const FwdKernelSpec& sp) : JitGenerator(sp.name(), code_size_estimate(sp)), sp_(sp) {
    check_fp32_isa(sp.isa, "fwd kernel");
    if (sp.oh < 1 || sp.oh > 2 || sp.n_oc < 1 || sp.n_oc > 4 || sp.ow < 1 || sp.c_valid < 1 || sp.c_valid > sp.v() ||
        sp.s < 1 || sp.stride_w < 1 || sp.dil_w < 1 || sp.dst_px < 1 || sp.wei_c_stride < 0 || sp.dst_px_bytes < 0 ||
        sp.last_oc_lanes < 0 || sp.last_oc_lanes >= sp.v() || (sp.last_oc_lanes && sp.isa != Isa::avx512) ||
        // Whole-vector bias, residual and shift reads would pass the end of a partial last block.
        (sp.last_oc_lanes && (sp.post.bias || sp.post.add || sp.post.stats)))
      throw std::invalid_argument("fwd kernel: unsupported tile " + sp.name());
    if (fwd_vector_registers(sp) > isa_vector_registers(sp.isa))
      throw std::invalid_argument("fwd kernel: tile needs too many vector registers: " + sp.name());
  }

 private:
  static size_t code_size_estimate(const FwdKernelSpec& sp) {
    size_t per_step = sp.n_oc * 12 + sp.oh * sp.ow * (12 + sp.n_oc * 8) + (sp.prefetch ? 16 : 0);
    size_t epilogue = sp.oh * sp.ow * sp.n_oc * (48 + 6 * 16) + sp.oh * sp.n_oc * 2 * 64 + sp.n_oc * 64;
    return 4096 + static_cast<size_t>(sp.s) * sp.c_valid * per_step + epilogue;
  }

  // Registers, named by role. rdi carries the argument struct (System V ABI).
  const Reg64 reg_args = rdi;
  const Reg64 reg_src = rsi;       // current kernel row of the current channel block
  const Reg64 reg_wei = rdx;
  const Reg64 reg_src_cb = rcx;    // current channel block
  const Reg64 reg_wei_cb = r8;
  const Reg64 reg_cnt_cb = r9;
  const Reg64 reg_cnt_r = r10;
  const Reg64 reg_wei_kbs = r11;   // weight bytes per output-channel block
  const Reg64 reg_wei_kbs3 = rax;  // 3x that, for the fourth block
  const Reg64 reg_src_rows = rbx;  // input bytes from one tile row to the next (callee-saved)
  const Reg64 reg_out = r12;       // one (row, block) of the output tile (callee-saved)
  const Reg64 reg_pf_delta = r13;  // next call's src minus this call's (callee-saved)

  int V() const { return sp_.v(); }
  int vbytes() const { return V() * sp_.es(); }
  Xmm vreg(int idx) const {
    if (sp_.isa == Isa::avx512) return Zmm(idx);
    return Ymm(idx);
  }
  int n_acc() const { return sp_.oh * sp_.ow * sp_.n_oc; }
  Xmm vmm_acc(int row, int px, int oc) const { return vreg((row * sp_.ow + px) * sp_.n_oc + oc); }
  Xmm vmm_wei(int oc) const { return vreg(n_acc() + oc); }
  Xmm vmm_bcast(int i) const { return vreg(n_acc() + sp_.n_oc + i % broadcast_registers(sp_)); }

  Address wei_addr(int oc, int64_t disp) const {
    switch (oc) {
      case 0: return ptr[reg_wei + disp];
      case 1: return ptr[reg_wei + reg_wei_kbs + disp];
      case 2: return ptr[reg_wei + reg_wei_kbs * 2 + disp];
      default: return ptr[reg_wei + reg_wei_kbs3 + disp];
    }
  }
  RegExp src_row(int row) const { return row == 0 ? RegExp(reg_src) : reg_src + reg_src_rows; }
  Address arg(size_t offset) const { return qword[reg_args + static_cast<int64_t>(offset)]; }

  void generate() override {
    preamble();
    load_args();
    init_accumulators();
    loop_cb([&] { loop_r([&] { compute_kernel_row(); }); });
    add_bias();
    add_residual();
    apply_relu();
    store_tile();
    tile_stats();
    postamble();
  }

  void preamble() {
    push(rbx);
    push(r12);
    push(r13);
    if (sp_.last_oc_lanes) {
      mov(reg_out.cvt32(), (1u << sp_.last_oc_lanes) - 1);
      kmovw(k1, reg_out.cvt32());
    }
  }
  bool masked(int oc) const { return sp_.last_oc_lanes && oc == sp_.n_oc - 1; }
  void postamble() {
    pop(r13);
    pop(r12);
    pop(rbx);
    vzeroupper();
    ret();
  }

  void load_args() {
    mov(reg_wei_kbs, arg(offsetof(FwdCallArgs, wei_kb_stride)));
    lea(reg_wei_kbs3, ptr[reg_wei_kbs + reg_wei_kbs * 2]);
    mov(reg_src_rows, arg(offsetof(FwdCallArgs, src_row_stride)));
    if (sp_.prefetch) {
      mov(reg_pf_delta, arg(offsetof(FwdCallArgs, pf_src)));
      sub(reg_pf_delta, arg(offsetof(FwdCallArgs, src)));
    }
  }

  // Cache lines of one input row of the tile.
  int row_lines() const {
    int pixels = (sp_.ow - 1) * sp_.stride_w + (sp_.s - 1) * sp_.dil_w + 1;
    return (pixels * vbytes() + 63) / 64;
  }
  // Spreads the prefetches of the next tile's current kernel row (its first tile row)
  // over this row's steps.
  void prefetch_step(int step, int steps) {
    if (!sp_.prefetch) return;
    const int lines = row_lines();
    for (int l = step * lines / steps; l < (step + 1) * lines / steps; ++l)
      prefetcht0(ptr[reg_src + reg_pf_delta + l * 64]);
  }
  bool column_used(int col) const {
    for (int px = 0; px < sp_.ow; ++px)
      if (sp_.tap_valid(px, col)) return true;
    return false;
  }

  template <typename F>
  void for_each_acc(F f) {
    for (int row = 0; row < sp_.oh; ++row)
      for (int px = 0; px < sp_.ow; ++px)
        for (int oc = 0; oc < sp_.n_oc; ++oc) f(row, px, oc);
  }
  // Visits every output vector of the tile with its address in the tensor at `base` (dst,
  // or the residual, laid out alike). Outside the loops, so the loop registers serve as
  // the output-block stride and three times it.
  template <typename F>
  void for_each_out_block(F f, size_t base = offsetof(FwdCallArgs, dst)) {
    const Reg64& kbs = reg_cnt_r;
    const Reg64& kbs3 = reg_src;
    mov(reg_out, arg(base));
    mov(kbs, arg(offsetof(FwdCallArgs, dst_kb_stride)));
    lea(kbs3, ptr[kbs + kbs * 2]);
    for (int row = 0; row < sp_.oh; ++row) {
      if (row > 0) add(reg_out, arg(offsetof(FwdCallArgs, dst_row_stride)));
      for (int oc = 0; oc < sp_.n_oc; ++oc)
        for (int px = 0; px < sp_.ow; ++px) {
          const int64_t disp = px * sp_.dst_px_step();
          const bool m = masked(oc);
          switch (oc) {
            case 0: f(vmm_acc(row, px, oc), ptr[reg_out + disp], m); break;
            case 1: f(vmm_acc(row, px, oc), ptr[reg_out + kbs + disp], m); break;
            case 2: f(vmm_acc(row, px, oc), ptr[reg_out + kbs * 2 + disp], m); break;
            default: f(vmm_acc(row, px, oc), ptr[reg_out + kbs3 + disp], m); break;
          }
        }
    }
  }

  void zero(const Xmm& x) {
    if (sp_.isa == Isa::avx512) vpxord(x, x, x);
    else vxorps(x, x, x);
  }

  // Accumulators start from dst (kAccumulate) or from zero.
  void init_accumulators() {
    Label l_zero, l_done;
    test(arg(offsetof(FwdCallArgs, flags)), kAccumulate);
    jz(l_zero, T_NEAR);
    for_each_out_block([&](const Xmm& acc, const Address& a, bool m) {
      if (m) vmovups(Zmm(acc.getIdx()) | k1 | T_z, a);
      else vmovups(acc, a);
    });
    jmp(l_done, T_NEAR);
    L(l_zero);
    for_each_acc([&](int row, int px, int oc) { zero(vmm_acc(row, px, oc)); });
    L(l_done);
  }

  template <typename F>
  void loop_cb(F body) {
    Label l_cb;
    mov(reg_src_cb, arg(offsetof(FwdCallArgs, src)));
    mov(reg_wei_cb, arg(offsetof(FwdCallArgs, wei)));
    mov(reg_cnt_cb, arg(offsetof(FwdCallArgs, n_cb)));
    L(l_cb);
    body();
    add(reg_src_cb, arg(offsetof(FwdCallArgs, src_cb_stride)));
    add(reg_wei_cb, arg(offsetof(FwdCallArgs, wei_cb_stride)));
    dec(reg_cnt_cb);
    jnz(l_cb, T_NEAR);
  }

  template <typename F>
  void loop_r(F body) {
    Label l_r, l_end;
    mov(reg_src, reg_src_cb);
    mov(reg_wei, reg_wei_cb);
    mov(reg_cnt_r, arg(offsetof(FwdCallArgs, n_r)));
    test(reg_cnt_r, reg_cnt_r);
    jz(l_end, T_NEAR);
    L(l_r);
    body();
    add(reg_src, arg(offsetof(FwdCallArgs, src_r_stride)));
    add(reg_wei, static_cast<uint32_t>(sp_.s * V() * vbytes()));
    dec(reg_cnt_r);
    jnz(l_r, T_NEAR);
    L(l_end);
  }

  // One kernel row: every column and every channel of the block, unrolled.
  void compute_kernel_row() {
    int nb = 0, step = 0, steps = 0;
    for (int col = 0; col < sp_.s; ++col) steps += column_used(col) ? sp_.c_valid : 0;
    for (int col = 0; col < sp_.s; ++col) {
      if (!column_used(col)) continue;
      for (int c = 0; c < sp_.c_valid; ++c) {
        prefetch_step(step++, steps);
        int64_t wdisp = static_cast<int64_t>(col) * V() * vbytes() + c * sp_.wei_c_bytes();
        for (int oc = 0; oc < sp_.n_oc; ++oc) {
          if (masked(oc)) vmovups(Zmm(vmm_wei(oc).getIdx()) | k1 | T_z, wei_addr(oc, wdisp));
          else vmovups(vmm_wei(oc), wei_addr(oc, wdisp));
        }
        for (int row = 0; row < sp_.oh; ++row)
          for (int px = 0; px < sp_.ow; ++px) {
            if (!sp_.tap_valid(px, col)) continue;
            int64_t sdisp = (static_cast<int64_t>(px * sp_.stride_w + col * sp_.dil_w) * V() + c) * sp_.es();
            if (uses_embedded_broadcast(sp_)) {
              vfmadd231ps(vmm_acc(row, px, 0), vmm_wei(0), ptr_b[src_row(row) + sdisp]);
              continue;
            }
            Xmm b = vmm_bcast(nb++);
            vbroadcastss(b, ptr[src_row(row) + sdisp]);
            for (int oc = 0; oc < sp_.n_oc; ++oc) vfmadd231ps(vmm_acc(row, px, oc), vmm_wei(oc), b);
          }
      }
    }
  }

  // The post-ops (FwdPostOps), in their order; the bias and residual never come with a
  // masked block (the constructor refuses them).
  void add_bias() {
    if (!sp_.post.bias) return;
    mov(reg_out, arg(offsetof(FwdCallArgs, bias)));
    for_each_acc([&](int row, int px, int oc) {
      vaddps(vmm_acc(row, px, oc), vmm_acc(row, px, oc), ptr[reg_out + oc * vbytes()]);
    });
  }
  void add_residual() {
    if (!sp_.post.add) return;
    for_each_out_block([&](const Xmm& acc, const Address& a, bool) { vaddps(acc, acc, a); },
                       offsetof(FwdCallArgs, residual));
  }
  void apply_relu() {
    if (!sp_.post.relu) return;
    // max(0, x) with x second: maxps returns its second operand when either is NaN, so
    // NaN propagates as torch.relu does.
    Xmm z = vmm_wei(0);
    zero(z);
    for_each_acc([&](int row, int px, int oc) { vmaxps(vmm_acc(row, px, oc), z, vmm_acc(row, px, oc)); });
  }

  // After the store the accumulators are free: each output block's are shifted in place,
  // the first one collects the sum and the weight register the sum of squares.
  void tile_stats() {
    if (!sp_.post.stats) return;
    for (int oc = 0; oc < sp_.n_oc; ++oc) {
      const Xmm shift = vmm_wei(0), sum = vmm_acc(0, 0, oc), squares = vmm_wei(0);
      mov(reg_out, arg(offsetof(FwdCallArgs, stats_shift)));
      vmovups(shift, ptr[reg_out + oc * vbytes()]);
      for (int row = 0; row < sp_.oh; ++row)
        for (int px = 0; px < sp_.ow; ++px) vsubps(vmm_acc(row, px, oc), vmm_acc(row, px, oc), shift);
      vmulps(squares, sum, sum);
      for (int row = 0; row < sp_.oh; ++row)
        for (int px = 0; px < sp_.ow; ++px) {
          if (row == 0 && px == 0) continue;
          vfmadd231ps(squares, vmm_acc(row, px, oc), vmm_acc(row, px, oc));
          vaddps(sum, sum, vmm_acc(row, px, oc));
        }
      mov(reg_out, arg(offsetof(FwdCallArgs, stats)));
      vmovups(ptr[reg_out + 2 * oc * vbytes()], sum);
      vmovups(ptr[reg_out + (2 * oc + 1) * vbytes()], squares);
    }
  }

  void store_tile() {
    for_each_out_block([&](const Xmm& acc, const Address& a, bool m) {
      if (m) vmovups(a | k1, Zmm(acc.getIdx()));
      else vmovups(a, acc);
    });
  }

  FwdKernelSpec sp_;
};

}  // namespace

std::unique_ptr<JitGenerator> make_fwd_kernel(const FwdKernelSpec& spec) { return std::make_unique<FwdKernel>(spec); }

}  // namespace dc
