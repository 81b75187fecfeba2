#include "conv/block_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>

namespace dc {

BlockPool::BlockPool(int64_t cap_bytes) { stats_.cap_bytes = std::max<int64_t>(0, cap_bytes); }

BlockPool::~BlockPool() { empty(); }

void BlockPool::forget_locked(Order::iterator it) {
  stats_.held_bytes -= it->bytes;
  --stats_.held_blocks;
  order_.erase(it);
}

void BlockPool::take_oldest_locked(int64_t bytes, std::vector<Free>* out) {
  int64_t taken = 0;
  while (taken < bytes && !order_.empty()) {
    const Order::iterator oldest = order_.begin();
    auto size = by_size_.find(oldest->bytes);
    // The oldest block of all is the oldest of its size: the front of its deque.
    size->second.pop_front();
    if (size->second.empty()) by_size_.erase(size);
    taken += oldest->bytes;
    out->push_back(*oldest);
    forget_locked(oldest);
  }
  stats_.released_blocks += static_cast<int64_t>(out->size());
}

void BlockPool::unmap(const std::vector<Free>& blocks) {
  for (const Free& b : blocks) munmap(b.ptr, static_cast<size_t>(b.bytes));
}

int64_t BlockPool::miss_limit_locked() const {
  return stats_.in_use_peak_bytes + stats_.in_use_peak_bytes / kMissHeadroomDiv;
}

void* BlockPool::allocate(int64_t bytes, int64_t* block_bytes) {
  const int64_t want = block_bytes_for(std::max<int64_t>(1, bytes));
  std::vector<Free> returned;
  {
    std::lock_guard<ForkSafeMutex> lock(mu_);
    auto fit = by_size_.lower_bound(want);
    if (fit != by_size_.end() && fit->first - fit->first / kSlackDiv <= want) {
      const Order::iterator newest = fit->second.back();
      void* ptr = newest->ptr;
      *block_bytes = newest->bytes;
      fit->second.pop_back();
      if (fit->second.empty()) by_size_.erase(fit);
      forget_locked(newest);
      stats_.in_use_bytes += *block_bytes;
      stats_.in_use_peak_bytes = std::max(stats_.in_use_peak_bytes, stats_.in_use_bytes);
      ++stats_.hits;
      return ptr;
    }
    ++stats_.misses;
    // Counted as in use before it is mapped, so that no other thread's miss can push the peak
    // past what both hold.
    stats_.in_use_bytes += want;
    stats_.in_use_peak_bytes = std::max(stats_.in_use_peak_bytes, stats_.in_use_bytes);
    take_oldest_locked(stats_.in_use_bytes + stats_.held_bytes - miss_limit_locked(), &returned);
    stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.in_use_bytes + stats_.held_bytes);
  }
  unmap(returned);
  void* p = mmap(nullptr, static_cast<size_t>(want), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::lock_guard<ForkSafeMutex> lock(mu_);
    stats_.in_use_bytes -= want;
    throw std::bad_alloc();
  }
  *block_bytes = want;
  return p;
}

void BlockPool::release(void* ptr, int64_t block_bytes) {
  std::vector<Free> returned;
  {
    std::lock_guard<ForkSafeMutex> lock(mu_);
    stats_.in_use_bytes -= block_bytes;
    // Past the cap the freed block itself goes: a step that frees more than the cap then still
    // finds the blocks held before it (dropping the oldest would make every step map them again).
    // So does a block of more than an eighth of the cap: one huge output is not left resident.
    if (stats_.held_bytes + block_bytes > stats_.cap_bytes || block_bytes > stats_.cap_bytes / kMaxBlockDiv) {
      returned.push_back({ptr, block_bytes});
      ++stats_.released_blocks;
    } else {
      order_.push_back({ptr, block_bytes});
      by_size_[block_bytes].push_back(std::prev(order_.end()));
      stats_.held_bytes += block_bytes;
      ++stats_.held_blocks;
    }
  }
  unmap(returned);
}

void BlockPool::empty() {
  std::vector<Free> returned;
  {
    std::lock_guard<ForkSafeMutex> lock(mu_);
    take_oldest_locked(stats_.held_bytes, &returned);
  }
  unmap(returned);
}

void BlockPool::set_cap_bytes(int64_t cap) {
  std::vector<Free> returned;
  {
    std::lock_guard<ForkSafeMutex> lock(mu_);
    stats_.cap_bytes = std::max<int64_t>(0, cap);
    take_oldest_locked(stats_.held_bytes - stats_.cap_bytes, &returned);
  }
  unmap(returned);
}

BlockPoolStats BlockPool::stats() {
  std::lock_guard<ForkSafeMutex> lock(mu_);
  return stats_;
}

namespace {

int64_t env_pool_cap_bytes() {
  const char* env = std::getenv("TORCH_DIRECTCONV_POOL_MB");
  const double mb = env && *env ? std::atof(env) : 1024.0;
  return static_cast<int64_t>((mb >= 0 ? mb : 1024.0) * 1024 * 1024);
}

}  // namespace

BlockPool& tensor_block_pool() {
  // Never destroyed: tensors may be freed during static destruction, after any destructor.
  static BlockPool* pool = new BlockPool(env_pool_cap_bytes());
  return *pool;
}

namespace {
// Made at load, before another thread can be inside it: no fork() finds it half made.
[[maybe_unused]] BlockPool& g_pool_at_load = tensor_block_pool();
}  // namespace

}  // namespace dc
