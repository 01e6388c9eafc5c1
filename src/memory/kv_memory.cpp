#include "memory/kv_memory.h"

#include <algorithm>
#include <cstring>

#include "ops/quant.h"

namespace ll {

KVMemory::KVMemory(int heads, int head_dim, MemDType dtype)
    : heads_(heads), head_dim_(head_dim), dtype_(dtype), elem_(dtype == MemDType::F32 ? 4 : 2) {}

size_t KVMemory::bytes() const { return size_t(size_) * heads_ * head_dim_ * elem_ * 2; }

namespace {

DType storage_type(MemDType t) {
  return t == MemDType::F32 ? DType::F32 : t == MemDType::BF16 ? DType::BF16 : DType::F16;
}

// Rounds like torch's .to(): nearest even (quantize_row's plain types).
void store(MemDType t, const float* src, int n, uint8_t* dst) { quantize_row(storage_type(t), src, n, dst); }
void load(MemDType t, const uint8_t* src, int n, float* dst) { dequantize_row(storage_type(t), src, n, dst); }

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
  if (start >= size_ || max_n <= 0) return {storage_type(dtype_), nullptr, nullptr, 0};
  const Chunk& c = *chunks_[start / kChunkTokens];
  const int slot = int(start % kChunkTokens);
  const int n = int(std::min<int64_t>({int64_t(max_n), int64_t(kChunkTokens - slot), size_ - start}));
  const size_t off = size_t(h) * kChunkTokens * head_dim_ * elem_ + size_t(slot) * head_dim_ * elem_;
  return {storage_type(dtype_), c.k.data() + off, c.v.data() + off, n};
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
