#include "conv/paths.h"

#include "conv/fwd_plan.h"
#include "jit/amx_fwd_kernel.h"

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

std::string bf16_fwd_fallback_reason(Isa active, Isa detected, int64_t groups) {
  if (active < Isa::avx512_bf16) {
    const std::string level = isa_name(active);
    if (detected >= Isa::avx512_bf16)
      return "bf16 convolutions need the avx512_bf16 or amx level; TORCH_DIRECTCONV_ISA caps it at " + level;
    return "bf16 convolutions need the avx512_bf16 or amx level; this CPU and OS offer " +
           std::string(isa_name(detected));
  }
  if (groups != 1)
    return "bf16 grouped convolutions (groups=" + std::to_string(groups) + ") are not covered by the JIT";
  return "";
}

bool bf16_fwd_fits(const ConvDesc& d) {
  constexpr int64_t kMaxKernel = int64_t{1} << 20;  // make_bf16_fwd_plan's limit
  return d.dt == DataType::bf16 && jit_fits(d, kAmxBlock) && d.p() >= 1 && d.q() >= 1 && d.r <= kMaxKernel &&
         d.s <= kMaxKernel && d.dil_w <= kMaxKernel && d.s * d.dil_w <= kMaxKernel;
}

std::string bf16_conv_fallback_reason(Isa active, Isa detected, const ConvDesc& d) {
  std::string why = bf16_fwd_fallback_reason(active, detected, 1);
  if (why.empty() && !bf16_fwd_fits(d))
    why = "a bf16 convolution with no channels, or with a stride, padding, dilation or kernel beyond what the bf16 "
          "kernels address";
  return why;
}

}  // namespace dc
