#include "memory/kv_memory.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "hwy/highway.h"
#include "ops/quant.h"
#include "util/huge_alloc.h"

namespace hn = hwy::HWY_NAMESPACE;

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
  const hn::ScalableTag<float> d;
  const hn::Rebind<int32_t, decltype(d)> di;
  const hn::Rebind<int8_t, decltype(d)> d8;
  const int N = int(hn::Lanes(d)), D = head_dim_, Dv = D / N * N;
  auto vmax = hn::Zero(d);
  for (int e = 0; e < Dv; e += N) vmax = hn::Max(vmax, hn::Abs(hn::LoadU(d, x + e)));
  float amax = hn::GetLane(hn::MaxOfLanes(d, vmax));
  for (int e = Dv; e < D; ++e) amax = std::max(amax, std::fabs(x[e]));
  const float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
  // Half away from zero, as std::lround, without a libm call per element (it was a fifth of a q8
  // append's time) and 8 at a time (the scalar loop was ~4 ns an element): y - trunc(y) is exact,
  // and the vector and tail loops do the same operations, so every element gets lround's result.
  auto* out = reinterpret_cast<int8_t*>(q);
  const auto vinv = hn::Set(d, inv), half = hn::Set(d, 0.5f), one = hn::Set(d, 1.0f);
  for (int e = 0; e < Dv; e += N) {
    const auto y = hn::Mul(hn::LoadU(d, x + e), vinv), t = hn::Trunc(y);
    const auto r = hn::Add(t, hn::IfThenElseZero(hn::Ge(hn::Abs(hn::Sub(y, t)), half), hn::CopySign(one, y)));
    hn::StoreU(hn::DemoteTo(d8, hn::ConvertTo(di, r)), d8, out + e);
  }
  for (int e = Dv; e < D; ++e) {
    const float y = x[e] * inv, t = std::trunc(y);
    out[e] = int8_t(t + (std::fabs(y - t) >= 0.5f ? std::copysign(1.0f, y) : 0.0f));
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
