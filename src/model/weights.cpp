#include "model/weights.h"

#include <cstdio>
#include <cstring>
#include <filesystem>

#include "io/tensor_store.h"
#include "ops/qgroup.h"
#include "ops/quant.h"
#include "util/error.h"
#include "util/huge_alloc.h"

namespace fs = std::filesystem;

namespace ll {

WeightMatrix convert_matrix(const TensorRef& t, DType type) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  if (dtype_is_quantized(type) && cols % kQBlock != 0) {
    // As convert does: a width that is not whole 32-element blocks stays in f16.
    std::fprintf(stderr, "%s: %s has %lld columns, not a multiple of 32: kept as F16\n", t.file.c_str(),
                 t.name.c_str(), (long long)cols);
    type = DType::F16;
  }
  const size_t out_rb = row_bytes(type, cols), in_rb = row_bytes(t.dtype, cols);
  auto mem = alloc_huge(out_rb * size_t(rows));
  const auto* src = static_cast<const uint8_t*>(t.data);
  if (t.dtype == type) {
    std::memcpy(mem.get(), src, out_rb * size_t(rows));
  } else {
#pragma omp parallel
    {
      std::vector<float> tmp(static_cast<size_t>(cols));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(t.dtype, src + size_t(r) * in_rb, cols, tmp.data());
        quantize_row(type, tmp.data(), cols, mem.get() + size_t(r) * out_rb);
      }
    }
  }
  return {{type, rows, cols, mem.get()}, mem};
}

namespace {

WeightMatrix from_vector(const std::vector<float>& v, int64_t rows, int64_t cols, DType type) {
  if (type == DType::F32) return {{DType::F32, rows, cols, v.data()}, nullptr};  // borrowed
  TensorRef t;
  t.name = "parameters";
  t.dtype = DType::F32;
  t.shape = {rows, cols};
  t.data = v.data();
  t.nbytes = v.size() * 4;
  return convert_matrix(t, type);
}

}  // namespace

Weights Weights::load(const std::string& path, std::optional<DType> type, bool use_mmap, bool repack) {
  if (type && !is_weight_type(*type)) throw Error(std::string("weight type ") + dtype_name(*type) + " is not supported");
  if (fs::is_regular_file(path)) {
    Weights w = load_gguf(path, type, use_mmap);
    if (repack) w.repack_for_decode();
    return w;
  }
  if (!fs::is_directory(path)) throw Error(path + ": not a model directory or .gguf file");
  const DType t = type.value_or(DType::F32);
  Weights w;
  w.source = path;
  w.storage = "ram";
  w.config = ModelConfig::from_file((fs::path(path) / "config.json").string());
  const TensorStore store = read_checkpoint_dir(path);
  const auto refs = match_checkpoint(store, w.config, path);
  size_t i = 0;
  auto next = [&]() -> const TensorRef& { return *refs[i++]; };
  w.embed = convert_matrix(next(), t);
  w.layers.resize(w.config.num_hidden_layers);
  for (auto& L : w.layers) {
    for (WeightMatrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) *m = convert_matrix(next(), t);
    L.attn_norm = to_f32(next());
    L.ffn_norm = to_f32(next());
  }
  w.final_norm = to_f32(next());
  w.lm_head = w.config.tie_word_embeddings ? w.embed : convert_matrix(next(), t);
  const fs::path tok = fs::path(path) / "tokenizer.model";
  if (fs::exists(tok)) w.tokenizer_path = tok.string();
  if (repack) w.repack_for_decode();
  return w;
}

Weights Weights::from_model(const Model& m, DType type) {
  const ModelConfig& c = m.config;
  const int64_t d = c.hidden_size, f = c.intermediate_size, V = c.vocab_size;
  Weights w;
  w.config = c;
  w.source = m.source;
  w.storage = "ram";
  w.tokenizer_path = m.tokenizer_path;
  w.embed = from_vector(m.embed, V, d, type);
  w.layers.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& s = m.layers[l];
    LayerWeightsT& L = w.layers[l];
    L.wq = from_vector(s.wq, d, d, type);
    L.wk = from_vector(s.wk, d, d, type);
    L.wv = from_vector(s.wv, d, d, type);
    L.wo = from_vector(s.wo, d, d, type);
    L.w_gate = from_vector(s.w_gate, f, d, type);
    L.w_up = from_vector(s.w_up, f, d, type);
    L.w_down = from_vector(s.w_down, d, f, type);
    L.attn_norm = s.attn_norm;
    L.ffn_norm = s.ffn_norm;
  }
  w.final_norm = m.final_norm;
  w.lm_head = m.lm_head.empty() ? w.embed : from_vector(m.lm_head, V, d, type);
  w.repack_for_decode();
  return w;
}

Weights Weights::random(const ModelConfig& c, DType type, uint64_t seed, bool repack) {
  c.validate("random weights");
  const int64_t d = c.hidden_size, f = c.intermediate_size, V = c.vocab_size;
  uint64_t matrix_index = 0;
  auto matrix = [&](int64_t rows, int64_t cols) -> WeightMatrix {
    if (dtype_is_quantized(type) && cols % kQBlock != 0)
      throw Error("random weights: " + std::to_string(cols) + " columns cannot be stored as " + dtype_name(type));
    const size_t rb = row_bytes(type, cols);
    auto mem = alloc_huge(rb * size_t(rows));
    const uint64_t mi = ++matrix_index;
#pragma omp parallel
    {
      std::vector<float> tmp(static_cast<size_t>(cols));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        uint64_t h = seed * 0x9E3779B97F4A7C15ull ^ (mi << 40) ^ uint64_t(r);
        for (auto& x : tmp) {  // splitmix64 -> uniform(-a, a) with a = 0.02 * sqrt(3)
          h += 0x9E3779B97F4A7C15ull;
          uint64_t z = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
          z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
          z ^= z >> 31;
          x = (float(z >> 40) / float(1 << 24) * 2.0f - 1.0f) * 0.0346410f;
        }
        quantize_row(type, tmp.data(), cols, mem.get() + size_t(r) * rb);
      }
    }
    return {{type, rows, cols, mem.get()}, mem};
  };
  Weights w;
  w.config = c;
  w.source = "random";
  w.storage = "ram";
  w.embed = matrix(V, d);
  w.layers.resize(c.num_hidden_layers);
  for (auto& L : w.layers) {
    L.wq = matrix(d, d);
    L.wk = matrix(d, d);
    L.wv = matrix(d, d);
    L.wo = matrix(d, d);
    L.w_gate = matrix(f, d);
    L.w_up = matrix(f, d);
    L.w_down = matrix(d, f);
    L.attn_norm.assign(size_t(d), 1.0f);
    L.ffn_norm.assign(size_t(d), 1.0f);
  }
  w.final_norm.assign(size_t(d), 1.0f);
  w.lm_head = c.tie_word_embeddings ? w.embed : matrix(V, d);
  if (repack) w.repack_for_decode();
  return w;
}

namespace {

bool group_matrix(WeightMatrix& m) {
  const MatrixRef& r = m.ref;
  if (r.grouped || !should_group(r.type, r.rows, r.cols)) return false;
  auto mem = alloc_huge(row_bytes(r.type, r.cols) * size_t(r.rows));
  group_rows(r.type, static_cast<const uint8_t*>(r.data), r.rows, r.cols, mem.get());
  m = {{r.type, r.rows, r.cols, mem.get(), /*grouped=*/true}, mem};
  return true;
}

}  // namespace

void Weights::repack_for_decode() {
  bool any = false;
  for (auto& L : layers)
    for (WeightMatrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) any |= group_matrix(*m);
  if (lm_head.ref.data != embed.ref.data) any |= group_matrix(lm_head);
  if (any && storage == "mmap") storage = "mmap+repacked";  // the repacked matrices now live in RAM
}

void Weights::embed_row(int token, float* out) const {
  dequantize_row(embed.ref.type, embed.ref.row(token), embed.ref.cols, out);
}

size_t Weights::matrix_bytes() const {
  auto bytes = [](const WeightMatrix& m) { return row_bytes(m.ref.type, m.ref.cols) * size_t(m.ref.rows); };
  size_t b = bytes(embed);
  for (const auto& L : layers)
    for (const WeightMatrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) b += bytes(*m);
  if (lm_head.ref.data != embed.ref.data) b += bytes(lm_head);
  return b;
}

}  // namespace ll
