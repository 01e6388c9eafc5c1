#pragma once
// Token sampling: repetition penalty, greedy, temperature, top-k, top-p, min-p.
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace ll {

struct SamplingParams {
  float temperature = 0.0f;     // 0 => greedy (argmax, lowest index on ties)
  int top_k = 0;                // 0 => off
  float top_p = 1.0f;           // 1 => off
  float min_p = 0.0f;           // 0 => off (keep tokens with p >= min_p * p_max)
  float repeat_penalty = 1.0f;  // 1 => off; logit>0 ? logit/pen : logit*pen for recent tokens
  int repeat_last_n = 64;       // window of history penalised; 0 => off, -1 => whole history
  uint64_t seed = 0;
};

void validate(const SamplingParams& p);  // throws ll::Error naming the bad field

// Applies the repetition penalty in place: each distinct token among the last repeat_last_n
// entries of history is penalised once. Ids outside [0, logits.size()) are ignored.
void apply_repeat_penalty(std::vector<float>& logits, const std::vector<int>& history, const SamplingParams& p);

// The distribution sample() draws from when temperature > 0, as (token, probability) pairs sorted
// by probability descending then id ascending; probabilities sum to 1.
std::vector<std::pair<int, double>> sampling_distribution(const float* logits, int vocab,
                                                          const std::vector<int>& history, const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);  // validates p
  // Deterministic given the seed and the sequence of calls.
  int sample(const float* logits, int vocab, const std::vector<int>& history);
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

}  // namespace ll
