// The bf16 blocked batch norm and pools (N, C/32, H, W, 32) against the fp32 ones (N, C/16,
// H, W, 16) on ResNet-50 v1.5's shapes, one thread, from C++ (the bf16 passes have no torch
// op yet). For each pass: GB/s of its least traffic (each tensor read or written once per
// pass, as bench_eltwise.py counts it) for fp32 and bf16, and their time ratio. The bf16
// passes move half the bytes, so a ratio near 0.5 means they run at the same GB/s.
//
// Timing: thread CPU time (the machine may be shared), the median of 7 samples of at least
// 0.02 s each, the two types interleaved sample by sample. The CPU time over the wall time
// of the whole run is printed at the end: well below 1, and the thread was not running.
//   bench_eltwise_bf16 [N]   (default 1)
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "conv/blocked_eltwise.h"
#include "conv/blocked_pool.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/isa.h"

using namespace dc;

namespace {

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Seconds per call of fn, one sample: calls until min_seconds of thread time.
double sample(const std::function<void()>& fn, double min_seconds) {
  const double t0 = thread_seconds();
  int64_t calls = 0;
  double t;
  do {
    fn();
    ++calls;
  } while ((t = thread_seconds() - t0) < min_seconds);
  return t / calls;
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
// Medians of the two variants, sampled alternately.
std::pair<double, double> time_pair(const std::function<void()>& a, const std::function<void()>& b) {
  a();
  b();
  std::vector<double> ta, tb;
  for (int i = 0; i < 7; ++i) {
    ta.push_back(sample(a, 0.02));
    tb.push_back(sample(b, 0.02));
  }
  return {median(ta), median(tb)};
}

struct Site {
  const char* name;
  int64_t c, hw;
  bool residual, relu;
};
// The batch-norm sites of ResNet-50 v1.5 (bench_eltwise.py's BN_SHAPES).
const Site kSites[] = {
    {"bn1", 64, 112, false, true},        {"res2_a", 64, 56, false, true},     {"res2_c", 256, 56, true, true},
    {"res2_ds", 256, 56, false, false},   {"res3a_a", 128, 56, false, true},   {"res3_b", 128, 28, false, true},
    {"res3_c", 512, 28, true, true},      {"res3_ds", 512, 28, false, false},  {"res4a_a", 256, 28, false, true},
    {"res4_b", 256, 14, false, true},     {"res4_c", 1024, 14, true, true},    {"res4_ds", 1024, 14, false, false},
    {"res5a_a", 512, 14, false, true},    {"res5_b", 512, 7, false, true},     {"res5_c", 2048, 7, true, true},
    {"res5_ds", 2048, 7, false, false},
};

// One type's tensors for a site: x, residual, y, grad_y, grad_x, grad_residual.
template <typename T>
struct Tensors {
  std::vector<T> x, r, y, gy, gx, gr;
  explicit Tensors(size_t n) : x(n), r(n), y(n), gy(n), gx(n), gr(n) {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto* t : {&x, &r, &y, &gy})
      for (T& e : *t) e = make(u(rng));
  }
  static T make(float v) {
    if constexpr (std::is_same_v<T, float>)
      return v;
    else
      return bf16_from_float(v);
  }
};

struct Row {
  std::string site, pass;
  double passes;  // tensor passes of the least traffic
  int64_t elems;
  double t32, t16;
};

template <typename T>
std::function<void()> stats_fn(const BlockedShape& s, Tensors<T>& t, std::vector<double>& partial, float* mean,
                               float* var) {
  return [&s, &t, &partial, mean, var] {
    bn_stats_share(s, t.x.data(), partial.data(), 0, 1);
    bn_stats_finish(s, t.x.data(), partial.data(), 1, mean, var);
  };
}

}  // namespace

int main(int argc, char** argv) {
  if (detected_isa() < Isa::avx512_bf16) {
    std::printf("this CPU lacks AVX512_BF16\n");
    return 0;
  }
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 1;
  // Names ending in 32 are the fp32 side, in 16 the bf16 side (the bits of an element).
  const double wall0 = wall_seconds(), cpu0 = thread_seconds();
  std::vector<Row> rows;
  for (const Site& site : kSites) {
    const BlockedShape s32{n, site.c, site.hw, site.hw, 16}, s16{n, site.c, site.hw, site.hw, 32};
    const size_t elems = s16.pixels() * 32;
    Tensors<float> f(elems);
    Tensors<uint16_t> b(elems);
    std::vector<float> mean(site.c, 0.f), var(site.c, 1.f), w(site.c, 1.f), bias(site.c, 0.f), gw(site.c),
        gb(site.c);
    std::vector<double> partial32(bn_stats_partial_size(s32)), partial16(bn_stats_partial_size(s16));
    const int r = site.residual, relu = site.relu;
    // Statistics: one read of x.
    auto st = time_pair(stats_fn(s32, f, partial32, mean.data(), var.data()),
                        stats_fn(s16, b, partial16, mean.data(), var.data()));
    rows.push_back({site.name, "stats", 1.0, int64_t(elems), st.first, st.second});
    // Apply: x (+ residual) in, y out.
    const ChannelAffine a32 = bn_affine(site.c, 16, mean.data(), var.data(), 1e-5, w.data(), bias.data());
    const ChannelAffine a16 = bn_affine(site.c, 32, mean.data(), var.data(), 1e-5, w.data(), bias.data());
    auto ap = time_pair(
        [&] { bn_apply_share(s32, a32, f.x.data(), r ? f.r.data() : nullptr, relu, f.y.data(), 0, 1); },
        [&] { bn_apply_share(s16, a16, b.x.data(), r ? b.r.data() : nullptr, relu, b.y.data(), 0, 1); });
    rows.push_back({site.name, "apply", 2.0 + r, int64_t(elems), ap.first, ap.second});
    // The training backward, both passes: grad_x, grad_residual (a residual site), the parameters.
    auto backward = [&](auto& t, const BlockedShape& s, auto args) {
      args.shape = s;
      args.grad_y = t.gy.data();
      args.y = relu ? t.y.data() : nullptr;
      args.x = t.x.data();
      args.mean = mean.data();
      args.var = var.data();
      args.eps = 1e-5;
      args.weight = w.data();
      args.train = true;
      args.grad_x = t.gx.data();
      args.grad_residual = r ? t.gr.data() : nullptr;
      args.grad_weight = gw.data();
      args.grad_bias = gb.data();
      return args;
    };
    const BnBackwardArgs b32 = backward(f, s32, BnBackwardArgs{});
    const BnBackwardArgsBf16 b16 = backward(b, s16, BnBackwardArgsBf16{});
    std::vector<double> bp32(2 * s32.padded()), bp16(2 * s16.padded());
    auto run_bwd = [](auto& args, std::vector<double>& partial) {
      return [&args, &partial] {
        typename std::conditional_t<std::is_same_v<std::decay_t<decltype(args)>, BnBackwardArgs>, BnBackward,
                                    BnBackwardBf16>
            bwd(args);
        for (int p = 0; p < bwd.passes(); ++p) {
          bwd.run_share(p, partial.data(), 0, 1);
          bwd.finish_pass(p, partial.data(), 1);
        }
      };
    };
    auto bw = time_pair(run_bwd(b32, bp32), run_bwd(b16, bp16));
    const double bwd_passes = (2 + relu + r) + ((r ? 2 : 2 + relu) + 1);
    rows.push_back({site.name, "backward", bwd_passes, int64_t(elems), bw.first, bw.second});
  }
  // The stem's max pool 3x3 / 2 (64 channels, 112 -> 56) and the global average (2048, 7).
  {
    PoolDesc d32, d16;
    d32.in = {n, 64, 112, 112, 16};
    d16.in = {n, 64, 112, 112, 32};
    for (PoolDesc* d : {&d32, &d16}) {
      d->kh = d->kw = 3;
      d->sh = d->sw = 2;
      d->ph = d->pw = 1;
    }
    const int64_t in = d16.in.pixels() * 32, out = d16.out().pixels() * 32;
    Tensors<float> f(in);
    Tensors<uint16_t> b(in);
    auto fw = time_pair([&] { max_pool_fwd_share(d32, f.x.data(), f.y.data(), 0, 1); },
                        [&] { max_pool_fwd_share(d16, b.x.data(), b.y.data(), 0, 1); });
    rows.push_back({"stem", "max pool fwd", double(in + out) / in, in, fw.first, fw.second});
    auto bw = time_pair([&] { max_pool_bwd_share(d32, f.x.data(), f.y.data(), f.gy.data(), f.gx.data(), 0, 1); },
                        [&] { max_pool_bwd_share(d16, b.x.data(), b.y.data(), b.gy.data(), b.gx.data(), 0, 1); });
    rows.push_back({"stem", "max pool bwd", double(2 * in + 2 * out) / in, in, bw.first, bw.second});
  }
  {
    const BlockedShape s32{n, 2048, 7, 7, 16}, s16{n, 2048, 7, 7, 32};
    const int64_t elems = s16.pixels() * 32;
    Tensors<float> f(elems);
    Tensors<uint16_t> b(elems);
    std::vector<float> y(n * 2048), gy(n * 2048, 0.5f);
    auto fw = time_pair([&] { global_avg_pool_fwd_share(s32, f.x.data(), y.data(), 0, 1); },
                        [&] { global_avg_pool_fwd_share(s16, b.x.data(), y.data(), 0, 1); });
    rows.push_back({"res5", "global avg fwd", 1.0, elems, fw.first, fw.second});
    auto bw = time_pair([&] { global_avg_pool_bwd_share(s32, gy.data(), f.gx.data(), 0, 1); },
                        [&] { global_avg_pool_bwd_share(s16, gy.data(), b.gx.data(), 0, 1); });
    rows.push_back({"res5", "global avg bwd", 1.0, elems, bw.first, bw.second});
  }
  std::printf("N=%ld, 1 thread, thread-CPU-time medians\n", long(n));
  std::printf("%-8s %-15s %9s %9s %9s %9s %7s\n", "site", "pass", "fp32 us", "bf16 us", "fp32GB/s", "bf16GB/s",
              "t ratio");
  std::vector<double> ratios;
  double t32 = 0, t16 = 0;
  for (const Row& row : rows) {
    const double bytes32 = row.passes * row.elems * 4, bytes16 = row.passes * row.elems * 2;
    std::printf("%-8s %-15s %9.1f %9.1f %9.2f %9.2f %7.3f\n", row.site.c_str(), row.pass.c_str(), row.t32 * 1e6,
                row.t16 * 1e6, bytes32 / row.t32 * 1e-9, bytes16 / row.t16 * 1e-9, row.t16 / row.t32);
    ratios.push_back(row.t16 / row.t32);
    t32 += row.t32;
    t16 += row.t16;
  }
  std::printf("median time ratio bf16 / fp32: %.3f; summed over the rows: %.3f\n", median(ratios), t16 / t32);
  std::printf("thread CPU / wall time of the run: %.2f\n", (thread_seconds() - cpu0) / (wall_seconds() - wall0));
  return 0;
}
