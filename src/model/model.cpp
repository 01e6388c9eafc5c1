#include "model/model.h"

#include <filesystem>
#include <functional>
#include <random>
#include <set>

#include "io/tensor_store.h"
#include "util/error.h"
#include "util/half.h"

namespace fs = std::filesystem;

namespace ll {

namespace {

// Every tensor of a model in HF naming, with its shape and where it lives in Model.
void for_each_tensor(Model& m, const std::function<void(const std::string&, std::vector<int64_t>,
                                                        std::vector<float>&)>& fn) {
  const ModelConfig& c = m.config;
  const int64_t d = c.hidden_size, f = c.intermediate_size, v = c.vocab_size;
  fn("model.embed_tokens.weight", {v, d}, m.embed);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& L = m.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    fn(p + "self_attn.q_proj.weight", {d, d}, L.wq);
    fn(p + "self_attn.k_proj.weight", {d, d}, L.wk);
    fn(p + "self_attn.v_proj.weight", {d, d}, L.wv);
    fn(p + "self_attn.o_proj.weight", {d, d}, L.wo);
    fn(p + "mlp.gate_proj.weight", {f, d}, L.w_gate);
    fn(p + "mlp.up_proj.weight", {f, d}, L.w_up);
    fn(p + "mlp.down_proj.weight", {d, f}, L.w_down);
    fn(p + "input_layernorm.weight", {d}, L.attn_norm);
    fn(p + "post_attention_layernorm.weight", {d}, L.ffn_norm);
  }
  fn("model.norm.weight", {d}, m.final_norm);
  if (!c.tie_word_embeddings) fn("lm_head.weight", {v, d}, m.lm_head);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Model Model::load(const std::string& dir) {
  if (!fs::is_directory(dir)) throw Error(dir + ": not a model directory");
  Model m;
  m.source = dir;
  m.config = ModelConfig::from_file((fs::path(dir) / "config.json").string());
  m.layers.resize(m.config.num_hidden_layers);
  TensorStore store = read_checkpoint_dir(dir);

  std::set<std::string> used;
  for_each_tensor(m, [&](const std::string& name, std::vector<int64_t> shape, std::vector<float>& dst) {
    const TensorRef* t = store.find(name);
    if (!t) throw Error(dir + ": tensor '" + name + "' is missing from the checkpoint");
    if (t->dtype != DType::F32 && t->dtype != DType::BF16 && t->dtype != DType::F16)
      throw Error(t->file + ": tensor '" + name + "' has dtype " + dtype_name(t->dtype) +
                  "; expected F32, BF16 or F16");
    if (t->shape != shape)
      throw Error(t->file + ": tensor '" + name + "' has shape " + shape_str(t->shape) + ", config.json implies " +
                  shape_str(shape));
    dst.resize(t->numel());
    to_f32(*t, dst.data());
    used.insert(name);
  });
  for (const auto& [name, t] : store.all()) {
    if (used.count(name) || ends_with(name, ".rotary_emb.inv_freq")) continue;
    if (name == "lm_head.weight" && m.config.tie_word_embeddings) continue;
    throw Error(t.file + ": unexpected tensor '" + name + "' (not part of a LongLLaMA model with this config.json)");
  }
  fs::path tok = fs::path(dir) / "tokenizer.model";
  if (fs::exists(tok)) m.tokenizer_path = tok.string();
  return m;
}

Model Model::random(const ModelConfig& config, uint64_t seed) {
  config.validate("random model config");
  Model m;
  m.config = config;
  m.layers.resize(config.num_hidden_layers);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for_each_tensor(m, [&](const std::string& name, std::vector<int64_t> shape, std::vector<float>& dst) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    dst.resize(n);
    const bool norm = shape.size() == 1;
    for (float& x : dst) x = norm ? 1.0f : normal(rng);
  });
  return m;
}

void Model::save(const std::string& dir, bool bf16) const {
  fs::create_directories(dir);
  Model& self = const_cast<Model&>(*this);  // for_each_tensor only reads here
  std::vector<std::vector<uint16_t>> halves;
  std::vector<TensorToWrite> out;
  for_each_tensor(self, [&](const std::string& name, std::vector<int64_t> shape, std::vector<float>& src) {
    if (bf16) {
      auto& h = halves.emplace_back(src.size());
      for (size_t i = 0; i < src.size(); ++i) h[i] = f32_to_bf16(src[i]);
      out.push_back({name, DType::BF16, shape, h.data(), h.size() * 2});
    } else {
      out.push_back({name, DType::F32, shape, src.data(), src.size() * 4});
    }
  });
  write_safetensors((fs::path(dir) / "model.safetensors").string(), out, {{"format", "pt"}});
  write_file_atomic((fs::path(dir) / "config.json").string(), config.to_json());
}

size_t Model::parameter_count() const {
  size_t n = embed.size() + final_norm.size() + lm_head.size();
  for (const auto& L : layers)
    n += L.attn_norm.size() + L.wq.size() + L.wk.size() + L.wv.size() + L.wo.size() + L.ffn_norm.size() +
         L.w_gate.size() + L.w_up.size() + L.w_down.size();
  return n;
}

}  // namespace ll
