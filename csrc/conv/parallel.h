// How the torch-free drivers run in parallel: on the caller's pool, never on threads of
// their own. The torch layer passes at::parallel_for's (csrc/torch/threading.h), the C++
// tests a serial loop or plain threads.
#pragma once

#include <functional>

namespace dc {

// One thread's share of a parallel region: tid in [0, nthreads).
using ShareFn = std::function<void(int tid, int nthreads)>;
// Runs fn(tid, nthreads) for every tid in [0, nthreads), each share on one thread, and
// returns when all are done.
using RunShares = std::function<void(int nthreads, const ShareFn& fn)>;

}  // namespace dc
