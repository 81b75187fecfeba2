// The timing side of bench/bench_bf16_fwd.py and bench/bench_bf16_bwd.py: reads commands
// from stdin, one a line, and answers each with one number (plan: one line), so the scripts
// can interleave it with torch's convolution.
//   peak <seconds>                 GFLOP/s of this core's tdpbf16ps loop (its own, 4 chains),
//                                  the median of chunks of 4,000 products
//   dotpeak <seconds>              GFLOP/s of the vdpbf16ps loop (jit/peak_kernel.h), the
//                                  median of chunks of 64,000 instructions
//   conv <problem> <min_seconds> [level]
//                                  seconds per call of the bf16 forward (1 thread, bf16 out,
//                                  no post-ops) at the level (amx, the default, or
//                                  avx512_bf16), the median of calls timed for min_seconds
//   fp32 <problem> <min_seconds>   the same for the project's fp32 forward on blocked
//                                  tensors (NCHW16c, avx512 kernels, fp32 out, no post-ops)
//   stats <problem> <min_seconds> <threads> <0|1|2>
//                                  seconds per call of the AMX bf16 forward (bf16 out) on
//                                  `threads` threads of the helper's pool: 0 alone; 1 with
//                                  the batch-norm stats post-op and its merge
//                                  (bf16_fwd_stats_finish); 2 followed by the statistics
//                                  read from its output in one more pass (bn_stats_share
//                                  on the same threads, bn_stats_finish)
//   plan <problem> [level]         the bf16 plan's description
//   clock wall|thread              time the samples that follow by wall time (the default)
//                                  or by this thread's CPU time
//   bwd_data <problem> <min_seconds> [threads]   the same for the bf16 input gradient (bf16
//                                  dx), on `threads` threads of the helper's pool (default 1)
//   bwd_data_pack <problem> <min_seconds> [threads]   the same for packing its weights from
//                                  fp32 (conv/bf16_pack.h), on `threads` threads (default 1)
//   bwd_data_plan <problem>        the input gradient's plan (Bf16BwdDataPlan::to_string)
// A problem is planned and its kernels generated at its first command.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <ctime>
#include <condition_variable>
#include <cstdlib>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "conv/bf16_bwd_data.h"
#include "conv/bf16_fold.h"
#include "conv/bf16_fwd.h"
#include "conv/bf16_pack.h"
#include "conv/blocked_eltwise.h"
#include "conv/drivers.h"
#include "jit/isa.h"
#include "jit/jit_kernel.h"
#include "jit/peak_kernel.h"
#include "amx_peak_loop.h"

using namespace dc;

namespace {

using dc_bench::parse_level;
using dc_bench::PeakLoop;
using dc_bench::kPeakLoopFlopsPerIter;
using dc_bench::median_peak_gflops;


// The helper's RunShares for more than one thread: workers made once, as torch's pool is,
// which spin for about 0.1 ms after a region and then sleep, so that they neither delay the
// next region nor take the core while torch's side runs. The caller runs share 0.
class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    for (int t = 1; t < n; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
      ++gen_;
    }
    cv_.notify_all();
    for (std::thread& w : workers_) w.join();
  }
  int size() const { return n_; }
  void run(int n, const ShareFn& fn) {
    fn_ = &fn;
    n_run_ = n;
    pending_.store(n_ - 1);
    {
      std::lock_guard<std::mutex> lk(m_);
      ++gen_;
    }
    cv_.notify_all();
    fn(0, n);
    while (pending_.load(std::memory_order_acquire) > 0) __builtin_ia32_pause();
  }

 private:
  void work(int t) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = gen_.load(std::memory_order_acquire);
      for (int i = 0; g == seen && i < 1000; ++i) __builtin_ia32_pause(), g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return gen_.load() != seen; });
        g = gen_.load();
      }
      seen = g;
      if (stop_) return;
      if (t < n_run_) (*fn_)(t, n_run_);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  const ShareFn* fn_ = nullptr;
  int n_run_ = 0;
  bool stop_ = false;
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// What a sample is timed with (the `clock` command): wall time, or this thread's CPU time,
// which leaves out the time the machine's other work held the core (a call longer than
// the scheduler's slice is otherwise preempted in most samples on a busy machine).
bool g_thread_clock = false;
double sample_now() {
  if (!g_thread_clock) return now();
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// 64-byte aligned, as torch's tensors are: a tile row that straddled two cache lines
// would cost two.
template <typename T>
struct Aligned {
  T* p = nullptr;
  size_t n = 0;
  void resize(size_t count) {
    std::free(p);
    n = count;
    p = static_cast<T*>(std::aligned_alloc(64, (count * sizeof(T) + 63) / 64 * 64));
  }
  ~Aligned() { std::free(p); }
  T* data() { return p; }
  size_t size() const { return n; }
  T& operator[](size_t i) { return p[i]; }
};

struct Problem {
  std::shared_ptr<const Bf16FwdPrimitive> prim;
  Aligned<uint16_t> src, wei;
  Aligned<uint8_t> dst, scratch;
  // A layer that folds its kernel columns (conv1) runs as the blocked model runs it: the
  // folded copy made from a bf16 NCHW input (bf16_fold_nchw), then the inner convolution on it.
  bool folded = false;
  ConvDesc desc;
  Aligned<uint16_t> nchw;
};

// One timed forward of p, as the blocked model runs it.
void run_problem(Problem& p, const RunShares& run) {
  if (p.folded) {
    const ConvDesc& d = p.desc;
    const int64_t st[4] = {d.c * d.h * d.w, d.h * d.w, d.w, 1};
    run(p.prim->plan.threads, [&](int tid, int nt) { bf16_fold_nchw(d, p.nchw.data(), true, st, 0, p.src.data(), tid, nt); });
  }
  bf16_fwd_run(*p.prim, p.src.data(), p.wei.data(), {}, p.dst.data(), p.scratch.data(), run);
}

void fill_problem(const std::string& text, Isa level, Problem* out, int threads = 1) {
  Problem& p = *out;
  ConvDesc d = parse_conv_desc(text);
  d.dt = DataType::bf16;
  p.desc = d;
  p.folded = bf16_fwd_folds_columns(d);
  // The packed weights are the inner convolution's either way (pack_bf16_fwd_weights).
  p.prim = make_bf16_fwd_primitive(make_bf16_fwd_plan(p.folded ? bf16_fwd_inner_desc(d) : d, threads, DataType::bf16, {}, level));
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const int64_t cb = div_up(d.c, kAmxBlock), kb = div_up(d.k, kAmxBlock);
  if (p.folded) {
    const ConvDesc in = bf16_fwd_inner_desc(d);
    p.nchw.resize(d.n * d.c * d.h * d.w);
    for (size_t i = 0; i < p.nchw.size(); ++i) p.nchw[i] = bf16_from_float(u(rng));
    p.src.resize(in.n * in.h * in.w * kAmxBlock);
  } else {
    p.src.resize(d.n * cb * d.h * d.w * kAmxBlock);
  }
  for (size_t i = 0; i < p.src.size() && !p.folded; ++i)
    p.src[i] = static_cast<int64_t>(i % kAmxBlock + (i / (d.h * d.w * kAmxBlock) % cb) * kAmxBlock) < d.c
                   ? bf16_from_float(u(rng))
                   : 0;
  std::vector<float> w(d.k * d.c * d.r * d.s);
  for (float& x : w) x = u(rng);
  p.wei.resize(bf16_fwd_weight_elems(d));
  pack_bf16_fwd_weights(d, w.data(), p.wei.data());
  p.dst.resize(d.n * kb * d.p() * d.q() * kAmxBlock * 2);
  p.scratch.resize(p.prim->plan.scratch_bytes + 64);
  if (p.folded) {  // the copy filled once, for the commands that time the inner convolution alone
    const int64_t st[4] = {d.c * d.h * d.w, d.h * d.w, d.w, 1};
    bf16_fold_nchw(d, p.nchw.data(), true, st, 0, p.src.data(), 0, 1);
  }
}

// A problem of the stats command: the AMX forward at some thread count, with or without
// the stats post-op, and the shift, slots, partial sums and statistics it fills.
struct StatsProblem {
  Problem conv;
  std::vector<float> shift, sums, mean, var;
  std::vector<double> partials;  // the separate pass's, per thread
};

// The forward's output as the batch norm reads it.
BlockedShape stats_shape(const ConvDesc& d) {
  BlockedShape s;
  s.n = d.n;
  s.c = d.k;
  s.h = d.p();
  s.w = d.q();
  s.v = kAmxBlock;
  return s;
}

void fill_stats_problem(const std::string& text, int threads, int mode, StatsProblem* out) {
  fill_problem(text, Isa::amx, &out->conv);
  ConvDesc d = out->conv.prim->plan.desc;
  FwdPostOps post;
  post.stats = mode == 1;
  out->conv.prim = make_bf16_fwd_primitive(make_bf16_fwd_plan(d, threads, DataType::bf16, post, Isa::amx));
  out->conv.scratch.resize(out->conv.prim->plan.scratch_bytes + 64);
  out->shift.assign(div_up(d.k, kAmxBlock) * kAmxBlock, 0.f);
  out->sums.resize(out->conv.prim->plan.stats_floats);
  out->mean.resize(d.k);
  out->var.resize(d.k);
  out->partials.resize(bn_stats_partial_size(stats_shape(d)) * threads);
}

// The fp32 forward of the same problem on blocked fp32 tensors, as the blocked model runs
// it (the weights packed beforehand).
struct Fp32Problem {
  std::shared_ptr<const FwdHandle> handle;
  Aligned<float> src, wei, dst;
};

void fill_fp32_problem(const std::string& text, Fp32Problem* out) {
  Fp32Problem& p = *out;
  ConvDesc d = parse_conv_desc(text);
  d.dt = DataType::f32;
  p.handle = get_fwd_handle(d, Isa::avx512, 1);
  constexpr int V = 16;
  const int64_t cb = div_up(d.c, V), kb = div_up(d.k, V);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  p.src.resize(d.n * cb * d.h * d.w * V);
  for (size_t i = 0; i < p.src.size(); ++i)
    p.src[i] = static_cast<int64_t>(i % V + (i / (d.h * d.w * V) % cb) * V) < d.c ? u(rng) : 0.f;
  p.wei.resize(kb * cb * d.r * d.s * V * V);
  for (size_t i = 0; i < p.wei.size(); ++i) p.wei[i] = u(rng);
  p.dst.resize(d.n * kb * d.p() * d.q() * V);
}

// The input gradient of a forward problem: dy (N, Kb, P, Q, 32) in, dx (N, Cb, H, W, 32) out.
struct BwdDataProblem {
  std::shared_ptr<const Bf16BwdDataPrimitive> prim;
  std::vector<float> w;  // (K, C, R, S) fp32
  Bf16PackSource src;    // w
  Aligned<uint16_t> dy, wei;
  Aligned<uint8_t> dx, scratch;
};

void fill_bwd_data_problem(const std::string& text, int threads, BwdDataProblem* out) {
  BwdDataProblem& p = *out;
  ConvDesc d = parse_conv_desc(text);
  d.dt = DataType::bf16;
  p.prim = make_bf16_bwd_data_primitive(make_bf16_bwd_data_plan(d, threads, DataType::bf16));
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const int64_t cb = div_up(d.c, kAmxBlock), kb = div_up(d.k, kAmxBlock), pq = d.p() * d.q();
  p.dy.resize(d.n * kb * pq * kAmxBlock);
  for (size_t i = 0; i < p.dy.size(); ++i)
    p.dy[i] = static_cast<int64_t>(i % kAmxBlock + (i / (pq * kAmxBlock) % kb) * kAmxBlock) < d.k
                  ? bf16_from_float(u(rng))
                  : 0;
  p.w.resize(d.k * d.c * d.r * d.s);
  for (float& x : p.w) x = u(rng);
  p.src.w = p.w.data();
  p.src.dt = DataType::f32;
  p.src.k = d.k, p.src.c = d.c, p.src.r = d.r, p.src.s = d.s;
  p.src.st[0] = d.c * d.r * d.s, p.src.st[1] = d.r * d.s, p.src.st[2] = d.s, p.src.st[3] = 1;
  p.wei.resize(bf16_bwd_data_weight_elems(d));
  pack_bf16_bwd_data_weights(d, p.w.data(), p.wei.data());
  p.dx.resize(d.n * cb * d.h * d.w * kAmxBlock * 2);
  p.scratch.resize(p.prim->plan.scratch_bytes + 64);
}

// Seconds per call of fn, the median of calls timed for min_seconds (at least 3).
template <typename F>
double time_calls(const F& fn, double min_seconds) {
  fn();
  std::vector<double> times;
  const double t0 = now();
  do {
    const double a = sample_now();
    fn();
    times.push_back(sample_now() - a);
  } while (now() - t0 < min_seconds || times.size() < 3);
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

}  // namespace

int main() {
  const RunShares serial = [](int n, const ShareFn& fn) {
    for (int t = 0; t < n; ++t) fn(t, n);
  };
  std::map<std::string, Problem> problems;
  std::map<std::string, Fp32Problem> fp32_problems;
  std::unique_ptr<JitKernel> peak_kernel, dot_peak_kernel;
  alignas(64) uint16_t dot_in[kDotPeakInElems] = {};
  alignas(64) float dot_out[kDotPeakOutElems];
  for (int i = 0; i < kDotPeakInElems; ++i) dot_in[i] = 0x3f80;  // 1.0
  std::map<std::pair<std::string, int>, BwdDataProblem> bwd_data_problems;
  std::map<std::tuple<std::string, int, int>, StatsProblem> stats_problems;
  std::unique_ptr<Pool> pool;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    try {
    if (cmd == "peak") {
      double seconds = 0.05;
      in >> seconds;
      if (!peak_kernel) parse_level("amx"), peak_kernel = PeakLoop().build();
      auto peak = peak_kernel->entry<void (*)(int64_t)>();
      std::printf("%.1f\n", median_peak_gflops(peak, kPeakLoopFlopsPerIter, seconds, now, sample_now));
    } else if (cmd == "dotpeak") {
      double seconds = 0.05;
      in >> seconds;
      if (!dot_peak_kernel) parse_level("avx512_bf16"), dot_peak_kernel = make_bf16_dot_peak_kernel()->build();
      auto dot_peak = dot_peak_kernel->entry<Bf16PeakKernelFn>();
      const auto run = [&](int64_t n) { dot_peak(n, dot_in, dot_out); };
      std::printf("%.1f\n", median_peak_gflops(run, bf16_dot_peak_flops_per_iter(), seconds, now, sample_now));
    } else if (cmd == "conv") {
      std::string text, level_name;
      double min_seconds = 0.05;
      int threads = 1;
      in >> text >> min_seconds >> level_name;
      if (!(in >> threads)) threads = 1;
      if (threads < 1 || threads > 64) {
        std::printf("error: threads must be in [1, 64], got %d\n", threads);
        std::fflush(stdout);
        continue;
      }
      const Isa level = parse_level(level_name);
      if (threads > 1 && (!pool || pool->size() < threads)) pool.reset(), pool = std::make_unique<Pool>(threads);
      const RunShares pooled = [&](int n, const ShareFn& fn) { pool->run(n, fn); };
      const std::string key = text + " " + isa_name(level) + " " + std::to_string(threads);
      auto it = problems.find(key);
      if (it == problems.end()) it = problems.try_emplace(key).first, fill_problem(text, level, &it->second, threads);
      Problem& p = it->second;
      const RunShares& run = threads > 1 ? pooled : serial;
      std::printf("%.9f\n", time_calls([&] { run_problem(p, run); }, min_seconds));
    } else if (cmd == "fp32") {
      std::string text;
      double min_seconds = 0.05;
      in >> text >> min_seconds;
      auto it = fp32_problems.find(text);
      if (it == fp32_problems.end()) it = fp32_problems.try_emplace(text).first, fill_fp32_problem(text, &it->second);
      Fp32Problem& p = it->second;
      std::printf("%.9f\n", time_calls([&] {
        run_fwd(*p.handle, p.src.data(), p.wei.data(), {}, p.dst.data(), 1, 0, 0, 0, 0, serial);
      }, min_seconds));
    } else if (cmd == "clock") {
      std::string which;
      in >> which;
      if (which != "wall" && which != "thread") throw std::runtime_error("clock: expected wall or thread");
      g_thread_clock = which == "thread";
      std::printf("%d\n", g_thread_clock ? 1 : 0);
    } else if (cmd == "bwd_data" || cmd == "bwd_data_pack") {
      std::string text;
      double min_seconds = 0.05;
      int threads = 1;
      in >> text >> min_seconds;
      if (!(in >> threads)) threads = 1;
      if (threads < 1 || threads > 64) {
        std::printf("error: threads must be in [1, 64], got %d\n", threads);
        std::fflush(stdout);
        continue;
      }
      if (threads > 1 && (!pool || pool->size() < threads)) pool.reset(), pool = std::make_unique<Pool>(threads);
      const RunShares pooled = [&](int n, const ShareFn& fn) { pool->run(n, fn); };
      const auto key = std::make_pair(text, threads);
      auto it = bwd_data_problems.find(key);
      if (it == bwd_data_problems.end())
        it = bwd_data_problems.try_emplace(key).first, fill_bwd_data_problem(text, threads, &it->second);
      BwdDataProblem& p = it->second;
      const ConvDesc& d = p.prim->plan.desc;
      const RunShares& run = threads > 1 ? pooled : serial;
      const double t =
          cmd == "bwd_data"
              ? time_calls(
                    [&] {
                      bf16_bwd_data_run(*p.prim, p.dy.data(), p.wei.data(), p.dx.data(), p.scratch.data(), run);
                    },
                    min_seconds)
              : time_calls(
                    [&] {
                      run(threads, [&](int tid, int nt) { pack_bf16_bwd_data(d, p.src, p.wei.data(), tid, nt); });
                    },
                    min_seconds);
      std::printf("%.9f\n", t);
    } else if (cmd == "stats") {
      std::string text;
      double min_seconds = 0.05;
      int threads = 1, mode = 0;
      in >> text >> min_seconds >> threads >> mode;
      if (!in || threads < 1 || threads > 64 || mode < 0 || mode > 2) {
        std::printf("error: stats <problem> <min_seconds> <threads in [1, 64]> <0|1|2>\n");
        std::fflush(stdout);
        continue;
      }
      parse_level("amx");
      if (threads > 1 && (!pool || pool->size() < threads)) pool.reset(), pool = std::make_unique<Pool>(threads);
      const RunShares pooled = [&](int n, const ShareFn& fn) { pool->run(n, fn); };
      const auto key = std::make_tuple(text, threads, mode);
      auto it = stats_problems.find(key);
      if (it == stats_problems.end())
        it = stats_problems.try_emplace(key).first, fill_stats_problem(text, threads, mode, &it->second);
      StatsProblem& p = it->second;
      const RunShares& run = threads > 1 ? pooled : serial;
      const Bf16FwdPostArgs post{nullptr, nullptr, p.shift.data(), p.sums.data()};
      const Bf16FwdPlan& plan = p.conv.prim->plan;
      const BlockedShape shape = stats_shape(plan.desc);
      const uint16_t* y = reinterpret_cast<const uint16_t*>(p.conv.dst.data());
      const int64_t partial = bn_stats_partial_size(shape);
      std::printf("%.9f\n", time_calls([&] {
        bf16_fwd_run(*p.conv.prim, p.conv.src.data(), p.conv.wei.data(), mode == 1 ? post : Bf16FwdPostArgs{},
                     p.conv.dst.data(), p.conv.scratch.data(), run);
        if (mode == 1)
          bf16_fwd_stats_finish(plan, p.sums.data(), p.shift.data(), plan.desc.k, p.mean.data(), p.var.data());
        if (mode == 2) {
          run(threads, [&](int tid, int nt) { bn_stats_share(shape, y, p.partials.data() + tid * partial, tid, nt); });
          bn_stats_finish(shape, y, p.partials.data(), threads, p.mean.data(), p.var.data());
        }
      }, min_seconds));
    } else if (cmd == "plan") {
      std::string text, level_name;
      in >> text >> level_name;
      ConvDesc d = parse_conv_desc(text);
      d.dt = DataType::bf16;
      std::printf("%s\n", make_bf16_fwd_plan(d, 1, DataType::bf16, {}, parse_level(level_name)).to_string().c_str());
    } else if (cmd == "bwd_data_plan") {
      std::string text;
      in >> text;
      ConvDesc d = parse_conv_desc(text);
      d.dt = DataType::bf16;
      std::printf("%s\n", make_bf16_bwd_data_plan(d, 1, DataType::bf16).to_string().c_str());
    } else {
      std::printf("error: unknown command %s\n", cmd.c_str());
    }
    } catch (const std::exception& e) {
      std::printf("error: %s\n", e.what());
    }
    std::fflush(stdout);
  }
  return 0;
}
