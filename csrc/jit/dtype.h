// The element type of a convolution's tensors, which the kernels' names, ABIs and byte
// strides follow: fp32, and bf16 (the AMX kernels, jit/amx_fwd_kernel.h).
#pragma once

namespace dc {

enum class DataType { f32, bf16 };

// Bytes of one element.
constexpr int elem_bytes(DataType t) {
  switch (t) {
    case DataType::f32:
      return 4;
    case DataType::bf16:
      return 2;
  }
  return 0;
}

// The kernel names' prefix: "f32", "bf16".
constexpr const char* dtype_name(DataType t) {
  switch (t) {
    case DataType::f32:
      return "f32";
    case DataType::bf16:
      return "bf16";
  }
  return "?";
}

}  // namespace dc
