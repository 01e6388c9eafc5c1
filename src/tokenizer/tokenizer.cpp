#include "tokenizer/tokenizer.h"

#include <sentencepiece_processor.h>

#include <fstream>
#include <sstream>

#include "util/error.h"

namespace ll {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::string bytes;
  std::string name;
};

Tokenizer::Tokenizer(const std::string& model_path) {
  std::ifstream f(model_path, std::ios::binary);
  if (!f) throw Error("cannot open tokenizer model '" + model_path + "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  if (!f.good() && !f.eof()) throw Error("cannot read tokenizer model '" + model_path + "'");
  *this = from_bytes(ss.str(), model_path);
}

Tokenizer Tokenizer::from_bytes(const std::string& serialized_model_proto, const std::string& name_for_errors) {
  Tokenizer t;
  t.impl_ = std::make_unique<Impl>();
  t.impl_->bytes = serialized_model_proto;
  t.impl_->name = name_for_errors;
  if (serialized_model_proto.empty()) throw Error("tokenizer model '" + name_for_errors + "' is empty");
  auto st = t.impl_->sp.LoadFromSerializedProto(serialized_model_proto);
  if (!st.ok())
    throw Error("invalid SentencePiece model '" + name_for_errors + "': " + st.ToString());
  if (t.impl_->sp.GetPieceSize() <= 0) throw Error("tokenizer model '" + name_for_errors + "' has no pieces");
  return t;
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  auto st = impl_->sp.Encode(text, &ids);
  if (!st.ok()) throw Error("tokenizer '" + impl_->name + "': encode failed: " + st.ToString());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  const int n = vocab_size();
  for (int id : ids)
    if (id < 0 || id >= n)
      throw Error("tokenizer '" + impl_->name + "': token id " + std::to_string(id) + " outside vocab of " +
                  std::to_string(n));
  std::string text;
  auto st = impl_->sp.Decode(ids, &text);
  if (!st.ok()) throw Error("tokenizer '" + impl_->name + "': decode failed: " + st.ToString());
  return text;
}

int Tokenizer::bos() const { return impl_->sp.bos_id(); }
int Tokenizer::eos() const { return impl_->sp.eos_id(); }
int Tokenizer::unk() const { return impl_->sp.unk_id(); }
int Tokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }

std::string Tokenizer::piece(int id) const {
  if (id < 0 || id >= vocab_size())
    throw Error("tokenizer '" + impl_->name + "': token id " + std::to_string(id) + " outside vocab");
  return impl_->sp.IdToPiece(id);
}

float Tokenizer::score(int id) const {
  piece(id);  // range check
  return impl_->sp.GetScore(id);
}

int Tokenizer::token_type(int id) const {
  piece(id);  // range check
  const auto& sp = impl_->sp;
  if (sp.IsUnknown(id)) return 2;
  if (sp.IsControl(id)) return 3;
  if (sp.IsUnused(id)) return 5;
  if (sp.IsByte(id)) return 6;
  return 1;
}

const std::string& Tokenizer::serialized() const { return impl_->bytes; }
const std::string& Tokenizer::name() const { return impl_->name; }

// ---- StreamDecoder ----
// Decoding is done on a window of recent ids with SentencePiece itself, so byte grouping, U+FFFD
// for invalid bytes and the dummy-prefix rule are exactly those of decode(). A window that does
// not start at id 0 is decoded behind a sentinel piece, so SentencePiece never treats its first
// piece as the start of the text (which would drop that piece's leading space).

StreamDecoder::StreamDecoder(const Tokenizer& tok) : tok_(&tok) {
  auto ids = tok.encode("a");
  if (!ids.empty()) {
    sentinel_ = ids.back();
    sentinel_text_ = tok.decode({sentinel_});
  }
}

std::string StreamDecoder::window_text(size_t from, size_t to) const {
  if (from == 0 || sentinel_ < 0) return tok_->decode(std::vector<int>(ids_.begin(), ids_.begin() + to));
  std::vector<int> w{sentinel_};
  w.insert(w.end(), ids_.begin() + from, ids_.begin() + to);
  std::string s = tok_->decode(w);
  return s.compare(0, sentinel_text_.size(), sentinel_text_) == 0 ? s.substr(sentinel_text_.size()) : s;
}

static bool ends_incomplete(const std::string& s) {
  // SentencePiece turns an unfinished UTF-8 sequence into U+FFFD (EF BF BD); wait for more bytes.
  return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0;
}

std::string StreamDecoder::push(int id) {
  if (id < 0 || id >= tok_->vocab_size())
    throw Error("stream decoder: token id " + std::to_string(id) + " outside vocab of '" + tok_->name() + "'");
  ids_.push_back(id);
  const std::string before = window_text(prefix_, read_);
  const std::string now = window_text(prefix_, ids_.size());
  if (now.size() <= before.size() || ends_incomplete(now)) return {};
  prefix_ = read_;
  read_ = ids_.size();
  return now.substr(before.size());
}

std::string StreamDecoder::flush() {
  std::string out;
  if (read_ < ids_.size()) {
    const std::string before = window_text(prefix_, read_);
    const std::string now = window_text(prefix_, ids_.size());
    if (now.size() > before.size()) out = now.substr(before.size());
  }
  reset();
  return out;
}

void StreamDecoder::reset() {
  ids_.clear();
  prefix_ = read_ = 0;
}

}  // namespace ll
