// Backward passes of every training op against central finite differences, in float64 with odd
// sizes, including crossbatch attention with negatives and stepping.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>

#include "train/backward_ops.h"
#include "train/crossbatch.h"
#include "train/negative_bank.h"

using namespace ll::train;
using Vec = std::vector<double>;

namespace {

Vec randn(size_t n, std::mt19937_64& rng, double sd = 1.0) {
  std::normal_distribution<double> N(0.0, sd);
  Vec v(n);
  for (double& x : v) x = N(rng);
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Largest |analytic - numeric| / max(1, |numeric|) over every coordinate of x, where numeric is
// the central difference of loss() with step h.
double grad_error(Vec& x, const Vec& analytic, const std::function<double()>& loss, double h = 1e-5) {
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double lp = loss();
    x[i] = keep - h;
    const double lm = loss();
    x[i] = keep;
    const double num = (lp - lm) / (2 * h);
    worst = std::max(worst, std::abs(analytic[i] - num) / std::max(1.0, std::abs(num)));
  }
  return worst;
}

constexpr double kTol = 1e-8;

double max_abs_diff(const Vec& a, const Vec& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// Expects a relative gradient error below kTol and prints it (the numbers quoted in reports).
void expect_small(const char* what, double err) {
  std::printf("  %-22s max relative gradient error %.1e\n", what, err);
  EXPECT_LT(err, kTol) << what;
}

}  // namespace

TEST(TrainOps, Embedding) {
  std::mt19937_64 rng(1);
  const int V = 37, d = 5, n = 9;
  const std::vector<int> ids = {3, 0, 36, 3, 7, 7, 7, 12, 3};  // repeated ids accumulate
  Vec table = randn(V * d, rng), w = randn(n * d, rng), out(n * d), g(V * d, 0.0);
  auto loss = [&] {
    embedding_fwd(table.data(), d, ids.data(), n, out.data());
    return dot(out, w);
  };
  embedding_bwd(w.data(), d, ids.data(), n, g.data());
  expect_small("Embedding dtable", grad_error(table, g, loss));
}

TEST(TrainOps, Linear) {
  std::mt19937_64 rng(2);
  const int n = 7, in = 12, out = 20;
  Vec x = randn(n * in, rng), W = randn(out * in, rng), w = randn(n * out, rng), y(n * out);
  Vec dx(n * in, 0.0), dW(out * in, 0.0);
  auto loss = [&] {
    linear_fwd(x.data(), n, in, W.data(), out, y.data());
    return dot(y, w);
  };
  linear_bwd(x.data(), n, in, W.data(), out, w.data(), dx.data(), false, dW.data());
  expect_small("Linear dx", grad_error(x, dx, loss));
  expect_small("Linear dW", grad_error(W, dW, loss));
  // accumulate_dx adds, dW always adds
  Vec dx2 = dx, dW2 = dW;
  linear_bwd(x.data(), n, in, W.data(), out, w.data(), dx2.data(), true, dW2.data());
  for (size_t i = 0; i < dx.size(); ++i) EXPECT_DOUBLE_EQ(dx2[i], 2 * dx[i]);
  for (size_t i = 0; i < dW.size(); ++i) EXPECT_DOUBLE_EQ(dW2[i], 2 * dW[i]);
}

TEST(TrainOps, RMSNorm) {
  std::mt19937_64 rng(3);
  const int n = 7, d = 12;
  Vec x = randn(n * d, rng), wt = randn(d, rng), w = randn(n * d, rng), y(n * d), rstd(n);
  Vec dx(n * d, 0.0), dwt(d, 0.0);
  auto loss = [&] {
    rmsnorm_fwd(x.data(), wt.data(), n, d, 1e-6, y.data(), rstd.data());
    return dot(y, w);
  };
  loss();
  rmsnorm_bwd(x.data(), wt.data(), rstd.data(), w.data(), n, d, dx.data(), dwt.data());
  expect_small("RMSNorm dx", grad_error(x, dx, loss));
  expect_small("RMSNorm dwt", grad_error(wt, dwt, loss));
}

TEST(TrainOps, RopeMatchesInferenceTableAndInverts) {
  std::mt19937_64 rng(4);
  const int S = 7, H = 3, D = 4, n = 2 * S, ld = H * D + 2;  // two entries, padded rows
  Rope<double> rope(D, 10000.0f, S);
  Vec x = randn(n * ld, rng), w = randn(n * ld, rng);
  for (int i = 0; i < n; ++i) w[i * ld + H * D] = w[i * ld + H * D + 1] = 0;  // padding is not rotated
  auto loss = [&] {
    Vec y = x;
    rope_fwd(y.data(), n, ld, H, rope, S);
    return dot(y, w);
  };
  Vec g = w;
  rope_bwd(g.data(), n, ld, H, rope, S);
  expect_small("RoPE dx", grad_error(x, g, loss));
  // Position 0 is the identity (memory keys "rotated as if first"); row S restarts at 0.
  Vec y = x;
  rope_fwd(y.data(), n, ld, H, rope, S);
  for (int j = 0; j < H * D; ++j) {
    EXPECT_EQ(y[j], x[j]);
    EXPECT_EQ(y[S * ld + j], x[S * ld + j]);
  }
  // Position 1, pair 0: angle 1 rad (inv_freq 1): [a, b] -> [a cos1 - b sin1, b cos1 + a sin1]
  const double a = x[ld], b = x[ld + D / 2];
  EXPECT_NEAR(y[ld], a * std::cos(1.0) - b * std::sin(1.0), 1e-7);
  EXPECT_NEAR(y[ld + D / 2], b * std::cos(1.0) + a * std::sin(1.0), 1e-7);
}

TEST(TrainOps, FastExpMatchesExpAndUnderflowsToZero) {
  // The float exp of the softmaxes: within a few ulp of exp over the whole normal range, and
  // exactly 0 where exp would leave the normal range (denormals make the backward pass ~100x
  // slower), never a denormal.
  double worst = 0;
  for (float x = -87.0f; x <= 88.0f; x += 0.0137f) {
    const double e = std::exp(double(x));
    worst = std::max(worst, std::abs(double(fast_exp(x)) - e) / e);
  }
  EXPECT_LT(worst, 5e-7);
  for (float x : {-87.01f, -88.0f, -100.0f, -1e6f, -INFINITY}) EXPECT_EQ(fast_exp(x), 0.0f) << x;
  for (float x = -87.0f; x < -80.0f; x += 0.001f) EXPECT_TRUE(std::isnormal(fast_exp(x))) << x;
}

TEST(TrainOps, SwiGLU) {
  std::mt19937_64 rng(5);
  const int n = 20 * 3;
  Vec g = randn(n, rng, 2.0), u = randn(n, rng), w = randn(n, rng), a(n), dg(n), du(n);
  auto loss = [&] {
    swiglu_fwd(g.data(), u.data(), n, a.data());
    return dot(a, w);
  };
  swiglu_bwd(g.data(), u.data(), w.data(), n, dg.data(), du.data());
  expect_small("SwiGLU dg", grad_error(g, dg, loss));
  expect_small("SwiGLU du", grad_error(u, du, loss));
}

TEST(TrainOps, CrossEntropyPerSequenceMean) {
  std::mt19937_64 rng(6);
  const int S = 7, B = 3, n = S * B, V = 37;
  Vec logits = randn(n * V, rng, 2.0), dl(n * V);
  std::vector<int> targets(n);
  std::vector<uint8_t> mask(n);
  for (int i = 0; i < n; ++i) {
    targets[i] = int(rng() % V);
    mask[i] = i < S ? 0 : (rng() % 3 != 0);  // first sequence: no loss tokens at all
  }
  mask[S] = 1;
  auto loss = [&] {
    return cross_entropy<double>(logits.data(), n, V, targets.data(), mask.data(), S, 0, nullptr).loss_sum;
  };
  const CEStats st = cross_entropy<double>(logits.data(), n, V, targets.data(), mask.data(), S, 0.5, dl.data());
  for (double& g : dl) g *= 2;  // grad_scale 0.5
  expect_small("CrossEntropy dlogits", grad_error(logits, dl, loss));
  // Reference: per-sequence mean of masked NLL, summed over sequences.
  double ref = 0;
  int64_t counted = 0;
  for (int b = 0; b < B; ++b) {
    double s = 0;
    int c = 0;
    for (int i = b * S; i < (b + 1) * S; ++i) {
      if (!mask[i]) continue;
      double mx = -1e300, z = 0;
      for (int j = 0; j < V; ++j) mx = std::max(mx, logits[i * V + j]);
      for (int j = 0; j < V; ++j) z += std::exp(logits[i * V + j] - mx);
      s += mx + std::log(z) - logits[i * V + targets[i]];
      ++c;
    }
    if (c) ref += s / c;
    counted += c;
  }
  EXPECT_NEAR(st.loss_sum, ref, 1e-12);
  EXPECT_EQ(st.counted, counted);
  // A mask value is the row's weight: per sequence, sum(w * nll) / sum(w); gradient checked too.
  for (int i = 0; i < n; ++i)
    if (mask[i]) mask[i] = uint8_t(1 + rng() % 4);
  const CEStats ws = cross_entropy<double>(logits.data(), n, V, targets.data(), mask.data(), S, 0.5, dl.data());
  for (double& g : dl) g *= 2;
  expect_small("CrossEntropy weighted dlogits", grad_error(logits, dl, loss));
  double wref = 0;
  for (int b = 0; b < B; ++b) {
    double s = 0, w = 0;
    for (int i = b * S; i < (b + 1) * S; ++i) {
      if (!mask[i]) continue;
      double mx = -1e300, z = 0;
      for (int j = 0; j < V; ++j) mx = std::max(mx, logits[i * V + j]);
      for (int j = 0; j < V; ++j) z += std::exp(logits[i * V + j] - mx);
      s += mask[i] * (mx + std::log(z) - logits[i * V + targets[i]]);
      w += mask[i];
    }
    if (w > 0) wref += s / w;
  }
  EXPECT_NEAR(ws.loss_sum, wref, 1e-12);
  EXPECT_GT(std::abs(ws.loss_sum - st.loss_sum), 1e-6);  // the weights changed the loss
  EXPECT_EQ(ws.counted, counted);                        // rows, not weights
}

TEST(CrossBatch, PackSizeRule) {
  // k = 4, r = 3, stepping: 0, 2, 3, 3 earlier entries; the first pack is capped by b + 1.
  CrossBatch cb{4, 3, true, true};
  const std::vector<int> want = {1, 2, 3, 4, 1, 3, 4, 4, 1, 3, 4, 4};
  for (int b = 0; b < 12; ++b) EXPECT_EQ(cb.contexts(b), want[b]) << "b=" << b;
  cb.stepping = false;  // every entry gets r + 1 (capped by b + 1)
  for (int b = 0; b < 12; ++b) EXPECT_EQ(cb.contexts(b), std::min(4, b + 1)) << "b=" << b;
  cb.negatives = false;  // only its own pack: the inference view
  for (int b = 0; b < 12; ++b) EXPECT_EQ(cb.contexts(b), b % 4 + 1) << "b=" << b;
  // k = 2, r = 2 (the shipped setup_test.json): ceil(3/1) = 3 -> positions get 1 and 3 contexts.
  CrossBatch small{2, 2, true, true};
  EXPECT_EQ(small.contexts(0), 1);
  EXPECT_EQ(small.contexts(1), 2);
  EXPECT_EQ(small.contexts(2), 1);
  EXPECT_EQ(small.contexts(3), 3);
  // k = 1: stepping does not apply; only negatives (other streams).
  CrossBatch one{1, 2, true, true};
  EXPECT_EQ(one.contexts(0), 1);
  EXPECT_EQ(one.contexts(1), 2);
  EXPECT_EQ(one.contexts(5), 3);
}

namespace {

// Direct evaluation of crossbatch attention from its definition (no gemm, no shared code).
// `extra` may add keys of its own to a query's softmax (the negative bank's).
using ExtraKeys = std::function<void(int b, int h, int i, std::vector<std::pair<double, const double*>>& keys)>;
Vec attention_reference(const CrossBatch& cb, int B, int S, int H, int D, const Vec& Q, const Vec& Kown, const Vec& Kx,
                        const Vec& V, const ExtraKeys& extra = {}) {
  const int ld = H * D;
  Vec O(size_t(B) * S * ld, 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < S; ++i) {
        std::vector<std::pair<double, const double*>> keys;  // (score, value row)
        auto score = [&](const Vec& K, int row) {
          double s = 0;
          for (int j = 0; j < D; ++j) s += Q[(b * S + i) * ld + h * D + j] * K[row * ld + h * D + j];
          return s / std::sqrt(double(D));
        };
        for (int j = 0; j <= i; ++j) keys.push_back({score(Kown, b * S + j), &V[(b * S + j) * ld + h * D]});
        for (int e = b - cb.contexts(b) + 1; e < b; ++e) {
          const double bias = e / cb.k != b / cb.k ? cb.negative_bias : 0.0;  // another stream: a negative
          for (int j = 0; j < S; ++j) keys.push_back({score(Kx, e * S + j) + bias, &V[(e * S + j) * ld + h * D]});
        }
        if (extra) extra(b, h, i, keys);
        double mx = -1e300, z = 0;
        for (auto& k : keys) mx = std::max(mx, k.first);
        for (auto& k : keys) z += std::exp(k.first - mx);
        for (auto& k : keys)
          for (int j = 0; j < D; ++j) O[(b * S + i) * ld + h * D + j] += std::exp(k.first - mx) / z * k.second[j];
      }
  return O;
}

// Relative error of the analytic gradient along a random direction u against the central
// difference of the loss along u: one pair of evaluations, for inputs too large for grad_error.
double directional_error(Vec& x, const Vec& analytic, const std::function<double()>& loss, std::mt19937_64& rng,
                         double h = 1e-5) {
  const Vec u = randn(x.size(), rng), keep = x;
  for (size_t i = 0; i < x.size(); ++i) x[i] = keep[i] + h * u[i];
  const double lp = loss();
  for (size_t i = 0; i < x.size(); ++i) x[i] = keep[i] - h * u[i];
  const double lm = loss();
  x = keep;
  const double num = (lp - lm) / (2 * h);
  return std::abs(dot(analytic, u) - num) / std::max(1.0, std::abs(num));
}

// Forward against the direct evaluation; gradients against finite differences, element by element
// or (directional, for large inputs) along one random direction per tensor.
void check_attention(const CrossBatch& cb, int B, int S, int H, int D, uint64_t seed, bool directional = false) {
  std::mt19937_64 rng(seed);
  const size_t n = size_t(B) * S * H * D;
  Vec Q = randn(n, rng), Kown = randn(n, rng), Kx = randn(n, rng), V = randn(n, rng), w = randn(n, rng);
  Vec lse(size_t(B) * H * S), O(n);
  auto loss = [&] {
    attention_fwd(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), V.data(), lse.data(), O.data());
    return dot(O, w);
  };
  loss();
  const Vec ref = attention_reference(cb, B, S, H, D, Q, Kown, Kx, V);
  double fwd_err = 0;
  for (size_t i = 0; i < n; ++i) fwd_err = std::max(fwd_err, std::abs(O[i] - ref[i]));
  EXPECT_LT(fwd_err, 1e-12);
  Vec dQ(n), dKown(n), dKx(n), dV(n);
  attention_bwd(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), V.data(), lse.data(), O.data(), w.data(), dQ.data(),
                dKown.data(), dKx.data(), dV.data());
  const auto error = [&](Vec& x, const Vec& g) {
    return directional ? directional_error(x, g, loss, rng) : grad_error(x, g, loss);
  };
  const double eq = error(Q, dQ), ek = error(Kown, dKown), ex = error(Kx, dKx), ev = error(V, dV);
  const double tol = directional ? 1e-7 : kTol;
  EXPECT_LT(eq, tol);
  EXPECT_LT(ek, tol);
  EXPECT_LT(ex, tol);
  EXPECT_LT(ev, tol);
  bool cross = false;  // does any entry see another entry's keys?
  for (int b = 0; b < B; ++b) cross = cross || cb.contexts(b) > 1;
  for (const Vec* g : {&dQ, &dKown, &dV}) EXPECT_GT(dot(*g, *g), 0.0);  // real signals, not zeros
  if (cross)
    EXPECT_GT(dot(dKx, dKx), 0.0);
  else
    EXPECT_EQ(dot(dKx, dKx), 0.0);
  std::printf(
      "  k=%d r=%d stepping=%d negatives=%d bias=%g B=%d S=%d H=%d D=%d: fwd %.1e, grad Q %.1e Kown %.1e Kx %.1e V "
      "%.1e\n",
      cb.k, cb.range, cb.stepping, cb.negatives, cb.negative_bias, B, S, H, D, fwd_err, eq, ek, ex, ev);
}

}  // namespace

TEST(CrossBatch, AttentionGradients) {
  check_attention({1, 0, true, true}, 2, 7, 3, 4, 10);   // plain causal
  check_attention({2, 1, true, true}, 4, 7, 3, 4, 11);   // positives + negatives
  check_attention({4, 3, true, true}, 8, 5, 2, 4, 12);   // the 3B recipe: (0,0) (1,1) (2,1) (3,0)
  check_attention({3, 4, false, true}, 6, 5, 3, 2, 13);  // no stepping, range beyond the pack
  check_attention({3, 5, true, false}, 6, 5, 1, 6, 14);  // positives only
  check_attention({1, 2, true, true}, 4, 3, 2, 4, 15);   // k = 1: negatives only
  // An additive margin on the negatives' scores (cross_batch.negative_bias): positives unbiased.
  check_attention({2, 3, true, true, 1.7}, 6, 5, 2, 4, 16);
  check_attention({4, 3, true, true, -0.9}, 8, 5, 2, 4, 17);
  check_attention({1, 2, true, true, 2.5}, 4, 3, 2, 4, 18);
}

// Attention targets (memory_attention_loss): the loss Σ w·(−log P(row attends its target)) against
// a direct evaluation of the softmax, and the gradients of Σ dO·O plus that loss against finite
// differences. Targets in the own block, in a positive and in a (biased) negative entry, targets
// the row does not see (later keys, entries out of range: ignored) and rows without one.
namespace {

void check_attention_targets(const CrossBatch& cb, int B, int S, int H, int D, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const size_t n = size_t(B) * S * H * D;
  const int ld = H * D;
  Vec Q = randn(n, rng), Kown = randn(n, rng), Kx = randn(n, rng), V = randn(n, rng), w = randn(n, rng);
  std::vector<int32_t> attend(size_t(B) * S, -1);
  Vec weight(size_t(B) * S, 0.0);
  int visible = 0, hidden = 0;
  for (int r = 0; r < B * S; ++r) {
    if (rng() % 4 == 0) continue;  // no target
    const int b = r / S, i = r % S, c = cb.contexts(b);
    if (rng() % 4 == 0) {
      attend[size_t(r)] = int32_t(rng() % uint64_t(B * S));  // anywhere: mostly not seen
    } else {                                                // a key the row sees
      const int e = b - int(rng() % uint64_t(c));
      attend[size_t(r)] = int32_t(e * S + int(rng() % uint64_t(e < b ? S : i + 1)));
    }
    weight[size_t(r)] = 0.25 + 0.5 * double(rng() % 100) / 100;
    (cb.sees(r / S, r % S, attend[size_t(r)] / S, attend[size_t(r)] % S) ? visible : hidden)++;
  }
  ASSERT_GT(visible, 3);
  ASSERT_GT(hidden, 3);
  const AttendTargets<double> targets{attend.data(), weight.data()};
  Vec lse(size_t(B) * H * S), O(n);
  auto loss = [&] {
    attention_fwd(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), V.data(), lse.data(), O.data());
    return dot(O, w) + attention_target_loss(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), lse.data(), targets);
  };
  // The loss against the softmax written out: the target's probability among every key the row sees.
  loss();
  double want = 0;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < S; ++i) {
      const int r = b * S + i, t = attend[size_t(r)];
      if (t < 0 || !cb.sees(b, i, t / S, t % S)) continue;
      for (int h = 0; h < H; ++h) {
        double z = 0, target = 0;
        for (int e = 0; e <= b; ++e)
          for (int j = 0; j < S; ++j) {
            if (!cb.sees(b, i, e, j)) continue;
            const Vec& K = e == b ? Kown : Kx;
            double s = 0;
            for (int x = 0; x < D; ++x) s += Q[size_t(r) * ld + h * D + x] * K[(size_t(e) * S + j) * ld + h * D + x];
            s = s / std::sqrt(double(D)) + (e / cb.k != b / cb.k ? cb.negative_bias : 0.0);
            z += std::exp(s);
            if (e * S + j == t) target = std::exp(s);
          }
        want += weight[size_t(r)] * -std::log(target / z);
      }
    }
  const double got = attention_target_loss(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), lse.data(), targets);
  EXPECT_NEAR(got, want, 1e-9 * std::abs(want));
  EXPECT_GT(want, 0.0);
  Vec dQ(n), dKown(n), dKx(n), dV(n);
  attention_bwd(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), V.data(), lse.data(), O.data(), w.data(), dQ.data(),
                dKown.data(), dKx.data(), dV.data(), targets);
  const double eq = grad_error(Q, dQ, loss), ek = grad_error(Kown, dKown, loss), ex = grad_error(Kx, dKx, loss),
               ev = grad_error(V, dV, loss);
  EXPECT_LT(eq, kTol);
  EXPECT_LT(ek, kTol);
  EXPECT_LT(ex, kTol);
  EXPECT_LT(ev, kTol);
  // The targets change the score gradients (and not the values'): not the plain backward pass.
  Vec pQ(n), pKown(n), pKx(n), pV(n);
  attention_bwd(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), V.data(), lse.data(), O.data(), w.data(), pQ.data(),
                pKown.data(), pKx.data(), pV.data());
  EXPECT_GT(max_abs_diff(dQ, pQ), 1e-3);
  EXPECT_EQ(max_abs_diff(dV, pV), 0.0);
  std::printf("  targets k=%d r=%d bias=%g B=%d S=%d H=%d D=%d: %d visible, %d ignored; loss %.3e (direct %.3e), grad "
              "Q %.1e Kown %.1e Kx %.1e V %.1e\n",
              cb.k, cb.range, cb.negative_bias, B, S, H, D, visible, hidden, got, want, eq, ek, ex, ev);
}

}  // namespace

TEST(CrossBatch, AttentionTargetGradients) {
  check_attention_targets({2, 3, true, true}, 6, 5, 2, 4, 41);        // positives and negatives
  check_attention_targets({2, 3, true, true, 1.3}, 6, 5, 1, 4, 42);   // biased negatives, one head
  check_attention_targets({1, 0, true, true}, 3, 7, 2, 3, 43);        // own keys only
}

// Which earlier entries are negatives: those of earlier packs, and they come first.
TEST(CrossBatch, NegativeContexts) {
  const CrossBatch paper{4, 3, true, true};  // (positives, negatives) (0,0) (1,1) (2,1) (3,0)
  const int expect[4] = {0, 1, 1, 0};
  for (int b = 4; b < 8; ++b) EXPECT_EQ(paper.negative_contexts(b), expect[b % 4]) << b;
  EXPECT_EQ(paper.negative_contexts(1), 0);  // the first pack has no earlier pack
  const CrossBatch dict{2, 63, true, true};  // the dictionary recipe's stage N shape (batch 64)
  EXPECT_EQ(dict.negative_contexts(63), 62);
  EXPECT_EQ(dict.negative_contexts(62), 0);
  const CrossBatch own{2, 63, true, false};
  EXPECT_EQ(own.negative_contexts(63), 0);
}

// Sequences longer than the causal tile (64 rows): the own block is computed in tiles, with a
// short last tile.
TEST(CrossBatch, AttentionTiledOwnBlock) {
  check_attention({1, 0, true, true}, 4, 150, 2, 8, 31, /*directional=*/true);  // plain causal
  check_attention({2, 1, true, true}, 4, 150, 2, 8, 32, /*directional=*/true);  // positives + negatives
}

// Fewer heads than threads: the backward pass runs each head as a team of threads (the merged
// memory head of the dictionary models); its gradients must be the serial ones, bit for bit.
// S is odd so the team's two halves of dQ differ in size.
TEST(CrossBatch, BackwardTeamMatchesSerialBits) {
  const int B = 4, S = 33, H = 1, D = 64;
  const CrossBatch cb{2, 3, true, true, 1.3};  // with a negative bias: each block's shift is the team's too
  std::mt19937_64 rng(21);
  const size_t n = size_t(B) * S * H * D;
  std::vector<float> in[5];
  for (auto& v : in) {
    const Vec r = randn(n, rng);
    v.assign(r.begin(), r.end());
  }
  const auto& [Q, Kown, Kx, V, dO] = in;
  std::vector<float> lse(size_t(B) * H * S), O(n);
  attention_fwd(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), V.data(), lse.data(), O.data());
  std::vector<float> grads[2][4];
  const int saved = omp_get_max_threads();
  for (int t = 0; t < 2; ++t) {
    omp_set_num_threads(t + 1);
    for (auto& g : grads[t]) g.assign(n, -1.0f);
    attention_bwd(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), V.data(), lse.data(), O.data(), dO.data(),
                  grads[t][0].data(), grads[t][1].data(), grads[t][2].data(), grads[t][3].data());
  }
  omp_set_num_threads(saved);
  for (int g = 0; g < 4; ++g) EXPECT_TRUE(grads[0][g] == grads[1][g]) << "gradient " << g;
  double norm = 0;
  for (float x : grads[1][0]) norm += double(x) * x;
  EXPECT_GT(norm, 0.0);
}

// The negative bank joins each chosen row's top_k bank keys to its softmax: the forward pass
// against the direct evaluation with those keys added (chosen by brute force over what the ring
// holds after it wrapped), gradients of Q, K and V against finite differences (bank keys are
// constants), and rows not chosen unchanged.
TEST(NegativeBank, JoinsTopKeysToTheSoftmax) {
  const int B = 4, S = 6, H = 2, D = 4, ld = H * D, top_k = 5, bank_size = 20, pushed = 27;
  const CrossBatch cb{2, 1, true, true};
  std::mt19937_64 rng(41);
  const size_t n = size_t(B) * S * ld;
  Vec Q = randn(n, rng), Kown = randn(n, rng), Kx = randn(n, rng), V = randn(n, rng), w = randn(n, rng);
  const Vec bank_k = randn(size_t(pushed) * ld, rng, 1.5), bank_v = randn(size_t(pushed) * ld, rng);
  NegativeBank<double> bank(bank_size, top_k, H, D);
  bank.push(bank_k.data(), bank_v.data(), 10);  // two pushes: the ring wraps and drops the 7 oldest
  bank.push(bank_k.data() + 10 * ld, bank_v.data() + 10 * ld, pushed - 10);
  EXPECT_EQ(bank.rows(), bank_size);
  const std::vector<int> rows = {1, 6, 11, 17, 23};
  Vec lse(size_t(B) * H * S), O(n);
  auto forward = [&] {
    attention_fwd(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), V.data(), lse.data(), O.data());
    bank.select(Q.data(), rows);
    bank.merge_fwd(S, lse.data(), O.data());
    return dot(O, w);
  };
  forward();
  const ExtraKeys extra = [&](int b, int h, int i, std::vector<std::pair<double, const double*>>& keys) {
    if (std::find(rows.begin(), rows.end(), b * S + i) == rows.end()) return;
    std::vector<std::pair<double, int>> scored;  // the ring holds pushed rows 7 .. 26
    for (int r = pushed - bank_size; r < pushed; ++r) {
      double sc = 0;
      for (int j = 0; j < D; ++j) sc += Q[(b * S + i) * ld + h * D + j] * bank_k[r * ld + h * D + j];
      scored.push_back({sc / std::sqrt(double(D)), r});
    }
    std::sort(scored.rbegin(), scored.rend());
    for (int t = 0; t < top_k; ++t) keys.push_back({scored[t].first, &bank_v[scored[t].second * ld + h * D]});
  };
  const Vec ref = attention_reference(cb, B, S, H, D, Q, Kown, Kx, V, extra);
  const Vec plain = attention_reference(cb, B, S, H, D, Q, Kown, Kx, V);
  double fwd_err = 0, moved = 0;
  for (size_t i = 0; i < n; ++i) {
    fwd_err = std::max(fwd_err, std::abs(O[i] - ref[i]));
    moved = std::max(moved, std::abs(ref[i] - plain[i]));
  }
  EXPECT_LT(fwd_err, 1e-12);
  EXPECT_GT(moved, 1e-3);  // the bank keys matter
  Vec dQ(n), dKown(n), dKx(n), dV(n);
  attention_bwd(cb, B, S, H, D, Q.data(), Kown.data(), Kx.data(), V.data(), lse.data(), O.data(), w.data(), dQ.data(),
                dKown.data(), dKx.data(), dV.data());
  bank.add_dq(S, lse.data(), O.data(), w.data(), dQ.data());
  expect_small("bank dQ", grad_error(Q, dQ, forward));
  expect_small("bank dKown", grad_error(Kown, dKown, forward));
  expect_small("bank dKx", grad_error(Kx, dKx, forward));
  expect_small("bank dV", grad_error(V, dV, forward));
}
