#include "jit/row_taps.h"

namespace dc {

std::string RowTaps::taps_name() const {
  return "kw" + std::to_string(s) + "s" + std::to_string(stride_w) + "d" + std::to_string(dil_w);
}

std::string RowTaps::border_name() const {
  if (!border) return "";
  return "_b" + std::string(iw0 < 0 ? "m" : "") + std::to_string(iw0 < 0 ? -iw0 : iw0) + "w" + std::to_string(w);
}

}  // namespace dc
