#pragma once
// This machine's limits, measured in the same run as the benchmarks they are compared with
// (these machines are shared and noisy: only ratios taken in one run mean much).
#include <cstddef>
#include <cstdint>
#include <memory>

namespace ll {

// A streaming read over a fixed huge-page buffer, summed with SIMD on all OpenMP threads (as
// decoding streams its weights). The read bandwidth of these shared VMs jumps between regimes
// (about 33 and 55 GB/s here, for seconds at a time), so a workload is compared with passes
// taken right before and after each of its steps, not with a best figure from another moment.
class BandwidthProbe {
 public:
  explicit BandwidthProbe(size_t bytes = size_t(1) << 28);
  double pass();  // bytes/s of one read of the whole buffer
  size_t bytes() const { return n_ * sizeof(float); }

 private:
  std::shared_ptr<uint8_t> mem_;
  size_t n_ = 0;  // floats
};

// Peak read bandwidth in bytes/s: best of `repeats` BandwidthProbe passes over `bytes`.
double measure_read_bandwidth(size_t bytes = size_t(1) << 30, int repeats = 5);
// OpenBLAS sgemm FLOP/s for n x n x n, best of `repeats`.
double measure_sgemm_flops(int n = 2048, int repeats = 3);
// Peak resident set size of this process so far, in bytes.
size_t peak_rss_bytes();

}  // namespace ll
