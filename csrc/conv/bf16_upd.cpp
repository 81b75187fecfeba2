#include "conv/bf16_upd.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include "conv/bf16_fwd.h"
#include "conv/driver_util.h"
#include "conv/reference.h"
#include "conv/simd_transpose.h"

namespace dc {

namespace {

constexpr int64_t kPixelBytes = kAmxBlock * 2;  // one activation row: 32 bf16
constexpr int64_t kChunkPixels = 32;            // pixels of one product
constexpr int64_t kChunkBytes = 2048;           // one chunk of dy in VNNI: two B tiles
constexpr int64_t kTapBlockBytes = kAmxBlock * kAmxBlock * 4;  // a [32 c][32 k] fp32 block

int64_t round_up(int64_t x, int64_t m) { return div_up(x, m) * m; }

// [begin, end) of `total` items dealt in `parts` near-equal runs.
std::pair<int64_t, int64_t> share_range(int64_t total, int parts, int i) {
  return {total * i / parts, total * (i + 1) / parts};
}

}  // namespace

std::string Bf16UpdPlan::to_string() const {
  std::ostringstream o;
  o << "bf16 " << isa_name(level) << " upd " << desc.to_string() << " threads=" << threads
    << " dw=" << dtype_name(dw_dt) << " phases=" << phases.size() << " virtual=" << hv << "x" << wv << " chunks=" << chunks << "/" << seg_chunks
    << " parts=" << parts
    << " kernels=";
  o << spec_names(kernels) << spec_names(dot_kernels);  // one of them is empty
  return o.str();
}

Bf16UpdPlan make_bf16_upd_plan(const ConvDesc& d, int threads, DataType dw_dt, Isa level) {
  const std::string bad = d.validate();
  if (!bad.empty()) throw std::invalid_argument("bf16 upd plan: " + bad);
  if (d.dt != DataType::bf16) throw std::invalid_argument("bf16 upd plan: the description's element type must be bf16");
  if (d.groups != 1) throw std::invalid_argument("bf16 upd plan: groups must be 1, got " + std::to_string(d.groups));
  if (dw_dt != DataType::f32 && dw_dt != DataType::bf16)
    throw std::invalid_argument("bf16 upd plan: the weight gradient's type must be f32 or bf16");
  if (threads < 1) throw std::invalid_argument("bf16 upd plan: threads must be >= 1, got " + std::to_string(threads));
  if (level != Isa::amx && level != Isa::avx512_bf16)
    throw std::invalid_argument(std::string("bf16 upd plan: the level must be amx or avx512_bf16, got ") +
                                isa_name(level));
  const int64_t P = d.p(), Q = d.q();
  if (P < 1 || Q < 1) throw std::invalid_argument("bf16 upd plan: the kernel does not fit the padded input");

  Bf16UpdPlan p;
  p.desc = d;
  p.level = level;
  p.folded = bf16_fwd_folds_columns(d);
  p.inner = p.folded ? bf16_fwd_inner_desc(d) : d;
  p.threads = threads;
  p.dw_dt = dw_dt;
  {
    const ConvDesc& in = p.inner;
    p.cb = div_up(in.c, kAmxBlock);
    p.kb = div_up(in.k, kAmxBlock);
    p.hv = div_up(in.h + in.pad_t + in.pad_b, in.stride_h);
    p.wv = div_up(in.w + in.pad_l + in.pad_r, in.stride_w);
    p.chunks = div_up((P - 1) * p.wv + Q, kChunkPixels);
  }
  const ConvDesc& in = p.inner;

  int64_t max_shift = 0;
  for (int64_t r = 0; r < in.r; ++r)
    for (int64_t s = 0; s < in.s; ++s) {
      const int32_t phase =
          static_cast<int32_t>((r * in.dil_h) % in.stride_h * in.stride_w + (s * in.dil_w) % in.stride_w);
      auto it = std::find(p.phases.begin(), p.phases.end(), phase);
      if (it == p.phases.end()) it = p.phases.insert(p.phases.end(), phase);
      const int64_t shift = (r * in.dil_h) / in.stride_h * p.wv + (s * in.dil_w) / in.stride_w;
      p.taps.push_back({static_cast<int32_t>(it - p.phases.begin()), shift});
      max_shift = std::max(max_shift, shift);
    }
  p.row_len = round_up(max_shift + p.chunks * kChunkPixels, kChunkPixels);

  for (int64_t cbi = 0; cbi < p.cb; ++cbi)
    for (int64_t kbi = 0; kbi < p.kb; ++kbi) {
      const int n_a = in.c - cbi * kAmxBlock <= 16 ? 1 : 2, n_b = in.k - kbi * kAmxBlock <= 16 ? 1 : 2;
      if (p.kernel_of[n_a - 1][n_b - 1] >= 0) continue;
      if (level == Isa::amx) {
        p.kernel_of[n_a - 1][n_b - 1] = static_cast<int>(p.kernels.size());
        p.kernels.push_back({n_a, n_b});
      } else {
        p.kernel_of[n_a - 1][n_b - 1] = static_cast<int>(p.dot_kernels.size());
        p.dot_kernels.push_back(avx512bf16_upd_spec(n_a, n_b));
      }
    }

  // Shares: whichever split, of those that give every thread work, repeats the fewest
  // bytes. Over input blocks every thread copies all of dy; over output blocks, all of x;
  // over the images every thread writes a private copy of dW that the last pass reads.
  // With none of them (fewer blocks and images than threads), output blocks on as many
  // threads as there are.
  p.shares.resize(threads);
  const double extra = threads - 1.0;
  const double by_cb = p.cb >= threads ? extra * d.n * p.kb * p.dy_block_bytes() : 1e300;
  const double by_kb = p.kb >= threads ? extra * d.n * p.cb * p.xt_block_bytes() : 1e300;
  const double by_img = d.n >= threads && threads > 1 ? 2.0 * threads * d.k * d.c * d.r * d.s * 4 : 1e300;
  const bool split_images = by_img < std::min(by_cb, by_kb);
  const bool split_cb = !split_images && by_cb <= by_kb && by_cb < 1e300;
  p.parts = split_images ? threads : 1;
  for (int t = 0; t < threads; ++t) {
    Bf16UpdShare& sh = p.shares[t];
    sh.n0 = 0, sh.n1 = d.n, sh.kb0 = 0, sh.kb1 = p.kb, sh.cb0 = 0, sh.cb1 = p.cb;
    if (split_images) {
      std::tie(sh.n0, sh.n1) = share_range(d.n, threads, t);
      sh.part = t;
    } else if (split_cb) {
      std::tie(sh.cb0, sh.cb1) = share_range(p.cb, threads, t);
    } else {
      // Output blocks over as many threads as there are blocks; the others idle.
      const int used = static_cast<int>(std::min<int64_t>(threads, p.kb));
      if (t < used) std::tie(sh.kb0, sh.kb1) = share_range(p.kb, used, t);
      else sh.n1 = 0;
    }
    const int64_t bytes = (sh.n1 - sh.n0) * (p.xt_block_bytes() + (sh.kb1 - sh.kb0) * p.dy_block_bytes()) +
                          static_cast<int64_t>(p.taps.size()) * kTapBlockBytes;
    p.share_bytes = std::max(p.share_bytes, round_up(bytes, 64));
  }
  // Segments: a share's images' dy chunks and transposed rows of every phase, with the
  // rows' span of taps, within about 40 KiB of L1; at least 8 chunks, so the sums' loads
  // and stores stay a small part of a call.
  {
    int64_t imgs = 1;
    for (const Bf16UpdShare& sh : p.shares) imgs = std::max(imgs, sh.n1 - sh.n0);
    const int64_t nph = static_cast<int64_t>(p.phases.size());
    const int64_t per_chunk = imgs * (kChunkBytes + nph * kAmxBlock * kChunkPixels * 2);
    const int64_t span = imgs * nph * kAmxBlock * max_shift * 2;
    const int64_t budget = 40 << 10;
    const int64_t seg = span < budget ? (budget - span) / per_chunk : 0;
    p.seg_chunks = p.chunks <= 16 ? p.chunks : std::min(p.chunks, std::max<int64_t>(8, seg));
  }
  p.stream_dw = d.k * d.c * d.r * d.s * 4 > (1 << 20);
  p.fold_bytes = p.folded ? round_up(d.n * in.h * in.w * kPixelBytes, 64) : 0;
  p.scratch_bytes = threads * p.share_bytes + (p.parts > 1 ? round_up(p.parts * d.k * d.c * d.r * d.s * 4, 64) : 0) +
                    p.fold_bytes;
  return p;
}

std::shared_ptr<const Bf16UpdPrimitive> make_bf16_upd_primitive(const Bf16UpdPlan& plan) {
  auto prim = std::make_shared<Bf16UpdPrimitive>();
  prim->plan = plan;
  const std::string info = plan.to_string();
  for (const Avx512Bf16UpdKernelSpec& sp : plan.dot_kernels) {
    prim->held.push_back(get_kernel(sp.name(), [&] { return make_avx512bf16_upd_kernel(sp); }, info));
    prim->fns.push_back(prim->held.back()->entry<AmxUpdKernelFn>());
  }
  if (plan.level != Isa::amx) return prim;
  for (const AmxUpdKernelSpec& sp : plan.kernels) {
    prim->held.push_back(get_kernel(sp.name(), [&] { return make_amx_upd_kernel(sp); }, info));
    prim->fns.push_back(prim->held.back()->entry<AmxUpdKernelFn>());
  }
  prim->held.push_back(get_kernel("amx_tilecfg_m16", [] { return make_amx_tile_config_kernel(16); }, info));
  prim->tile_config = prim->held.back()->entry<AmxTileFn>();
  prim->held.push_back(get_kernel("amx_tilerelease", [] { return make_amx_tile_release_kernel(); }, info));
  prim->tile_release = prim->held.back()->entry<AmxTileFn>();
  return prim;
}

namespace {

// Where the copies of one image's block read: a phase's padded pixel (i, j) is input pixel
// (ih, iw), or padding.
struct PhaseGeom {
  int64_t a, b;  // the phase's row and column offsets
  bool input_pixel(const ConvDesc& d, int64_t i, int64_t j, int64_t* ih, int64_t* iw) const {
    *ih = i * d.stride_h + a - d.pad_t;
    *iw = j * d.stride_w + b - d.pad_l;
    return *ih >= 0 && *ih < d.h && *iw >= 0 && *iw < d.w;
  }
};

PhaseGeom phase_geom(const Bf16UpdPlan& p, int phase) {
  return {p.phases[phase] / p.inner.stride_w, p.phases[phase] % p.inner.stride_w};
}

// Image n's input block cb, transposed, every phase: [phase][32 channels][row_len pixels],
// pixel v of a row being the phase's pixel (v / wv, v % wv), zeros past the phase and on
// padding. The scalar twin of copy_xt_avx512.
void copy_xt_scalar(const Bf16UpdPlan& p, const uint16_t* x, int64_t n, int64_t cbi, uint16_t* out) {
  const ConvDesc& d = p.inner;
  const uint16_t* img = x + (n * p.cb + cbi) * d.h * d.w * kAmxBlock;
  for (size_t ph = 0; ph < p.phases.size(); ++ph) {
    const PhaseGeom g = phase_geom(p, static_cast<int>(ph));
    for (int c = 0; c < kAmxBlock; ++c) {
      uint16_t* row = out + (ph * kAmxBlock + c) * p.row_len;
      for (int64_t v = 0; v < p.row_len; ++v) {
        int64_t ih, iw;
        row[v] = g.input_pixel(d, v / p.wv, v % p.wv, &ih, &iw) ? img[(ih * d.w + iw) * kAmxBlock + c] : 0;
      }
    }
  }
}

// Image n's output block kb in VNNI: chunk i of virtual pixels [32 i, 32 i + 32) as
// [2 halves][16 pairs][16 k][2 pixels], zeros on virtual columns and past the map. The
// scalar twin of copy_dy_avx512.
void copy_dy_scalar(const Bf16UpdPlan& p, const uint16_t* dy, int64_t n, int64_t kbi, uint16_t* out) {
  const ConvDesc& d = p.inner;
  const int64_t P = d.p(), Q = d.q();
  const uint16_t* img = dy + (n * p.kb + kbi) * P * Q * kAmxBlock;
  for (int64_t v = 0; v < p.chunks * kChunkPixels; ++v) {
    const int64_t pp = v / p.wv, q = v % p.wv;
    const bool live = pp < P && q < Q;
    for (int k = 0; k < kAmxBlock; ++k)
      out[(v / kChunkPixels) * 1024 + (k / 16) * 512 + (v % kChunkPixels / 2) * 32 + (k % 16) * 2 + v % 2] =
          live ? img[(pp * Q + q) * kAmxBlock + k] : 0;
  }
}

// The interleave of two pixels' 32 channels into VNNI pairs: channels 0-15 (lo), 16-31 (hi).
__attribute__((target("avx512f,avx512bw"))) inline void pair_pixels(__m512i a, __m512i b, __m512i* lo, __m512i* hi) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  *lo = _mm512_permutex2var_epi16(a, _mm512_load_si512(kLo), b);
  *hi = _mm512_permutex2var_epi16(a, _mm512_load_si512(kHi), b);
}

// Row by row of 32 pixels (a tile row's 64 aligned bytes in each of the 32 channels'
// rows): 32 input pixels, or zeros, interleaved in pairs and transposed.
__attribute__((target("avx512f,avx512bw"))) void copy_xt_avx512(const Bf16UpdPlan& p, const uint16_t* x, int64_t n,
                                                               int64_t cbi, uint16_t* out) {
  const ConvDesc& d = p.inner;
  const uint16_t* img = x + (n * p.cb + cbi) * d.h * d.w * kAmxBlock;
  const int64_t row_len = p.row_len, wv = p.wv, width = d.w;
  const int64_t filled = std::min(row_len, p.hv * wv);  // row pixels inside the phase
  for (size_t ph = 0; ph < p.phases.size(); ++ph) {
    const PhaseGeom g = phase_geom(p, static_cast<int>(ph));
    // Phase column j reads input column j * stride_w + col0, inside the row for j in
    // [j_lo, j_hi).
    const int64_t col0 = g.b - d.pad_l, step = d.stride_w * kAmxBlock;
    const int64_t j_lo = col0 >= 0 ? 0 : div_up(-col0, d.stride_w);
    const int64_t j_hi = width - col0 <= 0 ? 0 : std::min(wv, div_up(width - col0, d.stride_w));
    uint16_t* rows = out + ph * kAmxBlock * row_len;
    // Pixel v's phase row i and column j, moved on with v; in_row: phase row i's column 0.
    int64_t i = 0, j = 0;
    const uint16_t* in_row = nullptr;
    bool row_in = false;
    auto start_row = [&] {
      const int64_t ih = i * d.stride_h + g.a - d.pad_t;
      row_in = ih >= 0 && ih < d.h;
      in_row = row_in ? img + (ih * width + col0) * kAmxBlock : img;
    };
    start_row();
    for (int64_t v0 = 0; v0 < filled; v0 += 32) {
      __m512i lo[16], hi[16];
      for (int m = 0; m < 16; ++m) {
        __m512i px[2];
        for (int e = 0; e < 2; ++e) {
          const bool live = v0 + 2 * m + e < filled && row_in && j >= j_lo && j < j_hi;
          px[e] = live ? _mm512_loadu_si512(in_row + j * step) : _mm512_setzero_si512();
          if (++j == wv) j = 0, ++i, start_row();
        }
        pair_pixels(px[0], px[1], &lo[m], &hi[m]);
      }
      // lo[m]'s 32-bit element c is channel c at pixels 2m, 2m + 1: transposed, row c
      // holds channel c's 32 pixels.
      transpose16_epi32(lo);
      transpose16_epi32(hi);
      uint16_t* dst = rows + v0;
      for (int c = 0; c < 16; ++c) {
        _mm512_store_si512(dst + c * row_len, lo[c]);
        _mm512_store_si512(dst + (16 + c) * row_len, hi[c]);
      }
    }
    const int64_t done = round_up(filled, 32);
    for (int c = 0; c < kAmxBlock; ++c) std::memset(rows + c * row_len + done, 0, (row_len - done) * 2);
  }
}

__attribute__((target("avx512f,avx512bw"))) void copy_dy_avx512(const Bf16UpdPlan& p, const uint16_t* dy, int64_t n,
                                                               int64_t kbi, uint16_t* out) {
  const ConvDesc& d = p.inner;
  const int64_t P = d.p(), Q = d.q();
  const uint16_t* img = dy + (n * p.kb + kbi) * P * Q * kAmxBlock;
  int64_t pp = 0, q = 0;  // virtual pixel v's row and column, moved on with v
  for (int64_t v = 0; v < p.chunks * kChunkPixels; v += 2) {
    __m512i px[2], lo, hi;
    for (int e = 0; e < 2; ++e) {
      px[e] = pp < P && q < Q ? _mm512_loadu_si512(img + (pp * Q + q) * kAmxBlock) : _mm512_setzero_si512();
      if (++q == p.wv) q = 0, ++pp;
    }
    pair_pixels(px[0], px[1], &lo, &hi);
    uint16_t* pair = out + (v / kChunkPixels) * 1024 + (v % kChunkPixels / 2) * 32;
    _mm512_storeu_si512(pair, lo);
    _mm512_storeu_si512(pair + 512, hi);
  }
}

// The tap blocks of (kb, cb) to dW (K, C, R, S): element (k, c, tap) of block tap's
// [c][k]; into dst of type `dt` (a private copy is fp32). The scalar twin of
// write_blocks_avx512, and the writer of a folded plan's blocks, whose inner channel c
// is (kernel column c / C, channel c % C) and whose taps are kernel rows.
void write_blocks_scalar(const Bf16UpdPlan& p, int64_t kbi, int64_t cbi, float* blocks, void* dst, DataType dt) {
  const ConvDesc& d = p.desc;
  const int64_t taps = static_cast<int64_t>(p.taps.size());
  const int64_t k_end = std::min(p.inner.k, (kbi + 1) * kAmxBlock), c_end = std::min(p.inner.c, (cbi + 1) * kAmxBlock);
  for (int64_t k = kbi * kAmxBlock; k < k_end; ++k)
    for (int64_t c = cbi * kAmxBlock; c < c_end; ++c) {
      const float* src = blocks + (c % kAmxBlock) * kAmxBlock + k % kAmxBlock;
      // Element t of (k, c) at o + t * stride.
      const int64_t o = p.folded ? (k * d.c + c % d.c) * d.r * d.s + c / d.c : (k * d.c + c) * taps;
      const int64_t stride = p.folded ? d.s : 1;
      for (int64_t t = 0; t < taps; ++t) {
        if (dt == DataType::bf16) static_cast<uint16_t*>(dst)[o + t * stride] = bf16_from_float(src[t * 1024]);
        else static_cast<float*>(dst)[o + t * stride] = src[t * 1024];
      }
    }
}

// 16 fp32 values to dst as `dt`, the first m of them; with `stream` (and m == 16 and the
// address aligned), past the caches: no read of the lines they fill.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void store16(__m512 v, int m, void* dst,
                                                                                   DataType dt, bool stream) {
  const __mmask16 mask = static_cast<__mmask16>((1u << m) - 1);
  if (dt == DataType::bf16) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    if (stream && m == 16 && reinterpret_cast<uintptr_t>(dst) % 32 == 0)
      _mm256_stream_si256(static_cast<__m256i*>(dst), h);
    else
      _mm256_mask_storeu_epi16(dst, mask, h);
  } else {
    if (stream && m == 16 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) _mm512_stream_ps(static_cast<float*>(dst), v);
    else _mm512_mask_storeu_ps(dst, mask, v);
  }
}

// As write_blocks_scalar. Output channel k's row of dW within the blocks' input channels
// is element e = c * taps + t of [32 c x taps]: block t's [c][k]. So the rows of all 32
// output channels are the transpose of the (32 taps) x 32 matrix whose row e is block t's
// row c: 16 x 16 transposes, each giving 16 elements of 16 rows of dW. A dW larger than
// the caches is streamed to memory.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void write_blocks_avx512(
    const Bf16UpdPlan& p, int64_t kbi, int64_t cbi, float* blocks, void* dst, DataType dt) {
  if (p.folded) return write_blocks_scalar(p, kbi, cbi, blocks, dst, dt);  // a few elements
  const ConvDesc& d = p.desc;
  const int64_t taps = static_cast<int64_t>(p.taps.size());
  const int64_t k0 = kbi * kAmxBlock, c0 = cbi * kAmxBlock;
  const int64_t kn = std::min<int64_t>(kAmxBlock, d.k - k0), cn = std::min<int64_t>(kAmxBlock, d.c - c0);
  const int64_t n = cn * taps, row_stride = d.c * taps;  // a row's elements; dW's row stride
  const int es = elem_bytes(dt);
  uint8_t* out = static_cast<uint8_t*>(dst) + (k0 * d.c + c0) * taps * es;
  for (int64_t e0 = 0; e0 < n; e0 += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, n - e0));
    for (int64_t k16 = 0; k16 < kn; k16 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t e = e0 + i;
        r[i] = i < m ? _mm512_loadu_si512(blocks + (e % taps) * 1024 + (e / taps) * kAmxBlock + k16)
                     : _mm512_setzero_si512();
      }
      transpose16_epi32(r);
      for (int i = 0; i < 16 && k16 + i < kn; ++i)
        store16(_mm512_castsi512_ps(r[i]), m, out + ((k16 + i) * row_stride + e0) * es, dt, p.stream_dw);
    }
  }
}

// Thread tid's share of the sum of the private copies into dW.
void reduce_parts(const Bf16UpdPlan& p, const float* parts, void* dw, int tid, int nthreads) {
  const int64_t elems = p.desc.k * p.desc.c * p.desc.r * p.desc.s;
  const auto [begin, end] = share_range(elems, nthreads, tid);
  for (int64_t i = begin; i < end; ++i) {
    float acc = parts[i];
    for (int part = 1; part < p.parts; ++part) acc += parts[part * elems + i];
    if (p.dw_dt == DataType::bf16) static_cast<uint16_t*>(dw)[i] = bf16_from_float(acc);
    else static_cast<float*>(dw)[i] = acc;
  }
}

using CopyFn = void (*)(const Bf16UpdPlan&, const uint16_t*, int64_t, int64_t, uint16_t*);
using WriteFn = void (*)(const Bf16UpdPlan&, int64_t, int64_t, float*, void*, DataType);

// begin(), call(kernel, args) for every call of the share and end() around them.
template <typename CallFn, typename TileFn>
void run_all(const Bf16UpdPlan& p, const uint16_t* x, const uint16_t* dy, void* dw, void* scratch,
             const RunShares& run, CopyFn copy_xt, CopyFn copy_dy, WriteFn write_blocks, const CallFn& call,
             const TileFn& tiles) {
  if (!scratch || reinterpret_cast<uintptr_t>(scratch) % 64)
    throw std::invalid_argument("bf16_upd_run: give the plan's scratch, 64-byte aligned");
  uint8_t* base = static_cast<uint8_t*>(scratch);
  const int64_t part_elems = p.desc.k * p.desc.c * p.desc.r * p.desc.s;
  float* parts = p.parts > 1 ? reinterpret_cast<float*>(base + p.threads * p.share_bytes) : nullptr;
  if (p.folded) {
    // The copies read the folded input, as the forward's kernels do; each thread folds
    // whole rows.
    uint16_t* folded = reinterpret_cast<uint16_t*>(base + p.scratch_bytes - p.fold_bytes);
    const int64_t rows = p.desc.n * p.inner.h;
    run(p.threads, [&](int tid, int nt) {
      bf16_fold_columns(p.desc, x, folded, rows * tid / nt, rows * (tid + 1) / nt);
    });
    x = folded;
  }
  run(p.threads, [&](int tid, int) {
    if (tid < 0 || tid >= p.threads) return;
    const Bf16UpdShare& sh = p.shares[tid];
    if (sh.n0 >= sh.n1) return;
    // dy of every output block first; then, input block by input block, x transposed
    // (every image) just before the calls that read it, while it is in cache.
    const int64_t nkb = sh.kb1 - sh.kb0, imgs = sh.n1 - sh.n0;
    const int64_t xt_img = p.xt_block_bytes(), dy_img = nkb * p.dy_block_bytes();
    uint8_t* xt = base + tid * p.share_bytes;
    uint8_t* dyv = xt + imgs * xt_img;
    float* blocks = reinterpret_cast<float*>(dyv + imgs * dy_img);
    for (int64_t n = sh.n0; n < sh.n1; ++n)
      for (int64_t kbi = sh.kb0; kbi < sh.kb1; ++kbi)
        copy_dy(p, dy, n, kbi,
                reinterpret_cast<uint16_t*>(dyv + (n - sh.n0) * dy_img + (kbi - sh.kb0) * p.dy_block_bytes()));
    void* out = parts ? static_cast<void*>(parts + sh.part * part_elems) : dw;
    const DataType out_dt = parts ? DataType::f32 : p.dw_dt;
    tiles(true);
    AmxUpdCallArgs a{};
    a.n_imgs = imgs;
    a.src_row_stride = p.row_len * 2;
    a.src_img_stride = xt_img;
    a.ddst_img_stride = dy_img;
    for (int64_t cbi = sh.cb0; cbi < sh.cb1; ++cbi) {
      for (int64_t n = sh.n0; n < sh.n1; ++n)
        copy_xt(p, x, n, cbi, reinterpret_cast<uint16_t*>(xt + (n - sh.n0) * xt_img));
      for (int64_t kbi = sh.kb0; kbi < sh.kb1; ++kbi) {
        const int n_a = p.inner.c - cbi * kAmxBlock <= 16 ? 1 : 2, n_b = p.inner.k - kbi * kAmxBlock <= 16 ? 1 : 2;
        const int kernel = p.kernel_of[n_a - 1][n_b - 1];
        for (int64_t seg0 = 0; seg0 < p.chunks; seg0 += p.seg_chunks) {
          a.n_chunks = std::min(p.seg_chunks, p.chunks - seg0);
          a.accumulate = seg0 > 0;
          a.ddst = reinterpret_cast<const uint16_t*>(dyv + (kbi - sh.kb0) * p.dy_block_bytes() + seg0 * kChunkBytes);
          for (size_t t = 0; t < p.taps.size(); ++t) {
            const Bf16UpdTap& tap = p.taps[t];
            a.src = reinterpret_cast<const uint16_t*>(
                xt + (tap.phase * kAmxBlock * p.row_len + tap.shift + seg0 * kChunkPixels) * 2);
            a.dw = blocks + t * 1024;
            call(kernel, &a);
          }
        }
        write_blocks(p, kbi, cbi, blocks, out, out_dt);
      }
    }
    tiles(false);
    _mm_sfence();  // the streamed stores are seen by whoever reads dW next
  });
  if (parts) run(p.threads, [&](int tid, int nt) { reduce_parts(p, parts, dw, tid, nt); });
}

}  // namespace

void bf16_upd_run(const Bf16UpdPrimitive& prim, const uint16_t* x, const uint16_t* dy, void* dw, void* scratch,
                  const RunShares& run) {
  run_all(
      prim.plan, x, dy, dw, scratch, run, copy_xt_avx512, copy_dy_avx512, write_blocks_avx512,
      [&](int k, const AmxUpdCallArgs* a) { prim.fns[k](a); },
      [&](bool begin) {
        if (prim.tile_config) begin ? prim.tile_config() : prim.tile_release();  // no tiles at avx512_bf16
      });
}

void bf16_upd_run_reference(const Bf16UpdPlan& plan, const uint16_t* x, const uint16_t* dy, void* dw, void* scratch,
                            const RunShares& run) {
  run_all(
      plan, x, dy, dw, scratch, run, copy_xt_scalar, copy_dy_scalar, write_blocks_scalar,
      [&](int k, const AmxUpdCallArgs* a) {
        if (plan.level == Isa::amx) amx_upd_kernel_ref(plan.kernels[k], a);
        else avx512bf16_upd_kernel_ref(plan.dot_kernels[k], a);
      },
      [](bool) {});
}

}  // namespace dc
