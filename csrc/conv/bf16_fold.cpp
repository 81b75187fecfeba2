#include "conv/bf16_fold.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "conv/bf16_fwd.h"
#include "conv/bf16_layout.h"
#include "jit/isa.h"

namespace dc {

namespace {

constexpr int kLanes = 32;

bool has_avx512() {
  static const bool yes = detected_isa() >= Isa::avx512;
  return yes;
}

// One input row of channel c as bf16 in buf[0, width): buf[j] is column j - pad_l, zero
// outside [0, W).
void round_row(const ConvDesc& d, const uint8_t* row, bool src_bf16, int64_t col_stride, uint16_t nan, uint16_t* buf,
               int64_t width) {
  const int64_t lo = std::min<int64_t>(width, d.pad_l), hi = std::min<int64_t>(width, d.pad_l + d.w);
  std::fill(buf, buf + lo, 0);
  if (src_bf16) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(row);
    for (int64_t j = lo; j < hi; ++j) buf[j] = s[(j - d.pad_l) * col_stride];
  } else {
    const float* s = reinterpret_cast<const float*>(row);
    if (col_stride == 1 && has_avx512()) {
      f32_row_to_bf16(s + (lo - d.pad_l), hi - lo, nan, buf + lo);
    } else {
      for (int64_t j = lo; j < hi; ++j) buf[j] = bf16_from_float_as_torch(s[(j - d.pad_l) * col_stride], nan);
    }
  }
  std::fill(buf + std::max(lo, hi), buf + width, 0);
}

// Pixels [0, q) of a folded row from the rounded rows of its C channels (each `width`
// words, 8 readable past it), at C <= 4, S <= 8 and no column dilation: per pixel, each
// channel's S taps are 8 consecutive words, gathered into one vector (channel c in words
// 8c..8c+7) and permuted to lane s * C + c.
__attribute__((target("avx512f,avx512bw"))) void fold_pixels_avx512(const ConvDesc& d, const uint16_t* bufs,
                                                                       int64_t width, uint16_t* out, int64_t q) {
  alignas(64) uint16_t idx[kLanes];
  const int cs = static_cast<int>(d.c * d.s);
  for (int l = 0; l < kLanes; ++l) idx[l] = l < cs ? static_cast<uint16_t>(8 * (l % d.c) + l / d.c) : 0;
  const __m512i perm = _mm512_load_si512(idx);
  const __mmask32 used = cs == kLanes ? ~0u : (1u << cs) - 1;
  for (int64_t p = 0; p < q; ++p) {
    const int64_t col = p * d.stride_w;
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bufs + col)));
    if (d.c > 1) v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bufs + width + col)), 1);
    if (d.c > 2)
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bufs + 2 * width + col)), 2);
    if (d.c > 3)
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bufs + 3 * width + col)), 3);
    _mm512_storeu_si512(out + p * kLanes, _mm512_maskz_permutexvar_epi16(used, perm, v));
  }
}

void fold_pixels_scalar(const ConvDesc& d, const uint16_t* bufs, int64_t width, uint16_t* out, int64_t q) {
  for (int64_t p = 0; p < q; ++p) {
    uint16_t* o = out + p * kLanes;
    std::memset(o, 0, kLanes * sizeof(uint16_t));
    for (int64_t s = 0; s < d.s; ++s)
      for (int64_t c = 0; c < d.c; ++c) o[s * d.c + c] = bufs[c * width + p * d.stride_w + s * d.dil_w];
  }
}

}  // namespace

void bf16_fold_nchw(const ConvDesc& d, const void* src, bool src_bf16, const int64_t st[4], uint16_t nan,
                    uint16_t* dst, int tid, int nthreads) {
  if (!bf16_fwd_folds_columns(d))
    throw std::invalid_argument("bf16_fold_nchw: the layer does not fold its kernel columns (needs S > 1, C * S <= 32)");
  const int64_t hp = d.h + d.pad_t + d.pad_b, q = d.q(), rows = d.n * hp;
  const int64_t begin = rows * tid / nthreads, end = rows * (tid + 1) / nthreads;
  if (begin >= end) return;
  // Columns j - pad_l for j in [0, width): every tap of every pixel, and 8 words readable
  // past the last one (the vector path reads each channel's 8 taps at once).
  const int64_t width = (q - 1) * d.stride_w + (d.s - 1) * d.dil_w + 1;
  std::vector<uint16_t> bufs(d.c * width + 8, 0);
  const bool vec = has_avx512() && d.c <= 4 && d.s <= 8 && d.dil_w == 1;
  const int64_t elem = src_bf16 ? 2 : 4;
  const uint8_t* base = static_cast<const uint8_t*>(src);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / hp, ih = row % hp - d.pad_t;
    uint16_t* out = dst + row * q * kLanes;
    if (ih < 0 || ih >= d.h) {
      std::memset(out, 0, q * kLanes * sizeof(uint16_t));
      continue;
    }
    for (int64_t c = 0; c < d.c; ++c)
      round_row(d, base + (n * st[0] + c * st[1] + ih * st[2]) * elem, src_bf16, st[3], nan, bufs.data() + c * width,
                width);
    if (vec) fold_pixels_avx512(d, bufs.data(), width, out, q);
    else fold_pixels_scalar(d, bufs.data(), width, out, q);
  }
}

}  // namespace dc
