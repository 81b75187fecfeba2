#include "conv/bf16_bwd_primitives.h"

#include <string>

#include "conv/driver_util.h"
#include "jit/isa.h"

namespace dc {

namespace {

PrimitiveCache<Bf16BwdDataPrimitive>& bwd_data_primitives() {
  static auto* c = new PrimitiveCache<Bf16BwdDataPrimitive>();  // never destroyed, like the kernel cache
  return *c;
}
PrimitiveCache<Bf16UpdPrimitive>& upd_primitives() {
  static auto* c = new PrimitiveCache<Bf16UpdPrimitive>();
  return *c;
}
// Made at load, before another thread can be inside them: no fork() finds one half made.
[[maybe_unused]] PrimitiveCache<Bf16BwdDataPrimitive>& g_bwd_data_at_load = bwd_data_primitives();
[[maybe_unused]] PrimitiveCache<Bf16UpdPrimitive>& g_upd_at_load = upd_primitives();

// The level is in the key, as the forward's: after a cap change no call runs another level's
// kernels.
std::string key(Isa level, const ConvDesc& desc, int threads, DataType dt) {
  return std::string(isa_name(level)) + "/" + desc.to_string() + "/" + std::to_string(threads) + "/" + dtype_name(dt);
}

}  // namespace

std::shared_ptr<const Bf16BwdDataPrimitive> get_bf16_bwd_data_primitive(const ConvDesc& desc, int threads,
                                                                         DataType out_dt) {
  const Isa level = active_isa();
  return bwd_data_primitives().get(key(level, desc, threads, out_dt), [&] {
    return make_bf16_bwd_data_primitive(make_bf16_bwd_data_plan(desc, threads, out_dt, level));
  });
}

std::shared_ptr<const Bf16UpdPrimitive> get_bf16_upd_primitive(const ConvDesc& desc, int threads, DataType dw_dt) {
  const Isa level = active_isa();
  return upd_primitives().get(key(level, desc, threads, dw_dt), [&] {
    return make_bf16_upd_primitive(make_bf16_upd_plan(desc, threads, dw_dt, level));
  });
}

void clear_bf16_bwd_primitives() {
  bwd_data_primitives().clear();
  upd_primitives().clear();
}

}  // namespace dc
