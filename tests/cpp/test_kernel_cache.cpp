// The kernel cache: one generation per name under concurrency, LRU eviction past the cap
// without freeing kernels in use, a count and a cap that cover the pages the kernels keep,
// W^X pages, and a fork() in the middle of a generation.
#include <sys/wait.h>
#include <unistd.h>

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
  sp.isa = fp32_isa(detected_isa());
  sp.s = s;
  sp.ow = ow;
  sp.n_oc = 2;
  sp.c_valid = sp.v();
  return sp;
}

// The i-th of a few dozen distinct kernels, built in the cache and let go at once.
void request_kernel(int i) {
  FwdKernelSpec sp = spec(1 + i % 5, 1 + i / 5 % 6);
  sp.c_valid = 1 + i / 30 % sp.v();
  get_kernel(sp.name(), [&] { return make_fwd_kernel(sp); }, "test");
}

// Bytes of anonymous executable mappings: in this program, only generated code lives there.
int64_t anon_exec_bytes() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  int64_t total = 0;
  while (std::getline(maps, line)) {
    std::istringstream ls(line);
    std::string range, perms, offset, dev, inode, path;
    ls >> range >> perms >> offset >> dev >> inode >> path;
    if (perms.size() < 3 || perms[2] != 'x' || !path.empty()) continue;
    const size_t dash = range.find('-');
    total += std::stoll(range.substr(dash + 1), nullptr, 16) - std::stoll(range.substr(0, dash), nullptr, 16);
  }
  return total;
}

// The cache's byte count is what its kernels keep mapped: whole pages, nothing uncounted.
void counts_the_pages_kernels_keep() {
  const int64_t page = sysconf(_SC_PAGESIZE);
  clear_kernel_cache();
  set_kernel_cache_cap_bytes(64 << 20);
  const int64_t exec0 = anon_exec_bytes();
  for (int i = 0; i < 40; ++i) request_kernel(i);
  KernelCacheStats s = kernel_cache_stats();
  CHECK(s.entries == 40, "expected 40 kernels in the cache, got %lld", static_cast<long long>(s.entries));
  CHECK(s.bytes % page == 0 && s.bytes >= s.entries * page, "%lld bytes for %lld kernels are not whole pages each",
        static_cast<long long>(s.bytes), static_cast<long long>(s.entries));
  CHECK(anon_exec_bytes() - exec0 == s.bytes, "the kernels keep %lld bytes of code mappings, the cache counts %lld",
        static_cast<long long>(anon_exec_bytes() - exec0), static_cast<long long>(s.bytes));
}

// Past the cap, eviction frees the mappings of kernels nobody holds: what stays fits the cap.
void eviction_keeps_the_mappings_within_the_cap() {
  const int64_t page = sysconf(_SC_PAGESIZE), cap = 5 * page;
  clear_kernel_cache();
  const int64_t exec0 = anon_exec_bytes();
  set_kernel_cache_cap_bytes(cap);
  for (int i = 0; i < 40; ++i) request_kernel(i);
  KernelCacheStats s = kernel_cache_stats();
  CHECK(s.bytes <= cap && s.entries >= 1, "%lld kernels hold %lld bytes, cap %lld", static_cast<long long>(s.entries),
        static_cast<long long>(s.bytes), static_cast<long long>(cap));
  CHECK(anon_exec_bytes() - exec0 <= cap, "the cached kernels keep %lld bytes of code mappings over a cap of %lld",
        static_cast<long long>(anon_exec_bytes() - exec0), static_cast<long long>(cap));
  set_kernel_cache_cap_bytes(64 << 20);
}

// A fork() while another thread generates a kernel: the child, which lacks that thread,
// generates the kernel itself instead of waiting for it.
void fork_during_a_generation() {
  FwdKernelSpec sp = spec(5, 4);
  std::atomic<bool> inside{false}, release{false};
  std::thread generating([&] {
    get_kernel(sp.name(), [&] {
      inside = true;
      while (!release) std::this_thread::yield();
      return make_fwd_kernel(sp);
    }, "test");
  });
  while (!inside) std::this_thread::yield();
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(5);  // waiting for the parent's thread would block this child for good
    KernelPtr k = get_kernel(sp.name(), [&] { return make_fwd_kernel(sp); }, "test");
    _exit(k && k->name() == sp.name() ? 0 : 2);
  }
  release = true;
  generating.join();
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child ended with wait status %d", status);
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
  counts_the_pages_kernels_keep();
  eviction_keeps_the_mappings_within_the_cap();
  fork_during_a_generation();
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
  set_kernel_cache_cap_bytes(static_cast<int64_t>(held->reserved_bytes()) + 1);
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
