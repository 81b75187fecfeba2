// Plans are pure functions: check their decisions without generating any code.
#include <set>
#include <vector>

#include "check.h"
#include "conv/fwd_plan.h"

using namespace dc;

namespace {

// Every output element of every block is finished by exactly one last-chunk call.
void check_coverage(const ConvDesc& d, Isa isa, int threads) {
  FwdPlan plan = make_fwd_plan(d, isa, threads);
  const int V = plan.v();
  const int64_t P = d.p(), Q = d.q();
  std::vector<int> done(static_cast<size_t>(d.n * plan.kb * P * Q), 0);
  for (const auto& stream : plan.streams)
    for (const FwdCall& c : stream) {
      const FwdKernelSpec& sp = plan.kernels[c.kernel];
      CHECK(fwd_vector_registers(sp) <= isa_vector_registers(isa), "%s", sp.name().c_str());
      if (!(c.flags & kLastChunk)) continue;
      const int64_t base = c.dst_off / V;  // pixel index in (n, kb, p, q)
      for (int row = 0; row < sp.oh; ++row)
        for (int oc = 0; oc < sp.n_oc; ++oc)
          for (int px = 0; px < sp.ow; ++px) {
            int64_t idx = base + row * Q + oc * P * Q + px;
            CHECK(idx >= 0 && idx < static_cast<int64_t>(done.size()), "%s", d.to_string().c_str());
            if (idx >= 0 && idx < static_cast<int64_t>(done.size())) ++done[idx];
          }
    }
  int bad = 0;
  for (int v : done) bad += v != 1;
  for (size_t t = 0; t < plan.streams.size(); ++t) {
    const auto& starts = plan.unit_starts[t];
    CHECK(!starts.empty() && starts.back() == static_cast<int32_t>(plan.streams[t].size()), "unit starts end the stream");
    for (size_t i = 1; i < starts.size(); ++i) CHECK(starts[i - 1] <= starts[i], "unit starts are ordered");
  }
  CHECK(bad == 0, "%s threads=%d: %d output pixels not written exactly once", d.to_string().c_str(), threads, bad);
}

}  // namespace

int main() {
  const char* shapes[] = {
      "mb1ic3ih224oc64kh7sh2ph3",   "mb1ic64ih56oc64kh3ph1",  "mb2ic256ih56oc512kh1sh2",
      "mb1ic512ih7oc512kh3ph1",     "mb1ic2048ih7oc512kh1",   "mb3ic17ih9iw11oc33kh3kw5sh2sw1ph2pw1",
      "mb1ic5ih20oc7kh3dh1ph2",     "mb2ic16ih5oc1000kh1",    "mb1ic8ih12oc8kh11ph5",
      "mb1ic32ih7iw30oc48kh1kw7pw3", "mb1ic4ih6oc4kh3ph4",
  };
  for (Isa isa : {Isa::avx512, Isa::avx2})
    for (const char* s : shapes)
      for (int threads : {1, 2, 3}) check_coverage(parse_conv_desc(s), isa, threads);

  // The register-blocked tiles the design calls for on the ResNet-50 shapes.
  FwdPlan p = make_fwd_plan(parse_conv_desc("mb1ic64ih56oc64kh3ph1"), Isa::avx512, 1);
  CHECK(p.tile_oh * p.tile_ow * p.n_oc >= 24, "res2_3x3 tile %s", p.to_string().c_str());
  CHECK(p.n_oc >= 2, "res2_3x3 should share each broadcast: %s", p.to_string().c_str());
  p = make_fwd_plan(parse_conv_desc("mb1ic512ih7oc512kh3ph1"), Isa::avx512, 1);
  CHECK(p.tile_oh * p.tile_ow * p.n_oc >= 20, "res5_3x3 tile %s", p.to_string().c_str());

  // Problem strings round-trip.
  ConvDesc d = parse_conv_desc("mb3ic17ih9iw11oc33kh3kw5sh2sw1ph2pw1");
  CHECK(parse_conv_desc(d.to_string()).to_string() == d.to_string(), "%s", d.to_string().c_str());
  // Groups as benchdnn counts them: ic and oc over every group, c and k one group's.
  ConvDesc g = parse_conv_desc("g4mb2ic64ih14oc32kh3ph1");
  CHECK(g.groups == 4 && g.c == 16 && g.k == 8, "g4: groups %lld c %lld k %lld", static_cast<long long>(g.groups),
        static_cast<long long>(g.c), static_cast<long long>(g.k));
  CHECK(g.to_string() == "g4mb2ic64ih14oc32oh14kh3sh1ph1", "%s", g.to_string().c_str());
  g.groups = 0;
  CHECK(!g.validate().empty(), "groups 0 passed validate()");
  // The element type sets the byte strides and the kernels' names.
  const ConvDesc f = parse_conv_desc("mb1ic64ih56oc64kh3ph1");
  CHECK(f.dt == DataType::f32 && f.elem_bytes() == 4, "default element type");
  const FwdPlan fp = make_fwd_plan(f, Isa::avx512, 1);
  CHECK(fp.strides.src_cb_stride == fp.src.cb * f.elem_bytes() && fp.kernels[0].name().rfind("f32_conv_fwd_", 0) == 0,
        "strides or name of %s", fp.kernels[0].name().c_str());
  CHECK(d.q() == (11 + 2 - 5) / 1 + 1, "q=%lld", static_cast<long long>(d.q()));
  CHECK(!parse_conv_desc("mb1ic3ih2oc4kh5").validate().empty(), "a kernel larger than the input must be rejected");
  TEST_MAIN_END("test_fwd_plan");
}
