#include <cstring>
#include <memory>

#include "io/gguf.h"
#include "model/gguf_model.h"
#include "model/weights.h"
#include "ops/quant.h"
#include "util/error.h"
#include "util/huge_alloc.h"

namespace ll {

Weights Weights::load_gguf(const std::string& path, std::optional<DType> type, bool use_mmap) {
  auto file = std::make_shared<GGUFFile>(read_gguf(path));
  Weights w;
  w.source = path;
  w.config = config_from_gguf(*file);
  w.storage = use_mmap ? "mmap" : "ram";
  const auto refs = match_checkpoint(file->tensors, w.config, path, /*allow_quantized=*/true);
  auto matrix = [&](const TensorRef& t) -> WeightMatrix {
    const DType want = type.value_or(t.dtype);
    if (want == t.dtype && use_mmap) return {{t.dtype, t.shape[0], t.shape[1], t.data}, file};
    // Copy (or convert) into huge-page RAM: faster to stream than page-cache pages.
    const int64_t rows = t.shape[0], cols = t.shape[1];
    if (dtype_is_quantized(want) && cols % kQBlock != 0)
      throw Error(path + ": tensor '" + t.name + "' cannot be converted to " + dtype_name(want));
    const size_t in_rb = row_bytes(t.dtype, cols), out_rb = row_bytes(want, cols);
    auto mem = alloc_huge(out_rb * size_t(rows));
    const auto* in = static_cast<const uint8_t*>(t.data);
#pragma omp parallel
    {
      std::vector<float> tmp(static_cast<size_t>(cols));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        if (want == t.dtype) {
          std::memcpy(mem.get() + size_t(r) * out_rb, in + size_t(r) * in_rb, out_rb);
        } else {
          dequantize_row(t.dtype, in + size_t(r) * in_rb, cols, tmp.data());
          quantize_row(want, tmp.data(), cols, mem.get() + size_t(r) * out_rb);
        }
      }
    }
    return {{want, rows, cols, mem.get()}, mem};
  };
  size_t i = 0;
  auto next = [&]() -> const TensorRef& { return *refs[i++]; };
  w.embed = matrix(next());
  w.layers.resize(w.config.num_hidden_layers);
  for (auto& L : w.layers) {
    for (WeightMatrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) *m = matrix(next());
    L.attn_norm = to_f32(next());
    L.ffn_norm = to_f32(next());
  }
  w.final_norm = to_f32(next());
  w.lm_head = w.config.tie_word_embeddings ? w.embed : matrix(next());
  if (file->has("tokenizer.ggml.sentencepiece_model"))
    w.tokenizer_proto = file->get_array("tokenizer.ggml.sentencepiece_model", GGUFValue::Type::U8).bytes;
  return w;
}

}  // namespace ll
