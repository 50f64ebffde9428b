// The activations of the CPU expert MLP, written once over a vector type: every ISA table instantiates them with
// its own lane operations (scalar in kernels_generic.cpp, 8 lanes in kernels_avx2.cpp, 16 in kernels_avx512.cpp),
// so each lane computes the same operations in the same order and every ISA gives the same bits (isa.h). Each
// operation an Ops type provides is exactly defined by IEEE arithmetic:
//   F set(float); F add/sub/mul/div(F, F); F fma(a, b, c) = a * b + c and F fnma(a, b, c) = c - a * b, one
//   rounding each; F max(a, b) = a > b ? a : b and F min(a, b) = a < b ? a : b per lane (x86's maxps/minps: a NaN
//   gives b); F round(F): to the nearest integer, ties to even; pow2(F n, F* s1, F* s2): 2^(n/2 rounded down) and
//   2^(n - n/2 rounded down), two factors (n an integer in [-150, 128]), see exp(); F sign(F) (the sign bit
//   alone), F abs(F), F or_sign(F, F s) (x with s's sign bit or-ed in); M is_nan(F), M gt(F, F), M lt(F, F)
//   (ordered compares); F select(M m, F a, F b) = m ? a : b per lane.
// New activations go here (and into the contract enum), never into one ISA's file alone.
#pragma once

#include <cstdint>
#include <type_traits>

#include "pimoe_contract.h"

namespace pimoe {
namespace cpu {
namespace isa {
namespace math {

// exp: x = n ln2 + r, |r| <= ln2/2, 2^n built in the exponent field, e^r by a degree-6 polynomial
// (relative error ~2 ulp). NaN in -> NaN out; overflow -> inf; underflow -> 0.
template <class O>
inline typename O::F exp(typename O::F x) {
  using F = typename O::F;
  const F hi = O::set(88.7228394f), lo = O::set(-103.972076f);
  const auto nan_mask = O::is_nan(x);
  const auto over = O::gt(x, hi);
  const auto under = O::lt(x, lo);
  const F xc = O::min(O::max(x, lo), hi);
  const F n = O::round(O::mul(xc, O::set(1.44269504088896341f)));
  F r = O::fnma(n, O::set(0.693145751953125f), xc);
  r = O::fnma(n, O::set(1.42860682030941723212e-6f), r);
  F p = O::set(1.0f / 720.0f);
  p = O::fma(p, r, O::set(1.0f / 120.0f));
  p = O::fma(p, r, O::set(1.0f / 24.0f));
  p = O::fma(p, r, O::set(1.0f / 6.0f));
  p = O::fma(p, r, O::set(0.5f));
  p = O::fma(p, r, O::set(1.0f));
  p = O::fma(p, r, O::set(1.0f));
  // 2^n in two factors so that n down to -150 (subnormal results) stays representable
  F s1, s2;
  O::pow2(n, &s1, &s2);
  F result = O::mul(O::mul(p, s1), s2);
  result = O::select(over, O::set(__builtin_inff()), result);
  result = O::select(under, O::set(0.0f), result);
  return O::select(nan_mask, x, result);
}

// erf(x) = z P(z^2) / Q(z^2), z = x clamped to [-3.8, 3.8], the result clamped to [-1, 1]: a rational fit of
// degrees 6 and 4 in z^2 made for this code (a weighted least-squares minimax iteration against float64 erf; its
// error in exact arithmetic is 3.0e-8 on [0, 3.8]). Evaluated in fp32 as written, the absolute error is at most
// 3.4e-7 for every float (checked once, exhaustively on [0, 6], by a C++ program against std::erf; beyond 3.8,
// 1 - erf < 8e-8; tests/ops/test_op_boundaries.py holds gelu to 4e-7 * max(1, |x|)), where the previous
// Abramowitz & Stegun 7.1.26 form measured 5.6e-7, and near 0 the error is relative (z times the fit) instead of
// absolute. One division and ten fused multiply-adds, where 7.1.26 needs a division and an exponential: gelu over a
// row takes about a third less time (avx512, measured once; with LayerNorm and the next layer's codes, a fifth).
// Odd (each operation is sign-symmetric); the bounds are min's and max's first operands, so a NaN x stays NaN.
template <class O>
inline typename O::F erf(typename O::F x) {
  using F = typename O::F;
  const F z = O::min(O::set(3.8f), O::max(O::set(-3.8f), x));
  const F w = O::mul(z, z);
  F p = O::set(2.12406803e-08f);
  p = O::fma(p, w, O::set(-2.01993794e-06f));
  p = O::fma(p, w, O::set(0.000140630465f));
  p = O::fma(p, w, O::set(0.00353210769f));
  p = O::fma(p, w, O::set(0.0499664024f));
  p = O::fma(p, w, O::set(0.195149794f));
  p = O::fma(p, w, O::set(1.12837887f));
  F q = O::set(0.00092433166f);
  q = O::fma(q, w, O::set(0.0139741404f));
  q = O::fma(q, w, O::set(0.113053173f));
  q = O::fma(q, w, O::set(0.506277084f));
  q = O::fma(q, w, O::set(1.0f));
  const F e = O::div(O::mul(z, p), q);
  return O::min(O::set(1.0f), O::max(O::set(-1.0f), e));
}

// tanh: odd polynomial below 0.3 (no cancellation), 1 - 2 / (e^{2|x|} + 1) above.
template <class O>
inline typename O::F tanh(typename O::F x) {
  using F = typename O::F;
  const F sign = O::sign(x);
  const F ax = O::abs(x);
  const F x2 = O::mul(x, x);
  F p = O::set(21844.0f / 6081075.0f);
  p = O::fma(p, x2, O::set(-1382.0f / 155925.0f));
  p = O::fma(p, x2, O::set(62.0f / 2835.0f));
  p = O::fma(p, x2, O::set(-17.0f / 315.0f));
  p = O::fma(p, x2, O::set(2.0f / 15.0f));
  p = O::fma(p, x2, O::set(-1.0f / 3.0f));
  const F small = O::fma(O::mul(p, x2), x, x);
  const F e = exp<O>(O::add(ax, ax));
  const F large = O::sub(O::set(1.0f), O::div(O::set(2.0f), O::add(e, O::set(1.0f))));
  const F result = O::select(O::lt(ax, O::set(0.3f)), small, O::or_sign(large, sign));
  return O::select(O::is_nan(x), x, result);
}

// The contract's activation enum: 0 gelu (erf), 1 gelu_tanh, 2 relu, 3 silu, 4 tanh (5, swiglu_oai: glu() below)
template <class O>
inline typename O::F activate(typename O::F x, int32_t activation) {
  using F = typename O::F;
  const F half = O::set(0.5f), one = O::set(1.0f);
  switch (activation) {
    case 0:
      return O::mul(O::mul(half, x), O::add(one, erf<O>(O::mul(x, O::set(0.70710678118654752f)))));
    case 1: {
      const F x3 = O::mul(O::mul(x, x), x);
      const F inner = O::mul(O::set(0.79788456080286536f), O::fma(O::set(0.044715f), x3, x));
      return O::mul(O::mul(half, x), O::add(one, tanh<O>(inner)));
    }
    case 2:  // relu; NaN stays NaN
      return O::select(O::is_nan(x), x, O::max(x, O::set(0.0f)));
    case 3:
      return O::div(x, O::add(one, exp<O>(O::sub(O::set(0.0f), x))));
    default:
      return tanh<O>(x);
  }
}

// The gated layers' GLU (contract v2): h = act(gate) * up for activations 0..4 (one multiply after activate()), and
// 5, swiglu_oai, GPT-OSS's clamped SwiGLU in its operation order: g = min(gate, limit), u = clamp(up, -limit,
// limit), h = (u + 1) * (g * sigmoid(g * alpha)) with sigmoid(x) = 1 / (1 + exp(0 - x)). The clamps take the bound
// as min's and max's first operand, so a NaN gate or up stays NaN (torch.clamp), and give the bound otherwise.
constexpr int32_t kSwigluOai = static_cast<int32_t>(contract::Activation::kSWIGLU_OAI);

template <class O>
inline typename O::F glu(typename O::F gate, typename O::F up, int32_t activation, typename O::F alpha,
                         typename O::F limit) {
  using F = typename O::F;
  const F one = O::set(1.0f);
  if (activation != kSwigluOai) return O::mul(activate<O>(gate, activation), up);
  const F g = O::min(limit, gate);
  const F u = O::max(O::sub(O::set(0.0f), limit), O::min(limit, up));
  const F sigmoid = O::div(one, O::add(one, exp<O>(O::sub(O::set(0.0f), O::mul(g, alpha)))));
  return O::mul(O::add(u, one), O::mul(g, sigmoid));
}

// body(std::integral_constant<int32_t, A>{}) with A the activation (-1: none; 5: swiglu_oai, only in glu()), so
// that a row loop is compiled once per activation with activate()'s and glu()'s switches folded away
template <typename Body>
inline void with_activation(int32_t activation, Body&& body) {
  switch (activation < 0 ? -1 : activation) {
    case -1: return body(std::integral_constant<int32_t, -1>{});
    case 0: return body(std::integral_constant<int32_t, 0>{});
    case 1: return body(std::integral_constant<int32_t, 1>{});
    case 2: return body(std::integral_constant<int32_t, 2>{});
    case 3: return body(std::integral_constant<int32_t, 3>{});
    case kSwigluOai: return body(std::integral_constant<int32_t, kSwigluOai>{});
    default: return body(std::integral_constant<int32_t, 4>{});
  }
}

// LayerNorm's lane count (isa.h): the sums run in this many lanes, whatever the vector width
constexpr int64_t kNormLanes = 64;

}  // namespace math
}  // namespace isa
}  // namespace cpu
}  // namespace pimoe
