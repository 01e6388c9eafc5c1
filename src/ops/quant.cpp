#include "ops/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "hwy/highway.h"
#include "ops/simd.h"
#include "util/error.h"
#include "util/half.h"

namespace ll {

size_t row_bytes(DType t, int64_t n) { return size_t(n / dtype_block_elems(t)) * dtype_size(t); }

bool is_weight_type(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::Q8_0 || t == DType::Q4_0;
}

DType parse_weight_type(const std::string& name) {
  if (name == "f32") return DType::F32;
  if (name == "f16") return DType::F16;
  if (name == "bf16") return DType::BF16;
  if (name == "q8_0") return DType::Q8_0;
  if (name == "q4_0") return DType::Q4_0;
  throw Error("unknown weight type '" + name + "' (expected f32, f16, bf16, q8_0 or q4_0)");
}

void quantize_row(DType t, const float* x, int64_t n, void* out) {
  switch (t) {
    case DType::F32: std::memcpy(out, x, size_t(n) * 4); return;
    case DType::F16: {
      auto* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = f32_to_f16(x[i]);
      return;
    }
    case DType::BF16: {
      auto* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(x[i]);
      return;
    }
    case DType::Q8_0: {
      auto* b = static_cast<BlockQ8_0*>(out);
      for (int64_t i = 0; i < n / kQBlock; ++i, x += kQBlock) {
        float amax = 0.0f;
        for (int j = 0; j < kQBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = f32_to_f16(d);
        for (int j = 0; j < kQBlock; ++j) b[i].qs[j] = int8_t(std::lround(x[j] * id));
      }
      return;
    }
    case DType::Q4_0: {
      auto* b = static_cast<BlockQ4_0*>(out);
      for (int64_t i = 0; i < n / kQBlock; ++i, x += kQBlock) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < kQBlock; ++j)
          if (std::fabs(x[j]) > amax) {
            amax = std::fabs(x[j]);
            max = x[j];
          }
        const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = f32_to_f16(d);
        for (int j = 0; j < kQBlock / 2; ++j) {
          const uint8_t lo = uint8_t(std::min(15, int(int8_t(x[j] * id + 8.5f))));
          const uint8_t hi = uint8_t(std::min(15, int(int8_t(x[j + 16] * id + 8.5f))));
          b[i].qs[j] = uint8_t(lo | (hi << 4));
        }
      }
      return;
    }
    default: throw Error(std::string("cannot quantize to ") + dtype_name(t));
  }
}

namespace {
// Widens n halves (hwy::float16_t or hwy::bfloat16_t) to float, a vector at a time: prefill
// dequantizes every f16/bf16 weight once per call, and the scalar bit-twiddling conversion took
// ~40% of an f16 pp512 on a Xeon VM (bench_kernels BM_Matmul/f16, session 18). Exact: every half
// is a float.
template <typename H>
void widen_halves(const void* row, int64_t n, float* out) {
  namespace hn = hwy::HWY_NAMESPACE;
  const simd::DF df;
  const auto* r = static_cast<const H*>(row);
  const int64_t N = int64_t(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(simd::load_f32(df, r + i), df, out + i);
  for (; i < n; ++i) out[i] = simd::scalar_f32(r[i]);
}
}  // namespace

void dequantize_row(DType t, const void* row, int64_t n, float* out) {
  switch (t) {
    case DType::F32: std::memcpy(out, row, size_t(n) * 4); return;
    case DType::F16: widen_halves<hwy::float16_t>(row, n, out); return;
    case DType::BF16: widen_halves<hwy::bfloat16_t>(row, n, out); return;
    case DType::Q8_0: {
      auto* b = static_cast<const BlockQ8_0*>(row);
      for (int64_t i = 0; i < n / kQBlock; ++i) {
        const float d = f16_to_f32(b[i].d);
        for (int j = 0; j < kQBlock; ++j) out[i * kQBlock + j] = float(b[i].qs[j]) * d;
      }
      return;
    }
    case DType::Q4_0: {
      auto* b = static_cast<const BlockQ4_0*>(row);
      for (int64_t i = 0; i < n / kQBlock; ++i) {
        const float d = f16_to_f32(b[i].d);
        for (int j = 0; j < kQBlock / 2; ++j) {
          out[i * kQBlock + j] = float(int(b[i].qs[j] & 0x0f) - 8) * d;
          out[i * kQBlock + j + 16] = float(int(b[i].qs[j] >> 4) - 8) * d;
        }
      }
      return;
    }
    default: throw Error(std::string("cannot dequantize ") + dtype_name(t));
  }
}

// Vectorized (the decode path quantizes the activations before every Q8_0/Q4_0 matrix, a few
// percent of a q4_0 token when done one element at a time); bit-exact with the scalar definition
// s = amax/127, q = lround(x * (1/s)): round half away from zero is trunc(|v|) + (frac >= 0.5).
void ActQ8::quantize(const float* x, int64_t n) {
  namespace hn = hwy::HWY_NAMESPACE;
  const hn::ScalableTag<float> df;
  const hn::Rebind<int32_t, decltype(df)> di;
  const hn::Rebind<int8_t, decltype(df)> d8;
  const size_t N = hn::Lanes(df);
  q.resize(size_t(n));
  d.resize(size_t(n / kQBlock));
  sum.resize(size_t(n / kQBlock));
  if (kQBlock % N != 0) {  // lanes that do not tile a block (not on x86): one element at a time
    for (int64_t b = 0; b < n / kQBlock; ++b) {
      float amax = 0.0f;
      for (int j = 0; j < kQBlock; ++j) amax = std::max(amax, std::fabs(x[b * kQBlock + j]));
      const float s = amax / 127.0f, is = s != 0.0f ? 1.0f / s : 0.0f;
      d[size_t(b)] = s;
      int32_t total = 0;
      for (int j = 0; j < kQBlock; ++j) total += (q[size_t(b * kQBlock + j)] = int8_t(std::lround(x[b * kQBlock + j] * is)));
      sum[size_t(b)] = total;
    }
    return;
  }
  const auto half = hn::Set(df, 0.5f), one = hn::Set(df, 1.0f);
  for (int64_t b = 0; b < n / kQBlock; ++b) {
    const float* xb = x + b * kQBlock;
    auto vmax = hn::Zero(df);
    for (size_t j = 0; j < size_t(kQBlock); j += N) vmax = hn::Max(vmax, hn::Abs(hn::LoadU(df, xb + j)));
    const float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
    const float s = amax / 127.0f, is = s != 0.0f ? 1.0f / s : 0.0f;
    d[size_t(b)] = s;
    const auto vis = hn::Set(df, is);
    auto vsum = hn::Zero(di);
    for (size_t j = 0; j < size_t(kQBlock); j += N) {
      const auto v = hn::Mul(hn::LoadU(df, xb + j), vis);
      const auto a = hn::Abs(v), t = hn::Trunc(a);
      const auto r = hn::CopySignToAbs(hn::Add(t, hn::IfThenElseZero(hn::Ge(hn::Sub(a, t), half), one)), v);
      const auto i = hn::ConvertTo(di, r);
      vsum = hn::Add(vsum, i);
      hn::StoreU(hn::DemoteTo(d8, i), d8, &q[size_t(b * kQBlock) + j]);
    }
    sum[size_t(b)] = hn::GetLane(hn::SumOfLanes(di, vsum));
  }
}

}  // namespace ll
