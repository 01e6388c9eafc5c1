// Kernel benchmarks (Google Benchmark): each of our kernels next to the library path it must
// beat. Bytes/s counters let the numbers be read against `longllama bench`'s measured bandwidth.
//   build/bench/bench_kernels --benchmark_filter=Matvec
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>
#include <vector>

#include "memory/kv_memory.h"
#include "ops/attention.h"
#include "ops/matmul.h"
#include "ops/qgroup.h"
#include "ops/quant.h"
#include "perf/machine.h"
#include "util/huge_alloc.h"

using namespace ll;

namespace {

constexpr int kRows = 8640, kCols = 3200;  // LongLLaMA-3B's up/gate projection

struct TestMatrix {
  std::shared_ptr<uint8_t> mem;
  MatrixRef ref;
  std::vector<float> x;
  TestMatrix(DType t, int rows, int cols, bool grouped = false) : x(size_t(cols)) {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    std::vector<float> row(static_cast<size_t>(cols));
    mem = alloc_huge(row_bytes(t, cols) * size_t(rows));
    for (int r = 0; r < rows; ++r) {
      for (float& v : row) v = nd(rng);
      quantize_row(t, row.data(), cols, mem.get() + size_t(r) * row_bytes(t, cols));
    }
    for (float& v : x) v = nd(rng);
    ref = {t, rows, cols, mem.get()};
    if (grouped) {  // the 16-row layout that Weights repacks Q8_0/Q4_0/F16 into (ops/qgroup.h)
      auto g = alloc_huge(bytes());
      group_rows(t, mem.get(), rows, cols, g.get());
      mem = g;
      ref = {t, rows, cols, mem.get(), true};
    }
  }
  size_t bytes() const { return row_bytes(ref.type, ref.cols) * size_t(ref.rows); }
};

// A grouped layout this build does not decode with a SIMD kernel (F16/BF16 groups without
// AVX-512) would time the scalar reference: skipped.
bool skip_unused_layout(benchmark::State& st, DType t, bool grouped) {
  if (!grouped || should_group(t, kRows, kCols)) return false;
  st.SkipWithError("this build keeps the plain rows for this type");
  return true;
}

void BM_Matvec(benchmark::State& st, DType t, bool grouped) {
  if (skip_unused_layout(st, t, grouped)) return;
  TestMatrix m(t, kRows, kCols, grouped);
  std::vector<float> y(kRows);
  for (auto _ : st) {
    matvec(m.ref, m.x.data(), y.data());
    benchmark::DoNotOptimize(y.data());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(m.bytes()));
}

// One core's compute ceiling: range(0) rows of 3200 on one thread, few enough (0.2-0.8 MB) to stay
// in that core's L2 (1 MiB per core on the Xeon VMs) between calls. Compare with the per-core share
// of BM_ReadDram: a kernel whose figure here is not well above it is compute-bound in decoding.
void BM_MatvecOneCore(benchmark::State& st, DType t) {
  const int prev = omp_get_max_threads(), rows = int(st.range(0));
  omp_set_num_threads(1);
  TestMatrix m(t, rows, kCols, should_group(t, rows, kCols));
  std::vector<float> y(static_cast<size_t>(rows), 0.0f);
  for (auto _ : st) {
    matvec(m.ref, m.x.data(), y.data());
    benchmark::DoNotOptimize(y.data());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(m.bytes()));
  omp_set_num_threads(prev);
}

// The same kernel cycling through 12 matrices (0.2-0.7 GB), so every byte comes from DRAM as in a
// decoded token (one 8640 x 3200 matrix fits the 32 MiB L3 at q4_0 and q8_0). Read next to
// BM_ReadBandwidth: the ratio is the kernel's share of the machine's streaming bandwidth.
void BM_MatvecDram(benchmark::State& st, DType t, bool grouped) {
  if (skip_unused_layout(st, t, grouped)) return;
  const int saved_prefetch = matvec_prefetch_bytes;
  matvec_prefetch_bytes = int(st.range(0));
  std::vector<std::unique_ptr<TestMatrix>> ms;
  for (int i = 0; i < 12; ++i) ms.push_back(std::make_unique<TestMatrix>(t, kRows, kCols, grouped));
  std::vector<float> y(kRows);
  size_t i = 0;
  for (auto _ : st) {
    const TestMatrix& m = *ms[i++ % ms.size()];
    matvec(m.ref, m.x.data(), y.data());
    benchmark::DoNotOptimize(y.data());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(ms[0]->bytes()));
  matvec_prefetch_bytes = saved_prefetch;
}

// The probe's loop over 12 buffers of one matrix's size (range(0) bytes), one buffer per call, as
// BM_MatvecDram cycles its matrices: what streaming reads at the kernels' granularity.
void BM_ReadDram(benchmark::State& st) {
  std::vector<std::unique_ptr<BandwidthProbe>> bufs;
  for (int i = 0; i < 12; ++i) bufs.push_back(std::make_unique<BandwidthProbe>(size_t(st.range(0))));
  size_t i = 0;
  for (auto _ : st) benchmark::DoNotOptimize(bufs[i++ % bufs.size()]->pass());
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(bufs[0]->bytes()));
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// Each sample's share of the bandwidth of its own moment, by regime.
struct Shares {
  std::vector<double> high, low, rates;  // share (probe > / <= 44 GB/s), bytes/s
};

// Runs `sample(it, v)` (which reads `bytes`) range(0) times, each between two BandwidthProbe
// passes, the `variants` taking turns (v = it % variants), and returns each variant's shares of the
// probe around it. This VM's bandwidth jumps between regimes (~33 and ~55 GB/s here, for seconds to
// minutes), so the shares are split by the probe (above or below 44 GB/s).
template <typename F>
std::vector<Shares> paired_turns(benchmark::State& st, size_t bytes, size_t variants, F&& sample) {
  BandwidthProbe probe(size_t(1) << 27);
  std::vector<Shares> out(variants);
  for (auto _ : st) {
    double last = probe.pass();
    for (int it = 0; it < int(st.range(0)); ++it) {
      const size_t v = size_t(it) % variants;
      const auto t0 = std::chrono::steady_clock::now();
      sample(it, v);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double next = probe.pass(), bw = 0.5 * (last + next), rate = double(bytes) / dt;
      (bw > 44e9 ? out[v].high : out[v].low).push_back(rate / bw);
      out[v].rates.push_back(rate);
      last = next;
    }
  }
  return out;
}

// One variant: ratio_high/ratio_low are the medians of the shares, n_high/n_low the sample counts.
template <typename F>
void run_paired(benchmark::State& st, size_t bytes, F&& sample) {
  const Shares r = paired_turns(st, bytes, 1, [&](int it, size_t) { sample(it); })[0];
  st.counters["kernel_bytes_per_second"] = median(r.rates);
  st.counters["ratio_high"] = median(r.high);
  st.counters["n_high"] = double(r.high.size());
  st.counters["ratio_low"] = median(r.low);
  st.counters["n_low"] = double(r.low.size());
}

// Decode-like matvec sweeps: LongLLaMA-3B's seven matrices per layer, 8 layers cycled, 4 layers
// per sample (0.3-1 GB, so the weights come from DRAM as in a decoded token).
void BM_DecodeSweepPaired(benchmark::State& st, DType t) {
  std::vector<std::unique_ptr<TestMatrix>> ms;
  for (int l = 0; l < 8; ++l) {
    for (int i = 0; i < 4; ++i) ms.push_back(std::make_unique<TestMatrix>(t, 3200, 3200, should_group(t, 3200, 3200)));
    for (int i = 0; i < 2; ++i) ms.push_back(std::make_unique<TestMatrix>(t, 8640, 3200, should_group(t, 8640, 3200)));
    ms.push_back(std::make_unique<TestMatrix>(t, 3200, 8640, should_group(t, 3200, 8640)));
  }
  size_t layer_bytes = 0;
  for (int i = 0; i < 7; ++i) layer_bytes += ms[size_t(i)]->bytes();
  std::vector<float> y(8640);
  run_paired(st, 4 * layer_bytes, [&](int it) {
    for (int k = 0; k < 4; ++k)
      for (int i = 0; i < 7; ++i) {
        const TestMatrix& m = *ms[size_t(((4 * it + k) % 8) * 7 + i)];
        matvec(m.ref, m.x.data(), y.data());
      }
  });
}

// H heads of D over n tokens of bf16 memory, keys = values = N(0, 1).
std::unique_ptr<KVMemory> random_bf16_memory(int H, int D, int n) {
  auto mem = std::make_unique<KVMemory>(H, D, MemDType::BF16);
  std::vector<float> k(size_t(KVMemory::kChunkTokens) * H * D);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& v : k) v = nd(rng);
  for (int done = 0; done < n; done += KVMemory::kChunkTokens) mem->append(k.data(), k.data(), KVMemory::kChunkTokens, H * D);
  return mem;
}

// Reads `rows` bf16 rows of D (a plain sum, so the compiler keeps the loads).
uint64_t read_rows(const void* p, int rows, int D) {
  const auto* w = static_cast<const uint64_t*>(p);
  uint64_t sum = 0;
  for (size_t o = 0; o < size_t(rows) * D * 2 / 8; ++o) sum += w[o];
  return sum;
}

// The decode memory attention as Session::attention runs it: a range of heads per thread, chunk by
// chunk, all their keys and then all their values. `read_only`: just read those bytes in that order.
void memory_attention_ranges(const KVMemory& mem, const float* q, float* out, int H, int D, bool read_only = false) {
#pragma omp parallel
  {
    const int T = omp_get_num_threads(), t = omp_get_thread_num(), h0 = H * t / T, h1 = H * (t + 1) / T;
    std::vector<HeadAttention> att;
    for (int h = h0; h < h1; ++h) att.emplace_back(q + size_t(h) * D, 1, D, D);
    uint64_t sum = 0;
    for (int64_t b = 0; b < mem.size(); b += KVMemory::kChunkTokens) {
      for (int h = h0; h < h1; ++h) {
        const KVBlock blk = mem.block(h, b, KVMemory::kChunkTokens);
        if (read_only) sum += read_rows(blk.k, blk.n, D);
        else att[size_t(h - h0)].add_keys(blk);
      }
      for (int h = h0; h < h1; ++h) {
        const KVBlock blk = mem.block(h, b, KVMemory::kChunkTokens);
        if (read_only) sum += read_rows(blk.v, blk.n, D);
        else att[size_t(h - h0)].add_values(blk);
      }
    }
    for (int h = h0; h < h1; ++h) att[size_t(h - h0)].finish(out + size_t(h) * D, D);
    benchmark::DoNotOptimize(sum);
  }
}

// The decode memory attention: 32 heads of 100 over a bf16 memory of range(1) tokens each, one
// query per head, heads across the threads as in a memory layer (2.5 GB at 64k tokens: 3 layers).
void BM_MemoryAttentionPaired(benchmark::State& st) {
  const int D = 100, H = 32;
  const auto mem = random_bf16_memory(H, D, int(st.range(1)));
  std::vector<float> q(size_t(H) * D, 0.1f), out(size_t(H) * D);
  run_paired(st, mem->bytes(), [&](int) { memory_attention_ranges(*mem, q.data(), out.data(), H, D); });
}

// The order in which the decode memory attention reads a 32-head bf16 memory (64k tokens), the
// variants taking turns sample by sample so that each sees both bandwidth regimes (shares of the
// probe around each sample, medians; hi_/lo_ = above/below 44 GB/s):
//   heads:      one head at a time (a task per head), add() per chunk: 200 KB runs 6.5 MB apart;
//   ranges:     a range of heads per thread, chunk by chunk, all keys then all values (Session);
//   ranges_no_prefetch: the same without the kernel's software prefetch;
//   read_heads / read_ranges: only reading the same bytes in those two orders.
void BM_MemoryAttentionOrder(benchmark::State& st) {
  const int D = 100, H = 32;
  const std::vector<std::string> names = {"heads", "ranges", "ranges_no_prefetch", "read_heads", "read_ranges"};
  const auto mem = random_bf16_memory(H, D, 65536);
  std::vector<float> q(size_t(H) * D, 0.1f), out(size_t(H) * D);
  const auto shares = paired_turns(st, mem->bytes(), names.size(), [&](int, size_t v) {
    const int saved = HeadAttention::prefetch_bytes;
    if (v == 2) HeadAttention::prefetch_bytes = 0;
    if (v == 0 || v == 3) {
#pragma omp parallel for schedule(dynamic, 1)
      for (int h = 0; h < H; ++h) {
        HeadAttention att(q.data() + size_t(h) * D, 1, D, D);
        uint64_t sum = 0;
        for (int64_t b = 0; b < mem->size();) {
          const KVBlock blk = mem->block(h, b, KVMemory::kChunkTokens);
          if (v == 0) att.add(blk);
          else sum += read_rows(blk.k, blk.n, D) + read_rows(blk.v, blk.n, D);
          b += blk.n;
        }
        att.finish(out.data() + size_t(h) * D, D);
        benchmark::DoNotOptimize(sum);
      }
    } else {
      memory_attention_ranges(*mem, q.data(), out.data(), H, D, v == 4);
    }
    HeadAttention::prefetch_bytes = saved;
  });
  for (size_t v = 0; v < names.size(); ++v) {
    st.counters["hi_" + names[v]] = median(shares[v].high);
    st.counters["lo_" + names[v]] = median(shares[v].low);
  }
}

// The streaming-read probe of `longllama bench` (1 GiB, best of 5), as a counter.
void BM_ReadBandwidth(benchmark::State& st) {
  double bw = 0.0;
  for (auto _ : st) bw = measure_read_bandwidth();
  st.counters["probe_bytes_per_second"] = bw;
}

// The library path for f32: OpenBLAS sgemv on the same matrix.
void BM_Matvec_LibrarySgemv(benchmark::State& st) {
  TestMatrix m(DType::F32, kRows, kCols);
  std::vector<float> y(kRows);
  for (auto _ : st) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, kRows, kCols, 1.0f, static_cast<const float*>(m.ref.data), kCols,
                m.x.data(), 1, 0.0f, y.data(), 1);
    benchmark::DoNotOptimize(y.data());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(m.bytes()));
}

// Prefill: our matmul (panel dequantization + sgemm) for n tokens; FLOP/s counter.
void BM_Matmul(benchmark::State& st, DType t) {
  const int n = int(st.range(0));
  TestMatrix m(t, kRows, kCols, should_group(t, kRows, kCols));  // the layout Weights gives the model
  std::vector<float> x(size_t(n) * kCols, 0.01f), y(size_t(n) * kRows);
  for (auto _ : st) {
    matmul(m.ref, x.data(), n, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  st.counters["FLOP/s"] = benchmark::Counter(2.0 * n * kRows * kCols * double(st.iterations()), benchmark::Counter::kIsRate);
}

// Prefill's dequantization alone: 64 grouped rows of 3200 (800 KB of floats, L2-resident), one
// thread; elements/s. Matmul above is this plus sgemm, so this says what the widening costs.
void BM_DequantizeGrouped(benchmark::State& st, DType t) {
  constexpr int kPanelRows = 64;
  TestMatrix m(t, kPanelRows, kCols, true);
  std::vector<float> out(size_t(kPanelRows) * kCols);
  for (auto _ : st) {
    dequantize_grouped(t, static_cast<const uint8_t*>(m.ref.data), kCols, 0, kPanelRows, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  st.counters["elements/s"] =
      benchmark::Counter(double(kPanelRows) * kCols * double(st.iterations()), benchmark::Counter::kIsRate);
}

// Decoding over memory: one query of one head against a memory of range(0) tokens (bf16 or q8) in
// blocks of range(1) keys
// through HeadAttention (fused, widens rows in registers or, for q8 keys, integer dot products
// against an int16 query (fused_q8) instead of widening them to float (fused_q8_float_scores);
// with and without its software prefetch;
// 64k tokens of one head mostly fit the L3 cache, 256k do not), vs the library path (convert to f32,
// then sgemv for the scores and for the weighted values).
void BM_MemoryAttention(benchmark::State& st, bool library, MemDType type, bool bf16_kernel = true,
                        int prefetch_bytes = 4096, bool i8_kernel = true) {
  HeadAttention::bf16_kernel = bf16_kernel;
  HeadAttention::i8_kernel = i8_kernel;
  HeadAttention::prefetch_bytes = prefetch_bytes;
  const int n = int(st.range(0)), D = 100;
  KVMemory mem(1, D, type);
  std::vector<float> k(size_t(KVMemory::kChunkTokens) * D, 0.01f);
  for (int done = 0; done < n; done += KVMemory::kChunkTokens) mem.append(k.data(), k.data(), KVMemory::kChunkTokens, D);
  std::vector<float> q(D, 0.1f), out(D), kf(size_t(n) * D), vf(size_t(n) * D), s(n);
  for (auto _ : st) {
    if (library) {
      mem.read(0, 0, n, kf.data(), vf.data());
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n, D, 0.1f, kf.data(), D, q.data(), 1, 0.0f, s.data(), 1);
      float m = s[0], z = 0;
      for (float v : s) m = std::max(m, v);
      for (float& v : s) z += (v = std::exp(v - m));
      cblas_sgemv(CblasRowMajor, CblasTrans, n, D, 1.0f / z, vf.data(), D, s.data(), 1, 0.0f, out.data(), 1);
    } else {
      HeadAttention att(q.data(), 1, D, D);
      for (int64_t b = 0; b < mem.size();) {
        const KVBlock blk = mem.block(0, b, int(st.range(1)));
        att.add(blk);
        b += blk.n;
      }
      att.finish(out.data(), D);
    }
    benchmark::DoNotOptimize(out.data());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(mem.bytes()));
}

// One decoded query's exact top-k scan (TopKScorer, k = 32) over n memory keys of one head of 100
// (random keys, so the heap sees realistic replacement traffic). Bytes: the keys only; compare with
// BM_MemoryAttention, which reads keys and values.
void BM_TopKScan(benchmark::State& st, MemDType type, bool i8_kernel = true) {
  HeadAttention::i8_kernel = i8_kernel;  // q8: integer scores, or widened to float32 first
  const int n = int(st.range(0)), D = 100;
  KVMemory mem(1, D, type);
  std::vector<float> k(size_t(KVMemory::kChunkTokens) * D);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& v : k) v = nd(rng);
  for (int done = 0; done < n; done += KVMemory::kChunkTokens) mem.append(k.data(), k.data(), KVMemory::kChunkTokens, D);
  std::vector<float> q(D);
  for (float& v : q) v = nd(rng);
  for (auto _ : st) {
    TopKScorer topk(q.data(), 1, D, D, 32);
    for (int64_t b = 0; b < mem.size();) {
      const KVBlock blk = mem.block(0, b, KVMemory::kChunkTokens);
      topk.add(blk, b);
      b += blk.n;
    }
    auto hits = topk.take(0);
    benchmark::DoNotOptimize(hits.data());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(mem.bytes() / 2));
}

}  // namespace

BENCHMARK_CAPTURE(BM_Matvec, f32, DType::F32, false)->UseRealTime();
BENCHMARK(BM_Matvec_LibrarySgemv)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matvec, f16_rows, DType::F16, false)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matvec, f16_grouped, DType::F16, true)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matvec, bf16, DType::BF16, false)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matvec, q8_0_rows, DType::Q8_0, false)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matvec, q8_0_grouped, DType::Q8_0, true)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matvec, q4_0_rows, DType::Q4_0, false)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matvec, q4_0_grouped, DType::Q4_0, true)->UseRealTime();
// Arg: rows.
BENCHMARK_CAPTURE(BM_MatvecOneCore, f16, DType::F16)->Arg(128)->UseRealTime();
BENCHMARK_CAPTURE(BM_MatvecOneCore, q8_0, DType::Q8_0)->Arg(256)->UseRealTime();
BENCHMARK_CAPTURE(BM_MatvecOneCore, q4_0, DType::Q4_0)->Arg(256)->UseRealTime();
BENCHMARK(BM_ReadBandwidth)->Iterations(1)->UseRealTime();
BENCHMARK_CAPTURE(BM_DecodeSweepPaired, f16, DType::F16)->Arg(300)->Iterations(1)->UseRealTime();
BENCHMARK_CAPTURE(BM_DecodeSweepPaired, q8_0, DType::Q8_0)->Arg(300)->Iterations(1)->UseRealTime();
BENCHMARK_CAPTURE(BM_DecodeSweepPaired, q4_0, DType::Q4_0)->Arg(300)->Iterations(1)->UseRealTime();
BENCHMARK(BM_MemoryAttentionPaired)->Args({40, 65536})->Iterations(1)->UseRealTime();
BENCHMARK(BM_MemoryAttentionOrder)->Arg(100)->Iterations(1)->UseRealTime();
BENCHMARK(BM_ReadDram)->Arg(15552000)->Arg(55296000)->Arg(268435456)->UseRealTime();
// Arg: software prefetch distance in bytes (0 = hardware prefetcher only).
BENCHMARK_CAPTURE(BM_MatvecDram, f16_rows, DType::F16, false)->Arg(0)->Arg(1024)->UseRealTime();
BENCHMARK_CAPTURE(BM_MatvecDram, f16_grouped, DType::F16, true)->Arg(0)->Arg(2048)->UseRealTime();
BENCHMARK_CAPTURE(BM_MatvecDram, q8_0_grouped, DType::Q8_0, true)->Arg(0)->Arg(1024)->Arg(2048)->Arg(8192)->UseRealTime();
BENCHMARK_CAPTURE(BM_MatvecDram, q4_0_grouped, DType::Q4_0, true)->Arg(0)->Arg(1024)->Arg(2048)->Arg(8192)->UseRealTime();
BENCHMARK(BM_ReadBandwidth)->Iterations(1)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, f32, DType::F32)->Arg(64)->Arg(512)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, f16, DType::F16)->Arg(64)->Arg(512)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, q8_0, DType::Q8_0)->Arg(512)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, q4_0, DType::Q4_0)->Arg(512)->UseRealTime();
BENCHMARK_CAPTURE(BM_DequantizeGrouped, f16, DType::F16)->UseRealTime();
BENCHMARK_CAPTURE(BM_DequantizeGrouped, q8_0, DType::Q8_0)->UseRealTime();
BENCHMARK_CAPTURE(BM_DequantizeGrouped, q4_0, DType::Q4_0)->UseRealTime();
// Arg: memory tokens.
BENCHMARK_CAPTURE(BM_TopKScan, bf16, MemDType::BF16)->Arg(65536)->UseRealTime();
BENCHMARK_CAPTURE(BM_TopKScan, f16, MemDType::F16)->Arg(65536)->UseRealTime();
BENCHMARK_CAPTURE(BM_TopKScan, f32, MemDType::F32)->Arg(65536)->UseRealTime();
BENCHMARK_CAPTURE(BM_TopKScan, q8, MemDType::Q8)->Arg(65536)->UseRealTime();
BENCHMARK_CAPTURE(BM_TopKScan, q8_float_scores, MemDType::Q8, false)->Arg(65536)->UseRealTime();
// Args: memory tokens, keys per block (the session uses 1024).
BENCHMARK_CAPTURE(BM_MemoryAttention, fused_bf16, false, MemDType::BF16)->Args({2048, 1024})->Args({65536, 1024})->Args({262144, 1024})->Args({262144, 256})->UseRealTime();
BENCHMARK_CAPTURE(BM_MemoryAttention, fused_bf16_no_prefetch, false, MemDType::BF16, true, 0)->Args({2048, 1024})->Args({65536, 1024})->Args({262144, 1024})->UseRealTime();
BENCHMARK_CAPTURE(BM_MemoryAttention, fused_bf16_highway, false, MemDType::BF16, false)->Args({65536, 1024})->UseRealTime();
BENCHMARK_CAPTURE(BM_MemoryAttention, library_bf16, true, MemDType::BF16)->Args({65536, 1024})->UseRealTime();
BENCHMARK_CAPTURE(BM_MemoryAttention, fused_q8, false, MemDType::Q8)->Args({65536, 1024})->Args({262144, 1024})->UseRealTime();
BENCHMARK_CAPTURE(BM_MemoryAttention, fused_q8_no_prefetch, false, MemDType::Q8, true, 0)->Args({65536, 1024})->Args({262144, 1024})->UseRealTime();
BENCHMARK_CAPTURE(BM_MemoryAttention, fused_q8_float_scores, false, MemDType::Q8, true, 4096, false)->Args({65536, 1024})->Args({262144, 1024})->UseRealTime();

BENCHMARK_MAIN();
