#include "conv/reorder.h"

#include <cstring>

#include "conv/conv_desc.h"

namespace dc {

namespace {
// The [begin, end) share of `total` items for thread tid.
void share(int64_t total, int tid, int nthreads, int64_t* begin, int64_t* end) {
  *begin = total * tid / nthreads;
  *end = total * (tid + 1) / nthreads;
}
}  // namespace

void reorder_to_blocked(const float* src, const int64_t st[4], int64_t n, int64_t c, int64_t h, int64_t w, int v,
                        float* dst, int tid, int nthreads) {
  const int64_t cb = div_up(c, v);
  int64_t b, e;
  share(n * cb * h, tid, nthreads, &b, &e);
  for (int64_t i = b; i < e; ++i) {
    const int64_t y = i % h, blk = (i / h) % cb, img = i / (h * cb);
    const int64_t c0 = blk * v;
    const int nv = static_cast<int>(c - c0 < v ? c - c0 : v);
    float* out = dst + i * w * v;
    const float* in = src + img * st[0] + c0 * st[1] + y * st[2];
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
  share(n * cb * h, tid, nthreads, &b, &e);
  for (int64_t i = b; i < e; ++i) {
    const int64_t y = i % h, blk = (i / h) % cb, img = i / (h * cb);
    const int64_t c0 = blk * v;
    const int nv = static_cast<int>(c - c0 < v ? c - c0 : v);
    const float* in = src + i * w * v;
    float* out = dst + img * st[0] + c0 * st[1] + y * st[2];
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

void reorder_weight_to_blocked(const float* src, const int64_t st[4], int64_t k, int64_t c, int64_t r, int64_t s,
                               int v, float* dst, int tid, int nthreads) {
  const int64_t kb = div_up(k, v), cb = div_up(c, v);
  int64_t b, e;
  share(kb * cb * r * s, tid, nthreads, &b, &e);
  for (int64_t i = b; i < e; ++i) {
    const int64_t x = i % s, y = (i / s) % r, ci = (i / (s * r)) % cb, ki = i / (s * r * cb);
    float* out = dst + i * v * v;
    for (int jc = 0; jc < v; ++jc)
      for (int jk = 0; jk < v; ++jk) {
        const int64_t kk = ki * v + jk, cc = ci * v + jc;
        out[jc * v + jk] = (kk < k && cc < c) ? src[kk * st[0] + cc * st[1] + y * st[2] + x * st[3]] : 0.f;
      }
  }
}

void reorder_weight_from_blocked(const float* src, int64_t k, int64_t c, int64_t r, int64_t s, int v, float* dst,
                                 const int64_t st[4], int tid, int nthreads) {
  const int64_t kb = div_up(k, v), cb = div_up(c, v);
  int64_t b, e;
  share(kb * cb * r * s, tid, nthreads, &b, &e);
  for (int64_t i = b; i < e; ++i) {
    const int64_t x = i % s, y = (i / s) % r, ci = (i / (s * r)) % cb, ki = i / (s * r * cb);
    const float* in = src + i * v * v;
    for (int jc = 0; jc < v; ++jc)
      for (int jk = 0; jk < v; ++jk) {
        const int64_t kk = ki * v + jk, cc = ci * v + jc;
        if (kk < k && cc < c) dst[kk * st[0] + cc * st[1] + y * st[2] + x * st[3]] = in[jc * v + jk];
      }
  }
}

}  // namespace dc
