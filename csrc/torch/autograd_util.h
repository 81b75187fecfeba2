// What the C++ autograd kernels share (autograd.cpp: the convolutions; autograd_blocked.cpp:
// the layout, batch-norm and pooling ops). A C++ node asks the engine which of its inputs'
// gradients the running backward will use (needs_input_grad answers from the graph task),
// so only those are computed, as torch's convolution does with its output mask.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

namespace dc_torch {

inline bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Whether any tensor argument will need a gradient: only then is a node recorded; otherwise
// the call goes straight below autograd (also what lets the ops run inside the forward of a
// Python autograd.Function under torch.func transforms).
template <typename... T>
bool records_graph(const T&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// The node's edges are its present tensor arguments, in order: an absent optional tensor
// has none. edges[i] is the edge of the op's i-th tensor argument, -1 when it is absent.
template <size_t N>
std::vector<int64_t> edge_indices(const std::array<bool, N>& present) {
  std::vector<int64_t> edges(N, -1);
  int64_t next = 0;
  for (size_t i = 0; i < N; ++i)
    if (present[i]) edges[i] = next++;
  return edges;
}

// Whether the running backward uses the gradient of the op's tensor argument `arg`
// (ctx->saved_data["edges"] from edge_indices).
inline bool wanted(torch::autograd::AutogradContext* ctx, int64_t arg) {
  const int64_t edge = ctx->saved_data["edges"].toIntList().get(arg);
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

// The typed handle of directconv::name.
template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// A backward op called from a backward: below autograd, where its (Python) autograd kernel
// would only pass the call on at a cost, unless the backward is itself being recorded
// (create_graph), where that kernel must see it (it refuses a double backward).
template <typename Fn, typename... Args>
auto call_backward(const c10::TypedOperatorHandle<Fn>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

}  // namespace dc_torch
