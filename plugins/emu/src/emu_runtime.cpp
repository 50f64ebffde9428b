// cuda_emu runtime: fibers, block scheduler, warp rendezvous, shared-memory arena, cp.async, runtime API.
// Built WITHOUT sanitizer instrumentation on purpose: its bookkeeping is invisible to TSan/ASan, and it tells
// them about fibers, stacks and the happens-before edges of barriers through the (weak) sanitizer interfaces.
#include "cuda_emu/emu.h"

#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

extern "C" {
// ThreadSanitizer fiber API / ASan fiber + poisoning API: present only when the program links a sanitizer.
void* __tsan_get_current_fiber(void) __attribute__((weak));
void* __tsan_create_fiber(unsigned flags) __attribute__((weak));
void __tsan_destroy_fiber(void* fiber) __attribute__((weak));
void __tsan_switch_to_fiber(void* fiber, unsigned flags) __attribute__((weak));
void __tsan_set_fiber_name(void* fiber, const char* name) __attribute__((weak));
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size) __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old)
    __attribute__((weak));
void __asan_poison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
void __tsan_ignore_thread_begin(void) __attribute__((weak));
void __tsan_ignore_thread_end(void) __attribute__((weak));
void __asan_unpoison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
}

namespace emu {
thread_local ThreadInfo* t_cur = nullptr;

namespace {
constexpr unsigned kNoSync = 1;  // __tsan_switch_to_fiber_no_sync: a switch is not a synchronisation
bool tsan() { return __tsan_create_fiber != nullptr; }
void tsan_release(void* a) {
  if (__tsan_release) __tsan_release(a);
}
void tsan_acquire(void* a) {
  if (__tsan_acquire) __tsan_acquire(a);
}
// bookkeeping of the host side that TSan must not see as memory accesses (mmap inside an ignore region gives the
// range fresh shadow instead of an imitated write)
struct TsanIgnore {
  TsanIgnore() {
    if (__tsan_ignore_thread_begin) __tsan_ignore_thread_begin();
  }
  ~TsanIgnore() {
    if (__tsan_ignore_thread_end) __tsan_ignore_thread_end();
  }
};
void asan_poison(void* p, size_t n) {
  if (__asan_poison_memory_region) __asan_poison_memory_region(p, n);
}
void asan_unpoison(void* p, size_t n) {
  if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(p, n);
}
// memcpy/memset through a pointer: always the (sanitizer-intercepted) library call, so the sanitizers see the
// cp.async writes as writes by the issuing CUDA thread
void* (*volatile g_memcpy)(void*, const void*, size_t) = std::memcpy;
void* (*volatile g_memset)(void*, int, size_t) = std::memset;

// ---------------------------------------------------------------------------------------------- context switch
// A CUDA thread switches at every barrier and warp collective, so the switch is the emulator's hot path. On x86-64
// it is a hand-written switch of the callee-saved registers, MXCSR and the x87 control word (about 20 ns);
// glibc's swapcontext also saves the signal mask with a system call (about 1 us). Elsewhere: swapcontext.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
extern "C" void pimoe_emu_context_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl pimoe_emu_context_switch
  .hidden pimoe_emu_context_switch
  .type pimoe_emu_context_switch, @function
pimoe_emu_context_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size pimoe_emu_context_switch, .-pimoe_emu_context_switch
)");
void context_switch(Context* save, Context* load) { pimoe_emu_context_switch(&save->sp, load->sp); }
// A new context "returns" into entry with the stack alignment of a fresh call (rsp % 16 == 8 at entry).
void context_init(Context* c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~static_cast<uintptr_t>(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 96);  // 16-byte aligned: fcw/mxcsr, 6 registers, entry, 0
  std::memset(frame, 0, 96);
  const uint32_t mxcsr = 0x1f80;  // round to nearest, all exceptions masked (the default environment)
  const uint16_t fcw = 0x037f;
  std::memcpy(reinterpret_cast<char*>(frame), &fcw, sizeof fcw);
  std::memcpy(reinterpret_cast<char*>(frame) + 8, &mxcsr, sizeof mxcsr);
  frame[8] = reinterpret_cast<uint64_t>(entry);  // popped by `ret`; entry never returns (frame[9] stays 0)
  c->sp = frame;
}
#else
struct Context {
  ucontext_t uc{};
};
void context_switch(Context* save, Context* load) { swapcontext(&save->uc, &load->uc); }
void context_init(Context* c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}
#endif

enum State { kRunnable, kWaitBar, kWaitWarp, kDone };
struct CpCopy {
  void* dst;
  const void* src;
  size_t bytes, src_bytes;
};
struct Fiber {
  ThreadInfo info{};
  Context ctx{};
  char* stack = nullptr;  // usable stack (above the guard page)
  size_t stack_size = 0;
  State state = kRunnable;
  uint64_t result = 0;
  void* tsan_fiber = nullptr;
  void* asan_fake = nullptr;
  const char* wait_file = "";
  int wait_line = 0;
  unsigned sync_gen = 0;  // barrier / __syncwarp generation this thread arrived at (TSan sync address)
  // warp collective slot
  bool w_arrived = false;
  int w_op = 0, w_arg = 0, w_width = 32, w_line = 0;
  unsigned w_mask = 0;
  uint64_t w_val = 0;
  const char* w_file = "";
  void* w_payload = nullptr;
  void (*w_fn)(void* const*, unsigned) = nullptr;
  const char* w_what = "";
  // cp.async: every copy issued and not yet landed, in issue order, from cp_copies[cp_run] on; cp_ends[g] ends
  // committed group g (groups before cp_group have been waited for). Vectors are cleared, never shrunk, so that
  // a pooled Fiber issues copies without heap allocations once warm (a launch allocates nothing on the host).
  std::vector<CpCopy> cp_copies;
  std::vector<size_t> cp_ends;
  size_t cp_run = 0, cp_group = 0;
  void cp_reset() {
    cp_copies.clear();
    cp_ends.clear();
    cp_run = cp_group = 0;
  }
};
struct SharedVar {
  const void* key;
  size_t off, bytes;
  const char* name;
};
struct Launch {
  void (*thunk)(void*);
  void* state;
  const char* name;
  const char* file;
  int line;
  dim3 grid, block;
  size_t dyn;
  size_t smem_limit;
  bool failed = false;
  bool warned_site = false, warned_exit = false;
  int reported = 0;
};
struct FiberSpan {  // the block's threads (Fiber objects are pooled: never freed while fibers may have read them)
  Fiber* p = nullptr;
  size_t n = 0;
  size_t size() const { return n; }
  Fiber* data() const { return p; }
  Fiber& operator[](size_t i) const { return p[i]; }
  Fiber* begin() const { return p; }
  Fiber* end() const { return p + n; }
};
struct Block {
  BlockInfo info{};
  FiberSpan fibers;
  int live = 0;
  int bar_arrived = 0, bar_kind = 0, bar_or = 0, bar_and = 1, bar_count = 0, bar_line = 0;
  unsigned bar_gen = 0, warp_gen[32] = {};
  const char* bar_file = "";
  unsigned char* smem = nullptr;
  size_t static_top = 0;
  SharedVar vars[64];  // no heap: allocations made from fiber context must not be freed by the host
  int nvars = 0;
  char* bar_sync = nullptr;   // TSan sync addresses: inside the block's own mapping under TSan, so that they
  char* warp_sync = nullptr;  // die with the block (no happens-before from one block to the next)
};

constexpr size_t kArena = 232 * 1024;
alignas(256) unsigned char g_arena[kArena];
constexpr size_t kStaticLimit = 48 * 1024;
constexpr size_t kDynDefault = 48 * 1024, kOptinMax = 227 * 1024;

thread_local Block* g_blk = nullptr;
thread_local Fiber* g_fib = nullptr;
thread_local Launch* g_launch = nullptr;
thread_local Context g_sched;
thread_local void* g_sched_tsan = nullptr;
thread_local void* g_sched_fake = nullptr;
thread_local const void* g_sched_bottom = nullptr;
thread_local size_t g_sched_size = 0;
char g_launch_sync, g_kernel_done;
// Host threads: the emulated device runs one kernel at a time. rt::launch holds g_device for the whole kernel (the
// shared-memory arena, the fiber and stack pools are the device's), so kernels launched from several host threads
// (two ONNX Runtime sessions, two streams) interleave launch by launch, never inside a launch. The last error is
// per host thread, the sticky error per device, as in CUDA.
std::mutex g_device;
thread_local cudaError_t g_last = cudaSuccess;
std::atomic<cudaError_t> g_sticky{cudaSuccess};
std::map<const void*, int> g_optin;  // guarded by g_device
std::atomic<int> g_errors{0}, g_warnings{0};

bool env_on(const char* n) {
  const char* v = std::getenv(n);
  return v != nullptr && *v != '\0' && *v != '0';
}

void vreport(const char* sev, const char* file, int line, const char* fmt, va_list ap) {
  char msg[1024];
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  if (g_launch != nullptr && g_fib != nullptr) {
    const auto& b = g_blk->info.bidx;
    const auto& t = g_fib->info.tidx;
    std::fprintf(stderr, "[cuda_emu] %s in %s block (%u,%u,%u) thread (%u,%u,%u) at %s:%d: %s\n", sev, g_launch->name,
                 b.x, b.y, b.z, t.x, t.y, t.z, file, line, msg);
  } else if (g_launch != nullptr) {
    std::fprintf(stderr, "[cuda_emu] %s in %s (launched at %s:%d): %s\n", sev, g_launch->name, g_launch->file,
                 g_launch->line, msg);
  } else {
    std::fprintf(stderr, "[cuda_emu] %s at %s:%d: %s\n", sev, file, line, msg);
  }
}
void warn(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
void warn(const char* file, int line, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vreport("warning", file, line, fmt, ap);
  va_end(ap);
  ++g_warnings;
}
void fail(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
void fail(const char* file, int line, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (g_launch == nullptr || g_launch->reported < 4) vreport("ERROR", file, line, fmt, ap);
  else if (g_launch->reported == 4) std::fprintf(stderr, "[cuda_emu] (further errors of this launch not shown)\n");
  if (g_launch != nullptr) ++g_launch->reported;
  va_end(ap);
  ++g_errors;
  if (g_launch != nullptr) g_launch->failed = true;
  if (env_on("EMU_ABORT_ON_ERROR")) std::abort();
}

// ---------------------------------------------------------------------------------------------- fibers
size_t stack_bytes() {
  const char* v = std::getenv("EMU_STACK_KB");
  const size_t kb = v != nullptr ? std::strtoul(v, nullptr, 10) : 256;
  return (kb < 64 ? 64 : kb) * 1024;
}
// Reused stacks (all builds but TSan, which must see a fresh mapping per CUDA thread: a reused stack would carry
// the previous thread's accesses into the next one's shadow). Under ASan a reused stack is unpoisoned first.
std::vector<char*> g_stack_pool;
void alloc_stack(Fiber& f) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE)), size = stack_bytes();
  if (!tsan() && !g_stack_pool.empty()) {
    f.stack = g_stack_pool.back();
    g_stack_pool.pop_back();
    f.stack_size = size;
    asan_unpoison(f.stack, size);
    return;
  }
  void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("[cuda_emu] mmap (fiber stack)");
    std::abort();
  }
  mprotect(p, page, PROT_NONE);  // guard page: a CUDA thread overflowing its stack faults instead of corrupting
  f.stack = static_cast<char*>(p) + page;
  f.stack_size = size;
}
void free_stack(Fiber& f) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (!tsan() && g_stack_pool.size() < 1024) {
    g_stack_pool.push_back(f.stack);
    f.stack = nullptr;
    return;
  }
  munmap(f.stack - page, f.stack_size + page);  // sanitizers reset their shadow of unmapped memory
  f.stack = nullptr;
}

// Order in which a block's threads run between synchronisation points (EMU_SCHEDULE): "warp-ahead" (default: the
// lowest warp runs until it blocks at a __syncthreads, then the next), "warp-ahead-reverse" (highest warp first),
// "round-robin" (every runnable thread in turn: warps in near lock-step).
enum class Schedule { kWarpAhead, kWarpAheadReverse, kRoundRobin };
Schedule schedule() {
  static const Schedule value = [] {
    const char* v = std::getenv("EMU_SCHEDULE");
    if (v == nullptr || std::strcmp(v, "warp-ahead") == 0) return Schedule::kWarpAhead;
    if (std::strcmp(v, "warp-ahead-reverse") == 0) return Schedule::kWarpAheadReverse;
    if (std::strcmp(v, "round-robin") == 0) return Schedule::kRoundRobin;
    std::fprintf(stderr, "[cuda_emu] EMU_SCHEDULE=%s is not one of warp-ahead, warp-ahead-reverse, round-robin\n", v);
    std::abort();
  }();
  return value;
}

void yield_to_scheduler() {
  Fiber* f = g_fib;
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(g_sched_tsan, kNoSync);
  if (__sanitizer_start_switch_fiber)
    __sanitizer_start_switch_fiber(f->state == kDone ? nullptr : &f->asan_fake, g_sched_bottom, g_sched_size);
  context_switch(&f->ctx, &g_sched);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(f->asan_fake, &g_sched_bottom, &g_sched_size);
}

// lands the copies [f->cp_run, end) of `f`
void run_copies(Fiber* f, size_t end) {
  for (; f->cp_run < end; ++f->cp_run) {
    const CpCopy& c = f->cp_copies[f->cp_run];
    if (c.src_bytes > 0) g_memcpy(c.dst, c.src, c.src_bytes);
    if (c.src_bytes < c.bytes) g_memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
  }
}

void maybe_release_barrier(Block* b) {
  if (b->bar_arrived == 0 || b->bar_arrived != b->live) return;
  if (static_cast<size_t>(b->live) < b->fibers.size() && !g_launch->warned_exit) {
    // whichever order the threads ran in: threads that exited never reach this barrier (non-uniform __syncthreads)
    g_launch->warned_exit = true;
    warn(b->bar_file, b->bar_line, "__syncthreads completed without the %zu thread(s) of the block that exited "
         "(non-uniform barrier)", b->fibers.size() - static_cast<size_t>(b->live));
  }
  const int r = b->bar_kind == rt::kBarOr ? b->bar_or
                : b->bar_kind == rt::kBarAnd ? b->bar_and
                : b->bar_kind == rt::kBarCount ? b->bar_count
                                               : 0;
  for (Fiber& f : b->fibers)
    if (f.state == kWaitBar) {
      f.result = static_cast<uint64_t>(r);
      f.state = kRunnable;
    }
  b->bar_arrived = 0;
  ++b->bar_gen;  // the next instance synchronises through the other address
}

bool complete_warp(Block* b, Fiber* a);

void on_exit(Fiber* f) {
  Block* b = g_blk;
  if (f->cp_run < f->cp_copies.size()) {
    warn(g_launch->file, g_launch->line, "thread exited with cp.async copies not waited for (they are completed now)");
    run_copies(f, f->cp_copies.size());
  }
  f->cp_reset();
  f->state = kDone;
  --b->live;
  if (b->bar_arrived > 0 && !g_launch->warned_exit) {
    g_launch->warned_exit = true;
    warn(b->bar_file, b->bar_line,
         "a thread exited while %d thread(s) of its block wait at this __syncthreads (non-uniform barrier)",
         b->bar_arrived);
  }
  maybe_release_barrier(b);
  // lanes waiting in a collective whose mask names this lane can never complete
  const unsigned warp = f->info.warp, lane = f->info.lane;
  for (unsigned j = 0; j < 32; ++j) {
    const size_t idx = warp * 32 + j;
    if (idx >= b->fibers.size()) break;
    Fiber& g = b->fibers[idx];
    if (g.state == kWaitWarp && (g.w_mask >> lane & 1u))
      fail(g.w_file, g.w_line, "warp collective with mask 0x%08x waits for lane %u, which has exited", g.w_mask, lane);
  }
}

void fiber_entry() {
  Fiber* f = g_fib;
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
  tsan_acquire(&g_launch_sync);  // everything the host did before the launch happens-before the kernel
  g_launch->thunk(g_launch->state);
  tsan_release(&g_kernel_done);  // ... and the kernel happens-before what the host does after it
  on_exit(f);
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

void switch_to(Fiber& f) {
  g_fib = &f;
  t_cur = &f.info;
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(f.tsan_fiber, kNoSync);
  if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(&g_sched_fake, f.stack, f.stack_size);
  context_switch(&g_sched, &f.ctx);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
  g_fib = nullptr;
  t_cur = nullptr;
}

const char* op_name(int op) {
  static const char* n[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__any_sync",
                            "__all_sync", "__ballot_sync", "__match_any_sync", "__match_all_sync", "__syncwarp",
                            "warp-uniform operation (WMMA)", "warp-level mma"};
  return op >= 0 && op <= rt::kCallback ? n[op] : "?";
}

void report_deadlock(Block* b) {
  std::string what;
  for (const Fiber& f : b->fibers) {
    if (f.state == kDone) continue;
    char line[256];
    if (f.state == kWaitBar)
      std::snprintf(line, sizeof line, "\n    thread %u (warp %u lane %u) waits at __syncthreads %s:%d",
                    static_cast<unsigned>(&f - b->fibers.data()), f.info.warp, f.info.lane, f.wait_file, f.wait_line);
    else
      std::snprintf(line, sizeof line, "\n    thread %u (warp %u lane %u) waits in %s mask 0x%08x at %s:%d",
                    static_cast<unsigned>(&f - b->fibers.data()), f.info.warp, f.info.lane, op_name(f.w_op), f.w_mask,
                    f.w_file, f.w_line);
    if (what.size() < 4000) what += line;
  }
  g_fib = nullptr;
  fail(g_launch->file, g_launch->line, "deadlock: no thread of block (%u,%u,%u) can proceed:%s", b->info.bidx.x,
       b->info.bidx.y, b->info.bidx.z, what.c_str());
}

std::vector<void*> g_retired;
std::vector<Fiber>& fiber_pool() {
  static std::vector<Fiber>* pool = [] {
    auto* v = new std::vector<Fiber>(1024);  // never reallocated, never freed
    return v;
  }();
  return *pool;
}

void run_block(Launch& L, uint3 bid) {
  Block b;
  b.info = {bid, L.block, L.grid};
  const unsigned n = L.block.x * L.block.y * L.block.z;
  b.fibers = {fiber_pool().data(), n};
  b.live = static_cast<int>(n);
  b.static_top = (L.dyn + 15) / 16 * 16;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (tsan()) {  // a fresh mapping per block: shared memory and sync objects start with clean TSan state
    TsanIgnore ig;
    void* p = mmap(nullptr, kArena + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    b.smem = static_cast<unsigned char*>(p);
    b.bar_sync = reinterpret_cast<char*>(p) + kArena;
    b.warp_sync = b.bar_sync + 64;
    std::memset(b.smem, 0xff, L.dyn + kStaticLimit < kArena ? L.dyn + kStaticLimit : kArena);
  } else {
    static char sync_bytes[256];
    b.smem = g_arena;
    b.bar_sync = sync_bytes;
    b.warp_sync = sync_bytes + 64;  // 2 per warp
    g_memset(g_arena, 0xff, L.dyn + kStaticLimit < kArena ? L.dyn + kStaticLimit : kArena);  // "uninitialised"
    asan_poison(g_arena, kArena);
    asan_unpoison(g_arena, L.dyn);
  }
  g_blk = &b;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.state = kRunnable;
    f.result = 0;
    f.asan_fake = nullptr;
    f.w_arrived = false;
    f.cp_reset();
    f.info.tidx = {t % L.block.x, (t / L.block.x) % L.block.y, t / (L.block.x * L.block.y)};
    f.info.lane = t % 32;
    f.info.warp = t / 32;
    f.info.blk = &b.info;
    {
      TsanIgnore ig;
      alloc_stack(f);
    }
    context_init(&f.ctx, f.stack, f.stack_size, fiber_entry);
    f.tsan_fiber = tsan() ? __tsan_create_fiber(0) : nullptr;
    if (f.tsan_fiber != nullptr && __tsan_set_fiber_name) {
      char nm[96];
      std::snprintf(nm, sizeof nm, "%s block (%u,%u,%u) thread (%u,%u,%u)", L.name, bid.x, bid.y, bid.z, f.info.tidx.x,
                    f.info.tidx.y, f.info.tidx.z);
      __tsan_set_fiber_name(f.tsan_fiber, nm);
    }
  }
  size_t done = 0;
  const Schedule policy = schedule();
  const unsigned warps = (n + 31) / 32;
  while (!L.failed) {
    bool ran = false;
    if (policy == Schedule::kRoundRobin) {
      for (Fiber& f : b.fibers) {
        if (f.state == kRunnable) {
          switch_to(f);
          ran = true;
          if (L.failed) break;
        }
      }
    } else {
      // one warp runs until none of its threads can proceed (all wait at a __syncthreads or have exited), then the
      // next: warps drift as far apart as CUDA allows, so a missing __syncthreads shows as wrong data, not only
      // under TSan
      for (unsigned i = 0; i < warps && !ran && !L.failed; ++i) {
        const unsigned w = policy == Schedule::kWarpAheadReverse ? warps - 1 - i : i;
        for (bool progress = true; progress && !L.failed;) {
          progress = false;
          for (unsigned j = w * 32; j < w * 32 + 32 && j < n && !L.failed; ++j)
            if (b.fibers[j].state == kRunnable) {
              switch_to(b.fibers[j]);
              progress = ran = true;
            }
        }
      }
    }
    if (L.failed) break;
    done = 0;
    for (const Fiber& f : b.fibers) done += f.state == kDone;
    if (done == n) break;
    if (!ran) {
      report_deadlock(&b);
      break;
    }
  }
  {
    TsanIgnore ig;
    // TSan fibers of the previous block are destroyed only now: TSan reuses the thread slots of destroyed
    // fibers, and a reused slot would hide races between consecutive blocks
    for (void* t : g_retired) __tsan_destroy_fiber(t);
    g_retired.clear();
    for (Fiber& f : b.fibers) {
      if (f.tsan_fiber != nullptr) g_retired.push_back(f.tsan_fiber);
      f.tsan_fiber = nullptr;
      free_stack(f);
    }
    if (tsan()) munmap(b.smem, kArena + page);
  }
  if (!tsan()) asan_unpoison(g_arena, kArena);
  g_blk = nullptr;
}

// warp collective completion: `a` has just arrived
bool complete_warp(Block* b, Fiber* a) {
  const unsigned m = a->w_mask, warp = a->info.warp;
  // lanes usually arrive in lane order: look at the lanes after `a` first, so that every arrival but the last stops
  // at its successor (O(1)) and the last one checks the whole mask once
  for (unsigned step = 1; step <= 32; ++step) {
    const unsigned j = (a->info.lane + step) & 31u;
    if (!(m >> j & 1u)) continue;
    const size_t idx = warp * 32 + j;
    if (idx >= b->fibers.size()) {
      fail(a->w_file, a->w_line, "%s: mask 0x%08x names lane %u, which does not exist (block of %zu threads)",
           op_name(a->w_op), m, j, b->fibers.size());
      return false;
    }
    Fiber& g = b->fibers[idx];
    if (g.state == kDone) {
      fail(a->w_file, a->w_line, "%s: mask 0x%08x names lane %u, which has exited", op_name(a->w_op), m, j);
      return false;
    }
    if (!g.w_arrived) return false;  // not there yet
    if (g.w_op != a->w_op || g.w_mask != m) {
      fail(a->w_file, a->w_line,
           "lanes of warp %u meet in different collectives: lane %u in %s mask 0x%08x (%s:%d), lane %u in %s mask "
           "0x%08x",
           warp, a->info.lane, op_name(a->w_op), m, a->w_file, a->w_line, j, op_name(g.w_op), g.w_mask);
      return false;
    }
  }
  auto lane = [&](unsigned j) -> Fiber& { return b->fibers[warp * 32 + j]; };
  uint64_t all = 0, any = 0, ballot = 0;
  bool all_true = true, uniform = true;
  const uint64_t first = a->w_val;
  for (unsigned j = 0; j < 32; ++j)
    if (m >> j & 1u) {
      const uint64_t v = lane(j).w_val;
      if (v) ballot |= 1ull << j;
      any |= v != 0;
      all_true = all_true && v != 0;
      uniform = uniform && v == first;
    }
  all = all_true;
  if (a->w_op == rt::kUniform && !uniform)
    fail(a->w_file, a->w_line, "%s: the lanes of warp %u disagree on pointer/ldm", a->w_what[0] ? a->w_what : "WMMA",
         warp);
  if (a->w_op == rt::kCallback) {
    void* payloads[32] = {};
    for (unsigned j = 0; j < 32; ++j)
      if (m >> j & 1u) payloads[j] = lane(j).w_payload;
    // the callback reads and writes the other lanes' fragments (their "registers", on their fiber stacks): emulator
    // bookkeeping, not memory traffic of the kernel, so TSan must not see it (and no happens-before edge is added
    // that could hide a real race of the kernel)
    TsanIgnore ig;
    a->w_fn(payloads, m);
  }
  for (unsigned j = 0; j < 32; ++j) {
    if (!(m >> j & 1u)) continue;
    Fiber& g = lane(j);
    const int w = g.w_width;
    const unsigned seg = j & ~static_cast<unsigned>(w - 1);
    unsigned src = j;
    switch (g.w_op) {
      case rt::kShflIdx: src = seg + (static_cast<unsigned>(g.w_arg) & static_cast<unsigned>(w - 1)); break;
      case rt::kShflUp: src = (static_cast<int>(j) - g.w_arg < static_cast<int>(seg)) ? j : j - g.w_arg; break;
      case rt::kShflDown: src = (j + g.w_arg >= seg + static_cast<unsigned>(w)) ? j : j + g.w_arg; break;
      case rt::kShflXor: src = ((j ^ static_cast<unsigned>(g.w_arg)) >= seg + static_cast<unsigned>(w)) ? j : (j ^ g.w_arg); break;
      default: break;
    }
    switch (g.w_op) {
      case rt::kShflIdx:
      case rt::kShflUp:
      case rt::kShflDown:
      case rt::kShflXor:
        if (!(m >> src & 1u)) {
          fail(g.w_file, g.w_line, "%s: lane %u reads lane %u, which is not in mask 0x%08x (undefined value)",
               op_name(g.w_op), j, src, m);
          g.result = 0;
        } else {
          g.result = lane(src).w_val;
        }
        break;
      case rt::kVoteAny: g.result = any; break;
      case rt::kVoteAll: g.result = all; break;
      case rt::kBallot: g.result = ballot; break;
      case rt::kMatchAny: {
        uint64_t r = 0;
        for (unsigned k = 0; k < 32; ++k)
          if ((m >> k & 1u) && lane(k).w_val == g.w_val) r |= 1ull << k;
        g.result = r;
        break;
      }
      case rt::kMatchAll: g.result = uniform ? m : 0; break;
      default: g.result = 0; break;
    }
  }
  for (unsigned j = 0; j < 32; ++j)
    if (m >> j & 1u) {
      lane(j).w_arrived = false;
      lane(j).state = kRunnable;
    }
  return true;
}

uint64_t warp_arrive(int op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line,
                     void* payload, void (*fn)(void* const*, unsigned), const char* what) {
  Fiber* f = g_fib;
  if (f == nullptr) {
    fail(file, line, "%s called outside a kernel", op_name(op));
    return 0;
  }
  if (!(mask >> f->info.lane & 1u)) {
    fail(file, line, "%s: the calling lane %u is not in mask 0x%08x", op_name(op), f->info.lane, mask);
    return 0;
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(file, line, "%s: width %d is not a power of two in [1, 32]", op_name(op), width);
    return 0;
  }
  f->w_arrived = true;
  f->w_op = op;
  f->w_mask = mask;
  f->w_val = value;
  f->w_arg = arg;
  f->w_width = width;
  f->w_file = file;
  f->w_line = line;
  f->w_payload = payload;
  f->w_fn = fn;
  f->w_what = what;
  f->state = kWaitWarp;
  Block* b = g_blk;
  const unsigned w = f->info.warp % 32;
  f->sync_gen = b->warp_gen[w];
  if (op == rt::kSyncWarp) tsan_release(&b->warp_sync[w * 2 + (f->sync_gen & 1)]);
  if (complete_warp(b, f) && op == rt::kSyncWarp) ++b->warp_gen[w];
  yield_to_scheduler();
  if (op == rt::kSyncWarp) tsan_acquire(&b->warp_sync[w * 2 + (f->sync_gen & 1)]);
  return f->result;
}
}  // namespace

namespace rt {
int barrier(int kind, int pred, const char* file, int line) {
  Fiber* f = g_fib;
  Block* b = g_blk;
  if (f == nullptr) {
    fail(file, line, "__syncthreads called outside a kernel");
    return 0;
  }
  if (b->bar_arrived == 0) {
    b->bar_kind = kind;
    b->bar_file = file;
    b->bar_line = line;
    b->bar_or = 0;
    b->bar_and = 1;
    b->bar_count = 0;
  } else {
    if ((b->bar_line != line || std::strcmp(b->bar_file, file) != 0) && !g_launch->warned_site) {
      g_launch->warned_site = true;
      warn(file, line, "threads of one block meet at different __syncthreads call sites (other: %s:%d)", b->bar_file,
           b->bar_line);
    }
    if (b->bar_kind != kind) fail(file, line, "threads of one block meet at different __syncthreads variants");
  }
  b->bar_or |= pred != 0;
  b->bar_and &= pred != 0;
  b->bar_count += pred != 0;
  ++b->bar_arrived;
  f->state = kWaitBar;
  f->wait_file = file;
  f->wait_line = line;
  // one sync address per barrier instance (two alternate): a thread resumed late must not acquire what
  // faster threads released at the NEXT barrier
  f->sync_gen = b->bar_gen;
  tsan_release(b->bar_sync + (f->sync_gen & 1));
  maybe_release_barrier(b);
  yield_to_scheduler();
  tsan_acquire(b->bar_sync + (f->sync_gen & 1));
  return static_cast<int>(f->result);
}

uint64_t warp_op(int op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  return warp_arrive(op, mask, value, arg, width, file, line, nullptr, nullptr, "");
}

void warp_callback(unsigned mask, void* payload, void (*fn)(void* const*, unsigned), const char* what, const char* file,
                   int line) {
  warp_arrive(kCallback, mask, 0, 0, 32, file, line, payload, fn, what);
}

void* shared_var(const void* key, size_t bytes, size_t align, const char* name) {
  Block* b = g_blk;
  if (b == nullptr) {
    fail("?", 0, "__shared__ variable %s used outside a kernel", name);
    std::abort();
  }
  for (int i = 0; i < b->nvars; ++i)
    if (b->vars[i].key == key) return b->smem + b->vars[i].off;
  size_t off = (b->static_top + align - 1) / align * align;
  const size_t dyn = (g_launch->dyn + 15) / 16 * 16;
  if (off + bytes - dyn > kStaticLimit) {
    fail(g_launch->file, g_launch->line, "static __shared__ memory exceeds 48 KiB (at %s, %zu bytes)", name, bytes);
    trap(g_launch->file, g_launch->line, "shared memory overflow");
  }
  if (b->nvars == 64) trap(g_launch->file, g_launch->line, "more than 64 __shared__ variables");
  b->vars[b->nvars++] = {key, off, bytes, name};
  b->static_top = off + bytes + 32;  // 32-byte red zone between variables (ASan catches overruns into it)
  asan_unpoison(b->smem + off, bytes);
  return b->smem + off;
}

void* dynamic_shared() { return g_blk != nullptr ? g_blk->smem : nullptr; }

void error(const char* file, int line, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (g_launch == nullptr || g_launch->reported < 4) vreport("ERROR", file, line, fmt, ap);
  if (g_launch != nullptr) ++g_launch->reported;
  va_end(ap);
  ++g_errors;
  if (g_launch != nullptr) g_launch->failed = true;
  if (env_on("EMU_ABORT_ON_ERROR")) std::abort();
}

void trap(const char* file, int line, const char* what) {
  fail(file, line, "%s: the kernel traps", what);
  Fiber* f = g_fib;
  if (f == nullptr) std::abort();
  f->state = kDone;  // this fiber is abandoned; the launch fails
  yield_to_scheduler();
  std::abort();
}

void cp_async(void* dst, const void* src, size_t bytes, size_t src_bytes, const char* file, int line) {
  Fiber* f = g_fib;
  if (bytes != 4 && bytes != 8 && bytes != 16)
    fail(file, line, "__pipeline_memcpy_async: size %zu is not 4, 8 or 16", bytes);
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    fail(file, line, "__pipeline_memcpy_async: dst %p / src %p not aligned to %zu bytes", dst, src, bytes);
  if (src_bytes > bytes) src_bytes = bytes;
  g_memset(dst, 0xff, bytes);  // contents undefined until the wait (a visible write for the sanitizers)
  f->cp_copies.push_back({dst, src, bytes, src_bytes});
}
void cp_commit() {
  Fiber* f = g_fib;
  f->cp_ends.push_back(f->cp_copies.size());
}
void cp_wait_prior(int n) {
  Fiber* f = g_fib;
  while (static_cast<int>(f->cp_ends.size() - f->cp_group) > n) run_copies(f, f->cp_ends[f->cp_group++]);
  if (f->cp_group == f->cp_ends.size() && f->cp_run == f->cp_copies.size()) f->cp_reset();
}

void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*thunk)(void*), void* state, const void* fn,
            const char* name, const char* file, int line) {
  std::lock_guard<std::mutex> device(g_device);
  if (g_sticky != cudaSuccess) {
    g_last = g_sticky;
    return;
  }
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  size_t limit = kDynDefault;
  auto it = g_optin.find(fn);
  if (it != g_optin.end()) limit = static_cast<size_t>(it->second);
  const char* bad = nullptr;
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) bad = "zero dimension";
  else if (threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) bad = "block too large";
  else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) bad = "grid too large";
  else if (smem > limit) bad = "dynamic shared memory above the limit (cudaFuncSetAttribute opt-in?)";
  if (bad != nullptr) {
    std::fprintf(stderr,
                 "[cuda_emu] launch of %s at %s:%d rejected: %s (grid %u,%u,%u block %u,%u,%u smem %zu): "
                 "cudaErrorInvalidConfiguration\n",
                 name, file, line, bad, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
    g_last = cudaErrorInvalidConfiguration;
    return;
  }
  Launch L{thunk, state, name, file, line, grid, block, smem, limit};
  g_launch = &L;
  if (tsan()) g_sched_tsan = __tsan_get_current_fiber();
  tsan_release(&g_launch_sync);
  for (unsigned z = 0; z < grid.z && !L.failed; ++z)
    for (unsigned y = 0; y < grid.y && !L.failed; ++y)
      for (unsigned x = 0; x < grid.x && !L.failed; ++x) run_block(L, {x, y, z});
  {
    TsanIgnore ig;
    for (void* t : g_retired) __tsan_destroy_fiber(t);
    g_retired.clear();
  }
  tsan_acquire(&g_kernel_done);
  g_launch = nullptr;
  if (L.failed) g_last = g_sticky = cudaErrorLaunchFailure;
}
}  // namespace rt

// ---------------------------------------------------------------------------------------------- inline PTX mma
namespace ptx {
namespace {
struct MmaF16 {
  uint32_t a[4], b[2];
  float c[4];
  float* d[4];
};
float h(uint32_t reg, int hi) { return f16_to_f32(static_cast<unsigned short>(hi ? reg >> 16 : reg & 0xffffu)); }
// PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type"
void mma_f16_all(void* const* p, unsigned) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaF16& f = *static_cast<const MmaF16*>(p[lane]);
    const int g = lane >> 2, t = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = h(f.a[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) B[t * 2 + (i & 1) + (i >= 2 ? 8 : 0)][g] = h(f.b[i / 2], i & 1);
    for (int i = 0; i < 4; ++i) C[i < 2 ? g : g + 8][t * 2 + (i & 1)] = f.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const MmaF16& f = *static_cast<const MmaF16*>(p[lane]);
    const int g = lane >> 2, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
      double s = C[row][col];
      for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
      *f.d[i] = static_cast<float>(s);
    }
  }
}
struct MmaS8 {
  uint32_t a[4], b[2];
  int c[4];
  int* d[4];
};
int s8(uint32_t reg, int byte) { return static_cast<int8_t>(static_cast<uint8_t>(reg >> (8 * byte))); }
// PTX ISA "Matrix Fragments for mma.m16n8k32" (.s8)
void mma_s8_all(void* const* p, unsigned) {
  int A[16][32], B[32][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaS8& f = *static_cast<const MmaS8*>(p[lane]);
    const int g = lane >> 2, t = lane % 4;
    for (int i = 0; i < 16; ++i) {
      const int row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8;
      const int col = t * 4 + (i & 3) + (i >= 8 ? 16 : 0);
      A[row][col] = s8(f.a[i / 4], i % 4);
    }
    for (int i = 0; i < 8; ++i) B[t * 4 + (i & 3) + (i >= 4 ? 16 : 0)][g] = s8(f.b[i / 4], i % 4);
    for (int i = 0; i < 4; ++i) C[i < 2 ? g : g + 8][t * 2 + (i & 1)] = f.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const MmaS8& f = *static_cast<const MmaS8*>(p[lane]);
    const int g = lane >> 2, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
      int64_t s = C[row][col];
      for (int k = 0; k < 32; ++k) s += static_cast<int64_t>(A[row][k]) * B[k][col];
      *f.d[i] = static_cast<int>(static_cast<uint32_t>(s));
    }
  }
}
}  // namespace

void mma_m16n8k16_f32_f16_f16_f32(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                                   uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3,
                                   const char* f, int l) {
  MmaF16 m{{a0, a1, a2, a3}, {b0, b1}, {c0, c1, c2, c3}, {&d0, &d1, &d2, &d3}};
  rt::warp_callback(0xffffffffu, &m, mma_f16_all, "mma.sync.m16n8k16", f, l);
}
void mma_m16n8k32_s32_s8_s8_s32(int& d0, int& d1, int& d2, int& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                uint32_t b0, uint32_t b1, int c0, int c1, int c2, int c3, const char* f, int l) {
  MmaS8 m{{a0, a1, a2, a3}, {b0, b1}, {c0, c1, c2, c3}, {&d0, &d1, &d2, &d3}};
  rt::warp_callback(0xffffffffu, &m, mma_s8_all, "mma.sync.m16n8k32", f, l);
}
}  // namespace ptx

int error_count() { return g_errors.load(); }
int warning_count() { return g_warnings.load(); }
}  // namespace emu

// ---------------------------------------------------------------------------------------------- runtime API
using emu::g_last;
using emu::g_sticky;
cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = g_sticky.load();
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_last; }
const char* cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (cuda_emu: see its report on stderr)";
    default: return "cuda_emu error";
  }
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev) {
  if (dev != 0) return cudaErrorInvalidDevice;
  const char* sms = std::getenv("EMU_SM_COUNT");
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = sms != nullptr ? std::atoi(sms) : 132; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *v = 32; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 227 * 1024; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaMalloc(void** p, size_t n) {
  // exactly n bytes (256-aligned, like cudaMalloc): under ASan the byte after the buffer is already a red zone
  if (posix_memalign(p, 256, n > 0 ? n : 1) != 0) return cudaErrorMemoryAllocation;
  // device memory starts out as garbage, and not the same garbage every time: the fill byte cycles through NaN
  // patterns (0xFF), zeros and 0x5A, so a kernel that reads memory nobody wrote gives results that differ between
  // two otherwise identical runs (the determinism tests see it) and usually from the reference
  static std::atomic<unsigned> calls{0};
  static const unsigned char fills[3] = {0xff, 0x00, 0x5a};
  std::memset(*p, fills[calls++ % 3], n);
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  std::memset(p, v, n);
  return g_sticky;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  if (g_sticky != cudaSuccess) return g_sticky;
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  if (g_sticky != cudaSuccess) return g_sticky;
  std::memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t) {
  return cudaMemcpy(d, s, n, k);
}
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new char);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<char*>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return g_sticky; }
cudaError_t cudaDeviceSynchronize() { return g_sticky; }
cudaError_t cudaDeviceReset() {
  std::lock_guard<std::mutex> device(emu::g_device);  // waits for a kernel another host thread runs
  g_sticky = cudaSuccess;
  g_last = cudaSuccess;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttributeImpl(const void* fn, cudaFuncAttribute a, int v) {
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 || v > 227 * 1024) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> device(emu::g_device);
  emu::g_optin[fn] = v;
  return cudaSuccess;
}
