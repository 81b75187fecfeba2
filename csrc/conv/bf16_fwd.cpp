#include "conv/bf16_fwd.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "conv/bf16_pack.h"
#include "conv/driver_util.h"
#include "conv/fwd_stats.h"
#include "conv/reference.h"

namespace dc {

namespace {

constexpr int64_t kPixelBytes = kAmxBlock * 2;  // one activation row: 32 bf16
constexpr int64_t kTapBytes = 2048;             // a tap's two B tiles

// One run of pixels: where it is read, where its first stored pixel goes, and which of
// its rows are stored (not a virtual column, not a repeat of the run before).
struct Run {
  int64_t src_px, dst_px, rows;
};

// Runs of m over [0, total), the last ending on total: (start, rows at the start that
// the run before covered).
std::vector<std::pair<int64_t, int64_t>> run_starts(int64_t total, int m) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t start = 0; start < total; start += m) {
    const int64_t s = std::min(start, total - m);
    out.push_back({s, start - s});
  }
  return out;
}

}  // namespace

std::string Bf16FwdPlan::to_string() const {
  std::ostringstream o;
  o << "bf16 " << isa_name(level) << " fwd " << desc.to_string() << " threads=" << threads << " out=" << dtype_name(out_dt) << post.name()
    << " m=" << m << " runs/call=" << n_a << (flat ? " flat" : " rows") << (blocks_outer ? " blocks-outer" : "") << (input == Bf16FwdInput::padded       ? " padded"
        : input == Bf16FwdInput::folded     ? " folded"
        : input == Bf16FwdInput::subsampled ? " subsampled"
                                            : "") << " kernels=";
  o << spec_names(kernels) << spec_names(dot_kernels);  // one of them is empty
  return o.str();
}

bool bf16_fwd_blocks_outer(int64_t weight_bytes, int64_t image_bytes, int64_t n, int64_t kb, int threads, int64_t l2) {
  if (n < 2) return false;  // one image: the two orders are the same
  const int64_t room = l2 / 2;
  const double images = static_cast<double>(div_up(n, threads));  // a thread's, image-major
  const double image_major = (weight_bytes <= room ? 1.0 : images) * static_cast<double>(weight_bytes) +
                             images * static_cast<double>(image_bytes) * (image_bytes <= room ? 1.0 : kb);
  const double blocks = static_cast<double>(div_up(kb, threads));  // a thread's, block-major
  const double all = static_cast<double>(n) * image_bytes;
  const double block_major =
      static_cast<double>(weight_bytes) * blocks / kb + all * (all <= room ? 1.0 : blocks);
  return block_major < 0.75 * image_major;  // a clear gain: the image-major order keeps each image's output together
}

// In issue slots: the products issue one a slot; loads (two weight rows, a broadcast a
// pixel) two a slot; and a call of fewer than 12 accumulators counts as 12, covering the
// product's latency and the weight rows it reloads from L2 for fewer products. A call also
// sets up and stores its accumulators.
double bf16_dot_call_cycles(int64_t steps, int px) {
  const int accs = 2 * px, loads = 2 + px;
  return steps * (std::max({static_cast<double>(accs), loads / 2.0, 12.0}) + 0.05 * loads) + 100 + 4.0 * accs;
}

namespace {

// The runs of one image, of m pixels each. Flat (stride 1 only), a run's rows are the
// virtual pixels v of the padded map (row v / Wv, column v % Wv; columns >= Q are not
// stored); else each run stays within one output row.
std::vector<Run> image_runs(const Bf16FwdPlan& p, bool flat, int m) {
  const ConvDesc& in = p.inner;
  const int64_t P = in.p(), Q = in.q();
  std::vector<Run> runs;
  if (flat) {
    const int64_t q_virtual = p.wp, total = (P - 1) * q_virtual + Q;
    for (auto [start, skip] : run_starts(total, m)) {
      int64_t rows = 0, first = -1;
      for (int64_t v = start + skip; v < start + m; ++v)
        if (v % q_virtual < Q) {
          rows |= int64_t{1} << (v - start);
          if (first < 0) first = v;
        }
      if (rows) runs.push_back({start, (first / q_virtual) * Q + first % q_virtual, rows});
    }
  } else {
    for (int64_t oh = 0; oh < P; ++oh)
      for (auto [start, skip] : run_starts(Q, m))
        runs.push_back({oh * in.stride_h * p.wp + start * in.stride_w, oh * Q + start + skip,
                        ((int64_t{1} << m) - 1) & ~((int64_t{1} << skip) - 1)});
  }
  return runs;
}

// The runs (flat or in rows: stride 1 may take either), runs per call and pixels per run
// of the avx512_bf16 kernels with the fewest estimated cycles over an image's runs,
// within the register file. Rows win where a row splits evenly (res5's 7 x 7 maps: 2 rows
// of 7 a call, 49 pixels computed, against 63 of the flat map's 61 virtual ones); flat
// wins where the rows are short and the map unpadded.
struct DotTile {
  bool flat;
  int n_a, m;
};
DotTile choose_dot_tile(const Bf16FwdPlan& p, int pairs) {
  const ConvDesc& in = p.inner;
  const int64_t steps = p.cb * in.r * in.s * pairs;
  DotTile best{false, 1, 1};
  double best_cycles = 1e300;
  for (bool flat : {false, true}) {
    if (flat && !p.flat) continue;
    const int64_t max_m = flat ? (in.p() - 1) * p.wp + in.q() : in.q();
    for (int n_a = 1; n_a <= 2; ++n_a)
      for (int m = 1; m <= std::min<int64_t>(max_m, 28); ++m) {
        Avx512Bf16FwdKernelSpec sp;
        sp.m = m;
        sp.n_a = n_a;
        if (avx512bf16_fwd_vector_registers(sp) > 32) continue;
        const int64_t runs = static_cast<int64_t>(image_runs(p, flat, m).size());
        const double cycles =
            (runs / n_a) * bf16_dot_call_cycles(steps, n_a * m) + (runs % n_a ? bf16_dot_call_cycles(steps, m) : 0.0);
        if (cycles < best_cycles * 0.999) best_cycles = cycles, best = {flat, n_a, m};
      }
  }
  return best;
}

}  // namespace

Bf16FwdPlan make_bf16_fwd_plan(const ConvDesc& d, int threads, DataType out_dt, const FwdPostOps& post, Isa level) {
  const std::string bad = d.validate();
  if (!bad.empty()) throw std::invalid_argument("bf16 fwd plan: " + bad);
  if (d.dt != DataType::bf16) throw std::invalid_argument("bf16 fwd plan: the description's element type must be bf16");
  if (d.groups != 1) throw std::invalid_argument("bf16 fwd plan: groups must be 1, got " + std::to_string(d.groups));
  if (out_dt != DataType::f32 && out_dt != DataType::bf16)
    throw std::invalid_argument("bf16 fwd plan: the output type must be f32 or bf16");
  if (threads < 1) throw std::invalid_argument("bf16 fwd plan: threads must be >= 1, got " + std::to_string(threads));
  if (level != Isa::amx && level != Isa::avx512_bf16)
    throw std::invalid_argument(std::string("bf16 fwd plan: the level must be amx or avx512_bf16, got ") +
                                isa_name(level));
  if (post.stats && !bf16_fwd_has_stats(level))
    throw std::invalid_argument(std::string("bf16 fwd plan: the stats post-op needs the amx level, got ") +
                                isa_name(level));
  const int64_t P = d.p(), Q = d.q();
  if (P < 1 || Q < 1) throw std::invalid_argument("bf16 fwd plan: the kernel does not fit the padded input");
  if (d.s * d.dil_w > (1 << 20) || d.r > (1 << 20))
    throw std::invalid_argument("bf16 fwd plan: kernel size times dilation must be at most 2^20");

  Bf16FwdPlan p;
  p.desc = d;
  p.level = level;
  p.threads = threads;
  p.out_dt = out_dt;
  p.post = post;
  p.inner = bf16_fwd_inner_desc(d);
  p.input = bf16_fwd_subsamples(d)                  ? Bf16FwdInput::subsampled
            : bf16_fwd_folds_columns(d)                ? Bf16FwdInput::folded
            : d.pad_t || d.pad_b || d.pad_l || d.pad_r ? Bf16FwdInput::padded
                                                       : Bf16FwdInput::direct;
  const ConvDesc& in = p.inner;
  p.cb = div_up(in.c, kAmxBlock);
  p.kb = div_up(in.k, kAmxBlock);
  p.hp = in.h + in.pad_t + in.pad_b;
  p.wp = in.w + in.pad_l + in.pad_r;
  p.flat = in.stride_h == 1 && in.stride_w == 1;  // AMX: always at stride 1
  // A single input block reads only its pairs that hold channels (conv1's folded 21 of 32).
  const int pairs = level == Isa::avx512_bf16 && p.cb == 1 ? static_cast<int>(div_up(in.c, 2)) : 16;
  if (level == Isa::amx) {
    p.m = static_cast<int>(std::min<int64_t>(kAmxMaxRows, p.flat ? (P - 1) * p.wp + Q : Q));
    p.n_a = 2;
  } else {
    const DotTile tile = choose_dot_tile(p, pairs);
    p.flat = tile.flat;
    p.n_a = tile.n_a;
    p.m = tile.m;
  }
  const std::vector<Run> runs = image_runs(p, p.flat, p.m);

  auto kernel_index = [&](int n_a, int n_b) {
    if (level == Isa::amx) {
      AmxFwdKernelSpec sp;
      sp.out_dt = out_dt;
      sp.s = static_cast<int>(in.s);
      sp.dil_w = static_cast<int>(in.dil_w);
      sp.m = p.m;
      sp.n_a = n_a;
      sp.n_b = n_b;
      sp.post = post;
      return spec_index(&p.kernels, sp);
    }
    Avx512Bf16FwdKernelSpec sp;
    sp.out_dt = out_dt;
    sp.s = static_cast<int>(in.s);
    sp.dil_w = static_cast<int>(in.dil_w);
    sp.px = p.flat ? 1 : static_cast<int>(in.stride_w);
    sp.m = p.m;
    sp.n_a = n_a;
    sp.n_b = n_b;
    sp.pairs = pairs;
    sp.post = post;
    return spec_index(&p.dot_kernels, sp);
  };

  const int64_t img_bytes = p.cb * p.hp * p.wp * kPixelBytes;
  const int64_t out_px_bytes = kAmxBlock * elem_bytes(out_dt);
  p.blocks_outer = bf16_fwd_blocks_outer(p.kb * p.cb * in.r * in.s * kTapBytes, img_bytes, d.n, p.kb, threads,
                                         l2_bytes());
  std::vector<Bf16FwdCall> calls;
  const int64_t outer = p.blocks_outer ? p.kb : d.n, inner = p.blocks_outer ? d.n : p.kb;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i_ = 0; i_ < inner; ++i_) {
      const int64_t n = p.blocks_outer ? i_ : o, kbi = p.blocks_outer ? o : i_;
      const int n_b = d.k - kbi * kAmxBlock <= 16 ? 1 : 2;
      for (size_t i = 0; i < runs.size(); i += p.n_a) {
        Bf16FwdCall c{};
        c.n_a = static_cast<int32_t>(std::min<size_t>(p.n_a, runs.size() - i));
        c.kernel = kernel_index(c.n_a, n_b);
        for (int j = 0; j < c.n_a; ++j) {
          const Run& r = runs[i + j];
          c.src_off[j] = n * img_bytes + r.src_px * kPixelBytes;
          c.dst_off[j] = ((n * p.kb + kbi) * P * Q + r.dst_px) * out_px_bytes;
          c.rows[j] = r.rows;
        }
        c.wei_off = kbi * p.cb * in.r * in.s * kTapBytes;
        c.bias_off = kbi * kAmxBlock * static_cast<int64_t>(sizeof(float));
        if (post.stats) {
          int pixels = 0;
          for (int j = 0; j < c.n_a; ++j) pixels += __builtin_popcountll(static_cast<uint64_t>(c.rows[j]));
          c.stats_off = p.stats_floats;
          p.stats_tiles.push_back({p.stats_floats, kbi, 1, pixels});
          p.stats_floats += kAmxStatsFloats;
        }
        calls.push_back(c);
      }
    }
  p.streams.resize(threads);
  const int64_t total = static_cast<int64_t>(calls.size());
  for (int t = 0; t < threads; ++t) {
    p.streams[t].assign(calls.begin() + total * t / threads, calls.begin() + total * (t + 1) / threads);
  }

  AmxFwdCallArgs& a = p.strides;
  a.n_cb = p.cb;
  a.n_r = in.r;
  a.src_px_stride = (p.flat ? 1 : in.stride_w) * kPixelBytes;
  a.src_r_stride = in.dil_h * p.wp * kPixelBytes;
  a.src_cb_stride = p.hp * p.wp * kPixelBytes;
  a.dst_px_stride = out_px_bytes;
  p.scratch_bytes = p.input == Bf16FwdInput::direct ? 0 : d.n * img_bytes;
  return p;
}

std::shared_ptr<const Bf16FwdPrimitive> make_bf16_fwd_primitive(const Bf16FwdPlan& plan) {
  auto prim = std::make_shared<Bf16FwdPrimitive>();
  prim->plan = plan;
  hold_bf16_fwd_kernels(plan, prim.get());
  return prim;
}

namespace {

PrimitiveCache<Bf16FwdPrimitive>& primitives() {
  static auto* c = new PrimitiveCache<Bf16FwdPrimitive>();  // never destroyed, like the kernel cache
  return *c;
}
// Made at load, before another thread can be inside it: no fork() finds it half made.
[[maybe_unused]] PrimitiveCache<Bf16FwdPrimitive>& g_primitives_at_load = primitives();

}  // namespace

std::shared_ptr<const Bf16FwdPrimitive> get_bf16_fwd_primitive(const ConvDesc& desc, int threads, DataType out_dt,
                                                                const FwdPostOps& post) {
  // The level is in the key: after a cap change no call runs another level's kernels (nor,
  // below amx, a plan that configures tiles).
  const Isa level = active_isa();
  const std::string key = std::string(isa_name(level)) + "/" + desc.to_string() + "/" + std::to_string(threads) + "/" +
                          dtype_name(out_dt) + post.name();
  return primitives().get(
      key, [&] { return make_bf16_fwd_primitive(make_bf16_fwd_plan(desc, threads, out_dt, post, level)); });
}

void clear_bf16_fwd_primitives() { primitives().clear(); }

bool bf16_fwd_folds_columns(const ConvDesc& d) { return d.s > 1 && d.c * d.s <= kAmxBlock; }
bool bf16_fwd_subsamples(const ConvDesc& d) {
  return d.r == 1 && d.s == 1 && (d.stride_h > 1 || d.stride_w > 1) && !d.pad_t && !d.pad_b && !d.pad_l && !d.pad_r;
}

ConvDesc bf16_fwd_inner_desc(const ConvDesc& d) {
  if (bf16_fwd_subsamples(d)) {
    ConvDesc in = d;
    in.h = d.p();
    in.w = d.q();
    in.stride_h = in.stride_w = 1;
    in.dil_h = in.dil_w = 1;
    return in;
  }
  if (!bf16_fwd_folds_columns(d)) return d;
  ConvDesc in = d;
  in.c = d.c * d.s;
  in.h = d.h + d.pad_t + d.pad_b;
  in.w = d.q();
  in.s = 1;
  in.stride_w = 1;
  in.dil_w = 1;
  in.pad_t = in.pad_b = in.pad_l = in.pad_r = 0;
  return in;
}

int64_t bf16_fwd_weight_elems(const ConvDesc& d) {
  const ConvDesc in = bf16_fwd_inner_desc(d);
  return div_up(in.k, kAmxBlock) * div_up(in.c, kAmxBlock) * in.r * in.s * 1024;
}

void pack_bf16_fwd_weights(const ConvDesc& d, const float* w, uint16_t* packed) {
  const int64_t strides[4] = {d.c * d.r * d.s, d.r * d.s, d.s, 1};
  pack_bf16_fwd_weights(d, w, DataType::f32, strides, packed, 0, 1);
}

void pack_bf16_fwd_weights(const ConvDesc& d, const void* w, DataType w_dt, const int64_t st[4], uint16_t* packed,
                           int tid, int nthreads) {
  Bf16PackSource src;
  src.w = w;
  src.dt = w_dt;
  src.k = d.k, src.c = d.c, src.r = d.r, src.s = d.s;
  std::copy(st, st + 4, src.st);
  pack_bf16_fwd(src, bf16_fwd_folds_columns(d), packed, tid, nthreads);
}

namespace {

// Thread tid's share of the zero-bordered copy: whole (image, block) planes.
void copy_padded(const Bf16FwdPlan& p, const uint16_t* src, void* scratch, int tid, int nthreads) {
  const ConvDesc& d = p.desc;
  const int64_t planes = d.n * p.cb, begin = planes * tid / nthreads, end = planes * (tid + 1) / nthreads;
  for (int64_t pl = begin; pl < end; ++pl) {
    const uint8_t* in = reinterpret_cast<const uint8_t*>(src) + pl * d.h * d.w * kPixelBytes;
    uint8_t* out = static_cast<uint8_t*>(scratch) + pl * p.hp * p.wp * kPixelBytes;
    std::memset(out, 0, d.pad_t * p.wp * kPixelBytes);
    for (int64_t h = 0; h < d.h; ++h) {
      uint8_t* row = out + (d.pad_t + h) * p.wp * kPixelBytes;
      std::memset(row, 0, d.pad_l * kPixelBytes);
      std::memcpy(row + d.pad_l * kPixelBytes, in + h * d.w * kPixelBytes, d.w * kPixelBytes);
      std::memset(row + (d.pad_l + d.w) * kPixelBytes, 0, d.pad_r * kPixelBytes);
    }
    std::memset(out + (d.pad_t + d.h) * p.wp * kPixelBytes, 0, d.pad_b * p.wp * kPixelBytes);
  }
}

}  // namespace

void bf16_fold_columns(const ConvDesc& d, const uint16_t* src, uint16_t* scratch, int64_t row_begin, int64_t row_end) {
  const int64_t hp = d.h + d.pad_t + d.pad_b, wp = d.q();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / hp, ih = row % hp - d.pad_t;
    uint16_t* out = scratch + row * wp * kAmxBlock;
    std::memset(out, 0, wp * kPixelBytes);
    if (ih < 0 || ih >= d.h) continue;
    const uint16_t* in = src + (n * d.h + ih) * d.w * kAmxBlock;
    // Tap by tap, over the output columns whose tap falls inside the row. Up to 4 channels
    // (conv1's 3): one 8-byte move a pixel, its lanes past C (zeros in the input) then
    // overwritten by the next tap's, or left zero, within the pixel.
    const bool narrow = d.c <= 4 && d.s * d.c + 4 - d.c <= kAmxBlock;
    for (int64_t s = 0; s < d.s; ++s) {
      const int64_t off = s * d.dil_w - d.pad_l;  // iw = q * stride_w + off
      const int64_t q_lo = off >= 0 ? 0 : div_up(-off, d.stride_w);
      const int64_t q_hi = std::min<int64_t>(wp, d.w - off <= 0 ? 0 : div_up(d.w - off, d.stride_w));
      if (q_lo >= q_hi) continue;
      uint16_t* o = out + s * d.c;
      const uint16_t* i = in + (q_lo * d.stride_w + off) * kAmxBlock;  // column q_lo's tap
      const int64_t step = d.stride_w * kAmxBlock;
      if (narrow)  // a constant size, so the move is one load and one store
        for (int64_t q = q_lo; q < q_hi; ++q, i += step) std::memcpy(o + q * kAmxBlock, i, 8);
      else
        for (int64_t q = q_lo; q < q_hi; ++q, i += step) std::memcpy(o + q * kAmxBlock, i, d.c * 2);
    }
  }
}

namespace {

// Thread tid's share of the column-folded copy: whole (image, padded row) rows.
void copy_folded(const Bf16FwdPlan& p, const uint16_t* src, void* scratch, int tid, int nthreads) {
  const int64_t rows = p.desc.n * p.hp;
  bf16_fold_columns(p.desc, src, static_cast<uint16_t*>(scratch), rows * tid / nthreads, rows * (tid + 1) / nthreads);
}

// Thread tid's share of the subsampled copy: whole (image, block, output row) rows, each
// pixel the input pixel its 1 x 1 tap reads.
void copy_subsampled(const Bf16FwdPlan& p, const uint16_t* src, void* scratch, int tid, int nthreads) {
  const ConvDesc& d = p.desc;
  const int64_t rows = d.n * p.cb * p.hp, begin = rows * tid / nthreads, end = rows * (tid + 1) / nthreads;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / p.hp, oh = row % p.hp;
    const uint16_t* in = src + (plane * d.h + oh * d.stride_h) * d.w * kAmxBlock;
    uint16_t* out = static_cast<uint16_t*>(scratch) + row * p.wp * kAmxBlock;
    for (int64_t q = 0; q < p.wp; ++q) std::memcpy(out + q * kAmxBlock, in + q * d.stride_w * kAmxBlock, kPixelBytes);
  }
}

template <typename CallFn>
void run_all(const Bf16FwdPlan& p, const uint16_t* src, const uint16_t* wei, const Bf16FwdPostArgs& post, void* dst,
             void* scratch, const RunShares& run, const CallFn& call) {
  if (p.post.bias && !post.bias) throw std::invalid_argument("bf16_fwd_run: the plan adds a bias: give one");
  if (p.post.add && !post.residual) throw std::invalid_argument("bf16_fwd_run: the plan adds a residual: give one");
  if (p.post.stats && (!post.shift || !post.sums))
    throw std::invalid_argument("bf16_fwd_run: the plan sums batch-norm statistics: give their shift and sums");
  if (p.input != Bf16FwdInput::direct && !scratch)
    throw std::invalid_argument("bf16_fwd_run: the plan copies its input: give its scratch");
  if (p.input == Bf16FwdInput::padded) run(p.threads, [&](int tid, int nt) { copy_padded(p, src, scratch, tid, nt); });
  if (p.input == Bf16FwdInput::folded) run(p.threads, [&](int tid, int nt) { copy_folded(p, src, scratch, tid, nt); });
  if (p.input == Bf16FwdInput::subsampled)
    run(p.threads, [&](int tid, int nt) { copy_subsampled(p, src, scratch, tid, nt); });
  const uint8_t* in = reinterpret_cast<const uint8_t*>(p.input == Bf16FwdInput::direct ? src : scratch);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(wei);
  const uint8_t* res = static_cast<const uint8_t*>(post.residual);
  const uint8_t* bias = reinterpret_cast<const uint8_t*>(post.bias);
  const uint8_t* shift = reinterpret_cast<const uint8_t*>(post.shift);
  uint8_t* out = static_cast<uint8_t*>(dst);
  run(p.threads, [&](int tid, int) {
    if (tid < 0 || tid >= p.threads) return;
    call(-1, nullptr);  // the stream begins
    AmxFwdCallArgs a = p.strides;
    for (const Bf16FwdCall& c : p.streams[tid]) {
      for (int j = 0; j < c.n_a; ++j) {
        a.src[j] = reinterpret_cast<const uint16_t*>(in + c.src_off[j]);
        a.dst[j] = out + c.dst_off[j];
        a.res[j] = res ? res + c.dst_off[j] : nullptr;
        a.rows[j] = c.rows[j];
      }
      a.wei = reinterpret_cast<const uint16_t*>(w + c.wei_off);
      a.bias = bias ? reinterpret_cast<const float*>(bias + c.bias_off) : nullptr;
      if (p.post.stats) {
        a.stats_shift = reinterpret_cast<const float*>(shift + c.bias_off);
        a.stats = post.sums + c.stats_off;
      }
      call(c.kernel, &a);
    }
    call(-2, nullptr);  // the stream ends
  });
}

}  // namespace

void bf16_fwd_run(const Bf16FwdPrimitive& prim, const uint16_t* src, const uint16_t* wei, const Bf16FwdPostArgs& post,
                  void* dst, void* scratch, const RunShares& run) {
  run_all(prim.plan, src, wei, post, dst, scratch, run, [&](int k, const AmxFwdCallArgs* a) {
    if (k >= 0) prim.fns[k](a);
    else if (!prim.tile_config) return;  // no tiles at the avx512_bf16 level
    else if (k == -1) prim.tile_config();
    else prim.tile_release();
  });
}

void bf16_fwd_run_reference(const Bf16FwdPlan& plan, const uint16_t* src, const uint16_t* wei,
                            const Bf16FwdPostArgs& post, void* dst, void* scratch, const RunShares& run) {
  run_all(plan, src, wei, post, dst, scratch, run, [&](int k, const AmxFwdCallArgs* a) {
    if (k < 0) return;
    if (plan.level == Isa::amx) amx_fwd_kernel_ref(plan.kernels[k], a);
    else avx512bf16_fwd_kernel_ref(plan.dot_kernels[k], a);
  });
}

bool bf16_fwd_stats_finish(const Bf16FwdPlan& plan, const float* sums, const float* shift, int64_t channels,
                           float* mean, float* var) {
  if (!plan.post.stats) throw std::invalid_argument("bf16_fwd_stats_finish: the plan has no stats post-op");
  if (channels < 0 || channels > plan.desc.k)
    throw std::invalid_argument("bf16_fwd_stats_finish: channels must be in [0, " + std::to_string(plan.desc.k) +
                                "], got " + std::to_string(channels));
  const double count = static_cast<double>(plan.desc.n) * plan.desc.p() * plan.desc.q();
  return stats_merge(plan.stats_tiles, kAmxBlock, plan.kb * kAmxBlock, count, sums, shift, channels, mean, var);
}

}  // namespace dc
