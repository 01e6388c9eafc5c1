// Numerical kernels against plain, obviously-correct reference implementations (mostly in
// double precision): BLAS matmul, RMSNorm, SiLU·up, RoPE, blockwise online-softmax attention,
// the bf16/f16 conversions and the chunked key/value memory.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "memory/kv_memory.h"
#include "ops/ops.h"
#include "util/half.h"

#ifdef __F16C__
#include <immintrin.h>
#endif

namespace {

// Odd vector sizes and tails, including a couple of realistic large ones (8640 = OpenLLaMA 3B
// intermediate size).
const int kVecSizes[] = {1, 3, 17, 100, 255, 257, 3200, 8640};

std::vector<float> random_vec(std::mt19937_64& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------------------------------------
// Independent reference roundings (exact arithmetic in double, ties to even).

// Value of a bf16 magnitude pattern (0..0x7f80); 0x7f80 counts as 2^128 for rounding decisions.
double bf16_mag_value(uint32_t h) {
  if (h == 0x7f80u) return std::ldexp(1.0, 128);
  return double(from_bits(h << 16));
}

uint16_t ref_f32_to_bf16(float x) {
  const uint32_t u = bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  if (std::isnan(x)) return uint16_t(sign | 0x7fc0u);
  if (std::isinf(x)) return uint16_t(sign | 0x7f80u);
  const double a = std::fabs(double(x));
  const uint32_t lo = (u & 0x7fffffffu) >> 16;  // truncation: largest bf16 magnitude <= a
  const double vlo = bf16_mag_value(lo);
  if (vlo == a) return uint16_t(sign | lo);
  const uint32_t hi = lo + 1;
  const double vhi = bf16_mag_value(hi);
  const double dlo = a - vlo, dhi = vhi - a;  // exact in double
  uint32_t r;
  if (dlo < dhi) r = lo;
  else if (dhi < dlo) r = hi;
  else r = (lo & 1u) ? hi : lo;
  return uint16_t(sign | r);
}

// Exact value of an f16 bit pattern, decoded with ldexp (no bit tricks).
double ref_f16_value(uint16_t h) {
  const int sign = (h & 0x8000u) ? -1 : 1;
  const int e = (h >> 10) & 0x1f;
  const int m = h & 0x3ff;
  if (e == 0x1f) return m ? std::numeric_limits<double>::quiet_NaN() : sign * HUGE_VAL;
  if (e == 0) return sign * std::ldexp(double(m), -24);
  return sign * std::ldexp(double(1024 + m), e - 25);
}

// Magnitude pattern value for rounding; 0x7c00 counts as 65536 (the next binade's first value).
double f16_mag_value(uint32_t h) { return h == 0x7c00u ? 65536.0 : ref_f16_value(uint16_t(h)); }

uint16_t ref_f32_to_f16(float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  if (std::isnan(x)) return uint16_t(sign | 0x7e00u);
  const double a = std::fabs(double(x));
  if (a >= 65536.0) return uint16_t(sign | 0x7c00u);
  // largest magnitude pattern h in [0, 0x7bff] with value <= a (values increase with h)
  uint32_t lo = 0, hi = 0x7bff;
  while (lo < hi) {
    const uint32_t mid = (lo + hi + 1) / 2;
    if (f16_mag_value(mid) <= a) lo = mid;
    else hi = mid - 1;
  }
  const double vlo = f16_mag_value(lo);
  if (vlo == a) return uint16_t(sign | lo);
  const uint32_t up = lo + 1;
  const double dlo = a - vlo, dup = f16_mag_value(up) - a;
  uint32_t r;
  if (dlo < dup) r = lo;
  else if (dup < dlo) r = up;
  else r = (lo & 1u) ? up : lo;
  return uint16_t(sign | r);
}

// ---------------------------------------------------------------------------------------------
// matmul_nt

void check_matmul(int n, int k, int m, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto x = random_vec(rng, size_t(n) * k);
  const auto W = random_vec(rng, size_t(m) * k);
  const int guard = 8;
  // Pre-filled with NaN: the output must not depend on what was in y, and nothing past n*m may
  // be written.
  std::vector<float> y(size_t(n) * m + guard, std::numeric_limits<float>::quiet_NaN());
  ll::matmul_nt(x.data(), n, k, W.data(), m, y.data());
  for (int i = 0; i < n; ++i)
    for (int o = 0; o < m; ++o) {
      double ref = 0.0, mag = 0.0;
      for (int j = 0; j < k; ++j) {
        ref += double(x[size_t(i) * k + j]) * double(W[size_t(o) * k + j]);
        mag += std::fabs(double(x[size_t(i) * k + j]) * double(W[size_t(o) * k + j]));
      }
      const float got = y[size_t(i) * m + o];
      ASSERT_NEAR(got, ref, 1e-5 * mag + 1e-30)
          << "n=" << n << " k=" << k << " m=" << m << " at (" << i << "," << o << ")";
    }
  for (int g = 0; g < guard; ++g) EXPECT_TRUE(std::isnan(y[size_t(n) * m + g])) << "wrote past the end";
}

TEST(MatmulNt, GemvPathSingleRow) {
  const int ks[] = {1, 3, 17, 100, 255, 257, 3200};
  const int ms[] = {1, 3, 17, 100, 257};
  uint64_t seed = 1;
  for (int k : ks)
    for (int m : ms) check_matmul(1, k, m, seed++);
  check_matmul(1, 8640, 3, seed++);
  check_matmul(1, 3, 8640, seed++);
}

TEST(MatmulNt, GemmPathSeveralRows) {
  struct Case { int n, k, m; };
  const Case cases[] = {{2, 1, 1},    {3, 17, 255}, {17, 100, 3},  {2, 255, 257}, {5, 1, 7},
                        {100, 257, 17}, {7, 3, 100},  {3, 3200, 5}, {255, 17, 3},  {17, 257, 100}};
  uint64_t seed = 100;
  for (const auto& c : cases) check_matmul(c.n, c.k, c.m, seed++);
}

TEST(MatmulNt, GemvAndGemmAgreeRowByRow) {
  // Row i of a multi-row product equals the single-row product of x[i].
  std::mt19937_64 rng(7);
  const int n = 9, k = 257, m = 100;
  const auto x = random_vec(rng, size_t(n) * k);
  const auto W = random_vec(rng, size_t(m) * k);
  std::vector<float> y(size_t(n) * m), y1(m);
  ll::matmul_nt(x.data(), n, k, W.data(), m, y.data());
  for (int i = 0; i < n; ++i) {
    ll::matmul_nt(x.data() + size_t(i) * k, 1, k, W.data(), m, y1.data());
    for (int o = 0; o < m; ++o) EXPECT_NEAR(y1[o], y[size_t(i) * m + o], 1e-5 * std::sqrt(double(k)));
  }
}

// ---------------------------------------------------------------------------------------------
// rmsnorm

TEST(RmsNorm, MatchesFormula) {
  std::mt19937_64 rng(11);
  const float epss[] = {1e-6f, 1e-5f};
  for (int d : kVecSizes)
    for (float eps : epss) {
      const int n = d >= 3200 ? 2 : 3;
      auto x = random_vec(rng, size_t(n) * d, -3.0f, 3.0f);
      const auto w = random_vec(rng, d, -2.0f, 2.0f);
      // row 1 at a very different scale, to make the per-row normalisation matter
      for (int j = 0; j < d; ++j) x[size_t(d) + j] *= 1e-2f;
      std::vector<float> out(size_t(n) * d);
      ll::rmsnorm(x.data(), w.data(), n, d, eps, out.data());
      for (int i = 0; i < n; ++i) {
        double ss = 0.0;
        for (int j = 0; j < d; ++j) ss += double(x[size_t(i) * d + j]) * x[size_t(i) * d + j];
        const double inv = 1.0 / std::sqrt(ss / d + double(eps));
        for (int j = 0; j < d; ++j) {
          const double ref = double(w[j]) * double(x[size_t(i) * d + j]) * inv;
          ASSERT_NEAR(out[size_t(i) * d + j], ref, 1e-5 * std::fabs(ref) + 1e-30)
              << "d=" << d << " eps=" << eps << " row " << i << " col " << j;
        }
      }
    }
}

TEST(RmsNorm, ZeroRowAndEpsDominated) {
  const int d = 17;
  std::vector<float> x(size_t(2) * d, 0.0f), w(d, 1.5f), out(size_t(2) * d, 123.0f);
  for (int j = 0; j < d; ++j) x[size_t(d) + j] = 1e-4f * float(j - 8);  // mean(x²) << eps
  const float eps = 1e-2f;
  ll::rmsnorm(x.data(), w.data(), 2, d, eps, out.data());
  for (int j = 0; j < d; ++j) EXPECT_EQ(out[j], 0.0f);
  double ss = 0.0;
  for (int j = 0; j < d; ++j) ss += double(x[size_t(d) + j]) * x[size_t(d) + j];
  for (int j = 0; j < d; ++j) {
    const double ref = 1.5 * x[size_t(d) + j] / std::sqrt(ss / d + double(eps));
    EXPECT_NEAR(out[size_t(d) + j], ref, 1e-6 * std::fabs(ref) + 1e-30);
  }
}

// ---------------------------------------------------------------------------------------------
// silu_mul

TEST(SiluMul, MatchesFormula) {
  std::mt19937_64 rng(13);
  for (int n : kVecSizes) {
    auto g = random_vec(rng, n, -20.0f, 20.0f);
    const auto u = random_vec(rng, n, -3.0f, 3.0f);
    // extremes and special points at the front (as many as fit)
    const float special[] = {0.0f, -0.0f, 1.0f, -1.0f, 100.0f, -100.0f, 88.0f, -87.0f, 1e-30f, -1e-30f};
    for (int i = 0; i < n && i < int(std::size(special)); ++i) g[i] = special[i];
    std::vector<float> out(n + 4, 77.0f);
    ll::silu_mul(g.data(), u.data(), n, out.data());
    for (int i = 0; i < n; ++i) {
      const double gd = g[i];
      const double ref = gd / (1.0 + std::exp(-gd)) * double(u[i]);
      ASSERT_NEAR(out[i], ref, 2e-6 * std::fabs(ref) + 1e-30) << "n=" << n << " i=" << i << " g=" << g[i];
    }
    for (int i = n; i < n + 4; ++i) EXPECT_EQ(out[i], 77.0f) << "wrote past the end";
  }
}

// ---------------------------------------------------------------------------------------------
// RoPE

// Direct HF rotate_half RoPE in double: inv_freq_j = theta^(-2j/D), angle = pos·inv_freq_j,
// x'[j] = x[j]cos - x[j+D/2]sin, x'[j+D/2] = x[j+D/2]cos + x[j]sin. pos may be negative.
std::vector<double> ref_rope(const std::vector<double>& x, double pos, double theta) {
  const int D = int(x.size()), half = D / 2;
  std::vector<double> y(x);
  for (int j = 0; j < half; ++j) {
    const double a = pos * std::pow(theta, -2.0 * j / D);
    y[j] = x[j] * std::cos(a) - x[j + half] * std::sin(a);
    y[j + half] = x[j + half] * std::cos(a) + x[j] * std::sin(a);
  }
  return y;
}

// Absolute error bound of a float32 angle (as HF and the table compute it: inv_freq from a
// float32 pow, angle = float(pos)·inv_freq in float32) relative to the exact angle.
double angle_err(double angle, double theta) { return angle * (std::log(theta) * 1.2e-7 + 3e-7) + 2e-7; }

TEST(Rope, MatchesRotateHalfReference) {
  std::mt19937_64 rng(17);
  const int dims[] = {2, 16, 64, 100, 128};
  const float thetas[] = {1e4f, 1e6f};
  const int64_t positions[] = {0, 1, 2, 7, 100, 1023, 1024, 4096, 5000, 3, 2047};  // non-monotonic on purpose
  for (int D : dims)
    for (float theta : thetas) {
      ll::RopeTable rope(D, theta);
      EXPECT_EQ(rope.head_dim(), D);
      const int half = D / 2;
      for (int64_t pos : positions) {
        const auto xf = random_vec(rng, D);
        std::vector<double> xd(xf.begin(), xf.end());
        auto got = xf;
        rope.apply(got.data(), pos);
        if (pos == 0) {  // identity, bit for bit
          for (int j = 0; j < D; ++j) EXPECT_EQ(got[j], xf[j]) << "D=" << D << " j=" << j;
          continue;
        }
        const auto ref = ref_rope(xd, double(pos), theta);
        for (int j = 0; j < D; ++j) {
          const int jj = j % half;
          const double ang = double(pos) * std::pow(double(theta), -2.0 * jj / D);
          const double tol = (std::fabs(xd[jj]) + std::fabs(xd[jj + half])) * (angle_err(ang, theta) + 1e-6);
          ASSERT_NEAR(got[j], ref[j], tol) << "D=" << D << " theta=" << theta << " pos=" << pos << " j=" << j;
        }
        // A rotation keeps the norm of every (j, j+D/2) pair.
        for (int j = 0; j < half; ++j) {
          const double n0 = std::hypot(xd[j], xd[j + half]), n1 = std::hypot(got[j], got[j + half]);
          EXPECT_NEAR(n1, n0, 1e-6 * n0 + 1e-7);
        }
      }
    }
}

TEST(Rope, SmallPositionsTightTolerance) {
  // At small positions the float32 angle is accurate: compare with a tight relative tolerance.
  std::mt19937_64 rng(19);
  for (int D : {16, 64, 128}) {
    ll::RopeTable rope(D, 10000.0f);
    for (int64_t pos = 1; pos <= 20; ++pos) {
      const auto xf = random_vec(rng, D);
      auto got = xf;
      rope.apply(got.data(), pos);
      const auto ref = ref_rope(std::vector<double>(xf.begin(), xf.end()), double(pos), 1e4);
      for (int j = 0; j < D; ++j) ASSERT_NEAR(got[j], ref[j], 1e-5) << "D=" << D << " pos=" << pos << " j=" << j;
    }
  }
}

TEST(Rope, EnsureThenApplyMatchesLazyGrowth) {
  const int D = 64;
  ll::RopeTable lazy(D, 1e4f), eager(D, 1e4f);
  eager.ensure(6000);
  std::mt19937_64 rng(23);
  for (int64_t pos : {5999, 0, 1, 4097, 2048, 6000}) {
    const auto x = random_vec(rng, D);
    auto a = x, b = x;
    lazy.apply(a.data(), pos);
    eager.apply(b.data(), pos);
    for (int j = 0; j < D; ++j) EXPECT_EQ(a[j], b[j]) << "pos=" << pos << " j=" << j;
  }
}

TEST(Rope, DotProductDependsOnlyOnRelativePosition) {
  std::mt19937_64 rng(29);
  struct P { int64_t p, pk; };
  const P pairs[] = {{0, 0}, {5, 0}, {10, 5}, {1000, 995}, {4005, 4000}, {5000, 5000}, {3, 7}, {4003, 4007}, {17, 4000}};
  for (int D : {16, 64, 100, 128})
    for (double theta : {1e4, 1e6}) {
      ll::RopeTable rope(D, float(theta));
      const auto q = random_vec(rng, D), k = random_vec(rng, D);
      double qn = 0.0, kn = 0.0;
      for (int j = 0; j < D; ++j) qn += double(q[j]) * q[j], kn += double(k[j]) * k[j];
      const double mag = std::sqrt(qn * kn);
      for (const auto& pp : pairs) {
        auto qr = q, kr = k;
        rope.apply(qr.data(), pp.p);
        rope.apply(kr.data(), pp.pk);
        double got = 0.0;
        for (int j = 0; j < D; ++j) got += double(qr[j]) * kr[j];
        // q rotated by the relative position, dotted with the unrotated key
        const auto qrel = ref_rope(std::vector<double>(q.begin(), q.end()), double(pp.p - pp.pk), theta);
        double ref = 0.0;
        for (int j = 0; j < D; ++j) ref += qrel[j] * k[j];
        const double tol = 2.0 * mag * (angle_err(double(std::max(pp.p, pp.pk)), theta) + 1e-6);
        EXPECT_NEAR(got, ref, tol) << "D=" << D << " theta=" << theta << " p=" << pp.p << " p'=" << pp.pk;
        // and the library's own dot agrees with the double dot of the same vectors
        EXPECT_NEAR(ll::dot(qr.data(), kr.data(), D), got, 1e-6 * mag);
      }
    }
}

TEST(Dot, MatchesDouble) {
  std::mt19937_64 rng(31);
  for (int n : kVecSizes) {
    const auto a = random_vec(rng, n), b = random_vec(rng, n);
    double ref = 0.0, mag = 0.0;
    for (int i = 0; i < n; ++i) ref += double(a[i]) * b[i], mag += std::fabs(double(a[i]) * b[i]);
    EXPECT_NEAR(ll::dot(a.data(), b.data(), n), ref, 1e-6 * mag + 1e-30) << "n=" << n;
  }
  EXPECT_EQ(ll::dot(nullptr, nullptr, 0), 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Attention: attend_block over several blocks, then attend_finish

struct Block {
  std::vector<float> k, v;  // [nk][D]
  int nk;
  std::vector<int> limit;   // empty: no mask; else [nq]
};

// out [nq][ldo]: runs the library over the blocks in order.
std::vector<float> run_attention(const std::vector<float>& q, int nq, int ldq, int D, float scale,
                                 const std::vector<Block>& blocks, int ldo, std::vector<ll::SoftmaxAcc>* st_out = nullptr) {
  std::vector<ll::SoftmaxAcc> st(nq);
  std::vector<float> acc(size_t(nq) * D, 0.0f);
  for (const auto& b : blocks)
    ll::attend_block(q.data(), nq, ldq, b.k.data(), b.v.data(), b.nk, D, scale,
                     b.limit.empty() ? nullptr : b.limit.data(), st.data(), acc.data());
  std::vector<float> out(size_t(nq) * ldo, -555.0f);
  ll::attend_finish(st.data(), acc.data(), nq, D, out.data(), ldo);
  if (st_out) *st_out = st;
  return out;
}

// Naive softmax(q·kᵀ·scale)·v over the concatenation of every visible key, in double.
struct RefAttn {
  std::vector<double> out;   // [nq][D]
  std::vector<double> vmax;  // per query: max |v| over visible keys (output scale)
  std::vector<double> smax;  // per query: max score
  std::vector<double> sum;   // per query: sum exp(s - smax)
};

RefAttn ref_attention(const std::vector<float>& q, int nq, int ldq, int D, float scale, const std::vector<Block>& blocks) {
  RefAttn r;
  r.out.assign(size_t(nq) * D, 0.0);
  r.vmax.assign(nq, 0.0);
  r.smax.assign(nq, -HUGE_VAL);
  r.sum.assign(nq, 0.0);
  for (int i = 0; i < nq; ++i) {
    std::vector<double> s;
    std::vector<const float*> vs;
    for (const auto& b : blocks) {
      const int vis = b.limit.empty() ? b.nk : std::clamp(b.limit[i], 0, b.nk);
      for (int j = 0; j < vis; ++j) {
        double d = 0.0;
        for (int c = 0; c < D; ++c) d += double(q[size_t(i) * ldq + c]) * b.k[size_t(j) * D + c];
        s.push_back(d * double(scale));
        vs.push_back(&b.v[size_t(j) * D]);
      }
    }
    if (s.empty()) ADD_FAILURE() << "test bug: query " << i << " sees no key";
    const double m = *std::max_element(s.begin(), s.end());
    double sum = 0.0;
    for (double x : s) sum += std::exp(x - m);
    for (size_t j = 0; j < s.size(); ++j) {
      const double p = std::exp(s[j] - m) / sum;
      for (int c = 0; c < D; ++c) {
        r.out[size_t(i) * D + c] += p * vs[j][c];
        r.vmax[i] = std::max(r.vmax[i], std::fabs(double(vs[j][c])));
      }
    }
    r.smax[i] = m;
    r.sum[i] = sum;
  }
  return r;
}

Block random_block(std::mt19937_64& rng, int nk, int D) {
  Block b;
  b.nk = nk;
  b.k = random_vec(rng, size_t(nk) * D);
  b.v = random_vec(rng, size_t(nk) * D, -2.0f, 2.0f);
  return b;
}

void check_attention(const std::vector<float>& q, int nq, int ldq, int D, float scale, const std::vector<Block>& blocks,
                     double rtol, const char* what) {
  const int ldo = D + 3;
  std::vector<ll::SoftmaxAcc> st;
  const auto got = run_attention(q, nq, ldq, D, scale, blocks, ldo, &st);
  const auto ref = ref_attention(q, nq, ldq, D, scale, blocks);
  for (int i = 0; i < nq; ++i) {
    for (int c = 0; c < D; ++c)
      ASSERT_NEAR(got[size_t(i) * ldo + c], ref.out[size_t(i) * D + c], rtol * ref.vmax[i])
          << what << ": query " << i << " dim " << c;
    for (int c = D; c < ldo; ++c) EXPECT_EQ(got[size_t(i) * ldo + c], -555.0f) << what << ": wrote past D";
    // the accumulator state is the documented running max and sum
    EXPECT_NEAR(st[i].max, ref.smax[i], 1e-5 * std::max(1.0, std::fabs(ref.smax[i]))) << what << ": query " << i;
    EXPECT_NEAR(st[i].sum, ref.sum[i], 1e-5 * ref.sum[i]) << what << ": query " << i;
  }
}

TEST(Attention, SeveralBlocksNoMask) {
  std::mt19937_64 rng(37);
  for (int D : {1, 16, 64, 100}) {
    const int nq = 5;
    const auto q = random_vec(rng, size_t(nq) * D);
    std::vector<Block> blocks;
    for (int nk : {1, 17, 100, 3, 257}) blocks.push_back(random_block(rng, nk, D));
    check_attention(q, nq, D, D, 1.0f / std::sqrt(float(D)), blocks, 1e-5, "no mask");
  }
}

TEST(Attention, SingleBlockEqualsSplitBlocks) {
  std::mt19937_64 rng(41);
  const int D = 64, nq = 3, nk = 300;
  const auto q = random_vec(rng, size_t(nq) * D);
  const Block all = random_block(rng, nk, D);
  std::vector<Block> split;
  for (int at = 0; int sz : {1, 100, 17, 182}) {
    Block b;
    b.nk = sz;
    b.k.assign(all.k.begin() + size_t(at) * D, all.k.begin() + size_t(at + sz) * D);
    b.v.assign(all.v.begin() + size_t(at) * D, all.v.begin() + size_t(at + sz) * D);
    split.push_back(std::move(b));
    at += sz;
  }
  const float scale = 0.125f;
  const auto one = run_attention(q, nq, D, D, scale, {all}, D);
  const auto many = run_attention(q, nq, D, D, scale, split, D);
  for (size_t i = 0; i < one.size(); ++i) EXPECT_NEAR(one[i], many[i], 2e-6) << i;
  check_attention(q, nq, D, D, scale, split, 1e-5, "split");
}

TEST(Attention, StridedQueriesWithCausalLimits) {
  std::mt19937_64 rng(43);
  const int D = 100, ldq = 131, nq = 9;
  // only the first D of each row are queries; the rest is poison that must not be read
  auto q = random_vec(rng, size_t(nq) * ldq);
  for (int i = 0; i < nq; ++i)
    for (int c = D; c < ldq; ++c) q[size_t(i) * ldq + c] = std::numeric_limits<float>::quiet_NaN();
  std::vector<Block> blocks;
  blocks.push_back(random_block(rng, 255, D));
  blocks.push_back(random_block(rng, 1, D));
  blocks.push_back(random_block(rng, 257, D));
  blocks.push_back(random_block(rng, 17, D));
  // Per query limits: <= 0 (block invisible), partial, exactly nk, larger than nk. Query 0 sees
  // nothing until block 2 (its first visible block comes after invisible ones); query 8 sees
  // only the single key of block 1.
  const int l0[] = {0, 255, 1000, 100, -5, 254, 1, 256, 0};
  const int l1[] = {0, 1, 0, 7, 1, -1, 1, 0, 1};
  const int l2[] = {13, -3, 257, 0, 1, 258, 100, 256, 0};
  const int l3[] = {17, 5, 0, -100, 3, 17, 16, 1000, 0};
  blocks[0].limit.assign(l0, l0 + nq);
  blocks[1].limit.assign(l1, l1 + nq);
  blocks[2].limit.assign(l2, l2 + nq);
  blocks[3].limit.assign(l3, l3 + nq);
  check_attention(q, nq, ldq, D, 1.0f / std::sqrt(float(D)), blocks, 1e-5, "strided, limits");
}

TEST(Attention, TypicalCausalPattern) {
  // n_keep earlier keys fully visible, then the q new keys with limit[i] = i + 1 (as in a prefill),
  // in blocks of 64, followed by unmasked memory blocks.
  std::mt19937_64 rng(47);
  const int D = 64, nq = 70, n_keep = 30, blk = 64, n = n_keep + nq;
  const auto q = random_vec(rng, size_t(nq) * D);
  const Block local = random_block(rng, n, D);
  std::vector<Block> blocks;
  for (int b = 0; b < n; b += blk) {
    Block x;
    x.nk = std::min(blk, n - b);
    x.k.assign(local.k.begin() + size_t(b) * D, local.k.begin() + size_t(b + x.nk) * D);
    x.v.assign(local.v.begin() + size_t(b) * D, local.v.begin() + size_t(b + x.nk) * D);
    for (int i = 0; i < nq; ++i) x.limit.push_back(n_keep + i + 1 - b);
    blocks.push_back(std::move(x));
  }
  blocks.push_back(random_block(rng, 100, D));
  blocks.push_back(random_block(rng, 3, D));
  check_attention(q, nq, D, D, 0.125f, blocks, 1e-5, "causal");
}

// Integer-valued q and k make every score exact in float, so a loose tolerance can't hide a
// rescaling error; block scores around -80, then +80 (forces a rescale by e^-160), then around
// +80 again with small differences that matter.
TEST(Attention, LargeScoresRunningMaxIsStable) {
  std::mt19937_64 rng(53);
  const int D = 16, nq = 4;
  std::vector<float> q(size_t(nq) * D);
  for (int c = 0; c < D; ++c) {
    q[c] = 1.0f;                              // scores = sum of key entries
    q[size_t(D) + c] = -1.0f;                 // mirrored
    q[size_t(2) * D + c] = (c % 2) ? 1.0f : 0.0f;
    q[size_t(3) * D + c] = 0.5f;              // half the scores
  }
  std::uniform_int_distribution<int> jitter(-1, 1);
  auto block_around = [&](int nk, int center) {  // keys with entries summing to about 16*center
    Block b;
    b.nk = nk;
    b.k.resize(size_t(nk) * D);
    for (auto& x : b.k) x = float(center + jitter(rng));
    b.v = random_vec(rng, size_t(nk) * D, -2.0f, 2.0f);
    return b;
  };
  for (float scale : {1.0f, 0.5f, 2.0f}) {
    const int c = int(std::lround(5.0 / scale));  // |scores| ~ 16 * c * scale ~ 80
    std::vector<Block> blocks;
    blocks.push_back(block_around(17, -c));  // scores ~ -80 for query 0, +80 for query 1
    blocks.push_back(block_around(3, c));    // ~ +80 / -80
    blocks.push_back(block_around(100, c));
    blocks.push_back(block_around(1, 0));
    blocks.push_back(block_around(255, -c));
    double maxabs = 0.0;
    for (const auto& b : blocks)
      for (int j = 0; j < b.nk; ++j) {
        double s = 0.0;
        for (int c = 0; c < D; ++c) s += b.k[size_t(j) * D + c];
        maxabs = std::max(maxabs, std::fabs(s * scale));
      }
    ASSERT_GE(maxabs, 75.0);  // the test really exercises large scores
    check_attention(q, nq, D, D, scale, blocks, 1e-5, "large scores");
    // A mask that hides the block with the largest scores from every query after the first
    // block was seen: the max then comes from the first block only for some queries.
    for (auto& b : blocks) b.limit.assign(nq, b.nk);
    blocks[1].limit = {0, 3, 2, -1};
    blocks[2].limit = {0, 50, 0, 1};
    check_attention(q, nq, D, D, scale, blocks, 1e-5, "large scores, masked");
  }
}

TEST(Attention, HugeScoresWouldOverflowNaiveFloatSoftmax) {
  // exp(500) overflows float: only the max-subtracted form gets this right.
  const int D = 4, nq = 1;
  std::vector<float> q = {1.0f, 1.0f, 1.0f, 1.0f};
  std::vector<Block> blocks(2);
  blocks[0].nk = 2;
  blocks[0].k = {100, 100, 100, 100, 125, 125, 125, 125};  // 400, 500
  blocks[0].v = {1, 0, 0, 0, 0, 1, 0, 0};
  blocks[1].nk = 2;
  blocks[1].k = {125, 125, 125, 125, -125, -125, -125, -125};  // 500, -500
  blocks[1].v = {0, 0, 1, 0, 0, 0, 0, 1};
  const auto got = run_attention(q, nq, D, D, 1.0f, blocks, D);
  // two keys at 500 share all the weight; the one at 400 has weight e^-100/2
  EXPECT_NEAR(got[0], 0.0, 1e-30);
  EXPECT_NEAR(got[1], 0.5, 1e-6);
  EXPECT_NEAR(got[2], 0.5, 1e-6);
  EXPECT_EQ(got[3], 0.0f);
  check_attention(q, nq, D, D, 1.0f, blocks, 1e-6, "huge scores");
}

// ---------------------------------------------------------------------------------------------
// half.h

TEST(Half, Bf16RoundsToNearestEvenOnTies) {
  struct C { uint32_t in; uint16_t out; };
  const C cases[] = {
      {0x3f808000u, 0x3f80u},  // tie, lower is even: down
      {0x3f818000u, 0x3f82u},  // tie, lower is odd: up
      {0xbf808000u, 0xbf80u},  // negative ties
      {0xbf818000u, 0xbf82u},
      {0x3f808001u, 0x3f81u},  // just above the tie
      {0x3f807fffu, 0x3f80u},  // just below
      {0x3f80ffffu, 0x3f81u},
      {0x3fffffffu, 0x4000u},  // carry into the exponent
      {0x7f7fffffu, 0x7f80u},  // FLT_MAX rounds to inf
      {0x7f7f7fffu, 0x7f7fu},
      {0x00008000u, 0x0000u},  // subnormal tie to even (zero)
      {0x00018000u, 0x0002u},
      {0x80000000u, 0x8000u},  // -0
      {0x00000000u, 0x0000u},
      {0x7f800000u, 0x7f80u},  // inf
      {0xff800000u, 0xff80u},  // -inf
  };
  for (const auto& c : cases) {
    EXPECT_EQ(ll::f32_to_bf16(from_bits(c.in)), c.out) << std::hex << c.in;
    EXPECT_EQ(ref_f32_to_bf16(from_bits(c.in)), c.out) << "reference " << std::hex << c.in;
  }
  // NaN stays NaN (quiet or signalling, any sign, any payload, even if only low bits are set)
  for (uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f80ffffu, 0x7fa00000u}) {
    const uint16_t h = ll::f32_to_bf16(from_bits(nan));
    EXPECT_TRUE(std::isnan(ll::bf16_to_f32(h))) << std::hex << nan << " -> " << h;
    EXPECT_EQ(h & 0x8000u, (nan >> 16) & 0x8000u) << "sign of NaN " << std::hex << nan;
  }
}

TEST(Half, Bf16RandomAgainstReference) {
  std::mt19937_64 rng(59);
  std::uniform_int_distribution<uint32_t> u32;
  int checked = 0;
  for (int i = 0; i < 300000; ++i) {
    uint32_t u = u32(rng);
    if (i % 3 == 0) u = (u & 0xffff0000u) | 0x8000u;  // many exact ties
    const float f = from_bits(u);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(ll::bf16_to_f32(ll::f32_to_bf16(f))));
      continue;
    }
    ASSERT_EQ(ll::f32_to_bf16(f), ref_f32_to_bf16(f)) << std::hex << u;
    ++checked;
  }
  EXPECT_GT(checked, 290000);
  EXPECT_EQ(ll::round_to_bf16(1.00390625f), 1.0f);  // 1 + 2^-8: tie to even
}

TEST(Half, Bf16AllPatternsRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = ll::bf16_to_f32(uint16_t(h));
    EXPECT_EQ(bits(f), h << 16);  // widening is the bit pattern shifted up
    const bool nan = (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0;
    if (nan) {
      EXPECT_TRUE(std::isnan(f));
      EXPECT_TRUE(std::isnan(ll::bf16_to_f32(ll::f32_to_bf16(f)))) << std::hex << h;
    } else {
      ASSERT_EQ(ll::f32_to_bf16(f), h) << std::hex << h;
      ASSERT_EQ(bits(ll::round_to_bf16(f)), bits(f)) << std::hex << h;
    }
  }
}

TEST(Half, F16AllPatternsDecodeAndRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = ll::f16_to_f32(uint16_t(h));
    const double ref = ref_f16_value(uint16_t(h));
    const bool nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
    if (nan) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_TRUE(std::isnan(ll::f16_to_f32(ll::f32_to_f16(f)))) << std::hex << h;
      continue;
    }
    ASSERT_EQ(double(f), ref) << std::hex << h;
    ASSERT_EQ(std::signbit(f), bool(h & 0x8000u)) << std::hex << h;  // -0 keeps its sign
    ASSERT_EQ(ll::f32_to_f16(f), h) << std::hex << h;
#ifdef __F16C__
    ASSERT_EQ(bits(f), bits(_cvtsh_ss(uint16_t(h)))) << std::hex << h;
#endif
  }
}

TEST(Half, F16RoundsToNearestEven) {
  struct C { float in; uint16_t out; };
  const C cases[] = {
      {1.0f + std::ldexp(1.0f, -11), 0x3c00u},        // tie, lower even: down
      {1.0f + 3 * std::ldexp(1.0f, -11), 0x3c02u},    // tie, lower odd: up
      {-(1.0f + 3 * std::ldexp(1.0f, -11)), 0xbc02u},
      {1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20), 0x3c01u},  // just above a tie
      {std::ldexp(1.0f, -25), 0x0000u},               // half the smallest subnormal: to zero
      {std::ldexp(1.0f, -25) * 1.0001f, 0x0001u},
      {3 * std::ldexp(1.0f, -25), 0x0002u},           // subnormal tie up to even
      {5 * std::ldexp(1.0f, -25), 0x0002u},           // subnormal tie down to even
      {-std::ldexp(1.0f, -26), 0x8000u},              // underflow keeps the sign
      {std::ldexp(1.0f, -14) - std::ldexp(1.0f, -26), 0x0400u},  // rounds up into the normals
      {65504.0f, 0x7bffu},
      {65519.99f, 0x7bffu},
      {65520.0f, 0x7c00u},                            // tie between max and "2^16": to inf
      {-65520.0f, 0xfc00u},
      {1e10f, 0x7c00u},
      {HUGE_VALF, 0x7c00u},
      {-HUGE_VALF, 0xfc00u},
      {2047.0f, 0x67ffu},
      {2049.0f, 0x6800u},                             // tie at 2048 + 1: down to even 2048
      {2051.0f, 0x6802u},                             // tie: up to even 2052
  };
  for (const auto& c : cases) {
    EXPECT_EQ(ll::f32_to_f16(c.in), c.out) << c.in;
    EXPECT_EQ(ref_f32_to_f16(c.in), c.out) << "reference " << c.in;
  }
  for (uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7f801000u, 0x7fffffffu})
    EXPECT_TRUE(std::isnan(ll::f16_to_f32(ll::f32_to_f16(from_bits(nan))))) << std::hex << nan;
}

TEST(Half, F16RandomFloatsAgainstReferenceAndF16C) {
  std::mt19937_64 rng(61);
  std::uniform_int_distribution<uint32_t> u32;
  std::uniform_int_distribution<uint32_t> exp_in_range(127 - 30, 127 + 17);  // subnormals .. overflow
  int mismatches_ref = 0, mismatches_hw = 0;
  for (int i = 0; i < 1000000; ++i) {
    uint32_t u = u32(rng);
    switch (i % 4) {
      case 0: break;  // any bit pattern
      case 1:
      case 2: u = (u & 0x807fffffu) | (exp_in_range(rng) << 23); break;
      case 3: {  // exact ties: an f16 value plus half an ulp, in the normal and subnormal ranges
        uint32_t h = u & 0x7bffu;
        const double a = ref_f16_value(uint16_t(h)), b = f16_mag_value(h + 1);
        u = bits(float((a + b) / 2)) | (u & 0x80000000u);
        break;
      }
    }
    const float f = from_bits(u);
    const uint16_t got = ll::f32_to_f16(f);
    if (std::isnan(f)) {
      if (!std::isnan(ll::f16_to_f32(got))) ++mismatches_ref;
      continue;
    }
    if (got != ref_f32_to_f16(f)) {
      if (++mismatches_ref < 5) ADD_FAILURE() << "reference mismatch for " << std::hex << u << ": " << got;
    }
#ifdef __F16C__
    const uint16_t hw = uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
    if (got != hw) {
      if (++mismatches_hw < 5) ADD_FAILURE() << "F16C mismatch for " << std::hex << u << ": " << got << " vs " << hw;
    }
#endif
  }
  EXPECT_EQ(mismatches_ref, 0);
  EXPECT_EQ(mismatches_hw, 0);
#ifndef __F16C__
  GTEST_LOG_(INFO) << "built without F16C: compared against the software reference only";
#endif
}

// ---------------------------------------------------------------------------------------------
// KVMemory

float ref_store(ll::MemDType t, float x) {
  switch (t) {
    case ll::MemDType::F32: return x;
    case ll::MemDType::BF16: return from_bits(uint32_t(ref_f32_to_bf16(x)) << 16);
    case ll::MemDType::F16: return float(ref_f16_value(ref_f32_to_f16(x)));
    case ll::MemDType::Q8: break;  // per-row scales: not a per-element rounding
  }
  return 0.0f;
}

size_t elem_size(ll::MemDType t) { return t == ll::MemDType::F32 ? 4 : 2; }

// Token rows with stride ld; the padding between rows is NaN (must never be stored).
struct Tokens {
  std::vector<float> k, v;
  int n, ld;
};

Tokens make_tokens(std::mt19937_64& rng, int n, int heads, int hd, int ld) {
  Tokens t{std::vector<float>(size_t(n) * ld, std::numeric_limits<float>::quiet_NaN()),
           std::vector<float>(size_t(n) * ld, std::numeric_limits<float>::quiet_NaN()), n, ld};
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::uniform_int_distribution<int> pick(0, 199);
  auto val = [&]() -> float {
    switch (pick(rng)) {  // a few values where the formats differ most
      case 0: return 1e-6f;     // f16 subnormal
      case 1: return -70000.f;  // f16 overflow
      case 2: return 1e-9f;     // f16 underflow
      case 3: return 3e38f;     // bf16 rounds to inf
      default: return nd(rng);
    }
  };
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < heads * hd; ++c) {
      t.k[size_t(i) * ld + c] = val();
      t.v[size_t(i) * ld + c] = val();
    }
  return t;
}

// Expected content: every appended token, per head, rounded like the memory's dtype.
struct Expected {
  int heads, hd;
  ll::MemDType dtype;
  std::vector<std::vector<float>> k, v;  // [head][token*hd]
  Expected(int h, int d, ll::MemDType t) : heads(h), hd(d), dtype(t), k(h), v(h) {}
  void add(const Tokens& t) {
    for (int i = 0; i < t.n; ++i)
      for (int h = 0; h < heads; ++h)
        for (int c = 0; c < hd; ++c) {
          k[h].push_back(ref_store(dtype, t.k[size_t(i) * t.ld + h * hd + c]));
          v[h].push_back(ref_store(dtype, t.v[size_t(i) * t.ld + h * hd + c]));
        }
  }
  int64_t size() const { return int64_t(k[0].size()) / hd; }
};

void check_range(const ll::KVMemory& m, const Expected& e, int h, int64_t start, int count, const char* what) {
  std::vector<float> kout(size_t(count) * e.hd + 1, -777.0f), vout(size_t(count) * e.hd + 1, -777.0f);
  m.read(h, start, count, kout.data(), vout.data());
  for (int64_t i = 0; i < int64_t(count) * e.hd; ++i) {
    const float ek = e.k[h][size_t(start) * e.hd + i], ev = e.v[h][size_t(start) * e.hd + i];
    ASSERT_EQ(bits(kout[i]), bits(ek)) << what << ": key, head " << h << " token " << start + i / e.hd << " dim "
                                      << i % e.hd << " got " << kout[i] << " want " << ek;
    ASSERT_EQ(bits(vout[i]), bits(ev)) << what << ": value, head " << h << " token " << start + i / e.hd << " dim "
                                      << i % e.hd << " got " << vout[i] << " want " << ev;
  }
  EXPECT_EQ(kout[size_t(count) * e.hd], -777.0f) << what << ": read wrote past count";
  EXPECT_EQ(vout[size_t(count) * e.hd], -777.0f) << what << ": read wrote past count";
}

void check_all(const ll::KVMemory& m, const Expected& e, const char* what) {
  ASSERT_EQ(m.size(), e.size()) << what;
  const int64_t n = m.size();
  struct R { int64_t s; int64_t c; };
  std::vector<R> ranges = {{0, n}, {0, 1}, {n - 1, 1}, {0, 0}, {n, 0}};
  for (R r : std::initializer_list<R>{{1020, 10}, {1023, 1}, {1024, 1}, {1023, 2}, {500, 1600},
                                       {2047, 1026}, {1000, 1048}, {3071, 2}, {2048, 1024}, {17, 3000}})
    if (r.s + r.c <= n) ranges.push_back(r);
  for (int h = 0; h < m.heads(); ++h)
    for (const R& r : ranges) check_range(m, e, h, r.s, int(r.c), what);
}

class KVMemoryTest : public ::testing::TestWithParam<ll::MemDType> {};

TEST_P(KVMemoryTest, AppendAcrossChunksAndReadBack) {
  const ll::MemDType dt = GetParam();
  static_assert(ll::KVMemory::kChunkTokens == 1024, "ranges below assume 1024-token chunks");
  const int heads = 3, hd = 20, ld = heads * hd + 7;
  std::mt19937_64 rng(67);
  ll::KVMemory m(heads, hd, dt);
  EXPECT_EQ(m.heads(), heads);
  EXPECT_EQ(m.head_dim(), hd);
  EXPECT_EQ(m.dtype(), dt);
  EXPECT_EQ(m.size(), 0);
  EXPECT_EQ(m.bytes(), 0u);
  Expected e(heads, hd, dt);
  for (int n : {1000, 100, 0, 2000, 1, 23}) {  // crosses 1024, 2048 and 3072
    const Tokens t = make_tokens(rng, n, heads, hd, ld);
    m.append(t.k.data(), t.v.data(), t.n, t.ld);
    e.add(t);
    ASSERT_EQ(m.size(), e.size());
    EXPECT_EQ(m.bytes(), size_t(m.size()) * heads * hd * elem_size(dt) * 2) << "after " << m.size() << " tokens";
  }
  EXPECT_EQ(m.size(), 3124);
  check_all(m, e, "appended");
}

TEST_P(KVMemoryTest, TokenByTokenEqualsBulk) {
  const ll::MemDType dt = GetParam();
  const int heads = 2, hd = 5, ld = 13;
  std::mt19937_64 rng(71);
  const Tokens t = make_tokens(rng, 1030, heads, hd, ld);
  ll::KVMemory bulk(heads, hd, dt), one(heads, hd, dt);
  bulk.append(t.k.data(), t.v.data(), t.n, t.ld);
  for (int i = 0; i < t.n; ++i) one.append(t.k.data() + size_t(i) * ld, t.v.data() + size_t(i) * ld, 1, ld);
  Expected e(heads, hd, dt);
  e.add(t);
  check_all(bulk, e, "bulk");
  check_all(one, e, "one by one");
}

TEST_P(KVMemoryTest, CopyOnWriteKeepsCopiesIndependent) {
  const ll::MemDType dt = GetParam();
  const int heads = 2, hd = 16, ld = heads * hd + 1;
  std::mt19937_64 rng(73);
  ll::KVMemory a(heads, hd, dt);
  Expected ea(heads, hd, dt);
  const Tokens t0 = make_tokens(rng, 1500, heads, hd, ld);  // one full chunk + a partial one
  a.append(t0.k.data(), t0.v.data(), t0.n, t0.ld);
  ea.add(t0);

  ll::KVMemory b = a;  // shares both chunks
  ll::KVMemory c(heads, hd, dt);
  c = a;               // copy assignment: a third owner of the partial tail
  Expected eb = ea, ec = ea;

  const Tokens ta = make_tokens(rng, 600, heads, hd, ld);  // crosses 2048
  const Tokens tb = make_tokens(rng, 700, heads, hd, ld);
  const Tokens tc = make_tokens(rng, 10, heads, hd, ld);   // stays inside the shared tail chunk
  b.append(tb.k.data(), tb.v.data(), tb.n, tb.ld);
  eb.add(tb);
  check_all(a, ea, "original after the copy appended");
  check_all(c, ec, "second copy after the first copy appended");
  a.append(ta.k.data(), ta.v.data(), ta.n, ta.ld);
  ea.add(ta);
  c.append(tc.k.data(), tc.v.data(), tc.n, tc.ld);
  ec.add(tc);

  check_all(a, ea, "original");
  check_all(b, eb, "copy b");
  check_all(c, ec, "copy c");
  EXPECT_EQ(a.size(), 2100);
  EXPECT_EQ(b.size(), 2200);
  EXPECT_EQ(c.size(), 1510);
  EXPECT_EQ(a.bytes(), size_t(2100) * heads * hd * elem_size(dt) * 2);
  EXPECT_EQ(b.bytes(), size_t(2200) * heads * hd * elem_size(dt) * 2);

  // the shared prefix is the same in all three
  for (int h = 0; h < heads; ++h) {
    std::vector<float> k1(size_t(1500) * hd), v1(k1.size()), k2(k1.size()), v2(k1.size());
    a.read(h, 0, 1500, k1.data(), v1.data());
    c.read(h, 0, 1500, k2.data(), v2.data());
    EXPECT_EQ(0, std::memcmp(k1.data(), k2.data(), k1.size() * 4));
    EXPECT_EQ(0, std::memcmp(v1.data(), v2.data(), v1.size() * 4));
  }

  // a copy that outlives its source, and a copy made at an exact chunk boundary
  ll::KVMemory d(heads, hd, dt);
  Expected ed(heads, hd, dt);
  {
    ll::KVMemory src(heads, hd, dt);
    Expected es(heads, hd, dt);
    const Tokens t = make_tokens(rng, 1024, heads, hd, ld);
    src.append(t.k.data(), t.v.data(), t.n, t.ld);
    es.add(t);
    d = src;
    ed = es;
    const Tokens t2 = make_tokens(rng, 5, heads, hd, ld);
    src.append(t2.k.data(), t2.v.data(), t2.n, t2.ld);
    es.add(t2);
    check_all(src, es, "source at a chunk boundary");
  }
  const Tokens t3 = make_tokens(rng, 3, heads, hd, ld);
  d.append(t3.k.data(), t3.v.data(), t3.n, t3.ld);
  ed.add(t3);
  check_all(d, ed, "copy made at a chunk boundary");
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, KVMemoryTest,
                         ::testing::Values(ll::MemDType::BF16, ll::MemDType::F16, ll::MemDType::F32),
                         [](const ::testing::TestParamInfo<ll::MemDType>& i) {
                           return std::string(i.param == ll::MemDType::BF16  ? "bf16"
                                              : i.param == ll::MemDType::F16 ? "f16"
                                                                             : "f32");
                         });

}  // namespace
