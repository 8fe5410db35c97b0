#include "log/log.h"

#include <pthread.h>

#include <chrono>
#include <string>

#include "http/errors.h"
#include "log/line_output.h"

namespace llmproxy::log {

void write_line(std::string_view level, std::string_view msg) {
  std::string out = "{\"level\":\"";
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

void name_thread(std::string_view name) {
  char buf[16];  // the kernel keeps 15 bytes and the terminator
  const std::size_t n = name.copy(buf, sizeof buf - 1);
  buf[n] = '\0';
  pthread_setname_np(pthread_self(), buf);
}

}  // namespace llmproxy::log
