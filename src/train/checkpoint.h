#pragma once
// Training checkpoints: OUTPUT/checkpoints/step-NNNNNNNN/ holding
//   config.json + model.safetensors (float32; a loadable Hugging Face model directory itself),
//   optimizer.safetensors (AdamW moments), state.json (step, data and schedule state, the
//   TRAIN.json it was made with), tokenizer.model when the run has one.
// Written into a temporary directory, every file fsync'ed, then renamed into place (and the
// parent fsync'ed): a directory named step-* is always complete. Older ones are deleted only
// after the new one is in place.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "model/model.h"

namespace ll::train {

struct CheckpointData {
  Model model;  // float32 weights + config
  std::vector<float> adam_m, adam_v;
  nlohmann::json state;         // step, data, schedule, ...
  std::string tokenizer_bytes;  // "" = none
};

// Writes root/step-<step>, keeps the newest `keep` step-* directories. Returns the new path.
std::string save_checkpoint(const std::string& root, int64_t step, const CheckpointData& ck, int keep);
// The newest complete checkpoint under root, if any.
std::optional<std::string> latest_checkpoint(const std::string& root);
CheckpointData load_checkpoint(const std::string& dir);

// Writes a Hugging Face model directory atomically (temp directory + rename, replacing dir).
void save_model_dir(const std::string& dir, const Model& m, bool bf16, const std::string& tokenizer_bytes);

}  // namespace ll::train
