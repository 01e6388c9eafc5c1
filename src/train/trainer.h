#pragma once
// The FoT training loop: k-packed batches, crossbatch schedule, gradient accumulation over
// micro-batches of whole packs, AdamW, periodic evaluation, atomic checkpoints with exact resume.
//
// Determinism: given the seed, a run is reproducible bit for bit, whatever the thread count
// (every sum has a fixed order and gemms are tiled by shape, see backward_ops.h), and a resumed
// run continues exactly as the uninterrupted one (the checkpoint holds parameters, moments, step,
// schedule and data state; documents are regenerated from their numbers). Both checked in tests.
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "train/data.h"
#include "train/network.h"
#include "train/optimizer.h"
#include "train/train_config.h"

namespace ll::train {

struct StepStats {
  int64_t step = 0;     // number of optimizer steps done, this one included
  double loss = 0;      // mean over entries of per-entry mean NLL (the objective)
  double attention_loss = 0;  // memory_attention_loss's term, same mean (weight included)
  double accuracy = 0;  // over loss tokens: argmax == target
  double grad_norm = 0, lr = 0;
  int range = 0;  // cross_batch_range used
  int64_t tokens = 0;
  double seconds = 0;
};

struct EvalStats {
  double loss = 0, accuracy = 0;
  int64_t tokens = 0;
};

struct BenchReport {
  int steps = 0;
  int64_t tokens = 0;
  double seconds = 0, tokens_per_s = 0;
  double flops_per_token = 0;  // 6·(matmul params) + attention, forward + backward
  double train_gflops = 0;     // achieved
  double sgemm_gflops = 0;     // OpenBLAS sgemm on this machine, same threads, measured in the run
  size_t params = 0;
};

class Trainer {
 public:
  using Log = std::function<void(const std::string&)>;
  enum class Start { Fresh, Resume, Bench };
  // Fresh refuses an output directory that already holds checkpoints; Resume continues from the
  // newest one; Bench ignores the output directory (bench() writes nothing).
  Trainer(TrainConfig cfg, Start start, Log log = {});

  StepStats step();
  EvalStats evaluate();
  // Trains until cfg.steps (or until step stop_after > 0, as if interrupted there: a checkpoint is
  // written, the final model is not), with logs, evaluations and checkpoints.
  void run(int64_t stop_after = 0);
  BenchReport bench(int steps);

  int64_t steps_done() const { return step_; }
  int current_range() const { return cfg_.schedule[phase_].range; }
  const std::vector<float>& params() const { return params_; }
  Model model() const;  // the current parameters as a Model
  const TrainConfig& config() const { return cfg_; }
  std::string save_checkpoint();

 private:
  void build_data();
  void describe() const;
  void scale_memory_queries(const ModelConfig* init);
  void copy_init_rows();  // init_copy_rows
  void restore(const std::string& checkpoint_dir);
  void advance_schedule(double accuracy);
  void log(const std::string& line) const;
  void log_json(const nlohmann::json& j) const;

  TrainConfig cfg_;
  Log log_;
  Network<float> net_;
  std::unique_ptr<Network<float>> ema_net_;  // negative_bank momentum: computes the bank's keys
  std::vector<float> ema_params_;
  std::vector<int> ema_inputs_;
  std::vector<float> params_, grads_;
  AdamW adam_;
  std::string tokenizer_bytes_;
  std::shared_ptr<const Tokenizer> tokenizer_;  // outlives the data sources that tokenize (passkey)
  std::shared_ptr<const DocumentSource> train_src_, eval_src_;
  std::unique_ptr<PackedStreams> stream_;
  int64_t step_ = 0;
  size_t phase_ = 0;
  int64_t phase_start_ = 0;
  std::deque<double> recent_accuracy_;
  std::vector<int> inputs_, targets_;
  std::vector<uint8_t> mask_;
  std::vector<int32_t> attend_, attend_mb_;  // memory_attention_loss: the batch's and a micro-batch's targets
};

// Training FLOPs per token of a micro-batch layout (what bench() counts).
double train_flops_per_token(const ModelConfig& c, int S, int micro_batch, const CrossBatch& cb);

}  // namespace ll::train
