// Checkpoint loading: real reference checkpoints, round trips, and hostile inputs that must end
// in ll::Error (never a crash: run these under AddressSanitizer).
#include <gtest/gtest.h>

#include "test_support.h"
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "io/tensor_store.h"
#include "util/half.h"

namespace fs = std::filesystem;
using ll::DType;
using namespace std::string_literals;

namespace {

const fs::path kParity = fs::path(LONGLLAMA_REFERENCE_DIR) / "parity";
const char* kCases[] = {"small_mem", "plain_llama", "sharded_f32mem", "odd_heads_bin", "sharded_bin_code"};

#define REQUIRE_REFERENCE()                                                                  \
  do {                                                                                       \
    if (!fs::is_directory(kParity))                                                          \
      GTEST_SKIP() << "reference data not found at " << kParity << " (../shared/reference)"; \
  } while (0)

using ll::testing::TempDir;

using ll::testing::read_bytes;
using ll::testing::write_bytes;

// f must throw ll::Error whose message contains every needle; any other outcome fails.
void expect_error(const std::function<void()>& f, std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const ll::Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected ll::Error, got another exception: " << e.what();
    return;
  }
  ADD_FAILURE() << "expected ll::Error, nothing was thrown";
}

// f may succeed or throw ll::Error, nothing else (for fuzzing).
void expect_ok_or_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const ll::Error&) {
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected ll::Error, got: " << e.what();
  }
}

nlohmann::json read_json(const fs::path& p) { return nlohmann::json::parse(read_bytes(p)); }

// --- byte builders ---------------------------------------------------------------------------

void put(std::string& s, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) s += char((v >> (8 * i)) & 0xFF);
}

uint32_t crc32(const std::string& s) {
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : s) {
    c ^= b;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
  }
  return c ^ 0xFFFFFFFFu;
}

struct ZipIn {
  std::string name, data;
  uint16_t method = 0;
};

// A STORED zip; with zip64 every size/offset goes through zip64 extra fields and records.
std::string build_zip(const std::vector<ZipIn>& entries, bool zip64 = false) {
  std::string out, cd;
  for (const auto& e : entries) {
    const uint64_t off = out.size();
    const uint32_t crc = crc32(e.data);
    put(out, 0x04034b50, 4), put(out, zip64 ? 45 : 20, 2), put(out, 0, 2), put(out, e.method, 2);
    put(out, 0, 4), put(out, crc, 4), put(out, e.data.size(), 4), put(out, e.data.size(), 4);
    put(out, e.name.size(), 2), put(out, 0, 2);
    out += e.name + e.data;
    put(cd, 0x02014b50, 4), put(cd, 45, 2), put(cd, zip64 ? 45 : 20, 2), put(cd, 0, 2), put(cd, e.method, 2);
    put(cd, 0, 4), put(cd, crc, 4);
    const uint64_t sat = zip64 ? 0xFFFFFFFF : 0;
    put(cd, zip64 ? sat : e.data.size(), 4), put(cd, zip64 ? sat : e.data.size(), 4);
    put(cd, e.name.size(), 2), put(cd, zip64 ? 28 : 0, 2), put(cd, 0, 2), put(cd, 0, 2), put(cd, 0, 2);
    put(cd, 0, 4), put(cd, zip64 ? sat : off, 4);
    cd += e.name;
    if (zip64) put(cd, 0x0001, 2), put(cd, 24, 2), put(cd, e.data.size(), 8), put(cd, e.data.size(), 8), put(cd, off, 8);
  }
  const uint64_t cd_off = out.size();
  out += cd;
  if (zip64) {
    const uint64_t z = out.size();
    put(out, 0x06064b50, 4), put(out, 44, 8), put(out, 45, 2), put(out, 45, 2), put(out, 0, 4), put(out, 0, 4);
    put(out, entries.size(), 8), put(out, entries.size(), 8), put(out, cd.size(), 8), put(out, cd_off, 8);
    put(out, 0x07064b50, 4), put(out, 0, 4), put(out, z, 8), put(out, 1, 4);
  }
  put(out, 0x06054b50, 4), put(out, 0, 2), put(out, 0, 2);
  put(out, zip64 ? 0xFFFF : entries.size(), 2), put(out, zip64 ? 0xFFFF : entries.size(), 2);
  put(out, zip64 ? 0xFFFFFFFF : cd.size(), 4), put(out, zip64 ? 0xFFFFFFFF : cd_off, 4), put(out, 0, 2);
  return out;
}

// Pickle opcodes as torch.save (protocol 2) emits them.
struct Pickle {
  std::string s = "\x80\x02";
  Pickle& op(char c) { return s += c, *this; }
  Pickle& str(const std::string& v) { return s += 'X', put(s, v.size(), 4), s += v, *this; }
  Pickle& integer(int64_t v) {
    if (v >= INT32_MIN && v <= INT32_MAX) return s += 'J', put(s, uint64_t(v), 4), *this;
    return s += '\x8a', s += '\x08', put(s, uint64_t(v), 8), *this;
  }
  Pickle& global(const std::string& mod, const std::string& name) { return s += 'c' + mod + '\n' + name + '\n', *this; }
  Pickle& ints(const std::vector<int64_t>& v) {
    op('(');
    for (int64_t x : v) integer(x);
    return op('t');
  }
};

struct PT {  // one tensor in a hand-made torch.save pickle
  std::string name, storage = "FloatStorage", key;
  int64_t storage_numel = 0, offset = 0;
  std::vector<int64_t> shape, stride;
};

std::string state_pickle(const std::vector<PT>& ts, bool ordered = false, bool parameter = false) {
  Pickle p;
  if (ordered) p.global("collections", "OrderedDict").op(')').op('R');
  else p.op('}');
  p.op('(');
  for (const auto& t : ts) {
    p.str(t.name);
    if (parameter) p.global("torch._utils", "_rebuild_parameter").op('(');
    p.global("torch._utils", "_rebuild_tensor_v2").op('(');
    p.op('(').str("storage").global("torch", t.storage).str(t.key).str("cpu").integer(t.storage_numel).op('t');
    p.op('Q').integer(t.offset).ints(t.shape).ints(t.stride).op('\x89');
    p.global("collections", "OrderedDict").op(')').op('R').op('t').op('R');
    if (parameter) p.op('\x89').global("collections", "OrderedDict").op(')').op('R').op('t').op('R');
  }
  p.op('u');
  if (ordered) {  // state_dict()'s _metadata attribute arrives through BUILD
    p.op('}').str("_metadata").global("collections", "OrderedDict").op(')').op('R').op('s').op('b');
  }
  return p.op('.').s;
}

std::string torch_zip(const std::string& pkl, const std::map<std::string, std::string>& storages, bool zip64 = false) {
  std::vector<ZipIn> e{{"archive/data.pkl", pkl}, {"archive/byteorder", "little"}};
  for (const auto& [k, v] : storages) e.push_back({"archive/data/" + k, v});
  e.push_back({"archive/version", "3\n"});
  return build_zip(e, zip64);
}

template <class T>
std::string raw(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

std::vector<uint16_t> bf16s(const std::vector<float>& v) {
  std::vector<uint16_t> o;
  for (float f : v) o.push_back(ll::f32_to_bf16(f));
  return o;
}

// A valid two-tensor checkpoint: a bf16 matrix and an f32 vector that is a view at offset 1.
std::string good_bin_pickle() {
  return state_pickle({{"w", "BFloat16Storage", "0", 6, 0, {2, 3}, {3, 1}},
                       {"inv_freq", "FloatStorage", "1", 4, 1, {3}, {1}}});
}
std::map<std::string, std::string> good_bin_storages() {
  return {{"0", raw(bf16s({1, 2, 3, 4, 5, -6}))}, {"1", raw(std::vector<float>{9, 0.5f, 0.25f, 0.125f})}};
}

void check_good_bin(const ll::TensorStore& s) {
  ASSERT_EQ(s.size(), 2u);
  const auto& w = s.get("w");
  EXPECT_EQ(w.dtype, DType::BF16);
  EXPECT_EQ(w.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ll::to_f32(w), (std::vector<float>{1, 2, 3, 4, 5, -6}));
  const auto& f = s.get("inv_freq");
  EXPECT_EQ(f.dtype, DType::F32);
  EXPECT_EQ(ll::to_f32(f), (std::vector<float>{0.5f, 0.25f, 0.125f}));
}

// A safetensors file from a raw header string and a data section.
std::string st_bytes(const std::string& header, const std::string& data) {
  std::string s;
  put(s, header.size(), 8);
  return s + header + data;
}

}  // namespace

// --- reference checkpoints --------------------------------------------------------------------

TEST(IoDtype, SizesAndNames) {
  EXPECT_EQ(ll::dtype_size(DType::BF16), 2u);
  EXPECT_EQ(ll::dtype_size(DType::I64), 8u);
  EXPECT_EQ(ll::dtype_size(DType::BOOL), 1u);
  EXPECT_STREQ(ll::dtype_name(DType::BF16), "BF16");
  EXPECT_STREQ(ll::dtype_name(DType::U8), "U8");
}

TEST(IoReference, EveryParityCheckpointLoads) {
  REQUIRE_REFERENCE();
  for (const char* name : kCases) {
    SCOPED_TRACE(name);
    const fs::path dir = kParity / name;
    const auto cfg = read_json(dir / "config.json");
    const int64_t vocab = cfg["vocab_size"], hidden = cfg["hidden_size"], layers = cfg["num_hidden_layers"];
    const int64_t inter = cfg["intermediate_size"];
    const ll::TensorStore s = ll::read_checkpoint_dir(dir.string());

    const auto& emb = s.get("model.embed_tokens.weight");
    EXPECT_EQ(emb.dtype, DType::BF16);
    EXPECT_EQ(emb.shape, (std::vector<int64_t>{vocab, hidden}));
    EXPECT_EQ(s.get("lm_head.weight").shape, (std::vector<int64_t>{vocab, hidden}));
    EXPECT_EQ(s.get("model.norm.weight").shape, (std::vector<int64_t>{hidden}));
    const std::string last = "model.layers." + std::to_string(layers - 1) + ".";
    EXPECT_EQ(s.get(last + "mlp.down_proj.weight").shape, (std::vector<int64_t>{hidden, inter}));
    EXPECT_EQ(s.get(last + "self_attn.o_proj.weight").shape, (std::vector<int64_t>{hidden, hidden}));
    EXPECT_EQ(s.find("model.layers." + std::to_string(layers) + ".mlp.down_proj.weight"), nullptr);

    int n_inv = 0;
    for (const auto& [tn, t] : s.all()) {
      SCOPED_TRACE(tn);
      EXPECT_EQ(t.nbytes, size_t(t.numel()) * ll::dtype_size(t.dtype));
      if (tn.ends_with("rotary_emb.inv_freq")) {
        ++n_inv;
        EXPECT_EQ(t.dtype, DType::F32);
        const int64_t head_dim = hidden / int64_t(cfg["num_attention_heads"]);
        EXPECT_EQ(t.shape, (std::vector<int64_t>{head_dim / 2}));
      } else {
        EXPECT_EQ(t.dtype, DType::BF16);
      }
      const std::vector<float> v = ll::to_f32(t);
      ASSERT_EQ(v.size(), size_t(t.numel()));
      size_t nonzero = 0;
      for (float x : v) {
        ASSERT_TRUE(std::isfinite(x));
        nonzero += x != 0;
      }
      EXPECT_GT(nonzero, 0u);
    }
    if (std::string(name) == "odd_heads_bin") {
      EXPECT_EQ(n_inv, layers);
    }
  }
}

TEST(IoReference, ShardsMatchTheirIndex) {
  REQUIRE_REFERENCE();
  for (const char* idx : {"sharded_f32mem/model.safetensors.index.json", "sharded_bin_code/pytorch_model.bin.index.json"}) {
    SCOPED_TRACE(idx);
    const fs::path p = kParity / idx;
    const ll::TensorStore s = ll::read_checkpoint_dir(p.parent_path().string());
    const auto wm = read_json(p)["weight_map"];
    for (const auto& [tn, shard] : wm.items()) {
      const ll::TensorRef* t = s.find(tn);
      ASSERT_NE(t, nullptr) << tn;
      EXPECT_EQ(fs::path(t->file).filename().string(), shard.get<std::string>()) << tn;
    }
  }
}

TEST(IoReference, GoldenFilesLoad) {
  REQUIRE_REFERENCE();
  for (const char* name : kCases) {
    SCOPED_TRACE(name);
    const int64_t vocab = read_json(kParity / name / "config.json")["vocab_size"];
    const ll::TensorStore g = ll::read_safetensors((kParity / name / "golden.safetensors").string());
    const auto& ids = g.get("prompt_ids");
    ASSERT_EQ(ids.dtype, DType::I64);
    ASSERT_EQ(ids.shape.size(), 1u);
    for (int64_t i = 0; i < ids.numel(); ++i) {
      int64_t id;
      std::memcpy(&id, static_cast<const char*>(ids.data) + 8 * i, 8);
      ASSERT_TRUE(id >= 0 && id < vocab) << id;
    }
    const auto& logits = g.get("prompt_logits");
    EXPECT_EQ(logits.dtype, DType::F32);
    EXPECT_EQ(logits.shape, (std::vector<int64_t>{ids.shape[0], vocab}));
    for (float x : ll::to_f32(logits)) ASSERT_TRUE(std::isfinite(x));
    EXPECT_EQ(g.get("generated_ids").dtype, DType::I64);
    EXPECT_EQ(g.get("loss_no_cache").shape, (std::vector<int64_t>{1}));
    expect_error([&] { ll::to_f32(ids); }, {"prompt_ids", "I64"});
  }
}

// --- writing ---------------------------------------------------------------------------------

TEST(IoWrite, SafetensorsRoundTrip) {
  TempDir tmp;
  const std::vector<float> f32{1.5f, -2, 3, 0, 1e-3f, 7};
  const std::vector<uint16_t> bf = bf16s({1, -0.5f, 256, 3.140625f});
  std::vector<uint16_t> f16;
  for (float x : {0.5f, -1.0f, 65504.0f, 6.1035156e-05f}) f16.push_back(ll::f32_to_f16(x));
  const std::vector<int64_t> scalar{-42};
  const std::vector<int8_t> flags{1, 0, 1};
  const std::string path = tmp.file("rt.safetensors");
  ll::write_safetensors(path,
                        {{"f32", DType::F32, {2, 3}, f32.data(), 24},
                         {"bf16", DType::BF16, {4}, bf.data(), 8},
                         {"f16", DType::F16, {2, 2}, f16.data(), 8},
                         {"scalar", DType::I64, {}, scalar.data(), 8},
                         {"empty", DType::F32, {0, 5}, nullptr, 0},
                         {"flags", DType::BOOL, {3}, flags.data(), 3}},
                        {{"format", "pt"}});
  EXPECT_FALSE(fs::exists(path + ".tmp." + std::to_string(::getpid())));
  const auto s = ll::read_safetensors(path);
  ASSERT_EQ(s.size(), 6u);
  EXPECT_EQ(ll::to_f32(s.get("f32")), f32);
  EXPECT_EQ(s.get("f32").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ll::to_f32(s.get("bf16")), (std::vector<float>{1, -0.5f, 256, 3.140625f}));
  EXPECT_EQ(ll::to_f32(s.get("f16")), (std::vector<float>{0.5f, -1, 65504, 6.1035156e-05f}));
  const auto& sc = s.get("scalar");
  EXPECT_EQ(sc.dtype, DType::I64);
  EXPECT_TRUE(sc.shape.empty());
  EXPECT_EQ(sc.numel(), 1);
  EXPECT_EQ(std::memcmp(sc.data, scalar.data(), 8), 0);
  const auto& em = s.get("empty");
  EXPECT_EQ(em.shape, (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(em.nbytes, 0u);
  EXPECT_TRUE(ll::to_f32(em).empty());
  EXPECT_EQ(std::memcmp(s.get("flags").data, flags.data(), 3), 0);
  expect_error([&] { ll::to_f32(s.get("scalar")); }, {"scalar", path});
  expect_error([&] { s.get("nope"); }, {"nope"});

  // Overwriting an existing file works and replaces it whole.
  ll::write_safetensors(path, {{"only", DType::F32, {1}, f32.data(), 4}});
  EXPECT_EQ(ll::read_safetensors(path).size(), 1u);
}

TEST(IoWrite, RejectsBadInputAndLeavesNoTempFile) {
  TempDir tmp;
  const float x[2] = {1, 2};
  const std::string path = tmp.file("bad.safetensors");
  expect_error([&] { ll::write_safetensors(path, {{"t", DType::F32, {3}, x, 8}}); }, {path, "'t'"});
  expect_error([&] { ll::write_safetensors(path, {{"t", DType::F32, {-2}, x, 8}}); }, {path, "'t'"});
  expect_error([&] { ll::write_safetensors(path, {{"t", DType::F32, {2}, x, 8}, {"t", DType::F32, {2}, x, 8}}); },
               {"'t'", "duplicate"});
  const std::string nodir = tmp.file("missing/dir/x.safetensors");
  expect_error([&] { ll::write_safetensors(nodir, {{"t", DType::F32, {2}, x, 8}}); }, {nodir});
  expect_error([&] { ll::write_file_atomic(nodir, "hello"); }, {nodir});
  EXPECT_EQ(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()), 0);

  ll::write_file_atomic(tmp.file("note.txt"), "hello");
  ll::write_file_atomic(tmp.file("note.txt"), "bye");
  EXPECT_EQ(read_bytes(tmp.file("note.txt")), "bye");
  EXPECT_EQ(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()), 1);
}

// --- hostile safetensors -----------------------------------------------------------------------

TEST(IoSafetensorsMalicious, TruncatedFiles) {
  TempDir tmp;
  std::vector<std::string> sources;
  const std::vector<float> v(64, 1.0f);
  const std::string synth = tmp.file("synth.safetensors");
  ll::write_safetensors(synth, {{"a", DType::F32, {8, 8}, v.data(), 256}, {"b", DType::F32, {4}, v.data(), 16}});
  sources.push_back(read_bytes(synth));
  if (fs::exists(kParity / "plain_llama/model.safetensors"))
    sources.push_back(read_bytes(kParity / "plain_llama/model.safetensors"));
  for (const std::string& full : sources) {
    uint64_t hlen = 0;
    std::memcpy(&hlen, full.data(), 8);
    for (size_t cut : {size_t(0), size_t(4), size_t(7), size_t(8), size_t(8 + hlen / 2), size_t(8 + hlen - 1),
                       size_t(8 + hlen), size_t(8 + hlen + 3), (full.size() + 8 + hlen) / 2, full.size() - 1}) {
      SCOPED_TRACE(cut);
      const std::string p = tmp.file("cut.safetensors");
      write_bytes(p, full.substr(0, cut));
      expect_error([&] { ll::read_safetensors(p); }, {p});
    }
  }
}

TEST(IoSafetensorsMalicious, BadHeaders) {
  TempDir tmp;
  const std::string p = tmp.file("bad.safetensors");
  auto check = [&](const std::string& bytes, std::initializer_list<std::string> needles) {
    write_bytes(p, bytes);
    expect_error([&] { ll::read_safetensors(p); }, needles);
  };
  const std::string d16(16, '\0');
  auto one = [&](const std::string& entry) { return st_bytes(R"({"w":)" + entry + "}", d16); };

  // Header length lying: bigger than the file.
  std::string lie = st_bytes("{}", d16);
  lie[0] = '\x00', lie[1] = '\x10';
  check(lie, {p, "exceeds the file size"});
  check(st_bytes("{not json", d16), {p, "JSON"});
  check(st_bytes("[1,2]", d16), {p, "object"});
  check(st_bytes("", ""), {p, "JSON"});
  check(one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,32]})"), {p, "'w'", "past the data section"});
  check(one(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"), {p, "'w'", "needs 12"});
  check(one(R"({"dtype":"F32","shape":[2],"data_offsets":[8,0]})"), {p, "'w'", "begin"});
  check(one(R"({"dtype":"F32","shape":[2],"data_offsets":[-8,0]})"), {p, "'w'"});
  check(one(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"), {p, "'w'", "non-negative"});
  check(one(R"({"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]})"), {p, "'w'", "overflow"});
  check(one(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]})"), {p, "'w'", "overflow"});
  check(one(R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]})"), {p, "'w'"});
  check(one(R"({"dtype":"F32","shape":[2.5],"data_offsets":[0,8]})"), {p, "'w'"});
  check(one(R"({"dtype":"Q7","shape":[2],"data_offsets":[0,8]})"), {p, "'w'", "Q7"});
  check(one(R"({"dtype":7,"shape":[2],"data_offsets":[0,8]})"), {p, "'w'", "dtype"});
  check(one(R"({"dtype":"F32","shape":[2]})"), {p, "'w'", "data_offsets"});
  check(one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8,9]})"), {p, "'w'", "data_offsets"});
  check(one(R"({"dtype":"F32","data_offsets":[0,8]})"), {p, "'w'", "shape"});
  check(one(R"([1])"), {p, "'w'"});

  // A metadata block and a well-formed entry read fine; the header may be space-padded.
  write_bytes(p, st_bytes(R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}   )", d16));
  EXPECT_EQ(ll::read_safetensors(p).get("w").shape, (std::vector<int64_t>{2, 2}));

  // A header length over 100 MB (sparse file, so the size is real but costs no disk).
  std::string big;
  put(big, 101ull << 20, 8);
  write_bytes(p, big);
  fs::resize_file(p, (101ull << 20) + 64);
  expect_error([&] { ll::read_safetensors(p); }, {p, "100 MB"});
  expect_error([&] { ll::read_safetensors(tmp.file("absent.safetensors")); }, {"absent.safetensors"});
}

// --- torch.save zips ----------------------------------------------------------------------------

TEST(IoTorchBin, HandMadeCheckpointsLoad) {
  TempDir tmp;
  const std::string p = tmp.file("pytorch_model.bin");
  write_bytes(p, torch_zip(good_bin_pickle(), good_bin_storages()));
  check_good_bin(ll::read_torch_bin(p));
  write_bytes(p, torch_zip(good_bin_pickle(), good_bin_storages(), /*zip64=*/true));
  check_good_bin(ll::read_torch_bin(p));
  // OrderedDict top level with _metadata via BUILD, tensors wrapped as Parameters.
  const auto pt = std::vector<PT>{{"w", "BFloat16Storage", "0", 6, 0, {2, 3}, {3, 1}},
                                  {"inv_freq", "FloatStorage", "1", 4, 1, {3}, {1}}};
  write_bytes(p, torch_zip(state_pickle(pt, true, true), good_bin_storages()));
  check_good_bin(ll::read_torch_bin(p));
  // Size-1 dims may carry any stride; 0-dim and empty tensors are fine.
  write_bytes(p, torch_zip(state_pickle({{"a", "FloatStorage", "0", 4, 0, {1, 4}, {99, 1}},
                                         {"s", "LongStorage", "1", 1, 0, {}, {}},
                                         {"e", "FloatStorage", "0", 4, 4, {0, 3}, {3, 1}}}),
                           {{"0", raw(std::vector<float>{1, 2, 3, 4})}, {"1", raw(std::vector<int64_t>{5})}}));
  const auto s = ll::read_torch_bin(p);
  EXPECT_EQ(ll::to_f32(s.get("a")), (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(s.get("s").dtype, DType::I64);
  EXPECT_EQ(s.get("s").numel(), 1);
  EXPECT_EQ(s.get("e").nbytes, 0u);
}

TEST(IoTorchBinMalicious, TruncatedFiles) {
  TempDir tmp;
  std::vector<std::string> sources{torch_zip(good_bin_pickle(), good_bin_storages())};
  if (fs::exists(kParity / "odd_heads_bin/pytorch_model.bin"))
    sources.push_back(read_bytes(kParity / "odd_heads_bin/pytorch_model.bin"));
  for (const std::string& full : sources) {
    for (size_t cut : {size_t(0), size_t(1), size_t(21), size_t(22), size_t(100), size_t(2000), full.size() / 3,
                       full.size() / 2, full.size() - 200, full.size() - 23, full.size() - 22, full.size() - 1}) {
      if (cut >= full.size()) continue;
      SCOPED_TRACE(cut);
      const std::string p = tmp.file("cut.bin");
      write_bytes(p, full.substr(0, cut));
      expect_error([&] { ll::read_torch_bin(p); }, {p});
    }
  }
}

TEST(IoTorchBinMalicious, BadPickles) {
  TempDir tmp;
  const std::string p = tmp.file("evil.bin");
  auto check = [&](const std::string& pkl, std::initializer_list<std::string> needles) {
    write_bytes(p, torch_zip(pkl, good_bin_storages()));
    expect_error([&] { ll::read_torch_bin(p); }, needles);
  };
  // A GLOBAL outside the allow-list is refused before anything could run.
  check(Pickle().global("os", "system").str("echo pwned").op('\x85').op('R').op('.').s, {p, "os system"});
  check(Pickle().global("torch", "load").op('.').s, {p, "torch load"});
  check(Pickle().op('}').op('\xff').op('.').s, {p, "0xff", "offset 3"});
  check(Pickle().op('}').op('c').s + "collections\nOrd", {p, "truncated"});
  check(Pickle().op('R').op('.').s, {p, "underflow"});
  check(Pickle().op('(').op('}').op('u').op('u').op('.').s, {p});
  check(Pickle().op('h').s + "\x05."s, {p, "memo"});
  check(Pickle().op('j').s + "\x05\x00\x00\x00."s, {p, "memo"});
  check(Pickle().op('X').s + "\xff\xff\xff\x7f", {p, "truncated"});
  check(Pickle().op('\x8a').s + "\x20", {p, "LONG1"});
  check(Pickle().op('}').s, {p, "STOP"});
  check(Pickle().op(']').op('.').s, {p, "not a state dict"});
  check(Pickle().op('}').op('q').s + "\x00h\x00h\x00s."s, {p, "key"});
  check(Pickle().op('}').str("x").integer(3).op('s').op('.').s, {p, "'x'", "not a tensor"});
  check(Pickle().op(']').op('q').s + "\x00h\x00" "a."s, {p, "not a state dict"});  // self-containing list
  check(Pickle().global("collections", "OrderedDict").integer(1).op('\x85').op('R').op('.').s, {p, "OrderedDict"});
  check(Pickle().global("torch", "FloatStorage").op(')').op('R').op('.').s, {p, "FloatStorage"});
  check(Pickle().str("storage").op('Q').op('.').s, {p, "persistent id"});
  // Deep nesting must neither overflow the C++ stack nor leak.
  Pickle deep;
  for (int i = 0; i < 200000; ++i) deep.op(']');
  for (int i = 0; i < 199999; ++i) deep.op('a');
  check(deep.op('.').s, {p, "not a state dict"});
  Pickle marks;
  for (int i = 0; i < 100000; ++i) marks.op('(');
  check(marks.op('.').s, {p});
}

TEST(IoTorchBinMalicious, BadTensorsAndStorages) {
  TempDir tmp;
  const std::string p = tmp.file("evil.bin");
  auto check = [&](const std::vector<PT>& pt, std::initializer_list<std::string> needles) {
    write_bytes(p, torch_zip(state_pickle(pt), good_bin_storages()));
    expect_error([&] { ll::read_torch_bin(p); }, needles);
  };
  check({{"w", "BFloat16Storage", "7", 6, 0, {2, 3}, {3, 1}}}, {p, "'w'", "storage '7'", "archive/data/7"});
  check({{"w", "BFloat16Storage", "0", 6, 3, {2, 3}, {3, 1}}}, {p, "'w'", "exceeds storage"});
  check({{"w", "BFloat16Storage", "0", 6, -1, {2}, {1}}}, {p, "'w'"});
  check({{"w", "BFloat16Storage", "0", 6, 0, {3, 2}, {1, 3}}}, {p, "'w'", "contiguous"});
  check({{"w", "BFloat16Storage", "0", 6, 0, {2, 3}, {3}}}, {p, "'w'", "stride"});
  check({{"w", "BFloat16Storage", "0", 6, 0, {-2, 3}, {3, 1}}}, {p, "'w'", "negative"});
  check({{"w", "BFloat16Storage", "0", 6, 0, {INT64_MAX, 4}, {4, 1}}}, {p, "'w'", "overflow"});
  check({{"w", "BFloat16Storage", "0", 600, 0, {2, 3}, {3, 1}}}, {p, "'w'", "storage '0'", "600"});
  check({{"w", "FloatStorage", "0", 6, 0, {2, 3}, {3, 1}}}, {p, "'w'", "storage '0'"});  // 12 bytes, not 24
  check({{"w", "QuantStorage", "0", 6, 0, {2, 3}, {3, 1}}}, {p, "torch QuantStorage"});
  check({{"w", "BFloat16Storage", "0", 6, 0, {2, 3}, {3, 1}}, {"w", "BFloat16Storage", "0", 6, 0, {2, 3}, {3, 1}}},
        {p, "'w'", "twice"});
}

TEST(IoTorchBinMalicious, BadZips) {
  TempDir tmp;
  const std::string p = tmp.file("evil.bin");
  auto check = [&](const std::string& bytes, std::initializer_list<std::string> needles) {
    write_bytes(p, bytes);
    expect_error([&] { ll::read_torch_bin(p); }, needles);
  };
  const std::string pkl = good_bin_pickle();
  const auto st = good_bin_storages();
  check(build_zip({{"archive/data.pkl", pkl}, {"archive/data/0", st.at("0")}, {"archive/data/1", st.at("1"), 8}}),
        {p, "archive/data/1", "STORED"});
  check(build_zip({{"archive/data/0", st.at("0")}}), {p, "data.pkl"});
  check(build_zip({{"a/data.pkl", pkl}, {"b/data.pkl", pkl}}), {p, "more than one"});
  check(build_zip({{"archive/data.pkl", pkl}, {"archive/byteorder", "big"}}), {p, "big-endian"});
  check(std::string("\x80\x02\x8a\x0a", 4) + std::string(40, '\0'), {p, "legacy"});
  check(std::string(100, 'x'), {p, "zip"});

  // Corrupt data.pkl bytes fail the CRC; a wrong local header offset fails the header check.
  std::string z = torch_zip(pkl, st);
  z[30 + 16 + 10] ^= 0x01;
  check(z, {p, "CRC"});
  z = torch_zip(pkl, st);
  const size_t cd = z.rfind(std::string("PK\x01\x02", 4));
  z[cd + 42] ^= 0x04;
  check(z, {p, "local file header"});
  z = torch_zip(pkl, st);  // central directory entry whose size runs past the end of the file
  z[z.find(std::string("PK\x01\x02", 4)) + 24] = '\x7f';
  check(z, {p});
  z = torch_zip(pkl, st, true);  // zip64 locator pointing nowhere
  z[z.size() - 22 - 20 + 8] ^= 0x40;
  check(z, {p, "zip64"});

  // Random byte flips anywhere: any outcome but a crash or a foreign exception.
  std::mt19937 rng(1234);
  const std::string good = torch_zip(pkl, st);
  for (int i = 0; i < 300; ++i) {
    std::string m = good;
    for (int k = 0; k < 3; ++k) m[rng() % m.size()] = char(rng());
    write_bytes(p, m);
    expect_ok_or_error([&] { ll::read_torch_bin(p); });
  }
}

TEST(IoTorchBinMalicious, FuzzedPickles) {
  // Every truncation and many random mutations of a valid pickle (with a correct CRC, so the VM
  // itself sees the damage) end in success or ll::Error.
  TempDir tmp;
  const std::string p = tmp.file("fuzz.bin");
  const std::string pkl = state_pickle({{"w", "BFloat16Storage", "0", 6, 0, {2, 3}, {3, 1}},
                                        {"inv_freq", "FloatStorage", "1", 4, 1, {3}, {1}}},
                                       true, true);
  const auto st = good_bin_storages();
  for (size_t cut = 0; cut < pkl.size(); cut += 3) {
    write_bytes(p, torch_zip(pkl.substr(0, cut), st));
    expect_error([&] { ll::read_torch_bin(p); }, {p});
  }
  std::mt19937 rng(99);
  for (int i = 0; i < 1500; ++i) {
    std::string m = pkl;
    for (int k = 0, n = 1 + int(rng() % 3); k < n; ++k) m[rng() % m.size()] = char(rng());
    write_bytes(p, torch_zip(m, st));
    expect_ok_or_error([&] { ll::read_torch_bin(p); });
  }
}

// --- model directories ----------------------------------------------------------------------------

TEST(IoCheckpointDir, ShardedAndPrecedence) {
  TempDir tmp;
  const std::vector<float> a{1, 2}, b{3, 4, 5};
  ll::write_safetensors(tmp.file("m-1.safetensors"), {{"a", DType::F32, {2}, a.data(), 8}});
  ll::write_safetensors(tmp.file("m-2.safetensors"), {{"b", DType::F32, {3}, b.data(), 12},
                                                       {"extra", DType::F32, {1}, b.data(), 4}});
  ll::write_file_atomic(tmp.file("model.safetensors.index.json"),
                        R"({"metadata":{},"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors"}})");
  auto s = ll::read_checkpoint_dir(tmp.path.string());
  EXPECT_EQ(s.size(), 3u);  // unlisted "extra" is kept
  EXPECT_EQ(ll::to_f32(s.get("b")), b);

  // pytorch_model.bin loses to any safetensors file; it wins over a .bin index.
  write_bytes(tmp.file("pytorch_model.bin"), torch_zip(good_bin_pickle(), good_bin_storages()));
  EXPECT_EQ(ll::read_checkpoint_dir(tmp.path.string()).size(), 3u);
  ll::write_safetensors(tmp.file("model.safetensors"), {{"only", DType::F32, {2}, a.data(), 8}});
  EXPECT_EQ(ll::read_checkpoint_dir(tmp.path.string()).size(), 1u);
  fs::remove(tmp.file("model.safetensors"));
  fs::remove(tmp.file("model.safetensors.index.json"));
  check_good_bin(ll::read_checkpoint_dir(tmp.path.string()));

  // Sharded .bin.
  fs::remove(tmp.file("pytorch_model.bin"));
  write_bytes(tmp.file("p-1.bin"), torch_zip(state_pickle({{"w", "BFloat16Storage", "0", 6, 0, {2, 3}, {3, 1}}}),
                                             {{"0", good_bin_storages().at("0")}}));
  write_bytes(tmp.file("p-2.bin"), torch_zip(state_pickle({{"inv_freq", "FloatStorage", "1", 4, 1, {3}, {1}}}),
                                             {{"1", good_bin_storages().at("1")}}));
  ll::write_file_atomic(tmp.file("pytorch_model.bin.index.json"),
                        R"({"weight_map":{"w":"p-1.bin","inv_freq":"p-2.bin"}})");
  check_good_bin(ll::read_checkpoint_dir(tmp.path.string()));
}

TEST(IoCheckpointDirMalicious, BadDirectories) {
  TempDir tmp;
  const std::string dir = tmp.path.string();
  expect_error([&] { ll::read_checkpoint_dir(dir); }, {dir, "model.safetensors", "pytorch_model.bin"});
  expect_error([&] { ll::read_checkpoint_dir(dir + "/nope"); }, {dir + "/nope"});

  const std::vector<float> a{1, 2};
  ll::write_safetensors(tmp.file("m-1.safetensors"), {{"a", DType::F32, {2}, a.data(), 8}});
  const std::string index = tmp.file("model.safetensors.index.json");
  auto check = [&](const std::string& json, std::initializer_list<std::string> needles) {
    ll::write_file_atomic(index, json);
    expect_error([&] { ll::read_checkpoint_dir(dir); }, needles);
  };
  check(R"({"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors"}})", {index, "m-2.safetensors", "missing"});
  check(R"({"weight_map":{"a":"../x"}})", {index, "../x"});
  check(R"({"weight_map":{"a":"/etc/passwd"}})", {index, "/etc/passwd"});
  check(R"({"weight_map":{"a":"sub/m-1.safetensors"}})", {index, "sub/m-1.safetensors"});
  check(R"({"weight_map":{"a":"m-1.safetensors","zz":"m-1.safetensors"}})", {index, "'zz'", "m-1.safetensors"});
  check(R"({"weight_map":{"a":3}})", {index, "'a'"});
  check(R"({"weight_map":{}})", {index, "empty"});
  check(R"({"weights":{}})", {index, "weight_map"});
  check(R"({"weight_map":)", {index, "JSON"});

  // The same tensor in two shards.
  ll::write_safetensors(tmp.file("m-2.safetensors"), {{"a", DType::F32, {2}, a.data(), 8}});
  check(R"({"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors"}})", {"'b'"});
  ll::write_safetensors(tmp.file("m-2.safetensors"), {{"a", DType::F32, {2}, a.data(), 8},
                                                       {"b", DType::F32, {2}, a.data(), 8}});
  check(R"({"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors"}})", {"'a'", "twice"});
}
