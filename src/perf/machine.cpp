#include "perf/machine.h"

#include <cblas.h>
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "hwy/highway.h"
#include "util/huge_alloc.h"

namespace hn = hwy::HWY_NAMESPACE;

namespace ll {

namespace {
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
}  // namespace

BandwidthProbe::BandwidthProbe(size_t bytes) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  n_ = std::max(bytes / sizeof(float) / (4 * N), size_t(1)) * (4 * N);
  mem_ = alloc_huge(n_ * sizeof(float));
  float* a = reinterpret_cast<float*>(mem_.get());
  const size_t n = n_;
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) a[i] = float(i & 7);  // first touch by the reading thread
}

double BandwidthProbe::pass() {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d), n = n_;
  const float* a = reinterpret_cast<const float*>(mem_.get());
  const double t0 = now();
  float total = 0.0f;
#pragma omp parallel reduction(+ : total)
  {
    auto s0 = hn::Zero(d), s1 = hn::Zero(d), s2 = hn::Zero(d), s3 = hn::Zero(d);
#pragma omp for schedule(static)
    for (size_t i = 0; i < n; i += 4 * N) {
      s0 = hn::Add(s0, hn::Load(d, a + i));
      s1 = hn::Add(s1, hn::Load(d, a + i + N));
      s2 = hn::Add(s2, hn::Load(d, a + i + 2 * N));
      s3 = hn::Add(s3, hn::Load(d, a + i + 3 * N));
    }
    total += hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(s0, s1), hn::Add(s2, s3))));
  }
  const double dt = now() - t0;
  static volatile float sink = 0.0f;
  sink = sink + total;
  return double(bytes()) / dt;
}

double measure_read_bandwidth(size_t bytes, int repeats) {
  BandwidthProbe probe(bytes);
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) best = std::max(best, probe.pass());
  return best;
}

double measure_sgemm_flops(int n, int repeats) {
  std::vector<float> a(size_t(n) * n, 0.5f), b(size_t(n) * n, 0.25f), c(size_t(n) * n);
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) {
    const double t0 = now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    best = std::max(best, 2.0 * double(n) * n * n / (now() - t0));
  }
  return best;
}

size_t peak_rss_bytes() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return size_t(ru.ru_maxrss) * 1024;
}

}  // namespace ll
