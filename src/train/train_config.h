#pragma once
// TRAIN.json: everything a training run needs (schema in docs/training.md). Parsing checks every
// field and rejects unknown ones, with errors that name the file and the field.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/config.h"
#include "train/optimizer.h"

namespace ll::train {

struct SourceConfig {
  std::vector<std::string> text_files;  // a text source ...
  std::string split = "paragraph";
  double eval_fraction = 0.01;
  std::string task;  // ... or a synthetic task
  nlohmann::json task_options;
  double weight = 1.0;
};

// One phase of the crossbatch schedule: memory layers see `range` earlier entries (d = range + 1
// contexts) until the phase has run `steps` steps or the training accuracy (mean of the last
// accuracy_window steps) reaches until_accuracy, whichever comes first; the last phase never ends.
struct Phase {
  int range = 0;
  int64_t steps = 0;            // 0 = no step limit
  double until_accuracy = 0.0;  // 0 = no accuracy target
};

struct TrainConfig {
  std::string source;      // the file it came from (for messages)
  nlohmann::json raw;      // as read, stored in checkpoints
  bool has_model = false;  // "model": a shape for a fresh random model
  ModelConfig model;       // the resolved model config (after applying "init")
  std::string init;        // "init": a model directory to fine-tune
  nlohmann::json model_overrides;

  std::string tokenizer;
  std::vector<SourceConfig> sources;

  int seq_len = 0;
  int batch_size = 8;        // entries (sequences of seq_len tokens) per optimizer step
  int micro_batch_size = 0;  // entries per forward/backward (0 = batch_size)
  int pack_size = 1;         // k
  bool stepping = true;
  double negative_bias = 0;  // cross_batch.negative_bias (CrossBatch::negative_bias), training steps only
  std::vector<Phase> schedule = {Phase{}};
  int accuracy_window = 10;

  OptimizerConfig optimizer;
  int64_t steps = 100;

  int64_t eval_interval = 0;  // 0 = only at the end
  int eval_batches = 1;
  int eval_range = -1;  // -1: pack_size - 1 (each chunk sees all earlier chunks of its pack)
  bool eval_stepping = false;
  bool eval_negatives = false;
  // > 0: the run ends (model saved) at the first evaluation whose accuracy reaches this, so
  // `steps` is a maximum. For stages that cross a plateau at a step no one can predict.
  double eval_stop_accuracy = 0;

  int64_t checkpoint_interval = 0;  // 0 = only at the end
  int keep_checkpoints = 1;
  std::string output;
  bool save_bf16 = false;
  uint64_t seed = 0;
  int threads = 0;           // 0 = OpenMP default
  int64_t log_interval = 1;  // 0 = no per-step lines
  // Multiplies the memory layers' query projections once, before the first step: a softmax
  // temperature for memory attention (chosen on held-out seeds; see models/dict-recipe).
  double mem_query_scale = 1.0;
  // "negative_bank": {"size": rows, "top_k": k, "momentum": m}: stale negative keys for the memory
  // layers (negative_bank.h); size 0 = off. With m > 0 the bank's keys come from a copy of the
  // parameters updated as m·copy + (1 - m)·params after each step (MoCo's momentum encoder); with
  // m = 0, from the trained network itself, which destabilized training (docs/tasks.md, session
  // 17). A resumed run starts with an empty bank and a fresh copy, so it is not bit for bit the
  // uninterrupted run.
  int64_t negative_bank_size = 0;
  int negative_bank_top_k = 32;
  double negative_bank_momentum = 0;  // > 0: bank keys from an EMA copy of the parameters
  // > 0: an auxiliary loss that supervises the memory layers' attention where the task knows the
  // answer's key (Document::attend, the dictionary task): weight · mean −log P(query attends its
  // target), per entry like the NLL (Network::use_attention_targets). This engine's extension.
  double memory_attention_loss = 0;
  // "init_copy_rows": before the first step, token rows [rows_begin, rows_end) of the embedding
  // and the LM head become copies of rows from_begin + (r - rows_begin) % (from_end - from_begin)
  // plus N(0, noise): tokens the init never trained start from trained ones (a vocabulary
  // expansion; the dictionary recipe widens 8 trained symbols to 64 with it). Needs "init".
  struct CopyRows {
    int rows_begin = 0, rows_end = 0, from_begin = 0, from_end = 0;
    double noise = 0;
  } init_copy_rows;
  // "init_widen": the init model grown k times wider before the first step, computing the same
  // function (train/widen.h): hidden_size, intermediate_size and the head counts x factor. Needs
  // "init"; `model` then describes the init before widening.
  struct Widen {
    int factor = 0;  // 0: not widened
    double std = 0.02;
    uint64_t seed = 0;  // default: the config's seed
  } init_widen;

  // overrides: top-level fields replaced before parsing (the CLI's --init and --output, given
  // as absolute paths, so one stage config serves several chains).
  static TrainConfig from_file(const std::string& path, const nlohmann::json& overrides = nlohmann::json::object());
  // Relative paths are resolved against base_dir (the directory of the TRAIN.json file).
  static TrainConfig from_json(const nlohmann::json& j, const std::string& source, const std::string& base_dir);
};

// Fields of the raw config that must not change when a run is resumed.
std::vector<std::string> resume_sensitive_fields();

}  // namespace ll::train
