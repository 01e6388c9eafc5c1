#pragma once
// Q8_0/Q4_0 (and F16/BF16) matrices repacked 16 rows at a time ("row groups") for decoding.
//
// The GGUF layout keeps each row's blocks together, so a SIMD dot product works on one row and
// ends every 32-element block with a horizontal step (convert, scale, add). Interleaving 16 rows
// lets one AVX-512 VNNI instruction advance 16 rows by 4 elements each, with one int32 lane per
// row: no horizontal sums, one scale multiply per block for all 16 rows (llama.cpp repacks its
// CPU weights for the same reason). The portable AVX2 build does the same in two halves of 8 rows
// with vpmaddubsw + vpmaddwd; F16/BF16 groups are AVX-512 only (with AVX2 the plain rows read
// faster, see should_group). Per group of 16 rows and per block b of 32 columns:
//   32 bytes  the 16 rows' f16 scales
//   Q8_0: 8 x 64 bytes; chunk k holds, for row r, bytes 4r..4r+3 = elements 4k..4k+3 of row r,
//         stored as unsigned (w + 128), so that vpdpbusd (unsigned x signed) applies; the +128
//         is taken back with 128 * Σx of the activation block
//   Q4_0: 4 x 64 bytes; chunk k holds, for row r, the GGUF bytes qs[4k..4k+3] of row r: the low
//         nibbles are elements 4k..4k+3, the high ones 16+4k..16+4k+3 (offset 8, taken back
//         with 8 * Σx)
// So a group block is 16 x 34 (Q8_0) or 16 x 18 (Q4_0) bytes: the same size as the rows.
//   F16/BF16: 16 x 64 bytes, row r's 32 elements at byte 64r. No arithmetic changes; the point is
//         that a thread streams one contiguous range instead of several rows at once, which
//         reads ~1.5x faster from DRAM on this machine (bench_kernels: BM_MatvecDram).
#include <cstdint>

#include "ops/quant.h"

namespace ll {

constexpr int kGroupRows = 16;

// True when this build decodes grouped matrices with its fast kernel (AVX-512 VNNI or AVX2 for
// Q8_0/Q4_0, AVX-512F for F16/BF16) and the matrix fits the layout (rows % 16 == 0, cols % 32 == 0).
// Elsewhere the GGUF layout is kept.
bool should_group(DType t, int64_t rows, int64_t cols);
// GGUF rows [rows, cols] -> grouped layout (same byte count). Threads over groups.
void group_rows(DType t, const uint8_t* src, int64_t rows, int64_t cols, uint8_t* dst);
// Rows row0 .. row0+n-1 (both multiples of 16) of a grouped matrix as float32, [n, cols].
void dequantize_grouped(DType t, const uint8_t* data, int64_t cols, int64_t row0, int64_t n, float* out);
// y[rows] = W · x with W grouped and x quantized by ActQ8 (threads over groups).
void matvec_grouped(DType t, const uint8_t* data, int64_t rows, int64_t cols, const ActQ8& x, float* y);
// The same with plain loops (the reference for tests, and the path of builds without VNNI).
void matvec_grouped_scalar(DType t, const uint8_t* data, int64_t rows, int64_t cols, const ActQ8& x, float* y);
// F16/BF16 groups: y = W · x with float activations; and its plain-loop twin.
void matvec_grouped(DType t, const uint8_t* data, int64_t rows, int64_t cols, const float* x, float* y);
void matvec_grouped_scalar(DType t, const uint8_t* data, int64_t rows, int64_t cols, const float* x, float* y);

}  // namespace ll
