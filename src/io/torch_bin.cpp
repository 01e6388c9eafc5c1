// torch.save checkpoints (zip + pickle protocol 2) read without Python.
// The zip layer only locates STORED entries inside the mapping; the pickle layer is a tiny VM
// that understands exactly what torch.save writes for a state dict and rejects everything else.
// It never calls anything: GLOBALs are matched against a fixed allow-list and only recorded.
#include <array>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string_view>
#include <unordered_map>

#include "io/tensor_store.h"

namespace ll {

namespace {

uint64_t rd(const uint8_t* p, int n) {  // little-endian unsigned of n bytes
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

uint32_t crc32(const uint8_t* p, size_t n) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// ---------------------------------------------------------------------------------------------
// zip

struct ZipEntry {
  const uint8_t* data;
  uint64_t size;
  uint32_t crc;
};

std::unordered_map<std::string, ZipEntry> read_zip(const MappedFile& f) {
  const uint8_t* b = f.data();
  const uint64_t size = f.size();
  auto fail = [&](const std::string& what) -> Error { return Error(f.path() + ": " + what); };
  if (size < 22) throw fail("too small to be a zip archive (" + std::to_string(size) + " bytes; truncated?)");

  // End of central directory: last 22 bytes plus up to 64 KiB of comment.
  uint64_t eocd = UINT64_MAX;
  for (uint64_t p = size - 22 + 1; p-- > 0 && size - 22 - p <= 0xFFFF;) {
    if (rd(b + p, 4) == 0x06054b50 && p + 22 + rd(b + p + 20, 2) <= size) {
      eocd = p;
      break;
    }
  }
  if (eocd == UINT64_MAX) {
    if (size >= 2 && b[0] == 0x80 && b[1] == 0x02)
      throw fail("legacy (pre-zip) torch.save format is not supported; re-save it with torch >= 1.6");
    throw fail("not a zip archive or truncated (no end-of-central-directory record)");
  }
  uint64_t n_entries = rd(b + eocd + 10, 2), cd_size = rd(b + eocd + 12, 4), cd_off = rd(b + eocd + 16, 4);
  if (rd(b + eocd + 4, 2) != 0 || rd(b + eocd + 6, 2) != 0) throw fail("multi-disk zip archives are not supported");
  // Zip64: a locator sits right before the classic record and points to the 64-bit record.
  if (eocd >= 20 && rd(b + eocd - 20, 4) == 0x07064b50) {
    uint64_t z = rd(b + eocd - 20 + 8, 8);
    if (z > eocd - 20 || eocd - 20 - z < 56 || rd(b + z, 4) != 0x06064b50)
      throw fail("bad zip64 end-of-central-directory record");
    n_entries = rd(b + z + 32, 8);
    cd_size = rd(b + z + 40, 8);
    cd_off = rd(b + z + 48, 8);
  } else if (n_entries == 0xFFFF || cd_size == 0xFFFFFFFF || cd_off == 0xFFFFFFFF) {
    throw fail("zip64 archive without a zip64 locator (truncated?)");
  }
  if (cd_off > size || cd_size > size - cd_off) throw fail("central directory lies outside the file (truncated?)");

  std::unordered_map<std::string, ZipEntry> out;
  uint64_t p = cd_off;
  const uint64_t cd_end = cd_off + cd_size;
  for (uint64_t i = 0; i < n_entries; ++i) {
    if (cd_end - p < 46 || rd(b + p, 4) != 0x02014b50)
      throw fail("corrupt central directory entry #" + std::to_string(i) + " (truncated?)");
    const uint64_t flags = rd(b + p + 8, 2), method = rd(b + p + 10, 2), nlen = rd(b + p + 28, 2),
                   xlen = rd(b + p + 30, 2), clen = rd(b + p + 32, 2);
    if (cd_end - p - 46 < nlen + xlen + clen) throw fail("corrupt central directory entry #" + std::to_string(i));
    std::string name(reinterpret_cast<const char*>(b + p + 46), nlen);
    auto bad = [&](const std::string& what) -> Error { return fail("zip entry '" + name + "': " + what); };
    uint64_t csize = rd(b + p + 20, 4), usize = rd(b + p + 24, 4), loff = rd(b + p + 42, 4);
    const uint32_t crc = uint32_t(rd(b + p + 16, 4));
    // Zip64 extra field: only the fields saturated in the fixed record are present, in this order.
    if (usize == 0xFFFFFFFF || csize == 0xFFFFFFFF || loff == 0xFFFFFFFF) {
      const uint8_t* x = b + p + 46 + nlen;
      bool found = false;
      for (uint64_t q = 0; q + 4 <= xlen;) {
        uint64_t id = rd(x + q, 2), len = rd(x + q + 2, 2);
        if (q + 4 + len > xlen) break;
        if (id == 0x0001) {
          const uint8_t* v = x + q + 4;
          uint64_t need = 8 * ((usize == 0xFFFFFFFF) + (csize == 0xFFFFFFFF) + (loff == 0xFFFFFFFF));
          if (len < need) throw bad("zip64 extra field too short");
          if (usize == 0xFFFFFFFF) usize = rd(v, 8), v += 8;
          if (csize == 0xFFFFFFFF) csize = rd(v, 8), v += 8;
          if (loff == 0xFFFFFFFF) loff = rd(v, 8);
          found = true;
          break;
        }
        q += 4 + len;
      }
      if (!found) throw bad("sizes need a zip64 extra field, which is missing");
    }
    p += 46 + nlen + xlen + clen;

    if (flags & 1) throw bad("encrypted entries are not supported");
    if (method != 0)
      throw bad("compressed with method " + std::to_string(method) +
                "; only uncompressed (STORED) entries are supported, as torch.save writes them");
    if (csize != usize) throw bad("stored entry with different compressed and uncompressed sizes");
    // Local header: sizes there may be zero (data descriptor), so trust the central directory
    // for sizes and use the local header only for where the data starts.
    if (loff > size || size - loff < 30 || rd(b + loff, 4) != 0x04034b50)
      throw bad("bad local file header (truncated?)");
    const uint64_t lnlen = rd(b + loff + 26, 2), lxlen = rd(b + loff + 28, 2);
    if (size - loff - 30 < lnlen + lxlen) throw bad("local file header runs past the end of the file");
    if (rd(b + loff + 8, 2) != method || lnlen != nlen || std::memcmp(b + loff + 30, name.data(), nlen) != 0)
      throw bad("local file header does not match the central directory");
    const uint64_t start = loff + 30 + lnlen + lxlen;
    if (usize > size - start) throw bad("data runs past the end of the file (truncated?)");
    if (!out.emplace(name, ZipEntry{b + start, usize, crc}).second) throw bad("duplicate entry");
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// pickle

// Values live in an arena and refer to each other by index: no ownership cycles, and no
// recursive destruction however deeply a hostile pickle nests them.
// Far above what a state dict needs (about a dozen objects per tensor), far below exhausting memory.
constexpr size_t kMaxItems = size_t(1) << 22;

enum class Kind : uint8_t { None, Bool, Int, Float, Str, Tuple, List, Dict, Global, Storage, Tensor };

struct Val {
  Kind kind = Kind::None;
  int64_t i = 0;               // Int, Bool; Storage: numel; Tensor: storage offset
  double f = 0;                // Float
  std::string s;               // Str; Global: "module name"; Storage: key
  std::vector<size_t> items;   // Tuple, List; Dict: key, value, key, value...; Tensor: {storage}
  std::vector<int64_t> shape;  // Tensor
  std::vector<int64_t> stride; // Tensor
  DType dtype = DType::F32;    // Storage
};

const char* kind_name(Kind k) {
  static const char* n[] = {"None", "bool", "int", "float", "str", "tuple", "list", "dict", "global", "storage", "tensor"};
  return n[size_t(k)];
}

bool storage_dtype(std::string_view g, DType& out) {
  static const std::pair<std::string_view, DType> table[] = {
      {"torch BFloat16Storage", DType::BF16}, {"torch HalfStorage", DType::F16},
      {"torch FloatStorage", DType::F32},     {"torch DoubleStorage", DType::F64},
      {"torch LongStorage", DType::I64},      {"torch IntStorage", DType::I32},
      {"torch ShortStorage", DType::I16},     {"torch CharStorage", DType::I8},
      {"torch ByteStorage", DType::U8},       {"torch BoolStorage", DType::BOOL}};
  for (const auto& [name, t] : table)
    if (g == name) {
      out = t;
      return true;
    }
  return false;
}

class Unpickler {
 public:
  Unpickler(const std::string& file, const ZipEntry& pkl) : file_(file), p_(pkl.data), n_(pkl.size) {}

  // Runs to STOP and returns the index of the resulting object.
  size_t run() {
    while (true) {
      if (pos_ >= n_) throw fail("data.pkl ends without a STOP opcode (truncated?)");
      op_at_ = pos_;
      const uint8_t op = p_[pos_++];
      switch (op) {
        case 0x80: take(1); break;  // PROTO: version byte, nothing to do
        case '}': push(make(Kind::Dict)); break;
        case ']': push(make(Kind::List)); break;
        case ')': push(make(Kind::Tuple)); break;
        case '(':
          if (marks_.size() >= kMaxItems) throw fail("too many MARKs");
          marks_.push_back(stack_.size());
          break;
        case 'X': push_str(rd(take(4), 4)); break;
        case 0x8c: push_str(rd(take(1), 1)); break;  // SHORT_BINUNICODE
        case 'q': memo_put(rd(take(1), 1)); break;
        case 'r': memo_put(rd(take(4), 4)); break;
        case 'h': push(memo_get(rd(take(1), 1))); break;
        case 'j': push(memo_get(rd(take(4), 4))); break;
        case 'J': push_int(int32_t(uint32_t(rd(take(4), 4)))); break;
        case 'K': push_int(int64_t(rd(take(1), 1))); break;
        case 'M': push_int(int64_t(rd(take(2), 2))); break;
        case 0x8a: {  // LONG1: little-endian two's complement of n bytes
          const uint64_t len = rd(take(1), 1);
          if (len > 8) throw fail("LONG1 integer of " + std::to_string(len) + " bytes is too large");
          uint64_t v = len ? rd(take(len), int(len)) : 0;
          if (len && len < 8 && (v >> (8 * len - 1)) & 1) v |= ~uint64_t(0) << (8 * len);  // sign-extend
          push_int(int64_t(v));
          break;
        }
        case 'N': push(make(Kind::None)); break;
        case 0x88: case 0x89: {
          size_t v = make(Kind::Bool);
          vals_[v].i = op == 0x88;
          push(v);
          break;
        }
        case 'G': {  // BINFLOAT: big-endian double
          const uint8_t* q = take(8);
          uint64_t u = 0;
          for (int k = 0; k < 8; ++k) u = (u << 8) | q[k];
          size_t v = make(Kind::Float);
          std::memcpy(&vals_[v].f, &u, 8);
          push(v);
          break;
        }
        case 't': push(make_tuple(pop_mark())); break;
        case 0x85: case 0x86: case 0x87: {
          std::vector<size_t> items(size_t(op - 0x84));
          for (size_t k = items.size(); k-- > 0;) items[k] = pop();
          push(make_tuple(std::move(items)));
          break;
        }
        case 's': {
          size_t v = pop(), k = pop();
          auto& d = dict_at_top().items;
          d.push_back(k);
          d.push_back(v);
          break;
        }
        case 'u': {
          std::vector<size_t> kv = pop_mark();
          if (kv.size() % 2) throw fail("SETITEMS with an odd number of items");
          auto& d = dict_at_top().items;
          d.insert(d.end(), kv.begin(), kv.end());
          break;
        }
        case 'a': {
          size_t v = pop();
          list_at_top().items.push_back(v);
          break;
        }
        case 'e': {
          std::vector<size_t> v = pop_mark();
          auto& l = list_at_top().items;
          l.insert(l.end(), v.begin(), v.end());
          break;
        }
        case 'c': {
          std::string g = line();
          g += ' ';
          g += line();
          DType unused;
          if (g != "torch._utils _rebuild_tensor_v2" && g != "torch._utils _rebuild_parameter" &&
              g != "collections OrderedDict" && !storage_dtype(g, unused))
            throw fail("refusing pickle GLOBAL '" + g + "' (only torch tensor and storage types are allowed)");
          size_t v = make(Kind::Global);
          vals_[v].s = std::move(g);
          push(v);
          break;
        }
        case 'R': {
          size_t args = pop(), fn = pop();
          push(reduce(fn, args));
          break;
        }
        case 'Q': push(persistent_load(pop())); break;
        case 'b': {  // BUILD: state such as an OrderedDict's _metadata is irrelevant to weights
          pop();
          if (stack_.size() <= base()) throw fail("BUILD without an object");
          break;
        }
        case '.': {
          size_t v = pop();
          if (!stack_.empty() || !marks_.empty()) throw fail("STOP with leftover stack items");
          return v;
        }
        default: {
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          throw fail(std::string("unsupported pickle opcode ") + hex);
        }
      }
    }
  }

  const Val& val(size_t i) const { return vals_[i]; }

 private:
  Error fail(const std::string& what) const {
    return Error(file_ + ": data.pkl offset " + std::to_string(op_at_) + ": " + what);
  }
  const uint8_t* take(uint64_t k) {
    if (k > n_ - pos_) throw fail("truncated (an argument runs past the end of data.pkl)");
    const uint8_t* q = p_ + pos_;
    pos_ += k;
    return q;
  }
  std::string line() {  // GLOBAL arguments: newline-terminated, kept short
    size_t start = pos_;
    while (pos_ < n_ && p_[pos_] != '\n') {
      if (pos_ - start > 256) throw fail("GLOBAL name too long");
      ++pos_;
    }
    if (pos_ >= n_) throw fail("truncated inside a GLOBAL");
    return std::string(reinterpret_cast<const char*>(p_ + start), pos_++ - start);
  }
  size_t make(Kind k) {
    if (vals_.size() >= kMaxItems) throw fail("pickle holds too many objects");
    vals_.push_back(Val{});
    vals_.back().kind = k;
    return vals_.size() - 1;
  }
  size_t make_tuple(std::vector<size_t> items) {
    size_t v = make(Kind::Tuple);
    vals_[v].items = std::move(items);
    return v;
  }
  void push(size_t v) {
    if (stack_.size() >= kMaxItems) throw fail("pickle stack too deep");
    stack_.push_back(v);
  }
  void push_int(int64_t x) {
    size_t v = make(Kind::Int);
    vals_[v].i = x;
    push(v);
  }
  void push_str(uint64_t len) {
    const uint8_t* q = take(len);  // take() bounds the length by the remaining bytes
    size_t v = make(Kind::Str);
    vals_[v].s.assign(reinterpret_cast<const char*>(q), len);
    push(v);
  }
  size_t base() const { return marks_.empty() ? 0 : marks_.back(); }
  size_t pop() {
    if (stack_.size() <= base()) throw fail("pickle stack underflow");
    size_t v = stack_.back();
    stack_.pop_back();
    return v;
  }
  std::vector<size_t> pop_mark() {
    if (marks_.empty()) throw fail("no MARK on the pickle stack");
    std::vector<size_t> items(stack_.begin() + std::ptrdiff_t(marks_.back()), stack_.end());
    stack_.resize(marks_.back());
    marks_.pop_back();
    return items;
  }
  Val& top_of(Kind k, const char* op) {
    if (stack_.size() <= base() || vals_[stack_.back()].kind != k)
      throw fail(std::string(op) + " needs a " + kind_name(k) + " on the stack");
    return vals_[stack_.back()];
  }
  Val& dict_at_top() { return top_of(Kind::Dict, "SETITEM(S)"); }
  Val& list_at_top() { return top_of(Kind::List, "APPEND(S)"); }
  void memo_put(uint64_t key) {
    if (stack_.size() <= base()) throw fail("BINPUT with an empty stack");
    if (memo_.size() >= kMaxItems) throw fail("pickle memo too large");
    memo_[key] = stack_.back();
  }
  size_t memo_get(uint64_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) throw fail("BINGET of undefined memo key " + std::to_string(key));
    return it->second;
  }
  const Val& expect(size_t v, Kind k, const char* what) {
    if (vals_[v].kind != k)
      throw fail(std::string(what) + ": expected " + kind_name(k) + ", got " + kind_name(vals_[v].kind));
    return vals_[v];
  }
  std::vector<int64_t> int_tuple(size_t v, const char* what) {
    std::vector<int64_t> out;
    for (size_t it : expect(v, Kind::Tuple, what).items) out.push_back(expect(it, Kind::Int, what).i);
    return out;
  }

  size_t persistent_load(size_t pid) {
    const Val& t = expect(pid, Kind::Tuple, "persistent id");
    if (t.items.size() != 5 || vals_[t.items[0]].kind != Kind::Str || vals_[t.items[0]].s != "storage")
      throw fail("persistent id is not ('storage', type, key, location, numel)");
    const Val& type = expect(t.items[1], Kind::Global, "storage type");
    DType dt;
    if (!storage_dtype(type.s, dt)) throw fail("'" + type.s + "' is not a storage type");
    std::string key = expect(t.items[2], Kind::Str, "storage key").s;
    expect(t.items[3], Kind::Str, "storage location");
    const int64_t numel = expect(t.items[4], Kind::Int, "storage size").i;
    // The zip entry is looked up once the tensor's name is known, for a better message.
    size_t v = make(Kind::Storage);
    vals_[v].dtype = dt;
    vals_[v].s = std::move(key);
    vals_[v].i = numel;
    return v;
  }

  size_t reduce(size_t fn, size_t args_v) {
    const std::string g = expect(fn, Kind::Global, "REDUCE callable").s;
    const std::vector<size_t> args = expect(args_v, Kind::Tuple, "REDUCE arguments").items;
    if (g == "collections OrderedDict") {
      if (!args.empty()) throw fail("OrderedDict called with arguments");
      return make(Kind::Dict);
    }
    if (g == "torch._utils _rebuild_parameter") {
      if (args.size() != 3) throw fail("_rebuild_parameter expects 3 arguments");
      expect(args[0], Kind::Tensor, "_rebuild_parameter data");
      return args[0];
    }
    if (g == "torch._utils _rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]);
      // value checks wait until the tensor's name is known (see read_torch_bin).
      if (args.size() != 6 && args.size() != 7) throw fail("_rebuild_tensor_v2 expects 6 or 7 arguments");
      expect(args[0], Kind::Storage, "_rebuild_tensor_v2 storage");
      size_t v = make(Kind::Tensor);
      vals_[v].i = expect(args[1], Kind::Int, "_rebuild_tensor_v2 offset").i;
      vals_[v].shape = int_tuple(args[2], "_rebuild_tensor_v2 size");
      vals_[v].stride = int_tuple(args[3], "_rebuild_tensor_v2 stride");
      vals_[v].items = {args[0]};
      return v;
    }
    throw fail("cannot call '" + g + "'");
  }

  std::string file_;
  const uint8_t* p_;
  uint64_t n_;
  uint64_t pos_ = 0, op_at_ = 0;
  std::vector<Val> vals_;
  std::vector<size_t> stack_, marks_;
  std::unordered_map<uint64_t, size_t> memo_;
};

}  // namespace

TensorStore read_torch_bin(const std::string& path) {
  auto file = std::make_shared<MappedFile>(path);
  const auto zip = read_zip(*file);

  // torch.save puts everything under one top folder whose name varies ("archive", file stem).
  std::string prefix;
  bool found = false;
  for (const auto& [name, e] : zip) {
    auto slash = name.find('/');
    if (slash != std::string::npos && name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      if (found) throw Error(path + ": archive holds more than one data.pkl");
      prefix = name.substr(0, slash);
      found = true;
    }
  }
  if (!found) throw Error(path + ": no <archive>/data.pkl entry (not a torch.save checkpoint?)");
  const ZipEntry& pkl = zip.at(prefix + "/data.pkl");
  if (crc32(pkl.data, pkl.size) != pkl.crc) throw Error(path + ": data.pkl fails its CRC check (corrupt file)");

  // Weights are read in place, so they must be little-endian (newer torch records the order).
  if (auto bo = zip.find(prefix + "/byteorder"); bo != zip.end() &&
      std::string_view(reinterpret_cast<const char*>(bo->second.data), bo->second.size) != "little")
    throw Error(path + ": tensors are stored big-endian; only little-endian checkpoints are supported");

  Unpickler up(path, pkl);
  const Val& top = up.val(up.run());
  if (top.kind != Kind::Dict) throw Error(path + ": top-level object is a " + kind_name(top.kind) + ", not a state dict");

  TensorStore store;
  for (size_t k = 0; k + 1 < top.items.size(); k += 2) {
    const Val& key = up.val(top.items[k]);
    if (key.kind != Kind::Str) throw Error(path + ": state dict key is a " + std::string(kind_name(key.kind)) + ", not a string");
    auto bad = [&](const std::string& what) { return Error(path + ": tensor '" + key.s + "': " + what); };
    const Val& tv = up.val(top.items[k + 1]);
    if (tv.kind != Kind::Tensor) throw bad(std::string("value is a ") + kind_name(tv.kind) + ", not a tensor");
    const Val& st = up.val(tv.items[0]);
    const std::string entry = prefix + "/data/" + st.s;
    auto ze = zip.find(entry);
    if (ze == zip.end()) throw bad("storage '" + st.s + "' is missing from the archive (no entry '" + entry + "')");
    const uint64_t esz = dtype_size(st.dtype);
    if (st.i < 0 || uint64_t(st.i) > ze->second.size / esz || uint64_t(st.i) * esz != ze->second.size)
      throw bad("storage '" + st.s + "' claims " + std::to_string(st.i) + " elements of " + dtype_name(st.dtype) +
                " but its entry holds " + std::to_string(ze->second.size) + " bytes");

    TensorRef t;
    t.name = key.s;
    t.file = path;
    t.dtype = st.dtype;
    t.shape = tv.shape;
    if (tv.shape.size() != tv.stride.size()) throw bad("size and stride have different lengths");
    uint64_t numel = 1;
    for (int64_t d : tv.shape) {
      if (d < 0) throw bad("negative dimension");
      if (__builtin_mul_overflow(numel, uint64_t(d), &numel) || numel > uint64_t(std::numeric_limits<int64_t>::max()))
        throw bad("shape overflows");
    }
    // Row-major contiguity; size-1 dims and empty tensors may carry any stride, as in torch.
    if (numel > 0) {
      int64_t expect = 1;
      for (size_t d = tv.shape.size(); d-- > 0;) {
        if (tv.shape[d] != 1 && tv.stride[d] != expect)
          throw bad("non-contiguous strides are not supported (save it with .contiguous())");
        expect *= tv.shape[d];
      }
    }
    if (tv.i < 0 || uint64_t(tv.i) > uint64_t(st.i) || numel > uint64_t(st.i) - uint64_t(tv.i))
      throw bad("offset " + std::to_string(tv.i) + " + " + std::to_string(numel) + " elements exceeds storage '" +
                st.s + "' of " + std::to_string(st.i) + " elements");
    t.data = ze->second.data + uint64_t(tv.i) * esz;
    t.nbytes = size_t(numel * esz);
    store.add(std::move(t));
  }
  store.keep_alive(std::move(file));
  return store;
}

}  // namespace ll
