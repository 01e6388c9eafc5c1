#include "train/params.h"

#include <cstring>
#include <functional>

namespace ll::train {

ParamLayout::ParamLayout(const ModelConfig& c) {
  const size_t d = c.hidden_size, f = c.intermediate_size, V = c.vocab_size;
  auto take = [&](size_t n) {
    const size_t at = total;
    total += n;
    return at;
  };
  embed = take(V * d);
  layers.resize(c.num_hidden_layers);
  for (auto& L : layers) {
    L.attn_norm = take(d);
    norms.push_back({L.attn_norm, L.attn_norm + d});
    L.wq = take(d * d);
    L.wk = take(d * d);
    L.wv = take(d * d);
    L.wo = take(d * d);
    L.ffn_norm = take(d);
    norms.push_back({L.ffn_norm, L.ffn_norm + d});
    L.w_gate = take(f * d);
    L.w_up = take(f * d);
    L.w_down = take(d * f);
  }
  final_norm = take(d);
  norms.push_back({final_norm, final_norm + d});
  lm_head = c.tie_word_embeddings ? embed : take(V * d);
}

namespace {
// Visits every (model tensor, flat offset) pair.
void each(const Model& m, const ParamLayout& L, const std::function<void(const std::vector<float>&, size_t)>& fn) {
  fn(m.embed, L.embed);
  for (size_t i = 0; i < L.layers.size(); ++i) {
    const LayerWeights& w = m.layers[i];
    const LayerOffsets& o = L.layers[i];
    fn(w.attn_norm, o.attn_norm);
    fn(w.wq, o.wq);
    fn(w.wk, o.wk);
    fn(w.wv, o.wv);
    fn(w.wo, o.wo);
    fn(w.ffn_norm, o.ffn_norm);
    fn(w.w_gate, o.w_gate);
    fn(w.w_up, o.w_up);
    fn(w.w_down, o.w_down);
  }
  fn(m.final_norm, L.final_norm);
  if (!m.config.tie_word_embeddings) fn(m.lm_head, L.lm_head);
}
}  // namespace

std::vector<float> flatten(const Model& m, const ParamLayout& layout) {
  std::vector<float> p(layout.total);
  each(m, layout, [&](const std::vector<float>& t, size_t at) { std::memcpy(&p[at], t.data(), t.size() * 4); });
  return p;
}

Model unflatten(const float* p, const ModelConfig& c, const ParamLayout& layout) {
  Model m;
  m.config = c;
  const size_t d = c.hidden_size, f = c.intermediate_size, V = c.vocab_size;
  m.embed.resize(V * d);
  m.final_norm.resize(d);
  if (!c.tie_word_embeddings) m.lm_head.resize(V * d);
  m.layers.resize(c.num_hidden_layers);
  for (auto& w : m.layers) {
    w.attn_norm.resize(d);
    w.ffn_norm.resize(d);
    for (auto* t : {&w.wq, &w.wk, &w.wv, &w.wo}) t->resize(d * d);
    for (auto* t : {&w.w_gate, &w.w_up, &w.w_down}) t->resize(f * d);
  }
  each(m, layout, [&](const std::vector<float>& t, size_t at) {
    std::memcpy(const_cast<float*>(t.data()), p + at, t.size() * 4);
  });
  return m;
}

}  // namespace ll::train
