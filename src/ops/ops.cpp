#include "ops/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

namespace ll {

void matmul_nt(const float* x, int n, int k, const float* W, int m, float* y) {
  if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, m, k, 1.0f, W, k, x, 1, 0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, k, 1.0f, x, k, W, k, 0.0f, y, m);
  }
}

void rmsnorm(const float* x, const float* w, int n, int d, float eps, float* out) {
  for (int i = 0; i < n; ++i) {
    const float* xi = x + int64_t(i) * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int j = 0; j < d; ++j) ss += xi[j] * xi[j];
    const float inv = 1.0f / std::sqrt(ss / float(d) + eps);
    float* oi = out + int64_t(i) * d;
#pragma omp simd
    for (int j = 0; j < d; ++j) oi[j] = w[j] * (xi[j] * inv);
  }
}

void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = (g / (1.0f + std::exp(-g))) * up[i];
  }
}

RopeTable::RopeTable(int head_dim, float theta) : head_dim_(head_dim) {
  const int half = head_dim / 2;
  inv_freq_.resize(half);
  // torch: 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), all float32
  for (int j = 0; j < half; ++j) inv_freq_[j] = 1.0f / std::pow(theta, float(2 * j) / float(head_dim));
}

void RopeTable::grow(int64_t pos) const {
  const int half = head_dim_ / 2;
  int64_t have = int64_t(cos_.size()) / half;
  if (pos < have) return;
  int64_t want = std::max<int64_t>(pos + 1, have * 2);
  cos_.resize(want * half);
  sin_.resize(want * half);
  for (int64_t p = have; p < want; ++p)
    for (int j = 0; j < half; ++j) {
      const float a = float(p) * inv_freq_[j];  // float32 product, as torch.outer on float tensors
      cos_[p * half + j] = std::cos(a);
      sin_[p * half + j] = std::sin(a);
    }
}

void RopeTable::apply(float* x, int64_t pos) const {
  const int half = head_dim_ / 2;
  grow(pos);
  const float* c = cos_.data() + pos * half;
  const float* s = sin_.data() + pos * half;
  for (int j = 0; j < half; ++j) {
    const float a = x[j], b = x[j + half];
    x[j] = a * c[j] - b * s[j];
    x[j + half] = b * c[j] + a * s[j];
  }
}

float dot(const float* a, const float* b, int n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void attend_block(const float* q, int nq, int ldq, const float* k, const float* v, int nk, int D,
                  float scale, const int* limit, SoftmaxAcc* st, float* acc) {
  std::vector<float> s(nk);
  for (int i = 0; i < nq; ++i) {
    const int n = limit ? std::min(limit[i], nk) : nk;
    if (n <= 0) continue;
    const float* qi = q + int64_t(i) * ldq;
    float bmax = -INFINITY;
    for (int j = 0; j < n; ++j) {
      s[j] = dot(qi, k + int64_t(j) * D, D) * scale;
      bmax = std::max(bmax, s[j]);
    }
    float* ai = acc + int64_t(i) * D;
    SoftmaxAcc& a = st[i];
    const float new_max = std::max(a.max, bmax);
    const float rescale = std::exp(a.max - new_max);  // exp(-inf) = 0 on the first block
    a.sum *= rescale;
#pragma omp simd
    for (int d = 0; d < D; ++d) ai[d] *= rescale;
    for (int j = 0; j < n; ++j) {
      const float p = std::exp(s[j] - new_max);
      a.sum += p;
      const float* vj = v + int64_t(j) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) ai[d] += p * vj[d];
    }
    a.max = new_max;
  }
}

void attend_finish(const SoftmaxAcc* st, const float* acc, int nq, int D, float* out, int ldo) {
  for (int i = 0; i < nq; ++i) {
    const float inv = 1.0f / st[i].sum;
    for (int d = 0; d < D; ++d) out[int64_t(i) * ldo + d] = acc[int64_t(i) * D + d] * inv;
  }
}

}  // namespace ll
