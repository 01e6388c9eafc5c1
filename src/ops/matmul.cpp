#include "ops/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <vector>

#include "hwy/highway.h"
#include "ops/quant.h"
#include "util/error.h"
#include "util/half.h"

namespace hn = hwy::HWY_NAMESPACE;

namespace ll {

const uint8_t* MatrixRef::row(int64_t r) const {
  return static_cast<const uint8_t*>(data) + size_t(r) * row_bytes(type, cols);
}

namespace {

using DF = hn::ScalableTag<float>;

// Four independent accumulators hide the FMA latency.
float dot_f32_impl(const float* a, const float* b, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  auto s0 = hn::Zero(d), s1 = hn::Zero(d), s2 = hn::Zero(d), s3 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    s0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), s0);
    s1 = hn::MulAdd(hn::LoadU(d, a + i + N), hn::LoadU(d, b + i + N), s1);
    s2 = hn::MulAdd(hn::LoadU(d, a + i + 2 * N), hn::LoadU(d, b + i + 2 * N), s2);
    s3 = hn::MulAdd(hn::LoadU(d, a + i + 3 * N), hn::LoadU(d, b + i + 3 * N), s3);
  }
  for (; i + N <= n; i += N) s0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), s0);
  float s = hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(s0, s1), hn::Add(s2, s3))));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename HalfT, float (*scalar)(uint16_t)>
float dot_half_impl(const uint16_t* a, const float* b, int64_t n) {
  const DF d;
  const hn::Rebind<HalfT, DF> dh;
  const int64_t N = int64_t(hn::Lanes(d));
  const HalfT* ah = reinterpret_cast<const HalfT*>(a);
  auto s0 = hn::Zero(d), s1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    s0 = hn::MulAdd(hn::PromoteTo(d, hn::LoadU(dh, ah + i)), hn::LoadU(d, b + i), s0);
    s1 = hn::MulAdd(hn::PromoteTo(d, hn::LoadU(dh, ah + i + N)), hn::LoadU(d, b + i + N), s1);
  }
  for (; i + N <= n; i += N) s0 = hn::MulAdd(hn::PromoteTo(d, hn::LoadU(dh, ah + i)), hn::LoadU(d, b + i), s0);
  float s = hn::GetLane(hn::SumOfLanes(d, hn::Add(s0, s1)));
  for (; i < n; ++i) s += scalar(a[i]) * b[i];
  return s;
}

// Activations quantized to Q8_0 blocks (int8 + float scale) for the integer dot products.
struct ActQ8 {
  std::vector<int8_t> q;
  std::vector<float> d;
  void quantize(const float* x, int64_t n) {
    q.resize(size_t(n));
    d.resize(size_t(n / kQBlock));
    for (int64_t b = 0; b < n / kQBlock; ++b) {
      float amax = 0.0f;
      for (int j = 0; j < kQBlock; ++j) amax = std::max(amax, std::fabs(x[b * kQBlock + j]));
      const float s = amax / 127.0f, is = s != 0.0f ? 1.0f / s : 0.0f;
      d[b] = s;
      for (int j = 0; j < kQBlock; ++j) q[b * kQBlock + j] = int8_t(std::lround(x[b * kQBlock + j] * is));
    }
  }
};

// Σ over one block of 32: int8 weights × int8 activations, widened to int16 then int32.
// Highway 1.0 has no int8 dot instruction; promoting to int16 and using the widening
// multiply-add (vpmaddwd on AVX2) costs little next to the memory traffic.
using DI32 = hn::ScalableTag<int32_t>;
using DI16 = hn::Repartition<int16_t, DI32>;
using DI8H = hn::Rebind<int8_t, DI16>;  // as many int8 lanes as int16 lanes

inline hn::Vec<DI32> block_dot_i8(const int8_t* w, const int8_t* x, hn::Vec<DI32> acc) {
  const DI32 d32;
  const DI16 d16;
  const DI8H d8;
  const size_t N16 = hn::Lanes(d16);
  auto sum1 = hn::Zero(d32);
  for (size_t j = 0; j < size_t(kQBlock); j += N16) {
    const auto wv = hn::PromoteTo(d16, hn::LoadU(d8, w + j));
    const auto xv = hn::PromoteTo(d16, hn::LoadU(d8, x + j));
    acc = hn::ReorderWidenMulAccumulate(d32, wv, xv, acc, sum1);
  }
  return hn::Add(acc, sum1);
}

float dot_q8_0_impl(const BlockQ8_0* w, const ActQ8& x, int64_t nblocks) {
  const DI32 d32;
  const hn::Rebind<float, DI32> df;
  auto acc = hn::Zero(df);
  for (int64_t b = 0; b < nblocks; ++b) {
    const auto isum = block_dot_i8(w[b].qs, &x.q[b * kQBlock], hn::Zero(d32));
    acc = hn::MulAdd(hn::ConvertTo(df, isum), hn::Set(df, f16_to_f32(w[b].d) * x.d[b]), acc);
  }
  return hn::GetLane(hn::SumOfLanes(df, acc));
}

float dot_q4_0_impl(const BlockQ4_0* w, const ActQ8& x, int64_t nblocks) {
  const DI32 d32;
  const hn::Rebind<float, DI32> df;
  auto acc = hn::Zero(df);
  alignas(32) int8_t unpacked[kQBlock];
  const hn::Full128<uint8_t> du8;
  const hn::Full128<int8_t> di8;
  for (int64_t b = 0; b < nblocks; ++b) {
    const auto v = hn::LoadU(du8, w[b].qs);
    const auto lo = hn::Sub(hn::BitCast(di8, hn::And(v, hn::Set(du8, 0x0f))), hn::Set(di8, 8));
    const auto hi = hn::Sub(hn::BitCast(di8, hn::ShiftRight<4>(v)), hn::Set(di8, 8));
    hn::Store(lo, di8, unpacked);
    hn::Store(hi, di8, unpacked + 16);
    const auto isum = block_dot_i8(unpacked, &x.q[b * kQBlock], hn::Zero(d32));
    acc = hn::MulAdd(hn::ConvertTo(df, isum), hn::Set(df, f16_to_f32(w[b].d) * x.d[b]), acc);
  }
  return hn::GetLane(hn::SumOfLanes(df, acc));
}

}  // namespace

float dot_f32(const float* a, const float* b, int64_t n) { return dot_f32_impl(a, b, n); }
float dot_bf16(const uint16_t* a, const float* b, int64_t n) {
  return dot_half_impl<hwy::bfloat16_t, bf16_to_f32>(a, b, n);
}
float dot_f16(const uint16_t* a, const float* b, int64_t n) {
  return dot_half_impl<hwy::float16_t, f16_to_f32>(a, b, n);
}

float dot_row(DType t, const void* row, const float* x, int64_t n) {
  switch (t) {
    case DType::F32: return dot_f32(static_cast<const float*>(row), x, n);
    case DType::F16: return dot_f16(static_cast<const uint16_t*>(row), x, n);
    case DType::BF16: return dot_bf16(static_cast<const uint16_t*>(row), x, n);
    case DType::Q8_0:
    case DType::Q4_0: {
      ActQ8 q;
      q.quantize(x, n);
      return t == DType::Q8_0 ? dot_q8_0_impl(static_cast<const BlockQ8_0*>(row), q, n / kQBlock)
                              : dot_q4_0_impl(static_cast<const BlockQ4_0*>(row), q, n / kQBlock);
    }
    default: throw Error(std::string("no dot product for ") + dtype_name(t));
  }
}

void matvec(const MatrixRef& W, const float* x, float* y) {
  const int64_t rows = W.rows, cols = W.cols;
  const size_t rb = row_bytes(W.type, cols);
  const auto* base = static_cast<const uint8_t*>(W.data);
  ActQ8 q;
  if (dtype_is_quantized(W.type)) q.quantize(x, cols);
  // Static schedule: each thread streams one contiguous slab of the matrix.
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = base + size_t(r) * rb;
    switch (W.type) {
      case DType::F32: y[r] = dot_f32(reinterpret_cast<const float*>(row), x, cols); break;
      case DType::F16: y[r] = dot_f16(reinterpret_cast<const uint16_t*>(row), x, cols); break;
      case DType::BF16: y[r] = dot_bf16(reinterpret_cast<const uint16_t*>(row), x, cols); break;
      case DType::Q8_0: y[r] = dot_q8_0_impl(reinterpret_cast<const BlockQ8_0*>(row), q, cols / kQBlock); break;
      case DType::Q4_0: y[r] = dot_q4_0_impl(reinterpret_cast<const BlockQ4_0*>(row), q, cols / kQBlock); break;
      default: y[r] = 0.0f;
    }
  }
}

void matmul(const MatrixRef& W, const float* x, int n, float* y) {
  if (n == 1) return matvec(W, x, y);
  const int64_t rows = W.rows, cols = W.cols;
  if (W.type == DType::F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, int(rows), int(cols), 1.0f, x, int(cols),
                static_cast<const float*>(W.data), int(cols), 0.0f, y, int(rows));
    return;
  }
  // Dequantize a panel of rows, then one multithreaded sgemm per panel.
  constexpr int64_t kPanel = 1024;
  thread_local std::vector<float> panel_buf;  // reused across calls by the calling thread
  panel_buf.resize(size_t(std::min(rows, kPanel) * cols));
  float* panel = panel_buf.data();  // the OpenMP workers must see this thread's buffer
  for (int64_t r0 = 0; r0 < rows; r0 += kPanel) {
    const int64_t pr = std::min(kPanel, rows - r0);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < pr; ++r) dequantize_row(W.type, W.row(r0 + r), cols, panel + size_t(r * cols));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, int(pr), int(cols), 1.0f, x, int(cols), panel,
                int(cols), 0.0f, y + r0, int(rows));
  }
}

}  // namespace ll
