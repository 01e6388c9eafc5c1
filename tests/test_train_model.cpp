// The whole training network: gradients against finite differences (float64, crossbatch with
// negatives and stepping), and the crossbatch forward against the inference engine.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "model/session.h"
#include "train/network.h"
#include "train/params.h"

using namespace ll;
using namespace ll::train;

namespace {

ModelConfig odd_config() {
  ModelConfig c;
  c.vocab_size = 37;
  c.hidden_size = 12;
  c.num_attention_heads = 3;  // head_dim 4
  c.intermediate_size = 20;
  c.num_hidden_layers = 3;
  c.max_position_embeddings = 7;
  c.mem_layers = {1, 2};
  c.rms_norm_eps = 1e-6f;
  return c;
}

// Random parameters large enough that attention is far from uniform.
template <typename T>
std::vector<T> random_params(const ModelConfig& c, const ParamLayout& L, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> N(0.0, 1.0);
  std::vector<T> p(L.total);
  for (auto& x : p) x = T(N(rng) / std::sqrt(double(c.hidden_size)));
  for (auto [b, e] : L.norms)
    for (size_t i = b; i < e; ++i) p[i] = T(1.0 + 0.2 * N(rng));
  return p;
}

struct Tokens {
  std::vector<int> inputs, targets;
  std::vector<uint8_t> mask;
};

Tokens random_tokens(int n, int V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tokens t;
  for (int i = 0; i < n; ++i) {
    t.inputs.push_back(int(rng() % V));
    t.targets.push_back(int(rng() % V));
    t.mask.push_back(rng() % 4 != 0);
  }
  return t;
}

void check_model_gradients(ModelConfig c, const CrossBatch& cb, int B, uint64_t seed) {
  const int S = c.max_position_embeddings;
  Network<double> net(c, S);
  std::vector<double> p = random_params<double>(c, net.layout(), seed);
  const Tokens t = random_tokens(B * S, c.vocab_size, seed + 1);
  auto loss = [&] {
    net.forward(p.data(), t.inputs.data(), B, cb);
    return net.loss(t.targets.data(), t.mask.data()).loss_sum / B;
  };
  std::vector<double> g(p.size(), 0.0);
  net.forward(p.data(), t.inputs.data(), B, cb);
  net.backward(p.data(), t.targets.data(), t.mask.data(), 1.0 / B, g.data());
  double worst = 0, gmax = 0;
  const double h = 1e-5;
  for (size_t i = 0; i < p.size(); ++i) {
    const double keep = p[i];
    p[i] = keep + h;
    const double lp = loss();
    p[i] = keep - h;
    const double lm = loss();
    p[i] = keep;
    const double num = (lp - lm) / (2 * h);
    worst = std::max(worst, std::abs(num - g[i]) / std::max(1.0, std::abs(num)));
    gmax = std::max(gmax, std::abs(num));
  }
  std::printf(
      "  %zu params, k=%d r=%d stepping=%d, mem_positionals=%d tied=%d: max grad error %.1e (max |grad| %.2g)\n",
      p.size(), cb.k, cb.range, cb.stepping, c.mem_positionals, c.tie_word_embeddings, worst, gmax);
  EXPECT_LT(worst, 1e-7);
  EXPECT_GT(gmax, 1e-2);  // the check is not vacuous
}

}  // namespace

TEST(TrainModel, GradientsMatchFiniteDifferences) {
  ModelConfig c = odd_config();
  check_model_gradients(c, {2, 2, true, true}, 4, 1);  // positives, negatives, stepping
  check_model_gradients(c, {3, 4, false, true}, 6, 2);
  c.mem_positionals = false;
  c.tie_word_embeddings = true;
  c.mem_layers = {0};
  check_model_gradients(c, {2, 1, true, true}, 4, 3);
  c.mem_layers = {1};
  c.mem_num_attention_heads = 1;  // one wide memory head (head_dim 12) beside heads of 4
  check_model_gradients(c, {2, 2, true, true}, 4, 4);
}

namespace {

// Consistency with inference: one document of k·S tokens as one pack of k entries, crossbatch
// with positives only and no stepping (entry b sees all of b's earlier chunks), must give the
// logits of Session::forward over the whole document without cache: windows of S tokens, each
// attending to its own causal keys (RoPE 0..S-1) and, in memory layers, to the un-rotated keys of
// all earlier windows. float32 memory, so no bf16 rounding.
double consistency_error(ModelConfig c, int k, bool mem_positionals, double* sensitivity) {
  const int S = c.max_position_embeddings;
  c.last_context_length = 0;
  c.mem_dtype = MemDType::F32;
  c.mem_positionals = mem_positionals;
  Network<float> net(c, S);
  const std::vector<float> p = random_params<float>(c, net.layout(), 7);
  const Tokens t = random_tokens(k * S, c.vocab_size, 8);
  const CrossBatch cb{k, k - 1, false, true};
  const float* lt = net.forward(p.data(), t.inputs.data(), k, cb);
  std::vector<float> train_logits(lt, lt + size_t(k) * S * c.vocab_size);

  const Model m = unflatten(p.data(), c, net.layout());
  Session s(m);
  const std::vector<float> ref = s.forward(t.inputs, false, LogitsWanted::All);
  EXPECT_EQ(ref.size(), train_logits.size());
  double err = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, double(std::abs(ref[i] - train_logits[i])));
    scale = std::max(scale, double(std::abs(ref[i])));
  }
  // The same batch without crossbatch (r = 0) must differ after the first chunk: the check sees memory.
  const float* l0 = net.forward(p.data(), t.inputs.data(), k, CrossBatch{k, 0, false, true});
  *sensitivity = 0;
  for (size_t i = size_t(S) * c.vocab_size; i < ref.size(); ++i)
    *sensitivity = std::max(*sensitivity, double(std::abs(ref[i] - l0[i])));
  std::printf(
      "  k=%d S=%d mem_layers=%zu mem_positionals=%d: max |logit error| %.2e (logits up to %.2f; r=0 differs by "
      "%.2f)\n",
      k, S, c.mem_layers.size(), mem_positionals, err, scale, *sensitivity);
  return err;
}

}  // namespace

TEST(TrainModel, CrossbatchPositivesEqualInferenceWindows) {
  ModelConfig c;
  c.vocab_size = 101;
  c.hidden_size = 48;
  c.num_attention_heads = 4;
  c.intermediate_size = 72;
  c.num_hidden_layers = 4;
  c.max_position_embeddings = 16;
  c.mem_layers = {1, 3};
  double sens = 0;
  EXPECT_LT(consistency_error(c, 4, true, &sens), 1e-4);
  EXPECT_GT(sens, 1e-2);
  c.mem_layers = {0};
  c.max_position_embeddings = 9;
  EXPECT_LT(consistency_error(c, 3, false, &sens), 1e-4);
  EXPECT_GT(sens, 1e-2);
  c.mem_layers = {2};
  c.mem_num_attention_heads = 2;  // memory layer with 2 heads of 24 beside 4 heads of 12
  EXPECT_LT(consistency_error(c, 3, false, &sens), 1e-4);
  EXPECT_GT(sens, 1e-2);
}
