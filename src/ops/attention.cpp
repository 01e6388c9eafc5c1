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

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LONGLLAMA_BF16_AVX512 1
// GCC 12 warns about the deliberately undefined operands inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Decoding over bf16 memory (the hot loop at long context). A bf16 row read as 32-bit lanes has
// element 2i in the low half of lane i and element 2i+1 in the high half, so (lane << 16) and
// (lane & 0xffff0000) are the even and odd elements as float32: one load and two integer ops per
// 32 elements, no shuffles. The query and the accumulator are kept split the same way.
// A row is CF full chunks of 32 elements, then a tail of `tl` lanes (2 elements each) held in a
// vector of TW lanes (xmm, ymm or zmm): a head of 100 is 3 chunks and a 4-lane xmm tail, so the
// last 4 elements cost 128-bit ops instead of a whole 512-bit chunk. Everything that depends on
// the tail is fixed outside the row loops: a per-row branch on it made GCC keep the accumulators
// on the stack (the value loop ran at half speed).
template <int TW>
struct Bf16Tail;
template <>
struct Bf16Tail<4> {
  using F = __m128;
  using I = __m128i;
  static I load(const uint16_t* p, int tl, __mmask16 m) {
    if (tl == 2) return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));  // exactly 4 elements
    if (tl == 4) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm_maskz_loadu_epi32(__mmask8(m), p);  // masked loads are slow on AMD: odd tails only
  }
  static F zero() { return _mm_setzero_ps(); }
  static F even(I v) { return _mm_castsi128_ps(_mm_slli_epi32(v, 16)); }
  static F odd(I v) { return _mm_castsi128_ps(_mm_and_si128(v, _mm_set1_epi32(int(0xffff0000u)))); }
  static F fma(F a, F b, F c) { return _mm_fmadd_ps(a, b, c); }
  static F set1(float x) { return _mm_set1_ps(x); }
  static F loadf(const float* p) { return _mm_load_ps(p); }
  static void storef(float* p, F v) { _mm_store_ps(p, v); }
  static __m512 widen(F v) { return _mm512_zextps128_ps512(v); }
};
template <>
struct Bf16Tail<8> {
  using F = __m256;
  using I = __m256i;
  static I load(const uint16_t* p, int tl, __mmask16 m) {
    if (tl == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_maskz_loadu_epi32(__mmask8(m), p);
  }
  static F zero() { return _mm256_setzero_ps(); }
  static F even(I v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
  static F odd(I v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u)))); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F loadf(const float* p) { return _mm256_load_ps(p); }
  static void storef(float* p, F v) { _mm256_store_ps(p, v); }
  static __m512 widen(F v) { return _mm512_zextps256_ps512(v); }
};
template <>
struct Bf16Tail<16> {
  using F = __m512;
  using I = __m512i;
  static I load(const uint16_t* p, int, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }  // 9..15 lanes
  static F zero() { return _mm512_setzero_ps(); }
  static F even(I v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
  static F odd(I v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F loadf(const float* p) { return _mm512_load_ps(p); }
  static void storef(float* p, F v) { _mm512_store_ps(p, v); }
  static __m512 widen(F v) { return v; }
};
template <>
struct Bf16Tail<0> : Bf16Tail<4> {};  // no tail: never called

template <int CF, int TW>
struct Bf16Head {
  using T = Bf16Tail<TW>;
  __m512 qe[CF + 1], qo[CF + 1];  // + 1: CF may be 0
  typename T::F te, to;
  int D, tl;
  __mmask16 tmask;

  // Splits x[0..D) into even/odd float vectors per chunk and for the tail (scaled by f).
  void split(const float* x, float f, __m512* e, __m512* o, typename T::F* tel, typename T::F* tol) const {
    for (int c = 0; c < CF; ++c) {
      alignas(64) float ev[16], od[16];
      for (int i = 0; i < 16; ++i) {
        ev[i] = x[c * 32 + 2 * i] * f;
        od[i] = x[c * 32 + 2 * i + 1] * f;
      }
      e[c] = _mm512_load_ps(ev);
      o[c] = _mm512_load_ps(od);
    }
    if constexpr (TW > 0) {
      alignas(64) float ev[16] = {}, od[16] = {};
      for (int i = 0; i < tl; ++i) {
        ev[i] = x[CF * 32 + 2 * i] * f;
        od[i] = x[CF * 32 + 2 * i + 1] * f;
      }
      *tel = T::loadf(ev);
      *tol = T::loadf(od);
    }
  }
  // The inverse of split.
  void merge(const __m512* e, const __m512* o, typename T::F tel, typename T::F tol, float* x) const {
    for (int c = 0; c < CF; ++c) {
      alignas(64) float ev[16], od[16];
      _mm512_store_ps(ev, e[c]);
      _mm512_store_ps(od, o[c]);
      for (int i = 0; i < 16; ++i) {
        x[c * 32 + 2 * i] = ev[i];
        x[c * 32 + 2 * i + 1] = od[i];
      }
    }
    if constexpr (TW > 0) {
      alignas(64) float ev[16], od[16];
      T::storef(ev, tel);
      T::storef(od, tol);
      for (int i = 0; i < tl; ++i) {
        x[CF * 32 + 2 * i] = ev[i];
        x[CF * 32 + 2 * i + 1] = od[i];
      }
    }
  }

  explicit Bf16Head(int d) : D(d), tl((d - 32 * CF) / 2), tmask(__mmask16((1u << tl) - 1)) {}
  Bf16Head(const float* q, int d) : Bf16Head(d) { split(q, 1.0f, qe, qo, &te, &to); }
  static __m512 even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
  static __m512 odd(__m512i v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))); }
  static __m512i chunk(const uint16_t* row, int c) { return _mm512_loadu_si512(row + c * 32); }
  // The tail's dot product with the query, in the low lanes of a zmm.
  __m512 tail_dot(const uint16_t* row) const {
    const auto t = T::load(row + CF * 32, tl, tmask);
    return T::widen(T::fma(T::odd(t), to, T::fma(T::even(t), te, T::zero())));
  }

  // s[j] = (q · K[j]) / sqrt_d, four rows at a time, their sums reduced together; returns the
  // largest (a scalar max loop after it would not vectorize: NaN rules).
  float scores(const uint16_t* K, int n, float sqrt_d, float* s) const {
    int j = 0;
    __m128 vmax = _mm_set1_ps(-INFINITY);
    for (; j + 4 <= n; j += 4) {
      const uint16_t* k0 = K + size_t(j) * D;
      const uint16_t *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
      prefetch_ahead(k0, 8 * D);
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int c = 0; c < CF; ++c) {
        const __m512i v0 = chunk(k0, c), v1 = chunk(k1, c), v2 = chunk(k2, c), v3 = chunk(k3, c);
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
      if constexpr (TW > 0) {
        a0 = _mm512_add_ps(a0, tail_dot(k0));
        a1 = _mm512_add_ps(a1, tail_dot(k1));
        a2 = _mm512_add_ps(a2, tail_dot(k2));
        a3 = _mm512_add_ps(a3, tail_dot(k3));
      }
      // 4x16 -> 4 sums: pairwise interleaves, then the four 128-bit lanes
      const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
      const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
      const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, 0x44), _mm512_shuffle_ps(t01, t23, 0xee));
      const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
      const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      const __m128 sj = _mm_div_ps(r, _mm_set1_ps(sqrt_d));
      _mm_storeu_ps(s + j, sj);
      vmax = _mm_max_ps(vmax, sj);
    }
    alignas(16) float m4[4];
    _mm_store_ps(m4, vmax);
    float m = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
    for (; j < n; ++j) {
      const uint16_t* k0 = K + size_t(j) * D;
      __m512 a0 = _mm512_setzero_ps();
      for (int c = 0; c < CF; ++c) {
        const __m512i v0 = chunk(k0, c);
        a0 = _mm512_fmadd_ps(odd(v0), qo[c], _mm512_fmadd_ps(even(v0), qe[c], a0));
      }
      if constexpr (TW > 0) a0 = _mm512_add_ps(a0, tail_dot(k0));
      s[j] = _mm512_reduce_add_ps(a0) / sqrt_d;
      m = std::max(m, s[j]);
    }
    return m;
  }

  // acc = acc * rescale + Σ_j p[j] · V[j], the accumulator split even/odd in registers.
  void accumulate(float* acc, float rescale, const float* p, const uint16_t* V, int n) const {
    __m512 ae[CF + 1], ao[CF + 1];
    typename T::F tae = T::zero(), tao = T::zero();
    split(acc, rescale, ae, ao, &tae, &tao);
    for (int j = 0; j < n; ++j) {
      const uint16_t* v = V + size_t(j) * D;
      prefetch_ahead(v, 2 * D);
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int c = 0; c < CF; ++c) {
        const __m512i x = chunk(v, c);
        ae[c] = _mm512_fmadd_ps(pj, even(x), ae[c]);
        ao[c] = _mm512_fmadd_ps(pj, odd(x), ao[c]);
      }
      if constexpr (TW > 0) {
        const auto x = T::load(v + CF * 32, tl, tmask);
        const auto pt = T::set1(p[j]);
        tae = T::fma(pt, T::even(x), tae);
        tao = T::fma(pt, T::odd(x), tao);
      }
    }
    merge(ae, ao, tae, tao, acc);
  }
};

template <int CF, int TW>
float bf16_keys(const float* qi, const uint16_t* K, int n, int D, float sqrt_d, float* s, float& max, float& sum) {
  const Bf16Head<CF, TW> head(qi, D);
  const float m = std::max(max, head.scores(K, n, sqrt_d, s));
  const float rescale = std::exp(max - m);
  sum = sum * rescale + exp_shift_sum(s, n, m);
  max = m;
  return rescale;
}

template <int CF, int TW>
void bf16_values(const float* s, float rescale, const uint16_t* V, int n, int D, float* acc) {
  const Bf16Head<CF, TW> head(D);  // the shape only: no query
  head.accumulate(acc, rescale, s, V, n);
}

// The kernel's instantiation for a head size: full 32-element chunks and the tail's vector width.
// Returns false for head sizes it does not take (odd, or over 128).
template <typename F>
bool with_bf16_shape(int D, F&& f) {
  if (D % 2 != 0 || D > 128) return false;
  const int tl = (D % 32) / 2;
  auto tail = [&](auto cf) {
    constexpr int CF = decltype(cf)::value;
    if (tl == 0) f(std::integral_constant<int, CF>{}, std::integral_constant<int, 0>{});
    else if (tl <= 4) f(std::integral_constant<int, CF>{}, std::integral_constant<int, 4>{});
    else if (tl <= 8) f(std::integral_constant<int, CF>{}, std::integral_constant<int, 8>{});
    else f(std::integral_constant<int, CF>{}, std::integral_constant<int, 16>{});
  };
  switch (D / 32) {
    case 0: tail(std::integral_constant<int, 0>{}); break;
    case 1: tail(std::integral_constant<int, 1>{}); break;
    case 2: tail(std::integral_constant<int, 2>{}); break;
    case 3: tail(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}, std::integral_constant<int, 0>{});  // D = 128
  }
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
#if defined(LONGLLAMA_BF16_AVX512)
        if (bf16_kernel && with_bf16_shape(D_, [&](auto cf, auto tw) {
              r = bf16_keys<cf(), tw()>(qi, static_cast<const uint16_t*>(b.k), visible, D_, sqrt_d_, s, max_[i], sum_[i]);
            }))
          break;
#endif
        r = fused_keys(qi, static_cast<const hwy::bfloat16_t*>(b.k), visible, D_, sqrt_d_, s, max_[i], sum_[i]);
        break;
      case DType::F16:
        r = fused_keys(qi, static_cast<const hwy::float16_t*>(b.k), visible, D_, sqrt_d_, s, max_[i], sum_[i]);
        break;
      case DType::I8:
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
#if defined(LONGLLAMA_BF16_AVX512)
        if (bf16_kernel && with_bf16_shape(D_, [&](auto cf, auto tw) {
              bf16_values<cf(), tw()>(s, r, static_cast<const uint16_t*>(b.v), visible, D_, acc);
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
