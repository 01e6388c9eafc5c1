#include "ops/attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "ops/matmul.h"
#include "ops/quant.h"
#include "util/half.h"

namespace hn = hwy::HWY_NAMESPACE;

namespace ll {

namespace {

using DF = hn::ScalableTag<float>;

// s[j] = exp(s[j] - m) for j < n; returns the sum.
float exp_shift_sum(float* s, int n, float m) {
  const DF d;
  const int N = int(hn::Lanes(d));
  const auto vm = hn::Set(d, m);
  auto sum = hn::Zero(d);
  int j = 0;
  for (; j + N <= n; j += N) {
    const auto e = hn::Exp(d, hn::Sub(hn::LoadU(d, s + j), vm));
    hn::StoreU(e, d, s + j);
    sum = hn::Add(sum, e);
  }
  float r = hn::GetLane(hn::SumOfLanes(d, sum));
  for (; j < n; ++j) r += (s[j] = std::exp(s[j] - m));
  return r;
}

void scale_row(float* a, int n, float f) {
  const DF d;
  const int N = int(hn::Lanes(d));
  const auto vf = hn::Set(d, f);
  int j = 0;
  for (; j + N <= n; j += N) hn::StoreU(hn::Mul(hn::LoadU(d, a + j), vf), d, a + j);
  for (; j < n; ++j) a[j] *= f;
}

// acc[0..D) += p * v[0..D) with v in its storage type.
void axpy_row(float* acc, float p, DType t, const void* v, int D) {
  const DF d;
  const int N = int(hn::Lanes(d));
  const auto vp = hn::Set(d, p);
  int j = 0;
  if (t == DType::F32) {
    const float* vf = static_cast<const float*>(v);
    for (; j + N <= D; j += N) hn::StoreU(hn::MulAdd(vp, hn::LoadU(d, vf + j), hn::LoadU(d, acc + j)), d, acc + j);
    for (; j < D; ++j) acc[j] += p * vf[j];
  } else if (t == DType::BF16) {
    const hn::Rebind<hwy::bfloat16_t, DF> dh;
    const auto* vh = static_cast<const hwy::bfloat16_t*>(v);
    for (; j + N <= D; j += N)
      hn::StoreU(hn::MulAdd(vp, hn::PromoteTo(d, hn::LoadU(dh, vh + j)), hn::LoadU(d, acc + j)), d, acc + j);
    for (; j < D; ++j) acc[j] += p * bf16_to_f32(static_cast<const uint16_t*>(v)[j]);
  } else {
    const hn::Rebind<hwy::float16_t, DF> dh;
    const auto* vh = static_cast<const hwy::float16_t*>(v);
    for (; j + N <= D; j += N)
      hn::StoreU(hn::MulAdd(vp, hn::PromoteTo(d, hn::LoadU(dh, vh + j)), hn::LoadU(d, acc + j)), d, acc + j);
    for (; j < D; ++j) acc[j] += p * f16_to_f32(static_cast<const uint16_t*>(v)[j]);
  }
}

}  // namespace

HeadAttention::HeadAttention(const float* q, int nq, int ldq, int D)
    : q_(q), nq_(nq), ldq_(ldq), D_(D), inv_sqrt_(1.0f / std::sqrt(float(D))), sqrt_d_(std::sqrt(float(D))),
      max_(size_t(nq), -INFINITY), sum_(size_t(nq), 0.0f), acc_(size_t(nq) * D, 0.0f) {}

void HeadAttention::add(const KVBlock& b, const int* limit) {
  if (b.n <= 0) return;
  if (nq_ < kGemmMinQueries) return add_fused(b, limit);
  if (b.type == DType::F32) return add_gemm(static_cast<const float*>(b.k), static_cast<const float*>(b.v), b.n, limit);
  kbuf_.resize(size_t(b.n) * D_);
  vbuf_.resize(size_t(b.n) * D_);
  dequantize_row(b.type, b.k, int64_t(b.n) * D_, kbuf_.data());
  dequantize_row(b.type, b.v, int64_t(b.n) * D_, vbuf_.data());
  add_gemm(kbuf_.data(), vbuf_.data(), b.n, limit);
}

void HeadAttention::add_gemm(const float* k, const float* v, int n, const int* limit) {
  scores_.resize(size_t(nq_) * n);
  float* S = scores_.data();
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq_, n, D_, 1.0f, q_, ldq_, k, D_, 0.0f, S, n);
  for (int i = 0; i < nq_; ++i) {
    float* s = S + size_t(i) * n;
    const int visible = limit ? std::clamp(limit[i], 0, n) : n;
    if (visible == 0) {
      std::fill(s, s + n, 0.0f);  // contributes nothing to this query
      continue;
    }
    float bmax = -INFINITY;
    for (int j = 0; j < visible; ++j) bmax = std::max(bmax, s[j] /= sqrt_d_);
    const float m = std::max(max_[i], bmax);
    const float rescale = std::exp(max_[i] - m);  // 0 on the first block (max_ = -inf)
    sum_[i] = sum_[i] * rescale + exp_shift_sum(s, visible, m);
    std::fill(s + visible, s + n, 0.0f);
    scale_row(&acc_[size_t(i) * D_], D_, rescale);
    max_[i] = m;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq_, D_, n, 1.0f, S, n, v, D_, 1.0f, acc_.data(), D_);
}

void HeadAttention::add_fused(const KVBlock& b, const int* limit) {
  scores_.resize(size_t(b.n));
  float* s = scores_.data();
  const size_t rb = row_bytes(b.type, D_);
  const auto* K = static_cast<const uint8_t*>(b.k);
  const auto* V = static_cast<const uint8_t*>(b.v);
  for (int i = 0; i < nq_; ++i) {
    const int visible = limit ? std::clamp(limit[i], 0, b.n) : b.n;
    if (visible == 0) continue;
    const float* qi = q_ + size_t(i) * ldq_;
    float bmax = -INFINITY;
    for (int j = 0; j < visible; ++j) {
      s[j] = dot_row(b.type, K + j * rb, qi, D_) / sqrt_d_;
      bmax = std::max(bmax, s[j]);
    }
    const float m = std::max(max_[i], bmax);
    const float rescale = std::exp(max_[i] - m);
    sum_[i] = sum_[i] * rescale + exp_shift_sum(s, visible, m);
    float* acc = &acc_[size_t(i) * D_];
    scale_row(acc, D_, rescale);
    for (int j = 0; j < visible; ++j) axpy_row(acc, s[j], b.type, V + j * rb, D_);
    max_[i] = m;
  }
}

void HeadAttention::add_scored(int i, const float* scores, const void* const* values, int n, DType vtype) {
  if (n <= 0) return;
  float bmax = -INFINITY;
  for (int j = 0; j < n; ++j) bmax = std::max(bmax, scores[j]);
  const float m = std::max(max_[i], bmax);
  const float rescale = std::exp(max_[i] - m);
  float* acc = &acc_[size_t(i) * D_];
  scale_row(acc, D_, rescale);
  float sum = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float p = std::exp(scores[j] - m);
    sum += p;
    axpy_row(acc, p, vtype, values[j], D_);
  }
  sum_[i] = sum_[i] * rescale + sum;
  max_[i] = m;
}

TopKScorer::TopKScorer(const float* q, int nq, int ldq, int D, int k)
    : q_(q), nq_(nq), ldq_(ldq), D_(D), k_(k), sqrt_d_(std::sqrt(float(D))), heaps_(size_t(nq)) {
  for (auto& h : heaps_) h.reserve(size_t(k));
}

namespace {
// Min-heap order: the worst hit on top; among equal scores the later key is worse.
bool worse_first(const TopKScorer::Hit& a, const TopKScorer::Hit& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}
}  // namespace

void TopKScorer::push(int i, float score, int64_t index) {
  auto& h = heaps_[size_t(i)];
  if (int(h.size()) < k_) {
    h.push_back({score, index});
    std::push_heap(h.begin(), h.end(), worse_first);
  } else if (score > h.front().score) {
    std::pop_heap(h.begin(), h.end(), worse_first);
    h.back() = {score, index};
    std::push_heap(h.begin(), h.end(), worse_first);
  }
}

void TopKScorer::add(const KVBlock& b, int64_t first_index) {
  if (b.n <= 0 || k_ <= 0) return;
  scores_.resize(size_t(b.n));
  const float* k = static_cast<const float*>(b.k);
  if (b.type != DType::F32 && nq_ >= HeadAttention::kGemmMinQueries) {
    kbuf_.resize(size_t(b.n) * D_);
    dequantize_row(b.type, b.k, int64_t(b.n) * D_, kbuf_.data());
    k = kbuf_.data();
  }
  if (nq_ >= HeadAttention::kGemmMinQueries) {
    std::vector<float> S(size_t(nq_) * b.n);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq_, b.n, D_, 1.0f, q_, ldq_, k, D_, 0.0f, S.data(), b.n);
    for (int i = 0; i < nq_; ++i)
      for (int j = 0; j < b.n; ++j) push(i, S[size_t(i) * b.n + j] / sqrt_d_, first_index + j);
    return;
  }
  const size_t rb = row_bytes(b.type, D_);
  const auto* K = static_cast<const uint8_t*>(b.k);
  for (int i = 0; i < nq_; ++i)
    for (int j = 0; j < b.n; ++j) push(i, dot_row(b.type, K + j * rb, q_ + size_t(i) * ldq_, D_) / sqrt_d_, first_index + j);
}

std::vector<TopKScorer::Hit> TopKScorer::take(int i) {
  std::vector<Hit> h = std::move(heaps_[size_t(i)]);
  std::sort_heap(h.begin(), h.end(), worse_first);  // ascending in "worse" order: best first
  return h;
}

void HeadAttention::finish(float* out, int ldo) const {
  for (int i = 0; i < nq_; ++i) {
    const float inv = 1.0f / sum_[i];
    for (int d = 0; d < D_; ++d) out[size_t(i) * ldo + d] = acc_[size_t(i) * D_ + d] * inv;
  }
}

}  // namespace ll
