// The input gradient of a convolution as forward convolutions (DESIGN.md section 5).
//
// Stride 1 is one forward convolution by duality: grad_output convolved with the weights
// flipped in R and S, C and K swapped. A strided layer splits its input pixels into
// stride_h x stride_w phases; the pixels of phase (a, b), rows a, a + stride_h, ... and
// columns b, b + stride_w, ..., receive exactly the kernel taps r with
// (a + pad_t - r * dil_h) divisible by stride_h (and likewise for s), and over those taps
// they are a stride-1 convolution of grad_output. Each phase runs on the forward kernels
// and writes straight into its pixels through a strided output view.
#pragma once

#include <cstdint>
#include <vector>

#include "conv/conv_desc.h"
#include "conv/fwd_plan.h"

namespace dc {

struct BwdDataPhase {
  int64_t a = 0, b = 0;               // first input row and column of the phase
  int64_t rows = 0, cols = 0;         // input pixels of the phase
  std::vector<int64_t> taps_r, taps_s;  // the forward kernel's taps it receives, ascending
  // The forward problem over grad_output (n, K channels, P x Q) that yields the phase's
  // rows x cols pixels of C channels; its kernel tap (i, j) is the forward tap
  // (taps_r[n_r - 1 - i], taps_s[n_s - 1 - j]). Unset (k = 0) when no tap reaches the phase.
  // Its input is grad_output from row crop_t and column crop_l on: sub.h x sub.w of the
  // P x Q pixels (the rest are never read by this phase).
  ConvDesc sub;
  int64_t crop_t = 0, crop_l = 0;
  bool empty() const { return taps_r.empty() || taps_s.empty(); }
};

// The phases of the input gradient of `d` (one group), all stride_h * stride_w of them,
// phases without pixels left out: at least one, for any valid geometry.
std::vector<BwdDataPhase> bwd_data_phases(const ConvDesc& d);

// How phase ph's forward problem (ph.sub) reads the blocked output gradient
// (N, Kb, P, Q, V) and writes the blocked input gradient (N, Cb, H, W, V): the layouts to
// add to its plan options, and the element offsets of its first input and output pixel.
void bwd_data_phase_layout(const ConvDesc& d, const BwdDataPhase& ph, int v, FwdPlanOptions* options,
                           int64_t* src_off, int64_t* dst_off);

}  // namespace dc
