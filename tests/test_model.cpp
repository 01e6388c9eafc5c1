// The whole model against the official implementation (../shared/reference/parity), plus the
// model loader's checks and the session's contract.
#include <gtest/gtest.h>
#include <omp.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "io/tensor_store.h"
#include "model/reference_check.h"
#include "model/session.h"
#include "util/error.h"

namespace fs = std::filesystem;
using namespace ll;

namespace {

std::vector<fs::path> parity_cases() {
  std::vector<fs::path> r;
  const fs::path dir = fs::path(LONGLLAMA_REFERENCE_DIR) / "parity";
  if (!fs::is_directory(dir)) return r;
  for (const auto& e : fs::directory_iterator(dir))
    if (fs::exists(e.path() / "golden.safetensors")) r.push_back(e.path());
  std::sort(r.begin(), r.end());
  return r;
}

double tolerance_for(const fs::path& case_dir) { return ll::reference_tolerance(case_dir.string()); }

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 97;
  c.hidden_size = 32;
  c.intermediate_size = 50;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.max_position_embeddings = 24;
  c.last_context_length = 10;
  c.mem_layers = {1};
  return c;
}

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("longllama_test_model_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

}  // namespace

TEST(Parity, EveryReferenceCase) {
  const auto cases = parity_cases();
  if (cases.empty()) GTEST_SKIP() << "no reference data at " << LONGLLAMA_REFERENCE_DIR << "/parity (needs ../shared)";
  for (const auto& dir : cases) {
    SCOPED_TRACE(dir.string());
    const ReferenceReport r = verify_reference(dir.string(), tolerance_for(dir));
    ASSERT_EQ(r.scenarios.size(), 4u);
    for (const auto& s : r.scenarios) {
      EXPECT_TRUE(s.passed) << s.name << ": max error " << s.max_abs_error << (s.problems.empty() ? "" : ", " + s.problems[0]);
      EXPECT_LE(s.max_abs_error, tolerance_for(dir)) << s.name;
    }
  }
}

// The bf16 rounding of memory is part of the official semantics: storing memory in float32
// instead must be far outside the tolerance, so the parity test really checks the rounding.
TEST(Parity, MemoryRoundingMatters) {
  const fs::path dir = fs::path(LONGLLAMA_REFERENCE_DIR) / "parity" / "small_mem";
  if (!fs::exists(dir / "golden.safetensors")) GTEST_SKIP() << "no reference case " << dir;
  Model m = Model::load(dir.string());
  ASSERT_EQ(m.config.mem_dtype, MemDType::BF16);
  m.config.mem_dtype = MemDType::F32;
  TensorStore g = read_safetensors((dir / "golden.safetensors").string());
  const TensorRef& p = g.get("prompt_ids");
  std::vector<int> ids(p.numel());
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int(static_cast<const int64_t*>(p.data)[i]);
  Session s(m);
  const std::vector<float> logits = s.forward(ids, true, LogitsWanted::All);
  const std::vector<float> ref = to_f32(g.get("prompt_logits"));
  double err = 0;
  for (size_t i = 0; i < ref.size(); ++i) err = std::max(err, double(std::fabs(logits[i] - ref[i])));
  EXPECT_GT(err, 1e-3);
}

TEST(Session, RejectsTokenIdsOutsideVocab) {
  const Model m = Model::random(tiny_config(), 1);
  Session s(m);
  try {
    s.forward({1, 2, 97}, true, LogitsWanted::Last);
    FAIL() << "expected ll::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("97"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("position 2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(s.forward({-1}, true, LogitsWanted::Last), Error);
  EXPECT_EQ(s.local_length(), 0);  // nothing was half-done
}

TEST(Session, ScoringWithoutCacheNeedsEmptyLocalCache) {
  const Model m = Model::random(tiny_config(), 1);
  Session s(m);
  s.forward({1, 2, 3}, true, LogitsWanted::None);
  EXPECT_THROW(s.forward({4}, false, LogitsWanted::Last), Error);
}

TEST(Session, LastLogitsEqualLastRowOfAll) {
  const Model m = Model::random(tiny_config(), 2);
  std::mt19937 rng(3);
  std::vector<int> ids(100);
  for (int& t : ids) t = int(rng() % 97);
  Session a(m), b(m);
  const auto all = a.forward(ids, true, LogitsWanted::All);
  const auto last = b.forward(ids, true, LogitsWanted::Last);
  ASSERT_EQ(last.size(), 97u);
  // One row goes through sgemv, many through sgemm: equal up to summation order.
  for (int j = 0; j < 97; ++j) EXPECT_NEAR(last[j], all[all.size() - 97 + j], 1e-5);
  EXPECT_EQ(a.memory_length(1), b.memory_length(1));
}

// Cache bookkeeping of the official chunking rule, for a long input: prefix windows of W go to
// memory, the last last_context_length tokens stay local; decoding flushes the whole local cache
// into memory when it would exceed W.
TEST(Session, ChunkingAndFlushBookkeeping) {
  const ModelConfig c = tiny_config();  // W = 24, lcl = 10, memory layer 1
  const Model m = Model::random(c, 4);
  Session s(m);
  std::vector<int> ids(1000, 5);
  s.forward(ids, true, LogitsWanted::None);
  EXPECT_EQ(s.local_length(), 10);
  EXPECT_EQ(s.memory_length(1), 990);
  EXPECT_EQ(s.memory_length(0), 0);
  for (int i = 0; i < 14; ++i) s.forward({7}, true, LogitsWanted::Last);
  EXPECT_EQ(s.local_length(), 24);  // full, not yet flushed
  EXPECT_EQ(s.memory_length(1), 990);
  s.forward({7}, true, LogitsWanted::Last);  // 24 + 1 > 24: everything cached moves to memory
  EXPECT_EQ(s.local_length(), 1);
  EXPECT_EQ(s.memory_length(1), 1014);
  // A copy is independent: memory chunks are shared copy-on-write.
  Session t = s;
  t.forward(std::vector<int>(50, 3), true, LogitsWanted::None);
  EXPECT_EQ(s.memory_length(1), 1014);
  EXPECT_GT(t.memory_length(1), 1014);
}

// A copied session continues exactly like the original.
TEST(Session, CopyContinuesIdentically) {
  const Model m = Model::random(tiny_config(), 5);
  Session s(m);
  s.forward(std::vector<int>(300, 9), true, LogitsWanted::None);
  Session t = s;
  for (int i = 0; i < 30; ++i) {
    const auto a = s.forward({i % 97}, true, LogitsWanted::Last);
    const auto b = t.forward({i % 97}, true, LogitsWanted::Last);
    ASSERT_EQ(a, b) << "step " << i;
  }
}

TEST(ModelLoad, SaveLoadRoundTrip) {
  const fs::path dir = temp_dir("roundtrip");
  const Model m = Model::random(tiny_config(), 6);
  m.save(dir.string(), /*bf16=*/false);
  const Model r = Model::load(dir.string());
  EXPECT_EQ(r.config.to_json(), m.config.to_json());
  EXPECT_EQ(r.embed, m.embed);
  EXPECT_EQ(r.layers[2].w_down, m.layers[2].w_down);
  Session a(m), b(r);
  EXPECT_EQ(a.forward({1, 2, 3}, true, LogitsWanted::All), b.forward({1, 2, 3}, true, LogitsWanted::All));
  fs::remove_all(dir);
}

TEST(ModelLoad, ShapeMismatchNamesTensorAndFile) {
  const fs::path dir = temp_dir("shape");
  Model::random(tiny_config(), 7).save(dir.string(), true);
  ModelConfig wrong = tiny_config();
  wrong.intermediate_size = 51;
  write_file_atomic((dir / "config.json").string(), wrong.to_json());
  try {
    Model::load(dir.string());
    FAIL() << "expected ll::Error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("mlp.gate_proj.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find("51"), std::string::npos) << msg;
  }
  fs::remove_all(dir);
}

TEST(ModelLoad, MissingAndUnexpectedTensors) {
  const fs::path dir = temp_dir("names");
  Model::random(tiny_config(), 8).save(dir.string(), true);
  ModelConfig fewer = tiny_config();
  fewer.num_hidden_layers = 2;  // layer 2's tensors are now unexpected
  fewer.mem_layers = {1};
  write_file_atomic((dir / "config.json").string(), fewer.to_json());
  try {
    Model::load(dir.string());
    FAIL() << "expected ll::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.2."), std::string::npos) << e.what();
  }
  ModelConfig more = tiny_config();
  more.num_hidden_layers = 4;
  write_file_atomic((dir / "config.json").string(), more.to_json());
  try {
    Model::load(dir.string());
    FAIL() << "expected ll::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.3."), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("missing"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

TEST(Config, DefaultsAndErrors) {
  const ModelConfig c = ModelConfig::from_json_text(R"({"hidden_size": 64, "num_attention_heads": 4})", "x.json");
  EXPECT_EQ(c.last_context_length, 1024);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.0f);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_EQ(c.mem_dtype, MemDType::BF16);
  EXPECT_TRUE(c.mem_layers.empty());
  auto expect_error = [](const std::string& text, const std::string& needle) {
    try {
      ModelConfig::from_json_text(text, "cfg.json");
      ADD_FAILURE() << "expected ll::Error for " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("cfg.json"), std::string::npos) << e.what();
    }
  };
  expect_error("{not json", "JSON");
  expect_error(R"({"mem_layers": [40]})", "mem_layers");
  expect_error(R"({"mem_dtype": "int4"})", "mem_dtype");
  expect_error(R"({"hidden_size": 100, "num_attention_heads": 3})", "divisible");
  expect_error(R"({"rope_scaling": {"type": "linear"}})", "rope_scaling");
  expect_error(R"({"hidden_size": "big"})", "hidden_size");
  // The memory-layer head count (this engine's extension): default, round trip, errors.
  EXPECT_EQ(c.mem_heads(), 4);
  EXPECT_EQ(c.to_json().find("mem_num_attention_heads"), std::string::npos);  // official configs stay as they are
  const ModelConfig m = ModelConfig::from_json_text(
      R"({"hidden_size": 64, "num_attention_heads": 4, "mem_layers": [1], "mem_positionals": false,
          "num_hidden_layers": 3, "mem_num_attention_heads": 1})",
      "m.json");
  EXPECT_EQ(m.heads_in(0), 4);
  EXPECT_EQ(m.heads_in(1), 1);
  EXPECT_EQ(m.head_dim_in(1), 64);
  EXPECT_EQ(m.head_dim_in(2), 16);
  EXPECT_EQ(ModelConfig::from_json_text(m.to_json(), "again.json").mem_heads(), 1);
  expect_error(R"({"hidden_size": 64, "num_attention_heads": 4, "mem_num_attention_heads": 3, "mem_positionals": false})",
               "mem_num_attention_heads");
  expect_error(R"({"hidden_size": 64, "num_attention_heads": 4, "mem_num_attention_heads": 2})", "mem_positionals");
  expect_error(R"({"mem_num_attention_heads": -1})", "mem_num_attention_heads");
}

// Ingesting without logits skips what cannot matter (layers above the last memory layer, and its
// attention, in windows that go to memory): the memory and everything after must be identical
// to the full computation. Without memory layers such windows are skipped entirely.
TEST(Session, IngestWithoutLogitsIsExact) {
  for (std::vector<int> mem_layers :
       {std::vector<int>{1}, std::vector<int>{0, 2}, std::vector<int>{2}, std::vector<int>{}}) {
    ModelConfig c = tiny_config();
    c.mem_layers = mem_layers;
    const Model m = Model::random(c, 11);
    std::mt19937 rng(12);
    std::vector<int> doc(700);
    for (int& t : doc) t = int(rng() % 97);
    Session fast(m), full(m);
    fast.forward(doc, true, LogitsWanted::None);
    full.forward(doc, true, LogitsWanted::All);
    for (int l : mem_layers) EXPECT_EQ(fast.memory_length(l), full.memory_length(l));
    // Ingestion without a cache (all of doc to memory, as `eval` builds memories), then decoding.
    Session fast_nc(m), full_nc(m);
    fast_nc.forward(doc, false, LogitsWanted::None);
    full_nc.forward(doc, false, LogitsWanted::All);
    for (int l : mem_layers) EXPECT_EQ(fast_nc.memory_length(l), full_nc.memory_length(l));
    for (int i = 0; i < 5; ++i) {
      const auto a = fast_nc.forward({i % 97}, true, LogitsWanted::Last);
      const auto b = full_nc.forward({i % 97}, true, LogitsWanted::Last);
      ASSERT_EQ(a, b) << "no-cache ingestion, step " << i;
    }
    for (int i = 0; i < 40; ++i) {  // decoding crosses a flush, so memory and local cache are both used
      const auto a = fast.forward({i % 97}, true, LogitsWanted::Last);
      const auto b = full.forward({i % 97}, true, LogitsWanted::Last);
      ASSERT_EQ(a, b) << "step " << i;
    }
  }
}

// Top-k memory attention with k at least the memory size is dense attention.
TEST(Session, TopKWithLargeKEqualsDense) {
  const Model m = Model::random(tiny_config(), 13);
  std::mt19937 rng(14);
  std::vector<int> doc(300);
  for (int& t : doc) t = int(rng() % 97);
  Session dense(m), topk(m), small(m);
  topk.set_memory_top_k(100000);
  small.set_memory_top_k(2);
  const auto a = dense.forward(doc, true, LogitsWanted::All);
  const auto b = topk.forward(doc, true, LogitsWanted::All);
  const auto c = small.forward(doc, true, LogitsWanted::All);
  ASSERT_EQ(a.size(), b.size());
  double max_ab = 0, max_ac = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_ab = std::max(max_ab, double(std::fabs(a[i] - b[i])));
    max_ac = std::max(max_ac, double(std::fabs(a[i] - c[i])));
  }
  EXPECT_LT(max_ab, 1e-5);
  EXPECT_GT(max_ac, 1e-4);  // k = 2 really drops memory keys
}

// Decoding over a memory of several chunks (the last one partial) splits the heads across the
// threads: the logits must not depend on the thread count, and must equal the per-head path that
// top-k with k above the memory size takes.
TEST(Session, DecodeOverMemoryIsThreadIndependentAndMatchesTopKPath) {
  const Model m = Model::random(tiny_config(), 17);
  const int saved = omp_get_max_threads();
  std::vector<std::vector<float>> logits;
  for (int threads : {1, 2, 1}) {
    omp_set_num_threads(threads);
    Session s(m);
    s.fill_memory_random(2500, 5);  // 1024 + 1024 + 452
    logits.push_back(s.forward({3, 9, 27}, true, LogitsWanted::Last));  // 3 queries: the decode loop
    logits.push_back(s.forward({81}, true, LogitsWanted::Last));         // 1 query, local cache of 3
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(logits[0], logits[2]);
  EXPECT_EQ(logits[1], logits[3]);
  EXPECT_EQ(logits[0], logits[4]);
  Session t(m);
  t.fill_memory_random(2500, 5);
  t.set_memory_top_k(100000);
  const auto a = t.forward({3, 9, 27}, true, LogitsWanted::Last);
  const auto b = t.forward({81}, true, LogitsWanted::Last);
  double max_diff = 0, max_abs = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_diff = std::max({max_diff, double(std::fabs(a[i] - logits[0][i])), double(std::fabs(b[i] - logits[1][i]))});
    max_abs = std::max(max_abs, double(std::fabs(a[i])));
  }
  EXPECT_LT(max_diff, 1e-5);
  EXPECT_GT(max_abs, 1e-3);
  Session none(m);  // the memory really changes the logits
  const auto c = none.forward({3, 9, 27}, true, LogitsWanted::Last);
  double mem_effect = 0;
  for (size_t i = 0; i < c.size(); ++i) mem_effect = std::max(mem_effect, double(std::fabs(c[i] - a[i])));
  EXPECT_GT(mem_effect, 1e-3);
}

// With last_context_length 0 every token goes through memory windows; the last logits must still
// be those of the last token (the same as asking for all of them).
TEST(Session, LastLogitsWithZeroLastContextLength) {
  ModelConfig c = tiny_config();
  c.last_context_length = 0;
  const Model m = Model::random(c, 15);
  std::vector<int> doc(100);
  for (size_t i = 0; i < doc.size(); ++i) doc[i] = int(i * 7 % 97);
  Session a(m), b(m);
  const auto last = a.forward(doc, false, LogitsWanted::Last);
  const auto all = b.forward(doc, false, LogitsWanted::All);
  ASSERT_EQ(last.size(), 97u);
  double max_diff = 0, max_abs = 0;
  for (int j = 0; j < 97; ++j) {
    max_diff = std::max(max_diff, double(std::fabs(last[j] - all[all.size() - 97 + j])));
    max_abs = std::max(max_abs, double(std::fabs(last[j])));
  }
  EXPECT_LT(max_diff, 1e-5);
  EXPECT_GT(max_abs, 0.0);
  EXPECT_EQ(a.memory_length(1), 100);
}

// One random tiny model twice: with float32 memory and with Q8 memory; and a document of n tokens.
struct F32AndQ8Models {
  Model m32, m8;
  std::vector<int> doc;
};
F32AndQ8Models f32_and_q8_models(int n, int stride) {
  ModelConfig c = tiny_config();
  c.mem_dtype = MemDType::F32;
  const Model m = Model::random(c, 16);
  F32AndQ8Models r{m, m, std::vector<int>(size_t(n))};
  r.m8.config.mem_dtype = MemDType::Q8;
  for (size_t i = 0; i < r.doc.size(); ++i) r.doc[i] = int(i * size_t(stride) % 97);
  return r;
}

// A session's memory storage type can differ from its weights' config (bench --mem-types): the
// same logits, bit for bit, and the same bytes as a config that says so.
TEST(Session, SetMemoryTypeEqualsConfigMemDtype) {
  const auto [m32, m8, doc] = f32_and_q8_models(300, 7);
  Session a(m8), b(m32);
  EXPECT_EQ(b.memory_type(), MemDType::F32);
  b.set_memory_type(MemDType::Q8);
  EXPECT_EQ(b.memory_type(), MemDType::Q8);
  EXPECT_EQ(a.forward(doc, true, LogitsWanted::All), b.forward(doc, true, LogitsWanted::All));
  EXPECT_GT(b.memory_bytes(), 0u);
  EXPECT_EQ(a.memory_bytes(), b.memory_bytes());
  EXPECT_EQ(a.memory_bytes_for(1000), b.memory_bytes_for(1000));
  b.set_memory_type(MemDType::BF16);  // clears the session
  EXPECT_EQ(b.memory_bytes(), 0u);
  EXPECT_EQ(b.local_length(), 0);
}

// Q8 memory costs little next to bf16 rounding on a model with real memory use, and top-k works on it.
TEST(Session, Q8MemoryCloseToFloat32Memory) {
  const auto [m32, m8, doc] = f32_and_q8_models(400, 13);
  Session a(m32), b(m8), t(m8);
  t.set_memory_top_k(1 << 20);
  const auto la = a.forward(doc, true, LogitsWanted::All);
  const auto lb = b.forward(doc, true, LogitsWanted::All);
  const auto lt = t.forward(doc, true, LogitsWanted::All);
  double d8 = 0, dt = 0;
  for (size_t i = 0; i < la.size(); ++i) {
    d8 = std::max(d8, double(std::fabs(la[i] - lb[i])));
    dt = std::max(dt, double(std::fabs(lb[i] - lt[i])));
  }
  EXPECT_GT(d8, 0.0);    // the memory really is quantized
  EXPECT_LT(d8, 5e-3);   // random weights of std 0.02: logits move little
  EXPECT_LT(dt, 1e-5);   // top-k over everything = dense, on Q8 memory too
  EXPECT_EQ(b.memory_bytes(), size_t(b.memory_length(1)) * 4 * (8 + 4) * 2);
}
