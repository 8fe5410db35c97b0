#include "log/log.h"

#include <pthread.h>

#include <chrono>
#include <ctime>
#include <iterator>
#include <string>

#include "http/errors.h"
#include "log/line_output.h"

namespace llmproxy::log {

void write_line(std::string_view level, std::string_view msg) {
  std::string out = "{\"ts\":\"";
  append_timestamp(out, unix_ms_now());
  out += "\",\"level\":\"";
  out += level;
  out += "\",\"msg\":\"";
  http::append_json_escaped(out, msg);
  out += "\"}\n";
  stderr_lines().write(out);  // never blocks a worker on a stalled reader
}

std::int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void append_timestamp(std::string& out, std::int64_t ms) {
  const auto secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  fmt::format_to(std::back_inserter(out), "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                 ms % 1000);
}

void name_thread(std::string_view name) {
  char buf[16];  // the kernel keeps 15 bytes and the terminator
  const std::size_t n = name.copy(buf, sizeof buf - 1);
  buf[n] = '\0';
  pthread_setname_np(pthread_self(), buf);
}

}  // namespace llmproxy::log
