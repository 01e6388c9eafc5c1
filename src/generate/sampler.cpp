#include "generate/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <unordered_set>

#include "util/error.h"

namespace ll {

void validate(const SamplingParams& p) {
  auto bad = [](const std::string& field, const std::string& why) { throw Error("sampling: " + field + " " + why); };
  if (!std::isfinite(p.temperature) || p.temperature < 0) bad("temperature", "must be a finite value >= 0");
  if (p.top_k < 0) bad("top_k", "must be >= 0 (0 disables it)");
  if (!(p.top_p > 0 && p.top_p <= 1)) bad("top_p", "must be in (0, 1] (1 disables it)");
  if (!(p.min_p >= 0 && p.min_p <= 1)) bad("min_p", "must be in [0, 1] (0 disables it)");
  if (!std::isfinite(p.repeat_penalty) || p.repeat_penalty <= 0)
    bad("repeat_penalty", "must be a finite value > 0 (1 disables it)");
  if (p.repeat_last_n < -1) bad("repeat_last_n", "must be >= -1 (-1 = whole history, 0 disables it)");
}

void apply_repeat_penalty(std::vector<float>& logits, const std::vector<int>& history, const SamplingParams& p) {
  if (p.repeat_penalty == 1.0f || p.repeat_last_n == 0 || history.empty()) return;
  const size_t n = p.repeat_last_n < 0 ? history.size() : std::min(history.size(), size_t(p.repeat_last_n));
  std::unordered_set<int> seen;
  for (size_t i = history.size() - n; i < history.size(); ++i) {
    const int t = history[i];
    if (t < 0 || size_t(t) >= logits.size() || !seen.insert(t).second) continue;
    float& l = logits[t];
    l = l > 0 ? l / p.repeat_penalty : l * p.repeat_penalty;
  }
}

static std::vector<float> checked_logits(const float* logits, int vocab, const std::vector<int>& history,
                                         const SamplingParams& p) {
  if (!logits || vocab <= 0) throw Error("sampling: empty logits (vocab " + std::to_string(vocab) + ")");
  std::vector<float> l(logits, logits + vocab);
  for (float& x : l)
    if (std::isnan(x)) x = -std::numeric_limits<float>::infinity();  // a NaN logit is never chosen
  apply_repeat_penalty(l, history, p);
  return l;
}

static int argmax(const std::vector<float>& l) {
  return int(std::max_element(l.begin(), l.end()) - l.begin());  // first maximum = lowest index on ties
}

static std::vector<std::pair<int, double>> distribution(std::vector<float> l, const SamplingParams& p) {
  const int vocab = int(l.size());
  // Candidates sorted by logit descending, id ascending: a total order, so the result does not
  // depend on the sort implementation. Temperature scaling does not change the order.
  std::vector<int> idx(vocab);
  for (int i = 0; i < vocab; ++i) idx[i] = i;
  auto before = [&](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };
  size_t keep = vocab;
  if (p.top_k > 0 && p.top_k < vocab) {
    keep = p.top_k;
    std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), before);
    idx.resize(keep);
  } else {
    std::sort(idx.begin(), idx.end(), before);
  }
  const double inv_t = 1.0 / double(p.temperature);
  const double mx = double(l[idx[0]]) * inv_t;
  if (!std::isfinite(mx)) {  // every logit is -inf (or +inf present): fall back to the top token
    return {{idx[0], 1.0}};
  }
  std::vector<std::pair<int, double>> d(keep);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) {
    const double e = std::exp(double(l[idx[i]]) * inv_t - mx);
    d[i] = {idx[i], e};
    sum += e;
  }
  for (auto& [t, q] : d) q /= sum;
  // Drop zero-probability tail (e.g. -inf logits) so it can never be drawn.
  while (d.size() > 1 && d.back().second <= 0) d.pop_back();
  if (p.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p
    double cum = 0;
    size_t n = 0;
    while (n < d.size()) {
      cum += d[n++].second;
      if (cum >= double(p.top_p)) break;
    }
    d.resize(n);
  }
  if (p.min_p > 0.0f) {
    const double thr = double(p.min_p) * d[0].second;
    size_t n = 1;
    while (n < d.size() && d[n].second >= thr) ++n;
    d.resize(n);
  }
  sum = 0;
  for (auto& e : d) sum += e.second;
  for (auto& e : d) e.second /= sum;
  return d;
}

std::vector<std::pair<int, double>> sampling_distribution(const float* logits, int vocab,
                                                          const std::vector<int>& history, const SamplingParams& p) {
  validate(p);
  std::vector<float> l = checked_logits(logits, vocab, history, p);
  if (p.temperature == 0.0f) return {{argmax(l), 1.0}};
  return distribution(std::move(l), p);
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) { validate(p); }

int Sampler::sample(const float* logits, int vocab, const std::vector<int>& history) {
  std::vector<float> l = checked_logits(logits, vocab, history, p_);
  if (p_.temperature == 0.0f) return argmax(l);
  const auto d = distribution(std::move(l), p_);  // every non-greedy call draws exactly once
  // Uniform double in [0, 1) from the top 53 bits: portable, unlike uniform_real_distribution.
  const double u = double(rng_() >> 11) * 0x1.0p-53;
  double cum = 0;
  for (const auto& [t, q] : d) {
    cum += q;
    if (u < cum) return t;
  }
  return d.back().first;  // rounding left u just above the total
}

}  // namespace ll
