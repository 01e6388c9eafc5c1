// The bf16 decode kernel of HeadAttention (AVX-512 or AVX2) (even/odd split rows, 4-row reductions, exact
// tails) against a double-precision softmax over the same bf16 rows, for head sizes with every
// kind of tail and row counts around the 4-row grouping; and the same with the kernel off.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "ops/attention.h"
#include "util/half.h"

namespace {

struct Case {
  int D, n;
};

std::vector<double> reference(const std::vector<float>& q, const std::vector<uint16_t>& k,
                              const std::vector<uint16_t>& v, int D, int n) {
  std::vector<double> s(static_cast<size_t>(n)), out(static_cast<size_t>(D), 0.0);
  double m = -INFINITY, z = 0;
  for (int j = 0; j < n; ++j) {
    double dot = 0;
    for (int e = 0; e < D; ++e) dot += double(q[size_t(e)]) * ll::bf16_to_f32(k[size_t(j) * D + e]);
    s[size_t(j)] = dot / std::sqrt(double(D));
    m = std::max(m, s[size_t(j)]);
  }
  for (int j = 0; j < n; ++j) z += (s[size_t(j)] = std::exp(s[size_t(j)] - m));
  for (int j = 0; j < n; ++j)
    for (int e = 0; e < D; ++e) out[size_t(e)] += s[size_t(j)] / z * ll::bf16_to_f32(v[size_t(j) * D + e]);
  return out;
}

TEST(AttentionBf16Kernel, EveryTailAndRowCountAgainstDouble) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (bool kernel : {true, false}) {
    ll::HeadAttention::bf16_kernel = kernel;
    for (int D : {2, 4, 6, 10, 16, 24, 30, 32, 34, 48, 64, 72, 80, 96, 100, 126, 128, 130})
      for (int n : {1, 3, 4, 5, 8, 9, 300}) {
        std::vector<float> q(static_cast<size_t>(D));
        for (auto& x : q) x = nd(rng);
        std::vector<uint16_t> k(size_t(n) * D), v(k.size());
        for (auto& x : k) x = ll::f32_to_bf16(nd(rng));
        for (auto& x : v) x = ll::f32_to_bf16(nd(rng));
        // two blocks, so the online softmax rescales the accumulator once
        const int n1 = n / 2;
        ll::HeadAttention att(q.data(), 1, D, D);
        att.add({ll::DType::BF16, k.data(), v.data(), n1});
        att.add({ll::DType::BF16, k.data() + size_t(n1) * D, v.data() + size_t(n1) * D, n - n1});
        std::vector<float> out(size_t(D) + 4, NAN);
        att.finish(out.data(), D);
        const auto want = reference(q, k, v, D, n);
        for (int e = 0; e < D; ++e)
          ASSERT_NEAR(out[size_t(e)], want[size_t(e)], 2e-5) << "kernel " << kernel << " D " << D << " n " << n << " e " << e;
        for (int e = D; e < D + 4; ++e) ASSERT_TRUE(std::isnan(out[size_t(e)])) << "wrote past the head";
      }
  }
  ll::HeadAttention::bf16_kernel = true;
}

}  // namespace
