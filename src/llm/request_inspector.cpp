#include "llm/request_inspector.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <optional>

namespace llmproxy::llm {
namespace {

// Text of a prompt-like value: a string, an array of strings or of token ids (completions,
// embeddings), or chat content parts ({"type":"text","text":...}).
void count_prompt(simdjson::dom::element v, RequestInfo& info, int depth = 0) {
  std::string_view text;
  if (v.get_string().get(text) == simdjson::SUCCESS) {
    info.prompt_text.add_utf8(text);
  } else if (simdjson::dom::array items;
             depth < 2 && v.get_array().get(items) == simdjson::SUCCESS) {
    for (auto item : items) {
      if (item.is_int64() || item.is_uint64()) {
        ++info.prompt_token_ids;
      } else {
        count_prompt(item, info, depth + 1);
      }
    }
  } else if (v.is_object()) {
    simdjson::dom::element t;
    if (v["text"].get(t) == simdjson::SUCCESS) count_prompt(t, info, depth + 1);
  }
}

// Characters of a number as JSON writes it (shortest round-trip form for doubles).
template <class Number>
std::uint64_t number_chars(Number n) {
  char digits[32];
  return static_cast<std::uint64_t>(std::to_chars(digits, digits + sizeof digits, n).ptr - digits);
}

// Adds `v` as minified JSON text would count, without building the text (a request's tools can
// be most of a large body): keys and strings by their characters plus quotes, numbers by their
// digits, literals by their letters. Escapes inside strings count as the characters they stand
// for. Depth is bounded by the parser's.
void count_json(simdjson::dom::element v, TextCount& count) {
  using T = simdjson::dom::element_type;
  std::uint64_t items = 0;  // of an array or object: their brackets and the commas between
  switch (v.type()) {
    case T::ARRAY:
      for (auto item : simdjson::dom::array(v.get_array().value_unsafe())) {  // a copy: no dangling
        ++items;
        count_json(item, count);
      }
      count.ascii += items == 0 ? 2 : items + 1;
      break;
    case T::OBJECT:
      for (auto field : simdjson::dom::object(v.get_object().value_unsafe())) {
        ++items;
        count.add_utf8(field.key);
        count.ascii += 3;  // its quotes and the colon
        count_json(field.value, count);
      }
      count.ascii += items == 0 ? 2 : items + 1;
      break;
    case T::STRING:
      count.add_utf8(v.get_string().value_unsafe());
      count.ascii += 2;
      break;
    case T::INT64:
      count.ascii += number_chars(v.get_int64().value_unsafe());
      break;
    case T::UINT64:
      count.ascii += number_chars(v.get_uint64().value_unsafe());
      break;
    case T::DOUBLE:
      count.ascii += number_chars(v.get_double().value_unsafe());
      break;
    case T::BOOL:
      count.ascii += v.get_bool().value_unsafe() ? 4 : 5;
      break;
    case T::NULL_VALUE:
      count.ascii += 4;
      break;
  }
}

// One tool call as templates write it: the function's name and its arguments (`arguments`, a
// string of JSON, or an object as some clients send it; `input` for a custom tool).
void count_tool_call(simdjson::dom::element f, RequestInfo& info) {
  if (!f.is_object()) return;
  ++info.tool_calls;
  std::string_view s;
  if (f["name"].get_string().get(s) == simdjson::SUCCESS) info.tool_text.add_utf8(s);
  simdjson::dom::element args;
  if (f["arguments"].get(args) != simdjson::SUCCESS && f["input"].get(args) != simdjson::SUCCESS) {
    return;
  }
  if (args.get_string().get(s) == simdjson::SUCCESS) {
    info.tool_text.add_utf8(s);
  } else {
    count_json(args, info.tool_text);
  }
}

bool too_long(std::string_view field, std::string_view v, InspectError& error) {
  if (v.size() <= kMaxIdentifierBytes) return false;
  error.spec = http::errors::string_too_long;
  error.param = field;
  error.message = "Invalid '" + std::string(field) + "': string too long. Expected a string with " +
                  "maximum length " + std::to_string(kMaxIdentifierBytes) + " bytes, but got " +
                  std::to_string(v.size()) + ".";
  return true;
}

}  // namespace

std::string_view to_string(Endpoint e) {
  switch (e) {
    case Endpoint::chat_completions:
      return "/v1/chat/completions";
    case Endpoint::completions:
      return "/v1/completions";
    case Endpoint::embeddings:
      return "/v1/embeddings";
  }
  return "";
}

RequestInspector::RequestInspector(std::size_t max_body_size) : parser_(max_body_size) {}

namespace {
// A boolean as vLLM's models read one (pydantic, lax): true, 1, and "true", "yes", "on", "1",
// "t", "y" in any case. So a client whose `include_usage` the backend reads as true gets its
// usage untouched, and one it reads as false ("false", 0, "no") is asked for usage by the
// gateway like one that sent false (its usage chunk removed), never billed from an estimate.
bool lax_true(simdjson::dom::element v) {
  bool b = false;
  if (v.get_bool().get(b) == simdjson::SUCCESS) return b;
  std::int64_t i = 0;
  if (v.get_int64().get(i) == simdjson::SUCCESS) return i == 1;
  std::string_view text;
  if (v.get_string().get(text) != simdjson::SUCCESS) return false;
  for (std::string_view yes : {"true", "yes", "on", "1", "t", "y"}) {
    if (text.size() == yes.size() &&
        std::equal(text.begin(), text.end(), yes.begin(), [](char a, char b) {
          return std::tolower(static_cast<unsigned char>(a)) == b;
        })) {
      return true;
    }
  }
  return false;
}
}  // namespace

bool RequestInspector::inspect(Endpoint endpoint, std::string_view body, bool padded,
                               RequestInfo& info, InspectError& error, bool count_text) {
  // The DOM parser validates the whole document (the on-demand API would skip unread values),
  // so a malformed body is refused here instead of being forwarded.
  simdjson::dom::element root;
  auto err = parser_.parse(body.data(), body.size(), !padded).get(root);
  if (err) {
    error.spec = http::errors::invalid_json;
    if (body.empty()) {
      error.message = "The request body is empty; expected a JSON object.";
    } else if (err == simdjson::NUMBER_ERROR) {
      // Also valid JSON whose number is beyond what the parser represents (RFC 8259 6 lets a
      // parser limit the range): say so rather than call the body malformed.
      error.message =
          "The request body has a number the gateway cannot read: malformed, or outside 64-bit "
          "integers and double-precision floats.";
    } else {
      error.message =
          std::string("The request body is not valid JSON: ") + simdjson::error_message(err);
    }
    return false;
  }
  simdjson::dom::object obj;
  if (root.get_object().get(obj)) {
    error.spec = http::errors::invalid_request;
    error.message = "The request body must be a JSON object.";
    return false;
  }
  // The last of each name, as the Python and JS backends read duplicate keys: what they route,
  // stream and bill by is the last copy (an earlier one of another type is no error to them);
  // counting every copy of the prompt over-counts, counting the first under-counts.
  struct {
    std::optional<simdjson::dom::element> stream, model, user, safety_identifier;
    std::optional<simdjson::dom::element> messages, prompt, input, tools, functions;
  } last;
  for (auto field : obj) {
    std::string_view key = field.key;
    if (key == "stream") {
      last.stream = field.value;
    } else if (key == "model") {
      last.model = field.value;
    } else if (key == "user") {
      last.user = field.value;
    } else if (key == "safety_identifier") {
      last.safety_identifier = field.value;
    } else if (key == "messages") {
      last.messages = field.value;  // counted after the loop: a repeated key's last value wins
    } else if (key == "prompt") {
      last.prompt = field.value;
    } else if (key == "input") {
      last.input = field.value;
    } else if (key == "tools") {
      last.tools = field.value;
    } else if (key == "functions") {
      last.functions = field.value;
    } else if (key == "stream_options") {
      // Every occurrence, the last one winning, as the Python and JS backends read duplicates.
      info.has_stream_options = true;
      info.include_usage = false;
      info.continuous_usage = false;
      simdjson::dom::object so;
      if (field.value.get_object().get(so)) continue;
      bool asked = false, continuous = false;
      for (auto f : so) {
        bool v = false;
        if (f.key == "include_usage") {
          asked = true;
          info.include_usage = lax_true(f.value);
        } else if (f.key == "continuous_usage_stats") {
          continuous = !f.value.get_bool().get(v) && v;
        }
      }
      // continuous_usage_stats is vLLM's, whose include_usage defaults to true: such a client
      // asked for usage on every chunk and the final usage chunk. Other servers default
      // include_usage to false and would send no usage at all, so the gateway still asks.
      info.continuous_usage = !asked && continuous;
    }
  }
  if (last.stream && !last.stream->is_null()) {  // null: not streamed
    bool v;
    if (last.stream->get_bool().get(v)) {
      error.spec = http::errors::invalid_request;
      error.param = "stream";
      error.message = "'stream' must be a boolean.";
      return false;
    }
    info.stream = v;
  }
  // `model` and `user` are identifiers kept in every usage record: strings, bounded.
  const auto identifier = [&](const std::optional<simdjson::dom::element>& value,
                              std::string_view name, std::string& out, bool null_is_none) {
    if (!value || (null_is_none && value->is_null())) return true;
    std::string_view v;
    if (value->get_string().get(v)) {
      error.spec = http::errors::invalid_request;
      error.param = name;
      error.message = "'" + std::string(name) + "' must be a string.";
      return false;
    }
    if (too_long(name, v, error)) return false;
    out.assign(v);
    return true;
  };
  if (!identifier(last.model, "model", info.model, false) ||
      !identifier(last.user, "user", info.user, true)) {  // a null user: none
    return false;
  }
  // OpenAI's successor of `user` (which it deprecates): the caller's id when `user` is absent.
  if (info.user.empty() &&
      !identifier(last.safety_identifier, "safety_identifier", info.user, true)) {
    return false;
  }
  if (simdjson::dom::array list;
      last.messages && last.messages->get_array().get(list) == simdjson::SUCCESS) {
    for (auto m : list) {
      ++info.messages;
      simdjson::dom::object fields;
      if (!count_text || m.get_object().get(fields)) continue;
      // One pass over the message's keys (a lookup per key would scan them each time).
      for (auto f : fields) {
        if (f.key == "content") {
          count_prompt(f.value, info);
        } else if (f.key == "tool_calls") {
          simdjson::dom::array calls;
          if (f.value.get_array().get(calls)) continue;
          for (auto call : calls) {
            simdjson::dom::element fn;  // {"type":"function","function":{...}} or "custom"
            if (call["function"].get(fn) == simdjson::SUCCESS ||
                call["custom"].get(fn) == simdjson::SUCCESS) {
              count_tool_call(fn, info);
            }
          }
        } else if (f.key == "function_call") {
          count_tool_call(f.value, info);  // legacy: the function itself, no wrapper
        }
      }
    }
  }
  if (count_text) {
    if (last.prompt) count_prompt(*last.prompt, info);
    if (last.input) count_prompt(*last.input, info);
    // Tool definitions (`functions`: the legacy form): chat templates write each one into the
    // prompt as JSON, so the estimate counts their JSON text. Other endpoints have no template.
    for (const auto& value : {last.tools, last.functions}) {
      simdjson::dom::array defs;
      if (endpoint != Endpoint::chat_completions || !value || value->get_array().get(defs)) {
        continue;
      }
      for (auto def : defs) {
        ++info.tools;
        count_json(def, info.tool_text);
      }
    }
  }
  if (endpoint == Endpoint::embeddings && info.stream) {
    error.spec = http::errors::invalid_request;
    error.param = "stream";
    error.message = "Embeddings cannot be streamed; 'stream' must be false or absent.";
    return false;
  }
  return true;
}

std::int64_t estimate_prompt_tokens(const RequestInfo& info) {
  std::int64_t n = info.prompt_token_ids + info.prompt_text.tokens();
  // Chat templates add a few tokens per message (role markers, separators).
  if (info.messages > 0) n += 4 * info.messages + 3;
  // With tools, templates add a tool-use instruction (~80 tokens in Qwen3's) and wrap each call.
  n += info.tool_text.json_tokens() + (info.tools > 0 ? kToolsPromptTokens : 0) +
       kToolCallTokens * info.tool_calls;
  return n;
}

}  // namespace llmproxy::llm
