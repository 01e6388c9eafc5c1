#pragma once
// All trainable parameters of a model in one flat vector (so the optimizer, gradient clipping and
// checkpoints see one array), with each tensor's offset.
#include <cstddef>
#include <string>
#include <vector>

#include "model/model.h"

namespace ll::train {

struct LayerOffsets {
  size_t attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
};

struct ParamLayout {
  explicit ParamLayout(const ModelConfig& c);
  size_t embed = 0, final_norm = 0;
  size_t lm_head = 0;  // == embed when the embeddings are tied
  size_t total = 0;
  std::vector<LayerOffsets> layers;
  // [begin, end) ranges of the RMSNorm weights (excluded from weight decay by default).
  std::vector<std::pair<size_t, size_t>> norms;
};

// Model (float32 tensors) <-> flat vector in ParamLayout order.
std::vector<float> flatten(const Model& m, const ParamLayout& layout);
// A Model with config c holding the flat parameters p.
Model unflatten(const float* p, const ModelConfig& c, const ParamLayout& layout);

}  // namespace ll::train
