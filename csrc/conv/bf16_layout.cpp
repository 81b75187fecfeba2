#include "conv/bf16_layout.h"

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
        std::memcpy(out + x * kLanes, in + x * st[3], nc * 2);
        if (nc < kLanes) std::memset(out + x * kLanes + nc, 0, (kLanes - nc) * 2);
      }
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
      for (int64_t x = 0; x < w; ++x) std::memcpy(out + x * st[3], in + x * kLanes, nc * 2);
      continue;
    }
    for (int64_t ci = 0; ci < nc; ++ci) {
      uint16_t* ch = out + ci * st[1];
      for (int64_t x = 0; x < w; ++x) ch[x * st[3]] = in[x * kLanes + ci];
    }
  }
}

}  // namespace dc
