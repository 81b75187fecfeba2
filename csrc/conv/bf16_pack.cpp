#include "conv/bf16_pack.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "conv/bwd_data.h"
#include "jit/amx_fwd_kernel.h"

namespace dc {

namespace {

constexpr int64_t kBlock = kAmxBlock;  // 32 channels
constexpr int64_t kTapElems = 1024;    // a tap's two B tiles

struct Range {
  int64_t begin, end;
};
Range share(int64_t items, int tid, int nthreads) { return {items * tid / nthreads, items * (tid + 1) / nthreads}; }

// The source element (k, c, tap t = r * S + s), rounded to bf16.
struct Reader {
  const Bf16PackSource& src;
  uint16_t operator()(int64_t k, int64_t c, int64_t t) const {
    const int64_t off = k * src.st[0] + c * src.st[1] + (t / src.s) * src.st[2] + (t % src.s) * src.st[3];
    return src.dt == DataType::bf16 ? static_cast<const uint16_t*>(src.w)[off]
                                    : bf16_from_float(static_cast<const float*>(src.w)[off]);
  }
};

// The forward's inner geometry: channels and taps (folded: C * S channels, R x 1 taps).
struct FwdInner {
  int64_t k, c, taps, kb, cb;
  FwdInner(const Bf16PackSource& src, bool folded)
      : k(src.k), c(folded ? src.c * src.s : src.c), taps(folded ? src.r : src.r * src.s),
        kb(div_up(src.k, kBlock)), cb(div_up(c, kBlock)) {}
};

// Block b of (output block, input block): its taps' B tiles, [tap][half][pair][n][e] with
// output channel half * 16 + n and input channel 2 pair + e.
void fwd_block_scalar(const Bf16PackSource& src, bool folded, const FwdInner& in, int64_t b, uint16_t* block) {
  const Reader at{src};
  const int64_t kbi = b / in.cb, cbi = b % in.cb;
  std::memset(block, 0, in.taps * kTapElems * sizeof(uint16_t));
  const int64_t k_end = std::min(kBlock, in.k - kbi * kBlock), c_end = std::min(kBlock, in.c - cbi * kBlock);
  for (int64_t kl = 0; kl < k_end; ++kl)
    for (int64_t cl = 0; cl < c_end; ++cl) {
      const int64_t k = kbi * kBlock + kl, c = cbi * kBlock + cl;
      uint16_t* dst = block + (kl / 16) * 512 + (cl / 2) * 32 + (kl % 16) * 2 + cl % 2;
      for (int64_t t = 0; t < in.taps; ++t)
        // Folded: inner channel c is (channel c % C, kernel column c / C) of kernel row t.
        dst[t * kTapElems] = folded ? at(k, c % src.c, t * src.s + c / src.c) : at(k, c, t);
    }
}

// The phases of d that have taps, and where each one's (dx block, dy block) blocks start.
struct BwdSlice {
  const BwdDataPhase* ph;
  int64_t start, block;  // elements
};
std::vector<BwdSlice> bwd_slices(const ConvDesc& d, const std::vector<BwdDataPhase>& phases) {
  const int64_t cb = div_up(d.c, kBlock), kb = div_up(d.k, kBlock);
  std::vector<BwdSlice> slices;
  int64_t start = 0;
  for (const BwdDataPhase& ph : phases) {
    if (ph.empty()) continue;
    const int64_t block = static_cast<int64_t>(ph.taps_r.size() * ph.taps_s.size()) * kTapElems;
    slices.push_back({&ph, start, block});
    start += cb * kb * block;
  }
  return slices;
}

// Block (dx block cbi, dy block kbi) of every phase: rotated tap (i, j) is forward tap
// (taps_r[R_a - 1 - i], taps_s[S_b - 1 - j]); B tile `half`, row `pair`: dx channel
// half * 16 + n of dy channels 2 pair, 2 pair + 1.
void bwd_block_scalar(const ConvDesc& d, const Bf16PackSource& src, const std::vector<BwdSlice>& slices, int64_t cbi,
                      int64_t kbi, uint16_t* packed) {
  const Reader at{src};
  const int64_t kb = div_up(d.k, kBlock);
  const int64_t n_c = std::min(kBlock, d.c - cbi * kBlock), n_k = std::min(kBlock, d.k - kbi * kBlock);
  for (const BwdSlice& sl : slices) {
    const int64_t ra = static_cast<int64_t>(sl.ph->taps_r.size()), sa = static_cast<int64_t>(sl.ph->taps_s.size());
    uint16_t* out = packed + sl.start + (cbi * kb + kbi) * sl.block;
    for (int64_t i = 0; i < ra; ++i)
      for (int64_t j = 0; j < sa; ++j, out += kTapElems) {
        const int64_t t = sl.ph->taps_r[ra - 1 - i] * d.s + sl.ph->taps_s[sa - 1 - j];
        for (int64_t e = 0; e < kTapElems; ++e) {
          const int64_t half = e / 512, pair = e / 32 % 16, n = e / 2 % 16, kl = 2 * pair + e % 2, cl = half * 16 + n;
          out[e] = kl < n_k && cl < n_c ? at(kbi * kBlock + kl, cbi * kBlock + cl, t) : 0;
        }
      }
  }
}

}  // namespace

void pack_bf16_fwd_scalar(const Bf16PackSource& src, bool folded, uint16_t* packed, int tid, int nthreads) {
  const FwdInner in(src, folded);
  const Range r = share(in.kb * in.cb, tid, nthreads);
  for (int64_t b = r.begin; b < r.end; ++b) fwd_block_scalar(src, folded, in, b, packed + b * in.taps * kTapElems);
}

void pack_bf16_bwd_data_scalar(const ConvDesc& d, const Bf16PackSource& src, uint16_t* packed, int tid,
                               int nthreads) {
  const std::vector<BwdDataPhase> phases = bwd_data_phases(d);
  const std::vector<BwdSlice> slices = bwd_slices(d, phases);
  const int64_t cb = div_up(d.c, kBlock), kb = div_up(d.k, kBlock);
  const Range r = share(kb * cb, tid, nthreads);
  for (int64_t b = r.begin; b < r.end; ++b) bwd_block_scalar(d, src, slices, b % cb, b / cb, packed);
}

void pack_bf16_fwd(const Bf16PackSource& src, bool folded, uint16_t* packed, int tid, int nthreads) {
  pack_bf16_fwd_scalar(src, folded, packed, tid, nthreads);
}

void pack_bf16_bwd_data(const ConvDesc& d, const Bf16PackSource& src, uint16_t* packed, int tid, int nthreads) {
  pack_bf16_bwd_data_scalar(d, src, packed, tid, nthreads);
}

}  // namespace dc
