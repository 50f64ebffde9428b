// CPU implementations of the four pimoe ops (fp32 math; fp32 or fp16 storage; int8 weights in w8a8 modes).
// Used by the ONNX Runtime custom-op library. No exceptions: functions that can fail return an error
// string (empty on success).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pimoe_attrs.h"

namespace pimoe {
namespace cpu {

enum class DType : int32_t { kF32 = 0, kF16 = 1, kI8 = 2 };

// A parallel-for over [0, total): runs fn(i) for every i, on the host runtime's thread pool when one is
// given (ONNX Runtime's intra-op pool), else serially. Each index is run exactly once; callers keep
// results independent of which thread ran an index (determinism). Indices are handed out one at a time from a
// shared counter to whichever pool thread is free, so a thread that starts late or is descheduled (another job on
// the core) does not leave the others waiting at the end with its share of a fixed split.
//
// ``runs`` is the same parallel-for with the indices cut into contiguous runs, one per core (lanes): a worker takes
// a lane no one has started and its indices in order, then helps the lanes still running (each lane's indices still
// come one at a time from its own counter, so every index runs exactly once and a late or descheduled thread leaves
// its lane to the others).
// For callers whose consecutive indices share data: a task that prefetches its successor's data warms its own
// cache, and consecutive regions cut the same way (rows) find their rows in the core that wrote them. With one
// thread the order is 0, 1, ..., total - 1, as above.
class Parallel {
 public:
  using Trampoline = void (*)(void* arg, size_t index);
  using Impl = void (*)(void* ctx, Trampoline fn, size_t total, void* arg);

  Parallel() = default;
  Parallel(void* ctx, Impl impl) : ctx_(ctx), impl_(impl) {}

  template <typename F>
  void operator()(size_t total, F&& fn) const {
    if (total == 0) return;
    if (impl_ == nullptr || total == 1) {
      for (size_t i = 0; i < total; ++i) fn(i);
      return;
    }
    using Fn = std::remove_reference_t<F>;
    struct Queue {
      std::atomic<size_t> next{0};
      size_t total;
      Fn* fn;
    } queue{{0}, total, &fn};
    // ``total`` workers, however the pool spreads them: each takes indices until none is left (the later ones
    // find the queue empty and return)
    impl_(ctx_, [](void* arg, size_t) {
      Queue& q = *static_cast<Queue*>(arg);
      for (size_t i = q.next.fetch_add(1, std::memory_order_relaxed); i < q.total;
           i = q.next.fetch_add(1, std::memory_order_relaxed))
        (*q.fn)(i);
    }, total, &queue);
  }

  template <typename F>
  void runs(size_t total, F&& fn) const {
    const size_t n = std::min(total, lane_count());
    if (impl_ == nullptr || n <= 1) return (*this)(total, fn);
    using Fn = std::remove_reference_t<F>;
    struct alignas(64) Lane {  // one cache line each: the lanes' counters are taken by different cores
      std::atomic<size_t> next;
      size_t end;
    };
    struct Queue {
      Lane lane[kMaxLanes];
      std::atomic<size_t> claimed;
      size_t n;
      Fn* fn;
      void drain(Lane& l) {
        for (size_t i = l.next.fetch_add(1, std::memory_order_relaxed); i < l.end;
             i = l.next.fetch_add(1, std::memory_order_relaxed))
          (*fn)(i);
      }
    } queue;
    for (size_t k = 0; k < n; ++k) {
      queue.lane[k].next.store(k * total / n, std::memory_order_relaxed);
      queue.lane[k].end = (k + 1) * total / n;
    }
    queue.claimed.store(0, std::memory_order_relaxed);
    queue.n = n;
    queue.fn = &fn;
    // ``n`` workers, however the pool spreads them: each claims lanes no one has started, in order, while there are
    // any (a pool with fewer threads than lanes: a thread's next lane is a fresh one), then helps the lanes still
    // running, starting at its own index
    impl_(ctx_, [](void* arg, size_t w) {
      Queue& q = *static_cast<Queue*>(arg);
      for (size_t k = q.claimed.fetch_add(1, std::memory_order_relaxed); k < q.n;
           k = q.claimed.fetch_add(1, std::memory_order_relaxed))
        q.drain(q.lane[k]);
      for (size_t j = 0; j < q.n; ++j) q.drain(q.lane[(w + j) % q.n]);
    }, n, &queue);
  }

 private:
  static constexpr size_t kMaxLanes = 64;
  // the CPUs this process may run on (the pool has a thread per core by default), at most kMaxLanes
  static size_t lane_count();

  void* ctx_ = nullptr;
  Impl impl_ = nullptr;
};

// half <-> float (IEEE binary16, round to nearest even)
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

// Which kernel table the expert op uses in this process: "avx512", "avx2" or "generic", the best this CPU runs, or
// the one PIMOE_CPU_ISA names (also "avx512-simde": the AVX-512 source on portable intrinsics); "unavailable: ..."
// with the reason when PIMOE_CPU_ISA names one this library or CPU cannot run (the expert op then refuses to load).
const char* active_isa();

// PiMoERoute. logits [n, e] (f32/f16), bias [e] or nullptr -> weights [n, k] f32, ids [n, k] i32 (k = attrs.k).
// attrs must have passed check_route for these shapes.
void route(const RouteAttrs& attrs, const void* logits, DType dtype, const float* bias, int64_t n, int64_t e,
           float* weights, int32_t* ids, const Parallel& parallel);

// PiMoEDispatch. Returns an error if an id is outside [0, e).
std::string dispatch(const void* x, DType dtype, const int32_t* ids, int64_t n, int64_t h, int64_t k, int64_t e,
                     void* x_sorted, int32_t* offsets, int32_t* flat_to_sorted, const Parallel& parallel);

// PiMoECombine (order: contract::CombineOrder). Returns an error if a flat_to_sorted entry is outside [0, n*k).
std::string combine(const void* y_sorted, DType dtype, const int32_t* flat_to_sorted, const float* weights,
                    int64_t n, int64_t k, int64_t h, void* y, const Parallel& parallel,
                    contract::CombineOrder order = contract::CombineOrder::kSLOT);

// PiMoEExpertMLP: weights are packed once by prepare() (at session creation when they are constant
// initializers) into the GEMM's panel layout; run() may then be called concurrently.
class ExpertMLP {
 public:
  struct Param {
    const void* data = nullptr;
    DType dtype = DType::kF32;
  };

  ExpertMLP();
  ~ExpertMLP();
  ExpertMLP(const ExpertMLP&) = delete;
  ExpertMLP& operator=(const ExpertMLP&) = delete;

  // attrs must have passed check_expert_mlp for the params' shapes.
  std::string prepare(const ExpertMLPAttrs& attrs, const std::vector<Param>& params);
  bool prepared() const;

  // x [rows, widths[0]] sorted by expert, offsets [num_experts + 1] -> y [rows, widths.back()]
  std::string run(const void* x, DType dtype, int64_t rows, const int32_t* offsets, int64_t num_experts, void* y,
                  const Parallel& parallel) const;

  struct State;  // the packed weights (opaque; defined in expert_mlp.cpp, whose stage helpers read it)

 private:
  std::unique_ptr<State> state_;
};

}  // namespace cpu
}  // namespace pimoe
