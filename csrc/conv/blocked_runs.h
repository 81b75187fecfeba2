// How the blocked element-wise loops split their work: thread tid of nthreads takes an
// equal, contiguous share of the tensor's pixels (flat order n, channel block, h, w), so
// every thread streams one stretch of memory and the shares balance to a pixel even when
// N * Cb is smaller than the thread count. A share is cut into runs that stay within one
// (image, channel block) plane, where the per-channel coefficients are fixed.
#pragma once

#include <algorithm>
#include <cstdint>

#include "conv/blocked_eltwise.h"
#include "conv/lanes.h"

namespace dc {

// The [begin, end) share of `total` items for thread tid.
inline void share_of(int64_t total, int tid, int nthreads, int64_t* begin, int64_t* end) {
  *begin = total * tid / nthreads;
  *end = total * (tid + 1) / nthreads;
}

// fn(cb, first, count) for each run of thread tid's share: `count` pixels from flat pixel
// `first` on, all in channel block cb.
template <typename F>
DC_INLINE void for_each_run(const BlockedShape& s, int tid, int nthreads, F fn) {
  const int64_t hw = s.plane(), cb = s.cb();
  if (hw == 0) return;
  int64_t p, end;
  share_of(s.pixels(), tid, nthreads, &p, &end);
  while (p < end) {
    const int64_t plane = p / hw, count = std::min(end - p, (plane + 1) * hw - p);
    fn(plane % cb, p, count);
    p += count;
  }
}

}  // namespace dc
