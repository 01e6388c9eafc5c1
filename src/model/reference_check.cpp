#include "model/reference_check.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/tensor_store.h"
#include "model/session.h"
#include "util/error.h"

namespace fs = std::filesystem;

namespace ll {

bool ReferenceReport::passed() const {
  return std::all_of(scenarios.begin(), scenarios.end(), [](const ScenarioResult& s) { return s.passed; });
}

std::string ReferenceReport::to_json() const {
  nlohmann::json j = {{"case", case_dir}, {"tolerance", tolerance}, {"passed", passed()}};
  for (const auto& s : scenarios)
    j["scenarios"].push_back({{"name", s.name}, {"max_abs_error", s.max_abs_error}, {"mean_kl", s.mean_kl}, {"passed", s.passed},
                              {"problems", s.problems}});
  return j.dump(2);
}

namespace {

struct Golden {
  TensorStore store;
  std::string file;
  std::vector<float> f32(const std::string& name) const { return to_f32(store.get(name)); }
  std::vector<int> ids(const std::string& name) const {
    const TensorRef& t = store.get(name);
    if (t.dtype != DType::I64) throw Error(file + ": tensor '" + name + "' should be I64");
    std::vector<int> r(t.numel());
    const auto* p = static_cast<const int64_t*>(t.data);
    for (size_t i = 0; i < r.size(); ++i) r[i] = int(p[i]);
    return r;
  }
};

int argmax(const float* x, int n) { return int(std::max_element(x, x + n) - x); }

// Largest absolute error and mean KL over rows of V logits.
void compare(ScenarioResult& r, const float* ours, const std::vector<float>& ref, size_t offset, size_t count, size_t V,
             double tol) {
  for (size_t i = 0; i < count; ++i) {
    double e = std::fabs(double(ours[i]) - double(ref[offset + i]));
    if (std::isnan(e)) e = INFINITY;
    r.max_abs_error = std::max(r.max_abs_error, e);
  }
  // KL(reference || ours) per row of V logits, accumulated as a running mean.
  for (size_t row = 0; row + V <= count; row += V) {
    const float* a = &ref[offset + row];
    const float* b = ours + row;
    const double ma = *std::max_element(a, a + V), mb = *std::max_element(b, b + V);
    double za = 0, zb = 0;
    for (size_t j = 0; j < V; ++j) {
      za += std::exp(double(a[j]) - ma);
      zb += std::exp(double(b[j]) - mb);
    }
    double kl = 0;
    for (size_t j = 0; j < V; ++j) {
      const double pa = std::exp(double(a[j]) - ma) / za;
      kl += pa * ((double(a[j]) - ma - std::log(za)) - (double(b[j]) - mb - std::log(zb)));
    }
    r.mean_kl += (kl - r.mean_kl) / double(++r.rows);
  }
  if (!(r.max_abs_error <= tol)) r.passed = false;
}

void check_lengths(ScenarioResult& r, const Session& s, const nlohmann::json& meta, const char* mem_key,
                   const char* local_key) {
  if (meta.contains(mem_key))
    for (auto& [layer, len] : meta[mem_key].items()) {
      const int64_t ours = s.memory_length(std::stoi(layer));
      if (ours != len.get<int64_t>()) {
        r.passed = false;
        r.problems.push_back("layer " + layer + " memory length " + std::to_string(ours) + ", reference " +
                             std::to_string(len.get<int64_t>()));
      }
    }
  if (local_key && meta.contains(local_key) && s.local_length() != meta[local_key].get<int>()) {
    r.passed = false;
    r.problems.push_back("local cache length " + std::to_string(s.local_length()) + ", reference " +
                         std::to_string(meta[local_key].get<int>()));
  }
}

}  // namespace

double reference_tolerance(const std::string& case_dir) {
  const ModelConfig c = ModelConfig::from_file(case_dir + "/config.json");
  const bool bf16_memory = c.mem_dtype == MemDType::BF16 && !c.mem_layers.empty();
  return bf16_memory ? 5e-4 : 1e-4;
}

ReferenceReport verify_reference(const std::string& case_dir, double tolerance, const ReferenceOptions& opt) {
  ReferenceReport report;
  report.case_dir = case_dir;
  report.tolerance = tolerance;
  const std::string golden_path = (fs::path(case_dir) / "golden.safetensors").string();
  const std::string meta_path = (fs::path(case_dir) / "golden.json").string();
  Golden g{read_safetensors(golden_path), golden_path};
  nlohmann::json meta;
  {
    std::ifstream f(meta_path);
    if (!f) throw Error(meta_path + ": cannot open");
    try {
      f >> meta;
    } catch (const nlohmann::json::exception& e) {
      throw Error(meta_path + ": not valid JSON: " + e.what());
    }
  }
  Weights model = Weights::load(case_dir, opt.weight_type);
  if (opt.mem_type) model.config.mem_dtype = *opt.mem_type;
  const int V = model.config.vocab_size;

  // 1. Prompt with cache.
  const std::vector<int> prompt = g.ids("prompt_ids");
  Session s1(model);
  ScenarioResult r1{"prompt"};
  std::vector<float> logits = s1.forward(prompt, true, LogitsWanted::All);
  compare(r1, logits.data(), g.f32("prompt_logits"), 0, logits.size(), V, tolerance);
  check_lengths(r1, s1, meta, "memory_len_after_prompt", "local_cache_len_after_prompt");
  report.scenarios.push_back(r1);

  // 2. Greedy generation from the cache of 1, crossing local-cache flushes.
  ScenarioResult r2{"generation"};
  {
    Session s2 = s1;
    const std::vector<int> gen = g.ids("generated_ids");
    const std::vector<float> step = g.f32("step_logits");
    std::vector<float> last(logits.end() - V, logits.end());
    for (size_t i = 0; i < gen.size(); ++i) {
      const int ours = argmax(last.data(), V);
      if (ours != gen[i]) {
        r2.passed = false;
        r2.problems.push_back("step " + std::to_string(i) + ": greedy id " + std::to_string(ours) + ", reference " +
                              std::to_string(gen[i]));
      }
      last = s2.forward({gen[i]}, true, LogitsWanted::Last);  // the reference token, to keep comparing
      compare(r2, last.data(), step, i * V, V, V, tolerance);
    }
    check_lengths(r2, s2, meta, "memory_len_after_generation", nullptr);
  }
  report.scenarios.push_back(r2);

  // 3. Scoring without cache: every window, the last one too, goes to memory.
  ScenarioResult r3{"no_cache"};
  {
    Session s3(model);
    std::vector<float> l3 = s3.forward(prompt, false, LogitsWanted::All);
    compare(r3, l3.data(), g.f32("logits_no_cache"), 0, l3.size(), V, tolerance);
    double loss = 0;
    for (size_t t = 0; t + 1 < prompt.size(); ++t) {
      const float* row = &l3[t * V];
      const float mx = *std::max_element(row, row + V);
      double z = 0;
      for (int j = 0; j < V; ++j) z += std::exp(double(row[j]) - mx);
      loss += (std::log(z) + mx) - row[prompt[t + 1]];
    }
    loss /= double(prompt.size() - 1);
    const double ref_loss = g.f32("loss_no_cache")[0];
    const double e = std::fabs(loss - ref_loss);
    r3.max_abs_error = std::max(r3.max_abs_error, e);
    if (!(e <= tolerance)) {
      r3.passed = false;
      r3.problems.push_back("loss " + std::to_string(loss) + ", reference " + std::to_string(ref_loss));
    }
  }
  report.scenarios.push_back(r3);

  // 4. A long call that starts from the cache of 1.
  ScenarioResult r4{"continued"};
  {
    Session s4 = s1;
    std::vector<float> l4 = s4.forward(g.ids("continued_ids"), true, LogitsWanted::All);
    compare(r4, l4.data(), g.f32("continued_logits"), 0, l4.size(), V, tolerance);
    check_lengths(r4, s4, meta, "memory_len_after_continued", "local_cache_len_after_continued");
  }
  report.scenarios.push_back(r4);
  return report;
}

}  // namespace ll
