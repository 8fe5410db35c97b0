#include "proxy/access_log.h"

#include <fmt/format.h>

#include "http/errors.h"
#include "log/log.h"

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
  buffer_ += "{\"ts\":\"";
  log::append_timestamp(buffer_, log::unix_ms_now());
  buffer_ += "\",\"msg\":\"access\"";
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
