#include "conv/scratch.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>

namespace dc {

namespace {

constexpr int64_t kPage = 4096, kHugePage = 2 << 20;

int64_t env_cap_bytes() {
  const char* env = std::getenv("TORCH_DIRECTCONV_SCRATCH_MB");
  const double mb = env && *env ? std::atof(env) : 64.0;
  return static_cast<int64_t>((mb >= 0 ? mb : 64.0) * 1024 * 1024);
}

// Set when the extension loads: a function-local static's guard could be caught by a fork.
std::atomic<int64_t> cap_bytes{env_cap_bytes()};
std::atomic<int64_t> kept{0};

struct Buffer {
  void* ptr = nullptr;
  int64_t bytes = 0;
  bool counted = false;  // kept between calls, and so in `kept`

  void release() {
    if (!ptr) return;
    munmap(ptr, static_cast<size_t>(bytes));
    if (counted) kept -= bytes;
    ptr = nullptr;
    bytes = 0;
    counted = false;
  }
  void reserve(int64_t want) {
    release();
    // Whole huge pages past 2 MB, so that a large buffer faults in a few pages, not thousands.
    bytes = want >= kHugePage ? (want + kHugePage - 1) / kHugePage * kHugePage : (want + kPage - 1) / kPage * kPage;
    void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      bytes = 0;
      throw std::bad_alloc();
    }
    if (bytes >= kHugePage) madvise(p, static_cast<size_t>(bytes), MADV_HUGEPAGE);
    ptr = p;
  }
  // At the end of a call: kept if it fits under the cap, else returned.
  void settle() {
    if (!ptr || counted) return;
    if (kept.fetch_add(bytes) + bytes <= cap_bytes.load()) {
      counted = true;
      return;
    }
    kept -= bytes;
    munmap(ptr, static_cast<size_t>(bytes));
    ptr = nullptr;
    bytes = 0;
  }
};

struct ThreadScratch {
  Buffer slots[kScratchSlots];
  int depth = 0;
  ~ThreadScratch() {
    for (Buffer& b : slots) b.release();
  }
};

ThreadScratch& mine() {
  thread_local ThreadScratch s;
  return s;
}

}  // namespace

float* scratch_floats(ScratchSlot slot, int64_t floats) {
  Buffer& b = mine().slots[slot];
  const int64_t want = std::max<int64_t>(1, floats) * static_cast<int64_t>(sizeof(float));
  if (b.bytes < want) b.reserve(want);
  return static_cast<float*>(b.ptr);
}

ScratchScope::ScratchScope() { ++mine().depth; }
ScratchScope::~ScratchScope() {
  ThreadScratch& s = mine();
  if (--s.depth > 0) return;
  for (Buffer& b : s.slots) b.settle();
}

int64_t scratch_cap_bytes() { return cap_bytes.load(); }
void set_scratch_cap_bytes(int64_t c) { cap_bytes = c; }
int64_t scratch_kept_bytes() { return kept.load(); }

}  // namespace dc
