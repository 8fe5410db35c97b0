#include "proxy/access_log.h"

#include <fmt/format.h>

#include <chrono>

#include "http/errors.h"

namespace llmproxy::proxy {

namespace {
constexpr std::size_t kFlushThreshold = 16 * 1024;

void field(std::string& out, std::string_view key, std::string_view value) {
  out += ",\"";
  out += key;
  out += "\":\"";
  http::append_json_escaped(out, value);
  out += '"';
}
}  // namespace

void AccessLog::write(const AccessEntry& e) {
  if (!enabled_) return;
  auto now = std::chrono::system_clock::now();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  fmt::format_to(std::back_inserter(buffer_),
                 "{{\"ts\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z\",\"msg\":\"access\"",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                 ms % 1000);
  field(buffer_, "request_id", e.request_id);
  field(buffer_, "client", e.client);
  field(buffer_, "method", e.method);
  field(buffer_, "path", e.path);
  field(buffer_, "model", e.model);
  fmt::format_to(std::back_inserter(buffer_), ",\"stream\":{}", e.stream);
  field(buffer_, "backend", e.backend);
  fmt::format_to(std::back_inserter(buffer_),
                 ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{:.3f}", e.status,
                 e.bytes_in, e.bytes_out, e.duration_ms);
  if (e.ttfb_ms >= 0) fmt::format_to(std::back_inserter(buffer_), ",\"ttfb_ms\":{:.3f}", e.ttfb_ms);
  fmt::format_to(std::back_inserter(buffer_), ",\"attempts\":{}", e.attempts);
  field(buffer_, "finish", e.finish);
  buffer_ += "}\n";
  if (buffer_.size() >= kFlushThreshold) flush();
}

void AccessLog::flush() {
  if (buffer_.empty()) return;
  out_.write(buffer_);
  buffer_.clear();
}

}  // namespace llmproxy::proxy
