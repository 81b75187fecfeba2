// The convolution exactly as the user asked for it, in blocked layouts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "jit/dtype.h"

namespace dc {

struct ConvDesc {
  int64_t n = 1, c = 1, h = 1, w = 1;  // input
  int64_t k = 1, r = 1, s = 1;          // output channels, kernel rows, kernel columns
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_t = 0, pad_b = 0, pad_l = 0, pad_r = 0;
  int64_t dil_h = 1, dil_w = 1;
  // Groups of c input and k output channels each, side by side (c and k count one group's
  // channels; benchdnn's g). A plan, a kernel and a driver's offsets are one group's.
  int64_t groups = 1;
  DataType dt = DataType::f32;  // the element type of every tensor

  int64_t elem_bytes() const { return dc::elem_bytes(dt); }

  // Output size; 0 when the dilated kernel does not fit the padded input. In 128-bit
  // arithmetic, as paddings and dilations may come near 2^63 (saturates at INT64_MAX).
  int64_t p() const { return out_size(wide(h) + pad_t + pad_b - wide(dil_h) * (r - 1) - 1, stride_h); }
  int64_t q() const { return out_size(wide(w) + pad_l + pad_r - wide(dil_w) * (s - 1) - 1, stride_w); }
  double flops() const { return 2.0 * n * k * c * r * s * p() * q(); }

  // benchdnn-style problem string, e.g. mb1ic64ih56iw56oc64oh56ow56kh3kw3sh1sw1ph1pw1.
  std::string to_string() const;
  // Empty when the description is valid, else what is wrong.
  std::string validate() const;

 private:
  using wide = __int128;
  static int64_t out_size(wide span, int64_t stride) {
    if (span < 0 || stride < 1) return 0;
    const wide n = span / stride + 1;
    return n > INT64_MAX ? INT64_MAX : static_cast<int64_t>(n);
  }
};

// Parses a benchdnn-style problem string; missing fields take benchdnn's defaults
// (iw = ih, kw = kh, ...). Throws std::invalid_argument naming the bad token.
ConvDesc parse_conv_desc(const std::string& s);

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether the JIT kernels take this geometry with V-channel blocks. The kernels encode the
// offsets within a channel block's (padded) plane, and a tile's strides, as 32-bit
// displacements, and their specs keep strides, dilations and kernel sizes as int, so every
// such offset must fit in 31 bits. What they do not take runs on torch's convolution,
// never truncated.
bool jit_fits(const ConvDesc& d, int64_t V);

// Kernel rows [*r_lo, *r_lo + *n_r) that fall inside the input for output row oh.
void valid_kernel_rows(const ConvDesc& d, int64_t oh, int64_t* r_lo, int64_t* n_r);
// Splits n into near-equal parts of at most `most` each.
std::vector<int> split_even(int64_t n, int64_t most);

// The L2 cache of one core, as the OS reports it (1 MiB when it does not): the plans size
// their blocks by it.
int64_t l2_bytes();

}  // namespace dc
