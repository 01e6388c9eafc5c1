// Training data pipeline, optimizer and TRAIN.json validation.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "train/data.h"
#include "train/optimizer.h"
#include "train/train_config.h"
#include "util/error.h"

namespace fs = std::filesystem;
using namespace ll;
using namespace ll::train;
using json = nlohmann::json;

namespace {

// Documents of 3-22 random tokens below 1000, loss on all but the first: varied lengths for the streams.
class CountingSource : public DocumentSource {
 public:
  Document next(Rng& rng) const override {
    const int n = 3 + int(rng.below(20));
    Document d;
    for (int i = 0; i < n; ++i) {
      d.tokens.push_back(int(rng.below(1000)));
      d.loss.push_back(i != 0);
    }
    return d;
  }
  int vocab_needed() const override { return 1000; }
};

// Documents whose token i is i, with attention targets attend[i] = i - 1 - i % 3 (from i = 3).
class AttendingSource : public DocumentSource {
 public:
  Document next(Rng& rng) const override {
    const int n = 5 + int(rng.below(30));
    Document d;
    for (int i = 0; i < n; ++i) {
      d.tokens.push_back(i);
      d.loss.push_back(1);
      d.attend.push_back(i >= 3 ? i - 1 - i % 3 : -1);
    }
    return d;
  }
  int vocab_needed() const override { return 64; }
};

}  // namespace

// Attention targets become rows of the batch: the key row holds the target position's token, in
// the same stream and before the row; a target before the step's first row is dropped (-1).
TEST(TrainData, AttentionTargetsBecomeBatchRows) {
  auto src = std::make_shared<AttendingSource>();
  const int streams = 3, k = 2, S = 7, per = k * S;
  PackedStreams ps(src, 9, streams, k, S);
  std::vector<int> in, tg;
  std::vector<uint8_t> mk;
  std::vector<int32_t> attend;
  int kept = 0, dropped = 0;
  for (int step = 0; step < 20; ++step) {
    ps.next(in, tg, mk, &attend);
    ASSERT_EQ(attend.size(), in.size());
    for (int r = 0; r < streams * per; ++r) {
      const int pos = tg[r];  // the predicted token's position in its document
      if (pos < 3) {
        EXPECT_EQ(attend[r], -1);
        continue;
      }
      const int want = pos - 1 - pos % 3, key_row = r + 1 - (pos - want);  // row r + 1 holds position pos
      if (key_row < r / per * per) {
        EXPECT_EQ(attend[r], -1) << "row " << r << ": its key is in an earlier step";
        ++dropped;
        continue;
      }
      ASSERT_EQ(attend[r], key_row) << "row " << r;
      EXPECT_EQ(in[key_row], want);
      EXPECT_LE(attend[r], r);
      ++kept;
    }
  }
  EXPECT_GT(kept, 100);
  EXPECT_GT(dropped, 5);
  // Without the output vector nothing changes in the rest.
  PackedStreams a(src, 9, streams, k, S), b(src, 9, streams, k, S);
  std::vector<int> in2, tg2;
  std::vector<uint8_t> mk2;
  a.next(in, tg, mk, &attend);
  b.next(in2, tg2, mk2);
  EXPECT_EQ(in, in2);
  EXPECT_EQ(tg, tg2);
  EXPECT_EQ(mk, mk2);
}

TEST(TrainData, KPackingKeepsStreamsContiguous) {
  auto src = std::make_shared<CountingSource>();
  const int streams = 3, k = 2, S = 5, per = k * S;
  PackedStreams ps(src, 42, streams, k, S);
  // The stream each slot should see: documents in the order slots request them.
  std::vector<int> in, tg;
  std::vector<uint8_t> mk;
  std::vector<std::vector<int>> seen(streams), seen_targets(streams);
  std::vector<std::vector<uint8_t>> seen_mask(streams);
  for (int step = 0; step < 7; ++step) {
    ps.next(in, tg, mk);
    ASSERT_EQ(in.size(), size_t(streams * per));
    for (int s = 0; s < streams; ++s)
      for (int t = 0; t < per; ++t) {  // entries s·k .. s·k+k-1 are consecutive chunks
        seen[s].push_back(in[s * per + t]);
        seen_targets[s].push_back(tg[s * per + t]);
        seen_mask[s].push_back(mk[s * per + t]);
      }
  }
  for (int s = 0; s < streams; ++s)
    for (size_t t = 0; t + 1 < seen[s].size(); ++t) EXPECT_EQ(seen_targets[s][t], seen[s][t + 1]);  // shift by one
  // Each slot's stream is whole documents back to back, slot s starting with document s, and
  // every document goes to exactly one slot (numbered in the order slots ask for them).
  std::vector<Document> docs;
  for (uint64_t i = 0; i < 60; ++i) {
    Rng r(mix_seed(42, i));
    docs.push_back(src->next(r));
  }
  std::vector<int> owner(docs.size(), -1);
  for (int s = 0; s < streams; ++s) {
    size_t pos = 0;
    bool first = true;
    while (pos < seen[s].size()) {
      int found = -1;
      for (size_t j = 0; j < docs.size() && found < 0; ++j) {
        if (owner[j] >= 0 || (first && j != size_t(s))) continue;
        const size_t n = std::min(docs[j].tokens.size(), seen[s].size() - pos);
        if (std::equal(docs[j].tokens.begin(), docs[j].tokens.begin() + n, seen[s].begin() + pos)) found = int(j);
      }
      ASSERT_GE(found, 0) << "slot " << s << " at " << pos;
      owner[found] = s;
      for (size_t t = 0; t < std::min(docs[found].tokens.size(), seen[s].size() - pos); ++t)
        if (pos + t > 0) {
          EXPECT_EQ(seen_mask[s][pos + t - 1], docs[found].loss[t]);  // mask of the predicted token
        }
      pos += docs[found].tokens.size();
      first = false;
    }
  }
  size_t used = 0;
  while (used < owner.size() && owner[used] >= 0) ++used;
  for (size_t j = used; j < owner.size(); ++j) EXPECT_LT(owner[j], 0) << "documents are used in order";

  // State round trip: a restored pipeline continues identically.
  PackedStreams a(src, 42, streams, k, S), b(src, 42, streams, k, S);
  for (int i = 0; i < 3; ++i) a.next(in, tg, mk);
  b.restore(json::parse(a.state().dump()));
  std::vector<int> in2, tg2;
  std::vector<uint8_t> mk2;
  for (int i = 0; i < 4; ++i) {
    a.next(in, tg, mk);
    b.next(in2, tg2, mk2);
    EXPECT_EQ(in, in2);
    EXPECT_EQ(tg, tg2);
    EXPECT_EQ(mk, mk2);
  }
}

TEST(TrainData, DocumentsConcatenateWithoutPadding) {
  // One stream, k = 1: the concatenated inputs are the documents back to back.
  auto src = std::make_shared<CountingSource>();
  PackedStreams ps(src, 7, 1, 1, 4);
  std::vector<int> all, in, tg;
  std::vector<uint8_t> mk;
  for (int i = 0; i < 20; ++i) {
    ps.next(in, tg, mk);
    all.insert(all.end(), in.begin(), in.end());
  }
  std::vector<int> want;
  for (uint64_t i = 0; want.size() < all.size(); ++i) {
    Rng r(mix_seed(7, i));
    const Document d = src->next(r);
    want.insert(want.end(), d.tokens.begin(), d.tokens.end());
  }
  want.resize(all.size());
  EXPECT_EQ(all, want);
}

TEST(TrainData, TextCorpusBosEosAndHeldOut) {
  const fs::path tok = fs::path(LONGLLAMA_TOKENIZER_DIR) / "openllama_v2.model";
  if (!fs::exists(tok)) GTEST_SKIP() << tok << " not found";
  const fs::path dir = fs::temp_directory_path() / ("ll_train_text_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  {
    std::ofstream f(dir / "a.txt");
    for (int i = 0; i < 40; ++i) f << "Paragraph number " << i << " has\nsome words.\n\n";
  }
  Tokenizer t(tok.string());
  TextCorpus c({(dir / "a.txt").string()}, "paragraph", t, 0.1, 3);
  EXPECT_EQ(c.train().size() + c.eval().size(), 40u);
  EXPECT_GE(c.eval().size(), 1u);
  for (const auto& d : c.train()) {
    EXPECT_EQ(d.tokens.front(), t.bos());
    EXPECT_EQ(d.tokens.back(), t.eos());
    EXPECT_EQ(d.loss[0], 0);
    for (size_t i = 1; i < d.loss.size(); ++i) EXPECT_EQ(d.loss[i], 1);
  }
  const auto ids = t.encode("Paragraph number 0 has\nsome words.");
  bool found = false;
  for (const auto& d : c.train()) found |= std::vector<int>(d.tokens.begin() + 1, d.tokens.end() - 1) == ids;
  for (const auto& d : c.eval()) found |= std::vector<int>(d.tokens.begin() + 1, d.tokens.end() - 1) == ids;
  EXPECT_TRUE(found);
  fs::remove_all(dir);
}

TEST(TrainData, CopyTaskShape) {
  auto task = make_task("copy", json{{"length", 40}, {"key_length", 3}, {"symbols", 5}}, nullptr, "test");
  EXPECT_EQ(task->vocab_needed(), 10);
  Rng r(1);
  const Document d = task->next(r);
  ASSERT_EQ(d.tokens.size(), 40u);
  EXPECT_EQ(d.tokens.front(), 1);
  EXPECT_EQ(d.tokens.back(), 2);
  // the recalled key (loss on) equals the key after the start mark
  EXPECT_EQ(std::vector<int>(d.tokens.begin() + 2, d.tokens.begin() + 5),
            std::vector<int>(d.tokens.end() - 4, d.tokens.end() - 1));
  int loss_tokens = 0;
  for (auto l : d.loss) loss_tokens += l;
  EXPECT_EQ(loss_tokens, 3);
  EXPECT_THROW(make_task("copy", json{{"lenght", 40}}, nullptr, "test"), Error);
  EXPECT_THROW(make_task("nope", json::object(), nullptr, "test"), Error);
}

TEST(TrainOptimizer, AdamWStepAndSchedule) {
  ModelConfig c;
  c.vocab_size = 5;
  c.hidden_size = 4;
  c.num_attention_heads = 2;
  c.intermediate_size = 6;
  c.num_hidden_layers = 1;
  const ParamLayout L(c);
  OptimizerConfig oc;
  oc.lr = 0.1;
  oc.weight_decay = 0.5;
  oc.clip = 0;
  AdamW opt(oc, L);
  std::vector<float> p(L.total, 1.0f), g(L.total, 0.25f);
  opt.update(p.data(), g.data(), 1, 0.1);
  // step 1: m̂ = g, v̂ = g², update = g/(|g| + eps) = ~1; decay only off the norms
  const float decayed = 1.0f - 0.1f * (1.0f + 0.5f), plain = 1.0f - 0.1f;
  EXPECT_NEAR(p[L.layers[0].wq], decayed, 1e-6);
  EXPECT_NEAR(p[L.embed], decayed, 1e-6);
  EXPECT_NEAR(p[L.layers[0].attn_norm], plain, 1e-6);
  EXPECT_NEAR(p[L.final_norm], plain, 1e-6);
  // clipping: norm of all-ones·3 over n params = 3·sqrt(n)
  oc.clip = 1.0;
  AdamW clipped(oc, L);
  std::vector<float> g3(L.total, 3.0f);
  const double n = clipped.update(p.data(), g3.data(), 1, 0.0);
  EXPECT_NEAR(n, 3.0 * std::sqrt(double(L.total)), 1e-3);
  EXPECT_NEAR(g3[0], 1.0 / std::sqrt(double(L.total)), 1e-6);
  // schedules
  oc.lr = 1.0;
  oc.end_lr = 0.1;
  oc.warmup_steps = 10;
  EXPECT_NEAR(learning_rate(oc, 1, 110), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate(oc, 10, 110), 1.0, 1e-12);
  EXPECT_NEAR(learning_rate(oc, 60, 110), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(oc, 110, 110), 0.1, 1e-12);
  oc.schedule = LrSchedule::Constant;
  EXPECT_NEAR(learning_rate(oc, 100, 110), 1.0, 1e-12);
}

namespace {

json minimal_config() {
  return json{{"model",
               {{"vocab_size", 16},
                {"hidden_size", 8},
                {"intermediate_size", 12},
                {"num_hidden_layers", 1},
                {"num_attention_heads", 2},
                {"max_position_embeddings", 8},
                {"mem_layers", {0}}}},
              {"data", {{"sources", {{{"task", "copy"}, {"options", {{"length", 16}}}}}}}},
              {"batch_size", 4},
              {"pack_size", 2},
              {"output", "out"}};
}

std::string config_error(const json& j) {
  try {
    TrainConfig::from_json(j, "TRAIN.json", "/tmp");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(TrainConfig, ValidatesWithFieldNames) {
  const TrainConfig ok = TrainConfig::from_json(minimal_config(), "TRAIN.json", "/base");
  EXPECT_EQ(ok.seq_len, 8);
  EXPECT_EQ(ok.micro_batch_size, 4);
  EXPECT_EQ(ok.output, "/base/out");
  EXPECT_EQ(ok.eval_range, 1);  // pack_size - 1: every chunk sees all earlier chunks of its pack

  auto with = [](const std::string& key, const json& v) {
    json j = minimal_config();
    j[key] = v;
    return j;
  };
  EXPECT_NE(config_error(with("batch_sise", 4)).find("unknown field 'batch_sise'"), std::string::npos);
  EXPECT_NE(config_error(with("batch_size", 5)).find("TRAIN.json.batch_size must be a multiple of pack_size"),
            std::string::npos);
  EXPECT_NE(config_error(with("micro_batch_size", 3)).find("micro_batch_size"), std::string::npos);
  EXPECT_NE(config_error(with("seq_len", 16)).find("max_position_embeddings"), std::string::npos);
  EXPECT_NE(config_error(with("optimizer", {{"lr", -1}})).find("TRAIN.json.optimizer.lr"), std::string::npos);
  EXPECT_NE(config_error(with("optimizer", {{"schedule", "linear"}})).find("optimizer.schedule"), std::string::npos);
  EXPECT_NE(config_error(with("cross_batch", {{"schedule", {{{"steps", 3}}}}})).find("cross_batch.schedule[0].range"),
            std::string::npos);
  EXPECT_NE(config_error(with("cross_batch", {{"negative_bias", 1e9}})).find("TRAIN.json.cross_batch.negative_bias"),
            std::string::npos);
  EXPECT_EQ(TrainConfig::from_json(with("cross_batch", {{"negative_bias", 4.5}}), "T.json", "/b").negative_bias, 4.5);
  EXPECT_NE(config_error(with("memory_attention_loss", -1)).find("TRAIN.json.memory_attention_loss"), std::string::npos);
  EXPECT_EQ(TrainConfig::from_json(with("memory_attention_loss", 0.5), "T.json", "/b").memory_attention_loss, 0.5);
  EXPECT_NE(config_error(with("steps", "many")).find("TRAIN.json.steps has the wrong type"), std::string::npos);
  EXPECT_NE(config_error(with("data", {{"sources", {{{"text", {"a.txt"}}}}}})).find("tokenizer"), std::string::npos);
  json no_out = minimal_config();
  no_out.erase("output");
  EXPECT_NE(config_error(no_out).find("'output'"), std::string::npos);
  json no_model = minimal_config();
  no_model.erase("model");
  EXPECT_NE(config_error(no_model).find("'model'"), std::string::npos);
}
