#include "memory/kv_memory.h"

#include <algorithm>
#include <cstring>

#include "util/half.h"

namespace ll {

KVMemory::KVMemory(int heads, int head_dim, MemDType dtype)
    : heads_(heads), head_dim_(head_dim), dtype_(dtype), elem_(dtype == MemDType::F32 ? 4 : 2) {}

size_t KVMemory::bytes() const { return size_t(size_) * heads_ * head_dim_ * elem_ * 2; }

namespace {

void store(MemDType t, const float* src, int n, uint8_t* dst) {
  switch (t) {
    case MemDType::F32: std::memcpy(dst, src, size_t(n) * 4); break;
    case MemDType::BF16: {
      auto* d = reinterpret_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      break;
    }
    case MemDType::F16: {
      auto* d = reinterpret_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      break;
    }
  }
}

void load(MemDType t, const uint8_t* src, int n, float* dst) {
  switch (t) {
    case MemDType::F32: std::memcpy(dst, src, size_t(n) * 4); break;
    case MemDType::BF16: {
      auto* s = reinterpret_cast<const uint16_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      break;
    }
    case MemDType::F16: {
      auto* s = reinterpret_cast<const uint16_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      break;
    }
  }
}

}  // namespace

void KVMemory::append(const float* k, const float* v, int n, int ld) {
  const size_t head_bytes = size_t(kChunkTokens) * head_dim_ * elem_;
  for (int t = 0; t < n; ++t, ++size_) {
    const int64_t slot = size_ % kChunkTokens;
    if (slot == 0) {
      auto c = std::make_shared<Chunk>();
      c->k.resize(head_bytes * heads_);
      c->v.resize(head_bytes * heads_);
      chunks_.push_back(std::move(c));
    } else if (chunks_.back().use_count() > 1) {
      chunks_.back() = std::make_shared<Chunk>(*chunks_.back());  // copy-on-write of a shared tail
    }
    Chunk& c = *chunks_.back();
    for (int h = 0; h < heads_; ++h) {
      const size_t off = h * head_bytes + size_t(slot) * head_dim_ * elem_;
      store(dtype_, k + int64_t(t) * ld + h * head_dim_, head_dim_, c.k.data() + off);
      store(dtype_, v + int64_t(t) * ld + h * head_dim_, head_dim_, c.v.data() + off);
    }
  }
}

KVBlock KVMemory::block(int h, int64_t start, int max_n) const {
  const DType t0 = dtype_ == MemDType::F32 ? DType::F32 : dtype_ == MemDType::BF16 ? DType::BF16 : DType::F16;
  if (start >= size_ || max_n <= 0) return {t0, nullptr, nullptr, 0};
  const Chunk& c = *chunks_[start / kChunkTokens];
  const int slot = int(start % kChunkTokens);
  const int n = int(std::min<int64_t>({int64_t(max_n), int64_t(kChunkTokens - slot), size_ - start}));
  const size_t off = size_t(h) * kChunkTokens * head_dim_ * elem_ + size_t(slot) * head_dim_ * elem_;
  const DType t = dtype_ == MemDType::F32 ? DType::F32 : dtype_ == MemDType::BF16 ? DType::BF16 : DType::F16;
  return {t, c.k.data() + off, c.v.data() + off, n};
}

const void* KVMemory::value_row(int h, int64_t t) const {
  const Chunk& c = *chunks_[t / kChunkTokens];
  return c.v.data() + size_t(h) * kChunkTokens * head_dim_ * elem_ + size_t(t % kChunkTokens) * head_dim_ * elem_;
}

void KVMemory::read(int h, int64_t start, int count, float* kout, float* vout) const {
  const size_t head_bytes = size_t(kChunkTokens) * head_dim_ * elem_;
  while (count > 0) {
    const Chunk& c = *chunks_[start / kChunkTokens];
    const int slot = int(start % kChunkTokens);
    const int n = std::min(count, kChunkTokens - slot);
    const size_t off = h * head_bytes + size_t(slot) * head_dim_ * elem_;
    load(dtype_, c.k.data() + off, n * head_dim_, kout);
    load(dtype_, c.v.data() + off, n * head_dim_, vout);
    kout += int64_t(n) * head_dim_;
    vout += int64_t(n) * head_dim_;
    start += n;
    count -= n;
  }
}

}  // namespace ll
