#include "conv/bf16_bwd_data.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "conv/bf16_fwd.h"
#include "conv/bf16_pack.h"
#include "conv/bwd_data.h"
#include "conv/driver_util.h"
#include "conv/reference.h"

namespace dc {

namespace {

constexpr int64_t kPixelBytes = kAmxBlock * 2;  // one dy row: 32 bf16
constexpr int64_t kTapElems = 1024;             // a tap's two B tiles

int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

}  // namespace

std::string Bf16BwdDataPlan::to_string() const {
  std::ostringstream o;
  o << "bf16 " << isa_name(level) << " bwd_data " << desc.to_string() << " threads=" << threads
    << " out=" << dtype_name(out_dt) << " m=" << m << " runs/call=" << n_a << " phases=";
  for (size_t i = 0; i < phases.size(); ++i)
    o << (i ? "," : "") << phases[i].taps_r.size() << "x" << phases[i].taps_s.size();
  o << (padded ? " padded" : "") << (interleaved ? " interleaved" : "") << (scattered ? " scattered" : "")
    << " kernels=";
  o << spec_names(kernels) << spec_names(dot_kernels);  // one of them is empty
  return o.str();
}

Bf16BwdDataPlan make_bf16_bwd_data_plan(const ConvDesc& d, int threads, DataType out_dt, Isa level) {
  const std::string bad = d.validate();
  if (!bad.empty()) throw std::invalid_argument("bf16 bwd_data plan: " + bad);
  if (d.dt != DataType::bf16)
    throw std::invalid_argument("bf16 bwd_data plan: the description's element type must be bf16");
  if (d.groups != 1)
    throw std::invalid_argument("bf16 bwd_data plan: groups must be 1, got " + std::to_string(d.groups));
  if (out_dt != DataType::f32 && out_dt != DataType::bf16)
    throw std::invalid_argument("bf16 bwd_data plan: the output type must be f32 or bf16");
  if (threads < 1)
    throw std::invalid_argument("bf16 bwd_data plan: threads must be >= 1, got " + std::to_string(threads));
  if (level != Isa::amx && level != Isa::avx512_bf16)
    throw std::invalid_argument(std::string("bf16 bwd_data plan: the level must be amx or avx512_bf16, got ") +
                                isa_name(level));
  const int64_t P = d.p(), Q = d.q();
  if (P < 1 || Q < 1) throw std::invalid_argument("bf16 bwd_data plan: the kernel does not fit the padded input");
  if (d.s * d.dil_w > (1 << 20) || d.r > (1 << 20))
    throw std::invalid_argument("bf16 bwd_data plan: kernel size times dilation must be at most 2^20");

  Bf16BwdDataPlan p;
  p.desc = d;
  p.level = level;
  p.threads = threads;
  p.out_dt = out_dt;
  p.cb = div_up(d.c, kAmxBlock);
  p.kb = div_up(d.k, kAmxBlock);
  const std::vector<BwdDataPhase> phases = bwd_data_phases(d);
  for (const BwdDataPhase& ph : phases)
    if (!ph.empty()) {
      p.pt = std::max(p.pt, ph.sub.pad_t);
      p.pb = std::max(p.pb, ph.sub.pad_b);
      p.pl = std::max(p.pl, ph.sub.pad_l);
      p.pr = std::max(p.pr, ph.sub.pad_r);
    }
  p.padded = p.pt || p.pb || p.pl || p.pr;
  p.hp = P + p.pt + p.pb;
  p.wp = Q + p.pl + p.pr;
  const bool strided = d.stride_h > 1 || d.stride_w > 1;
  p.interleaved = strided && bf16_bwd_data_interleaves(d);
  p.scattered = strided ? !p.interleaved : phases[0].empty();
  const int out_es = elem_bytes(out_dt);
  const int64_t out_px_bytes = kAmxBlock * out_es;

  // The phases, their weights and their outputs; M fits the smallest phase's virtual map
  // (interleaved: its rows).
  int64_t total_min = INT64_MAX, dil_h = 1;
  for (const BwdDataPhase& ph : phases) {
    Bf16BwdDataPhase q;
    q.a = ph.a;
    q.b = ph.b;
    q.rows = ph.rows;
    q.cols = ph.cols;
    if (!ph.empty()) {
      q.taps_r = ph.taps_r;
      q.taps_s = ph.taps_s;
      q.dil_h = dil_h = ph.sub.dil_h;
      q.dil_w = ph.sub.dil_w;
      q.wei_elem = p.weight_elems;
      p.weight_elems += p.cb * p.kb * ph.sub.r * ph.sub.s * kTapElems;
      q.out_off = p.phase_bytes;
      if (p.scattered) p.phase_bytes += align64(d.n * p.cb * q.rows * q.cols * out_px_bytes);
      total_min = std::min(total_min, p.interleaved ? q.cols : (q.rows - 1) * p.wp + q.cols);
    }
    p.phases.push_back(q);
  }
  p.copy_bytes = p.padded ? align64(d.n * p.kb * p.hp * p.wp * kPixelBytes) : 0;
  p.scratch_bytes = p.copy_bytes + p.phase_bytes;

  // Flat runs of m over each phase's virtual pixels v of the dy plane (row v / Wp, column
  // v % Wp; columns >= the phase's are not stored), the last ending on its last pixel; or,
  // interleaved, runs within each of the phase's rows, the last ending on the row's end.
  struct Run {
    int64_t src_px, dst_px, rows;
  };
  auto phase_runs = [&](const BwdDataPhase& ph, const Bf16BwdDataPhase& q, int64_t m) {
    // The plane pixel of the phase's pixel (0, 0) at rotated tap (0, 0).
    const int64_t origin = (ph.crop_t - ph.sub.pad_t + p.pt) * p.wp + (ph.crop_l - ph.sub.pad_l + p.pl);
    const int64_t total = (q.rows - 1) * p.wp + q.cols;
    std::vector<Run> runs;
    if (p.interleaved) {
      for (int64_t i = 0; i < q.rows; ++i)
        for (int64_t start0 = 0; start0 < q.cols; start0 += m) {
          const int64_t start = std::min(start0, q.cols - m), skip = start0 - start;
          const int64_t dx_px = (q.a + d.stride_h * i) * d.w + q.b + d.stride_w * start0;
          runs.push_back({origin + i * p.wp + start, dx_px, ((int64_t{1} << m) - 1) & ~((int64_t{1} << skip) - 1)});
        }
    } else {
      for (int64_t start0 = 0; start0 < total; start0 += m) {
        const int64_t start = std::min(start0, total - m);
        int64_t rows = 0, first = -1;
        for (int64_t v = start0; v < start + m; ++v)
          if (v % p.wp < q.cols) {
            rows |= int64_t{1} << (v - start);
            if (first < 0) first = v;
          }
        if (rows) runs.push_back({origin + start, (first / p.wp) * q.cols + first % p.wp, rows});
      }
    }
    return runs;
  };

  // AMX: tiles of up to 16 rows, two a call. avx512_bf16: as the forward's plans at that
  // level, the runs per call and pixels per run (n_a x m pixels x 32 dx channels of fp32
  // accumulators within the register file) whose calls cost the fewest estimated cycles
  // over the phases.
  const int pairs = level == Isa::avx512_bf16 && p.kb == 1 ? static_cast<int>(div_up(d.k, 2)) : 16;
  if (level == Isa::amx) {
    p.m = static_cast<int>(std::min<int64_t>(kAmxMaxRows, total_min));
    p.n_a = 2;
  } else {
    double best = 1e300;
    for (int n_a = 1; n_a <= 2; ++n_a)
      for (int m = 1; m <= std::min<int64_t>(total_min, 28); ++m) {
        Avx512Bf16FwdKernelSpec sp;
        sp.m = m;
        sp.n_a = n_a;
        if (avx512bf16_fwd_vector_registers(sp) > 32) continue;
        double cycles = 0;
        for (size_t phi = 0; phi < phases.size(); ++phi) {
          if (p.phases[phi].empty()) continue;
          const int64_t taps = static_cast<int64_t>(phases[phi].taps_r.size() * phases[phi].taps_s.size());
          const int64_t steps = p.kb * taps * pairs;
          const int64_t runs = static_cast<int64_t>(phase_runs(phases[phi], p.phases[phi], m).size());
          cycles += (runs / n_a) * bf16_dot_call_cycles(steps, n_a * m) +
                    (runs % n_a ? bf16_dot_call_cycles(steps, m) : 0.0);
        }
        if (cycles < best * 0.999) best = cycles, p.m = m, p.n_a = n_a;
      }
  }

  auto kernel_index = [&](const Bf16BwdDataPhase& ph, int n_a, int n_b) {
    if (level == Isa::amx) {
      AmxFwdKernelSpec sp;
      sp.out_dt = out_dt;
      sp.s = static_cast<int>(ph.taps_s.size());
      sp.dil_w = static_cast<int>(ph.dil_w);
      sp.m = p.m;
      sp.n_a = n_a;
      sp.n_b = n_b;
      return spec_index(&p.kernels, sp);
    }
    Avx512Bf16FwdKernelSpec sp;
    sp.out_dt = out_dt;
    sp.s = static_cast<int>(ph.taps_s.size());
    sp.dil_w = static_cast<int>(ph.dil_w);
    sp.px = 1;
    sp.m = p.m;
    sp.n_a = n_a;
    sp.n_b = n_b;
    sp.pairs = pairs;
    return spec_index(&p.dot_kernels, sp);
  };

  const int64_t img_bytes = p.kb * p.hp * p.wp * kPixelBytes;
  std::vector<Bf16BwdDataCall> calls;
  for (int64_t n = 0; n < d.n; ++n)
    for (size_t phi = 0; phi < phases.size(); ++phi) {
      const Bf16BwdDataPhase& q = p.phases[phi];
      if (q.empty()) continue;
      const std::vector<Run> runs = phase_runs(phases[phi], q, p.m);
      const int64_t n_r = static_cast<int64_t>(q.taps_r.size());
      const int64_t tap_elems = n_r * static_cast<int64_t>(q.taps_s.size()) * kTapElems;
      for (int64_t cbi = 0; cbi < p.cb; ++cbi) {
        const int n_b = d.c - cbi * kAmxBlock <= 16 ? 1 : 2;
        const int64_t plane_px = (n * p.cb + cbi) * (p.interleaved ? d.h * d.w : q.rows * q.cols);
        for (size_t i = 0; i < runs.size(); i += p.n_a) {
          Bf16BwdDataCall c{};
          c.n_a = static_cast<int32_t>(std::min<size_t>(p.n_a, runs.size() - i));
          c.kernel = kernel_index(q, c.n_a, n_b);
          for (int j = 0; j < c.n_a; ++j) {
            const Run& r = runs[i + j];
            c.src_off[j] = n * img_bytes + r.src_px * kPixelBytes;
            c.dst_off[j] = q.out_off + (plane_px + r.dst_px) * out_px_bytes;
            c.rows[j] = r.rows;
          }
          c.wei_off = (q.wei_elem + cbi * p.kb * tap_elems) * 2;
          c.n_r = n_r;
          calls.push_back(c);
        }
      }
    }
  p.streams.resize(threads);
  const int64_t n_calls = static_cast<int64_t>(calls.size());
  for (int t = 0; t < threads; ++t)
    p.streams[t].assign(calls.begin() + n_calls * t / threads, calls.begin() + n_calls * (t + 1) / threads);

  AmxFwdCallArgs& a = p.strides;
  a.n_cb = p.kb;
  a.src_px_stride = kPixelBytes;
  a.src_r_stride = dil_h * p.wp * kPixelBytes;
  a.src_cb_stride = p.hp * p.wp * kPixelBytes;
  a.dst_px_stride = (p.interleaved ? d.stride_w : 1) * out_px_bytes;
  return p;
}

std::shared_ptr<const Bf16BwdDataPrimitive> make_bf16_bwd_data_primitive(const Bf16BwdDataPlan& plan) {
  auto prim = std::make_shared<Bf16BwdDataPrimitive>();
  prim->plan = plan;
  hold_bf16_fwd_kernels(plan, prim.get());
  return prim;
}

// Measured on ResNet-50's strided layers (1 thread, N = 1; bench_bf16_bwd.py): storing
// straight into dx beat scratch-then-interleave by 1.2x on the 3 x 3 stride 2 layers whose
// phases are 28 and 14 pixels wide, and by 1.3x on conv1's; with 7-pixel phases (res5a) the
// short tiles cost more than the second pass saves (0.8x), and 1 x 1 stride 2 layers, three
// phases of four zeros, write dx whole and in order from scratch (1.3-1.6x faster).
bool bf16_bwd_data_interleaves(const ConvDesc& d) {
  constexpr int64_t kMinCols = 14;  // tiles of at least 14 rows
  if (d.stride_h == 1 && d.stride_w == 1) return false;
  for (const BwdDataPhase& ph : bwd_data_phases(d))
    if (ph.empty() || ph.cols < kMinCols) return false;
  return true;
}

int64_t bf16_bwd_data_weight_elems(const ConvDesc& d) {
  int64_t elems = 0;
  for (const BwdDataPhase& ph : bwd_data_phases(d))
    if (!ph.empty()) elems += div_up(d.c, kAmxBlock) * div_up(d.k, kAmxBlock) * ph.sub.r * ph.sub.s * kTapElems;
  return elems;
}

namespace {

Bf16PackSource contiguous_source(const ConvDesc& d, const void* w, DataType dt) {
  Bf16PackSource src;
  src.w = w;
  src.dt = dt;
  src.k = d.k, src.c = d.c, src.r = d.r, src.s = d.s;
  src.st[0] = d.c * d.r * d.s, src.st[1] = d.r * d.s, src.st[2] = d.s, src.st[3] = 1;
  return src;
}

}  // namespace

void pack_bf16_bwd_data_weights(const ConvDesc& d, const float* w, uint16_t* packed) {
  pack_bf16_bwd_data(d, contiguous_source(d, w, DataType::f32), packed, 0, 1);
}
void pack_bf16_bwd_data_weights(const ConvDesc& d, const uint16_t* w, uint16_t* packed) {
  pack_bf16_bwd_data(d, contiguous_source(d, w, DataType::bf16), packed, 0, 1);
}

namespace {

// Thread tid's share of dy's zero-bordered copy: whole (image, block) planes.
void copy_padded(const Bf16BwdDataPlan& p, const uint16_t* dy, uint8_t* copy, int tid, int nthreads) {
  const int64_t P = p.desc.p(), Q = p.desc.q();
  const int64_t planes = p.desc.n * p.kb, begin = planes * tid / nthreads, end = planes * (tid + 1) / nthreads;
  for (int64_t pl = begin; pl < end; ++pl) {
    const uint8_t* in = reinterpret_cast<const uint8_t*>(dy) + pl * P * Q * kPixelBytes;
    uint8_t* out = copy + pl * p.hp * p.wp * kPixelBytes;
    std::memset(out, 0, p.pt * p.wp * kPixelBytes);
    for (int64_t h = 0; h < P; ++h) {
      uint8_t* row = out + (p.pt + h) * p.wp * kPixelBytes;
      std::memset(row, 0, p.pl * kPixelBytes);
      std::memcpy(row + p.pl * kPixelBytes, in + h * Q * kPixelBytes, Q * kPixelBytes);
      std::memset(row + (p.pl + Q) * kPixelBytes, 0, p.pr * kPixelBytes);
    }
    std::memset(out + (p.pt + P) * p.wp * kPixelBytes, 0, p.pb * p.wp * kPixelBytes);
  }
}

// Thread tid's share of the interleave: whole (image, block, dx row) rows, each pixel
// from its phase's dense output, or zeros where no tap reaches the phase.
template <int64_t kPx>
void scatter_rows(const Bf16BwdDataPlan& p, const uint8_t* phase_out, uint8_t* dx, int tid, int nthreads) {
  const ConvDesc& d = p.desc;
  const int64_t n_cols = std::min(d.stride_w, d.w);  // phases per phase row
  const int64_t rows = d.n * p.cb * d.h, begin = rows * tid / nthreads, end = rows * (tid + 1) / nthreads;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / d.h, h = row % d.h;
    uint8_t* out = dx + row * d.w * kPx;
    const int64_t a = h % d.stride_h, i = h / d.stride_h;
    for (int64_t b = 0; b < n_cols; ++b) {
      const Bf16BwdDataPhase& ph = p.phases[a * n_cols + b];
      if (ph.empty()) {
        for (int64_t w = b; w < d.w; w += d.stride_w) std::memset(out + w * kPx, 0, kPx);
        continue;
      }
      const uint8_t* in = phase_out + ph.out_off + ((plane * ph.rows + i) * ph.cols) * kPx;
      for (int64_t w = b, j = 0; w < d.w; w += d.stride_w, ++j) std::memcpy(out + w * kPx, in + j * kPx, kPx);
    }
  }
}

template <typename CallFn>
void run_all(const Bf16BwdDataPlan& p, const uint16_t* dy, const uint16_t* wei, void* dx, void* scratch,
             const RunShares& run, const CallFn& call) {
  if (p.scratch_bytes && !scratch) throw std::invalid_argument("bf16_bwd_data_run: the plan needs scratch: give it");
  uint8_t* sc = static_cast<uint8_t*>(scratch);
  if (p.padded) run(p.threads, [&](int tid, int nt) { copy_padded(p, dy, sc, tid, nt); });
  const uint8_t* in = p.padded ? sc : reinterpret_cast<const uint8_t*>(dy);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(wei);
  uint8_t* out = p.scattered ? sc + p.copy_bytes : static_cast<uint8_t*>(dx);
  run(p.threads, [&](int tid, int) {
    if (tid < 0 || tid >= p.threads || p.streams[tid].empty()) return;
    call(-1, nullptr);  // the stream begins
    AmxFwdCallArgs a = p.strides;
    for (const Bf16BwdDataCall& c : p.streams[tid]) {
      for (int j = 0; j < c.n_a; ++j) {
        a.src[j] = reinterpret_cast<const uint16_t*>(in + c.src_off[j]);
        a.dst[j] = out + c.dst_off[j];
        a.res[j] = nullptr;
        a.rows[j] = c.rows[j];
      }
      a.wei = reinterpret_cast<const uint16_t*>(w + c.wei_off);
      a.n_r = c.n_r;
      call(c.kernel, &a);
    }
    call(-2, nullptr);  // the stream ends
  });
  if (!p.scattered) return;
  uint8_t* x = static_cast<uint8_t*>(dx);
  run(p.threads, [&](int tid, int nt) {
    if (p.out_dt == DataType::bf16) scatter_rows<kAmxBlock * 2>(p, out, x, tid, nt);
    else scatter_rows<kAmxBlock * 4>(p, out, x, tid, nt);
  });
}

}  // namespace

void bf16_bwd_data_run(const Bf16BwdDataPrimitive& prim, const uint16_t* dy, const uint16_t* wei, void* dx,
                       void* scratch, const RunShares& run) {
  run_all(prim.plan, dy, wei, dx, scratch, run, [&](int k, const AmxFwdCallArgs* a) {
    if (k >= 0) prim.fns[k](a);
    else if (!prim.tile_config) return;  // no tiles at the avx512_bf16 level
    else if (k == -1) prim.tile_config();
    else prim.tile_release();
  });
}

void bf16_bwd_data_run_reference(const Bf16BwdDataPlan& plan, const uint16_t* dy, const uint16_t* wei, void* dx,
                                 void* scratch, const RunShares& run) {
  run_all(plan, dy, wei, dx, scratch, run, [&](int k, const AmxFwdCallArgs* a) {
    if (k < 0) return;
    if (plan.level == Isa::amx) amx_fwd_kernel_ref(plan.kernels[k], a);
    else avx512bf16_fwd_kernel_ref(plan.dot_kernels[k], a);
  });
}

}  // namespace dc
