// The pybind11 utilities of torch_directconv._C: ISA, caches, plans, the peaks. Never on
// the compute path, which is in torch.ops.directconv.
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "conv/bf16_bwd_primitives.h"
#include "conv/bf16_fwd.h"
#include "conv/block_pool.h"
#include "conv/dw_conv.h"
#include "conv/fwd_driver.h"
#include "conv/paths.h"
#include "conv/scratch.h"
#include "conv/upd_conv.h"
#include "dist/shm_allreduce.h"
#include "jit/isa.h"
#include "jit/kernel_cache.h"
#include "jit/peak_kernel.h"
#include "op_timers.h"
#include "ops.h"
#include "tensor_pool.h"
#include "program.h"
#include "tensors_key.h"
#include "threading.h"

namespace dc_torch {

// GFLOP/s of run(iterations) on each of `threads` threads at once, each iteration
// `flops_per_iter`; the loop grows until one run lasts `seconds`.
template <typename Run>
double time_peak(int64_t threads, double seconds, int64_t flops_per_iter, const Run& run) {
  const int nt = static_cast<int>(std::max<int64_t>(1, threads));
  int64_t iters = 1 << 12;
  for (;;) {
    auto t0 = std::chrono::steady_clock::now();
    run_shares(nt, [&](int, int) { run(iters); });
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt >= seconds) return static_cast<double>(iters) * flops_per_iter * nt / dt * 1e-9;
    iters *= 2;
  }
}

double fma_peak_gflops(int64_t threads, double seconds) {
  dc::Isa isa = jit_isa();
  auto k = dc::get_kernel(dc::make_peak_kernel(isa)->name(), [&] { return dc::make_peak_kernel(isa); }, "fma peak");
  auto fn = k->entry<dc::PeakKernelFn>();
  return time_peak(threads, seconds, dc::fma_peak_flops_per_iter(isa), [&](int64_t iters) { fn(iters); });
}

// The bf16 peaks run where the active level has their instructions; each thread's operands
// and accumulators are its own, on its stack (in its L1), 64-byte aligned: a tile row that
// straddles two cache lines loads at a third of the speed. The operands are bf16 1.0 and
// 2^-60, so the sums stay finite and normal however long the loop runs.
struct alignas(64) PeakBuffers {
  uint16_t in[std::max<int64_t>(dc::kDotPeakInElems, dc::kTilePeakInElems)];
  float out[std::max<int64_t>(dc::kDotPeakOutElems, dc::kTilePeakOutElems)];
};

double bf16_peak_gflops(const char* what, dc::Isa needs, const std::function<std::unique_ptr<dc::JitGenerator>()>& make,
                        int64_t in_elems, int64_t flops_per_iter, int64_t threads, double seconds) {
  const dc::Isa level = dc::active_isa();
  if (level < needs)
    throw pybind11::value_error(std::string(what) + ": needs the " + dc::isa_name(needs) + " level; the active level is " +
                                dc::isa_name(level));
  auto k = dc::get_kernel(make()->name(), make, what);
  auto fn = k->entry<dc::Bf16PeakKernelFn>();
  return time_peak(threads, seconds, flops_per_iter, [&](int64_t iters) {
    PeakBuffers buf;
    for (int64_t i = 0; i < in_elems; ++i) buf.in[i] = i < in_elems / 2 ? 0x3f80 : 0x2180;
    fn(iters, buf.in, buf.out);
  });
}

pybind11::dict jit_stats() {
  auto s = dc::kernel_cache_stats();
  pybind11::dict d;
  d["kernels"] = s.generated;
  d["cache_hits"] = s.hits;
  d["cache_entries"] = s.entries;
  d["cache_bytes"] = s.bytes;
  d["cache_cap_bytes"] = s.cap_bytes;
  d["evicted"] = s.evicted;
  d["generate_ms"] = s.generate_ms;
  d["aten_fallbacks"] = aten_fallbacks.load();
  d["conv_stats_recomputed"] = conv_stats_recomputed.load();
  d["scratch_kept_bytes"] = dc::scratch_kept_bytes();
  d["scratch_cap_bytes"] = dc::scratch_cap_bytes();
  return d;
}

pybind11::dict pool_stats() {
  const dc::BlockPoolStats s = dc::tensor_block_pool().stats();
  pybind11::dict d;
  d["held_bytes"] = s.held_bytes;
  d["held_blocks"] = s.held_blocks;
  d["in_use_bytes"] = s.in_use_bytes;
  d["peak_bytes"] = s.peak_bytes;
  d["in_use_peak_bytes"] = s.in_use_peak_bytes;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["released_blocks"] = s.released_blocks;
  d["cap_bytes"] = s.cap_bytes;
  d["min_bytes"] = kPoolMinBytes;
  return d;
}

std::string fwd_plan(const std::string& problem, int64_t threads) {
  return dc::get_fwd_primitive(dc::parse_conv_desc(problem), jit_isa(), static_cast<int>(threads), fwd_options())
      ->plan.to_string();
}

// "none" up to `top`, lowest first.
std::vector<std::string> levels_up_to(dc::Isa top) {
  std::vector<std::string> levels;
  for (int i = 0; i <= static_cast<int>(top); ++i) levels.emplace_back(dc::isa_name(static_cast<dc::Isa>(i)));
  return levels;
}

}  // namespace dc_torch

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_directconv utilities; the compute path is in torch.ops.directconv";
  m.def("isa", [] { return std::string(dc::isa_name(dc::active_isa())); });
  m.def("detected_isa", [] { return std::string(dc::isa_name(dc::detected_isa())); });
  m.def(
      "isa_levels", [] { return dc_torch::levels_up_to(dc::isa_from_cpuid(dc::read_cpuid_bits())); },
      "The levels this CPU offers (and the OS saves the state of), lowest first ('none' included): amx too where "
      "the OS refuses this process tile data.");
  m.def(
      "runnable_isa_levels", [] { return dc_torch::levels_up_to(dc::detected_isa()); },
      "The levels this process may run, lowest first ('none' included): isa_levels() without amx where the OS "
      "refuses this process tile data. The cap (TORCH_DIRECTCONV_ISA, set_isa_cap) takes the active level among "
      "these.");
  m.def(
      "fp32_isa", [] { return std::string(dc::isa_name(dc::fp32_isa(dc::active_isa()))); },
      "The vector ISA of the fp32 kernels at the active level (in their names and plans).");
  m.def(
      "vector_width", [] { return dc::active_isa() == dc::Isa::none ? 0 : dc::vlen(dc::active_isa()); },
      "Floats per channel block of the fp32 layouts at the active level (0 when the JIT is off).");
  m.def(
      "bf16_vector_width", [] { return static_cast<int64_t>(dc::kAmxBlock); },
      "Channels per block of the bf16 layouts (rows of 32 bf16: the bf16 kernels' and batch norm's).");
  m.def("set_isa_cap", [](const std::string& name) {
    try {
      dc::set_isa_cap(dc::parse_isa(name));
    } catch (const std::invalid_argument& e) {
      throw pybind11::value_error(e.what());
    }
    dc::clear_fwd_primitives();
    dc::clear_bf16_fwd_primitives();
    dc::clear_bf16_bwd_primitives();
    dc::clear_dw_primitives();
    dc::clear_upd_primitives();
  });
  m.def("jit_stats", &dc_torch::jit_stats);
  m.def("set_cache_mb", [](double mb) { dc::set_kernel_cache_cap_bytes(static_cast<int64_t>(mb * 1024 * 1024)); });
  m.def(
      "set_scratch_mb", [](double mb) { dc::set_scratch_cap_bytes(static_cast<int64_t>(std::max(0.0, mb) * 1024 * 1024)); },
      "The cap of the scratch kept between calls over all threads (TORCH_DIRECTCONV_SCRATCH_MB); buffers past it "
      "are returned to the OS at the end of their call.");
  m.def("pool_stats", &dc_torch::pool_stats,
        "The tensor pool's counters (conv/block_pool.h): bytes and blocks held for reuse, bytes in use, the most "
        "ever mapped, hits, misses, blocks returned to the OS, the cap and the smallest tensor it takes.");
  m.def(
      "set_pool_mb",
      [](double mb) { dc::tensor_block_pool().set_cap_bytes(static_cast<int64_t>(std::max(0.0, mb) * 1024 * 1024)); },
      "The cap of the tensor pool's held blocks (TORCH_DIRECTCONV_POOL_MB); blocks past it go back to the OS.");
  m.def(
      "empty_pool", [] { dc::tensor_block_pool().empty(); },
      "Returns every block the tensor pool holds to the OS; tensors in use keep theirs.");
  m.def("clear_cache", [] {
    dc::clear_fwd_primitives();
    dc::clear_bf16_fwd_primitives();
    dc::clear_bf16_bwd_primitives();
    dc::clear_dw_primitives();
    dc::clear_upd_primitives();
    dc::clear_kernel_cache();
  });
  m.def("fma_peak_gflops", &dc_torch::fma_peak_gflops, pybind11::arg("threads"), pybind11::arg("seconds") = 0.2);
  m.def(
      "bf16_dot_peak_gflops",
      [](int64_t threads, double seconds) {
        return dc_torch::bf16_peak_gflops("bf16 dot peak", dc::Isa::avx512_bf16, &dc::make_bf16_dot_peak_kernel,
                                          dc::kDotPeakInElems, dc::bf16_dot_peak_flops_per_iter(), threads,
                                          seconds);
      },
      pybind11::arg("threads"), pybind11::arg("seconds") = 0.2,
      "The vdpbf16ps peak (GFLOP/s over all threads); ValueError below the avx512_bf16 level.");
  m.def(
      "amx_peak_gflops",
      [](int64_t threads, double seconds, bool from_l1) {
        return dc_torch::bf16_peak_gflops(
            "amx peak", dc::Isa::amx, [from_l1] { return dc::make_bf16_tile_peak_kernel(from_l1); },
            dc::kTilePeakInElems, dc::bf16_tile_peak_flops_per_iter(), threads, seconds);
      },
      pybind11::arg("threads"), pybind11::arg("seconds") = 0.2, pybind11::arg("from_l1") = true,
      "The AMX tdpbf16ps peak (GFLOP/s over all threads), its input tiles loaded from L1 at every step, or "
      "with from_l1=False kept in the tile registers; ValueError below the amx level.");
  m.def(
      "set_fwd_options",
      [](int prefetch, int c_chunk) {
        dc_torch::fwd_options().prefetch = prefetch;
        dc_torch::fwd_options().c_chunk = c_chunk;
      },
      pybind11::arg("prefetch") = -1, pybind11::arg("c_chunk") = -1,
      "For benchmarks: force software prefetch on (1) or off (0), and the input-channel blocks per kernel call; "
      "-1 lets the plan decide.");
  m.def("fwd_plan", &dc_torch::fwd_plan, pybind11::arg("problem"), pybind11::arg("threads") = 1);
  m.def(
      "jit_covers_groups",
      [](int64_t groups, int64_t k, int64_t cg) {
        return dc::jit_covers_groups(groups, k, cg, dc::vlen(dc_torch::jit_isa()));
      },
      pybind11::arg("groups"), pybind11::arg("out_channels"), pybind11::arg("in_channels_per_group"),
      "Whether the JIT kernels cover a convolution of these groups (conv/paths.h): one group, depthwise, or groups "
      "that waste at most half of their channel blocks.");
  m.def(
      "bf16_fallback_reason",
      [](int64_t groups) -> std::optional<std::string> {
        std::string why = dc::bf16_fwd_fallback_reason(dc::active_isa(), dc::detected_isa(), groups);
        if (why.empty()) return std::nullopt;
        return why;
      },
      pybind11::arg("groups"),
      "Why a bf16 convolution of these groups runs on torch's convolution at the active level, or None when the "
      "bf16 kernels of the active level (amx or avx512_bf16) take it (conv/paths.h).");
  m.def("bf16_folds_columns", &dc_torch::folds_columns, pybind11::arg("in_channels"), pybind11::arg("kernel_w"),
        "Whether a bf16 convolution of this many input channels and kernel columns folds its columns into its "
        "channels (conv/bf16_fwd.h): the layers whose blocked model enters through to_blocked_folded.");
  m.def(
      "bf16_packed_weight_elems",
      [](int64_t k, int64_t c, int64_t r, int64_t s) {
        dc::ConvDesc d;
        d.k = k;
        d.c = c;
        d.r = r;
        d.s = s;
        d.dt = dc::DataType::bf16;
        return dc::bf16_fwd_weight_elems(d);
      },
      pybind11::arg("out_channels"), pybind11::arg("in_channels"), pybind11::arg("kernel_h"), pybind11::arg("kernel_w"),
      "Elements of pack_weight_bf16's output for a (K, C, R, S) weight.");
  m.def(
      "bf16_fwd_plan",
      [](const std::string& problem, int64_t threads) {
        dc::ConvDesc d = dc::parse_conv_desc(problem);
        d.dt = dc::DataType::bf16;
        return dc::make_bf16_fwd_plan(d, static_cast<int>(threads), dc::DataType::bf16).to_string();
      },
      pybind11::arg("problem"), pybind11::arg("threads") = 1,
      "The bf16 forward plan at the active level (amx or avx512_bf16: its kernels' names end in the level) of a "
      "benchdnn problem string (bf16 output, no post-ops).");
  m.def("is_depthwise", &dc::is_depthwise, pybind11::arg("groups"), pybind11::arg("out_channels"),
        pybind11::arg("in_channels_per_group"),
        "Whether these groups are depthwise (one input and one output channel each), which the depthwise kernels "
        "and their packed weight layout take (conv/paths.h).");
  m.def(
      "nchw_gemm_min_pixels", [] { return dc::kNchwGemmMinPixels; },
      "The smallest image (H * W) that the NCHW 1x1 GEMM takes.");
  m.def(
      "nchw_gemm_applies",
      [](int64_t c, int64_t h, int64_t w, int64_t k) {
        dc::ConvDesc d;
        d.c = c;
        d.h = h;
        d.w = w;
        d.k = k;
        return dc::nchw_gemm_preferred(d, dc::fp32_isa(dc::active_isa()));
      },
      pybind11::arg("in_channels"), pybind11::arg("height"), pybind11::arg("width"), pybind11::arg("out_channels"),
      "Whether a 1x1, stride-1, unpadded, one-group convolution on contiguous NCHW tensors takes the NCHW 1x1 GEMM "
      "(conv/paths.h), per image.");
  m.def(
      "upd_plan",
      [](const std::string& problem, int64_t threads) {
        return dc::get_upd_primitive(dc::parse_conv_desc(problem), dc_torch::jit_isa(), static_cast<int>(threads))
            ->plan.to_string();
      },
      pybind11::arg("problem"), pybind11::arg("threads") = 1,
      "The weight-update plan of a benchdnn problem string: its tile, rows per block and minibatch parts.");
  dc_torch::register_op_timers(m);
  dc_torch::register_tensors_key(m);
  dc_torch::register_program(m);

  // torch_directconv.distributed's transport; the rendezvous and the fallback are Python's.
  py::class_<dc::ShmAllReduce>(m, "ShmAllReduce")
      .def(py::init<const std::string&, int, int, int64_t, double>(), py::arg("name"), py::arg("rank"),
           py::arg("world"), py::arg("chunk_elems"), py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("unlink", &dc::ShmAllReduce::unlink)
      .def(
          "allreduce_mean_",
          [](dc::ShmAllReduce& self, const at::Tensor& t, double divisor) {
            TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                        "ShmAllReduce.allreduce_mean_: expected a contiguous float32 CPU tensor, got ", t.scalar_type(),
                        " on ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
            self.allreduce_mean(t.data_ptr<float>(), t.numel(), static_cast<float>(divisor), at::get_num_threads(),
                                dc_torch::torch_shares());
          },
          py::arg("tensor"), py::arg("divisor"), py::call_guard<py::gil_scoped_release>(),
          "tensor <- (the sum over the ranks of their tensor) / divisor, in place, the same bits on every rank.")
      .def_property_readonly("rank", &dc::ShmAllReduce::rank)
      .def_property_readonly("world", &dc::ShmAllReduce::world)
      .def_property_readonly("chunk_elems", &dc::ShmAllReduce::chunk_elems);
}
