// Quantized weights end to end: Weights::from_model / Weights::load in every weight type give
// logits close to float32 (measured bounds below), and the GGUF round trip (convert_to_gguf, then
// Weights::load of the file, mmapped or copied) reproduces Weights::load(dir, type) exactly.
#include <gtest/gtest.h>

#include "test_support.h"
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "model/gguf_model.h"
#include "model/model.h"
#include "model/session.h"
#include "model/weights.h"
#include "ops/quant.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace fs = std::filesystem;
using namespace ll;

namespace {

const DType kTypes[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0};

using ll::testing::TempDir;

// hidden 64, 2 layers, layer 1 with memory, W = 32, last_context_length = 12: a 200-token prompt
// sends 188 tokens through windows into memory.
ModelConfig quant_config() {
  ModelConfig c;
  c.vocab_size = 256;
  c.hidden_size = 64;
  c.intermediate_size = 160;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.max_position_embeddings = 32;
  c.last_context_length = 12;
  c.mem_layers = {1};
  return c;
}

// Model::random has std 0.02: logits of such a model are nearly uniform (std ~0.15) and attention
// is nearly flat, so quantization would barely show. Scaling every matrix by 4 (std 0.08) gives
// peaked next-token distributions (KL between two such models ~0.4) and content-dependent
// attention, while staying far from chaotic (at scale 8, q4_0 is already within 10x of a random
// model).
Model sharpened_model(const ModelConfig& c, uint64_t seed, float f = 4.0f) {
  Model m = Model::random(c, seed);
  auto scale = [f](std::vector<float>& v) {
    for (float& x : v) x *= f;
  };
  scale(m.embed);
  scale(m.lm_head);
  for (auto& L : m.layers)
    for (auto* v : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) scale(*v);
  return m;
}

std::vector<int> random_tokens(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> ids(n);
  for (int& t : ids) t = int(rng() % uint64_t(vocab));
  return ids;
}

// Logits of a 200-token prompt (all rows: windows, memory, the last chunk) followed by 10 decoded
// tokens (one row each: the matvec path, quantized activations for Q types): [210][vocab].
std::vector<float> run_logits(Session& s, int vocab) {
  const auto prompt = random_tokens(200, vocab, 11);
  auto all = s.forward(prompt, true, LogitsWanted::All);
  EXPECT_EQ(all.size(), size_t(200) * vocab);
  EXPECT_EQ(s.memory_length(1), 188) << "memory must be exercised";
  for (int t : random_tokens(10, vocab, 12)) {
    const auto l = s.forward({t}, true, LogitsWanted::Last);
    all.insert(all.end(), l.begin(), l.end());
  }
  return all;
}
std::vector<float> run_logits(const Weights& w) {
  Session s(w);
  return run_logits(s, w.config.vocab_size);
}

struct Diff {
  double max_abs = 0;   // max |Δlogit|
  double mean_kl = 0;   // mean over rows of KL(softmax(a) || softmax(b))
  double max_kl = 0;
};

Diff compare_logits(const std::vector<float>& a, const std::vector<float>& b, int vocab) {
  Diff d;
  EXPECT_EQ(a.size(), b.size());
  const size_t rows = a.size() / size_t(vocab);
  for (size_t r = 0; r < rows; ++r) {
    const float* x = &a[r * vocab];
    const float* y = &b[r * vocab];
    double mx = -HUGE_VAL, my = -HUGE_VAL;
    for (int j = 0; j < vocab; ++j) {
      EXPECT_TRUE(std::isfinite(y[j]));
      mx = std::max(mx, double(x[j]));
      my = std::max(my, double(y[j]));
      d.max_abs = std::max(d.max_abs, std::fabs(double(x[j]) - y[j]));
    }
    double sx = 0, sy = 0;
    for (int j = 0; j < vocab; ++j) {
      sx += std::exp(x[j] - mx);
      sy += std::exp(y[j] - my);
    }
    const double lzx = mx + std::log(sx), lzy = my + std::log(sy);
    double kl = 0;
    for (int j = 0; j < vocab; ++j) {
      const double lp = x[j] - lzx, lq = y[j] - lzy;
      kl += std::exp(lp) * (lp - lq);
    }
    d.mean_kl += kl / double(rows);
    d.max_kl = std::max(d.max_kl, kl);
  }
  return d;
}

std::vector<const WeightMatrix*> matrices(const Weights& w) {
  std::vector<const WeightMatrix*> r = {&w.embed, &w.lm_head};
  for (const auto& L : w.layers)
    for (const WeightMatrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) r.push_back(m);
  return r;
}

std::string type_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::Q8_0: return "q8_0";
    case DType::Q4_0: return "q4_0";
    default: return dtype_name(t);
  }
}

// Bounds for the sharpened random model, measured on 200 prompt + 10 decoded tokens and
// asserted with ~3x margin (measured: from_model(m, type) | load(bf16 dir, type), both against
// float32 of the same weights):
//   type   max |Δlogit|          mean KL(f32 || type)     bound: max |Δ|, mean KL
//   f16    0.0030  | 2.2e-6       1.3e-7 | 2.9e-14         0.01, 5e-7
//   bf16   0.0225  | 8.6e-7 (*)   7.5e-6 | 1.2e-15         0.07, 2.5e-5
//   q8_0   0.0757  | 0.0872       7.8e-5 | 8.4e-5          0.25, 2.5e-4
//   q4_0   1.05    | 1.09         0.019  | 0.017           3.0,  0.06
//   a different random model (seed 2 vs 1): max |Δ| 3.82, mean KL 0.40
// (*) bf16 of a bf16 checkpoint holds the same values: prompt rows are bit-identical, decoded
// rows differ by summation order only.
struct Bound {
  double max_abs, mean_kl;
};
Bound bound_for(DType t) {
  switch (t) {
    case DType::F16: return {0.01, 5e-7};
    case DType::BF16: return {0.07, 2.5e-5};
    case DType::Q8_0: return {0.25, 2.5e-4};
    case DType::Q4_0: return {3.0, 0.06};
    default: return {0, 0};
  }
}

void check_ordering(const std::map<DType, Diff>& d, double other_kl) {
  // bf16/f16 << q8_0 << q4_0 << a different model
  EXPECT_LT(d.at(DType::F16).mean_kl * 10, d.at(DType::Q8_0).mean_kl);
  EXPECT_LT(d.at(DType::BF16).mean_kl * 3, d.at(DType::Q8_0).mean_kl);
  EXPECT_LT(d.at(DType::Q8_0).mean_kl * 10, d.at(DType::Q4_0).mean_kl);
  EXPECT_LT(d.at(DType::Q4_0).mean_kl * 10, other_kl);
}

TEST(WeightsQuant, FromModelEveryTypeCloseToFloat32) {
  const ModelConfig c = quant_config();
  const Model m = sharpened_model(c, 1);
  const Weights w32 = Weights::from_model(m, DType::F32);
  const auto ref = run_logits(w32);
  {
    Session s(m);  // the float32 parameters, borrowed: exactly the same computation
    EXPECT_EQ(run_logits(s, c.vocab_size), ref);
  }
  std::map<DType, Diff> diffs;
  for (DType t : kTypes) {
    if (t == DType::F32) continue;
    const Weights w = Weights::from_model(m, t);
    for (const WeightMatrix* mat : matrices(w)) EXPECT_EQ(mat->ref.type, t);
    EXPECT_EQ(w.main_type(), t);
    const Diff d = compare_logits(ref, run_logits(w), c.vocab_size);
    std::printf("from_model %-5s max|dlogit| %.3g  mean KL %.3g  max KL %.3g\n", type_name(t).c_str(), d.max_abs,
                d.mean_kl, d.max_kl);
    RecordProperty("from_model_" + type_name(t) + "_max_abs", std::to_string(d.max_abs));
    RecordProperty("from_model_" + type_name(t) + "_mean_kl", std::to_string(d.mean_kl));
    EXPECT_LT(d.max_abs, bound_for(t).max_abs) << type_name(t);
    EXPECT_LT(d.mean_kl, bound_for(t).mean_kl) << type_name(t);
    EXPECT_GT(d.max_abs, 0.0) << type_name(t) << ": quantization must change something";
    diffs[t] = d;
  }
  const Model other = sharpened_model(c, 2);
  const Diff o = compare_logits(ref, run_logits(Weights::from_model(other, DType::F32)), c.vocab_size);
  std::printf("another random model: max|dlogit| %.3g  mean KL %.3g\n", o.max_abs, o.mean_kl);
  check_ordering(diffs, o.mean_kl);
}

TEST(WeightsQuant, LoadDirectoryEveryTypeCloseToFloat32) {
  const ModelConfig c = quant_config();
  const TempDir dir("load");
  sharpened_model(c, 3).save(dir.path.string(), /*bf16=*/true);
  const Weights w32 = Weights::load(dir.path.string(), DType::F32);
  const auto ref = run_logits(w32);
  EXPECT_EQ(run_logits(Weights::load(dir.path.string())), ref) << "the default type of a directory is float32";
  std::map<DType, Diff> diffs;
  for (DType t : kTypes) {
    if (t == DType::F32) continue;
    const Weights w = Weights::load(dir.path.string(), t);
    for (const WeightMatrix* mat : matrices(w)) EXPECT_EQ(mat->ref.type, t);
    const auto got = run_logits(w);
    const Diff d = compare_logits(ref, got, c.vocab_size);
    std::printf("load(dir) %-5s max|dlogit| %.3g  mean KL %.3g  max KL %.3g\n", type_name(t).c_str(), d.max_abs,
                d.mean_kl, d.max_kl);
    EXPECT_LT(d.max_abs, bound_for(t).max_abs) << type_name(t);
    EXPECT_LT(d.mean_kl, bound_for(t).mean_kl) << type_name(t);
    diffs[t] = d;
    if (t == DType::BF16) {
      // The checkpoint is bf16: bf16 weights are the same values as float32 ones. The prompt rows
      // (matmul: dequantized panel + the same sgemm) are bit-identical; decoding uses the bf16 dot
      // product (another summation order), so only closeness there.
      const size_t prompt = size_t(200) * c.vocab_size;
      EXPECT_TRUE(std::equal(ref.begin(), ref.begin() + prompt, got.begin())) << "bf16 of a bf16 checkpoint is lossless";
      EXPECT_LT(d.max_abs, 1e-4);
    }
  }
  // q8_0 / q4_0 orderings hold for load(dir) too (bf16 is exact here, so only q8 << q4).
  EXPECT_LT(diffs.at(DType::Q8_0).mean_kl * 10, diffs.at(DType::Q4_0).mean_kl);
  EXPECT_LT(diffs.at(DType::F16).mean_kl * 10, diffs.at(DType::Q8_0).mean_kl);
}

// ---------------------------------------------------------------------------------------------
// GGUF round trip

std::string tokenizer_file() {
  const fs::path p = fs::path(LONGLLAMA_TOKENIZER_DIR) / "openllama_v2.model";
  return fs::exists(p) ? p.string() : "";
}

TEST(GGUFRoundTrip, EveryTypeMmapAndRamMatchLoadDir) {
  const ModelConfig c = quant_config();
  const TempDir dir("gguf");
  const fs::path model = dir.path / "model";
  sharpened_model(c, 4).save(model.string(), true);
  const std::string config_json = ModelConfig::from_file((model / "config.json").string()).to_json();
  for (DType t : kTypes) {
    const std::string file = dir.file("m-" + type_name(t) + ".gguf");
    convert_to_gguf(model.string(), file, t);
    ASSERT_TRUE(fs::is_regular_file(file));
    const Weights from_dir = Weights::load(model.string(), t, false, /*repack=*/false);
    const auto want = run_logits(Weights::load(model.string(), t));
    for (bool mmap : {true, false}) {
      const std::string what = type_name(t) + (mmap ? " mmap" : " ram");
      const Weights w = Weights::load(file, std::nullopt, mmap, /*repack=*/false);  // the file's layout
      EXPECT_EQ(w.config.to_json(), config_json) << what;
      EXPECT_EQ(w.storage, mmap ? "mmap" : "ram") << what;
      EXPECT_EQ(w.main_type(), t) << what;
      const auto mw = matrices(w), md = matrices(from_dir);
      for (size_t i = 0; i < mw.size(); ++i) {
        EXPECT_EQ(mw[i]->ref.type, t) << what << " matrix " << i;
        EXPECT_EQ(mw[i]->ref.rows, md[i]->ref.rows) << what;
        EXPECT_EQ(mw[i]->ref.cols, md[i]->ref.cols) << what;
        const size_t bytes = row_bytes(t, mw[i]->ref.cols) * size_t(mw[i]->ref.rows);
        EXPECT_EQ(0, std::memcmp(mw[i]->ref.data, md[i]->ref.data, bytes)) << what << ": same quantization code";
      }
      for (size_t l = 0; l < w.layers.size(); ++l) {
        EXPECT_EQ(w.layers[l].attn_norm, from_dir.layers[l].attn_norm) << what;
        EXPECT_EQ(w.layers[l].ffn_norm, from_dir.layers[l].ffn_norm) << what;
      }
      EXPECT_EQ(w.final_norm, from_dir.final_norm) << what;
      EXPECT_TRUE(w.tokenizer_proto.empty()) << what << ": no tokenizer.model in the directory";
      const Weights repacked = Weights::load(file, std::nullopt, mmap);
      EXPECT_EQ(run_logits(repacked), want) << what << ": logits must be bit-identical to Weights::load(dir, type)";
    }
  }
}

// A stored type converts again at load: f32 file -> q8_0 is the same as dir -> q8_0 (the bf16
// checkpoint upcasts exactly), and a q4_0 file dequantizes to float32 exactly.
TEST(GGUFRoundTrip, LoadConvertsStoredType) {
  const ModelConfig c = quant_config();
  const TempDir dir("conv");
  const fs::path model = dir.path / "model";
  sharpened_model(c, 5).save(model.string(), true);
  const std::string f32 = dir.file("f32.gguf"), q4 = dir.file("q4.gguf");
  convert_to_gguf(model.string(), f32, DType::F32);
  convert_to_gguf(model.string(), q4, DType::Q4_0);
  for (bool mmap : {true, false}) {
    const Weights a = Weights::load(f32, DType::Q8_0, mmap);
    EXPECT_EQ(a.main_type(), DType::Q8_0);
    EXPECT_EQ(run_logits(a), run_logits(Weights::load(model.string(), DType::Q8_0)));
    const Weights b = Weights::load(q4, DType::F32, mmap);
    const Weights q = Weights::load(q4, std::nullopt, mmap, /*repack=*/false);
    const auto mb = matrices(b), mq = matrices(q);
    for (size_t i = 0; i < mb.size(); ++i) {
      ASSERT_EQ(mb[i]->ref.type, DType::F32);
      std::vector<float> row(size_t(mq[i]->ref.cols));
      for (int64_t r = 0; r < mq[i]->ref.rows; r += 7) {
        dequantize_row(DType::Q4_0, mq[i]->ref.row(r), mq[i]->ref.cols, row.data());
        ASSERT_EQ(0, std::memcmp(row.data(), mb[i]->ref.row(r), row.size() * 4));
      }
    }
  }
}

// A memory layer with its own head count (mem_num_attention_heads) keeps it through a .gguf
// (longllama.mem_attention.head_count) and computes the same logits as the directory.
TEST(GGUFRoundTrip, MemoryLayerHeadCount) {
  ModelConfig c = quant_config();
  c.mem_positionals = false;
  c.mem_num_attention_heads = 1;
  const TempDir dir("memheads");
  const fs::path model = dir.path / "model";
  sharpened_model(c, 6).save(model.string(), true);
  const std::string file = dir.file("m.gguf");
  convert_to_gguf(model.string(), file, DType::F32);
  const Weights w = Weights::load(file, std::nullopt, true);
  EXPECT_EQ(w.config.mem_heads(), 1);
  EXPECT_EQ(w.config.to_json(), c.to_json());
  EXPECT_EQ(run_logits(w), run_logits(Weights::load(model.string(), DType::F32)));
  ModelConfig four = c;  // the same weights read as four memory heads compute something else
  four.mem_num_attention_heads = 0;
  const fs::path other = dir.path / "other";
  Model m = Model::load(model.string());
  m.config = four;
  m.save(other.string(), true);
  EXPECT_NE(run_logits(Weights::load(other.string(), DType::F32)), run_logits(w));
}

TEST(GGUFRoundTrip, EmbedsTokenizer) {
  const std::string tok_path = tokenizer_file();
  if (tok_path.empty()) GTEST_SKIP() << "no tokenizer at " << LONGLLAMA_TOKENIZER_DIR "/openllama_v2.model";
  const ModelConfig c = quant_config();
  const TempDir dir("tok");
  const fs::path model = dir.path / "model";
  sharpened_model(c, 6).save(model.string(), true);
  fs::copy_file(tok_path, model / "tokenizer.model");
  const std::string file = dir.file("q8.gguf");
  convert_to_gguf(model.string(), file, DType::Q8_0);
  const Tokenizer ref(tok_path);
  for (bool mmap : {true, false}) {
    const Weights w = Weights::load(file, std::nullopt, mmap);
    ASSERT_FALSE(w.tokenizer_proto.empty());
    EXPECT_EQ(w.tokenizer_proto, ref.serialized());
    const Tokenizer t = Tokenizer::from_bytes(w.tokenizer_proto, file);
    EXPECT_EQ(t.vocab_size(), ref.vocab_size());
    EXPECT_EQ(t.encode("Hello world"), ref.encode("Hello world"));
    EXPECT_FALSE(t.encode("Hello world").empty());
    EXPECT_EQ(t.decode(t.encode("Hello world")), "Hello world");
  }
  // and the model itself is unaffected by the embedded tokenizer
  EXPECT_EQ(run_logits(Weights::load(file)), run_logits(Weights::load(model.string(), DType::Q8_0)));
}

// hidden 48 is not a multiple of 32: every matrix with 48 columns falls back to F16 in a q8_0
// file; w_down (64 columns) is still Q8_0. Tied embeddings share one matrix.
TEST(GGUFRoundTrip, NonMultipleOf32FallsBackToF16) {
  ModelConfig c = quant_config();
  c.hidden_size = 48;
  c.intermediate_size = 64;
  c.tie_word_embeddings = true;
  const TempDir dir("odd");
  const fs::path model = dir.path / "model";
  sharpened_model(c, 7).save(model.string(), true);
  const std::string file = dir.file("q8.gguf");
  convert_to_gguf(model.string(), file, DType::Q8_0);
  const auto ref = run_logits(Weights::load(model.string(), DType::F32));
  for (bool mmap : {true, false}) {
    const Weights w = Weights::load(file, std::nullopt, mmap);
    EXPECT_EQ(w.config.to_json(), c.to_json());
    EXPECT_EQ(w.embed.ref.type, DType::F16);
    EXPECT_EQ(w.lm_head.ref.data, w.embed.ref.data) << "tied";
    for (const auto& L : w.layers) {
      for (const WeightMatrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up}) EXPECT_EQ(m->ref.type, DType::F16);
      EXPECT_EQ(L.w_down.ref.type, DType::Q8_0);
    }
    const Diff d = compare_logits(ref, run_logits(w), c.vocab_size);
    std::printf("hidden 48 q8_0/f16 gguf: max|dlogit| %.3g  mean KL %.3g\n", d.max_abs, d.mean_kl);
    EXPECT_LT(d.mean_kl, bound_for(DType::Q8_0).mean_kl);
    EXPECT_LT(d.max_abs, bound_for(DType::Q8_0).max_abs);
  }
  // Converting at load time follows the same rule as convert: 48-column matrices stay F16.
  for (const std::string& src : {model.string(), std::string(file)}) {
    const Weights w = Weights::load(src, DType::Q8_0);
    EXPECT_EQ(w.embed.ref.type, DType::F16) << src;
    EXPECT_EQ(w.layers[0].wq.ref.type, DType::F16) << src;
    EXPECT_EQ(w.layers[0].w_down.ref.type, DType::Q8_0) << src;
  }
}

TEST(GGUFRoundTrip, FailedConversionLeavesNoFile) {
  const TempDir dir("fail");
  const fs::path out_dir = dir.path / "out";
  fs::create_directories(out_dir);
  const std::string missing = (dir.path / "no_such_model").string();
  const std::string out = (out_dir / "x.gguf").string();
  try {
    convert_to_gguf(missing, out, DType::Q8_0);
    ADD_FAILURE() << "expected ll::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(fs::is_empty(out_dir)) << "no temporary file left behind";

  // a directory without config.json, and an invalid target type
  const fs::path empty = dir.path / "empty_model";
  fs::create_directories(empty);
  EXPECT_THROW(convert_to_gguf(empty.string(), out, DType::Q4_0), Error);
  const fs::path model = dir.path / "model";
  Model::random(quant_config(), 8).save(model.string(), true);
  EXPECT_THROW(convert_to_gguf(model.string(), out, DType::I8), Error);
  EXPECT_TRUE(fs::is_empty(out_dir));

  // a checkpoint whose tensors do not match its config fails before anything is written, and an
  // existing output file is left untouched
  { std::ofstream(out) << "old"; }
  ModelConfig wrong = quant_config();
  wrong.intermediate_size = 96;
  { std::ofstream(model / "config.json") << wrong.to_json(); }
  EXPECT_THROW(convert_to_gguf(model.string(), out, DType::Q8_0), Error);
  std::stringstream content;
  content << std::ifstream(out).rdbuf();
  EXPECT_EQ(content.str(), "old");
  EXPECT_EQ(std::distance(fs::directory_iterator(out_dir), fs::directory_iterator()), 1);
}

}  // namespace
