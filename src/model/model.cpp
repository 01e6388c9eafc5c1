#include "model/model.h"

#include <filesystem>
#include <random>
#include <set>

#include "io/tensor_store.h"
#include "util/error.h"
#include "util/half.h"

namespace fs = std::filesystem;

namespace ll {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

// The parameter vectors of m, in tensor_specs order.
std::vector<std::vector<float>*> parameter_vectors(Model& m) {
  std::vector<std::vector<float>*> r = {&m.embed};
  for (auto& L : m.layers)
    for (auto* v : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down, &L.attn_norm, &L.ffn_norm})
      r.push_back(v);
  r.push_back(&m.final_norm);
  if (!m.config.tie_word_embeddings) r.push_back(&m.lm_head);
  return r;
}

std::vector<TensorSpec> tensor_specs(const ModelConfig& c) {
  const int64_t d = c.hidden_size, f = c.intermediate_size, v = c.vocab_size;
  std::vector<TensorSpec> r = {{"model.embed_tokens.weight", {v, d}}};
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    r.push_back({p + "self_attn.q_proj.weight", {d, d}});
    r.push_back({p + "self_attn.k_proj.weight", {d, d}});
    r.push_back({p + "self_attn.v_proj.weight", {d, d}});
    r.push_back({p + "self_attn.o_proj.weight", {d, d}});
    r.push_back({p + "mlp.gate_proj.weight", {f, d}});
    r.push_back({p + "mlp.up_proj.weight", {f, d}});
    r.push_back({p + "mlp.down_proj.weight", {d, f}});
    r.push_back({p + "input_layernorm.weight", {d}});
    r.push_back({p + "post_attention_layernorm.weight", {d}});
  }
  r.push_back({"model.norm.weight", {d}});
  if (!c.tie_word_embeddings) r.push_back({"lm_head.weight", {v, d}});
  return r;
}

std::vector<const TensorRef*> match_checkpoint(const TensorStore& store, const ModelConfig& c,
                                               const std::string& source, bool allow_quantized) {
  std::vector<const TensorRef*> refs;
  std::set<std::string> used;
  for (const TensorSpec& spec : tensor_specs(c)) {
    const TensorRef* t = store.find(spec.name);
    if (!t) throw Error(source + ": tensor '" + spec.name + "' is missing from the checkpoint");
    const bool plain = t->dtype == DType::F32 || t->dtype == DType::BF16 || t->dtype == DType::F16;
    const bool quant = allow_quantized && spec.shape.size() == 2 && dtype_is_quantized(t->dtype);
    if (!plain && !quant)
      throw Error(t->file + ": tensor '" + spec.name + "' has dtype " + dtype_name(t->dtype) + "; expected " +
                  (allow_quantized ? "F32, BF16, F16, Q8_0 or Q4_0" : "F32, BF16 or F16"));
    if (t->shape != spec.shape)
      throw Error(t->file + ": tensor '" + spec.name + "' has shape " + shape_str(t->shape) + ", config.json implies " +
                  shape_str(spec.shape));
    refs.push_back(t);
    used.insert(spec.name);
  }
  for (const auto& [name, t] : store.all()) {
    if (used.count(name) || ends_with(name, ".rotary_emb.inv_freq")) continue;
    if (name == "lm_head.weight" && c.tie_word_embeddings) continue;
    throw Error(t.file + ": unexpected tensor '" + name + "' (not part of a LongLLaMA model with this config.json)");
  }
  return refs;
}

Model Model::load(const std::string& dir) {
  if (!fs::is_directory(dir)) throw Error(dir + ": not a model directory");
  Model m;
  m.source = dir;
  m.config = ModelConfig::from_file((fs::path(dir) / "config.json").string());
  m.layers.resize(m.config.num_hidden_layers);
  TensorStore store = read_checkpoint_dir(dir);
  const auto refs = match_checkpoint(store, m.config, dir);
  const auto vecs = parameter_vectors(m);
  for (size_t i = 0; i < refs.size(); ++i) *vecs[i] = to_f32(*refs[i]);
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
  const auto specs = tensor_specs(config);
  const auto vecs = parameter_vectors(m);
  for (size_t i = 0; i < specs.size(); ++i) {
    int64_t n = 1;
    for (int64_t s : specs[i].shape) n *= s;
    vecs[i]->resize(n);
    const bool norm = specs[i].shape.size() == 1;
    for (float& x : *vecs[i]) x = norm ? 1.0f : normal(rng);
  }
  return m;
}

void Model::save(const std::string& dir, bool bf16) const {
  fs::create_directories(dir);
  const auto specs = tensor_specs(config);
  const auto vecs = parameter_vectors(const_cast<Model&>(*this));  // only read here
  std::vector<std::vector<uint16_t>> halves(specs.size());
  std::vector<TensorToWrite> out;
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::vector<float>& src = *vecs[i];
    if (bf16) {
      auto& h = halves[i];
      h.resize(src.size());
      for (size_t j = 0; j < src.size(); ++j) h[j] = f32_to_bf16(src[j]);
      out.push_back({specs[i].name, DType::BF16, specs[i].shape, h.data(), h.size() * 2});
    } else {
      out.push_back({specs[i].name, DType::F32, specs[i].shape, src.data(), src.size() * 4});
    }
  }
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
