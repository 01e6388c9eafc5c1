// The 16-row grouped Q8_0/Q4_0/F16/BF16 layout (ops/qgroup.h) against the GGUF row layout:
// repacking loses nothing (dequantized values bit-equal), the grouped matvec (AVX-512 kernels and
// their scalar twins) equals the row-wise dot products up to float summation order, matvec/matmul
// dispatch on MatrixRef::grouped, and a model decodes the same with and without repacking.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/session.h"
#include "model/weights.h"
#include "ops/matmul.h"
#include "ops/qgroup.h"
#include "ops/quant.h"
#include "util/error.h"

namespace {

using ll::DType;

struct Shape {
  int64_t rows, cols;
};
const Shape kShapes[] = {{16, 32}, {32, 96}, {48, 3200}, {16, 8640}, {112, 256}};
const DType kQTypes[] = {DType::Q8_0, DType::Q4_0};
const DType kAllTypes[] = {DType::Q8_0, DType::Q4_0, DType::F16, DType::BF16};

std::vector<uint8_t> random_rows(std::mt19937_64& rng, DType t, int64_t rows, int64_t cols) {
  std::normal_distribution<float> n(0.0f, 0.3f);
  std::vector<float> w(size_t(rows * cols));
  for (auto& v : w) v = n(rng);
  const size_t rb = ll::row_bytes(t, cols);
  std::vector<uint8_t> out(rb * size_t(rows));
  for (int64_t r = 0; r < rows; ++r) ll::quantize_row(t, &w[size_t(r * cols)], cols, out.data() + size_t(r) * rb);
  return out;
}

std::vector<uint8_t> group(DType t, const std::vector<uint8_t>& rows, int64_t nrows, int64_t cols) {
  std::vector<uint8_t> grouped(rows.size());
  ll::group_rows(t, rows.data(), nrows, cols, grouped.data());
  return grouped;
}

std::vector<float> random_x(std::mt19937_64& rng, int64_t n) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = u(rng);
  return x;
}

std::string what(DType t, const Shape& s) {
  return std::string(ll::dtype_name(t)) + " " + std::to_string(s.rows) + "x" + std::to_string(s.cols);
}

TEST(QGroup, RepackKeepsEveryValue) {
  std::mt19937_64 rng(1);
  for (DType t : kAllTypes)
    for (const Shape& s : kShapes) {
      const auto rows = random_rows(rng, t, s.rows, s.cols);
      const auto grouped = group(t, rows, s.rows, s.cols);
      const bool same_layout = !ll::dtype_is_quantized(t) && s.cols == 32;  // one block: rows stay put
      if (!same_layout) {
        EXPECT_NE(grouped, rows) << what(t, s);
      }
      std::vector<float> a(size_t(s.rows * s.cols)), b(a.size(), -1.0f);
      const size_t rb = ll::row_bytes(t, s.cols);
      for (int64_t r = 0; r < s.rows; ++r)
        ll::dequantize_row(t, rows.data() + size_t(r) * rb, s.cols, &a[size_t(r * s.cols)]);
      // in two pieces, as matmul's panels ask for them
      const int64_t half = (s.rows / 32) * 16;
      ll::dequantize_grouped(t, grouped.data(), s.cols, 0, half, b.data());
      ll::dequantize_grouped(t, grouped.data(), s.cols, half, s.rows - half, b.data() + size_t(half * s.cols));
      ASSERT_EQ(a, b) << what(t, s);
    }
}

TEST(QGroup, MatvecEqualsRowDotProducts) {
  std::mt19937_64 rng(2);
  for (DType t : kQTypes)
    for (const Shape& s : kShapes) {
      const auto rows = random_rows(rng, t, s.rows, s.cols);
      const auto grouped = group(t, rows, s.rows, s.cols);
      const auto x = random_x(rng, s.cols);
      ll::ActQ8 q;
      q.quantize(x.data(), s.cols);
      std::vector<float> fast(size_t(s.rows) + 16, NAN), slow(size_t(s.rows), NAN);
      ll::matvec_grouped(t, grouped.data(), s.rows, s.cols, q, fast.data());
      ll::matvec_grouped_scalar(t, grouped.data(), s.rows, s.cols, q, slow.data());
      for (size_t i = size_t(s.rows); i < fast.size(); ++i) ASSERT_TRUE(std::isnan(fast[i])) << "wrote past the end";
      const size_t rb = ll::row_bytes(t, s.cols);
      for (int64_t r = 0; r < s.rows; ++r) {
        // the same integer block sums; only the order/fusing of the float accumulation differs
        const float ref = ll::dot_row(t, rows.data() + size_t(r) * rb, x.data(), s.cols);
        double mag = 0;
        for (int64_t c = 0; c < s.cols; ++c) mag += std::fabs(x[size_t(c)]) * 0.3 * 4;
        ASSERT_NEAR(slow[size_t(r)], ref, 2e-6 * mag) << what(t, s) << " row " << r;
        ASSERT_NEAR(fast[size_t(r)], ref, 2e-6 * mag) << what(t, s) << " row " << r;
      }
    }
}

// The largest products the int8 kernels can meet (Q8_0 bytes ±127, Q4_0 nibbles 15 or 0, i.e.
// 7 and -8; x quantized to ±127; all of one sign over whole blocks): the AVX2 kernels' int16 pair
// sums and Q4_0's int16 block sum stay below saturation, so every kernel gives the scalar integers.
TEST(QGroup, ExtremeValuesDoNotSaturate) {
  const int64_t rows = 32, cols = 256;
  for (DType t : kQTypes)
    for (float sign : {1.0f, -1.0f}) {
      const size_t rb = ll::row_bytes(t, cols), bb = rb / size_t(cols / 32);
      std::vector<uint8_t> q(rb * rows);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < cols / 32; ++b) {
          uint8_t* blk = &q[size_t(r) * rb + size_t(b) * bb];
          blk[0] = 0x00;  // f16 1.0
          blk[1] = 0x3c;
          const uint8_t fill = t == DType::Q4_0 ? (r % 2 ? 0x00 : 0xff) : (r % 2 ? 0x81 : 0x7f);
          std::fill(blk + 2, blk + bb, fill);
        }
      std::vector<float> x(static_cast<size_t>(cols), sign);
      const auto grouped = group(t, q, rows, cols);
      ll::ActQ8 a;
      a.quantize(x.data(), cols);
      ASSERT_EQ(int(a.q[0]), sign > 0 ? 127 : -127);
      std::vector<float> fast(static_cast<size_t>(rows)), slow(static_cast<size_t>(rows));
      ll::matvec_grouped(t, grouped.data(), rows, cols, a, fast.data());
      ll::matvec_grouped_scalar(t, grouped.data(), rows, cols, a, slow.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float w = t == DType::Q4_0 ? (r % 2 ? -8.0f : 7.0f) : (r % 2 ? -127.0f : 127.0f);
        const float want = w * float(a.q[0]) * float(cols) * a.d[0];  // every block: weight scale 1
        ASSERT_NEAR(slow[size_t(r)], want, 1e-5f * std::fabs(want)) << ll::dtype_name(t) << " row " << r;
        ASSERT_NEAR(fast[size_t(r)], slow[size_t(r)], 1e-5f * std::fabs(want)) << ll::dtype_name(t) << " row " << r;
        ASSERT_NEAR(ll::dot_row(t, &q[size_t(r) * rb], x.data(), cols), want, 1e-5f * std::fabs(want));
      }
    }
}

TEST(QGroup, MatrixRefDispatchForMatvecAndMatmul) {
  std::mt19937_64 rng(3);
  for (DType t : kAllTypes) {
    const Shape s{1040, 96};  // two dequantization panels (1024 + 16 rows)
    const auto rows = random_rows(rng, t, s.rows, s.cols);
    const auto grouped = group(t, rows, s.rows, s.cols);
    const ll::MatrixRef plain{t, s.rows, s.cols, rows.data()}, g{t, s.rows, s.cols, grouped.data(), true};
    EXPECT_THROW(g.row(0), ll::Error);
    const int n = 5;
    const auto x = random_x(rng, n * s.cols);
    std::vector<float> yp(size_t(n * s.rows)), yg(yp.size());
    ll::matmul(plain, x.data(), n, yp.data());
    ll::matmul(g, x.data(), n, yg.data());
    ASSERT_EQ(yp, yg) << "prefill dequantizes to the same floats";
    std::vector<float> vp(size_t(s.rows)), vg(size_t(s.rows));
    ll::matvec(plain, x.data(), vp.data());
    ll::matvec(g, x.data(), vg.data());
    for (int64_t r = 0; r < s.rows; ++r) ASSERT_NEAR(vg[size_t(r)], vp[size_t(r)], 1e-4) << ll::dtype_name(t) << r;
  }
}

TEST(QGroup, HalfMatvecEqualsRowDotProducts) {
  std::mt19937_64 rng(4);
  for (DType t : {DType::F16, DType::BF16})
    for (const Shape& s : kShapes) {
      const auto rows = random_rows(rng, t, s.rows, s.cols);
      const auto grouped = group(t, rows, s.rows, s.cols);
      const auto x = random_x(rng, s.cols);
      std::vector<float> fast(size_t(s.rows) + 16, NAN), slow(size_t(s.rows), NAN);
      ll::matvec_grouped(t, grouped.data(), s.rows, s.cols, x.data(), fast.data());
      ll::matvec_grouped_scalar(t, grouped.data(), s.rows, s.cols, x.data(), slow.data());
      for (size_t i = size_t(s.rows); i < fast.size(); ++i) ASSERT_TRUE(std::isnan(fast[i])) << "wrote past the end";
      const size_t rb = ll::row_bytes(t, s.cols);
      double mag = 0;  // bound on the float summation-order difference
      for (int64_t c = 0; c < s.cols; ++c) mag += std::fabs(x[size_t(c)]) * 0.3 * 4;
      for (int64_t r = 0; r < s.rows; ++r) {
        const float ref = ll::dot_row(t, rows.data() + size_t(r) * rb, x.data(), s.cols);
        ASSERT_NEAR(slow[size_t(r)], ref, 2e-6 * mag) << what(t, s) << " row " << r;
        ASSERT_NEAR(fast[size_t(r)], ref, 2e-6 * mag) << what(t, s) << " row " << r;
      }
    }
  const std::vector<uint8_t> q(64 * 16);
  std::vector<float> x(32), y(16);
  EXPECT_THROW(ll::matvec_grouped(DType::Q8_0, q.data(), 16, 32, x.data(), y.data()), ll::Error);
}

TEST(QGroup, ShapesThatDoNotFit) {
  EXPECT_FALSE(ll::should_group(DType::F32, 32, 32));
  EXPECT_FALSE(ll::should_group(DType::F16, 24, 32));
  EXPECT_FALSE(ll::should_group(DType::BF16, 16, 48));
  EXPECT_FALSE(ll::should_group(DType::Q8_0, 24, 32));
  EXPECT_FALSE(ll::should_group(DType::Q4_0, 16, 48));
  std::vector<uint8_t> buf(4096);
  EXPECT_THROW(ll::group_rows(DType::Q8_0, buf.data(), 8, 32, buf.data()), ll::Error);
  EXPECT_THROW(ll::group_rows(DType::F32, buf.data(), 16, 32, buf.data()), ll::Error);
  EXPECT_THROW(ll::group_rows(DType::F16, buf.data(), 16, 40, buf.data()), ll::Error);
  EXPECT_THROW(ll::dequantize_grouped(DType::Q4_0, buf.data(), 32, 8, 16, nullptr), ll::Error);
}

TEST(QGroup, ModelDecodesTheSameRepackedOrNot) {
  ll::ModelConfig c;
  c.vocab_size = 96;
  c.hidden_size = 64;
  c.intermediate_size = 160;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.max_position_embeddings = 32;
  c.mem_layers = {1};
  c.last_context_length = 16;
  c.tie_word_embeddings = false;
  for (DType t : kAllTypes) {
    const ll::Weights a0 = ll::Weights::random(c, t, 5, /*repack=*/true), b0 = ll::Weights::random(c, t, 5, false);
    EXPECT_EQ(a0.layers[0].w_up.ref.grouped, ll::should_group(t, 160, 64));
    EXPECT_FALSE(b0.layers[0].w_up.ref.grouped);
    EXPECT_FALSE(a0.embed.ref.grouped);
    ll::Session sa(a0), sb(b0);
    std::vector<int> ids;
    for (int i = 0; i < 70; ++i) ids.push_back((i * 37 + 11) % 96);
    sa.forward(ids, true, ll::LogitsWanted::Last);
    sb.forward(ids, true, ll::LogitsWanted::Last);
    for (int step = 0; step < 4; ++step) {  // decode steps run the matvec kernels
      const auto la = sa.forward({step + 3}, true, ll::LogitsWanted::Last);
      const auto lb = sb.forward({step + 3}, true, ll::LogitsWanted::Last);
      ASSERT_EQ(la.size(), lb.size());
      for (size_t i = 0; i < la.size(); ++i) ASSERT_NEAR(la[i], lb[i], 1e-4) << ll::dtype_name(t) << " step " << step;
    }
  }
}

}  // namespace
