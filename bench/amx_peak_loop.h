// The bench helpers' AMX peak: tmm0-3 accumulate the products of tmm4-5 (A) and tmm6-7 (B),
// as the convolutions' 2 x 2 tiles do, all 16 rows of 64 bytes; rdi iterations of 4
// products, no loads (bench_bf16_fwd_amx.cpp, bench_bf16_upd_amx.cpp).
#pragma once

#include "jit/jit_kernel.h"

namespace dc_bench {

class PeakLoop : public dc::JitGenerator {
 public:
  PeakLoop() : dc::JitGenerator("bench_amx_bf16_peak_4chains", 4096) {}

 private:
  void generate() override {
    using namespace Xbyak;
    Label l;
    sub(rsp, 64);
    for (int i = 0; i < 8; ++i) mov(qword[rsp + i * 8], 0);
    mov(byte[rsp], 1);
    for (int t = 0; t < 8; ++t) {
      mov(word[rsp + 16 + 2 * t], 64);
      mov(byte[rsp + 48 + t], 16);
    }
    ldtilecfg(ptr[rsp]);
    add(rsp, 64);
    for (int t = 0; t < 8; ++t) tilezero(Tmm(t));
    L(l);
    for (int t = 0; t < 4; ++t) tdpbf16ps(Tmm(t), Tmm(4 + t % 2), Tmm(6 + t / 2));
    dec(rdi);
    jnz(l);
    tilerelease();
    ret();
  }
};

}  // namespace dc_bench
