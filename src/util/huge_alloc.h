#pragma once
// Memory for large read-mostly arrays (weights, memory chunks): 2 MiB aligned and advised to use
// transparent huge pages, which this kind of machine gives only on request; it reads ~1.5x
// faster than 4 KiB pages (see ../shared/MACHINE.md).
#include <sys/mman.h>

#include <cstdlib>
#include <memory>
#include <new>

namespace ll {

inline std::shared_ptr<uint8_t> alloc_huge(size_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  if (size == 0) return std::shared_ptr<uint8_t>(new uint8_t[1], std::default_delete<uint8_t[]>());
  if (posix_memalign(&p, kHuge, size) != 0) throw std::bad_alloc();
  madvise(p, size, MADV_HUGEPAGE);
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
}

}  // namespace ll
