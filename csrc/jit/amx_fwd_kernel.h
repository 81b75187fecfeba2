// The bf16 forward convolution on AMX (DESIGN.md section 7): kernels, layouts, tiles.
//
// Layouts (every tensor dense, every padded lane zero):
// - activations: (N, ceil(C/32), H, W, 32) bf16: a pixel's 32 channels are one 64-byte
//   tile row, so an A tile is 16 pixels x 32 channels loaded with the pixel stride.
// - weights: (ceil(K/32), ceil(C/32), R, S, 2, 16, 16, 2) bf16: per output block of 32,
//   input block of 32 and tap, two B tiles (output channels 0-15 and 16-31 of the block),
//   each [16 channel pairs][16 output channels][2 channels of the pair] (VNNI), 1 KiB.
// - output: (N, ceil(K/32), P, Q, 32) in bf16 (the next layer's input as it is) or fp32.
//
// Tiles: tmm0-3 accumulate 2 x 2 C tiles (A tile j, B tile h) of M pixels x 16 output
// channels in fp32; tmm4-5 hold the two A tiles (M pixels x 32 channels), tmm6-7 the two
// B tiles. Every tile of a plan has the same M, so its tile configuration is loaded once
// per thread's stream (amx_tile_config_kernel) and released at its end. A call reduces
// over every input-channel block and tap (runtime loops over blocks and kernel rows, the
// kernel columns unrolled), so C never leaves the tiles before the epilogue.
//
// Pixels: the A tile's rows are pixels `src_px_stride` bytes apart. The driver feeds the
// kernel an input whose padding is real zeros (a copy where the layer pads; where it folds
// conv1's kernel columns into channels or subsamples a strided 1x1, the copy is of that:
// conv/bf16_fwd.h), so every tap of every row is a load at a fixed displacement. At stride 1 a tile's rows run
// on through the padded row's end into the next row ("virtual" columns q in [Q, Wv) whose
// results are dropped), which keeps tiles full on narrow maps; at other strides a tile
// stays within one output row. A row's last tile may overlap the one before (it ends
// exactly on the last pixel). Which rows a call stores is a bit mask, so the epilogue is
// unrolled with one test per row; stored pixels are dst_px_stride bytes apart.
//
// Epilogue, per stored row and in this order: + bias, + residual (laid out and typed as
// the output), max(0, .), then the store, rounded to nearest even for bf16. With one B
// tile (a last output block of 16 channels or fewer) the block's upper 16 lanes are
// stored as zeros.
//
// Stats (batch norm's, conv/bf16_fwd.h): per lane of the block, fp32 sums of d = y - shift
// and of d^2 over the call's stored rows, where y is the value as stored: for a bf16 output
// the rounded one, which the batch norm reads. Each tile's even and odd rows sum in their
// own chains (in row order, d^2 added by one fused multiply-add), so the additions' latency
// does not serialize the epilogue; the chains then add up as (tile 0's even + odd) + (tile
// 1's even + odd). The 32 sums, then the 32 sums of squares, are written (not added) to the
// call's 64-float slot. With one B tile the upper 16 lanes hold no channel and their sums
// are written as zeros.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "jit/dtype.h"
#include "jit/fwd_kernel.h"
#include "jit/jit_kernel.h"

namespace dc {

constexpr int kAmxBlock = 32;    // channels of an activation row, and of an output block
constexpr int kAmxMaxRows = 16;  // pixels of an A tile at most
constexpr int kAmxStatsFloats = 2 * kAmxBlock;  // a call's slot of the stats post-op

struct AmxFwdKernelSpec {
  DataType out_dt = DataType::bf16;  // f32 or bf16
  int s = 1, dil_w = 1;              // kernel columns, unrolled, and their dilation
  int m = 16;                        // pixels (rows) of every A and C tile
  int n_a = 2;                       // A tiles: 1 or 2
  int n_b = 2;                       // B tiles: 2 (32 output channels) or 1 (16)
  FwdPostOps post;                   // bias, add, relu, stats
  // e.g. bf16_conv_fwd_kw3d1_m16a2b2_obf16_post_bias_relu__amx
  std::string name() const;
};

// The kernel's one argument; offsets are read through offsetof. Tile j (0, 1) has its own
// source, destination, residual and stored rows.
struct AmxFwdCallArgs {
  const uint16_t* src[2];  // first pixel of A tile j, input block 0, tap (0, 0)
  const uint16_t* wei;     // weights [kb][0][0][0]: the call reads its taps in order, 2 KiB each
  void* dst[2];            // the first pixel tile j stores
  const void* res[2];      // the residual there (read when the post-ops add it)
  const float* bias;       // bias + kb * 32 (read when the post-ops add it)
  int64_t n_cb;            // input blocks to reduce (>= 1)
  int64_t n_r;             // kernel rows to reduce (>= 1)
  int64_t src_px_stride;   // bytes from one A-tile row (pixel) to the next
  int64_t src_r_stride;    // bytes from one kernel row to the next in the input
  int64_t src_cb_stride;   // bytes per input block
  // Bit i: tile j's row i is stored, at the next pixel of dst[j] (and read at the next
  // of res[j]); the others are virtual columns or repeat the run before.
  int64_t rows[2];
  // Bytes from one stored pixel to the next, in dst and res: the pixel's own size for a
  // dense output, a multiple of it where the stores interleave with others' (the strided
  // input gradient's phases, conv/bf16_bwd_data.h).
  int64_t dst_px_stride;
  // Read and written by the stats post-op only (the fields after the ones above, which the
  // avx512_bf16 kernels read by the same offsets).
  const float* stats_shift;  // shift + kb * 32: the block's 32 shifts
  float* stats;              // the call's slot: 32 sums of y - shift, then 32 of its square
};

using AmxFwdKernelFn = void (*)(const AmxFwdCallArgs*);

std::unique_ptr<JitGenerator> make_amx_fwd_kernel(const AmxFwdKernelSpec& spec);

// The two kernels around a thread's stream: the tile configuration of a plan (every tile
// with M rows) and its release. Neither takes an argument.
using AmxTileFn = void (*)();
std::unique_ptr<JitGenerator> make_amx_tile_config_kernel(int m);  // amx_tilecfg_m16
std::unique_ptr<JitGenerator> make_amx_tile_release_kernel();      // amx_tilerelease

// bf16 <-> fp32 as the kernels round: to nearest even, NaN kept quiet, and (as
// vcvtneps2bf16) denormal inputs become zeros of their sign. Inline: the weight packers
// round every element.
inline uint16_t bf16_from_float(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);  // zero or denormal
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float float_from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace dc
