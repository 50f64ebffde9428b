// The int8 GEMM of the CPU expert op against oneDNN's on the experts' shapes, one thread; built and run by
// scripts/bench_int8_gemm.py (which also times MLAS through ONNX Runtime).
//
//   bench_int8_gemm ours M K N E    our kernel table (PIMOE_CPU_ISA picks it): E experts' [M, K] x [K, N], weights
//                                   packed once, codes quantised once; the table's dequantising output stage included
//   bench_int8_gemm dnnl M K N E    oneDNN's matmul u8 x s8 -> s32 (weights reordered once into its own layout)
//   bench_int8_gemm dnnl-exact      oneDNN on the worst case of our codes (a + 128 = 255, w = 127): exact or not
// Prints one line: name, implementation, milliseconds (best of 30), GOP/s (2 M K N E / time).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "isa.h"
#ifdef PIMOE_WITH_DNNL
#include <dnnl.hpp>
#endif

namespace {

double best_ms(const std::function<void()>& run) {
  run();
  double best = 1e30;
  for (int i = 0; i < 30; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

int ours(int64_t m, int64_t k, int64_t n, int experts) {
  using namespace pimoe::cpu::isa;
  const Kernels* kt = selected();
  if (kt == nullptr) return std::fprintf(stderr, "%s\n", selection_error()), 1;
  const int64_t panels = (n + kPanel - 1) / kPanel, pb = kt->i8_panel_bytes(k), cb = kt->i8_code_bytes(k);
  std::mt19937 rng(1);
  std::vector<int8_t> w(static_cast<size_t>(n * k));
  for (auto& v : w) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  std::vector<std::vector<int8_t>> packed(static_cast<size_t>(experts), std::vector<int8_t>(static_cast<size_t>(panels * pb)));
  for (auto& p : packed) kt->pack_i8(w.data(), n, k, p.data());
  std::vector<float> x(static_cast<size_t>(k));
  for (auto& v : x) v = static_cast<float>(rng() % 2000) / 200.0f - 5.0f;
  std::vector<uint8_t> codes(static_cast<size_t>(m * cb * experts));
  for (int64_t r = 0; r < m * experts; ++r) kt->quantize_row(x.data(), k, {nullptr, 0.04f, codes.data() + r * cb});
  std::vector<float> as(static_cast<size_t>(m * experts), 0.01f), ws(static_cast<size_t>(panels * kPanel), 0.02f),
      bias(static_cast<size_t>(panels * kPanel), 0.1f), c(static_cast<size_t>(m * n * experts));
  const int64_t row_block = 48, panel_block = 8;  // the expert op's task blocks (expert_mlp.cpp)
  const double ms = best_ms([&] {
    for (int e = 0; e < experts; ++e)
      for (int64_t r0 = 0; r0 < m; r0 += row_block)
        for (int64_t p0 = 0; p0 < panels; p0 += panel_block) {
          const int64_t rows = std::min(row_block, m - r0), np = std::min(panel_block, panels - p0);
          kt->gemm_i8(codes.data() + (e * m + r0) * cb, cb, rows, packed[static_cast<size_t>(e)].data() + p0 * pb, np,
                      panels - p0 - np, k, as.data() + e * m + r0, ws.data() + p0 * kPanel, bias.data() + p0 * kPanel,
                      c.data() + (e * m + r0) * n + p0 * kPanel, n, std::min(np * kPanel, n - p0 * kPanel));
        }
  });
  std::printf("ours %s %.3f %.0f\n", kt->name, ms, 2.0 * m * k * n * experts / ms / 1e6);
  return 0;
}

#ifdef PIMOE_WITH_DNNL
int time_dnnl(int64_t m, int64_t k, int64_t n, int experts) {
  using namespace dnnl;
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  const memory::desc a_md({m, k}, memory::data_type::u8, memory::format_tag::ab);
  const memory::desc b_md({k, n}, memory::data_type::s8, memory::format_tag::ab);
  const memory::desc c_md({m, n}, memory::data_type::s32, memory::format_tag::ab);
  const auto pd = matmul::primitive_desc(
      matmul::desc(a_md, memory::desc({k, n}, memory::data_type::s8, memory::format_tag::any), c_md), eng);
  const matmul mm(pd);
  std::vector<memory> a, b, c;
  for (int e = 0; e < experts; ++e) {
    memory ae(a_md, eng), plain(b_md, eng), be(pd.weights_desc(), eng), ce(c_md, eng);
    auto* pa = static_cast<uint8_t*>(ae.get_data_handle());
    for (int64_t i = 0; i < m * k; ++i) pa[i] = static_cast<uint8_t>(1 + i * 7 % 255);
    auto* pw = static_cast<int8_t*>(plain.get_data_handle());
    for (int64_t i = 0; i < k * n; ++i) pw[i] = static_cast<int8_t>(i * 13 % 255 - 127);
    reorder(plain, be).execute(s, plain, be);
    a.push_back(ae), b.push_back(be), c.push_back(ce);
  }
  s.wait();
  const double ms = best_ms([&] {
    for (size_t e = 0; e < a.size(); ++e)
      mm.execute(s, {{DNNL_ARG_SRC, a[e]}, {DNNL_ARG_WEIGHTS, b[e]}, {DNNL_ARG_DST, c[e]}});
    s.wait();
  });
  std::printf("dnnl %s %.3f %.0f\n", pd.impl_info_str(), ms, 2.0 * m * k * n * experts / ms / 1e6);
  return 0;
}

int check_dnnl_exact() {
  using namespace dnnl;
  const int64_t m = 16, k = 512, n = 64;
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  const memory::desc a_md({m, k}, memory::data_type::u8, memory::format_tag::ab);
  const memory::desc b_md({k, n}, memory::data_type::s8, memory::format_tag::ab);
  const memory::desc c_md({m, n}, memory::data_type::s32, memory::format_tag::ab);
  const auto pd = matmul::primitive_desc(matmul::desc(a_md, b_md, c_md), eng);
  memory a(a_md, eng), b(b_md, eng), c(c_md, eng);
  std::memset(a.get_data_handle(), 255, static_cast<size_t>(m * k));
  std::memset(b.get_data_handle(), 127, static_cast<size_t>(k * n));
  matmul(pd).execute(s, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
  s.wait();
  const auto* y = static_cast<const int32_t*>(c.get_data_handle());
  const int64_t exact = 255 * 127 * k;
  const int64_t wrong = std::count_if(y, y + m * n, [&](int32_t v) { return v != exact; });
  std::printf("dnnl-exact %s %s %d %ld\n", pd.impl_info_str(), wrong ? "no" : "yes", y[0], static_cast<long>(exact));
  return 0;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return std::fprintf(stderr, "usage: bench_int8_gemm ours|dnnl M K N E | dnnl-exact\n"), 2;
  const std::string what = argv[1];
#ifdef PIMOE_WITH_DNNL
  if (what == "dnnl-exact") return check_dnnl_exact();
#endif
  if (argc < 6) return std::fprintf(stderr, "usage: bench_int8_gemm ours|dnnl M K N E\n"), 2;
  const int64_t m = std::atol(argv[2]), k = std::atol(argv[3]), n = std::atol(argv[4]);
  const int experts = std::atoi(argv[5]);
  if (what == "ours") return ours(m, k, n, experts);
#ifdef PIMOE_WITH_DNNL
  if (what == "dnnl") return time_dnnl(m, k, n, experts);
#endif
  return std::fprintf(stderr, "bench_int8_gemm: '%s' is not built in\n", what.c_str()), 2;
}
