// A register-only FMA loop: the machine's FMA peak, measured by the benchmark itself.
#pragma once

#include <cstdint>
#include <memory>

#include "jit/isa.h"
#include "jit/jit_kernel.h"

namespace dc {

// fn(iterations): each iteration issues fma_peak_flops_per_iter(isa) flops in independent chains.
using PeakKernelFn = void (*)(int64_t);
std::unique_ptr<JitGenerator> make_peak_kernel(Isa isa);
int64_t fma_peak_flops_per_iter(Isa isa);

}  // namespace dc
