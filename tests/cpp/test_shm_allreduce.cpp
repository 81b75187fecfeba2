// The shared-memory all-reduce (dist/shm_allreduce.h), across forked processes: every rank
// ends with the bits of the sum in rank order, divided, over tails, many chunks and both
// buffers, on one thread or two; a rank that exits or never arrives makes the wait throw
// within a bounded time; a mismatched geometry is refused.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "dist/shm_allreduce.h"

using dc::ShmAllReduce;

namespace {

const dc::RunShares serial = [](int n, const dc::ShareFn& fn) {
  for (int t = 0; t < n; ++t) fn(t, n);
};
const dc::RunShares threaded = [](int n, const dc::ShareFn& fn) {
  std::vector<std::thread> ts;
  for (int t = 1; t < n; ++t) ts.emplace_back([&, t] { fn(t, n); });
  fn(0, n);
  for (auto& t : ts) t.join();
};

std::string segment_name(const char* what) { return "/dc-test-" + std::to_string(getpid()) + "-" + what; }

// Rank r's values of call `call`: distinct per rank, element and call, not exactly representable
// sums, so a wrong order or a missing rank changes bits.
float value(int rank, int call, int64_t i) {
  return static_cast<float>((rank + 1) * 0.37 + call * 1.13 + static_cast<double>((i * 7919) % 1009) * 1e-3);
}

// Runs body(rank) in `world` forked children; the exit code of each is its failure count (or
// 100 + the signal), and their sum is returned.
template <typename Body>
int in_ranks(int world, const Body& body) {
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    pid_t p = fork();
    if (p == 0) {
      int f = 0;
      try {
        f = body(r);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: unexpected exception: %s\n", r, e.what());
        f = 1;
      }
      std::fflush(stderr);
      _exit(std::min(f, 99));
    }
    pids.push_back(p);
  }
  int failed = 0;
  for (pid_t p : pids) {
    int status = 0;
    waitpid(p, &status, 0);
    failed += WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
  }
  return failed;
}

void sums_are_the_ranks_sum_on_every_rank(int world, int64_t chunk, int threads, const dc::RunShares& run) {
  const std::string name = segment_name(("sum" + std::to_string(world) + "-" + std::to_string(threads)).c_str());
  const std::vector<int64_t> sizes = {0, 1, 17, chunk - 1, chunk, chunk + 1, 5 * chunk + 37, 3, 20000};
  int failed = in_ranks(world, [&](int r) {
    ShmAllReduce ar(name, r, world, chunk, 10.0);
    int f = 0;
    for (size_t call = 0; call < sizes.size(); ++call) {
      const int64_t n = sizes[call];
      std::vector<float> x(n);
      for (int64_t i = 0; i < n; ++i) x[i] = value(r, static_cast<int>(call), i);
      ar.allreduce_mean(x.data(), n, static_cast<float>(world), threads, run);
      for (int64_t i = 0; i < n; ++i) {
        float s = value(0, static_cast<int>(call), i);
        for (int k = 1; k < world; ++k) s += value(k, static_cast<int>(call), i);
        s /= static_cast<float>(world);
        if (std::memcmp(&s, &x[i], sizeof s) != 0) {
          if (f++ < 3)
            std::fprintf(stderr, "world %d rank %d call %zu (n %lld): [%lld] = %.9g, expected %.9g\n", world, r, call,
                         static_cast<long long>(n), static_cast<long long>(i), x[i], s);
        }
      }
    }
    if (r == 0) ar.unlink();
    return f;
  });
  CHECK(failed == 0, "world %d, chunk %lld, %d thread(s): %d failure(s)", world, static_cast<long long>(chunk),
        threads, failed);
}

// Rank 1 opens the segment and exits: rank 0's all-reduce must throw, naming rank 1, long
// before its timeout.
void a_rank_that_exits_is_seen() {
  const std::string name = segment_name("exit");
  int failed = in_ranks(2, [&](int r) {
    ShmAllReduce ar(name, r, 2, 64, 60.0);
    if (r == 1) _exit(0);
    std::vector<float> x(1000, 1.f);
    auto t0 = std::chrono::steady_clock::now();
    std::string what;
    try {
      ar.allreduce_mean(x.data(), 1000, 2.f, 1, serial);
    } catch (const std::runtime_error& e) {
      what = e.what();
    }
    ar.unlink();
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (what.find("rank 1") == std::string::npos || what.find("exited") == std::string::npos) {
      std::fprintf(stderr, "expected an error naming rank 1 as exited, got '%s'\n", what.c_str());
      return 1;
    }
    if (dt > 5.0) {
      std::fprintf(stderr, "the exit was seen after %.1f s\n", dt);
      return 1;
    }
    return 0;
  });
  CHECK(failed == 0, "a rank that exits: %d failure(s)", failed);
}

// Rank 1 lives but never calls: rank 0 gives up after its timeout.
void a_rank_that_never_arrives_times_out() {
  const std::string name = segment_name("hang");
  int failed = in_ranks(2, [&](int r) {
    ShmAllReduce ar(name, r, 2, 64, 0.5);
    if (r == 1) {
      std::this_thread::sleep_for(std::chrono::seconds(3));
      return 0;
    }
    std::vector<float> x(100, 1.f);
    auto t0 = std::chrono::steady_clock::now();
    std::string what;
    try {
      ar.allreduce_mean(x.data(), 100, 2.f, 1, serial);
    } catch (const std::runtime_error& e) {
      what = e.what();
    }
    ar.unlink();
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (what.find("did not arrive within the timeout") == std::string::npos || dt < 0.5 || dt > 2.5) {
      std::fprintf(stderr, "expected a timeout after 0.5 s, got '%s' after %.2f s\n", what.c_str(), dt);
      return 1;
    }
    return 0;
  });
  CHECK(failed == 0, "a rank that never arrives: %d failure(s)", failed);
}

void a_mismatched_geometry_is_refused() {
  const std::string name = segment_name("geometry");
  int failed = in_ranks(2, [&](int r) {
    if (r == 0) {
      ShmAllReduce ar(name, 0, 2, 64, 5.0);
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      ar.unlink();
      return 0;
    }
    try {
      ShmAllReduce ar(name, 1, 2, 128, 5.0);
    } catch (const std::runtime_error& e) {
      return std::strstr(e.what(), "is for 2 ranks of chunks of 64") ? 0 : 1;
    }
    return 1;
  });
  CHECK(failed == 0, "a mismatched geometry: %d failure(s)", failed);
  bool threw = false;
  try {
    ShmAllReduce ar(name, 2, 2, 64, 1.0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "rank 2 of 2 is refused");
}

}  // namespace

int main() {
  for (int world : {1, 2, 3}) {
    sums_are_the_ranks_sum_on_every_rank(world, 64, 1, serial);
    sums_are_the_ranks_sum_on_every_rank(world, 65536, 2, threaded);
  }
  a_rank_that_exits_is_seen();
  a_rank_that_never_arrives_times_out();
  a_mismatched_geometry_is_refused();
  TEST_MAIN_END("test_shm_allreduce");
}
