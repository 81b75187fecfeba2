// The ISA levels the kernels target: chosen by CPUID and XCR0 at run time, capped by
// TORCH_DIRECTCONV_ISA=amx|avx512_bf16|avx512|avx2|none.
//
// Each level includes the ones below it. The two bf16 levels add bf16 instructions
// (vdpbf16ps; the AMX tiles) and no fp32 ones, so the fp32 kernels run their avx512 code
// there: fp32 code never takes a level, only fp32_isa(level).
#pragma once

#include <cstdint>
#include <string>

namespace dc {

enum class Isa { none = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };

// The vector ISA of the fp32 kernels at a level: avx512 at every level from avx512 up.
inline Isa fp32_isa(Isa level) { return level > Isa::avx512 ? Isa::avx512 : level; }
// Throws std::invalid_argument unless isa is one the fp32 plans and kernels take (none, avx2,
// avx512): a bf16 level reaching fp32 code is a caller that skipped fp32_isa().
void check_fp32_isa(Isa isa, const char* who);
// Floats per vector register of the fp32 kernels at a level, which is also the channel block
// of the fp32 layouts.
inline int vlen(Isa level) {
  const Isa v = fp32_isa(level);
  return v == Isa::avx512 ? 16 : v == Isa::avx2 ? 8 : 1;
}
const char* isa_name(Isa isa);
// Throws std::invalid_argument for anything but none, avx2, avx512, avx512_bf16 or amx.
Isa parse_isa(const std::string& name);

// The CPUID and XCR0 words the levels depend on (zero where the CPU has no such leaf).
struct CpuidBits {
  uint32_t leaf1_ecx = 0;    // CPUID.(1,0):ECX
  uint32_t leaf7_ebx = 0;    // CPUID.(7,0):EBX
  uint32_t leaf7_edx = 0;    // CPUID.(7,0):EDX
  uint32_t leaf7_1_eax = 0;  // CPUID.(7,1):EAX
  uint64_t xcr0 = 0;         // XGETBV(0), when the OS has set OSXSAVE
};
CpuidBits read_cpuid_bits();
// The best level these bits allow: what the CPU has and the OS saves the state of. AMX also
// needs the process's permission for tile data (tiles_usable()), which this does not ask.
Isa isa_from_cpuid(const CpuidBits& bits);

// Whether this process may execute tile instructions: the CPU and OS offer AMX, and, on
// Linux, the kernel granted tile data (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA),
// asked once per process, at load). When that is refused it prints one warning.
bool tiles_usable();

// The best level this CPU and OS let this process run (AMX only when tiles_usable()).
Isa detected_isa();
// detected_isa(), lowered by TORCH_DIRECTCONV_ISA when that is set (read once).
Isa active_isa();
// For tests and the benchmark: cap the active level (it never rises above detected_isa()).
void set_isa_cap(Isa cap);

}  // namespace dc
