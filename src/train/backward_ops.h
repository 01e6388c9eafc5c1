#pragma once
// Forward and backward passes of the transformer's ops, for training. Templates on the scalar
// type: float for training (BLAS sgemm), double for the gradient checks (dgemm), so finite
// differences can be compared with tight tolerances. Row-major everywhere; linear weights are
// stored [out, in] like nn.Linear, so y = x · Wᵀ.
//
// Backward functions ADD their parameter gradients (dW, dw, dtable) so micro-batches accumulate;
// input gradients are overwritten unless stated. Every reduction runs in a fixed order, so results
// do not depend on the number of threads.
#include <cmath>
#include <cstdint>
#include <vector>

namespace ll::train {

// exp(x) for the hot loops (softmax, cross-entropy, SiLU). float: a branch-free polynomial
// (Cephes-style range reduction, relative error ~2e-7) that vectorizes under `omp simd`, unlike
// libm's expf; double (the gradient checks): std::exp.
inline float fast_exp(float x) {
  // Below -87 the result would be a denormal or 0; it is 0 here. Keeping the smallest normal
  // instead (as this once did) filled masked and hopeless scores with 1e-38, and their products
  // in the backward pass with denormals, which the FPU handles ~100x slower: a memory layer with
  // a sharp softmax (mem_query_scale) trained 10x slower.
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;  // ln 2 split in a high part exact in float ...
  r -= n * -2.12194440e-4f;        // ... and the remainder
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int e = int(n) + 127;  // 2^n through the exponent bits
  return underflow ? 0.0f : p * __builtin_bit_cast(float, e << 23);
}
inline double fast_exp(double x) { return __builtin_exp(x); }

// C = alpha · op(A) · op(B) + beta · C, op(X) = X or Xᵀ (ta/tb), row-major with leading dims.
// Bit-identical for any thread count: OpenBLAS's own threading splits the work differently for
// 1 and 2 threads and the last bits change, so large products are cut into row tiles whose size
// depends only on the shape, run in parallel, each tile single-threaded.
template <typename T>
void gemm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
          int ldc);
// The plain BLAS call, for small products or callers inside a parallel region (where BLAS runs
// single-threaded).
template <typename T>
void gemm_serial(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
                 int ldc);

// out[i] = table[ids[i]]; dtable[ids[i]] += dout[i] (sequential: repeated ids add in order).
template <typename T>
void embedding_fwd(const T* table, int d, const int* ids, int n, T* out);
template <typename T>
void embedding_bwd(const T* dout, int d, const int* ids, int n, T* dtable);

// y[n, out] = x[n, in] · W[out, in]ᵀ
template <typename T>
void linear_fwd(const T* x, int n, int in, const T* W, int out, T* y);
// dx = dy · W (or dx += when accumulate_dx; dx may be null), dW += dyᵀ · x
template <typename T>
void linear_bwd(const T* x, int n, int in, const T* W, int out, const T* dy, T* dx, bool accumulate_dx, T* dW);

// y = w ⊙ x · rstd, rstd = 1/sqrt(mean(x²) + eps) per row (saved for the backward pass).
template <typename T>
void rmsnorm_fwd(const T* x, const T* w, int n, int d, T eps, T* y, T* rstd);
// dx += ∂/∂x, dw += ∂/∂w
template <typename T>
void rmsnorm_bwd(const T* x, const T* w, const T* rstd, const T* dy, int n, int d, T* dx, T* dw);

// RoPE in the Hugging Face "rotate_half" layout. cos/sin are computed in float32 exactly as
// ops/RopeTable (and torch) do, then widened to T, so training and inference rotate identically.
template <typename T>
struct Rope {
  Rope(int head_dim, float theta, int positions);
  int D;
  std::vector<T> cos, sin;  // [pos][D/2]
};
// Rotates n rows of H heads (row stride ld) in place; row i has position i % period (each batch
// entry restarts at 0). The backward pass applies the inverse (transposed) rotation to gradients.
template <typename T>
void rope_fwd(T* x, int n, int ld, int H, const Rope<T>& rope, int period);
template <typename T>
void rope_bwd(T* dx, int n, int ld, int H, const Rope<T>& rope, int period);

// a = silu(g) ⊙ u; backward overwrites dg, du.
template <typename T>
void swiglu_fwd(const T* g, const T* u, int64_t n, T* a);
template <typename T>
void swiglu_bwd(const T* g, const T* u, const T* da, int64_t n, T* dg, T* du);

// Cross-entropy over rows grouped into sequences of S rows, as EasyLM's
// cross_entropy_loss_and_accuracy: per sequence, the mean of -log p(target) over rows with
// mask != 0, weighted by the mask value (1 for every row in EasyLM; a task may weigh some rows
// more, e.g. the dictionary's first values; a sequence without such rows contributes 0).
// Returns the SUM over sequences of those means; the caller divides by the batch size. With dlogits, writes
// d(grad_scale · returned sum)/d(logits) (rows with mask 0 get zeros); dlogits may alias logits.
struct CEStats {
  double loss_sum = 0;  // Σ over sequences of per-sequence mean NLL
  int64_t correct = 0;  // masked rows whose argmax equals the target
  int64_t counted = 0;  // masked rows
};
template <typename T>
CEStats cross_entropy(const T* logits, int n, int V, const int* targets, const uint8_t* mask, int S, T grad_scale,
                      T* dlogits);

}  // namespace ll::train
