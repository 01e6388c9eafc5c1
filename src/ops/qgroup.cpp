#include "ops/qgroup.h"

#include <immintrin.h>

#include <cstring>

#include "ops/matmul.h"
#include "ops/simd.h"
#include "util/error.h"
#include "util/half.h"

#if defined(__AVX512F__)
#define LONGLLAMA_GROUP_AVX512 1  // the F16/BF16 kernel
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LONGLLAMA_GROUP_VNNI 1  // the Q8_0/Q4_0 kernel
// GCC 12 warns about the deliberately undefined pass-through operand inside its own
// _mm512_cvtph_ps / _mm512_cvtepi32_ps (avx512fintrin.h's `__m512 __Y = __Y;`).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LONGLLAMA_GROUP_AVX2 1  // the kernels of the portable (x86-64-v3) build
#endif

namespace ll {

namespace {

constexpr int kScaleBytes = kGroupRows * 2;

bool is_half(DType t) { return t == DType::F16 || t == DType::BF16; }
int chunks(DType t) { return t == DType::Q8_0 ? 8 : 4; }  // 64-byte chunks per Q group block
// A group block: 16 rows x 32 columns.
size_t group_block_bytes(DType t) { return is_half(t) ? size_t(kGroupRows * 64) : size_t(kScaleBytes + 64 * chunks(t)); }
[[maybe_unused]] int32_t offset(DType t) { return t == DType::Q8_0 ? 128 : 8; }
float half_to_f32(DType t, uint16_t h) { return t == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h); }

void check(DType t, int64_t rows, int64_t cols, const char* what) {
  if ((t != DType::Q8_0 && t != DType::Q4_0 && !is_half(t)) || rows % kGroupRows != 0 || cols % kQBlock != 0)
    throw Error(std::string(what) + ": grouped layout needs Q8_0/Q4_0/F16/BF16, rows % 16 == 0 and cols % 32 == 0 (got " +
                dtype_name(t) + " " + std::to_string(rows) + "x" + std::to_string(cols) + ")");
}

}  // namespace

bool should_group(DType t, int64_t rows, int64_t cols) {
  if (rows <= 0 || rows % kGroupRows != 0 || cols % kQBlock != 0) return false;
#if defined(LONGLLAMA_GROUP_VNNI) || defined(LONGLLAMA_GROUP_AVX2)
  if (t == DType::Q8_0 || t == DType::Q4_0) return true;
#endif
#if defined(LONGLLAMA_GROUP_AVX512)
  // F16/BF16 only with AVX-512: with AVX2 the 16 ymm accumulators leave no register free, and on a
  // Zen 3 EPYC the grouped AVX2 kernel read 0.48-0.55 of the paired bandwidth where the 4-row
  // kernel on the plain rows reads 0.89-0.93 (BM_DecodeSweepPaired/f16, docs/performance.md).
  if (is_half(t)) return true;
#endif
  return false;
}

void group_rows(DType t, const uint8_t* src, int64_t rows, int64_t cols, uint8_t* dst) {
  check(t, rows, cols, "group_rows");
  const int64_t nb = cols / kQBlock, groups = rows / kGroupRows;
  const size_t rb = row_bytes(t, cols), gbb = group_block_bytes(t);
  const bool q8 = t == DType::Q8_0, half = is_half(t);
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* out = dst + size_t(g * nb + b) * gbb;
      for (int r = 0; r < kGroupRows; ++r) {
        const uint8_t* row = src + size_t(g * kGroupRows + r) * rb;
        if (half) {
          std::memcpy(out + 64 * r, row + 64 * b, 64);
        } else if (q8) {
          const auto& blk = reinterpret_cast<const BlockQ8_0*>(row)[b];
          std::memcpy(out + 2 * r, &blk.d, 2);
          for (int k = 0; k < 8; ++k)
            for (int i = 0; i < 4; ++i)
              out[kScaleBytes + 64 * k + 4 * r + i] = uint8_t(uint8_t(blk.qs[4 * k + i]) ^ 0x80u);
        } else {
          const auto& blk = reinterpret_cast<const BlockQ4_0*>(row)[b];
          std::memcpy(out + 2 * r, &blk.d, 2);
          for (int k = 0; k < 4; ++k)
            for (int i = 0; i < 4; ++i) out[kScaleBytes + 64 * k + 4 * r + i] = blk.qs[4 * k + i];
        }
      }
    }
  }
}

void dequantize_grouped(DType t, const uint8_t* data, int64_t cols, int64_t row0, int64_t n, float* out) {
  check(t, n, cols, "dequantize_grouped");
  if (row0 % kGroupRows != 0) throw Error("dequantize_grouped: row0 must be a multiple of 16");
  const int64_t nb = cols / kQBlock;
  const size_t gbb = group_block_bytes(t);
  const bool q8 = t == DType::Q8_0;
  namespace hn = hwy::HWY_NAMESPACE;
  const simd::DF df;
  const int N = int(hn::Lanes(df));
  static_assert(kQBlock % 16 == 0);
  if (kQBlock % N != 0) throw Error("dequantize_grouped: vector lanes must divide 32");
  for (int64_t g = 0; g < n / kGroupRows; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* in = data + size_t((row0 / kGroupRows + g) * nb + b) * gbb;
      if (is_half(t)) {  // each row's 32 elements are a plain F16/BF16 row piece
        for (int r = 0; r < kGroupRows; ++r) {
          float* o = out + size_t(g * kGroupRows + r) * size_t(cols) + size_t(b * kQBlock);
          for (int j = 0; j < kQBlock; j += N)
            hn::StoreU(t == DType::F16 ? simd::load_f32(df, reinterpret_cast<const hwy::float16_t*>(in + 64 * r) + j)
                                       : simd::load_f32(df, reinterpret_cast<const hwy::bfloat16_t*>(in + 64 * r) + j),
                       df, o + j);
        }
        continue;
      }
      for (int r = 0; r < kGroupRows; ++r) {
        uint16_t dh;
        std::memcpy(&dh, in + 2 * r, 2);
        float* o = out + size_t(g * kGroupRows + r) * size_t(cols) + size_t(b * kQBlock);
        // The row's 32 quants in order as int8 (16-byte vector ops), then widened and scaled a
        // vector at a time: prefill dequantizes every weight once per call. One element at a time
        // ran at ~1.0-1.1 G elements/s per core, this at ~1.9-2.1 (BM_DequantizeGrouped, session 18).
        uint8_t raw[kQBlock];
        int8_t q[kQBlock];
        for (int k = 0; k < chunks(t); ++k) std::memcpy(raw + 4 * k, in + kScaleBytes + 64 * k + 4 * r, 4);
        const hn::FixedTag<uint8_t, kQBlock / 2> du;  // 16 bytes: every x86 target has them
        if (q8) {  // stored with 128 added: q = stored ^ 0x80 read as int8
          for (int h = 0; h < 2; ++h)
            hn::StoreU(hn::Xor(hn::LoadU(du, raw + 16 * h), hn::Set(du, uint8_t(0x80))), du,
                       reinterpret_cast<uint8_t*>(q) + 16 * h);
        } else {
          const auto v = hn::LoadU(du, raw);
          const auto eight = hn::Set(du, uint8_t(8));
          hn::StoreU(hn::Sub(hn::And(v, hn::Set(du, uint8_t(0x0f))), eight), du, reinterpret_cast<uint8_t*>(q));
          hn::StoreU(hn::Sub(hn::ShiftRight<4>(v), eight), du, reinterpret_cast<uint8_t*>(q) + kQBlock / 2);
        }
        const auto d = hn::Set(df, f16_to_f32(dh));
        for (int j = 0; j < kQBlock; j += N) hn::StoreU(hn::Mul(simd::load_f32(df, q + j), d), df, o + j);
      }
    }
  }
}

void matvec_grouped_scalar(DType t, const uint8_t* data, int64_t rows, int64_t cols, const ActQ8& x, float* y) {
  check(t, rows, cols, "matvec_grouped");
  const int64_t nb = cols / kQBlock;
  const size_t gbb = group_block_bytes(t);
  const bool q8 = t == DType::Q8_0;
  for (int64_t g = 0; g < rows / kGroupRows; ++g)
    for (int r = 0; r < kGroupRows; ++r) {
      float total = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* in = data + size_t(g * nb + b) * gbb;
        const int8_t* xq = &x.q[size_t(b * kQBlock)];
        uint16_t dh;
        std::memcpy(&dh, in + 2 * r, 2);
        int32_t isum = 0;
        for (int k = 0; k < chunks(t); ++k)
          for (int i = 0; i < 4; ++i) {
            const uint8_t v = in[kScaleBytes + 64 * k + 4 * r + i];
            if (q8) {
              isum += (int(v) - 128) * xq[4 * k + i];
            } else {
              isum += (int(v & 0x0f) - 8) * xq[4 * k + i] + (int(v >> 4) - 8) * xq[16 + 4 * k + i];
            }
          }
        total += float(isum) * (f16_to_f32(dh) * x.d[size_t(b)]);
      }
      y[g * kGroupRows + r] = total;
    }
}

#if defined(LONGLLAMA_GROUP_AVX2)
namespace {
// AVX2 has no vpdpbusd: vpmaddubsw makes int16 sums of unsigned x signed int8 pairs (saturating)
// and vpmaddwd by 1 adds those into int32. A group is two halves of 8 rows (32 bytes of a chunk
// each, one int32 lane per row). Q4_0 nibbles (0..15) times int8 give pair sums of at most
// 2 x 15 x 128 = 3840, so the 8 products of a block add up in int16 (<= 30720) before one
// vpmaddwd; Q8_0 bytes are stored as w + 128 (up to 255, which could saturate a pair), so they
// are turned back into w and multiplied as |w| x (x with w's sign), as the row kernels do.
void matvec_q_groups_avx2(DType t, const uint8_t* data, int64_t rows, int64_t cols, const ActQ8& x, float* y) {
  const int64_t nb = cols / kQBlock, groups = rows / kGroupRows;
  const size_t gbb = group_block_bytes(t);
  const bool q8 = t == DType::Q8_0;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8(char(0x80));
  const int ahead = matvec_prefetch_bytes;
#pragma omp parallel for schedule(guided)  // long runs first: see matvec_grouped below
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = data + size_t(g * nb) * gbb;
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; ++b, p += gbb) {
      if (ahead > 0)
        for (size_t o = 0; o < gbb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + ahead + o), _MM_HINT_T0);
      const __m256 xd = _mm256_set1_ps(x.d[size_t(b)]);
      const int8_t* xq = &x.q[size_t(b * kQBlock)];
      auto xk = [&](int k) {  // activation elements 4k..4k+3, broadcast to the 8 rows
        int32_t v;
        std::memcpy(&v, xq + 4 * k, 4);
        return _mm256_set1_epi32(v);
      };
      for (int h = 0; h < 2; ++h) {
        const uint8_t* q = p + kScaleBytes + 32 * h;
        auto chunk = [&](int k) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * k)); };
        __m256i isum;
        if (q8) {
          isum = _mm256_setzero_si256();
          for (int k = 0; k < 8; ++k) {
            const __m256i w = _mm256_xor_si256(chunk(k), flip);
            const __m256i pr = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xk(k), w));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pr, ones));
          }
        } else {
          __m256i s16 = _mm256_setzero_si256();
          for (int k = 0; k < 4; ++k) {
            const __m256i v = chunk(k);
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(v, low), xk(k)));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), xk(4 + k)));
          }
          isum = _mm256_add_epi32(_mm256_madd_epi16(s16, ones), _mm256_set1_epi32(-8 * x.sum[size_t(b)]));
        }
        const __m256 scale =
            _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h))), xd);
        acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[h]);
      }
    }
    _mm256_storeu_ps(y + g * kGroupRows, acc[0]);
    _mm256_storeu_ps(y + g * kGroupRows + 8, acc[1]);
  }
}
}  // namespace
#endif

void matvec_grouped(DType t, const uint8_t* data, int64_t rows, int64_t cols, const ActQ8& x, float* y) {
#if defined(LONGLLAMA_GROUP_AVX2)
  check(t, rows, cols, "matvec_grouped");
  matvec_q_groups_avx2(t, data, rows, cols, x, y);
#elif !defined(LONGLLAMA_GROUP_VNNI)
  matvec_grouped_scalar(t, data, rows, cols, x, y);
#else
  check(t, rows, cols, "matvec_grouped");
  const int64_t nb = cols / kQBlock, groups = rows / kGroupRows;
  const size_t gbb = group_block_bytes(t);
  const int32_t off = offset(t);
  const bool q8 = t == DType::Q8_0;
  const int ahead = matvec_prefetch_bytes;
  // Guided: a long sequential run per thread first, then smaller chunks for balance. With
  // dynamic chunks of 4 groups the two threads' reads interleaved every 115 KB: q4_0 decode
  // sweeps read at 0.73-0.77 of the bandwidth probe in the fast regime, 0.95-0.98 with this.
#pragma omp parallel for schedule(guided)
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = data + size_t(g * nb) * gbb;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b, p += gbb) {
      if (ahead > 0)
        for (size_t o = 0; o < gbb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + ahead + o), _MM_HINT_T0);
      const __m512 scale = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                         _mm512_set1_ps(x.d[size_t(b)]));
      const int8_t* xq = &x.q[size_t(b * kQBlock)];
      auto xk = [&](int k) {  // activation elements 4k..4k+3, broadcast to the 16 rows
        int32_t v;
        std::memcpy(&v, xq + 4 * k, 4);
        return _mm512_set1_epi32(v);
      };
      auto chunk = [&](int k) { return _mm512_loadu_si512(p + kScaleBytes + 64 * k); };
      // Two chains of vpdpbusd so that consecutive ones do not wait on each other.
      __m512i s0 = _mm512_set1_epi32(-off * x.sum[size_t(b)]), s1 = _mm512_setzero_si512();
      if (q8) {
        for (int k = 0; k < 8; k += 2) {
          s0 = _mm512_dpbusd_epi32(s0, chunk(k), xk(k));
          s1 = _mm512_dpbusd_epi32(s1, chunk(k + 1), xk(k + 1));
        }
      } else {
        const __m512i low = _mm512_set1_epi8(0x0f);
        for (int k = 0; k < 4; ++k) {
          const __m512i v = chunk(k);
          s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v, low), xk(k));
          s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), xk(4 + k));
        }
      }
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), scale, acc);
    }
    _mm512_storeu_ps(y + g * kGroupRows, acc);
  }
#endif
}

void matvec_grouped_scalar(DType t, const uint8_t* data, int64_t rows, int64_t cols, const float* x, float* y) {
  check(t, rows, cols, "matvec_grouped");
  if (!is_half(t)) throw Error("matvec_grouped: float activations are for F16/BF16 groups");
  const int64_t nb = cols / kQBlock;
  const size_t gbb = group_block_bytes(t);
  for (int64_t g = 0; g < rows / kGroupRows; ++g)
    for (int r = 0; r < kGroupRows; ++r) {
      float total = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* in = data + size_t(g * nb + b) * gbb + 64 * r;
        for (int i = 0; i < kQBlock; ++i) {
          uint16_t h;
          std::memcpy(&h, in + 2 * i, 2);
          total += half_to_f32(t, h) * x[b * kQBlock + i];
        }
      }
      y[g * kGroupRows + r] = total;
    }
}

#if defined(LONGLLAMA_GROUP_AVX512)
namespace {
using VF = __m512;  // 16 floats
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(VF v) { return _mm512_reduce_add_ps(v); }
template <DType T>
inline VF widen(const uint8_t* p) {  // 16 halves -> 16 floats
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (T == DType::F16) return _mm512_cvtph_ps(h);
  else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One accumulator per row of the group: a group block is one contiguous kilobyte, so each thread
// reads a single stream (BM_MatvecDram, 2 threads: 43-45 GB/s vs 36 for four row streams each).
template <DType T>
void matvec_half_groups(const uint8_t* data, int64_t rows, int64_t cols, const float* x, float* y) {
  constexpr int L = int(sizeof(VF) / sizeof(float));  // floats per vector
  const int64_t nb = cols / kQBlock, groups = rows / kGroupRows;
  constexpr size_t gbb = size_t(kGroupRows) * 64;
  const int ahead = matvec_prefetch_bytes;
#pragma omp parallel for schedule(guided)  // long runs first: see matvec_grouped above
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = data + size_t(g * nb) * gbb;
    VF acc[kGroupRows];
    for (auto& a : acc) a = vzero();
    for (int64_t b = 0; b < nb; ++b, p += gbb) {
      if (ahead > 0)
        for (size_t o = 0; o < gbb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + ahead + o), _MM_HINT_T0);
      for (int c = 0; c < kQBlock / L; ++c) {
        const VF xc = vload(x + b * kQBlock + c * L);
        for (int r = 0; r < kGroupRows; ++r) acc[r] = vfma(widen<T>(p + 64 * r + 2 * L * c), xc, acc[r]);
      }
    }
    for (int r = 0; r < kGroupRows; ++r) y[g * kGroupRows + r] = vsum(acc[r]);
  }
}
}  // namespace
#endif

void matvec_grouped(DType t, const uint8_t* data, int64_t rows, int64_t cols, const float* x, float* y) {
#if !defined(LONGLLAMA_GROUP_AVX512)
  matvec_grouped_scalar(t, data, rows, cols, x, y);
#else
  check(t, rows, cols, "matvec_grouped");
  if (t == DType::F16) return matvec_half_groups<DType::F16>(data, rows, cols, x, y);
  if (t == DType::BF16) return matvec_half_groups<DType::BF16>(data, rows, cols, x, y);
  throw Error("matvec_grouped: float activations are for F16/BF16 groups");
#endif
}

}  // namespace ll
