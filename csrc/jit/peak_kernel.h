// Register- and L1-bound loops: the machine's peaks, measured by the benchmark itself.
//   f32 FMA:          vfmadd231ps in independent chains (avx2, avx512);
//   bf16 dot:         vdpbf16ps in independent chains (avx512_bf16);
//   bf16 tile (AMX):  tdpbf16ps on four 16x16 fp32 accumulator tiles fed by two A and two B
//                     tiles loaded from L1 at every step, as a brgemm's inner loop is, or
//                     loaded once and kept in the tile registers (the unit alone) (amx).
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

// fn(iterations, in, out) of the bf16 peaks. `in` holds the bf16 operands, `out` receives
// the fp32 accumulators after the last iteration, so a test can check what the loop computed
// against its scalar twin; each iteration issues *_flops_per_iter() flops. Both are best
// 64-byte aligned (whole cache lines per row).
using Bf16PeakKernelFn = void (*)(int64_t iterations, const uint16_t* in, float* out);

// vdpbf16ps: in = two zmm of 32 bf16 (a, b); out = 16 accumulators of 16 floats; each
// accumulator adds, per lane l, a[2l] b[2l] + a[2l+1] b[2l+1] four times per iteration.
constexpr int kDotPeakChains = 16, kDotPeakUnroll = 4;
constexpr int64_t kDotPeakInElems = 64, kDotPeakOutElems = kDotPeakChains * 16;
std::unique_ptr<JitGenerator> make_bf16_dot_peak_kernel();
int64_t bf16_dot_peak_flops_per_iter();
void bf16_dot_peak_reference(int64_t iterations, const uint16_t* in, float* out);

// tdpbf16ps: in = A0, A1 (16 rows x 32 bf16, row-major) and B0, B1 (16 rows of 16 pairs of
// bf16, the pairs along the reduction); out = C00, C01, C10, C11 (16 x 16 floats each),
// Cij = iterations * Ai Bj. The tile configuration is loaded at the start and released at the end.
// With from_l1 the four input tiles are loaded again at every iteration.
constexpr int64_t kTilePeakInElems = 4 * 16 * 32, kTilePeakOutElems = 4 * 16 * 16;
std::unique_ptr<JitGenerator> make_bf16_tile_peak_kernel(bool from_l1);
int64_t bf16_tile_peak_flops_per_iter();
void bf16_tile_peak_reference(int64_t iterations, const uint16_t* in, float* out);

}  // namespace dc
