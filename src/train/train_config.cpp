#include "train/train_config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "train/widen.h"
#include "util/error.h"

namespace fs = std::filesystem;

namespace ll::train {

using json = nlohmann::json;

namespace {

// Reads the fields of one JSON object, naming "file: path.to.field" in errors; done() rejects
// any key that was not read (typos would otherwise be silently ignored).
class Fields {
 public:
  Fields(const json& j, std::string where) : j_(j), where_(std::move(where)) {
    if (!j.is_object()) throw Error(where_ + ": expected a JSON object");
  }
  std::string name(const std::string& key) const { return where_ + "." + key; }
  bool has(const std::string& key) {
    seen_.insert(key);
    return j_.contains(key) && !j_[key].is_null();
  }
  const json& at(const std::string& key) {
    seen_.insert(key);
    return j_.at(key);
  }
  template <typename T>
  void get(const std::string& key, T& out) {
    if (!has(key)) return;
    try {
      out = j_[key].get<T>();
    } catch (const json::exception&) {
      throw Error(name(key) + " has the wrong type (" + j_[key].dump() + ")");
    }
  }
  template <typename T>
  void get(const std::string& key, T& out, T min_value) {
    get(key, out);
    if (out < min_value) {
      std::ostringstream s;
      s << name(key) << " must be >= " << min_value << ", got " << out;
      throw Error(s.str());
    }
  }
  void done() const {
    for (const auto& [key, value] : j_.items())
      if (!seen_.count(key)) throw Error(where_ + ": unknown field '" + key + "'");
  }

 private:
  const json& j_;
  std::string where_;
  std::set<std::string> seen_;
};

std::string resolve(const std::string& path, const std::string& base) {
  if (path.empty() || fs::path(path).is_absolute()) return path;
  return (fs::path(base) / path).lexically_normal().string();
}

json read_json(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(what + " '" + path + "': cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw Error(path + ": not valid JSON: " + e.what());
  }
}

}  // namespace

std::vector<std::string> resume_sensitive_fields() {
  return {"model",     "init",        "data",      "seq_len", "batch_size", "micro_batch_size",
          "pack_size", "cross_batch", "optimizer", "seed", "mem_query_scale", "init_copy_rows", "init_widen",
          "negative_bank"};
}

TrainConfig TrainConfig::from_file(const std::string& path, const json& overrides) {
  json j = read_json(path, "training config");
  if (!j.is_object()) throw Error(path + ": expected a JSON object");
  for (const auto& [k, v] : overrides.items()) j[k] = v;
  std::string base = fs::path(path).parent_path().string();
  if (base.empty()) base = ".";
  return from_json(j, path, base);
}

TrainConfig TrainConfig::from_json(const json& j, const std::string& source, const std::string& base) {
  TrainConfig c;
  c.source = source;
  c.raw = j;
  Fields f(j, source);

  // Model: a fresh shape, or a directory to fine-tune (with optional overrides of its config).
  json model_json = json::object();
  if (f.has("model")) {
    if (!f.at("model").is_object()) throw Error(f.name("model") + ": expected a JSON object (a config.json)");
    model_json = f.at("model");
    c.has_model = true;
  }
  f.get("init", c.init);
  if (!c.init.empty()) {
    c.init = resolve(c.init, base);
    json merged = read_json((fs::path(c.init) / "config.json").string(), "init model config");
    for (const auto& [k, v] : model_json.items()) merged[k] = v;
    c.model_overrides = model_json;
    model_json = merged;
  } else if (!c.has_model) {
    throw Error(source + ": needs 'model' (a model shape) or 'init' (a model directory)");
  }
  c.model = ModelConfig::from_json_text(model_json.dump(), source + ": model");
  if (f.has("init_widen")) {
    Fields w(f.at("init_widen"), f.name("init_widen"));
    w.get("factor", c.init_widen.factor);
    w.get("std", c.init_widen.std);
    f.get("seed", c.init_widen.seed);  // the default; init_widen.seed wins
    w.get("seed", c.init_widen.seed);
    w.done();
    if (c.init_widen.factor < 2 || c.init_widen.factor > 16)
      throw Error(w.name("factor") + ": must be an integer in [2, 16], got " + std::to_string(c.init_widen.factor));
    if (!(c.init_widen.std >= 0) || !std::isfinite(c.init_widen.std))
      throw Error(w.name("std") + ": must be a number >= 0");
    if (c.init.empty()) throw Error(f.name("init_widen") + ": needs 'init' (a trained model to widen)");
    c.model = widened_config(c.model, c.init_widen.factor);
    c.model.validate(f.name("init_widen"));
  }

  // Data.
  if (!f.has("data")) throw Error(source + ": missing field 'data'");
  Fields data(f.at("data"), f.name("data"));
  data.get("tokenizer", c.tokenizer);
  c.tokenizer = resolve(c.tokenizer, base);
  if (!data.has("sources") || !data.at("sources").is_array() || data.at("sources").empty())
    throw Error(data.name("sources") + ": expected a non-empty array of sources");
  for (size_t i = 0; i < data.at("sources").size(); ++i) {
    Fields s(data.at("sources")[i], data.name("sources") + "[" + std::to_string(i) + "]");
    SourceConfig sc;
    if (s.has("text")) {
      s.get("text", sc.text_files);
      if (sc.text_files.empty()) throw Error(s.name("text") + ": expected a non-empty list of files");
      for (auto& p : sc.text_files) p = resolve(p, base);
      s.get("split", sc.split);
      if (sc.split != "file" && sc.split != "paragraph" && sc.split != "line")
        throw Error(s.name("split") + ": '" + sc.split + "' is not one of file, paragraph, line");
      s.get("eval_fraction", sc.eval_fraction);
      if (!(sc.eval_fraction >= 0 && sc.eval_fraction < 1)) throw Error(s.name("eval_fraction") + " must be in [0, 1)");
      if (c.tokenizer.empty() && c.init.empty())
        throw Error(data.name("tokenizer") + ": text sources need a tokenizer");
    } else if (s.has("task")) {
      s.get("task", sc.task);
      if (s.has("options")) sc.task_options = s.at("options");
    } else {
      throw Error(s.name("text") + ": each source needs 'text' (files) or 'task' (a synthetic task name)");
    }
    s.get("weight", sc.weight);
    if (!(sc.weight > 0)) throw Error(s.name("weight") + " must be positive");
    s.done();
    c.sources.push_back(std::move(sc));
  }
  data.done();

  // Shapes of the batch.
  f.get("seq_len", c.seq_len, 0);
  if (c.seq_len == 0) c.seq_len = c.model.max_position_embeddings;
  if (c.seq_len != c.model.max_position_embeddings)
    throw Error(f.name("seq_len") + " (" + std::to_string(c.seq_len) +
                ") must equal the model's max_position_embeddings (" + std::to_string(c.model.max_position_embeddings) +
                "): it is the inference window");
  f.get("batch_size", c.batch_size, 1);
  f.get("pack_size", c.pack_size, 1);
  f.get("micro_batch_size", c.micro_batch_size, 0);
  if (c.micro_batch_size == 0) c.micro_batch_size = c.batch_size;
  if (c.batch_size % c.pack_size != 0)
    throw Error(f.name("batch_size") + " must be a multiple of pack_size (" + std::to_string(c.pack_size) + ")");
  if (c.micro_batch_size % c.pack_size != 0)
    throw Error(f.name("micro_batch_size") + " must be a multiple of pack_size: micro-batches hold whole packs");
  if (c.batch_size % c.micro_batch_size != 0)
    throw Error(f.name("batch_size") + " must be a multiple of micro_batch_size");

  if (f.has("cross_batch")) {
    Fields cb(f.at("cross_batch"), f.name("cross_batch"));
    cb.get("stepping", c.stepping);
    cb.get("negative_bias", c.negative_bias);
    if (!std::isfinite(c.negative_bias) || std::abs(c.negative_bias) > 30)
      throw Error(cb.name("negative_bias") + ": must be a number in [-30, 30] (a logit offset)");
    cb.get("accuracy_window", c.accuracy_window, 1);
    if (cb.has("schedule")) {
      const json& sch = cb.at("schedule");
      if (!sch.is_array() || sch.empty()) throw Error(cb.name("schedule") + ": expected a non-empty array of phases");
      c.schedule.clear();
      for (size_t i = 0; i < sch.size(); ++i) {
        Fields p(sch[i], cb.name("schedule") + "[" + std::to_string(i) + "]");
        Phase ph;
        if (!p.has("range")) throw Error(p.name("range") + " is missing (cross_batch_range r; d = r + 1)");
        p.get("range", ph.range, 0);
        p.get("steps", ph.steps, int64_t(0));
        p.get("until_accuracy", ph.until_accuracy);
        if (ph.until_accuracy < 0 || ph.until_accuracy > 1)
          throw Error(p.name("until_accuracy") + " must be in [0, 1]");
        p.done();
        c.schedule.push_back(ph);
      }
    }
    cb.done();
  }

  if (f.has("optimizer")) {
    Fields o(f.at("optimizer"), f.name("optimizer"));
    OptimizerConfig& oc = c.optimizer;
    o.get("lr", oc.lr);
    if (!(oc.lr > 0)) throw Error(o.name("lr") + " must be positive");
    o.get("end_lr", oc.end_lr, 0.0);
    if (o.has("betas")) {
      std::vector<double> b;
      o.get("betas", b);
      if (b.size() != 2 || b[0] < 0 || b[0] >= 1 || b[1] < 0 || b[1] >= 1)
        throw Error(o.name("betas") + ": expected [b1, b2] in [0, 1)");
      oc.b1 = b[0];
      oc.b2 = b[1];
    }
    o.get("eps", oc.eps);
    if (!(oc.eps > 0)) throw Error(o.name("eps") + " must be positive");
    o.get("weight_decay", oc.weight_decay, 0.0);
    o.get("decay_norms", oc.decay_norms);
    o.get("warmup_steps", oc.warmup_steps, int64_t(0));
    std::string sched = "cosine";
    o.get("schedule", sched);
    if (sched == "cosine")
      oc.schedule = LrSchedule::Cosine;
    else if (sched == "constant")
      oc.schedule = LrSchedule::Constant;
    else
      throw Error(o.name("schedule") + ": '" + sched + "' is not one of cosine, constant");
    o.get("clip", oc.clip, 0.0);
    o.done();
  }
  f.get("steps", c.steps, int64_t(0));  // 0: save the init (regrouped, scaled) as it is

  if (f.has("eval")) {
    Fields e(f.at("eval"), f.name("eval"));
    e.get("interval", c.eval_interval, int64_t(0));
    e.get("batches", c.eval_batches, 0);
    e.get("cross_batch_range", c.eval_range, -1);
    e.get("stepping", c.eval_stepping);
    e.get("negatives", c.eval_negatives);
    e.get("stop_accuracy", c.eval_stop_accuracy);
    if (!(c.eval_stop_accuracy >= 0 && c.eval_stop_accuracy <= 1))
      throw Error(e.name("stop_accuracy") + " must be in [0, 1]");
    if (c.eval_stop_accuracy > 0 && c.eval_interval <= 0)
      throw Error(e.name("stop_accuracy") + " needs eval.interval > 0 (it is checked at those evaluations)");
    e.done();
  }
  if (c.eval_range < 0) c.eval_range = c.pack_size - 1;
  if (f.has("checkpoint")) {
    Fields k(f.at("checkpoint"), f.name("checkpoint"));
    k.get("interval", c.checkpoint_interval, int64_t(0));
    k.get("keep", c.keep_checkpoints, 1);
    k.done();
  }
  f.get("output", c.output);
  if (c.output.empty()) throw Error(source + ": missing field 'output' (the output directory)");
  c.output = resolve(c.output, base);
  std::string dtype = "float32";
  f.get("save_dtype", dtype);
  if (dtype != "float32" && dtype != "bfloat16")
    throw Error(f.name("save_dtype") + ": '" + dtype + "' is not one of float32, bfloat16");
  c.save_bf16 = dtype == "bfloat16";
  f.get("seed", c.seed);
  f.get("threads", c.threads, 0);
  f.get("log_interval", c.log_interval, int64_t(0));
  f.get("mem_query_scale", c.mem_query_scale);
  if (!(c.mem_query_scale > 0) || !std::isfinite(c.mem_query_scale))
    throw Error(f.name("mem_query_scale") + ": must be a positive number");
  if (f.has("negative_bank")) {
    Fields nb(f.at("negative_bank"), f.name("negative_bank"));
    nb.get("size", c.negative_bank_size, int64_t(0));
    nb.get("top_k", c.negative_bank_top_k, 1);
    nb.get("momentum", c.negative_bank_momentum);
    if (!(c.negative_bank_momentum >= 0 && c.negative_bank_momentum < 1))
      throw Error(nb.name("momentum") + ": must be in [0, 1)");
    nb.done();
    if (c.negative_bank_size > 0 && c.negative_bias != 0)
      throw Error(nb.name("size") + ": a negative bank does not combine with cross_batch.negative_bias (its keys would need the bias too)");
    if (c.negative_bank_size > 0 && c.model.mem_positionals)
      throw Error(nb.name("size") + ": a negative bank needs memory layers without positions (mem_positionals false)");
  }
  f.get("memory_attention_loss", c.memory_attention_loss);
  if (!(c.memory_attention_loss >= 0 && c.memory_attention_loss <= 1000))
    throw Error(f.name("memory_attention_loss") + ": must be a number in [0, 1000] (a loss weight)");
  if (c.memory_attention_loss > 0 && c.model.mem_layers.empty())
    throw Error(f.name("memory_attention_loss") + ": the model has no memory layers (mem_layers) to supervise");
  if (c.memory_attention_loss > 0 && c.negative_bank_size > 0)
    throw Error(f.name("memory_attention_loss") + ": does not combine with a negative bank (its keys are outside the targets' softmax)");
  if (f.has("init_copy_rows")) {
    Fields r(f.at("init_copy_rows"), f.name("init_copy_rows"));
    std::vector<int> rows, from;
    r.get("rows", rows);
    r.get("from", from);
    r.get("noise", c.init_copy_rows.noise);
    r.done();
    const int V = c.model.vocab_size;
    auto range_ok = [V](const std::vector<int>& v) { return v.size() == 2 && v[0] >= 0 && v[0] < v[1] && v[1] <= V; };
    if (!range_ok(rows) || !range_ok(from))
      throw Error(r.name("rows") + " and " + r.name("from") + ": expected [begin, end) token ranges within vocab_size " +
                  std::to_string(V));
    if (rows[0] < from[1] && from[0] < rows[1]) throw Error(r.name("rows") + ": must not overlap 'from'");
    if (!(c.init_copy_rows.noise >= 0) || !std::isfinite(c.init_copy_rows.noise))
      throw Error(r.name("noise") + ": must be a number >= 0");
    if (c.init.empty()) throw Error(f.name("init_copy_rows") + ": needs 'init' (rows are copied from a trained model)");
    c.init_copy_rows = {rows[0], rows[1], from[0], from[1], c.init_copy_rows.noise};
  }
  f.done();
  return c;
}

}  // namespace ll::train
