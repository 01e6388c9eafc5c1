// Sampler against a plain reference implementation of each filter.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "generate/sampler.h"
#include "util/error.h"

namespace {

// Straightforward reference: softmax(l / T), then top-k, top-p, min-p by their definitions.
std::vector<double> reference(std::vector<float> l, const ll::SamplingParams& p) {
  const int n = int(l.size());
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b]; });
  std::vector<bool> keep(n, true);
  if (p.top_k > 0)
    for (int r = p.top_k; r < n; ++r) keep[order[r]] = false;
  double mx = -1e300, sum = 0;
  for (int i = 0; i < n; ++i)
    if (keep[i]) mx = std::max(mx, double(l[i]) / p.temperature);
  std::vector<double> q(n, 0.0);
  for (int i = 0; i < n; ++i)
    if (keep[i]) sum += q[i] = std::exp(double(l[i]) / p.temperature - mx);
  for (auto& x : q) x /= sum;
  if (p.top_p < 1) {
    double cum = 0;
    bool done = false;
    for (int r = 0; r < n; ++r) {
      if (done) keep[order[r]] = false;
      cum += q[order[r]];
      if (cum >= p.top_p) done = true;
    }
  }
  double pmax = q[order[0]];
  for (int i = 0; i < n; ++i)
    if (q[i] < p.min_p * pmax) keep[i] = false;
  sum = 0;
  for (int i = 0; i < n; ++i) sum += keep[i] ? q[i] : 0;
  for (int i = 0; i < n; ++i) q[i] = keep[i] ? q[i] / sum : 0;
  return q;
}

const std::vector<float> kLogits = {1.0f, 2.5f, -0.5f, 2.0f, 0.0f, 3.0f, -2.0f, 1.5f};

// Draws `n` samples and checks empirical frequencies against the reference within 4 sigma.
void check_empirical(const ll::SamplingParams& p, int n = 20000) {
  const auto q = reference(kLogits, p);
  ll::Sampler s(p);
  std::vector<int> count(kLogits.size(), 0);
  for (int i = 0; i < n; ++i) ++count[s.sample(kLogits.data(), int(kLogits.size()), {})];
  for (size_t t = 0; t < q.size(); ++t) {
    SCOPED_TRACE("token " + std::to_string(t));
    if (q[t] == 0) {
      EXPECT_EQ(count[t], 0) << "filtered token drawn";
    } else {
      const double f = double(count[t]) / n, sigma = std::sqrt(q[t] * (1 - q[t]) / n);
      EXPECT_NEAR(f, q[t], 4 * sigma + 1e-3);
    }
  }
  // The exact distribution matches the reference too.
  const auto d = ll::sampling_distribution(kLogits.data(), int(kLogits.size()), {}, p);
  std::vector<double> exact(q.size(), 0.0);
  for (auto& [t, pr] : d) exact[t] = pr;
  for (size_t t = 0; t < q.size(); ++t) EXPECT_NEAR(exact[t], q[t], 1e-12) << "token " << t;
}

ll::SamplingParams params(float temp, int k = 0, float top_p = 1, float min_p = 0, uint64_t seed = 42) {
  ll::SamplingParams p;
  p.temperature = temp;
  p.top_k = k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.seed = seed;
  return p;
}

}  // namespace

TEST(Sampler, GreedyIsArgmax) {
  ll::Sampler s(params(0));
  EXPECT_EQ(s.sample(kLogits.data(), int(kLogits.size()), {}), 5);
  std::vector<float> ties = {0.f, 7.f, 3.f, 7.f};
  EXPECT_EQ(s.sample(ties.data(), 4, {}), 1);  // lowest index on ties
  std::vector<float> big(32000);
  for (int i = 0; i < 32000; ++i) big[i] = std::sin(i * 0.37f) * 10;
  int ref = int(std::max_element(big.begin(), big.end()) - big.begin());
  EXPECT_EQ(s.sample(big.data(), 32000, {}), ref);
}

TEST(Sampler, TopK1IsGreedyAtAnyTemperature) {
  for (float t : {0.1f, 1.0f, 5.0f, 100.0f}) {
    ll::Sampler s(params(t, 1, 1, 0, 7));
    for (int i = 0; i < 200; ++i) ASSERT_EQ(s.sample(kLogits.data(), int(kLogits.size()), {}), 5);
  }
}

TEST(Sampler, EmpiricalSoftmax) { check_empirical(params(1.0f)); }
TEST(Sampler, EmpiricalTemperature) {
  check_empirical(params(0.7f, 0, 1, 0, 1));
  check_empirical(params(2.0f, 0, 1, 0, 2));
}
TEST(Sampler, EmpiricalTopK) { check_empirical(params(1.0f, 3, 1, 0, 3)); }
TEST(Sampler, EmpiricalTopP) {
  check_empirical(params(1.0f, 0, 0.8f, 0, 4));
  check_empirical(params(1.5f, 0, 0.5f, 0, 5));
}
TEST(Sampler, EmpiricalMinP) { check_empirical(params(1.0f, 0, 1, 0.3f, 6)); }
TEST(Sampler, EmpiricalCombined) { check_empirical(params(1.2f, 5, 0.9f, 0.1f, 8)); }

TEST(Sampler, TopPKeepsAtLeastOne) {
  const auto d = ll::sampling_distribution(kLogits.data(), int(kLogits.size()), {}, params(1.0f, 0, 0.01f));
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].first, 5);
  EXPECT_DOUBLE_EQ(d[0].second, 1.0);
}

TEST(Sampler, RepeatPenaltyRule) {
  ll::SamplingParams p = params(0);
  p.repeat_penalty = 2.0f;
  p.repeat_last_n = 3;
  std::vector<float> l = {4.0f, -1.0f, 2.0f, 0.5f, -3.0f};
  // Token 0 is outside the last 3 entries; token 2 repeats but is penalised once.
  std::vector<int> history = {0, 2, 1, 2, 99};
  ll::apply_repeat_penalty(l, history, p);
  EXPECT_EQ(l, (std::vector<float>{4.0f, -2.0f, 1.0f, 0.5f, -3.0f}));
  p.repeat_last_n = -1;
  l = {4.0f, -1.0f, 2.0f, 0.5f, -3.0f};
  ll::apply_repeat_penalty(l, history, p);
  EXPECT_EQ(l, (std::vector<float>{2.0f, -2.0f, 1.0f, 0.5f, -3.0f}));
  p.repeat_last_n = 0;
  l = {4.0f, -1.0f, 2.0f, 0.5f, -3.0f};
  ll::apply_repeat_penalty(l, history, p);
  EXPECT_EQ(l, (std::vector<float>{4.0f, -1.0f, 2.0f, 0.5f, -3.0f}));
  // Greedy sees the penalised logits: 5 (3.0) repeated with penalty 2 drops below 1 (2.5).
  p.repeat_last_n = 64;
  ll::Sampler s(p);
  EXPECT_EQ(s.sample(kLogits.data(), int(kLogits.size()), {5}), 1);
  EXPECT_EQ(s.sample(kLogits.data(), int(kLogits.size()), {}), 5);
}

TEST(Sampler, SameSeedSameSequence) {
  auto run = [](uint64_t seed) {
    ll::Sampler s(params(1.3f, 6, 0.95f, 0.02f, seed));
    std::vector<int> out, hist;
    for (int i = 0; i < 500; ++i) {
      out.push_back(s.sample(kLogits.data(), int(kLogits.size()), hist));
      hist.push_back(out.back());
    }
    return out;
  };
  EXPECT_EQ(run(123), run(123));
  EXPECT_NE(run(123), run(124));
}

TEST(Sampler, NeverDrawsMinusInf) {
  std::vector<float> l = {-INFINITY, 0.0f, -INFINITY, 0.0f, NAN};
  ll::Sampler s(params(1.0f));
  for (int i = 0; i < 2000; ++i) {
    int t = s.sample(l.data(), 5, {});
    ASSERT_TRUE(t == 1 || t == 3) << t;
  }
}

TEST(Sampler, ValidateRejectsBadParams) {
  auto expect_bad = [](ll::SamplingParams p, const std::string& field) {
    try {
      ll::validate(p);
      FAIL() << "accepted bad " << field;
    } catch (const ll::Error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
    EXPECT_THROW(ll::Sampler{p}, ll::Error);
  };
  ll::SamplingParams p;
  EXPECT_NO_THROW(ll::validate(p));
  p.temperature = -0.1f; expect_bad(p, "temperature"); p = {};
  p.temperature = NAN; expect_bad(p, "temperature"); p = {};
  p.top_k = -1; expect_bad(p, "top_k"); p = {};
  p.top_p = 0.0f; expect_bad(p, "top_p"); p = {};
  p.top_p = 1.5f; expect_bad(p, "top_p"); p = {};
  p.min_p = -0.1f; expect_bad(p, "min_p"); p = {};
  p.min_p = 1.1f; expect_bad(p, "min_p"); p = {};
  p.repeat_penalty = 0.0f; expect_bad(p, "repeat_penalty"); p = {};
  p.repeat_last_n = -2; expect_bad(p, "repeat_last_n"); p = {};
}

TEST(Sampler, RejectsEmptyLogits) {
  ll::Sampler s(params(0));
  EXPECT_THROW(s.sample(nullptr, 0, {}), ll::Error);
  EXPECT_THROW(s.sample(kLogits.data(), 0, {}), ll::Error);
}
