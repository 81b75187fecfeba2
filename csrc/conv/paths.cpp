#include "conv/paths.h"

#include "conv/fwd_plan.h"

namespace dc {

bool groups_fit_blocks(int64_t groups, int64_t kg, int64_t cg, int64_t V) {
  return groups == 1 || div_up(kg, V) * V * div_up(cg, V) * V <= 2 * kg * cg;
}

bool jit_covers_groups(int64_t groups, int64_t k, int64_t cg, int64_t V) {
  return groups <= 1 || is_depthwise(groups, k, cg) || groups_fit_blocks(groups, k / groups, cg, V);
}

bool nchw_gemm_preferred(const ConvDesc& d, Isa isa) {
  return d.h * d.w >= kNchwGemmMinPixels && nchw_1x1_applies(d, isa);
}

}  // namespace dc
