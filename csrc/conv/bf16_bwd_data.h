// The bf16 input gradient: plan, weight packing and driver, on the forward's kernels by
// duality (DESIGN.md section 5, conv/bwd_data.h): the AMX tiles at the amx level
// (jit/amx_fwd_kernel.h), vdpbf16ps at the avx512_bf16 level (jit/avx512bf16_fwd_kernel.h),
// whose calls are sized as the forward's at that level (conv/bf16_fwd.h: n_a runs x m
// pixels of accumulators in the register file, at the fewest estimated cycles).
//
// dx = conv_transpose(dy, w) splits into the stride_h x stride_w phases of bwd_data_phases:
// phase (a, b) holds the input pixels (a + stride_h i, b + stride_w j) and is a stride-1
// forward convolution of dy (K channels in, C out) with the taps that reach it, rotated.
// Every phase reads one zero-bordered copy of dy, (N, Kb, P + pt + pb, Q + pl + pr, 32),
// bordered by the largest padding any phase needs (none: dy itself). At stride 1 the one
// phase runs in flat runs of M virtual pixels, as the forward's stride-1 plans do, and
// stores straight into dx. A strided layer either stores each phase straight into dx too,
// in runs within the phase's rows whose pixels are stride_w apart (when every phase is wide
// enough to fill the tiles: bf16_bwd_data_interleaves), or runs each phase flat into a
// dense scratch, and a second pass interleaves the phases into dx, writing zeros where no
// tap reaches (a 1 x 1 stride-2 layer's three phases of four).
//
// make_bf16_bwd_data_plan is a pure function of (ConvDesc, threads, output type, level): no
// code is generated there. A thread's stream takes calls in (image, phase, dx block, pixels)
// order, so a block's weights stay in cache while its pixels pass.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "conv/conv_desc.h"
#include "conv/parallel.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/avx512bf16_fwd_kernel.h"
#include "jit/isa.h"
#include "jit/kernel_cache.h"

namespace dc {

// One recorded kernel call; offsets in bytes: run j is read from the dy plane + src_off[j]
// (dy block 0, rotated tap (0, 0)) and stored from dst + dst_off[j], where dst is dx
// itself (stride 1) or the phases' scratch.
struct Bf16BwdDataCall {
  int32_t kernel;
  int32_t n_a;  // runs: 1 or 2
  int64_t src_off[2], dst_off[2], rows[2];  // rows: AmxFwdCallArgs::rows
  int64_t wei_off;
  int64_t n_r;  // the phase's kernel rows
};

// One phase as the plan runs it: its pixels, its taps (forward tap indices, ascending),
// where its packed weights start (elements), and where its dense output starts in the
// phases' scratch (bytes; stride 1 stores in dx). Empty phases have no taps.
struct Bf16BwdDataPhase {
  int64_t a = 0, b = 0, rows = 0, cols = 0;
  std::vector<int64_t> taps_r, taps_s;
  int64_t dil_h = 1, dil_w = 1;  // of the phase's rotated taps, in dy pixels
  int64_t wei_elem = 0, out_off = 0;
  bool empty() const { return taps_r.empty() || taps_s.empty(); }
};

struct Bf16BwdDataPlan {
  ConvDesc desc;  // the forward problem, dt = bf16
  Isa level = Isa::amx;  // the kernel family: amx, or avx512_bf16
  int threads = 1;
  DataType out_dt = DataType::bf16;
  int64_t cb = 0, kb = 0;                 // blocks of 32 of C (dx) and K (dy)
  int64_t pt = 0, pb = 0, pl = 0, pr = 0;  // dy's zero border in its copy
  int64_t hp = 0, wp = 0;                 // the dy plane the kernels read
  bool padded = false;                    // the kernels read a copy of dy
  bool interleaved = false;               // strided: phases store into dx, pixels apart
  bool scattered = false;                 // phases go through scratch, then into dx
  int m = 16;                             // pixels per run, every run of the plan
  int n_a = 2;                            // runs per call (a phase's last call may have one)
  int64_t copy_bytes = 0;                 // the dy copy, at the start of the scratch
  int64_t phase_bytes = 0;                // the phases' outputs, after it (64-aligned)
  int64_t scratch_bytes = 0;
  int64_t weight_elems = 0;
  std::vector<Bf16BwdDataPhase> phases;
  std::vector<AmxFwdKernelSpec> kernels;             // level amx
  std::vector<Avx512Bf16FwdKernelSpec> dot_kernels;  // level avx512_bf16
  std::vector<std::vector<Bf16BwdDataCall>> streams;  // one per thread
  AmxFwdCallArgs strides{};                           // the per-plan constants of every call

  std::string to_string() const;
};

// Whether a strided layer's phases store straight into dx, each run within a phase row
// and its pixels stride_w apart (else: flat runs into scratch, then interleaved): when
// every phase has taps and is at least 14 pixels wide.
bool bf16_bwd_data_interleaves(const ConvDesc& d);

// Throws std::invalid_argument, naming what is wrong, for an invalid description, an
// element type other than bf16, groups, an output type other than f32 or bf16, or a level
// other than amx and avx512_bf16 (by default the active one; nothing checks here that this
// CPU has it).
Bf16BwdDataPlan make_bf16_bwd_data_plan(const ConvDesc& desc, int threads, DataType out_dt,
                                        Isa level = active_isa());

// The plan and its kernels (from the kernel cache, held for the primitive's life).
struct Bf16BwdDataPrimitive {
  Bf16BwdDataPlan plan;
  std::vector<KernelPtr> held;
  std::vector<AmxFwdKernelFn> fns;  // either family's: they take the same argument
  AmxTileFn tile_config = nullptr, tile_release = nullptr;  // level amx only
};
std::shared_ptr<const Bf16BwdDataPrimitive> make_bf16_bwd_data_primitive(const Bf16BwdDataPlan& plan);

// Elements of the packed weights (plan.weight_elems): per non-empty phase, its rotated
// taps as forward weights with C and K swapped, (Cb, Kb, R_a, S_b, 2, 16, 16, 2).
int64_t bf16_bwd_data_weight_elems(const ConvDesc& d);
// (K, C, R, S) weights, fp32 (rounded to nearest even) or bf16, to that layout, padded
// entries zero.
void pack_bf16_bwd_data_weights(const ConvDesc& d, const float* w, uint16_t* packed);
void pack_bf16_bwd_data_weights(const ConvDesc& d, const uint16_t* w, uint16_t* packed);

// Runs the whole input gradient on `run`'s threads (the plan's count): dy (N, Kb, P, Q, 32)
// bf16 with zero padded lanes, packed weights, dx (N, Cb, H, W, 32) of the plan's output
// type, every lane written (padded lanes zero); `scratch` holds plan.scratch_bytes
// (64-byte aligned) when that is not 0. At the amx level the calling threads must have been
// granted AMX tile data (Linux: ARCH_REQ_XCOMP_PERM).
void bf16_bwd_data_run(const Bf16BwdDataPrimitive& prim, const uint16_t* dy, const uint16_t* wei, void* dx,
                       void* scratch, const RunShares& run);
// The same on the kernels' scalar twins (amx_fwd_kernel_ref, avx512bf16_fwd_kernel_ref):
// for the tests.
void bf16_bwd_data_run_reference(const Bf16BwdDataPlan& plan, const uint16_t* dy, const uint16_t* wei, void* dx,
                                 void* scratch, const RunShares& run);

}  // namespace dc
