// The bf16 forward convolution: plan, weight packing and driver, for two kernel families
// that read and write the same tensors through the same argument: the AMX tiles at the amx
// level (jit/amx_fwd_kernel.h, where the layouts are described), vdpbf16ps at the
// avx512_bf16 level (jit/avx512bf16_fwd_kernel.h). make_bf16_fwd_plan is a pure function
// of (ConvDesc, threads, output type, post-ops, level): no code is generated there.
//
// The plan lists a layer's tiles image by image: at stride 1 the (virtual) pixels of the
// padded map in runs of M, at other strides runs of up to M pixels of one output row; the
// last run of a map (a row) ends exactly on its last pixel, overlapping the one before.
// On AMX, M = 16 (fewer only on maps smaller than that) and two runs make a call. At the
// avx512_bf16 level a call's runs x M pixels x 32 output channels are its fp32
// accumulators, one zmm per pixel and 16 channels, so n_a runs x M <= 14; the plan takes
// the runs (flat or in rows, at stride 1) and the (n_a, M) whose calls cost the fewest
// estimated cycles over the layer (mostly: the fewest pixels computed, overlaps and
// virtual columns included). A thread's stream
// takes calls in (image, output block, pixels) order, so a block's weights stay in cache
// while its pixels pass; or, where that would read the layer's weights more often from
// beyond L2 than the input (a layer whose weights do not fit L2, on several images), in
// (output block, image, pixels) order, so that each thread reads only its blocks' weights,
// once (bf16_fwd_blocks_outer). Where the layer pads, the driver first copies the input into a
// zero-bordered scratch, each thread its share, so that every tap is a plain load
// (Bf16FwdInput).
//
// With the stats post-op (amx level only) every call writes the batch-norm sums of the
// pixels it stores to its own slot (jit/amx_fwd_kernel.h), and bf16_fwd_stats_finish
// merges the slots in double as fwd_stats_finish merges the fp32 tiles' (conv/fwd_stats.h,
// whose soundness rule it keeps: a call's sums are over at most 32 pixels).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "conv/conv_desc.h"
#include "conv/fwd_plan.h"
#include "conv/parallel.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/avx512bf16_fwd_kernel.h"
#include "jit/isa.h"
#include "jit/kernel_cache.h"

namespace dc {

// One recorded kernel call; offsets in bytes. Run j is read from src + src_off[j] (input
// block 0, tap (0, 0)) and stored from dst + dst_off[j] (also the residual's offset).
struct Bf16FwdCall {
  int32_t kernel;
  int32_t n_a;  // runs: 1 or 2
  int64_t src_off[2], dst_off[2], rows[2];  // rows: AmxFwdCallArgs::rows
  int64_t wei_off, bias_off;  // bias_off: also the block's shifts' offset (stats)
  int64_t stats_off;           // with the stats post-op, the call's slot (floats into the sums)
};

// What the kernels read: the input itself; a zero-bordered copy (N, Cb, H + pt + pb,
// W + pl + pr, 32) where the layer pads; or, where a few channels meet a wide kernel
// (C * S <= 32, conv1's 3 x 7), a copy with the kernel columns folded into the channels,
// (N, 1, H + pt + pb, Q, 32), on which the layer is an R x 1 convolution of stride
// (stride_h, 1) and a seventh of conv1's products; or, for an unpadded strided 1 x 1 (the
// projections), the pixels it reads, (N, Cb, P, Q, 32), on which it is a stride-1 1 x 1
// whose runs are full.
enum class Bf16FwdInput { direct, padded, folded, subsampled };
bool bf16_fwd_folds_columns(const ConvDesc& d);
bool bf16_fwd_subsamples(const ConvDesc& d);
// The convolution the kernels compute: d itself, or the folded one.
ConvDesc bf16_fwd_inner_desc(const ConvDesc& d);
// Rows [row_begin, row_end) of the column-folded copy of src, rows counted over (image,
// padded row): pixel q of a row holds, for each kernel column s, the C channels that the
// layer's tap s reads for output column q (zeros where that falls on padding).
void bf16_fold_columns(const ConvDesc& d, const uint16_t* src, uint16_t* scratch, int64_t row_begin, int64_t row_end);

struct Bf16FwdPlan {
  ConvDesc desc;   // dt = bf16
  Isa level = Isa::amx;  // the kernel family: amx, or avx512_bf16
  ConvDesc inner;  // what the kernels compute (bf16_fwd_inner_desc)
  Bf16FwdInput input = Bf16FwdInput::direct;
  int threads = 1;
  DataType out_dt = DataType::bf16;
  FwdPostOps post;
  int64_t cb = 0, kb = 0;        // blocks of 32 input and output channels
  int64_t hp = 0, wp = 0;        // the plane the kernels read: the copy's, or the input's
  bool flat = false;             // runs cross (virtual) row ends: AMX at stride 1; avx512_bf16 by cost
  int m = 16;                    // pixels per run, every run of the plan
  int n_a = 2;                   // runs per call (the last call of an image's block may have one)
  bool blocks_outer = false;     // calls in (output block, image, pixels) order
  int64_t scratch_bytes = 0;     // the copy (0 for a direct input)
  std::vector<AmxFwdKernelSpec> kernels;             // level amx
  std::vector<Avx512Bf16FwdKernelSpec> dot_kernels;  // level avx512_bf16
  std::vector<std::vector<Bf16FwdCall>> streams;  // one per thread
  AmxFwdCallArgs strides{};                       // the per-plan constants of every call
  // With the stats post-op, every call's slot (n_oc = 1 block of 32 lanes, kAmxStatsFloats
  // floats) and the size of the buffer they fill.
  std::vector<FwdStatsTile> stats_tiles;
  int64_t stats_floats = 0;

  std::string to_string() const;
};

// Whether a plan's calls go in (output block, image, pixels) order rather than (image,
// output block, pixels): when the bytes each thread reads from beyond L2 are fewer so.
// weight_bytes: the layer's packed weights; image_bytes: one image of the input the kernels
// read; kb: output blocks; l2: one core's L2 (half of it counts as room to reuse in).
// Image-major, a thread on n / threads images reads the weights once if they fit, else
// once an image, and each image once if it fits, else once a block; block-major, a thread
// reads its kb / threads blocks' weights once, and every image once if they all fit, else
// once a block. Block-major only when that reads at most 3/4 of what image-major does.
bool bf16_fwd_blocks_outer(int64_t weight_bytes, int64_t image_bytes, int64_t n, int64_t kb, int threads, int64_t l2);

// Estimated cycles of an avx512_bf16 kernel call of `px` pixels x 2 vectors that takes
// `steps` vdpbf16ps steps (a kernel column and a channel pair each): the cost the plans of
// that level (forward and input gradient) minimise when they size their runs.
double bf16_dot_call_cycles(int64_t steps, int px);

// Throws std::invalid_argument, naming what is wrong, for an invalid description, an
// element type other than bf16, groups, an output type other than f32 or bf16, a level
// other than amx and avx512_bf16, or stats at the avx512_bf16 level. The level is the
// kernel family's (by default the active one: active_isa()); nothing checks here that this
// CPU has it.
Bf16FwdPlan make_bf16_fwd_plan(const ConvDesc& desc, int threads, DataType out_dt, const FwdPostOps& post = {},
                               Isa level = active_isa());

// The plan and its kernels (from the kernel cache, held for the primitive's life).
struct Bf16FwdPrimitive {
  Bf16FwdPlan plan;
  std::vector<KernelPtr> held;
  std::vector<AmxFwdKernelFn> fns;  // either family's: they take the same argument
  AmxTileFn tile_config = nullptr, tile_release = nullptr;  // level amx only
};
std::shared_ptr<const Bf16FwdPrimitive> make_bf16_fwd_primitive(const Bf16FwdPlan& plan);

// The kernels of a plan that runs on the forward's kernel families (the forward's own, or the
// input gradient's: conv/bf16_bwd_data.h), from the kernel cache into prim: the level's
// kernels in the plan's order, and at the amx level the tile configuration and release.
template <typename Plan, typename Prim>
void hold_bf16_fwd_kernels(const Plan& plan, Prim* prim) {
  const std::string info = plan.to_string();
  for (const Avx512Bf16FwdKernelSpec& sp : plan.dot_kernels) {
    prim->held.push_back(get_kernel(sp.name(), [&] { return make_avx512bf16_fwd_kernel(sp); }, info));
    prim->fns.push_back(prim->held.back()->template entry<AmxFwdKernelFn>());
  }
  if (plan.level != Isa::amx) return;
  for (const AmxFwdKernelSpec& sp : plan.kernels) {
    prim->held.push_back(get_kernel(sp.name(), [&] { return make_amx_fwd_kernel(sp); }, info));
    prim->fns.push_back(prim->held.back()->template entry<AmxFwdKernelFn>());
  }
  prim->held.push_back(get_kernel("amx_tilecfg_m" + std::to_string(plan.m),
                                  [&] { return make_amx_tile_config_kernel(plan.m); }, info));
  prim->tile_config = prim->held.back()->template entry<AmxTileFn>();
  prim->held.push_back(get_kernel("amx_tilerelease", [] { return make_amx_tile_release_kernel(); }, info));
  prim->tile_release = prim->held.back()->template entry<AmxTileFn>();
}
// The primitive of (desc, threads, output type, post-ops) at the active level (active_isa(),
// amx or avx512_bf16), made once and kept (an LRU cache, as the fp32 primitives', keyed on
// the level too); desc.dt must be bf16.
std::shared_ptr<const Bf16FwdPrimitive> get_bf16_fwd_primitive(const ConvDesc& desc, int threads, DataType out_dt,
                                                                const FwdPostOps& post);
void clear_bf16_fwd_primitives();

// Elements of the packed weights: ceil(K/32) * ceil(C/32) * R * S * 1024 of the inner desc.
int64_t bf16_fwd_weight_elems(const ConvDesc& d);
// (K, C, R, S) fp32 weights to the packed bf16 layout (of the inner desc: folded, inner
// channel s * C + c is (c, s)), rounded to nearest even, padded entries zero.
void pack_bf16_fwd_weights(const ConvDesc& d, const float* w, uint16_t* packed);
// The same from (K, C, R, S) weights of type w_dt (f32 or bf16) with any strides (in
// elements): thread tid's share of the (output block, input block) pairs.
void pack_bf16_fwd_weights(const ConvDesc& d, const void* w, DataType w_dt, const int64_t w_strides[4],
                           uint16_t* packed, int tid, int nthreads);

// The operands of the plan's post-ops, read only when it names them.
struct Bf16FwdPostArgs {
  const float* bias = nullptr;     // (ceil(K/32) * 32) fp32, padded lanes zero
  const void* residual = nullptr;  // laid out and typed as dst
  const float* shift = nullptr;    // stats: (ceil(K/32) * 32) fp32, d = y - shift is summed
  float* sums = nullptr;           // stats: plan.stats_floats, every slot written
};

// Runs the whole convolution on `run`'s threads (the plan's count): src (N, Cb, H, W, 32)
// bf16 with zero padded lanes, packed weights, dst (N, Kb, P, Q, 32) of the plan's output
// type; `scratch` holds plan.scratch_bytes (64-byte aligned) where the plan pads.
// At the amx level the calling threads must have been granted AMX tile data (Linux:
// ARCH_REQ_XCOMP_PERM).
void bf16_fwd_run(const Bf16FwdPrimitive& prim, const uint16_t* src, const uint16_t* wei, const Bf16FwdPostArgs& post,
                  void* dst, void* scratch, const RunShares& run);
// The same on the kernels' scalar twins (amx_fwd_kernel_ref, avx512bf16_fwd_kernel_ref):
// for the tests.
void bf16_fwd_run_reference(const Bf16FwdPlan& plan, const uint16_t* src, const uint16_t* wei,
                            const Bf16FwdPostArgs& post, void* dst, void* scratch, const RunShares& run);

// Per-channel mean and biased variance over (N, P, Q) of the first `channels` channels,
// from the slots a stats run wrote and the shift it used, merged as fwd_stats_finish
// merges (conv/fwd_stats.h). Returns false when some channel's mean is more than
// kStatsMaxShiftStds standard deviations from its shift: the caller then recomputes the
// statistics from the output. Throws std::invalid_argument for a plan without the stats
// post-op or channels outside [0, K].
// Whether the kernels of `level` have the stats post-op (the AMX ones do).
inline bool bf16_fwd_has_stats(Isa level) { return level == Isa::amx; }
bool bf16_fwd_stats_finish(const Bf16FwdPlan& plan, const float* sums, const float* shift, int64_t channels,
                           float* mean, float* var);

}  // namespace dc
