// A pool of memory blocks for the tensors the ops return (outputs, saved tensors, gradients,
// layout conversions), so that a training step does not fault in fresh pages at every step.
//
// glibc returns large freed blocks to the OS (its mmap threshold, heap trimming), so without a
// pool every step maps its activations and gradients again and takes a page fault per page.
// Here a freed block is kept, keyed by its size, and handed out again to a request of that
// size or a little less:
//   - blocks are whole pages of their own (mmap), so that returning one lowers the resident
//     memory; a request takes the smallest kept block that fits it with at most 1/16 slack,
//     the most recently freed of that size (its pages are the likeliest to be in cache);
//   - a request that finds none maps a fresh block, after returning kept blocks to the OS,
//     the least recently freed first, as far as needed to keep the mapped memory (in use +
//     kept + the new block) within 1.5x the most the pool ever had in use at once. A training
//     step whose later sizes differ from its earlier ones needs some blocks of both kept (its
//     weight gradients are freed at zero_grad while the forward maps its activations): with
//     1.5x, ResNet-50 steps map nothing after the first, with 1.25x they still do;
//   - at most cap_bytes() are kept (TORCH_DIRECTCONV_POOL_MB, default 1024): a block freed
//     past it goes back to the OS, as does one larger than an eighth of the cap (a single huge
//     output stays resident no longer than it lives).
// One mutex guards the pool (a ForkSafeMutex: fork() never copies it held); system calls run
// outside it. The process-wide pool is made at load and never destroyed, so a tensor freed
// during static destruction, or on any thread, still has a pool to go back to.
#pragma once

#include <cstdint>
#include <deque>
#include <list>
#include <map>
#include <utility>
#include <vector>

#include "jit/fork_safe_mutex.h"

namespace dc {

struct BlockPoolStats {
  int64_t held_bytes = 0, held_blocks = 0;  // kept for reuse
  int64_t in_use_bytes = 0;                 // handed out and not yet back
  int64_t peak_bytes = 0;                   // the most ever mapped at once (in use + kept)
  int64_t in_use_peak_bytes = 0;            // the most ever in use at once
  int64_t hits = 0, misses = 0;             // requests served by a kept block, or by a fresh mapping
  int64_t released_blocks = 0;              // blocks returned to the OS
  int64_t cap_bytes = 0;
};

class BlockPool {
 public:
  static constexpr int64_t kPage = 4096;
  // A kept block serves requests down to 1/kSlackDiv less than its size.
  static constexpr int64_t kSlackDiv = 16;
  // A miss keeps the mapped memory within the in-use peak plus 1/kMissHeadroomDiv of it.
  static constexpr int64_t kMissHeadroomDiv = 2;
  // Blocks of more than 1/kMaxBlockDiv of the cap are never kept.
  static constexpr int64_t kMaxBlockDiv = 8;

  explicit BlockPool(int64_t cap_bytes);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // A page-aligned block of at least `bytes` (> 0); its size goes to *block_bytes, to be given
  // back to release(). Throws std::bad_alloc when the OS has no memory.
  void* allocate(int64_t bytes, int64_t* block_bytes);
  // Gives a block back: kept for reuse under the cap, else returned to the OS.
  void release(void* ptr, int64_t block_bytes);
  // Returns every kept block to the OS (blocks in use are not affected).
  void empty();
  void set_cap_bytes(int64_t cap);
  BlockPoolStats stats();

  static int64_t block_bytes_for(int64_t bytes) { return (bytes + kPage - 1) / kPage * kPage; }

 private:
  struct Free {
    void* ptr;
    int64_t bytes;
  };
  using Order = std::list<Free>;  // front: the least recently freed
  // Takes kept blocks off the pool, oldest first, until `bytes` are taken or none is left.
  void take_oldest_locked(int64_t bytes, std::vector<Free>* out);
  // What a miss may leave mapped: in use + kept + its own block.
  int64_t miss_limit_locked() const;
  void forget_locked(Order::iterator it);
  static void unmap(const std::vector<Free>& blocks);

  ForkSafeMutex mu_;
  Order order_;
  std::map<int64_t, std::deque<Order::iterator>> by_size_;  // each deque in free order
  BlockPoolStats stats_;
};

// The process-wide pool of the ops' tensors (TORCH_DIRECTCONV_POOL_MB).
BlockPool& tensor_block_pool();

}  // namespace dc
