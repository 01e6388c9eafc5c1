#pragma once
// Small Highway helpers shared by the kernels (static dispatch: compiled for the build's -march),
// and the one x86 reduction the intrinsic kernels share.
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "util/half.h"

namespace ll::simd {

#if defined(__AVX2__)
// The sum of a ymm's 8 floats.
inline float hsum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#endif

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

// Loads Lanes(d) elements stored as float, bf16, f16 or int8, widened to float (d: any float tag).
template <class D, typename T>
HWY_INLINE hn::Vec<D> load_f32(D d, const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return hn::LoadU(d, p);
  } else if constexpr (std::is_same_v<T, int8_t>) {
    const hn::Rebind<int32_t, D> di;
    const hn::Rebind<int8_t, D> d8;
    return hn::ConvertTo(d, hn::PromoteTo(di, hn::LoadU(d8, p)));
  } else {
    const hn::Rebind<T, D> dh;
    return hn::PromoteTo(d, hn::LoadU(dh, p));
  }
}

template <typename T>
HWY_INLINE float scalar_f32(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, int8_t>) return float(x);
  else if constexpr (std::is_same_v<T, hwy::bfloat16_t>) return bf16_to_f32(x.bits);
  else return f16_to_f32(x.bits);
}

// s + r[i..n) · x[i..n) for the elements after the full vectors: four lanes at a time while four
// remain (head sizes like 100 leave 4), then one by one. Shared by dot1 and dot4 so they agree.
template <typename T>
HWY_INLINE float add_tail(float s, const T* r, const float* x, int64_t i, int64_t n) {
  if (n - i >= 4) {
    const hn::CappedTag<float, 4> d4;
    auto t = hn::Zero(d4);
    for (; i + 4 <= n; i += 4) t = hn::MulAdd(load_f32(d4, r + i), hn::LoadU(d4, x + i), t);
    s += hn::GetLane(hn::SumOfLanes(d4, t));
  }
  for (; i < n; ++i) s += x[i] * scalar_f32(r[i]);
  return s;
}

// row · x with the same operation order as one row of dot4 (so the two agree to the bit).
template <typename T>
HWY_INLINE float dot1(const T* r0, const float* x, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  auto a0 = hn::Zero(d), b0 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    a0 = hn::MulAdd(load_f32(d, r0 + i), hn::LoadU(d, x + i), a0);
    b0 = hn::MulAdd(load_f32(d, r0 + i + N), hn::LoadU(d, x + i + N), b0);
  }
  a0 = hn::Add(a0, b0);
  for (; i + N <= n; i += N) a0 = hn::MulAdd(load_f32(d, r0 + i), hn::LoadU(d, x + i), a0);
  return add_tail(hn::GetLane(hn::SumOfLanes(d, a0)), r0, x, i, n);
}

// Asks for the cache lines [p + ahead, p + ahead + bytes) (ahead in bytes; no-op when 0).
HWY_INLINE void prefetch_lines(const void* p, int ahead, int bytes) {
  if (ahead <= 0) return;
  const char* c = static_cast<const char*>(p) + ahead;
  for (int o = 0; o < bytes; o += 64) hwy::Prefetch(c + o);
}

// out[r] = rows[r] · x for four rows of n elements: each load of x serves four rows. ahead > 0:
// software prefetch of each row that many bytes ahead.
template <typename T>
HWY_INLINE void dot4(const T* r0, const T* r1, const T* r2, const T* r3, const float* x, int64_t n, float* out,
                     int ahead = 0) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  auto a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
  auto b0 = hn::Zero(d), b1 = hn::Zero(d), b2 = hn::Zero(d), b3 = hn::Zero(d);
  int64_t i = 0;
  const int step_bytes = int(2 * N * int64_t(sizeof(T)));
  for (; i + 2 * N <= n; i += 2 * N) {  // two accumulators per row hide the FMA latency
    if (ahead > 0) {
      prefetch_lines(r0 + i, ahead, step_bytes);
      prefetch_lines(r1 + i, ahead, step_bytes);
      prefetch_lines(r2 + i, ahead, step_bytes);
      prefetch_lines(r3 + i, ahead, step_bytes);
    }
    const auto xv = hn::LoadU(d, x + i), xw = hn::LoadU(d, x + i + N);
    a0 = hn::MulAdd(load_f32(d, r0 + i), xv, a0);
    a1 = hn::MulAdd(load_f32(d, r1 + i), xv, a1);
    a2 = hn::MulAdd(load_f32(d, r2 + i), xv, a2);
    a3 = hn::MulAdd(load_f32(d, r3 + i), xv, a3);
    b0 = hn::MulAdd(load_f32(d, r0 + i + N), xw, b0);
    b1 = hn::MulAdd(load_f32(d, r1 + i + N), xw, b1);
    b2 = hn::MulAdd(load_f32(d, r2 + i + N), xw, b2);
    b3 = hn::MulAdd(load_f32(d, r3 + i + N), xw, b3);
  }
  a0 = hn::Add(a0, b0);
  a1 = hn::Add(a1, b1);
  a2 = hn::Add(a2, b2);
  a3 = hn::Add(a3, b3);
  for (; i + N <= n; i += N) {
    const auto xv = hn::LoadU(d, x + i);
    a0 = hn::MulAdd(load_f32(d, r0 + i), xv, a0);
    a1 = hn::MulAdd(load_f32(d, r1 + i), xv, a1);
    a2 = hn::MulAdd(load_f32(d, r2 + i), xv, a2);
    a3 = hn::MulAdd(load_f32(d, r3 + i), xv, a3);
  }
  out[0] = add_tail(hn::GetLane(hn::SumOfLanes(d, a0)), r0, x, i, n);
  out[1] = add_tail(hn::GetLane(hn::SumOfLanes(d, a1)), r1, x, i, n);
  out[2] = add_tail(hn::GetLane(hn::SumOfLanes(d, a2)), r2, x, i, n);
  out[3] = add_tail(hn::GetLane(hn::SumOfLanes(d, a3)), r3, x, i, n);
}

}  // namespace ll::simd
