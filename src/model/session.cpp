#include "model/session.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "ops/attention.h"
#include "util/error.h"

namespace ll {

namespace {
constexpr int kKeyBlock = 256;  // keys per attention block of the local window
// Keys per memory block: a whole memory chunk (KVMemory::kChunkTokens), so the decode kernel's
// key and value streams restart 4x less often than with 256 (1 thread, 256k-token memory:
// 36-37 vs 32 GB/s; bench_kernels BM_MemoryAttention/fused_bf16/262144/*).
constexpr int kMemBlock = 1024;
constexpr int kQueryBlock = 64;  // queries per prefill attention task
}  // namespace

Session::Session(const Weights& weights)
    : w_(&weights), rope_(weights.config.head_dim(), weights.config.rope_theta), mem_dtype_(weights.config.mem_dtype) {
  reset();
}

Session::Session(const Model& model)
    : owned_(std::make_shared<Weights>(Weights::from_model(model))),
      w_(owned_.get()),
      rope_(model.config.head_dim(), model.config.rope_theta),
      mem_dtype_(model.config.mem_dtype) {
  reset();
}

void Session::set_memory_type(MemDType t) {
  mem_dtype_ = t;
  reset();
}

void Session::reset() {
  const ModelConfig& c = w_->config;
  local_.assign(c.num_hidden_layers, {});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    local_[l].k_rot.resize(c.heads_in(l));
    local_[l].k_raw.resize(c.heads_in(l));
    local_[l].v.resize(c.heads_in(l));
  }
  local_n_ = 0;
  memory_.clear();
  memory_.resize(c.num_hidden_layers);
  for (int l : c.mem_layers) memory_[l].emplace(c.heads_in(l), c.head_dim_in(l), mem_dtype_);
  tokens_seen_ = 0;
}

void Session::fill_memory_random(int64_t n, uint64_t seed) {
  const int d = w_->config.hidden_size;
  std::vector<float> k(size_t(KVMemory::kChunkTokens) * d), v(k.size());
  uint64_t h = seed;
  for (auto& m : memory_) {
    if (!m) continue;
    for (int64_t done = 0; done < n;) {
      const int c = int(std::min<int64_t>(KVMemory::kChunkTokens, n - done));
      for (size_t i = 0; i < size_t(c) * d; ++i) {
        h = h * 6364136223846793005ull + 1442695040888963407ull;
        k[i] = float(int64_t(h >> 40) - (1 << 23)) / float(1 << 23);
        v[i] = -k[i];
      }
      m->append(k.data(), v.data(), c, d);
      done += c;
    }
  }
}

size_t Session::memory_bytes_for(int64_t tokens) const {
  const ModelConfig& c = w_->config;
  const size_t D = size_t(c.hidden_size / c.mem_heads());
  const size_t row = mem_dtype_ == MemDType::F32 ? 4 * D : mem_dtype_ == MemDType::Q8 ? D + sizeof(float) : 2 * D;
  return size_t(tokens) * c.mem_layers.size() * 2 * size_t(c.mem_heads()) * row;
}

int64_t Session::memory_length(int layer) const { return memory_.at(layer) ? memory_[layer]->size() : 0; }

size_t Session::memory_bytes() const {
  size_t b = 0;
  for (const auto& m : memory_)
    if (m) b += m->bytes();
  return b;
}

std::vector<float> Session::forward(const std::vector<int>& ids, bool use_cache, LogitsWanted which,
                                    const ProgressFn& progress) {
  const ModelConfig& c = w_->config;
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= c.vocab_size)
      throw Error("token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                  " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  if (!use_cache && local_n_ > 0) throw Error("forward without cache needs an empty local cache (start a new session)");
  const int64_t T = int64_t(ids.size());
  std::vector<float> logits;
  if (T == 0) return logits;
  if (which == LogitsWanted::All) logits.resize(size_t(T) * c.vocab_size);
  if (which == LogitsWanted::Last) logits.resize(c.vocab_size);

  // Official chunking (_handle_long_input): prefix windows of W tokens, then the last
  // last_context_length tokens in one call. Windows of a call that starts without a cache run
  // without one.
  const int64_t W = c.max_position_embeddings;
  const int64_t pre = std::max<int64_t>(T - c.last_context_length, 0);
  const bool window_cache = local_n_ > 0 ? use_cache : false;
  // A window that goes to memory without a cache leaves nothing behind but the memory layers'
  // keys/values; when its logits are not wanted, layers above the last memory layer and that
  // layer's attention cannot change anything, so they are skipped (exact, and it makes ingestion
  // linear in the input for a model with one memory layer).
  const bool kv_only = !window_cache && which != LogitsWanted::All && !c.mem_layers.empty();
  // Without memory layers such a window leaves nothing behind at all: it is only counted.
  const bool nothing_kept = !window_cache && which != LogitsWanted::All && c.mem_layers.empty();
  auto run = [&](int64_t begin, int64_t end, bool cache) {
    const bool final = end == T;  // the last chunk (a prefix window when last_context_length is 0)
    if (nothing_kept && !final) {
      tokens_seen_ += end - begin;
      if (progress) progress(end, T);
      return;
    }
    float* out = nullptr;
    if (which == LogitsWanted::All) out = logits.data() + size_t(begin) * c.vocab_size;
    if (which == LogitsWanted::Last && final) out = logits.data();
    // The final chunk is skipped alike when it too goes to memory and nothing is asked of it.
    const bool skip_above = kv_only && (!final || (!cache && which == LogitsWanted::None));
    run_chunk(ids.data() + begin, int(end - begin), cache, which == LogitsWanted::All,
              which == LogitsWanted::Last && final, out, skip_above);
    if (progress) progress(end, T);
  };
  for (int64_t s = 0; s < pre; s += W) run(s, std::min(pre, s + W), window_cache);
  if (pre < T) run(pre, T, use_cache);
  return logits;
}

void Session::run_chunk(const int* ids, int q, bool use_cache, bool all_logits, bool last_logit, float* logits,
                        bool kv_only) {
  const Weights& w = *w_;
  const ModelConfig& c = w.config;
  const int d = c.hidden_size, f = c.intermediate_size;

  // A chunk that would overflow the local cache flushes all of it first (strictly greater than W).
  const bool flush = local_n_ > 0 && local_n_ + q > c.max_position_embeddings;
  const bool had_cache = local_n_ > 0;
  const int n_keep = flush ? 0 : local_n_;

  std::vector<float> x(size_t(q) * d), xn(size_t(q) * d), Q(size_t(q) * d), K(size_t(q) * d), Vv(size_t(q) * d),
      att(size_t(q) * d), tmp(size_t(q) * d);
  std::vector<float> gate(size_t(q) * f), up(size_t(q) * f);
  for (int i = 0; i < q; ++i) w.embed_row(ids[i], &x[size_t(i) * d]);

  const int last_mem = c.mem_layers.empty() ? -1 : *std::max_element(c.mem_layers.begin(), c.mem_layers.end());
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeightsT& L = w.layers[l];
    const bool is_mem = c.is_mem_layer(l);
    rmsnorm(x.data(), L.attn_norm.data(), q, d, c.rms_norm_eps, xn.data());
    if (kv_only && l == last_mem) {  // only this layer's keys/values matter (see forward)
      matmul(L.wk.ref, xn.data(), q, K.data());
      matmul(L.wv.ref, xn.data(), q, Vv.data());
      memory_[l]->append(K.data(), Vv.data(), q, d);
      tokens_seen_ += q;
      return;
    }
    matmul(L.wq.ref, xn.data(), q, Q.data());
    matmul(L.wk.ref, xn.data(), q, K.data());
    matmul(L.wv.ref, xn.data(), q, Vv.data());

    if (flush) {
      LocalCache& lc = local_[l];
      if (is_mem && use_cache) {  // the whole old cache moves to memory before attention
        const int D = c.head_dim_in(l), H = c.heads_in(l);
        std::vector<float> kr(size_t(local_n_) * d), vr(size_t(local_n_) * d);
        for (int h = 0; h < H; ++h)
          for (int t = 0; t < local_n_; ++t) {
            std::memcpy(&kr[size_t(t) * d + h * D], &lc.k_raw[h][size_t(t) * D], sizeof(float) * D);
            std::memcpy(&vr[size_t(t) * d + h * D], &lc.v[h][size_t(t) * D], sizeof(float) * D);
          }
        memory_[l]->append(kr.data(), vr.data(), local_n_, d);
      }
      for (auto* vecs : {&lc.k_rot, &lc.k_raw, &lc.v})
        for (auto& v : *vecs) v.clear();
    }

    // Window to memory: a memory layer called without a cache and without use_cache appends this
    // chunk's keys/values after its attention (so the chunk does not see itself twice).
    const bool window_to_memory = is_mem && !had_cache && !use_cache;
    attention(l, Q.data(), K.data(), Vv.data(), q, n_keep, use_cache, att.data());
    if (window_to_memory) memory_[l]->append(K.data(), Vv.data(), q, d);

    matmul(L.wo.ref, att.data(), q, tmp.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];

    rmsnorm(x.data(), L.ffn_norm.data(), q, d, c.rms_norm_eps, xn.data());
    matmul(L.w_gate.ref, xn.data(), q, gate.data());
    matmul(L.w_up.ref, xn.data(), q, up.data());
    silu_mul(gate.data(), up.data(), int64_t(q) * f, gate.data());
    matmul(L.w_down.ref, gate.data(), q, tmp.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
  }
  local_n_ = use_cache ? n_keep + q : 0;
  tokens_seen_ += q;

  // Only the logits that are asked for: the official code computes all of them.
  if (all_logits || last_logit) {
    const int first = all_logits ? 0 : q - 1;
    const int rows = q - first;
    rmsnorm(x.data() + size_t(first) * d, w.final_norm.data(), rows, d, c.rms_norm_eps, xn.data());
    matmul(w.lm_head.ref, xn.data(), rows, logits);
  }
}

// One layer's attention for q new tokens. Q, K, V: [q][d] straight from the projections.
// n_keep cached tokens precede the new ones in the local window.
void Session::attention(int layer, const float* Q, const float* K, const float* V, int q, int n_keep, bool use_cache,
                        float* out) {
  const ModelConfig& c = w_->config;
  const int H = c.heads_in(layer), D = c.head_dim_in(layer), d = c.hidden_size;
  const bool is_mem = c.is_mem_layer(layer);
  const bool use_rope = !is_mem || c.mem_positionals;
  LocalCache& lc = local_[layer];
  const KVMemory* mem = is_mem ? &*memory_[layer] : nullptr;
  const int n = n_keep + q;  // local keys, rotated by rel = position - oldest position
  rope_.ensure(n);

  // Append this chunk's keys (rotated, plus raw copies for a later flush) and values per head;
  // queries are rotated into a [H][q][D] buffer.
  std::vector<float> qh(size_t(H) * q * D);
#pragma omp parallel for schedule(static)
  for (int h = 0; h < H; ++h) {
    std::vector<float>& kr = lc.k_rot[h];
    std::vector<float>& vv = lc.v[h];
    kr.resize(size_t(n) * D);
    vv.resize(size_t(n) * D);
    if (is_mem && use_cache) lc.k_raw[h].resize(size_t(n) * D);
    for (int i = 0; i < q; ++i) {
      const size_t src = size_t(i) * d + h * D, dst = size_t(n_keep + i) * D;
      float* qi = &qh[(size_t(h) * q + i) * D];
      std::memcpy(qi, Q + src, sizeof(float) * D);
      std::memcpy(&kr[dst], K + src, sizeof(float) * D);
      std::memcpy(&vv[dst], V + src, sizeof(float) * D);
      if (is_mem && use_cache) std::memcpy(&lc.k_raw[h][dst], K + src, sizeof(float) * D);
      if (use_rope) {
        rope_.apply(qi, n_keep + i);
        rope_.apply(&kr[dst], n_keep + i);
      }
    }
  }

  if (mem && mem_query_fn_)
    for (int h = 0; h < H; ++h) mem_query_fn_(layer, h, &qh[size_t(h) * q * D], q);

  // Local keys of head h for queries i0..i0+nq (causal), in blocks of kKeyBlock.
  auto add_local = [&](HeadAttention& att, int h, int i0, int nq) {
    std::vector<int> limit(static_cast<size_t>(nq));
    const std::vector<float>& kr = lc.k_rot[h];
    const std::vector<float>& vv = lc.v[h];
    const int visible_end = n_keep + i0 + nq;  // keys beyond this are masked for every query here
    for (int b = 0; b < visible_end; b += kKeyBlock) {
      const int nk = std::min(kKeyBlock, visible_end - b);
      for (int i = 0; i < nq; ++i) limit[size_t(i)] = n_keep + i0 + i + 1 - b;
      att.add({DType::F32, &kr[size_t(b) * D], &vv[size_t(b) * D], nk}, limit.data());
    }
  };

  const int qb = q >= HeadAttention::kGemmMinQueries ? kQueryBlock : q;
  if (mem && top_k_ <= 0 && qb < HeadAttention::kGemmMinQueries) {
    // Decoding over the whole memory: each thread takes a range of heads and walks the memory chunk
    // by chunk, scoring its heads' keys of a chunk (one contiguous run) before reading their values
    // (another). One head at a time read 200 KB runs 6.5 MB apart: ~0.8 of the bandwidth probe
    // against ~0.95 for the long runs in the fast regime of this VM (bench_kernels:
    // BM_MemoryAttentionOrder). Same blocks in the same order per head: the same bits.
#pragma omp parallel
    {
      const int T = omp_get_num_threads(), t = omp_get_thread_num();
      const int h0 = H * t / T, h1 = H * (t + 1) / T;
      std::vector<HeadAttention> att;
      att.reserve(size_t(std::max(h1 - h0, 0)));
      for (int h = h0; h < h1; ++h) {
        att.emplace_back(&qh[size_t(h) * q * D], q, D, D);
        add_local(att.back(), h, 0, q);
      }
      for (int64_t b = 0; h1 > h0 && b < mem->size();) {  // a thread may have no head (H < threads)
        for (int h = h0; h < h1; ++h) att[size_t(h - h0)].add_keys(mem->block(h, b, kMemBlock));
        for (int h = h0; h < h1; ++h) att[size_t(h - h0)].add_values(mem->block(h, b, kMemBlock));
        b += mem->block(h0, b, kMemBlock).n;
      }
      for (int h = h0; h < h1; ++h) att[size_t(h - h0)].finish(out + h * D, d);
    }
  } else {
    // Tasks: (head, block of queries). Each runs one online softmax over the local keys (causal)
    // and the memory (its top-k, or all of it for prefill).
    const int nqb = (q + qb - 1) / qb;
#pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < H * nqb; ++task) {
      const int h = task / nqb, i0 = (task % nqb) * qb, nq = std::min(qb, q - i0);
      HeadAttention att(&qh[(size_t(h) * q + i0) * D], nq, D, D);
      add_local(att, h, i0, nq);
      if (mem && top_k_ > 0) {
        TopKScorer topk(&qh[(size_t(h) * q + i0) * D], nq, D, D, top_k_);
        for (int64_t b = 0; b < mem->size();) {
          const KVBlock blk = mem->block(h, b, kMemBlock);
          topk.add(blk, b);
          b += blk.n;
        }
        // Selected values are read in place, or widened to float32 rows for int8 (Q8) memory.
        const bool widen = mem->dtype() == MemDType::Q8;
        const DType vtype = widen ? DType::F32 : mem->block(h, 0, 1).type;
        std::vector<float> scores, rows;
        std::vector<const void*> values;
        for (int i = 0; i < nq; ++i) {
          scores.clear();
          values.clear();
          const auto hits = topk.take(i);
          if (widen) rows.resize(hits.size() * size_t(D));
          for (size_t r = 0; r < hits.size(); ++r) {
            scores.push_back(hits[r].score);
            if (widen) {
              mem->value_f32(h, hits[r].index, &rows[r * D]);
              values.push_back(&rows[r * D]);
            } else {
              values.push_back(mem->value_row(h, hits[r].index));
            }
          }
          att.add_scored(i, scores.data(), values.data(), int(scores.size()), vtype);
        }
      } else if (mem) {
        for (int64_t b = 0; b < mem->size();) {
          const KVBlock blk = mem->block(h, b, kMemBlock);
          att.add(blk);
          b += blk.n;
        }
      }
      att.finish(out + size_t(i0) * d + h * D, d);
    }
  }
  if (!use_cache)
    for (int h = 0; h < H; ++h) {
      lc.k_rot[h].clear();
      lc.v[h].clear();
    }
}

}  // namespace ll
