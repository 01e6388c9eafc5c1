#include "train/widen.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "util/error.h"

namespace ll::train {

namespace {
std::vector<uint32_t> seed_words(uint64_t seed) {  // CPython: the int's 32-bit words, low first
  std::vector<uint32_t> key = {uint32_t(seed)};
  if (seed >> 32) key.push_back(uint32_t(seed >> 32));
  return key;
}
}  // namespace

PyRandom::PyRandom(uint64_t seed) : PyRandom(seed_words(seed)) {}

PyRandom::PyRandom(const std::vector<uint32_t>& key) {
  // MT19937's init_genrand(19650218) followed by init_by_array(key).
  if (key.empty()) throw Error("PyRandom: empty key");
  const int n = 624;
  mt_[0] = 19650218u;
  for (int i = 1; i < n; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + uint32_t(i);
  int i = 1;
  size_t j = 0;
  for (int k = std::max<int>(n, int(key.size())); k > 0; --k) {
    mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1664525u)) + key[j] + uint32_t(j);
    ++i;
    ++j;
    if (i >= n) {
      mt_[0] = mt_[n - 1];
      i = 1;
    }
    if (j >= key.size()) j = 0;
  }
  for (int k = n - 1; k > 0; --k) {
    mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1566083941u)) - uint32_t(i);
    ++i;
    if (i >= n) {
      mt_[0] = mt_[n - 1];
      i = 1;
    }
  }
  mt_[0] = 0x80000000u;
  index_ = n;
}

void PyRandom::twist() {
  const int n = 624, m = 397;
  for (int i = 0; i < n; ++i) {
    const uint32_t y = (mt_[i] & 0x80000000u) | (mt_[(i + 1) % n] & 0x7fffffffu);
    mt_[i] = mt_[(i + m) % n] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
  }
  index_ = 0;
}

uint32_t PyRandom::next_u32() {
  if (index_ >= 624) twist();
  uint32_t y = mt_[index_++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

double PyRandom::random() {
  const uint32_t a = next_u32() >> 5, b = next_u32() >> 6;
  return (double(a) * 67108864.0 + double(b)) * (1.0 / 9007199254740992.0);
}

double PyRandom::gauss(double mu, double sigma) {
  double z;
  if (has_next_) {
    z = next_gauss_;
    has_next_ = false;
  } else {
    const double x2pi = random() * 6.283185307179586;
    const double g2rad = std::sqrt(-2.0 * std::log(1.0 - random()));
    z = std::cos(x2pi) * g2rad;
    next_gauss_ = std::sin(x2pi) * g2rad;
    has_next_ = true;
  }
  return mu + z * sigma;
}

ModelConfig widened_config(const ModelConfig& c, int k) {
  ModelConfig w = c;
  w.hidden_size *= k;
  w.intermediate_size *= k;
  w.num_attention_heads *= k;
  if (w.mem_num_attention_heads > 0) w.mem_num_attention_heads *= k;
  return w;
}

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

enum class Fill { Keep, Zero, Random };

// dst [R*kr, C*kc] from src [R, C]: old entries copied; a new row is filled by `rows`, an old
// row's new columns by `cols`.
void widen_matrix(const std::vector<float>& src, int64_t R, int64_t C, std::vector<float>& dst, int64_t R2,
                  int64_t C2, Fill rows, Fill cols, double std, PyRandom& rng) {
  dst.assign(size_t(R2 * C2), 0.0f);
  for (int64_t r = 0; r < R2; ++r)
    for (int64_t c = 0; c < C2; ++c) {
      if (r < R && c < C) {
        dst[size_t(r * C2 + c)] = src[size_t(r * C + c)];
        continue;
      }
      const Fill f = r >= R ? rows : cols;
      if (f == Fill::Random) dst[size_t(r * C2 + c)] = float(rng.gauss(0.0, std));
    }
}

}  // namespace

Model widen_model(const Model& m, const WidenOptions& o) {
  if (o.factor < 2) throw Error("init_widen.factor: must be >= 2, got " + std::to_string(o.factor));
  if (!(o.std >= 0) || !std::isfinite(o.std)) throw Error("init_widen.std: must be a number >= 0");
  const int k = o.factor;
  Model w;
  w.config = widened_config(m.config, k);
  w.config.validate("init_widen");
  w.source = m.source;
  w.tokenizer_path = m.tokenizer_path;
  w.layers.resize(m.layers.size());
  const auto specs = tensor_specs(m.config), wide_specs = tensor_specs(w.config);
  const auto src = parameter_vectors(const_cast<Model&>(m));  // only read
  const auto dst = parameter_vectors(w);
  std::vector<size_t> order(specs.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return specs[a].name < specs[b].name; });
  PyRandom rng(o.seed);
  const double s = 1.0 / std::sqrt(double(k));
  for (size_t i : order) {
    const std::string& name = specs[i].name;
    const std::vector<float>& x = *src[i];
    std::vector<float>& y = *dst[i];
    if (specs[i].shape.size() == 1) {  // an RMSNorm weight
      y.resize(size_t(wide_specs[i].shape[0]));
      for (size_t j = 0; j < y.size(); ++j) y[j] = j < x.size() ? float(double(x[j]) * s) : float(s);
      continue;
    }
    const int64_t R = specs[i].shape[0], C = specs[i].shape[1];
    const int64_t R2 = wide_specs[i].shape[0], C2 = wide_specs[i].shape[1];
    Fill rows, cols;
    if (name == "model.embed_tokens.weight") {
      rows = Fill::Keep, cols = Fill::Zero;
    } else if (name == "lm_head.weight") {
      rows = Fill::Keep, cols = Fill::Random;
    } else if (ends_with(name, "q_proj.weight") || ends_with(name, "k_proj.weight") ||
               ends_with(name, "v_proj.weight") || ends_with(name, "gate_proj.weight") ||
               ends_with(name, "up_proj.weight")) {
      rows = Fill::Random, cols = Fill::Random;
    } else if (ends_with(name, "o_proj.weight") || ends_with(name, "down_proj.weight")) {
      rows = Fill::Zero, cols = Fill::Zero;
    } else {
      throw Error("init_widen: no rule for tensor " + name);
    }
    widen_matrix(x, R, C, y, R2, C2, rows, cols, o.std, rng);
  }
  return w;
}

}  // namespace ll::train
