#include "train/backward_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace ll::train {

// Below this many elements an OpenMP team costs more than it saves.
constexpr int64_t kParallelWork = 1 << 15;

template <>
void gemm_serial<float>(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
                        int ldb, float beta, float* C, int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B,
              ldb, beta, C, ldc);
}

template <>
void gemm_serial<double>(bool ta, bool tb, int M, int N, int K, double alpha, const double* A, int lda, const double* B,
                         int ldb, double beta, double* C, int ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B,
              ldb, beta, C, ldc);
}

template <typename T>
void gemm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
          int ldc) {
  // Below this OpenBLAS runs single-threaded anyway (its SMP threshold for gemm).
  if (double(M) * N * K <= 262144.0) return gemm_serial(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  // ~8 tiles, from the shape only; a long reduction over few rows (the weight gradients dyᵀ·x, K =
  // tokens) in 2 tiles, since each tile packs all of op(B) again (8 tiles copied x 8 times).
  const int parts = K >= 8 * M ? 2 : 8;
  const int tile = std::min(256, std::max(16, (M + parts * 16 - 1) / (parts * 16) * 16));
  const int tiles = (M + tile - 1) / tile;
#pragma omp parallel for schedule(dynamic, 1)
  for (int t = 0; t < tiles; ++t) {
    const int r0 = t * tile, rows = std::min(tile, M - r0);
    const T* a = ta ? A + r0 : A + int64_t(r0) * lda;  // rows of op(A) = columns of A when transposed
    gemm_serial(ta, tb, rows, N, K, alpha, a, lda, B, ldb, beta, C + int64_t(r0) * ldc, ldc);
  }
}

template <typename T>
void embedding_fwd(const T* table, int d, const int* ids, int n, T* out) {
  for (int i = 0; i < n; ++i) std::memcpy(out + int64_t(i) * d, table + int64_t(ids[i]) * d, sizeof(T) * d);
}

template <typename T>
void embedding_bwd(const T* dout, int d, const int* ids, int n, T* dtable) {
  for (int i = 0; i < n; ++i) {
    T* row = dtable + int64_t(ids[i]) * d;
    const T* g = dout + int64_t(i) * d;
    for (int j = 0; j < d; ++j) row[j] += g[j];
  }
}

template <typename T>
void linear_fwd(const T* x, int n, int in, const T* W, int out, T* y) {
  gemm<T>(false, true, n, out, in, T(1), x, in, W, in, T(0), y, out);
}

template <typename T>
void linear_bwd(const T* x, int n, int in, const T* W, int out, const T* dy, T* dx, bool accumulate_dx, T* dW) {
  if (dx) gemm<T>(false, false, n, in, out, T(1), dy, out, W, in, accumulate_dx ? T(1) : T(0), dx, in);
  gemm<T>(true, false, out, in, n, T(1), dy, out, x, in, T(1), dW, in);
}

template <typename T>
void rmsnorm_fwd(const T* x, const T* w, int n, int d, T eps, T* y, T* rstd) {
#pragma omp parallel for schedule(static) if (int64_t(n) * d > kParallelWork)
  for (int i = 0; i < n; ++i) {
    const T* xi = x + int64_t(i) * d;
    T ss = 0;
    for (int j = 0; j < d; ++j) ss += xi[j] * xi[j];
    const T r = T(1) / std::sqrt(ss / T(d) + eps);
    rstd[i] = r;
    T* yi = y + int64_t(i) * d;
    for (int j = 0; j < d; ++j) yi[j] = w[j] * (xi[j] * r);
  }
}

template <typename T>
void rmsnorm_bwd(const T* x, const T* w, const T* rstd, const T* dy, int n, int d, T* dx, T* dw) {
#pragma omp parallel for schedule(static) if (int64_t(n) * d > kParallelWork)
  for (int i = 0; i < n; ++i) {
    const T* xi = x + int64_t(i) * d;
    const T* gi = dy + int64_t(i) * d;
    const T r = rstd[i];
    T s = 0;  // Σ_k w_k dy_k x_k
    for (int j = 0; j < d; ++j) s += w[j] * gi[j] * xi[j];
    const T c = r * r * r * s / T(d);
    T* dxi = dx + int64_t(i) * d;
    for (int j = 0; j < d; ++j) dxi[j] += r * w[j] * gi[j] - c * xi[j];
  }
  for (int i = 0; i < n; ++i) {  // rows in order: the same sum for any thread count
    const T* xi = x + int64_t(i) * d;
    const T* gi = dy + int64_t(i) * d;
    const T r = rstd[i];
    for (int j = 0; j < d; ++j) dw[j] += gi[j] * xi[j] * r;
  }
}

template <typename T>
Rope<T>::Rope(int head_dim, float theta, int positions) : D(head_dim) {
  const int half = head_dim / 2;
  cos.resize(size_t(positions) * half);
  sin.resize(size_t(positions) * half);
  for (int j = 0; j < half; ++j) {
    const float inv_freq = 1.0f / std::pow(theta, float(2 * j) / float(head_dim));  // as ops/RopeTable
    for (int p = 0; p < positions; ++p) {
      const float a = float(p) * inv_freq;
      cos[size_t(p) * half + j] = T(std::cos(a));
      sin[size_t(p) * half + j] = T(std::sin(a));
    }
  }
}

namespace {
// x' = x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1]; sign = -1 gives the inverse.
template <typename T>
void rope_rows(T* x, int n, int ld, int H, const Rope<T>& rope, int period, T sign) {
  const int D = rope.D, half = D / 2;
#pragma omp parallel for schedule(static) if (int64_t(n) * ld > kParallelWork)
  for (int i = 0; i < n; ++i) {
    const int pos = i % period;
    const T* c = rope.cos.data() + size_t(pos) * half;
    const T* s = rope.sin.data() + size_t(pos) * half;
    for (int h = 0; h < H; ++h) {
      T* v = x + int64_t(i) * ld + h * D;
      for (int j = 0; j < half; ++j) {
        const T a = v[j], b = v[j + half], sn = sign * s[j];
        v[j] = a * c[j] - b * sn;
        v[j + half] = b * c[j] + a * sn;
      }
    }
  }
}
}  // namespace

template <typename T>
void rope_fwd(T* x, int n, int ld, int H, const Rope<T>& rope, int period) {
  rope_rows(x, n, ld, H, rope, period, T(1));
}

template <typename T>
void rope_bwd(T* dx, int n, int ld, int H, const Rope<T>& rope, int period) {
  rope_rows(dx, n, ld, H, rope, period, T(-1));  // a rotation's transpose is its inverse
}

template <typename T>
void swiglu_fwd(const T* g, const T* u, int64_t n, T* a) {
#pragma omp parallel for simd schedule(static) if (n > kParallelWork)
  for (int64_t i = 0; i < n; ++i) {
    const T s = T(1) / (T(1) + fast_exp(-g[i]));
    a[i] = g[i] * s * u[i];
  }
}

template <typename T>
void swiglu_bwd(const T* g, const T* u, const T* da, int64_t n, T* dg, T* du) {
#pragma omp parallel for simd schedule(static) if (n > kParallelWork)
  for (int64_t i = 0; i < n; ++i) {
    const T s = T(1) / (T(1) + fast_exp(-g[i]));
    const T silu = g[i] * s;
    const T dsilu = s * (T(1) + g[i] * (T(1) - s));
    const T d = da[i];
    du[i] = d * silu;
    dg[i] = d * u[i] * dsilu;
  }
}

template <typename T>
CEStats cross_entropy(const T* logits, int n, int V, const int* targets, const uint8_t* mask, int S, T grad_scale,
                      T* dlogits) {
  std::vector<double> nll(n, 0.0);
  std::vector<uint8_t> hit(n, 0);
  std::vector<int> count(n / S, 0);
  for (int i = 0; i < n; ++i) count[i / S] += mask[i];  // a mask value is the row's weight
#pragma omp parallel for schedule(static) if (int64_t(n) * V > kParallelWork)
  for (int i = 0; i < n; ++i) {
    const T* l = logits + int64_t(i) * V;
    T* g = dlogits ? dlogits + int64_t(i) * V : nullptr;
    if (!mask[i]) {
      if (g) std::fill(g, g + V, T(0));
      continue;
    }
    int arg = 0;
    T mx = l[0];
    for (int j = 1; j < V; ++j)
      if (l[j] > mx) mx = l[j], arg = j;
    const int t = targets[i];
    const T lt = l[t];  // read before g (which may alias l) is written
    hit[i] = arg == t;
    T sum = 0;
    if (g) {
#pragma omp simd
      for (int j = 0; j < V; ++j) g[j] = fast_exp(l[j] - mx);
      for (int j = 0; j < V; ++j) sum += g[j];  // in order: the bits do not depend on the vector width
      const T scale = grad_scale * T(mask[i]) / T(count[i / S]), k = scale / sum;
#pragma omp simd
      for (int j = 0; j < V; ++j) g[j] *= k;
      g[t] -= scale;
    } else {
      for (int j = 0; j < V; ++j) sum += fast_exp(l[j] - mx);
    }
    nll[i] = double(mx + std::log(sum) - lt) * mask[i];
  }
  CEStats st;
  for (int b = 0; b < n / S; ++b) {
    double s = 0;
    for (int i = b * S; i < (b + 1) * S; ++i) s += nll[i];
    if (count[b] > 0) st.loss_sum += s / count[b];
  }
  for (int i = 0; i < n; ++i) {
    st.correct += hit[i];
    st.counted += mask[i] ? 1 : 0;
  }
  return st;
}

#define LL_TRAIN_INSTANTIATE(T)                                                                  \
  template void gemm<T>(bool, bool, int, int, int, T, const T*, int, const T*, int, T, T*, int); \
  template void embedding_fwd<T>(const T*, int, const int*, int, T*);                            \
  template void embedding_bwd<T>(const T*, int, const int*, int, T*);                            \
  template void linear_fwd<T>(const T*, int, int, const T*, int, T*);                            \
  template void linear_bwd<T>(const T*, int, int, const T*, int, const T*, T*, bool, T*);        \
  template void rmsnorm_fwd<T>(const T*, const T*, int, int, T, T*, T*);                         \
  template void rmsnorm_bwd<T>(const T*, const T*, const T*, const T*, int, int, T*, T*);        \
  template struct Rope<T>;                                                                       \
  template void rope_fwd<T>(T*, int, int, int, const Rope<T>&, int);                             \
  template void rope_bwd<T>(T*, int, int, int, const Rope<T>&, int);                             \
  template void swiglu_fwd<T>(const T*, const T*, int64_t, T*);                                  \
  template void swiglu_bwd<T>(const T*, const T*, const T*, int64_t, T*, T*);                    \
  template CEStats cross_entropy<T>(const T*, int, int, const int*, const uint8_t*, int, T, T*);
LL_TRAIN_INSTANTIATE(float)
LL_TRAIN_INSTANTIATE(double)

}  // namespace ll::train
