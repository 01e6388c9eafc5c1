#include "train/trainer.h"

#include <cblas.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "train/checkpoint.h"
#include "train/widen.h"
#include "util/error.h"

namespace fs = std::filesystem;

namespace ll::train {

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

std::string fmt_duration(double s) {
  char buf[32];
  if (s < 60)
    std::snprintf(buf, sizeof buf, "%.0fs", s);
  else if (s < 3600)
    std::snprintf(buf, sizeof buf, "%dm%02ds", int(s) / 60, int(s) % 60);
  else
    std::snprintf(buf, sizeof buf, "%dh%02dm", int(s) / 3600, (int(s) / 60) % 60);
  return buf;
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("tokenizer '" + path + "': cannot open");
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Pins OpenMP thread i to the i-th CPU the process may use, unless the user chose a binding
// (OMP_PROC_BIND). Measured on the 2-vCPU development VM: unpinned, two threads that each run
// single-threaded BLAS tiles were slower than one thread (they kept landing on the same CPU);
// pinned, they reach 2x. libgomp keeps its pool threads, so the pinning lasts.
void pin_threads() {
  if (std::getenv("OMP_PROC_BIND")) return;
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  if (cpus.size() < 2 || omp_get_max_threads() < 2) return;
#pragma omp parallel
  {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpus[size_t(omp_get_thread_num()) % cpus.size()], &one);
    pthread_setaffinity_np(pthread_self(), sizeof one, &one);
  }
}

void check_same_shape(const ModelConfig& a, const ModelConfig& b, const std::string& where) {
  auto same = [&](const char* field, long x, long y) {
    if (x != y)
      throw Error(where + ": model." + field + " = " + std::to_string(y) + " differs from the init model's " +
                  std::to_string(x) + " (the weights have that shape)");
  };
  same("vocab_size", a.vocab_size, b.vocab_size);
  same("hidden_size", a.hidden_size, b.hidden_size);
  same("intermediate_size", a.intermediate_size, b.intermediate_size);
  same("num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers);
  same("num_attention_heads", a.num_attention_heads, b.num_attention_heads);
  same("tie_word_embeddings", a.tie_word_embeddings, b.tie_word_embeddings);
}

}  // namespace

Trainer::Trainer(TrainConfig cfg, Start start, Log log)
    : cfg_(std::move(cfg)), log_(std::move(log)), net_(cfg_.model, cfg_.seq_len), adam_(cfg_.optimizer, net_.layout()) {
  if (cfg_.threads > 0) {
    omp_set_num_threads(cfg_.threads);
    openblas_set_num_threads(cfg_.threads);
  }
  pin_threads();
  if (cfg_.negative_bank_size > 0) net_.enable_negative_banks(cfg_.negative_bank_size, cfg_.negative_bank_top_k);
  const ParamLayout& L = net_.layout();
  grads_.assign(L.total, 0.0f);
  if (!cfg_.init.empty()) {
    Model init = Model::load(cfg_.init);
    if (cfg_.init_widen.factor > 0) {
      const int d = init.config.hidden_size;
      init = widen_model(init, {cfg_.init_widen.factor, cfg_.init_widen.std, cfg_.init_widen.seed});
      this->log("init widened x" + std::to_string(cfg_.init_widen.factor) + ": hidden " + std::to_string(d) + " -> " +
          std::to_string(init.config.hidden_size));
    }
    check_same_shape(init.config, cfg_.model, cfg_.source);
    params_ = flatten(init, L);
    scale_memory_queries(&init.config);
    copy_init_rows();
    if (cfg_.tokenizer.empty() && !init.tokenizer_path.empty()) cfg_.tokenizer = init.tokenizer_path;
  } else {
    params_ = flatten(Model::random(cfg_.model, cfg_.seed), L);
    scale_memory_queries(nullptr);
  }
  build_data();
  if (cfg_.negative_bank_size > 0 && cfg_.negative_bank_momentum > 0) {
    ema_net_ = std::make_unique<Network<float>>(cfg_.model, cfg_.seq_len);
    ema_params_ = params_;
    net_.set_bank_external(true);
  }

  describe();
  if (start == Start::Bench) return;
  const fs::path ckroot = fs::path(cfg_.output) / "checkpoints";
  const auto latest = latest_checkpoint(ckroot.string());
  if (start == Start::Resume) {
    if (!latest) throw Error(ckroot.string() + ": no checkpoint to resume from");
    restore(*latest);
    if (ema_net_) ema_params_ = params_;  // the momentum copy starts again from the resumed parameters
  } else if (latest) {
    throw Error(cfg_.output + ": already holds checkpoints (" + *latest +
                "); pass --resume to continue that run, or choose another output directory");
  }
}

void Trainer::describe() const {
  const ModelConfig& c = cfg_.model;
  const size_t embed = size_t(c.vocab_size) * c.hidden_size;
  const int S = cfg_.seq_len, mb = cfg_.micro_batch_size;
  // Activations kept per micro-batch (see network.h) plus the logits and their gradient.
  const double acts = double(mb) * S * 4 *
                      (double(c.num_hidden_layers) * (9.0 * c.hidden_size + 3.0 * c.intermediate_size) + c.vocab_size +
                       3.0 * c.hidden_size);
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "model: %zu parameters (%zu in the embedding table), memory layers %zu | batch %d x %d tokens "
                "(packs of %d, micro-batches of %d), activations ~%.0f MiB",
                params_.size(), embed, c.mem_layers.size(), cfg_.batch_size, S, cfg_.pack_size, mb, acts / (1 << 20));
  log(buf);
}

void Trainer::build_data() {
  if (!cfg_.tokenizer.empty()) {
    tokenizer_bytes_ = read_bytes(cfg_.tokenizer);
    tokenizer_ = std::make_shared<const Tokenizer>(cfg_.tokenizer);
  }
  const Tokenizer* tok = tokenizer_.get();
  auto train = std::make_shared<MixtureSource>(), eval = std::make_shared<MixtureSource>();
  for (size_t i = 0; i < cfg_.sources.size(); ++i) {
    const SourceConfig& s = cfg_.sources[i];
    const std::string where = cfg_.source + ": data.sources[" + std::to_string(i) + "]";
    if (!s.text_files.empty()) {
      if (!tok) throw Error(where + ": a text source needs data.tokenizer (or an init model with tokenizer.model)");
      auto corpus = std::make_shared<TextCorpus>(s.text_files, s.split, *tok, s.eval_fraction, mix_seed(cfg_.seed, i));
      train->add(std::make_shared<TextSource>(corpus, false), s.weight);
      eval->add(std::make_shared<TextSource>(corpus, true), s.weight);
      log("data: " + std::to_string(corpus->train().size()) + " training documents (" +
          std::to_string(corpus->train_tokens()) + " tokens), " + std::to_string(corpus->eval().size()) + " held out");
    } else {
      std::shared_ptr<const DocumentSource> task = make_task(s.task, s.task_options, tok, where);
      train->add(task, s.weight);
      eval->add(task, s.weight);  // evaluation draws other documents (another seed)
    }
  }
  if (train->vocab_needed() > cfg_.model.vocab_size)
    throw Error(cfg_.source + ": the data needs vocab_size >= " + std::to_string(train->vocab_needed()) +
                ", the model has " + std::to_string(cfg_.model.vocab_size));
  train_src_ = train;
  eval_src_ = eval;
  stream_ = std::make_unique<PackedStreams>(train_src_, cfg_.seed, cfg_.batch_size / cfg_.pack_size, cfg_.pack_size,
                                            cfg_.seq_len);
}

void Trainer::restore(const std::string& dir) {
  CheckpointData ck = load_checkpoint(dir);
  const nlohmann::json& st = ck.state;
  for (const auto& field : resume_sensitive_fields()) {
    const auto a = st.at("config").value(field, nlohmann::json()), b = cfg_.raw.value(field, nlohmann::json());
    if (a != b)
      throw Error(cfg_.source + ": field '" + field + "' differs from the run in " + dir +
                  " (a resumed run must use the same settings)");
  }
  check_same_shape(ck.model.config, cfg_.model, dir);
  params_ = flatten(ck.model, net_.layout());
  if (ck.adam_m.size() != params_.size() || ck.adam_v.size() != params_.size())
    throw Error(dir + ": optimizer state does not match the model");
  adam_.m = std::move(ck.adam_m);
  adam_.v = std::move(ck.adam_v);
  step_ = st.at("step").get<int64_t>();
  phase_ = st.at("phase").get<size_t>();
  phase_start_ = st.at("phase_start").get<int64_t>();
  if (phase_ >= cfg_.schedule.size()) throw Error(dir + ": schedule phase out of range");
  recent_accuracy_.clear();
  for (double a : st.at("recent_accuracy")) recent_accuracy_.push_back(a);
  stream_->restore(st.at("data"));
  log("resumed from " + dir + " at step " + std::to_string(step_));
}

// The memory layers' query projections are scaled once before the first step:
// - by sqrt(D_new / D_old) when fine-tuning with another memory-layer head count
//   (mem_num_attention_heads): the weights keep their shapes and the heads are regrouped, and a
//   merged head's logit is then the sum of the old heads' logits, not half of it;
// - by the config's mem_query_scale (a memory-attention temperature).
void Trainer::scale_memory_queries(const ModelConfig* init) {
  const ModelConfig& c = cfg_.model;
  if (c.mem_layers.empty()) return;
  const int d = c.hidden_size;
  double scale = cfg_.mem_query_scale;
  if (init && init->mem_heads() != c.mem_heads()) {
    scale *= std::sqrt(double(d / c.mem_heads()) / double(d / init->mem_heads()));
    log("memory layers regrouped from " + std::to_string(init->mem_heads()) + " to " + std::to_string(c.mem_heads()) +
        " heads");
  }
  if (scale == 1.0) return;
  for (int l : c.mem_layers) {
    float* wq = params_.data() + net_.layout().layers[size_t(l)].wq;
    for (size_t i = 0; i < size_t(d) * d; ++i) wq[i] = float(double(wq[i]) * scale);
  }
  log("memory layers' query projections scaled by " + std::to_string(scale));
}

void Trainer::copy_init_rows() {
  const TrainConfig::CopyRows& r = cfg_.init_copy_rows;
  if (r.rows_end <= r.rows_begin) return;
  const ParamLayout& L = net_.layout();
  const size_t d = size_t(cfg_.model.hidden_size);
  Rng rng(mix_seed(cfg_.seed, 0x636f7079ull));
  auto gauss = [&rng] {  // Box-Muller: the same numbers on every machine
    const double u = 1.0 - rng.uniform(), v = rng.uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  };
  std::vector<size_t> tables = {L.embed};
  if (L.lm_head != L.embed) tables.push_back(L.lm_head);
  for (size_t t : tables)
    for (int row = r.rows_begin; row < r.rows_end; ++row) {
      const int from = r.from_begin + (row - r.rows_begin) % (r.from_end - r.from_begin);
      float* dst = params_.data() + t + size_t(row) * d;
      const float* src = params_.data() + t + size_t(from) * d;
      for (size_t j = 0; j < d; ++j) dst[j] = float(double(src[j]) + r.noise * gauss());
    }
  log("token rows [" + std::to_string(r.rows_begin) + ", " + std::to_string(r.rows_end) + ") copied from [" +
      std::to_string(r.from_begin) + ", " + std::to_string(r.from_end) + ") with noise " + std::to_string(r.noise));
}

void Trainer::log(const std::string& line) const {
  if (log_) log_(line);
}

void Trainer::log_json(const nlohmann::json& j) const {
  fs::create_directories(cfg_.output);
  std::ofstream f(fs::path(cfg_.output) / "log.jsonl", std::ios::app);
  f << j.dump() << "\n";
}

void Trainer::advance_schedule(double accuracy) {
  recent_accuracy_.push_back(accuracy);
  while (int(recent_accuracy_.size()) > cfg_.accuracy_window) recent_accuracy_.pop_front();
  if (phase_ + 1 >= cfg_.schedule.size()) return;
  const Phase& ph = cfg_.schedule[phase_];
  bool done = ph.steps > 0 && step_ - phase_start_ >= ph.steps;
  if (ph.until_accuracy > 0 && int(recent_accuracy_.size()) == cfg_.accuracy_window) {
    double mean = 0;
    for (double a : recent_accuracy_) mean += a;
    done = done || mean / double(recent_accuracy_.size()) >= ph.until_accuracy;
  }
  if (!done) return;
  ++phase_;
  phase_start_ = step_;
  recent_accuracy_.clear();
  log("step " + std::to_string(step_) + ": crossbatch phase " + std::to_string(phase_) + ", cross_batch_range " +
      std::to_string(cfg_.schedule[phase_].range) + " (d = " + std::to_string(cfg_.schedule[phase_].range + 1) + ")");
}

StepStats Trainer::step() {
  const auto t0 = clock_type::now();
  const int S = cfg_.seq_len, B = cfg_.batch_size, mb = cfg_.micro_batch_size;
  const CrossBatch cb{cfg_.pack_size, current_range(), cfg_.stepping, true, cfg_.negative_bias};
  const bool attend = cfg_.memory_attention_loss > 0;
  stream_->next(inputs_, targets_, mask_, attend ? &attend_ : nullptr);
  std::fill(grads_.begin(), grads_.end(), 0.0f);
  double loss_sum = 0, attention_loss = 0;
  int64_t correct = 0, counted = 0;
  for (int m = 0; m < B; m += mb) {
    const size_t at = size_t(m) * S;
    net_.use_negative_banks(mask_.data() + at, cfg_.pack_size);
    if (ema_net_) {  // the definition chunks of this micro-batch through the momentum copy
      ema_inputs_.clear();
      for (int b = 0; b < mb; b += cfg_.pack_size)
        ema_inputs_.insert(ema_inputs_.end(), inputs_.begin() + at + size_t(b) * S,
                           inputs_.begin() + at + size_t(b + 1) * S);
      ema_net_->forward(ema_params_.data(), ema_inputs_.data(), mb / cfg_.pack_size, CrossBatch{1, 0, true, true});
    }
    net_.forward(params_.data(), inputs_.data() + at, mb, cb);
    if (attend) {  // batch rows -> rows of this micro-batch (a pack never straddles micro-batches)
      attend_mb_.assign(attend_.begin() + ptrdiff_t(at), attend_.begin() + ptrdiff_t(at + size_t(mb) * S));
      for (int32_t& r : attend_mb_) r = r >= int32_t(at) ? r - int32_t(at) : -1;
      net_.use_attention_targets(attend_mb_.data(), cfg_.memory_attention_loss);
    }
    const CEStats st =
        net_.backward(params_.data(), targets_.data() + at, mask_.data() + at, 1.0f / float(B), grads_.data());
    attention_loss += net_.attention_loss();
    if (ema_net_) net_.push_banks_from(*ema_net_);
    loss_sum += st.loss_sum;
    correct += st.correct;
    counted += st.counted;
  }
  if (!std::isfinite(loss_sum))
    throw Error("step " + std::to_string(step_ + 1) +
                ": the loss is not finite (lower optimizer.lr or raise warmup_steps)");
  StepStats s;
  s.range = cb.range;
  s.lr = learning_rate(cfg_.optimizer, step_ + 1, cfg_.steps);
  s.grad_norm = adam_.update(params_.data(), grads_.data(), step_ + 1, s.lr);
  if (ema_net_) {
    const float m = float(cfg_.negative_bank_momentum);
    for (size_t i = 0; i < params_.size(); ++i) ema_params_[i] = m * ema_params_[i] + (1 - m) * params_[i];
  }
  ++step_;
  s.step = step_;
  s.loss = loss_sum / B;
  s.attention_loss = attention_loss / B;
  s.accuracy = counted ? double(correct) / double(counted) : 0.0;
  s.tokens = int64_t(B) * S;
  advance_schedule(s.accuracy);
  s.seconds = seconds_since(t0);
  return s;
}

EvalStats Trainer::evaluate() {
  const int S = cfg_.seq_len, B = cfg_.batch_size, mb = cfg_.micro_batch_size;
  const CrossBatch cb{cfg_.pack_size, cfg_.eval_range, cfg_.eval_stepping, cfg_.eval_negatives};
  PackedStreams es(eval_src_, mix_seed(cfg_.seed, 0xE7A1), B / cfg_.pack_size, cfg_.pack_size, S);
  std::vector<int> in, tg;
  std::vector<uint8_t> mk;
  double loss_sum = 0;
  int64_t correct = 0, counted = 0, entries = 0;
  for (int i = 0; i < cfg_.eval_batches; ++i) {
    es.next(in, tg, mk);
    for (int m = 0; m < B; m += mb) {
      const size_t at = size_t(m) * S;
      net_.forward(params_.data(), in.data() + at, mb, cb);
      const CEStats st = net_.loss(tg.data() + at, mk.data() + at);
      loss_sum += st.loss_sum;
      correct += st.correct;
      counted += st.counted;
      entries += mb;
    }
  }
  EvalStats e;
  e.loss = entries ? loss_sum / double(entries) : 0.0;
  e.accuracy = counted ? double(correct) / double(counted) : 0.0;
  e.tokens = entries * S;
  return e;
}

Model Trainer::model() const {
  Model m = unflatten(params_.data(), cfg_.model, net_.layout());
  return m;
}

std::string Trainer::save_checkpoint() {
  CheckpointData ck;
  ck.model = model();
  ck.adam_m = adam_.m;
  ck.adam_v = adam_.v;
  ck.tokenizer_bytes = tokenizer_bytes_;
  ck.state = {{"step", step_},
              {"phase", phase_},
              {"phase_start", phase_start_},
              {"recent_accuracy", recent_accuracy_},
              {"data", stream_->state()},
              {"config", cfg_.raw}};
  return ll::train::save_checkpoint((fs::path(cfg_.output) / "checkpoints").string(), step_, ck, cfg_.keep_checkpoints);
}

void Trainer::run(int64_t stop_after) {
  fs::create_directories(cfg_.output);
  const int64_t first = step_;
  const auto t0 = clock_type::now();
  auto last_log = t0;
  int64_t tokens_since = 0;
  auto do_eval = [&]() -> double {
    if (cfg_.eval_batches <= 0) return 0.0;
    const EvalStats e = evaluate();
    char buf[160];
    std::snprintf(buf, sizeof buf, "eval step %lld: loss %.4f | acc %.4f | %lld tokens, cross_batch_range %d",
                  (long long)step_, e.loss, e.accuracy, (long long)e.tokens, cfg_.eval_range);
    log(buf);
    log_json({{"step", step_}, {"eval_loss", e.loss}, {"eval_accuracy", e.accuracy}});
    return e.accuracy;
  };
  if (step_ == 0) do_eval();  // the starting point
  while (step_ < cfg_.steps) {
    const StepStats s = step();
    tokens_since += s.tokens;
    if (cfg_.log_interval > 0 && (step_ % cfg_.log_interval == 0 || step_ == cfg_.steps)) {
      const double dt = seconds_since(last_log), total = seconds_since(t0);
      const double eta = total / double(step_ - first) * double(cfg_.steps - step_);
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "step %lld/%lld | loss %.4f | acc %.4f | r %d | lr %.2e | |g| %.3f | %.0f tok/s | ETA %s",
                    (long long)step_, (long long)cfg_.steps, s.loss, s.accuracy, s.range, s.lr, s.grad_norm,
                    double(tokens_since) / dt, fmt_duration(eta).c_str());
      if (cfg_.memory_attention_loss > 0)
        std::snprintf(buf + std::strlen(buf), sizeof buf - std::strlen(buf), " | attn loss %.4f", s.attention_loss);
      log(buf);
      log_json({{"step", step_},
                {"loss", s.loss},
                {"attention_loss", s.attention_loss},
                {"accuracy", s.accuracy},
                {"range", s.range},
                {"lr", s.lr},
                {"grad_norm", s.grad_norm},
                {"tokens_per_s", double(tokens_since) / dt}});
      last_log = clock_type::now();
      tokens_since = 0;
    }
    const bool stopping = stop_after > 0 && step_ >= stop_after;
    bool reached = false;
    if (cfg_.eval_interval > 0 && step_ % cfg_.eval_interval == 0 && step_ < cfg_.steps) {
      const double acc = do_eval();
      reached = cfg_.eval_stop_accuracy > 0 && acc >= cfg_.eval_stop_accuracy;
      if (reached) log("eval accuracy reached eval.stop_accuracy " + std::to_string(cfg_.eval_stop_accuracy) + ": stopping");
    }
    if ((cfg_.checkpoint_interval > 0 && step_ % cfg_.checkpoint_interval == 0) || step_ == cfg_.steps || stopping || reached)
      log("checkpoint: " + save_checkpoint());
    if (reached) break;
    if (stopping && step_ < cfg_.steps) return;
  }
  if (step_ > first && step_ == cfg_.steps) do_eval();
  const std::string out = (fs::path(cfg_.output) / "model").string();
  save_model_dir(out, model(), cfg_.save_bf16, tokenizer_bytes_);
  log("model: " + out);
}

double train_flops_per_token(const ModelConfig& c, int S, int micro_batch, const CrossBatch& cb) {
  const double d = c.hidden_size, f = c.intermediate_size;
  const double matmul_params = c.num_hidden_layers * (4 * d * d + 3 * d * f) + double(c.vocab_size) * d;
  double keys = 0;  // useful (unmasked) keys summed over all queries of the micro-batch, all layers
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const int r = c.is_mem_layer(l) ? cb.range : 0;
    CrossBatch lcb = cb;
    lcb.range = r;
    for (int b = 0; b < micro_batch; ++b) keys += double(S) * (S + 1) / 2 + double(lcb.contexts(b) - 1) * S * S;
  }
  // q·k and p·v: 4·d flops per (query, key) forward, twice that backward
  return 6 * matmul_params + 12 * d * keys / (double(S) * micro_batch);
}

BenchReport Trainer::bench(int steps) {
  BenchReport r;
  r.params = params_.size();
  const CrossBatch cb{cfg_.pack_size, current_range(), cfg_.stepping, true, cfg_.negative_bias};
  r.flops_per_token = train_flops_per_token(cfg_.model, cfg_.seq_len, cfg_.micro_batch_size, cb);
  step();  // warm-up: allocations, page faults
  const auto t0 = clock_type::now();
  for (int i = 0; i < steps; ++i) r.tokens += step().tokens;
  r.seconds = seconds_since(t0);
  r.steps = steps;
  r.tokens_per_s = double(r.tokens) / r.seconds;
  r.train_gflops = r.tokens_per_s * r.flops_per_token / 1e9;
  // Peak reference: a large square sgemm with OpenBLAS, best of a few runs, same threads, both
  // through OpenBLAS's own threading and through our thread-count-independent tiling.
  const int n = 1536;
  std::vector<float> a(size_t(n) * n, 0.5f), b(size_t(n) * n, 0.25f), c(size_t(n) * n);
  double best = 1e30;
  for (int i = 0; i < 6; ++i) {
    const auto s0 = clock_type::now();
    if (i % 2)
      gemm<float>(false, true, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    else
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    best = std::min(best, seconds_since(s0));
  }
  r.sgemm_gflops = 2.0 * n * n * n / best / 1e9;
  return r;
}

}  // namespace ll::train
