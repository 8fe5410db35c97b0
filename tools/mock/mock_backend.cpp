// llmproxy-mock: the bundled OpenAI-compatible fake backend.
//
// It is the upstream for the gateway's integration tests and the baseline in its benchmarks, so it
// has to be two things at once: scriptable (per-request headers or a "mock" body object choose the
// number of tokens, the delays, a forced status, an abrupt drop, and how usage is reported, after
// the four real backends in docs/wire-formats.md) and fast enough that it is never the bottleneck.
//
// Why it looks the way it does:
//  - One io_context per thread, each with its own SO_REUSEPORT acceptor: the kernel spreads
//    connections, and a connection never leaves its thread, so nothing on the request path locks.
//  - A connection is one coroutine (read -> handle -> write -> keep-alive?). Expected I/O errors
//    are values (as_tuple), never exceptions.
//  - Deadlines (idle keep-alive, slow body, stuck write) are enforced by one reaper per thread that
//    wakes every second and closes connections whose deadline has passed. Arming a deadline is a
//    store of a coarse tick, so the request path pays for no timer or clock call (beast's
//    tcp_stream arms and cancels a timer on every read and write, which showed in profiles).
//  - The request is parsed by a beast::http::basic_parser subclass that keeps only what the mock
//    needs (route, a handful of headers, the body) in per-connection strings whose capacity
//    survives across requests, instead of a beast::http::request that allocates every field.
//    Responses are formatted by hand into per-connection strings and sent with one gather write
//    (non-stream) or one write per SSE event (stream), so a keep-alive request in steady state
//    does not touch the heap apart from asio's recycled operation memory.
//  - Body JSON is validated and read with simdjson's DOM parser, one per thread (its buffers are
//    reused); DOM rather than On-Demand because it validates the whole document, so "invalid JSON"
//    is answered consistently.
//  - Delays (TTFT, between events) are steady_timer waits raced against a read on the socket, so a
//    client that goes away during a long delay is noticed at once, not at the next write.
//  - Counters are per thread (no shared cache line on the hot path) and summed by /mock/stats.

#include <fmt/core.h>
#include <signal.h>
#include <simdjson.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

namespace llmproxy::mock {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using boost::system::error_code;
using namespace std::chrono_literals;
using namespace std::string_view_literals;

constexpr auto kAsTuple = asio::as_tuple(asio::use_awaitable);

// Limits. The mock trusts its clients (tests, benchmarks, the gateway) but still bounds what a
// broken one can make it hold.
constexpr std::uint32_t kHeaderLimit = 64 * 1024;
constexpr std::uint64_t kBodyLimit = 32 * 1024 * 1024;
// Deadlines, in seconds of the reaper's coarse clock (see Worker::now_s).
constexpr std::uint64_t kIdleTimeoutS = 120;  // waiting for the next request on a keep-alive
constexpr std::uint64_t kBodyTimeoutS = 30;   // waiting for the rest of a request
constexpr std::uint64_t kWriteTimeoutS = 30;  // a client that stops reading
constexpr std::size_t kReadChunk = 16 * 1024;
constexpr std::size_t kMaxBufferedWhileWaiting = 1024 * 1024;  // pipelined bytes read during delays
constexpr std::int64_t kMaxTokens = 10'000'000;
constexpr std::int64_t kMaxDelayMs = 3'600'000;
constexpr std::int64_t kDefaultTokens = 16;
constexpr int kEmbeddingDims = 8;

// ---------------------------------------------------------------------------------------------
// Configuration

enum class Flavor { kOpenAi, kVllm, kTgi, kLlamaCpp };

std::optional<Flavor> parse_flavor(std::string_view s) {
  if (beast::iequals(s, "openai")) return Flavor::kOpenAi;
  if (beast::iequals(s, "vllm")) return Flavor::kVllm;
  if (beast::iequals(s, "tgi")) return Flavor::kTgi;
  if (beast::iequals(s, "llamacpp") || beast::iequals(s, "llama.cpp")) return Flavor::kLlamaCpp;
  return std::nullopt;
}

std::string_view flavor_name(Flavor f) {
  switch (f) {
    case Flavor::kOpenAi:
      return "openai";
    case Flavor::kVllm:
      return "vllm";
    case Flavor::kTgi:
      return "tgi";
    case Flavor::kLlamaCpp:
      return "llamacpp";
  }
  return "openai";
}

struct Options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 9000;
  int threads = 1;
  std::vector<std::string> models{"mock-model"};
  std::string name = "mock-backend";
  Flavor flavor = Flavor::kOpenAi;
  bool quiet = false;
  // Listen with the smallest backlog and never accept: once the queue is full the kernel drops
  // new SYNs, so connecting hangs (a backend whose host stopped answering), for connect timeouts.
  bool no_accept = false;
};

// ---------------------------------------------------------------------------------------------
// Routes and counters

enum class Route : std::uint8_t {
  kChat,
  kCompletions,
  kEmbeddings,
  kModels,
  kHealth,
  kTokenize,
  kStats,
  kUsage,
  kOther,
};
constexpr std::size_t kRouteCount = 9;
constexpr std::array<std::string_view, kRouteCount> kRoutePaths = {
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
    "/v1/models",           "/health",         "/tokenize",
    "/mock/stats",          "/mock/usage",     "other",
};

Route route_for(std::string_view path) {
  for (std::size_t i = 0; i + 1 < kRouteCount; ++i) {
    if (path == kRoutePaths[i]) return static_cast<Route>(i);
  }
  return Route::kOther;
}

// One per worker thread, written only by that thread (relaxed atomics so /mock/stats can read
// them from any thread). Aligned so two workers never share a cache line.
struct alignas(64) Stats {
  std::atomic<std::uint64_t> requests{0};
  std::atomic<std::uint64_t> connections_accepted{0};
  std::atomic<std::int64_t> connections_open{0};
  std::atomic<std::uint64_t> streams_completed{0};
  std::atomic<std::uint64_t> client_disconnects{0};  // client went away mid-request
  std::atomic<std::uint64_t> drops{0};               // drop_after closed the connection
  std::atomic<std::uint64_t> forced_status{0};       // X-Mock-Status answered
  std::atomic<std::uint64_t> bad_requests{0};        // 4xx the mock decided itself
  std::atomic<std::uint64_t> usage_records{0};       // records POSTed to /mock/usage
  std::array<std::atomic<std::uint64_t>, kRouteCount> by_path{};
};

void bump(std::atomic<std::uint64_t>& c) {
  c.fetch_add(1, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------------
// Small formatting helpers (append to a reused std::string, no temporaries)

void append_int(std::string& out, std::int64_t v) {
  char buf[24];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, r.ptr);
}

void append_json_escaped(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::size_t start = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto ch = static_cast<unsigned char>(s[i]);
    if (ch >= 0x20 && ch != '"' && ch != '\\') continue;
    out.append(s.data() + start, i - start);
    start = i + 1;
    switch (ch) {
      case '"':
        out.append("\\\"");
        break;
      case '\\':
        out.append("\\\\");
        break;
      case '\n':
        out.append("\\n");
        break;
      case '\r':
        out.append("\\r");
        break;
      case '\t':
        out.append("\\t");
        break;
      default: {
        const char esc[6] = {'\\', 'u', '0', '0', kHex[ch >> 4], kHex[ch & 0xF]};
        out.append(esc, sizeof esc);
      }
    }
  }
  out.append(s.data() + start, s.size() - start);
}

void append_json_string(std::string& out, std::string_view s) {
  out.push_back('"');
  append_json_escaped(out, s);
  out.push_back('"');
}

// Header values we echo back must not be able to break the response framing.
void assign_header_value(std::string& dst, std::string_view v) {
  dst.assign(v.data(), v.size());
  for (char& ch : dst) {
    if (ch == '\r' || ch == '\n' || ch == '\0') ch = ' ';
  }
}

void append_error_json(std::string& out, std::string_view message, std::string_view type,
                       std::string_view code) {
  out.append(R"({"error":{"message":)");
  append_json_string(out, message);
  out.append(R"(,"type":)");
  append_json_string(out, type);
  out.append(R"(,"param":null,"code":)");
  append_json_string(out, code);
  out.append("}}");
}

std::string_view error_type_for_status(unsigned status) {
  switch (status) {
    case 400:
    case 413:
    case 422:
      return "invalid_request_error";
    case 401:
      return "authentication_error";
    case 403:
      return "permission_error";
    case 404:
      return "not_found_error";
    case 429:
      return "rate_limit_error";
    default:
      return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

bool parse_bool_text(std::string_view v) {
  return v.empty() || v == "1" || beast::iequals(v, "true") || beast::iequals(v, "yes") ||
         beast::iequals(v, "on");
}

std::optional<std::int64_t> parse_int_text(std::string_view v) {
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
  std::int64_t out = 0;
  auto r = std::from_chars(v.data(), v.data() + v.size(), out);
  if (r.ec != std::errc() || r.ptr != v.data() + v.size()) return std::nullopt;
  return out;
}

std::int64_t clamp64(std::int64_t v, std::int64_t lo, std::int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// ---------------------------------------------------------------------------------------------
// Per-request controls: defaults, then X-Mock-* headers, then the body's "mock" object.

struct Controls {
  std::int64_t tokens = kDefaultTokens;
  std::int64_t ttft_ms = 0;
  std::int64_t delay_ms = 0;
  bool no_usage = false;
  std::int64_t status = 0;       // 0: normal answer
  std::int64_t drop_after = -1;  // <0: never
  Flavor flavor = Flavor::kOpenAi;
};

enum class ControlKey { kTokens, kTtftMs, kDelayMs, kNoUsage, kStatus, kDropAfter, kFlavor };

struct ControlName {
  std::string_view header;
  std::string_view field;
  ControlKey key;
};
constexpr std::array<ControlName, 7> kControlNames = {{
    {"x-mock-tokens", "tokens", ControlKey::kTokens},
    {"x-mock-ttft-ms", "ttft_ms", ControlKey::kTtftMs},
    {"x-mock-delay-ms", "delay_ms", ControlKey::kDelayMs},
    {"x-mock-no-usage", "no_usage", ControlKey::kNoUsage},
    {"x-mock-status", "status", ControlKey::kStatus},
    {"x-mock-drop-after", "drop_after", ControlKey::kDropAfter},
    {"x-mock-flavor", "flavor", ControlKey::kFlavor},
}};

void set_control_int(Controls& c, ControlKey key, std::int64_t v) {
  switch (key) {
    case ControlKey::kTokens:
      c.tokens = clamp64(v, 0, kMaxTokens);
      break;
    case ControlKey::kTtftMs:
      c.ttft_ms = clamp64(v, 0, kMaxDelayMs);
      break;
    case ControlKey::kDelayMs:
      c.delay_ms = clamp64(v, 0, kMaxDelayMs);
      break;
    case ControlKey::kNoUsage:
      c.no_usage = v != 0;
      break;
    case ControlKey::kStatus:
      c.status = v;
      break;
    case ControlKey::kDropAfter:
      c.drop_after = v < 0 ? -1 : clamp64(v, 0, kMaxTokens);
      break;
    case ControlKey::kFlavor:
      break;
  }
}

void set_control_text(Controls& c, ControlKey key, std::string_view v) {
  if (key == ControlKey::kFlavor) {
    if (auto f = parse_flavor(v)) c.flavor = *f;
  } else if (key == ControlKey::kNoUsage) {
    c.no_usage = parse_bool_text(v);
  } else if (auto n = parse_int_text(v)) {
    set_control_int(c, key, *n);
  }
}

// ---------------------------------------------------------------------------------------------
// Server-wide state

struct Worker;

struct Server {
  explicit Server(Options o) : opt(std::move(o)) {}
  Options opt;
  std::string backend_header;  // "X-Mock-Backend: NAME\r\n"
  std::string models_body;     // GET /v1/models never changes
  std::vector<std::unique_ptr<Worker>> workers;
};

struct Connection;

struct Worker {
  Worker(Server& s, int i) : server(s), index(i), ioc(1), acceptor(ioc) {}
  Server& server;
  int index;
  // Declared before ioc on purpose: destroying ioc destroys the pending connection coroutines,
  // whose destructors still update these.
  Stats stats;
  std::uint64_t next_id = 0;
  std::uint64_t now_s = 1;            // coarse clock, advanced by the reaper every second
  Connection* connections = nullptr;  // intrusive list of live connections, for the reaper
  simdjson::dom::parser json;         // reused by every request on this thread
  asio::io_context ioc;
  tcp::acceptor acceptor;
};

// ---------------------------------------------------------------------------------------------
// Connection state and the request parser

struct Connection {
  Connection(Worker& w, tcp::socket s)
      : worker(w), server(w.server), socket(std::move(s)), timer(w.ioc) {
    buffer.reserve(kReadChunk);
    body.reserve(4096);
    head.reserve(512);
    payload.reserve(4096);
    next = worker.connections;
    if (next) next->prev = this;
    worker.connections = this;
  }
  ~Connection() {
    if (prev)
      prev->next = next;
    else
      worker.connections = next;
    if (next) next->prev = prev;
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // The reaper closes the socket once worker.now_s passes the deadline; 0 means none (the mock's
  // own delays are bounded by kMaxDelayMs and must not count as idleness).
  void arm(std::uint64_t seconds) { deadline_s = worker.now_s + seconds + 1; }
  void disarm() { deadline_s = 0; }

  Worker& worker;
  Server& server;
  tcp::socket socket;
  beast::flat_buffer buffer;
  asio::steady_timer timer;
  std::uint64_t deadline_s = 0;
  Connection* prev = nullptr;
  Connection* next = nullptr;

  // The current request; cleared (capacity kept) before each one.
  Route route = Route::kOther;
  http::verb method = http::verb::unknown;
  unsigned version = 11;
  bool expect_continue = false;
  bool has_request_id = false;
  bool has_forwarded_for = false;
  std::string request_id;
  std::string forwarded_for;
  std::string body;
  std::string model;
  Controls controls;

  // Output scratch.
  std::string head;     // status line and headers
  std::string payload;  // response body or one SSE event
  std::string prefix;   // the part of every stream chunk before "choices"
  char chunk_size[20];

  void reset_request() {
    route = Route::kOther;
    method = http::verb::unknown;
    version = 11;
    expect_continue = false;
    has_request_id = false;
    has_forwarded_for = false;
    body.clear();
    model.clear();
    controls = Controls{};
    controls.flavor = server.opt.flavor;
  }
};

// Keeps only what the mock uses; strings live in the Connection so their capacity is reused.
class RequestParser final : public http::basic_parser<true> {
 public:
  explicit RequestParser(Connection& c) : c_(c) {}

 private:
  void on_request_impl(http::verb method, beast::string_view, beast::string_view target,
                       int version, error_code&) override {
    c_.method = method;
    c_.version = static_cast<unsigned>(version);
    const std::string_view t(target.data(), target.size());
    const auto q = t.find('?');
    c_.route = route_for(q == std::string_view::npos ? t : t.substr(0, q));
  }

  void on_response_impl(int, beast::string_view, int, error_code&) override {}

  void on_field_impl(http::field name, beast::string_view name_string, beast::string_view value,
                     error_code&) override {
    if (name == http::field::expect) {
      c_.expect_continue = beast::iequals(value, "100-continue");
      return;
    }
    if (name_string.size() < 2 || (name_string[0] != 'x' && name_string[0] != 'X')) return;
    if (beast::iequals(name_string, "x-request-id")) {
      if (!c_.has_request_id) assign_header_value(c_.request_id, value);
      c_.has_request_id = true;
      return;
    }
    if (beast::iequals(name_string, "x-forwarded-for")) {
      if (c_.has_forwarded_for) {
        // Several X-Forwarded-For lines mean one comma-separated list.
        std::string extra;
        assign_header_value(extra, value);
        c_.forwarded_for.append(", ").append(extra);
      } else {
        assign_header_value(c_.forwarded_for, value);
      }
      c_.has_forwarded_for = true;
      return;
    }
    for (const auto& cn : kControlNames) {
      if (beast::iequals(name_string, cn.header)) {
        set_control_text(c_.controls, cn.key, value);
        return;
      }
    }
  }

  void on_header_impl(error_code&) override {}

  void on_body_init_impl(boost::optional<std::uint64_t> const& content_length,
                         error_code&) override {
    // The parser has already checked content_length against body_limit.
    if (content_length) c_.body.reserve(*content_length + simdjson::SIMDJSON_PADDING);
  }

  std::size_t on_body_impl(beast::string_view data, error_code&) override {
    c_.body.append(data.data(), data.size());
    return data.size();
  }

  void on_chunk_header_impl(std::uint64_t, beast::string_view, error_code&) override {}

  std::size_t on_chunk_body_impl(std::uint64_t, beast::string_view data, error_code&) override {
    c_.body.append(data.data(), data.size());
    return data.size();
  }

  void on_finish_impl(error_code&) override {}

  Connection& c_;
};

// ---------------------------------------------------------------------------------------------
// Request body inspection

struct BodyInfo {
  bool stream = false;
  bool include_usage = false;
  bool continuous_usage = false;
  bool stream_options_object = false;  // stream_options is an object
  bool include_usage_given = false;    // it has an include_usage key
  std::uint64_t text_bytes = 0;        // bytes of the prompt / message contents / inputs
  std::uint64_t token_ids = 0;         // prompts given as token id arrays count one token per id
  std::uint64_t inputs = 0;            // embeddings: how many inputs
  bool base64 = false;  // embeddings: encoding_format "base64" (the OpenAI SDKs' default)
  bool has_input = false;
  std::int64_t max_tokens = -1;

  std::int64_t prompt_tokens() const {
    const std::uint64_t p = (text_bytes + 3) / 4 + token_ids;
    return p == 0 ? 1 : static_cast<std::int64_t>(p);
  }
};

std::optional<std::int64_t> json_int(simdjson::dom::element e) {
  switch (e.type()) {
    case simdjson::dom::element_type::INT64:
      return std::int64_t(e.get_int64().value_unsafe());
    case simdjson::dom::element_type::UINT64: {
      const std::uint64_t u = e.get_uint64().value_unsafe();
      return u > std::uint64_t(INT64_MAX) ? INT64_MAX : std::int64_t(u);
    }
    case simdjson::dom::element_type::DOUBLE: {
      const double d = e.get_double().value_unsafe();
      if (!(d > -9e18 && d < 9e18)) return std::nullopt;
      return static_cast<std::int64_t>(d);
    }
    case simdjson::dom::element_type::BOOL:
      return e.get_bool().value_unsafe() ? 1 : 0;
    default:
      return std::nullopt;
  }
}

bool json_truthy(simdjson::dom::element e) {
  if (e.is_bool()) return e.get_bool().value_unsafe();
  auto n = json_int(e);
  return n && *n != 0;
}

// A prompt or an embeddings input: a string, an array of strings, an array of token ids, or an
// array of token id arrays.
void count_text_or_tokens(simdjson::dom::element e, BodyInfo& info) {
  std::string_view s;
  if (e.get_string().get(s) == simdjson::SUCCESS) {
    info.text_bytes += s.size();
    ++info.inputs;
    return;
  }
  simdjson::dom::array arr;
  if (e.get_array().get(arr) != simdjson::SUCCESS) return;
  bool counted_flat_ids = false;
  for (simdjson::dom::element item : arr) {
    simdjson::dom::array inner;
    if (item.get_string().get(s) == simdjson::SUCCESS) {
      info.text_bytes += s.size();
      ++info.inputs;
    } else if (item.get_array().get(inner) == simdjson::SUCCESS) {
      info.token_ids += inner.size();
      ++info.inputs;
    } else if (item.is_number()) {
      ++info.token_ids;
      if (!counted_flat_ids) ++info.inputs;
      counted_flat_ids = true;
    }
  }
}

// Tool definitions, and the tool calls of assistant messages, count as their JSON text (a
// function's name plus its arguments for a call), as a chat template writes them into the prompt.
void count_tools(simdjson::dom::element e, BodyInfo& info) {
  simdjson::dom::array tools;
  if (e.get_array().get(tools) != simdjson::SUCCESS) return;
  for (simdjson::dom::element t : tools) info.text_bytes += simdjson::to_string(t).size();
}

void count_function(simdjson::dom::element f, BodyInfo& info) {
  std::string_view s;
  if (f.at_key("name").get_string().get(s) == simdjson::SUCCESS) info.text_bytes += s.size();
  if (f.at_key("arguments").get_string().get(s) == simdjson::SUCCESS) info.text_bytes += s.size();
}

void count_tool_calls(simdjson::dom::element m, BodyInfo& info) {
  simdjson::dom::element f;
  if (m.at_key("function_call").get(f) == simdjson::SUCCESS) count_function(f, info);  // legacy
  simdjson::dom::array calls;
  if (m.at_key("tool_calls").get_array().get(calls) != simdjson::SUCCESS) return;
  for (simdjson::dom::element call : calls) {
    if (call.at_key("function").get(f) == simdjson::SUCCESS) count_function(f, info);
  }
}

void count_messages(simdjson::dom::element e, BodyInfo& info) {
  simdjson::dom::array messages;
  if (e.get_array().get(messages) != simdjson::SUCCESS) return;
  for (simdjson::dom::element m : messages) {
    count_tool_calls(m, info);
    simdjson::dom::element content;
    if (m.at_key("content").get(content) != simdjson::SUCCESS) continue;
    std::string_view s;
    if (content.get_string().get(s) == simdjson::SUCCESS) {
      info.text_bytes += s.size();
      continue;
    }
    simdjson::dom::array parts;  // [{"type":"text","text":"..."}, ...]
    if (content.get_array().get(parts) != simdjson::SUCCESS) continue;
    for (simdjson::dom::element part : parts) {
      if (part.at_key("text").get_string().get(s) == simdjson::SUCCESS) info.text_bytes += s.size();
    }
  }
}

void apply_body_controls(simdjson::dom::object mock, Controls& controls) {
  for (auto field : mock) {
    for (const auto& cn : kControlNames) {
      if (field.key != cn.field) continue;
      std::string_view s;
      if (cn.key == ControlKey::kNoUsage) {
        controls.no_usage = json_truthy(field.value);
      } else if (field.value.get_string().get(s) == simdjson::SUCCESS) {
        set_control_text(controls, cn.key, s);
      } else if (auto n = json_int(field.value)) {
        set_control_int(controls, cn.key, *n);
      }
      break;
    }
  }
}

enum class BodyError { kNone, kInvalidJson, kNotObject };

// Parses the request body with the thread's parser into `doc`; false when it is not JSON.
bool parse_body(Connection& c, simdjson::dom::element& doc) {
  // simdjson reads up to SIMDJSON_PADDING bytes past the end; give it that room in place.
  const std::size_t len = c.body.size();
  if (c.body.capacity() < len + simdjson::SIMDJSON_PADDING) {
    c.body.reserve(len + simdjson::SIMDJSON_PADDING);
  }
  return c.worker.json.parse(c.body.data(), len, false).get(doc) == simdjson::SUCCESS;
}

BodyError inspect_body(Connection& c, BodyInfo& info) {
  simdjson::dom::element doc;
  if (!parse_body(c, doc)) return BodyError::kInvalidJson;
  simdjson::dom::object obj;
  if (doc.get_object().get(obj) != simdjson::SUCCESS) return BodyError::kNotObject;
  for (auto field : obj) {
    const std::string_view key = field.key;
    const simdjson::dom::element v = field.value;
    if (key == "model") {
      std::string_view s;
      if (v.get_string().get(s) == simdjson::SUCCESS) c.model.assign(s.data(), s.size());
    } else if (key == "stream") {
      info.stream = json_truthy(v);
    } else if (key == "stream_options") {
      simdjson::dom::element x;
      info.stream_options_object = v.is_object();
      info.include_usage_given = false;
      info.include_usage = info.continuous_usage = false;
      if (v.at_key("include_usage").get(x) == simdjson::SUCCESS) {
        info.include_usage_given = true;
        info.include_usage = json_truthy(x);
      }
      if (v.at_key("continuous_usage_stats").get(x) == simdjson::SUCCESS) {
        info.continuous_usage = json_truthy(x);
      }
    } else if (key == "messages") {
      count_messages(v, info);
    } else if (key == "tools" || key == "functions") {
      count_tools(v, info);
    } else if (key == "prompt" || key == "input" || key == "content") {
      // "content" is llama.cpp's /tokenize field.
      info.has_input = true;
      count_text_or_tokens(v, info);
    } else if (key == "encoding_format") {
      std::string_view s;
      info.base64 = v.get_string().get(s) == simdjson::SUCCESS && s == "base64";
    } else if (key == "max_tokens" || key == "max_completion_tokens") {
      if (auto n = json_int(v); n && *n >= 0) info.max_tokens = *n;
    } else if (key == "mock") {
      simdjson::dom::object mock;
      if (v.get_object().get(mock) == simdjson::SUCCESS) apply_body_controls(mock, c.controls);
    }
  }
  return BodyError::kNone;
}

// ---------------------------------------------------------------------------------------------
// Writing

void append_status_line(std::string& out, unsigned status) {
  out.append("HTTP/1.1 ");
  append_int(out, status);
  out.push_back(' ');
  const auto reason = http::obsolete_reason(http::int_to_status(status));
  out.append(reason.data(), reason.size());
  out.append("\r\n");
}

void append_common_headers(Connection& c, bool keep_alive) {
  c.head.append(c.server.backend_header);
  if (c.has_request_id)
    c.head.append("X-Mock-Saw-Request-Id: ").append(c.request_id).append("\r\n");
  if (c.has_forwarded_for) {
    c.head.append("X-Mock-Saw-Forwarded-For: ").append(c.forwarded_for).append("\r\n");
  }
  if (!keep_alive) {
    c.head.append("Connection: close\r\n");
  } else if (c.version < 11) {
    c.head.append("Connection: keep-alive\r\n");
  }
}

// One gather write: headers and body leave in a single writev.
asio::awaitable<bool> write_response(Connection& c, unsigned status, std::string_view body,
                                     bool keep_alive) {
  c.head.clear();
  append_status_line(c.head, status);
  c.head.append("Content-Type: application/json\r\nContent-Length: ");
  append_int(c.head, static_cast<std::int64_t>(body.size()));
  c.head.append("\r\n");
  append_common_headers(c, keep_alive);
  c.head.append("\r\n");
  const std::array<asio::const_buffer, 2> bufs{asio::buffer(c.head), asio::buffer(body)};
  c.arm(kWriteTimeoutS);
  auto [ec, n] = co_await asio::async_write(c.socket, bufs, kAsTuple);
  co_return !ec;
}

asio::awaitable<bool> write_error(Connection& c, unsigned status, std::string_view message,
                                  std::string_view type, std::string_view code, bool keep_alive) {
  c.payload.clear();
  append_error_json(c.payload, message, type, code);
  const bool ok = co_await write_response(c, status, c.payload, keep_alive);
  co_return ok;
}

// Frames c.payload as one HTTP chunk and sends it in one write.
asio::awaitable<bool> write_chunk(Connection& c) {
  auto r = std::to_chars(c.chunk_size, c.chunk_size + 16, c.payload.size(), 16);
  *r.ptr++ = '\r';
  *r.ptr++ = '\n';
  const std::array<asio::const_buffer, 3> bufs{
      asio::buffer(c.chunk_size, static_cast<std::size_t>(r.ptr - c.chunk_size)),
      asio::buffer(c.payload), asio::buffer("\r\n", 2)};
  c.arm(kWriteTimeoutS);
  auto [ec, n] = co_await asio::async_write(c.socket, bufs, kAsTuple);
  co_return !ec;
}

asio::awaitable<bool> write_raw(Connection& c, std::string_view data) {
  c.arm(kWriteTimeoutS);
  auto [ec, n] = co_await asio::async_write(c.socket, asio::buffer(data), kAsTuple);
  co_return !ec;
}

// Waits `ms` while watching the socket: returns false as soon as the client closes or resets the
// connection. Bytes that arrive meanwhile (a pipelined request) are kept in the read buffer.
asio::awaitable<bool> wait_watching_client(Connection& c, std::int64_t ms) {
  using namespace asio::experimental::awaitable_operators;
  c.disarm();
  c.timer.expires_after(std::chrono::milliseconds(ms));
  for (;;) {
    if (c.buffer.size() >= kMaxBufferedWhileWaiting) {
      co_await c.timer.async_wait(kAsTuple);
      co_return true;
    }
    auto wait = c.timer.async_wait(kAsTuple);
    auto read = c.socket.async_read_some(c.buffer.prepare(4096), kAsTuple);
    auto winner = co_await (std::move(wait) || std::move(read));
    if (winner.index() == 0) co_return true;
    auto [ec, n] = std::get<1>(winner);
    if (ec) co_return false;
    c.buffer.commit(n);
  }
}

// ---------------------------------------------------------------------------------------------
// Generation: /v1/chat/completions, /v1/completions (and the shared parts of /v1/embeddings)

struct Generation {
  bool chat = true;
  Flavor flavor = Flavor::kOpenAi;
  bool no_usage = false;
  bool include_usage = false;
  bool continuous_usage = false;
  std::int64_t prompt_tokens = 1;
  std::int64_t completion_tokens = 0;
  std::string_view finish_reason = "stop";
  std::int64_t ttft_ms = 0;
  std::int64_t delay_ms = 0;
  std::int64_t drop_after = -1;
};

void append_usage(std::string& out, std::int64_t prompt, std::int64_t completion) {
  out.append(R"("usage":{"prompt_tokens":)");
  append_int(out, prompt);
  out.append(R"(,"completion_tokens":)");
  append_int(out, completion);
  out.append(R"(,"total_tokens":)");
  append_int(out, prompt + completion);
  out.push_back('}');
}

// llama.cpp's non-standard timing block; the values are derived from the configured delays.
void append_timings(std::string& out, const Generation& g) {
  const double prompt_ms = g.ttft_ms > 0 ? double(g.ttft_ms) : 0.01;
  const double predicted_ms = g.completion_tokens > 0
                                  ? std::max(0.01, double(g.delay_ms) * double(g.completion_tokens))
                                  : 0.01;
  fmt::format_to(std::back_inserter(out),
                 R"("timings":{{"prompt_n":{},"prompt_ms":{:.3f},"prompt_per_token_ms":{:.3f},)"
                 R"("prompt_per_second":{:.3f},"predicted_n":{},"predicted_ms":{:.3f},)"
                 R"("predicted_per_token_ms":{:.3f},"predicted_per_second":{:.3f}}})",
                 g.prompt_tokens, prompt_ms, prompt_ms / double(g.prompt_tokens),
                 1000.0 * double(g.prompt_tokens) / prompt_ms, g.completion_tokens, predicted_ms,
                 g.completion_tokens > 0 ? predicted_ms / double(g.completion_tokens) : 0.0,
                 1000.0 * double(g.completion_tokens) / predicted_ms);
}

void append_token_text(std::string& out, std::int64_t i) {
  out.append("tok");
  append_int(out, i);
  out.push_back(' ');
}

// `{"id":"...","object":"...","created":T,"model":"...",` : shared by every chunk of a stream and
// by the non-stream body.
void build_prefix(std::string& out, Connection& c, std::string_view id_prefix,
                  std::string_view object, bool empty_id, std::uint64_t id, std::time_t created) {
  out.clear();
  out.append(R"({"id":")");
  if (!empty_id) {
    out.append(id_prefix);
    append_int(out, c.worker.index);
    out.push_back('-');
    append_int(out, static_cast<std::int64_t>(id));
  }
  out.append(R"(","object":")").append(object).append(R"(","created":)");
  append_int(out, static_cast<std::int64_t>(created));
  out.append(R"(,"model":)");
  append_json_string(out, c.model);
  out.push_back(',');
}

void build_nonstream_body(Connection& c, const Generation& g, std::uint64_t id,
                          std::time_t created) {
  std::string& out = c.payload;
  build_prefix(out, c, g.chat ? "chatcmpl-mock" : "cmpl-mock",
               g.chat ? "chat.completion" : "text_completion", false, id, created);
  out.append(g.chat ? R"("choices":[{"index":0,"message":{"role":"assistant","content":")"
                    : R"("choices":[{"index":0,"text":")");
  for (std::int64_t i = 0; i < g.completion_tokens; ++i) append_token_text(out, i);
  out.append(g.chat ? R"("},"logprobs":null,"finish_reason":")"
                    : R"(","logprobs":null,"finish_reason":")");
  out.append(g.finish_reason).append(R"("}])");
  if (!g.no_usage) {
    out.push_back(',');
    append_usage(out, g.prompt_tokens, g.completion_tokens);
    if (g.flavor == Flavor::kLlamaCpp) {
      out.push_back(',');
      append_timings(out, g);
    }
  }
  out.push_back('}');
}

// Which usage, if any, a content or finish chunk carries.
void append_chunk_usage(std::string& out, const Generation& g, std::int64_t sent) {
  if (g.no_usage || g.flavor == Flavor::kLlamaCpp) return;
  if (g.flavor == Flavor::kVllm && g.continuous_usage) {
    out.push_back(',');
    append_usage(out, g.prompt_tokens, sent);
  } else if (g.include_usage) {
    out.append(R"(,"usage":null)");
  }
}

void build_token_event(Connection& c, const Generation& g, std::int64_t i, bool role_only) {
  std::string& out = c.payload;
  out.clear();
  out.append("data: ").append(c.prefix);
  if (g.chat) {
    out.append(R"("choices":[{"index":0,"delta":{)");
    if (i == 0) out.append(R"("role":"assistant",)");
    out.append(R"("content":")");
    if (!role_only) append_token_text(out, i);
  } else {
    out.append(R"("choices":[{"index":0,"text":")");
    append_token_text(out, i);
  }
  out.append(g.chat ? R"("},"logprobs":null,"finish_reason":null}])"
                    : R"(","logprobs":null,"finish_reason":null}])");
  append_chunk_usage(out, g, role_only ? 0 : i + 1);
  out.append("}\n\n");
}

void build_finish_event(Connection& c, const Generation& g) {
  std::string& out = c.payload;
  out.clear();
  out.append("data: ").append(c.prefix);
  out.append(g.chat ? R"("choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":")"
                    : R"("choices":[{"index":0,"text":"","logprobs":null,"finish_reason":")");
  out.append(g.finish_reason).append(R"("}])");
  append_chunk_usage(out, g, g.completion_tokens);
  if (g.flavor == Flavor::kLlamaCpp && !g.no_usage) {
    out.push_back(',');
    append_usage(out, g.prompt_tokens, g.completion_tokens);
    out.push_back(',');
    append_timings(out, g);
  }
  out.append("}\n\n");
}

void build_usage_event(Connection& c, const Generation& g, std::uint64_t id, std::time_t created) {
  std::string& out = c.payload;
  std::string& prefix = c.prefix;
  if (g.flavor == Flavor::kTgi) {  // TGI's usage-only chunk has an empty id
    build_prefix(prefix, c, "", g.chat ? "chat.completion.chunk" : "text_completion", true, id,
                 created);
  }
  out.clear();
  out.append("data: ").append(prefix).append(R"("choices":[],)");
  append_usage(out, g.prompt_tokens, g.completion_tokens);
  out.append("}\n\n");
}

constexpr std::string_view kDoneAndLastChunk = "e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";

enum class Outcome { kKeepAlive, kClose };

// What follows a response: the next request on the connection, unless the write failed or the
// connection is not kept alive.
Outcome after_response(bool written, bool keep_alive) {
  return written && keep_alive ? Outcome::kKeepAlive : Outcome::kClose;
}

Outcome disconnected(Connection& c) {
  bump(c.worker.stats.client_disconnects);
  return Outcome::kClose;
}

Outcome drop_connection(Connection& c) {
  // A plain close (FIN) after everything written so far: the client sees the body end early,
  // without the terminating chunk or Content-Length bytes. Deterministic, unlike an RST that can
  // discard data the client has not read yet.
  bump(c.worker.stats.drops);
  error_code ignored;
  c.socket.close(ignored);
  return Outcome::kClose;
}

asio::awaitable<Outcome> stream_generation(Connection& c, const Generation& g, std::uint64_t id,
                                           std::time_t created, bool keep_alive) {
  c.head.clear();
  append_status_line(c.head, 200);
  c.head.append(
      "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
      "Transfer-Encoding: chunked\r\n");
  append_common_headers(c, keep_alive);
  c.head.append("\r\n");
  bool ok = co_await write_raw(c, c.head);
  if (!ok) co_return disconnected(c);

  if (g.ttft_ms > 0) {
    ok = co_await wait_watching_client(c, g.ttft_ms);
    if (!ok) co_return disconnected(c);
  }
  if (g.drop_after == 0) co_return drop_connection(c);

  build_prefix(c.prefix, c, g.chat ? "chatcmpl-mock" : "cmpl-mock",
               g.chat ? "chat.completion.chunk" : "text_completion", false, id, created);
  if (g.chat && g.completion_tokens == 0) {
    build_token_event(c, g, 0, true);
    ok = co_await write_chunk(c);
    if (!ok) co_return disconnected(c);
  }
  for (std::int64_t i = 0; i < g.completion_tokens; ++i) {
    if (i > 0 && g.delay_ms > 0) {
      ok = co_await wait_watching_client(c, g.delay_ms);
      if (!ok) co_return disconnected(c);
    }
    build_token_event(c, g, i, false);
    ok = co_await write_chunk(c);
    if (!ok) co_return disconnected(c);
    if (g.drop_after == i + 1) co_return drop_connection(c);
  }
  if (g.delay_ms > 0 && g.completion_tokens > 0) {
    ok = co_await wait_watching_client(c, g.delay_ms);
    if (!ok) co_return disconnected(c);
  }
  build_finish_event(c, g);
  ok = co_await write_chunk(c);
  if (!ok) co_return disconnected(c);
  if (g.include_usage && !g.no_usage && g.flavor != Flavor::kLlamaCpp) {
    build_usage_event(c, g, id, created);
    ok = co_await write_chunk(c);
    if (!ok) co_return disconnected(c);
  }
  ok = co_await write_raw(c, kDoneAndLastChunk);
  if (!ok) co_return disconnected(c);
  c.worker.stats.streams_completed.fetch_add(1, std::memory_order_relaxed);
  co_return keep_alive ? Outcome::kKeepAlive : Outcome::kClose;
}

void append_base64(std::string& out, const unsigned char* p, std::size_t n) {
  static constexpr char kDigits[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (std::size_t i = 0; i < n; i += 3) {
    const std::uint32_t v = (std::uint32_t{p[i]} << 16) |
                            (i + 1 < n ? std::uint32_t{p[i + 1]} << 8 : 0) |
                            (i + 2 < n ? std::uint32_t{p[i + 2]} : 0);
    out.push_back(kDigits[(v >> 18) & 63]);
    out.push_back(kDigits[(v >> 12) & 63]);
    out.push_back(i + 1 < n ? kDigits[(v >> 6) & 63] : '=');
    out.push_back(i + 2 < n ? kDigits[v & 63] : '=');
  }
}

void build_embeddings_body(Connection& c, const BodyInfo& info) {
  std::string& out = c.payload;
  out.clear();
  out.append(R"({"object":"list","data":[)");
  for (std::uint64_t i = 0; i < info.inputs; ++i) {
    if (i > 0) out.push_back(',');
    out.append(R"({"object":"embedding","index":)");
    append_int(out, static_cast<std::int64_t>(i));
    // Exact binary fractions in [-0.5, 0.4375], deterministic per (input, dimension).
    auto value = [&](int j) {
      return double(static_cast<int>((i * kEmbeddingDims + j) % 16) - 8) / 16.0;
    };
    if (info.base64) {
      // As OpenAI sends it: the float32 values, little-endian, in base64.
      unsigned char raw[kEmbeddingDims * 4];
      for (int j = 0; j < kEmbeddingDims; ++j) {
        const float f = static_cast<float>(value(j));
        std::uint32_t bits;
        std::memcpy(&bits, &f, 4);
        for (int b = 0; b < 4; ++b) raw[j * 4 + b] = static_cast<unsigned char>(bits >> (8 * b));
      }
      out.append(R"(,"embedding":")");
      append_base64(out, raw, sizeof raw);
      out.append("\"}");
    } else {
      out.append(R"(,"embedding":[)");
      for (int j = 0; j < kEmbeddingDims; ++j) {
        if (j > 0) out.push_back(',');
        char buf[32];
        auto r = std::to_chars(buf, buf + sizeof buf, value(j));
        out.append(buf, r.ptr);
      }
      out.append("]}");
    }
  }
  out.append(R"(],"model":)");
  append_json_string(out, c.model);
  const auto p = info.prompt_tokens();
  out.append(R"(,"usage":{"prompt_tokens":)");
  append_int(out, p);
  out.append(R"(,"total_tokens":)");
  append_int(out, p);
  out.append("}}");
}

// The error for a broken body; false when the body is usable.
asio::awaitable<std::optional<Outcome>> reject_body(Connection& c, BodyError err, bool keep_alive) {
  if (err == BodyError::kNone) co_return std::nullopt;
  bump(c.worker.stats.bad_requests);
  const bool invalid = err == BodyError::kInvalidJson;
  const bool ok = co_await write_error(c, 400,
                                       invalid ? "We could not parse the JSON body of your request."
                                               : "The request body must be a JSON object.",
                                       "invalid_request_error",
                                       invalid ? "invalid_json" : "invalid_request", keep_alive);
  co_return after_response(ok, keep_alive);
}

asio::awaitable<Outcome> handle_generation(Connection& c, bool keep_alive) {
  BodyInfo info;
  const BodyError err = inspect_body(c, info);
  auto rejected = co_await reject_body(c, err, keep_alive);
  if (rejected) co_return *rejected;
  if (c.model.empty()) c.model = c.server.opt.models.front();

  const bool embeddings = c.route == Route::kEmbeddings;
  if (embeddings && (!info.has_input || info.inputs == 0)) {
    bump(c.worker.stats.bad_requests);
    const bool ok = co_await write_error(c, 400, "'input' must be a string or a non-empty array",
                                         "invalid_request_error", "invalid_input", keep_alive);
    co_return after_response(ok, keep_alive);
  }

  const Controls& ctl = c.controls;
  Generation g;
  g.chat = c.route == Route::kChat;
  g.flavor = ctl.flavor;
  g.no_usage = ctl.no_usage;
  g.include_usage = info.include_usage;
  g.continuous_usage = info.continuous_usage;
  if (g.flavor == Flavor::kVllm) {
    // vLLM's StreamOptions default include_usage to true, and continuous stats need it.
    if (info.stream_options_object && !info.include_usage_given) g.include_usage = true;
    g.continuous_usage = g.continuous_usage && g.include_usage;
  }
  g.prompt_tokens = info.prompt_tokens();
  g.completion_tokens = ctl.tokens;
  if (info.max_tokens >= 0 && info.max_tokens < g.completion_tokens) {
    g.completion_tokens = info.max_tokens;
    g.finish_reason = "length";
  }
  g.ttft_ms = ctl.ttft_ms;
  g.delay_ms = ctl.delay_ms;
  g.drop_after = ctl.drop_after;

  const bool forced_error = ctl.status >= 400 && ctl.status <= 599;
  const bool streaming = info.stream && !embeddings;
  const std::uint64_t id = ++c.worker.next_id;
  const std::time_t created = std::time(nullptr);

  if (streaming && !forced_error) {
    const Outcome out = co_await stream_generation(c, g, id, created, keep_alive);
    co_return out;
  }

  if (g.ttft_ms > 0) {
    const bool ok = co_await wait_watching_client(c, g.ttft_ms);
    if (!ok) co_return disconnected(c);
  }
  if (forced_error) {
    bump(c.worker.stats.forced_status);
    c.payload.clear();
    const auto status = static_cast<unsigned>(ctl.status);
    c.head.clear();  // used as scratch for the message
    c.head.append("mock backend ").append(c.server.opt.name).append(": forced status ");
    append_int(c.head, ctl.status);
    append_error_json(c.payload, c.head, error_type_for_status(status), "mock_status");
    const bool ok = co_await write_response(c, status, c.payload, keep_alive);
    co_return after_response(ok, keep_alive);
  }
  if (g.drop_after >= 0) co_return drop_connection(c);

  if (embeddings) {
    build_embeddings_body(c, info);
  } else {
    build_nonstream_body(c, g, id, created);
  }
  const bool ok = co_await write_response(c, 200, c.payload, keep_alive);
  co_return after_response(ok, keep_alive);
}

asio::awaitable<Outcome> handle_tokenize(Connection& c, bool keep_alive) {
  BodyInfo info;
  const BodyError err = inspect_body(c, info);
  auto rejected = co_await reject_body(c, err, keep_alive);
  if (rejected) co_return *rejected;
  const std::int64_t p = info.prompt_tokens();
  c.payload.clear();
  c.payload.append(R"({"count":)");
  append_int(c.payload, p);
  c.payload.append(R"(,"tokens":[)");
  for (std::int64_t i = 0; i < p; ++i) {
    if (i > 0) c.payload.push_back(',');
    append_int(c.payload, 1000 + i);
  }
  c.payload.append("]}");
  const bool ok = co_await write_response(c, 200, c.payload, keep_alive);
  co_return after_response(ok, keep_alive);
}

// POST /mock/usage: a webhook receiver that costs next to nothing (the benchmarks' usage_hook
// target). The body is one usage record (an object) or a batch (an array of objects); each object
// with a string request_id counts as a record. Anything else is answered 400, which a sink
// treats as a permanent rejection: a benchmark that miscounts shows it.
asio::awaitable<Outcome> handle_usage(Connection& c, bool keep_alive) {
  std::int64_t records = -1;
  simdjson::dom::element doc;
  if (parse_body(c, doc)) {
    auto is_record = [](simdjson::dom::element e) {
      std::string_view id;
      return e.at_key("request_id").get_string().get(id) == simdjson::SUCCESS;
    };
    simdjson::dom::array batch;
    if (doc.get_array().get(batch) == simdjson::SUCCESS) {
      records = 0;
      for (simdjson::dom::element e : batch) {
        if (!is_record(e)) {
          records = -1;
          break;
        }
        ++records;
      }
    } else if (is_record(doc)) {
      records = 1;
    }
  }
  if (records < 0) {
    bump(c.worker.stats.bad_requests);
    const bool ok = co_await write_error(c, 400, "Expected a usage record or an array of them.",
                                         "invalid_request_error", "invalid_usage", keep_alive);
    co_return after_response(ok, keep_alive);
  }
  c.worker.stats.usage_records.fetch_add(static_cast<std::uint64_t>(records),
                                         std::memory_order_relaxed);
  c.payload.clear();
  c.payload.append(R"({"received":)");
  append_int(c.payload, records);
  c.payload.push_back('}');
  const bool ok = co_await write_response(c, 200, c.payload, keep_alive);
  co_return after_response(ok, keep_alive);
}

void build_stats_body(Connection& c) {
  std::uint64_t requests = 0, accepted = 0, completed = 0, disconnects = 0, drops = 0, forced = 0,
                bad = 0, usage = 0;
  std::int64_t open = 0;
  std::array<std::uint64_t, kRouteCount> by_path{};
  constexpr auto relaxed = std::memory_order_relaxed;
  for (const auto& w : c.server.workers) {
    const Stats& s = w->stats;
    requests += s.requests.load(relaxed);
    accepted += s.connections_accepted.load(relaxed);
    open += s.connections_open.load(relaxed);
    completed += s.streams_completed.load(relaxed);
    disconnects += s.client_disconnects.load(relaxed);
    drops += s.drops.load(relaxed);
    forced += s.forced_status.load(relaxed);
    bad += s.bad_requests.load(relaxed);
    usage += s.usage_records.load(relaxed);
    for (std::size_t i = 0; i < kRouteCount; ++i) by_path[i] += s.by_path[i].load(relaxed);
  }
  std::string& out = c.payload;
  out.clear();
  out.append(R"({"name":)");
  append_json_string(out, c.server.opt.name);
  const std::pair<std::string_view, std::int64_t> counters[] = {
      {"requests", std::int64_t(requests)},
      {"connections_accepted", std::int64_t(accepted)},
      {"connections_open", open},
      {"streams_completed", std::int64_t(completed)},
      {"client_disconnects", std::int64_t(disconnects)},
      {"drops", std::int64_t(drops)},
      {"forced_status", std::int64_t(forced)},
      {"bad_requests", std::int64_t(bad)},
      {"usage_records", std::int64_t(usage)},
  };
  for (const auto& [key, value] : counters) {
    out.push_back(',');
    append_json_string(out, key);
    out.push_back(':');
    append_int(out, value);
  }
  out.append(R"(,"by_path":{)");
  for (std::size_t i = 0; i < kRouteCount; ++i) {
    if (i > 0) out.push_back(',');
    append_json_string(out, kRoutePaths[i]);
    out.push_back(':');
    append_int(out, static_cast<std::int64_t>(by_path[i]));
  }
  out.append("}}");
}

asio::awaitable<Outcome> method_not_allowed(Connection& c, bool keep_alive) {
  bump(c.worker.stats.bad_requests);
  const bool ok = co_await write_error(c, 405, "Method not allowed for this path.",
                                       "invalid_request_error", "method_not_allowed", keep_alive);
  co_return after_response(ok, keep_alive);
}

asio::awaitable<Outcome> handle_request(Connection& c, bool keep_alive) {
  Stats& stats = c.worker.stats;
  bump(stats.requests);
  bump(stats.by_path[static_cast<std::size_t>(c.route)]);
  const bool post = c.method == http::verb::post;
  const bool get = c.method == http::verb::get;

  switch (c.route) {
    case Route::kChat:
    case Route::kCompletions:
    case Route::kEmbeddings:
    case Route::kTokenize:
    case Route::kUsage: {
      if (!post) {
        const Outcome out = co_await method_not_allowed(c, keep_alive);
        co_return out;
      }
      Outcome out;
      if (c.route == Route::kTokenize) {
        out = co_await handle_tokenize(c, keep_alive);
      } else if (c.route == Route::kUsage) {
        out = co_await handle_usage(c, keep_alive);
      } else {
        out = co_await handle_generation(c, keep_alive);
      }
      co_return out;
    }
    case Route::kModels:
    case Route::kHealth:
    case Route::kStats: {
      if (!get) {
        const Outcome out = co_await method_not_allowed(c, keep_alive);
        co_return out;
      }
      std::string_view body;
      if (c.route == Route::kModels) {
        body = c.server.models_body;
      } else if (c.route == Route::kHealth) {
        body = R"({"status":"ok"})";
      } else {
        build_stats_body(c);
        body = c.payload;
      }
      const bool ok = co_await write_response(c, 200, body, keep_alive);
      co_return after_response(ok, keep_alive);
    }
    case Route::kOther:
      break;
  }
  bump(stats.bad_requests);
  const bool ok = co_await write_error(c, 404, "Unknown path.", "invalid_request_error",
                                       "unknown_path", keep_alive);
  co_return after_response(ok, keep_alive);
}

// Answers a request the parser refused, then the connection closes.
asio::awaitable<void> reject_unparsable(Connection& c, error_code ec) {
  bump(c.worker.stats.bad_requests);
  if (ec == http::error::header_limit) {
    co_await write_error(c, 431, "Request headers too large.", "invalid_request_error",
                         "headers_too_large", false);
  } else if (ec == http::error::body_limit) {
    co_await write_error(c, 413, "Request body too large.", "invalid_request_error",
                         "body_too_large", false);
  } else {
    co_await write_error(c, 400, "Malformed HTTP request.", "invalid_request_error", "bad_request",
                         false);
  }
}

bool is_parse_error(error_code ec) {
  return ec.category() == http::make_error_code(http::error::bad_target).category() &&
         ec != http::error::end_of_stream && ec != http::error::partial_message;
}

struct OpenConnectionGuard {
  explicit OpenConnectionGuard(Stats& s) : stats(s) {
    stats.connections_open.fetch_add(1, std::memory_order_relaxed);
  }
  ~OpenConnectionGuard() { stats.connections_open.fetch_sub(1, std::memory_order_relaxed); }
  OpenConnectionGuard(const OpenConnectionGuard&) = delete;
  OpenConnectionGuard& operator=(const OpenConnectionGuard&) = delete;
  Stats& stats;
};

// Feeds the parser from the connection's buffer, reading more as needed, until one request is
// complete. Returns end_of_stream when the client closed cleanly between requests.
asio::awaitable<error_code> read_request(Connection& c, RequestParser& parser) {
  bool sent_continue = false;
  for (;;) {
    while (c.buffer.size() > 0 && !parser.is_done()) {
      error_code ec;
      const std::size_t used = parser.put(c.buffer.data(), ec);
      c.buffer.consume(used);
      if (ec == http::error::need_more) break;
      if (ec) co_return ec;
      if (used == 0) break;
    }
    if (parser.is_done()) co_return error_code{};
    if (parser.is_header_done() && c.expect_continue && !sent_continue) {
      sent_continue = true;
      const bool ok = co_await write_raw(c, "HTTP/1.1 100 Continue\r\n\r\n");
      if (!ok) co_return asio::error::connection_aborted;
    }
    c.arm(parser.got_some() ? kBodyTimeoutS : kIdleTimeoutS);
    auto [ec, n] = co_await c.socket.async_read_some(c.buffer.prepare(kReadChunk), kAsTuple);
    if (ec == asio::error::eof) {
      if (!parser.got_some()) co_return http::error::end_of_stream;
      error_code eof_ec;
      parser.put_eof(eof_ec);
      co_return eof_ec ? eof_ec : error_code(http::error::partial_message);
    }
    if (ec) co_return ec;
    c.buffer.commit(n);
  }
}

asio::awaitable<void> serve_connection(Worker& worker, tcp::socket socket) {
  OpenConnectionGuard guard(worker.stats);
  Connection c(worker, std::move(socket));
  for (;;) {
    c.reset_request();
    RequestParser parser(c);
    parser.header_limit(kHeaderLimit);
    parser.body_limit(kBodyLimit);
    parser.eager(true);  // parse the body in the same pass when it came with the header

    const error_code ec = co_await read_request(c, parser);
    if (ec) {
      if (is_parse_error(ec)) co_await reject_unparsable(c, ec);
      break;
    }
    const Outcome out = co_await handle_request(c, parser.keep_alive());
    if (out == Outcome::kClose) break;
  }
  error_code ignored;
  if (c.socket.is_open()) {
    c.socket.shutdown(tcp::socket::shutdown_send, ignored);
    c.socket.close(ignored);
  }
}

// Once a second: advance the coarse clock and close connections past their deadline (their
// pending operation then completes with an error and the connection coroutine ends).
asio::awaitable<void> reap_expired(Worker& worker) {
  asio::steady_timer tick(worker.ioc);
  for (;;) {
    tick.expires_after(1s);
    auto [ec] = co_await tick.async_wait(kAsTuple);
    if (ec) co_return;
    ++worker.now_s;
    for (Connection* c = worker.connections; c != nullptr; c = c->next) {
      if (c->deadline_s != 0 && c->deadline_s <= worker.now_s) {
        c->deadline_s = 0;
        error_code ignored;
        c->socket.close(ignored);
      }
    }
  }
}

void start_connection(Worker& worker, tcp::socket socket) {
  error_code ignored;
  socket.set_option(tcp::no_delay(true), ignored);
  bump(worker.stats.connections_accepted);
  asio::co_spawn(worker.ioc, serve_connection(worker, std::move(socket)), asio::detached);
}

// Connections taken per wake of the accept loop, at most: the rest wait for its next turn.
constexpr int kAcceptBurst = 128;

asio::awaitable<void> accept_loop(Worker& worker) {
  // The acceptor is non-blocking (open_acceptor), so accept() below says would_block once no
  // connection is waiting.
  for (;;) {
    auto [ec, socket] = co_await worker.acceptor.async_accept(kAsTuple);
    if (ec) {
      if (ec == asio::error::operation_aborted || !worker.acceptor.is_open()) co_return;
      // Out of descriptors and the like: back off briefly instead of spinning.
      asio::steady_timer backoff(worker.ioc, 10ms);
      co_await backoff.async_wait(kAsTuple);
      continue;
    }
    start_connection(worker, std::move(socket));
    // Then every connection already waiting, as event-loop servers do (Python's asyncio, under
    // vLLM, accepts up to its backlog per readiness): one accept per turn of a busy loop made
    // each new connection of a burst wait behind a whole turn of the streams' work.
    for (int i = 1; i < kAcceptBurst; ++i) {
      error_code more_ec;
      tcp::socket more = worker.acceptor.accept(more_ec);
      if (more_ec) break;
      start_connection(worker, std::move(more));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Startup

void print_usage(std::FILE* to) {
  fmt::print(to,
             "usage: llmproxy-mock [--listen HOST:PORT] [--threads N] [--models m1,m2] "
             "[--name NAME]\n"
             "                     [--flavor openai|vllm|tgi|llamacpp] [--quiet] [--no-accept]\n"
             "  --listen HOST:PORT  address to bind (default 127.0.0.1:9000; port 0 = ephemeral)\n"
             "  --threads N         event-loop threads, each with its own SO_REUSEPORT acceptor "
             "(default 1)\n"
             "  --models LIST       comma-separated model ids for /v1/models (default mock-model)\n"
             "  --name NAME         sent back in X-Mock-Backend and /v1/models owned_by "
             "(default mock-backend)\n"
             "  --flavor F          how streamed usage is reported (default openai)\n"
             "  --quiet             no startup summary on stderr\n"
             "  --no-accept         listen (backlog 0) but never accept: once the queue is full,\n"
             "                      connecting hangs (tests of timeouts.connect)\n");
}

// Returns an error message, or empty on success.
std::string parse_args(int argc, char** argv, Options& opt) {
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    std::string_view value;
    bool has_inline_value = false;
    if (auto eq = arg.find('='); arg.starts_with("--") && eq != std::string_view::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_inline_value = true;
    }
    auto next_value = [&](std::string_view& out) -> bool {
      if (has_inline_value) {
        out = value;
        return true;
      }
      if (i + 1 >= argc) return false;
      out = argv[++i];
      return true;
    };
    if (arg == "--quiet") {
      opt.quiet = true;
      continue;
    }
    if (arg == "--no-accept") {
      opt.no_accept = true;
      continue;
    }
    if (arg == "--help" || arg == "-h") {
      print_usage(stdout);
      std::exit(0);
    }
    std::string_view v;
    if (arg != "--listen" && arg != "--threads" && arg != "--models" && arg != "--name" &&
        arg != "--flavor") {
      return fmt::format("unknown option '{}'", arg);
    }
    if (!next_value(v)) return fmt::format("option '{}' needs a value", arg);
    if (arg == "--listen") {
      const auto colon = v.rfind(':');
      if (colon == std::string_view::npos)
        return fmt::format("--listen '{}': expected HOST:PORT", v);
      std::string_view host = v.substr(0, colon);
      if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
        host = host.substr(1, host.size() - 2);
      }
      const auto port = parse_int_text(v.substr(colon + 1));
      if (host.empty() || !port || *port < 0 || *port > 65535) {
        return fmt::format("--listen '{}': expected HOST:PORT with PORT in 0..65535", v);
      }
      opt.host = std::string(host);
      opt.port = static_cast<std::uint16_t>(*port);
    } else if (arg == "--threads") {
      const auto n = parse_int_text(v);
      if (!n || *n < 1 || *n > 256) return fmt::format("--threads '{}': expected 1..256", v);
      opt.threads = static_cast<int>(*n);
    } else if (arg == "--models") {
      opt.models.clear();
      std::size_t start = 0;
      while (start <= v.size()) {
        auto comma = v.find(',', start);
        if (comma == std::string_view::npos) comma = v.size();
        auto m = v.substr(start, comma - start);
        if (!m.empty()) opt.models.emplace_back(m);
        start = comma + 1;
      }
      if (opt.models.empty()) return fmt::format("--models '{}': no model names", v);
    } else if (arg == "--name") {
      if (v.empty()) return "--name: must not be empty";
      opt.name.clear();
      assign_header_value(opt.name, v);
    } else if (arg == "--flavor") {
      auto f = parse_flavor(v);
      if (!f) return fmt::format("--flavor '{}': expected openai, vllm, tgi or llamacpp", v);
      opt.flavor = *f;
    }
  }
  return {};
}

std::string build_models_body(const Options& opt) {
  std::string out = R"({"object":"list","data":[)";
  for (std::size_t i = 0; i < opt.models.size(); ++i) {
    if (i > 0) out.push_back(',');
    out.append(R"({"id":)");
    append_json_string(out, opt.models[i]);
    out.append(R"(,"object":"model","created":0,"owned_by":)");
    append_json_string(out, opt.name);
    out.push_back('}');
  }
  out.append("]}");
  return out;
}

asio::ip::address resolve_host(const std::string& host) {
  error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (!ec) return addr;
  asio::io_context ioc;
  tcp::resolver resolver(ioc);
  auto results = resolver.resolve(host, "0");  // throws with a readable message
  return results.begin()->endpoint().address();
}

void open_acceptor(tcp::acceptor& acceptor, const tcp::endpoint& ep, bool no_accept) {
  acceptor.open(ep.protocol());
  acceptor.set_option(asio::socket_base::reuse_address(true));
  using reuse_port = asio::detail::socket_option::boolean<SOL_SOCKET, SO_REUSEPORT>;
  acceptor.set_option(reuse_port(true));
  acceptor.bind(ep);
  acceptor.listen(no_accept ? 0 : asio::socket_base::max_listen_connections);
  acceptor.non_blocking(true);
}

int run(int argc, char** argv) {
  Options opt;
  if (auto err = parse_args(argc, argv, opt); !err.empty()) {
    fmt::print(stderr, "llmproxy-mock: {}\n", err);
    print_usage(stderr);
    return 2;
  }
  ::signal(SIGPIPE, SIG_IGN);

  Server server(opt);
  server.backend_header = "X-Mock-Backend: " + server.opt.name + "\r\n";
  server.models_body = build_models_body(server.opt);
  for (int i = 0; i < server.opt.threads; ++i) {
    server.workers.push_back(std::make_unique<Worker>(server, i));
  }

  std::uint16_t port = server.opt.port;
  try {
    const auto addr = resolve_host(server.opt.host);
    if (port != 0) {
      // SO_REUSEPORT would let us silently share a fixed port with a process already listening
      // there (a stale mock taking half the traffic). A plain bind first makes that an error.
      tcp::acceptor probe(server.workers.front()->ioc);
      probe.open(addr.is_v6() ? tcp::v6() : tcp::v4());
      probe.set_option(asio::socket_base::reuse_address(true));
      probe.bind(tcp::endpoint(addr, port));
    }
    // The first acceptor picks the port (it may be ephemeral); the others join it.
    for (auto& w : server.workers) {
      open_acceptor(w->acceptor, tcp::endpoint(addr, port), server.opt.no_accept);
      port = w->acceptor.local_endpoint().port();
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "llmproxy-mock: cannot listen on {}:{}: {}\n", server.opt.host,
               server.opt.port, e.what());
    return 1;
  }

  Worker& first = *server.workers.front();
  asio::signal_set signals(first.ioc, SIGINT, SIGTERM);
  signals.async_wait([&server](const error_code& ec, int) {
    if (ec) return;
    for (auto& w : server.workers) w->ioc.stop();
  });
  for (auto& w : server.workers) {
    if (server.opt.no_accept) break;
    asio::co_spawn(w->ioc, accept_loop(*w), asio::detached);
    asio::co_spawn(w->ioc, reap_expired(*w), asio::detached);
  }

  const bool v6 = server.opt.host.find(':') != std::string::npos;
  fmt::print("mock-backend: listening on http://{}{}{}:{}\n", v6 ? "[" : "", server.opt.host,
             v6 ? "]" : "", port);
  std::fflush(stdout);
  if (!server.opt.quiet) {
    std::string models;
    for (const auto& m : server.opt.models) models.append(models.empty() ? "" : ",").append(m);
    fmt::print(stderr, "mock-backend: name={} flavor={} threads={} models={}\n", server.opt.name,
               flavor_name(server.opt.flavor), server.opt.threads, models);
  }

  std::vector<std::thread> threads;
  for (std::size_t i = 1; i < server.workers.size(); ++i) {
    Worker* w = server.workers[i].get();
    threads.emplace_back([w] { w->ioc.run(); });
  }
  first.ioc.run();
  for (auto& w : server.workers) w->ioc.stop();
  for (auto& t : threads) t.join();
  return 0;
}

}  // namespace
}  // namespace llmproxy::mock

int main(int argc, char** argv) {
  return llmproxy::mock::run(argc, argv);
}
