// The bf16 weight packers (conv/bf16_pack.h) against their scalar twins: the forward's
// layout (unfolded and folded) and the input gradient's phases, from fp32 and bf16 sources,
// contiguous and strided, values that round to even on ties, denormals, infinities and NaNs,
// full and tail blocks, several thread shares, each source against an inaccessible page
// before and after it.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "check.h"
#include "conv/bf16_bwd_data.h"
#include "conv/bf16_fwd.h"
#include "conv/bf16_pack.h"
#include "jit/isa.h"
#include "run_util.h"

using namespace dc;
using dc_test::uni;

namespace {

// fp32 bits of every kind that rounding treats apart.
uint32_t awkward_bits() {
  const uint32_t sign = uni(0, 1) ? 0x80000000u : 0;
  switch (uni(0, 9)) {
    case 0: return sign | static_cast<uint32_t>(uni(1, 0x7fffff));                          // denormal
    case 1: return sign | 0x7f800000u;                                                       // infinity
    case 2: return sign | 0x7f800000u | static_cast<uint32_t>(uni(1, 0x7fffff));             // NaN
    case 3: return sign | (static_cast<uint32_t>(uni(100, 150)) << 23) | (uni(0, 127) << 16) | 0x8000u;  // tie
    case 4: return sign | 0x7f7fffffu;                                                       // rounds to infinity
    default: return sign | (static_cast<uint32_t>(uni(100, 150)) << 23) | static_cast<uint32_t>(uni(0, 0x7fffff));
  }
}

// A (K, C, R, S) source of type dt with strides `kind`: 0 contiguous, 1 (R, S, C, K) order,
// 2 contiguous with each image of K rows 5 elements apart (a sliced view).
struct Source {
  std::vector<uint8_t> bytes;
  Bf16PackSource src;
};
Source make_source(int64_t k, int64_t c, int64_t r, int64_t s, DataType dt, int kind) {
  Source out;
  Bf16PackSource& p = out.src;
  p.dt = dt, p.k = k, p.c = c, p.r = r, p.s = s;
  const int64_t rs = r * s, row = kind == 2 ? c * rs + 5 : c * rs;
  if (kind == 1) p.st[0] = 1, p.st[1] = k, p.st[2] = k * c * s, p.st[3] = k * c;
  else p.st[0] = row, p.st[1] = rs, p.st[2] = s, p.st[3] = 1;
  const int64_t span = (kind == 2 ? k * row : k * c * rs);
  const int64_t esize = dt == DataType::bf16 ? 2 : 4;
  out.bytes.resize(span * esize);
  for (int64_t i = 0; i < span; ++i) {
    const uint32_t bits = awkward_bits();
    if (dt == DataType::bf16) {
      const uint16_t h = static_cast<uint16_t>(bits >> 16);
      std::memcpy(out.bytes.data() + i * 2, &h, 2);
    } else {
      std::memcpy(out.bytes.data() + i * 4, &bits, 4);
    }
  }
  return out;
}

ConvDesc desc_of(int64_t k, int64_t c, int64_t r, int64_t s, int64_t stride, int64_t pad, int64_t dil) {
  ConvDesc d;
  d.n = 1, d.c = c, d.k = k, d.r = r, d.s = s;
  d.h = d.w = 2 * ((r - 1) * dil + 1) + 3;
  d.stride_h = d.stride_w = stride;
  d.pad_t = d.pad_b = d.pad_l = d.pad_r = pad;
  d.dil_h = d.dil_w = dil;
  d.dt = DataType::bf16;
  return d;
}

void check_case(int64_t k, int64_t c, int64_t r, int64_t s, int64_t stride, int64_t pad, int64_t dil) {
  const ConvDesc d = desc_of(k, c, r, s, stride, pad, dil);
  for (DataType dt : {DataType::f32, DataType::bf16})
    for (int kind = 0; kind < 3; ++kind)
      for (bool at_end : {false, true}) {
        Source host = make_source(k, c, r, s, dt, kind);
        dc_test::GuardedArray<uint8_t> guarded(host.bytes, at_end);
        Bf16PackSource src = host.src;
        src.w = guarded.data();
        const int threads = uni(1, 3);
        for (bool folded : {false, true}) {
          if (folded && !bf16_fwd_folds_columns(d)) continue;
          const int64_t elems = folded ? bf16_fwd_weight_elems(d) : div_up(k, 32) * div_up(c, 32) * r * s * 1024;
          std::vector<uint16_t> want(elems, 0x1234), got(elems, 0x4321);
          pack_bf16_fwd_scalar(src, folded, want.data(), 0, 1);
          for (int t = 0; t < threads; ++t) pack_bf16_fwd(src, folded, got.data(), t, threads);
          CHECK(got == want, "fwd packing k%lld c%lld r%lld s%lld %s kind %d folded %d: differs from the scalar one",
                (long long)k, (long long)c, (long long)r, (long long)s, dtype_name(dt), kind, folded);
        }
        const int64_t elems = bf16_bwd_data_weight_elems(d);
        std::vector<uint16_t> want(elems, 0x1234), got(elems, 0x4321);
        pack_bf16_bwd_data_scalar(d, src, want.data(), 0, 1);
        for (int t = 0; t < threads; ++t) pack_bf16_bwd_data(d, src, got.data(), t, threads);
        CHECK(got == want, "bwd_data packing %s %s kind %d: differs from the scalar one", d.to_string().c_str(),
              dtype_name(dt), kind);
      }
}

// The scalar twin rounds as bf16_from_float: one element, checked where it lands.
void check_rounding() {
  const float vals[] = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -2.5e-39f, 3.4e38f};
  for (float v : vals) {
    Source host = make_source(32, 32, 1, 1, DataType::f32, 0);
    std::memcpy(host.bytes.data(), &v, 4);  // (k 0, c 0)
    host.src.w = host.bytes.data();
    std::vector<uint16_t> simd(1024), ref(1024);
    pack_bf16_fwd(host.src, false, simd.data(), 0, 1);
    pack_bf16_fwd_scalar(host.src, false, ref.data(), 0, 1);
    CHECK(simd[0] == bf16_from_float(v) && ref[0] == bf16_from_float(v), "rounding of %g: %04x / %04x, want %04x",
          v, simd[0], ref[0], bf16_from_float(v));
  }
}

}  // namespace

int main() {
  dc_test::rng().seed(20261203);
  if (detected_isa() < Isa::avx512)
    std::printf("note: no AVX-512 here, so both sides run the scalar packer (detected %s)\n",
                isa_name(detected_isa()));
  check_rounding();
  check_case(64, 64, 3, 3, 1, 1, 1);
  check_case(64, 64, 3, 3, 2, 1, 1);   // four phases
  check_case(96, 32, 1, 1, 2, 0, 1);   // a projection: one phase of four
  check_case(40, 33, 3, 3, 1, 1, 1);   // tail blocks
  check_case(32, 64, 5, 5, 1, 2, 2);   // dilated, 25 taps: two chunks of 16
  check_case(64, 3, 7, 7, 2, 3, 1);    // conv1: folded in the forward
  check_case(32, 32, 1, 7, 1, 0, 1);
  check_case(17, 40, 2, 3, 3, 1, 1);
  TEST_MAIN_END("test_bf16_pack");
}
