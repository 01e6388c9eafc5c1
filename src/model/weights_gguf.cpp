#include <cstdio>
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
    return convert_matrix(t, want);  // into huge-page RAM: faster to stream than page-cache pages
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
