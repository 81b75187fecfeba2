// The bf16 weight gradient on AMX: the kernel and the layouts it reads.
//
// dW[k, c, tap] sums dy[k, pixel] * x[c, pixel + tap's shift] over pixels, so on the
// tiles the reduction runs over pixels, 32 a product:
// - A tiles (tmm4-5): input channels c 0-15 and 16-31 of a block, each row 32 consecutive
//   pixels of one channel: x transposed, rows `src_row_stride` bytes apart. A tap is a
//   shift along the row, so any tap is a plain load at any pixel offset.
// - B tiles (tmm6-7): output channels k 0-15 and 16-31 of a block, in VNNI over pixel
//   pairs: a chunk of 32 pixels is [2 halves][16 pairs][16 k][2 pixels], 2 KiB, each half
//   one 1 KiB tile of 64-byte rows.
// - C tiles (tmm0-3): (A tile a, B tile b) of 16 input x 16 output channels in fp32,
//   kept in the tiles over every chunk and image of the call, then stored to a
//   [32 c][32 k] fp32 block (rows of 128 bytes): tile (a, b) at a * 2 KiB + b * 64. A
//   call may start from the block's sums (accumulate), so a driver can split the pixels.
// Every tile has 16 rows of 64 bytes: the forward's configuration of M = 16
// (make_amx_tile_config_kernel(16)), loaded once per thread's stream.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "jit/jit_kernel.h"

namespace dc {

struct AmxUpdKernelSpec {
  int n_a = 2;  // A tiles: 2, or 1 where the input block has 16 channels or fewer
  int n_b = 2;  // B tiles: 2, or 1 where the output block has 16 channels or fewer
  // e.g. bf16_conv_upd_a2b2_of32__amx: bf16 operands, fp32 sums out
  std::string name() const;
};

// The kernel's one argument; offsets are read through offsetof.
struct AmxUpdCallArgs {
  const uint16_t* src;     // x transposed: channel 0's row at the tap's first pixel
  const uint16_t* ddst;    // dy in VNNI: the first chunk
  float* dw;               // the [32 c][32 k] fp32 block
  int64_t n_imgs;          // images to reduce (>= 1)
  int64_t n_chunks;        // chunks of 32 pixels per image (>= 1)
  int64_t src_row_stride;  // bytes from one input channel's row to the next
  int64_t src_img_stride;  // bytes from one image's transposed x to the next
  int64_t ddst_img_stride; // bytes from one image's dy chunks to the next
  int64_t accumulate;      // nonzero: add to the block's sums (loaded first), else overwrite
};

using AmxUpdKernelFn = void (*)(const AmxUpdCallArgs*);

std::unique_ptr<JitGenerator> make_amx_upd_kernel(const AmxUpdKernelSpec& spec);

}  // namespace dc
