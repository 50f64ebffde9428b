// Which kernel table the expert op uses: chosen once per process from the CPU's features (cpuid), or forced by
// PIMOE_CPU_ISA. The tables give bit-identical INT8 outputs (isa.h), so the choice is a matter of speed; forcing
// one lets the tests run every table this CPU can execute, the AVX-512 source included (its SIMDe build).
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_kernels.h"
#include "isa.h"

namespace pimoe {
namespace cpu {
namespace isa {
// the tables this library was built without (plugins/kernels/CMakeLists.txt)
#ifndef PIMOE_HAVE_AVX2
const Kernels* avx2_kernels() { return nullptr; }
#endif
#ifndef PIMOE_HAVE_AVX512
const Kernels* avx512_kernels() { return nullptr; }
#endif
#ifndef PIMOE_HAVE_AVX512_SIMDE
const Kernels* avx512_simde_kernels() { return nullptr; }
#endif

namespace {

struct CpuFeatures {
  bool avx2 = false;    // AVX2 + FMA + F16C
  bool avx512 = false;  // AVX-512 F/BW/DQ/VL + VNNI (Intel Cascade Lake / Ice Lake and later, AMD Zen 4 and later)
};

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vnni");
#endif
  return f;
}

struct Level {
  const char* name;
  const Kernels* kernels;  // nullptr: not built into this library
  bool runs;               // this CPU has the instructions
  const char* needs;
  bool automatic;          // a candidate when PIMOE_CPU_ISA is unset (best first)
};

struct Choice {
  const Kernels* kernels = nullptr;
  std::string error;
};

Choice choose() {
  const CpuFeatures cpu = detect();
  // the SIMDe build of the AVX-512 source is for testing it on CPUs without AVX-512: never chosen by itself
  const Level levels[] = {
      {"avx512", avx512_kernels(), cpu.avx512, "AVX-512 F/BW/DQ/VL and VNNI", true},
      {"avx2", avx2_kernels(), cpu.avx2, "AVX2, FMA and F16C", true},
      {"avx512-simde", avx512_simde_kernels(), cpu.avx2, "AVX2, FMA and F16C", false},
      {"generic", &generic_kernels(), true, "", true},
  };
  const char* forced = std::getenv("PIMOE_CPU_ISA");
  if (forced == nullptr || *forced == '\0') {
    for (const Level& l : levels)
      if (l.automatic && l.kernels != nullptr && l.runs) return {l.kernels, {}};
  }
  std::string usable;
  for (const Level& l : levels)
    if (l.kernels != nullptr && l.runs) usable += std::string(usable.empty() ? "" : ", ") + l.name;
  const std::string fix = "; unset PIMOE_CPU_ISA or set it to one this library and CPU run: " + usable;
  for (const Level& l : levels) {
    if (std::strcmp(forced, l.name) != 0) continue;
    if (l.kernels == nullptr)
      return {nullptr, std::string("PIMOE_CPU_ISA=") + forced + ": this library was built without these kernels" +
                           (std::strcmp(l.name, "avx512-simde") == 0
                                ? " (the SIMDe headers were missing: run scripts/fetch_deps.sh simde and rebuild)"
                                : "") +
                           fix};
    if (!l.runs)
      return {nullptr, std::string("PIMOE_CPU_ISA=") + forced + ": this CPU lacks " + l.needs + fix};
    return {l.kernels, {}};
  }
  return {nullptr, std::string("PIMOE_CPU_ISA=") + forced +
                       " is not a kernel set (generic, avx2, avx512 or avx512-simde)" + fix};
}

const Choice& choice() {
  static const Choice chosen = choose();
  return chosen;
}

}  // namespace

const Kernels* selected() { return choice().kernels; }
const char* selection_error() { return choice().error.c_str(); }

}  // namespace isa

const char* active_isa() {
  static const std::string name = isa::selected() != nullptr ? std::string(isa::selected()->name)
                                                             : std::string("unavailable: ") + isa::selection_error();
  return name.c_str();
}

}  // namespace cpu
}  // namespace pimoe
