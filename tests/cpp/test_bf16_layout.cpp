// The bf16 layouts (conv/bf16_layout.h) against an element-by-element definition: NCHW,
// channels_last and strided sources, channel and pixel tails, several thread shares; and the
// typed, strided weight packing (conv/bf16_fwd.h) against the fp32 contiguous one; fp32 sources
// rounded into the rows (f32_to_rows32) against their scalar twin.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "check.h"
#include "conv/bf16_fwd.h"
#include "conv/bf16_layout.h"
#include "jit/isa.h"

using namespace dc;
using dc_test::uni;

namespace {

// Strides (in elements) of an (n, c, h, w) tensor: NCHW, channels_last, or every pixel
// spread 2 apart (a strided view).
std::vector<int64_t> strides_of(int kind, int64_t c, int64_t h, int64_t w) {
  if (kind == 0) return {c * h * w, h * w, w, 1};
  if (kind == 1) return {h * w * c, 1, w * c, c};
  return {c * h * w * 2, h * w * 2, w * 2, 2};
}

void check_layouts(int64_t n, int64_t c, int64_t h, int64_t w, int kind, int threads) {
  const auto st = strides_of(kind, c, h, w);
  const int64_t cb = (c + 31) / 32, span = n * st[0];
  std::vector<uint16_t> src(span + 1), rows(n * cb * h * w * 32, 0xffff), back(span + 1, 0);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint16_t>(uni(1, 60000));
  for (int t = 0; t < threads; ++t) bf16_to_rows32(src.data(), st.data(), n, c, h, w, rows.data(), t, threads);
  int bad = 0;
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < cb * 32; ++ci)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) {
          const uint16_t want = ci < c ? src[ni * st[0] + ci * st[1] + y * st[2] + x * st[3]] : 0;
          bad += rows[(((ni * cb + ci / 32) * h + y) * w + x) * 32 + ci % 32] != want;
        }
  CHECK(bad == 0, "to_rows32 n%lld c%lld h%lld w%lld kind %d threads %d: %d wrong", (long long)n, (long long)c,
        (long long)h, (long long)w, kind, threads, bad);
  for (int t = 0; t < threads; ++t) rows32_to_bf16(rows.data(), n, c, h, w, back.data(), st.data(), t, threads);
  bad = 0;
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) {
          const int64_t at = ni * st[0] + ci * st[1] + y * st[2] + x * st[3];
          bad += back[at] != src[at];
        }
  CHECK(bad == 0, "rows32_to_bf16 n%lld c%lld h%lld w%lld kind %d: %d wrong", (long long)n, (long long)c,
        (long long)h, (long long)w, kind, bad);
}

// fp32 sources into rows of 32 (f32_to_rows32) against its scalar twin bf16_from_float_as_torch
// element by element, with NaNs, denormals, ties and infinities among the values, for both NaN
// patterns.
void check_f32_rows(int64_t n, int64_t c, int64_t h, int64_t w, int kind, int threads, uint16_t nan) {
  static const uint32_t special[] = {0x7f800001u, 0xffbfffffu, 0x7fc00000u, 0x00000001u, 0x807fffffu, 0x00018000u,
                                     0x7f7fffffu, 0x7f800000u, 0xff800000u, 0x3f808000u, 0x3f818000u, 0x80000000u};
  const auto st = strides_of(kind, c, h, w);
  const int64_t cb = (c + 31) / 32, span = n * st[0];
  std::vector<float> src(span + 1);
  for (size_t i = 0; i < src.size(); ++i) {
    uint32_t bits = static_cast<uint32_t>(uni(0, 0x7fffffff)) * 2 + static_cast<uint32_t>(uni(0, 1));
    if (uni(0, 9) == 0) bits = special[uni(0, 11)];
    std::memcpy(&src[i], &bits, 4);
  }
  std::vector<uint16_t> rows(n * cb * h * w * 32, 0x1234);
  for (int t = 0; t < threads; ++t) f32_to_rows32(src.data(), st.data(), n, c, h, w, nan, rows.data(), t, threads);
  int bad = 0;
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < cb * 32; ++ci)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) {
          const uint16_t want =
              ci < c ? bf16_from_float_as_torch(src[ni * st[0] + ci * st[1] + y * st[2] + x * st[3]], nan) : 0;
          bad += rows[(((ni * cb + ci / 32) * h + y) * w + x) * 32 + ci % 32] != want;
        }
  CHECK(bad == 0, "f32_to_rows32 n%lld c%lld h%lld w%lld kind %d threads %d nan %x: %d wrong", (long long)n,
        (long long)c, (long long)h, (long long)w, kind, threads, nan, bad);
}

void check_packing(int64_t k, int64_t c, int64_t r, int64_t s) {
  ConvDesc d;
  d.k = k;
  d.c = c;
  d.r = r;
  d.s = s;
  d.dt = DataType::bf16;
  std::vector<float> w(k * c * r * s);
  for (float& v : w) v = static_cast<float>(uni(-1000, 1000)) / 64.f;  // exact in bf16
  const int64_t elems = bf16_fwd_weight_elems(d);
  std::vector<uint16_t> want(elems), got(elems, 0xffff), wh(k * c * r * s * 2);
  pack_bf16_fwd_weights(d, w.data(), want.data());
  // The same weights as bf16, in a (K, C, R, S) view of a tensor laid out (R, S, C, K), every
  // element 2 apart.
  const int64_t st[4] = {2, 2 * k, 2 * k * c * s, 2 * k * c};
  for (int64_t ki = 0; ki < k; ++ki)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t ri = 0; ri < r; ++ri)
        for (int64_t si = 0; si < s; ++si)
          wh[ki * st[0] + ci * st[1] + ri * st[2] + si * st[3]] = bf16_from_float(w[((ki * c + ci) * r + ri) * s + si]);
  for (int t = 0; t < 3; ++t) pack_bf16_fwd_weights(d, wh.data(), DataType::bf16, st, got.data(), t, 3);
  CHECK(got == want, "bf16 strided packing of k%lld c%lld r%lld s%lld differs from the fp32 one", (long long)k,
        (long long)c, (long long)r, (long long)s);
}

}  // namespace

int main() {
  dc_test::rng().seed(20261202);
  // The transposes use AVX-512BW, which every CPU of the amx level has.
  if (detected_isa() < Isa::amx) {
    std::printf("skipping test_bf16_layout: the bf16 layouts run at the amx level (detected %s)\n",
                isa_name(detected_isa()));
    return 0;
  }
  const int64_t cs[] = {1, 3, 4, 5, 31, 32, 33, 64, 70};
  const int64_t ws[] = {1, 7, 16, 17, 31, 32, 33, 65};
  for (int64_t c : cs)
    for (int64_t w : ws)
      for (int kind = 0; kind < 3; ++kind) {
        check_layouts(uni(1, 2), c, uni(1, 3), w, kind, uni(1, 3));
        for (const uint16_t nan : {uint16_t{0xffff}, uint16_t{0x7fc0}})
          check_f32_rows(uni(1, 2), c, uni(1, 3), w, kind, uni(1, 3), nan);
      }
  check_packing(64, 3, 7, 7);  // folded columns
  check_packing(17, 40, 3, 3);
  check_packing(48, 64, 1, 1);
  check_packing(1, 1, 1, 1);
  TEST_MAIN_END("test_bf16_layout");
}
