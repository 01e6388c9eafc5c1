#include "ops/matmul.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "hwy/highway.h"
#include "ops/qgroup.h"
#include "ops/quant.h"
#include "ops/simd.h"
#include "util/error.h"
#include "util/half.h"

namespace hn = hwy::HWY_NAMESPACE;

namespace ll {

const uint8_t* MatrixRef::row(int64_t r) const {
  if (grouped) throw Error("MatrixRef::row: a grouped matrix has no contiguous rows");
  return static_cast<const uint8_t*>(data) + size_t(r) * row_bytes(type, cols);
}

namespace {

using DF = hn::ScalableTag<float>;

// f16 -> f32 for the per-block scales: a 256 KiB table beats branchy software conversion.
const float* f16_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = f16_to_f32(uint16_t(h));
    return t;
  }();
  return table.data();
}

#if HWY_MAX_BYTES >= 32
// The integer dot products work on fixed 256-bit vectors on targets that have them (a Q block is
// 32 int8 = 2 x 16 int16 lanes): Highway 1.0 has no int8 dot instruction, so int8 is widened to
// int16 and multiplied-and-added pairwise into int32 (vpmaddwd).
#define LONGLLAMA_HWY_INT256 1
using DI8 = hn::FixedTag<int8_t, 16>;
using DU8 = hn::FixedTag<uint8_t, 16>;
using DI16 = hn::FixedTag<int16_t, 16>;
using DI32 = hn::FixedTag<int32_t, 8>;
using DF8 = hn::FixedTag<float, 8>;

inline hn::Vec<DI32> madd16(hn::Vec<DI16> a, hn::Vec<DI16> b, hn::Vec<DI32> acc) {
  const DI32 d32;
  auto hi = hn::Zero(d32);
  acc = hn::ReorderWidenMulAccumulate(d32, a, b, acc, hi);
  return hn::Add(acc, hi);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// Int8 dot products with intrinsics: with VNNI (AVX-512) one vpdpbusd multiplies 32 unsigned x
// signed int8 pairs and adds them into int32; with AVX2, vpmaddubsw makes int16 pair sums (they
// cannot saturate here: 2 x 128 x 127 < 32768) and vpmaddwd by 1 adds those into int32. Highway 1.0
// (Debian 12) exposes neither, hence these kernels; the Highway versions below are the path for
// other targets, and the tests check every path against the same reference.
#define LONGLLAMA_INT8_X86 1
using simd::hsum8;
// Σ u[i] * s[i] over 32 unsigned x signed int8 pairs, as 8 int32 partial sums added to acc.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
// One block's int32 partial sums. |w| as unsigned and x with w's sign: same products.
inline __m256i block_q8_0_x86(const BlockQ8_0& w, const int8_t* x) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return dot_u8s8(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
}
// The nibbles are used unsigned; their -8 offset (-8 Σx) is added into lane 0.
inline __m256i block_q4_0_x86(const BlockQ4_0& w, const int8_t* x, int32_t xsum) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
  const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0f));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return dot_u8s8(_mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * xsum)), q, xv);
}
// Two accumulators so consecutive blocks do not wait on each other's FMA.
template <typename Block, typename F>
float dot_blocks_x86(const Block* w, const ActQ8& x, int64_t nblocks, F block_dot) {
  const float* f16 = f16_table();
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nblocks; b += 2) {
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w[b], x, b)), _mm256_set1_ps(f16[w[b].d] * x.d[b]), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w[b + 1], x, b + 1)),
                           _mm256_set1_ps(f16[w[b + 1].d] * x.d[b + 1]), acc1);
  }
  if (b < nblocks)
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w[b], x, b)), _mm256_set1_ps(f16[w[b].d] * x.d[b]), acc0);
  return hsum8(_mm256_add_ps(acc0, acc1));
}
float dot_q8_0_x86(const BlockQ8_0* w, const ActQ8& x, int64_t nblocks) {
  return dot_blocks_x86(w, x, nblocks, [](const BlockQ8_0& blk, const ActQ8& a, int64_t b) {
    return block_q8_0_x86(blk, &a.q[size_t(b) * kQBlock]);
  });
}
float dot_q4_0_x86(const BlockQ4_0* w, const ActQ8& x, int64_t nblocks) {
  return dot_blocks_x86(w, x, nblocks, [](const BlockQ4_0& blk, const ActQ8& a, int64_t b) {
    return block_q4_0_x86(blk, &a.q[size_t(b) * kQBlock], a.sum[size_t(b)]);
  });
}
#endif

// Plain loops for targets without 256-bit vectors (the results are the same integers).
[[maybe_unused]] float dot_q_scalar(const uint8_t* blocks, bool q4, const ActQ8& x, int64_t nblocks) {
  const float* f16 = f16_table();
  float total = 0.0f;
  for (int64_t b = 0; b < nblocks; ++b) {
    int32_t isum = 0;
    uint16_t d;
    const int8_t* xq = &x.q[size_t(b) * kQBlock];
    if (q4) {
      const auto& blk = reinterpret_cast<const BlockQ4_0*>(blocks)[b];
      d = blk.d;
      for (int j = 0; j < kQBlock / 2; ++j)
        isum += (int(blk.qs[j] & 0x0f) - 8) * xq[j] + (int(blk.qs[j] >> 4) - 8) * xq[j + 16];
    } else {
      const auto& blk = reinterpret_cast<const BlockQ8_0*>(blocks)[b];
      d = blk.d;
      for (int j = 0; j < kQBlock; ++j) isum += int(blk.qs[j]) * xq[j];
    }
    total += float(isum) * (f16[d] * x.d[b]);
  }
  return total;
}

float dot_q8_0_impl(const BlockQ8_0* w, const ActQ8& x, int64_t nblocks) {
#if defined(LONGLLAMA_INT8_X86)
  return dot_q8_0_x86(w, x, nblocks);
#elif !defined(LONGLLAMA_HWY_INT256)
  return dot_q_scalar(reinterpret_cast<const uint8_t*>(w), false, x, nblocks);
#else
  const DI8 d8;
  const DI16 d16;
  const DI32 d32;
  const DF8 df;
  const float* f16 = f16_table();
  auto acc = hn::Zero(df);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int8_t* xq = &x.q[size_t(b) * kQBlock];
    auto isum = madd16(hn::PromoteTo(d16, hn::LoadU(d8, w[b].qs)), hn::PromoteTo(d16, hn::LoadU(d8, xq)), hn::Zero(d32));
    isum = madd16(hn::PromoteTo(d16, hn::LoadU(d8, w[b].qs + 16)), hn::PromoteTo(d16, hn::LoadU(d8, xq + 16)), isum);
    acc = hn::MulAdd(hn::ConvertTo(df, isum), hn::Set(df, f16[w[b].d] * x.d[b]), acc);
  }
  return hn::GetLane(hn::SumOfLanes(df, acc));
#endif
}

float dot_q4_0_impl(const BlockQ4_0* w, const ActQ8& x, int64_t nblocks) {
#if defined(LONGLLAMA_INT8_X86)
  return dot_q4_0_x86(w, x, nblocks);
#elif !defined(LONGLLAMA_HWY_INT256)
  return dot_q_scalar(reinterpret_cast<const uint8_t*>(w), true, x, nblocks);
#else
  const DI8 d8;
  const DU8 du8;
  const DI16 d16;
  const DI32 d32;
  const DF8 df;
  const float* f16 = f16_table();
  const auto mask = hn::Set(du8, 0x0f);
  const auto eight = hn::Set(d8, 8);
  auto acc = hn::Zero(df);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int8_t* xq = &x.q[size_t(b) * kQBlock];
    const auto v = hn::LoadU(du8, w[b].qs);
    const auto lo = hn::Sub(hn::BitCast(d8, hn::And(v, mask)), eight);         // elements 0..15
    const auto hi = hn::Sub(hn::BitCast(d8, hn::ShiftRight<4>(v)), eight);     // elements 16..31
    auto isum = madd16(hn::PromoteTo(d16, lo), hn::PromoteTo(d16, hn::LoadU(d8, xq)), hn::Zero(d32));
    isum = madd16(hn::PromoteTo(d16, hi), hn::PromoteTo(d16, hn::LoadU(d8, xq + 16)), isum);
    acc = hn::MulAdd(hn::ConvertTo(df, isum), hn::Set(df, f16[w[b].d] * x.d[b]), acc);
  }
  return hn::GetLane(hn::SumOfLanes(df, acc));
#endif
}

}  // namespace

float dot_f32(const float* a, const float* b, int64_t n) { return simd::dot1(a, b, n); }
float dot_bf16(const uint16_t* a, const float* b, int64_t n) {
  return simd::dot1(reinterpret_cast<const hwy::bfloat16_t*>(a), b, n);
}
float dot_f16(const uint16_t* a, const float* b, int64_t n) {
  return simd::dot1(reinterpret_cast<const hwy::float16_t*>(a), b, n);
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

namespace {

// Plain types: four rows per step share every load of x (it does not fit in L1 for wide rows).
template <typename T>
void matvec_plain(const T* w, int64_t rows, int64_t cols, const float* x, float* y) {
  const int64_t groups = rows / 4;
  const int ahead = matvec_prefetch_bytes;
#pragma omp parallel for schedule(guided, 4)  // long runs first: see matvec below
  for (int64_t g = 0; g < groups; ++g) {
    const T* r = w + size_t(g) * 4 * cols;
    simd::dot4(r, r + cols, r + 2 * cols, r + 3 * cols, x, cols, y + 4 * g, ahead);
  }
  for (int64_t r = groups * 4; r < rows; ++r) y[r] = simd::dot1(w + size_t(r) * cols, x, cols);
}

}  // namespace

void matvec(const MatrixRef& W, const float* x, float* y) {
  const int64_t rows = W.rows, cols = W.cols;
  if (W.grouped && !dtype_is_quantized(W.type))
    return matvec_grouped(W.type, static_cast<const uint8_t*>(W.data), rows, cols, x, y);
  switch (W.type) {
    case DType::F32: return matvec_plain(static_cast<const float*>(W.data), rows, cols, x, y);
    case DType::F16: return matvec_plain(static_cast<const hwy::float16_t*>(W.data), rows, cols, x, y);
    case DType::BF16: return matvec_plain(static_cast<const hwy::bfloat16_t*>(W.data), rows, cols, x, y);
    default: break;
  }
  const size_t rb = row_bytes(W.type, cols);
  const auto* base = static_cast<const uint8_t*>(W.data);
  thread_local ActQ8 q_buf;  // reused: decoding calls this a few hundred times per token
  ActQ8& q = q_buf;          // the OpenMP workers must see this thread's buffer
  if (dtype_is_quantized(W.type)) q.quantize(x, cols);
  if (W.grouped) return matvec_grouped(W.type, base, rows, cols, q, y);
  // Guided: each thread first takes a long run of rows (one sequential stream), then ever smaller
  // chunks (down to 16 rows), so a thread that loses its core to another process does not hold the
  // others up. Small dynamic chunks interleave the two threads' reads, which costs a quarter of the
  // bandwidth in this VM's fast regime (docs/performance.md, session 15).
#pragma omp parallel for schedule(guided, 16)
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
    if (W.grouped) {
#pragma omp parallel for schedule(static)
      for (int64_t g = 0; g < pr / kGroupRows; ++g)
        dequantize_grouped(W.type, static_cast<const uint8_t*>(W.data), cols, r0 + g * kGroupRows, kGroupRows,
                           panel + size_t(g * kGroupRows * cols));
    } else {
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < pr; ++r) dequantize_row(W.type, W.row(r0 + r), cols, panel + size_t(r * cols));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, int(pr), int(cols), 1.0f, x, int(cols), panel,
                int(cols), 0.0f, y + r0, int(rows));
  }
}

}  // namespace ll
