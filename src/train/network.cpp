#include "train/network.h"

#include <cstring>

namespace ll::train {

template <typename T>
Network<T>::Network(const ModelConfig& config, int seq_len)
    : config_(config), layout_(config), S_(seq_len), rope_(config.head_dim(), config.rope_theta, seq_len) {
  acts_.resize(config.num_hidden_layers);
}

template <typename T>
CrossBatch Network<T>::layer_cb(int layer) const {
  if (config_.is_mem_layer(layer)) return cb_;
  CrossBatch plain = cb_;
  plain.range = 0;
  return plain;
}

template <typename T>
void Network<T>::enable_negative_banks(int64_t size, int top_k) {
  banks_.clear();
  banks_.resize(config_.num_hidden_layers);
  for (int l = 0; l < config_.num_hidden_layers; ++l)
    if (config_.is_mem_layer(l))
      banks_[l] = std::make_unique<NegativeBank<T>>(size, top_k, config_.heads_in(l), config_.head_dim_in(l));
}

template <typename T>
void Network<T>::push_banks_from(const Network<T>& other) {
  const int64_t rows = int64_t(other.B_) * other.S_;
  for (int l = 0; l < config_.num_hidden_layers; ++l)
    if (banks_[l]) banks_[l]->push(other.acts_[l].K.data(), other.acts_[l].V.data(), rows);
}

template <typename T>
void Network<T>::use_negative_banks(const uint8_t* mask, int pack) {
  bank_mask_ = banks_.empty() ? nullptr : mask;
  bank_pack_ = banks_.empty() ? 0 : pack;
}

template <typename T>
void Network<T>::use_attention_targets(const int32_t* attend, double weight) {
  attend_ = weight > 0 ? attend : nullptr;
  attend_weight_ = weight;
}

template <typename T>
const T* Network<T>::forward(const T* p, const int* inputs, int B, const CrossBatch& cb) {
  const ModelConfig& c = config_;
  const int S = S_, N = B * S, d = c.hidden_size, f = c.intermediate_size, H = c.num_attention_heads,
            V = c.vocab_size;
  const T eps = T(c.rms_norm_eps);
  B_ = B;
  cb_ = cb;
  inputs_.assign(inputs, inputs + N);
  bank_rows_.clear();
  if (bank_pack_ > 0)
    for (int r = 0; r < N; ++r)
      if (bank_mask_[r]) bank_rows_.push_back(r);
  std::vector<T>& x = x_;
  std::vector<T>& tmp = tmp_;
  x.resize(size_t(N) * d);
  tmp.resize(size_t(N) * d);
  embedding_fwd(p + layout_.embed, d, inputs, N, x.data());

  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerOffsets& o = layout_.layers[l];
    LayerActs& a = acts_[l];
    const CrossBatch lcb = layer_cb(l);
    for (auto* v : {&a.xn, &a.Q, &a.K, &a.V, &a.att, &a.x_mid, &a.xn2}) v->resize(size_t(N) * d);
    for (auto* v : {&a.G, &a.U, &a.A}) v->resize(size_t(N) * f);
    a.rstd1.resize(N);
    a.rstd2.resize(N);
    a.x_in = x;
    rmsnorm_fwd(x.data(), p + o.attn_norm, N, d, eps, a.xn.data(), a.rstd1.data());
    linear_fwd(a.xn.data(), N, d, p + o.wq, d, a.Q.data());
    linear_fwd(a.xn.data(), N, d, p + o.wk, d, a.K.data());
    linear_fwd(a.xn.data(), N, d, p + o.wv, d, a.V.data());
    if (rope_in(l)) {  // Q is rotated in place; K stays raw for the other entries, Kr is rotated
      rope_fwd(a.Q.data(), N, d, H, rope_, S);
      a.Kr = a.K;
      rope_fwd(a.Kr.data(), N, d, H, rope_, S);
    } else {
      a.Kr.clear();
    }
    const T* kown = rope_in(l) ? a.Kr.data() : a.K.data();
    const int Hl = c.heads_in(l), Dl = c.head_dim_in(l);  // RoPE layers have H heads (config.cpp)
    a.lse.resize(size_t(B) * Hl * S);
    attention_fwd(lcb, B, S, Hl, Dl, a.Q.data(), kown, a.K.data(), a.V.data(), a.lse.data(), a.att.data());
    if (bank_pack_ > 0 && banks_[l]) {
      banks_[l]->select(a.Q.data(), bank_rows_);
      banks_[l]->merge_fwd(S, a.lse.data(), a.att.data());
    }
    linear_fwd(a.att.data(), N, d, p + o.wo, d, tmp.data());
    for (size_t i = 0; i < x.size(); ++i) a.x_mid[i] = x[i] + tmp[i];
    rmsnorm_fwd(a.x_mid.data(), p + o.ffn_norm, N, d, eps, a.xn2.data(), a.rstd2.data());
    linear_fwd(a.xn2.data(), N, d, p + o.w_gate, f, a.G.data());
    linear_fwd(a.xn2.data(), N, d, p + o.w_up, f, a.U.data());
    swiglu_fwd(a.G.data(), a.U.data(), int64_t(N) * f, a.A.data());
    linear_fwd(a.A.data(), N, f, p + o.w_down, d, tmp.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] = a.x_mid[i] + tmp[i];
  }
  x_final_.swap(x);
  xf_.resize(size_t(N) * d);
  rstd_f_.resize(N);
  rmsnorm_fwd(x_final_.data(), p + layout_.final_norm, N, d, eps, xf_.data(), rstd_f_.data());
  logits_.resize(size_t(N) * V);
  linear_fwd(xf_.data(), N, d, p + layout_.lm_head, V, logits_.data());
  return logits_.data();
}

template <typename T>
CEStats Network<T>::loss(const int* targets, const uint8_t* mask) {
  return cross_entropy<T>(logits_.data(), B_ * S_, config_.vocab_size, targets, mask, S_, T(0), nullptr);
}

template <typename T>
CEStats Network<T>::backward(const T* p, const int* targets, const uint8_t* mask, T loss_scale, T* g) {
  const ModelConfig& c = config_;
  const int S = S_, B = B_, N = B * S, d = c.hidden_size, f = c.intermediate_size, H = c.num_attention_heads,
            V = c.vocab_size;
  attention_loss_ = 0;
  // dlogits overwrite the logits
  const CEStats st = cross_entropy<T>(logits_.data(), N, V, targets, mask, S, loss_scale, logits_.data());
  std::vector<T>&dx = dx_, &dxn = dxn_;
  dx.resize(size_t(N) * d);
  dxn.resize(size_t(N) * d);
  linear_bwd(xf_.data(), N, d, p + layout_.lm_head, V, logits_.data(), dxn.data(), false, g + layout_.lm_head);
  std::fill(dx.begin(), dx.end(), T(0));
  rmsnorm_bwd(x_final_.data(), p + layout_.final_norm, rstd_f_.data(), dxn.data(), N, d, dx.data(),
              g + layout_.final_norm);

  std::vector<T>&dA = dA_, &dG = dG_, &dU = dU_;
  for (auto* v : {&dA, &dG, &dU}) v->resize(size_t(N) * f);
  std::vector<T>&datt = datt_, &dQ = dQ_, &dKown = dKown_, &dKx = dKx_, &dV = dV_;
  for (auto* v : {&datt, &dQ, &dKown, &dKx, &dV}) v->resize(size_t(N) * d);
  for (int l = c.num_hidden_layers - 1; l >= 0; --l) {
    const LayerOffsets& o = layout_.layers[l];
    LayerActs& a = acts_[l];
    // dx is the gradient w.r.t. the layer output = x_mid + down(A).
    linear_bwd(a.A.data(), N, f, p + o.w_down, d, dx.data(), dA.data(), false, g + o.w_down);
    swiglu_bwd(a.G.data(), a.U.data(), dA.data(), int64_t(N) * f, dG.data(), dU.data());
    linear_bwd(a.xn2.data(), N, d, p + o.w_gate, f, dG.data(), dxn.data(), false, g + o.w_gate);
    linear_bwd(a.xn2.data(), N, d, p + o.w_up, f, dU.data(), dxn.data(), true, g + o.w_up);
    rmsnorm_bwd(a.x_mid.data(), p + o.ffn_norm, a.rstd2.data(), dxn.data(), N, d, dx.data(), g + o.ffn_norm);
    // now dx = ∂/∂x_mid
    linear_bwd(a.att.data(), N, d, p + o.wo, d, dx.data(), datt.data(), false, g + o.wo);
    const bool rope = rope_in(l);
    const T* kown = rope ? a.Kr.data() : a.K.data();
    const CrossBatch lcb = layer_cb(l);
    const int Hl = c.heads_in(l), Dl = c.head_dim_in(l);
    AttendTargets<T> targets;
    if (attend_ && c.is_mem_layer(l)) {
      // per row: weight / (visible targets of its entry · heads), the entry mean like the NLL's
      attend_w_.assign(size_t(N), T(0));
      for (int b = 0; b < B; ++b) {
        int n = 0;
        for (int i = 0; i < S; ++i) {
          const int32_t t = attend_[b * S + i];
          n += t >= 0 && lcb.sees(b, i, t / S, t % S);
        }
        for (int i = 0; i < S && n > 0; ++i) attend_w_[size_t(b) * S + i] = T(attend_weight_ / (double(n) * Hl));
      }
      targets = {attend_, attend_w_.data()};
      attention_loss_ += attention_target_loss(lcb, B, S, Hl, Dl, a.Q.data(), kown, a.K.data(), a.lse.data(), targets);
      for (T& w : attend_w_) w *= loss_scale;
    }
    attention_bwd(lcb, B, S, Hl, Dl, a.Q.data(), kown, a.K.data(), a.V.data(), a.lse.data(), a.att.data(), datt.data(),
                  dQ.data(), dKown.data(), dKx.data(), dV.data(), targets);
    if (bank_pack_ > 0 && banks_[l]) banks_[l]->add_dq(S, a.lse.data(), a.att.data(), datt.data(), dQ.data());
    if (rope) {
      rope_bwd(dQ.data(), N, d, H, rope_, S);
      rope_bwd(dKown.data(), N, d, H, rope_, S);
    }
    for (size_t i = 0; i < dKx.size(); ++i) dKx[i] += dKown[i];  // own (rotated) + seen-by-others (raw)
    linear_bwd(a.xn.data(), N, d, p + o.wq, d, dQ.data(), dxn.data(), false, g + o.wq);
    linear_bwd(a.xn.data(), N, d, p + o.wk, d, dKx.data(), dxn.data(), true, g + o.wk);
    linear_bwd(a.xn.data(), N, d, p + o.wv, d, dV.data(), dxn.data(), true, g + o.wv);
    rmsnorm_bwd(a.x_in.data(), p + o.attn_norm, a.rstd1.data(), dxn.data(), N, d, dx.data(), g + o.attn_norm);
  }
  embedding_bwd(dx.data(), d, inputs_.data(), N, g + layout_.embed);
  if (bank_pack_ > 0) {  // after the backward pass: the selections above index the banks as they were
    const int64_t ld = d;
    for (int l = 0; l < c.num_hidden_layers; ++l)
      if (banks_[l] && !bank_external_)
        for (int b = 0; b < B; b += bank_pack_)
          banks_[l]->push(acts_[l].K.data() + int64_t(b) * S * ld, acts_[l].V.data() + int64_t(b) * S * ld, S);
    bank_pack_ = 0;
    bank_mask_ = nullptr;
  }
  attend_ = nullptr;
  return st;
}

template class Network<float>;
template class Network<double>;

}  // namespace ll::train
