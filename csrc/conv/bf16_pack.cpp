#include "conv/bf16_pack.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "conv/bwd_data.h"
#include "conv/simd_transpose.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/isa.h"

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

// --- AVX-512 -----------------------------------------------------------------------------
// A block's source rows are read as 32-bit words holding fp32 bits (a bf16 value shifted up),
// rounded in place (the bf16 is then the high half), transposed 16 x 16 and paired.

bool taps_contiguous(const Bf16PackSource& src) {
  return src.st[3] == 1 && src.st[2] == src.s && src.st[1] == src.r * src.s;
}

// bf16_from_float on 16 lanes, into the high halves: nearest even; zeros and denormals to a
// signed zero; NaNs quiet.
__attribute__((target("avx512f"))) inline __m512i round_bf16(__m512i u) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i exp = _mm512_and_si512(u, _mm512_set1_epi32(0x7f800000));
  const __m512i mag = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                               _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
  r = _mm512_mask_mov_epi32(r, _mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512()),
                            _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epi32_mask(mag, _mm512_set1_epi32(0x7f800000)),
                            _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
  return r;
}

// Up to 16 consecutive source elements as fp32 bits (the rest zero), rounded for fp32; bf16
// values are kept exactly as they are. Masked: no element past `count` is read.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i load_words(const void* p, DataType dt, int count) {
  const __mmask16 m = static_cast<__mmask16>((1u << count) - 1);
  if (dt == DataType::bf16)
    return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16);
  return round_bf16(_mm512_maskz_loadu_epi32(m, p));
}

__attribute__((target("avx512f"))) inline __m512i word(const int32_t* words, int64_t i) {
  return _mm512_loadu_si512(words + i * 16);
}

// One row of B-tile pairs from two vectors of rounded words: lane n is (a's bf16, b's bf16).
__attribute__((target("avx512f,avx512bw"))) inline void store_pairs(uint16_t* dst, __m512i a, __m512i b) {
  _mm512_storeu_si512(dst, _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(a, 16), b));
}

// A full forward block: for each half (16 output channels), the 32 * R * S contiguous source
// elements of each of its rows are transposed 16 at a time into words[j][n] (j = c * R*S + t),
// then tap t's row `pair` pairs words[2 pair * R*S + t] with words[(2 pair + 1) * R*S + t].
__attribute__((target("avx512f,avx512bw,avx512vl"))) void fwd_block_avx512(const Bf16PackSource& src, int64_t kbi,
                                                                          int64_t cbi, uint16_t* block,
                                                                          std::vector<int32_t>& words) {
  const int64_t rs = src.r * src.s, len = kBlock * rs, esize = src.dt == DataType::bf16 ? 2 : 4;
  words.resize(len * 16);
  int32_t* wd = words.data();
  const char* base = static_cast<const char*>(src.w) + (cbi * kBlock * rs) * esize;
  for (int half = 0; half < 2; ++half) {
    const char* rows = base + (kbi * kBlock + half * 16) * src.st[0] * esize;
    for (int64_t j0 = 0; j0 < len; j0 += 16) {
      __m512i r[16];
      for (int n = 0; n < 16; ++n) r[n] = load_words(rows + (n * src.st[0] + j0) * esize, src.dt, 16);
      transpose16_epi32(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(wd + (j0 + i) * 16, r[i]);
    }
    for (int64_t t = 0; t < rs; ++t)
      for (int pair = 0; pair < 16; ++pair)
        store_pairs(block + t * kTapElems + half * 512 + pair * 32, word(wd, 2 * pair * rs + t),
                    word(wd, (2 * pair + 1) * rs + t));
  }
}

// A full input-gradient block (dx block cbi, dy block kbi): words[k][half][t] holds, lane n,
// source (k, half * 16 + n, t), from the 16 rows of R * S taps of each (k, half) transposed
// (16 taps at a time); rotated tap (i, j)'s row `pair` of tile `half` pairs words[2 pair] and
// words[2 pair + 1].
__attribute__((target("avx512f,avx512bw,avx512vl"))) void bwd_block_avx512(const ConvDesc& d,
                                                                          const Bf16PackSource& src,
                                                                          const std::vector<BwdSlice>& slices,
                                                                          int64_t cbi, int64_t kbi, uint16_t* packed,
                                                                          std::vector<int32_t>& words) {
  const int64_t rs = d.r * d.s, esize = src.dt == DataType::bf16 ? 2 : 4, kb = div_up(d.k, kBlock);
  words.resize(kBlock * 2 * rs * 16);
  int32_t* wd = words.data();
  const char* base = static_cast<const char*>(src.w) + (kbi * kBlock * src.st[0] + cbi * kBlock * rs) * esize;
  // A row's next block (the next input block, or the next rows'): its first segment is what
  // the following call reads, and short runs at a large stride leave the hardware
  // prefetchers no time to find it.
  const int64_t seg = kBlock * rs * esize, cb = div_up(d.c, kBlock);
  const char* next = cbi + 1 < cb ? base + seg : base + kBlock * src.st[0] * esize - cbi * seg;
  for (int64_t kl = 0; kl < kBlock; ++kl) {
    if (kbi + 1 < kb || cbi + 1 < cb)
      for (int64_t off = 0; off < seg; off += 64) _mm_prefetch(next + kl * src.st[0] * esize + off, _MM_HINT_T0);
    for (int half = 0; half < 2; ++half) {
      const char* rows = base + (kl * src.st[0] + half * 16 * rs) * esize;
      for (int64_t t0 = 0; t0 < rs; t0 += 16) {
        const int count = static_cast<int>(std::min<int64_t>(16, rs - t0));
        __m512i r[16];
        for (int n = 0; n < 16; ++n) r[n] = load_words(rows + (n * rs + t0) * esize, src.dt, count);
        transpose16_epi32(r);
        for (int i = 0; i < count; ++i) _mm512_storeu_si512(wd + ((kl * 2 + half) * rs + t0 + i) * 16, r[i]);
      }
    }
  }
  for (const BwdSlice& sl : slices) {
    const int64_t ra = static_cast<int64_t>(sl.ph->taps_r.size()), sa = static_cast<int64_t>(sl.ph->taps_s.size());
    uint16_t* out = packed + sl.start + (cbi * kb + kbi) * sl.block;
    for (int64_t i = 0; i < ra; ++i)
      for (int64_t j = 0; j < sa; ++j, out += kTapElems) {
        const int64_t t = sl.ph->taps_r[ra - 1 - i] * d.s + sl.ph->taps_s[sa - 1 - j];
        for (int half = 0; half < 2; ++half)
          for (int pair = 0; pair < 16; ++pair)
            store_pairs(out + half * 512 + pair * 32, word(wd, ((2 * pair) * 2 + half) * rs + t),
                        word(wd, ((2 * pair + 1) * 2 + half) * rs + t));
      }
  }
}

// fp32 source of a full input-gradient block: first the block's tap-major rows, rows[t][kl] =
// the 32 input channels of (output channel kbi * 32 + kl, tap t) rounded to bf16 (one gather of
// 16 channels R * S apart, or a plain load at 1 x 1, per half); then each B-tile row is one
// 16-bit interleave of rows 2 pair and 2 pair + 1. Every source element is read once, and no
// transpose runs on what it does not use.
struct InterleaveIndices {
  alignas(64) int16_t high_halves[32];  // the bf16 (high half) of a's 16 words, then b's
  alignas(64) int16_t pairs[2][32];     // lane 2 n + e: row e's channel half * 16 + n
  constexpr InterleaveIndices() : high_halves(), pairs() {
    for (int i = 0; i < 32; ++i) high_halves[i] = static_cast<int16_t>(i < 16 ? 2 * i + 1 : 32 + 2 * (i - 16) + 1);
    for (int half = 0; half < 2; ++half)
      for (int j = 0; j < 32; ++j) pairs[half][j] = static_cast<int16_t>((j % 2) * 32 + half * 16 + j / 2);
  }
};
constexpr InterleaveIndices kInterleave;

__attribute__((target("avx512f,avx512bw,avx512vl"))) void bwd_block_f32_avx512(const ConvDesc& d,
                                                                              const Bf16PackSource& src,
                                                                              const std::vector<BwdSlice>& slices,
                                                                              int64_t cbi, int64_t kbi,
                                                                              uint16_t* packed,
                                                                              std::vector<uint16_t>& rows) {
  const int64_t rs = d.r * d.s, kb = div_up(d.k, kBlock);
  rows.resize(rs * kTapElems);
  uint16_t* tr = rows.data();
  const float* base = static_cast<const float*>(src.w) + kbi * kBlock * src.st[0] + cbi * kBlock * rs;
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(rs)));
  const __m512i high = _mm512_load_si512(kInterleave.high_halves);
  for (int64_t kl = 0; kl < kBlock; ++kl) {
    const float* row = base + kl * src.st[0];
    for (int64_t t = 0; t < rs; ++t) {
      __m512i a, b;
      if (rs == 1) {
        a = _mm512_loadu_si512(row);
        b = _mm512_loadu_si512(row + 16);
      } else {
        a = _mm512_i32gather_epi32(lanes, row + t, 4);
        b = _mm512_i32gather_epi32(lanes, row + 16 * rs + t, 4);
      }
      _mm512_storeu_si512(tr + (t * kBlock + kl) * kBlock,
                          _mm512_permutex2var_epi16(round_bf16(a), high, round_bf16(b)));
    }
  }
  const __m512i pairs[2] = {_mm512_load_si512(kInterleave.pairs[0]), _mm512_load_si512(kInterleave.pairs[1])};
  for (const BwdSlice& sl : slices) {
    const int64_t ra = static_cast<int64_t>(sl.ph->taps_r.size()), sa = static_cast<int64_t>(sl.ph->taps_s.size());
    uint16_t* out = packed + sl.start + (cbi * kb + kbi) * sl.block;
    for (int64_t i = 0; i < ra; ++i)
      for (int64_t j = 0; j < sa; ++j, out += kTapElems) {
        const uint16_t* tap = tr + (sl.ph->taps_r[ra - 1 - i] * d.s + sl.ph->taps_s[sa - 1 - j]) * kTapElems;
        for (int pair = 0; pair < 16; ++pair) {
          const __m512i even = _mm512_loadu_si512(tap + 2 * pair * kBlock);
          const __m512i odd = _mm512_loadu_si512(tap + (2 * pair + 1) * kBlock);
          for (int half = 0; half < 2; ++half)
            _mm512_storeu_si512(out + half * 512 + pair * 32, _mm512_permutex2var_epi16(even, pairs[half], odd));
        }
      }
  }
}

bool has_avx512() {
  static const bool yes = detected_isa() >= Isa::avx512;
  return yes;
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
  if (folded || !has_avx512() || !taps_contiguous(src)) return pack_bf16_fwd_scalar(src, folded, packed, tid, nthreads);
  const FwdInner in(src, false);
  const Range r = share(in.kb * in.cb, tid, nthreads);
  std::vector<int32_t> words;  // 16 lanes an entry
  for (int64_t b = r.begin; b < r.end; ++b) {
    const int64_t kbi = b / in.cb, cbi = b % in.cb;
    uint16_t* block = packed + b * in.taps * kTapElems;
    if ((kbi + 1) * kBlock <= in.k && (cbi + 1) * kBlock <= in.c) fwd_block_avx512(src, kbi, cbi, block, words);
    else fwd_block_scalar(src, false, in, b, block);
  }
}

void pack_bf16_bwd_data(const ConvDesc& d, const Bf16PackSource& src, uint16_t* packed, int tid, int nthreads) {
  if (!has_avx512() || !taps_contiguous(src)) return pack_bf16_bwd_data_scalar(d, src, packed, tid, nthreads);
  const std::vector<BwdDataPhase> phases = bwd_data_phases(d);
  const std::vector<BwdSlice> slices = bwd_slices(d, phases);
  const int64_t cb = div_up(d.c, kBlock), kb = div_up(d.k, kBlock);
  const Range r = share(kb * cb, tid, nthreads);
  std::vector<int32_t> words;  // 16 lanes an entry
  std::vector<uint16_t> rows;  // tap-major rows of an fp32 block
  for (int64_t b = r.begin; b < r.end; ++b) {
    const int64_t cbi = b % cb, kbi = b / cb;
    if ((kbi + 1) * kBlock > d.k || (cbi + 1) * kBlock > d.c) bwd_block_scalar(d, src, slices, cbi, kbi, packed);
    else if (src.dt == DataType::f32) bwd_block_f32_avx512(d, src, slices, cbi, kbi, packed, rows);
    else bwd_block_avx512(d, src, slices, cbi, kbi, packed, words);
  }
}

}  // namespace dc
