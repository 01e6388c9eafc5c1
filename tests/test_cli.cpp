// The longllama command as a user runs it: exit codes, stdout, error messages.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/reference_check.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace {

using ll::testing::CliRun;
CliRun run(const std::string& args) { return ll::testing::run_cli(LONGLLAMA_CLI, args, "2>&1"); }
CliRun run_stdout_only(const std::string& args) { return ll::testing::run_cli(LONGLLAMA_CLI, args, "2>/dev/null"); }

const fs::path kRef = LONGLLAMA_REFERENCE_DIR;
const fs::path kTok = fs::path(LONGLLAMA_TOKENIZER_DIR) / "openllama_v2.model";

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("longllama_test_cli_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// A tiny shape with one memory layer, written to dir/shape.json.
fs::path write_tiny_shape(const fs::path& dir, int vocab) {
  ll::ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.max_position_embeddings = 64;
  c.last_context_length = 32;
  c.mem_layers = {1};
  std::ofstream(dir / "shape.json") << c.to_json();
  return dir / "shape.json";
}

// A small random model with the real OpenLLaMA tokenizer, made through the CLI.
fs::path make_random_model(const fs::path& dir) {
  write_tiny_shape(dir, 32000);
  const CliRun r = run("init-random --config " + (dir / "shape.json").string() + " --seed 3 -o " +
                    (dir / "model").string() + " --tokenizer " + kTok.string());
  EXPECT_EQ(r.code, 0) << r.out;
  return dir / "model";
}

}  // namespace

TEST(Cli, VerifyReferenceEveryCase) {
  if (!fs::is_directory(kRef / "parity")) GTEST_SKIP() << "no reference data at " << kRef << " (needs ../shared)";
  for (const auto& e : fs::directory_iterator(kRef / "parity")) {
    // the default tolerance is the case's own (ll::reference_tolerance: 5e-4 with bf16 memory)
    const CliRun r = run_stdout_only("verify-reference " + e.path().string() + " --json");
    EXPECT_EQ(r.code, 0) << e.path() << "\n" << r.out;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_TRUE(j["passed"].get<bool>());
    EXPECT_EQ(j["tolerance"].get<double>(), ll::reference_tolerance(e.path().string()));
    EXPECT_EQ(j["scenarios"].size(), 4u);
  }
}

TEST(Cli, VerifyReferenceFailsOnMismatch) {
  const fs::path src = kRef / "parity" / "plain_llama";
  if (!fs::is_directory(src)) GTEST_SKIP() << "no reference data at " << kRef;
  // Same case, but with a config that changes the model: must exit non-zero.
  const fs::path dir = temp_dir("mismatch");
  for (const auto& e : fs::directory_iterator(src)) fs::copy(e.path(), dir / e.path().filename());
  ll::ModelConfig c = ll::ModelConfig::from_file((src / "config.json").string());
  c.rope_theta = 500.0f;
  fs::permissions(dir / "config.json", fs::perms::owner_write, fs::perm_options::add);
  std::ofstream(dir / "config.json") << c.to_json();
  const CliRun r = run("verify-reference " + dir.string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("MISMATCH"), std::string::npos) << r.out;
  fs::remove_all(dir);
}

TEST(Cli, TokenizeMatchesGoldenPrompts) {
  if (!fs::exists(kTok)) GTEST_SKIP() << "no tokenizer at " << kTok;
  std::ifstream f(kRef / "tokenizer" / "golden.json");
  if (!f) GTEST_SKIP() << "no tokenizer goldens";
  const auto golden = nlohmann::json::parse(f)["tokenizer_ol_v2.model"];
  const auto& ip = golden["instruct_prompt"];
  const CliRun r = run_stdout_only("tokenize -m " + kTok.string() + " --template instruct --system '" +
                                ip["system"].get<std::string>() + "' --text '" + ip["question"].get<std::string>() + "'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out), ip["ids"]);
  const CliRun plain = run_stdout_only("tokenize -m " + kTok.string() + " --text 'Hello world'");
  EXPECT_EQ(nlohmann::json::parse(plain.out), golden["encode"][0]["ids"]);
}

TEST(Cli, InitRandomThenGenerateIsDeterministic) {
  if (!fs::exists(kTok)) GTEST_SKIP() << "no tokenizer at " << kTok;
  const fs::path dir = temp_dir("generate");
  const fs::path model = make_random_model(dir);
  std::ofstream(dir / "doc.txt") << std::string(3000, 'a') << " The pass key is 12345. Remember it.";
  const std::string args = "generate -m " + model.string() + " -p 'The pass key is' -n 12 --json --temp 0.8 --seed 7 --doc " +
                           (dir / "doc.txt").string();
  const CliRun a = run_stdout_only(args), b = run_stdout_only(args);
  ASSERT_EQ(a.code, 0) << a.out;
  const auto ja = nlohmann::json::parse(a.out), jb = nlohmann::json::parse(b.out);
  EXPECT_EQ(ja["ids"], jb["ids"]);
  EXPECT_LE(ja["ids"].size(), 12u);
  EXPECT_GT(ja["memory_tokens"].get<int>(), 0);  // the document went to memory
  // Streaming mode prints the same text.
  const CliRun s = run_stdout_only("generate -m " + model.string() + " -p 'The pass key is' -n 12 --temp 0.8 --seed 7 --doc " +
                                (dir / "doc.txt").string());
  EXPECT_EQ(s.out, ja["text"].get<std::string>() + "\n");
  fs::remove_all(dir);
}

TEST(Cli, ClearErrors) {
  const CliRun missing = run("generate -m /nonexistent/model -p hi");
  EXPECT_EQ(missing.code, 2);
  EXPECT_NE(missing.out.find("/nonexistent/model"), std::string::npos) << missing.out;

  const CliRun both = run("generate -m /tmp -p hi -f /tmp/x");
  EXPECT_EQ(both.code, 2);
  EXPECT_NE(both.out.find("-p"), std::string::npos) << both.out;

  const CliRun badcase = run("verify-reference /nonexistent/case");
  EXPECT_NE(badcase.code, 0);
  EXPECT_NE(badcase.out.find("/nonexistent/case"), std::string::npos) << badcase.out;

  if (fs::exists(kTok)) {
    const fs::path dir = temp_dir("errors");
    const fs::path model = make_random_model(dir);
    const CliRun tmpl = run("generate -m " + model.string() + " -p hi --template fancy");
    EXPECT_EQ(tmpl.code, 2);
    EXPECT_NE(tmpl.out.find("fancy"), std::string::npos) << tmpl.out;
    const CliRun temp = run("generate -m " + model.string() + " -p hi --temp -1");
    EXPECT_EQ(temp.code, 2);
    EXPECT_NE(temp.out.find("temperature"), std::string::npos) << temp.out;
    const CliRun nodoc = run("generate -m " + model.string() + " -p hi --doc /nonexistent/doc.txt");
    EXPECT_EQ(nodoc.code, 2);
    EXPECT_NE(nodoc.out.find("/nonexistent/doc.txt"), std::string::npos) << nodoc.out;
    fs::remove_all(dir);
  }
}

TEST(Cli, ChatAnswersEveryTurnAndKeepsGoing) {
  if (!fs::exists(kTok)) GTEST_SKIP() << "no tokenizer at " << kTok;
  const fs::path dir = temp_dir("chat");
  const fs::path model = make_random_model(dir);
  std::ofstream(dir / "turns.txt") << "Hello there\nWhat did I say?\nAnd now?\n";
  const CliRun r = run("chat -m " + model.string() + " -n 6 --temp 0.7 --seed 1 < " + (dir / "turns.txt").string());
  EXPECT_EQ(r.code, 0) << r.out;
  size_t answers = 0;
  for (size_t p = r.out.find("ASSISTANT:"); p != std::string::npos; p = r.out.find("ASSISTANT:", p + 1)) ++answers;
  EXPECT_EQ(answers, 3u) << r.out;
  fs::remove_all(dir);
}

// `bench --json` on a tiny random model: the fields, each a measured positive number, and
// the decode fractions taken against the bandwidth probe paired with the tokens; with -r, the
// samples of every repetition.
TEST(Cli, BenchJson) {
  const fs::path dir = temp_dir("bench");
  const CliRun r = run_stdout_only("bench --random " + write_tiny_shape(dir, 256).string() +
                                   " --type f32 -p 16 -n 4 --memory-tokens 512 -t 1 -r 2 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const auto j = nlohmann::json::parse(r.out);
  for (const char* k : {"pp_tokens_per_s", "tg_tokens_per_s", "model_bytes", "peak_rss_bytes", "bandwidth_bytes_per_s",
                        "bandwidth_peak_bytes_per_s", "sgemm_flops_per_s", "sgemm_peak_flops_per_s",
                        "pp_fraction_of_sgemm", "pp_fraction_of_peak_sgemm", "tg_fraction_of_bandwidth",
                        "tg_fraction_of_peak_bandwidth"})
    EXPECT_GT(j.at(k).get<double>(), 0.0) << k;
  EXPECT_EQ(j["tg"].get<int>(), 4);
  ASSERT_EQ(j["memory"].size(), 1u);
  EXPECT_EQ(j["memory"][0]["memory_tokens"].get<int64_t>(), 512);
  EXPECT_GT(j["memory"][0]["memory_bytes"].get<double>(), 0.0);
  EXPECT_TRUE(std::isfinite(j["memory"][0]["extra_over_read_time"].get<double>()));
  // -r 2: every figure measured twice, the reported one is one of the two (the median's pick).
  EXPECT_EQ(j["repetitions"].get<int>(), 2);
  // The sgemm figure is the median of the passes paired with each pp, never above the run's best.
  EXPECT_LE(j["sgemm_flops_per_s"].get<double>(), j["sgemm_peak_flops_per_s"].get<double>());
  for (const char* k : {"pp_tokens_per_s", "pp_fraction_of_sgemm", "sgemm_flops_per_s", "tg_tokens_per_s",
                        "tg_fraction_of_bandwidth"}) {
    const auto& v = j["samples"][k];
    ASSERT_EQ(v.size(), 2u) << k;
    EXPECT_TRUE(j[k] == v[0] || j[k] == v[1]) << k;
  }
  EXPECT_EQ(j["memory"][0]["samples"]["extra_over_read_time"].size(), 2u);
  fs::remove_all(dir);
}

// `bench --mem-types`: one memory row per storage type and size, decoded in the same run; the
// types' bytes as stored; --mem-type and --mem-types together are refused.
TEST(Cli, BenchComparesMemoryTypes) {
  const fs::path dir = temp_dir("bench_types");
  const std::string shape = write_tiny_shape(dir, 256).string();
  const CliRun r = run_stdout_only("bench --random " + shape +
                                   " --type f32 -p 8 -n 3 --memory-tokens 512 --memory-tokens 1024 --mem-types bfloat16,q8 -t 1 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["memory"].size(), 4u);
  const std::pair<int64_t, std::string> want[] = {{512, "bfloat16"}, {512, "q8"}, {1024, "bfloat16"}, {1024, "q8"}};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(j["memory"][i]["memory_tokens"].get<int64_t>(), want[i].first) << i;
    EXPECT_EQ(j["memory"][i]["mem_type"].get<std::string>(), want[i].second) << i;
    EXPECT_TRUE(std::isfinite(j["memory"][i]["extra_over_read_time"].get<double>())) << i;
  }
  const double bf16 = j["memory"][0]["memory_bytes"].get<double>(), q8 = j["memory"][1]["memory_bytes"].get<double>();
  EXPECT_GT(bf16, 0.0);
  EXPECT_LT(q8, bf16);
  EXPECT_DOUBLE_EQ(j["memory"][2]["memory_bytes"].get<double>(), 2 * bf16);
  const CliRun both = run("bench --random " + shape + " -p 8 -n 2 --memory-tokens 512 --mem-type q8 --mem-types bfloat16");
  EXPECT_NE(both.code, 0);
  EXPECT_NE(both.out.find("--mem-types"), std::string::npos) << both.out;
  const CliRun bad = run("bench --random " + shape + " -p 8 -n 2 --memory-tokens 512 --mem-types bfloat16,int4");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.out.find("int4"), std::string::npos) << bad.out;
  fs::remove_all(dir);
}
