#include "conv/upd_conv.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>
#include <stdexcept>

#include "conv/driver_util.h"
#include "jit/fwd_kernel.h"

namespace dc {

namespace {

// Estimated cycles per pixel of a tile (as fwd_plan's step_cycles): two FMAs and two loads
// per cycle, loads at 90 %, the FMA latency exposed below eight accumulators, and a cycle
// of loop overhead per pixel.
double pixel_cycles(int n_c, int n_kb) {
  return std::max({n_c * n_kb / 2.0, (n_c + n_kb) / 1.8, 4.0}) + 1.0;
}

// Output rows [lo, hi) whose input row for kernel row r is inside the image (likewise for
// columns with the column parameters).
void valid_range(int64_t out, int64_t in, int64_t stride, int64_t pad, int64_t dil, int64_t tap, int64_t* lo,
                 int64_t* hi) {
  const int64_t off = tap * dil - pad;  // input index = o * stride + off
  int64_t a = off >= 0 ? 0 : div_up(-off, stride);
  int64_t b = in - 1 - off < 0 ? 0 : (in - 1 - off) / stride + 1;
  *lo = std::min(a, out);
  *hi = std::max(*lo, std::min(b, out));
}

}  // namespace

std::string UpdPlan::to_string() const {
  std::ostringstream o;
  o << desc.to_string() << " upd " << isa_name(isa) << " threads=" << threads << " tile=" << n_c << "c x " << n_kb
    << "kb cb/unit=" << cb_group << " rows/block=" << rows_per_block << " parts=" << parts << " kernels=" << kernels.size();
  return o.str();
}

UpdPlan make_upd_plan(const ConvDesc& d, Isa isa, int threads) {
  std::string err = d.validate();
  if (!err.empty()) throw std::invalid_argument("conv2d weight gradient: " + err);
  check_fp32_isa(isa, "conv2d weight gradient");
  if (isa == Isa::none) throw std::invalid_argument("conv2d weight gradient: no JIT ISA available");
  UpdPlan plan;
  plan.desc = d;
  plan.isa = isa;
  plan.threads = std::max(1, threads);
  const int V = plan.v();
  const int64_t P = d.p(), Q = d.q();
  plan.cb = div_up(d.c, V);
  plan.kb = div_up(d.k, V);

  // The register tile with the fewest estimated cycles over all channels and blocks.
  double best = 1e300;
  for (int n_kb = 1; n_kb <= std::min<int64_t>(4, plan.kb); ++n_kb)
    for (int n_c = 1; n_c <= V; ++n_c) {
      UpdKernelSpec sp;
      sp.isa = isa;
      sp.dt = d.dt;
      sp.n_c = n_c;
      sp.n_kb = n_kb;
      if (upd_vector_registers(sp) > isa_vector_registers(isa)) continue;
      // Every tile the plan will run, the tails of the channels and blocks included.
      double cost = 0;
      for (int64_t kb0 = 0; kb0 < plan.kb; kb0 += n_kb)
        for (int64_t c0 = 0; c0 < std::min<int64_t>(d.c, V); c0 += n_c)
          cost += pixel_cycles(static_cast<int>(std::min<int64_t>(n_c, std::min<int64_t>(d.c, V) - c0)),
                               static_cast<int>(std::min<int64_t>(n_kb, plan.kb - kb0)));
      if (cost < best * 0.999) {
        best = cost;
        plan.n_c = n_c;
        plan.n_kb = n_kb;
      }
    }

  // A unit's input-channel blocks: as many as keep its dW tiles (n_kb x cb_group blocks of
  // every tap) within 512 KiB of L2, so that each row block of the output gradient, read
  // once, serves all of them.
  plan.cb_group = std::min<int64_t>(plan.cb, std::max<int64_t>(1, (512 << 10) / (plan.n_kb * d.r * d.s * V * V * d.elem_bytes())));
  // With more threads than images, smaller groups where they balance the units much
  // better (each group reads the output gradient again, from L2 when it fits); with enough
  // images, splitting the minibatch (below) measured better.
  if (plan.threads > d.n) {
    const int64_t kg = div_up(plan.kb, plan.n_kb);
    auto imbalance = [&](int64_t g) {
      const double u = static_cast<double>(kg * div_up(plan.cb, g));
      return std::ceil(u / plan.threads) / (u / plan.threads);
    };
    int64_t best = plan.cb_group;
    for (int64_t g = plan.cb_group; g > 1;) {
      g = div_up(g, 2);
      if (imbalance(g) < 0.95 * imbalance(best)) best = g;
    }
    plan.cb_group = best;
  }
  // Rows of output gradient (n_kb blocks, read again for each input-channel block of the
  // group) plus the input pixels of one block that they meet (read again by each tap), of
  // every image, stay in L2. A strided layer skips input rows and pixels that no tap reaches
  // (a strided 1x1 layer reads one pixel in stride_h x stride_w).
  auto block_bytes = [&](int64_t rows) {
    const int64_t in_rows = std::min((rows - 1) * d.stride_h + (d.r - 1) * d.dil_h + 1, rows * d.r);
    const int64_t in_cols = std::min(d.w, Q * d.s);
    return d.n * (plan.n_kb * rows * Q + in_rows * in_cols) * V * d.elem_bytes();  // a call takes every image
  };
  int64_t rows = P;
  while (rows > 1 && block_bytes(rows) > l2_bytes() / 8) rows = div_up(rows, 2);
  // A call's rows of output gradient are read again by the call of each input-channel
  // tile: they should stay in a 32 KiB L1 (while a call keeps at least 28 pixels).
  while (rows > 1 && d.n * plan.n_kb * rows * Q * V * d.elem_bytes() > (32 << 10) && d.n * div_up(rows, 2) * Q >= 28)
    rows = div_up(rows, 2);
  plan.rows_per_block = rows;

  const int64_t kgroups = div_up(plan.kb, plan.n_kb), cgroups = div_up(plan.cb, plan.cb_group);
  const int64_t units = kgroups * cgroups;
  // Parallelise over weight blocks (units) alone, or also over the minibatch (its images,
  // or the row blocks of one image when there are fewer images than parts) in `parts`
  // private copies of dW that are summed afterwards: whichever has the shorter estimated
  // makespan. A unit's FMAs take work / units cycles at two FMAs per cycle; p parts deal
  // p x units items, each with 1 / p of the minibatch (the largest part sets the pace); the
  // sum reads and writes the p copies, about a quarter of a cycle per element and copy
  // while they fit in L2 and two cycles beyond it (the kernels wrote them there too),
  // shared by the threads.
  const double work = d.flops() / (4.0 * V), per_unit = work / static_cast<double>(units);
  const double dw_elems = static_cast<double>(plan.kb * plan.cb * d.r * d.s * V * V);
  double best_time = 1e300;
  for (int p = 1; p <= std::min<int64_t>(plan.threads, std::max<int64_t>(d.n, P)); ++p) {
    // One image: its row blocks are split, at least p of them.
    const int64_t split = d.n > 1 ? d.n : div_up(P, std::min(rows, div_up(P, p)));
    if (p > split) break;
    const double items = static_cast<double>(div_up(p * units, plan.threads));
    const double share = static_cast<double>(div_up(split, p)) / static_cast<double>(split);
    const double per_elem = dw_elems * p * d.elem_bytes() > l2_bytes() ? 2.0 : 0.25;
    const double time = items * per_unit * share + (p > 1 ? per_elem * dw_elems * p / plan.threads : 0.0);
    if (time < best_time * 0.98) {
      best_time = time;
      plan.parts = p;
    }
  }
  const bool split_rows = plan.parts > 1 && d.n == 1;
  if (split_rows) rows = std::min(rows, div_up(P, plan.parts));
  plan.rows_per_block = rows;
  const int64_t row_blocks = div_up(P, rows);

  UpdCallArgs& a = plan.strides;
  const int64_t es = d.elem_bytes();
  a.x_img_stride = plan.cb * d.h * d.w * V * es;
  a.dy_img_stride = plan.kb * P * Q * V * es;
  a.x_row_stride = d.stride_h * d.w * V * es;
  a.x_px_stride = d.stride_w * V * es;
  a.dy_row_stride = Q * V * es;
  a.dy_kb_stride = P * Q * V * es;
  a.dw_kb_stride = plan.cb * d.r * d.s * V * V * es;

  std::map<std::string, int> index;
  auto kernel_index = [&](int n_c, int n_kb) {
    UpdKernelSpec sp;
    sp.isa = isa;
    sp.dt = d.dt;
    sp.n_c = n_c;
    sp.n_kb = n_kb;
    auto it = index.find(sp.name());
    if (it != index.end()) return it->second;
    plan.kernels.push_back(sp);
    return index[sp.name()] = static_cast<int>(plan.kernels.size()) - 1;
  };

  // Units (part, kg, cg) dealt out in equal runs; within a unit: row blocks (the calls loop
  // over the images), then every input-channel block of the group, tap and channel part on
  // the rows in cache.
  plan.streams.assign(plan.threads, {});
  const int64_t total = plan.parts * units;
  for (int t = 0; t < plan.threads; ++t)
    for (int64_t u = total * t / plan.threads; u < total * (t + 1) / plan.threads; ++u) {
      const int part = static_cast<int>(u / units);
      const int64_t kg = (u % units) / cgroups, cb_lo = (u % cgroups) * plan.cb_group;
      const int64_t cb_hi = std::min(plan.cb, cb_lo + plan.cb_group);
      const int64_t kb0 = kg * plan.n_kb;
      const int n_kb = static_cast<int>(std::min<int64_t>(plan.n_kb, plan.kb - kb0));
      int64_t cbi = cb_lo;
      int c_valid = V;
      const int64_t n_lo = split_rows ? 0 : d.n * part / plan.parts;
      const int64_t n_hi = split_rows ? d.n : d.n * (part + 1) / plan.parts;
      const int64_t rb_lo = split_rows ? row_blocks * part / plan.parts : 0;
      const int64_t rb_hi = split_rows ? row_blocks * (part + 1) / plan.parts : row_blocks;
      // Each tile of dW: overwritten by its first call, accumulated by the others; a tile
      // that meets no pixel in this part gets one call that writes zeros.
      std::vector<char> visited(static_cast<size_t>((cb_hi - cb_lo) * d.r * d.s * V), 0);
      auto emit = [&](int64_t r, int64_t s, int c0, int64_t oh_lo, int64_t oh_hi, int64_t ow_lo, int64_t ow_hi) {
        char& seen = visited[(((cbi - cb_lo) * d.r + r) * d.s + s) * V + c0];
        const int64_t ih = oh_lo * d.stride_h - d.pad_t + r * d.dil_h;
        const int64_t iw = ow_lo * d.stride_w - d.pad_l + s * d.dil_w;
        UpdCall c{};
        c.kernel = kernel_index(std::min(plan.n_c, (c0 < c_valid ? c_valid : V) - c0), n_kb);
        c.flags = seen ? static_cast<int32_t>(kAccumulate) : 0;
        c.n_imgs = static_cast<int32_t>(n_hi - n_lo);
        c.n_rows = static_cast<int32_t>(oh_hi - oh_lo);
        c.n_px = static_cast<int32_t>(ow_hi - ow_lo);
        c.part = part;
        c.x_off = c.n_rows ? ((n_lo * plan.cb + cbi) * d.h + ih) * d.w * V + iw * V + c0 : 0;
        c.dy_off = c.n_rows ? ((n_lo * plan.kb + kb0) * P + oh_lo) * Q * V + ow_lo * V : 0;
        c.dw_off = ((((kb0 * plan.cb + cbi) * d.r + r) * d.s + s) * V + c0) * V;
        plan.streams[t].push_back(c);
        seen = 1;
      };
      for (int64_t rb = rb_lo; rb < rb_hi; ++rb) {
        for (cbi = cb_lo; cbi < cb_hi; ++cbi) {
          c_valid = static_cast<int>(std::min<int64_t>(V, d.c - cbi * V));
          const int64_t ob0 = rb * rows, ob1 = std::min(P, ob0 + rows);
          for (int64_t r = 0; r < d.r; ++r) {
            int64_t oh_lo, oh_hi;
            valid_range(P, d.h, d.stride_h, d.pad_t, d.dil_h, r, &oh_lo, &oh_hi);
            const bool tap_rows = oh_lo < oh_hi;
            oh_lo = std::max(oh_lo, ob0);
            oh_hi = std::min(oh_hi, ob1);
            for (int64_t s = 0; s < d.s; ++s) {
              int64_t ow_lo, ow_hi;
              valid_range(Q, d.w, d.stride_w, d.pad_l, d.dil_w, s, &ow_lo, &ow_hi);
              // Channels past c_valid (the zero padding of the last block) get zero calls.
              for (int c0 = 0; c0 < V; c0 += std::min(plan.n_c, c0 < c_valid ? c_valid - c0 : V - c0))
                if (tap_rows && ow_lo < ow_hi && c0 < c_valid && oh_lo < oh_hi)
                  emit(r, s, c0, oh_lo, oh_hi, ow_lo, ow_hi);
            }
          }
        }
      }
      // Tiles no pixel of this part reached (taps on padding only, padded channels, or rows
      // of other parts): zeros.
      for (cbi = cb_lo; cbi < cb_hi; ++cbi) {
        c_valid = static_cast<int>(std::min<int64_t>(V, d.c - cbi * V));
        for (int64_t r = 0; r < d.r; ++r)
          for (int64_t s = 0; s < d.s; ++s)
            for (int c0 = 0; c0 < V; c0 += std::min(plan.n_c, c0 < c_valid ? c_valid - c0 : V - c0))
              if (!visited[(((cbi - cb_lo) * d.r + r) * d.s + s) * V + c0]) emit(r, s, c0, 0, 0, 0, 0);
      }
    }
  return plan;
}

namespace {

PrimitiveCache<UpdPrimitive>& primitives() {
  static auto* c = new PrimitiveCache<UpdPrimitive>();
  return *c;
}
// Made at load, before another thread can be inside it: no fork() finds it half made.
[[maybe_unused]] PrimitiveCache<UpdPrimitive>& g_primitives_at_load = primitives();

}  // namespace

UpdKernels acquire_kernels(const UpdPrimitive& prim) {
  UpdKernels k;
  for (const UpdKernelSpec& sp : prim.plan.kernels) {
    k.held.push_back(get_kernel(sp.name(), [&] { return make_upd_kernel(sp); }, prim.info));
    k.fns.push_back(k.held.back()->entry<UpdKernelFn>());
  }
  return k;
}

std::shared_ptr<const UpdPrimitive> get_upd_primitive(const ConvDesc& desc, Isa isa, int threads) {
  return primitives().get("upd/" + desc.to_string() + "/" + isa_name(isa) + "/" + std::to_string(threads), [&] {
    auto prim = std::make_shared<UpdPrimitive>();
    prim->plan = make_upd_plan(desc, isa, threads);
    prim->info = prim->plan.to_string();
    acquire_kernels(*prim);
    return std::shared_ptr<const UpdPrimitive>(prim);
  });
}
void clear_upd_primitives() { primitives().clear(); }

void upd_execute(const UpdPrimitive& prim, const UpdKernels& kernels, const float* x, const float* dy, float* dw,
                 int tid) {
  const UpdPlan& plan = prim.plan;
  if (tid < 0 || tid >= static_cast<int>(plan.streams.size())) return;
  UpdCallArgs a = plan.strides;
  const int64_t part_size = plan.dw_elements();
  for (const UpdCall& c : plan.streams[tid]) {
    a.x = at_offset(x, c.x_off);
    a.dy = at_offset(dy, c.dy_off);
    a.dw = at_offset(dw, c.part * part_size + c.dw_off);
    a.n_imgs = c.n_imgs;
    a.n_rows = c.n_rows;
    a.n_px = c.n_px;
    a.flags = c.flags;
    kernels.fns[c.kernel](&a);
  }
}

}  // namespace dc
