#include "jit/isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace dc {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::amx: return "amx";
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "none";
  }
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : {Isa::none, Isa::avx2, Isa::avx512, Isa::avx512_bf16, Isa::amx})
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("TORCH_DIRECTCONV_ISA: expected one of amx, avx512_bf16, avx512, avx2, none; got '" +
                              name + "'");
}

void check_fp32_isa(Isa isa, const char* who) {
  if (isa > Isa::avx512)
    throw std::invalid_argument(std::string(who) + ": the fp32 kernels take avx2 or avx512, got " + isa_name(isa) +
                                " (the level's fp32_isa() is " + isa_name(fp32_isa(isa)) + ")");
}

CpuidBits read_cpuid_bits() {
  CpuidBits b;
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf >= 1) {
    __cpuid_count(1, 0, eax, ebx, ecx, edx);
    b.leaf1_ecx = ecx;
  }
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    b.leaf7_ebx = ebx;
    b.leaf7_edx = edx;
    if (eax >= 1) {  // EAX of (7,0) is the highest sub-leaf
      __cpuid_count(7, 1, eax, ebx, ecx, edx);
      b.leaf7_1_eax = eax;
    }
  }
  if (b.leaf1_ecx & (1u << 27)) {  // OSXSAVE: XGETBV is there
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    b.xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  }
#endif
  return b;
}

namespace {
bool bit(uint64_t word, int i) { return (word >> i) & 1; }
bool bits(uint64_t word, uint64_t mask) { return (word & mask) == mask; }
}  // namespace

Isa isa_from_cpuid(const CpuidBits& b) {
  // XCR0: bits 1-2 the SSE and AVX state, 5-7 the opmask and ZMM state, 17-18 XTILECFG and
  // XTILEDATA. An ISA whose state the OS does not save cannot be used.
  const bool avx2 = bit(b.leaf1_ecx, 27) && bit(b.leaf1_ecx, 28) && bit(b.leaf1_ecx, 12) && bit(b.leaf7_ebx, 5) &&
                    bits(b.xcr0, 0x6);
  if (!avx2) return Isa::none;
  if (!(bit(b.leaf7_ebx, 16) && bits(b.xcr0, 0xe0))) return Isa::avx2;
  // The bf16 kernels also move 16-bit lanes under masks (AVX512BW) in 256-bit registers
  // (AVX512VL); every CPU with AVX512_BF16 has both.
  if (!(bit(b.leaf7_1_eax, 5) && bit(b.leaf7_ebx, 30) && bit(b.leaf7_ebx, 31))) return Isa::avx512;
  if (!(bit(b.leaf7_edx, 24) && bit(b.leaf7_edx, 22) && bits(b.xcr0, 0x60000))) return Isa::avx512_bf16;
  return Isa::amx;
}

namespace {

// Linux leaves tile data disabled for a process (through XFD) until it asks, so that only
// processes that use the tiles pay for their 8 KiB of signal-frame state.
bool request_tile_data(std::string* why) {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    *why = std::strerror(errno);
    return false;
  }
  unsigned long permitted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &permitted) != 0 || !bit(permitted, kXfeatureXtiledata)) {
    *why = "granted, but ARCH_GET_XCOMP_PERM does not list it";
    return false;
  }
#else
  (void)why;
#endif
  return true;
}

}  // namespace

bool tiles_usable() {
  static const bool usable = [] {
    if (isa_from_cpuid(read_cpuid_bits()) < Isa::amx) return false;
    std::string why;
    if (request_tile_data(&why)) return true;
    std::fprintf(stderr,
                 "torch_directconv: the OS refused this process AMX tile data (arch_prctl(ARCH_REQ_XCOMP_PERM, "
                 "XFEATURE_XTILEDATA): %s); the bf16 kernels run on avx512_bf16 instead of amx\n",
                 why.c_str());
    return false;
  }();
  return usable;
}

Isa detected_isa() {
  static const Isa isa = [] {
    const Isa cpu = isa_from_cpuid(read_cpuid_bits());
    return cpu == Isa::amx && !tiles_usable() ? Isa::avx512_bf16 : cpu;
  }();
  return isa;
}

namespace {
// Settled at load, before another thread can be inside it: no fork() finds it half done.
[[maybe_unused]] const Isa g_detected_at_load = detected_isa();

Isa env_cap() {
  const char* env = std::getenv("TORCH_DIRECTCONV_ISA");
  if (!env || !*env) return Isa::amx;
  try {
    return parse_isa(env);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "torch_directconv: %s; using the detected ISA\n", e.what());
    return Isa::amx;
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
