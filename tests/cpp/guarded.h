// Test buffers between inaccessible pages, so that a kernel's read or write past either
// end of a tensor faults.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>

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

}  // namespace dc_test
