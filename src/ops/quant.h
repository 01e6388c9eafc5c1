#pragma once
// Row formats of weight matrices: F32, F16, BF16 and the GGML block-quantized Q8_0 and Q4_0
// (32 elements per block with an f16 scale; Q4_0 stores element j in the low nibble of byte j and
// element j+16 in the high nibble). The layouts are llama.cpp's, so GGUF files interoperate.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "io/tensor_store.h"

namespace ll {

constexpr int kQBlock = 32;

struct BlockQ8_0 {
  uint16_t d;  // f16 scale
  int8_t qs[kQBlock];
};
struct BlockQ4_0 {
  uint16_t d;  // f16 scale
  uint8_t qs[kQBlock / 2];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18, "GGML block layouts");

// Bytes of one row of n elements (n a multiple of 32 for the quantized types).
size_t row_bytes(DType t, int64_t n);
// True for the types a weight matrix may have: F32, F16, BF16, Q8_0, Q4_0.
bool is_weight_type(DType t);
DType parse_weight_type(const std::string& name);  // "f32", "f16", "bf16", "q8_0", "q4_0"

// x[0..n) -> one row of type t (plain types round to nearest even; Q8_0: d = max|x|/127,
// q = round(x/d); Q4_0: d = (value of largest magnitude)/-8, q = min(15, trunc(x/d + 8.5))).
void quantize_row(DType t, const float* x, int64_t n, void* out);
void dequantize_row(DType t, const void* row, int64_t n, float* out);

// Activations quantized to Q8_0-like blocks (int8 + float scale, as llama.cpp) for the integer
// dot products of decoding with Q8_0/Q4_0 weights.
struct ActQ8 {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;  // Σ q of each block (for the offsets of unsigned weight encodings)
  void quantize(const float* x, int64_t n);  // n a multiple of 32
};

}  // namespace ll
