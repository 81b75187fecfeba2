#include "conv/fwd_driver.h"

#include <cstdint>
#include <list>
#include <mutex>
#include <unordered_map>

namespace dc {

namespace {

template <typename T>
T* offset(T* base, int64_t elements) {
  // Border tiles may start left of their row; the kernel never reads there.
  return reinterpret_cast<T*>(reinterpret_cast<intptr_t>(base) + elements * static_cast<int64_t>(sizeof(float)));
}

std::shared_ptr<const FwdPrimitive> build(const ConvDesc& desc, Isa isa, int threads) {
  auto prim = std::make_shared<FwdPrimitive>();
  prim->plan = make_fwd_plan(desc, isa, threads);
  const std::string info = prim->plan.to_string();
  for (const FwdKernelSpec& sp : prim->plan.kernels) {
    prim->kernels.push_back(get_kernel(sp.name(), [&] { return make_fwd_kernel(sp); }, info));
    prim->fns.push_back(prim->kernels.back()->entry<FwdKernelFn>());
  }
  return prim;
}

class PrimitiveCache {
 public:
  std::shared_ptr<const FwdPrimitive> get(const ConvDesc& desc, Isa isa, int threads) {
    std::string key = desc.to_string() + "/" + isa_name(isa) + "/" + std::to_string(threads);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) {
        lru_.splice(lru_.begin(), lru_, it->second.second);
        return it->second.first;
      }
    }
    // Built outside the lock: the kernel cache already makes concurrent builds safe, and
    // two threads building the same plan at once only duplicate cheap bookkeeping.
    auto prim = build(desc, isa, threads);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    if (it != map_.end()) return it->second.first;
    lru_.push_front(key);
    map_.emplace(key, std::make_pair(prim, lru_.begin()));
    while (map_.size() > kMaxEntries) {
      map_.erase(lru_.back());
      lru_.pop_back();
    }
    return prim;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    map_.clear();
    lru_.clear();
  }

 private:
  static constexpr size_t kMaxEntries = 256;
  std::mutex mu_;
  std::list<std::string> lru_;
  std::unordered_map<std::string, std::pair<std::shared_ptr<const FwdPrimitive>, std::list<std::string>::iterator>> map_;
};

PrimitiveCache& primitives() {
  static PrimitiveCache* c = new PrimitiveCache();
  return *c;
}

}  // namespace

std::shared_ptr<const FwdPrimitive> get_fwd_primitive(const ConvDesc& desc, Isa isa, int threads) {
  return primitives().get(desc, isa, threads);
}
void clear_fwd_primitives() { primitives().clear(); }

void fwd_execute(const FwdPrimitive& prim, const float* src, const float* wei, const float* bias, float* dst, bool relu,
                 int tid) {
  if (tid < 0 || tid >= static_cast<int>(prim.plan.streams.size())) return;
  FwdCallArgs a = prim.plan.strides;
  for (const FwdCall& c : prim.plan.streams[tid]) {
    a.src = offset(src, c.src_off);
    a.wei = offset(wei, c.wei_off);
    a.dst = offset(dst, c.dst_off);
    a.bias = bias ? offset(bias, c.bias_off) : nullptr;
    a.n_r = c.n_r;
    a.n_cb = c.n_cb;
    a.flags = (c.flags & kAccumulate) | (relu && (c.flags & kLastChunk) ? kRelu : 0);
    prim.fns[c.kernel](&a);
  }
}

}  // namespace dc
