#pragma once
// Attention of one head's queries over any number of key/value blocks, with one running
// (online) softmax across all of them: the local window and the memory are just blocks, so a
// memory of millions of tokens never needs a [queries x memory] matrix. Scores are
// (q·k) / sqrt(D), as the official code computes them.
//  - many queries (prefill): scores and the value update are BLAS sgemm calls per block;
//  - few queries (decoding): fused SIMD loops read each key and value once, straight from its
//    storage type (bf16/f16 memory is widened in registers).
#include <cstdint>
#include <vector>

#include "io/tensor_store.h"

namespace ll {

struct KVBlock {
  DType type = DType::F32;  // F32, BF16 or F16; or I8 with one float scale per row (Q8 memory)
  const void* k = nullptr;  // n rows of D elements
  const void* v = nullptr;
  int n = 0;
  const float* k_scale = nullptr;  // I8 only: row r is k[r] * k_scale[r]
  const float* v_scale = nullptr;
};

// The block's keys and values as float32 rows ([n][D] each); a null k or v is skipped.
void kv_block_to_f32(const KVBlock& b, int D, float* k, float* v);

class HeadAttention {
 public:
  static constexpr int kGemmMinQueries = 16;
  // The bf16 decode kernel (AVX-512 or AVX2; on by default where built); off = the Highway path, for
  // tests and benchmarks that compare the two.
  static inline bool bf16_kernel = true;
  // How far ahead (bytes) the fused decode loops prefetch key/value rows; 0 = off (benchmarks).
  // 4 KiB: bench_kernels BM_MemoryAttentionOrder (8 KiB and more were slower once the kernel got
  // faster; prefetching into L2 instead of L1 made no difference).
  static inline int prefetch_bytes = 4096;

  // q: nq rows of D floats with row stride ldq (already rotated).
  HeadAttention(const float* q, int nq, int ldq, int D);
  // limit (optional): query i sees only keys j < limit[i] of this block (causal mask).
  void add(const KVBlock& b, const int* limit = nullptr);
  // add() in two passes, for fewer than kGemmMinQueries queries: add_keys scores the block's keys
  // and updates the softmax, add_values then reads its values (the same block and limit, before
  // the next add_keys). A caller with several heads can score all their keys of a memory chunk
  // before it reads their values: longer sequential runs, faster from DRAM (Session::attention).
  void add_keys(const KVBlock& b, const int* limit = nullptr);
  void add_values(const KVBlock& b, const int* limit = nullptr);
  // Adds n keys to query i's softmax whose scaled scores are already known (e.g. the top-k of
  // a memory), with their value rows in storage type vtype.
  void add_scored(int i, const float* scores, const void* const* values, int n, DType vtype);
  // out[i * ldo + d] = softmax-weighted sum of values.
  void finish(float* out, int ldo) const;

 private:
  void add_gemm(const float* k, const float* v, int n, const int* limit);
  void add_fused(const KVBlock& b, const int* limit);
  const float* q_;
  int nq_, ldq_, D_;
  float inv_sqrt_;
  float sqrt_d_;
  std::vector<float> max_, sum_, acc_;  // per query: running max, sum; [nq][D] weighted values
  std::vector<float> scores_, kbuf_, vbuf_, pscaled_;
  std::vector<float> rescale_;  // per query, from add_keys for add_values
};

// Exact top-k retrieval: scores every key of a sequence of blocks for each query, keeping the k
// highest (q·k)/sqrt(D) per query (ties: the earlier key).
class TopKScorer {
 public:
  struct Hit {
    float score;
    int64_t index;
  };
  TopKScorer(const float* q, int nq, int ldq, int D, int k);
  void add(const KVBlock& b, int64_t first_index);
  // Query i's hits, best first.
  std::vector<Hit> take(int i);

 private:
  void push(int i, float score, int64_t index);
  const float* q_;
  int nq_, ldq_, D_, k_;
  float sqrt_d_;
  std::vector<std::vector<Hit>> heaps_;  // min-heaps by score
  std::vector<float> scores_, kbuf_;
};

}  // namespace ll
