#pragma once
// The GGUF form of a LongLLaMA model: metadata keys (llama.cpp's names under the "longllama."
// prefix for the shared fields, plus the FoT fields), the tokenizer, and the tensors under their
// Hugging Face names (no Q/K permutation: this engine uses the HF rotate_half RoPE layout).
#include <map>
#include <string>

#include "io/gguf.h"
#include "model/config.h"
#include "tokenizer/tokenizer.h"

namespace ll {

std::map<std::string, GGUFValue> gguf_metadata(const ModelConfig& c, const std::string& name, DType main_type,
                                               const Tokenizer* tok);
ModelConfig config_from_gguf(const GGUFFile& f);

// Converts a Hugging Face model directory (or a .gguf) into one GGUF file with matrices of
// `type` (norms stay F32; a matrix whose width is not a multiple of 32 falls back to F16 for the
// quantized types). Streams tensor by tensor; the write is atomic.
void convert_to_gguf(const std::string& src, const std::string& out, DType type);

}  // namespace ll
