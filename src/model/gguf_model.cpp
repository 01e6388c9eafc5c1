#include "model/gguf_model.h"

#include <cstdio>
#include <cstring>
#include <filesystem>

#include "model/model.h"
#include "ops/quant.h"
#include "util/error.h"

namespace fs = std::filesystem;

namespace ll {

namespace {

constexpr const char* kArch = "longllama";

uint32_t file_type(DType t) {  // llama.cpp's general.file_type values
  switch (t) {
    case DType::F32: return 0;
    case DType::F16: return 1;
    case DType::Q4_0: return 2;
    case DType::Q8_0: return 7;
    case DType::BF16: return 32;
    default: return 0;
  }
}

std::string key(const std::string& k) { return std::string(kArch) + "." + k; }

}  // namespace

std::map<std::string, GGUFValue> gguf_metadata(const ModelConfig& c, const std::string& name, DType main_type,
                                               const Tokenizer* tok) {
  std::map<std::string, GGUFValue> m;
  m["general.architecture"] = GGUFValue::string(kArch);
  m["general.name"] = GGUFValue::string(name);
  m["general.file_type"] = GGUFValue::u32(file_type(main_type));
  m[key("vocab_size")] = GGUFValue::u32(uint32_t(c.vocab_size));
  m[key("context_length")] = GGUFValue::u32(uint32_t(c.max_position_embeddings));
  m[key("embedding_length")] = GGUFValue::u32(uint32_t(c.hidden_size));
  m[key("block_count")] = GGUFValue::u32(uint32_t(c.num_hidden_layers));
  m[key("feed_forward_length")] = GGUFValue::u32(uint32_t(c.intermediate_size));
  m[key("attention.head_count")] = GGUFValue::u32(uint32_t(c.num_attention_heads));
  m[key("attention.head_count_kv")] = GGUFValue::u32(uint32_t(c.num_attention_heads));
  m[key("attention.layer_norm_rms_epsilon")] = GGUFValue::f32(c.rms_norm_eps);
  m[key("rope.freq_base")] = GGUFValue::f32(c.rope_theta);
  m[key("tie_word_embeddings")] = GGUFValue::boolean(c.tie_word_embeddings);
  m[key("last_context_length")] = GGUFValue::u32(uint32_t(c.last_context_length));
  m[key("mem_layers")] = GGUFValue::i32_array(std::vector<int32_t>(c.mem_layers.begin(), c.mem_layers.end()));
  m[key("mem_positionals")] = GGUFValue::boolean(c.mem_positionals);
  m[key("mem_dtype")] = GGUFValue::string(mem_dtype_name(c.mem_dtype));
  if (c.mem_heads() != c.num_attention_heads)
    m[key("mem_attention.head_count")] = GGUFValue::u32(uint32_t(c.mem_heads()));
  m["tokenizer.ggml.bos_token_id"] = GGUFValue::u32(uint32_t(c.bos_token_id));
  m["tokenizer.ggml.eos_token_id"] = GGUFValue::u32(uint32_t(c.eos_token_id));
  m["tokenizer.ggml.padding_token_id"] = GGUFValue::u32(uint32_t(c.pad_token_id));
  if (tok) {
    // llama.cpp's vocabulary arrays, plus the SentencePiece model itself so tokenization here
    // is exactly SentencePiece's.
    std::vector<std::string> pieces;
    std::vector<float> scores;
    std::vector<int32_t> types;
    for (int i = 0; i < tok->vocab_size(); ++i) {
      pieces.push_back(tok->piece(i));
      scores.push_back(tok->score(i));
      types.push_back(tok->token_type(i));
    }
    m["tokenizer.ggml.model"] = GGUFValue::string("llama");
    m["tokenizer.ggml.tokens"] = GGUFValue::string_array(pieces);
    m["tokenizer.ggml.scores"] = GGUFValue::f32_array(scores);
    m["tokenizer.ggml.token_type"] = GGUFValue::i32_array(types);
    m["tokenizer.ggml.unknown_token_id"] = GGUFValue::u32(uint32_t(tok->unk()));
    m["tokenizer.ggml.sentencepiece_model"] = GGUFValue::u8_array(tok->serialized());
  }
  return m;
}

ModelConfig config_from_gguf(const GGUFFile& f) {
  if (!f.has("general.architecture") || f.get_string("general.architecture") != kArch)
    throw Error(f.path + ": general.architecture is not '" + std::string(kArch) + "'");
  ModelConfig c;
  c.vocab_size = int(f.get_int(key("vocab_size")));
  c.max_position_embeddings = int(f.get_int(key("context_length")));
  c.hidden_size = int(f.get_int(key("embedding_length")));
  c.num_hidden_layers = int(f.get_int(key("block_count")));
  c.intermediate_size = int(f.get_int(key("feed_forward_length")));
  c.num_attention_heads = int(f.get_int(key("attention.head_count")));
  if (f.get_int(key("attention.head_count_kv")) != c.num_attention_heads)
    throw Error(f.path + ": " + key("attention.head_count_kv") + " differs from the head count (GQA is not supported)");
  c.rms_norm_eps = float(f.get_float(key("attention.layer_norm_rms_epsilon")));
  c.rope_theta = float(f.get_float(key("rope.freq_base")));
  c.tie_word_embeddings = f.get_bool(key("tie_word_embeddings"));
  c.last_context_length = int(f.get_int(key("last_context_length")));
  const GGUFValue& ml = f.get_array(key("mem_layers"), GGUFValue::Type::I32);
  c.mem_layers.assign(ml.ints.begin(), ml.ints.end());
  c.mem_positionals = f.get_bool(key("mem_positionals"));
  c.mem_dtype = parse_mem_dtype(f.get_string(key("mem_dtype")), f.path);
  if (f.has(key("mem_attention.head_count"))) c.mem_num_attention_heads = int(f.get_int(key("mem_attention.head_count")));
  c.bos_token_id = int(f.get_int("tokenizer.ggml.bos_token_id"));
  c.eos_token_id = int(f.get_int("tokenizer.ggml.eos_token_id"));
  c.pad_token_id = int(f.get_int("tokenizer.ggml.padding_token_id"));
  c.validate(f.path);
  return c;
}

void convert_to_gguf(const std::string& src, const std::string& out, DType type) {
  if (!is_weight_type(type)) throw Error(std::string("cannot convert to ") + dtype_name(type));
  if (!fs::is_directory(src)) throw Error(src + ": not a model directory");
  const ModelConfig c = ModelConfig::from_file((fs::path(src) / "config.json").string());
  const TensorStore store = read_checkpoint_dir(src);
  const auto refs = match_checkpoint(store, c, src);
  std::unique_ptr<Tokenizer> tok;
  if (fs::exists(fs::path(src) / "tokenizer.model"))
    tok = std::make_unique<Tokenizer>((fs::path(src) / "tokenizer.model").string());

  std::vector<GGUFTensorToWrite> tensors;
  for (const TensorRef* t : refs) {
    DType tt = t->shape.size() == 1 ? DType::F32 : type;  // norms stay float32
    if (dtype_is_quantized(tt) && t->shape[1] % kQBlock != 0) {
      std::fprintf(stderr, "convert: %s has %lld columns, not a multiple of 32: stored as F16\n", t->name.c_str(),
                   (long long)t->shape[1]);
      tt = DType::F16;
    }
    tensors.push_back({t->name, tt, t->shape, nullptr, tensor_nbytes(tt, t->shape)});
  }
  const std::string name = fs::path(src).filename().string();
  write_gguf_streaming(out, gguf_metadata(c, name, type, tok.get()), tensors, [&](size_t i, uint8_t* buf) {
    const TensorRef& t = *refs[i];
    const int64_t cols = t.shape.back(), rows = t.numel() / std::max<int64_t>(cols, 1);
    const DType tt = tensors[i].dtype;
    const size_t in_rb = row_bytes(t.dtype, cols), out_rb = row_bytes(tt, cols);
    const auto* in = static_cast<const uint8_t*>(t.data);
#pragma omp parallel
    {
      std::vector<float> tmp(static_cast<size_t>(cols));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(t.dtype, in + size_t(r) * in_rb, cols, tmp.data());
        quantize_row(tt, tmp.data(), cols, buf + size_t(r) * out_rb);
      }
    }
    std::fprintf(stderr, "\rconvert: %zu/%zu tensors", i + 1, refs.size());
  });
  std::fprintf(stderr, "\n");
}

}  // namespace ll
