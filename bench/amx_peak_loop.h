// The bench helpers' AMX peak: tmm0-3 accumulate the products of tmm4-5 (A) and tmm6-7 (B),
// as the convolutions' 2 x 2 tiles do, all 16 rows of 64 bytes; rdi iterations of 4
// products, no loads (bench_bf16_fwd_amx.cpp, bench_bf16_upd_amx.cpp); and the level a
// helper's command names, checked against what this CPU and process can run.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "jit/isa.h"
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

// The kernel family a command names ("" for amx), or an error when this CPU or process cannot
// run it.
inline dc::Isa parse_level(const std::string& name) {
  const dc::Isa level = name.empty() ? dc::Isa::amx : dc::parse_isa(name);
  if (level == dc::Isa::amx && !dc::tiles_usable())
    throw std::runtime_error("no AMX tiles here (or the OS refused them)");
  if (level > dc::detected_isa()) throw std::runtime_error(name + " is above this CPU's level");
  return level;
}

// A peak loop's rate in GFLOP/s: the median over chunks of kPeakChunk iterations (run(n) runs
// n, each of flops_per_iter), for `seconds` of wall() time, each chunk timed by sample(); one
// chunk first as a warm-up. The median of short chunks, as the convolutions' samples are
// medians of calls: a chunk that the machine's other work preempts does not count.
constexpr int64_t kPeakChunk = 1000;
template <typename Run, typename Wall, typename Sample>
double median_peak_gflops(const Run& run, double flops_per_iter, double seconds, const Wall& wall,
                          const Sample& sample) {
  run(kPeakChunk);
  std::vector<double> rates;
  const double t0 = wall();
  do {
    const double a = sample();
    run(kPeakChunk);
    rates.push_back(kPeakChunk * flops_per_iter / (sample() - a) / 1e9);
  } while (wall() - t0 < seconds);
  std::nth_element(rates.begin(), rates.begin() + rates.size() / 2, rates.end());
  return rates[rates.size() / 2];
}

// PeakLoop's products per iteration: 4 tdpbf16ps of 16 x 16 x 32 pairs.
constexpr double kPeakLoopFlopsPerIter = 4 * 16384.0;

}  // namespace dc_bench
