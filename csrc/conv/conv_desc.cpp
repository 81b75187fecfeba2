#include "conv/conv_desc.h"

#include <cctype>
#include <map>
#include <sstream>
#include <stdexcept>

#include <unistd.h>

namespace dc {

std::string ConvDesc::to_string() const {
  std::ostringstream o;
  if (groups != 1) o << "g" << groups;
  o << "mb" << n << "ic" << c * groups << "ih" << h;
  if (w != h) o << "iw" << w;
  o << "oc" << k * groups << "oh" << p();
  if (q() != p()) o << "ow" << q();
  o << "kh" << r;
  if (s != r) o << "kw" << s;
  o << "sh" << stride_h;
  if (stride_w != stride_h) o << "sw" << stride_w;
  o << "ph" << pad_t;
  if (pad_b != pad_t) o << "pb" << pad_b;
  if (pad_l != pad_t || pad_r != pad_l) o << "pw" << pad_l;
  if (pad_r != pad_l) o << "pr" << pad_r;
  if (dil_h != 1 || dil_w != 1) {
    // benchdnn counts dilation from 0.
    o << "dh" << dil_h - 1;
    if (dil_w != dil_h) o << "dw" << dil_w - 1;
  }
  return o.str();
}

std::string ConvDesc::validate() const {
  std::ostringstream o;
  if (groups < 1) o << "groups must be >= 1, got " << groups;
  else if (n < 0) o << "batch size must be >= 0, got " << n;
  else if (c < 1 || k < 1) o << "channels must be >= 1, got ic" << c << " oc" << k;
  else if (h < 1 || w < 1) o << "input spatial size must be >= 1, got " << h << "x" << w;
  else if (r < 1 || s < 1) o << "kernel size must be >= 1, got " << r << "x" << s;
  else if (stride_h < 1 || stride_w < 1) o << "stride must be >= 1, got " << stride_h << "x" << stride_w;
  else if (dil_h < 1 || dil_w < 1) o << "dilation must be >= 1, got " << dil_h << "x" << dil_w;
  else if (pad_t < 0 || pad_b < 0 || pad_l < 0 || pad_r < 0) o << "padding must be >= 0";
  else if (static_cast<__int128>(h) + pad_t + pad_b > INT64_MAX || static_cast<__int128>(w) + pad_l + pad_r > INT64_MAX ||
           static_cast<__int128>(dil_h) * (r - 1) > INT64_MAX || static_cast<__int128>(dil_w) * (s - 1) > INT64_MAX)
    o << "padding or dilation too large: the padded input or the dilated kernel exceeds 2^63";
  else if (p() < 1 || q() < 1)
    o << "kernel size " << dil_h * (r - 1) + 1 << "x" << dil_w * (s - 1) + 1
      << " (dilated) is larger than the padded input " << h + pad_t + pad_b << "x" << w + pad_l + pad_r;
  return o.str();
}

bool jit_fits(const ConvDesc& d, int64_t V) {
  using wide = __int128;
  constexpr wide kMax = INT32_MAX;
  if (d.n < 0 || d.c < 1 || d.k < 1 || d.h < 1 || d.w < 1 || d.r < 1 || d.s < 1 || d.stride_h < 1 ||
      d.stride_w < 1 || d.dil_h < 1 || d.dil_w < 1 || d.pad_t < 0 || d.pad_b < 0 || d.pad_l < 0 || d.pad_r < 0)
    return false;
  const wide hp = wide(d.h) + d.pad_t + d.pad_b, wp = wide(d.w) + d.pad_l + d.pad_r;
  const wide vec_bytes = wide(V) * d.elem_bytes();
  // A row of a tile spans at most kMaxTilePixels strides. A dilated kernel larger than the
  // padded input is left to validate(), which says so.
  constexpr wide kMaxTilePixels = 64;
  return hp * wp * vec_bytes <= kMax && wide(d.r) * d.s * vec_bytes * V <= kMax &&
         wide(d.stride_h) * wp * vec_bytes <= kMax && wide(d.stride_w) * vec_bytes * kMaxTilePixels <= kMax &&
         wide(d.dil_h) * (d.r - 1) <= kMax && wide(d.dil_w) * (d.s - 1) <= kMax &&
         // The specs keep each as an int, even where it changes nothing (a 1-tap dilation).
         d.dil_h <= kMax && d.dil_w <= kMax && d.stride_h <= kMax && d.stride_w <= kMax;
}

void valid_kernel_rows(const ConvDesc& d, int64_t oh, int64_t* r_lo, int64_t* n_r) {
  int64_t lo = 0, hi = d.r;
  while (lo < d.r && oh * d.stride_h - d.pad_t + lo * d.dil_h < 0) ++lo;
  while (hi > lo && oh * d.stride_h - d.pad_t + (hi - 1) * d.dil_h >= d.h) --hi;
  *r_lo = lo;
  *n_r = hi - lo;
}

std::vector<int> split_even(int64_t n, int64_t most) {
  const int64_t parts = div_up(n, most);
  std::vector<int> out;
  for (int64_t i = 0; i < parts; ++i) out.push_back(static_cast<int>(n / parts + (i < n % parts ? 1 : 0)));
  return out;
}

ConvDesc parse_conv_desc(const std::string& str) {
  std::map<std::string, int64_t> f;
  size_t i = 0;
  while (i < str.size()) {
    size_t j = i;
    while (j < str.size() && std::isalpha(static_cast<unsigned char>(str[j]))) ++j;
    size_t k = j;
    while (k < str.size() && std::isdigit(static_cast<unsigned char>(str[k]))) ++k;
    if (j == i || k == j) throw std::invalid_argument("conv problem string: cannot parse '" + str.substr(i) + "' in '" + str + "'");
    f[str.substr(i, j - i)] = std::stoll(str.substr(j, k - j));
    i = k;
  }
  auto get = [&](const char* key, int64_t dflt) { auto it = f.find(key); return it == f.end() ? dflt : it->second; };
  ConvDesc d;
  d.n = get("mb", 2);  // benchdnn's default
  d.c = get("ic", 1);
  d.k = get("oc", 1);
  d.h = get("ih", 1);
  d.w = get("iw", d.h);
  d.r = get("kh", 1);
  d.s = get("kw", d.r);
  d.stride_h = get("sh", 1);
  d.stride_w = get("sw", d.stride_h);
  d.pad_t = get("ph", 0);
  d.pad_b = get("pb", d.pad_t);
  d.pad_l = get("pw", d.pad_t);
  d.pad_r = get("pr", d.pad_l);
  d.dil_h = get("dh", 0) + 1;
  d.dil_w = get("dw", d.dil_h - 1) + 1;
  // benchdnn's ic and oc count every group's channels.
  d.groups = get("g", 1);
  if (d.groups < 1 || d.c % d.groups || d.k % d.groups)
    throw std::invalid_argument("conv problem string: g" + std::to_string(d.groups) + " does not divide ic" +
                                std::to_string(d.c) + " and oc" + std::to_string(d.k) + " in '" + str + "'");
  d.c /= d.groups;
  d.k /= d.groups;
  return d;
}

int64_t l2_bytes() {
  static const int64_t bytes = [] {
    long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return b > 0 ? static_cast<int64_t>(b) : int64_t{1} << 20;
  }();
  return bytes;
}

namespace {
// Settled at load, before another thread can be inside it: no fork() finds it half done.
[[maybe_unused]] const int64_t g_l2_at_load = l2_bytes();
}  // namespace

}  // namespace dc
