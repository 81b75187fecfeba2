#include "op_timers.h"

#include <ATen/record_function.h>

#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

namespace dc_torch {
namespace {

using Clock = std::chrono::steady_clock;

struct Totals {
  int64_t ns = 0;
  int64_t calls = 0;
};

std::mutex totals_mutex;
std::map<std::string, Totals> totals;  // by op name, under totals_mutex
bool running = false;                  // under totals_mutex
at::CallbackHandle handle = 0;

// Only the outermost directconv op of a thread is timed, so nothing counts twice.
thread_local int depth = 0;

struct Started : at::ObserverContext {
  Clock::time_point t0;
  bool outermost = false;
};

bool ours(const at::RecordFunction& fn) { return std::strncmp(fn.name(), "directconv::", 12) == 0; }

std::unique_ptr<at::ObserverContext> on_enter(const at::RecordFunction& fn) {
  if (!ours(fn)) return nullptr;
  auto ctx = std::make_unique<Started>();
  ctx->outermost = depth++ == 0;
  ctx->t0 = Clock::now();
  return ctx;
}

void on_exit(const at::RecordFunction& fn, at::ObserverContext* raw) {
  if (raw == nullptr) return;
  const auto t1 = Clock::now();
  auto* ctx = static_cast<Started*>(raw);
  --depth;
  if (!ctx->outermost) return;
  const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - ctx->t0).count();
  std::lock_guard<std::mutex> lock(totals_mutex);
  Totals& t = totals[fn.name() + 12];
  t.ns += ns;
  t.calls += 1;
}

void start() {
  std::lock_guard<std::mutex> lock(totals_mutex);
  totals.clear();
  if (running) return;
  handle = at::addGlobalCallback(
      at::RecordFunctionCallback(&on_enter, &on_exit).scopes({at::RecordScope::FUNCTION}).needsInputs(false));
  running = true;
}

pybind11::dict stop() {
  std::lock_guard<std::mutex> lock(totals_mutex);
  if (running) {
    at::removeCallback(handle);
    running = false;
  }
  pybind11::dict out;
  for (const auto& [name, t] : totals) out[pybind11::str(name)] = pybind11::make_tuple(t.ns * 1e-9, t.calls);
  totals.clear();
  return out;
}

}  // namespace

void register_op_timers(pybind11::module_& m) {
  m.def("op_timers_start", &start,
        "Starts timing every directconv op (outermost per thread) from the dispatcher; clears the totals.");
  m.def("op_timers_stop", &stop, "Stops timing; returns {op name: (seconds, calls)} since the start.");
}

}  // namespace dc_torch
