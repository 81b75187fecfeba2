// Batch norm on blocked activations (N, ceil(C/V), H, W, V), contiguous, with C real
// channels: the batch statistics, the fused apply (scale and shift, residual add, ReLU) and
// the fused backward. Every loop streams its tensors once per pass, one vector of V channel
// lanes per pixel, and runs one thread's share of the pixels (tid of nthreads). Outputs
// keep the padded lanes (channels C and up) exactly zero whatever the inputs hold there.
// Each has a scalar twin (*_ref) for the tests.
//
// bf16 activations: every pass also takes uint16_t tensors holding bf16 in the layout of the
// bf16 kernels, (N, ceil(C/32), H, W, 32) (shape.v = 32), and needs the avx512_bf16 level
// (AVX512_BF16). The math is fp32 and the statistics are summed in double, as for fp32
// activations; the per-channel coefficients and parameters stay fp32, padded to whole blocks
// of 32; bf16 outputs are rounded to nearest even as the bf16 kernels round (bf16_from_float).
#pragma once

#include <cstdint>
#include <vector>

namespace dc {

// A blocked activation of c real channels in blocks of v lanes: 16 or 8 for fp32, 32 for bf16.
struct BlockedShape {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int v = 16;

  int64_t cb() const { return (c + v - 1) / v; }
  int64_t padded() const { return cb() * v; }
  // Pixels of one (image, channel block) plane, and of the whole tensor.
  int64_t plane() const { return h * w; }
  int64_t pixels() const { return n * cb() * h * w; }
  // The values each channel's statistics run over: N * H * W.
  int64_t per_channel() const { return n * h * w; }
};

// Throws unless s is a bf16 layout (v = 32) and the active level (jit/isa.h: the CPU's, capped
// by TORCH_DIRECTCONV_ISA) is avx512_bf16 or above, naming `who`.
void check_bf16_shape(const BlockedShape& s, const char* who);

// Threads worth waking for a loop that streams `floats` floats (1 to max_threads): a share
// much below a quarter of a megabyte is over before a pool thread is awake.
int eltwise_threads(int64_t floats, int max_threads);

// ---- statistics -----------------------------------------------------------------------

// Per-channel mean and biased variance over (N, H, W). Each thread sums x - shift and its
// square in double (differences and squares exact), shift being the channel's value at the
// first pixel of the first image: neither the cancellation of E[x^2] - E[x]^2 on a large mean
// nor a long fp32 sum loses digits, and as the shift is common to every thread their sums
// simply add up.
int64_t bn_stats_partial_size(const BlockedShape& s);  // doubles per thread
void bn_stats_share(const BlockedShape& s, const float* x, double* partial, int tid, int nthreads);
// mean and var get s.c floats each; NaN when there is no value to average (N * H * W = 0).
void bn_stats_finish(const BlockedShape& s, const float* x, const double* partials, int nthreads, float* mean,
                     float* var);
void bn_stats_ref(const BlockedShape& s, const float* x, float* mean, float* var);
void bn_stats_share(const BlockedShape& s, const uint16_t* x, double* partial, int tid, int nthreads);
void bn_stats_finish(const BlockedShape& s, const uint16_t* x, const double* partials, int nthreads, float* mean,
                     float* var);
void bn_stats_ref(const BlockedShape& s, const uint16_t* x, float* mean, float* var);

// ---- running statistics ---------------------------------------------------------------

// nn.BatchNorm2d's update after a training batch: batches (num_batches_tracked, when not
// null) counts it; factor = momentum, or without one (the cumulative average)
// 1 / batches (0 without a counter, as torch). Returns the factor.
double running_stats_factor(bool has_momentum, double momentum, int64_t* batches);
// running = factor * batch + (1 - factor) * running over c channels, in double as torch's batch
// norm, the variance unbiased (var * count / (count - 1), count values per channel). Either
// running statistic may be null (not tracked).
void update_running_stats(int64_t c, const float* mean, const float* var, int64_t count, double factor,
                          float* running_mean, float* running_var);

// ---- apply ----------------------------------------------------------------------------

// The per-channel map y = (x - center) * scale + shift, each padded to whole blocks with zeros.
// The subtraction comes first so that a large mean cancels exactly, before any rounding.
struct ChannelAffine {
  std::vector<float> center, scale, shift;
};
// A batch norm's: center = mean, scale = weight / sqrt(var + eps), shift = bias (weight and
// bias may be null: one and zero).
ChannelAffine bn_affine(int64_t c, int v, const float* mean, const float* var, double eps, const float* weight,
                        const float* bias);
// A folded scale and shift: center = 0.
ChannelAffine scale_shift_affine(int64_t c, int v, const float* scale, const float* shift);
// out[i] = 1 / sqrt(var[i] + eps) for i < c, in double, rounded to float (as torch's batch
// norm), on vectors: one channel at a time, ResNet's 2048 channels cost microseconds.
void inv_std(const float* var, double eps, int64_t c, float* out);

// y = affine(x) (+ residual when not null), then ReLU when asked.
void bn_apply_share(const BlockedShape& s, const ChannelAffine& a, const float* x, const float* residual, bool relu,
                    float* y, int tid, int nthreads);
void bn_apply_ref(const BlockedShape& s, const ChannelAffine& a, const float* x, const float* residual, bool relu,
                  float* y);
void bn_apply_share(const BlockedShape& s, const ChannelAffine& a, const uint16_t* x, const uint16_t* residual,
                    bool relu, uint16_t* y, int tid, int nthreads);
void bn_apply_ref(const BlockedShape& s, const ChannelAffine& a, const uint16_t* x, const uint16_t* residual, bool relu,
                  uint16_t* y);

// ---- backward -------------------------------------------------------------------------

// The backward of y = relu?((x - mean) * invstd * weight + bias + residual), where
// invstd = 1 / sqrt(var + eps). With g = grad_y, masked by y > 0 when the forward had a
// ReLU, and xhat = (x - mean) * invstd (sums over N, H, W):
//   grad_bias = sum g,  grad_weight = sum g * xhat,  grad_residual = g,
//   grad_x = weight * invstd * (g - grad_bias / M - xhat * grad_weight / M)  (train: the
//            statistics are the batch's own, M = N * H * W values each)
//   grad_x = weight * invstd * g  (eval: the statistics are constants).
// T is the activations' type: float, or uint16_t for bf16 (grad_y, y, x, grad_x and
// grad_residual; the statistics, the weight and their gradients stay fp32).
template <typename T>
struct BnBackwardArgsT {
  BlockedShape shape;
  const T* grad_y = nullptr;
  const T* y = nullptr;  // the forward's output when it ended in a ReLU, else null
  const T* x = nullptr;
  const float* mean = nullptr;  // c floats
  const float* var = nullptr;   // c floats
  double eps = 0;
  const float* weight = nullptr;  // c floats, or null for ones
  bool train = true;
  // The outputs, null when not wanted: blocked like x, and c floats for the parameters.
  T* grad_x = nullptr;
  T* grad_residual = nullptr;
  float* grad_weight = nullptr;
  float* grad_bias = nullptr;
};

// At most two passes. Train with grad_x: pass 0 sums (writing grad_residual), pass 1 writes
// grad_x (reading g back from grad_residual when that was written). Otherwise one pass
// does everything. Use: for each pass, run_share on every thread, then finish_pass.
template <typename T>
class BnBackwardT {
 public:
  explicit BnBackwardT(const BnBackwardArgsT<T>& a);
  int passes() const { return passes_; }
  int64_t partial_size() const { return 2 * a_.shape.padded(); }  // doubles per thread
  void run_share(int pass, double* partial, int tid, int nthreads) const;
  void finish_pass(int pass, const double* partials, int nthreads);

  // One pass's work, in the form the vector loops take (public for them).
  struct Pass {
    const T* g;  // grad_y, or g itself when mask is false
    const T* y;  // ReLU mask source, or null
    const T* x;  // when diff is needed (sums, or grad_x in train)
    T* g_out;
    T* grad_x;
    bool sums;
  };

 private:
  Pass pass(int i) const;
  BnBackwardArgsT<T> a_;
  int passes_ = 1;
  bool sums_ = false;
  // grad_x = k * g + b * (x - mean) + d per channel, padded with zeros.
  std::vector<float> mean_, invstd_, k_, b_, d_;
};
using BnBackwardArgs = BnBackwardArgsT<float>;
using BnBackward = BnBackwardT<float>;
using BnBackwardArgsBf16 = BnBackwardArgsT<uint16_t>;
using BnBackwardBf16 = BnBackwardT<uint16_t>;
extern template class BnBackwardT<float>;
extern template class BnBackwardT<uint16_t>;

template <typename T>
void bn_backward_ref(const BnBackwardArgsT<T>& a);

}  // namespace dc
