// The bf16 weight gradient: plan, copies and driver, for two kernel families that read and
// write the same copies and blocks through the same argument: the AMX tiles at the amx level
// (jit/amx_upd_kernel.h, where the layouts are described), vdpbf16ps at the avx512_bf16
// level (jit/avx512bf16_upd_kernel.h). make_bf16_upd_plan is a pure function of (ConvDesc,
// threads, dW type, level): no code is generated there.
//
// The reduction runs over pixels of a "virtual" map, as the forward's flat runs do: output
// pixel (p, q) is virtual pixel v = p * Wv + q, where Wv is the width of a stride phase of
// the padded input (phase (a, b): padded pixels (i * stride_h + a, j * stride_w + b)). Tap
// (r, s) then reads phase ((r * dil_h) % stride_h, (s * dil_w) % stride_w) at v + a fixed
// shift, so every tap of every layer (padding, stride and dilation alike) is one plain run
// over the same pixels; virtual columns q >= Q carry zeros in dy (so an infinite or NaN
// input value there makes NaN sums, 0 * inf, in taps that do not read it). At stride 1
// the one phase is the zero-bordered input, and a strided 1 x 1 reads one phase only: its
// subsampled pixels.
//
// Each thread first copies dy in VNNI over pixel pairs for its output blocks and images,
// zero-padded to chunks of 32 pixels. Then, input block by input block, it copies x
// transposed (rows of one channel's pixels, per phase it uses; every image), and per
// output block one call per tap (and segment of pixels) reduces every image in the tiles
// into a [32 c][32 k] block in cache; the blocks of every tap are written out as
// (K, C, R, S), fp32 or bf16.
// Shares split the input blocks, the output blocks or the images (each share then summing
// into a private fp32 copy of dW that a last pass adds up), whichever repeats the fewest
// bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "conv/conv_desc.h"
#include "conv/parallel.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/amx_upd_kernel.h"
#include "jit/avx512bf16_upd_kernel.h"
#include "jit/isa.h"
#include "jit/kernel_cache.h"

namespace dc {

// A tap: which of the plan's phases it reads, and its shift in virtual pixels.
struct Bf16UpdTap {
  int32_t phase;
  int64_t shift;
};

// One thread's share: images [n0, n1), output blocks [kb0, kb1), input blocks [cb0, cb1),
// summed into dW (part 0 of one) or into private copy `part`. Empty when n0 == n1.
struct Bf16UpdShare {
  int64_t n0 = 0, n1 = 0, kb0 = 0, kb1 = 0, cb0 = 0, cb1 = 0;
  int part = 0;
};

struct Bf16UpdPlan {
  ConvDesc desc;   // dt = bf16
  Isa level = Isa::amx;  // the kernel family: amx, or avx512_bf16
  // What the copies and kernels compute: desc, or where a few channels meet a wide kernel
  // (conv1's 3 x 7) the forward's column-folded convolution (bf16_fwd_inner_desc), an
  // R x 1 one on a copy whose channels are (kernel column, channel) pairs: a seventh of
  // conv1's products.
  ConvDesc inner;
  bool folded = false;
  int threads = 1;
  DataType dw_dt = DataType::f32;
  int64_t cb = 0, kb = 0;      // blocks of 32 input and output channels
  int64_t hv = 0, wv = 0;      // rows and columns of a phase (the virtual map's width is wv)
  int64_t chunks = 0;          // chunks of 32 virtual pixels per image
  int64_t row_len = 0;         // pixels of a transposed row: the largest shift + chunks * 32
  // Chunks of a call: every tap of a block runs over one segment of the pixels after
  // another, so the segment's dy (and the transposed rows, when they fit) stay in L1 while
  // the taps reread them; the calls after the first add to the tap blocks.
  int64_t seg_chunks = 0;
  std::vector<int32_t> phases; // the phases the taps read, a * stride_w + b
  std::vector<Bf16UpdTap> taps;  // (r, s) in order
  std::vector<AmxUpdKernelSpec> kernels;             // level amx
  std::vector<Avx512Bf16UpdKernelSpec> dot_kernels;  // level avx512_bf16
  int kernel_of[2][2] = {{-1, -1}, {-1, -1}};  // [n_a - 1][n_b - 1]: the level's kernels
  int parts = 1;               // private copies of dW (an image split)
  bool stream_dw = false;      // dW (fp32) is larger than 1 MiB: streamed past the caches
  std::vector<Bf16UpdShare> shares;  // one per thread
  int64_t share_bytes = 0;     // scratch per thread: the copies and the tap blocks
  int64_t fold_bytes = 0;      // the column-folded copy of x (folded only)
  int64_t scratch_bytes = 0;   // every thread's, the private copies, the folded copy

  // Bytes of one image's copies of one block: x transposed, every phase; dy in VNNI.
  int64_t xt_block_bytes() const { return static_cast<int64_t>(phases.size()) * kAmxBlock * row_len * 2; }
  int64_t dy_block_bytes() const { return chunks * 2048; }
  std::string to_string() const;
};

// Throws std::invalid_argument, naming what is wrong, for an invalid description, an
// element type other than bf16, groups, a dW type other than f32 or bf16, or a level other
// than amx and avx512_bf16 (by default the active one; nothing checks here that this CPU
// has it).
Bf16UpdPlan make_bf16_upd_plan(const ConvDesc& desc, int threads, DataType dw_dt = DataType::f32,
                               Isa level = active_isa());

struct Bf16UpdPrimitive {
  Bf16UpdPlan plan;
  std::vector<KernelPtr> held;
  std::vector<AmxUpdKernelFn> fns;  // either family's: they take the same argument
  AmxTileFn tile_config = nullptr, tile_release = nullptr;  // level amx only
};
std::shared_ptr<const Bf16UpdPrimitive> make_bf16_upd_primitive(const Bf16UpdPlan& plan);

// Runs the whole weight gradient on `run`'s threads (the plan's count): x (N, Cb, H, W, 32)
// and dy (N, Kb, P, Q, 32) bf16, every padded lane zero; dw (K, C, R, S) of the plan's type,
// every element written; `scratch` holds plan.scratch_bytes, 64-byte aligned. At the amx
// level the calling threads must have been granted AMX tile data (Linux: ARCH_REQ_XCOMP_PERM).
void bf16_upd_run(const Bf16UpdPrimitive& prim, const uint16_t* x, const uint16_t* dy, void* dw, void* scratch,
                  const RunShares& run);
// The same with the scalar twins of the copies and of the kernels (amx_upd_kernel_ref,
// avx512bf16_upd_kernel_ref).
void bf16_upd_run_reference(const Bf16UpdPlan& plan, const uint16_t* x, const uint16_t* dy, void* dw, void* scratch,
                            const RunShares& run);

}  // namespace dc
