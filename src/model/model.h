#pragma once
// A loaded LongLLaMA model: its configuration and float32 weights (upcast from bf16/f16 at load,
// as the official examples run with torch_dtype=float32).
#include <string>
#include <vector>

#include "model/config.h"

namespace ll {

class TensorStore;
struct TensorRef;

// The tensors of a LongLLaMA checkpoint in Hugging Face naming, in file order.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<TensorSpec> tensor_specs(const ModelConfig& c);
// Finds every tensor of tensor_specs(c) in the store and checks its dtype (F32/F16/BF16, or any
// weight type when allow_quantized) and shape; rejects tensors that do not belong
// (`*.rotary_emb.inv_freq` buffers are ignored). Errors name the file and the tensor.
std::vector<const TensorRef*> match_checkpoint(const TensorStore& store, const ModelConfig& c,
                                               const std::string& source, bool allow_quantized = false);

struct LayerWeights {
  std::vector<float> attn_norm;                  // [d]
  std::vector<float> wq, wk, wv, wo;             // [d, d]
  std::vector<float> ffn_norm;                   // [d]
  std::vector<float> w_gate, w_up;               // [ffn, d]
  std::vector<float> w_down;                     // [d, ffn]
};

struct Model {
  ModelConfig config;
  std::vector<float> embed;       // [vocab, d]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [d]
  std::vector<float> lm_head;     // [vocab, d] (empty when tied: use embed)
  std::string source;             // directory it came from
  std::string tokenizer_path;     // tokenizer.model inside the directory, "" if absent

  const float* output_weights() const { return lm_head.empty() ? embed.data() : lm_head.data(); }

  // Loads a Hugging Face model directory (config.json + weights). Every tensor's name, dtype and
  // shape is checked against the config; `*.rotary_emb.inv_freq` buffers are ignored.
  static Model load(const std::string& dir);
  // Random weights (normal, std 0.02 like initializer_range; norms = 1), deterministic in seed.
  static Model random(const ModelConfig& config, uint64_t seed);
  // Writes config.json + model.safetensors (bf16 or f32) atomically into dir.
  void save(const std::string& dir, bool bf16) const;

  size_t parameter_count() const;
};

// The parameter vectors of m, in tensor_specs(m.config) order (lm_head only when untied).
std::vector<std::vector<float>*> parameter_vectors(Model& m);

}  // namespace ll
