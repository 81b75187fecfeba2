#include "tensor_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include "conv/block_pool.h"

namespace dc_torch {

namespace {

// What a pooled tensor's storage gives back when it dies.
struct PooledBlock {
  void* ptr;
  int64_t bytes;
};

void give_back(void* ctx) {
  auto* block = static_cast<PooledBlock*>(ctx);
  dc::tensor_block_pool().release(block->ptr, block->bytes);
  delete block;
}

class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (static_cast<int64_t>(n) < kPoolMinBytes) return c10::GetCPUAllocator()->allocate(n);
    int64_t bytes = 0;
    void* ptr = dc::tensor_block_pool().allocate(static_cast<int64_t>(n), &bytes);
    return {ptr, new PooledBlock{ptr, bytes}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

c10::Allocator* pool_allocator() {
  // Never destroyed, as the pool: storages may die during static destruction.
  static PoolAllocator* allocator = new PoolAllocator();
  return allocator;
}

at::Tensor new_tensor(at::IntArrayRef size, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "new_tensor: the pool holds CPU memory only");
  return at::detail::empty_generic(size, pool_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), options.memory_format_opt());
}

at::Tensor new_zeros(at::IntArrayRef size, const at::TensorOptions& options) {
  return new_tensor(size, options).zero_();
}

}  // namespace dc_torch
