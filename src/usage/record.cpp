// The usage record's JSON, written by hand.
//
// This runs once per record on the log writer's thread (never on the request path), and its
// output is what every receiver parses, so it is exact rather than generic: the seed's eleven
// fields first, in the seed's order and with the seed's JSON types (strings are never null, an
// unknown value is ""), then the additions. No JSON library and no iostreams: strings are copied
// through http::append_json_escaped (invalid UTF-8 from a header becomes U+FFFD, so a receiver's
// JSON parser never rejects a record because of one odd byte), numbers through std::to_chars.
#include "usage/record.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <iterator>

#include "http/errors.h"

namespace llmproxy::usage {

namespace {

void append_string(std::string& out, std::string_view s) {
  out += '"';
  http::append_json_escaped(out, s);
  out += '"';
}

void append_key(std::string& out, std::string_view key, bool first = false) {
  if (!first) out += ',';
  out += '"';
  out += key;
  out += "\":";
}

void append_int(std::string& out, std::int64_t v) {
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, end);
}

void append_digits(char* p, int value, int width) {
  for (int i = width - 1; i >= 0; --i) {
    p[i] = static_cast<char>('0' + value % 10);
    value /= 10;
  }
}

// A JSON number with at most three decimals and no trailing zeros ("12.5", "7", "0.125").
void append_millis(std::string& out, double v) {
  if (!std::isfinite(v)) v = 0;
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed, 3);
  if (ec != std::errc()) end = buf + (buf[0] = '0', 1);
  std::string_view text(buf, static_cast<std::size_t>(end - buf));
  while (text.back() == '0') text.remove_suffix(1);
  if (text.back() == '.') text.remove_suffix(1);
  if (text == "-0") text = "0";
  out += text;
}

}  // namespace

std::string rfc3339(std::int64_t unix_ms) {
  std::int64_t secs = unix_ms / 1000;
  if (unix_ms % 1000 < 0) --secs;  // floor for times before 1970
  std::time_t t = static_cast<std::time_t>(secs);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[21] = "0000-00-00T00:00:00Z";
  append_digits(buf, std::clamp(tm.tm_year + 1900, 0, 9999), 4);
  append_digits(buf + 5, tm.tm_mon + 1, 2);
  append_digits(buf + 8, tm.tm_mday, 2);
  append_digits(buf + 11, tm.tm_hour, 2);
  append_digits(buf + 14, tm.tm_min, 2);
  append_digits(buf + 17, tm.tm_sec, 2);
  return std::string(buf, 20);
}

void append_json(std::string& out, const UsageRecord& r) {
  out += '{';
  append_key(out, "request_id", true);
  append_string(out, r.request_id);
  append_key(out, "user_id");
  append_string(out, r.user_id);
  append_key(out, "api_key");
  append_string(out, r.api_key);
  append_key(out, "model");
  append_string(out, r.model);
  append_key(out, "prompt_tokens");
  append_int(out, r.prompt_tokens);
  append_key(out, "completion_tokens");
  append_int(out, r.completion_tokens);
  append_key(out, "total_tokens");
  append_int(out, r.total_tokens);
  append_key(out, "is_stream");
  out += r.is_stream ? "true" : "false";
  append_key(out, "endpoint");
  append_string(out, r.endpoint);
  append_key(out, "timestamp");
  out += '"';
  out += rfc3339(r.timestamp_ms);
  out += '"';
  append_key(out, "backend_url");
  append_string(out, r.backend_url);
  // Additions.
  append_key(out, "client_request_id");
  if (r.client_request_id.empty()) {
    out += "null";
  } else {
    append_string(out, r.client_request_id);
  }
  append_key(out, "backend");
  append_string(out, r.backend);
  append_key(out, "status_code");
  append_int(out, r.status_code);
  append_key(out, "duration_ms");
  append_millis(out, r.duration_ms);
  append_key(out, "ttft_ms");
  if (r.ttft_ms < 0) {
    out += "null";
  } else {
    append_millis(out, r.ttft_ms);
  }
  append_key(out, "finish");
  append_string(out, r.finish);
  append_key(out, "usage_source");
  append_string(out, r.usage_source);
  if (r.cached_tokens >= 0) {
    append_key(out, "cached_tokens");
    append_int(out, r.cached_tokens);
  }
  if (r.reasoning_tokens >= 0) {
    append_key(out, "reasoning_tokens");
    append_int(out, r.reasoning_tokens);
  }
  out += '}';
}

std::string to_json(const UsageRecord& r) {
  std::string out;
  out.reserve(384 + r.request_id.size() + r.user_id.size() + r.api_key.size() + r.model.size() +
              r.endpoint.size() + r.backend_url.size() + r.backend.size());
  append_json(out, r);
  return out;
}

}  // namespace llmproxy::usage
