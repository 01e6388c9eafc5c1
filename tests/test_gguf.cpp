// GGUF v3 reader/writer: round trips, a hand-built file checked against the spec, the streaming
// writer, and hostile inputs that must end in ll::Error naming the file (run under ASan).
#include <gtest/gtest.h>

#include "test_support.h"
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>

#include "io/gguf.h"

namespace fs = std::filesystem;
using ll::DType;
using ll::GGUFFile;
using ll::GGUFTensorToWrite;
using ll::GGUFValue;
using VT = GGUFValue::Type;
using namespace std::string_literals;

namespace {

using ll::testing::TempDir;

using ll::testing::read_bytes;
using ll::testing::write_bytes;

// Runs f, which must throw ll::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "expected ll::Error mentioning '" << (parts.empty() ? "" : parts[0]) << "'";
  } catch (const ll::Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
  }
}

// Little-endian byte builder, independent of the writer under test.
struct Bytes {
  std::string b;
  Bytes& u8(uint8_t v) {
    b.push_back(char(v));
    return *this;
  }
  Bytes& u16(uint16_t v) { return le(v, 2); }
  Bytes& u32(uint32_t v) { return le(v, 4); }
  Bytes& u64(uint64_t v) { return le(v, 8); }
  Bytes& f32(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u32(u);
  }
  Bytes& f64(double v) {
    uint64_t u;
    std::memcpy(&u, &v, 8);
    return u64(u);
  }
  Bytes& str(const std::string& s) {
    u64(s.size());
    b += s;
    return *this;
  }
  Bytes& raw(const std::string& s) {
    b += s;
    return *this;
  }
  Bytes& pad_to(size_t align) {
    while (b.size() % align) b.push_back('\0');
    return *this;
  }
  Bytes& le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) b.push_back(char(uint8_t(v >> (8 * i))));
    return *this;
  }
};

std::string kv_u32(const std::string& key, uint32_t v) { return Bytes().str(key).u32(4).u32(v).b; }
std::string kv_str(const std::string& key, const std::string& v) { return Bytes().str(key).u32(8).str(v).b; }
std::string tinfo(const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
  Bytes b;
  b.str(name).u32(uint32_t(ne.size()));
  for (uint64_t d : ne) b.u64(d);
  return b.u32(type).u64(offset).b;
}

// A whole file: header, KVs, tensor infos, padding to `align`, data.
std::string assemble(const std::vector<std::string>& kvs, const std::vector<std::string>& infos,
                     const std::string& data, size_t align = 32, uint32_t version = 3) {
  Bytes b;
  b.u32(0x46554747).u32(version).u64(infos.size()).u64(kvs.size());
  for (const auto& k : kvs) b.raw(k);
  for (const auto& t : infos) b.raw(t);
  b.pad_to(align);
  return b.raw(data).b;
}

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = char(rng() & 0xff);
  return s;
}

struct TestTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

std::vector<TestTensor> sample_tensors() {
  std::vector<TestTensor> ts = {
      {"f32.vec5", DType::F32, {5}, ""},
      {"f16.mat", DType::F16, {7, 3}, ""},
      {"bf16.4d", DType::BF16, {2, 3, 4, 32}, ""},
      {"q8.3x64", DType::Q8_0, {3, 64}, ""},
      {"q8.4d", DType::Q8_0, {2, 1, 3, 32}, ""},
      {"q4.2x96", DType::Q4_0, {2, 96}, ""},
      {"i32.3d", DType::I32, {4, 1, 3}, ""},
      {"empty.f32", DType::F32, {0, 8}, ""},
      {"model.layers.0.self_attn.q_proj.weight", DType::F32, {3, 3}, ""},
  };
  uint32_t seed = 1;
  for (auto& t : ts) t.bytes = random_bytes(ll::tensor_nbytes(t.dtype, t.shape), seed++);
  return ts;
}

std::vector<GGUFTensorToWrite> to_write(const std::vector<TestTensor>& ts) {
  std::vector<GGUFTensorToWrite> w;
  for (const auto& t : ts) w.push_back({t.name, t.dtype, t.shape, t.bytes.data(), t.bytes.size()});
  return w;
}

std::map<std::string, GGUFValue> sample_metadata() {
  std::map<std::string, GGUFValue> m;
  m["general.architecture"] = GGUFValue::string("longllama");
  m["a.u8"] = GGUFValue::u8(255);
  m["a.i8"] = GGUFValue::i8(-128);
  m["a.u16"] = GGUFValue::u16(65535);
  m["a.i16"] = GGUFValue::i16(-32768);
  m["a.u32"] = GGUFValue::u32(4000000000u);
  m["a.i32"] = GGUFValue::i32(-2000000000);
  m["a.u64"] = GGUFValue::u64(18446744073709551615ull);
  m["a.i64"] = GGUFValue::i64(std::numeric_limits<int64_t>::min());
  m["a.f32"] = GGUFValue::f32(1.5e-3f);
  m["a.f64"] = GGUFValue::f64(3.141592653589793);
  m["a.bool.t"] = GGUFValue::boolean(true);
  m["a.bool.f"] = GGUFValue::boolean(false);
  m["a.str"] = GGUFValue::string("hello");
  m["a.str.utf8"] = GGUFValue::string("h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x98\x80");
  m["a.str.empty"] = GGUFValue::string("");
  m["a.str.nul"] = GGUFValue::string("a\0b"s);
  m["arr.u8"] = GGUFValue::u8_array(random_bytes(300 * 1024 + 7, 99));
  m["arr.u8.empty"] = GGUFValue::u8_array("");
  m["arr.i8"] = GGUFValue::i8_array("\x80\x7f\x00\xff"s);
  m["arr.u16"] = GGUFValue::int_array(VT::U16, {0, 1, 65535});
  m["arr.i16"] = GGUFValue::int_array(VT::I16, {-32768, 0, 32767});
  m["arr.u32"] = GGUFValue::int_array(VT::U32, {0, 4294967295ll});
  m["arr.i32"] = GGUFValue::i32_array({-1, 0, 1, std::numeric_limits<int32_t>::max()});
  m["arr.i32.empty"] = GGUFValue::i32_array({});
  m["arr.u64"] = GGUFValue::int_array(VT::U64, {0, -1 /* 2^64-1 bit-cast */, 12345});
  m["arr.i64"] = GGUFValue::int_array(VT::I64, {std::numeric_limits<int64_t>::min(), 7});
  m["arr.f32"] = GGUFValue::f32_array({0.f, -1.25f, 3.4e38f, std::numeric_limits<float>::infinity()});
  m["arr.f32.empty"] = GGUFValue::f32_array({});
  m["arr.f64"] = GGUFValue::f64_array({1e-300, -2.5});
  m["arr.bool"] = GGUFValue::bool_array({true, false, true});
  m["arr.str"] = GGUFValue::string_array({"<s>", "", "\xe2\x96\x81the", "a\0b"s});
  m["arr.str.empty"] = GGUFValue::string_array({});
  return m;
}

void check_tensors(const GGUFFile& f, const std::vector<TestTensor>& ts, uint32_t alignment) {
  ASSERT_EQ(f.tensors.size(), ts.size());
  for (const auto& t : ts) {
    SCOPED_TRACE(t.name);
    const ll::TensorRef& r = f.tensors.get(t.name);
    EXPECT_EQ(r.dtype, t.dtype);
    EXPECT_EQ(r.shape, t.shape);
    EXPECT_EQ(r.nbytes, t.bytes.size());
    EXPECT_EQ(r.file, f.path);
    // The mapping is page aligned, so file-relative alignment shows in the address.
    EXPECT_EQ(reinterpret_cast<uintptr_t>(r.data) % alignment, 0u);
    if (!t.bytes.empty()) {
      EXPECT_EQ(std::memcmp(r.data, t.bytes.data(), t.bytes.size()), 0);
    }
  }
}

}  // namespace

TEST(GGUF, RoundTripAllTypes) {
  TempDir dir;
  const auto ts = sample_tensors();
  const auto md = sample_metadata();
  for (uint32_t alignment : {32u, 64u, 1u, 4096u}) {
    SCOPED_TRACE("alignment " + std::to_string(alignment));
    const std::string path = dir.file("rt" + std::to_string(alignment) + ".gguf");
    ll::write_gguf(path, md, to_write(ts), alignment);
    EXPECT_EQ(fs::file_size(path) % alignment, 0u);
    GGUFFile f = ll::read_gguf(path);
    EXPECT_EQ(f.path, path);
    EXPECT_EQ(f.version, 3u);
    EXPECT_EQ(f.alignment, alignment);
    auto expect = md;
    if (alignment != 32) expect["general.alignment"] = GGUFValue::u32(alignment);
    ASSERT_EQ(f.metadata.size(), expect.size());
    for (const auto& [k, v] : expect) {
      SCOPED_TRACE(k);
      ASSERT_TRUE(f.has(k));
      EXPECT_TRUE(f.get(k) == v) << "type " << ll::gguf_type_name(f.get(k).type);
    }
    check_tensors(f, ts, alignment);

    // general.architecture is the first key, as llama.cpp writes it.
    const std::string bytes = read_bytes(path);
    const std::string first = Bytes().str("general.architecture").b;
    EXPECT_EQ(bytes.substr(24, first.size()), first);
  }
}

TEST(GGUF, TypedGetters) {
  TempDir dir;
  const std::string path = dir.file("get.gguf");
  ll::write_gguf(path, sample_metadata(), {});
  GGUFFile f = ll::read_gguf(path);
  EXPECT_EQ(f.get_int("a.u32"), 4000000000ll);
  EXPECT_EQ(f.get_int("a.i8"), -128);
  EXPECT_EQ(f.get_int("a.i64"), std::numeric_limits<int64_t>::min());
  EXPECT_DOUBLE_EQ(f.get_float("a.f64"), 3.141592653589793);
  EXPECT_FLOAT_EQ(float(f.get_float("a.f32")), 1.5e-3f);
  EXPECT_DOUBLE_EQ(f.get_float("a.i16"), -32768.0);
  EXPECT_TRUE(f.get_bool("a.bool.t"));
  EXPECT_FALSE(f.get_bool("a.bool.f"));
  EXPECT_EQ(f.get_string("general.architecture"), "longllama");
  EXPECT_EQ(f.get_array("arr.str", VT::STRING).strings.size(), 4u);
  EXPECT_EQ(f.get_array("arr.u8", VT::U8).bytes.size(), 300u * 1024 + 7);
  EXPECT_EQ(f.get("arr.u64").ints[1], -1);
  expect_error([&] { f.get_int("missing.key"); }, {path, "missing.key", "not found"});
  expect_error([&] { f.get_int("a.str"); }, {path, "a.str", "string"});
  expect_error([&] { f.get_int("a.u64"); }, {path, "a.u64", "too large"});
  expect_error([&] { f.get_float("arr.f32"); }, {path, "arr.f32", "array"});
  expect_error([&] { f.get_bool("a.u8"); }, {path, "a.u8"});
  expect_error([&] { f.get_string("a.bool.t"); }, {path, "a.bool.t"});
  expect_error([&] { f.get_array("arr.i32", VT::U32); }, {path, "arr.i32", "array of u32"});
}

TEST(GGUF, StreamingWriterIsByteIdentical) {
  TempDir dir;
  const auto ts = sample_tensors();
  const auto md = sample_metadata();
  for (uint32_t alignment : {32u, 64u}) {
    const std::string a = dir.file("plain.gguf"), b = dir.file("stream.gguf");
    auto w = to_write(ts);
    ll::write_gguf(a, md, w, alignment);
    for (auto& t : w) t.data = nullptr;
    std::vector<size_t> calls;
    ll::write_gguf_streaming(
        b, md, w,
        [&](size_t i, uint8_t* out) {
          calls.push_back(i);
          std::memcpy(out, ts[i].bytes.data(), ts[i].bytes.size());
        },
        alignment);
    EXPECT_EQ(read_bytes(a), read_bytes(b));
    std::vector<size_t> expect;
    for (size_t i = 0; i < ts.size(); ++i)
      if (!ts[i].bytes.empty()) expect.push_back(i);
    EXPECT_EQ(calls, expect);  // once per non-empty tensor, in order
    check_tensors(ll::read_gguf(b), ts, alignment);
  }
}

TEST(GGUF, HandBuiltFileMatchesSpec) {
  TempDir dir;
  // Tensor "a": ggml ne = [4, 2] F32 -> row-major shape [2, 4]; "b": ne = [32] Q8_0 (one block).
  std::string a_data = random_bytes(32, 5), b_data = random_bytes(34, 6);
  Bytes kv_arr;
  kv_arr.str("llama.some_ints").u32(9).u32(5).u64(3).u32(uint32_t(-1)).u32(0).u32(7);
  Bytes kv_strs;
  kv_strs.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(2).str("<unk>").str("\xe2\x96\x81hi");
  Bytes kv_f;
  kv_f.str("llama.rope.freq_base").u32(6).f32(10000.f);
  Bytes kv_b;
  kv_b.str("flag").u32(7).u8(1);
  Bytes kv_u64;
  kv_u64.str("big").u32(10).u64(1ull << 40);
  const std::string data = a_data + b_data;  // "b" at offset 32
  std::string file =
      assemble({kv_str("general.architecture", "llama"), kv_u32("llama.context_length", 2048), kv_arr.b, kv_strs.b,
                kv_f.b, kv_b.b, kv_u64.b},
               {tinfo("a", {4, 2}, 0, 0), tinfo("b", {32}, 8, 32)}, data);
  const std::string path = dir.file("hand.gguf");
  write_bytes(path, file);
  GGUFFile f = ll::read_gguf(path);
  EXPECT_EQ(f.alignment, 32u);
  EXPECT_EQ(f.metadata.size(), 7u);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get("llama.context_length").type, VT::U32);
  EXPECT_EQ(f.get_int("llama.context_length"), 2048);
  EXPECT_EQ(f.get_array("llama.some_ints", VT::I32).ints, (std::vector<int64_t>{-1, 0, 7}));
  EXPECT_EQ(f.get_array("tokenizer.ggml.tokens", VT::STRING).strings,
            (std::vector<std::string>{"<unk>", "\xe2\x96\x81hi"}));
  EXPECT_EQ(f.get_float("llama.rope.freq_base"), 10000.0);
  EXPECT_TRUE(f.get_bool("flag"));
  EXPECT_EQ(f.get_int("big"), int64_t(1) << 40);
  const auto& a = f.tensors.get("a");
  EXPECT_EQ(a.dtype, DType::F32);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(a.nbytes, 32u);
  EXPECT_EQ(std::memcmp(a.data, a_data.data(), 32), 0);
  const auto& b = f.tensors.get("b");
  EXPECT_EQ(b.dtype, DType::Q8_0);
  EXPECT_EQ(b.shape, (std::vector<int64_t>{32}));
  EXPECT_EQ(b.nbytes, 34u);
  EXPECT_EQ(std::memcmp(b.data, b_data.data(), 34), 0);

  // The header ends at a non-multiple of 32 here; the data section starts at the next multiple.
  const size_t header = file.size() - data.size();
  EXPECT_EQ(header % 32, 0u);
  EXPECT_EQ(static_cast<const char*>(a.data) - static_cast<const char*>(b.data), -32);

  // Version 2 (same layout) is accepted; a custom alignment moves the data section.
  const std::string v2 = dir.file("v2.gguf");
  write_bytes(v2, assemble({kv_u32("general.alignment", 16)}, {tinfo("t", {2}, 30, 0)}, "\x01\x02\x03\x04", 16, 2));
  GGUFFile g = ll::read_gguf(v2);
  EXPECT_EQ(g.version, 2u);
  EXPECT_EQ(g.alignment, 16u);
  EXPECT_EQ(g.tensors.get("t").dtype, DType::BF16);
  EXPECT_EQ(std::memcmp(g.tensors.get("t").data, "\x01\x02\x03\x04", 4), 0);

  // No tensors, no metadata: valid.
  const std::string empty = dir.file("empty.gguf");
  write_bytes(empty, Bytes().u32(0x46554747).u32(3).u64(0).u64(0).b);
  GGUFFile e = ll::read_gguf(empty);
  EXPECT_EQ(e.tensors.size(), 0u);
  EXPECT_TRUE(e.metadata.empty());

  // Our writer produces exactly these bytes for the same content (llama.cpp layout).
  const std::string mine = dir.file("mine.gguf");
  std::map<std::string, GGUFValue> md = {{"general.architecture", GGUFValue::string("llama")}};
  ll::write_gguf(mine, md,
                 {{"a", DType::F32, {2, 4}, a_data.data(), 32}, {"b", DType::Q8_0, {32}, b_data.data(), 34}});
  std::string expect = assemble({kv_str("general.architecture", "llama")},
                                {tinfo("a", {4, 2}, 0, 0), tinfo("b", {32}, 8, 32)}, a_data + b_data);
  expect.append((32 - expect.size() % 32) % 32, '\0');
  EXPECT_EQ(read_bytes(mine), expect);
}

TEST(GGUF, TruncationAtEveryPoint) {
  TempDir dir;
  // The last tensor ends on an alignment boundary, so every strict prefix is invalid.
  std::map<std::string, GGUFValue> md = {{"general.architecture", GGUFValue::string("llama")},
                                         {"k.arr", GGUFValue::string_array({"x", "yy"})},
                                         {"k.f", GGUFValue::f32_array({1.f, 2.f})},
                                         {"k.u", GGUFValue::u32(3)}};
  std::string d1 = random_bytes(34 * 2, 1), d2 = random_bytes(32, 2);
  const std::string src = dir.file("full.gguf");
  ll::write_gguf(src, md, {{"q", DType::Q8_0, {2, 32}, d1.data(), d1.size()}, {"v", DType::F32, {8}, d2.data(), 32}});
  const std::string full = read_bytes(src);
  ASSERT_NO_THROW(ll::read_gguf(src));
  const std::string path = dir.file("trunc.gguf");
  for (size_t n = 0; n < full.size(); ++n) {
    SCOPED_TRACE("prefix " + std::to_string(n));
    write_bytes(path, full.substr(0, n));
    expect_error([&] { ll::read_gguf(path); }, {path});
  }
}

TEST(GGUF, MaliciousHeaders) {
  TempDir dir;
  const std::string path = dir.file("bad.gguf");
  auto expect_bad = [&](const std::string& bytes, std::vector<std::string> parts) {
    write_bytes(path, bytes);
    parts.insert(parts.begin(), path);
    expect_error([&] { ll::read_gguf(path); }, parts);
  };

  expect_bad("", {"too small"});
  expect_bad("GGU", {"too small"});
  expect_bad(Bytes().raw("GGML").u32(3).u64(0).u64(0).b, {"magic"});
  expect_bad(Bytes().u32(0x46554747).u32(1).u64(0).u64(0).b, {"version 1"});
  expect_bad(Bytes().u32(0x46554747).u32(0x03000000).u64(0).u64(0).b, {"version", "big-endian"});
  expect_bad(Bytes().u32(0x46554747).u32(4).u64(0).u64(0).b, {"version 4"});
  expect_bad(Bytes().u32(0x46554747).u32(3).u64(0).b, {"metadata count"});
  expect_bad(Bytes().u32(0x46554747).u32(3).u64(~0ull).u64(0).raw(std::string(64, 'x')).b, {"tensors"});
  expect_bad(Bytes().u32(0x46554747).u32(3).u64(0).u64(1ull << 62).raw(std::string(64, 'x')).b, {"metadata entries"});
  expect_bad(Bytes().u32(0x46554747).u32(3).u64(1ull << 60).u64(1ull << 60).b, {"can hold"});

  // Key length past EOF; empty key; duplicate key.
  expect_bad(assemble({Bytes().u64(1000).raw("abc").u32(4).u32(0).b}, {}, ""), {"metadata entry #0", "key length"});
  expect_bad(assemble({Bytes().u64(~0ull).raw("abcdefghijklmn").b}, {}, ""), {"metadata entry #0"});
  expect_bad(assemble({Bytes().str("").u32(4).u32(0).b}, {}, ""), {"empty key"});
  expect_bad(assemble({kv_u32("dup", 1), kv_u32("dup", 2)}, {}, ""), {"'dup'", "duplicate key"});
  // String value length past EOF.
  expect_bad(assemble({Bytes().str("name").u32(8).u64(1ull << 40).raw("xx").b}, {}, ""),
             {"'name'", "string value length"});
  // Unknown value types, bool out of range, nested arrays.
  expect_bad(assemble({Bytes().str("weird").u32(13).u32(0).b}, {}, ""), {"'weird'", "unknown value type 13"});
  expect_bad(assemble({Bytes().str("weird").u32(0xffffffff).u32(0).b}, {}, ""), {"'weird'", "unknown value type"});
  expect_bad(assemble({Bytes().str("flag").u32(7).u8(2).b}, {}, ""), {"'flag'", "bool"});
  expect_bad(assemble({Bytes().str("arr").u32(9).u32(42).u64(1).u32(0).b}, {}, ""),
             {"'arr'", "unknown array element type 42"});
  expect_bad(assemble({Bytes().str("arr").u32(9).u32(9).u64(1).u32(4).u64(1).u32(0).b}, {}, ""),
             {"'arr'", "nested"});
  // Array counts that overflow count * element size, or run past EOF.
  expect_bad(assemble({Bytes().str("arr").u32(9).u32(4).u64(1ull << 62).u32(0).b}, {}, ""), {"'arr'", "array"});
  expect_bad(assemble({Bytes().str("arr").u32(9).u32(12).u64(~0ull).u64(0).b}, {}, ""), {"'arr'", "array"});
  expect_bad(assemble({Bytes().str("arr").u32(9).u32(8).u64(1ull << 61).u64(0).b}, {}, ""), {"'arr'", "array"});
  expect_bad(assemble({Bytes().str("arr").u32(9).u32(8).u64(2).str("ok").u64(1ull << 50).b}, {}, ""),
             {"'arr'", "array string length"});
  expect_bad(assemble({Bytes().str("arr").u32(9).u32(0).u64(100).raw("abc").b}, {}, ""), {"'arr'"});

  // general.alignment of the wrong type or value.
  expect_bad(assemble({Bytes().str("general.alignment").u32(10).u64(32).b}, {}, ""), {"general.alignment", "u32"});
  expect_bad(assemble({kv_u32("general.alignment", 0)}, {}, ""), {"general.alignment", "power of two"});
  expect_bad(assemble({kv_u32("general.alignment", 48)}, {}, ""), {"general.alignment", "power of two"});
  expect_bad(assemble({kv_u32("general.alignment", 1u << 17)}, {}, ""), {"general.alignment", "power of two"});
}

TEST(GGUF, MaliciousTensorInfos) {
  TempDir dir;
  const std::string path = dir.file("bad.gguf");
  auto expect_bad = [&](const std::string& bytes, std::vector<std::string> parts) {
    write_bytes(path, bytes);
    parts.insert(parts.begin(), path);
    expect_error([&] { ll::read_gguf(path); }, parts);
  };
  const std::string d64(64, '\x11');
  const std::vector<std::string> kvs = {kv_str("general.architecture", "llama")};

  // Sanity: a good one loads.
  write_bytes(path, assemble(kvs, {tinfo("w", {4, 2}, 0, 0), tinfo("x", {8}, 0, 32)}, d64));
  EXPECT_EQ(ll::read_gguf(path).tensors.size(), 2u);

  expect_bad(assemble(kvs, {tinfo("w", {4}, 99, 0)}, d64), {"'w'", "unsupported ggml type 99"});
  expect_bad(assemble(kvs, {tinfo("w", {32}, 3, 0)}, d64), {"'w'", "ggml type 3"});  // Q4_1
  expect_bad(assemble(kvs, {tinfo("w", {}, 0, 0)}, d64), {"'w'", "n_dims is 0"});
  expect_bad(assemble(kvs, {tinfo("w", {1, 1, 1, 1, 1}, 0, 0)}, d64), {"'w'", "n_dims is 5"});
  expect_bad(assemble(kvs, {Bytes().str("w").u32(0xffffffff).u64(1).u32(0).u64(0).b}, d64), {"'w'", "n_dims"});
  expect_bad(assemble(kvs, {tinfo("w", {~0ull}, 0, 0)}, d64), {"'w'", "negative or huge"});
  expect_bad(assemble(kvs, {tinfo("w", {1ull << 63}, 0, 0)}, d64), {"'w'", "negative or huge"});
  expect_bad(assemble(kvs, {tinfo("w", {1ull << 40, 1ull << 40}, 0, 0)}, d64), {"'w'", "overflows"});
  expect_bad(assemble(kvs, {tinfo("w", {1ull << 62, 2}, 0, 0)}, d64), {"'w'", "overflows"});
  expect_bad(assemble(kvs, {tinfo("w", {1ull << 62}, 0, 0)}, d64), {"'w'", "overflows"});  // bytes
  expect_bad(assemble(kvs, {tinfo("w", {1ull << 60}, 0, 0)}, d64), {"'w'", "past the end"});
  expect_bad(assemble(kvs, {tinfo("q", {33}, 8, 0)}, d64), {"'q'", "multiple of 32"});
  expect_bad(assemble(kvs, {tinfo("q", {48, 2}, 2, 0)}, d64), {"'q'", "multiple of 32"});
  expect_bad(assemble(kvs, {tinfo("w", {4}, 0, 16)}, d64), {"'w'", "not a multiple of the alignment"});
  expect_bad(assemble(kvs, {tinfo("w", {4}, 0, 1)}, d64), {"'w'", "not a multiple of the alignment"});
  expect_bad(assemble(kvs, {tinfo("w", {4}, 0, 64)}, d64), {"'w'", "past the end"});
  expect_bad(assemble(kvs, {tinfo("w", {17}, 0, 0)}, d64), {"'w'", "past the end"});
  expect_bad(assemble(kvs, {tinfo("w", {4}, 0, ~0ull & ~31ull)}, d64), {"'w'", "past the end"});
  expect_bad(assemble(kvs, {tinfo("w", {16}, 0, 0), tinfo("x", {4}, 0, 32)}, d64), {"'w'", "'x'", "overlap"});
  expect_bad(assemble(kvs, {tinfo("x", {4}, 0, 32), tinfo("w", {9}, 0, 0)}, d64), {"'w'", "'x'", "overlap"});
  expect_bad(assemble(kvs, {tinfo("w", {4}, 0, 0), tinfo("x", {4}, 0, 0)}, d64), {"overlap"});
  expect_bad(assemble(kvs, {tinfo("w", {4}, 0, 0), tinfo("w", {4}, 0, 32)}, d64), {"'w'", "duplicate tensor name"});
  expect_bad(assemble(kvs, {tinfo("", {4}, 0, 0)}, d64), {"empty tensor name"});
  expect_bad(assemble(kvs, {Bytes().str("w").u32(2).u64(4).b}, ""), {"'w'"});
  // Tensor name length past EOF.
  expect_bad(assemble(kvs, {Bytes().u64(1ull << 50).raw("w").b}, ""), {"tensor info #0", "tensor name"});
  // Data section starts past EOF (file ends inside the header padding).
  {
    const std::string f = assemble(kvs, {tinfo("w", {0}, 0, 0)}, "", /*align=*/1);
    ASSERT_NE(f.size() % 32, 0u);
    expect_bad(f, {"past the end"});
  }
  // A custom alignment applies to offsets.
  expect_bad(assemble({kv_u32("general.alignment", 64)}, {tinfo("w", {4}, 0, 32)}, d64 + d64, 64),
             {"'w'", "alignment 64"});

  // Zero-size tensors may share an offset with anything.
  write_bytes(path, assemble(kvs, {tinfo("w", {8}, 0, 0), tinfo("z", {0, 3}, 0, 0), tinfo("e", {0}, 8, 32)}, d64));
  GGUFFile f = ll::read_gguf(path);
  EXPECT_EQ(f.tensors.get("z").shape, (std::vector<int64_t>{3, 0}));
  EXPECT_EQ(f.tensors.get("z").nbytes, 0u);
  EXPECT_EQ(f.tensors.get("e").nbytes, 0u);
}

TEST(GGUF, RandomByteFlips) {
  TempDir dir;
  const auto ts = sample_tensors();
  auto md = sample_metadata();
  md["arr.u8"] = GGUFValue::u8_array(random_bytes(100, 3));  // keep the file small
  const std::string src = dir.file("src.gguf");
  ll::write_gguf(src, md, to_write(ts));
  const std::string full = read_bytes(src);
  // Header region is where flips matter; flip mostly there, sometimes anywhere.
  const size_t header_end = std::min<size_t>(full.size(), 2048);
  std::mt19937 rng(12345);
  const std::string path = dir.file("flip.gguf");
  int loaded = 0, rejected = 0;
  for (int iter = 0; iter < 400; ++iter) {
    std::string s = full;
    const int flips = 1 + int(rng() % 3);
    for (int k = 0; k < flips; ++k) {
      const size_t limit = (rng() % 4 == 0) ? s.size() : header_end;
      const size_t pos = rng() % limit;
      if (rng() % 2)
        s[pos] = char(s[pos] ^ (1u << (rng() % 8)));
      else
        s[pos] = char(rng() & 0xff);
    }
    write_bytes(path, s);
    try {
      GGUFFile f = ll::read_gguf(path);
      ++loaded;
      // Touch every byte the reader hands out (ASan catches anything outside the mapping).
      uint64_t sum = 0;
      for (const auto& [name, t] : f.tensors.all()) {
        const auto* p = static_cast<const uint8_t*>(t.data);
        for (size_t i = 0; i < t.nbytes; ++i) sum += p[i];
        EXPECT_EQ(t.nbytes, ll::tensor_nbytes(t.dtype, t.shape));
      }
      (void)sum;
    } catch (const ll::Error& e) {
      ++rejected;
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(rejected, 0);
  EXPECT_GT(loaded, 0);
}

TEST(GGUF, WriterValidatesAndLeavesNoTempFile) {
  TempDir dir;
  const std::string good = random_bytes(64, 7);
  const std::map<std::string, GGUFValue> md = {{"general.architecture", GGUFValue::string("llama")}};

  // Into a directory that does not exist.
  const std::string nodir = (dir.path / "no" / "such" / "dir" / "x.gguf").string();
  expect_error([&] { ll::write_gguf(nodir, md, {}); }, {nodir});
  EXPECT_EQ(dir.count(), 0u);

  const std::string path = dir.file("x.gguf");
  auto expect_bad = [&](const std::vector<GGUFTensorToWrite>& ts, std::vector<std::string> parts,
                        const std::map<std::string, GGUFValue>& m, uint32_t alignment = 32) {
    parts.insert(parts.begin(), path);
    expect_error([&] { ll::write_gguf(path, m, ts, alignment); }, parts);
    EXPECT_EQ(dir.count(), 0u) << "temp or partial file left behind";
  };
  expect_bad({{"w", DType::F32, {4, 4}, good.data(), 60}}, {"'w'", "nbytes 60"}, md);
  expect_bad({{"q", DType::Q8_0, {2, 33}, good.data(), 64}}, {"'q'", "multiple of 32"}, md);
  expect_bad({{"w", DType::F32, {}, good.data(), 4}}, {"'w'", "1 to 4 dimensions"}, md);
  expect_bad({{"w", DType::F32, {1, 1, 1, 1, 4}, good.data(), 16}}, {"'w'", "1 to 4 dimensions"}, md);
  expect_bad({{"w", DType::F32, {-1}, good.data(), 0}}, {"'w'"}, md);
  expect_bad({{"w", DType::U8, {4}, good.data(), 4}}, {"'w'", "U8"}, md);
  expect_bad({{"w", DType::F32, {4}, nullptr, 16}}, {"'w'", "null data"}, md);
  expect_bad({{"w", DType::F32, {4}, good.data(), 16}, {"w", DType::F32, {4}, good.data(), 16}}, {"'w'", "duplicate"},
             md);
  expect_bad({{"w", DType::F32, {4}, good.data(), 16}}, {"alignment 48"}, md, 48);
  expect_bad({}, {"alignment 0"}, md, 0);
  {
    GGUFValue v = GGUFValue::u8(0);
    v.u = 256;
    expect_bad({}, {"'a.u8'", "does not fit"}, {{"a.u8", v}});
    GGUFValue big = GGUFValue::f32(0);
    big.f = 1e300;
    expect_bad({}, {"'a.f32'", "f32"}, {{"a.f32", big}});
  }
  expect_bad({}, {"'arr'", "does not fit"}, {{"arr", GGUFValue::int_array(VT::I16, {40000})}});
  expect_bad({}, {"'arr'", "does not fit"}, {{"arr", GGUFValue::int_array(VT::U32, {-1})}});
  {
    GGUFValue nested = GGUFValue::i32_array({1});
    nested.elem_type = VT::ARRAY;
    expect_bad({}, {"'arr'", "nested"}, {{"arr", nested}});
    GGUFValue bad = GGUFValue::u32(1);
    bad.type = VT(77);
    expect_bad({}, {"'bad'", "invalid value type"}, {{"bad", bad}});
  }
  expect_bad({}, {"general.alignment"}, {{"general.alignment", GGUFValue::u32(64)}});
  expect_bad({}, {"general.alignment"}, {{"general.alignment", GGUFValue::u64(32)}});
  expect_bad({}, {"empty metadata key"}, {{"", GGUFValue::u32(1)}});
  expect_error([] { GGUFValue::int_array(VT::F32, {}); }, {"int_array"});

  // A fill callback that throws aborts the write, and an existing file survives a failed write.
  ll::write_gguf(path, md, {{"w", DType::F32, {16}, good.data(), 64}});
  const std::string before = read_bytes(path);
  expect_error(
      [&] {
        ll::write_gguf_streaming(path, md, {{"w", DType::F32, {16}, nullptr, 64}, {"v", DType::F32, {16}, nullptr, 64}},
                                 [](size_t i, uint8_t* out) {
                                   if (i == 1) throw ll::Error("converter failed");
                                   std::memset(out, 0x5a, 64);
                                 });
      },
      {"converter failed"});
  EXPECT_EQ(dir.count(), 1u);
  EXPECT_EQ(read_bytes(path), before);
  expect_error([&] { ll::write_gguf(path, md, {{"w", DType::F32, {16}, good.data(), 63}}); }, {path, "'w'"});
  EXPECT_EQ(dir.count(), 1u);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_NO_THROW(ll::read_gguf(path));
}

TEST(GGUF, ReadMissingFile) {
  TempDir dir;
  const std::string p = dir.file("nope.gguf");
  expect_error([&] { ll::read_gguf(p); }, {p});
  expect_error([&] { ll::read_gguf(dir.path.string()); }, {dir.path.string()});
}
