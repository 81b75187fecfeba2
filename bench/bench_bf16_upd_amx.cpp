// The timing side of bench/bench_bf16_upd.py: reads commands from stdin, one a line, and
// answers each with one number, so the script can interleave it with torch's weight gradient.
//   peak <seconds>                      GFLOP/s of this core's tdpbf16ps loop (its own, 4
//                                       chains), the median of chunks of 4,000 products
//   dotpeak <seconds>                   GFLOP/s of this core's vdpbf16ps loop
//                                       (jit/peak_kernel.h), the median of chunks of 1,000
//                                       iterations
//   upd <problem> <threads> <min_secs> [f32|bf16] [level]
//                                       seconds per call of the bf16 weight gradient (dW
//                                       fp32 unless bf16 is asked) at the level (amx, the
//                                       default, or avx512_bf16), the median of calls timed
//                                       for min_secs
//   plan <problem> <threads> [level]    the plan's description (answered as text)
// A problem is planned and its kernels generated at its first command. Two threads run on
// a pool of this process (the caller and one worker).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "conv/bf16_upd.h"
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


double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A pool of the caller and workers: share 0 on the caller, the others on workers that
// spin briefly for the next region (as an OpenMP pool's wait policy does), then sleep, so
// an idle pool takes no CPU from the one-thread timings.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int w = 0; w < workers; ++w) threads_.emplace_back([this, w] { loop(w + 1); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void run(int n, const ShareFn& fn) {
    fn_ = &fn;
    n_ = n;
    pending_.store(static_cast<int>(threads_.size()));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      gen_.fetch_add(1);
    }
    wake_.notify_all();
    fn(0, n);
    while (pending_.load() > 0) {
    }
  }

 private:
  void loop(int tid) {
    uint64_t seen = 0;
    for (;;) {
      const double t0 = now();
      while (gen_.load() == seen && now() - t0 < 1e-3) {
      }
      if (gen_.load() == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return gen_.load() != seen; });
      }
      seen = gen_.load();
      if (stop_) return;
      if (tid < n_) (*fn_)(tid, n_);
      pending_.fetch_sub(1);
    }
  }
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  const ShareFn* fn_ = nullptr;
  int n_ = 1;
};

template <typename T>
struct Aligned {
  T* p = nullptr;
  size_t n = 0;
  void resize(size_t count) {
    std::free(p);
    n = count;
    p = static_cast<T*>(std::aligned_alloc(64, (count * sizeof(T) + 63) / 64 * 64 + 64));
  }
  ~Aligned() { std::free(p); }
  T* data() { return p; }
  T& operator[](size_t i) { return p[i]; }
};

struct Problem {
  std::shared_ptr<const Bf16UpdPrimitive> prim;
  Aligned<uint16_t> x, dy;
  Aligned<uint8_t> dw, scratch;
};

ConvDesc bf16_desc(const std::string& text) {
  ConvDesc d = parse_conv_desc(text);
  d.dt = DataType::bf16;
  return d;
}

void fill_blocked(Aligned<uint16_t>* v, int64_t n, int64_t channels, int64_t pixels, std::mt19937* rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const int64_t blocks = div_up(channels, kAmxBlock), total = n * blocks * pixels * kAmxBlock;
  v->resize(total);
  for (int64_t i = 0; i < total; ++i)
    (*v)[i] = i % kAmxBlock + (i / (pixels * kAmxBlock) % blocks) * kAmxBlock < channels ? bf16_from_float(u(*rng)) : 0;
}

void fill_problem(const ConvDesc& d, int threads, DataType dw_dt, Isa level, Problem* p) {
  p->prim = make_bf16_upd_primitive(make_bf16_upd_plan(d, threads, dw_dt, level));
  std::mt19937 rng(1);
  fill_blocked(&p->x, d.n, d.c, d.h * d.w, &rng);
  fill_blocked(&p->dy, d.n, d.k, d.p() * d.q(), &rng);
  p->dw.resize(d.k * d.c * d.r * d.s * 4);
  p->scratch.resize(p->prim->plan.scratch_bytes);
}

}  // namespace

int main() {
  Pool pool(1);
  const RunShares serial = [](int n, const ShareFn& fn) {
    for (int t = 0; t < n; ++t) fn(t, n);
  };
  const RunShares pooled = [&](int n, const ShareFn& fn) { pool.run(n, fn); };
  std::unique_ptr<JitKernel> peak_kernel, dot_peak_kernel;
  alignas(64) uint16_t dot_in[kDotPeakInElems] = {};
  alignas(64) float dot_out[kDotPeakOutElems];
  for (int i = 0; i < kDotPeakInElems; ++i) dot_in[i] = 0x3f80;  // 1.0
  std::map<std::string, Problem> problems;
  std::string line;
  while (std::getline(std::cin, line)) try {
    std::istringstream in(line);
    std::string cmd, text;
    int threads = 1;
    in >> cmd;
    if (cmd == "peak") {
      double seconds = 0.05;
      in >> seconds;
      if (!peak_kernel) parse_level("amx"), peak_kernel = PeakLoop().build();
      auto peak = peak_kernel->entry<void (*)(int64_t)>();
      std::printf("%.1f\n", median_peak_gflops(peak, kPeakLoopFlopsPerIter, seconds, now, now));
    } else if (cmd == "dotpeak") {
      double seconds = 0.05;
      in >> seconds;
      if (!dot_peak_kernel) parse_level("avx512_bf16"), dot_peak_kernel = make_bf16_dot_peak_kernel()->build();
      auto dot_peak = dot_peak_kernel->entry<Bf16PeakKernelFn>();
      const auto run = [&](int64_t n) { dot_peak(n, dot_in, dot_out); };
      std::printf("%.1f\n", median_peak_gflops(run, bf16_dot_peak_flops_per_iter(), seconds, now, now));
    } else if (cmd == "upd") {
      double min_seconds = 0.05;
      std::string dw_type = "f32", level_name;
      in >> text >> threads >> min_seconds >> dw_type >> level_name;
      const Isa level = parse_level(level_name);
      const DataType dw_dt = dw_type == "bf16" ? DataType::bf16 : DataType::f32;
      if (threads < 1 || threads > 2) {
        std::printf("error: threads must be 1 or 2\n");
        std::fflush(stdout);
        continue;
      }
      const std::string key = text + "/" + std::to_string(threads) + "/" + dtype_name(dw_dt) + "/" + isa_name(level);
      auto it = problems.find(key);
      if (it == problems.end())
        it = problems.try_emplace(key).first, fill_problem(bf16_desc(text), threads, dw_dt, level, &it->second);
      Problem& p = it->second;
      const RunShares& run = threads > 1 ? pooled : serial;
      auto call = [&] { bf16_upd_run(*p.prim, p.x.data(), p.dy.data(), p.dw.data(), p.scratch.data(), run); };
      call();
      std::vector<double> times;
      const double t0 = now();
      do {
        const double a = now();
        call();
        times.push_back(now() - a);
      } while (now() - t0 < min_seconds || times.size() < 3);
      std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
      std::printf("%.9f\n", times[times.size() / 2]);
    } else if (cmd == "plan") {
      std::string level_name;
      in >> text >> threads >> level_name;
      const Bf16UpdPlan plan = make_bf16_upd_plan(bf16_desc(text), threads, DataType::f32, parse_level(level_name));
      std::printf("%s\n", plan.to_string().c_str());
    } else {
      std::printf("error: unknown command %s\n", cmd.c_str());
    }
    std::fflush(stdout);
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    std::fflush(stdout);
  }
  return 0;
}
