#pragma once
// The external memory of one memory layer: the (key, value) pairs of all earlier text, per head,
// stored in mem_dtype (bf16 by default, rounded to nearest even like torch's .to()). Keys are the
// raw k_proj outputs: "rotated as if at position 0", which is the identity.
// Storage is chunked so that growing to millions of tokens never copies what is already there.
#include <cstdint>
#include <memory>
#include <vector>

#include "model/config.h"
#include "ops/attention.h"

namespace ll {

class KVMemory {
 public:
  static constexpr int kChunkTokens = 1024;

  KVMemory(int heads, int head_dim, MemDType dtype);

  int64_t size() const { return size_; }
  int heads() const { return heads_; }
  int head_dim() const { return head_dim_; }
  MemDType dtype() const { return dtype_; }
  size_t bytes() const;  // storage in use (keys + values)

  // Appends n tokens; row t of k and v holds all heads (head h at offset h*head_dim), stride ld.
  void append(const float* k, const float* v, int n, int ld);
  // Copies keys and values [start, start+count) of head h to float32 ([count][head_dim] each).
  void read(int h, int64_t start, int count, float* kout, float* vout) const;
  // Zero-copy view of head h's keys/values from `start`: at most max_n tokens, never crossing a
  // chunk (storage is contiguous within one).
  KVBlock block(int h, int64_t start, int max_n) const;
  // One token's value row of head h as float32.
  void value_f32(int h, int64_t t, float* out) const;
  // Storage of one token's value row of head h (type: block(...).type; not for Q8 memory).
  const void* value_row(int h, int64_t t) const;

 private:
  struct Chunk {
    std::shared_ptr<uint8_t> owner;  // the slab that holds k and v
    uint8_t* k = nullptr;            // [heads][kChunkTokens][head_dim] of dtype
    uint8_t* v = nullptr;
    std::vector<float> ks, vs;  // Q8 only: [heads][kChunkTokens] row scales
  };
  // Chunks are carved from 2 MiB-aligned slabs advised to use huge pages: the memory is read
  // once per generated token, and streams ~1.5x faster from huge pages (../shared/MACHINE.md).
  // A copy of the memory starts a fresh slab, so two copies never hand out the same bytes.
  struct SlabArena {
    SlabArena() = default;
    SlabArena(const SlabArena&) {}
    SlabArena& operator=(const SlabArena&) {
      slab.reset();
      used = size = 0;
      return *this;
    }
    std::shared_ptr<uint8_t> slab;
    size_t used = 0, size = 0;
  };
  std::shared_ptr<Chunk> new_chunk();
  void store_row(const float* x, uint8_t* q, float* scale) const;
  void load_rows(const uint8_t* q, const float* scale, int rows, float* out) const;
  int heads_, head_dim_;
  MemDType dtype_;
  size_t elem_;
  int64_t size_ = 0;
  std::vector<std::shared_ptr<Chunk>> chunks_;  // full chunks are immutable: copies share them
  SlabArena arena_;
};

}  // namespace ll
