// Exact top-k memory retrieval against a brute-force sort.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "ops/attention.h"
#include "ops/quant.h"
#include "util/half.h"

using namespace ll;

namespace {

std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

}  // namespace

// Each key type the memory stores, scored per query (fewer than 16) or by sgemm (16 and more).
TEST(TopK, MatchesBruteForceForBothPaths) {
  const int D = 24, n = 1000, k = 7;
  for (DType t : {DType::BF16, DType::F16, DType::F32})
    for (int nq : {1, 5, 16, 20}) {
      const auto q = randn(size_t(nq) * D, 1), keys = randn(size_t(n) * D, 2);
      std::vector<uint16_t> kh(keys.size());
      std::vector<float> kf(keys.size());  // the keys as stored, widened
      for (size_t i = 0; i < keys.size(); ++i) {
        kh[i] = t == DType::BF16 ? f32_to_bf16(keys[i]) : f32_to_f16(keys[i]);
        kf[i] = t == DType::BF16 ? bf16_to_f32(kh[i]) : t == DType::F16 ? f16_to_f32(kh[i]) : keys[i];
      }
      TopKScorer s(q.data(), nq, D, D, k);
      for (int b = 0; b < n; b += 300) {
        const void* kp = t == DType::F32 ? static_cast<const void*>(&keys[size_t(b) * D]) : &kh[size_t(b) * D];
        s.add({t, kp, nullptr, std::min(300, n - b)}, b);
      }
      for (int i = 0; i < nq; ++i) {
        std::vector<std::pair<double, int>> all;
        for (int j = 0; j < n; ++j) {
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(q[size_t(i) * D + d]) * kf[size_t(j) * D + d];
          all.push_back({dot / std::sqrt(double(D)), j});
        }
        std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first > b.first; });
        const auto hits = s.take(i);
        ASSERT_EQ(hits.size(), size_t(k));
        for (int r = 0; r < k; ++r) {
          EXPECT_EQ(hits[r].index, all[r].second) << int(t) << " nq " << nq << " query " << i << " rank " << r;
          EXPECT_NEAR(hits[r].score, all[r].first, 1e-4);
        }
      }
    }
}

TEST(TopK, FewerKeysThanKKeepsAll) {
  const int D = 8;
  const auto q = randn(D, 3), keys = randn(3 * D, 4);
  TopKScorer s(q.data(), 1, D, D, 10);
  s.add({DType::F32, keys.data(), nullptr, 3}, 100);
  const auto hits = s.take(0);
  ASSERT_EQ(hits.size(), 3u);
  for (size_t r = 1; r < hits.size(); ++r) EXPECT_GE(hits[r - 1].score, hits[r].score);
  for (const auto& h : hits) EXPECT_TRUE(h.index >= 100 && h.index < 103);
}

// add_scored with the scores add() would compute gives the same softmax.
TEST(TopK, AddScoredEqualsAdd) {
  const int D = 16, n = 50;
  const auto q = randn(D, 5), k = randn(size_t(n) * D, 6), v = randn(size_t(n) * D, 7);
  HeadAttention a(q.data(), 1, D, D), b(q.data(), 1, D, D);
  a.add({DType::F32, k.data(), v.data(), n});
  std::vector<float> scores(n);
  std::vector<const void*> rows(n);
  for (int j = 0; j < n; ++j) {
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += double(q[d]) * k[size_t(j) * D + d];
    scores[j] = float(dot / 4.0);
    rows[j] = &v[size_t(j) * D];
  }
  b.add_scored(0, scores.data(), rows.data(), n, DType::F32);
  std::vector<float> oa(D), ob(D);
  a.finish(oa.data(), D);
  b.finish(ob.data(), D);
  for (int d = 0; d < D; ++d) EXPECT_NEAR(oa[d], ob[d], 1e-5);
}
