#include "model/config.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "util/error.h"

namespace ll {

using json = nlohmann::json;

const char* mem_dtype_name(MemDType t) {
  switch (t) {
    case MemDType::F32: return "float32";
    case MemDType::BF16: return "bfloat16";
    case MemDType::F16: return "float16";
    case MemDType::Q8: return "q8";
  }
  return "?";
}

MemDType parse_mem_dtype(const std::string& s, const std::string& source) {
  if (s == "bfloat16") return MemDType::BF16;
  if (s == "float32") return MemDType::F32;
  if (s == "float16") return MemDType::F16;
  if (s == "q8") return MemDType::Q8;
  throw Error(source + ": mem_dtype '" + s + "' is not one of bfloat16, float32, float16, q8");
}

bool ModelConfig::is_mem_layer(int layer) const {
  return std::find(mem_layers.begin(), mem_layers.end(), layer) != mem_layers.end();
}

int ModelConfig::heads_in(int layer) const { return is_mem_layer(layer) ? mem_heads() : num_attention_heads; }

namespace {

template <typename T>
void read_field(const json& j, const char* key, T& out, const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;  // absent: keep the official default
  try {
    out = it->get<T>();
  } catch (const json::exception& e) {
    throw Error(source + ": field '" + key + "' has the wrong type (" + it->dump() + ")");
  }
}

}  // namespace

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(source + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw Error(source + ": expected a JSON object");
  ModelConfig c;
  read_field(j, "vocab_size", c.vocab_size, source);
  read_field(j, "hidden_size", c.hidden_size, source);
  read_field(j, "intermediate_size", c.intermediate_size, source);
  read_field(j, "num_hidden_layers", c.num_hidden_layers, source);
  read_field(j, "num_attention_heads", c.num_attention_heads, source);
  read_field(j, "max_position_embeddings", c.max_position_embeddings, source);
  read_field(j, "rms_norm_eps", c.rms_norm_eps, source);
  read_field(j, "rope_theta", c.rope_theta, source);
  read_field(j, "bos_token_id", c.bos_token_id, source);
  read_field(j, "eos_token_id", c.eos_token_id, source);
  read_field(j, "pad_token_id", c.pad_token_id, source);
  read_field(j, "tie_word_embeddings", c.tie_word_embeddings, source);
  read_field(j, "last_context_length", c.last_context_length, source);
  read_field(j, "mem_layers", c.mem_layers, source);
  read_field(j, "mem_positionals", c.mem_positionals, source);
  read_field(j, "hidden_act", c.hidden_act, source);
  read_field(j, "mem_num_attention_heads", c.mem_num_attention_heads, source);
  std::string mem_dtype = "bfloat16";
  read_field(j, "mem_dtype", mem_dtype, source);
  c.mem_dtype = parse_mem_dtype(mem_dtype, source);
  if (j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null() &&
      j["num_key_value_heads"] != j.value("num_attention_heads", c.num_attention_heads))
    throw Error(source + ": num_key_value_heads != num_attention_heads (grouped-query attention) is not supported");
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
    throw Error(source + ": rope_scaling must be null (the official code rejects it too)");
  // mem_attention_grouping and torch_attention change only how the official code batches its
  // work, not the result; our attention is always blocked, so they are accepted and ignored.
  c.validate(source);
  return c;
}

ModelConfig ModelConfig::from_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open config");
  std::stringstream ss;
  ss << f.rdbuf();
  return from_json_text(ss.str(), path);
}

void ModelConfig::validate(const std::string& source) const {
  auto positive = [&](const char* name, long v) {
    if (v <= 0) throw Error(source + ": field '" + name + "' must be positive, got " + std::to_string(v));
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("max_position_embeddings", max_position_embeddings);
  if (hidden_size % num_attention_heads != 0)
    throw Error(source + ": hidden_size " + std::to_string(hidden_size) +
                " is not divisible by num_attention_heads " + std::to_string(num_attention_heads));
  if (head_dim() % 2 != 0) throw Error(source + ": head_dim must be even for RoPE");
  if (mem_num_attention_heads < 0)
    throw Error(source + ": field 'mem_num_attention_heads' must be >= 0, got " + std::to_string(mem_num_attention_heads));
  if (hidden_size % mem_heads() != 0)
    throw Error(source + ": hidden_size " + std::to_string(hidden_size) +
                " is not divisible by mem_num_attention_heads " + std::to_string(mem_heads()));
  if (mem_heads() != num_attention_heads && mem_positionals)
    throw Error(source + ": mem_num_attention_heads " + std::to_string(mem_heads()) +
                " differs from num_attention_heads, which needs mem_positionals false");
  if (last_context_length < 0) throw Error(source + ": field 'last_context_length' must be >= 0");
  if (hidden_act != "silu") throw Error(source + ": hidden_act '" + hidden_act + "' is not supported (only silu)");
  for (int l : mem_layers)
    if (l < 0 || l >= num_hidden_layers)
      throw Error(source + ": mem_layers entry " + std::to_string(l) + " is outside [0, " +
                  std::to_string(num_hidden_layers) + ")");
  if (!(rms_norm_eps > 0)) throw Error(source + ": field 'rms_norm_eps' must be positive");
  if (!(rope_theta > 0)) throw Error(source + ": field 'rope_theta' must be positive");
}

std::string ModelConfig::to_json() const {
  json j = {
      {"architectures", {"LongLlamaForCausalLM"}},
      // As in the released checkpoints: with the official configuration_longllama.py and
      // modeling_longllama.py beside it, transformers loads the directory (trust_remote_code).
      {"auto_map",
       {{"AutoConfig", "configuration_longllama.LongLlamaConfig"},
        {"AutoModelForCausalLM", "modeling_longllama.LongLlamaForCausalLM"}}},
      {"model_type", "longllama"},
      {"torch_dtype", "float32"},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"hidden_act", hidden_act},
      {"max_position_embeddings", max_position_embeddings},
      {"initializer_range", 0.02},
      {"rms_norm_eps", rms_norm_eps},
      {"use_cache", true},
      {"pad_token_id", pad_token_id},
      {"bos_token_id", bos_token_id},
      {"eos_token_id", eos_token_id},
      {"tie_word_embeddings", tie_word_embeddings},
      {"rope_theta", rope_theta},
      {"last_context_length", last_context_length},
      {"mem_layers", mem_layers},
      {"mem_positionals", mem_positionals},
      {"mem_dtype", mem_dtype_name(mem_dtype)},
      {"mem_attention_grouping", nullptr},
      {"torch_attention", false},
      {"gradient_checkpoint_every_ith", 1},
  };
  if (mem_heads() != num_attention_heads) j["mem_num_attention_heads"] = mem_num_attention_heads;
  return j.dump(2) + "\n";
}

}  // namespace ll
