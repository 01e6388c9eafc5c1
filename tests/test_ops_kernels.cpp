// The typed kernels against independent scalar references:
//  - quant.h: F32/F16/BF16 rows and the GGML Q8_0/Q4_0 blocks, bit-exact against a reference
//    written from the GGML spec (ggml-quants.c quantize_row_q8_0_ref / quantize_row_q4_0_ref);
//  - matmul.h: dot products of every row type, matvec and matmul against double references;
//  - attention.h: HeadAttention (fused and sgemm paths) against a naive double softmax over the
//    concatenation of F32/BF16/F16 key/value blocks;
//  - kv_memory.h: KVMemory::block zero-copy views.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "memory/kv_memory.h"
#include "ops/attention.h"
#include "ops/matmul.h"
#include "ops/quant.h"
#include "util/error.h"
#include "util/half.h"

namespace {

using ll::DType;

const DType kAllTypes[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0};
const DType kPlainTypes[] = {DType::F32, DType::F16, DType::BF16};

bool is_q(DType t) { return t == DType::Q8_0 || t == DType::Q4_0; }

std::vector<float> uniform_vec(std::mt19937_64& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

std::vector<float> normal_vec(std::mt19937_64& rng, size_t n, float sd = 1.0f) {
  std::normal_distribution<float> g(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = g(rng);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Independent reference roundings: frexp/ldexp/nearbyint in double (ties to even under the default
// rounding mode), no bit tricks.

// Rounds |a| < 2^128 to `bits` significant bits with the given minimum normal exponent (subnormal
// step 2^(emin - bits + 1)); values at or past `overflow` become infinity.
double ref_round(double a, int bits, int emin, double overflow) {
  if (a == 0.0 || std::isnan(a)) return a;
  const double s = std::fabs(a);
  int e;
  std::frexp(s, &e);  // s = m * 2^e, m in [0.5, 1): unit in the last place is 2^(e - bits)
  const int ulp_exp = std::max(e, emin + 1) - bits;
  double r = std::ldexp(std::nearbyint(std::ldexp(s, -ulp_exp)), ulp_exp);
  if (r >= overflow) r = HUGE_VAL;
  return std::copysign(r, a);
}
// f16: 11 significant bits, min normal 2^-14; 65520 and above round to infinity.
double ref_f16(double a) { return ref_round(a, 11, -14, 65520.0); }
// bf16: 8 significant bits, float's exponent range.
double ref_bf16(double a) { return ref_round(a, 8, -126, 0x1.ffp127 /* halfway to 2^128 */); }

// Bit pattern of a finite value exactly representable in f16.
uint16_t ref_f16_bits(double v) {
  const uint16_t sign = std::signbit(v) ? 0x8000u : 0u;
  const double a = std::fabs(v);
  if (std::isinf(a)) return uint16_t(sign | 0x7c00u);
  if (a < std::ldexp(1.0, -14)) return uint16_t(sign | uint16_t(std::ldexp(a, 24)));  // subnormal
  int e;
  const double m = std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  const uint32_t mant = uint32_t(std::ldexp(m, 11)) - 1024u;
  return uint16_t(sign | uint32_t(e - 1 + 15) << 10 | mant);
}

double ref_round_type(DType t, double x) {
  return t == DType::F16 ? ref_f16(x) : t == DType::BF16 ? ref_bf16(x) : double(float(x));
}

// ---------------------------------------------------------------------------------------------
// GGML reference quantizers (the block bytes, built by hand, little-endian f16 scale first).

struct RefBlock {
  std::vector<uint8_t> bytes;  // 34 (Q8_0) or 18 (Q4_0)
  float d = 0;                 // unrounded scale
  double d16 = 0;              // f16-rounded scale
  int q[32] = {};              // quantized values as stored (Q4_0: 0..15)
};

// quantize_row_q8_0_ref: d = amax/127, id = 1/d, q = roundf(x*id) (half away from zero).
RefBlock ref_q8_0_block(const float* x) {
  RefBlock b;
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  b.d = amax / 127.0f;
  const float id = b.d != 0.0f ? 1.0f / b.d : 0.0f;
  b.d16 = ref_f16(b.d);
  const uint16_t db = ref_f16_bits(b.d16);
  b.bytes = {uint8_t(db & 0xff), uint8_t(db >> 8)};
  for (int j = 0; j < 32; ++j) {
    const float prod = x[j] * id;
    b.q[j] = int(std::round(prod));
    b.bytes.push_back(uint8_t(int8_t(b.q[j])));
  }
  return b;
}

// quantize_row_q4_0_ref: max = first value of largest magnitude, d = max/-8, id = 1/d,
// q = min(15, (int8_t)(x*id + 8.5f)); element j in the low nibble of byte j, j+16 in the high one.
// `alt` receives the value with x*id+8.5 fused into one rounding (compilers may contract it into an
// FMA; llama.cpp has the same freedom), which is accepted as well.
RefBlock ref_q4_0_block(const float* x, int* alt = nullptr) {
  RefBlock b;
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j)
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  b.d = max / -8.0f;
  const float id = b.d != 0.0f ? 1.0f / b.d : 0.0f;
  b.d16 = ref_f16(b.d);
  const uint16_t db = ref_f16_bits(b.d16);
  b.bytes = {uint8_t(db & 0xff), uint8_t(db >> 8)};
  for (int j = 0; j < 32; ++j) {
    volatile float prod = x[j] * id;  // volatile: two roundings, no contraction
    const float t = prod + 8.5f;
    b.q[j] = std::min(15, int(int8_t(t)));
    if (alt) alt[j] = std::min(15, int(int8_t(std::fma(x[j], id, 8.5f))));
  }
  for (int j = 0; j < 16; ++j) b.bytes.push_back(uint8_t(b.q[j] | (b.q[j + 16] << 4)));
  return b;
}

// Quantizes a row with the library into a buffer with guard bytes, checks the guard.
std::vector<uint8_t> lib_quantize(DType t, const float* x, int64_t n) {
  const size_t rb = ll::row_bytes(t, n);
  std::vector<uint8_t> buf(rb + 16, 0xab);
  ll::quantize_row(t, x, n, buf.data());
  for (size_t i = rb; i < buf.size(); ++i) EXPECT_EQ(buf[i], 0xab) << "quantize_row wrote past row_bytes";
  buf.resize(rb);
  return buf;
}

std::vector<float> lib_dequantize(DType t, const void* row, int64_t n) {
  std::vector<float> out(size_t(n) + 4, -777.0f);
  ll::dequantize_row(t, row, n, out.data());
  for (size_t i = size_t(n); i < out.size(); ++i) EXPECT_EQ(out[i], -777.0f) << "dequantize_row wrote past n";
  out.resize(size_t(n));
  return out;
}

// Blocks of mixed character: normal data at scales from tiny (f16-subnormal scale) to large,
// uniform data, blocks with one huge outlier, sparse blocks, all-zero blocks, exact ties.
std::vector<float> varied_blocks(std::mt19937_64& rng, int nblocks) {
  std::vector<float> x;
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const float scales[] = {1e-6f, 1e-4f, 3e-3f, 0.02f, 1.0f, 50.0f, 3000.0f};
  for (int b = 0; b < nblocks; ++b) {
    const int kind = b % 9;
    const float s = scales[(b / 9) % 7];
    float blk[32];
    for (int j = 0; j < 32; ++j) {
      switch (kind) {
        case 0:
        case 1:
        case 2: blk[j] = s * g(rng); break;
        case 3: blk[j] = s * u(rng); break;
        case 4: blk[j] = (j == b % 32) ? 1e4f : 0.01f * g(rng); break;  // single huge value
        case 5: blk[j] = (j % 5 == 0) ? s * g(rng) : 0.0f; break;       // sparse
        case 6: blk[j] = 0.0f; break;                                    // all zero
        case 7: blk[j] = (j % 2 ? -1.0f : 1.0f) * s * float(j % 9);  // exact ties of max magnitude
          break;
        default: blk[j] = s * std::round(16.0f * u(rng)) / 16.0f;  // many exact halves
      }
    }
    x.insert(x.end(), blk, blk + 32);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// quant.h

TEST(QuantRowBytes, EveryType) {
  EXPECT_EQ(ll::row_bytes(DType::F32, 7), 28u);
  EXPECT_EQ(ll::row_bytes(DType::F16, 7), 14u);
  EXPECT_EQ(ll::row_bytes(DType::BF16, 7), 14u);
  EXPECT_EQ(ll::row_bytes(DType::Q8_0, 32), 34u);
  EXPECT_EQ(ll::row_bytes(DType::Q4_0, 32), 18u);
  EXPECT_EQ(ll::row_bytes(DType::Q8_0, 8640), 270u * 34u);
  EXPECT_EQ(ll::row_bytes(DType::Q4_0, 8640), 270u * 18u);
  EXPECT_EQ(ll::row_bytes(DType::Q8_0, 0), 0u);
  EXPECT_EQ(ll::row_bytes(DType::F32, 0), 0u);
  for (DType t : kAllTypes) EXPECT_TRUE(ll::is_weight_type(t)) << ll::dtype_name(t);
  for (DType t : {DType::F64, DType::I64, DType::I32, DType::I16, DType::I8, DType::U8, DType::BOOL})
    EXPECT_FALSE(ll::is_weight_type(t)) << ll::dtype_name(t);
}

TEST(QuantParse, NamesAndErrors) {
  EXPECT_EQ(ll::parse_weight_type("f32"), DType::F32);
  EXPECT_EQ(ll::parse_weight_type("f16"), DType::F16);
  EXPECT_EQ(ll::parse_weight_type("bf16"), DType::BF16);
  EXPECT_EQ(ll::parse_weight_type("q8_0"), DType::Q8_0);
  EXPECT_EQ(ll::parse_weight_type("q4_0"), DType::Q4_0);
  for (const std::string bad : {"", "Q8_0", "F32", "q4_1", "q8", "f64", "int8", " f32", "f32 ", "bfloat16"}) {
    try {
      ll::parse_weight_type(bad);
      ADD_FAILURE() << "expected ll::Error for '" << bad << "'";
    } catch (const ll::Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("'" + bad + "'"), std::string::npos) << msg;
      EXPECT_NE(msg.find("q4_0"), std::string::npos) << "lists the valid names: " << msg;
    }
  }
  float x[32] = {};
  uint8_t buf[256];
  EXPECT_THROW(ll::quantize_row(DType::I8, x, 32, buf), ll::Error);
  EXPECT_THROW(ll::quantize_row(DType::F64, x, 32, buf), ll::Error);
  EXPECT_THROW(ll::dequantize_row(DType::I32, buf, 32, x), ll::Error);
}

TEST(QuantRow, PlainTypesRoundToNearestEven) {
  std::mt19937_64 rng(101);
  std::vector<float> x = normal_vec(rng, 4000, 3.0f);
  // values where the formats round differently: ties, f16 subnormals/overflow, tiny bf16
  const float specials[] = {0.0f, -0.0f, 1.0f + 0x1p-11f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-11f, 1.0f + 3 * 0x1p-8f,
                            65504.0f, 65519.0f, 65520.0f, -70000.0f, 6e-8f, 3e-8f, 2.9e-8f, 1e-6f, -1e-5f,
                            6.1e-5f, 1e-30f, 3e38f, -1.5e-39f};
  x.insert(x.end(), std::begin(specials), std::end(specials));
  const int64_t n = int64_t(x.size());
  for (DType t : kPlainTypes) {
    const auto row = lib_quantize(t, x.data(), n);
    const auto back = lib_dequantize(t, row.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const double want = ref_round_type(t, x[i]);
      ASSERT_EQ(double(back[i]), want) << ll::dtype_name(t) << " x=" << x[i];
      ASSERT_EQ(std::signbit(back[i]), std::signbit(x[i])) << ll::dtype_name(t) << " x=" << x[i];
      if (t == DType::F16 && std::isfinite(want)) {
        uint16_t h;
        std::memcpy(&h, row.data() + 2 * i, 2);
        ASSERT_EQ(h, ref_f16_bits(want)) << "x=" << x[i];
      }
    }
  }
}

// The vectorized widening of F16/BF16 rows against the scalar definitions, for every one of the
// 65,536 bit patterns (NaNs: still NaN), at an odd length so that the scalar tail runs too.
TEST(QuantRow, HalfRowsWidenEveryBitPattern) {
  std::vector<uint16_t> bits(65536 + 7);
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = uint16_t(i * 40503u);  // odd multiplier: a permutation
  for (DType t : {DType::F16, DType::BF16}) {
    const auto out = lib_dequantize(t, bits.data(), int64_t(bits.size()));
    for (size_t i = 0; i < bits.size(); ++i) {
      const float want = t == DType::F16 ? ll::f16_to_f32(bits[i]) : ll::bf16_to_f32(bits[i]);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(out[i])) << ll::dtype_name(t) << " bits " << bits[i];
        continue;
      }
      uint32_t got_u, want_u;
      std::memcpy(&got_u, &out[i], 4);
      std::memcpy(&want_u, &want, 4);
      ASSERT_EQ(got_u, want_u) << ll::dtype_name(t) << " bits " << bits[i];
    }
  }
}

TEST(QuantRow, Q8_0BitExactAgainstGgmlReference) {
  std::mt19937_64 rng(103);
  const int nb = 9 * 7 * 4;
  const auto x = varied_blocks(rng, nb);
  const auto row = lib_quantize(DType::Q8_0, x.data(), int64_t(x.size()));
  const auto back = lib_dequantize(DType::Q8_0, row.data(), int64_t(x.size()));
  for (int b = 0; b < nb; ++b) {
    const RefBlock r = ref_q8_0_block(&x[size_t(b) * 32]);
    ASSERT_EQ(std::vector<uint8_t>(row.begin() + b * 34, row.begin() + (b + 1) * 34), r.bytes) << "block " << b;
    for (int j = 0; j < 32; ++j) {
      // dequantized value = q * d with the f16-rounded d
      ASSERT_EQ(double(back[size_t(b) * 32 + j]), double(float(double(r.q[j]) * r.d16))) << "block " << b << " j " << j;
      // the spec's q = round-half-away(x/d), up to the float rounding of x*(1/d) (~2 ulp of 127)
      const double exact = double(x[size_t(b) * 32 + j]) / double(r.d);
      if (r.d != 0.0f) {
        ASSERT_LE(std::fabs(r.q[j] - exact), 0.5 + 1e-4) << "block " << b;
      }
      ASSERT_LE(std::abs(r.q[j]), 127);
    }
  }
}

TEST(QuantRow, Q4_0BitExactAgainstGgmlReference) {
  std::mt19937_64 rng(107);
  const int nb = 9 * 7 * 4;
  const auto x = varied_blocks(rng, nb);
  const auto row = lib_quantize(DType::Q4_0, x.data(), int64_t(x.size()));
  const auto back = lib_dequantize(DType::Q4_0, row.data(), int64_t(x.size()));
  int contraction_diffs = 0;
  for (int b = 0; b < nb; ++b) {
    int alt[32];
    const RefBlock r = ref_q4_0_block(&x[size_t(b) * 32], alt);
    const uint8_t* got = row.data() + size_t(b) * 18;
    ASSERT_EQ(std::vector<uint8_t>(got, got + 2), std::vector<uint8_t>(r.bytes.begin(), r.bytes.begin() + 2))
        << "scale of block " << b;
    for (int j = 0; j < 32; ++j) {
      const int q = j < 16 ? (got[2 + j] & 0x0f) : (got[2 + j - 16] >> 4);
      if (q != r.q[j]) {
        ASSERT_EQ(q, alt[j]) << "block " << b << " element " << j << " x=" << x[size_t(b) * 32 + j];
        ++contraction_diffs;
      }
      ASSERT_EQ(double(back[size_t(b) * 32 + j]), double(float(double(q - 8) * r.d16))) << "block " << b << " j " << j;
    }
  }
  // Only inputs with x/d exactly k + 1/2 (the "exact halves" blocks) can differ; with FMA
  // contraction (-march=native) the library rounds e.g. x/d = -5.5 to q = 2 instead of 3.
  RecordProperty("q4_0_fma_tie_differences", contraction_diffs);
}

TEST(QuantRow, ZeroBlocksAndHandBuiltBlocks) {
  const float zeros[64] = {};
  const auto q8 = lib_quantize(DType::Q8_0, zeros, 64);
  EXPECT_EQ(q8, std::vector<uint8_t>(68, 0));  // d = 0, q = 0
  const auto q4 = lib_quantize(DType::Q4_0, zeros, 64);
  for (int b = 0; b < 2; ++b) {
    EXPECT_EQ(q4[b * 18], 0x00);  // d = 0 / -8 = -0.0: f16 0x8000, as GGML stores it
    EXPECT_EQ(q4[b * 18 + 1], 0x80);
    for (int j = 0; j < 16; ++j) EXPECT_EQ(q4[b * 18 + 2 + j], 0x88) << "zero is stored as 8 in both nibbles";
  }
  for (DType t : {DType::Q8_0, DType::Q4_0})
    for (float v : lib_dequantize(t, (t == DType::Q8_0 ? q8 : q4).data(), 64)) EXPECT_EQ(v, 0.0f);

  // Hand-built blocks: d = 0.5 (f16 0x3800), known quants, nibble order.
  uint8_t b8[34] = {0x00, 0x38};
  for (int j = 0; j < 32; ++j) b8[2 + j] = uint8_t(int8_t(j * 8 - 128));  // -128..120
  const auto d8 = lib_dequantize(DType::Q8_0, b8, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(d8[j], 0.5f * float(j * 8 - 128)) << j;
  uint8_t b4[18] = {0x00, 0xb8};  // d = -0.5
  for (int j = 0; j < 16; ++j) b4[2 + j] = uint8_t(j | ((15 - j) << 4));
  const auto d4 = lib_dequantize(DType::Q4_0, b4, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(d4[j], -0.5f * float(j - 8)) << "element " << j << " is the low nibble of byte " << j;
    EXPECT_EQ(d4[j + 16], -0.5f * float(15 - j - 8)) << "element " << j + 16 << " is the high nibble of byte " << j;
  }
}

TEST(QuantRow, SingleHugeValueAndTies) {
  // One huge value: every small value quantizes to 0, the huge one round-trips to within f16(d).
  float x[32];
  for (int j = 0; j < 32; ++j) x[j] = 0.001f * float(j - 16);
  x[5] = 12345.0f;
  {
    const auto row = lib_quantize(DType::Q8_0, x, 32);
    EXPECT_EQ(row, ref_q8_0_block(x).bytes);
    const auto back = lib_dequantize(DType::Q8_0, row.data(), 32);
    for (int j = 0; j < 32; ++j) {
      if (j != 5) {
        EXPECT_EQ(back[j], 0.0f) << j;
      }
    }
    EXPECT_EQ(int8_t(row[2 + 5]), 127);
    EXPECT_NEAR(back[5], 12345.0f, 12345.0f * 0x1p-11);
  }
  {
    const auto row = lib_quantize(DType::Q4_0, x, 32);
    EXPECT_EQ(row, ref_q4_0_block(x).bytes);
    const auto back = lib_dequantize(DType::Q4_0, row.data(), 32);
    EXPECT_EQ(row[2 + 5] & 0x0f, 0) << "the largest value maps to q = 0 (-8 d)";
    for (int j = 0; j < 32; ++j) {
      if (j != 5) {
        EXPECT_EQ(back[j], 0.0f) << j;
      }
    }
    EXPECT_NEAR(back[5], 12345.0f, 12345.0f * 0x1p-11);
  }
  // Q4_0 ties: the first value of largest magnitude sets the sign of d; the opposite extreme
  // is clamped to q = 15, i.e. +7 d, an error of exactly |d| (why the Q4_0 bound is d, not d/2).
  float t[32] = {};
  t[3] = 8.0f;
  t[20] = -8.0f;
  const auto row = lib_quantize(DType::Q4_0, t, 32);
  EXPECT_EQ(row, ref_q4_0_block(t).bytes);
  const auto back = lib_dequantize(DType::Q4_0, row.data(), 32);
  EXPECT_EQ(back[3], 8.0f);    // d = -1, q = 0
  EXPECT_EQ(back[20], -7.0f);  // clamped
  t[3] = -8.0f;
  t[20] = 8.0f;
  const auto back2 = lib_dequantize(DType::Q4_0, lib_quantize(DType::Q4_0, t, 32).data(), 32);
  EXPECT_EQ(back2[3], -8.0f);
  EXPECT_EQ(back2[20], 7.0f);
}

// Round-trip error bounds, derived:
//  Q8_0: q = round(x/d) so |x - q d| <= d/2; the stored scale is d16 = f16(d), so
//        |x - q d16| <= d/2 + |q| |d - d16| <= d/2 + 127 |d - d16|  (<= 0.562 d for normal f16 d).
//  Q4_0: q - 8 = round-half-up(x/d) clamped to <= 7, x/d in [-8, 8]: the clamp of x/d in (7.5, 8]
//        costs up to |d|, so |x - (q-8) d| <= |d| and with the f16 scale
//        |x - (q-8) d16| <= |d| + 8 |d - d16|.
TEST(QuantRow, RoundTripErrorBounds) {
  std::mt19937_64 rng(109);
  const int nb = 9 * 7 * 8;
  auto x = varied_blocks(rng, nb);
  const auto more = normal_vec(rng, 32 * 2000);
  x.insert(x.end(), more.begin(), more.end());
  const int64_t n = int64_t(x.size());
  double worst8 = 0, worst4 = 0;  // max error / d
  for (DType t : {DType::Q8_0, DType::Q4_0}) {
    const auto back = lib_dequantize(t, lib_quantize(t, x.data(), n).data(), n);
    for (int64_t b = 0; b < n / 32; ++b) {
      const float* xb = &x[size_t(b) * 32];
      const RefBlock r = t == DType::Q8_0 ? ref_q8_0_block(xb) : ref_q4_0_block(xb);
      const double d = std::fabs(double(r.d)), dd = std::fabs(double(r.d) - r.d16);
      const double bound = t == DType::Q8_0 ? 0.5 * d + 127 * dd : d + 8 * dd;
      for (int j = 0; j < 32; ++j) {
        const double err = std::fabs(double(xb[j]) - double(back[size_t(b) * 32 + j]));
        ASSERT_LE(err, bound * (1 + 1e-5) + 1e-30) << ll::dtype_name(t) << " block " << b << " x=" << xb[j];
        if (d > 1e-3 && d < 1e3) (t == DType::Q8_0 ? worst8 : worst4) = std::max(t == DType::Q8_0 ? worst8 : worst4, err / d);
      }
    }
  }
  // The bounds are reached in practice (so they are the right ones, not loose ones).
  EXPECT_GT(worst8, 0.49);
  EXPECT_LT(worst8, 0.5 + 127 * 0x1p-11);
  EXPECT_GT(worst4, 0.95);
  EXPECT_LE(worst4, 1.0 + 8 * 0x1p-11);
}

// ---------------------------------------------------------------------------------------------
// Dot products

const int kPlainSizes[] = {1, 3, 7, 8, 9, 31, 32, 33, 100, 255, 256, 3200, 8640};
const int kQSizes[] = {32, 64, 96, 3200, 8640};

// Reference activation quantization as the Q dot products do it (Q8_0 blocks with a float scale:
// s = amax/127, q = round-half-away(x * (1/s))).
struct RefActQ8 {
  std::vector<int> q;
  std::vector<float> s;
  explicit RefActQ8(const float* x, int64_t n) : q(size_t(n)), s(size_t(n / 32)) {
    for (int64_t b = 0; b < n / 32; ++b) {
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
      s[b] = amax / 127.0f;
      const float is = s[b] != 0.0f ? 1.0f / s[b] : 0.0f;
      for (int j = 0; j < 32; ++j) q[b * 32 + j] = int(std::lround(x[b * 32 + j] * is));
    }
  }
};

// The vectorized ll::ActQ8 against the reference, element by element: random blocks of many
// magnitudes, an all-zero block, and blocks whose scaled values land exactly on .5 ties (amax
// 127 gives the scale 1, so k + 0.5 stays a tie after scaling).
TEST(ActQ8, BitExactAgainstReference) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x;
  for (int b = 0; b < 40; ++b) {
    const float scale = std::pow(10.0f, float(b % 9) - 4.0f);
    for (int j = 0; j < 32; ++j) x.push_back(nd(rng) * scale);
  }
  for (int j = 0; j < 32; ++j) x.push_back(0.0f);
  for (int j = 0; j < 32; ++j) x.push_back(j == 0 ? 127.0f : (j % 2 ? 1.0f : -1.0f) * (float(j) + 0.5f));
  for (int j = 0; j < 32; ++j) x.push_back(j == 5 ? -127.0f : (j % 3 ? 0.5f : -2.5f));
  const int64_t n = int64_t(x.size());
  ll::ActQ8 a;
  a.quantize(x.data(), n);
  const RefActQ8 ref(x.data(), n);
  ASSERT_EQ(a.q.size(), size_t(n));
  for (int64_t b = 0; b < n / 32; ++b) {
    EXPECT_EQ(a.d[size_t(b)], ref.s[size_t(b)]) << "block " << b;
    int total = 0;
    for (int j = 0; j < 32; ++j) {
      EXPECT_EQ(int(a.q[size_t(b * 32 + j)]), ref.q[size_t(b * 32 + j)]) << "block " << b << " element " << j;
      total += ref.q[size_t(b * 32 + j)];
    }
    EXPECT_EQ(a.sum[size_t(b)], total) << "block " << b;
  }
  // the tie blocks really hold ties: 1.5 -> 2, -2.5 -> -3, 0.5 -> 1
  EXPECT_EQ(int(a.q[size_t(41 * 32 + 1)]), 2);
  EXPECT_EQ(int(a.q[size_t(41 * 32 + 2)]), -3);
  EXPECT_EQ(int(a.q[size_t(42 * 32 + 1)]), 1);
}

struct DotCheck {
  double ref = 0;    // double dot of the dequantized row with x
  double mag = 0;    // sum |w| |x|
  double actq = 0;   // Q types: bound of the activation quantization error, sum_b s_b/2 sum_j |w_j|
  double tight = 0;  // Q types: the dot with the reference-quantized activations (exact integer sums)
  double tight_mag = 0;
};

DotCheck dot_reference(DType t, const void* row, const float* x, int64_t n) {
  DotCheck c;
  const auto w = lib_dequantize(t, row, n);  // bit-exact against the reference above
  for (int64_t i = 0; i < n; ++i) {
    c.ref += double(w[i]) * x[i];
    c.mag += std::fabs(double(w[i]) * x[i]);
  }
  if (is_q(t)) {
    const RefActQ8 a(x, n);
    const auto* bytes = static_cast<const uint8_t*>(row);
    const size_t bs = ll::dtype_size(t);
    for (int64_t b = 0; b < n / 32; ++b) {
      uint16_t dh;
      std::memcpy(&dh, bytes + size_t(b) * bs, 2);
      const double dw = ll::f16_to_f32(dh);
      int64_t isum = 0;
      double wabs = 0;
      for (int j = 0; j < 32; ++j) {
        const int qw = t == DType::Q8_0 ? int(int8_t(bytes[size_t(b) * bs + 2 + j]))
                                        : (j < 16 ? (bytes[size_t(b) * bs + 2 + j] & 15) : (bytes[size_t(b) * bs + 2 + j - 16] >> 4)) - 8;
        isum += int64_t(qw) * a.q[b * 32 + j];
        wabs += std::fabs(double(w[b * 32 + j]));
      }
      c.tight += dw * double(a.s[b]) * double(isum);
      c.tight_mag += std::fabs(dw * double(a.s[b]) * double(isum));
      c.actq += 0.5 * double(a.s[b]) * wabs;
    }
  }
  return c;
}

void expect_dot_close(DType t, float got, const DotCheck& c, const std::string& what) {
  ASSERT_TRUE(std::isfinite(got)) << what;
  if (!is_q(t)) {
    // float accumulation only
    ASSERT_NEAR(got, c.ref, 1e-5 * c.mag + 1e-30) << what;
  } else {
    // the activation quantization error bound plus float accumulation
    ASSERT_NEAR(got, c.ref, c.actq * (1 + 1e-4) + 1e-5 * c.mag + 1e-30) << what;
    // and exactly the integer block sums of the Q8_0-quantized activations, up to float rounding
    ASSERT_NEAR(got, c.tight, 1e-5 * c.tight_mag + 1e-30) << what;  // measured worst: 2e-6 (n = 8640)
  }
}

TEST(DotKernel, EveryTypeEverySizeAgainstDouble) {
  std::mt19937_64 rng(113);
  for (DType t : kAllTypes) {
    for (int n : (is_q(t) ? std::vector<int>(std::begin(kQSizes), std::end(kQSizes))
                          : std::vector<int>(std::begin(kPlainSizes), std::end(kPlainSizes)))) {
      for (int offset : {0, 1}) {  // offset 1: pointers one element past an aligned address
        const auto w = normal_vec(rng, size_t(n) + 1, 0.5f);
        std::vector<float> x = uniform_vec(rng, size_t(n) + 1, -2.0f, 2.0f);
        const auto stored = lib_quantize(t, w.data(), n);
        // copy the stored row to an offset position (one element for plain types, one block for Q)
        const size_t esz = ll::dtype_size(t);  // bytes of one element, or of one block for Q types
        std::vector<uint8_t> buf(stored.size() + esz);
        std::memcpy(buf.data() + offset * esz, stored.data(), stored.size());
        const void* row = buf.data() + offset * esz;
        const float* xp = x.data() + offset;
        const DotCheck c = dot_reference(t, row, xp, n);
        const std::string what = std::string(ll::dtype_name(t)) + " n=" + std::to_string(n) + " offset=" + std::to_string(offset);
        const float got = ll::dot_row(t, row, xp, n);
        expect_dot_close(t, got, c, what);
        switch (t) {  // the typed entry points are what dot_row dispatches to
          case DType::F32: EXPECT_EQ(got, ll::dot_f32(static_cast<const float*>(row), xp, n)) << what; break;
          case DType::F16: EXPECT_EQ(got, ll::dot_f16(static_cast<const uint16_t*>(row), xp, n)) << what; break;
          case DType::BF16: EXPECT_EQ(got, ll::dot_bf16(static_cast<const uint16_t*>(row), xp, n)) << what; break;
          default: break;
        }
      }
    }
  }
}

// One-hot rows find every position exactly: catches lane, tail and offset mistakes that a
// statistical tolerance could hide.
TEST(DotKernel, OneHotPicksEveryPositionExactly) {
  std::mt19937_64 rng(127);
  for (int n : {1, 7, 9, 31, 33, 100, 257}) {
    std::vector<float> x = uniform_vec(rng, size_t(n) + 1);
    for (int offset : {0, 1}) {
      for (int i = 0; i < n; ++i) {
        std::vector<float> a(size_t(n) + 1, 0.0f);
        a[offset + i] = 1.0f;
        std::vector<uint16_t> ah(size_t(n) + 1, 0), ab(size_t(n) + 1, 0);
        ah[offset + i] = 0x3c00;  // f16 1.0
        ab[offset + i] = 0x3f80;  // bf16 1.0
        const float want = x[offset + i];
        ASSERT_EQ(ll::dot_f32(a.data() + offset, x.data() + offset, n), want) << "n=" << n << " i=" << i;
        ASSERT_EQ(ll::dot_f16(ah.data() + offset, x.data() + offset, n), want) << "n=" << n << " i=" << i;
        ASSERT_EQ(ll::dot_bf16(ab.data() + offset, x.data() + offset, n), want) << "n=" << n << " i=" << i;
      }
    }
  }
  EXPECT_EQ(ll::dot_f32(nullptr, nullptr, 0), 0.0f);
  // Q types: a one-hot weight (q = 127 or -8 d) against a one-hot activation, block by block.
  for (DType t : {DType::Q8_0, DType::Q4_0}) {
    const int n = 96;
    for (int i = 0; i < n; i += 5) {
      std::vector<float> w(n, 0.0f), x(n, 0.0f);
      w[i] = 2.0f;
      x[i] = 3.0f;
      const auto row = lib_quantize(t, w.data(), n);
      const float wd = lib_dequantize(t, row.data(), n)[i];
      // activation: q = 127, s = 3/127: 127 * (3/127) = 3 up to one float rounding
      ASSERT_NEAR(ll::dot_row(t, row.data(), x.data(), n), double(wd) * 3.0, 1e-6 * wd * 3.0) << ll::dtype_name(t) << " i=" << i;
      x[i] = 0.0f;
      x[(i + 32) % n] = 3.0f;  // a different block
      ASSERT_EQ(ll::dot_row(t, row.data(), x.data(), n), 0.0f) << ll::dtype_name(t) << " i=" << i;
    }
  }
}

TEST(DotKernel, ThrowsForNonWeightTypes) {
  float x[32] = {};
  EXPECT_THROW(ll::dot_row(DType::I8, x, x, 32), ll::Error);
}

// ---------------------------------------------------------------------------------------------
// matvec / matmul

struct TypedMatrix {
  DType type;
  int64_t rows, cols;
  std::vector<uint8_t> data;
  std::vector<float> deq;  // dequantized [rows][cols]
  ll::MatrixRef ref() const { return {type, rows, cols, data.data()}; }
};

TypedMatrix make_matrix(std::mt19937_64& rng, DType t, int64_t rows, int64_t cols) {
  TypedMatrix m{t, rows, cols, {}, {}};
  const auto w = normal_vec(rng, size_t(rows * cols), 0.3f);
  const size_t rb = ll::row_bytes(t, cols);
  m.data.resize(rb * size_t(rows));
  m.deq.resize(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    ll::quantize_row(t, &w[size_t(r * cols)], cols, m.data.data() + size_t(r) * rb);
    ll::dequantize_row(t, m.data.data() + size_t(r) * rb, cols, &m.deq[size_t(r * cols)]);
  }
  return m;
}

// y [n][rows] prefilled with NaN and guarded.
std::vector<float> run_matmul(const TypedMatrix& m, const std::vector<float>& x, int n) {
  std::vector<float> y(size_t(n) * m.rows + 8, std::numeric_limits<float>::quiet_NaN());
  if (n == 1) ll::matvec(m.ref(), x.data(), y.data());
  else ll::matmul(m.ref(), x.data(), n, y.data());
  for (size_t i = size_t(n) * m.rows; i < y.size(); ++i) EXPECT_TRUE(std::isnan(y[i])) << "wrote past the end";
  y.resize(size_t(n) * m.rows);
  return y;
}

void check_matmul(const TypedMatrix& m, const std::vector<float>& x, int n, const std::vector<float>& y) {
  const std::string base = std::string(ll::dtype_name(m.type)) + " rows=" + std::to_string(m.rows) +
                           " cols=" + std::to_string(m.cols) + " n=" + std::to_string(n);
  for (int i = 0; i < n; ++i)
    for (int64_t r = 0; r < m.rows; ++r) {
      const float got = y[size_t(i) * m.rows + r];
      const std::string what = base + " at (" + std::to_string(i) + "," + std::to_string(r) + ")";
      if (n == 1) {
        // decoding: the type's own dot product (quantized activations for Q types), bit-equal to dot_row
        const DotCheck c = dot_reference(m.type, m.ref().row(r), x.data(), m.cols);
        expect_dot_close(m.type, got, c, what);
        ASSERT_EQ(got, ll::dot_row(m.type, m.ref().row(r), x.data(), m.cols)) << what;
      } else {
        // prefill: dequantized matrix times float activations, only sgemm rounding
        double ref = 0, mag = 0;
        for (int64_t c = 0; c < m.cols; ++c) {
          const double p = double(x[size_t(i) * m.cols + c]) * m.deq[size_t(r * m.cols + c)];
          ref += p;
          mag += std::fabs(p);
        }
        ASSERT_NEAR(got, ref, 1e-5 * mag + 1e-30) << what;
      }
    }
}

TEST(MatmulKernel, EveryTypeAgainstDouble) {
  std::mt19937_64 rng(131);
  struct Shape { int64_t rows, cols; std::vector<int> ns; };
  const std::vector<Shape> shapes = {
      {1, 32, {1, 2, 17, 64}},   {3, 96, {1, 2, 17, 64}}, {100, 256, {1, 2, 17, 64}}, {257, 64, {1, 2, 17, 64}},
      {257, 3200, {1, 2, 17}},   {3, 8640, {1, 2, 17, 64}}, {100, 8640, {1}},
      {1100, 64, {1, 2, 17}},  // more than one 1024-row dequantization panel
  };
  for (DType t : kAllTypes)
    for (const Shape& s : shapes) {
      const TypedMatrix m = make_matrix(rng, t, s.rows, s.cols);
      for (int n : s.ns) {
        const auto x = uniform_vec(rng, size_t(n) * s.cols);
        const auto y = run_matmul(m, x, n);
        check_matmul(m, x, n, y);
        if (HasFatalFailure()) return;
      }
    }
}

TEST(MatmulKernel, PlainTypesOddColumnCounts) {
  std::mt19937_64 rng(137);
  for (DType t : kPlainTypes)
    for (int64_t cols : {1, 7, 33, 255}) {
      const TypedMatrix m = make_matrix(rng, t, 5, cols);
      for (int n : {1, 3}) {
        const auto x = uniform_vec(rng, size_t(n) * cols);
        check_matmul(m, x, n, run_matmul(m, x, n));
      }
    }
}

TEST(MatmulKernel, MatmulOfOneRowIsMatvec) {
  std::mt19937_64 rng(139);
  for (DType t : kAllTypes) {
    const TypedMatrix m = make_matrix(rng, t, 37, 320);
    const auto x = uniform_vec(rng, 320);
    std::vector<float> a(37), b(37);
    ll::matmul(m.ref(), x.data(), 1, a.data());
    ll::matvec(m.ref(), x.data(), b.data());
    EXPECT_EQ(a, b) << ll::dtype_name(t);
  }
}

class OmpThreads {
 public:
  OmpThreads() : saved_(omp_get_max_threads()) {}
  ~OmpThreads() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

TEST(MatmulKernel, SameResultWithOneAndTwoThreads) {
  OmpThreads restore;
  std::mt19937_64 rng(149);
  for (DType t : kAllTypes) {
    const TypedMatrix m = make_matrix(rng, t, 1100, 256);
    for (int n : {1, 2, 17, 64}) {
      const auto x = uniform_vec(rng, size_t(n) * 256);
      omp_set_num_threads(1);
      const auto y1 = run_matmul(m, x, n);
      omp_set_num_threads(2);
      const auto y2 = run_matmul(m, x, n);
      const auto y3 = run_matmul(m, x, n);
      omp_set_num_threads(1);
      const auto y4 = run_matmul(m, x, n);

      EXPECT_EQ(y2, y3) << ll::dtype_name(t) << " n=" << n << ": not deterministic with 2 threads";
      EXPECT_EQ(y1, y4) << ll::dtype_name(t) << " n=" << n << ": not deterministic with 1 thread";
      if (n == 1) {
        // decoding: each row is one thread's dot product, bit-identical for any thread count
        EXPECT_EQ(y1, y2) << ll::dtype_name(t);
      } else {
        // prefill: OpenMP-built OpenBLAS sgemm sums in a thread-count-dependent order (measured:
        // ~60% of outputs differ by ~1 ulp between 1 and 2 threads), so only closeness holds.
        for (int i = 0; i < n; ++i)
          for (int64_t r = 0; r < m.rows; ++r) {
            double mag = 0;
            for (int64_t c = 0; c < m.cols; ++c) mag += std::fabs(double(x[size_t(i) * m.cols + c]) * m.deq[size_t(r * m.cols + c)]);
            const size_t o = size_t(i) * m.rows + r;
            ASSERT_NEAR(y1[o], y2[o], 2e-6 * mag) << ll::dtype_name(t) << " n=" << n << " at " << o;
          }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// HeadAttention

struct AttnBlock {
  DType type;
  int n;
  std::vector<uint8_t> k, v;      // stored
  std::vector<double> kr, vr;     // the stored values, rounded by the reference
  std::vector<int> limit;         // empty: no mask; else [nq]
  ll::KVBlock kv() const { return {type, k.data(), v.data(), n}; }
};

AttnBlock make_attn_block(std::mt19937_64& rng, DType t, int n, int D) {
  AttnBlock b{t, n, {}, {}, {}, {}, {}};
  const auto k = uniform_vec(rng, size_t(n) * D), v = uniform_vec(rng, size_t(n) * D, -2.0f, 2.0f);
  b.k.resize(ll::row_bytes(t, int64_t(n) * D) + 1);  // +1: non-null for n = 0
  b.v.resize(b.k.size());
  ll::quantize_row(t, k.data(), int64_t(n) * D, b.k.data());
  ll::quantize_row(t, v.data(), int64_t(n) * D, b.v.data());
  for (size_t i = 0; i < k.size(); ++i) {
    b.kr.push_back(ref_round_type(t, k[i]));
    b.vr.push_back(ref_round_type(t, v[i]));
  }
  return b;
}

struct AttnRef {
  std::vector<double> out;    // [nq][D]
  std::vector<double> tol;    // per query
  std::vector<double> vmax;   // per query
};

// Naive softmax(q·kᵀ/sqrt(D))·v over the concatenation of every visible key, in double.
// Tolerance per query, relative to the largest visible |v|: float rounding of the scores
// (relative to smag = max over keys of sum |q||k|/sqrt(D)) moves the weights, everything else is
// float rounding of the weighted sum: tol = vmax (2e-6 + 2e-7 smag). Measured worst: 2.4e-7 vmax
// for scores of order 1, 2.9e-5 vmax for smag ~ 2000 (about 1/12 and 1/14 of the tolerance).
AttnRef attention_reference(const std::vector<float>& q, int nq, int ldq, int D, const std::vector<AttnBlock>& blocks) {
  AttnRef r;
  r.out.assign(size_t(nq) * D, 0.0);
  r.tol.assign(nq, 0.0);
  r.vmax.assign(nq, 0.0);
  for (int i = 0; i < nq; ++i) {
    std::vector<double> s;
    std::vector<const double*> vs;
    double smag = 0;
    for (const auto& b : blocks) {
      const int vis = b.limit.empty() ? b.n : std::clamp(b.limit[i], 0, b.n);
      for (int j = 0; j < vis; ++j) {
        double d = 0, m = 0;
        for (int c = 0; c < D; ++c) {
          d += double(q[size_t(i) * ldq + c]) * b.kr[size_t(j) * D + c];
          m += std::fabs(double(q[size_t(i) * ldq + c]) * b.kr[size_t(j) * D + c]);
        }
        s.push_back(d / std::sqrt(double(D)));
        smag = std::max(smag, m / std::sqrt(double(D)));
        vs.push_back(&b.vr[size_t(j) * D]);
      }
    }
    if (s.empty()) {
      ADD_FAILURE() << "test bug: query " << i << " sees no key";
      continue;
    }
    const double mx = *std::max_element(s.begin(), s.end());
    double sum = 0;
    for (double x : s) sum += std::exp(x - mx);
    for (size_t j = 0; j < s.size(); ++j) {
      const double p = std::exp(s[j] - mx) / sum;
      for (int c = 0; c < D; ++c) {
        r.out[size_t(i) * D + c] += p * vs[j][c];
        r.vmax[i] = std::max(r.vmax[i], std::fabs(vs[j][c]));
      }
    }
    r.tol[i] = r.vmax[i] * (2e-6 + 2e-7 * smag);
  }
  return r;
}

std::vector<float> run_head_attention(const std::vector<float>& q, int nq, int ldq, int D,
                                      const std::vector<AttnBlock>& blocks, int ldo) {
  ll::HeadAttention att(q.data(), nq, ldq, D);
  for (const auto& b : blocks) att.add(b.kv(), b.limit.empty() ? nullptr : b.limit.data());
  std::vector<float> out(size_t(nq) * ldo, -555.0f);
  att.finish(out.data(), ldo);
  return out;
}

// Causal limits for one block: values <= 0, inside, exactly n and past the end.
std::vector<int> random_limits(std::mt19937_64& rng, int nq, int n) {
  std::vector<int> l(nq);
  const int choices[] = {-7, 0, 1, n / 2, n - 1, n, n + 13};
  std::uniform_int_distribution<int> pick(0, 8), any(0, n);
  for (int i = 0; i < nq; ++i) {
    const int p = pick(rng);
    l[i] = p < 7 ? choices[p] : any(rng);
  }
  return l;
}

// A layout of blocks of sizes 1, 7, 256, 300 (and an empty one), the block type cycling with
// `type0`; masks on some blocks, one of them fully masked for the first query.
std::vector<AttnBlock> make_layout(std::mt19937_64& rng, int nq, int D, int type0) {
  std::vector<AttnBlock> blocks;
  const int sizes[] = {7, 256, 0, 1, 300};
  for (int bi = 0; bi < 5; ++bi) {
    const DType t = kPlainTypes[(type0 + (bi == 3 ? 1 : 0)) % 3];  // one block of another type: mixed
    blocks.push_back(make_attn_block(rng, t, sizes[bi], D));
    if (bi == 0 || bi == 1 || bi == 4) blocks.back().limit = random_limits(rng, nq, sizes[bi]);
  }
  blocks[4].limit[0] = 0;     // fully masked for query 0
  blocks[0].limit[0] = -3;    // also this one: query 0 sees only blocks 1 and 3
  if (nq > 1) blocks[1].limit[1] = -1;
  return blocks;
}

void check_attention(const std::vector<float>& q, int nq, int ldq, int D, const std::vector<AttnBlock>& blocks,
                     const std::string& what) {
  const int ldo = D + 3;
  const auto got = run_head_attention(q, nq, ldq, D, blocks, ldo);
  const AttnRef ref = attention_reference(q, nq, ldq, D, blocks);
  for (int i = 0; i < nq; ++i) {
    for (int c = 0; c < D; ++c)
      ASSERT_NEAR(got[size_t(i) * ldo + c], ref.out[size_t(i) * D + c], ref.tol[i])
          << what << ": query " << i << " dim " << c;
    for (int c = D; c < ldo; ++c) ASSERT_EQ(got[size_t(i) * ldo + c], -555.0f) << what << ": wrote past D";
  }
}

TEST(HeadAttentionKernel, BothPathsAgainstDoubleSoftmax) {
  std::mt19937_64 rng(151);
  for (int nq : {1, 3, 15, 16, 17, 64})
    for (int D : {16, 64, 100, 128})
      for (int type0 = 0; type0 < 3; ++type0) {
        const int ldq = D + 5;
        const auto q = uniform_vec(rng, size_t(nq) * ldq, -3.0f, 3.0f);
        const auto blocks = make_layout(rng, nq, D, type0);
        check_attention(q, nq, ldq, D, blocks,
                        "nq=" + std::to_string(nq) + " D=" + std::to_string(D) + " " + ll::dtype_name(kPlainTypes[type0]));
        if (HasFatalFailure()) return;
      }
}

TEST(HeadAttentionKernel, NoMaskSingleTypeBlocks) {
  std::mt19937_64 rng(157);
  for (DType t : kPlainTypes)
    for (int nq : {1, 16}) {
      const int D = 64;
      const auto q = uniform_vec(rng, size_t(nq) * D);
      std::vector<AttnBlock> blocks;
      for (int n : {1, 7, 256, 300}) blocks.push_back(make_attn_block(rng, t, n, D));
      check_attention(q, nq, D, D, blocks, std::string(ll::dtype_name(t)) + " nq=" + std::to_string(nq));
    }
}

// add_keys + add_values (the decode memory order of Session::attention: several heads' keys of a
// chunk before their values) compute exactly what add() does, for every stored type and with
// causal limits; and add_values refuses a block that add_keys did not score.
TEST(HeadAttentionKernel, TwoPassesEqualAddBitForBit) {
  std::mt19937_64 rng(171);
  for (int D : {64, 100})
    for (int nq : {1, 5})
      for (int type0 = 0; type0 < 3; ++type0) {
        const auto q = uniform_vec(rng, size_t(nq) * D, -3.0f, 3.0f);
        const auto blocks = make_layout(rng, nq, D, type0);
        const auto want = run_head_attention(q, nq, D, D, blocks, D);
        ll::HeadAttention att(q.data(), nq, D, D);
        for (const auto& b : blocks) {
          const int* limit = b.limit.empty() ? nullptr : b.limit.data();
          att.add_keys(b.kv(), limit);
          att.add_values(b.kv(), limit);
        }
        std::vector<float> got(size_t(nq) * D, -555.0f);
        att.finish(got.data(), D);
        for (size_t i = 0; i < got.size(); ++i)
          ASSERT_EQ(got[i], want[i]) << "D " << D << " nq " << nq << " types from " << type0 << " at " << i;
      }
  const std::vector<float> q(64, 0.5f);
  ll::HeadAttention att(q.data(), 1, 64, 64);
  const AttnBlock a = make_attn_block(rng, DType::F32, 8, 64), b = make_attn_block(rng, DType::F32, 9, 64);
  att.add_keys(a.kv());
  EXPECT_THROW(att.add_values(b.kv()), ll::Error);
  const std::vector<float> q16(16 * 64, 0.5f);
  ll::HeadAttention many(q16.data(), 16, 64, 64);
  EXPECT_THROW(many.add_keys(a.kv()), ll::Error);
}

// Scores in the hundreds: the softmax is nearly an argmax and the running max changes between
// blocks; a naive exp would overflow.
TEST(HeadAttentionKernel, LargeScoreMagnitudes) {
  std::mt19937_64 rng(163);
  for (int nq : {3, 16})
    for (int type0 = 0; type0 < 3; ++type0) {
      const int D = 64;
      const auto q = uniform_vec(rng, size_t(nq) * D, -1000.0f, 1000.0f);
      const auto blocks = make_layout(rng, nq, D, type0);
      const auto out = run_head_attention(q, nq, D, D, blocks, D);
      for (float v : out) ASSERT_TRUE(std::isfinite(v));
      check_attention(q, nq, D, D, blocks, "large scores nq=" + std::to_string(nq));
    }
}

// The fused path (15 queries) and the sgemm path (16 queries) on the same data agree (measured
// worst: 2.4e-7 of the largest |v|).
TEST(HeadAttentionKernel, FusedAndGemmPathsAgree) {
  static_assert(ll::HeadAttention::kGemmMinQueries == 16, "15 queries fused, 16 sgemm");
  std::mt19937_64 rng(167);
  for (int D : {16, 64, 100, 128})
    for (int type0 = 0; type0 < 3; ++type0) {
      const auto q = uniform_vec(rng, size_t(16) * D, -3.0f, 3.0f);
      const auto blocks = make_layout(rng, 16, D, type0);  // limits sized for 16; 15 use a prefix
      const auto gemm = run_head_attention(q, 16, D, D, blocks, D);
      const auto fused = run_head_attention(q, 15, D, D, blocks, D);
      const AttnRef ref = attention_reference(q, 16, D, D, blocks);
      double worst = 0;
      for (int i = 0; i < 15; ++i)
        for (int c = 0; c < D; ++c) {
          const double diff = std::fabs(double(gemm[size_t(i) * D + c]) - fused[size_t(i) * D + c]);
          worst = std::max(worst, diff / ref.vmax[i]);
        }
      EXPECT_LT(worst, 2e-6) << "D=" << D << " " << ll::dtype_name(kPlainTypes[type0]);
    }
}

// Attention over KVMemory views equals attention over the float copies read() returns.
TEST(HeadAttentionKernel, OverKVMemoryViews) {
  std::mt19937_64 rng(173);
  const int heads = 2, D = 32;
  for (ll::MemDType mt : {ll::MemDType::F32, ll::MemDType::BF16, ll::MemDType::F16}) {
    ll::KVMemory mem(heads, D, mt);
    const int n = 1500;
    const auto k = uniform_vec(rng, size_t(n) * heads * D), v = uniform_vec(rng, size_t(n) * heads * D);
    mem.append(k.data(), v.data(), n, heads * D);
    for (int nq : {4, 20}) {
      const auto q = uniform_vec(rng, size_t(nq) * D, -2.0f, 2.0f);
      for (int h = 0; h < heads; ++h) {
        ll::HeadAttention a(q.data(), nq, D, D), b(q.data(), nq, D, D);
        std::vector<std::vector<float>> copies;
        for (int64_t s = 0; s < mem.size();) {
          const ll::KVBlock blk = mem.block(h, s, 300);
          a.add(blk);
          std::vector<float> kf(size_t(blk.n) * D), vf(kf.size());
          mem.read(h, s, blk.n, kf.data(), vf.data());
          b.add({DType::F32, kf.data(), vf.data(), blk.n});
          copies.push_back(std::move(kf));
          copies.push_back(std::move(vf));
          s += blk.n;
        }
        std::vector<float> oa(size_t(nq) * D), ob(oa.size());
        a.finish(oa.data(), D);
        b.finish(ob.data(), D);
        for (size_t i = 0; i < oa.size(); ++i) ASSERT_NEAR(oa[i], ob[i], 1e-5) << ll::mem_dtype_name(mt) << " nq=" << nq;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// KVMemory::block

TEST(KVMemoryBlock, ViewsStayInOneChunkCoverTheRangeAndMatchRead) {
  constexpr int C = ll::KVMemory::kChunkTokens;
  std::mt19937_64 rng(179);
  const int heads = 3, hd = 20, ld = heads * hd + 3;
  for (ll::MemDType mt : {ll::MemDType::F32, ll::MemDType::BF16, ll::MemDType::F16}) {
    const DType want_type = mt == ll::MemDType::F32 ? DType::F32 : mt == ll::MemDType::BF16 ? DType::BF16 : DType::F16;
    ll::KVMemory mem(heads, hd, mt);
    for (int n : {700, 1, 900, 1000, 3})  // 2604 tokens over three chunks, appended unevenly
    {
      const auto k = normal_vec(rng, size_t(n) * ld), v = normal_vec(rng, size_t(n) * ld);
      mem.append(k.data(), v.data(), n, ld);
    }
    const int64_t size = mem.size();
    ASSERT_EQ(size, 2604);
    for (int h = 0; h < heads; ++h)
      for (int64_t start : {int64_t(0), int64_t(1), int64_t(C - 1), int64_t(C), int64_t(1500), int64_t(2 * C - 1),
                            int64_t(2 * C), size - 1})
        for (int max_n : {1, 7, 256, C, 5000}) {
          const std::string what = std::string(ll::mem_dtype_name(mt)) + " h=" + std::to_string(h) +
                                   " start=" + std::to_string(start) + " max_n=" + std::to_string(max_n);
          int64_t s = start;
          while (s < size) {
            const ll::KVBlock b = mem.block(h, s, max_n);
            const int64_t want_n = std::min<int64_t>({max_n, C - s % C, size - s});
            ASSERT_EQ(b.n, want_n) << what << " at " << s;
            ASSERT_GE(b.n, 1) << what;
            ASSERT_LE(s % C + b.n, C) << what << ": a view crosses a chunk";
            ASSERT_EQ(b.type, want_type) << what;
            // the view's bytes, converted, are exactly what read() returns
            std::vector<float> kr(size_t(b.n) * hd), vr(kr.size());
            mem.read(h, s, b.n, kr.data(), vr.data());
            const auto kv = lib_dequantize(b.type, b.k, int64_t(b.n) * hd);
            const auto vv = lib_dequantize(b.type, b.v, int64_t(b.n) * hd);
            ASSERT_EQ(0, std::memcmp(kv.data(), kr.data(), kr.size() * 4)) << what << " keys at " << s;
            ASSERT_EQ(0, std::memcmp(vv.data(), vr.data(), vr.size() * 4)) << what << " values at " << s;
            // zero-copy: a view one token later points one row further into the same storage
            if (b.n > 1) {
              const ll::KVBlock b1 = mem.block(h, s + 1, max_n);
              const size_t rb = ll::row_bytes(b.type, hd);
              EXPECT_EQ(static_cast<const uint8_t*>(b1.k), static_cast<const uint8_t*>(b.k) + rb) << what;
              EXPECT_EQ(static_cast<const uint8_t*>(b1.v), static_cast<const uint8_t*>(b.v) + rb) << what;
            }
            s += b.n;
          }
          ASSERT_EQ(s, size) << what << ": views must end exactly at size()";
        }
    // A copy shares the storage of full chunks (zero-copy views point at the same bytes).
    const ll::KVMemory copy = mem;
    EXPECT_EQ(copy.block(1, 5, 10).k, mem.block(1, 5, 10).k);
    EXPECT_EQ(copy.block(2, C + 5, 10).v, mem.block(2, C + 5, 10).v);
  }
}

}  // namespace
