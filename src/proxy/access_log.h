// One structured (JSON) access-log line per request, written without a lock on the request path.
//
// Each worker thread owns an AccessLog that formats lines into its own buffer and hands the
// buffer to log::LineOutput (whole lines, never blocking, never interleaved mid-line) when it
// passes a threshold or when the worker's periodic flush runs. Lines the output cannot take at
// once are dropped and counted (llmproxy_log_lines_dropped_total): a worker waiting for a
// stalled log reader would stall every request it holds.
// Prompts and completions are never logged: only the metadata below.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "log/line_output.h"

namespace llmproxy::proxy {

struct AccessEntry {
  std::string_view request_id;
  std::string_view client;
  std::string_view method;
  std::string_view path;
  std::string_view model;
  bool stream = false;
  std::string_view backend;  // "none" when the request was never routed
  unsigned status = 0;
  std::uint64_t bytes_in = 0;   // request body bytes
  std::uint64_t bytes_out = 0;  // response body bytes sent to the client
  double duration_ms = 0;
  double ttfb_ms = -1;  // upstream first byte; -1 when there was none
  int attempts = 0;
  std::string_view finish;  // completed, client_disconnected, upstream_error, timeout, refused
};

class AccessLog {
 public:
  AccessLog(log::LineOutput& out, bool enabled) : out_(out), enabled_(enabled) {}
  ~AccessLog() { flush(); }
  AccessLog(const AccessLog&) = delete;
  AccessLog& operator=(const AccessLog&) = delete;

  bool enabled() const { return enabled_; }
  void write(const AccessEntry& e);
  void flush();

 private:
  log::LineOutput& out_;
  bool enabled_;
  std::string buffer_;
};

}  // namespace llmproxy::proxy
