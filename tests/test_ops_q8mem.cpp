// Q8 memory: int8 rows with one float scale each, against a plain reference.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "memory/kv_memory.h"
#include "ops/attention.h"

using namespace ll;

TEST(Q8Memory, RowsRoundTripWithinHalfAStep) {
  const int H = 3, D = 100, n = 1500;  // crosses a chunk boundary
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> k(size_t(n) * H * D), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  KVMemory mem(H, D, MemDType::Q8);
  mem.append(k.data(), v.data(), 1000, H * D);
  mem.append(k.data() + size_t(1000) * H * D, v.data() + size_t(1000) * H * D, n - 1000, H * D);
  EXPECT_EQ(mem.bytes(), size_t(n) * H * (D + 4) * 2);
  std::vector<float> kr(size_t(n) * D), vr(kr.size()), one(D);
  for (int h = 0; h < H; ++h) {
    mem.read(h, 0, n, kr.data(), vr.data());
    for (int t = 0; t < n; ++t) {
      float amax = 0;
      for (int e = 0; e < D; ++e) amax = std::max(amax, std::fabs(k[(size_t(t) * H + h) * D + e]));
      for (int e = 0; e < D; ++e)
        ASSERT_LE(std::fabs(kr[size_t(t) * D + e] - k[(size_t(t) * H + h) * D + e]), amax / 127.0f * 0.5f * 1.0001f);
      mem.value_f32(h, t, one.data());
      for (int e = 0; e < D; ++e) ASSERT_EQ(one[e], vr[size_t(t) * D + e]);
    }
    // Blocks: int8 rows plus their scales reproduce read().
    for (int64_t b = 0; b < n;) {
      const KVBlock blk = mem.block(h, b, 256);
      ASSERT_EQ(blk.type, DType::I8);
      std::vector<float> kb(size_t(blk.n) * D), vb(kb.size());
      kv_block_to_f32(blk, D, kb.data(), vb.data());
      for (size_t i = 0; i < kb.size(); ++i) {
        ASSERT_EQ(kb[i], kr[size_t(b) * D + i]);
        ASSERT_EQ(vb[i], vr[size_t(b) * D + i]);
      }
      b += blk.n;
    }
  }
}

// Rows round like std::lround (half away from zero), ties and near-ties included: a row whose
// largest magnitude is 127 has scale 1, so its elements are stored as their rounded selves.
TEST(Q8Memory, RoundsHalfAwayFromZero) {
  const int D = 64;
  std::vector<float> k(D), v(D);
  const float special[] = {127.0f, -126.5f, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f, -2.5f, 0.49999997f, -0.49999997f,
                           0.50000006f, -0.50000006f, 125.49999f, -125.50001f, 0.0f, -0.0f};
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(-126.9f, 126.9f);
  for (int r = 0; r < 50; ++r) {
    for (int e = 0; e < D; ++e) k[e] = v[e] = (r == 0 && e < 16) ? special[e] : u(rng);
    k[D - 1] = v[D - 1] = (r % 2) ? 127.0f : -127.0f;  // amax = 127: scale 1
    KVMemory mem(1, D, MemDType::Q8);
    mem.append(k.data(), v.data(), 1, D);
    const KVBlock blk = mem.block(0, 0, 1);
    ASSERT_EQ(blk.k_scale[0], 1.0f);
    for (int e = 0; e < D; ++e) {
      ASSERT_EQ(static_cast<const int8_t*>(blk.k)[e], std::lround(k[e])) << "row " << r << " x " << k[e];
      ASSERT_EQ(static_cast<const int8_t*>(blk.v)[e], std::lround(v[e])) << "row " << r << " x " << v[e];
    }
  }
}

// Attention over Q8 blocks equals attention over the same rows widened to float32, both paths.
TEST(Q8Memory, AttentionMatchesWidenedRows) {
  const int D = 64, n = 700;
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n) * D), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  KVMemory mem(1, D, MemDType::Q8);
  mem.append(k.data(), v.data(), n, D);
  std::vector<float> kf(k.size()), vf(v.size());
  mem.read(0, 0, n, kf.data(), vf.data());
  for (int nq : {1, 20}) {
    std::vector<float> q(size_t(nq) * D);
    for (auto& x : q) x = nd(rng);
    HeadAttention a(q.data(), nq, D, D), b(q.data(), nq, D, D);
    for (int64_t s = 0; s < n;) {
      const KVBlock blk = mem.block(0, s, 256);
      a.add(blk);
      b.add({DType::F32, &kf[size_t(s) * D], &vf[size_t(s) * D], blk.n});
      s += blk.n;
    }
    std::vector<float> oa(size_t(nq) * D), ob(oa.size());
    a.finish(oa.data(), D);
    b.finish(ob.data(), D);
    for (size_t i = 0; i < oa.size(); ++i) EXPECT_NEAR(oa[i], ob[i], 1e-5) << "nq " << nq;
  }
}
