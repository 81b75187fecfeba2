// Runs fn(tid, nthreads) on torch's own intra-op pool: no second thread pool exists.
#pragma once

#include <ATen/Parallel.h>

#include "conv/parallel.h"

namespace dc_torch {

inline int num_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

template <typename F>
void run_shares(int nthreads, const F& fn) {
  if (nthreads <= 1) {
    fn(0, 1);
    return;
  }
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(static_cast<int>(t), nthreads);
  });
}

// run_shares as the torch-free drivers take it (conv/parallel.h).
inline const dc::RunShares& torch_shares() {
  static const dc::RunShares run = [](int nthreads, const dc::ShareFn& fn) { run_shares(nthreads, fn); };
  return run;
}

}  // namespace dc_torch
