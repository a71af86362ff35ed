// A cache of large CPU output blocks.
//
// The fused losses write gradients as large as the logits. Fresh memory costs a page fault per page, and
// the kernel zeroes every page it hands out: on the machines measured, faulting in a new 125 MiB gradient
// took a fifth of the PTLoss step (more than the step's own reads from DRAM). Two remedies:
//   * blocks are 2 MiB aligned and advised MADV_HUGEPAGE (512x fewer faults; torch's allocator does this
//     only with THP_MEM_ALLOC_ENABLE=1);
//   * a freed block is kept and handed to the next request of the same size, so a training loop, which
//     asks for the same gradient shape every step, faults its gradient in once.
// The cache holds at most kMaxBlocks free blocks and at most TGTFAST_CPU_CACHE_MB MiB (default 2048; 0 turns
// caching off). tgtfast.empty_cpu_cache() frees what it holds.
#include "cpu_buffers.h"

#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tgtfast {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinBytes = 2 * kHuge;
constexpr size_t kMaxBlocks = 4;

size_t cache_limit_bytes() {
  static const size_t limit = [] {
    const char* env = std::getenv("TGTFAST_CPU_CACHE_MB");
    if (env == nullptr || *env == '\0') return size_t(2048) << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    return (end != env && mb > 0) ? static_cast<size_t>(mb) << 20 : size_t(0);
  }();
  return limit;
}

struct Cache {
  std::mutex mu;
  std::deque<std::pair<size_t, void*>> free_blocks;  // (bytes, block), oldest first
  size_t bytes = 0;
};

// Never destroyed: tensors that outlive static destruction at exit still return their blocks here.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

void* take_cached(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto it = c.free_blocks.rbegin(); it != c.free_blocks.rend(); ++it) {
    if (it->first == bytes) {
      void* p = it->second;
      c.bytes -= bytes;
      c.free_blocks.erase(std::next(it).base());
      return p;
    }
  }
  return nullptr;
}

void give_back(size_t bytes, void* p) {
  const size_t limit = cache_limit_bytes();
  if (bytes <= limit) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    while (!c.free_blocks.empty() && (c.free_blocks.size() >= kMaxBlocks || c.bytes + bytes > limit)) {
      std::free(c.free_blocks.front().second);
      c.bytes -= c.free_blocks.front().first;
      c.free_blocks.pop_front();
    }
    c.free_blocks.emplace_back(bytes, p);
    c.bytes += bytes;
    return;
  }
  std::free(p);
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes >= kMinBytes) {
    const size_t padded = (nbytes + kHuge - 1) / kHuge * kHuge;
    void* ptr = take_cached(padded);
    if (ptr == nullptr) {
      if (posix_memalign(&ptr, kHuge, padded) != 0) return at::empty(sizes, options);
      madvise(ptr, padded, MADV_HUGEPAGE);  // advisory: a refusal only costs speed
    }
    return at::from_blob(ptr, sizes, [padded](void* p) { give_back(padded, p); }, options);
  }
#endif
  return at::empty(sizes, options);
}

int64_t release_cached_buffers() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const size_t released = c.bytes;
  for (auto& block : c.free_blocks) std::free(block.second);
  c.free_blocks.clear();
  c.bytes = 0;
  return static_cast<int64_t>(released);
}

int64_t cached_buffer_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return static_cast<int64_t>(c.bytes);
}

}  // namespace tgtfast
