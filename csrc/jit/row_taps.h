// What a kernel row of a convolution tile looks like to a generator: which input columns
// its taps read, and which of them fall on padding.
#pragma once

#include <string>

#include "jit/dtype.h"
#include "jit/isa.h"

namespace dc {

struct RowTaps {
  Isa isa = Isa::avx512;
  DataType dt = DataType::f32;
  int s = 1;  // kernel columns
  int stride_w = 1, dil_w = 1;
  // Border tiles skip the taps that fall on padding: iw0 is the tile's first input column
  // (may be negative), w the input width. Interior tiles read every tap.
  bool border = false;
  int iw0 = 0, w = 0;

  int v() const { return vlen(isa); }
  int es() const { return elem_bytes(dt); }  // bytes per element
  bool tap_valid(int pixel, int col) const {
    const int iw = iw0 + pixel * stride_w + col * dil_w;
    return !border || (iw >= 0 && iw < w);
  }
  // "kw3s1d1", and for border tiles "_bm1w56" (iw0 = -1, w = 56): the name parts of the taps.
  std::string taps_name() const;
  std::string border_name() const;
};

}  // namespace dc
