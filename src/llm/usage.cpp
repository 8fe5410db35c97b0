#include "llm/usage.h"

#include <algorithm>
#include <charconv>
#include <cstring>

#include "llm/request_inspector.h"  // kMaxIdentifierBytes
#include "llm/sse_scanner.h"        // clear_releasing

namespace llmproxy::llm {
namespace {

// A count, or -1 when the value is not one: not an integer, negative, or above kMaxTokenCount.
std::int64_t int_field(simdjson::dom::object obj, std::string_view key) {
  std::int64_t v;
  if (obj[key].get_int64().get(v) == simdjson::SUCCESS && v >= 0 && v <= kMaxTokenCount) return v;
  return -1;
}

// Stores a report that names any token count, with the total filled in when left out. A missing
// count is not 0 (the record estimates it): the total of a report that lacks one stays unknown.
bool accept(Usage r, Usage& out) {
  if (!r.reported()) return false;
  if (r.total_tokens < 0 && r.prompt_tokens >= 0 && r.completion_tokens >= 0) {
    r.total_tokens = r.prompt_tokens + r.completion_tokens;
  }
  out = r;
  return true;
}

bool read_usage_object(simdjson::dom::object u, Usage& out) {
  Usage r;
  r.prompt_tokens = int_field(u, "prompt_tokens");
  r.completion_tokens = int_field(u, "completion_tokens");
  if (r.prompt_tokens < 0) r.prompt_tokens = int_field(u, "input_tokens");  // Responses API
  if (r.completion_tokens < 0) r.completion_tokens = int_field(u, "output_tokens");
  r.total_tokens = int_field(u, "total_tokens");
  simdjson::dom::object details;
  if (u["prompt_tokens_details"].get_object().get(details) == simdjson::SUCCESS ||
      u["input_tokens_details"].get_object().get(details) == simdjson::SUCCESS) {
    r.cached_tokens = int_field(details, "cached_tokens");
  }
  if (u["completion_tokens_details"].get_object().get(details) == simdjson::SUCCESS ||
      u["output_tokens_details"].get_object().get(details) == simdjson::SUCCESS) {
    r.reasoning_tokens = int_field(details, "reasoning_tokens");
  }
  return accept(r, out);
}

// Length of the JSON string value that starts right after `pos` (just past the opening quote).
// A string without its closing quote runs to the end of `s`: a body cut off (a client hang-up)
// ends inside the text that was relayed, and that text was generated.
std::size_t string_value_length(std::string_view s, std::size_t pos) {
  std::size_t i = pos;
  while (i < s.size()) {
    if (s[i] == '\\') {
      i += 2;
    } else if (s[i] == '"') {
      return i - pos;
    } else {
      ++i;
    }
  }
  return s.size() - pos;
}

// The first `needle` in `data` at or after `from`, or npos. glibc's memmem: std::string_view::find
// runs memchr for the needle's first byte and compares at each hit, and the needles here begin
// with a quote, a JSON event's most common byte (a tracker spent ~1 µs per token event on that).
std::size_t find_text(std::string_view data, std::string_view needle, std::size_t from = 0) {
  if (from > data.size()) return std::string_view::npos;
  const void* at = ::memmem(data.data() + from, data.size() - from, needle.data(), needle.size());
  return at ? static_cast<std::size_t>(static_cast<const char*>(at) - data.data())
            : std::string_view::npos;
}

bool json_space(char c) {
  return c == ' ' || c == '\n' || c == '\t' || c == '\r';
}

// Where the value starts of the key that ends at `pos`: past JSON whitespace, the colon and more
// whitespace. npos when no colon follows (the quoted text was a string value, not a key).
std::size_t value_start(std::string_view data, std::size_t pos) {
  while (pos < data.size() && json_space(data[pos])) ++pos;
  if (pos >= data.size() || data[pos] != ':') return std::string_view::npos;
  ++pos;
  while (pos < data.size() && json_space(data[pos])) ++pos;
  return pos;
}

constexpr std::string_view kErrorWord = "\"error\"";

// Does the `"error"` at `pos` report an error: a key whose value is an object or a string, or the
// value of `"object"` (vLLM's older shape)? `"error": null` and a token that reads "error" do not.
bool error_at(std::string_view data, std::size_t pos) {
  constexpr std::string_view kObject = "\"object\"";
  const auto trimmed_end = [&](std::size_t end) {  // `end` past JSON whitespace before it
    while (end > 0 && json_space(data[end - 1])) --end;
    return end;
  };
  const std::size_t value = value_start(data, pos + kErrorWord.size());
  if (value < data.size() && (data[value] == '{' || data[value] == '"')) return true;
  const std::size_t colon = trimmed_end(pos);
  return colon > 0 && data[colon - 1] == ':' &&
         data.substr(0, trimmed_end(colon - 1)).ends_with(kObject);
}

// Could this body report an error? One scan for the quoted word, which bodies rarely hold.
bool may_report_error(std::string_view data) {
  for (std::size_t pos = 0; (pos = find_text(data, kErrorWord, pos)) != std::string_view::npos;
       pos += kErrorWord.size()) {
    if (error_at(data, pos)) return true;
  }
  return false;
}

std::uint64_t count_content(std::string_view data, TextCount& text) {
  std::uint64_t n = 0;
  // "content", "text", reasoning ("reasoning_content"; "reasoning" in vLLM since it renamed the
  // field, and OpenRouter) and tool-call "arguments" string values, with or without whitespace
  // around the colon (pretty-printed bodies). One scan per key: `"reasoning` finds both names.
  for (std::string_view key :
       {std::string_view("\"content\""), std::string_view("\"text\""),
        std::string_view("\"reasoning"), std::string_view("\"arguments\"")}) {
    std::size_t pos = 0;
    while ((pos = find_text(data, key, pos)) != std::string_view::npos) {
      pos += key.size();
      if (key.back() != '"') {  // `"reasoning`: which of its two names, if either
        if (data.substr(pos, 1) == "\"") {
          pos += 1;
        } else if (data.substr(pos, 9) == "_content\"") {
          pos += 9;
        } else {
          continue;
        }
      }
      const std::size_t value = value_start(data, pos);
      if (value >= data.size() || data[value] != '"') continue;
      pos = value + 1;
      std::size_t len = string_value_length(data, pos);
      n += len;
      text.add_json_escaped(data.substr(pos, len));
      pos += len;
    }
  }
  return n;
}

// What one stream event holds for the tracker, found in one pass over its quotes: the text
// count_content() counts, whether it may hold a usage report (`"usage"` with an object, or
// `"details"`: TGI's native stream) or an error (as may_report_error() reads it). A scan per
// word (a dozen memmem calls, each setting up its shift table) was a quarter of a metered
// stream's instructions. Equivalent to those scans: every word here ends in a quote (or, for
// `"reasoning`, is checked for one), and inside a JSON string every quote is escaped, so no word
// begins inside a string value: a counted value is skipped whole.
struct EventScan {
  std::uint64_t chars = 0;
  bool usage = false;
  bool error = false;
  bool finish = false;  // `"finish_reason"` with a string value (a choice finished)
};

EventScan scan_event(std::string_view data, TextCount& text) {
  EventScan out;
  const char* const base = data.data();
  const std::size_t n = data.size();
  // Does the value of the key that ends at `key_end` start with `first`?
  const auto value_is = [&](std::size_t key_end, char first) {
    const std::size_t value = value_start(data, key_end);
    return value < n && data[value] == first;
  };
  std::size_t pos = 0;
  while (pos < n) {
    const void* q = std::memchr(base + pos, '"', n - pos);
    if (!q) break;
    pos = static_cast<std::size_t>(static_cast<const char*>(q) - base);
    const std::string_view at = data.substr(pos);
    std::size_t key_end = 0;  // past the closing quote of a key whose string value is counted
    switch (at.size() > 1 ? at[1] : '\0') {
      case 'c':
        if (at.starts_with("\"content\"")) key_end = pos + 9;
        break;
      case 't':
        if (at.starts_with("\"text\"")) key_end = pos + 6;
        break;
      case 'a':
        if (at.starts_with("\"arguments\"")) key_end = pos + 11;
        break;
      case 'r':
        if (at.starts_with("\"reasoning\"")) {
          key_end = pos + 11;
        } else if (at.starts_with("\"reasoning_content\"")) {
          key_end = pos + 19;
        }
        break;
      case 'u':
        if (!out.usage && at.starts_with("\"usage\"")) out.usage = value_is(pos + 7, '{');
        break;
      case 'd':
        if (at.starts_with("\"details\"")) out.usage = true;
        break;
      case 'e':
        if (!out.error && at.starts_with(kErrorWord)) out.error = error_at(data, pos);
        break;
      case 'f':
        if (!out.finish && at.starts_with("\"finish_reason\""))
          out.finish = value_is(pos + 15, '"');
        break;
      default:
        break;
    }
    if (key_end != 0) {
      const std::size_t value = value_start(data, key_end);
      if (value < n && data[value] == '"') {
        const std::size_t len = string_value_length(data, value + 1);
        out.chars += len;
        text.add_json_escaped(data.substr(value + 1, len));
        pos = value + 1 + len + 1;  // past the value's closing quote
        continue;
      }
    }
    ++pos;
  }
  return out;
}

}  // namespace

bool read_usage(simdjson::dom::element object, Usage& out) {
  simdjson::dom::object obj;
  if (object.get_object().get(obj) != simdjson::SUCCESS) return false;
  simdjson::dom::object u;
  if (obj["usage"].get_object().get(u) == simdjson::SUCCESS) return read_usage_object(u, out);
  simdjson::dom::object response;  // Responses API terminal events
  if (obj["response"].get_object().get(response) == simdjson::SUCCESS &&
      response["usage"].get_object().get(u) == simdjson::SUCCESS) {
    return read_usage_object(u, out);
  }
  simdjson::dom::object details;  // TGI native /generate_stream final event
  if (obj["details"].get_object().get(details) == simdjson::SUCCESS) {
    Usage r;
    r.prompt_tokens = int_field(details, "input_length");
    r.completion_tokens = int_field(details, "generated_tokens");
    return accept(r, out);
  }
  return false;
}

bool complete_usage(Usage& u, std::int64_t prompt_estimate, std::int64_t completion_estimate) {
  const bool estimated = u.prompt_tokens < 0 || u.completion_tokens < 0;
  if (u.prompt_tokens < 0) u.prompt_tokens = prompt_estimate;
  if (u.completion_tokens < 0) u.completion_tokens = completion_estimate;
  u.total_tokens = u.prompt_tokens + u.completion_tokens;  // both at most 2^53: no overflow
  return estimated;
}

bool is_usage_only_chunk(simdjson::dom::element object) {
  simdjson::dom::object obj;
  if (object.get_object().get(obj) != simdjson::SUCCESS) return false;
  simdjson::dom::array choices;
  if (obj["choices"].get_array().get(choices) != simdjson::SUCCESS) return false;
  if (choices.size() != 0) return false;
  simdjson::dom::object u;
  return obj["usage"].get_object().get(u) == simdjson::SUCCESS;
}

namespace {

// An error object, or a message (TGI); vLLM's older shape names its object "error".
bool reports_error(simdjson::dom::element doc) {
  simdjson::dom::element e;
  std::string_view text;
  return (doc["error"].get(e) == simdjson::SUCCESS &&
          (e.is_object() || (e.get_string().get(text) == simdjson::SUCCESS && !text.empty()))) ||
         (doc["object"].get_string().get(text) == simdjson::SUCCESS && text == "error");
}

}  // namespace

bool body_reports_error(std::string_view body, simdjson::dom::parser& parser) {
  if (!may_report_error(body)) return false;
  simdjson::dom::element doc;  // parse() copies the body into padded space of its own
  return parser.parse(body.data(), body.size()).get(doc) == simdjson::SUCCESS && reports_error(doc);
}

std::string answer_model(simdjson::dom::element doc) {
  std::string_view model;
  if (doc["model"].get_string().get(model) != simdjson::SUCCESS ||
      model.size() > kMaxIdentifierBytes) {
    return {};
  }
  return std::string(model);
}

namespace {
// Where the value starts of the first `quoted_key` key in `text` (the last with `last`), or npos.
// With unescaped quotes the word is a key or a string value; followed by a colon, a key.
std::size_t key_value(std::string_view text, std::string_view quoted_key, bool last = false) {
  constexpr auto npos = std::string_view::npos;
  for (std::size_t at = last ? text.rfind(quoted_key) : find_text(text, quoted_key); at != npos;
       at = last ? (at == 0 ? npos : text.rfind(quoted_key, at - 1))
                 : find_text(text, quoted_key, at + 1)) {
    if (const std::size_t v = value_start(text, at + quoted_key.size()); v != npos) return v;
  }
  return npos;
}
}  // namespace

std::string body_model(std::string_view text, bool last) {
  // Servers write the response's own first (chat) or after its data (embeddings), nested ones
  // nowhere; the key found names the model, or nothing does (a nested one further on is not it).
  const std::size_t p = key_value(text, "\"model\"", last);
  if (p >= text.size() || text[p] != '"') return {};
  const std::size_t end = text.find('"', p + 1);
  if (end == std::string_view::npos) return {};
  const std::string_view value = text.substr(p + 1, end - p - 1);
  // An escaped value (a backslash in it) is left out rather than read wrong.
  if (value.size() > kMaxIdentifierBytes || value.find('\\') != std::string_view::npos ||
      !simdjson::validate_utf8(value.data(), value.size())) {
    return {};
  }
  return std::string(value);
}

std::int64_t tokenize_count(std::string_view answer) {
  if (std::size_t p = key_value(answer, "\"count\""); p != std::string_view::npos) {
    std::int64_t v = 0;
    const auto [end, ec] = std::from_chars(answer.data() + p, answer.data() + answer.size(), v);
    if (ec == std::errc() && end != answer.data() + p && v >= 0 && v <= kMaxTokenCount) return v;
    return -1;
  }
  std::size_t p = key_value(answer, "\"tokens\"");
  if (p == std::string_view::npos || p >= answer.size() || answer[p] != '[') return -1;
  std::int64_t ids = 0;
  bool in_id = false;
  for (++p; p < answer.size(); ++p) {
    const char c = answer[p];
    if (c >= '0' && c <= '9') {
      if (!in_id) ++ids;
      in_id = true;
    } else if (c == ',' || json_space(c)) {
      in_id = false;
    } else if (c == ']') {
      return ids;
    } else {
      return -1;  // not a list of ids (pieces, objects): no count read from it
    }
  }
  return -1;  // the list never ends
}

bool StreamUsageTracker::on_event(std::string_view data, std::string_view event) {
  ++events_;
  finished_ = false;
  // [DONE] ends the response: what a backend sends after it is not part of it, and not billed.
  if (saw_done_) return false;
  if (data == "[DONE]") {
    saw_done_ = true;
    return false;
  }
  if (event == "error") saw_error_ = true;
  // Cheap filter: only bytes that mention a usage report or an error are parsed. `"usage":null`
  // (on every chunk once include_usage is set) and `"error":null` carry nothing; a token that
  // reads "error" is a value, not a key, and quotes inside strings are escaped.
  const EventScan scan = scan_event(data, content_text_);
  content_chars_ += scan.chars;
  finished_ = scan.finish;
  const bool candidate = scan.usage;
  const bool error_candidate = scan.error;
  // The first event only: its chunk names the model as every other one does.
  const bool model_candidate = want_model_;
  want_model_ = false;
  // An event that is no error report is the stream's content (its first: the first token).
  const bool named_error = event == "error";
  if (!candidate && !error_candidate && !model_candidate) {
    token_seen_ = token_seen_ || !named_error;
    return false;
  }
  // Released once large (not kept for the stream's life); room for the padding first, so that
  // one allocation takes the event.
  clear_releasing(scratch_);
  scratch_.reserve(data.size() + simdjson::SIMDJSON_PADDING);
  scratch_.append(data);
  if (!shared_) {
    if (!own_) own_ = std::make_unique<simdjson::dom::parser>();
    shared_ = own_.get();
  }
  simdjson::dom::element doc;
  if (shared_->parse(scratch_.data(), scratch_.size(), false).get(doc) != simdjson::SUCCESS) {
    token_seen_ = token_seen_ || !named_error;
    return false;
  }
  ++parsed_;
  if (model_candidate) model_ = answer_model(doc);
  if (error_candidate && reports_error(doc)) {
    saw_error_ = true;  // usage with it still counts
  } else if (!named_error) {
    token_seen_ = true;
  }
  if (!candidate) return false;
  read_usage(doc, usage_);  // replaces: cumulative reports make the last one right
  return is_usage_only_chunk(doc);
}

namespace {
// A usage object is a few hundred bytes, details included; a body is searched for at most this
// many candidates of at most this size, so a hostile body of `"usage":{` repeated costs a
// bounded scan, not one to the end of the body per candidate.
constexpr std::size_t kMaxUsageObject = 16 * 1024;
constexpr int kMaxUsageCandidates = 16;

// The object that starts at `open` (a '{'), up to its matching brace; empty when cut or longer
// than kMaxUsageObject.
std::string_view balanced_object(std::string_view s, std::size_t open) {
  int depth = 0;
  bool in_string = false;
  const std::size_t end = std::min(s.size(), open + kMaxUsageObject);
  for (std::size_t i = open; i < end; ++i) {
    char c = s[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{') {
      ++depth;
    } else if (c == '}') {
      if (--depth == 0) return s.substr(open, i - open + 1);
    }
  }
  return {};
}

// A usage object as servers write it, read without a JSON parser: ASCII keys without escapes,
// values that are unsigned integers or null, or (one level down) objects of those. Anything else (a
// string, a float, a negative number, an array, deeper nesting, malformed text) makes read()
// return false, and the caller parses the object with simdjson instead: the two never give
// different results (tests/unit/usage_test.cpp compares them). Per response this is a few
// hundred instructions where a DOM parse of even this small object costs thousands.
class FlatUsageReader {
 public:
  explicit FlatUsageReader(std::string_view s) : s_(s) {}

  // Reads the object `s` holds (exactly one object, nothing after it; with `leading`, the object
  // `s` starts with, whatever follows it). On true, `out` has what read_usage_object() would find
  // and the report is accepted as accept() would.
  bool read(Usage& r, bool leading = false) {
    if (!object(0) || (!leading && (skip_space(), i_ != s_.size()))) return false;
    r.prompt_tokens = top_[kPrompt];
    r.completion_tokens = top_[kCompletion];
    if (r.prompt_tokens < 0) r.prompt_tokens = top_[kInput];
    if (r.completion_tokens < 0) r.completion_tokens = top_[kOutput];
    r.total_tokens = top_[kTotal];
    // The first of each pair that is an object, as simdjson's lookup of the first key would.
    const Details& cached =
        details_[kPromptDetails].object ? details_[kPromptDetails] : details_[kInputDetails];
    if (cached.object) r.cached_tokens = cached.value;
    const Details& reasoning = details_[kCompletionDetails].object ? details_[kCompletionDetails]
                                                                   : details_[kOutputDetails];
    if (reasoning.object) r.reasoning_tokens = reasoning.value;
    return true;
  }

 private:
  enum Top { kPrompt, kCompletion, kInput, kOutput, kTotal, kTopCount };
  enum Detail { kPromptDetails, kInputDetails, kCompletionDetails, kOutputDetails, kDetailCount };
  struct Details {
    bool seen = false;
    bool object = false;
    bool value_seen = false;
    std::int64_t value = -1;  // cached_tokens or reasoning_tokens, as int_field reads it
  };

  void skip_space() {
    while (i_ < s_.size() && json_space(s_[i_])) ++i_;
  }
  bool take(char c) {
    skip_space();
    if (i_ >= s_.size() || s_[i_] != c) return false;
    ++i_;
    return true;
  }
  // A key: no escapes (a backslash sends the object to simdjson).
  bool key(std::string_view& k) {
    if (!take('"')) return false;
    const std::size_t start = i_;
    while (i_ < s_.size() && s_[i_] != '"') {
      const auto c = static_cast<unsigned char>(s_[i_]);
      if (c == '\\' || c < 0x20 || c >= 0x80) return false;  // simdjson checks UTF-8
      ++i_;
    }
    if (i_ >= s_.size()) return false;
    k = s_.substr(start, i_ - start);
    ++i_;
    return true;
  }
  // null (-1) or an unsigned integer of at most 18 digits (fits int64 without care); one above
  // kMaxTokenCount is -1, as int_field() reads it.
  bool scalar(std::int64_t& v) {
    skip_space();
    if (s_.substr(i_, 4) == "null") {
      i_ += 4;
      v = -1;
      return true;
    }
    const std::size_t start = i_;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
    const std::size_t digits = i_ - start;
    if (digits == 0 || digits > 18 || (digits > 1 && s_[start] == '0')) return false;
    if (i_ < s_.size() && (s_[i_] == '.' || s_[i_] == 'e' || s_[i_] == 'E')) return false;
    v = 0;
    for (std::size_t k = start; k < i_; ++k) v = v * 10 + (s_[k] - '0');
    if (v > kMaxTokenCount) v = -1;
    return true;
  }
  // depth 0: the usage object; depth 1: a details object (`d`, or null when not one we read).
  bool object(int depth, Details* d = nullptr) {
    if (!take('{')) return false;
    if (take('}')) return true;
    bool top_seen[kTopCount] = {};
    for (;;) {
      std::string_view k;
      if (!key(k) || !take(':')) return false;
      skip_space();
      if (i_ < s_.size() && s_[i_] == '{') {
        if (depth > 0) return false;
        if (int which = top_index(k); which >= 0) top_seen[which] = true;  // an object: -1
        Details* into = nullptr;
        if (int which = detail_index(k); which >= 0 && !details_[which].seen) {
          into = &details_[which];
          into->seen = true;
          into->object = true;
        }
        if (!object(1, into)) return false;
      } else {
        std::int64_t v;
        if (!scalar(v)) return false;
        if (depth == 0) {
          if (int which = top_index(k); which >= 0 && !top_seen[which]) {
            top_seen[which] = true;
            top_[which] = v;
          } else if (int dw = detail_index(k); dw >= 0 && !details_[dw].seen) {
            details_[dw].seen = true;  // null or a number: not an object, so never read
          }
        } else if (d && !d->value_seen && k == inner_key(d)) {
          d->value_seen = true;
          d->value = v;
        }
      }
      if (take('}')) return true;
      if (!take(',')) return false;
    }
  }
  // By length first: one comparison per key instead of up to five.
  static int top_index(std::string_view k) {
    switch (k.size()) {
      case 12:
        return k == "input_tokens" ? kInput : k == "total_tokens" ? kTotal : -1;
      case 13:
        return k == "prompt_tokens" ? kPrompt : k == "output_tokens" ? kOutput : -1;
      case 17:
        return k == "completion_tokens" ? kCompletion : -1;
      default:
        return -1;
    }
  }
  static int detail_index(std::string_view k) {
    switch (k.size()) {
      case 20:
        return k == "input_tokens_details" ? kInputDetails : -1;
      case 21:
        return k == "prompt_tokens_details"   ? kPromptDetails
               : k == "output_tokens_details" ? kOutputDetails
                                              : -1;
      case 25:
        return k == "completion_tokens_details" ? kCompletionDetails : -1;
      default:
        return -1;
    }
  }
  std::string_view inner_key(const Details* d) const {
    return d == &details_[kPromptDetails] || d == &details_[kInputDetails] ? "cached_tokens"
                                                                           : "reasoning_tokens";
  }

  std::string_view s_;
  std::size_t i_ = 0;
  std::int64_t top_[kTopCount] = {-1, -1, -1, -1, -1};
  Details details_[kDetailCount];
};

}  // namespace

namespace {
// read_usage_text(); with `leading`, of the object `s` starts with (it ends where that does).
std::optional<bool> read_flat(std::string_view s, bool leading, Usage& out) {
  Usage r;
  if (!FlatUsageReader(s).read(r, leading)) return std::nullopt;
  return accept(r, out);
}
}  // namespace

std::optional<bool> read_usage_text(std::string_view object, Usage& out) {
  return read_flat(object, false, out);
}

namespace {
// The start of the last `"usage"` that begins before `end`, or npos. Backwards from quote to
// quote (memrchr): std::string_view::rfind compares the whole pattern at every position.
std::size_t rfind_usage_key(std::string_view s, std::size_t end) {
  static constexpr std::string_view kKey = "\"usage\"";
  const char* const base = s.data();
  std::size_t limit = end;
  while (limit > 0) {
    const void* q = ::memrchr(base, '"', limit);
    if (!q) break;
    const auto at = static_cast<std::size_t>(static_cast<const char*>(q) - base);
    if (s.size() - at >= kKey.size() && s.compare(at, kKey.size(), kKey) == 0) return at;
    limit = at;
  }
  return std::string_view::npos;
}

// Where the object of the `"usage"` key at `pos` opens, or npos when its value is no object.
std::size_t usage_object_open(std::string_view s, std::size_t pos) {
  const std::size_t open = s.find_first_not_of(" \t\r\n:", pos + 7);
  return open != std::string_view::npos && s[open] == '{' ? open : std::string_view::npos;
}
}  // namespace

std::size_t rfind_usage_object(std::string_view s, std::size_t end) {
  std::size_t pos = rfind_usage_key(s, end);
  while (pos != std::string_view::npos && usage_object_open(s, pos) == std::string_view::npos) {
    pos = rfind_usage_key(s, pos);
  }
  return pos;
}

namespace {
bool find_body_usage(std::string_view copy, simdjson::dom::parser& parser, Usage& out, bool whole) {
  std::string padded;
  // The last `"usage":{...}` in the body (or its tail), parsed alone: a whole-body parse would
  // cost more than the rest of the metering. The pattern cannot match inside a JSON string
  // (quotes there are escaped), and servers write usage at the top level, after the choices.
  // Only a key followed by an object is a candidate (each costs a read or a parse).
  int candidates = 0;
  bool cut = false;  // a candidate's object did not end within kMaxUsageObject
  for (std::size_t pos = rfind_usage_object(copy, copy.size());
       pos != std::string_view::npos && candidates++ < kMaxUsageCandidates;
       pos = rfind_usage_object(copy, pos)) {
    const std::size_t open = usage_object_open(copy, pos);
    // The simple form, read in one pass from the brace on (within the same bound).
    if (auto reported = read_flat(copy.substr(open, kMaxUsageObject), true, out)) {
      if (*reported) return true;
      continue;
    }
    // The reader could not take it (the same reader would fail on the balanced object too).
    std::string_view object = balanced_object(copy, open);
    if (object.empty()) {
      cut = cut || copy.size() - open > kMaxUsageObject;  // no end within the window
      continue;
    }
    padded.assign("{\"usage\":");
    padded.append(object);
    padded.push_back('}');
    padded.reserve(padded.size() + simdjson::SIMDJSON_PADDING);
    simdjson::dom::element doc;
    if (parser.parse(padded.data(), padded.size(), false).get(doc) != simdjson::SUCCESS) continue;
    if (read_usage(doc, out)) return true;
  }
  // A usage object larger than the window it is read in: a whole body is parsed whole, rather
  // than the backend's count left for an estimate.
  cut = cut || candidates > kMaxUsageCandidates;  // the top-level one may be past the last read
  simdjson::dom::element doc;
  return whole && cut && parser.parse(copy.data(), copy.size()).get(doc) == simdjson::SUCCESS &&
         read_usage(doc, out);
}
}  // namespace

bool read_body_usage(std::string_view copy, simdjson::dom::parser& parser, Usage& out,
                     TextCount& content, bool whole) {
  const bool found = find_body_usage(copy, parser, out, whole);
  // The generated text is counted only when it may be needed: no usage, or a count missing.
  if (!found || out.prompt_tokens < 0 || out.completion_tokens < 0) count_content(copy, content);
  return found;
}

}  // namespace llmproxy::llm
