#include "conv/bwd_data.h"

#include <algorithm>
#include <numeric>

namespace dc {

namespace {
// One dimension of a phase: for input index a (mod stride), the taps it receives and the
// stride-1 problem over the output gradient of size out_n that yields its n_in pixels.
struct PhaseDim {
  std::vector<int64_t> taps;
  int64_t n_in = 0, dil = 1, pad_lo = 0, pad_hi = 0;
  int64_t crop = 0, size = 0;  // the output-gradient span read: [crop, crop + size)
};

void phase_dim(int64_t a, int64_t in, int64_t out_n, int64_t kernel, int64_t stride, int64_t pad, int64_t dil,
               PhaseDim* pd) {
  pd->n_in = a < in ? (in - a + stride - 1) / stride : 0;
  for (int64_t r = 0; r < kernel; ++r)
    if ((a + pad - r * dil) % stride == 0) pd->taps.push_back(r);
  if (pd->taps.empty() || pd->n_in == 0) return;
  // Taps step by stride / gcd, and the output-gradient index they read by dil / gcd.
  pd->dil = dil / std::gcd(stride, dil);
  // Pixel i of the phase reads output-gradient index i + (a + pad - r * dil) / stride; the
  // last tap reads the smallest, which is the forward problem's first tap.
  const int64_t n_t = static_cast<int64_t>(pd->taps.size());
  pd->pad_lo = -(a + pad - pd->taps.back() * dil) / stride;
  pd->pad_hi = pd->n_in + pd->dil * (n_t - 1) - pd->pad_lo - out_n;
  // A negative padding is a crop: those output-gradient entries are never read.
  pd->crop = std::max<int64_t>(0, -pd->pad_lo);
  pd->size = out_n - pd->crop - std::max<int64_t>(0, -pd->pad_hi);
  pd->pad_lo = std::max<int64_t>(0, pd->pad_lo);
  pd->pad_hi = std::max<int64_t>(0, pd->pad_hi);
  if (pd->size < 1) pd->taps.clear();  // every tap reads past the output gradient: a zero phase
}
}  // namespace

std::vector<BwdDataPhase> bwd_data_phases(const ConvDesc& d) {
  std::vector<BwdDataPhase> phases;
  const int64_t P = d.p(), Q = d.q();
  // Only the first h (w) remainders have pixels: a stride wider than the input gives fewer
  // phases than stride_h x stride_w. Each dimension is worked out once.
  std::vector<PhaseDim> rows(static_cast<size_t>(std::min(d.stride_h, d.h)));
  std::vector<PhaseDim> cols(static_cast<size_t>(std::min(d.stride_w, d.w)));
  for (size_t a = 0; a < rows.size(); ++a) phase_dim(a, d.h, P, d.r, d.stride_h, d.pad_t, d.dil_h, &rows[a]);
  for (size_t b = 0; b < cols.size(); ++b) phase_dim(b, d.w, Q, d.s, d.stride_w, d.pad_l, d.dil_w, &cols[b]);
  for (size_t a = 0; a < rows.size(); ++a)
    for (size_t b = 0; b < cols.size(); ++b) {
      const PhaseDim &pr = rows[a], &ps = cols[b];
      BwdDataPhase ph;
      ph.a = a;
      ph.b = b;
      ph.rows = pr.n_in;
      ph.cols = ps.n_in;
      ph.taps_r = pr.taps;
      ph.taps_s = ps.taps;
      if (!ph.empty()) {
        ConvDesc& s = ph.sub;
        s.n = d.n;
        s.c = d.k;
        s.h = pr.size;
        s.w = ps.size;
        ph.crop_t = pr.crop;
        ph.crop_l = ps.crop;
        s.k = d.c;
        s.r = static_cast<int64_t>(pr.taps.size());
        s.s = static_cast<int64_t>(ps.taps.size());
        s.stride_h = s.stride_w = 1;
        s.dil_h = pr.dil;
        s.dil_w = ps.dil;
        s.pad_t = pr.pad_lo;
        s.pad_b = pr.pad_hi;
        s.pad_l = ps.pad_lo;
        s.pad_r = ps.pad_hi;
      } else {
        ph.sub.k = 0;
      }
      phases.push_back(ph);
    }
  return phases;
}

void bwd_data_phase_layout(const ConvDesc& d, const BwdDataPhase& ph, int v, FwdPlanOptions* options,
                           int64_t* src_off, int64_t* dst_off) {
  const int64_t P = d.p(), Q = d.q(), cb = div_up(d.c, v), kb = div_up(d.k, v);
  if (d.stride_h > 1 || d.stride_w > 1)
    options->dst = {d.stride_w, d.stride_h * d.w * v, d.h * d.w * v, cb * d.h * d.w * v};
  if (ph.sub.h != P || ph.sub.w != Q) options->src = {Q * v, P * Q * v, kb * P * Q * v};
  *src_off = (ph.crop_t * Q + ph.crop_l) * v;
  *dst_off = (ph.a * d.w + ph.b) * v;
}

}  // namespace dc
