#include "conv/reference.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace dc {

namespace {
const float* at(const float* base, int64_t bytes) {
  return reinterpret_cast<const float*>(reinterpret_cast<intptr_t>(base) + bytes);
}
}  // namespace

void fwd_kernel_ref(const FwdKernelSpec& sp, const FwdCallArgs* a) {
  const int V = sp.v();
  for (int row = 0; row < sp.oh; ++row)
    for (int oc = 0; oc < sp.n_oc; ++oc)
      for (int px = 0; px < sp.ow; ++px) {
        float* out =
            const_cast<float*>(at(a->dst, row * a->dst_row_stride + oc * a->dst_kb_stride + px * sp.dst_px_step()));
        const int lanes = sp.last_oc_lanes && oc == sp.n_oc - 1 ? sp.last_oc_lanes : V;
        const float* res =
            sp.post.add ? at(a->residual, row * a->dst_row_stride + oc * a->dst_kb_stride + px * sp.dst_px_step())
                        : nullptr;
        for (int k = 0; k < lanes; ++k) {
          float acc = (a->flags & kAccumulate) ? out[k] : 0.f;
          for (int64_t cb = 0; cb < a->n_cb; ++cb)
            for (int64_t r = 0; r < a->n_r; ++r)
              for (int col = 0; col < sp.s; ++col) {
                if (!sp.tap_valid(px, col)) continue;
                const float* in = at(a->src, cb * a->src_cb_stride + r * a->src_r_stride + row * a->src_row_stride) +
                                  (px * sp.stride_w + col * sp.dil_w) * V;
                const float* w =
                    at(a->wei, cb * a->wei_cb_stride + oc * a->wei_kb_stride) + ((r * sp.s + col) * V) * V;
                for (int c = 0; c < sp.c_valid; ++c) acc = std::fma(in[c], at(w, c * sp.wei_c_bytes())[k], acc);
              }
          if (sp.post.bias) acc += a->bias[oc * V + k];
          if (sp.post.add) acc += res[k];
          if (sp.post.relu) acc = std::max(acc, 0.f);
          out[k] = acc;
        }
      }
  if (!sp.post.stats) return;
  // The sums of what was stored, in the kernel's order (tile rows, then pixels).
  for (int oc = 0; oc < sp.n_oc; ++oc)
    for (int k = 0; k < V; ++k) {
      float sum = 0.f, squares = 0.f;
      for (int row = 0; row < sp.oh; ++row)
        for (int px = 0; px < sp.ow; ++px) {
          const float y = at(a->dst, row * a->dst_row_stride + oc * a->dst_kb_stride + px * sp.dst_px_step())[k];
          const float d = y - a->stats_shift[oc * V + k];
          if (row == 0 && px == 0) {
            sum = d;
            squares = d * d;
          } else {
            squares = std::fma(d, d, squares);
            sum += d;
          }
        }
      a->stats[2 * oc * V + k] = sum;
      a->stats[(2 * oc + 1) * V + k] = squares;
    }
}

void conv_fwd_ref_blocked(const ConvDesc& d, int V, const FwdPostOps& post, const float* src, const float* wei,
                          const float* bias, const float* residual, float* dst) {
  const int64_t cb = div_up(d.c, V), kb = div_up(d.k, V), P = d.p(), Q = d.q();
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < kb * V; ++k)
      for (int64_t oh = 0; oh < P; ++oh)
        for (int64_t ow = 0; ow < Q; ++ow) {
          double acc = post.bias ? bias[k] : 0.0;
          const int64_t at_out = (((n * kb + k / V) * P + oh) * Q + ow) * V + k % V;
          for (int64_t c = 0; c < d.c; ++c)
            for (int64_t r = 0; r < d.r; ++r)
              for (int64_t s = 0; s < d.s; ++s) {
                int64_t ih = oh * d.stride_h - d.pad_t + r * d.dil_h, iw = ow * d.stride_w - d.pad_l + s * d.dil_w;
                if (ih < 0 || ih >= d.h || iw < 0 || iw >= d.w) continue;
                double x = src[(((n * cb + c / V) * d.h + ih) * d.w + iw) * V + c % V];
                double w = wei[((((k / V) * cb + c / V) * d.r + r) * d.s + s) * V * V + (c % V) * V + k % V];
                acc += x * w;
              }
          if (post.add) acc += residual[at_out];
          if (post.relu) acc = std::max(acc, 0.0);
          dst[at_out] = static_cast<float>(acc);
        }
}

void dw_kernel_ref(const DwKernelSpec& sp, const DwCallArgs* a) {
  const int V = sp.v();
  for (int px = 0; px < sp.ow; ++px)
    for (int k = 0; k < V; ++k) {
      float acc = a->bias ? a->bias[k] : 0.f;
      for (int64_t r = 0; r < a->n_r; ++r)
        for (int col = 0; col < sp.s; ++col) {
          if (!sp.tap_valid(px, col)) continue;
          const float* in = at(a->src, r * a->src_r_stride) + (px * sp.stride_w + col * sp.dil_w) * V;
          acc = std::fma(a->wei[(r * sp.s + col) * V + k], in[k], acc);
        }
      if (a->flags & kRelu) acc = std::max(acc, 0.f);
      a->dst[px * V + k] = acc;
    }
}

void dwconv_ref_blocked(const ConvDesc& d, int V, const float* src, const float* wei, const float* bias, float* dst,
                        bool relu) {
  const int64_t cb = div_up(d.c, V), P = d.p(), Q = d.q();
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t c = 0; c < cb * V; ++c)
      for (int64_t oh = 0; oh < P; ++oh)
        for (int64_t ow = 0; ow < Q; ++ow) {
          double acc = bias ? bias[c] : 0.0;
          for (int64_t r = 0; r < d.r; ++r)
            for (int64_t s = 0; s < d.s; ++s) {
              int64_t ih = oh * d.stride_h - d.pad_t + r * d.dil_h, iw = ow * d.stride_w - d.pad_l + s * d.dil_w;
              if (ih < 0 || ih >= d.h || iw < 0 || iw >= d.w) continue;
              acc += static_cast<double>(src[(((n * cb + c / V) * d.h + ih) * d.w + iw) * V + c % V]) *
                     wei[(((c / V) * d.r + r) * d.s + s) * V + c % V];
            }
          if (relu) acc = std::max(acc, 0.0);
          dst[(((n * cb + c / V) * P + oh) * Q + ow) * V + c % V] = static_cast<float>(acc);
        }
}

void upd_kernel_ref(const UpdKernelSpec& sp, const UpdCallArgs* a) {
  const int V = sp.v();
  for (int c = 0; c < sp.n_c; ++c)
    for (int kb = 0; kb < sp.n_kb; ++kb)
      for (int k = 0; k < V; ++k) {
        float* out = const_cast<float*>(at(a->dw, kb * a->dw_kb_stride)) + c * V + k;
        float acc = (a->flags & kAccumulate) ? *out : 0.f;
        for (int64_t img = 0; img < (a->n_rows ? a->n_imgs : 0); ++img)
          for (int64_t row = 0; row < a->n_rows; ++row)
            for (int64_t px = 0; px < a->n_px; ++px) {
              const float x = at(a->x, img * a->x_img_stride + row * a->x_row_stride + px * a->x_px_stride)[c];
              const float g =
                  at(a->dy, img * a->dy_img_stride + row * a->dy_row_stride + kb * a->dy_kb_stride)[px * V + k];
              acc = std::fma(g, x, acc);
            }
        *out = acc;
      }
}

void conv_upd_ref_blocked(const ConvDesc& d, int V, const float* x, const float* dy, float* dw) {
  const int64_t cb = div_up(d.c, V), kb = div_up(d.k, V), P = d.p(), Q = d.q();
  for (int64_t k = 0; k < kb * V; ++k)
    for (int64_t c = 0; c < cb * V; ++c)
      for (int64_t r = 0; r < d.r; ++r)
        for (int64_t s = 0; s < d.s; ++s) {
          double acc = 0;
          if (c < d.c)
            for (int64_t n = 0; n < d.n; ++n)
              for (int64_t oh = 0; oh < P; ++oh)
                for (int64_t ow = 0; ow < Q; ++ow) {
                  int64_t ih = oh * d.stride_h - d.pad_t + r * d.dil_h, iw = ow * d.stride_w - d.pad_l + s * d.dil_w;
                  if (ih < 0 || ih >= d.h || iw < 0 || iw >= d.w) continue;
                  acc += static_cast<double>(x[(((n * cb + c / V) * d.h + ih) * d.w + iw) * V + c % V]) *
                         dy[(((n * kb + k / V) * P + oh) * Q + ow) * V + k % V];
                }
          dw[((((k / V) * cb + c / V) * d.r + r) * d.s + s) * V * V + (c % V) * V + k % V] = static_cast<float>(acc);
        }
}

namespace {
float bf16_operand(uint16_t b) { return (b & 0x7f80u) == 0 ? 0.f : float_from_bf16(b); }
}  // namespace

void amx_fwd_kernel_ref(const AmxFwdKernelSpec& sp, const AmxFwdCallArgs* a) {
  constexpr int kTapBytes = 2048, kRowBytes = 64;
  float sum[2][2][kAmxBlock] = {}, squares[2][2][kAmxBlock] = {};  // [tile][row parity]: the kernel's chains
  for (int t = 0; t < sp.n_a; ++t) {
    float acc[kAmxMaxRows][kAmxBlock] = {};
    const uint8_t* wei = reinterpret_cast<const uint8_t*>(a->wei);
    for (int64_t cb = 0; cb < a->n_cb; ++cb)
      for (int64_t r = 0; r < a->n_r; ++r)
        for (int col = 0; col < sp.s; ++col, wei += kTapBytes) {
          const uint8_t* tap = reinterpret_cast<const uint8_t*>(a->src[t]) + cb * a->src_cb_stride +
                               r * a->src_r_stride + static_cast<int64_t>(col) * sp.dil_w * kRowBytes;
          const uint16_t* w = reinterpret_cast<const uint16_t*>(wei);
          for (int i = 0; i < sp.m; ++i) {
            const uint16_t* x = reinterpret_cast<const uint16_t*>(tap + i * a->src_px_stride);
            for (int b = 0; b < sp.n_b; ++b)
              for (int n = 0; n < 16; ++n)
                for (int pair = 0; pair < 16; ++pair)
                  for (int e = 0; e < 2; ++e)
                    acc[i][b * 16 + n] +=
                        bf16_operand(x[2 * pair + e]) * bf16_operand(w[b * 512 + pair * 32 + n * 2 + e]);
          }
        }
    uint8_t* dst = static_cast<uint8_t*>(a->dst[t]);
    const uint8_t* res = static_cast<const uint8_t*>(a->res[t]);
    for (int i = 0; i < sp.m; ++i) {
      if (!((a->rows[t] >> i) & 1)) continue;
      for (int lane = 0; lane < kAmxBlock; ++lane) {
        float y = 0;
        if (lane < sp.n_b * 16) {
          y = acc[i][lane];
          if (sp.post.bias) y += a->bias[lane];
          if (sp.post.add)
            y += sp.out_dt == DataType::bf16 ? float_from_bf16(reinterpret_cast<const uint16_t*>(res)[lane])
                                             : reinterpret_cast<const float*>(res)[lane];
          if (sp.post.relu) y = 0.f > y ? 0.f : y;  // as vmaxps(0, y): NaN and -0 pass
        }
        if (sp.out_dt == DataType::bf16) {
          reinterpret_cast<uint16_t*>(dst)[lane] = bf16_from_float(y);
          y = float_from_bf16(bf16_from_float(y));  // the stats' y: the value stored
        } else {
          reinterpret_cast<float*>(dst)[lane] = y;
        }
        if (sp.post.stats && lane < sp.n_b * 16) {
          const float dv = y - a->stats_shift[lane];
          sum[t][i % 2][lane] += dv;
          squares[t][i % 2][lane] = std::fma(dv, dv, squares[t][i % 2][lane]);
        }
      }
      dst += a->dst_px_stride;
      if (sp.post.add) res += a->dst_px_stride;
    }
  }
  if (!sp.post.stats) return;
  for (int lane = 0; lane < kAmxBlock; ++lane) {
    auto chains = [&](float (*acc)[2][kAmxBlock]) {
      const float tile0 = acc[0][0][lane] + acc[0][1][lane];
      return sp.n_a == 2 ? tile0 + (acc[1][0][lane] + acc[1][1][lane]) : tile0;
    };
    a->stats[lane] = chains(sum);
    a->stats[kAmxBlock + lane] = chains(squares);
  }
}

namespace {
// One vdpbf16ps step of a lane: acc + x w, rounded once (a fused multiply-add), a denormal
// sum flushed to zero of its sign.
float dot_add(float acc, float x, float w) {
  const float y = std::fma(x, w, acc);
  return std::fabs(y) < std::numeric_limits<float>::min() ? std::copysign(0.f, y) : y;
}
}  // namespace

void avx512bf16_fwd_kernel_ref(const Avx512Bf16FwdKernelSpec& sp, const AmxFwdCallArgs* a) {
  constexpr int kTapBytes = 2048, kPixelBytes = 64;
  for (int t = 0; t < sp.n_a; ++t) {
    std::vector<float> acc(static_cast<size_t>(sp.m) * kAmxBlock, 0.f);
    const uint8_t* wei = reinterpret_cast<const uint8_t*>(a->wei);
    for (int64_t cb = 0; cb < a->n_cb; ++cb)
      for (int64_t r = 0; r < a->n_r; ++r)
        for (int col = 0; col < sp.s; ++col, wei += kTapBytes) {
          const uint8_t* tap = reinterpret_cast<const uint8_t*>(a->src[t]) + cb * a->src_cb_stride +
                               r * a->src_r_stride + static_cast<int64_t>(col) * sp.dil_w * kPixelBytes;
          const uint16_t* w = reinterpret_cast<const uint16_t*>(wei);
          for (int pair = 0; pair < sp.pairs; ++pair)
            for (int i = 0; i < sp.m; ++i) {
              const uint16_t* x = reinterpret_cast<const uint16_t*>(tap + static_cast<int64_t>(i) * sp.px * kPixelBytes);
              for (int b = 0; b < sp.n_b; ++b)
                for (int n = 0; n < 16; ++n) {
                  float& y = acc[i * kAmxBlock + b * 16 + n];
                  const uint16_t* wn = w + b * 512 + pair * 32 + n * 2;
                  y = dot_add(y, bf16_operand(x[2 * pair + 1]), bf16_operand(wn[1]));
                  y = dot_add(y, bf16_operand(x[2 * pair]), bf16_operand(wn[0]));
                }
            }
        }
    uint8_t* dst = static_cast<uint8_t*>(a->dst[t]);
    const uint8_t* res = static_cast<const uint8_t*>(a->res[t]);
    for (int i = 0; i < sp.m; ++i) {
      if (!((a->rows[t] >> i) & 1)) continue;
      for (int lane = 0; lane < kAmxBlock; ++lane) {
        float y = 0;
        if (lane < sp.n_b * 16) {
          y = acc[i * kAmxBlock + lane];
          if (sp.post.bias) y += a->bias[lane];
          if (sp.post.add)
            y += sp.out_dt == DataType::bf16 ? float_from_bf16(reinterpret_cast<const uint16_t*>(res)[lane])
                                             : reinterpret_cast<const float*>(res)[lane];
          if (sp.post.relu) y = 0.f > y ? 0.f : y;  // as vmaxps(0, y): NaN and -0 pass
        }
        if (sp.out_dt == DataType::bf16) reinterpret_cast<uint16_t*>(dst)[lane] = bf16_from_float(y);
        else reinterpret_cast<float*>(dst)[lane] = y;
      }
      dst += a->dst_px_stride;
      if (sp.post.add) res += a->dst_px_stride;
    }
  }
}

void amx_upd_kernel_ref(const AmxUpdKernelSpec& sp, const AmxUpdCallArgs* a) {
  constexpr int kChunkBytes = 2048, kRowBytes = 64;
  for (int ta = 0; ta < sp.n_a; ++ta)
    for (int tb = 0; tb < sp.n_b; ++tb)
      for (int ci = 0; ci < 16; ++ci)
        for (int ki = 0; ki < 16; ++ki) {
          float& out = a->dw[(ta * 16 + ci) * kAmxBlock + tb * 16 + ki];
          float acc = a->accumulate ? out : 0.f;
          for (int64_t img = 0; img < a->n_imgs; ++img) {
            const uint8_t* src = reinterpret_cast<const uint8_t*>(a->src) + img * a->src_img_stride +
                                 (ta * 16 + ci) * a->src_row_stride;
            const uint8_t* ddst = reinterpret_cast<const uint8_t*>(a->ddst) + img * a->ddst_img_stride;
            for (int64_t ch = 0; ch < a->n_chunks; ++ch) {
              const uint16_t* x = reinterpret_cast<const uint16_t*>(src + ch * kRowBytes);
              const uint16_t* dy = reinterpret_cast<const uint16_t*>(ddst + ch * kChunkBytes + tb * 1024);
              for (int pair = 0; pair < 16; ++pair)
                for (int e = 0; e < 2; ++e)
                  acc += bf16_operand(x[2 * pair + e]) * bf16_operand(dy[pair * 32 + ki * 2 + e]);
            }
          }
          out = acc;
        }
}

void avx512bf16_upd_kernel_ref(const Avx512Bf16UpdKernelSpec& sp, const AmxUpdCallArgs* a) {
  constexpr int kChunkBytes = 2048, kRowBytes = 64;
  for (int c = 0; c < 16 * sp.n_a; ++c)
    for (int k = 0; k < 16 * sp.n_b; ++k) {
      float& out = a->dw[c * kAmxBlock + k];
      float acc = a->accumulate ? out : 0.f;
      for (int64_t img = 0; img < a->n_imgs; ++img) {
        const uint8_t* src =
            reinterpret_cast<const uint8_t*>(a->src) + img * a->src_img_stride + c * a->src_row_stride;
        const uint8_t* ddst = reinterpret_cast<const uint8_t*>(a->ddst) + img * a->ddst_img_stride;
        for (int64_t ch = 0; ch < a->n_chunks; ++ch) {
          const uint16_t* x = reinterpret_cast<const uint16_t*>(src + ch * kRowBytes);
          const uint16_t* dy = reinterpret_cast<const uint16_t*>(ddst + ch * kChunkBytes + (k / 16) * 1024);
          for (int pair = 0; pair < 16; ++pair) {
            const uint16_t* d = dy + pair * 32 + (k % 16) * 2;
            acc = dot_add(acc, bf16_operand(x[2 * pair + 1]), bf16_operand(d[1]));
            acc = dot_add(acc, bf16_operand(x[2 * pair]), bf16_operand(d[0]));
          }
        }
      }
      out = acc;
    }
}

}  // namespace dc
