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
  DType type = DType::F32;  // F32, BF16 or F16; rows of D elements
  const void* k = nullptr;
  const void* v = nullptr;
  int n = 0;
};

class HeadAttention {
 public:
  static constexpr int kGemmMinQueries = 16;

  // q: nq rows of D floats with row stride ldq (already rotated).
  HeadAttention(const float* q, int nq, int ldq, int D);
  // limit (optional): query i sees only keys j < limit[i] of this block (causal mask).
  void add(const KVBlock& b, const int* limit = nullptr);
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
  std::vector<float> scores_, kbuf_, vbuf_;
};

}  // namespace ll
