#pragma once
// The weights the inference engine runs on: every matrix in its storage type (F32, F16, BF16,
// Q8_0, Q4_0), either in RAM (huge pages) or pointing into a mapped GGUF file. Norm vectors are
// float32. Loaded from a Hugging Face directory (converting to the requested type tensor by tensor,
// so a bf16 checkpoint never exists twice in float32) or from a converted .gguf file.
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/model.h"
#include "ops/matmul.h"

namespace ll {

struct WeightMatrix {
  MatrixRef ref;
  std::shared_ptr<const void> owner;  // keeps the storage alive
};

struct TensorRef;
// Converts a matrix tensor [rows, cols] to `type`, row by row, into huge-page RAM. A quantized
// type whose 32-element blocks do not divide the width falls back to F16 (with a note on stderr),
// as `convert` does.
WeightMatrix convert_matrix(const TensorRef& t, DType type);

struct LayerWeightsT {
  std::vector<float> attn_norm, ffn_norm;
  WeightMatrix wq, wk, wv, wo, w_gate, w_up, w_down;
};

struct Weights {
  ModelConfig config;
  WeightMatrix embed;  // [vocab, d]
  std::vector<LayerWeightsT> layers;
  std::vector<float> final_norm;
  WeightMatrix lm_head;  // [vocab, d] (the embedding when tied)
  std::string source;
  std::string tokenizer_path;   // tokenizer.model beside the weights, "" if none
  std::string tokenizer_proto;  // or the SentencePiece model embedded in a .gguf
  std::string storage;          // "ram" or "mmap"

  // A model directory or a .gguf file. `type` converts every matrix (default: float32 for a
  // directory, as the official examples run; the stored types for a .gguf). use_mmap (GGUF only)
  // reads matrices straight from the page cache instead of copying them into RAM.
  // Q8_0/Q4_0/F16/BF16 matrices are then repacked for decoding (ops/qgroup.h) where this build
  // has the kernel for it; repack = false keeps the file's layout (mapped matrices stay zero-copy).
  static Weights load(const std::string& path, std::optional<DType> type = {}, bool use_mmap = false,
                      bool repack = true);
  // From float32 parameters (e.g. a model being trained): F32 borrows the vectors, no copy.
  static Weights from_model(const Model& m, DType type = DType::F32);
  // Random matrices made directly in `type` (uniform, std 0.02; norms 1), for benchmarks of
  // models too large to hold in float32 first. Deterministic in seed, fast (hash-based).
  static Weights random(const ModelConfig& c, DType type, uint64_t seed, bool repack = true);

  // Repacks the Q8_0/Q4_0/F16/BF16 projection matrices into 16-row groups (not the embedding,
  // which is read by rows, nor a tied lm_head). Done by load/random/from_model; a no-op without
  // the kernel. Mapped matrices are copied into RAM by it (storage "mmap+repacked").
  void repack_for_decode();

  void embed_row(int token, float* out) const;  // dequantized embedding row
  size_t matrix_bytes() const;                  // bytes of all matrices (what decoding streams)
  DType main_type() const { return layers.empty() ? embed.ref.type : layers[0].wq.ref.type; }

 private:
  static Weights load_gguf(const std::string& path, std::optional<DType> type, bool use_mmap);
};

}  // namespace ll
