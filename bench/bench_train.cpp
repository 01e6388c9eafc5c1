// Training kernels at the dictionary recipe's shapes (models/dict-recipe): crossbatch attention
// forward and backward, S = 256, head width 128. `local` is a range-1 stage (A' to E: 4 heads
// of 32, a pack of 2 entries); `memory` is one merged head with 15 earlier entries (a slice of
// stage N's 127). GFLOP/s counts the products the masked layout needs (causal half of the own
// block), so it shows how much of the work the kernels skip or waste.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "train/crossbatch.h"

namespace {

using ll::train::CrossBatch;

struct Inputs {
  std::vector<float> Q, Kown, Kx, V, dO, lse, O, dQ, dKown, dKx, dV;
  Inputs(int B, int S, int H, int D) {
    const size_t n = size_t(B) * S * H * D;
    std::mt19937 rng(7);
    std::normal_distribution<float> N(0.0f, 1.0f);
    for (auto* v : {&Q, &Kown, &Kx, &V, &dO}) {
      v->resize(n);
      for (float& x : *v) x = N(rng);
    }
    for (auto* v : {&O, &dQ, &dKown, &dKx, &dV}) v->assign(n, 0.0f);
    lse.assign(size_t(B) * H * S, 0.0f);
  }
};

// Multiply-adds of one pass over the blocks (scores or values), counting only unmasked pairs.
double pair_macs(const CrossBatch& cb, int B, int S, int H, int D) {
  double pairs = 0;
  for (int b = 0; b < B; ++b) pairs += double(cb.contexts(b) - 1) * S * S + double(S) * (S + 1) / 2;
  return pairs * H * D;
}

void BM_AttentionTrain(benchmark::State& st, CrossBatch cb, int B, int H, bool backward) {
  const int S = 256, D = 128 / H;
  Inputs in(B, S, H, D);
  ll::train::attention_fwd(cb, B, S, H, D, in.Q.data(), in.Kown.data(), in.Kx.data(), in.V.data(), in.lse.data(),
                           in.O.data());
  for (auto _ : st) {
    if (backward)
      ll::train::attention_bwd(cb, B, S, H, D, in.Q.data(), in.Kown.data(), in.Kx.data(), in.V.data(), in.lse.data(),
                               in.O.data(), in.dO.data(), in.dQ.data(), in.dKown.data(), in.dKx.data(), in.dV.data());
    else
      ll::train::attention_fwd(cb, B, S, H, D, in.Q.data(), in.Kown.data(), in.Kx.data(), in.V.data(), in.lse.data(),
                               in.O.data());
  }
  // forward: scores + values; backward: scores, dP, dQ, dV, dK
  const double flops = 2.0 * pair_macs(cb, B, S, H, D) * (backward ? 5 : 2);
  st.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

const CrossBatch kLocal{2, 1, true, true}, kMemory{2, 15, true, true};

BENCHMARK_CAPTURE(BM_AttentionTrain, local_fwd, kLocal, 32, 4, false)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_AttentionTrain, local_bwd, kLocal, 32, 4, true)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_AttentionTrain, memory_fwd, kMemory, 32, 1, false)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_AttentionTrain, memory_bwd, kMemory, 32, 1, true)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
