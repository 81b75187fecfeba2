// What the driver tests share: tensors between guard pages, and the RunShares that run a
// driver's shares in turn or on plain threads (the torch layer runs them on its pool).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "conv/parallel.h"

namespace dc_test {

// `bytes` between two inaccessible pages, placed against the upper one (at_end) or the
// lower one, so a read or write past either end faults.
class Guarded {
 public:
  Guarded(size_t bytes, bool at_end) : bytes_(bytes) {
    const size_t page = sysconf(_SC_PAGESIZE), body = (bytes + page - 1) / page * page;
    map_bytes_ = body + 2 * page;
    map_ = static_cast<uint8_t*>(mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (map_ == MAP_FAILED) throw std::runtime_error("mmap failed");
    mprotect(map_, page, PROT_NONE);
    mprotect(map_ + page + body, page, PROT_NONE);
    data_ = map_ + page + (at_end ? body - bytes : 0);
  }
  ~Guarded() { munmap(map_, map_bytes_); }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  uint8_t* map_;
  uint8_t* data_;
  size_t map_bytes_, bytes_;
};

// `count` elements of T in a Guarded buffer, optionally a copy of a vector's.
template <typename T>
class GuardedArray {
 public:
  GuardedArray(size_t count, bool at_end) : g_(count * sizeof(T), at_end), count_(count) {}
  GuardedArray(const std::vector<T>& v, bool at_end) : GuardedArray(v.size(), at_end) {
    if (!v.empty()) std::memcpy(data(), v.data(), v.size() * sizeof(T));
  }
  T* data() const { return g_.as<T>(); }
  std::vector<T> get() const { return {data(), data() + count_}; }

 private:
  Guarded g_;
  size_t count_;
};

inline dc::RunShares serial() {
  return [](int n, const dc::ShareFn& fn) {
    for (int t = 0; t < n; ++t) fn(t, n);
  };
}
inline dc::RunShares threaded() {
  return [](int n, const dc::ShareFn& fn) {
    std::vector<std::thread> ts;
    for (int t = 0; t < n; ++t) ts.emplace_back([&, t] { fn(t, n); });
    for (auto& th : ts) th.join();
  };
}

}  // namespace dc_test
