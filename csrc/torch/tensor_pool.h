// The tensors the ops return come from here: new_tensor() is at::empty on the block pool
// (conv/block_pool.h) for tensors of kPoolMinBytes and more, on torch's CPU allocator below
// that (malloc's small bins reuse those without faulting). A rule in one place: every op that
// returns a fresh tensor makes it with new_tensor.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace dc_torch {

// The smallest tensor the pool takes: 4 pages, so that rounding to whole pages wastes at most
// a quarter of a block.
constexpr int64_t kPoolMinBytes = 4 * 4096;

// The c10::Allocator of the pool.
c10::Allocator* pool_allocator();

// An uninitialised tensor of `size` with the options' dtype and memory format, on the CPU.
at::Tensor new_tensor(at::IntArrayRef size, const at::TensorOptions& options);
// The same, zero-filled.
at::Tensor new_zeros(at::IntArrayRef size, const at::TensorOptions& options);

}  // namespace dc_torch
