#include "train/data.h"

#include <fstream>
#include <sstream>

#include "util/error.h"

namespace ll::train {

namespace {

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("data file '" + path + "': cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool blank(const std::string& s) { return s.find_first_not_of(" \t\r\n") == std::string::npos; }

std::vector<std::string> split_text(const std::string& text, const std::string& mode) {
  std::vector<std::string> out;
  if (mode == "file") {
    if (!blank(text)) out.push_back(text);
    return out;
  }
  std::istringstream in(text);
  std::string line, cur;
  while (std::getline(in, line)) {
    if (mode == "line") {
      if (!blank(line)) out.push_back(line);
    } else if (blank(line)) {  // paragraph
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += (cur.empty() ? "" : "\n") + line;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

TextCorpus::TextCorpus(const std::vector<std::string>& files, const std::string& split, const Tokenizer& tok,
                       double eval_fraction, uint64_t seed)
    : vocab_(tok.vocab_size()) {
  if (split != "file" && split != "paragraph" && split != "line")
    throw Error("text split '" + split + "' is not one of file, paragraph, line");
  std::vector<Document> docs;
  for (const auto& path : files)
    for (const auto& text : split_text(read_file(path), split)) {
      Document d;
      d.tokens.push_back(tok.bos());
      for (int id : tok.encode(text)) d.tokens.push_back(id);
      d.tokens.push_back(tok.eos());
      d.loss.assign(d.tokens.size(), 1);
      d.loss[0] = 0;  // BOS is never predicted (EasyLM TextProcessor)
      docs.push_back(std::move(d));
    }
  if (docs.empty()) throw Error("data files contain no text");
  for (size_t i = 0; i < docs.size(); ++i) {
    Rng r(mix_seed(seed, i));
    (r.uniform() < eval_fraction ? eval_ : train_).push_back(std::move(docs[i]));
  }
  if (eval_fraction > 0 && eval_.empty() && train_.size() > 1) {
    eval_.push_back(std::move(train_.back()));
    train_.pop_back();
  }
  if (train_.empty()) std::swap(train_, eval_);
}

int64_t TextCorpus::train_tokens() const {
  int64_t n = 0;
  for (const auto& d : train_) n += int64_t(d.tokens.size());
  return n;
}

Document TextSource::next(Rng& rng) const {
  const auto& docs = eval_ && !corpus_->eval().empty() ? corpus_->eval() : corpus_->train();
  return docs[rng.below(uint32_t(docs.size()))];
}

void MixtureSource::add(std::shared_ptr<const DocumentSource> s, double weight) {
  sources_.push_back(std::move(s));
  cumulative_.push_back((cumulative_.empty() ? 0.0 : cumulative_.back()) + weight);
}

Document MixtureSource::next(Rng& rng) const {
  if (sources_.size() == 1) return sources_[0]->next(rng);
  const double u = rng.uniform() * cumulative_.back();
  size_t i = 0;
  while (i + 1 < sources_.size() && u >= cumulative_[i]) ++i;
  return sources_[i]->next(rng);
}

int MixtureSource::vocab_needed() const {
  int v = 0;
  for (const auto& s : sources_) v = std::max(v, s->vocab_needed());
  return v;
}

PackedStreams::PackedStreams(std::shared_ptr<const DocumentSource> src, uint64_t seed, int streams, int k, int S)
    : src_(std::move(src)), seed_(seed), k_(k), S_(S), streams_(streams) {
  for (auto& s : streams_) pull(s);
}

Document PackedStreams::document(uint64_t index) const {
  Rng r(mix_seed(seed_, index));
  Document d = src_->next(r);
  if (d.tokens.empty() || d.tokens.size() != d.loss.size()) throw Error("a data source produced an empty document");
  if (!d.attend.empty() && d.attend.size() != d.tokens.size())
    throw Error("a data source produced attention targets that do not match its tokens");
  for (size_t i = 0; i < d.attend.size(); ++i)
    if (d.attend[i] >= int32_t(i)) throw Error("a data source produced an attention target that is not before its row");
  return d;
}

void PackedStreams::pull(Stream& s) {
  s.index = next_doc_++;
  s.doc = document(s.index);
  s.pos = 0;
}

void PackedStreams::next(std::vector<int>& inputs, std::vector<int>& targets, std::vector<uint8_t>& mask,
                         std::vector<int32_t>* attend) {
  const size_t per = size_t(k_) * S_;
  inputs.resize(per * streams_.size());
  targets.resize(inputs.size());
  mask.resize(inputs.size());
  if (attend) attend->assign(inputs.size(), -1);
  for (size_t si = 0; si < streams_.size(); ++si) {
    Stream& s = streams_[si];
    // Take per + 1 tokens, then step back one: the last one is also the next step's first input.
    for (size_t t = 0; t <= per; ++t) {
      if (s.pos == s.doc.tokens.size()) pull(s);
      const int tok = s.doc.tokens[s.pos];
      if (t < per) inputs[si * per + t] = tok;
      if (t > 0) {
        targets[si * per + t - 1] = tok;
        mask[si * per + t - 1] = s.doc.loss[s.pos];
        if (attend && !s.doc.attend.empty() && s.doc.attend[s.pos] >= 0) {
          // input row t holds document position s.pos, so position a is row t - s.pos + a
          const int64_t row = int64_t(t) - int64_t(s.pos) + s.doc.attend[s.pos];
          if (row >= 0) (*attend)[si * per + t - 1] = int32_t(si * per + size_t(row));
        }
      }
      ++s.pos;
    }
    --s.pos;  // the lookahead token is always in the current document
  }
}

nlohmann::json PackedStreams::state() const {
  nlohmann::json st = {{"next_document", next_doc_}, {"streams", nlohmann::json::array()}};
  for (const auto& s : streams_) st["streams"].push_back({{"document", s.index}, {"offset", s.pos}});
  return st;
}

void PackedStreams::restore(const nlohmann::json& st) {
  try {
    if (st.at("streams").size() != streams_.size())
      throw Error("data state has " + std::to_string(st.at("streams").size()) + " streams, the run has " +
                  std::to_string(streams_.size()));
    next_doc_ = st.at("next_document").get<uint64_t>();
    for (size_t i = 0; i < streams_.size(); ++i) {
      Stream& s = streams_[i];
      s.index = st["streams"][i].at("document").get<uint64_t>();
      s.doc = document(s.index);
      s.pos = st["streams"][i].at("offset").get<size_t>();
      if (s.pos >= s.doc.tokens.size()) throw Error("data state: offset beyond its document");
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("data state: ") + e.what());
  }
}

}  // namespace ll::train
