// Weight-update microkernel (DESIGN.md section 6): dW[c][k] += x[c] * dy[k] over pixels.
//
// One call reduces a rectangle of output pixels (n_rows x n_px, all valid for one kernel
// tap) of n_imgs images into a tile of n_c input channels x n_kb output-channel blocks held
// in registers.
// Per pixel it loads n_kb gradient vectors once and broadcasts each of the n_c input
// scalars once, feeding n_kb FMAs: (n_kb + n_c) loads per n_c * n_kb FMAs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "jit/dtype.h"
#include "jit/isa.h"
#include "jit/jit_kernel.h"

namespace dc {

struct UpdKernelSpec {
  Isa isa = Isa::avx512;
  DataType dt = DataType::f32;
  int n_c = 8;   // input channels of the tile
  int n_kb = 3;  // output-channel blocks of the tile

  int v() const { return vlen(isa); }
  int es() const { return elem_bytes(dt); }  // bytes per element
  std::string name() const;
};

struct UpdCallArgs {
  const float* x;         // input: channel c0 of its block, at the first pixel
  const float* dy;        // output gradient: block kb0, at the first pixel
  float* dw;              // dW[kb0][cb][r][s][c0][0]
  int64_t n_imgs;         // images (>= 1)
  int64_t n_rows, n_px;   // the pixel rectangle; n_rows = 0 just writes zeros (or keeps dw)
  int64_t flags;          // kAccumulate (fwd_kernel.h): add to dw instead of overwriting it
  int64_t x_img_stride;   // bytes from one image to the next in the input
  int64_t dy_img_stride;  // bytes from one image to the next in the output gradient
  int64_t x_row_stride;   // bytes from one pixel row to the next in the input
  int64_t x_px_stride;    // bytes from one pixel to the next in the input (stride * V elements)
  int64_t dy_row_stride;  // bytes from one row to the next in the output gradient
  int64_t dy_kb_stride;   // bytes per output-channel block of the output gradient
  int64_t dw_kb_stride;   // bytes per output-channel block of dW
};

using UpdKernelFn = void (*)(const UpdCallArgs*);

std::unique_ptr<JitGenerator> make_upd_kernel(const UpdKernelSpec& spec);
int upd_vector_registers(const UpdKernelSpec& spec);

}  // namespace dc
