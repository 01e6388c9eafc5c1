#pragma once
// Numerical building blocks of the transformer, float32. Each has a plain reference twin in
// tests/test_ops.cpp. Row-major everywhere; "nt" = second operand stored transposed ([out, in],
// like nn.Linear), so y = x · Wᵀ.
#include <cstdint>
#include <vector>

namespace ll {

// y[n, m] = x[n, k] · W[m, k]ᵀ  (BLAS sgemm / sgemv)
void matmul_nt(const float* x, int n, int k, const float* W, int m, float* y);

// out[i, :] = w ⊙ x[i, :] / sqrt(mean(x[i, :]²) + eps), as LlamaRMSNorm in float32.
void rmsnorm(const float* x, const float* w, int n, int d, float eps, float* out);

// out = silu(gate) ⊙ up, elementwise over n values.
void silu_mul(const float* gate, const float* up, int64_t n, float* out);

// RoPE tables in the Hugging Face layout: inv_freq_j = theta^(-2j/D), angle = pos · inv_freq_j.
// cos/sin are computed in float32 like the official code (cat(freqs, freqs) halves).
class RopeTable {
 public:
  RopeTable(int head_dim, float theta);
  // Rotates x[0..D) in place ("rotate_half" form) for relative position pos.
  // Not thread-safe unless ensure(max_pos) was called first.
  void apply(float* x, int64_t pos) const;
  void ensure(int64_t max_pos) const { grow(max_pos); }
  int head_dim() const { return head_dim_; }

 private:
  void grow(int64_t pos) const;
  int head_dim_;
  std::vector<float> inv_freq_;
  mutable std::vector<float> cos_, sin_;  // [pos][D/2], grown on demand (single-threaded callers)
};

float dot(const float* a, const float* b, int n);

// Online-softmax accumulator for one query: keeps running max, sum and weighted value sum, so
// attention over any number of key blocks never holds more than one block of scores.
struct SoftmaxAcc {
  float max = -__builtin_inff();
  float sum = 0.0f;
};

// Adds one block of keys/values to the accumulators of nq queries (one head).
//  q: [nq][ldq] (first D used), k/v: [nk][D] float32, acc: [nq][D], st: [nq]
//  limit[i] (optional): query i only sees keys j < limit[i] of this block (causal mask).
void attend_block(const float* q, int nq, int ldq, const float* k, const float* v, int nk, int D,
                  float scale, const int* limit, SoftmaxAcc* st, float* acc);
// out[i] = acc[i] / st[i].sum
void attend_finish(const SoftmaxAcc* st, const float* acc, int nq, int D, float* out, int ldo);

}  // namespace ll
