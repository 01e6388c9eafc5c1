// Tokenizer and prompt formats against the official golden ids (shared/reference/tokenizer).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <nlohmann/json.hpp>

#include "tokenizer/prompt.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const fs::path kGolden = fs::path(LONGLLAMA_REFERENCE_DIR) / "tokenizer" / "golden.json";
const fs::path kTokDir = LONGLLAMA_TOKENIZER_DIR;
// golden.json key -> file in shared/tokenizers
const std::pair<const char*, const char*> kModels[] = {{"tokenizer.model", "openllama_v1.model"},
                                                       {"tokenizer_ol_v2.model", "openllama_v2.model"}};

struct Fixture : ::testing::Test {
  json golden;
  void SetUp() override {
    if (!fs::exists(kGolden)) GTEST_SKIP() << "reference data absent: " << kGolden;
    for (auto& [key, file] : kModels)
      if (!fs::exists(kTokDir / file)) GTEST_SKIP() << "tokenizer absent: " << kTokDir / file;
    std::ifstream f(kGolden);
    golden = json::parse(f);
  }
};

std::string streamed(const ll::Tokenizer& tok, const std::vector<int>& ids) {
  ll::StreamDecoder sd(tok);
  std::string out;
  for (int id : ids) out += sd.push(id);
  return out + sd.flush();
}

std::vector<ll::ChatTurn> turns_of(const json& j) {
  std::vector<ll::ChatTurn> t;
  for (auto& x : j) t.push_back({x[0].get<std::string>(), x[1].get<std::string>()});
  return t;
}

}  // namespace

TEST_F(Fixture, SpecialIdsAndVocab) {
  for (auto& [key, file] : kModels) {
    SCOPED_TRACE(file);
    ll::Tokenizer tok((kTokDir / file).string());
    const json& g = golden.at(key);
    EXPECT_EQ(tok.vocab_size(), g.at("vocab_size").get<int>());
    EXPECT_EQ(tok.bos(), g.at("bos").get<int>());
    EXPECT_EQ(tok.eos(), g.at("eos").get<int>());
    EXPECT_EQ(tok.unk(), g.at("unk").get<int>());
    EXPECT_EQ(tok.piece(tok.bos()), "<s>");
    EXPECT_EQ(tok.piece(tok.eos()), "</s>");
  }
}

TEST_F(Fixture, EncodeDecodeGolden) {
  for (auto& [key, file] : kModels) {
    ll::Tokenizer tok((kTokDir / file).string());
    for (auto& c : golden.at(key).at("encode")) {
      const auto text = c.at("text").get<std::string>();
      SCOPED_TRACE(std::string(file) + ": " + text);
      const auto ids = c.at("ids").get<std::vector<int>>();
      EXPECT_EQ(tok.encode(text), ids);
      EXPECT_EQ(tok.decode(ids), c.at("decoded").get<std::string>());
    }
  }
}

TEST_F(Fixture, InstructPromptGolden) {
  for (auto& [key, file] : kModels) {
    SCOPED_TRACE(file);
    ll::Tokenizer tok((kTokDir / file).string());
    const json& g = golden.at(key).at("instruct_prompt");
    EXPECT_EQ(g.at("system").get<std::string>(), ll::kDefaultSystemPrompt);
    EXPECT_EQ(ll::build_instruct(tok, g.at("system"), g.at("question")), g.at("ids").get<std::vector<int>>());
  }
}

TEST_F(Fixture, ChatPromptGolden) {
  for (auto& [key, file] : kModels) {
    SCOPED_TRACE(file);
    ll::Tokenizer tok((kTokDir / file).string());
    const json& g = golden.at(key).at("chat_prompt");
    EXPECT_EQ(g.at("intro").get<std::string>(), ll::kChatIntro);
    EXPECT_EQ(ll::build_chat(tok, g.at("intro"), turns_of(g.at("turns"))), g.at("ids").get<std::vector<int>>());
  }
}

// The incremental API must produce the same ids as building the whole chat at once.
TEST_F(Fixture, ChatIncrementalMatchesWhole) {
  for (auto& [key, file] : kModels) {
    SCOPED_TRACE(file);
    ll::Tokenizer tok((kTokDir / file).string());
    const json& g = golden.at(key).at("chat_prompt");
    const auto turns = turns_of(g.at("turns"));
    std::vector<int> ids = ll::build_chat(tok, ll::kChatIntro, {});
    EXPECT_EQ(ids, ll::build_plain(tok, ll::kChatIntro));
    for (auto& t : turns) {
      if (t.role == "user") {
        auto u = ll::chat_user_turn(tok, t.text);
        ids.insert(ids.end(), u.begin(), u.end());
      } else {  // the model wrote the answer after the assistant prefix, then EOS closes it
        auto a = tok.encode(t.text);
        ids.insert(ids.end(), a.begin(), a.end());
        auto e = ll::chat_assistant_end(tok);
        ids.insert(ids.end(), e.begin(), e.end());
      }
    }
    EXPECT_EQ(ids, g.at("ids").get<std::vector<int>>());
    // Ending on an assistant turn: no trailing assistant prefix.
    std::vector<ll::ChatTurn> two(turns.begin(), turns.begin() + 2);
    auto closed = ll::build_chat(tok, ll::kChatIntro, two);
    EXPECT_EQ(closed.back(), tok.eos());
  }
}

TEST_F(Fixture, PlainPrompt) {
  ll::Tokenizer tok((kTokDir / "openllama_v2.model").string());
  auto ids = ll::build_plain(tok, "Hello world");
  EXPECT_EQ(ids, (std::vector<int>{1, 8479, 1173}));
  EXPECT_EQ(ll::build_plain(tok, ""), std::vector<int>{tok.bos()});
}

TEST_F(Fixture, StreamDecoderMatchesDecode) {
  for (auto& [key, file] : kModels) {
    ll::Tokenizer tok((kTokDir / file).string());
    std::vector<std::vector<int>> seqs;
    for (auto& c : golden.at(key).at("encode")) seqs.push_back(c.at("ids").get<std::vector<int>>());
    seqs.push_back(golden.at(key).at("instruct_prompt").at("ids").get<std::vector<int>>());
    seqs.push_back(golden.at(key).at("chat_prompt").at("ids").get<std::vector<int>>());
    // Leading space-only pieces, an unfinished UTF-8 sequence at the end, a lone continuation byte.
    const int sp = tok.encode("\n")[0];  // the lone "▁" piece
    seqs.push_back({sp, sp, tok.encode("Hello")[0], sp});
    auto emoji = tok.encode("x🙂");
    seqs.push_back(std::vector<int>(emoji.begin(), emoji.end() - 1));
    seqs.push_back({tok.encode("a")[0], 3 + 0x80, tok.encode("b")[0]});
    for (auto& ids : seqs) {
      SCOPED_TRACE(std::string(file) + ": " + ::testing::PrintToString(ids));
      EXPECT_EQ(streamed(tok, ids), tok.decode(ids));
    }
  }
}

// Random id sequences biased towards the awkward pieces: byte fallback, lone "▁", BOS/EOS, <unk>.
TEST_F(Fixture, StreamDecoderRandomSequences) {
  for (auto& [key, file] : kModels) {
    ll::Tokenizer tok((kTokDir / file).string());
    std::mt19937 rng(1234);
    const int sp = tok.encode("\n")[0];
    for (int trial = 0; trial < 300; ++trial) {
      std::vector<int> ids(1 + rng() % 24);
      for (int& id : ids) {
        switch (rng() % 6) {
          case 0: id = 3 + 0xC0 + rng() % 0x40; break;  // UTF-8 lead bytes
          case 1: id = 3 + 0x80 + rng() % 0x40; break;  // continuation bytes
          case 2: id = sp; break;
          case 3: id = int(rng() % 3); break;           // <unk>, <s>, </s>
          default: id = int(rng() % tok.vocab_size());
        }
      }
      SCOPED_TRACE(std::string(file) + ": " + ::testing::PrintToString(ids));
      ASSERT_EQ(streamed(tok, ids), tok.decode(ids));
    }
  }
}

TEST_F(Fixture, StreamDecoderHoldsIncompleteUtf8) {
  ll::Tokenizer tok((kTokDir / "openllama_v1.model").string());
  // v1 spells the emoji as byte-fallback pieces: nothing is emitted until the 4th byte arrives.
  auto ids = tok.encode("emoji 🙂");
  ll::StreamDecoder sd(tok);
  std::vector<std::string> outs;
  for (int id : ids) outs.push_back(sd.push(id));
  EXPECT_EQ(outs.back(), "🙂");
  for (size_t i = outs.size() - 4; i + 1 < outs.size(); ++i) EXPECT_EQ(outs[i], "");
  EXPECT_EQ(sd.flush(), "");
}

TEST_F(Fixture, BadIds) {
  ll::Tokenizer tok((kTokDir / "openllama_v1.model").string());
  EXPECT_THROW(tok.decode({-1}), ll::Error);
  EXPECT_THROW(tok.decode({tok.vocab_size()}), ll::Error);
  EXPECT_THROW(tok.piece(tok.vocab_size()), ll::Error);
  ll::StreamDecoder sd(tok);
  EXPECT_THROW(sd.push(-5), ll::Error);
}

TEST_F(Fixture, FromBytesRoundTrip) {
  ll::Tokenizer a((kTokDir / "openllama_v2.model").string());
  ll::Tokenizer b = ll::Tokenizer::from_bytes(a.serialized(), "embedded");
  EXPECT_EQ(b.encode("def f(x):\n    return x"), a.encode("def f(x):\n    return x"));
  EXPECT_EQ(b.serialized(), a.serialized());
  EXPECT_EQ(fs::file_size(kTokDir / "openllama_v2.model"), a.serialized().size());
}

TEST(Tokenizer, BadPathNamesPath) {
  const std::string path = "/nonexistent/dir/missing_tokenizer.model";
  try {
    ll::Tokenizer tok(path);
    FAIL() << "no exception";
  } catch (const ll::Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, GarbageBytesNameSource) {
  try {
    ll::Tokenizer::from_bytes("this is not a model proto", "weights.gguf:tokenizer");
    FAIL() << "no exception";
  } catch (const ll::Error& e) {
    EXPECT_NE(std::string(e.what()).find("weights.gguf:tokenizer"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ll::Tokenizer::from_bytes("", "empty"), ll::Error);
}

TEST(Prompt, ParseTemplate) {
  EXPECT_EQ(ll::parse_template("plain"), ll::PromptTemplate::Plain);
  EXPECT_EQ(ll::parse_template("instruct"), ll::PromptTemplate::Instruct);
  EXPECT_EQ(ll::parse_template("chat"), ll::PromptTemplate::Chat);
  try {
    ll::parse_template("alpaca");
    FAIL() << "no exception";
  } catch (const ll::Error& e) {
    EXPECT_NE(std::string(e.what()).find("alpaca"), std::string::npos);
  }
}

TEST_F(Fixture, ChatRejectsUnknownRole) {
  ll::Tokenizer tok((kTokDir / "openllama_v1.model").string());
  EXPECT_THROW(ll::build_chat(tok, ll::kChatIntro, {{"system", "x"}}), ll::Error);
}
