#pragma once
// Growing a trained model wider without changing what it computes (train config "init_widen"):
// hidden size, FFN size and every layer's head count (memory layers' too) become k times larger,
// the head size stays. The new residual dimensions start at zero: every writer into the residual
// stream (embedding columns, o_proj/down_proj rows) is zero there, and the RMSNorm weights are
// scaled by 1/sqrt(k) (a norm over k*d dimensions of which (k-1)*d are zero divides by a root
// mean square sqrt(k) times smaller). New heads and FFN units read with N(0, std) weights and
// write through zero columns, so they change nothing until training grows those columns.
// Only rms_norm_eps's share of the norm differs (eps instead of eps/k).
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace ll::train {

// The random numbers of CPython's `random.Random(seed)` (MT19937 seeded by init_by_array with the
// seed's 32-bit words, random() from two draws, gauss() by Box-Muller with its cached second
// value). The dictionary recipe's first widened model was made by a Python script (session 27);
// drawing the same numbers lets the recipe's config reproduce it bit for bit.
class PyRandom {
 public:
  explicit PyRandom(uint64_t seed);               // random.Random(seed), seed >= 0
  explicit PyRandom(const std::vector<uint32_t>& key);  // MT19937's init_by_array(key)
  uint32_t next_u32();
  double random();                     // [0, 1), 53 bits
  double gauss(double mu, double sigma);

 private:
  void twist();
  uint32_t mt_[624];
  int index_ = 624;
  bool has_next_ = false;
  double next_gauss_ = 0;
};

struct WidenOptions {
  int factor = 2;
  double std = 0.02;  // of the new heads' and units' input weights and the LM head's new columns
  uint64_t seed = 0;
};

// Draws happen tensor by tensor in the order of their Hugging Face names (sorted as strings), row
// by row over the widened matrix, one per new entry that reads (q/k/v, gate/up: new rows and new
// columns; lm_head: new columns).
Model widen_model(const Model& m, const WidenOptions& o);
// The config of widen_model's result.
ModelConfig widened_config(const ModelConfig& c, int factor);

}  // namespace ll::train
