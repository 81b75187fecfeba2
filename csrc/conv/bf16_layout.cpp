#include "conv/bf16_layout.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "jit/amx_fwd_kernel.h"

namespace dc {

namespace {

constexpr int64_t kLanes = kAmxBlock;

// Rows [begin, end) of the n * ceil(c/32) * h rows of the blocked tensor, for thread tid.
struct RowShare {
  int64_t begin, end;
  RowShare(int64_t n, int64_t c, int64_t h, int tid, int nthreads) {
    const int64_t rows = n * ((c + kLanes - 1) / kLanes) * h;
    begin = rows * tid / nthreads;
    end = rows * (tid + 1) / nthreads;
  }
};

// The permutations of one perfect-shuffle round: the two halves of (a, b) interleaved.
alignas(64) constexpr uint16_t kShuffleLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) constexpr uint16_t kShuffleHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

// A 32 x 32 transpose of 16-bit elements: five perfect-shuffle rounds, each row i and row
// i + 16 interleaved into rows 2i and 2i + 1. The bf16 layouts are only reached at the amx
// level, whose CPUs have AVX-512BW.
__attribute__((target("avx512f,avx512bw"))) void transpose32(__m512i r[32]) {
  const __m512i lo = _mm512_load_si512(kShuffleLo), hi = _mm512_load_si512(kShuffleHi);
  for (int round = 0; round < 5; ++round) {
    __m512i t[32];
    for (int i = 0; i < 16; ++i) {
      t[2 * i] = _mm512_permutex2var_epi16(r[i], lo, r[i + 16]);
      t[2 * i + 1] = _mm512_permutex2var_epi16(r[i], hi, r[i + 16]);
    }
    for (int i = 0; i < 32; ++i) r[i] = t[i];
  }
}

// One NCHW row (nc channel rows cstride apart, unit pixel stride) into w pixels of 32 lanes.
// Masked loads read no element past the row, so no tail reads outside the tensor.
__attribute__((target("avx512f,avx512bw"))) void nchw_row_to_rows32(const uint16_t* in, int64_t cstride,
                                                                    int64_t nc, int64_t w, uint16_t* out) {
  for (int64_t x0 = 0; x0 < w; x0 += kLanes) {
    const int64_t n_px = std::min(kLanes, w - x0);
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << n_px) - 1);
    __m512i r[32];
    for (int64_t ci = 0; ci < kLanes; ++ci)
      r[ci] = ci < nc ? _mm512_maskz_loadu_epi16(mask, in + ci * cstride + x0) : _mm512_setzero_si512();
    transpose32(r);
    for (int64_t j = 0; j < n_px; ++j) _mm512_storeu_si512(out + (x0 + j) * kLanes, r[j]);
  }
}

// The inverse: w pixels of 32 lanes into nc NCHW channel rows.
__attribute__((target("avx512f,avx512bw"))) void rows32_to_nchw_row(const uint16_t* in, int64_t nc, int64_t w,
                                                                    uint16_t* out, int64_t cstride) {
  for (int64_t x0 = 0; x0 < w; x0 += kLanes) {
    const int64_t n_px = std::min(kLanes, w - x0);
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << n_px) - 1);
    __m512i r[32];
    for (int64_t j = 0; j < kLanes; ++j)
      r[j] = j < n_px ? _mm512_loadu_si512(in + (x0 + j) * kLanes) : _mm512_setzero_si512();
    transpose32(r);
    for (int64_t ci = 0; ci < nc; ++ci) _mm512_mask_storeu_epi16(out + ci * cstride + x0, mask, r[ci]);
  }
}

// 16 fp32 values rounded as bf16_from_float_as_torch, each in the high half of its 32-bit
// lane (the low half zero; `nan` is a NaN's bits there): the integer rounding ignores MXCSR,
// so denormals stay.
__attribute__((target("avx512f"))) inline __m512i round_hi16(__m512 v, __m512i nan) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  const __m512i hi = _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), nan, hi);
}

// The same in the low half of each lane.
__attribute__((target("avx512f"))) inline __m512i round_lo16(__m512 v, __m512i nan) {
  return _mm512_srli_epi32(round_hi16(v, nan), 16);
}

// 32 fp32 values (lo then hi) as 32 bf16.
__attribute__((target("avx512f"))) inline __m512i round32(__m512 lo, __m512 hi, __m512i nan) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(round_lo16(lo, nan))),
                            _mm512_cvtepi32_epi16(round_lo16(hi, nan)), 1);
}

// A NaN's bf16 bits in the high half of each 32-bit lane, as round_hi16 takes them.
__attribute__((target("avx512f"))) inline __m512i nan_hi16(uint16_t nan) {
  return _mm512_set1_epi32(static_cast<int>(uint32_t{nan} << 16));
}

// One fp32 NCHW row of at most 4 channels (nc channel rows cstride apart, unit pixel stride)
// into w pixels of 32 lanes: per 16 pixels, the channel pairs rounded into two vectors of
// 32-bit lanes, then each pixel's two lanes moved to the front of its zeroed 64 bytes (one
// permute per pixel, where a 32 x 32 transpose would take five).
__attribute__((target("avx512f"))) void f32_row_to_rows32_narrow(const float* in, int64_t cstride, int64_t nc,
                                                                 int64_t w, uint16_t nan_bits, uint16_t* out) {
  const __m512i nan = nan_hi16(nan_bits);
  const __m512i pair_lanes = _mm512_setr_epi32(0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t x0 = 0; x0 < w; x0 += 16) {
    const int64_t n_px = std::min<int64_t>(16, w - x0);
    const __mmask16 mask = static_cast<__mmask16>((1u << n_px) - 1);
    __m512 ch[4];
    for (int64_t ci = 0; ci < 4; ++ci)
      ch[ci] = ci < nc ? _mm512_maskz_loadu_ps(mask, in + ci * cstride + x0) : _mm512_setzero_ps();
    // A zero fp32 rounds to a zero bf16, so missing channels need no other care.
    const __m512i d0 = _mm512_or_si512(round_lo16(ch[0], nan), round_hi16(ch[1], nan));
    const __m512i d1 = _mm512_or_si512(round_lo16(ch[2], nan), round_hi16(ch[3], nan));
    for (int64_t j = 0; j < n_px; ++j) {
      const __m512i idx = _mm512_add_epi32(pair_lanes, _mm512_set1_epi32(static_cast<int>(j)));
      _mm512_storeu_si512(out + (x0 + j) * kLanes, _mm512_maskz_permutex2var_epi32(0x3, d0, idx, d1));
    }
  }
}

// One fp32 NCHW row of any number of channels up to 32: per 32 pixels, each channel's values
// rounded into one vector, then the 32 x 32 transpose.
__attribute__((target("avx512f,avx512bw"))) void f32_row_to_rows32_wide(const float* in, int64_t cstride,
                                                                        int64_t nc, int64_t w, uint16_t nan_bits,
                                                                        uint16_t* out) {
  const __m512i nan = nan_hi16(nan_bits);
  for (int64_t x0 = 0; x0 < w; x0 += kLanes) {
    const int64_t n_px = std::min(kLanes, w - x0);
    const __mmask16 lo = static_cast<__mmask16>((1u << std::min<int64_t>(16, n_px)) - 1);
    const __mmask16 hi = static_cast<__mmask16>((1u << std::max<int64_t>(0, n_px - 16)) - 1);
    __m512i r[32];
    for (int64_t ci = 0; ci < kLanes; ++ci) {
      const float* ch = in + ci * cstride + x0;
      r[ci] = ci < nc ? round32(_mm512_maskz_loadu_ps(lo, ch), _mm512_maskz_loadu_ps(hi, ch + 16), nan)
                      : _mm512_setzero_si512();
    }
    transpose32(r);
    for (int64_t j = 0; j < n_px; ++j) _mm512_storeu_si512(out + (x0 + j) * kLanes, r[j]);
  }
}

// One fp32 channels_last row (each pixel's nc channels contiguous, pixels pstride apart).
__attribute__((target("avx512f,avx512bw"))) void f32_cl_row_to_rows32(const float* in, int64_t pstride,
                                                                      int64_t nc, int64_t w, uint16_t nan_bits,
                                                                      uint16_t* out) {
  const __m512i nan = nan_hi16(nan_bits);
  const __mmask16 lo = static_cast<__mmask16>((1u << std::min<int64_t>(16, nc)) - 1);
  const __mmask16 hi = static_cast<__mmask16>((1u << std::max<int64_t>(0, nc - 16)) - 1);
  for (int64_t x = 0; x < w; ++x) {
    const float* px = in + x * pstride;
    const __m512i row = round32(_mm512_maskz_loadu_ps(lo, px), _mm512_maskz_loadu_ps(hi, px + 16), nan);
    _mm512_storeu_si512(out + x * kLanes, row);
  }
}

// One pixel's nc channels; a whole block is a fixed-size copy the compiler inlines.
inline void copy_pixel(uint16_t* dst, const uint16_t* src, int64_t nc) {
  if (nc == kLanes)
    std::memcpy(dst, src, kLanes * 2);
  else
    std::memcpy(dst, src, nc * 2);
}

}  // namespace

void bf16_to_rows32(const uint16_t* src, const int64_t st[4], int64_t n, int64_t c, int64_t h, int64_t w,
                    uint16_t* dst, int tid, int nthreads) {
  const int64_t cb = (c + kLanes - 1) / kLanes;
  const RowShare share(n, c, h, tid, nthreads);
  for (int64_t row = share.begin; row < share.end; ++row) {
    const int64_t ni = row / (cb * h), bi = row / h % cb, hi = row % h;
    const int64_t c0 = bi * kLanes, nc = std::min(kLanes, c - c0);
    const uint16_t* in = src + ni * st[0] + c0 * st[1] + hi * st[2];
    uint16_t* out = dst + row * w * kLanes;
    if (st[1] == 1) {  // channels_last: each pixel's channels are contiguous
      for (int64_t x = 0; x < w; ++x) {
        copy_pixel(out + x * kLanes, in + x * st[3], nc);
        if (nc < kLanes) std::memset(out + x * kLanes + nc, 0, (kLanes - nc) * 2);
      }
      continue;
    }
    if (st[3] == 1) {  // NCHW rows: 32 x 32 transposes
      nchw_row_to_rows32(in, st[1], nc, w, out);
      continue;
    }
    if (nc < kLanes) std::memset(out, 0, w * kLanes * 2);
    // Channel by channel: the reads run along the row (NCHW), the writes 64 bytes apart
    // within a row that stays in L1.
    for (int64_t ci = 0; ci < nc; ++ci) {
      const uint16_t* ch = in + ci * st[1];
      for (int64_t x = 0; x < w; ++x) out[x * kLanes + ci] = ch[x * st[3]];
    }
  }
}

void f32_to_rows32(const float* src, const int64_t st[4], int64_t n, int64_t c, int64_t h, int64_t w,
                   uint16_t nan, uint16_t* dst, int tid, int nthreads) {
  const int64_t cb = (c + kLanes - 1) / kLanes;
  const RowShare share(n, c, h, tid, nthreads);
  for (int64_t row = share.begin; row < share.end; ++row) {
    const int64_t ni = row / (cb * h), bi = row / h % cb, hi = row % h;
    const int64_t c0 = bi * kLanes, nc = std::min(kLanes, c - c0);
    const float* in = src + ni * st[0] + c0 * st[1] + hi * st[2];
    uint16_t* out = dst + row * w * kLanes;
    if (st[1] == 1) {
      f32_cl_row_to_rows32(in, st[3], nc, w, nan, out);
    } else if (st[3] == 1) {
      if (nc <= 4)
        f32_row_to_rows32_narrow(in, st[1], nc, w, nan, out);
      else
        f32_row_to_rows32_wide(in, st[1], nc, w, nan, out);
    } else {
      if (nc < kLanes) std::memset(out, 0, w * kLanes * 2);
      for (int64_t ci = 0; ci < nc; ++ci) {
        const float* ch = in + ci * st[1];
        for (int64_t x = 0; x < w; ++x) out[x * kLanes + ci] = bf16_from_float_as_torch(ch[x * st[3]], nan);
      }
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void f32_row_to_bf16(const float* src, int64_t count,
                                                                           uint16_t nan, uint16_t* dst) {
  const __m512i nan_lanes = nan_hi16(nan);
  for (int64_t i = 0; i < count; i += 16) {
    const int k = static_cast<int>(std::min<int64_t>(16, count - i));
    const __mmask16 m = static_cast<__mmask16>((1u << k) - 1);
    _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtepi32_epi16(round_lo16(_mm512_maskz_loadu_ps(m, src + i), nan_lanes)));
  }
}

void rows32_to_bf16(const uint16_t* src, int64_t n, int64_t c, int64_t h, int64_t w, uint16_t* dst,
                    const int64_t st[4], int tid, int nthreads) {
  const int64_t cb = (c + kLanes - 1) / kLanes;
  const RowShare share(n, c, h, tid, nthreads);
  for (int64_t row = share.begin; row < share.end; ++row) {
    const int64_t ni = row / (cb * h), bi = row / h % cb, hi = row % h;
    const int64_t c0 = bi * kLanes, nc = std::min(kLanes, c - c0);
    const uint16_t* in = src + row * w * kLanes;
    uint16_t* out = dst + ni * st[0] + c0 * st[1] + hi * st[2];
    if (st[1] == 1) {
      for (int64_t x = 0; x < w; ++x) copy_pixel(out + x * st[3], in + x * kLanes, nc);
      continue;
    }
    if (st[3] == 1) {
      rows32_to_nchw_row(in, nc, w, out, st[1]);
      continue;
    }
    for (int64_t ci = 0; ci < nc; ++ci) {
      uint16_t* ch = out + ci * st[1];
      for (int64_t x = 0; x < w; ++x) ch[x * st[3]] = in[x * kLanes + ci];
    }
  }
}

}  // namespace dc
