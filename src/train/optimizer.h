#pragma once
// AdamW as optax.chain(clip_by_global_norm, adamw) in the released JAX trainer (EasyLM):
// gradients are first clipped to a global L2 norm, then
//   m = b1·m + (1-b1)·g,  v = b2·v + (1-b2)·g²,  m̂ = m/(1-b1^t),  v̂ = v/(1-b2^t)
//   p -= lr_t · (m̂ / (sqrt(v̂) + eps) + wd · p)          (decoupled weight decay)
// Weight decay: every matrix (embeddings and lm_head included), but not the RMSNorm weights
// unless decay_norms: decaying a norm gain pulls it towards 0, which no LLaMA recipe wants. (The
// spec of the released JAX trainer does not say which parameters its optax mask covers.)
#include <cstdint>
#include <string>
#include <vector>

#include "train/params.h"

namespace ll::train {

enum class LrSchedule { Constant, Cosine };

struct OptimizerConfig {
  double lr = 3e-4;
  double end_lr = 0.0;  // cosine: the rate reached at the last step
  double b1 = 0.9, b2 = 0.95, eps = 1e-8;
  double weight_decay = 0.0;
  bool decay_norms = false;
  int64_t warmup_steps = 0;  // linear from lr/warmup to lr over steps 1..warmup
  LrSchedule schedule = LrSchedule::Cosine;
  double clip = 1.0;  // global gradient norm; 0 = no clipping
};

// Learning rate of optimizer step `step` (1-based) of `total` steps.
double learning_rate(const OptimizerConfig& c, int64_t step, int64_t total);

class AdamW {
 public:
  AdamW(const OptimizerConfig& c, const ParamLayout& layout);
  // Clips g in place, then updates p. Returns the global gradient norm before clipping.
  // Elementwise and with a fixed-order norm reduction: deterministic for any thread count.
  double update(float* p, float* g, int64_t step, double lr);

  std::vector<float> m, v;  // first and second moments (checkpointed)

 private:
  OptimizerConfig c_;
  std::vector<uint8_t> decay_;  // per parameter: 1 = weight decay applies
};

// sqrt(Σ g²) in float64 over fixed-size blocks summed in order.
double global_norm(const float* g, size_t n);

}  // namespace ll::train
