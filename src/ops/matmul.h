#pragma once
// Products with weight matrices stored in any weight type (F32, F16, BF16, Q8_0, Q4_0).
//  - one row of activations (decoding): SIMD dot products streaming the weights once, threads
//    over output rows; for Q8_0/Q4_0 the activations are quantized to Q8_0 first (as llama.cpp).
//  - many rows (prefill): dequantize 1024-row panels to f32 and call BLAS sgemm.
#include <cstdint>

#include "io/tensor_store.h"

namespace ll {

// A weight matrix [rows, cols], row-major in its storage type (cols % 32 == 0 for Q types), or
// for Q8_0/Q4_0 with `grouped`, in the 16-row interleaved layout of ops/qgroup.h.
struct MatrixRef {
  DType type = DType::F32;
  int64_t rows = 0, cols = 0;
  const void* data = nullptr;
  bool grouped = false;
  const uint8_t* row(int64_t r) const;  // not for grouped matrices
};

// How far ahead (bytes) the decode matvec kernels prefetch the weights they stream (0 = off).
// On the AVX-512 VMs (sessions 14-18) it stayed within the noise of the hardware prefetcher
// alone; on a Zen 3 EPYC (AVX2) 1 KiB raised the kernels' share of the paired bandwidth probe from
// 0.73-0.81 to 0.86-0.91 for q4_0/q8_0 and from 0.88 to 0.91-0.95 for f16
// (BM_DecodeSweepPaired, docs/performance.md session 19), so it is on by default.
inline int matvec_prefetch_bytes = 1024;

// y[n, rows] = x[n, cols] · Wᵀ
void matmul(const MatrixRef& W, const float* x, int n, float* y);
// y[rows] = W · x, with the dot product of the matrix's type (the decode hot path).
void matvec(const MatrixRef& W, const float* x, float* y);

// Dot products of one stored row with float activations (exposed for tests and attention).
float dot_row(DType t, const void* row, const float* x, int64_t n);
float dot_f32(const float* a, const float* b, int64_t n);
float dot_bf16(const uint16_t* a, const float* b, int64_t n);
float dot_f16(const uint16_t* a, const float* b, int64_t n);

}  // namespace ll
