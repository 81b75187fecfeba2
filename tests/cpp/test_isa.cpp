// The ISA levels: what CPUID and XCR0 bits give which level, the names, the fp32 vector
// ISA of each level, and the peak loops against their scalar twins where the level allows.
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "conv/fwd_plan.h"
#include "conv/upd_conv.h"
#include "jit/isa.h"
#include "jit/peak_kernel.h"

using namespace dc;

namespace {

// A CPU with everything the levels look at, its state saved by the OS.
CpuidBits amx_cpu() {
  CpuidBits b;
  b.leaf1_ecx = (1u << 27) | (1u << 28) | (1u << 12);                  // OSXSAVE, AVX, FMA
  b.leaf7_ebx = (1u << 5) | (1u << 16) | (1u << 30) | (1u << 31);      // AVX2, AVX512F, BW, VL
  b.leaf7_edx = (1u << 24) | (1u << 22);                               // AMX-TILE, AMX-BF16
  b.leaf7_1_eax = 1u << 5;                                             // AVX512_BF16
  b.xcr0 = 0x6 | 0xe0 | 0x60000;                                       // AVX, AVX-512, tile state
  return b;
}

void test_levels_from_bits() {
  CHECK(isa_from_cpuid(amx_cpu()) == Isa::amx, "all bits: %s", isa_name(isa_from_cpuid(amx_cpu())));
  struct Case {
    const char* what;
    void (*clear)(CpuidBits&);
    Isa want;
  };
  const Case cases[] = {
      {"no XTILEDATA in XCR0", [](CpuidBits& b) { b.xcr0 &= ~(1ull << 18); }, Isa::avx512_bf16},
      {"no XTILECFG in XCR0", [](CpuidBits& b) { b.xcr0 &= ~(1ull << 17); }, Isa::avx512_bf16},
      {"no AMX-TILE", [](CpuidBits& b) { b.leaf7_edx &= ~(1u << 24); }, Isa::avx512_bf16},
      {"no AMX-BF16", [](CpuidBits& b) { b.leaf7_edx &= ~(1u << 22); }, Isa::avx512_bf16},
      {"no AVX512_BF16", [](CpuidBits& b) { b.leaf7_1_eax = 0; }, Isa::avx512},
      {"no AVX512BW", [](CpuidBits& b) { b.leaf7_ebx &= ~(1u << 30); }, Isa::avx512},
      {"no ZMM state in XCR0", [](CpuidBits& b) { b.xcr0 &= ~0x40ull; }, Isa::avx2},
      {"no AVX512F", [](CpuidBits& b) { b.leaf7_ebx &= ~(1u << 16); }, Isa::avx2},
      {"no FMA", [](CpuidBits& b) { b.leaf1_ecx &= ~(1u << 12); }, Isa::none},
      {"no AVX state in XCR0", [](CpuidBits& b) { b.xcr0 &= ~0x4ull; }, Isa::none},
      {"no OSXSAVE", [](CpuidBits& b) { b.leaf1_ecx &= ~(1u << 27); }, Isa::none},
  };
  for (const Case& c : cases) {
    CpuidBits b = amx_cpu();
    c.clear(b);
    CHECK(isa_from_cpuid(b) == c.want, "%s: got %s, want %s", c.what, isa_name(isa_from_cpuid(b)), isa_name(c.want));
  }
  // This machine: the detected level is what its bits allow, AMX only with the permission.
  const Isa cpu = isa_from_cpuid(read_cpuid_bits());
  const Isa want = cpu == Isa::amx && !tiles_usable() ? Isa::avx512_bf16 : cpu;
  CHECK(detected_isa() == want, "detected %s, bits say %s", isa_name(detected_isa()), isa_name(cpu));
  std::printf("this CPU: %s (tiles usable: %d)\n", isa_name(detected_isa()), tiles_usable());
}

void test_names_and_fp32_isa() {
  for (Isa isa : {Isa::none, Isa::avx2, Isa::avx512, Isa::avx512_bf16, Isa::amx})
    CHECK(parse_isa(isa_name(isa)) == isa, "%s does not round-trip", isa_name(isa));
  bool threw = false;
  try {
    parse_isa("avx512bf16");
  } catch (const std::invalid_argument& e) {
    threw = std::strstr(e.what(), "avx512bf16") && std::strstr(e.what(), "avx512_bf16, avx512");
  }
  CHECK(threw, "a bad level name was taken, or its error names neither it nor the accepted ones");
  CHECK(fp32_isa(Isa::amx) == Isa::avx512 && fp32_isa(Isa::avx512_bf16) == Isa::avx512, "bf16 levels' fp32 ISA");
  CHECK(fp32_isa(Isa::avx512) == Isa::avx512 && fp32_isa(Isa::avx2) == Isa::avx2 && fp32_isa(Isa::none) == Isa::none,
        "fp32 levels' fp32 ISA");
  CHECK(vlen(Isa::amx) == 16 && vlen(Isa::avx512_bf16) == 16 && vlen(Isa::avx512) == 16 && vlen(Isa::avx2) == 8,
        "vlen");
}

// A bf16 level handed to fp32 code is refused, not run as some other code.
void test_fp32_code_refuses_bf16_levels() {
  const ConvDesc d = parse_conv_desc("mb1ic32ih8oc32kh3ph1");
  for (Isa level : {Isa::avx512_bf16, Isa::amx}) {
    int refused = 0;
    try {
      make_fwd_plan(d, level, 1);
    } catch (const std::invalid_argument& e) {
      refused += std::strstr(e.what(), isa_name(level)) != nullptr;
    }
    try {
      make_upd_plan(d, level, 1);
    } catch (const std::invalid_argument&) {
      ++refused;
    }
    try {
      nchw_1x1_applies(parse_conv_desc("mb1ic32ih28oc32kh1"), level);
    } catch (const std::invalid_argument&) {
      ++refused;
    }
    try {
      make_peak_kernel(level);
    } catch (const std::invalid_argument&) {
      ++refused;
    }
    CHECK(refused == 4, "%s: %d of 4 fp32 entry points refused it", isa_name(level), refused);
  }
}

std::vector<uint16_t> small_bf16_ints(size_t n, unsigned seed) {
  // bf16 of the integers -2..3: every product and sum in the tests is exact in fp32.
  const uint16_t values[] = {0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040};
  std::vector<uint16_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = values[(i * 7 + seed + i / 5) % 6];
  return v;
}

void check_bf16_peak(const char* what, Isa needs, const std::function<std::unique_ptr<JitGenerator>()>& make,
                     void (*ref)(int64_t, const uint16_t*, float*), size_t in_elems, size_t out_elems) {
  if (detected_isa() < needs) {
    std::printf("skipping %s: the %s level is not available here\n", what, isa_name(needs));
    return;
  }
  auto kernel = make()->build();
  auto fn = kernel->entry<Bf16PeakKernelFn>();
  const std::vector<uint16_t> in = small_bf16_ints(in_elems, 3);
  for (int64_t iters : {0, 1, 3}) {
    std::vector<float> got(out_elems, -1.f), want(out_elems, -2.f);
    fn(iters, in.data(), got.data());
    ref(iters, in.data(), want.data());
    CHECK(got == want, "%s (%s), %lld iterations: the loop and its twin differ", what, kernel->name().c_str(),
          static_cast<long long>(iters));
  }
}

}  // namespace

int main() {
  test_levels_from_bits();
  test_names_and_fp32_isa();
  test_fp32_code_refuses_bf16_levels();
  check_bf16_peak("bf16 dot peak", Isa::avx512_bf16, make_bf16_dot_peak_kernel, bf16_dot_peak_reference,
                  kDotPeakInElems, kDotPeakOutElems);
  for (bool from_l1 : {true, false})
    check_bf16_peak(
        "bf16 tile peak", Isa::amx, [from_l1] { return make_bf16_tile_peak_kernel(from_l1); },
        bf16_tile_peak_reference, kTilePeakInElems, kTilePeakOutElems);
  TEST_MAIN_END("test_isa");
}
