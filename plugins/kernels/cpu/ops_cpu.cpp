// PiMoERoute, PiMoEDispatch and PiMoECombine on the CPU (portable C++; compiled with -ffp-contract=off so
// the combine sum rounds exactly like the PyTorch reference: one multiply and one add per slot).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#include "cpu_kernels.h"

namespace pimoe {
namespace cpu {

size_t Parallel::lane_count() {
  static const size_t count = [] {
    size_t n = std::thread::hardware_concurrency();
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) n = static_cast<size_t>(CPU_COUNT(&set));
#endif
    return std::clamp<size_t>(n, 1, kMaxLanes);
  }();
  return count;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      mantissa &= 0x3FFu;
      bits = sign | (exponent << 23) | (mantissa << 13);
    }
  } else if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf / nan
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return static_cast<uint16_t>(sign | (abs > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                                                // subnormal half or zero
    if (abs < 0x33000000u) return sign;                                   // < 2^-25: rounds to 0
    const uint32_t exponent = abs >> 23;
    const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - exponent;  // 14..24
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = ((abs >> 13) - ((127 - 15) << 10));
  const uint32_t rest = abs & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(sign | half);
}

namespace {

inline float load_value(const void* data, DType dtype, int64_t index) {
  return dtype == DType::kF16 ? half_to_float(static_cast<const uint16_t*>(data)[index])
                              : static_cast<const float*>(data)[index];
}

// a ranks before b: larger score first, ties to the lower index, NaN after every number
inline bool ranks_before(float sa, int64_t a, float sb, int64_t b) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

constexpr int64_t kRowsPerTask = 64;

}  // namespace

namespace {

// sigmoid as 1 / (1 + exp(-x)): 0 at -inf, 1 at +inf, NaN for NaN
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// softmax of values[0..n) in place, exactly as PyTorch defines it: max (NaN propagates), exp(x - max), sum, divide
void softmax_inplace(float* values, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  bool has_nan = false;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(values[j])) has_nan = true;
    else if (values[j] > m) m = values[j];
  }
  if (has_nan) m = std::numeric_limits<float>::quiet_NaN();
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    values[j] = std::exp(values[j] - m);
    sum += values[j];
  }
  for (int64_t j = 0; j < n; ++j) values[j] /= sum;
}

// Grouped selection: the keys of every expert outside the groups_kept best groups become 0 (and, with softmax
// scoring, its weight source too). A group scores its best key, or the sum of its best two, best by ranks_before.
void keep_best_groups(const RouteAttrs& a, int64_t e, float* keys, float* source, std::vector<float>& group_scores,
                      std::vector<char>& kept) {
  const int64_t groups = a.num_groups, size = e / groups;
  group_scores.resize(static_cast<size_t>(groups));
  kept.assign(static_cast<size_t>(groups), 0);
  for (int64_t g = 0; g < groups; ++g) {
    const float* member = keys + g * size;
    int64_t first = 0, second = -1;
    for (int64_t j = 1; j < size; ++j) {
      if (ranks_before(member[j], j, member[first], first)) {
        second = first;
        first = j;
      } else if (second < 0 || ranks_before(member[j], j, member[second], second)) {
        second = j;
      }
    }
    group_scores[static_cast<size_t>(g)] =
        a.group_score == contract::GroupScore::kSUM_TOP2 ? member[first] + member[second] : member[first];
  }
  for (int64_t round = 0; round < a.groups_kept; ++round) {
    int64_t best = -1;
    for (int64_t g = 0; g < groups; ++g)
      if (!kept[static_cast<size_t>(g)] &&
          (best < 0 || ranks_before(group_scores[static_cast<size_t>(g)], g, group_scores[static_cast<size_t>(best)],
                                    best)))
        best = g;
    kept[static_cast<size_t>(best)] = 1;
  }
  for (int64_t j = 0; j < e; ++j)
    if (!kept[static_cast<size_t>(j / size)]) {
      keys[j] = 0.0f;
      if (a.scoring == contract::Scoring::kSOFTMAX) source[j] = 0.0f;
    }
}

}  // namespace

void route(const RouteAttrs& attrs, const void* logits, DType dtype, const float* bias, int64_t n, int64_t e,
           float* weights, int32_t* ids, const Parallel& parallel) {
  const int64_t k = attrs.k;
  const bool logit_keys = attrs.ranks_logits(bias != nullptr);
  const size_t tasks = static_cast<size_t>((n + kRowsPerTask - 1) / kRowsPerTask);
  parallel(tasks, [&](size_t task) {
    // source: what the weights are gathered from (softmax: probs, sigmoid: sigma, softmax_topk: the logits)
    std::vector<float> source(static_cast<size_t>(e)), scores(static_cast<size_t>(e)), group_scores;
    std::vector<char> kept;
    int64_t best[contract::kMAX_TOP_K];
    float chosen[contract::kMAX_TOP_K];
    const int64_t t_end = std::min(n, static_cast<int64_t>(task + 1) * kRowsPerTask);
    for (int64_t t = static_cast<int64_t>(task) * kRowsPerTask; t < t_end; ++t) {
      for (int64_t j = 0; j < e; ++j) source[static_cast<size_t>(j)] = load_value(logits, dtype, t * e + j);
      if (attrs.scoring == contract::Scoring::kSOFTMAX) {
        softmax_inplace(source.data(), e);
        for (int64_t j = 0; j < e; ++j)  // v1: probs + (bias or 0)
          scores[static_cast<size_t>(j)] = source[static_cast<size_t>(j)] + (bias ? bias[j] : 0.0f);
      } else if (attrs.scoring == contract::Scoring::kSIGMOID) {
        for (int64_t j = 0; j < e; ++j) {
          const float v = source[static_cast<size_t>(j)];
          source[static_cast<size_t>(j)] = sigmoid(v);
          scores[static_cast<size_t>(j)] = logit_keys ? v : source[static_cast<size_t>(j)] + (bias ? bias[j] : 0.0f);
        }
      } else {  // softmax_topk: keys = logits + bias
        for (int64_t j = 0; j < e; ++j)
          scores[static_cast<size_t>(j)] = bias ? source[static_cast<size_t>(j)] + bias[j] : source[static_cast<size_t>(j)];
      }
      if (attrs.grouped()) keep_best_groups(attrs, e, scores.data(), source.data(), group_scores, kept);
      // top-k by insertion into a sorted list of the best k so far
      int64_t count = 0;
      for (int64_t j = 0; j < e; ++j) {
        const float s = scores[static_cast<size_t>(j)];
        if (count == k && !ranks_before(s, j, scores[static_cast<size_t>(best[k - 1])], best[k - 1])) continue;
        int64_t pos = count < k ? count++ : k - 1;
        while (pos > 0 && ranks_before(s, j, scores[static_cast<size_t>(best[pos - 1])], best[pos - 1])) {
          best[pos] = best[pos - 1];
          --pos;
        }
        best[pos] = j;
      }
      for (int64_t j = 0; j < k; ++j) chosen[j] = source[static_cast<size_t>(best[j])];
      if (attrs.scoring == contract::Scoring::kSOFTMAX_TOPK) softmax_inplace(chosen, k);
      float total = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        ids[t * k + j] = static_cast<int32_t>(best[j]);
        weights[t * k + j] = chosen[j];
        total += weights[t * k + j];
      }
      if (attrs.normalize) {
        if (attrs.normalize_eps != 0.0f) total = total + attrs.normalize_eps;
        for (int64_t j = 0; j < k; ++j) weights[t * k + j] /= total;
      }
      if (attrs.routed_scaling_factor != 1.0f)
        for (int64_t j = 0; j < k; ++j) weights[t * k + j] *= attrs.routed_scaling_factor;
    }
  });
}

std::string dispatch(const void* x, DType dtype, const int32_t* ids, int64_t n, int64_t h, int64_t k, int64_t e,
                     void* x_sorted, int32_t* offsets, int32_t* flat_to_sorted, const Parallel& parallel) {
  const int64_t pairs = n * k;
  std::vector<int32_t> cursor(static_cast<size_t>(e) + 1, 0);
  for (int64_t i = 0; i < pairs; ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= e)
      return msg("PiMoEDispatch: ids[", i / k, ", ", i % k, "] = ", id, " is outside [0, ", e,
                 "); ids must come from PiMoERoute over the same number of experts");
    ++cursor[static_cast<size_t>(id) + 1];
  }
  for (int64_t j = 0; j < e; ++j) cursor[static_cast<size_t>(j) + 1] += cursor[static_cast<size_t>(j)];
  std::copy(cursor.begin(), cursor.end(), offsets);
  for (int64_t i = 0; i < pairs; ++i) flat_to_sorted[i] = cursor[static_cast<size_t>(ids[i])]++;
  const size_t row_bytes = static_cast<size_t>(h) * (dtype == DType::kF16 ? 2 : 4);
  const size_t tasks = static_cast<size_t>((pairs + kRowsPerTask - 1) / kRowsPerTask);
  parallel(tasks, [&](size_t task) {
    const int64_t end = std::min(pairs, static_cast<int64_t>(task + 1) * kRowsPerTask);
    for (int64_t i = static_cast<int64_t>(task) * kRowsPerTask; i < end; ++i)
      std::memcpy(static_cast<char*>(x_sorted) + static_cast<size_t>(flat_to_sorted[i]) * row_bytes,
                  static_cast<const char*>(x) + static_cast<size_t>(i / k) * row_bytes, row_bytes);
  });
  return {};
}

std::string combine(const void* y_sorted, DType dtype, const int32_t* flat_to_sorted, const float* weights,
                    int64_t n, int64_t k, int64_t h, void* y, const Parallel& parallel, contract::CombineOrder order) {
  const int64_t pairs = n * k;
  for (int64_t i = 0; i < pairs; ++i)
    if (flat_to_sorted[i] < 0 || flat_to_sorted[i] >= pairs)
      return msg("PiMoECombine: flat_to_sorted[", i, "] = ", flat_to_sorted[i], " is outside [0, ", pairs,
                 "); it must come from PiMoEDispatch over the same tokens");
  const bool by_expert = order == contract::CombineOrder::kEXPERT;
  const size_t tasks = static_cast<size_t>((n + kRowsPerTask - 1) / kRowsPerTask);
  parallel(tasks, [&](size_t task) {
    std::vector<float> acc(static_cast<size_t>(h));
    int64_t slots[contract::kMAX_TOP_K];
    const int64_t t_end = std::min(n, static_cast<int64_t>(task + 1) * kRowsPerTask);
    for (int64_t t = static_cast<int64_t>(task) * kRowsPerTask; t < t_end; ++t) {
      // the slots in summation order: slot order, or by ascending sorted row (= ascending expert id)
      for (int64_t j = 0; j < k; ++j) {
        int64_t pos = j;
        while (by_expert && pos > 0 && flat_to_sorted[t * k + slots[pos - 1]] > flat_to_sorted[t * k + j]) {
          slots[pos] = slots[pos - 1];
          --pos;
        }
        slots[pos] = j;
      }
      if (by_expert) std::fill(acc.begin(), acc.end(), 0.0f);  // index_add_ into zeros: 0 + w*y + ...
      for (int64_t i = 0; i < k; ++i) {
        const int64_t j = slots[i];
        const float w = weights[t * k + j];
        const int64_t row = flat_to_sorted[t * k + j];
        const bool first = i == 0 && !by_expert;
        if (dtype == DType::kF32) {
          const float* src = static_cast<const float*>(y_sorted) + row * h;
          if (first) {
            for (int64_t c = 0; c < h; ++c) acc[static_cast<size_t>(c)] = src[c] * w;
          } else {
            for (int64_t c = 0; c < h; ++c) acc[static_cast<size_t>(c)] = acc[static_cast<size_t>(c)] + src[c] * w;
          }
        } else {
          const uint16_t* src = static_cast<const uint16_t*>(y_sorted) + row * h;
          if (first) {
            for (int64_t c = 0; c < h; ++c) acc[static_cast<size_t>(c)] = half_to_float(src[c]) * w;
          } else {
            for (int64_t c = 0; c < h; ++c)
              acc[static_cast<size_t>(c)] = acc[static_cast<size_t>(c)] + half_to_float(src[c]) * w;
          }
        }
      }
      if (dtype == DType::kF32) {
        std::memcpy(static_cast<float*>(y) + t * h, acc.data(), static_cast<size_t>(h) * sizeof(float));
      } else {
        uint16_t* dst = static_cast<uint16_t*>(y) + t * h;
        for (int64_t c = 0; c < h; ++c) dst[c] = float_to_half(acc[static_cast<size_t>(c)]);
      }
    }
  });
  return {};
}

}  // namespace cpu
}  // namespace pimoe
