// A test buffer between two inaccessible pages, so that a read or write past either end of
// the tensor in it faults.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace dc_test {

// `count` elements of T placed against the upper guard page (at_end) or the lower one.
template <typename T>
class Guarded {
 public:
  Guarded(size_t count, bool at_end) : count_(count) {
    const size_t page = sysconf(_SC_PAGESIZE), bytes = count * sizeof(T), body = (bytes + page - 1) / page * page;
    map_bytes_ = body + 2 * page;
    map_ = static_cast<uint8_t*>(mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (map_ == MAP_FAILED) throw std::runtime_error("mmap failed");
    mprotect(map_, page, PROT_NONE);
    mprotect(map_ + page + body, page, PROT_NONE);
    data_ = reinterpret_cast<T*>(map_ + page + (at_end ? body - bytes : 0));
  }
  Guarded(const std::vector<T>& v, bool at_end) : Guarded(v.size(), at_end) {
    if (!v.empty()) std::memcpy(data_, v.data(), v.size() * sizeof(T));
  }
  ~Guarded() { munmap(map_, map_bytes_); }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;

  T* data() const { return data_; }
  std::vector<T> get() const { return {data_, data_ + count_}; }

 private:
  uint8_t* map_;
  T* data_;
  size_t map_bytes_, count_;
};

}  // namespace dc_test
