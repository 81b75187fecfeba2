// What the drivers share: the primitive cache and pointer offsets.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "jit/fork_safe_mutex.h"

namespace dc {

// base + elements floats. Border tiles may start left of their row, where the kernel
// never reads, so this is integer arithmetic rather than pointer arithmetic.
template <typename T>
T* at_offset(T* base, int64_t elements) {
  return reinterpret_cast<T*>(reinterpret_cast<intptr_t>(base) + elements * static_cast<int64_t>(sizeof(float)));
}

// The index of the spec that bears sp's name in a plan's list, sp appended when none does:
// each distinct kernel is generated once per plan.
template <typename Spec>
int32_t spec_index(std::vector<Spec>* specs, const Spec& sp) {
  const std::string name = sp.name();
  for (size_t i = 0; i < specs->size(); ++i)
    if ((*specs)[i].name() == name) return static_cast<int32_t>(i);
  specs->push_back(sp);
  return static_cast<int32_t>(specs->size() - 1);
}

// A plan's kernel names, comma-separated (its to_string's list).
template <typename Spec>
std::string spec_names(const std::vector<Spec>& specs) {
  std::string out;
  for (size_t i = 0; i < specs.size(); ++i) out += (i ? "," : "") + specs[i].name();
  return out;
}

// A small LRU cache of primitives (a plan with its generated kernels), keyed by problem,
// ISA and threads. Kernels themselves live in the kernel cache; this one only saves
// re-planning. Make the long-lived ones at load (see ForkSafeMutex).
template <typename Prim>
class PrimitiveCache {
 public:
  std::shared_ptr<const Prim> get(const std::string& key, const std::function<std::shared_ptr<const Prim>()>& build) {
    {
      std::lock_guard<ForkSafeMutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) {
        lru_.splice(lru_.begin(), lru_, it->second.second);
        return it->second.first;
      }
    }
    // Built outside the lock: the kernel cache makes concurrent generation safe, and two
    // threads planning the same problem at once only duplicate cheap bookkeeping.
    auto prim = build();
    std::lock_guard<ForkSafeMutex> lock(mu_);
    auto it = map_.find(key);
    if (it != map_.end()) return it->second.first;
    lru_.push_front(key);
    map_.emplace(key, std::make_pair(prim, lru_.begin()));
    while (map_.size() > kMaxEntries) {
      map_.erase(lru_.back());
      lru_.pop_back();
    }
    return prim;
  }
  void clear() {
    std::lock_guard<ForkSafeMutex> lock(mu_);
    map_.clear();
    lru_.clear();
  }

 private:
  static constexpr size_t kMaxEntries = 256;
  ForkSafeMutex mu_;
  std::list<std::string> lru_;
  std::unordered_map<std::string, std::pair<std::shared_ptr<const Prim>, std::list<std::string>::iterator>> map_;
};

}  // namespace dc
