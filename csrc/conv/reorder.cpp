#include "conv/reorder.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "conv/conv_desc.h"
#include "jit/isa.h"

namespace dc {

namespace {
// The [begin, end) share of `total` items for thread tid.
void share(int64_t total, int tid, int nthreads, int64_t* begin, int64_t* end) {
  *begin = total * tid / nthreads;
  *end = total * (tid + 1) / nthreads;
}

// 8x8 float transpose in AVX2 registers: r[i] holds row i on entry, column i on exit.
__attribute__((target("avx2"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Lanes [0, n) of eight.
__attribute__((target("avx2"))) inline __m256i tail_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One row of a channel block: nv channel rows (stride cstride, unit pixel stride) into
// w pixels of v interleaved channels. Missing channels are written as zero.
__attribute__((target("avx2"))) void rows_to_block_avx2(const float* in, int64_t cstride, int nv, int64_t w, int v,
                                                        float* out) {
  int64_t x = 0;
  for (; x + 8 <= w; x += 8)
    for (int j0 = 0; j0 < v; j0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = j0 + i < nv ? _mm256_loadu_ps(in + (j0 + i) * cstride + x) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (x + i) * v + j0, r[i]);
    }
  if (x < w) {
    const int rem = static_cast<int>(w - x);
    const __m256i mask = tail_mask(rem);
    for (int j0 = 0; j0 < v; j0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = j0 + i < nv ? _mm256_maskload_ps(in + (j0 + i) * cstride + x, mask) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < rem; ++i) _mm256_storeu_ps(out + (x + i) * v + j0, r[i]);
    }
  }
}

// The inverse: w pixels of v interleaved channels into nv channel rows.
__attribute__((target("avx2"))) void block_to_rows_avx2(const float* in, int nv, int64_t w, int v, float* out,
                                                        int64_t cstride) {
  int64_t x = 0;
  for (; x + 8 <= w; x += 8)
    for (int j0 = 0; j0 < nv; j0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + (x + i) * v + j0);
      transpose8(r);
      for (int i = 0; i < 8 && j0 + i < nv; ++i) _mm256_storeu_ps(out + (j0 + i) * cstride + x, r[i]);
    }
  if (x < w) {
    const int rem = static_cast<int>(w - x);
    for (int j0 = 0; j0 < nv; j0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = i < rem ? _mm256_loadu_ps(in + (x + i) * v + j0) : _mm256_setzero_ps();
      transpose8(r);
      // Masked stores are slow on some cores: spill and copy the tail instead.
      alignas(32) float tmp[8];
      for (int i = 0; i < 8 && j0 + i < nv; ++i) {
        _mm256_store_ps(tmp, r[i]);
        std::memcpy(out + (j0 + i) * cstride + x, tmp, sizeof(float) * rem);
      }
    }
  }
}

// out[j * out_stride + i] = in[i * in_stride + j] for i < rows, j < cols (multiples of 8).
__attribute__((target("avx2"))) void transpose_block_avx2(const float* in, int64_t in_stride, int rows, int cols,
                                                          float* out, int64_t out_stride) {
  for (int i0 = 0; i0 < rows; i0 += 8)
    for (int j0 = 0; j0 < cols; j0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + (i0 + i) * in_stride + j0);
      transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (j0 + j) * out_stride + i0, r[j]);
    }
}

// The transpose of a v x (v * nt) block [k][c * nt + t] (rows in_stride apart), written as
// out[(t * v + c) * v + k]: the packed [t][c][k] of a weight block in one pass.
__attribute__((target("avx2"))) void transpose_to_taps_avx2(const float* in, int64_t in_stride, int v, int64_t nt,
                                                            float* out) {
  const int64_t cols = v * nt;
  for (int i0 = 0; i0 < v; i0 += 8)
    for (int64_t j0 = 0; j0 < cols; j0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + (i0 + i) * in_stride + j0);
      transpose8(r);
      for (int j = 0; j < 8; ++j) {
        const int64_t col = j0 + j, c = col / nt, t = col % nt;
        _mm256_storeu_ps(out + (t * v + c) * v + i0, r[j]);
      }
    }
}

// The inverse: packed [t][c][k] into the v rows [k][c * nt + t] (out_stride apart).
__attribute__((target("avx2"))) void transpose_from_taps_avx2(const float* in, int v, int64_t nt, float* out,
                                                              int64_t out_stride) {
  const int64_t cols = v * nt;
  for (int i0 = 0; i0 < v; i0 += 8)
    for (int64_t j0 = 0; j0 < cols; j0 += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) {
        const int64_t col = j0 + j, c = col / nt, t = col % nt;
        r[j] = _mm256_loadu_ps(in + (t * v + c) * v + i0);
      }
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (i0 + i) * out_stride + j0, r[i]);
    }
}

bool have_avx2() { return detected_isa() != Isa::none; }

}  // namespace

void reorder_to_blocked(const float* src, const int64_t st[4], int64_t n, int64_t c, int64_t h, int64_t w, int v,
                        float* dst, int tid, int nthreads) {
  const int64_t cb = div_up(c, v);
  int64_t b, e;
  if (st[3] == 1 && st[2] == w && v % 8 == 0 && have_avx2()) {
    // Dense rows: each channel's plane is one row of h * w pixels, with one tail at its end.
    share(n * cb, tid, nthreads, &b, &e);
    for (int64_t i = b; i < e; ++i) {
      const int64_t blk = i % cb, img = i / cb, c0 = blk * v;
      rows_to_block_avx2(src + img * st[0] + c0 * st[1], st[1], static_cast<int>(std::min<int64_t>(v, c - c0)), h * w,
                         v, dst + i * h * w * v);
    }
    return;
  }
  share(n * cb * h, tid, nthreads, &b, &e);
  for (int64_t i = b; i < e; ++i) {
    const int64_t y = i % h, blk = (i / h) % cb, img = i / (h * cb);
    const int64_t c0 = blk * v;
    const int nv = static_cast<int>(c - c0 < v ? c - c0 : v);
    float* out = dst + i * w * v;
    const float* in = src + img * st[0] + c0 * st[1] + y * st[2];
    if (st[3] == 1 && v % 8 == 0 && have_avx2()) {
      rows_to_block_avx2(in, st[1], nv, w, v, out);
      continue;
    }
    if (nv < v) std::memset(out, 0, sizeof(float) * w * v);
    if (st[1] == 1 && nv == v) {
      for (int64_t x = 0; x < w; ++x) std::memcpy(out + x * v, in + x * st[3], sizeof(float) * v);
    } else if (st[3] == 1) {
      for (int j = 0; j < nv; ++j) {
        const float* row = in + j * st[1];
        for (int64_t x = 0; x < w; ++x) out[x * v + j] = row[x];
      }
    } else {
      for (int64_t x = 0; x < w; ++x)
        for (int j = 0; j < nv; ++j) out[x * v + j] = in[j * st[1] + x * st[3]];
    }
  }
}

void reorder_from_blocked(const float* src, int64_t n, int64_t c, int64_t h, int64_t w, int v, float* dst,
                          const int64_t st[4], int tid, int nthreads) {
  const int64_t cb = div_up(c, v);
  int64_t b, e;
  if (st[3] == 1 && st[2] == w && v % 8 == 0 && have_avx2()) {
    // Dense rows: each channel's plane is one row of h * w pixels, with one tail at its end.
    share(n * cb, tid, nthreads, &b, &e);
    for (int64_t i = b; i < e; ++i) {
      const int64_t blk = i % cb, img = i / cb, c0 = blk * v;
      block_to_rows_avx2(src + i * h * w * v, static_cast<int>(std::min<int64_t>(v, c - c0)), h * w, v,
                         dst + img * st[0] + c0 * st[1], st[1]);
    }
    return;
  }
  share(n * cb * h, tid, nthreads, &b, &e);
  for (int64_t i = b; i < e; ++i) {
    const int64_t y = i % h, blk = (i / h) % cb, img = i / (h * cb);
    const int64_t c0 = blk * v;
    const int nv = static_cast<int>(c - c0 < v ? c - c0 : v);
    const float* in = src + i * w * v;
    float* out = dst + img * st[0] + c0 * st[1] + y * st[2];
    if (st[3] == 1 && v % 8 == 0 && have_avx2()) {
      block_to_rows_avx2(in, nv, w, v, out, st[1]);
      continue;
    }
    if (st[1] == 1 && nv == v) {
      for (int64_t x = 0; x < w; ++x) std::memcpy(out + x * st[3], in + x * v, sizeof(float) * v);
    } else if (st[3] == 1) {
      for (int j = 0; j < nv; ++j) {
        float* row = out + j * st[1];
        for (int64_t x = 0; x < w; ++x) row[x] = in[x * v + j];
      }
    } else {
      for (int64_t x = 0; x < w; ++x)
        for (int j = 0; j < nv; ++j) out[j * st[1] + x * st[3]] = in[x * v + j];
    }
  }
}

void reorder_weight_to_blocked_blocks(const float* src, const int64_t st[4], int64_t k, int64_t c, int64_t r,
                                      int64_t s, int v, int64_t begin, int64_t end, float* dst) {
  const int64_t cb = div_up(c, v), rs = r * s;
  // Contiguous (K, C, R, S) weights: a block's V kernel rows of V * R * S floats each are
  // read once, in order, and scattered within the L1-sized output block.
  const bool dense = st[3] == 1 && st[2] == s && st[1] == rs;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t ci = i % cb, ki = i / cb;
    float* out = dst + (i - begin) * rs * v * v;  // [r][s][c][k]
    const int nk = static_cast<int>(std::min<int64_t>(v, k - ki * v)), nc = static_cast<int>(std::min<int64_t>(v, c - ci * v));
    if (nk < v || nc < v) std::memset(out, 0, sizeof(float) * rs * v * v);
    if (dense && nk == v && nc == v && v % 8 == 0 && have_avx2()) {
      // The block is a V x (V * R * S) matrix [k][c * R * S + t]: transposed in 8x8 tiles,
      // each row [c * R * S + t] of V output channels stored straight at its place [t][c].
      const float* block = src + ki * v * st[0] + ci * v * st[1];
      if (rs == 1) {
        transpose_block_avx2(block, st[0], v, v, out, v);
        continue;
      }
      transpose_to_taps_avx2(block, st[0], v, rs, out);
      continue;
    }
    for (int jk = 0; jk < nk; ++jk) {
      const float* row = src + (ki * v + jk) * st[0] + ci * v * st[1];
      if (dense) {
        for (int jc = 0; jc < nc; ++jc)
          for (int64_t t = 0; t < rs; ++t) out[(t * v + jc) * v + jk] = row[jc * rs + t];
      } else {
        for (int jc = 0; jc < nc; ++jc)
          for (int64_t y = 0; y < r; ++y)
            for (int64_t x = 0; x < s; ++x) out[((y * s + x) * v + jc) * v + jk] = row[jc * st[1] + y * st[2] + x * st[3]];
      }
    }
  }
}

void reorder_weight_to_blocked(const float* src, const int64_t st[4], int64_t k, int64_t c, int64_t r, int64_t s,
                               int v, float* dst, int tid, int nthreads) {
  int64_t b, e;
  share(div_up(k, v) * div_up(c, v), tid, nthreads, &b, &e);
  reorder_weight_to_blocked_blocks(src, st, k, c, r, s, v, b, e, dst + b * r * s * v * v);
}

void reorder_weight_from_blocked(const float* src, int64_t k, int64_t c, int64_t r, int64_t s, int v, float* dst,
                                 const int64_t st[4], int tid, int nthreads) {
  const int64_t kb = div_up(k, v), cb = div_up(c, v), rs = r * s;
  const bool dense = st[3] == 1 && st[2] == s && st[1] == rs;
  int64_t b, e;
  share(kb * cb, tid, nthreads, &b, &e);
  for (int64_t i = b; i < e; ++i) {
    const int64_t ci = i % cb, ki = i / cb;
    const float* in = src + i * rs * v * v;  // [r][s][c][k]
    const int nk = static_cast<int>(std::min<int64_t>(v, k - ki * v)), nc = static_cast<int>(std::min<int64_t>(v, c - ci * v));
    if (dense && nk == v && nc == v && v % 8 == 0 && have_avx2()) {
      // The inverse of reorder_weight_to_blocked's fast path: rows [t][c] gathered in the
      // order [c][t] into 8x8 transposes that write the V kernel rows of the block.
      float* block = dst + ki * v * st[0] + ci * v * st[1];
      if (rs == 1) {
        transpose_block_avx2(in, v, v, v, block, st[0]);
        continue;
      }
      transpose_from_taps_avx2(in, v, rs, block, st[0]);
      continue;
    }
    for (int64_t t = 0; t < rs; ++t)
      for (int jc = 0; jc < nc; ++jc)
        for (int jk = 0; jk < nk; ++jk)
          dst[(ki * v + jk) * st[0] + (ci * v + jc) * st[1] + (t / s) * st[2] + (t % s) * st[3]] =
              in[(t * v + jc) * v + jk];
  }
}

void reorder_weight_to_blocked_bwd_blocks(const float* src, const int64_t st[4], int64_t k, int64_t c, int64_t r,
                                          int64_t s, const int64_t* taps_r, int64_t n_r, const int64_t* taps_s,
                                          int64_t n_s, int v, int64_t begin, int64_t end, float* dst) {
  const int64_t kb = div_up(k, v), taps = n_r * n_s;
  // The source tap of each destination tap.
  std::vector<int64_t> src_tap(taps);
  for (int64_t i = 0; i < n_r; ++i)
    for (int64_t j = 0; j < n_s; ++j) src_tap[i * n_s + j] = taps_r[n_r - 1 - i] * st[2] + taps_s[n_s - 1 - j] * st[3];
  const int64_t rs = r * s;
  const bool dense = st[3] == 1 && st[2] == s && st[1] == rs;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t ki = i % kb, ci = i / kb;
    float* out = dst + (i - begin) * taps * v * v;  // [tap][k][c]
    const int nk = static_cast<int>(std::min<int64_t>(v, k - ki * v)), nc = static_cast<int>(std::min<int64_t>(v, c - ci * v));
    const float* block = src + ki * v * st[0] + ci * v * st[1];
    if (nk == v && nc == v && v % 8 == 0 && have_avx2() && dense) {
      if (rs == 1) {
        // 1x1: each destination row [k][c] is a source row.
        for (int jk = 0; jk < v; ++jk) std::memcpy(out + jk * v, block + jk * st[0], sizeof(float) * v);
        continue;
      }
      // The block is a V x (V * rs) matrix [k][c * rs + t]: transpose it to [c][t][k], then
      // each tap's V x V matrix [c][k] (rows rs * V apart) to [k][c].
      thread_local std::vector<float> tmp;
      tmp.resize(static_cast<size_t>(rs) * v * v);
      transpose_block_avx2(block, st[0], v, static_cast<int>(v * rs), tmp.data(), v);
      for (int64_t t = 0; t < taps; ++t)
        transpose_block_avx2(tmp.data() + src_tap[t] * v, rs * v, v, v, out + t * v * v, v);
      continue;
    }
    if (nk < v || nc < v) std::memset(out, 0, sizeof(float) * taps * v * v);
    for (int64_t t = 0; t < taps; ++t)
      for (int jk = 0; jk < nk; ++jk)
        for (int jc = 0; jc < nc; ++jc) out[(t * v + jk) * v + jc] = block[jk * st[0] + jc * st[1] + src_tap[t]];
  }
}

void reorder_weight_to_blocked_bwd(const float* src, const int64_t st[4], int64_t k, int64_t c, int64_t r,
                                   int64_t s, const int64_t* taps_r, int64_t n_r, const int64_t* taps_s,
                                   int64_t n_s, int v, float* dst, int tid, int nthreads) {
  int64_t b, e;
  share(div_up(c, v) * div_up(k, v), tid, nthreads, &b, &e);
  reorder_weight_to_blocked_bwd_blocks(src, st, k, c, r, s, taps_r, n_r, taps_s, n_s, v, b, e,
                                       dst + b * n_r * n_s * v * v);
}

void reorder_blocked_weight_to_bwd_blocks(const float* src, int64_t kb, int64_t cb, int64_t r, int64_t s,
                                          const int64_t* taps_r, int64_t n_r, const int64_t* taps_s, int64_t n_s,
                                          int v, int64_t begin, int64_t end, float* dst) {
  const int64_t taps = n_r * n_s;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t ki = i % kb, ci = i / kb;
    const float* in = src + (ki * cb + ci) * r * s * v * v;  // [r][s][c][k]
    float* out = dst + (i - begin) * taps * v * v;            // [tap][k][c]
    for (int64_t y = 0; y < n_r; ++y)
      for (int64_t x = 0; x < n_s; ++x) {
        const float* blk = in + (taps_r[n_r - 1 - y] * s + taps_s[n_s - 1 - x]) * v * v;
        float* o = out + (y * n_s + x) * v * v;
        if (v % 8 == 0 && have_avx2()) {
          transpose_block_avx2(blk, v, v, v, o, v);
        } else {
          for (int jc = 0; jc < v; ++jc)
            for (int jk = 0; jk < v; ++jk) o[jk * v + jc] = blk[jc * v + jk];
        }
      }
  }
}

void reorder_blocked_weight_to_bwd(const float* src, int64_t kb, int64_t cb, int64_t r, int64_t s,
                                   const int64_t* taps_r, int64_t n_r, const int64_t* taps_s, int64_t n_s, int v,
                                   float* dst, int tid, int nthreads) {
  int64_t b, e;
  share(cb * kb, tid, nthreads, &b, &e);
  reorder_blocked_weight_to_bwd_blocks(src, kb, cb, r, s, taps_r, n_r, taps_s, n_s, v, b, e,
                                       dst + b * n_r * n_s * v * v);
}

void reorder_dw_weight_to_blocked(const float* src, const int64_t st[4], int64_t c, int64_t r, int64_t s, int v,
                                  float* dst, int tid, int nthreads) {
  int64_t b, e;
  share(div_up(c, v) * r * s, tid, nthreads, &b, &e);
  for (int64_t i = b; i < e; ++i) {
    const int64_t x = i % s, y = (i / s) % r, ci = i / (s * r);
    for (int j = 0; j < v; ++j) {
      const int64_t cc = ci * v + j;
      dst[i * v + j] = cc < c ? src[cc * st[0] + y * st[2] + x * st[3]] : 0.f;
    }
  }
}

}  // namespace dc
