// The element type of a convolution's tensors, which the kernels' names, ABIs and byte
// strides follow: fp32 now, bf16 next.
#pragma once

namespace dc {

enum class DataType { f32 };

// Bytes of one element.
constexpr int elem_bytes(DataType t) {
  switch (t) {
    case DataType::f32:
      return 4;
  }
  return 0;
}

// The kernel names' prefix: "f32".
constexpr const char* dtype_name(DataType t) {
  switch (t) {
    case DataType::f32:
      return "f32";
  }
  return "?";
}

}  // namespace dc
