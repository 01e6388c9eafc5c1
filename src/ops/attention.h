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

// Scoring int8 keys (Q8 memory) with integer dot products: the query is rounded once to int16
// with one scale (max|q| / 32767: a step ~260x finer than the keys' max|k| / 127), so a score is
// an exact integer sum times two scales. Widening each int8 key element to float cost ~3 vector
// ops per 8 bytes; this is ~3 per 16 and reads Q8 memory near the bandwidth limit.
struct QueryI16 {
  // kMaxD: D · 128 · 32767 < 2^31, so a row's int32 sum cannot overflow.
  static constexpr int kMinD = 16, kMaxD = 512;
  std::vector<int16_t> q;  // [D] round(q / scale), half away from zero
  std::vector<int16_t> g;  // the kernel's layout: groups of 16 elements; a last partial group is
                           // [D-16, D) with the elements that earlier groups cover set to 0
  float scale = 0.0f;
  int D = 0;
  static bool supports(int D) { return D >= kMinD && D <= kMaxD; }
};
QueryI16 quantize_query_i16(const float* q, int D);
// s[j] = float(Σ_e q.q[e] · K[j][e]) · (q.scale · k_scale[j]) / sqrt_d for n rows of D int8
// elements; returns the largest s (-inf when n = 0). `simd` false: the plain loop (same bits).
float score_rows_i8(const QueryI16& q, const int8_t* K, const float* k_scale, int n, float sqrt_d, float* s,
                    bool simd = true);

class HeadAttention {
 public:
  static constexpr int kGemmMinQueries = 16;
  // The bf16 decode kernel (AVX-512 or AVX2; on by default where built); off = the Highway path, for
  // tests and benchmarks that compare the two.
  static inline bool bf16_kernel = true;
  // Int8 keys scored with integer dot products (QueryI16); off = widened to float (benchmarks).
  static inline bool i8_kernel = true;
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
  std::vector<QueryI16> qi16_;  // per query, made on the first int8 block
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
  std::vector<QueryI16> qi16_;  // per query, made on the first int8 block
};

}  // namespace ll
