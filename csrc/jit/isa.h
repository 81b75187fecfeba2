// Which vector ISA the kernels target: chosen by CPUID at run time, capped by
// TORCH_DIRECTCONV_ISA=avx512|avx2|none.
#pragma once

#include <string>

namespace dc {

enum class Isa { none = 0, avx2 = 1, avx512 = 2 };

// Floats per vector register, which is also the channel block of the layouts.
inline int vlen(Isa isa) { return isa == Isa::avx512 ? 16 : isa == Isa::avx2 ? 8 : 1; }
const char* isa_name(Isa isa);
// Throws std::invalid_argument for anything but avx512, avx2 or none.
Isa parse_isa(const std::string& name);

// The best ISA this CPU and OS support.
Isa detected_isa();
// detected_isa(), lowered by TORCH_DIRECTCONV_ISA when that is set (read once).
Isa active_isa();
// For tests and the benchmark: lower the active ISA (never above detected_isa()).
void set_isa_cap(Isa cap);

}  // namespace dc
