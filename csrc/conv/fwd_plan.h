// Blocking decisions and per-thread kernel streams of the forward pass (DESIGN.md 3, 4).
// make_fwd_plan is a pure function of (ConvDesc, Isa, threads): no code is generated here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "conv/conv_desc.h"
#include "jit/fwd_kernel.h"

namespace dc {

// One recorded kernel call: which variant, and where its tile lives (element offsets
// into the blocked input, weights, output and bias).
struct FwdCall {
  int32_t kernel;
  int32_t n_r;
  int32_t n_cb;
  int32_t flags;  // kAccumulate, and kLastChunk on the call that finishes its tile (its kernel has the post-ops)
  int64_t src_off, wei_off, dst_off, bias_off;
  int64_t stats_off;  // with the stats post-op, where the tile's sums go (floats into the tile-sums buffer)
};
constexpr int32_t kLastChunk = 1 << 8;

// One tile's slot of the stats post-op: 2 * n_oc * V floats at `off` (FwdCallArgs::stats),
// for output blocks [kb0, kb0 + n_oc), summed over `pixels` output pixels.
struct FwdStatsTile {
  int64_t off, kb0;
  int32_t n_oc, pixels;
};

// Where the output goes, in elements: by default the dense blocked (N, Kb, P, Q, V).
// A strided view (pixel step px vectors, and row, block and image strides) lets each
// phase of a strided layer's input gradient write straight into its pixels.
struct FwdDstLayout {
  int64_t px = 1, row = 0, kb = 0, img = 0;  // 0: the dense stride
  bool dense() const { return px == 1 && row == 0 && kb == 0 && img == 0; }
  bool operator==(const FwdDstLayout& o) const { return px == o.px && row == o.row && kb == o.kb && img == o.img; }
};

// Where the input comes from, in elements: by default the dense blocked (N, Cb, H, W, V).
// A cropped view (row, block and image strides of a larger tensor) lets a phase of a
// strided layer's input gradient skip output-gradient rows and columns it never reads.
struct FwdSrcLayout {
  int64_t row = 0, cb = 0, img = 0;  // 0: the dense stride
  bool dense() const { return row == 0 && cb == 0 && img == 0; }
  bool operator==(const FwdSrcLayout& o) const { return row == o.row && cb == o.cb && img == o.img; }
};

// Choices a benchmark may force (prefetch, c_chunk) or a caller needs (src, dst); by
// default the plan decides.
struct FwdPlanOptions {
  int prefetch = -1;  // -1: the plan decides, 0: off, 1: on
  int c_chunk = -1;   // input-channel blocks per kernel call; -1: the plan decides
  int tile_oh = -1, tile_ow = -1, n_oc = -1;  // the tile, all three or none; -1: the plan decides
  FwdSrcLayout src;
  FwdDstLayout dst;
  // The epilogue of every tile's last chunk; the residual is laid out as the output (dst).
  FwdPostOps post;
  // Every field: what key() names, compared without building it (the handles' lookup).
  bool operator==(const FwdPlanOptions& o) const {
    return prefetch == o.prefetch && c_chunk == o.c_chunk && tile_oh == o.tile_oh && tile_ow == o.tile_ow &&
           n_oc == o.n_oc && src == o.src && dst == o.dst && post == o.post;
  }
  std::string key() const {
    std::string k = "pf" + std::to_string(prefetch) + "_cc" + std::to_string(c_chunk) + post.name();
    if (tile_ow > 0) k += "_t" + std::to_string(tile_oh) + "x" + std::to_string(tile_ow) + "x" + std::to_string(n_oc);
    if (!dst.dense())
      k += "_dst" + std::to_string(dst.px) + "," + std::to_string(dst.row) + "," + std::to_string(dst.kb) + "," +
           std::to_string(dst.img);
    if (!src.dense())
      k += "_src" + std::to_string(src.row) + "," + std::to_string(src.cb) + "," + std::to_string(src.img);
    return k;
  }
};

struct FwdPlan {
  ConvDesc desc;
  Isa isa = Isa::avx512;
  int threads = 1;
  int64_t cb = 0, kb = 0;  // channel blocks of the input and the output
  // Tile: rows x pixels x output-channel blocks; the row is split into near-equal tiles.
  int tile_oh = 1, tile_ow = 1, n_oc = 1;
  int64_t c_chunk = 1;          // input-channel blocks per kernel call
  int64_t rows_per_group = 1;   // output rows of one work unit
  int64_t images_per_unit = 1;  // images of one work unit: 1, or all of them (deep layers)
  bool prefetch = false;        // kernels prefetch the next call's input
  FwdSrcLayout src;             // the input strides, all set (elements)
  FwdDstLayout dst;             // the output strides, all set (elements)
  FwdPostOps post;              // the epilogue of the calls with kLastChunk
  std::vector<FwdStatsTile> stats_tiles;  // with the stats post-op, every tile's slot
  int64_t stats_floats = 0;               // the size of the tile-sums buffer
  std::vector<FwdKernelSpec> kernels;
  std::vector<std::vector<FwdCall>> streams;  // one per thread
  // Where each work unit of a thread's stream begins (and, last, where the stream ends):
  // a thread that runs out of work takes whole units from the others.
  std::vector<std::vector<int32_t>> unit_starts;
  FwdCallArgs strides{};  // the per-plan constants of every call (pointers left null)

  int v() const { return vlen(isa); }
  std::string to_string() const;
};

FwdPlan make_fwd_plan(const ConvDesc& desc, Isa isa, int threads, const FwdPlanOptions& options = {});

// NCHW in and NCHW out for 1x1, stride-1, unpadded convolutions: per image a GEMM,
// Y (K x PQ) = W (K x C) X (C x PQ), on the forward kernel with its roles turned around.
// Its "input" is the weight matrix as given (K rows of C channels), broadcast a scalar at a
// time; its "weights" are the image's channel rows, V pixels per vector (wei_c_stride = one
// row); its tile of `ow` output channels x `n_oc` vectors of V pixels is stored straight
// into Y (dst_px_bytes = one output row); on AVX-512 a last, partial vector of pixels is
// loaded and stored under a mask. No packing and no layout conversion. fwd_execute takes
// src = the weights (K, C), wei = the input (N, C, P * Q), dst = the output (N, K, P * Q);
// with `accumulate` every call adds to dst (prefilled with the bias); `relu` is the only
// post-op it takes (its output rows are channels, not vectors of them).
bool nchw_1x1_applies(const ConvDesc& desc, Isa isa);
FwdPlan make_fwd_plan_nchw_1x1(const ConvDesc& desc, Isa isa, int threads, bool accumulate, bool relu);

}  // namespace dc
