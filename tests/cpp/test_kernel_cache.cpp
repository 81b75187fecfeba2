// The kernel cache: one generation per name under concurrency, LRU eviction past the cap
// without freeing kernels in use, and W^X pages.
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "jit/fwd_kernel.h"
#include "jit/kernel_cache.h"

using namespace dc;

namespace {

FwdKernelSpec spec(int s, int ow) {
  FwdKernelSpec sp;
  sp.isa = detected_isa();
  sp.s = s;
  sp.ow = ow;
  sp.n_oc = 2;
  sp.c_valid = sp.v();
  return sp;
}

// True when any mapping of this process is writable and executable at once.
bool has_wx_mapping() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    std::istringstream ls(line);
    std::string range, perms;
    ls >> range >> perms;
    if (perms.size() >= 3 && perms[1] == 'w' && perms[2] == 'x') return true;
  }
  return false;
}

}  // namespace

int main() {
  if (detected_isa() == Isa::none) {
    std::printf("test_kernel_cache: skipped, no AVX2 on this CPU\n");
    return 0;
  }
  clear_kernel_cache();
  const int64_t gen0 = kernel_cache_stats().generated;

  // 8 threads ask for the same 4 new kernels at the same moment: each is generated once.
  std::atomic<int> made{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  std::vector<KernelPtr> got(8);
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] {
      while (!go.load()) std::this_thread::yield();
      FwdKernelSpec sp = spec(1 + t % 4, 3);
      got[t] = get_kernel(sp.name(), [&] {
        ++made;
        return make_fwd_kernel(sp);
      }, "test");
    });
  go = true;
  for (auto& th : threads) th.join();
  CHECK(made.load() == 4, "expected 4 generations, got %d", made.load());
  CHECK(kernel_cache_stats().generated - gen0 == 4, "generated counter");
  for (int t = 0; t < 8; ++t) CHECK(got[t] == got[t % 4], "threads asking for one name share one kernel");
  CHECK(!has_wx_mapping(), "a mapping is writable and executable");

  // A cap smaller than two kernels evicts the older one; a held kernel stays callable.
  KernelPtr held = got[0];
  set_kernel_cache_cap_bytes(static_cast<int64_t>(held->code_bytes()) + 1);
  KernelCacheStats s = kernel_cache_stats();
  CHECK(s.bytes <= s.cap_bytes, "cache holds %lld bytes over its cap %lld", static_cast<long long>(s.bytes),
        static_cast<long long>(s.cap_bytes));
  CHECK(s.evicted >= 3, "expected evictions, got %lld", static_cast<long long>(s.evicted));
  const int64_t before = kernel_cache_stats().generated;
  FwdKernelSpec sp0 = spec(1, 3);
  KernelPtr again = get_kernel(sp0.name(), [&] { return make_fwd_kernel(sp0); }, "test");
  CHECK(again->name() == held->name(), "same name");
  // Either still cached (the same object) or evicted and generated anew; the copy held
  // here stays valid either way, since eviction only drops the cache's reference.
  CHECK(again == held || kernel_cache_stats().generated == before + 1, "an evicted kernel is generated again");
  CHECK(held.use_count() >= 1 && held->code_bytes() > 0, "the held kernel is still alive");
  set_kernel_cache_cap_bytes(64 << 20);
  TEST_MAIN_END("test_kernel_cache");
}
