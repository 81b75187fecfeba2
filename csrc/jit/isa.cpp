#include "jit/isa.h"

#include <xbyak/xbyak_util.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace dc {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "none";
  }
}

Isa parse_isa(const std::string& name) {
  if (name == "avx512") return Isa::avx512;
  if (name == "avx2") return Isa::avx2;
  if (name == "none") return Isa::none;
  throw std::invalid_argument("TORCH_DIRECTCONV_ISA: expected one of avx512, avx2, none; got '" + name + "'");
}

Isa detected_isa() {
  static const Isa isa = [] {
    Xbyak::util::Cpu cpu;
    if (cpu.has(Xbyak::util::Cpu::tAVX512F)) return Isa::avx512;
    if (cpu.has(Xbyak::util::Cpu::tAVX2) && cpu.has(Xbyak::util::Cpu::tFMA)) return Isa::avx2;
    return Isa::none;
  }();
  return isa;
}

namespace {
// Settled at load, before another thread can be inside it: no fork() finds it half done.
[[maybe_unused]] const Isa g_detected_at_load = detected_isa();

Isa env_cap() {
  const char* env = std::getenv("TORCH_DIRECTCONV_ISA");
  if (!env || !*env) return Isa::avx512;
  try {
    return parse_isa(env);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "torch_directconv: %s; using the detected ISA\n", e.what());
    return Isa::avx512;
  }
}
std::atomic<int> g_cap{-1};
}  // namespace

Isa active_isa() {
  int cap = g_cap.load(std::memory_order_relaxed);
  if (cap < 0) {
    cap = static_cast<int>(env_cap());
    g_cap.store(cap, std::memory_order_relaxed);
  }
  return static_cast<Isa>(std::min(cap, static_cast<int>(detected_isa())));
}

void set_isa_cap(Isa cap) { g_cap.store(static_cast<int>(cap), std::memory_order_relaxed); }

}  // namespace dc
