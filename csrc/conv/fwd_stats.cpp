#include "conv/fwd_stats.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace dc {

bool stats_merge(const std::vector<FwdStatsTile>& tiles, int V, int64_t lanes, double count, const float* sums,
                 const float* shift, int64_t channels, float* mean, float* var) {
  std::vector<double> s1(lanes, 0.0), s2(lanes, 0.0);
  for (const FwdStatsTile& t : tiles)
    for (int oc = 0; oc < t.n_oc; ++oc) {
      const float* tile = sums + t.off + 2 * static_cast<int64_t>(oc) * V;
      double* d1 = s1.data() + (t.kb0 + oc) * V;
      double* d2 = s2.data() + (t.kb0 + oc) * V;
      for (int k = 0; k < V; ++k) {
        d1[k] += tile[k];
        d2[k] += tile[V + k];
      }
    }
  bool sound = true;
  for (int64_t c = 0; c < channels; ++c) {
    const double m = s1[c] / count, v = std::max(0.0, s2[c] / count - m * m);
    mean[c] = static_cast<float>(shift[c] + m);
    var[c] = static_cast<float>(v);
    if (!(m * m <= kStatsMaxShiftStds * kStatsMaxShiftStds * v) && m != 0.0) sound = false;
  }
  return sound;
}

bool fwd_stats_finish(const FwdPlan& plan, const float* sums, const float* shift, int64_t channels, float* mean,
                      float* var) {
  const double count = static_cast<double>(plan.desc.n) * plan.desc.p() * plan.desc.q();
  return stats_merge(plan.stats_tiles, plan.v(), plan.kb * plan.v(), count, sums, shift, channels, mean, var);
}

}  // namespace dc
