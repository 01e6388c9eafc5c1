#include "train/optimizer.h"

#include <algorithm>
#include <cmath>

namespace ll::train {

double learning_rate(const OptimizerConfig& c, int64_t step, int64_t total) {
  if (c.warmup_steps > 0 && step <= c.warmup_steps) return c.lr * double(step) / double(c.warmup_steps);
  if (c.schedule == LrSchedule::Constant) return c.lr;
  const double span = double(std::max<int64_t>(total - c.warmup_steps, 1));
  const double t = std::clamp(double(step - c.warmup_steps) / span, 0.0, 1.0);
  return c.end_lr + 0.5 * (c.lr - c.end_lr) * (1.0 + std::cos(M_PI * t));
}

AdamW::AdamW(const OptimizerConfig& c, const ParamLayout& layout)
    : m(layout.total, 0.0f), v(layout.total, 0.0f), c_(c), decay_(layout.total, 1) {
  if (!c.decay_norms)
    for (auto [b, e] : layout.norms) std::fill(decay_.begin() + b, decay_.begin() + e, 0);
}

double global_norm(const float* g, size_t n) {
  constexpr size_t kBlock = 1 << 16;
  const size_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> part(blocks, 0.0);
#pragma omp parallel for schedule(static)
  for (size_t b = 0; b < blocks; ++b) {
    double s = 0;
    for (size_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) s += double(g[i]) * g[i];
    part[b] = s;
  }
  double s = 0;
  for (double x : part) s += x;
  return std::sqrt(s);
}

double AdamW::update(float* p, float* g, int64_t step, double lr) {
  const size_t n = m.size();
  const double norm = global_norm(g, n);
  const float clip = (c_.clip > 0 && norm > c_.clip) ? float(c_.clip / norm) : 1.0f;
  const float b1 = float(c_.b1), b2 = float(c_.b2), eps = float(c_.eps), wd = float(c_.weight_decay);
  const float bc1 = float(1.0 - std::pow(c_.b1, double(step))), bc2 = float(1.0 - std::pow(c_.b2, double(step)));
  const float flr = float(lr);
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) {
    const float gi = g[i] * clip;
    g[i] = gi;
    m[i] = b1 * m[i] + (1.0f - b1) * gi;
    v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
    const float mh = m[i] / bc1, vh = v[i] / bc2;
    p[i] -= flr * (mh / (std::sqrt(vh) + eps) + (decay_[i] ? wd * p[i] : 0.0f));
  }
  return norm;
}

}  // namespace ll::train
