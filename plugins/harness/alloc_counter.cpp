// libpimoe_alloc_counter.so: a counting allocator for the harness's allocation test (LD_PRELOAD it). Every heap
// allocation entry point of glibc is wrapped and forwards to glibc's own implementation (__libc_*); the calling
// thread's count is read with pimoe_alloc_counter_thread_count(), which pimoe_harness_enqueue_counting_allocations
// (pimoe_harness.h) finds with dlsym. glibc only; plain C symbols, no C++ runtime use.
#include <cerrno>
#include <cstddef>

#define PIMOE_ALLOC_EXPORT extern "C" __attribute__((visibility("default")))

extern "C" {
void* __libc_malloc(size_t);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
void __libc_free(void*);
}

namespace {

// initial-exec: no __tls_get_addr (which may itself allocate) inside malloc; the library is preloaded, so its TLS is
// in the static block
__thread unsigned long long t_count __attribute__((tls_model("initial-exec")));
}  // namespace

PIMOE_ALLOC_EXPORT unsigned long long pimoe_alloc_counter_thread_count(void) { return t_count; }

PIMOE_ALLOC_EXPORT void* malloc(size_t n) noexcept {
  ++t_count;
  return __libc_malloc(n);
}
PIMOE_ALLOC_EXPORT void* calloc(size_t n, size_t size) noexcept {
  ++t_count;
  return __libc_calloc(n, size);
}
PIMOE_ALLOC_EXPORT void* realloc(void* p, size_t n) noexcept {
  ++t_count;
  return __libc_realloc(p, n);
}
PIMOE_ALLOC_EXPORT void free(void* p) noexcept { __libc_free(p); }
PIMOE_ALLOC_EXPORT void* memalign(size_t align, size_t n) noexcept {
  ++t_count;
  return __libc_memalign(align, n);
}
PIMOE_ALLOC_EXPORT void* aligned_alloc(size_t align, size_t n) noexcept {
  ++t_count;
  return __libc_memalign(align, n);
}
PIMOE_ALLOC_EXPORT int posix_memalign(void** out, size_t align, size_t n) noexcept {
  ++t_count;
  if (align % sizeof(void*) != 0 || (align & (align - 1)) != 0) return EINVAL;
  void* p = __libc_memalign(align, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
