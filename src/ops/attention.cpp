#include "ops/attention.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "ops/matmul.h"
#include "ops/quant.h"
#include "ops/simd.h"
#include "util/error.h"
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

// One query over n key/value rows, in two phases so that a caller can score the keys of several
// heads before it reads their values (HeadAttention::add_keys / add_values). Int8 rows come with
// per-row scales: a key's scale multiplies its score, a value's scale its softmax weight (p2
// holds the scaled weights).
// Phase 1: s = exp(score - new max); returns the factor that rescales the old accumulator.
template <typename T>
float fused_keys(const float* qi, const T* K, int n, int D, float sqrt_d, float* s, float& max, float& sum,
                 const float* k_scale = nullptr) {
  score_rows(qi, K, n, D, sqrt_d, s);
  if (k_scale)
    for (int j = 0; j < n; ++j) s[j] *= k_scale[j];
  float bmax = -INFINITY;
  for (int j = 0; j < n; ++j) bmax = std::max(bmax, s[j]);
  const float m = std::max(max, bmax);
  const float rescale = std::exp(max - m);
  sum = sum * rescale + exp_shift_sum(s, n, m);
  max = m;
  return rescale;
}

// Phase 2: acc = acc * rescale + Σ_j s[j] · V[j].
template <typename T>
void fused_values(const float* s, float rescale, const T* V, int n, int D, float* acc, const float* v_scale = nullptr,
                  float* p2 = nullptr) {
  scale_row(acc, D, rescale);
  if (v_scale) {
    for (int j = 0; j < n; ++j) p2[j] = s[j] * v_scale[j];
    accumulate_rows(acc, p2, V, n, D);
  } else {
    accumulate_rows(acc, s, V, n, D);
  }
}

// The running softmax after a block's scores s[0..n) (largest bmax): s becomes exp(s - new max);
// returns the factor that rescales the old accumulator.
float update_softmax(float* s, int n, float bmax, float& max, float& sum) {
  const float m = std::max(max, bmax);
  const float rescale = std::exp(max - m);
  sum = sum * rescale + exp_shift_sum(s, n, m);
  max = m;
  return rescale;
}

float i8_keys(const QueryI16& q, const int8_t* K, const float* k_scale, int n, float sqrt_d, float* s, float& max,
              float& sum) {
  return update_softmax(s, n, score_rows_i8(q, K, k_scale, n, sqrt_d, s), max, sum);
}

#if defined(__AVX2__) && defined(__FMA__)
#define LONGLLAMA_BF16_KERNEL 1
// GCC 12 warns about the deliberately undefined operands inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Decoding over bf16 memory (the hot loop at long context). A bf16 row read as 32-bit lanes has
// element 2i in the low half of lane i and element 2i+1 in the high half, so (lane << 16) and
// (lane & 0xffff0000) are the even and odd elements as float32: one load and two integer ops per
// 2L elements (L lanes), no shuffles. The query and the accumulator are kept split the same way.
// A row is CF full chunks of 2L elements (zmm with AVX-512, ymm with AVX2), then a tail of `tl`
// lanes in the narrowest vector that holds it: a head of 100 is 3 zmm chunks (6 ymm) and a 4-lane
// xmm tail. Everything that depends on the tail is fixed outside the row loops: a per-row branch
// on it made GCC keep the accumulators on the stack (the value loop ran at half speed).

// One vector width: float/int types, lanes, and the few operations the kernel needs.
struct V128 {
  using F = __m128;
  using I = __m128i;
  static constexpr int L = 4;
  static I load(const uint16_t* p, int lanes) {
    if (lanes == 2) return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));  // exactly 4 elements
    if (lanes == 4) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    // masked loads are slow on AMD: odd tails only
    return _mm_maskload_epi32(reinterpret_cast<const int*>(p), _mm_cmpgt_epi32(_mm_set1_epi32(lanes), _mm_setr_epi32(0, 1, 2, 3)));
  }
  static F even(I v) { return _mm_castsi128_ps(_mm_slli_epi32(v, 16)); }
  static F odd(I v) { return _mm_castsi128_ps(_mm_and_si128(v, _mm_set1_epi32(int(0xffff0000u)))); }
  static F fma(F a, F b, F c) { return _mm_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm_add_ps(a, b); }
  static F zero() { return _mm_setzero_ps(); }
  static F set1(float x) { return _mm_set1_ps(x); }
  static F loadf(const float* p) { return _mm_load_ps(p); }
  static void storef(float* p, F v) { _mm_store_ps(p, v); }
};
struct V256 {
  using F = __m256;
  using I = __m256i;
  static constexpr int L = 8;
  static I load(const uint16_t* p, int lanes) {
    if (lanes == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_maskload_epi32(reinterpret_cast<const int*>(p),
                                 _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static F even(I v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
  static F odd(I v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u)))); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F loadf(const float* p) { return _mm256_load_ps(p); }
  static void storef(float* p, F v) { _mm256_store_ps(p, v); }
  static F widen(__m128 v) { return _mm256_zextps128_ps256(v); }
  // Four vectors -> their four sums: pairwise interleaves, then the two 128-bit halves.
  static __m128 sum4(F a0, F a1, F a2, F a3) {
    const F t01 = _mm256_add_ps(_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
    const F t23 = _mm256_add_ps(_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
    const F t = _mm256_add_ps(_mm256_shuffle_ps(t01, t23, 0x44), _mm256_shuffle_ps(t01, t23, 0xee));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  }
  static float sum1(F v) { return simd::hsum8(v); }
};
#if defined(__AVX512F__) && defined(__AVX512BW__)
struct V512 {
  using F = __m512;
  using I = __m512i;
  static constexpr int L = 16;
  static I load(const uint16_t* p, int lanes) {
    if (lanes == 16) return _mm512_loadu_si512(p);
    return _mm512_maskz_loadu_epi32(__mmask16((1u << lanes) - 1), p);
  }
  static F even(I v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
  static F odd(I v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F loadf(const float* p) { return _mm512_load_ps(p); }
  static void storef(float* p, F v) { _mm512_store_ps(p, v); }
  static F widen(__m128 v) { return _mm512_zextps128_ps512(v); }
  static F widen(__m256 v) { return _mm512_zextps256_ps512(v); }
  static __m128 sum4(F a0, F a1, F a2, F a3) {
    const F t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const F t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const F t = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, 0x44), _mm512_shuffle_ps(t01, t23, 0xee));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
  static float sum1(F v) { return _mm512_reduce_add_ps(v); }
};
using VWide = V512;
#else
using VWide = V256;
#endif

// W: the chunk vector; CF full chunks; T: the tail's vector (V128/V256/W), or void for none.
template <typename W, int CF, typename T>
struct Bf16Head {
  static constexpr int E = 2 * W::L;  // elements per chunk
  static constexpr bool kTail = !std::is_void_v<T>;
  using TV = std::conditional_t<kTail, T, V128>;  // a placeholder type when there is no tail
  typename W::F qe[CF + 1], qo[CF + 1];           // + 1: CF may be 0
  typename TV::F te, to;
  int D, tl;

  static typename W::F widen(typename TV::F v) {
    if constexpr (std::is_same_v<TV, W>) return v;
    else return W::widen(v);
  }
  // Splits x[0..D) into even/odd float vectors per chunk and for the tail (scaled by f).
  void split(const float* x, float f, typename W::F* e, typename W::F* o, typename TV::F* tel,
             typename TV::F* tol) const {
    for (int c = 0; c < CF; ++c) {
      alignas(64) float ev[16], od[16];
      for (int i = 0; i < W::L; ++i) {
        ev[i] = x[c * E + 2 * i] * f;
        od[i] = x[c * E + 2 * i + 1] * f;
      }
      e[c] = W::loadf(ev);
      o[c] = W::loadf(od);
    }
    if constexpr (kTail) {
      alignas(64) float ev[16] = {}, od[16] = {};
      for (int i = 0; i < tl; ++i) {
        ev[i] = x[CF * E + 2 * i] * f;
        od[i] = x[CF * E + 2 * i + 1] * f;
      }
      *tel = TV::loadf(ev);
      *tol = TV::loadf(od);
    }
  }
  explicit Bf16Head(int d) : D(d), tl((d - E * CF) / 2) {}
  Bf16Head(const float* q, int d) : Bf16Head(d) { split(q, 1.0f, qe, qo, &te, &to); }
  static typename W::I chunk(const uint16_t* row, int c) { return W::load(row + c * E, W::L); }
  // TLC > 0: the tail's lane count as a constant (no branch on it inside the row loops: with one,
  // GCC kept the accumulators in memory); 0: `tl` at run time.
  template <int TLC>
  int lanes() const {
    return TLC > 0 ? TLC : tl;
  }
  // Runs f(std::integral_constant<int, TLC>) with the tail's lane count as a constant where the
  // vector loads it without a mask (2 or TV::L lanes), else with 0.
  template <typename F>
  auto with_tail_lanes(F&& f) const {
    if constexpr (kTail) {
      if (tl == 2) return f(std::integral_constant<int, 2>{});
      if (tl == TV::L) return f(std::integral_constant<int, TV::L>{});
    }
    return f(std::integral_constant<int, 0>{});
  }
  // The tail's dot product with the query, in the low lanes of a chunk vector.
  template <int TLC>
  typename W::F tail_dot(const uint16_t* row) const {
    const auto t = TV::load(row + CF * E, lanes<TLC>());
    return widen(TV::fma(TV::odd(t), to, TV::fma(TV::even(t), te, TV::zero())));
  }

  // s[j] = (q · K[j]) / sqrt_d, four rows at a time, their sums reduced together; returns the
  // largest (a scalar max loop after it would not vectorize: NaN rules).
  float scores(const uint16_t* K, int n, float sqrt_d, float* s) const {
    return with_tail_lanes([&](auto tlc) { return scores_rows<decltype(tlc)::value>(K, n, sqrt_d, s); });
  }
  template <int TLC>
  float scores_rows(const uint16_t* K, int n, float sqrt_d, float* s) const {
    int j = 0;
    __m128 vmax = _mm_set1_ps(-INFINITY);
    for (; j + 4 <= n; j += 4) {
      const uint16_t* k0 = K + size_t(j) * D;
      const uint16_t *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
      prefetch_ahead(k0, 8 * D);
      auto a0 = W::zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int c = 0; c < CF; ++c) {
        const auto v0 = chunk(k0, c), v1 = chunk(k1, c), v2 = chunk(k2, c), v3 = chunk(k3, c);
        a0 = W::fma(W::even(v0), qe[c], a0);
        b0 = W::fma(W::odd(v0), qo[c], b0);
        a1 = W::fma(W::even(v1), qe[c], a1);
        b1 = W::fma(W::odd(v1), qo[c], b1);
        a2 = W::fma(W::even(v2), qe[c], a2);
        b2 = W::fma(W::odd(v2), qo[c], b2);
        a3 = W::fma(W::even(v3), qe[c], a3);
        b3 = W::fma(W::odd(v3), qo[c], b3);
      }
      a0 = W::add(a0, b0);
      a1 = W::add(a1, b1);
      a2 = W::add(a2, b2);
      a3 = W::add(a3, b3);
      if constexpr (kTail) {
        a0 = W::add(a0, tail_dot<TLC>(k0));
        a1 = W::add(a1, tail_dot<TLC>(k1));
        a2 = W::add(a2, tail_dot<TLC>(k2));
        a3 = W::add(a3, tail_dot<TLC>(k3));
      }
      const __m128 sj = _mm_div_ps(W::sum4(a0, a1, a2, a3), _mm_set1_ps(sqrt_d));
      _mm_storeu_ps(s + j, sj);
      vmax = _mm_max_ps(vmax, sj);
    }
    alignas(16) float m4[4];
    _mm_store_ps(m4, vmax);
    float m = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
    for (; j < n; ++j) {
      const uint16_t* k0 = K + size_t(j) * D;
      auto a0 = W::zero();
      for (int c = 0; c < CF; ++c) {
        const auto v0 = chunk(k0, c);
        a0 = W::fma(W::odd(v0), qo[c], W::fma(W::even(v0), qe[c], a0));
      }
      if constexpr (kTail) a0 = W::add(a0, tail_dot<TLC>(k0));
      s[j] = W::sum1(a0) / sqrt_d;
      m = std::max(m, s[j]);
    }
    return m;
  }

  // acc = acc * rescale + Σ_j p[j] · V[j], the accumulator split even/odd in registers.
  // The accumulators are loaded from and stored to local buffers around the loop, never handed to
  // split/merge by address: with their address taken GCC kept a copy in memory and stored all 12
  // ymm accumulators after every row (AVX2, head of 100: the value loop ran at ~half speed).
  void accumulate(float* acc, float rescale, const float* p, const uint16_t* V, int n) const {
    with_tail_lanes([&](auto tlc) { accumulate_rows<decltype(tlc)::value>(acc, rescale, p, V, n); });
  }
  template <int TLC>
  void accumulate_rows(float* acc, float rescale, const float* p, const uint16_t* V, int n) const {
    alignas(64) float ev[(CF + 1) * 16] = {}, od[(CF + 1) * 16] = {};
    for (int i = 0; i < D / 2; ++i) {
      ev[i] = acc[2 * i] * rescale;
      od[i] = acc[2 * i + 1] * rescale;
    }
    typename W::F ae[CF + 1], ao[CF + 1];
    for (int c = 0; c < CF; ++c) {
      ae[c] = W::loadf(ev + c * W::L);
      ao[c] = W::loadf(od + c * W::L);
    }
    // A tail of 4 elements (a head of 100) is one xmm accumulator in element order (bf16 -> f32 by
    // zero-extend and shift): with two split ones the AVX2 loop needs 17 registers, and the spilled
    // pair made a store-to-load chain through every row. The same operations per element, so the
    // same bits.
    constexpr bool kTail4 = kTail && TLC == 2 && std::is_same_v<TV, V128>;
    __m128 t4 = _mm_setzero_ps();
    typename TV::F tae = TV::zero(), tao = TV::zero();
    if constexpr (kTail4) {
      t4 = _mm_mul_ps(_mm_loadu_ps(acc + CF * E), _mm_set1_ps(rescale));
    } else if constexpr (kTail) {
      tae = TV::loadf(ev + CF * W::L);
      tao = TV::loadf(od + CF * W::L);
    }
    for (int j = 0; j < n; ++j) {
      const uint16_t* v = V + size_t(j) * D;
      prefetch_ahead(v, 2 * D);
      const auto pj = W::set1(p[j]);
      for (int c = 0; c < CF; ++c) {
        const auto x = chunk(v, c);
        ae[c] = W::fma(pj, W::even(x), ae[c]);
        ao[c] = W::fma(pj, W::odd(x), ao[c]);
      }
      if constexpr (kTail4) {
        const __m128i x = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + CF * E)));
        t4 = _mm_fmadd_ps(_mm_set1_ps(p[j]), _mm_castsi128_ps(_mm_slli_epi32(x, 16)), t4);
      } else if constexpr (kTail) {
        const auto x = TV::load(v + CF * E, lanes<TLC>());
        const auto pt = TV::set1(p[j]);
        tae = TV::fma(pt, TV::even(x), tae);
        tao = TV::fma(pt, TV::odd(x), tao);
      }
    }
    for (int c = 0; c < CF; ++c) {
      W::storef(ev + c * W::L, ae[c]);
      W::storef(od + c * W::L, ao[c]);
    }
    if constexpr (kTail && !kTail4) {
      TV::storef(ev + CF * W::L, tae);
      TV::storef(od + CF * W::L, tao);
    }
    for (int i = 0; i < D / 2; ++i) {
      acc[2 * i] = ev[i];
      acc[2 * i + 1] = od[i];
    }
    if constexpr (kTail4) _mm_storeu_ps(acc + CF * E, t4);
  }
};

template <int CF, typename T>
float bf16_keys(const float* qi, const uint16_t* K, int n, int D, float sqrt_d, float* s, float& max, float& sum) {
  const Bf16Head<VWide, CF, T> head(qi, D);
  const float m = std::max(max, head.scores(K, n, sqrt_d, s));
  const float rescale = std::exp(max - m);
  sum = sum * rescale + exp_shift_sum(s, n, m);
  max = m;
  return rescale;
}

template <int CF, typename T>
void bf16_values(const float* s, float rescale, const uint16_t* V, int n, int D, float* acc) {
  const Bf16Head<VWide, CF, T> head(D);  // the shape only: no query
  head.accumulate(acc, rescale, s, V, n);
}

// Calls f(CF, tail vector type) for a head size: full chunks of 2L elements, then the narrowest
// vector holding the tail. Returns false for head sizes the kernel does not take (odd, or more
// than 4 zmm / 8 ymm chunks: 128 elements).
template <typename F>
bool with_bf16_shape(int D, F&& f) {
  constexpr int E = 2 * VWide::L;
  if (D % 2 != 0 || D > 128) return false;
  const int tl = (D % E) / 2;
  auto tail = [&](auto cf) {
    if (tl == 0) f(cf, std::type_identity<void>{});
    else if (tl <= 4) f(cf, std::type_identity<V128>{});
    else if (tl <= 8) f(cf, std::type_identity<V256>{});
    else f(cf, std::type_identity<VWide>{});  // only with AVX-512 (a ymm chunk has 8 lanes)
  };
  [&]<int... C>(std::integer_sequence<int, C...>) {
    ((D / E == C ? tail(std::integral_constant<int, C>{}) : void()), ...);
  }(std::make_integer_sequence<int, 128 / E + 1>{});
  return true;
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

QueryI16 quantize_query_i16(const float* q, int D) {
  if (!QueryI16::supports(D)) throw Error("quantize_query_i16: head size " + std::to_string(D) + " outside [16, 512]");
  QueryI16 r;
  r.D = D;
  float amax = 0.0f;
  for (int e = 0; e < D; ++e) amax = std::max(amax, std::fabs(q[e]));
  r.scale = amax / 32767.0f;
  r.q.resize(size_t(D));
  // A scale that underflows to 0 (max|q| below ~1e-40) leaves a zero query, whose scores are 0.
  for (int e = 0; e < D; ++e) r.q[size_t(e)] = r.scale > 0.0f ? int16_t(std::lround(q[e] / r.scale)) : int16_t(0);
  const int G = (D + 15) / 16, last = D - 16;
  r.g.assign(size_t(G) * 16, 0);
  for (int e = 0; e < 16 * (G - 1); ++e) r.g[size_t(e)] = r.q[size_t(e)];
  for (int i = 0; i < 16; ++i)
    if (last + i >= 16 * (G - 1)) r.g[size_t(16 * (G - 1) + i)] = r.q[size_t(last + i)];
  return r;
}

float score_rows_i8(const QueryI16& q, const int8_t* K, const float* k_scale, int n, float sqrt_d, float* s, bool simd) {
  const int D = q.D;
  float m = -INFINITY;
  int j = 0;
#if defined(__AVX2__)
  if (simd) {
    // Groups 0..G-2 at 16 g, the last one at D - 16 (inside the row; its overlap is zero in q.g).
    const int G = (D + 15) / 16, last = D - 16;
    const auto* qg = reinterpret_cast<const __m256i*>(q.g.data());
    const __m256i ql = _mm256_loadu_si256(qg + (G - 1));
    const __m128 vqs = _mm_set1_ps(q.scale), vsd = _mm_set1_ps(sqrt_d);
    __m128 vmax = _mm_set1_ps(-INFINITY);
    auto madd = [](__m256i a, const int8_t* k, __m256i qv) {
      const __m256i kw = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k)));
      return _mm256_add_epi32(a, _mm256_madd_epi16(kw, qv));
    };
    for (; j + 4 <= n; j += 4) {
      const int8_t* k0 = K + size_t(j) * D;
      const int8_t *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
      prefetch_ahead(k0, 4 * D);
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
      for (int g = 0; g + 1 < G; ++g) {
        const __m256i qv = _mm256_loadu_si256(qg + g);
        a0 = madd(a0, k0 + 16 * g, qv);
        a1 = madd(a1, k1 + 16 * g, qv);
        a2 = madd(a2, k2 + 16 * g, qv);
        a3 = madd(a3, k3 + 16 * g, qv);
      }
      a0 = madd(a0, k0 + last, ql);
      a1 = madd(a1, k1 + last, ql);
      a2 = madd(a2, k2 + last, ql);
      a3 = madd(a3, k3 + last, ql);
      // Per 128-bit half: [row0, row1, row2, row3] partial sums; exact in any order.
      const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
      const __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
      const __m128 sj = _mm_div_ps(_mm_mul_ps(_mm_cvtepi32_ps(sum), _mm_mul_ps(vqs, _mm_loadu_ps(k_scale + j))), vsd);
      _mm_storeu_ps(s + j, sj);
      vmax = _mm_max_ps(vmax, sj);
    }
    alignas(16) float m4[4];
    _mm_store_ps(m4, vmax);
    m = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
  }
#endif
  for (; j < n; ++j) {
    const int8_t* k = K + size_t(j) * D;
    int32_t acc = 0;
    for (int e = 0; e < D; ++e) acc += int32_t(q.q[size_t(e)]) * int32_t(k[e]);
    s[j] = float(acc) * (q.scale * k_scale[j]) / sqrt_d;
    m = std::max(m, s[j]);
  }
  return m;
}

void HeadAttention::add(const KVBlock& b, const int* limit) {
  if (b.n <= 0) return;
  // Few queries: the fused loop widens bf16/f16 rows in registers (int8 keys: integer dot
  // products, QueryI16). Many: float32 + sgemm.
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
  add_keys(b, limit);
  add_values(b, limit);
}

void HeadAttention::add_keys(const KVBlock& b, const int* limit) {
  if (nq_ >= kGemmMinQueries) throw Error("HeadAttention::add_keys: for fewer than 16 queries");
  scores_.resize(size_t(nq_) * size_t(b.n));
  rescale_.resize(size_t(nq_));
  for (int i = 0; i < nq_; ++i) {
    const int visible = limit ? std::clamp(limit[i], 0, b.n) : b.n;
    if (visible == 0) continue;
    const float* qi = q_ + size_t(i) * ldq_;
    float* s = &scores_[size_t(i) * size_t(b.n)];
    float& r = rescale_[size_t(i)];
    switch (b.type) {
      case DType::BF16:
#if defined(LONGLLAMA_BF16_KERNEL)
        if (bf16_kernel && with_bf16_shape(D_, [&](auto cf, auto tw) {
              r = bf16_keys<decltype(cf)::value, typename decltype(tw)::type>(qi, static_cast<const uint16_t*>(b.k),
                                                                               visible, D_, sqrt_d_, s, max_[i], sum_[i]);
            }))
          break;
#endif
        r = fused_keys(qi, static_cast<const hwy::bfloat16_t*>(b.k), visible, D_, sqrt_d_, s, max_[i], sum_[i]);
        break;
      case DType::F16:
        r = fused_keys(qi, static_cast<const hwy::float16_t*>(b.k), visible, D_, sqrt_d_, s, max_[i], sum_[i]);
        break;
      case DType::I8:
        if (i8_kernel && QueryI16::supports(D_)) {
          if (qi16_.empty())
            for (int k = 0; k < nq_; ++k) qi16_.push_back(quantize_query_i16(q_ + size_t(k) * ldq_, D_));
          r = i8_keys(qi16_[size_t(i)], static_cast<const int8_t*>(b.k), b.k_scale, visible, sqrt_d_, s, max_[i],
                      sum_[i]);
          break;
        }
        r = fused_keys(qi, static_cast<const int8_t*>(b.k), visible, D_, sqrt_d_, s, max_[i], sum_[i], b.k_scale);
        break;
      default:
        r = fused_keys(qi, static_cast<const float*>(b.k), visible, D_, sqrt_d_, s, max_[i], sum_[i]);
    }
  }
}

void HeadAttention::add_values(const KVBlock& b, const int* limit) {
  if (scores_.size() != size_t(nq_) * size_t(b.n)) throw Error("HeadAttention::add_values: not the block of add_keys");
  for (int i = 0; i < nq_; ++i) {
    const int visible = limit ? std::clamp(limit[i], 0, b.n) : b.n;
    if (visible == 0) continue;
    const float* s = &scores_[size_t(i) * size_t(b.n)];
    const float r = rescale_[size_t(i)];
    float* acc = &acc_[size_t(i) * D_];
    switch (b.type) {
      case DType::BF16:
#if defined(LONGLLAMA_BF16_KERNEL)
        if (bf16_kernel && with_bf16_shape(D_, [&](auto cf, auto tw) {
              bf16_values<decltype(cf)::value, typename decltype(tw)::type>(s, r, static_cast<const uint16_t*>(b.v),
                                                                             visible, D_, acc);
            }))
          break;
#endif
        fused_values(s, r, static_cast<const hwy::bfloat16_t*>(b.v), visible, D_, acc);
        break;
      case DType::F16:
        fused_values(s, r, static_cast<const hwy::float16_t*>(b.v), visible, D_, acc);
        break;
      case DType::I8:
        pscaled_.resize(size_t(b.n));
        fused_values(s, r, static_cast<const int8_t*>(b.v), visible, D_, acc, b.v_scale, pscaled_.data());
        break;
      default:
        fused_values(s, r, static_cast<const float*>(b.v), visible, D_, acc);
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
  // Keys as stored (the dot loop widens bf16/f16 itself; int8 rows are scored with integer dot
  // products, as in HeadAttention), or widened to float32 first for the sgemm path.
  DType kt = b.type;
  const void* keys = b.k;
  const bool few = nq_ < HeadAttention::kGemmMinQueries;
  const bool i8_scores = b.type == DType::I8 && few && HeadAttention::i8_kernel && QueryI16::supports(D_);
  if (i8_scores && qi16_.empty())
    for (int i = 0; i < nq_; ++i) qi16_.push_back(quantize_query_i16(q_ + size_t(i) * ldq_, D_));
  if ((b.type == DType::I8 && !i8_scores) || (b.type != DType::F32 && !few)) {
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
  // A few queries (decoding): the block's scores with the dense path's row kernel (four keys per
  // pass over q), then only the keys that beat a full heap's worst touch it.
  scores_.resize(size_t(b.n));
  for (int i = 0; i < nq_; ++i) {
    const float* qi = q_ + size_t(i) * ldq_;
    float* s = scores_.data();
    switch (kt) {
      case DType::BF16: score_rows(qi, static_cast<const hwy::bfloat16_t*>(keys), b.n, D_, sqrt_d_, s); break;
      case DType::F16: score_rows(qi, static_cast<const hwy::float16_t*>(keys), b.n, D_, sqrt_d_, s); break;
      case DType::I8: score_rows_i8(qi16_[size_t(i)], static_cast<const int8_t*>(keys), b.k_scale, b.n, sqrt_d_, s); break;
      default: score_rows(qi, static_cast<const float*>(keys), b.n, D_, sqrt_d_, s);
    }
    auto& h = heaps_[size_t(i)];
    for (int j = 0; j < b.n; ++j)
      if (int(h.size()) < k_ || s[j] > h.front().score) push(i, s[j], first_index + j);
  }
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
