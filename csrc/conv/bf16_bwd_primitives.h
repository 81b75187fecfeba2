// The bf16 gradients' primitives (conv/bf16_bwd_data.h, conv/bf16_upd.h), made once per
// (description, threads, output type) and kept in LRU caches, as the forward's are
// (get_bf16_fwd_primitive).
#pragma once

#include <memory>

#include "conv/bf16_bwd_data.h"
#include "conv/bf16_upd.h"

namespace dc {

std::shared_ptr<const Bf16BwdDataPrimitive> get_bf16_bwd_data_primitive(const ConvDesc& desc, int threads,
                                                                         DataType out_dt);
std::shared_ptr<const Bf16UpdPrimitive> get_bf16_upd_primitive(const ConvDesc& desc, int threads, DataType dw_dt);
void clear_bf16_bwd_primitives();

}  // namespace dc
