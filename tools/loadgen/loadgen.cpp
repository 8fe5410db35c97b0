// llmproxy-loadgen: an HTTP/1.1 keep-alive load generator that understands Server-Sent Events.
//
// It drives the benchmarks in bench/: the same load against the mock backend directly and through
// the gateway, so what it measures has to be what a streaming client experiences, and it must not
// be the bottleneck itself.
//
// Why it looks the way it does:
//  - One io_context per thread; connection i lives on thread i % T for its whole life, and each
//    thread records into its own result vectors, merged after the run. Nothing on the request path
//    locks; the only shared writes are one atomic fetch_add per request (the request counter).
//  - A connection is one coroutine (claim a request -> [connect] -> write -> read until the
//    response is complete). Expected I/O errors are values (as_tuple), never exceptions.
//  - Every request is the same bytes, built once before the run. Responses are parsed in place
//    in a fixed per-connection buffer by a small incremental HTTP/1.1 parser (status, headers,
//    Content-Length / chunked / until-close framing) and an SSE scanner that keeps at most 16
//    bytes of the current line (enough to recognise `data:` and `data: [DONE]`). So the steady
//    state allocates only when a result vector grows.
//  - Each socket read is timestamped once; every SSE event completed by that read gets that time.
//    That is what a client sees: events that arrive in one read arrive together. A read that
//    completes more than one event is counted as "coalesced" (someone between the backend and us
//    held events back and sent them together). "Coalesced data reads" leave `data: [DONE]` out:
//    servers write it right behind the last chunk, so a proxy that reads both at once sends them
//    together without having held anything back.
//  - Open loop (--rate): request k is scheduled at k/R seconds; a free connection takes the next
//    slot, waits for its time and sends. Latency and TTFT are measured from the scheduled time,
//    not from the send, so a slow server cannot hide its queueing by slowing the load down
//    (coordinated omission).
//  - Deadlines: one reaper per thread wakes every 50 ms and closes the socket of any request past
//    its --timeout, so a hung server ends the run in bounded time instead of hanging it.
//  - Percentiles are exact: every sample is kept and sorted at the end (nearest rank).
//  - `--self-test` feeds recorded responses through the parser split at every byte offset (and
//    one byte at a time) and checks status, event count, [DONE] and coalescing.

#include <fmt/core.h>
#include <signal.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core/string.hpp>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace llmproxy::loadgen {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using boost::system::error_code;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using namespace std::string_view_literals;

constexpr auto kAsTuple = asio::as_tuple(asio::use_awaitable);

constexpr std::size_t kReadBufferSize = 64 * 1024;  // per connection; a header must fit in it
constexpr std::size_t kMaxHeaderBytes = 60 * 1024;
constexpr std::size_t kMaxChunkLine = 4096;  // chunk-size line or trailer line
constexpr std::int64_t kNever = std::numeric_limits<std::int64_t>::max();
constexpr auto kReaperPeriod = 50ms;
constexpr auto kConnectBackoff = 20ms;  // after a failed connect, so a dead server is not spun on

// Set by SIGINT/SIGTERM: stop starting requests, let those in flight finish, print the summary.
// A signal handler can only reach global state; nothing else here is global.
std::atomic<bool> g_interrupted{false};
static_assert(std::atomic<bool>::is_always_lock_free);

extern "C" void on_interrupt(int) {
  g_interrupted.store(true, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------------
// Command line

enum class Mode { kNonStream, kStream };

struct Options {
  std::string url;
  std::string host;  // as written in the URL (brackets removed)
  std::string port = "80";
  std::string target = "/";
  Mode mode = Mode::kNonStream;
  int concurrency = 1;
  int threads = 1;
  std::int64_t duration_ns = 0;  // 0: not given
  std::uint64_t requests = 0;    // 0: not given
  double rate = 0;               // requests/s; 0: closed loop
  std::string body;
  bool body_given = false;
  std::vector<std::string> headers;
  std::int64_t warmup_ns = 0;
  std::int64_t timeout_ns = 30'000'000'000;
  std::string csv_path;
  bool json = false;
};

void print_usage(std::FILE* to) {
  fmt::print(
      to,
      "usage: llmproxy-loadgen --url http://HOST:PORT/PATH [--mode nonstream|stream]\n"
      "         [--concurrency C] [--duration 10s | --requests N] [--rate R]\n"
      "         [--body JSON | --body-file F] [--header 'K: V' ...] [--warmup 1s]\n"
      "         [--threads T] [--timeout 30s] [--csv FILE] [--json]\n"
      "  --mode         nonstream (default): latency per request; stream: parse the SSE body,\n"
      "                 time to first event, gaps between events, [DONE], coalesced reads\n"
      "  --concurrency  keep-alive connections (default 1)\n"
      "  --duration     measured time after the warmup (default 10s when --requests is absent)\n"
      "  --requests     measured requests to send, then stop\n"
      "  --rate         open loop: R requests/s at fixed intervals over the C connections,\n"
      "                 latency measured from the scheduled time; omit for closed loop\n"
      "  --body         request body (default: a small chat request; \"stream\":true in stream\n"
      "                 mode); --body-file reads it from a file\n"
      "  --header       extra request header, repeatable\n"
      "  --warmup       requests started during this time are not measured (default 0s)\n"
      "  --threads      event-loop threads (default 1)\n"
      "  --timeout      per-request deadline; a request past it is an error (default 30s)\n"
      "  --csv          one row per measured request: "
      "start_us,latency_us,ttft_us,status,events,error\n"
      "  --json         print one JSON object on stdout (the human summary goes to stderr)\n"
      "  --self-test    check the response parser on recorded responses split at every byte\n"
      "Durations: 500ms, 10s, 1.5s, 2m (a bare number is seconds).\n");
}

std::optional<std::int64_t> parse_duration_ns(std::string_view s) {
  double v = 0;
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ec != std::errc() || !(v >= 0)) return std::nullopt;
  const std::string_view unit(r.ptr, static_cast<std::size_t>(s.data() + s.size() - r.ptr));
  double scale = 0;
  if (unit.empty() || unit == "s") {
    scale = 1e9;
  } else if (unit == "ms") {
    scale = 1e6;
  } else if (unit == "us") {
    scale = 1e3;
  } else if (unit == "m") {
    scale = 60e9;
  } else {
    return std::nullopt;
  }
  const double ns = v * scale;
  if (ns > 1e18) return std::nullopt;
  return static_cast<std::int64_t>(ns);
}

template <class T>
std::optional<T> parse_number(std::string_view s) {
  T v{};
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ec != std::errc() || r.ptr != s.data() + s.size()) return std::nullopt;
  return v;
}

// http://host[:port][/path]; https is refused (the benchmarks run on loopback).
std::string parse_url(std::string_view url, Options& opt) {
  constexpr auto kScheme = "http://"sv;
  if (url.substr(0, kScheme.size()) != kScheme) return "only http:// URLs are supported";
  std::string_view rest = url.substr(kScheme.size());
  const auto slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  opt.target = slash == std::string_view::npos ? "/" : std::string(rest.substr(slash));
  if (authority.empty()) return "missing host";
  std::string_view port;
  if (authority.front() == '[') {
    const auto close = authority.find(']');
    if (close == std::string_view::npos) return "unterminated [IPv6] host";
    opt.host = std::string(authority.substr(1, close - 1));
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') return "unexpected text after ]";
      port = after.substr(1);
    }
  } else {
    const auto colon = authority.rfind(':');
    opt.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) port = authority.substr(colon + 1);
  }
  if (opt.host.empty()) return "missing host";
  if (!port.empty()) {
    auto p = parse_number<unsigned>(port);
    if (!p || *p == 0 || *p > 65535) return fmt::format("bad port '{}'", port);
    opt.port = std::string(port);
  }
  return {};
}

std::string read_file(const std::string& path, bool& ok) {
  ok = false;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return {};
  std::string out;
  char buf[8192];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  ok = !std::ferror(f);
  std::fclose(f);
  return out;
}

// Returns an error message, empty on success. Sets self_test when --self-test was given.
std::string parse_args(int argc, char** argv, Options& opt, bool& self_test) {
  bool have_url = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    std::string_view value;
    bool inline_value = false;
    if (auto eq = arg.find('='); arg.substr(0, 2) == "--" && eq != std::string_view::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      inline_value = true;
    }
    if (arg == "--json") {
      opt.json = true;
      continue;
    }
    if (arg == "--self-test") {
      self_test = true;
      continue;
    }
    if (arg == "--help" || arg == "-h") return "help";
    static constexpr std::string_view kWithValue[] = {
        "--url",     "--mode", "--concurrency", "--duration", "--requests",
        "--rate",    "--body", "--body-file",   "--header",   "--warmup",
        "--threads", "--csv",  "--timeout"};
    if (std::find(std::begin(kWithValue), std::end(kWithValue), arg) == std::end(kWithValue)) {
      return fmt::format("unknown option '{}'", arg);
    }
    if (!inline_value) {
      if (i + 1 >= argc) return fmt::format("{} needs a value", arg);
      value = argv[++i];
    }
    if (arg == "--url") {
      opt.url = std::string(value);
      if (auto err = parse_url(value, opt); !err.empty()) {
        return fmt::format("--url '{}': {}", value, err);
      }
      have_url = true;
    } else if (arg == "--mode") {
      if (value == "nonstream") {
        opt.mode = Mode::kNonStream;
      } else if (value == "stream") {
        opt.mode = Mode::kStream;
      } else {
        return fmt::format("--mode '{}': expected nonstream or stream", value);
      }
    } else if (arg == "--concurrency") {
      auto n = parse_number<int>(value);
      if (!n || *n < 1 || *n > 100000) {
        return fmt::format("--concurrency '{}': expected 1..100000", value);
      }
      opt.concurrency = *n;
    } else if (arg == "--threads") {
      auto n = parse_number<int>(value);
      if (!n || *n < 1 || *n > 256) return fmt::format("--threads '{}': expected 1..256", value);
      opt.threads = *n;
    } else if (arg == "--duration" || arg == "--warmup" || arg == "--timeout") {
      auto ns = parse_duration_ns(value);
      if (!ns) return fmt::format("{} '{}': expected a duration like 500ms or 10s", arg, value);
      if (arg == "--duration") {
        if (*ns <= 0) return "--duration must be greater than 0";
        opt.duration_ns = *ns;
      } else if (arg == "--warmup") {
        opt.warmup_ns = *ns;
      } else {
        if (*ns <= 0) return "--timeout must be greater than 0";
        opt.timeout_ns = *ns;
      }
    } else if (arg == "--requests") {
      auto n = parse_number<std::uint64_t>(value);
      if (!n || *n == 0) return fmt::format("--requests '{}': expected a positive number", value);
      opt.requests = *n;
    } else if (arg == "--rate") {
      auto r = parse_number<double>(value);
      if (!r || !(*r > 0) || *r > 1e7) {
        return fmt::format("--rate '{}': expected requests per second > 0", value);
      }
      opt.rate = *r;
    } else if (arg == "--body") {
      opt.body = std::string(value);
      opt.body_given = true;
    } else if (arg == "--body-file") {
      bool ok = false;
      opt.body = read_file(std::string(value), ok);
      if (!ok) return fmt::format("--body-file '{}': cannot read: {}", value, std::strerror(errno));
      opt.body_given = true;
    } else if (arg == "--header") {
      const auto colon = value.find(':');
      if (colon == std::string_view::npos || colon == 0 ||
          value.find_first_of("\r\n") != std::string_view::npos) {
        return fmt::format("--header '{}': expected 'Name: value'", value);
      }
      opt.headers.emplace_back(value);
    } else if (arg == "--csv") {
      opt.csv_path = std::string(value);
    }
  }
  if (self_test) return {};
  if (!have_url) return "--url is required";
  if (opt.duration_ns > 0 && opt.requests > 0) return "give --duration or --requests, not both";
  if (opt.duration_ns == 0 && opt.requests == 0) opt.duration_ns = 10'000'000'000;
  if (opt.threads > opt.concurrency) opt.threads = opt.concurrency;
  if (!opt.body_given) {
    opt.body =
        opt.mode == Mode::kStream
            ? R"({"model":"mock-model","stream":true,"messages":[{"role":"user","content":"Say hello."}]})"
            : R"({"model":"mock-model","messages":[{"role":"user","content":"Say hello."}]})";
  }
  return {};
}

// The request, identical for every send.
std::string build_request(const Options& opt) {
  const bool v6 = opt.host.find(':') != std::string::npos;
  std::string host = v6 ? "[" + opt.host + "]" : opt.host;
  if (opt.port != "80") host += ":" + opt.port;
  bool has_content_type = false;
  bool has_user_agent = false;
  for (const auto& h : opt.headers) {
    const std::string_view name = std::string_view(h).substr(0, h.find(':'));
    has_content_type |= boost::beast::iequals(name, "content-type");
    has_user_agent |= boost::beast::iequals(name, "user-agent");
  }
  std::string req = fmt::format("POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
                                opt.target, host, opt.body.size());
  if (!has_content_type) req += "Content-Type: application/json\r\n";
  if (!has_user_agent) req += "User-Agent: llmproxy-loadgen\r\n";
  if (opt.mode == Mode::kStream) req += "Accept: text/event-stream\r\n";
  for (const auto& h : opt.headers) req.append(h).append("\r\n");
  req += "\r\n";
  req += opt.body;
  return req;
}

// ---------------------------------------------------------------------------------------------
// SSE: events are separated by a blank line; lines end in LF, CRLF or CR. Only `data:` lines
// matter here: an event is dispatched when a blank line ends an event that had one.

class SseScanner {
 public:
  void reset() {
    line_len_ = 0;
    after_cr_ = false;
    data_lines_ = 0;
    event_is_done_ = false;
  }

  // Calls on_event(bool is_done) for every event completed inside [p, p + n).
  template <class OnEvent>
  void feed(const char* p, std::size_t n, OnEvent& on_event) {
    const char* const end = p + n;
    while (p < end) {
      if (after_cr_) {  // the LF of a CRLF that was split across two feeds
        after_cr_ = false;
        if (*p == '\n') {
          ++p;
          continue;
        }
      }
      const char* eol = find_eol(p, end);
      keep(p, static_cast<std::size_t>(eol - p));
      if (eol == end) break;
      after_cr_ = *eol == '\r';
      end_line(on_event);
      p = eol + 1;
    }
  }

 private:
  static constexpr std::size_t kKeep = 16;

  static const char* find_eol(const char* p, const char* end) {
    const void* nl = std::memchr(p, '\n', static_cast<std::size_t>(end - p));
    const char* limit = nl ? static_cast<const char*>(nl) : end;
    const void* cr = std::memchr(p, '\r', static_cast<std::size_t>(limit - p));
    return cr ? static_cast<const char*>(cr) : limit;
  }

  void keep(const char* p, std::size_t n) {
    if (line_len_ < kKeep) std::memcpy(head_ + line_len_, p, std::min(n, kKeep - line_len_));
    line_len_ += n;
  }

  template <class OnEvent>
  void end_line(OnEvent& on_event) {
    if (line_len_ == 0) {
      if (data_lines_ > 0) on_event(event_is_done_);
      data_lines_ = 0;
      event_is_done_ = false;
      return;
    }
    const std::string_view head(head_, std::min(line_len_, kKeep));
    if (head.substr(0, 5) == "data:") {
      std::string_view value = head.substr(5);
      std::size_t value_len = line_len_ - 5;
      if (!value.empty() && value.front() == ' ') {
        value.remove_prefix(1);
        --value_len;
      }
      ++data_lines_;
      event_is_done_ = data_lines_ == 1 && value_len == 6 && value == "[DONE]";
    }
    line_len_ = 0;
  }

  char head_[kKeep] = {};
  std::size_t line_len_ = 0;
  bool after_cr_ = false;
  int data_lines_ = 0;
  bool event_is_done_ = false;
};

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 response parser: incremental, in place, body bytes handed to a sink as they arrive.

class ResponseParser {
 public:
  enum class Step { kNeedMore, kDone, kError };

  void reset() {
    state_ = State::kHeader;
    status_ = 0;
    keep_alive_ = true;
    remaining_ = 0;
    error_ = {};
  }

  // Parses data[0, n). Sets `consumed` to the bytes used; the caller keeps the rest and calls
  // again with more appended. sink.body(p, len) receives the (de-chunked) body.
  template <class Sink>
  Step feed(const char* data, std::size_t n, std::size_t& consumed, Sink& sink) {
    std::size_t pos = 0;
    for (;;) {
      const std::string_view rest(data + pos, n - pos);
      switch (state_) {
        case State::kHeader: {
          const auto end = rest.find("\r\n\r\n");
          if (end == std::string_view::npos) {
            if (rest.size() > kMaxHeaderBytes)
              return fail(consumed, pos, "response header too large");
            consumed = pos;
            return Step::kNeedMore;
          }
          if (!parse_header(rest.substr(0, end + 2))) return fail(consumed, pos, error_);
          pos += end + 4;
          break;
        }
        case State::kLength:
        case State::kChunkData: {
          const std::size_t take =
              static_cast<std::size_t>(std::min<std::uint64_t>(remaining_, rest.size()));
          if (take > 0) sink.body(rest.data(), take);
          pos += take;
          remaining_ -= take;
          if (remaining_ > 0) {
            consumed = pos;
            return Step::kNeedMore;
          }
          state_ = state_ == State::kLength ? State::kDone : State::kChunkDataEnd;
          break;
        }
        case State::kUntilClose:
          if (!rest.empty()) sink.body(rest.data(), rest.size());
          consumed = n;
          return Step::kNeedMore;
        case State::kChunkSize: {
          const auto eol = rest.find("\r\n");
          if (eol == std::string_view::npos) {
            if (rest.size() > kMaxChunkLine) return fail(consumed, pos, "chunk size line too long");
            consumed = pos;
            return Step::kNeedMore;
          }
          const std::string_view line = rest.substr(0, eol);
          std::uint64_t size = 0;
          auto r = std::from_chars(line.data(), line.data() + line.size(), size, 16);
          if (r.ec != std::errc() || size > (std::uint64_t{1} << 48)) {
            return fail(consumed, pos, "bad chunk size");
          }
          const std::string_view ext(r.ptr,
                                     static_cast<std::size_t>(line.data() + line.size() - r.ptr));
          if (!ext.empty() && ext.front() != ';' && ext.front() != ' ' && ext.front() != '\t') {
            return fail(consumed, pos, "bad chunk size");
          }
          pos += eol + 2;
          remaining_ = size;
          state_ = size == 0 ? State::kTrailer : State::kChunkData;
          break;
        }
        case State::kChunkDataEnd:
          if (rest.size() < 2) {
            consumed = pos;
            return Step::kNeedMore;
          }
          if (rest[0] != '\r' || rest[1] != '\n')
            return fail(consumed, pos, "chunk not followed by CRLF");
          pos += 2;
          state_ = State::kChunkSize;
          break;
        case State::kTrailer: {
          const auto eol = rest.find("\r\n");
          if (eol == std::string_view::npos) {
            if (rest.size() > kMaxChunkLine) return fail(consumed, pos, "trailer line too long");
            consumed = pos;
            return Step::kNeedMore;
          }
          pos += eol + 2;
          if (eol == 0) state_ = State::kDone;
          break;
        }
        case State::kDone:
          consumed = pos;
          return Step::kDone;
      }
    }
  }

  // The connection closed: the end of an until-close body, an error otherwise.
  bool complete_at_eof() {
    if (state_ != State::kUntilClose) return false;
    state_ = State::kDone;
    return true;
  }

  int status() const { return status_; }
  bool keep_alive() const { return keep_alive_; }
  bool header_done() const { return state_ != State::kHeader; }
  std::string_view error() const { return error_; }

 private:
  enum class State {
    kHeader,
    kLength,
    kUntilClose,
    kChunkSize,
    kChunkData,
    kChunkDataEnd,
    kTrailer,
    kDone
  };

  Step fail(std::size_t& consumed, std::size_t pos, std::string_view why) {
    error_ = why;
    consumed = pos;
    return Step::kError;
  }

  static std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    return s;
  }

  // True when the comma-separated list `value` contains `token` (case-insensitive).
  static bool has_token(std::string_view value, std::string_view token) {
    while (!value.empty()) {
      const auto comma = value.find(',');
      if (boost::beast::iequals(trim(value.substr(0, comma)), token)) return true;
      if (comma == std::string_view::npos) break;
      value.remove_prefix(comma + 1);
    }
    return false;
  }

  // `head` is the status line and the header lines, each ending in CRLF.
  bool parse_header(std::string_view head) {
    const auto eol = head.find("\r\n");
    const std::string_view line = head.substr(0, eol);
    // "HTTP/1.x SSS reason"
    if (line.size() < 12 || line.substr(0, 7) != "HTTP/1." || line[8] != ' ' ||
        (line.size() > 12 && line[12] != ' ')) {
      error_ = "bad status line";
      return false;
    }
    auto code = parse_number<int>(line.substr(9, 3));
    if (!code || *code < 100 || *code > 999) {
      error_ = "bad status code";
      return false;
    }
    status_ = *code;
    keep_alive_ = line[7] != '0';
    bool chunked = false;
    bool has_transfer_encoding = false;
    std::optional<std::uint64_t> length;
    head.remove_prefix(eol + 2);
    while (!head.empty()) {
      const auto end = head.find("\r\n");
      const std::string_view field = head.substr(0, end);
      head.remove_prefix(end + 2);
      const auto colon = field.find(':');
      if (colon == std::string_view::npos || colon == 0) {
        error_ = "bad header line";
        return false;
      }
      const std::string_view name = field.substr(0, colon);
      const std::string_view value = trim(field.substr(colon + 1));
      if (boost::beast::iequals(name, "content-length")) {
        auto v = parse_number<std::uint64_t>(value);
        if (!v || (length && *length != *v)) {
          error_ = "bad Content-Length";
          return false;
        }
        length = v;
      } else if (boost::beast::iequals(name, "transfer-encoding")) {
        has_transfer_encoding = true;
        const auto comma = value.rfind(',');
        chunked = boost::beast::iequals(
            trim(comma == std::string_view::npos ? value : value.substr(comma + 1)), "chunked");
      } else if (boost::beast::iequals(name, "connection")) {
        if (has_token(value, "close")) keep_alive_ = false;
        if (has_token(value, "keep-alive")) keep_alive_ = true;
      }
    }
    if (status_ < 200) {
      if (status_ == 101) {
        error_ = "unexpected 101 Switching Protocols";
        return false;
      }
      return true;  // interim response (100 Continue, 103 Early Hints): the real one follows
    }
    if (status_ == 204 || status_ == 304) {
      state_ = State::kDone;
    } else if (chunked) {
      state_ = State::kChunkSize;
    } else if (has_transfer_encoding || !length) {
      state_ = State::kUntilClose;
      keep_alive_ = false;
    } else {
      remaining_ = *length;
      state_ = remaining_ > 0 ? State::kLength : State::kDone;
    }
    return true;
  }

  State state_ = State::kHeader;
  int status_ = 0;
  bool keep_alive_ = true;
  std::uint64_t remaining_ = 0;
  std::string_view error_;
};

// ---------------------------------------------------------------------------------------------
// Results

enum class ErrorKind : std::uint8_t { kNone, kConnect, kWrite, kRead, kTimeout, kProtocol };
constexpr std::string_view kErrorNames[] = {"none", "connect", "write",
                                            "read", "timeout", "protocol"};
constexpr std::size_t kErrorKinds = std::size(kErrorNames);

// One measured request. Times in ns; start_ns is from the start of the measurement window.
struct RequestRecord {
  std::int64_t start_ns = 0;    // scheduled time (open loop) or send start (closed loop)
  std::int64_t latency_ns = 0;  // start -> response complete (or -> failure)
  std::int64_t ttft_ns = -1;    // start -> first SSE event; -1 if none
  std::int64_t lag_ns = 0;      // actual send - scheduled time (open loop)
  std::uint32_t events = 0;
  std::uint16_t status = 0;  // 0 if no complete response
  ErrorKind error = ErrorKind::kNone;
  bool done = false;  // the last event was data: [DONE]
};

// What one thread recorded. Merged after the run.
struct Results {
  std::vector<RequestRecord> records;
  std::vector<std::int64_t> gaps_ns;
  std::uint64_t warmup_requests = 0;
  std::uint64_t reads = 0;
  std::uint64_t coalesced_reads = 0;
  std::uint64_t coalesced_data_reads = 0;  // more than one event other than [DONE] in a read
  std::uint64_t connects = 0;
  std::uint64_t stale_retries = 0;
  std::int64_t last_completion_ns = 0;  // absolute (from t0)
};

// ---------------------------------------------------------------------------------------------
// The run: shared, read-only except for the two counters.

struct Plan {
  explicit Plan(const Options& o) : opt(o) {}

  struct Claim {
    std::int64_t start_ns;  // when the request is due, from t0
    bool measured;
  };

  // Decides whether this connection sends another request, when, and whether it counts.
  std::optional<Claim> claim(std::int64_t now) {
    if (g_interrupted.load(std::memory_order_relaxed)) return std::nullopt;
    if (opt.rate > 0) {
      const std::uint64_t slot = next_slot.fetch_add(1, std::memory_order_relaxed);
      const std::int64_t at = slot_time_ns(slot);
      const bool measured = at >= opt.warmup_ns;
      if (opt.requests > 0 && measured && slot - first_measured_slot >= opt.requests) {
        return std::nullopt;
      }
      if (opt.duration_ns > 0 && at >= opt.warmup_ns + opt.duration_ns) return std::nullopt;
      return Claim{at, measured};
    }
    if (now < opt.warmup_ns) return Claim{now, false};
    if (opt.requests > 0) {
      if (measured_claimed.fetch_add(1, std::memory_order_relaxed) >= opt.requests) {
        return std::nullopt;
      }
    } else if (now >= opt.warmup_ns + opt.duration_ns) {
      return std::nullopt;
    }
    return Claim{now, true};
  }

  std::int64_t slot_time_ns(std::uint64_t slot) const {
    return static_cast<std::int64_t>(static_cast<double>(slot) * 1e9 / opt.rate);
  }

  std::int64_t now_ns() const { return (Clock::now() - t0).count(); }

  const Options& opt;
  std::string request;
  tcp::endpoint endpoint;
  Clock::time_point t0;
  std::uint64_t first_measured_slot = 0;
  std::atomic<std::uint64_t> next_slot{0};
  std::atomic<std::uint64_t> measured_claimed{0};
};

struct Worker;

struct Connection {
  Connection(Worker& w, asio::io_context& ioc)
      : worker(w), socket(ioc), timer(ioc), buffer(new char[kReadBufferSize]) {}

  Worker& worker;
  tcp::socket socket;
  asio::steady_timer timer;  // open-loop pacing and connect backoff
  std::unique_ptr<char[]> buffer;
  std::size_t buffered = 0;
  std::int64_t deadline_ns = kNever;  // watched by the reaper
  bool timed_out = false;
  ResponseParser parser;
  SseScanner sse;
};

struct Worker {
  asio::io_context ioc{1};
  std::vector<std::unique_ptr<Connection>> connections;
  int live = 0;  // connection coroutines still running
  Results results;
};

// The state of the request in flight.
struct Exchange {
  std::int64_t start_ns = 0;  // from t0
  std::int64_t ttft_ns = -1;
  std::int64_t last_event_ns = 0;
  std::uint32_t events = 0;
  std::uint32_t events_this_read = 0;
  bool last_is_done = false;
  bool got_bytes = false;
  bool measured = false;
  bool fresh_connection = false;
};

// Receives the body of one response; in stream mode, runs it through the SSE scanner and
// timestamps every completed event with the time of the read that completed it.
struct BodySink {
  Connection& c;
  Exchange& x;
  Results& r;
  std::int64_t read_ns;
  bool scan;

  void body(const char* p, std::size_t n) {
    if (scan) c.sse.feed(p, n, *this);
  }

  void operator()(bool is_done) {
    ++x.events;
    ++x.events_this_read;
    if (x.events == 1) {
      x.ttft_ns = read_ns - x.start_ns;
    } else if (x.measured) {
      r.gaps_ns.push_back(read_ns - x.last_event_ns);
    }
    x.last_event_ns = read_ns;
    x.last_is_done = is_done;
  }
};

// After a read: counts it as coalesced when it completed more than one event, and as a coalesced
// data read when more than one besides a [DONE] that ended it.
void count_coalesced(const Exchange& x, Results& r) {
  if (x.events_this_read > 1) ++r.coalesced_reads;
  if (x.events_this_read - (x.last_is_done && x.events_this_read > 0 ? 1u : 0u) > 1) {
    ++r.coalesced_data_reads;
  }
}

ResponseParser::Step parse_buffered(Connection& c, Exchange& x, Results& r, std::int64_t read_ns,
                                    bool scan) {
  BodySink sink{c, x, r, read_ns, scan};
  std::size_t consumed = 0;
  const auto step = c.parser.feed(c.buffer.get(), c.buffered, consumed, sink);
  if (consumed > 0 && consumed < c.buffered) {
    std::memmove(c.buffer.get(), c.buffer.get() + consumed, c.buffered - consumed);
  }
  c.buffered -= consumed;
  return step;
}

ErrorKind io_error(const Connection& c) {
  return c.timed_out ? ErrorKind::kTimeout : ErrorKind::kRead;
}

// Sends the request and reads the whole response. Returns kNone when a complete response was
// received (x and the parser tell the rest).
asio::awaitable<ErrorKind> exchange(const Plan& plan, Connection& c, Exchange& x) {
  Results& r = c.worker.results;
  x.fresh_connection = !c.socket.is_open();
  if (x.fresh_connection) {
    error_code ec;
    c.socket.open(plan.endpoint.protocol(), ec);
    if (ec) co_return ErrorKind::kConnect;
    auto [cec] = co_await c.socket.async_connect(plan.endpoint, kAsTuple);
    if (cec) co_return c.timed_out ? ErrorKind::kTimeout : ErrorKind::kConnect;
    c.socket.set_option(tcp::no_delay(true), ec);
    c.buffered = 0;
    ++r.connects;
  }
  auto [wec, wn] = co_await asio::async_write(c.socket, asio::buffer(plan.request), kAsTuple);
  if (wec) co_return c.timed_out ? ErrorKind::kTimeout : ErrorKind::kWrite;

  c.parser.reset();
  c.sse.reset();
  const bool scan = plan.opt.mode == Mode::kStream;
  for (;;) {
    if (c.buffered == kReadBufferSize) co_return ErrorKind::kProtocol;  // parser never gets here
    auto [ec, n] = co_await c.socket.async_read_some(
        asio::buffer(c.buffer.get() + c.buffered, kReadBufferSize - c.buffered), kAsTuple);
    const std::int64_t read_ns = plan.now_ns();
    if (ec) {
      if (ec == asio::error::eof && c.parser.complete_at_eof()) co_return ErrorKind::kNone;
      co_return io_error(c);
    }
    x.got_bytes = true;
    c.buffered += n;
    x.events_this_read = 0;
    const auto step = parse_buffered(c, x, r, read_ns, scan);
    if (x.measured) {
      ++r.reads;
      count_coalesced(x, r);
    }
    if (step == ResponseParser::Step::kDone) co_return ErrorKind::kNone;
    if (step == ResponseParser::Step::kError) co_return ErrorKind::kProtocol;
  }
}

void close_socket(Connection& c) {
  error_code ignored;
  c.socket.close(ignored);
  c.buffered = 0;
}

asio::awaitable<void> connection_loop(Plan& plan, Connection& c) {
  Worker& w = c.worker;
  const bool open_loop = plan.opt.rate > 0;
  for (;;) {
    const std::int64_t now = plan.now_ns();
    const auto claim = plan.claim(now);
    if (!claim) break;
    if (claim->start_ns > now) {
      c.timer.expires_at(plan.t0 + std::chrono::nanoseconds(claim->start_ns));
      co_await c.timer.async_wait(kAsTuple);
    }
    Exchange x;
    x.measured = claim->measured;
    const std::int64_t send_ns = plan.now_ns();
    x.start_ns = open_loop ? claim->start_ns : send_ns;
    c.timed_out = false;
    c.deadline_ns = send_ns + plan.opt.timeout_ns;

    ErrorKind err = co_await exchange(plan, c, x);
    // A kept-alive connection the server closed while it sat idle fails before any byte of the
    // response: that is not the server failing this request, so send it again on a new one.
    if ((err == ErrorKind::kRead || err == ErrorKind::kWrite) && !x.fresh_connection &&
        !x.got_bytes) {
      close_socket(c);
      ++w.results.stale_retries;
      const std::int64_t start_ns = x.start_ns;
      x = Exchange{};
      x.start_ns = start_ns;
      x.measured = claim->measured;
      err = co_await exchange(plan, c, x);
    }
    const std::int64_t end_ns = plan.now_ns();
    c.deadline_ns = kNever;

    Results& r = w.results;
    if (x.measured) {
      RequestRecord rec;
      rec.start_ns = x.start_ns - plan.opt.warmup_ns;
      rec.latency_ns = end_ns - x.start_ns;
      rec.ttft_ns = x.ttft_ns;
      rec.lag_ns = send_ns - x.start_ns;
      rec.events = x.events;
      rec.error = err;
      rec.status = err == ErrorKind::kNone ? static_cast<std::uint16_t>(c.parser.status()) : 0;
      rec.done = x.last_is_done;
      r.records.push_back(rec);
      r.last_completion_ns = std::max(r.last_completion_ns, end_ns);
    } else {
      ++r.warmup_requests;
    }
    // Bytes after a complete response were never asked for: start clean on a new connection.
    if (err != ErrorKind::kNone || !c.parser.keep_alive() || c.buffered > 0) close_socket(c);
    if (err == ErrorKind::kConnect) {
      c.timer.expires_after(kConnectBackoff);
      co_await c.timer.async_wait(kAsTuple);
    }
  }
  close_socket(c);
  --w.live;
}

// Closes the socket of every request past its deadline; ends when the connections have.
asio::awaitable<void> reap_expired(Plan& plan, Worker& w) {
  asio::steady_timer timer(w.ioc);
  while (w.live > 0) {
    timer.expires_after(kReaperPeriod);
    co_await timer.async_wait(kAsTuple);
    const std::int64_t now = plan.now_ns();
    for (auto& c : w.connections) {
      if (c->deadline_ns < now) {
        c->deadline_ns = kNever;
        c->timed_out = true;
        close_socket(*c);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Summary

struct Stats {
  std::size_t count = 0;
  double p50 = 0, p90 = 0, p99 = 0, max = 0, mean = 0;  // ms
};

// Exact nearest-rank percentiles over every sample (sorts `ns`).
Stats summarize(std::vector<std::int64_t>& ns) {
  Stats s;
  s.count = ns.size();
  if (ns.empty()) return s;
  std::sort(ns.begin(), ns.end());
  auto at = [&](double p) {
    auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(ns.size())));
    rank = std::clamp<std::size_t>(rank, 1, ns.size());
    return static_cast<double>(ns[rank - 1]) / 1e6;
  };
  s.p50 = at(0.50);
  s.p90 = at(0.90);
  s.p99 = at(0.99);
  s.max = static_cast<double>(ns.back()) / 1e6;
  long double sum = 0;
  for (auto v : ns) sum += v;
  s.mean = static_cast<double>(sum / ns.size()) / 1e6;
  return s;
}

std::string stats_json(const Stats& s, bool with_mean) {
  if (s.count == 0) return "null";
  std::string out = fmt::format(R"({{"p50":{:.3f},"p90":{:.3f},"p99":{:.3f},"max":{:.3f})", s.p50,
                                s.p90, s.p99, s.max);
  if (with_mean) out += fmt::format(R"(,"mean":{:.3f})", s.mean);
  out += "}";
  return out;
}

std::string stats_text(const Stats& s) {
  if (s.count == 0) return "(no samples)";
  return fmt::format("p50 {:.3f}  p90 {:.3f}  p99 {:.3f}  max {:.3f}  mean {:.3f} ms  (n={})",
                     s.p50, s.p90, s.p99, s.max, s.mean, s.count);
}

double cpu_seconds_self() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

int report(const Options& opt, std::vector<std::unique_ptr<Worker>>& workers) {
  Results all;
  for (auto& w : workers) {
    Results& r = w->results;
    all.records.insert(all.records.end(), r.records.begin(), r.records.end());
    all.gaps_ns.insert(all.gaps_ns.end(), r.gaps_ns.begin(), r.gaps_ns.end());
    all.warmup_requests += r.warmup_requests;
    all.reads += r.reads;
    all.coalesced_reads += r.coalesced_reads;
    all.coalesced_data_reads += r.coalesced_data_reads;
    all.connects += r.connects;
    all.stale_retries += r.stale_retries;
    all.last_completion_ns = std::max(all.last_completion_ns, r.last_completion_ns);
  }
  std::sort(all.records.begin(), all.records.end(),
            [](const RequestRecord& a, const RequestRecord& b) { return a.start_ns < b.start_ns; });

  std::uint64_t errors = 0;
  std::uint64_t error_counts[kErrorKinds] = {};
  std::vector<std::pair<int, std::uint64_t>> status_counts;
  std::uint64_t events = 0, streams_done = 0;
  std::vector<std::int64_t> latency, ttft, lag;
  latency.reserve(all.records.size());
  for (const auto& rec : all.records) {
    events += rec.events;
    if (rec.ttft_ns >= 0) ttft.push_back(rec.ttft_ns);
    if (opt.rate > 0) lag.push_back(rec.lag_ns);
    if (rec.error != ErrorKind::kNone) {
      ++errors;
      ++error_counts[static_cast<std::size_t>(rec.error)];
      continue;
    }
    latency.push_back(rec.latency_ns);
    if (rec.done) ++streams_done;
    auto it = std::find_if(status_counts.begin(), status_counts.end(),
                           [&](const auto& p) { return p.first == rec.status; });
    if (it == status_counts.end()) {
      status_counts.emplace_back(rec.status, 1);
    } else {
      ++it->second;
    }
  }
  std::sort(status_counts.begin(), status_counts.end());
  const std::uint64_t requests = all.records.size();
  const std::uint64_t completed = requests - errors;
  const double duration_s =
      requests > 0 ? static_cast<double>(all.last_completion_ns - opt.warmup_ns) / 1e9 : 0.0;
  const double rps = duration_s > 0 ? static_cast<double>(completed) / duration_s : 0.0;
  const Stats lat = summarize(latency);
  const Stats tt = summarize(ttft);
  const Stats gap = summarize(all.gaps_ns);
  const Stats lg = summarize(lag);
  const bool stream = opt.mode == Mode::kStream;
  const double cpu_s = cpu_seconds_self();

  if (!opt.csv_path.empty()) {
    std::FILE* f = std::fopen(opt.csv_path.c_str(), "w");
    if (!f) {
      fmt::print(stderr, "llmproxy-loadgen: cannot write {}: {}\n", opt.csv_path,
                 std::strerror(errno));
      return 1;
    }
    fmt::print(f, "start_us,latency_us,ttft_us,status,events,error\n");
    for (const auto& rec : all.records) {
      fmt::print(
          f, "{},{},{},{},{},{}\n", rec.start_ns / 1000, rec.latency_ns / 1000,
          rec.ttft_ns >= 0 ? rec.ttft_ns / 1000 : -1, rec.status, rec.events,
          rec.error == ErrorKind::kNone ? "" : kErrorNames[static_cast<std::size_t>(rec.error)]);
    }
    if (std::fclose(f) != 0) {
      fmt::print(stderr, "llmproxy-loadgen: cannot write {}\n", opt.csv_path);
      return 1;
    }
  }

  std::string statuses, status_text;
  for (const auto& [code, n] : status_counts) {
    statuses += fmt::format(R"({}"{}":{})", statuses.empty() ? "" : ",", code, n);
    status_text += fmt::format("{}{}:{}", status_text.empty() ? "" : " ", code, n);
  }
  std::string error_json, error_text;
  for (std::size_t k = 1; k < kErrorKinds; ++k) {
    error_json += fmt::format(R"({}"{}":{})", k == 1 ? "" : ",", kErrorNames[k], error_counts[k]);
    if (error_counts[k] > 0) error_text += fmt::format(" {}:{}", kErrorNames[k], error_counts[k]);
  }

  std::FILE* human = opt.json ? stderr : stdout;
  fmt::print(human, "llmproxy-loadgen: {} {}, {} connections, {} thread{}, {}\n",
             stream ? "stream" : "nonstream", opt.url, opt.concurrency, opt.threads,
             opt.threads == 1 ? "" : "s",
             opt.rate > 0 ? fmt::format("open loop at {} req/s", opt.rate) : "closed loop");
  fmt::print(human, "  requests  {} in {:.3f} s ({:.1f} req/s), {} errors{}, status {}\n", requests,
             duration_s, rps, errors, error_text, status_text.empty() ? "-" : status_text);
  fmt::print(human, "  latency   {}\n", stats_text(lat));
  if (stream) {
    fmt::print(human, "  ttft      {}\n", stats_text(tt));
    fmt::print(human, "  gap       {}\n", stats_text(gap));
    fmt::print(
        human,
        "  events    {} ({:.1f} per request), ended with [DONE] {}/{}, coalesced reads {} of {} "
        "({} without [DONE])\n",
        events, requests ? static_cast<double>(events) / requests : 0.0, streams_done, completed,
        all.coalesced_reads, all.reads, all.coalesced_data_reads);
  }
  if (opt.rate > 0) fmt::print(human, "  send lag  {}\n", stats_text(lg));
  fmt::print(
      human,
      "  connects  {}, stale keep-alive retries {}, warmup requests {}, loadgen cpu {:.2f} s\n",
      all.connects, all.stale_retries, all.warmup_requests, cpu_s);

  if (opt.json) {
    fmt::print(
        "{{\"mode\":\"{}\",\"concurrency\":{},\"threads\":{},\"rate\":{},\"requests\":{},"
        "\"errors\":{},\"error_kinds\":{{{}}},\"status_counts\":{{{}}},\"duration_s\":{:.3f},"
        "\"rps\":{:.2f},\"latency_ms\":{},\"ttft_ms\":{},\"gap_ms\":{},\"events\":{},"
        "\"streams_done\":{},\"coalesced_reads\":{},\"coalesced_data_reads\":{},\"reads\":{},"
        "\"send_lag_ms\":{},"
        "\"connects\":{},\"stale_retries\":{},\"warmup_requests\":{},\"loadgen_cpu_s\":{:.3f}}}\n",
        stream ? "stream" : "nonstream", opt.concurrency, opt.threads,
        opt.rate > 0 ? fmt::format("{}", opt.rate) : "null", requests, errors, error_json, statuses,
        duration_s, rps, stats_json(lat, true), stream ? stats_json(tt, false) : "null",
        stream ? stats_json(gap, false) : "null", events, streams_done, all.coalesced_reads,
        all.coalesced_data_reads, all.reads, opt.rate > 0 ? stats_json(lg, false) : "null",
        all.connects, all.stale_retries, all.warmup_requests, cpu_s);
  }
  std::fflush(stdout);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Self-test: recorded responses fed in every possible split. Exercises the same parse path as a
// live run (the connection buffer, compaction, per-read event timestamps).

struct SelfTestCase {
  std::string name;
  std::string bytes;
  bool scan;
  int status;
  std::uint32_t events;
  bool done;
};

// Frames `pieces` as HTTP chunks (the first with a chunk extension), then the last chunk and a
// trailer field.
std::string chunked(std::initializer_list<std::string_view> pieces) {
  std::string out;
  bool first = true;
  for (auto p : pieces) {
    out += fmt::format("{:x}{}\r\n", p.size(), first ? ";ext=1" : "");
    out.append(p).append("\r\n");
    first = false;
  }
  out += "0\r\nX-Trailer: 1\r\n\r\n";
  return out;
}

// Feeds t.bytes as up to three reads cut at split_a and split_b. Returns what went wrong, or "".
std::string run_case(const SelfTestCase& t, std::size_t split_a, std::size_t split_b,
                     std::uint64_t& coalesced, std::uint64_t& coalesced_data) {
  asio::io_context ioc;
  Worker w;
  Connection c(w, ioc);
  Exchange x;
  x.measured = true;
  c.parser.reset();
  c.sse.reset();
  const std::size_t cuts[] = {split_a, split_b, t.bytes.size()};
  std::size_t from = 0;
  std::int64_t now = 0;
  ResponseParser::Step step = ResponseParser::Step::kNeedMore;
  for (std::size_t to : cuts) {
    if (to <= from) continue;
    std::memcpy(c.buffer.get() + c.buffered, t.bytes.data() + from, to - from);
    c.buffered += to - from;
    from = to;
    x.events_this_read = 0;
    step = parse_buffered(c, x, w.results, ++now, t.scan);
    count_coalesced(x, w.results);
    if (step != ResponseParser::Step::kNeedMore) break;
  }
  coalesced = w.results.coalesced_reads;
  coalesced_data = w.results.coalesced_data_reads;
  if (step == ResponseParser::Step::kNeedMore && c.parser.complete_at_eof()) {
    step = ResponseParser::Step::kDone;
  }
  if (step != ResponseParser::Step::kDone) {
    return step == ResponseParser::Step::kError ? std::string(c.parser.error()) : "incomplete";
  }
  if (c.parser.status() != t.status || x.events != t.events || x.last_is_done != t.done ||
      c.buffered != 0) {
    return fmt::format("status {} events {} done {} leftover {}", c.parser.status(), x.events,
                       x.last_is_done, c.buffered);
  }
  return {};
}

// Fed one byte per read, no read may complete two events.
bool run_bytewise(const SelfTestCase& t) {
  asio::io_context ioc;
  Worker w;
  Connection c(w, ioc);
  Exchange x;
  c.parser.reset();
  c.sse.reset();
  for (std::size_t i = 0; i < t.bytes.size(); ++i) {
    c.buffer[c.buffered++] = t.bytes[i];
    x.events_this_read = 0;
    const auto step = parse_buffered(c, x, w.results, static_cast<std::int64_t>(i), t.scan);
    if (x.events_this_read > 1 || step == ResponseParser::Step::kError) return false;
  }
  return x.events == t.events;
}

int self_test() {
  const std::string sse_head =
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
  const SelfTestCase cases[] = {
      {"chunked SSE with [DONE], one event per chunk",
       sse_head + chunked({"data: {\"choices\":[{\"i\":0}]}\n\n",
                           "data: {\"choices\":[{\"i\":1}]}\n\n", "data: [DONE]\n\n"}),
       true, 200, 3, true},
      {"events split across chunks; CR, CRLF lines; comments; multi-line data",
       "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n" +
           chunked({": pin\r\n\r\nda", "ta: a\r", "\revent: x\r\ndata: b\r\n",
                    "\r\ndata: c\ndata: d\n\n", "data:[DONE]\r", "\r"}),
       true, 200, 4, true},
      {"Content-Length SSE not ending in [DONE]",
       "HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\ndata: x\n\ndata: [DONE]x\n\n", true, 200, 2,
       false},
      {"100 Continue, then a non-stream answer",
       "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n"
       "Connection: close\r\n\r\n{}",
       false, 429, 0, false},
      {"HTTP/1.0 body until close", "HTTP/1.0 200 OK\r\n\r\ndata: 1\n\ndata: [DONE]\n\n", true, 200,
       2, true},
  };
  int failures = 0;
  for (const auto& t : cases) {
    bool ok = true;
    for (std::size_t a = 0; a <= t.bytes.size() && ok; ++a) {
      for (std::size_t b = a; b <= t.bytes.size() && ok; ++b) {
        std::uint64_t coalesced = 0, coalesced_data = 0;
        std::string why = run_case(t, a, b, coalesced, coalesced_data);
        // Everything in one read: every event after the first arrived coalesced; without the
        // [DONE] that ends a stream, only when two other events came with it.
        const std::uint32_t data_events = t.events - (t.done ? 1u : 0u);
        if (why.empty() && a == t.bytes.size() && coalesced != (t.events > 1 ? 1u : 0u)) {
          why = fmt::format("one read counted {} coalesced reads", coalesced);
        }
        if (why.empty() && a == t.bytes.size() && coalesced_data != (data_events > 1 ? 1u : 0u)) {
          why = fmt::format("one read counted {} coalesced data reads", coalesced_data);
        }
        if (!why.empty()) {
          fmt::print(stderr, "FAIL {}: split at {},{}: {}\n", t.name, a, b, why);
          ok = false;
        }
      }
    }
    if (ok && !run_bytewise(t)) {
      fmt::print(stderr, "FAIL {}: one byte per read\n", t.name);
      ok = false;
    }
    fmt::print("{} {}\n", ok ? "ok  " : "FAIL", t.name);
    failures += ok ? 0 : 1;
  }
  return failures == 0 ? 0 : 1;
}

// ---------------------------------------------------------------------------------------------

int run(int argc, char** argv) {
  Options opt;
  bool want_self_test = false;
  if (auto err = parse_args(argc, argv, opt, want_self_test); !err.empty()) {
    if (err == "help") {
      print_usage(stdout);
      return 0;
    }
    fmt::print(stderr, "llmproxy-loadgen: {}\n", err);
    print_usage(stderr);
    return 2;
  }
  if (want_self_test) return self_test();
  ::signal(SIGPIPE, SIG_IGN);

  Plan plan(opt);
  plan.request = build_request(opt);
  try {
    asio::io_context ioc;
    tcp::resolver resolver(ioc);
    auto results = resolver.resolve(opt.host, opt.port, tcp::resolver::numeric_service);
    plan.endpoint = results.begin()->endpoint();
  } catch (const std::exception& e) {
    fmt::print(stderr, "llmproxy-loadgen: cannot resolve {}: {}\n", opt.host, e.what());
    return 1;
  }
  if (opt.rate > 0) {
    // The first slot due at or after the warmup.
    auto first =
        static_cast<std::uint64_t>(std::ceil(static_cast<double>(opt.warmup_ns) * opt.rate / 1e9));
    while (first > 0 && plan.slot_time_ns(first - 1) >= opt.warmup_ns) --first;
    while (plan.slot_time_ns(first) < opt.warmup_ns) ++first;
    plan.first_measured_slot = first;
  }

  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < opt.threads; ++i) workers.push_back(std::make_unique<Worker>());
  for (int i = 0; i < opt.concurrency; ++i) {
    Worker& w = *workers[static_cast<std::size_t>(i % opt.threads)];
    w.connections.push_back(std::make_unique<Connection>(w, w.ioc));
    ++w.live;
  }
  // Expected samples: enough room that the vectors rarely grow during a run.
  for (auto& w : workers) {
    w->results.records.reserve(64 * 1024);
    if (opt.mode == Mode::kStream) w->results.gaps_ns.reserve(1024 * 1024);
  }

  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sa.sa_flags = SA_RESETHAND;  // a second signal ends the process at once
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  plan.t0 = Clock::now();
  for (auto& w : workers) {
    for (auto& c : w->connections)
      asio::co_spawn(w->ioc, connection_loop(plan, *c), asio::detached);
    asio::co_spawn(w->ioc, reap_expired(plan, *w), asio::detached);
  }
  std::vector<std::thread> threads;
  for (std::size_t i = 1; i < workers.size(); ++i) {
    Worker* w = workers[i].get();
    threads.emplace_back([w] { w->ioc.run(); });
  }
  workers.front()->ioc.run();
  for (auto& t : threads) t.join();
  return report(opt, workers);
}

}  // namespace
}  // namespace llmproxy::loadgen

int main(int argc, char** argv) {
  return llmproxy::loadgen::run(argc, argv);
}
