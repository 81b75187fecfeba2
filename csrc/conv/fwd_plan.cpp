#include "conv/fwd_plan.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>
#include <stdexcept>

namespace dc {

namespace {


// Estimated cycles of one unrolled step (one kernel column, one input channel) of a tile.
// Two FMAs and two vector loads issue per cycle, but a load-bound stream reaches only
// about 90% of that (DESIGN.md section 2), and with fewer than eight accumulators the
// 4-cycle FMA latency is exposed. The AVX2 kernels measured as if loads issued at 1.2 per
// cycle (timed tile sweeps: the 4x3 tiles, fewer loads per FMA, beat 6x2 by up to 20 % on
// the 1x1 and 7x7 layers). The small last term prefers fewer loads per FMA among tiles
// that tie.
double step_cycles(int accs, int loads, double load_rate) {
  return std::max({accs / 2.0, loads / load_rate, 4.0}) + 0.05 * loads;
}

// Input-channel blocks per kernel call: the chunk's weights for the tile's output blocks
// fit in half of a 32 KiB L1 (they are read by every tile of the unit, from L1); at least
// one block.
int64_t default_c_chunk(const ConvDesc& d, Isa isa, int n_oc) {
  const int64_t V = vlen(isa), chunk_bytes = n_oc * d.r * d.s * V * V * d.elem_bytes();
  return std::min<int64_t>(std::max<int64_t>(1, (16 << 10) / chunk_bytes), std::max<int64_t>(1, d.c / V));
}

double tile_cycles(const ConvDesc& d, Isa isa, int oh, int ow, int n_oc) {
  // A strided 1x1 layer's broadcasts skip pixels, and measured as if each cost two loads.
  const int bcast = d.s == 1 && d.stride_w > 1 ? 2 : 1;
  int loads = (isa == Isa::avx512 && n_oc == 1) ? oh * ow * bcast : oh * ow * bcast + n_oc;
  double steps = static_cast<double>(d.r) * d.s * std::min<int64_t>(d.c, vlen(isa)) * div_up(d.c, vlen(isa));
  // Each call (one per chunk of input channels) sets up, loads or zeroes its accumulators
  // and stores them. 100 cycles plus 4 per accumulator is calibrated on timed sweeps of
  // every tile over the ResNet-50 layers (Xeon, one thread): with it the model picks the
  // wide 14x2 and 2x7x2 tiles that won the 14- and 7-pixel rows by 2-6 %.
  const double calls = static_cast<double>(div_up(div_up(d.c, vlen(isa)), default_c_chunk(d, isa, n_oc)));
  return steps * step_cycles(oh * ow * n_oc, loads, isa == Isa::avx2 ? 1.2 : 1.8) + calls * (100 + 4.0 * oh * ow * n_oc);
}

struct Tile {
  int oh, ow, n_oc;
  double cycles;
};

// The tile with the fewest estimated cycles for the whole layer, within the register file.
Tile choose_tile(const ConvDesc& d, Isa isa) {
  const int64_t kb = div_up(d.k, vlen(isa));
  const int64_t p = d.p(), q = d.q();
  Tile best{1, 1, 1, 1e300};
  for (int n_oc = 1; n_oc <= std::min<int64_t>(4, kb); ++n_oc)
    // Two-row tiles measured slower than one-row tiles of the same size; they are only
    // for rows too short to fill the registers (AVX2's 16 registers: 14 pixels too).
    for (int oh = 1; oh <= (q < (isa == Isa::avx2 ? 16 : 12) ? std::min<int64_t>(2, p) : 1); ++oh)
      for (int ow = 1; ow <= std::min<int64_t>(q, 28); ++ow) {
        FwdKernelSpec sp;
        sp.isa = isa;
        sp.dt = d.dt;
        sp.oh = oh;
        sp.ow = ow;
        sp.n_oc = n_oc;
        if (fwd_vector_registers(sp) > isa_vector_registers(isa)) continue;
        double row_cost = 0;
        for (int w : split_even(q, ow)) {
          double full = tile_cycles(d, isa, oh, w, n_oc) * (kb / n_oc);
          double tail = kb % n_oc ? tile_cycles(d, isa, oh, w, static_cast<int>(kb % n_oc)) : 0;
          row_cost += full + tail;
        }
        // Row pairs cover p / oh pairs; leftover rows run single-row tiles.
        double total = row_cost * static_cast<double>(p / oh);
        if (p % oh) total += row_cost / oh * 1.2;
        if (total < best.cycles * 0.999) best = {oh, ow, n_oc, total};
      }
  return best;
}

class StreamBuilder {
 public:
  explicit StreamBuilder(FwdPlan& plan) : plan_(plan), d_(plan.desc), V_(plan.v()) {}

  int kernel_index(const FwdKernelSpec& sp) {
    std::string name = sp.name();
    auto it = index_.find(name);
    if (it != index_.end()) return it->second;
    int idx = static_cast<int>(plan_.kernels.size());
    plan_.kernels.push_back(sp);
    index_.emplace(name, idx);
    return idx;
  }

  // The tiles of rows [oh0, oh0 + rows) x output blocks [kb0, kb0 + n_oc) of image n: for
  // each, its calls, one per chunk of input channels.
  void emit_rows(std::vector<std::vector<FwdCall>>& tiles, int64_t n, int64_t kb0, int n_oc, int64_t oh0, int rows) {
    int64_t r_lo, n_r;
    valid_kernel_rows(d_, oh0, &r_lo, &n_r);
    const int64_t cb_full = d_.c / V_;
    const int c_tail = static_cast<int>(d_.c % V_);
    int64_t ow0 = 0;
    for (int w : split_even(d_.q(), plan_.tile_ow)) {
      FwdKernelSpec sp;
      sp.isa = plan_.isa;
      sp.dt = d_.dt;
      sp.s = static_cast<int>(d_.s);
      sp.stride_w = static_cast<int>(d_.stride_w);
      sp.dil_w = static_cast<int>(d_.dil_w);
      sp.oh = rows;
      sp.ow = w;
      sp.n_oc = n_oc;
      sp.prefetch = plan_.prefetch && rows == 1;
      sp.dst_px = static_cast<int>(plan_.dst.px);
      const int64_t iw0 = ow0 * d_.stride_w - d_.pad_l;
      const int64_t iw_last = iw0 + (w - 1) * d_.stride_w + (d_.s - 1) * d_.dil_w;
      if (iw0 < 0 || iw_last >= d_.w) {
        sp.border = true;
        sp.iw0 = static_cast<int>(iw0);
        sp.w = static_cast<int>(d_.w);
      }
      const int64_t ih = oh0 * d_.stride_h - d_.pad_t + r_lo * d_.dil_h;
      std::vector<FwdCall>& out = tiles.emplace_back();
      FwdCall call{};
      call.n_r = static_cast<int32_t>(n_r);
      call.bias_off = kb0 * V_;
      call.dst_off = n * plan_.dst.img + kb0 * plan_.dst.kb + oh0 * plan_.dst.row + ow0 * plan_.dst.px * V_;
      bool first = true;
      auto push = [&](int64_t cb0, int64_t n_cb, int c_valid, bool last) {
        sp.c_valid = c_valid;
        sp.post = last ? plan_.post : FwdPostOps{};
        if (last && plan_.post.stats) {
          call.stats_off = plan_.stats_floats;
          plan_.stats_tiles.push_back({plan_.stats_floats, kb0, n_oc, rows * w});
          plan_.stats_floats += 2 * static_cast<int64_t>(n_oc) * V_;
        }
        call.kernel = kernel_index(sp);
        call.n_cb = static_cast<int32_t>(n_cb);
        call.flags = (first ? 0 : static_cast<int32_t>(kAccumulate)) | (last ? kLastChunk : 0);
        call.src_off = n * plan_.src.img + cb0 * plan_.src.cb + ih * plan_.src.row + iw0 * V_;
        call.wei_off = ((kb0 * plan_.cb + cb0) * d_.r + r_lo) * d_.s * V_ * V_;
        out.push_back(call);
        first = false;
      };
      for (int64_t cb0 = 0; cb0 < cb_full; cb0 += plan_.c_chunk) {
        int64_t n_cb = std::min(plan_.c_chunk, cb_full - cb0);
        push(cb0, n_cb, V_, c_tail == 0 && cb0 + n_cb == cb_full);
      }
      if (c_tail) push(cb_full, 1, c_tail, true);
      ow0 += w;
    }
  }

  // Estimated cycles of one call: its FMAs at two per cycle, plus the call's overhead.
  double call_cost(const FwdCall& c) const {
    const FwdKernelSpec& sp = plan_.kernels[c.kernel];
    int taps = 0;
    for (int px = 0; px < sp.ow; ++px)
      for (int col = 0; col < sp.s; ++col) taps += sp.tap_valid(px, col);
    return 0.5 * c.n_r * c.n_cb * sp.c_valid * taps * sp.oh * sp.n_oc + 20 + 2 * sp.oh * sp.ow * sp.n_oc;
  }

  // Rows of one unit: pairs of rows that reduce over every kernel row share a tile. The
  // unit's tiles take each chunk of input channels in turn, so that the chunk's weights
  // stay in L1 while every tile of the unit uses them.
  void emit_unit(std::vector<FwdCall>& out, int64_t n, int64_t kg, int64_t row0, int64_t row1) {
    const int64_t kb0 = kg * plan_.n_oc;
    const int n_oc = static_cast<int>(std::min<int64_t>(plan_.n_oc, plan_.kb - kb0));
    std::vector<std::vector<FwdCall>> tiles;
    for (int64_t oh = row0; oh < row1;) {
      int rows = 1;
      if (plan_.tile_oh == 2 && oh + 1 < row1) {
        int64_t lo0, n0, lo1, n1;
        valid_kernel_rows(d_, oh, &lo0, &n0);
        valid_kernel_rows(d_, oh + 1, &lo1, &n1);
        if (lo0 == lo1 && n0 == n1) rows = 2;
      }
      emit_rows(tiles, n, kb0, n_oc, oh, rows);
      oh += rows;
    }
    size_t chunks = 0;
    for (const auto& t : tiles) chunks = std::max(chunks, t.size());
    for (size_t i = 0; i < chunks; ++i)
      for (const auto& t : tiles)
        if (i < t.size()) out.push_back(t[i]);
  }

 private:
  FwdPlan& plan_;
  const ConvDesc& d_;
  const int V_;
  std::map<std::string, int> index_;
};

}  // namespace

std::string FwdPlan::to_string() const {
  std::ostringstream o;
  o << desc.to_string() << " " << isa_name(isa) << " threads=" << threads << " tile=" << tile_oh << "x" << tile_ow
    << "x" << n_oc << "oc c_chunk=" << c_chunk << " rows/unit=" << rows_per_group << (images_per_unit > 1 ? " images/unit=" + std::to_string(images_per_unit) : "") << (prefetch ? " prefetch" : "") << (post.any() ? " " + post.name().substr(1) : "") << " kernels=" << kernels.size();
  return o.str();
}

FwdPlan make_fwd_plan(const ConvDesc& desc, Isa isa, int threads, const FwdPlanOptions& options) {
  std::string err = desc.validate();
  if (!err.empty()) throw std::invalid_argument("conv2d: " + err);
  check_fp32_isa(isa, "conv2d");
  if (isa == Isa::none) throw std::invalid_argument("conv2d: no JIT ISA available");
  FwdPlan plan;
  plan.desc = desc;
  plan.isa = isa;
  plan.threads = std::max(1, threads);
  const int V = plan.v();
  plan.cb = div_up(desc.c, V);
  plan.kb = div_up(desc.k, V);
  Tile tile = choose_tile(desc, isa);
  if (options.tile_ow > 0) {
    FwdKernelSpec sp;
    sp.isa = isa;
    sp.dt = desc.dt;
    sp.oh = options.tile_oh;
    sp.ow = options.tile_ow;
    sp.n_oc = options.n_oc;
    if (sp.oh < 1 || sp.oh > 2 || sp.n_oc < 1 || sp.n_oc > 4 || fwd_vector_registers(sp) > isa_vector_registers(isa))
      throw std::invalid_argument("conv2d: the forced tile does not fit the registers");
    tile = {sp.oh, sp.ow, static_cast<int>(std::min<int64_t>(sp.n_oc, plan.kb)), 0};
  }
  plan.tile_oh = tile.oh;
  plan.tile_ow = tile.ow;
  plan.n_oc = tile.n_oc;
  plan.c_chunk = options.c_chunk > 0 ? std::min<int64_t>(options.c_chunk, std::max<int64_t>(1, desc.c / V))
                                     : default_c_chunk(desc, isa, plan.n_oc);

  // Prefetching the next call's input rows measured 1-5 % faster on an AVX-512 Xeon (two
  // FMA units: the input streams of the channel blocks outrun the hardware prefetchers)
  // and within 2 % either way on Zen 4: on unless a benchmark turns it off.
  plan.prefetch = options.prefetch != 0;
  plan.post = options.post;
  const int64_t P = desc.p(), Q = desc.q();
  plan.dst.px = options.dst.px;
  plan.dst.row = options.dst.row ? options.dst.row : Q * options.dst.px * V;
  plan.dst.kb = options.dst.kb ? options.dst.kb : P * plan.dst.row;
  plan.dst.img = options.dst.img ? options.dst.img : plan.kb * plan.dst.kb;
  if (plan.dst.px < 1 || plan.dst.row < 1 || plan.dst.kb < 1 || plan.dst.img < 1)
    throw std::invalid_argument("conv2d: bad output layout");
  plan.src.row = options.src.row ? options.src.row : desc.w * V;
  plan.src.cb = options.src.cb ? options.src.cb : desc.h * plan.src.row;
  plan.src.img = options.src.img ? options.src.img : plan.cb * plan.src.cb;
  if (plan.src.row < desc.w * V || plan.src.cb < desc.h * desc.w * V || plan.src.img < 1)
    throw std::invalid_argument("conv2d: bad input layout");
  const int64_t kgroups = div_up(plan.kb, plan.n_oc);
  // A unit's tiles read its input rows (the slab) once per chunk, and its output-channel
  // group's weights once. The rows per unit minimise the bytes that come from beyond L2:
  // the weights, once per row group, when they do not fit in half of L2 beside the slab;
  // the slab, once per output-channel group when it does not fit, else once. Ties keep
  // the largest slab under a quarter of a 1 MiB L2. Then there must be enough units for
  // every thread.
  auto slab_bytes = [&](int64_t rows) {
    return ((rows - 1) * desc.stride_h + (desc.r - 1) * desc.dil_h + 1) * desc.w * plan.cb * V * desc.elem_bytes();
  };
  const double half_l2 = l2_bytes() / 2.0;
  const double w_bytes = static_cast<double>(plan.kb) * plan.cb * desc.r * desc.s * V * V * desc.elem_bytes();
  auto far_bytes = [&](int64_t rows) {
    const double groups = static_cast<double>(div_up(P, rows)), slab = static_cast<double>(slab_bytes(rows));
    return groups * (w_bytes + slab > half_l2 ? w_bytes : 0) + groups * slab * (slab > half_l2 ? kgroups : 1);
  };
  // Weights larger than half of L2 and than every image's input together (the deep
  // layers) are read once for all the images: a unit then takes every image of its rows
  // and output-channel group, else one image.
  const double image_bytes = static_cast<double>(desc.h) * desc.w * plan.cb * V * desc.elem_bytes();
  plan.images_per_unit = desc.n > 1 && w_bytes > half_l2 && w_bytes > desc.n * image_bytes ? desc.n : 1;
  const bool all_images = plan.images_per_unit > 1;
  int64_t rows = P;
  if (!all_images) {
    while (rows > 2 && slab_bytes(rows) > (256 << 10)) rows = div_up(rows, 2);
    for (int64_t r = P; r >= 1; --r)
      if (far_bytes(r) < 0.9 * far_bytes(rows)) rows = r;
  }
  // Then fewer rows per unit while that pays: more units balance the threads better (a
  // thread's share is whole units, about equal), but every row group reads the weights
  // again. Estimated cycles: the FMAs at two per cycle, stretched by the imbalance, plus
  // the bytes from beyond L2 at about 8 per cycle per core.
  if (plan.threads > 1) {
    const double fma_cycles = desc.flops() / (4.0 * V) / plan.threads;
    auto estimate = [&](int64_t r) {
      const double units = static_cast<double>(desc.n / plan.images_per_unit * div_up(P, r) * kgroups);
      const double share = std::ceil(units / plan.threads) / (units / plan.threads);
      const double far = all_images ? div_up(P, r) * w_bytes : far_bytes(r) * desc.n;
      return fma_cycles * share + far / (8.0 * plan.threads);
    };
    int64_t best = rows;
    for (int64_t r = rows; r > 1;) {
      r = div_up(r, 2);
      if (estimate(r) < 0.98 * estimate(best)) best = r;
    }
    rows = best;
  }
  plan.rows_per_group = rows;
  if (plan.tile_oh == 2 && plan.rows_per_group % 2 && plan.rows_per_group < P) ++plan.rows_per_group;

  FwdCallArgs& a = plan.strides;
  const int64_t es = desc.elem_bytes();
  a.src_r_stride = desc.dil_h * plan.src.row * es;
  a.src_row_stride = desc.stride_h * plan.src.row * es;
  a.src_cb_stride = plan.src.cb * es;
  a.wei_cb_stride = desc.r * desc.s * V * V * es;
  a.wei_kb_stride = plan.cb * a.wei_cb_stride;
  a.dst_row_stride = plan.dst.row * es;
  a.dst_kb_stride = plan.dst.kb * es;

  // Units in the order n, row group, output-channel group (each unit's images one after
  // the other). Each thread takes a contiguous run of about equal estimated work, so it
  // reuses the input rows across its output-channel groups.
  StreamBuilder sb(plan);
  std::vector<std::vector<FwdCall>> units;
  std::vector<double> cost;
  double total = 0;
  for (int64_t n0 = 0; n0 < desc.n; n0 += plan.images_per_unit)
    for (int64_t r0 = 0; r0 < P; r0 += plan.rows_per_group)
      for (int64_t kg = 0; kg < kgroups; ++kg) {
        units.emplace_back();
        for (int64_t n = n0; n < n0 + plan.images_per_unit; ++n)
          sb.emit_unit(units.back(), n, kg, r0, std::min(P, r0 + plan.rows_per_group));
        double c = 0;
        for (const FwdCall& call : units.back()) c += sb.call_cost(call);
        cost.push_back(c);
        total += c;
      }
  plan.streams.assign(plan.threads, {});
  plan.unit_starts.assign(plan.threads, {});
  double done = 0;
  int t = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    // Move to the next thread once this one has its share, judged at the unit's middle.
    while (t + 1 < plan.threads && done + cost[u] / 2 > total * (t + 1) / plan.threads) ++t;
    plan.unit_starts[t].push_back(static_cast<int32_t>(plan.streams[t].size()));
    plan.streams[t].insert(plan.streams[t].end(), units[u].begin(), units[u].end());
    done += cost[u];
  }
  for (int i = 0; i < plan.threads; ++i) plan.unit_starts[i].push_back(static_cast<int32_t>(plan.streams[i].size()));
  return plan;
}

bool nchw_1x1_applies(const ConvDesc& d, Isa isa) {
  check_fp32_isa(isa, "conv2d NCHW 1x1");
  const int64_t V = vlen(isa);
  // A last, partial vector of pixels needs AVX-512's masks.
  return isa != Isa::none && d.r == 1 && d.s == 1 && d.stride_h == 1 && d.stride_w == 1 && d.pad_t == 0 &&
         d.pad_b == 0 && d.pad_l == 0 && d.pad_r == 0 && d.c % V == 0 &&
         ((d.h * d.w) % V == 0 || isa == Isa::avx512) && d.n >= 1 &&
         // The kernels step over channels and pixels of an NCHW image with 32-bit offsets.
         static_cast<__int128>(std::max(d.c, d.k)) * d.h * d.w * d.elem_bytes() <= INT32_MAX;
}

FwdPlan make_fwd_plan_nchw_1x1(const ConvDesc& d, Isa isa, int threads, bool accumulate, bool relu) {
  if (!nchw_1x1_applies(d, isa))
    throw std::invalid_argument("conv2d: the NCHW 1x1 plan does not apply to " + d.to_string());
  FwdPlan plan;
  plan.desc = d;
  plan.isa = isa;
  plan.threads = std::max(1, threads);
  const int V = plan.v();
  const int64_t pq = d.h * d.w, vecs = div_up(pq, V);
  const int tail_lanes = static_cast<int>(pq % V);
  // Output channels x pixel vectors: 6 x 4 in 32 registers, 4 x 3 in 16.
  const int k_rows = isa == Isa::avx512 ? 6 : 4, n_vec = isa == Isa::avx512 ? 4 : 3;
  plan.cb = d.c / V;
  plan.kb = div_up(d.k, V);
  plan.tile_oh = 1;
  plan.tile_ow = k_rows;
  plan.n_oc = n_vec;
  plan.c_chunk = plan.cb;
  plan.rows_per_group = 1;
  plan.post.relu = relu;
  FwdCallArgs& a = plan.strides;
  const int64_t es = d.elem_bytes();
  a.src_cb_stride = V * es;       // the next V channels of a weight row
  a.wei_cb_stride = V * pq * es;  // the next V channel rows of the image
  a.wei_kb_stride = V * es;       // the next vector of pixels
  a.dst_kb_stride = V * es;
  a.dst_row_stride = 0;
  std::map<std::string, int> index;
  auto kernel_index = [&](int rows, int n_oc, int last_lanes, bool last_chunk) {
    FwdKernelSpec sp;
    sp.isa = isa;
    sp.dt = d.dt;
    sp.s = 1;
    sp.stride_w = static_cast<int>(d.c / V);  // a "pixel" of the broadcast side is a weight row
    sp.oh = 1;
    sp.ow = rows;
    sp.n_oc = n_oc;
    sp.c_valid = V;
    sp.dst_px_bytes = pq * es;  // from one output channel's row to the next
    sp.wei_c_stride = pq * es;
    sp.last_oc_lanes = last_lanes;
    if (last_chunk) sp.post = plan.post;
    auto it = index.find(sp.name());
    if (it != index.end()) return it->second;
    plan.kernels.push_back(sp);
    return index[sp.name()] = static_cast<int>(plan.kernels.size()) - 1;
  };
  // Units: (image, group of n_vec pixel vectors, part of the output channels), chunk after
  // chunk. Input channels in chunks whose pixels (n_vec * V of each) fit in 32 KiB: the
  // chunk stays in L1 while the part's weights stream past it. The output channels are
  // split only when the images' pixels alone give too few units for the threads (a 7x7
  // image is a single group of pixel vectors).
  plan.c_chunk = std::max<int64_t>(1, std::min<int64_t>(plan.cb, (32 << 10) / (n_vec * V * V * es)));
  const int64_t pixel_units = d.n * div_up(vecs, n_vec), want = 8 * static_cast<int64_t>(plan.threads);
  const int64_t k_parts = plan.threads > 1 && pixel_units < want
                              ? std::min(div_up(want, pixel_units), div_up(d.k, k_rows))
                              : 1;
  std::vector<std::vector<FwdCall>> units;
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t v0 = 0; v0 < vecs; v0 += n_vec)
      for (int64_t part = 0, k_begin = 0; part < k_parts; ++part) {
        // Whole tiles of k_rows where they can be, in near-equal parts.
        const int64_t k_end =
            part + 1 == k_parts ? d.k : std::min(d.k, div_up(d.k * (part + 1), k_parts * k_rows) * k_rows);
        const int nv = static_cast<int>(std::min<int64_t>(n_vec, vecs - v0));
        std::vector<FwdCall>& u = units.emplace_back();
        for (int64_t cb0 = 0; cb0 < plan.cb; cb0 += plan.c_chunk) {
          const int64_t n_cb = std::min(plan.c_chunk, plan.cb - cb0);
          int64_t k0 = k_begin;
          for (int rows : split_even(k_end - k_begin, k_rows)) {
            FwdCall c{};
            c.kernel = kernel_index(rows, nv, v0 + nv == vecs ? tail_lanes : 0, cb0 + n_cb == plan.cb);
            c.n_r = 1;
            c.n_cb = static_cast<int32_t>(n_cb);
            c.flags = (accumulate || cb0 > 0 ? static_cast<int32_t>(kAccumulate) : 0) |
                      (cb0 + n_cb == plan.cb ? kLastChunk : 0);
            c.src_off = k0 * d.c + cb0 * V;
            c.wei_off = (n * d.c + cb0 * V) * pq + v0 * V;
            c.dst_off = (n * d.k + k0) * pq + v0 * V;
            u.push_back(c);
            k0 += rows;
          }
        }
        k_begin = k_end;
      }
  plan.streams.assign(plan.threads, {});
  plan.unit_starts.assign(plan.threads, {});
  const size_t total = units.size();
  for (int t = 0; t < plan.threads; ++t) {
    for (size_t i = total * t / plan.threads; i < total * (t + 1) / plan.threads; ++i) {
      plan.unit_starts[t].push_back(static_cast<int32_t>(plan.streams[t].size()));
      plan.streams[t].insert(plan.streams[t].end(), units[i].begin(), units[i].end());
    }
    plan.unit_starts[t].push_back(static_cast<int32_t>(plan.streams[t].size()));
  }
  return plan;
}

}  // namespace dc
