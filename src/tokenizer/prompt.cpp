#include "tokenizer/prompt.h"

#include "util/error.h"

namespace ll {

const char* const kDefaultSystemPrompt =
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as "
    "you can.";
const char* const kChatIntro =
    "A chat between a user (denoted as USER:) and an artificial intelligence assistant (denoted as ASSISTANT:). "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n";
const char* const kChatUserPrefix = "\nUSER: ";
const char* const kChatAssistantPrefix = "\nASSISTANT: ";

PromptTemplate parse_template(const std::string& name) {
  if (name == "plain") return PromptTemplate::Plain;
  if (name == "instruct") return PromptTemplate::Instruct;
  if (name == "chat") return PromptTemplate::Chat;
  throw Error("unknown prompt template '" + name + "' (expected plain, instruct or chat)");
}

const char* template_name(PromptTemplate t) {
  switch (t) {
    case PromptTemplate::Plain: return "plain";
    case PromptTemplate::Instruct: return "instruct";
    case PromptTemplate::Chat: return "chat";
  }
  return "?";
}

static void append(std::vector<int>& out, const std::vector<int>& ids) { out.insert(out.end(), ids.begin(), ids.end()); }

std::vector<int> build_plain(const Tokenizer& tok, const std::string& text) {
  std::vector<int> out{tok.bos()};
  append(out, tok.encode(text));
  return out;
}

std::vector<int> build_instruct(const Tokenizer& tok, const std::string& system, const std::string& question) {
  return build_plain(tok, system + "\n" + question + "\n");
}

std::vector<int> build_chat(const Tokenizer& tok, const std::string& intro, const std::vector<ChatTurn>& turns) {
  std::vector<int> out = build_plain(tok, intro);
  // No turns: stop after the intro, so build_chat(turns) + chat_user_turn(x) == build_chat(turns + {user x}).
  bool answer_open = false;
  for (size_t i = 0; i < turns.size(); ++i) {
    const ChatTurn& t = turns[i];
    if (t.role == "user") {
      append(out, tok.encode(kChatUserPrefix));
      append(out, tok.encode(t.text));
      answer_open = true;
    } else if (t.role == "assistant") {
      append(out, tok.encode(kChatAssistantPrefix));
      append(out, tok.encode(t.text));
      out.push_back(tok.eos());
      answer_open = false;
    } else {
      throw Error("chat turn " + std::to_string(i) + ": unknown role '" + t.role + "' (expected user or assistant)");
    }
  }
  if (answer_open) append(out, tok.encode(kChatAssistantPrefix));
  return out;
}

std::vector<int> chat_user_turn(const Tokenizer& tok, const std::string& text) {
  std::vector<int> out = tok.encode(kChatUserPrefix);
  append(out, tok.encode(text));
  append(out, tok.encode(kChatAssistantPrefix));
  return out;
}

std::vector<int> chat_assistant_end(const Tokenizer& tok) { return {tok.eos()}; }

}  // namespace ll
