#include "llm/request_rewrite.h"

#include "http/errors.h"

namespace llmproxy::llm {

std::optional<std::string> with_include_usage(std::string_view body, bool has_stream_options,
                                              bool keep_continuous, simdjson::dom::parser& parser) {
  constexpr std::string_view kField = R"("stream_options":{"include_usage":true})";
  if (!has_stream_options) {
    std::size_t open = body.find_first_not_of(" \t\r\n");
    if (open == std::string_view::npos || body[open] != '{') return std::nullopt;
    std::size_t next = body.find_first_not_of(" \t\r\n", open + 1);
    if (next == std::string_view::npos) return std::nullopt;
    std::string out;
    out.reserve(body.size() + kField.size() + 1 + simdjson::SIMDJSON_PADDING);
    out.append(body.substr(0, open + 1));
    out.append(kField);
    if (body[next] != '}') out.push_back(',');
    out.append(body.substr(open + 1));
    return out;
  }
  std::string padded;
  padded.reserve(body.size() + simdjson::SIMDJSON_PADDING);
  padded.assign(body);
  simdjson::dom::element doc;
  if (parser.parse(padded.data(), padded.size(), false).get(doc) != simdjson::SUCCESS) {
    return std::nullopt;
  }
  simdjson::dom::object root;
  if (doc.get_object().get(root) != simdjson::SUCCESS) return std::nullopt;
  std::string out;
  out.reserve(body.size() + kField.size() + simdjson::SIMDJSON_PADDING);
  out.push_back('{');
  bool first = true;
  simdjson::dom::element options;  // the last stream_options: the one the backend reads
  for (auto field : root) {
    if (field.key == "stream_options") {
      options = field.value;
      continue;
    }
    if (!first) out.push_back(',');
    first = false;
    out.push_back('"');
    http::append_json_escaped(out, field.key);
    out.append("\":");
    out.append(simdjson::minify(field.value));
  }
  if (!first) out.push_back(',');
  out.append(R"("stream_options":{"include_usage":true)");
  simdjson::dom::object so;
  if (options.get_object().get(so) == simdjson::SUCCESS) {
    for (auto field : so) {
      // vLLM's continuous_usage_stats puts usage on every chunk, but only with include_usage:
      // a client that did not ask for usage must not get it on its content chunks either.
      if (field.key == "include_usage") continue;
      if (field.key == "continuous_usage_stats" && !keep_continuous) continue;
      out.append(",\"");
      http::append_json_escaped(out, field.key);
      out.append("\":");
      out.append(simdjson::minify(field.value));
    }
  }
  out.append("}}");
  return out;
}

}  // namespace llmproxy::llm
