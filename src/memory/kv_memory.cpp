#include "memory/kv_memory.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ops/quant.h"
#include "util/huge_alloc.h"

namespace ll {

KVMemory::KVMemory(int heads, int head_dim, MemDType dtype)
    : heads_(heads), head_dim_(head_dim), dtype_(dtype), elem_(dtype == MemDType::F32 ? 4 : dtype == MemDType::Q8 ? 1 : 2) {}

size_t KVMemory::bytes() const {
  const size_t row = size_t(head_dim_) * elem_ + (dtype_ == MemDType::Q8 ? sizeof(float) : 0);
  return size_t(size_) * heads_ * row * 2;
}

namespace {

DType storage_type(MemDType t) {
  switch (t) {
    case MemDType::F32: return DType::F32;
    case MemDType::BF16: return DType::BF16;
    case MemDType::F16: return DType::F16;
    case MemDType::Q8: return DType::I8;
  }
  return DType::F32;
}

}  // namespace

// One row: rounded like torch's .to() (nearest even) for the float types; Q8 keeps max|x|/127
// as the row's scale and round(x / scale) as int8.
void KVMemory::store_row(const float* x, uint8_t* q, float* scale) const {
  if (dtype_ != MemDType::Q8) return quantize_row(storage_type(dtype_), x, head_dim_, q);
  float amax = 0.0f;
  for (int e = 0; e < head_dim_; ++e) amax = std::max(amax, std::fabs(x[e]));
  const float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
  // std::lround (half away from zero) written out inline: it was a libm call per element (a fifth
  // of a q8 append's time). y - trunc(y) is exact, so the results are the same.
  for (int e = 0; e < head_dim_; ++e) {
    const float y = x[e] * inv, t = std::trunc(y);
    reinterpret_cast<int8_t*>(q)[e] = int8_t(t + (std::fabs(y - t) >= 0.5f ? std::copysign(1.0f, y) : 0.0f));
  }
  *scale = s;
}

void KVMemory::load_rows(const uint8_t* q, const float* scale, int rows, float* out) const {
  if (dtype_ != MemDType::Q8) return dequantize_row(storage_type(dtype_), q, int64_t(rows) * head_dim_, out);
  for (int r = 0; r < rows; ++r)
    for (int e = 0; e < head_dim_; ++e)
      out[size_t(r) * head_dim_ + e] = float(reinterpret_cast<const int8_t*>(q)[size_t(r) * head_dim_ + e]) * scale[r];
}

std::shared_ptr<KVMemory::Chunk> KVMemory::new_chunk() {
  constexpr size_t kSlabBytes = size_t(32) << 20;
  constexpr size_t kAlign = 64;
  const size_t half = (size_t(kChunkTokens) * head_dim_ * elem_ * heads_ + kAlign - 1) / kAlign * kAlign;
  if (!arena_.slab || arena_.size - arena_.used < 2 * half) {
    arena_.size = std::max(kSlabBytes, 2 * half);
    arena_.slab = alloc_huge(arena_.size);
    arena_.used = 0;
  }
  auto c = std::make_shared<Chunk>();
  c->owner = arena_.slab;
  c->k = arena_.slab.get() + arena_.used;
  c->v = c->k + half;
  arena_.used += 2 * half;
  std::memset(c->k, 0, 2 * half);
  if (dtype_ == MemDType::Q8) {
    c->ks.resize(size_t(heads_) * kChunkTokens);
    c->vs.resize(size_t(heads_) * kChunkTokens);
  }
  return c;
}

void KVMemory::append(const float* k, const float* v, int n, int ld) {
  const size_t head_bytes = size_t(kChunkTokens) * head_dim_ * elem_;
  for (int t = 0; t < n; ++t, ++size_) {
    const int64_t slot = size_ % kChunkTokens;
    if (slot == 0) {
      chunks_.push_back(new_chunk());
    } else if (chunks_.back().use_count() > 1) {  // copy-on-write of a shared tail
      auto c = new_chunk();
      const Chunk& old = *chunks_.back();
      std::memcpy(c->k, old.k, head_bytes * heads_);
      std::memcpy(c->v, old.v, head_bytes * heads_);
      c->ks = old.ks;
      c->vs = old.vs;
      chunks_.back() = std::move(c);
    }
    Chunk& c = *chunks_.back();
    for (int h = 0; h < heads_; ++h) {
      const size_t off = h * head_bytes + size_t(slot) * head_dim_ * elem_;
      const size_t si = size_t(h) * kChunkTokens + size_t(slot);
      const bool q8 = dtype_ == MemDType::Q8;
      store_row(k + int64_t(t) * ld + h * head_dim_, c.k + off, q8 ? &c.ks[si] : nullptr);
      store_row(v + int64_t(t) * ld + h * head_dim_, c.v + off, q8 ? &c.vs[si] : nullptr);
    }
  }
}

KVBlock KVMemory::block(int h, int64_t start, int max_n) const {
  if (start >= size_ || max_n <= 0) return {storage_type(dtype_), nullptr, nullptr, 0};
  const Chunk& c = *chunks_[start / kChunkTokens];
  const int slot = int(start % kChunkTokens);
  const int n = int(std::min<int64_t>({int64_t(max_n), int64_t(kChunkTokens - slot), size_ - start}));
  const size_t off = size_t(h) * kChunkTokens * head_dim_ * elem_ + size_t(slot) * head_dim_ * elem_;
  KVBlock b{storage_type(dtype_), c.k + off, c.v + off, n};
  if (dtype_ == MemDType::Q8) {
    b.k_scale = &c.ks[size_t(h) * kChunkTokens + size_t(slot)];
    b.v_scale = &c.vs[size_t(h) * kChunkTokens + size_t(slot)];
  }
  return b;
}

void KVMemory::value_f32(int h, int64_t t, float* out) const {
  const Chunk& c = *chunks_[t / kChunkTokens];
  const size_t slot = size_t(t % kChunkTokens);
  const float* scale = dtype_ == MemDType::Q8 ? &c.vs[size_t(h) * kChunkTokens + slot] : nullptr;
  load_rows(c.v + size_t(h) * kChunkTokens * head_dim_ * elem_ + slot * head_dim_ * elem_, scale, 1, out);
}

const void* KVMemory::value_row(int h, int64_t t) const {
  const Chunk& c = *chunks_[t / kChunkTokens];
  return c.v + size_t(h) * kChunkTokens * head_dim_ * elem_ + size_t(t % kChunkTokens) * head_dim_ * elem_;
}

void KVMemory::read(int h, int64_t start, int count, float* kout, float* vout) const {
  const size_t head_bytes = size_t(kChunkTokens) * head_dim_ * elem_;
  while (count > 0) {
    const Chunk& c = *chunks_[start / kChunkTokens];
    const int slot = int(start % kChunkTokens);
    const int n = std::min(count, kChunkTokens - slot);
    const size_t off = h * head_bytes + size_t(slot) * head_dim_ * elem_;
    const size_t si = size_t(h) * kChunkTokens + size_t(slot);
    const bool q8 = dtype_ == MemDType::Q8;
    load_rows(c.k + off, q8 ? &c.ks[si] : nullptr, n, kout);
    load_rows(c.v + off, q8 ? &c.vs[si] : nullptr, n, vout);
    kout += int64_t(n) * head_dim_;
    vout += int64_t(n) * head_dim_;
    start += n;
    count -= n;
  }
}

}  // namespace ll
