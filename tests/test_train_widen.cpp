// init_widen (train/widen.h): the widened model computes what the init computed, and its random
// numbers are CPython's, so the session-27 model made by a Python script is reproduced.
#include <gtest/gtest.h>

#include <cmath>

#include "model/session.h"
#include "train/widen.h"

using namespace ll;
using namespace ll::train;

// The published MT19937 check vector (mt19937ar.out: init_by_array({0x123, 0x234, 0x345, 0x456}))
// and CPython 3.11's random.Random(27): gauss(0, 0.02) three times, then random().
TEST(Widen, PyRandomMatchesMt19937AndCPython) {
  PyRandom mt(std::vector<uint32_t>{0x123, 0x234, 0x345, 0x456});
  const uint32_t first[] = {1067595299u, 955945823u, 477289528u, 4107218783u, 4228976476u};
  for (uint32_t v : first) EXPECT_EQ(mt.next_u32(), v);
  PyRandom py(27);
  EXPECT_DOUBLE_EQ(py.gauss(0.0, 0.02), -0.018513319466646465);
  EXPECT_DOUBLE_EQ(py.gauss(0.0, 0.02), -0.02498190778709492);  // the cached second value
  EXPECT_DOUBLE_EQ(py.gauss(0.0, 0.02), 0.012747212561036177);
  EXPECT_DOUBLE_EQ(py.random(), 0.0653692353844999);
}

namespace {

ModelConfig small_shape(bool tied, int mem_heads) {
  ModelConfig c;
  c.vocab_size = 40;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.max_position_embeddings = 16;
  c.last_context_length = 8;
  c.mem_layers = {1};
  c.mem_positionals = mem_heads == 0;
  c.mem_num_attention_heads = mem_heads;
  c.mem_dtype = MemDType::F32;
  c.tie_word_embeddings = tied;
  // A random model's hidden states are tiny (embedding std 0.02), so the default eps (1e-6) would
  // be ~0.1% of their mean square and its 1/k share after widening would show in the logits.
  c.rms_norm_eps = 1e-12f;
  return c;
}

std::vector<float> logits_of(const Model& m, const std::vector<int>& ids) {
  Session s(m);
  return s.forward(ids, true, LogitsWanted::All);
}

}  // namespace

// Windows of 16 over 70 tokens: the memory layer reads four flushed windows, and the logits of
// every position match the narrow model's (only rms_norm_eps's share of the norms differs).
TEST(Widen, PreservesTheFunction) {
  std::vector<int> ids;
  for (int i = 0; i < 70; ++i) ids.push_back(int((i * 7 + 3) % 40));
  for (const auto& [tied, mem_heads, k] : {std::tuple{false, 0, 2}, std::tuple{true, 1, 3}, std::tuple{false, 2, 2}}) {
    const Model m = Model::random(small_shape(tied, mem_heads), 21);
    const Model w = widen_model(m, {k, 0.05, 7});
    ASSERT_EQ(w.config.hidden_size, 32 * k);
    ASSERT_EQ(w.config.head_dim(), m.config.head_dim());
    EXPECT_EQ(w.config.mem_heads(), m.config.mem_heads() * k);
    const auto a = logits_of(m, ids), b = logits_of(w, ids);
    ASSERT_EQ(a.size(), b.size());
    double worst = 0, scale = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      worst = std::max(worst, double(std::fabs(a[i] - b[i])));
      scale = std::max(scale, double(std::fabs(a[i])));
    }
    EXPECT_LT(worst, 1e-4 * scale) << "tied " << tied << " mem heads " << mem_heads << " k " << k;
  }
}

// Where the new numbers go: new heads and units read with N(0, std) and write through zeros;
// the embedding writes nothing into the new residual dimensions; norms are scaled by 1/sqrt(k).
TEST(Widen, NewEntriesFollowTheRules) {
  const Model m = Model::random(small_shape(false, 0), 3);
  const Model w = widen_model(m, {2, 0.05, 11});
  const int d = 32, D = 64, F = 48, F2 = 96;
  const LayerWeights &a = m.layers[0], &b = w.layers[0];
  double sq = 0;
  size_t n = 0;
  for (int r = 0; r < D; ++r)
    for (int c = 0; c < D; ++c) {
      const float v = b.wq[size_t(r * D + c)];
      if (r < d && c < d) {
        ASSERT_EQ(v, a.wq[size_t(r * d + c)]);
      } else {
        sq += double(v) * v;
        ++n;
      }
      if (r >= d || c >= d) {
        ASSERT_EQ(b.wo[size_t(r * D + c)], 0.0f) << r << "," << c;
      }
    }
  EXPECT_NEAR(std::sqrt(sq / double(n)), 0.05, 0.005);
  for (int r = d; r < D; ++r)
    for (int c = 0; c < F2; ++c) ASSERT_EQ(b.w_down[size_t(r * F2 + c)], 0.0f);
  for (int r = 0; r < d; ++r)
    for (int c = F; c < F2; ++c) ASSERT_EQ(b.w_down[size_t(r * F2 + c)], 0.0f);
  for (int t = 0; t < 40; ++t)
    for (int c = d; c < D; ++c) ASSERT_EQ(w.embed[size_t(t * D + c)], 0.0f);
  for (int j = 0; j < D; ++j)
    EXPECT_FLOAT_EQ(b.attn_norm[size_t(j)], j < d ? float(a.attn_norm[size_t(j)] / std::sqrt(2.0)) : float(1 / std::sqrt(2.0)));
  EXPECT_THROW(widen_model(m, {1, 0.05, 1}), Error);
}
