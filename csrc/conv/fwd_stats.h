// Batch-norm statistics of a forward's output from the stats post-op (FwdPostOps::stats):
// each tile leaves, per output channel, fp32 sums of d = y - shift and of d^2 over its few
// pixels (at most 2 x 28). Every tile of a channel has the same shift, so the tiles' sums
// add up in double exactly as Chan's pairwise merge of (count, mean, M2) would give them;
// what rounding there is comes from the fp32 sums within a tile, relative to E[d^2] =
// var + (mean - shift)^2. That costs the variance digits only when the mean lies far from
// the shift, which fwd_stats_finish reports, so that the caller recomputes such a layer's
// statistics exactly (bn_stats_share on the output).
#pragma once

#include <cstdint>
#include <vector>

#include "conv/fwd_plan.h"

namespace dc {

// |mean - shift| beyond this many standard deviations k: the fp32 tile sums may cost the
// variance more than a few 1e-5 of itself (at most 28 roundings per tile, each up to 6e-8
// of E[d^2] = var (1 + k^2): 3e-5 at k = 4 in the worst case, far less in practice, as
// roundings of random sign do not all add up).
constexpr double kStatsMaxShiftStds = 4.0;

// Per-channel mean and biased variance over (N, P, Q) of the first `channels` channels,
// from the tile sums the plan's calls wrote (plan.stats_floats) and the shift they used
// (Kb * V). Returns false when some channel's mean is more than kStatsMaxShiftStds standard
// deviations from its shift (or the variance is zero and the mean is not the shift): the
// values are then not to be trusted to fp32 accuracy.
bool fwd_stats_finish(const FwdPlan& plan, const float* sums, const float* shift, int64_t channels, float* mean,
                      float* var);

// The merge itself, for any pass's slots (fwd_stats_finish's, bf16_fwd_stats_finish's):
// tile t holds, for each of its output blocks [kb0, kb0 + n_oc) of V lanes, V sums of
// d = y - shift and then V sums of d^2, at sums + t.off; `lanes` is the blocks' lanes in all
// (the shift's length) and `count` the pixels each channel's sums cover.
bool stats_merge(const std::vector<FwdStatsTile>& tiles, int V, int64_t lanes, double count, const float* sums,
                 const float* shift, int64_t channels, float* mean, float* var);

}  // namespace dc
