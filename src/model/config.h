#pragma once
// LongLLaMA model configuration: the fields of the Hugging Face config.json, with the official
// defaults (configuration_longllama.py) where a field is absent.
#include <string>
#include <vector>

namespace ll {

// How memory keys/values are stored. BF16/F16/F32 are torch dtypes (the official `mem_dtype`);
// Q8 is this engine's own: each (token, head) row as int8 with one float scale (max|x|/127),
// half the bytes of bf16.
enum class MemDType { F32, BF16, F16, Q8 };

struct ModelConfig {
  int vocab_size = 32000;
  int hidden_size = 4096;
  int intermediate_size = 11008;
  int num_hidden_layers = 32;
  int num_attention_heads = 32;
  int max_position_embeddings = 2048;  // window length W and the local-cache limit
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  int bos_token_id = 1;
  int eos_token_id = 2;
  int pad_token_id = 0;
  bool tie_word_embeddings = false;
  int last_context_length = 1024;  // trailing tokens of a call kept in the local cache
  std::vector<int> mem_layers;     // 0-based indices of memory layers
  bool mem_positionals = true;     // false: memory layers use no RoPE at all
  MemDType mem_dtype = MemDType::BF16;
  std::string hidden_act = "silu";
  // This engine's extension (not in the official config): the memory layers' head count, so a
  // memory layer can score its keys with fewer, wider heads than the others. 0 = num_attention_heads.
  // A different count needs mem_positionals false (one RoPE table serves the other layers).
  int mem_num_attention_heads = 0;

  int head_dim() const { return hidden_size / num_attention_heads; }  // of the layers that are not memory layers
  bool is_mem_layer(int layer) const;
  int heads_in(int layer) const;  // attention heads of that layer
  int head_dim_in(int layer) const { return hidden_size / heads_in(layer); }
  int mem_heads() const { return mem_num_attention_heads > 0 ? mem_num_attention_heads : num_attention_heads; }

  // Throws ll::Error naming `source` and the field.
  static ModelConfig from_json_text(const std::string& text, const std::string& source);
  static ModelConfig from_file(const std::string& path);
  std::string to_json() const;  // HF-style config.json, loadable by the official code
  void validate(const std::string& source) const;
};

const char* mem_dtype_name(MemDType t);
MemDType parse_mem_dtype(const std::string& s, const std::string& source);

}  // namespace ll
