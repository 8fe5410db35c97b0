// The process's own log lines (JSON, one per line, on stderr) and the wall clock that log
// lines, health checks and usage records share. The access log (proxy/access_log) is separate:
// buffered per worker on stdout.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace llmproxy::log {

// {"ts":"<RFC 3339 UTC>","level":"<level>","msg":"<msg>"} on stderr (log::LineOutput).
void write_line(std::string_view level, std::string_view msg);

template <class... Args>
void line(std::string_view level, fmt::format_string<Args...> f, Args&&... args) {
  write_line(level, fmt::format(f, std::forward<Args>(args)...));
}

// Milliseconds since the Unix epoch (system clock).
std::int64_t unix_ms_now();

// Appends `ms` (Unix milliseconds) as RFC 3339 UTC with milliseconds: 2026-11-30T01:02:03.456Z.
void append_timestamp(std::string& out, std::int64_t ms);

// Names the calling thread (cut to the kernel's 15 bytes), so that `top -H` and
// /proc/PID/task/*/comm tell the workers, the usage writer and the sinks apart.
void name_thread(std::string_view name);

}  // namespace llmproxy::log
