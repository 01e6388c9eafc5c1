#pragma once
// This machine's limits, measured in the same run as the benchmarks they are compared with
// (these machines are shared and noisy: only ratios taken in one run mean much).
#include <cstddef>

namespace ll {

// Read bandwidth in bytes/s: best of `repeats` full passes over a huge-page buffer of `bytes`,
// summed with SIMD on all OpenMP threads (as decoding streams its weights).
double measure_read_bandwidth(size_t bytes = size_t(1) << 30, int repeats = 5);
// OpenBLAS sgemm FLOP/s for n x n x n, best of `repeats`.
double measure_sgemm_flops(int n = 2048, int repeats = 3);
// Peak resident set size of this process so far, in bytes.
size_t peak_rss_bytes();

}  // namespace ll
