// The training loop end to end: the loss falls on a synthetic task, resume is bit-identical,
// thread counts do not change results, the saved model gives the training forward's logits
// through the inference engine, and the CLI runs and validates.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "model/session.h"
#include "train/checkpoint.h"
#include "train/params.h"
#include "train/trainer.h"
#include "train/widen.h"
#include "util/error.h"

namespace fs = std::filesystem;
using namespace ll;
using namespace ll::train;
using json = nlohmann::json;

namespace {

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("ll_test_train_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// A 2-layer model with one memory layer on the copy task: documents of 2 chunks of 16 tokens,
// the key in the first chunk, its recall in the second.
json copy_run(const fs::path& out, int steps) {
  return json{
      {"model",
       {{"vocab_size", 32},
        {"hidden_size", 32},
        {"intermediate_size", 64},
        {"num_hidden_layers", 2},
        {"num_attention_heads", 2},
        {"max_position_embeddings", 16},
        {"mem_layers", {1}},
        {"mem_dtype", "float32"},
        {"last_context_length", 0}}},
      {"data", {{"sources", {{{"task", "copy"}, {"options", {{"length", 32}, {"key_length", 4}, {"symbols", 8}}}}}}}},
      {"batch_size", 8},
      {"micro_batch_size", 4},
      {"pack_size", 2},
      {"cross_batch", {{"stepping", true}, {"schedule", {{{"range", 0}, {"steps", 10}}, {{"range", 1}}}}}},
      {"optimizer", {{"lr", 1e-2}, {"warmup_steps", 5}, {"weight_decay", 0.01}, {"end_lr", 1e-3}}},
      {"steps", steps},
      {"eval", {{"batches", 4}}},
      {"output", out.string()},
      {"seed", 5},
      {"threads", 1},
      {"log_interval", 0}};
}

TrainConfig config_of(const json& j) { return TrainConfig::from_json(j, "test TRAIN.json", "/"); }

// The config is refused with a message that names `needle`.
void expect_refused(const json& j, const std::string& needle) {
  try {
    config_of(j);
    ADD_FAILURE() << "accepted; expected an error naming " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(TrainLoop, LossFallsOnCopyTask) {
  const fs::path dir = temp_dir("loss");
  Trainer t(config_of(copy_run(dir, 60)), Trainer::Start::Fresh);
  const EvalStats before = t.evaluate();
  double first = 0, last = 0;
  for (int i = 0; i < 60; ++i) {
    const StepStats s = t.step();
    if (i < 5) first += s.loss / 5;
    if (i >= 55) last += s.loss / 5;
    if (i == 10) {
      EXPECT_EQ(s.range, 1);  // the schedule switched to d = 2 after 10 steps
    }
  }
  const EvalStats after = t.evaluate();
  // Only the second chunk of each document carries loss tokens, so the per-entry mean is half the
  // per-token loss: from ln 32 = 3.47 (random init) per token towards ln 8 = 2.08 (the key's
  // symbols are uniform; recalling them needs more steps, see CrossbatchTeachesMemoryRecall).
  std::printf("  copy task, 60 steps: eval loss %.3f -> %.3f (per token %.3f -> %.3f); train loss %.3f -> %.3f\n",
              before.loss, after.loss, 2 * before.loss, 2 * after.loss, first, last);
  EXPECT_LT(after.loss, 0.7 * before.loss);
  EXPECT_LT(last, 0.7 * first);
  fs::remove_all(dir);
}

// The point of FoT: with crossbatch, the memory layer learns to retrieve a key that only an
// earlier chunk holds; without it (r = 0) the key is invisible and recall stays at chance. The
// trained model then recalls through the inference engine's memory.
TEST(TrainLoop, CrossbatchTeachesMemoryRecall) {
  const json task = {{"length", 32}, {"key_length", 2}, {"symbols", 8}};
  int final_range = -1;
  auto run = [&](int range, int steps, const fs::path& dir) {
    json j = copy_run(dir, steps);
    j["model"]["hidden_size"] = 64;
    j["model"]["intermediate_size"] = 128;
    j["model"]["num_attention_heads"] = 4;
    j["data"]["sources"][0]["options"] = task;
    j["batch_size"] = 32;
    j.erase("micro_batch_size");
    // With crossbatch: d = 3 (a positive and a negative) until 95% recall, then d = 2.
    j["cross_batch"] = range ? json{{"schedule", {{{"range", range}, {"until_accuracy", 0.95}}, {{"range", 1}}}}}
                             : json{{"schedule", {{{"range", 0}}}}};
    j["optimizer"] = {{"lr", 3e-3}, {"warmup_steps", 50}, {"end_lr", 3e-4}};
    j["seed"] = 1;
    Trainer t(config_of(j), Trainer::Start::Fresh);
    t.run();
    final_range = t.current_range();
    return t.evaluate();
  };
  const fs::path fot = temp_dir("recall"), none = temp_dir("recall_r0");
  const EvalStats with = run(2, 300, fot);
  EXPECT_EQ(final_range, 1);  // the accuracy target switched the phase
  const EvalStats without = run(0, 150, none);
  std::printf(
      "  copy recall (chance 1/8): crossbatch r=2, 300 steps: acc %.3f loss %.3f | r=0, 150 steps: acc %.3f loss "
      "%.3f\n",
      with.accuracy, with.loss, without.accuracy, without.loss);
  EXPECT_GT(with.accuracy, 0.9);
  EXPECT_LT(without.accuracy, 0.3);

  // Inference: fresh documents, windows of 16 tokens, the key only in the first window's memory.
  const Model m = Model::load((fot / "model").string());
  auto source = make_task("copy", task, nullptr, "test");
  int right = 0, total = 0;
  for (uint64_t i = 0; i < 20; ++i) {
    Rng rng(mix_seed(99, i));
    const Document d = source->next(rng);
    Session s(m);
    const std::vector<float> logits = s.forward(d.tokens, false, LogitsWanted::All);
    for (size_t p = 1; p < d.tokens.size(); ++p) {
      if (!d.loss[p]) continue;
      const float* row = &logits[(p - 1) * m.config.vocab_size];
      right += int(std::max_element(row, row + m.config.vocab_size) - row) == d.tokens[p];
      ++total;
    }
  }
  std::printf("  recall through Session (memory of the first window): %d/%d\n", right, total);
  EXPECT_GE(right, total * 9 / 10);
  fs::remove_all(fot);
  fs::remove_all(none);
}

TEST(TrainLoop, ResumeIsBitIdentical) {
  const fs::path a = temp_dir("resume_a"), b = temp_dir("resume_b");
  json ja = copy_run(a, 8), jb = copy_run(b, 8);
  ja["checkpoint"] = jb["checkpoint"] = {{"interval", 2}, {"keep", 2}};
  ja["eval"] = jb["eval"] = {{"batches", 0}};
  {
    Trainer t(config_of(ja), Trainer::Start::Fresh);
    t.run();
  }
  {
    Trainer t(config_of(jb), Trainer::Start::Fresh);
    t.run(5);  // "interrupted" after step 5 (checkpoint written)
    EXPECT_EQ(t.steps_done(), 5);
    EXPECT_FALSE(fs::exists(b / "model"));
  }
  EXPECT_THROW(Trainer(config_of(jb), Trainer::Start::Fresh), Error);  // refuses to overwrite a run
  json changed = jb;
  changed["optimizer"]["lr"] = 0.5;
  EXPECT_THROW(Trainer(config_of(changed), Trainer::Start::Resume), Error);  // settings must match
  Trainer t(config_of(jb), Trainer::Start::Resume);
  EXPECT_EQ(t.steps_done(), 5);
  EXPECT_EQ(t.current_range(), 0);
  t.run();
  const Model ma = Model::load((a / "model").string()), mb = Model::load((b / "model").string());
  EXPECT_EQ(ma.embed, mb.embed);
  EXPECT_EQ(ma.layers[1].wk, mb.layers[1].wk);
  EXPECT_EQ(ma.lm_head, mb.lm_head);
  // keep = 2: only the newest two checkpoints remain
  int n = 0;
  for (const auto& e : fs::directory_iterator(b / "checkpoints"))
    n += e.path().filename().string().rfind("step-", 0) == 0;
  EXPECT_EQ(n, 2);
  EXPECT_EQ(latest_checkpoint((b / "checkpoints").string()).value(), (b / "checkpoints" / "step-00000008").string());
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(TrainLoop, ThreadCountDoesNotChangeResults) {
  // Large enough that every parallel path (ops, attention tasks, BLAS) is taken. With one memory
  // head (fewer heads than threads) the memory layer's backward runs as a team of threads.
  for (int mem_heads : {4, 1}) {
    std::vector<std::vector<float>> params;
    for (int threads : {1, 2}) {
      const fs::path dir = temp_dir("threads" + std::to_string(threads));
      json j = copy_run(dir, 3);
      j["model"]["hidden_size"] = 128;
      j["model"]["intermediate_size"] = 256;
      j["model"]["num_attention_heads"] = 4;
      j["model"]["mem_num_attention_heads"] = mem_heads;
      j["model"]["mem_positionals"] = false;
      j["model"]["max_position_embeddings"] = 64;
      j["data"]["sources"][0]["options"]["length"] = 128;
      j["cross_batch"]["schedule"] = json::array({{{"range", 1}}});
      j["threads"] = threads;
      Trainer t(config_of(j), Trainer::Start::Fresh);
      for (int i = 0; i < 3; ++i) t.step();
      params.push_back(t.params());
      fs::remove_all(dir);
    }
    EXPECT_TRUE(params[0] == params[1]) << "memory heads " << mem_heads;
  }
}

TEST(TrainLoop, SavedModelMatchesTrainingForwardThroughSession) {
  const fs::path dir = temp_dir("saved");
  const TrainConfig cfg = config_of(copy_run(dir, 12));
  Trainer t(cfg, Trainer::Start::Fresh);
  t.run();
  const Model m = Model::load((dir / "model").string());
  ASSERT_EQ(m.config.max_position_embeddings, cfg.seq_len);
  ASSERT_EQ(m.config.mem_dtype, MemDType::F32);
  ASSERT_EQ(m.config.last_context_length, 0);
  // One document of 2 chunks through the inference engine (windows of 16 tokens, memory = earlier
  // windows) and through the training network (one pack, positives only).
  std::vector<int> ids;
  Rng rng(3);
  auto task = make_task("copy", json{{"length", 32}, {"key_length", 4}, {"symbols", 8}}, nullptr, "test");
  ids = task->next(rng).tokens;
  Session s(m);
  const std::vector<float> ref = s.forward(ids, false, LogitsWanted::All);
  Network<float> net(cfg.model, cfg.seq_len);
  const float* lt = net.forward(t.params().data(), ids.data(), 2, CrossBatch{2, 1, false, false});
  double err = 0;
  for (size_t i = 0; i < ref.size(); ++i) err = std::max(err, double(std::abs(ref[i] - lt[i])));
  std::printf("  saved model through Session vs training forward: max |logit error| %.2e\n", err);
  EXPECT_LT(err, 1e-4);
  EXPECT_TRUE(fs::exists(dir / "log.jsonl"));
  fs::remove_all(dir);
}

TEST(TrainLoop, Cli) {
  if (!fs::exists(LONGLLAMA_CLI)) GTEST_SKIP() << LONGLLAMA_CLI << " is not built (build the longllama target)";
  const fs::path dir = temp_dir("cli");
  json j = copy_run(dir / "out", 3);
  j["output"] = "out";  // relative to the config file
  {
    std::ofstream f(dir / "train.json");
    f << j.dump(2);
  }
  const std::string cli = LONGLLAMA_CLI;
  const std::string log = (dir / "log.txt").string();
  int rc = std::system((cli + " train --config " + (dir / "train.json").string() + " > " + log + " 2>&1").c_str());
  EXPECT_EQ(rc, 0);
  EXPECT_TRUE(fs::exists(dir / "out" / "model" / "config.json"));
  EXPECT_TRUE(fs::exists(dir / "out" / "model" / "model.safetensors"));
  // a bad field: exit status 2 and the field named
  j["optimizer"]["betas"] = {0.9};
  {
    std::ofstream f(dir / "bad.json");
    f << j.dump(2);
  }
  rc = std::system((cli + " train --config " + (dir / "bad.json").string() + " > " + log + " 2>&1").c_str());
  EXPECT_EQ(WEXITSTATUS(rc), 2);
  std::ifstream in(log);
  const std::string text((std::istreambuf_iterator<char>(in)), {});
  EXPECT_NE(text.find("optimizer.betas"), std::string::npos) << text;
  fs::remove_all(dir);
}

// The shape of copy_run's model, as a ModelConfig for an init directory.
ModelConfig copy_run_shape(int heads) {
  ModelConfig c;
  c.vocab_size = 32;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = heads;
  c.max_position_embeddings = 16;
  return c;
}

TEST(TrainLoop, FineTuneFromInitWithOverrides) {
  const fs::path dir = temp_dir("init");
  const ModelConfig c = copy_run_shape(2);
  Model::random(c, 9).save((dir / "base").string(), true);  // a plain LLaMA, bf16
  json j = copy_run(dir / "out", 2);
  j.erase("model");
  j["init"] = (dir / "base").string();
  j["model"] = {{"mem_layers", {1}}, {"last_context_length", 0}};  // turn layer 1 into a memory layer
  Trainer t(config_of(j), Trainer::Start::Fresh);
  t.run();
  const Model m = Model::load((dir / "out" / "model").string());
  EXPECT_EQ(m.config.mem_layers, std::vector<int>{1});
  EXPECT_EQ(m.config.hidden_size, 32);
  j["model"] = {{"hidden_size", 64}};
  j["output"] = (dir / "out2").string();
  try {
    Trainer bad(config_of(j), Trainer::Start::Fresh);
    ADD_FAILURE() << "a shape change must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.hidden_size"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

// Fine-tuning into fewer memory heads scales the memory layer's query projection by
// sqrt(D_new / D_old) (a merged head's logit = the sum of the old heads' logits), times
// mem_query_scale; every other parameter starts as it was.
TEST(TrainLoop, RegroupedMemoryHeadsAndQueryScale) {
  const fs::path dir = temp_dir("regroup");
  ModelConfig c = copy_run_shape(4);  // head_dim 8 -> one memory head of 32: x2
  c.mem_layers = {1};
  c.mem_positionals = false;
  c.last_context_length = 0;
  const Model base = Model::random(c, 11);
  base.save((dir / "base").string(), false);
  json j = copy_run(dir / "out", 2);
  j.erase("model");
  j["init"] = (dir / "base").string();
  j["model"] = {{"mem_num_attention_heads", 1}};
  j["mem_query_scale"] = 1.5;
  const Trainer t(config_of(j), Trainer::Start::Fresh);
  const ParamLayout L(c);
  const std::vector<float> before = flatten(base, L);
  const std::vector<float>& after = t.params();
  ASSERT_EQ(before.size(), after.size());
  const size_t wq = L.layers[1].wq, n = size_t(c.hidden_size) * c.hidden_size;
  size_t changed = 0;
  for (size_t i = 0; i < before.size(); ++i) {
    if (i >= wq && i < wq + n) {
      EXPECT_FLOAT_EQ(after[i], float(double(before[i]) * 3.0)) << i;
      changed += before[i] != 0.0f;
    } else {
      ASSERT_EQ(after[i], before[i]) << "parameter " << i;
    }
  }
  EXPECT_GT(changed, n / 2);
  j["mem_query_scale"] = 0.5;  // a softer temperature is allowed too
  EXPECT_EQ(config_of(j).mem_query_scale, 0.5);
  j["steps"] = 0;  // no step: the model is saved as the init made it
  Trainer t0(config_of(j), Trainer::Start::Fresh);
  t0.run();
  const std::vector<float> saved = flatten(Model::load((dir / "out" / "model").string()), L);
  EXPECT_EQ(saved[wq + 1], float(double(before[wq + 1]) * 1.0));  // sqrt(32/8) * 0.5
  EXPECT_EQ(saved[0], before[0]);
  j["mem_query_scale"] = 0;
  j["output"] = (dir / "out2").string();
  try {
    config_of(j);
    ADD_FAILURE() << "mem_query_scale 0 must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mem_query_scale"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

// The passkey task tokenizes whenever it makes a document, also in evaluations long after the
// data was set up (the tokenizer once died with the setup function: a crash at the first eval).
TEST(TrainLoop, PasskeyTaskKeepsItsTokenizer) {
  const fs::path tok = fs::path(LONGLLAMA_TOKENIZER_DIR) / "openllama_v2.model";
  if (!fs::exists(tok)) GTEST_SKIP() << tok << " not found";
  const fs::path dir = temp_dir("passkey");
  json j = copy_run(dir / "out", 2);
  j["model"]["vocab_size"] = 32000;
  j["model"]["hidden_size"] = 16;
  j["data"] = {{"tokenizer", tok.string()},
               {"sources", {{{"task", "passkey"}, {"options", {{"length", 120}, {"min_length", 70}}}}}}};
  Trainer t(config_of(j), Trainer::Start::Fresh);
  const EvalStats e0 = t.evaluate();
  t.run();
  const EvalStats e1 = t.evaluate();
  EXPECT_GT(e0.tokens, 0);
  EXPECT_EQ(e0.tokens, e1.tokens) << "evaluation documents are the same every time";
  EXPECT_TRUE(std::isfinite(e1.loss) && e1.loss > 0.0);
  fs::remove_all(dir);
}

TEST(TrainLoop, TextDataWithTokenizer) {
  const fs::path tok = fs::path(LONGLLAMA_TOKENIZER_DIR) / "openllama_v2.model";
  if (!fs::exists(tok)) GTEST_SKIP() << tok << " not found";
  const fs::path dir = temp_dir("text");
  json j = copy_run(dir / "out", 3);
  j["model"]["vocab_size"] = 32000;
  j["model"]["hidden_size"] = 16;
  j["data"] = {{"tokenizer", tok.string()},
               {"sources",
                {{{"text", {std::string(LONGLLAMA_SOURCE_DIR) + "/README.md"}},
                  {"split", "paragraph"},
                  {"eval_fraction", 0.2}}}}};
  Trainer t(config_of(j), Trainer::Start::Fresh);
  const EvalStats e0 = t.evaluate();
  t.run();
  EXPECT_NEAR(e0.loss, std::log(32000.0), 0.1);  // random init: uniform over the vocabulary
  EXPECT_TRUE(fs::exists(dir / "out" / "model" / "tokenizer.model"));
  EXPECT_EQ(fs::file_size(dir / "out" / "model" / "tokenizer.model"), fs::file_size(tok));
  fs::remove_all(dir);
}

// init_copy_rows: rows [rows) of the embedding and the LM head start as the cyclically matching
// rows of [from) plus N(0, noise) (noise 0: exact copies); every other parameter is the init's.
TEST(TrainLoop, InitCopyRows) {
  const fs::path dir = temp_dir("copyrows");
  ModelConfig c = copy_run_shape(2);
  const Model base = Model::random(c, 12);
  base.save((dir / "base").string(), false);
  json j = copy_run(dir / "out", 0);
  j.erase("model");
  j["init"] = (dir / "base").string();
  const ParamLayout L(c);
  const std::vector<float> before = flatten(base, L);
  const size_t d = size_t(c.hidden_size);
  for (double noise : {0.0, 0.05}) {
    j["init_copy_rows"] = {{"rows", {20, 32}}, {"from", {3, 7}}, {"noise", noise}};
    const Trainer t(config_of(j), Trainer::Start::Fresh);
    const std::vector<float>& after = t.params();
    ASSERT_EQ(after.size(), before.size());
    double sum2 = 0;
    size_t n = 0;
    for (size_t i = 0; i < before.size(); ++i) {
      const bool embed = i >= L.embed && i < L.embed + 32 * d, head = i >= L.lm_head && i < L.lm_head + 32 * d;
      const size_t table = embed ? L.embed : L.lm_head, row = (i - table) / d;
      if ((embed || head) && row >= 20) {
        const float src = before[table + (3 + (row - 20) % 4) * d + (i - table) % d];
        if (noise == 0) {
          ASSERT_EQ(after[i], src) << "row " << row;
        } else {
          sum2 += (double(after[i]) - src) * (double(after[i]) - src);
          ++n;
        }
      } else {
        ASSERT_EQ(after[i], before[i]) << "parameter " << i;
      }
    }
    if (noise > 0) {
      ASSERT_EQ(n, size_t(2 * 12) * d);
      EXPECT_NEAR(std::sqrt(sum2 / double(n)), noise, 0.1 * noise) << "the noise's standard deviation";
    }
  }
  j["steps"] = 0;  // saved as the init made it
  Trainer(config_of(j), Trainer::Start::Fresh).run();
  const std::vector<float> saved = flatten(Model::load((dir / "out" / "model").string()), L);
  EXPECT_NE(saved[L.embed + 20 * d], before[L.embed + 20 * d]);
  auto refused = [&](const json& rows, const std::string& what) {
    json k = j;
    k["init_copy_rows"] = rows;
    try {
      config_of(k);
      ADD_FAILURE() << rows.dump() << " must be refused";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  refused({{"rows", {20, 33}}, {"from", {3, 7}}}, "vocab_size 32");
  refused({{"rows", {5, 10}}, {"from", {3, 7}}}, "must not overlap");
  refused({{"rows", {20, 30}}, {"from", {7, 3}}}, "init_copy_rows.from");
  refused({{"rows", {20, 30}}, {"from", {3, 7}}, {"noise", -1}}, "noise");
  refused({{"rows", {20, 30}}, {"from", {3, 7}}, {"bogus", 1}}, "unknown field 'bogus'");
  json fresh = copy_run(dir / "out", 0);
  fresh["init_copy_rows"] = {{"rows", {20, 30}}, {"from", {3, 7}}};
  EXPECT_THROW(config_of(fresh), Error) << "needs init";
  fs::remove_all(dir);
}

// eval.stop_accuracy ends a run at the first evaluation that reaches it: the same run without it
// gives the evaluation accuracies; the stopped run ends at the first step that reached their
// maximum, with the model saved.
TEST(TrainLoop, StopsAtEvalAccuracy) {
  const fs::path full = temp_dir("stop_full"), stopped = temp_dir("stop_early");
  json j = copy_run(full, 40);
  j["eval"] = {{"batches", 2}, {"interval", 5}};
  Trainer(config_of(j), Trainer::Start::Fresh).run();
  std::vector<std::pair<int64_t, double>> evals;
  std::ifstream in(full / "log.jsonl");
  for (std::string line; std::getline(in, line);) {
    const json e = json::parse(line);
    const int64_t step = e.value("step", int64_t(-1));
    if (e.contains("eval_accuracy") && step > 0 && step < 40) evals.emplace_back(step, e["eval_accuracy"].get<double>());
  }
  ASSERT_EQ(evals.size(), 7u);  // steps 5, 10, ..., 35
  double best = 0;
  for (const auto& [s, a] : evals) best = std::max(best, a);
  ASSERT_GT(best, 0.0);
  int64_t first_best = 0;
  for (const auto& [s, a] : evals)
    if (a >= best && first_best == 0) first_best = s;

  j["output"] = stopped.string();
  j["eval"]["stop_accuracy"] = best;
  Trainer t(config_of(j), Trainer::Start::Fresh);
  t.run();
  EXPECT_EQ(t.steps_done(), first_best);
  EXPECT_TRUE(fs::exists(stopped / "model" / "model.safetensors"));
  EXPECT_NEAR(t.evaluate().accuracy, best, 1e-12);
  j["eval"]["stop_accuracy"] = 1.5;
  EXPECT_THROW(config_of(j), Error);
  j["eval"] = {{"batches", 2}, {"stop_accuracy", 0.5}};  // no interval: never checked
  EXPECT_THROW(config_of(j), Error);
  fs::remove_all(full);
  fs::remove_all(stopped);
}

// The negative bank (with and without a momentum copy) is used: training differs from the same run
// without it, and stays independent of the thread count. It needs memory layers without positions.
// cross_batch.negative_bias changes training (the run has negatives: range 3 over packs of 2),
// stays independent of the thread count, is 0 in the evaluation view, and a bank refuses it.
TEST(TrainLoop, NegativeBiasIsUsedAndDeterministic) {
  auto run = [](double bias, int threads) {
    const fs::path dir = temp_dir("nbias" + std::to_string(threads));
    json j = copy_run(dir, 4);
    j["cross_batch"]["schedule"] = json::array({{{"range", 3}}});
    j["cross_batch"]["negative_bias"] = bias;
    j["threads"] = threads;
    Trainer t(config_of(j), Trainer::Start::Fresh);
    for (int i = 0; i < 3; ++i) t.step();
    fs::remove_all(dir);
    return t.params();
  };
  const std::vector<float> plain = run(0.0, 1), one = run(3.0, 1), two = run(3.0, 2);
  EXPECT_TRUE(one == two);
  EXPECT_FALSE(one == plain);
  json j = copy_run(temp_dir("nbias_bank"), 1);
  j["model"]["mem_positionals"] = false;
  j["cross_batch"]["negative_bias"] = 2.0;
  j["negative_bank"] = {{"size", 48}};
  expect_refused(j, "negative_bias");  // a bank with a negative bias
}

// memory_attention_loss on the dictionary task (which knows each value's key): the term is
// reported and changes training, training stays independent of the thread count, weight 0 is the
// plain run; a model without memory layers or a negative bank refuses it.
TEST(TrainLoop, MemoryAttentionLossIsUsedAndDeterministic) {
  auto dict_run = [](const fs::path& dir) {
    json j = copy_run(dir, 3);
    j["model"]["vocab_size"] = 70;
    j["model"]["max_position_embeddings"] = 32;
    j["data"] = {{"sources", {{{"task", "dictionary"}, {"options", {{"window", 32}, {"length", 64}}}}}}};
    j["cross_batch"]["schedule"] = json::array({{{"range", 3}}});
    return j;
  };
  auto run = [&](double weight, int threads, double* attention_loss) {
    const fs::path dir = temp_dir("attn" + std::to_string(threads));
    json j = dict_run(dir);
    j["memory_attention_loss"] = weight;
    j["threads"] = threads;
    Trainer t(config_of(j), Trainer::Start::Fresh);
    for (int i = 0; i < 3; ++i) *attention_loss = t.step().attention_loss;
    fs::remove_all(dir);
    return t.params();
  };
  double a0 = -1, a1 = -1, a2 = -1;
  const std::vector<float> plain = run(0.0, 1, &a0), one = run(1.0, 1, &a1), two = run(1.0, 2, &a2);
  EXPECT_EQ(a0, 0.0);
  EXPECT_GT(a1, 0.5);  // −log P of one key among dozens, at random init
  EXPECT_EQ(a1, a2);
  EXPECT_TRUE(one == two);
  EXPECT_FALSE(one == plain);
  json j = dict_run(temp_dir("attn_refused"));
  j["memory_attention_loss"] = 1.0;
  j["model"]["mem_layers"] = json::array();
  expect_refused(j, "memory_attention_loss");  // nothing to supervise
  j = dict_run(temp_dir("attn_refused"));
  j["memory_attention_loss"] = 1.0;
  j["model"]["mem_positionals"] = false;
  j["negative_bank"] = {{"size", 48}};
  expect_refused(j, "memory_attention_loss");
}

TEST(TrainLoop, NegativeBankIsUsedAndDeterministic) {
  auto run = [](const json& bank, int threads) {
    const fs::path dir = temp_dir("bank" + std::to_string(threads));
    json j = copy_run(dir, 4);
    j["model"]["mem_positionals"] = false;
    j["cross_batch"]["schedule"] = json::array({{{"range", 1}}});
    if (!bank.is_null()) j["negative_bank"] = bank;
    j["threads"] = threads;
    Trainer t(config_of(j), Trainer::Start::Fresh);
    for (int i = 0; i < 4; ++i) t.step();
    fs::remove_all(dir);
    return t.params();
  };
  const std::vector<float> plain = run(nullptr, 1);
  for (double momentum : {0.0, 0.5}) {
    const json bank = {{"size", 48}, {"top_k", 4}, {"momentum", momentum}};
    const std::vector<float> one = run(bank, 1), two = run(bank, 2);
    EXPECT_TRUE(one == two) << "momentum " << momentum;
    EXPECT_FALSE(one == plain) << "momentum " << momentum;
  }
  json j = copy_run(temp_dir("bank_pos"), 1);
  j["negative_bank"] = {{"size", 48}};
  expect_refused(j, "mem_positionals");  // a bank with positional memory layers
  j["model"]["mem_positionals"] = false;
  j["negative_bank"]["momentum"] = 1.0;
  EXPECT_THROW(config_of(j), Error);
}

// init_widen: the saved model (steps 0) is widen_model of the init, with the config's seed by
// default; the run then trains at the widened shape; bad settings are refused by name.
TEST(TrainLoop, InitWiden) {
  const fs::path dir = temp_dir("widen");
  ModelConfig c = copy_run_shape(2);
  c.mem_layers = {1};
  c.mem_dtype = MemDType::F32;
  c.last_context_length = 0;
  const Model base = Model::random(c, 13);
  base.save((dir / "base").string(), false);
  json j = copy_run(dir / "out", 0);
  j.erase("model");
  j["init"] = (dir / "base").string();
  j["init_widen"] = {{"factor", 2}, {"std", 0.03}};
  Trainer(config_of(j), Trainer::Start::Fresh).run();
  const Model saved = Model::load((dir / "out" / "model").string());
  const Model expect = widen_model(base, {2, 0.03, 5});  // copy_run's seed
  EXPECT_EQ(saved.config.hidden_size, 64);
  EXPECT_EQ(saved.config.num_attention_heads, 4);
  EXPECT_EQ(saved.config.intermediate_size, 128);
  const ParamLayout L(saved.config);
  EXPECT_EQ(flatten(saved, L), flatten(expect, L));
  j["steps"] = 3;
  j["output"] = (dir / "out2").string();
  Trainer t(config_of(j), Trainer::Start::Fresh);
  t.run();
  EXPECT_EQ(Model::load((dir / "out2" / "model").string()).config.hidden_size, 64);
  for (const auto& [widen, what] : {std::pair{json{{"factor", 1}}, std::string("init_widen.factor")},
                                    std::pair{json{{"factor", 2}, {"std", -1}}, std::string("init_widen.std")},
                                    std::pair{json{{"factor", 2}, {"width", 3}}, std::string("width")}}) {
    json k = j;
    k["init_widen"] = widen;
    expect_refused(k, what);
  }
  json k = copy_run(dir / "out3", 0);
  k["init_widen"] = {{"factor", 2}};
  expect_refused(k, "needs 'init'");
  fs::remove_all(dir);
}

// The CLI's --init / --output replace the config's fields (absolute paths, not resolved against
// the config's directory), so one stage config serves several chains.
TEST(TrainLoop, FileOverridesReplaceInitAndOutput) {
  const fs::path dir = temp_dir("overrides");
  fs::create_directories(dir / "cfg");
  Model::random(copy_run_shape(2), 4).save((dir / "elsewhere").string(), false);
  json j = copy_run("relative-out", 1);
  j.erase("model");
  j["init"] = "no-such-model";
  std::ofstream((dir / "cfg" / "t.json").string()) << j.dump();
  const std::string file = (dir / "cfg" / "t.json").string();
  EXPECT_THROW(TrainConfig::from_file(file), Error);  // its own init does not exist
  const TrainConfig c = TrainConfig::from_file(
      file, {{"init", (dir / "elsewhere").string()}, {"output", (dir / "out").string()}});
  EXPECT_EQ(c.init, (dir / "elsewhere").string());
  EXPECT_EQ(c.output, (dir / "out").string());
  EXPECT_EQ(c.model.hidden_size, 32);
  fs::remove_all(dir);
}
