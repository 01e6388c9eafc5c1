// Q8 memory: int8 rows with one float scale each, against a plain reference.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "memory/kv_memory.h"
#include "ops/attention.h"

using namespace ll;

TEST(Q8Memory, RowsRoundTripWithinHalfAStep) {
  const int H = 3, D = 100, n = 1500;  // crosses a chunk boundary
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> k(size_t(n) * H * D), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  KVMemory mem(H, D, MemDType::Q8);
  mem.append(k.data(), v.data(), 1000, H * D);
  mem.append(k.data() + size_t(1000) * H * D, v.data() + size_t(1000) * H * D, n - 1000, H * D);
  EXPECT_EQ(mem.bytes(), size_t(n) * H * (D + 4) * 2);
  std::vector<float> kr(size_t(n) * D), vr(kr.size()), one(D);
  for (int h = 0; h < H; ++h) {
    mem.read(h, 0, n, kr.data(), vr.data());
    for (int t = 0; t < n; ++t) {
      float amax = 0;
      for (int e = 0; e < D; ++e) amax = std::max(amax, std::fabs(k[(size_t(t) * H + h) * D + e]));
      for (int e = 0; e < D; ++e)
        ASSERT_LE(std::fabs(kr[size_t(t) * D + e] - k[(size_t(t) * H + h) * D + e]), amax / 127.0f * 0.5f * 1.0001f);
      mem.value_f32(h, t, one.data());
      for (int e = 0; e < D; ++e) ASSERT_EQ(one[e], vr[size_t(t) * D + e]);
    }
    // Blocks: int8 rows plus their scales reproduce read().
    for (int64_t b = 0; b < n;) {
      const KVBlock blk = mem.block(h, b, 256);
      ASSERT_EQ(blk.type, DType::I8);
      std::vector<float> kb(size_t(blk.n) * D), vb(kb.size());
      kv_block_to_f32(blk, D, kb.data(), vb.data());
      for (size_t i = 0; i < kb.size(); ++i) {
        ASSERT_EQ(kb[i], kr[size_t(b) * D + i]);
        ASSERT_EQ(vb[i], vr[size_t(b) * D + i]);
      }
      b += blk.n;
    }
  }
}

// Rows round like std::lround (half away from zero), ties and near-ties included: a row whose
// largest magnitude is 127 has scale 1, so its elements are stored as their rounded selves.
TEST(Q8Memory, RoundsHalfAwayFromZero) {
  const int D = 68;  // vectors of 4, 8 or 16 floats, then a scalar tail (64..67 with 16 lanes)
  std::vector<float> k(D), v(D);
  const float special[] = {127.0f, -126.5f, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f, -2.5f, 0.49999997f, -0.49999997f,
                           0.50000006f, -0.50000006f, 125.49999f, -125.50001f, 0.0f, -0.0f};
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(-126.9f, 126.9f);
  for (int r = 0; r < 50; ++r) {
    for (int e = 0; e < D; ++e) k[e] = v[e] = (r == 0 && e < 16) ? special[e] : u(rng);
    if (r >= 1 && r <= 16)  // every special value also passes through the last elements
      for (int i = 0; i < 3; ++i) k[D - 4 + i] = v[D - 4 + i] = special[(r + i) % 16];
    k[D - 1] = v[D - 1] = (r % 2) ? 127.0f : -127.0f;  // amax = 127: scale 1
    KVMemory mem(1, D, MemDType::Q8);
    mem.append(k.data(), v.data(), 1, D);
    const KVBlock blk = mem.block(0, 0, 1);
    ASSERT_EQ(blk.k_scale[0], 1.0f);
    for (int e = 0; e < D; ++e) {
      ASSERT_EQ(static_cast<const int8_t*>(blk.k)[e], std::lround(k[e])) << "row " << r << " x " << k[e];
      ASSERT_EQ(static_cast<const int8_t*>(blk.v)[e], std::lround(v[e])) << "row " << r << " x " << v[e];
    }
  }
}

// Attention over Q8 blocks equals attention over the same rows widened to float32, both paths.
TEST(Q8Memory, AttentionMatchesWidenedRows) {
  const int D = 64, n = 700;
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n) * D), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  KVMemory mem(1, D, MemDType::Q8);
  mem.append(k.data(), v.data(), n, D);
  std::vector<float> kf(k.size()), vf(v.size());
  mem.read(0, 0, n, kf.data(), vf.data());
  for (int nq : {1, 20}) {
    std::vector<float> q(size_t(nq) * D);
    for (auto& x : q) x = nd(rng);
    HeadAttention a(q.data(), nq, D, D), b(q.data(), nq, D, D);
    for (int64_t s = 0; s < n;) {
      const KVBlock blk = mem.block(0, s, 256);
      a.add(blk);
      b.add({DType::F32, &kf[size_t(s) * D], &vf[size_t(s) * D], blk.n});
      s += blk.n;
    }
    std::vector<float> oa(size_t(nq) * D), ob(oa.size());
    a.finish(oa.data(), D);
    b.finish(ob.data(), D);
    for (size_t i = 0; i < oa.size(); ++i) EXPECT_NEAR(oa[i], ob[i], 1e-5) << "nq " << nq;
  }
}

// The int8-key scorer (QueryI16): the vector kernel equals its plain loop to the bit, for head
// sizes with and without a partial last group; each score is within the query's rounding of the
// exact (double) score of the float query against the stored keys; the query's rounding is half
// a step; extreme values do not overflow.
TEST(Q8Memory, IntegerScoresMatchPlainLoopAndDoubleReference) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::uniform_int_distribution<int> byte(-127, 127);
  for (int D : {16, 17, 31, 32, 33, 64, 100, 128, 250, 512})
    for (int n : {0, 1, 3, 4, 5, 9, 300}) {
      std::vector<float> q(static_cast<size_t>(D)), ks(static_cast<size_t>(n) + 1);
      for (auto& x : q) x = nd(rng);
      std::vector<int8_t> K(size_t(n) * D + 1);
      for (auto& x : K) x = int8_t(byte(rng));
      for (auto& x : ks) x = std::fabs(nd(rng)) * 0.01f + 1e-4f;
      const QueryI16 qi = quantize_query_i16(q.data(), D);
      float amax = 0;
      for (float x : q) amax = std::max(amax, std::fabs(x));
      ASSERT_EQ(qi.scale, amax / 32767.0f);
      for (int e = 0; e < D; ++e) {
        ASSERT_LE(std::abs(int(qi.q[size_t(e)])), 32767);
        // half a step, plus the float rounding of q / scale (|q / scale| <= 32767: ulp/2 <= 0.002)
        ASSERT_LE(std::fabs(double(qi.q[size_t(e)]) * qi.scale - q[size_t(e)]), 0.504 * qi.scale) << e;
      }
      const float sqrt_d = std::sqrt(float(D));
      std::vector<float> sv(size_t(n) + 1), sp(size_t(n) + 1);
      const float mv = score_rows_i8(qi, K.data(), ks.data(), n, sqrt_d, sv.data(), true);
      const float mp = score_rows_i8(qi, K.data(), ks.data(), n, sqrt_d, sp.data(), false);
      ASSERT_EQ(mv, mp) << "D " << D << " n " << n;
      float m = -INFINITY;
      for (int j = 0; j < n; ++j) {
        ASSERT_EQ(sv[size_t(j)], sp[size_t(j)]) << "D " << D << " n " << n << " row " << j;
        m = std::max(m, sv[size_t(j)]);
        double exact = 0, mag = 0;
        for (int e = 0; e < D; ++e) {
          exact += double(q[size_t(e)]) * K[size_t(j) * D + e];
          mag += std::fabs(double(K[size_t(j) * D + e]));
        }
        exact *= double(ks[size_t(j)]) / std::sqrt(double(D));
        // the query's rounding (as above), then four float roundings of the result
        const double bound = 0.504 * qi.scale * mag * ks[size_t(j)] / std::sqrt(double(D)) * 1.0001 + 1e-6 * std::fabs(exact);
        ASSERT_NEAR(sv[size_t(j)], exact, bound) << "D " << D << " row " << j;
      }
      ASSERT_EQ(mv, m);
    }
  // Largest magnitudes at the largest head size: the int32 sums stay exact.
  const int D = QueryI16::kMaxD;
  std::vector<float> q(D, 3.0f), one(1, 1.0f), s(1);
  std::vector<int8_t> K(D, -128);
  const QueryI16 qi = quantize_query_i16(q.data(), D);
  score_rows_i8(qi, K.data(), one.data(), 1, 1.0f, s.data());
  EXPECT_EQ(s[0], float(double(D) * -128 * 32767) * qi.scale);
  // A query too small for its scale to be a normal float: zero, and its scores 0.
  std::vector<float> tiny(D, 1e-43f);
  const QueryI16 qt = quantize_query_i16(tiny.data(), D);
  EXPECT_EQ(qt.scale, 0.0f);
  score_rows_i8(qt, K.data(), one.data(), 1, 1.0f, s.data());
  EXPECT_EQ(s[0], 0.0f);
  EXPECT_THROW(quantize_query_i16(q.data(), 15), Error);
  EXPECT_THROW(quantize_query_i16(q.data(), 513), Error);
}

// Decoding over Q8 memory with a head of 100: the integer-scored HeadAttention is within the
// query's rounding of the float-scored one, and the top-k scan over everything (which scores the
// same way) gives the same output as the dense pass.
TEST(Q8Memory, IntegerScoredAttentionAndTopKAgree) {
  const int D = 100, n = 2100;  // crosses chunk boundaries
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n) * D), v(k.size()), q(D);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  KVMemory mem(1, D, MemDType::Q8);
  mem.append(k.data(), v.data(), n, D);
  auto dense = [&](bool i8) {
    HeadAttention::i8_kernel = i8;
    HeadAttention att(q.data(), 1, D, D);
    for (int64_t s = 0; s < n;) {
      const KVBlock blk = mem.block(0, s, 1024);
      att.add_keys(blk);
      att.add_values(blk);
      s += blk.n;
    }
    std::vector<float> out(D);
    att.finish(out.data(), D);
    HeadAttention::i8_kernel = true;
    return out;
  };
  const auto oi = dense(true), of = dense(false);
  double diff = 0;
  for (int e = 0; e < D; ++e) diff = std::max(diff, double(std::fabs(oi[size_t(e)] - of[size_t(e)])));
  EXPECT_GT(diff, 0.0);   // the query really is rounded
  EXPECT_LT(diff, 2e-5);  // |q| ~ 3: a step of 1e-4, scores move by ~1e-5
  // Top-k over all keys, then the dense update over the hits: the same scores and weights.
  TopKScorer topk(q.data(), 1, D, D, n);
  for (int64_t s = 0; s < n;) {
    const KVBlock blk = mem.block(0, s, 1024);
    topk.add(blk, s);
    s += blk.n;
  }
  const auto hits = topk.take(0);
  ASSERT_EQ(int(hits.size()), n);
  HeadAttention att(q.data(), 1, D, D);
  std::vector<float> scores;
  std::vector<std::vector<float>> rows;
  for (const auto& h : hits) {
    scores.push_back(h.score);
    rows.emplace_back(D);
    mem.value_f32(0, h.index, rows.back().data());
  }
  std::vector<const void*> ptrs;
  for (const auto& r : rows) ptrs.push_back(r.data());
  att.add_scored(0, scores.data(), ptrs.data(), n, DType::F32);
  std::vector<float> ot(D);
  att.finish(ot.data(), D);
  for (int e = 0; e < D; ++e) EXPECT_NEAR(ot[size_t(e)], oi[size_t(e)], 1e-5) << e;
}
