#include "ops/attention.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "ops/matmul.h"
#include "ops/quant.h"
#include "ops/simd.h"
#include "util/half.h"

namespace hn = hwy::HWY_NAMESPACE;

namespace ll {

namespace {

using DF = hn::ScalableTag<float>;

// Asks for the cache lines of rows HeadAttention::prefetch_bytes ahead of `rows` (bytes of them):
// streaming memory keys and values, one core reaches only about half of the machine's read
// bandwidth on the hardware prefetcher alone (bench_kernels: BM_MemoryAttention).
inline void prefetch_ahead(const void* rows, int bytes) {
  const int ahead = HeadAttention::prefetch_bytes;
  if (ahead <= 0) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(rows) + uintptr_t(ahead);
  for (uintptr_t p = b & ~uintptr_t(63); p < b + uintptr_t(bytes); p += 64) hwy::Prefetch(reinterpret_cast<const void*>(p));
}

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

using simd::load_f32;
using simd::scalar_f32;
using D4 = hn::CappedTag<float, 4>;

// s[j] = (q · K[j]) / sqrt_d for n rows of D elements. Four rows at a time share each load of q.
template <typename T>
void score_rows(const float* q, const T* K, int n, int D, float sqrt_d, float* s) {
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* k0 = K + size_t(j) * D;
    prefetch_ahead(k0, int(4 * sizeof(T)) * D);
    simd::dot4(k0, k0 + D, k0 + 2 * D, k0 + 3 * D, q, D, s + j);
    for (int r = 0; r < 4; ++r) s[j + r] /= sqrt_d;
  }
  for (; j < n; ++j) s[j] = simd::dot1(K + size_t(j) * D, q, D) / sqrt_d;
}

// acc[0..D) += Σ_j p[j] · V[j], four rows per pass over acc.
template <typename T>
void accumulate_rows(float* acc, const float* p, const T* V, int n, int D) {
  const DF d;
  const int N = int(hn::Lanes(d)), Dv = D / N * N;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* v0 = V + size_t(j) * D;
    const T *v1 = v0 + D, *v2 = v1 + D, *v3 = v2 + D;
    prefetch_ahead(v0, int(4 * sizeof(T)) * D);
    const auto p0 = hn::Set(d, p[j]), p1 = hn::Set(d, p[j + 1]), p2 = hn::Set(d, p[j + 2]), p3 = hn::Set(d, p[j + 3]);
    for (int e = 0; e < Dv; e += N) {
      auto a = hn::LoadU(d, acc + e);
      a = hn::MulAdd(p0, load_f32(d, v0 + e), a);
      a = hn::MulAdd(p1, load_f32(d, v1 + e), a);
      a = hn::MulAdd(p2, load_f32(d, v2 + e), a);
      a = hn::MulAdd(p3, load_f32(d, v3 + e), a);
      hn::StoreU(a, d, acc + e);
    }
    int e4 = Dv;
    if (D - Dv >= 4) {
      const D4 d4;
      const auto q0 = hn::Set(d4, p[j]), q1 = hn::Set(d4, p[j + 1]), q2 = hn::Set(d4, p[j + 2]), q3 = hn::Set(d4, p[j + 3]);
      for (; e4 + 4 <= D; e4 += 4) {
        auto a = hn::LoadU(d4, acc + e4);
        a = hn::MulAdd(q0, load_f32(d4, v0 + e4), a);
        a = hn::MulAdd(q1, load_f32(d4, v1 + e4), a);
        a = hn::MulAdd(q2, load_f32(d4, v2 + e4), a);
        a = hn::MulAdd(q3, load_f32(d4, v3 + e4), a);
        hn::StoreU(a, d4, acc + e4);
      }
    }
    for (int e = e4; e < D; ++e)
      acc[e] += p[j] * scalar_f32(v0[e]) + p[j + 1] * scalar_f32(v1[e]) + p[j + 2] * scalar_f32(v2[e]) +
                p[j + 3] * scalar_f32(v3[e]);
  }
  for (; j < n; ++j) {
    const T* v0 = V + size_t(j) * D;
    const auto p0 = hn::Set(d, p[j]);
    for (int e = 0; e < Dv; e += N) hn::StoreU(hn::MulAdd(p0, load_f32(d, v0 + e), hn::LoadU(d, acc + e)), d, acc + e);
    for (int e = Dv; e < D; ++e) acc[e] += p[j] * scalar_f32(v0[e]);
  }
}

// One query over n key/value rows. Int8 rows come with per-row scales: a key's scale multiplies
// its score, a value's scale its softmax weight (p2 holds the scaled weights).
template <typename T>
void fused_query(const float* qi, const T* K, const T* V, int n, int D, float sqrt_d, float* s, float& max, float& sum,
                 float* acc, const float* k_scale = nullptr, const float* v_scale = nullptr, float* p2 = nullptr) {
  score_rows(qi, K, n, D, sqrt_d, s);
  if (k_scale)
    for (int j = 0; j < n; ++j) s[j] *= k_scale[j];
  float bmax = -INFINITY;
  for (int j = 0; j < n; ++j) bmax = std::max(bmax, s[j]);
  const float m = std::max(max, bmax);
  const float rescale = std::exp(max - m);
  sum = sum * rescale + exp_shift_sum(s, n, m);
  scale_row(acc, D, rescale);
  if (v_scale) {
    for (int j = 0; j < n; ++j) p2[j] = s[j] * v_scale[j];
    accumulate_rows(acc, p2, V, n, D);
  } else {
    accumulate_rows(acc, s, V, n, D);
  }
  max = m;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LONGLLAMA_BF16_AVX512 1
// GCC 12 warns about the deliberately undefined operands inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Decoding over bf16 memory (the hot loop at long context). A bf16 row read as 32-bit lanes has
// element 2i in the low half of lane i and element 2i+1 in the high half, so (lane << 16) and
// (lane & 0xffff0000) are the even and odd elements as float32: one load and two integer ops per
// 32 elements, no shuffles. The query and the accumulator are kept split the same way; rows
// are read in chunks of 32 elements (the last one masked, so a head of 100 reads 100).
template <int C>  // chunks of 32 elements, C * 32 >= D
struct Bf16Head {
  __m512 qe[C], qo[C];
  __mmask16 mask[C];
  int D;
  explicit Bf16Head(const float* q, int d) : D(d) {
    for (int c = 0; c < C; ++c) {
      alignas(64) float e[16], o[16];
      for (int i = 0; i < 16; ++i) {
        const int k = c * 32 + 2 * i;
        e[i] = k < D ? q[k] : 0.0f;
        o[i] = k + 1 < D ? q[k + 1] : 0.0f;
      }
      qe[c] = _mm512_load_ps(e);
      qo[c] = _mm512_load_ps(o);
      const int lanes = std::clamp((D - c * 32) / 2, 0, 16);
      mask[c] = __mmask16(lanes == 16 ? 0xffff : (1u << lanes) - 1);
    }
  }
  // Only the last chunk can be partial. Masked loads cost several times a plain one on the AMD
  // CPU this was tuned on, so the common tails (4, 8 or 16 elements: heads of 100, 72, 80) use
  // plain loads of exactly their size.
  __m512i load(const uint16_t* row, int c) const {
    const uint16_t* p = row + c * 32;
    if (c + 1 < C || mask[c] == 0xffff) return _mm512_loadu_si512(p);
    switch (mask[c]) {
      case 0x3: return _mm512_zextsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
      case 0xf: return _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      case 0xff: return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      default: return _mm512_maskz_loadu_epi32(mask[c], p);
    }
  }
  static __m512 even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
  static __m512 odd(__m512i v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))); }

  // s[j] = (q · K[j]) / sqrt_d; four rows at a time, their sums reduced together.
  void scores(const uint16_t* K, int n, float sqrt_d, float* s) const {
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const uint16_t* k0 = K + size_t(j) * D;
      prefetch_ahead(k0, 8 * D);
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int c = 0; c < C; ++c) {
        const __m512i v0 = load(k0, c), v1 = load(k0 + D, c), v2 = load(k0 + 2 * D, c), v3 = load(k0 + 3 * D, c);
        a0 = _mm512_fmadd_ps(even(v0), qe[c], a0);
        b0 = _mm512_fmadd_ps(odd(v0), qo[c], b0);
        a1 = _mm512_fmadd_ps(even(v1), qe[c], a1);
        b1 = _mm512_fmadd_ps(odd(v1), qo[c], b1);
        a2 = _mm512_fmadd_ps(even(v2), qe[c], a2);
        b2 = _mm512_fmadd_ps(odd(v2), qo[c], b2);
        a3 = _mm512_fmadd_ps(even(v3), qe[c], a3);
        b3 = _mm512_fmadd_ps(odd(v3), qo[c], b3);
      }
      a0 = _mm512_add_ps(a0, b0);
      a1 = _mm512_add_ps(a1, b1);
      a2 = _mm512_add_ps(a2, b2);
      a3 = _mm512_add_ps(a3, b3);
      // 4x16 -> 4 sums: pairwise interleaves, then the four 128-bit lanes
      const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
      const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
      const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, 0x44), _mm512_shuffle_ps(t01, t23, 0xee));
      const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
      const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(s + j, _mm_div_ps(r, _mm_set1_ps(sqrt_d)));
    }
    for (; j < n; ++j) {
      const uint16_t* k0 = K + size_t(j) * D;
      __m512 a0 = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) {
        const __m512i v0 = load(k0, c);
        a0 = _mm512_fmadd_ps(odd(v0), qo[c], _mm512_fmadd_ps(even(v0), qe[c], a0));
      }
      s[j] = _mm512_reduce_add_ps(a0) / sqrt_d;
    }
  }

  // acc = acc * rescale + Σ_j p[j] · V[j], the accumulator split even/odd in registers.
  void accumulate(float* acc, float rescale, const float* p, const uint16_t* V, int n) const {
    __m512 ae[C], ao[C];
    for (int c = 0; c < C; ++c) {
      alignas(64) float e[16], o[16];
      for (int i = 0; i < 16; ++i) {
        const int k = c * 32 + 2 * i;
        e[i] = k < D ? acc[k] * rescale : 0.0f;
        o[i] = k + 1 < D ? acc[k + 1] * rescale : 0.0f;
      }
      ae[c] = _mm512_load_ps(e);
      ao[c] = _mm512_load_ps(o);
    }
    for (int j = 0; j < n; ++j) {
      const uint16_t* v = V + size_t(j) * D;
      prefetch_ahead(v, 2 * D);
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int c = 0; c < C; ++c) {
        const __m512i x = load(v, c);
        ae[c] = _mm512_fmadd_ps(pj, even(x), ae[c]);
        ao[c] = _mm512_fmadd_ps(pj, odd(x), ao[c]);
      }
    }
    for (int c = 0; c < C; ++c) {
      alignas(64) float e[16], o[16];
      _mm512_store_ps(e, ae[c]);
      _mm512_store_ps(o, ao[c]);
      for (int i = 0; i < 16; ++i) {
        const int k = c * 32 + 2 * i;
        if (k < D) acc[k] = e[i];
        if (k + 1 < D) acc[k + 1] = o[i];
      }
    }
  }
};

template <int C>
void fused_query_bf16(const float* qi, const uint16_t* K, const uint16_t* V, int n, int D, float sqrt_d, float* s,
                      float& max, float& sum, float* acc) {
  const Bf16Head<C> head(qi, D);
  head.scores(K, n, sqrt_d, s);
  float bmax = -INFINITY;
  for (int j = 0; j < n; ++j) bmax = std::max(bmax, s[j]);
  const float m = std::max(max, bmax);
  const float rescale = std::exp(max - m);
  sum = sum * rescale + exp_shift_sum(s, n, m);
  head.accumulate(acc, rescale, s, V, n);
  max = m;
}

// True when the bf16 kernel above took the query (even head sizes up to 128).
bool fused_query_bf16_any(const float* qi, const void* K, const void* V, int n, int D, float sqrt_d, float* s,
                          float& max, float& sum, float* acc) {
  if (D % 2 != 0 || D > 128) return false;
  const auto* k = static_cast<const uint16_t*>(K);
  const auto* v = static_cast<const uint16_t*>(V);
  switch ((D + 31) / 32) {
    case 1: fused_query_bf16<1>(qi, k, v, n, D, sqrt_d, s, max, sum, acc); return true;
    case 2: fused_query_bf16<2>(qi, k, v, n, D, sqrt_d, s, max, sum, acc); return true;
    case 3: fused_query_bf16<3>(qi, k, v, n, D, sqrt_d, s, max, sum, acc); return true;
    default: fused_query_bf16<4>(qi, k, v, n, D, sqrt_d, s, max, sum, acc); return true;
  }
}
#endif

}  // namespace

HeadAttention::HeadAttention(const float* q, int nq, int ldq, int D)
    : q_(q), nq_(nq), ldq_(ldq), D_(D), inv_sqrt_(1.0f / std::sqrt(float(D))), sqrt_d_(std::sqrt(float(D))),
      max_(size_t(nq), -INFINITY), sum_(size_t(nq), 0.0f), acc_(size_t(nq) * D, 0.0f) {}

namespace {
void rows_to_f32(DType t, const void* rows, const float* scale, int n, int D, float* out) {
  if (t != DType::I8) return dequantize_row(t, rows, int64_t(n) * D, out);
  const auto* q = static_cast<const int8_t*>(rows);
  for (int r = 0; r < n; ++r)
    for (int e = 0; e < D; ++e) out[size_t(r) * D + e] = float(q[size_t(r) * D + e]) * scale[r];
}
}  // namespace

void kv_block_to_f32(const KVBlock& b, int D, float* k, float* v) {
  if (k) rows_to_f32(b.type, b.k, b.k_scale, b.n, D, k);
  if (v) rows_to_f32(b.type, b.v, b.v_scale, b.n, D, v);
}

void HeadAttention::add(const KVBlock& b, const int* limit) {
  if (b.n <= 0) return;
  // Few queries: the fused loop widens bf16/f16/int8 rows in registers. Many: float32 + sgemm.
  if (nq_ < kGemmMinQueries) return add_fused(b, limit);
  if (b.type == DType::F32) return add_gemm(static_cast<const float*>(b.k), static_cast<const float*>(b.v), b.n, limit);
  kbuf_.resize(size_t(b.n) * D_);
  vbuf_.resize(size_t(b.n) * D_);
  kv_block_to_f32(b, D_, kbuf_.data(), vbuf_.data());
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
  for (int i = 0; i < nq_; ++i) {
    const int visible = limit ? std::clamp(limit[i], 0, b.n) : b.n;
    if (visible == 0) continue;
    const float* qi = q_ + size_t(i) * ldq_;
    float* acc = &acc_[size_t(i) * D_];
    switch (b.type) {
      case DType::BF16:
#if defined(LONGLLAMA_BF16_AVX512)
        if (bf16_kernel && fused_query_bf16_any(qi, b.k, b.v, visible, D_, sqrt_d_, scores_.data(), max_[i], sum_[i], acc)) break;
#endif
        fused_query(qi, static_cast<const hwy::bfloat16_t*>(b.k), static_cast<const hwy::bfloat16_t*>(b.v), visible, D_,
                    sqrt_d_, scores_.data(), max_[i], sum_[i], acc);
        break;
      case DType::F16:
        fused_query(qi, static_cast<const hwy::float16_t*>(b.k), static_cast<const hwy::float16_t*>(b.v), visible, D_,
                    sqrt_d_, scores_.data(), max_[i], sum_[i], acc);
        break;
      case DType::I8:
        pscaled_.resize(size_t(b.n));
        fused_query(qi, static_cast<const int8_t*>(b.k), static_cast<const int8_t*>(b.v), visible, D_, sqrt_d_,
                    scores_.data(), max_[i], sum_[i], acc, b.k_scale, b.v_scale, pscaled_.data());
        break;
      default:
        fused_query(qi, static_cast<const float*>(b.k), static_cast<const float*>(b.v), visible, D_, sqrt_d_,
                    scores_.data(), max_[i], sum_[i], acc);
    }
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
    switch (vtype) {  // one row at a time: the rows are scattered over the memory
      case DType::BF16: accumulate_rows(acc, &p, static_cast<const hwy::bfloat16_t*>(values[j]), 1, D_); break;
      case DType::F16: accumulate_rows(acc, &p, static_cast<const hwy::float16_t*>(values[j]), 1, D_); break;
      default: accumulate_rows(acc, &p, static_cast<const float*>(values[j]), 1, D_);
    }
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
  // Keys as stored (the dot loop widens bf16/f16 itself), or widened to float32 first for the
  // sgemm path and for int8 rows.
  DType kt = b.type;
  const void* keys = b.k;
  if (b.type == DType::I8 || (b.type != DType::F32 && nq_ >= HeadAttention::kGemmMinQueries)) {
    kbuf_.resize(size_t(b.n) * D_);
    kv_block_to_f32(b, D_, kbuf_.data(), nullptr);  // scoring needs only the keys
    kt = DType::F32;
    keys = kbuf_.data();
  }
  if (nq_ >= HeadAttention::kGemmMinQueries) {
    std::vector<float> S(size_t(nq_) * b.n);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq_, b.n, D_, 1.0f, q_, ldq_, static_cast<const float*>(keys),
                D_, 0.0f, S.data(), b.n);
    for (int i = 0; i < nq_; ++i)
      for (int j = 0; j < b.n; ++j) push(i, S[size_t(i) * b.n + j] / sqrt_d_, first_index + j);
    return;
  }
  const size_t rb = row_bytes(kt, D_);
  const auto* K = static_cast<const uint8_t*>(keys);
  for (int i = 0; i < nq_; ++i)
    for (int j = 0; j < b.n; ++j) push(i, dot_row(kt, K + j * rb, q_ + size_t(i) * ldq_, D_) / sqrt_d_, first_index + j);
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
