#include "jit/kernel_cache.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <list>
#include <mutex>
#include <unordered_map>

#include "jit/fork_safe_mutex.h"

namespace dc {

namespace {

int64_t env_cap_bytes() {
  const char* env = std::getenv("TORCH_DIRECTCONV_CACHE_MB");
  double mb = env && *env ? std::atof(env) : 64.0;
  if (!(mb > 0)) mb = 64.0;
  return static_cast<int64_t>(mb * 1024 * 1024);
}

void dump(const JitKernel& k) {
  const char* dir = std::getenv("TORCH_DIRECTCONV_JIT_DUMP");
  if (!dir || !*dir) return;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  std::string path = std::string(dir) + "/" + k.name() + ".bin";
  if (FILE* f = std::fopen(path.c_str(), "wb")) {
    std::fwrite(k.code(), 1, k.code_bytes(), f);
    std::fclose(f);
  } else {
    std::fprintf(stderr, "torch_directconv: cannot write JIT dump %s\n", path.c_str());
  }
}

class Cache {
 public:
  KernelPtr get(const std::string& name, const std::function<std::unique_ptr<JitGenerator>()>& make,
                const std::string& plan) {
    std::promise<KernelPtr> promise;
    std::shared_future<KernelPtr> fut;
    {
      std::lock_guard<ForkSafeMutex> lock(mu_);
      auto it = map_.find(name);
      if (it != map_.end()) {
        lru_.splice(lru_.begin(), lru_, it->second.lru);
        ++stats_.hits;
        fut = it->second.kernel;
      } else {
        lru_.push_front(name);
        map_.emplace(name, Entry{promise.get_future().share(), lru_.begin(), 0});
      }
    }
    // Whoever inserted the entry generates; everybody else waits for its result.
    if (fut.valid()) return fut.get();
    return generate(name, make, plan, promise);
  }

  KernelCacheStats stats() {
    std::lock_guard<ForkSafeMutex> lock(mu_);
    KernelCacheStats s = stats_;
    s.entries = static_cast<int64_t>(map_.size());
    s.cap_bytes = cap_;
    return s;
  }
  void set_cap(int64_t cap) {
    std::lock_guard<ForkSafeMutex> lock(mu_);
    cap_ = cap;
    evict_locked("");
  }
  void clear() {
    std::lock_guard<ForkSafeMutex> lock(mu_);
    int64_t cap = cap_;
    cap_ = 0;
    evict_locked("");
    cap_ = cap;
  }

 private:
  struct Entry {
    std::shared_future<KernelPtr> kernel;
    std::list<std::string>::iterator lru;
    int64_t bytes;  // 0 while being generated
  };

  KernelPtr generate(const std::string& name, const std::function<std::unique_ptr<JitGenerator>()>& make,
                     const std::string& plan, std::promise<KernelPtr>& promise) {
    auto t0 = std::chrono::steady_clock::now();
    std::shared_ptr<const JitKernel> k;
    try {
      k = make()->build();  // the generator goes here: the cache keeps only the copy
    } catch (...) {
      promise.set_exception(std::current_exception());
      std::lock_guard<ForkSafeMutex> lock(mu_);
      erase_locked(name);
      throw;
    }
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    dump(*k);
    if (verbose())
      std::fprintf(stderr, "torch_directconv: jit %s: %zu bytes in %.3f ms; plan: %s\n", name.c_str(), k->code_bytes(), ms,
                   plan.c_str());
    KernelPtr result = k;
    promise.set_value(result);
    std::lock_guard<ForkSafeMutex> lock(mu_);
    ++stats_.generated;
    stats_.generate_ms += ms;
    auto it = map_.find(name);
    if (it != map_.end()) {
      it->second.bytes = static_cast<int64_t>(k->reserved_bytes());
      stats_.bytes += it->second.bytes;
    }
    evict_locked(name);
    return result;
  }

  void erase_locked(const std::string& name) {
    auto it = map_.find(name);
    if (it == map_.end()) return;
    stats_.bytes -= it->second.bytes;
    lru_.erase(it->second.lru);
    map_.erase(it);
  }

  // In the child of a fork(): a kernel still being generated belonged to a thread the child
  // does not have, so its result would never come. The next request generates it anew.
  void drop_unfinished_locked() {
    for (auto it = map_.begin(); it != map_.end();) {
      if (it->second.bytes != 0) {
        ++it;
        continue;
      }
      lru_.erase(it->second.lru);
      it = map_.erase(it);
    }
  }

  // Drops least recently used, finished kernels until the cache fits its cap.
  void evict_locked(const std::string& keep) {
    auto it = lru_.end();
    while (stats_.bytes > cap_ && it != lru_.begin()) {
      --it;
      auto m = map_.find(*it);
      if (*it == keep || m->second.bytes == 0) continue;
      stats_.bytes -= m->second.bytes;
      ++stats_.evicted;
      map_.erase(m);
      it = lru_.erase(it);
    }
  }

  ForkSafeMutex mu_{[this] { drop_unfinished_locked(); }};
  std::unordered_map<std::string, Entry> map_;
  std::list<std::string> lru_;  // front = most recently used
  KernelCacheStats stats_;
  int64_t cap_ = env_cap_bytes();
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: kernels may run during static destruction
  return *c;
}
// Made at load, before another thread can be inside it: no fork() finds it half made.
[[maybe_unused]] Cache& g_cache_at_load = cache();

}  // namespace

KernelPtr get_kernel(const std::string& name, const std::function<std::unique_ptr<JitGenerator>()>& make,
                     const std::string& plan) {
  return cache().get(name, make, plan);
}
KernelCacheStats kernel_cache_stats() { return cache().stats(); }
void set_kernel_cache_cap_bytes(int64_t cap) { cache().set_cap(cap); }
void clear_kernel_cache() { cache().clear(); }
bool verbose() {
  static const bool v = [] {
    const char* env = std::getenv("TORCH_DIRECTCONV_VERBOSE");
    return env && *env && std::string(env) != "0";
  }();
  return v;
}
namespace {
// Read at load, before another thread can be inside it: no fork() finds it half read.
[[maybe_unused]] const bool g_verbose_at_load = verbose();
}  // namespace

}  // namespace dc
