// Pooling on blocked activations (N, ceil(C/V), H, W, V), contiguous, with C real channels:
// max and average pooling with torch's options, and the global average that leaves the
// blocked layout for the classifier. One vector of V channel lanes per pixel; each function
// runs one thread's share (tid of nthreads); padded lanes of every output are exactly zero.
// Each has a scalar twin (*_ref) for the tests.
//
// bf16: each also takes uint16_t tensors holding bf16 in the bf16 kernels' layout (in.v = 32,
// as conv/blocked_eltwise.h), on AVX512_BF16, with the same rules: maxima are exact, sums are
// fp32 and rounded once (a backward adds a plane's windows in fp32, in scratch of the
// thread, and rounds each input-gradient row once no later window reaches it),
// and the global average's (N, C) output and the gradient it takes stay fp32.
#pragma once

#include <cstdint>
#include <string>

#include "conv/blocked_eltwise.h"

namespace dc {

// A 2-D pooling window over a blocked input, with torch's semantics for every field.
struct PoolDesc {
  BlockedShape in;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  bool ceil_mode = false;

  // Output size, as torch's pooling_output_shape: ceil_mode rounds up, but a last window
  // that would start in the right or bottom padding is dropped.
  int64_t p() const { return out_size(in.h, kh, sh, ph, dh); }
  int64_t q() const { return out_size(in.w, kw, sw, pw, dw); }
  BlockedShape out() const { return {in.n, in.c, p(), q(), in.v}; }
  // Empty when torch's max_pool2d / avg_pool2d would take it, else what is wrong.
  std::string validate() const;
  // The divisor of avg_pool2d at output (oh, ow), with torch's rules.
  int64_t avg_divisor(int64_t oh, int64_t ow, bool count_include_pad, int64_t divisor_override) const;

 private:
  int64_t out_size(int64_t size, int64_t k, int64_t s, int64_t pad, int64_t d) const;
};

// As F.max_pool2d: the first maximum of each window in row-major order, NaN propagating.
void max_pool_fwd_share(const PoolDesc& d, const float* x, float* y, int tid, int nthreads);
// The input gradient (d.in) of max_pool2d from the input x and the forward's output y (no
// indices are kept): each window's argmax, the first tap equal to y, gets the output's
// gradient; a plane whose y holds a NaN searches as the forward does instead. Threads take
// whole (image, channel block) planes, as overlapping windows add into shared pixels.
void max_pool_bwd_share(const PoolDesc& d, const float* x, const float* y, const float* grad_y, float* grad_x, int tid,
                        int nthreads);

// Average pooling options: divisor_override 0 means none.
struct AvgPoolOpts {
  bool count_include_pad = true;
  int64_t divisor_override = 0;
};
void avg_pool_fwd_share(const PoolDesc& d, const AvgPoolOpts& o, const float* x, float* y, int tid, int nthreads);
void avg_pool_bwd_share(const PoolDesc& d, const AvgPoolOpts& o, const float* grad_y, float* grad_x, int tid,
                        int nthreads);

// The mean over (H, W) of each channel: y is (N, C), unblocked. NaN when H * W = 0.
void global_avg_pool_fwd_share(const BlockedShape& s, const float* x, float* y, int tid, int nthreads);
// grad_x (blocked) = grad_y (N, C) / (H * W) at every pixel.
void global_avg_pool_bwd_share(const BlockedShape& s, const float* grad_y, float* grad_x, int tid, int nthreads);

void max_pool_fwd_share(const PoolDesc& d, const uint16_t* x, uint16_t* y, int tid, int nthreads);
void max_pool_bwd_share(const PoolDesc& d, const uint16_t* x, const uint16_t* y, const uint16_t* grad_y,
                        uint16_t* grad_x, int tid, int nthreads);
void avg_pool_fwd_share(const PoolDesc& d, const AvgPoolOpts& o, const uint16_t* x, uint16_t* y, int tid,
                        int nthreads);
void avg_pool_bwd_share(const PoolDesc& d, const AvgPoolOpts& o, const uint16_t* grad_y, uint16_t* grad_x, int tid,
                        int nthreads);
void global_avg_pool_fwd_share(const BlockedShape& s, const uint16_t* x, float* y, int tid, int nthreads);
void global_avg_pool_bwd_share(const BlockedShape& s, const float* grad_y, uint16_t* grad_x, int tid, int nthreads);

void max_pool_fwd_ref(const PoolDesc& d, const float* x, float* y);
void max_pool_bwd_ref(const PoolDesc& d, const float* x, const float* grad_y, float* grad_x);
void avg_pool_fwd_ref(const PoolDesc& d, const AvgPoolOpts& o, const float* x, float* y);
void avg_pool_bwd_ref(const PoolDesc& d, const AvgPoolOpts& o, const float* grad_y, float* grad_x);
void global_avg_pool_fwd_ref(const BlockedShape& s, const float* x, float* y);
void max_pool_fwd_ref(const PoolDesc& d, const uint16_t* x, uint16_t* y);
void max_pool_bwd_ref(const PoolDesc& d, const uint16_t* x, const uint16_t* grad_y, uint16_t* grad_x);
void avg_pool_fwd_ref(const PoolDesc& d, const AvgPoolOpts& o, const uint16_t* x, uint16_t* y);
void avg_pool_bwd_ref(const PoolDesc& d, const AvgPoolOpts& o, const uint16_t* grad_y, uint16_t* grad_x);
void global_avg_pool_fwd_ref(const BlockedShape& s, const uint16_t* x, float* y);

}  // namespace dc
