#include "conv/fwd_driver.h"

#include <cstdint>
#include <stdexcept>

#include "conv/driver_util.h"

namespace dc {

namespace {

std::shared_ptr<const FwdPrimitive> build(const ConvDesc& desc, Isa isa, int threads, const FwdPlanOptions& options) {
  auto prim = std::make_shared<FwdPrimitive>();
  prim->plan = make_fwd_plan(desc, isa, threads, options);
  prim->info = prim->plan.to_string();
  acquire_kernels(*prim);  // generate them now, at the first call
  return prim;
}

PrimitiveCache<FwdPrimitive>& primitives() {
  static auto* c = new PrimitiveCache<FwdPrimitive>();  // never destroyed, like the kernel cache
  return *c;
}
// Made at load, before another thread can be inside it: no fork() finds it half made.
[[maybe_unused]] PrimitiveCache<FwdPrimitive>& g_primitives_at_load = primitives();

}  // namespace

std::shared_ptr<const FwdPrimitive> get_fwd_primitive(const ConvDesc& desc, Isa isa, int threads,
                                                      const FwdPlanOptions& options) {
  return primitives().get(desc.to_string() + "/" + isa_name(isa) + "/" + std::to_string(threads) + "/" + options.key(),
                          [&] { return build(desc, isa, threads, options); });
}

namespace {

// Bumped by clear_fwd_primitives: a thread's handles made before are dropped at its next call.
std::atomic<uint64_t> g_handle_generation{0};

bool same_desc(const ConvDesc& a, const ConvDesc& b) {
  return a.n == b.n && a.c == b.c && a.h == b.h && a.w == b.w && a.k == b.k && a.r == b.r && a.s == b.s &&
         a.stride_h == b.stride_h && a.stride_w == b.stride_w && a.pad_t == b.pad_t && a.pad_b == b.pad_b &&
         a.pad_l == b.pad_l && a.pad_r == b.pad_r && a.dil_h == b.dil_h && a.dil_w == b.dil_w &&
         a.groups == b.groups && a.dt == b.dt;
}

struct HandleSlot {
  ConvDesc desc;
  Isa isa = Isa::none;
  int threads = 0;
  FwdPlanOptions options;
  std::shared_ptr<const FwdHandle> handle;
};

struct ThreadHandles {
  uint64_t generation = 0;
  int next = 0;  // the slot to replace next (round robin: a miss costs a plan lookup anyway)
  HandleSlot slots[kThreadHandles];
};

}  // namespace

std::shared_ptr<const FwdHandle> get_fwd_handle(const ConvDesc& desc, Isa isa, int threads,
                                                const FwdPlanOptions& options) {
  thread_local ThreadHandles mine;
  const uint64_t generation = g_handle_generation.load(std::memory_order_acquire);
  if (mine.generation != generation) {
    for (HandleSlot& slot : mine.slots) slot.handle.reset();
    mine.generation = generation;
  }
  for (const HandleSlot& slot : mine.slots)
    if (slot.handle && slot.isa == isa && slot.threads == threads && same_desc(slot.desc, desc) &&
        slot.options == options)
      return slot.handle;
  auto handle = std::make_shared<FwdHandle>();
  handle->prim = get_fwd_primitive(desc, isa, threads, options);
  handle->kernels = acquire_kernels(*handle->prim);
  HandleSlot& slot = mine.slots[mine.next];
  mine.next = (mine.next + 1) % kThreadHandles;
  slot.desc = desc;
  slot.isa = isa;
  slot.threads = threads;
  slot.options = options;
  slot.handle = handle;
  return handle;
}

void clear_fwd_primitives() {
  primitives().clear();
  g_handle_generation.fetch_add(1, std::memory_order_acq_rel);
}

std::shared_ptr<const FwdPrimitive> get_fwd_nchw_1x1_primitive(const ConvDesc& desc, Isa isa, int threads,
                                                               bool accumulate, bool relu) {
  return primitives().get(
      "nchw1x1/" + desc.to_string() + "/" + isa_name(isa) + "/" + std::to_string(threads) + (accumulate ? "/acc" : "") +
          (relu ? "/relu" : ""),
      [&] {
        auto prim = std::make_shared<FwdPrimitive>();
        prim->plan = make_fwd_plan_nchw_1x1(desc, isa, threads, accumulate, relu);
        prim->info = prim->plan.to_string() + " nchw1x1";
        acquire_kernels(*prim);
        return std::shared_ptr<const FwdPrimitive>(prim);
      });
}

FwdKernels acquire_kernels(const FwdPrimitive& prim) {
  FwdKernels k;
  for (const FwdKernelSpec& sp : prim.plan.kernels) {
    k.held.push_back(get_kernel(sp.name(), [&] { return make_fwd_kernel(sp); }, prim.info));
    k.fns.push_back(k.held.back()->entry<FwdKernelFn>());
  }
  return k;
}

namespace {

// Calls [begin, end) of one stream.
void run_calls(const FwdPrimitive& prim, const FwdKernels& kernels, const std::vector<FwdCall>& stream, size_t begin,
               size_t end, const float* src, const float* wei, const FwdPostArgs& post, float* dst) {
  FwdCallArgs a = prim.plan.strides;
  for (size_t i = begin; i < end; ++i) {
    const FwdCall& c = stream[i];
    a.src = at_offset(src, c.src_off);
    a.pf_src = at_offset(src, stream[i + 1 < end ? i + 1 : i].src_off);
    a.wei = at_offset(wei, c.wei_off);
    a.dst = at_offset(dst, c.dst_off);
    a.bias = post.bias ? at_offset(post.bias, c.bias_off) : nullptr;
    a.residual = post.residual ? at_offset(post.residual, c.dst_off) : nullptr;
    a.stats_shift = post.stats_shift ? at_offset(post.stats_shift, c.bias_off) : nullptr;
    a.stats = post.stats ? post.stats + c.stats_off : nullptr;
    a.n_r = c.n_r;
    a.n_cb = c.n_cb;
    a.flags = c.flags & kAccumulate;
    kernels.fns[c.kernel](&a);
  }
}

}  // namespace

void fwd_execute(const FwdPrimitive& prim, const FwdKernels& kernels, const float* src, const float* wei,
                 const FwdPostArgs& post, float* dst, int tid, FwdWorkQueue* queue) {
  fwd_execute_prepared(prim, kernels, src, [wei](const FwdCall&) { return wei; }, post, dst, tid, queue);
}

void fwd_execute_prepared(const FwdPrimitive& prim, const FwdKernels& kernels, const float* src,
                          const FwdPrepare& prepare, const FwdPostArgs& post, float* dst, int tid,
                          FwdWorkQueue* queue) {
  const FwdPlan& plan = prim.plan;
  if ((plan.post.bias && !post.bias) || (plan.post.add && !post.residual) ||
      (plan.post.stats && (!post.stats_shift || !post.stats)))
    throw std::invalid_argument("fwd_execute: the plan's post-ops (" + plan.post.name() +
                                ") need an operand that was not given");
  const int threads = static_cast<int>(plan.streams.size());
  if (tid < 0 || tid >= threads) return;
  auto run_unit = [&](int t, int64_t u) {
    const std::vector<int32_t>& starts = plan.unit_starts[t];
    if (starts[u] == starts[u + 1]) return;
    const float* wei = prepare(plan.streams[t][starts[u]]);
    run_calls(prim, kernels, plan.streams[t], starts[u], starts[u + 1], src, wei, post, dst);
  };
  if (!queue) {
    for (int64_t u = 0; u + 1 < static_cast<int64_t>(plan.unit_starts[tid].size()); ++u) run_unit(tid, u);
    return;
  }
  // Own units first, in order; then whatever is left of the others'.
  for (int i = 0; i < threads; ++i) {
    const int t = (tid + i) % threads;
    for (int64_t u = queue->take(t); u + 1 < static_cast<int64_t>(plan.unit_starts[t].size()); u = queue->take(t))
      run_unit(t, u);
  }
}

}  // namespace dc
