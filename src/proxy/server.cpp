// The request lifecycle, in the order a request lives it:
//   accept -> read header (client_header timeout) -> route -> read body (limit) -> inspect
//   -> pick backend -> upstream connection (pool or connect) -> send -> response header
//   (first_byte timeout) -> relay body through a fixed buffer (stream_idle timeout) -> log.
// Refusals before forwarding are OpenAI-shaped errors. A failure before any response byte
// reached the client is retried on another backend; after that, never.
//
// This is the one Asio/Beast-heavy translation unit of the gateway (compile time matters).
#include "proxy/server.h"

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <simdjson.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <cassert>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_set>
#include <variant>
#include <vector>

#include "http/errors.h"
#include "http/response_head.h"
#include "http/tls_peer.h"
#include "lb/backend.h"
#include "lb/balancer.h"
#include "llm/request_inspector.h"
#include "llm/request_rewrite.h"
#include "llm/stream_meter.h"
#include "llm/usage.h"
#include "log/line_output.h"
#include "log/log.h"
#include "metrics/metrics.h"
#include "proxy/access_log.h"
#include "proxy/admin_access.h"
#include "proxy/field_pool.h"
#include "proxy/name_cache.h"
#include "proxy/request_id.h"
#include "usage/api_key.h"
#include "usage/pipeline.h"
#include "usage/record.h"

namespace llmproxy::proxy {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

constexpr auto use_nothrow = asio::as_tuple(asio::use_awaitable);

// The relay's scratch space, one pair per worker (not per stream): plain upstream bytes are read
// into the first only when the socket is readable, the body is parsed into the second, and
// written from there at once. A stream waiting for its next event holds no relay buffer.
constexpr std::size_t kRelayScratch = 32 * 1024;
// The most one read of a request adds to its body (Beast's http::async_read_some reads at most
// 64 KiB into the buffer at a time).
constexpr std::size_t kBodyRead = 64 * 1024;
// Lingering close (ClientSession::run()): how long, how idle and how much a closing connection
// is drained, in reads of kLingerRead bytes.
constexpr auto kLingerTime = std::chrono::seconds(5);
constexpr auto kLingerIdle = std::chrono::seconds(1);
constexpr std::size_t kLingerBytes = 256u << 20;
constexpr std::size_t kLingerRead = 4 * 1024;  // per closing connection: SIGTERM closes all
// Metering: the tail of a large non-stream response kept for its usage, and the largest
// request body kept after sending for a /tokenize call (larger prompts are estimated).
constexpr std::size_t kResponseTailBytes = 64 * 1024;
constexpr std::size_t kMaxTokenizeBody = 1024 * 1024;
// The most a /tokenize answer may take (a token list of the longest prompt kept).
constexpr std::size_t kTokenizeAnswerMax = 8 * kMaxTokenizeBody + 64 * 1024;
// A non-stream answer whose client left is read on for its usage up to this many more bytes.
constexpr std::size_t kReadForUsageMax = 64 * 1024 * 1024;
// An API key kept whole in usage records (api_key: full) is refused past this.
constexpr std::size_t kMaxStoredKeyBytes = 4096;
constexpr std::size_t kUpstreamHeaderLimit = 64 * 1024;
constexpr std::size_t kUpstreamInitialBuffer = 4 * 1024;
// A response header still incomplete past this many bytes is left to Beast's parser.
constexpr std::size_t kDirectHeadMax = 8 * 1024;
// A pooled connection idle for less than this is reused without probing it first: a backend
// closing it that fast is rare, and the stale-connection retry covers it. Older ones are probed
// (one recv(MSG_PEEK) syscall) because keep-alive timeouts of a few seconds are common.
constexpr auto kProbeIdleAfter = std::chrono::seconds(1);
// How often each worker checks its sessions' I/O deadlines: at most this late, and a quarter of
// the shortest configured timeout when that is smaller (but not below 10 ms).
constexpr auto kDeadlineSweep = std::chrono::milliseconds(100);
constexpr auto kDeadlineSweepMin = std::chrono::milliseconds(10);

using log::unix_ms_now;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

bool iequals(std::string_view a, std::string_view b) {
  return beast::iequals(a, b);
}

// `text` without the optional whitespace (spaces, tabs) around it.
std::string_view trim_ows(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
  return text;
}

// Calls `f` with each member of a comma-separated field value (RFC 9110 5.6.1), whitespace
// around it removed and empty ones skipped, until `f` returns true; returns whether it did.
template <class F>
bool any_member(std::string_view list, F f) {
  while (!list.empty()) {
    const auto comma = list.find(',');
    const auto member = trim_ows(list.substr(0, comma));
    list = comma == std::string_view::npos ? std::string_view{} : list.substr(comma + 1);
    if (!member.empty() && f(member)) return true;
  }
  return false;
}

// Does the Connection header value `connection` list the header `name` (case-insensitive)?
bool connection_lists(std::string_view connection, std::string_view name) {
  return any_member(connection, [name](std::string_view token) { return iequals(token, name); });
}

// The tokens of every Connection field of `fields` as one list (RFC 9110 5.3: several fields
// are one comma-separated list): a view of the only field, else joined into `joined`.
template <class Fields>
std::string_view connection_tokens(const Fields& fields, std::string& joined) {
  auto [first, last] = fields.equal_range(bhttp::field::connection);
  if (first == last) return {};
  if (std::next(first) == last) return first->value();
  for (auto it = first; it != last; ++it) {
    if (!joined.empty()) joined += ',';
    joined.append(it->value());
  }
  return joined;
}

// Hop-by-hop headers (RFC 9110 7.6.1) plus the legacy ones proxies must not forward. All are
// names Beast knows, so the parsed field's code is enough: no string comparison.
bool is_hop_by_hop(bhttp::field f) {
  switch (f) {
    case bhttp::field::connection:
    case bhttp::field::keep_alive:
    case bhttp::field::proxy_authenticate:
    case bhttp::field::proxy_authorization:
    case bhttp::field::te:
    case bhttp::field::trailer:
    case bhttp::field::transfer_encoding:
    case bhttp::field::upgrade:
    case bhttp::field::proxy_connection:
      return true;
    default:
      return false;
  }
}

// Builds an HTTP header in a string: sized once for a bound on its length, then filled with
// plain copies (std::string's out-of-line append, one call per piece, was a measurable share of
// every request). done() trims the string to what was written.
class HeadWriter {
 public:
  // Room for a field line besides name and value, and for a decimal number.
  static constexpr std::size_t kFieldExtra = 4;
  static constexpr std::size_t kNumber = 20;

  HeadWriter(std::string& out, std::size_t bound) : out_(out) {
    const std::size_t at = out.size();
    out_.resize(at + bound);
    p_ = out_.data() + at;
    end_ = out_.data() + out_.size();
  }
  void put(std::string_view v) {
    assert(static_cast<std::size_t>(end_ - p_) >= v.size());
    std::memcpy(p_, v.data(), v.size());
    p_ += v.size();
  }
  void put(std::uint64_t n) {
    assert(static_cast<std::size_t>(end_ - p_) >= kNumber);
    p_ = std::to_chars(p_, p_ + kNumber, n).ptr;
  }
  void field(std::string_view name, std::string_view value) {
    put(name);
    put(": ");
    put(value);
    put("\r\n");
  }
  void done() { out_.resize(static_cast<std::size_t>(p_ - out_.data())); }

 private:
  std::string& out_;
  char* p_;
  char* end_;
};

// ---------------------------------------------------------------------------------------------
// Shared, read-mostly state.

class Worker;

// One configuration generation: what a reload replaces as a whole. Immutable once published,
// except for the backends' live state (atomics). A request holds its generation (through its
// worker's WorkerGen) until it ends, so it finishes on the backends and timeouts it started with.
struct Generation {
  Generation(std::uint64_t id, config::Config c, const lb::BackendSet* previous,
             const std::vector<int>& metric_ids, std::size_t labels)
      : id(id), cfg(std::move(c)), backends(cfg.backends, previous, metric_ids), labels(labels) {
    // A reload that turns health checks off: a backend kept from before, down by their
    // verdict, would otherwise stay down for good (set_health_checks brings it up).
    for (std::size_t i = 0; i < backends.size(); ++i) {
      backends[i].set_health_checks(cfg.health_check.enabled);
    }
  }
  const std::uint64_t id;
  const config::Config cfg;
  lb::BackendSet backends;
  const std::size_t labels;          // backend labels known when it was built (metrics ids)
  std::atomic<bool> retired{false};  // replaced: its health checks stop
  // The waits of its health and model loops (control thread only): a reload cancels them, so
  // a replaced generation is freed at once, not after an `interval` that may be an hour.
  std::vector<asio::steady_timer*> loop_timers;
  void retire() {
    retired.store(true);
    for (auto* t : loop_timers) t->cancel();
  }
};

// Registers a loop's timer with its generation for the loop's lifetime (control thread only).
struct LoopTimer {
  LoopTimer(Generation& g, asio::io_context& ioc) : gen(g), timer(ioc) {
    gen.loop_timers.push_back(&timer);
  }
  ~LoopTimer() { std::erase(gen.loop_timers, &timer); }
  LoopTimer(const LoopTimer&) = delete;
  LoopTimer& operator=(const LoopTimer&) = delete;
  Generation& gen;
  asio::steady_timer timer;
};

// Backend metrics labels (name, else URL) ever configured in this process, each with a stable
// index: a reload keeps a backend's counters under its name. Grows only on reload; bounded by
// the backends an operator configures.
class BackendLabels {
 public:
  int id(const std::string& name) {
    std::lock_guard lk(mu_);
    for (std::size_t i = 0; i < names_.size(); ++i) {
      if (names_[i] == name) return static_cast<int>(i);
    }
    names_.push_back(name);
    return static_cast<int>(names_.size() - 1);
  }
  std::vector<std::string> names() const {
    std::lock_guard lk(mu_);
    return names_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> names_;
};

struct ReloadResult {
  bool ok = false;
  std::uint64_t generation = 0;
  std::size_t backends = 0;
  std::vector<std::string> problems;  // failed: every error found in the file
  bool not_applied = false;           // failed with a valid file: the gateway could not apply it
  std::vector<std::string> warnings;  // ok: restart-only keys that changed and were kept
};

struct Shared {
  explicit Shared(config::Config c) : cfg(std::move(c)), tls(asio::ssl::context::tls_client) {}

  // The configuration the process started with: restart-only settings (listen, workers, limits,
  // the usage log) are read from here and never change.
  const config::Config cfg;
  asio::ssl::context tls;
  std::atomic<bool> draining{false};
  std::vector<Worker*> workers;            // filled before any worker runs; read by scrapes
  std::atomic<bool> workers_ready{false};  // `workers` filled (the usage writer reads it then)
  usage::Pipeline* usage = nullptr;        // null when usage.enabled is false
  BackendLabels labels;
  asio::io_context* control = nullptr;   // reloads run there, one at a time
  std::function<ReloadResult()> reload;  // control thread only
  std::shared_ptr<Generation> current;   // control thread only (workers: WorkerGen)
  // The longest timeouts.connect of every generation so far (control thread only): a request of
  // an older generation still connects with its own.
  config::Millis longest_connect{0};
  // A reload counts as done (and its generation as live) once every worker has adopted it, so a
  // scrape that shows it promises that every request from then on runs on it. `live_generation`
  // is stored before `reloads_ok` is incremented; a scrape reads them in the other order.
  std::atomic<std::uint64_t> reloads_ok{0};
  std::atomic<std::uint64_t> reloads_failed{0};
  std::atomic<std::uint64_t> live_generation{1};
  // Backend host names, resolved off the event loops (requests and health checks alike).
  NameCache names;
  // A worker at server.max_connections has a connection waiting and no idle keep-alive one of
  // its own to close for it: another worker closes one of its own. When it asked (steady clock,
  // ns; 0: no one asks); a request older than two turns of the accept loops is void.
  std::atomic<std::int64_t> reclaim_wanted_at{0};
  // Request body bytes held by all workers (BodyTicket), bounded by server.max_body_memory.
  std::atomic<std::uint64_t> body_bytes{0};
  // The most body_bytes reached since the heap was last trimmed (memory_trim_loop).
  std::atomic<std::uint64_t> body_peak{0};
};

// ---------------------------------------------------------------------------------------------
// Upstream connections.

struct UpstreamConn {
  using Plain = beast::tcp_stream;
  using Tls = beast::ssl_stream<beast::tcp_stream>;

  // The read buffer starts at 4 KiB: a typical response header plus a small JSON body then
  // arrives in one read (Beast would otherwise start at 512 bytes and read twice).
  // A plain connection reads a stream's answer into the worker's scratch space and keeps only
  // what the parser leaves (see attempt()); a non-stream answer is read into this buffer, which
  // a pooled connection keeps (trimmed back when a large header grew it).
  UpstreamConn(Plain s, std::size_t b, std::uint64_t gen)
      : stream(std::in_place_type<Plain>, std::move(s)), backend(b), generation(gen) {}
  UpstreamConn(asio::any_io_executor ex, asio::ssl::context& ctx, std::size_t b, std::uint64_t gen)
      : stream(std::in_place_type<Tls>, ex, ctx), backend(b), generation(gen) {
    buffer.reserve(kUpstreamInitialBuffer);
  }

  beast::tcp_stream& tcp() {
    return std::visit([](auto& s) -> beast::tcp_stream& { return beast::get_lowest_layer(s); },
                      stream);
  }
  bool is_tls() const { return std::holds_alternative<Tls>(stream); }
  void close() {
    error_code ec;
    tcp().socket().shutdown(tcp::socket::shutdown_both, ec);
    tcp().close();
  }

  std::variant<Plain, Tls> stream;
  beast::flat_buffer buffer{kUpstreamHeaderLimit};
  std::size_t backend;       // index in its generation's BackendSet
  std::uint64_t generation;  // the generation it was opened for (pools move on reload)
  Clock::time_point idle_since{};
  bool reused = false;
};

// Is an idle pooled connection still usable? A peer that closed it has shut its side down
// (FIN or reset), whatever it sent before: over TLS, the close_notify alert waits in front of the
// FIN. Bytes alone are stray on plain HTTP (do not reuse), and over TLS may be TLS 1.3 session
// tickets sent after the handshake (harmless).
bool idle_conn_alive(UpstreamConn& c) {
  pollfd p{c.tcp().socket().native_handle(), POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) < 0) return false;
  if ((p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0) return false;
  return (p.revents & POLLIN) == 0 || c.is_tls();
}

// ---------------------------------------------------------------------------------------------
// Worker: one thread, one io_context, everything a request needs without locks.

class ClientSession;

// A worker's event loop, whose pending operations can be destroyed before any worker is: a
// scrape or a reload on one worker waits in another's loop (copy_metrics, the reload barrier),
// and destroying that operation destroys the waiting session, which belongs to the first worker.
// Destroyed with the second worker's io_context after the first worker, it reached freed memory
// (a reviewer's ASan run: two SIGTERMs during scrapes with 4 workers).
class WorkerLoop : public asio::io_context {
 public:
  using asio::io_context::io_context;
  void shut_down() { shutdown(); }  // asio::execution_context::shutdown(): idempotent
};

// One worker's view of one generation: its balancer state and its idle upstream connections.
// Requests hold theirs (shared_ptr, a count on this worker's own cache line) until they end.
struct WorkerGen {
  explicit WorkerGen(std::shared_ptr<Generation> g)
      : gen(std::move(g)),
        balancer(gen->backends, gen->cfg.load_balancing.strategy),
        idle(gen->backends.size()) {}
  std::shared_ptr<Generation> gen;
  lb::Balancer balancer;
  std::vector<std::vector<std::unique_ptr<UpstreamConn>>> idle;  // pool, per backend
};

class Worker {
 public:
  Worker(Shared& s, int id, std::shared_ptr<Generation> gen)
      : shared(s),
        id(id),
        ioc(1),
        acceptor(ioc),
        housekeeping(ioc),
        cur(std::make_shared<WorkerGen>(gen)),
        inspector(s.cfg.server.max_body_size + 1024),
        log(log::stdout_lines(), s.cfg.server.access_log),
        metrics(gen->labels) {}
  // Pooled connections use the io_context: close them before it goes. The io_context then
  // destroys the suspended coroutines, whose sessions unregister from `sessions` (declared
  // before the io_context, so it is still alive then). Only the current WorkerGen has a pool.
  ~Worker() { cur->idle.clear(); }

  Shared& shared;
  int id;
  std::unordered_set<ClientSession*> sessions;
  // Unix ms before which every request this worker took has ended (its record submitted),
  // published at each housekeeping sweep for the usage log's settled time.
  std::atomic<std::int64_t> settled_ms{0};
  WorkerLoop ioc;
  tcp::acceptor acceptor;
  std::optional<tcp::acceptor> metrics_acceptor;  // metrics.listen, on worker 0 only
  asio::steady_timer housekeeping;
  std::shared_ptr<WorkerGen> cur;  // this thread only; swapped by adopt()
  llm::RequestInspector inspector;
  simdjson::dom::parser usage_parser;  // usage events, bodies, rewrites: one thread, reused
  // The upstream response header just read (views into its connection's buffer): valid from
  // its parse to the client's header, with no co_await between.
  http::ResponseHead resp_head;
  std::unique_ptr<char[]> relay_in{new char[kRelayScratch]};  // see kRelayScratch
  std::unique_ptr<char[]> relay_out{new char[kRelayScratch]};
  RequestIdGenerator ids;
  AccessLog log;
  metrics::WorkerMetrics metrics;  // written by this thread only; copied on its thread by scrapes
  std::atomic<std::int64_t> connections{0};          // client connections (main listener)
  std::atomic<std::int64_t> metrics_connections{0};  // metrics.listen's: drain waits for them too
  std::thread thread;

  const config::Config& cfg() const { return cur->gen->cfg; }

  // `wg`: the request's generation; after a reload its pool is empty, so it connects afresh.
  std::unique_ptr<UpstreamConn> take_idle(WorkerGen& wg, std::size_t backend) {
    auto& list = wg.idle[backend];
    while (!list.empty()) {
      auto c = std::move(list.back());
      list.pop_back();
      auto idle_for = Clock::now() - c->idle_since;
      if (idle_for < wg.gen->cfg.upstream.idle_timeout &&
          (idle_for < kProbeIdleAfter || idle_conn_alive(*c))) {
        c->reused = true;
        return c;
      }
      c->close();
    }
    return nullptr;
  }

  // `wg`: the generation the connection was used in. A connection of an older generation goes
  // to the current pool when its backend (same name and URL) is still configured.
  void put_idle(const WorkerGen& wg, std::unique_ptr<UpstreamConn> c) {
    if (c->generation != cur->gen->id && !rebase(wg, *c)) {
      c->close();
      return;
    }
    auto& list = cur->idle[c->backend];
    if (shared.draining.load(std::memory_order_relaxed) ||
        list.size() >= static_cast<std::size_t>(cfg().upstream.max_idle_per_backend)) {
      c->close();
      return;
    }
    c->idle_since = Clock::now();
    c->buffer.clear();
    if (c->buffer.capacity() > 2 * kUpstreamInitialBuffer) c->buffer.shrink_to_fit();
    if (c->is_tls()) c->buffer.reserve(kUpstreamInitialBuffer);  // the relay may have released it
    list.push_back(std::move(c));
  }

  // Moves a connection of generation `from` to the same backend in the current generation.
  bool rebase(const WorkerGen& from, UpstreamConn& c) {
    if (from.gen->id != c.generation || c.backend >= from.gen->backends.size()) return false;
    // A TLS connection opened without verification is not kept once verification is on.
    if (c.is_tls() && from.gen->cfg.upstream.tls_verify != cur->gen->cfg.upstream.tls_verify) {
      return false;
    }
    const auto& old = from.gen->backends[c.backend];
    const auto& now = cur->gen->backends;
    for (std::size_t i = 0; i < now.size(); ++i) {
      if (now[i].name() == old.name() && now[i].config().url == old.config().url) {
        c.backend = i;
        c.generation = cur->gen->id;
        return true;
      }
    }
    return false;
  }

  // A reload: later requests use `gen`; idle connections to backends it keeps move along.
  void adopt(std::shared_ptr<Generation> gen) {
    auto old = std::move(cur);
    cur = std::make_shared<WorkerGen>(std::move(gen));
    cur->balancer.continue_from(old->balancer);
    metrics.ensure_backends(cur->gen->labels);
    for (auto& list : old->idle) {
      for (auto& c : list) {
        if (rebase(*old, *c) && cur->idle[c->backend].size() <
                                    static_cast<std::size_t>(cfg().upstream.max_idle_per_backend)) {
          cur->idle[c->backend].push_back(std::move(c));
        } else {
          c->close();
        }
      }
      list.clear();
    }
  }

  void sweep_idle() {
    auto now = Clock::now();
    for (auto& list : cur->idle) {
      std::erase_if(list, [&](std::unique_ptr<UpstreamConn>& c) {
        if (now - c->idle_since >= cfg().upstream.idle_timeout || !idle_conn_alive(*c)) {
          c->close();
          return true;
        }
        return false;
      });
    }
  }

  void begin_drain();
};

// Accepted socket options: no Nagle, so a token written is a token sent.
void tune_socket(tcp::socket& s) {
  error_code ec;
  s.set_option(tcp::no_delay(true), ec);
}

// ---------------------------------------------------------------------------------------------
// Connecting to a backend.

struct ConnectResult {
  std::unique_ptr<UpstreamConn> conn;
  error_code ec;
  bool timed_out = false;
  // The gateway could not open a socket (out of file descriptors, or of memory): its own
  // failure, not the backend's, which must not be marked down for it.
  bool local = false;
  std::string tls_reason;  // a refused certificate: why (expired, unknown issuer, ...)

  std::string message() const {
    if (timed_out) return "timed out";
    if (local) return "the gateway cannot open a socket: " + ec.message();
    return tls_reason.empty() ? ec.message() : ec.message() + ": " + tls_reason;
  }
};

// A local socket failure, logged at most once per kLocalFailureLogEvery for each `last` (they
// come in floods).
constexpr auto kLocalFailureLogEvery = std::chrono::seconds(10);
std::atomic<std::int64_t> last_connect_failure_log{0};
std::atomic<std::int64_t> last_accept_failure_log{0};

void log_local_failure(std::atomic<std::int64_t>& last_log, const error_code& ec,
                       std::string_view what, std::string_view meanwhile) {
  const std::int64_t now = unix_ms_now();
  std::int64_t last = last_log.load(std::memory_order_relaxed);
  if (now - last < std::chrono::milliseconds(kLocalFailureLogEvery).count() ||
      !last_log.compare_exchange_strong(last, now)) {
    return;
  }
  rlimit lim{};
  ::getrlimit(RLIMIT_NOFILE, &lim);
  log::line("error",
            "cannot {}: {} (open-file limit {}): {} meanwhile; raise the limit (ulimit -n, "
            "LimitNOFILE=) or lower server.max_connections",
            what, ec.message(), static_cast<std::uint64_t>(lim.rlim_cur), meanwhile);
}

// Errors that say the gateway itself is short of something (descriptors, memory), not the backend.
bool local_error(const error_code& ec) {
  return ec == asio::error::no_descriptors || ec == asio::error::no_memory ||
         ec == asio::error::no_buffer_space ||
         (ec.category() == boost::system::system_category() && ec.value() == ENFILE);
}

ConnectResult local_connect_failure(const error_code& ec) {
  ConnectResult out;
  out.ec = ec;
  out.local = true;
  log_local_failure(last_connect_failure_log, ec, "open a socket to a backend",
                    "requests get 503 overloaded");
  return out;
}

// Resolves, connects and (for https://) handshakes with verification, all within `timeout`.
// Used by requests (connect timeout) and health checks (their own timeout) alike.
asio::awaitable<ConnectResult> connect_backend(asio::any_io_executor ex, Shared& shared,
                                               const Generation& gen, const lb::Backend& backend,
                                               std::chrono::milliseconds timeout) {
  const auto& url = backend.config().parsed;
  ConnectResult out;
  // The gateway's own failure (no descriptor left) is told from the backend's first: name
  // resolution needs descriptors too, and would fail as if the name were unknown. A socket
  // opened and closed costs two system calls, on new connections only.
  if (const int probe = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0); probe >= 0) {
    ::close(probe);
  } else {
    co_return local_connect_failure(error_code(errno, boost::system::system_category()));
  }
  // One deadline for the three steps: a slow name server must not add its own timeouts (glibc:
  // 5 s per try and server) to a request's connect timeout.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<tcp::endpoint> endpoints;
  error_code ec;
  auto addr = asio::ip::make_address(url.host, ec);
  if (!ec) {
    endpoints.emplace_back(addr, url.port);
  } else {
    // A name not known yet is waited for until the deadline, not until getaddrinfo returns
    // (which may be never): the answer is posted here from the lookup's thread and wakes the
    // timer; a late one finds the wait over (the state is shared with it).
    struct NameWait {
      NameWait(asio::any_io_executor e, Clock::time_point at) : timer(e, at) {}
      asio::steady_timer timer;
      std::optional<NameCache::Answer> answer;
    };
    auto wait = std::make_shared<NameWait>(ex, deadline);
    auto on_answer = [wait](const NameCache::Answer& a) {
      asio::post(wait->timer.get_executor(), [wait, a] {
        if (wait->answer) return;
        wait->answer = a;
        wait->timer.cancel();
      });
    };
    if (auto known = shared.names.find(url.host, url.port, std::move(on_answer))) {
      endpoints = std::move(*known);
    } else {
      co_await wait->timer.async_wait(use_nothrow);
      if (!wait->answer) {
        out.ec = beast::error::timeout;
        out.timed_out = true;
        co_return out;
      }
      if (const auto rec = wait->answer->error) {
        if (local_error(rec)) co_return local_connect_failure(rec);
        out.ec = rec;
        co_return out;
      }
      endpoints = std::move(wait->answer->endpoints);
    }
  }
  std::unique_ptr<UpstreamConn> conn;
  if (url.tls) {
    conn = std::make_unique<UpstreamConn>(ex, shared.tls, backend.index(), gen.id);
  } else {
    conn = std::make_unique<UpstreamConn>(beast::tcp_stream(ex), backend.index(), gen.id);
  }
  auto& tcp_stream = conn->tcp();
  tcp_stream.expires_at(deadline);
  auto [cec, ep] = co_await tcp_stream.async_connect(endpoints, use_nothrow);
  if (cec) {
    // The socket is opened by async_connect: another thread may have taken the last descriptor.
    if (local_error(cec)) co_return local_connect_failure(cec);
    out.ec = cec;
    out.timed_out = cec == beast::error::timeout;
    co_return out;
  }
  tune_socket(tcp_stream.socket());
  if (!url.tls) {
    // The request path writes without waiting when the socket takes the bytes (attempt()).
    tcp_stream.socket().non_blocking(true, ec);
  } else {
    auto& tls = std::get<UpstreamConn::Tls>(conn->stream);
    SSL* ssl = tls.native_handle();
    const bool verify = gen.cfg.upstream.tls_verify;
    if (!http::set_tls_peer(ssl, url.host, verify)) {
      out.ec = error_code(static_cast<int>(::ERR_get_error()), asio::error::get_ssl_category());
      co_return out;
    }
    tls.set_verify_mode(verify ? asio::ssl::verify_peer : asio::ssl::verify_none);
    tcp_stream.expires_at(deadline);
    auto [hec] = co_await tls.async_handshake(asio::ssl::stream_base::client, use_nothrow);
    if (hec) {
      out.ec = hec;
      out.timed_out = hec == beast::error::timeout;
      // Why the certificate was refused (with verification off it was not).
      if (verify) out.tls_reason = http::tls_refusal(ssl);
      co_return out;
    }
  }
  tcp_stream.expires_never();
  out.conn = std::move(conn);
  co_return out;
}

// Small Beast operations dispatched on the connection's stream type. Only these are
// instantiated twice (plain, TLS), not the whole lifecycle.
template <class Message>
asio::awaitable<std::tuple<error_code, std::size_t>> upstream_write(UpstreamConn& c, Message& msg) {
  auto op = std::visit([&](auto& s) { return bhttp::async_write(s, msg, use_nothrow); }, c.stream);
  co_return co_await std::move(op);
}

template <class Parser>
asio::awaitable<std::tuple<error_code, std::size_t>> upstream_read(UpstreamConn& c, Parser& p) {
  auto op =
      std::visit([&](auto& s) { return bhttp::async_read(s, c.buffer, p, use_nothrow); }, c.stream);
  co_return co_await std::move(op);
}

template <class Parser>
asio::awaitable<std::tuple<error_code, std::size_t>> upstream_read_header(UpstreamConn& c,
                                                                          Parser& p) {
  auto op = std::visit(
      [&](auto& s) { return bhttp::async_read_header(s, c.buffer, p, use_nothrow); }, c.stream);
  co_return co_await std::move(op);
}

// The request path's upstream I/O, on the connection's own layers: the plain socket itself
// (Beast's timed stream layer would arm and cancel a timer around every operation; deadlines
// are the session's, see ClientSession::arm), or the TLS stream. Not a coroutine: the caller
// awaits the operation itself, with no frame in between. `f` takes the stream, returns the op.
template <class F>
auto on_upstream(UpstreamConn& c, F&& f) {
  if (auto* plain = std::get_if<UpstreamConn::Plain>(&c.stream)) return f(plain->socket());
  return f(std::get<UpstreamConn::Tls>(c.stream));
}

// One write of relayed body to the client, as a gather list: the header while it is unsent,
// then the piece, framed as a chunk when the client's message is chunked, and the last chunk
// with the end of the message.
struct BodyWrite {
  std::array<asio::const_buffer, 5> buffers{};
  std::array<char, 20> size_line{};

  void frame(std::string_view head, bool chunked, std::string_view piece, bool last) {
    static constexpr std::string_view kCrlf = "\r\n";
    static constexpr std::string_view kLastChunk = "0\r\n\r\n";
    std::size_t i = 0;
    buffers = {};
    if (!head.empty()) buffers[i++] = asio::buffer(head);
    if (chunked && !piece.empty()) {
      auto [end, ec] = std::to_chars(size_line.data(), size_line.data() + 16, piece.size(), 16);
      *end++ = '\r';
      *end++ = '\n';
      buffers[i++] =
          asio::buffer(size_line.data(), static_cast<std::size_t>(end - size_line.data()));
    }
    if (!piece.empty()) buffers[i++] = asio::buffer(piece);
    if (chunked && !piece.empty()) buffers[i++] = asio::buffer(kCrlf);
    if (chunked && last) buffers[i++] = asio::buffer(kLastChunk);
  }
};

// ---------------------------------------------------------------------------------------------
// Client hang-up detection while the upstream is busy: a read-readiness wait on the client
// socket (no bytes consumed). EOF there means the client is gone: the upstream connection is
// closed at once so the backend stops generating, even during a long silent prefill.

// The wait's handler holds the watch by shared_ptr, so disarming is two stores: the wait stays
// queued (it serves the next request, or ends with the connection) and a completion that
// finds the watch disarmed does nothing. No cancel, no waiting for the handler per request.
struct HangupWatch {
  bool armed = false;    // a request waits on its upstream: a hang-up now closes it
  bool pending = false;  // a peek is queued on the client socket
  bool client_gone = false;
  UpstreamConn* upstream = nullptr;
  // The answer was generated whole (non-stream, metered): a hang-up does not close `upstream`,
  // whose body is read on for its usage (abort() at the drain deadline still closes it).
  bool keep_upstream = false;
  char peek = 0;  // the peek's one byte (here: it outlives the session with the queued peek)
};

// ---------------------------------------------------------------------------------------------
// Per-request context: created when the header is read, logged exactly once at the end.

// A request's share of server.max_body_memory: the room its body holds (grown as bytes arrive,
// see grow_body_room), until the body is freed.
class BodyTicket {
 public:
  BodyTicket() = default;
  BodyTicket(const BodyTicket&) = delete;
  BodyTicket& operator=(const BodyTicket&) = delete;
  ~BodyTicket() { shrink(0); }

  // Holds n bytes in all (more than before); false, holding what it held, past the bound.
  // `peak` keeps the most the pool reached (see memory_trim_loop).
  bool hold(std::atomic<std::uint64_t>& pool, std::atomic<std::uint64_t>& peak, std::uint64_t bound,
            std::uint64_t n) {
    if (n <= held_) return true;
    pool_ = &pool;
    const std::uint64_t more = n - held_;
    std::uint64_t now = pool.load(std::memory_order_relaxed);
    do {
      if (now + more > bound) return false;
    } while (!pool.compare_exchange_weak(now, now + more, std::memory_order_relaxed));
    held_ = n;
    for (std::uint64_t p = peak.load(std::memory_order_relaxed);
         p < now + more && !peak.compare_exchange_weak(p, now + more, std::memory_order_relaxed);) {
    }
    return true;
  }
  std::uint64_t held() const noexcept { return held_; }
  void shrink(std::uint64_t n) {
    if (n >= held_) return;
    pool_->fetch_sub(held_ - n, std::memory_order_relaxed);
    held_ = n;
  }

 private:
  std::atomic<std::uint64_t>* pool_ = nullptr;
  std::uint64_t held_ = 0;
};

struct RequestContext {
  BodyTicket body_ticket;  // first: released after everything that may still hold the body
  Clock::time_point start = Clock::now();
  std::shared_ptr<WorkerGen> wg;  // the configuration generation it runs on, to its end
  std::string request_id;
  std::string method;
  std::string path;
  llm::RequestInfo info;
  const lb::Backend* backend = nullptr;
  unsigned status = 0;
  std::uint64_t bytes_in = 0;
  std::uint64_t bytes_out = 0;
  double ttfb_ms = -1;
  int attempts = 0;
  // A pooled connection found closed once the request was on it was replaced (see attempt()):
  // at most once per request, since the backend may have read it.
  bool replaced_stale = false;
  std::string_view finish = "completed";
  unsigned client_version = 11;  // 10 for HTTP/1.0 clients: no chunked responses
  metrics::Route route = metrics::Route::other;
  double first_byte_ms = -1;  // first response body byte written to the client
  // A metered stream's first data event written to the client (comments such as keep-alive
  // pings, error events and [DONE] are no token).
  double first_token_ms = -1;
  // Time to first token of a stream the backend answered 2xx, else -1: the first data event when
  // metered, else the first body byte (an error answer's first byte is no first token: a
  // backend shedding load in 3 ms would otherwise improve the TTFT while it serves nothing).
  double ttft_ms() const {
    if (!info.stream || upstream_status < 200 || upstream_status >= 300) return -1;
    return meter ? first_token_ms : first_byte_ms;
  }

  // Metering (LLM routes with usage enabled). A record is made when `forwarded`.
  bool metered = false;
  bool forwarded = false;                // the request reached a backend
  const lb::Backend* sent_to = nullptr;  // the backend it reached (ctx.backend is the last pick)
  Clock::time_point end{};               // set before post-response work (/tokenize)
  bool injected = false;                 // include_usage was added upstream by the gateway
  bool upstream_answered = false;
  unsigned upstream_status = 0;
  llm::Endpoint endpoint = llm::Endpoint::chat_completions;
  std::string client_request_id;
  std::string user_id;
  std::string api_key;
  std::optional<llm::StreamMeter> meter;  // event streams
  std::string body_copy;                  // other responses: the body, or its tail when large
  BodyTicket copy_ticket;  // body_copy's room, under server.max_body_memory with the bodies
  std::string body_head;   // ... and then its first kResponseTailBytes too
  std::string body_mid;    // ... and the last usage key that left the copy, with what follows it
  bool body_copy_complete = true;
  // A body relayed in one piece is read for usage where it lies, once written: no copy.
  struct BodyUsage {
    bool reported = false;
    bool error = false;  // no usage, and the whole body is an error report
    llm::Usage usage;
    llm::TextCount content;
  };
  std::optional<BodyUsage> body_usage;
  // The model a request that named none was answered by (the response's `model`), for its record.
  std::string answer_model;
  std::string retained_body;  // the request body, kept for /tokenize when usage is missing
  bool usage_resolved = false;
  llm::Usage usage;
  bool estimated = false;
  bool prompt_estimated = false;
};

using metrics::Route;  // the route a request took, also its metrics label

// The fields of the messages parsed on the request path come from a per-thread pool (see
// field_pool.h): the client's request and the backend's response header.
using PooledFields = bhttp::basic_fields<PoolAllocator<char>>;
using Request = bhttp::request<bhttp::string_body, PooledFields>;
using RequestParser = bhttp::request_parser<bhttp::string_body, PoolAllocator<char>>;
using ResponseParser = bhttp::response_parser<bhttp::buffer_body, PoolAllocator<char>>;

class ClientSession {
 public:
  ClientSession(Worker& w, tcp::socket socket, bool metrics_only)
      : w_(w), stream_(std::move(socket)), metrics_only_(metrics_only) {
    error_code ec;
    auto ep = stream_.socket().remote_endpoint(ec);
    if (!ec) {
      // A listener on every address sees IPv4 clients as ::ffff:a.b.c.d: logged and forwarded
      // as a.b.c.d.
      auto ip = ep.address();
      if (ip.is_v6() && ip.to_v6().is_v4_mapped()) {
        ip = asio::ip::make_address_v4(asio::ip::v4_mapped, ip.to_v6());
      }
      client_ip_ = ip.to_string();
      client_loopback_ = ip.is_loopback();
    }
    w_.sessions.insert(this);
  }
  ~ClientSession() {
    w_.sessions.erase(this);
    // A queued hang-up wait outlives the session (it holds the shared state): it must not touch
    // an upstream connection that an unwinding frame has freed.
    watch_.armed = false;
    watch_.upstream = nullptr;
  }

  asio::awaitable<void> run();

  // Called on drain: wakes a connection that waits for its next request.
  void cancel_if_idle() {
    if (idle_) stream_.cancel();
  }
  // At server.max_connections with a connection waiting: one that served a request and waits
  // for the next one may give its place (it ends as at its keep-alive timeout, closed at once:
  // it holds no unread bytes to linger for). reclaim_since(): since when it may, or max().
  Clock::time_point reclaim_since() const {
    // Not one its keep-alive deadline already closed: that place is free.
    return idle_ && idle_keepalive_ && !metrics_only_ && !timed_out_ ? idle_since_
                                                                     : Clock::time_point::max();
  }
  void reclaim() {
    idle_ = false;
    reclaimed_ = true;
    stream_.cancel();  // no effect on a read already complete (its request is served)
  }
  // Called at the drain deadline: cuts the request in flight (client and upstream sockets), so
  // that it still ends through log() (its usage record, finish "timeout") before the process
  // stops.
  void abort() {
    aborted_ = true;
    only_count_cut_ = counting_prompt_;
    watch_.client_gone = true;  // a request still connecting stops before it is sent
    error_code ec;
    stream_.socket().close(ec);
    if (watch_.upstream) watch_.upstream->close();
    if (tokenize_conn_) tokenize_conn_->close();  // the prompt keeps its local estimate
  }
  // The worker's deadline sweep: cuts the I/O of a session past its deadline (see arm()).
  void check_deadline(Clock::time_point now) {
    if (now < deadline_) return;
    deadline_ = Clock::time_point::max();
    timed_out_ = true;
    if (deadline_upstream_) {
      deadline_upstream_->close();
    } else {
      error_code ec;
      stream_.socket().close(ec);
    }
  }
  // Also the sweep's: starts the hang-up watch of a request still waiting (see arm_watch()).
  void watch_tick();
  Clock::time_point busy_since() const { return busy_since_; }
  bool metrics_only() const { return metrics_only_; }

 private:
  asio::awaitable<bool> handle_request();
  asio::awaitable<bool> proxy(Request& req, RequestContext& ctx, bool keep_alive);
  // done: the response was relayed; retry: try another backend; first_byte_timeout: the
  // backend took the request but sent no header in time (answered 504 by proxy()).
  // bad_answer: the backend began an answer it did not finish or that cannot be read; it ran the
  // request, so another backend is not asked to run it again (502).
  // cut_before_body: the backend's header came, then its answer failed (reset, closed, silent
  // past stream_idle) before any of it reached the client: the client gets an error instead.
  enum class Attempt { done, retry, first_byte_timeout, overloaded, bad_answer, cut_before_body };
  asio::awaitable<Attempt> attempt(lb::Backend& backend, Request& req, RequestContext& ctx,
                                   bool keep_alive, bool& client_keep_alive, std::string& error);
  // A response the gateway writes itself. Built into a named local before the co_await that
  // sends it: GCC 12 can destroy temporaries of a co_await full-expression twice.
  struct Reply {
    unsigned status = 200;
    std::string body;
    bool keep_alive = true;
    std::string_view allow;
    std::string_view content_type = "application/json";
    unsigned retry_after = 0;                // seconds, for a refusal that may pass on its own
    std::string_view www_authenticate = {};  // a 401's challenge (RFC 9110 11.6.1)
  };
  static Reply error_reply(const http::ErrorSpec& spec, std::string_view message, bool keep_alive,
                           std::string_view allow = {}, std::string_view param = {}) {
    return Reply{spec.status, http::error_body(spec, message, param), keep_alive, allow};
  }
  asio::awaitable<bool> send(RequestContext& ctx, Reply& reply);
  // Frees the body kept for /tokenize, and its share of server.max_body_memory.
  static void drop_retained(RequestContext& ctx) {
    std::string().swap(ctx.retained_body);
    ctx.body_ticket.shrink(0);
  }
  // Holds `bytes` on `ticket` under server.max_body_memory (request bodies, and the metering
  // copies of answers); false past that bound.
  bool hold(BodyTicket& ticket, std::uint64_t bytes) {
    // A largest body alone always fits, whatever the setting.
    const auto& server = w_.cfg().server;
    const std::uint64_t bound =
        std::max(server.max_body_memory, server.max_body_size + simdjson::SIMDJSON_PADDING);
    return ticket.hold(w_.shared.body_bytes, w_.shared.body_peak, bound, bytes);
  }
  // Makes room in `s` for `need` bytes in all, at most `cap`, held on `ticket` before it is
  // taken; false at the bound. Room grows geometrically, each time exactly (a fresh string:
  // std::string::reserve would round up to twice the old capacity).
  bool grow_room(BodyTicket& ticket, std::string& s, std::uint64_t need, std::uint64_t cap) {
    need = std::min(cap, need);
    if (need <= s.capacity()) return true;
    const std::uint64_t room =
        std::min<std::uint64_t>(cap, std::max<std::uint64_t>(need, 2 * s.capacity()));
    if (!hold(ticket, room)) return false;
    set_room(s, room);
    return true;
  }
  // Room in a request body for `incoming` more bytes and simdjson's padding: the body grows with
  // what arrives, never with what a header announces.
  bool grow_body_room(RequestContext& ctx, std::string& body, std::uint64_t incoming,
                      std::uint64_t cap) {
    return grow_room(ctx.body_ticket, body, body.size() + incoming + simdjson::SIMDJSON_PADDING,
                     cap);
  }
  // Gives `body` exactly `room` bytes of capacity.
  static void set_room(std::string& body, std::uint64_t room) {
    std::string fresh;
    fresh.reserve(room);
    fresh.append(body);
    body.swap(fresh);
  }
  // After a read. Beast's string body reserves the whole announced Content-Length when the first
  // body byte comes: that room, untouched (address space only), is given back at once, so that a
  // body holds what arrived and one read more, and counts no more (QA: one byte after a header
  // announcing 8 MiB counted 8 MiB).
  bool fit_body_room(RequestContext& ctx, std::string& body, std::uint64_t cap) {
    const std::uint64_t want =
        std::min<std::uint64_t>(cap, body.size() + kBodyRead + simdjson::SIMDJSON_PADDING);
    if (body.capacity() > want && body.capacity() > ctx.body_ticket.held()) set_room(body, want);
    return hold(ctx.body_ticket, body.capacity());
  }
  // 503 overloaded for a body past server.max_body_memory (`bytes_in` of it arrived); the rest of
  // it is not read.
  asio::awaitable<bool> refuse_body(RequestContext& ctx, std::size_t bytes_in) {
    ctx.bytes_in = bytes_in;
    reply_ = error_reply(
        http::errors::overloaded,
        fmt::format("The gateway holds as many request bodies as server.max_body_memory allows "
                    "({} bytes); retry later.",
                    w_.cfg().server.max_body_memory),
        false);
    reply_.retry_after = 1;
    co_return co_await send(ctx, reply_);
  }
  std::string health_body(bool ready_check) const;
  asio::awaitable<std::string> metrics_body();
  asio::awaitable<metrics::WorkerMetrics> merged_metrics();
  asio::awaitable<std::string> admin_backends_body();
  // The models the healthy backends serve, each once, with the first backend serving it.
  std::vector<std::pair<std::string, std::string>> served_models() const;
  std::string models_body() const;
  // GET /v1/models/{id}: the model, or a 404 model_not_found.
  Reply model_reply(std::string_view encoded_id, bool keep_alive) const;

  void arm_watch();
  void disarm_watch();
  void stop_watch();  // disarms and cancels the queued peek: the connection is read again
  void record_passive(const config::HealthCheck& hc, lb::Backend& b, bool ok);
  void upstream_head(std::string& out, const Request& req, const RequestContext& ctx,
                     const lb::Backend& backend) const;
  asio::awaitable<void> handle_reload(RequestContext& ctx, bool keep_alive);
  void log(RequestContext& ctx);
  void access_log(const RequestContext& ctx, double duration_ms);
  // Metering: usage from what passed (sync), then, when the backend reported none, the prompt
  // counted by the backend's /tokenize (after the client has its whole response).
  void resolve_usage(RequestContext& ctx);
  // Usage of a non-stream body, or of the copy of one (`whole` false when it holds only part).
  // A whole body of a request without `model` also gives the model it names (answer_model).
  RequestContext::BodyUsage read_body(RequestContext& ctx, std::string_view body, bool whole);
  // Resolves usage; true when the prompt count should then come from /tokenize (otherwise the
  // retained request body is freed). Plain call: most requests need no coroutine frame for it.
  bool wants_tokenize(RequestContext& ctx);
  // `authorization`: the client's header, passed on to /tokenize (backends started with keys).
  asio::awaitable<void> tokenize_prompt(RequestContext& ctx, bool client_keep_alive,
                                        std::string_view authorization);
  asio::awaitable<std::int64_t> tokenize(const lb::Backend& backend, const RequestContext& ctx,
                                         std::string_view authorization);
  void submit_usage(RequestContext& ctx, double duration_ms);

  // I/O deadlines: one per session, checked by the worker every kDeadlineSweep, rather than a
  // timer armed and cancelled around every read and write (two more handler runs each). arm()
  // before an operation on the client socket, or on `upstream`; settle() after it: it disarms,
  // and reports an operation the deadline cut (its socket closed, as Beast's own timeouts do)
  // as beast::error::timeout.
  void arm(Clock::duration timeout, UpstreamConn* upstream = nullptr) {
    arm_until(Clock::now() + timeout, upstream);
  }
  void arm_until(Clock::time_point deadline, UpstreamConn* upstream = nullptr) {
    deadline_ = deadline;
    deadline_upstream_ = upstream;
  }
  error_code settle(error_code ec) {
    deadline_ = Clock::time_point::max();
    deadline_upstream_ = nullptr;
    if (std::exchange(timed_out_, false)) return beast::error::timeout;
    return ec;
  }

  // Writes what the client socket takes now; the rest (a client not keeping up) is copied to
  // pending_, for flush_pending() to send. An error means the client is gone.
  error_code write_now(const BodyWrite& out) {
    error_code ec;
    std::size_t sent = stream_.socket().write_some(out.buffers, ec);
    if (ec == asio::error::would_block || ec == asio::error::try_again) {
      ec = {};
      sent = 0;
    }
    if (ec) return ec;
    for (const auto& b : out.buffers) {
      if (sent >= b.size()) {
        sent -= b.size();
        continue;
      }
      pending_.append(static_cast<const char*>(b.data()) + sent, b.size() - sent);
      sent = 0;
    }
    return ec;
  }
  asio::awaitable<error_code> flush_pending(Clock::duration timeout) {
    arm(timeout);
    auto [ec, n] =
        co_await asio::async_write(stream_.socket(), asio::buffer(pending_), use_nothrow);
    std::string().swap(pending_);
    co_return settle(ec);
  }

  Worker& w_;
  beast::tcp_stream stream_;
  // When the request in progress began (max: none): its record is not submitted yet.
  Clock::time_point busy_since_ = Clock::time_point::max();
  Clock::time_point deadline_ = Clock::time_point::max();
  UpstreamConn* deadline_upstream_ = nullptr;
  bool timed_out_ = false;
  beast::flat_buffer buffer_;
  std::string client_ip_;
  bool client_loopback_ = false;  // 127.0.0.0/8, ::1 (an IPv4 client of a [::] listener too)
  std::shared_ptr<HangupWatch> watch_state_ = std::make_shared<HangupWatch>();
  HangupWatch& watch_ = *watch_state_;
  bool metrics_only_ = false;              // a connection to metrics.listen
  bool aborted_ = false;                   // cut at the drain deadline
  bool counting_prompt_ = false;           // in tokenize_prompt(): the response has ended
  bool only_count_cut_ = false;            // abort() came while counting_prompt_
  UpstreamConn* tokenize_conn_ = nullptr;  // the /tokenize call's connection while it runs
  bool idle_ = false;
  bool idle_keepalive_ = false;  // idle_ after a request (not the wait for a first one)
  bool reclaimed_ = false;       // closed to make room at server.max_connections
  Clock::time_point idle_since_{};
  std::string pending_;  // relayed bytes a slow client has not taken yet (see write_now)
  // The answer the gateway itself gives, built here rather than in a local of the coroutine:
  // GCC gives every local of every branch its own place in the frame, held for the request.
  Reply reply_;
};

void Worker::begin_drain() {
  error_code ec;
  acceptor.close(ec);
  if (metrics_acceptor) metrics_acceptor->close(ec);
  for (auto* s : sessions) s->cancel_if_idle();
  for (auto& list : cur->idle) {
    for (auto& c : list) c->close();
    list.clear();
  }
}

asio::awaitable<void> ClientSession::run() {
  tune_socket(stream_.socket());
  error_code nbec;
  stream_.socket().non_blocking(true, nbec);  // write_now(): writes that never wait
  for (bool first = true;; first = false) {
    if (w_.shared.draining.load(std::memory_order_relaxed)) break;
    stop_watch();
    // Keep-alive idle wait: the first bytes of the next request. A new connection gets
    // client_header for its first byte, as for the rest of its request: one that never sends
    // anything must not hold a connection slot for the whole keep-alive time.
    if (buffer_.size() == 0) {
      idle_ = true;
      idle_keepalive_ = !first;
      idle_since_ = Clock::now();
      arm(first ? w_.cfg().timeouts.client_header : w_.cfg().timeouts.keepalive);
      auto [ec, n] = co_await stream_.socket().async_read_some(buffer_.prepare(4096), use_nothrow);
      idle_ = false;
      if (reclaimed_) {
        if (ec == asio::error::operation_aborted) {
          ++w_.metrics.idle_reclaimed;
        } else {
          reclaimed_ = false;  // the request had arrived: served, and the place not given up
        }
      }
      if (settle(ec)) break;
      buffer_.commit(n);
    }
    bool keep_alive = co_await handle_request();
    if (!keep_alive) break;
  }
  // Lingering close: a client may still be sending (a refused body, a pipelined request).
  // Closing with unread bytes makes the kernel answer with RST, which can destroy our last
  // response before the client has read it; so half-close, then drain briefly until EOF.
  stop_watch();
  error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  if (!ec && stream_.socket().is_open() && !reclaimed_) {
    // A client uploading a refused body writes all of it before it reads the answer: drain
    // until EOF, for kLingerTime in all and kLingerIdle without a byte (an idle keep-alive
    // client closes after that), kLingerBytes at most.
    const auto until = Clock::now() + kLingerTime;
    std::size_t drained = 0;
    while (drained < kLingerBytes) {
      buffer_.clear();
      stream_.expires_at(std::min(until, Clock::now() + kLingerIdle));
      auto [rec, n] = co_await stream_.async_read_some(buffer_.prepare(kLingerRead), use_nothrow);
      if (rec) break;
      drained += n;
    }
  }
  stream_.close();
}

void ClientSession::log(RequestContext& ctx) {
  // The one place every request passes exactly once: metrics, the usage record, the access log.
  // Cut by the gateway at the drain deadline, unless the response had ended (only its /tokenize
  // count was cut).
  if (aborted_ && !only_count_cut_) ctx.finish = "timeout";
  const int backend = ctx.backend ? ctx.backend->metric_id() : metrics::kNoBackend;
  const double duration_ms =
      std::chrono::duration<double, std::milli>(
          (ctx.end == Clock::time_point{} ? Clock::now() : ctx.end) - ctx.start)
          .count();
  w_.metrics.request(ctx.route, ctx.info.stream, backend, ctx.status, duration_ms);
  if (ctx.finish == "client_disconnected") ++w_.metrics.client_disconnects;
  if (const double ttft = ctx.ttft_ms(); ctx.backend && ttft >= 0) w_.metrics.ttft(backend, ttft);
  if (w_.log.enabled()) access_log(ctx, duration_ms);
  // Last: the record views the context's strings, whose bytes the pipeline copies.
  if (ctx.metered && ctx.forwarded) submit_usage(ctx, duration_ms);
}

void ClientSession::access_log(const RequestContext& ctx, double duration_ms) {
  AccessEntry e;
  e.request_id = ctx.request_id;
  e.client = client_ip_;
  e.method = ctx.method;
  e.path = ctx.path;
  e.model = ctx.info.model;
  e.stream = ctx.info.stream;
  e.backend = ctx.backend ? std::string_view(ctx.backend->name()) : std::string_view("none");
  e.status = ctx.status;
  e.bytes_in = ctx.bytes_in;
  e.bytes_out = ctx.bytes_out;
  e.duration_ms = duration_ms;
  e.ttfb_ms = ctx.ttfb_ms;
  e.attempts = ctx.attempts;
  e.finish = ctx.finish;
  w_.log.write(e);
}

// The Date field of the gateway's own answers (RFC 9110 6.6.1), IMF-fixdate, formatted once a
// second per thread. Relayed answers keep the backend's.
std::string_view http_date_now() {
  thread_local std::time_t formatted = -1;
  thread_local std::string text;
  const std::time_t now = std::time(nullptr);
  if (now != formatted) {
    std::tm t{};
    gmtime_r(&now, &t);
    text = fmt::format("{:%a, %d %b %Y %H:%M:%S} GMT", t);
    formatted = now;
  }
  return text;
}

asio::awaitable<bool> ClientSession::send(RequestContext& ctx, Reply& reply) {
  bhttp::response<bhttp::string_body> res{static_cast<bhttp::status>(reply.status), 11};
  res.set(bhttp::field::date, http_date_now());
  res.set(bhttp::field::content_type, reply.content_type);
  if (!ctx.request_id.empty()) res.set("X-Request-Id", ctx.request_id);
  if (!reply.allow.empty()) res.set(bhttp::field::allow, reply.allow);
  if (reply.retry_after > 0) res.set(bhttp::field::retry_after, std::to_string(reply.retry_after));
  if (!reply.www_authenticate.empty())
    res.set(bhttp::field::www_authenticate, reply.www_authenticate);
  bool keep_alive = reply.keep_alive && !w_.shared.draining.load(std::memory_order_relaxed);
  res.keep_alive(keep_alive);
  // An HTTP/1.0 client assumes the connection closes unless the answer says otherwise.
  if (keep_alive && ctx.client_version < 11) res.set(bhttp::field::connection, "keep-alive");
  res.body() = std::move(reply.body);
  res.prepare_payload();
  // The answer to HEAD is the header alone, with the length the body would have: a body after
  // it would be read as the start of the next response on this connection.
  if (ctx.method == "HEAD") res.body().clear();
  ctx.status = reply.status;
  ctx.bytes_out = res.body().size();
  arm(w_.cfg().timeouts.stream_idle);
  auto [wec, n] = co_await bhttp::async_write(stream_.socket(), res, use_nothrow);
  if (settle(wec)) {
    ctx.finish = "client_disconnected";
    keep_alive = false;
  }
  log(ctx);
  co_return keep_alive;
}

std::string ClientSession::health_body(bool ready_check) const {
  const auto& set = w_.cur->gen->backends;
  std::string out = ready_check ? R"({"status":"ready")" : R"({"status":"ok")";
  out += fmt::format(R"(,"draining":{},"backends":{{"total":{},"healthy":{}}},"backend_status":[)",
                     w_.shared.draining.load(), set.size(), set.healthy_count());
  for (std::size_t i = 0; i < set.size(); ++i) {
    const auto& b = set[i];
    if (i) out += ',';
    out += R"({"name":")";
    http::append_json_escaped(out, b.name());
    out += fmt::format(R"(","healthy":{},"in_flight":{}}})", b.healthy(), b.in_flight());
  }
  out += "]}";
  return out;
}

// Open client connections of the whole process. The limit is the process's, not a share per
// worker: the kernel spreads connections over the workers' SO_REUSEPORT listeners by hash, not
// evenly, so a per-worker share left clients waiting in a full worker's backlog while another
// had room.
std::int64_t open_connections(const Shared& shared) {
  std::int64_t n = 0;
  for (const Worker* other : shared.workers)
    n += other->connections.load(std::memory_order_relaxed);
  return n;
}

asio::awaitable<metrics::WorkerMetrics> copy_metrics(Worker* w) {
  co_return w->metrics;
}

// Every worker copies its own metrics on its own thread (a message through its event loop),
// so the request path never synchronises with a scrape.
asio::awaitable<metrics::WorkerMetrics> ClientSession::merged_metrics() {
  metrics::WorkerMetrics merged(w_.cur->gen->labels);
  for (Worker* other : w_.shared.workers) {
    if (other == &w_) {
      merged.merge(w_.metrics);
    } else {
      auto op = asio::co_spawn(other->ioc, copy_metrics(other), asio::use_awaitable);
      metrics::WorkerMetrics copy = co_await std::move(op);
      merged.merge(copy);
    }
  }
  co_return merged;
}

asio::awaitable<std::string> ClientSession::metrics_body() {
  // Awaited into a named local first (GCC 12 mishandles co_await inside an initializer list).
  metrics::WorkerMetrics merged = co_await merged_metrics();
  const auto gen = w_.cur->gen;  // after the await: the generation now running
  const auto& set = gen->backends;
  metrics::Snapshot snap;
  snap.requests = std::move(merged);
  snap.open_connections = open_connections(w_.shared);
  snap.request_body_bytes = w_.shared.body_bytes.load(std::memory_order_relaxed);
  snap.access_log_dropped = log::stdout_lines().dropped();
  snap.process_log_dropped = log::stderr_lines().dropped();
  for (auto& name : w_.shared.labels.names()) {
    snap.backends.push_back({std::move(name), false, 0, false});
  }
  for (std::size_t i = 0; i < set.size(); ++i) {
    auto id = static_cast<std::size_t>(set[i].metric_id());
    if (id >= snap.backends.size()) continue;
    snap.backends[id] = {set[i].name(), set[i].healthy(), set[i].in_flight(), true};
  }
  snap.reloads.ok = w_.shared.reloads_ok.load();
  snap.reloads.failed = w_.shared.reloads_failed.load();
  snap.reloads.generation = w_.shared.live_generation.load();
  if (w_.shared.usage) snap.usage = w_.shared.usage->stats();
  co_return metrics::render(snap);
}

asio::awaitable<std::string> ClientSession::admin_backends_body() {
  metrics::WorkerMetrics m = co_await merged_metrics();
  const auto gen = w_.cur->gen;
  const auto& set = gen->backends;
  std::string out = R"({"backends":[)";
  for (std::size_t i = 0; i < set.size(); ++i) {
    const lb::Backend& b = set[i];
    if (i > 0) out += ',';
    out += R"({"name":")";
    http::append_json_escaped(out, b.name());
    out += R"(","url":")";
    http::append_json_escaped(out, b.config().url);
    const int id = b.metric_id();
    const std::uint64_t n = m.requests_to(id);
    const double sum = static_cast<std::size_t>(id) < m.backend_duration_sum_ms.size()
                           ? m.backend_duration_sum_ms[static_cast<std::size_t>(id)]
                           : 0.0;
    const double avg = n ? sum / static_cast<double>(n) : 0.0;
    const std::int64_t last = b.last_check_unix_ms();
    out += fmt::format(R"(","weight":{},"healthy":{},"in_flight":{},"consecutive_failures":{},)"
                       R"("last_check":{},"requests":{},"latency_avg_ms":{:.3f},"models":[)",
                       b.weight(), b.healthy(), b.in_flight(), b.consecutive_failures(),
                       last > 0 ? "\"" + usage::rfc3339(last) + "\"" : std::string("null"), n, avg);
    const auto models = b.lists_models() ? b.config().models : b.discovered_models();
    for (std::size_t k = 0; k < models.size(); ++k) {
      out += k ? ",\"" : "\"";
      http::append_json_escaped(out, models[k]);
      out += '"';
    }
    out += fmt::format(R"(],"models_source":"{}"}})", b.lists_models() ? "config" : "discovered");
  }
  out += "]}";
  co_return out;
}

std::vector<std::pair<std::string, std::string>> ClientSession::served_models() const {
  const auto& set = w_.cur->gen->backends;
  std::vector<std::pair<std::string, std::string>> models;  // id, owner
  for (std::size_t i = 0; i < set.size(); ++i) {
    const auto& b = set[i];
    if (!b.healthy()) continue;
    auto list = b.lists_models() ? b.config().models : b.discovered_models();
    for (auto& m : list) {
      bool seen = false;
      for (auto& [id, owner] : models) seen = seen || id == m;
      if (!seen) models.emplace_back(std::move(m), b.name());
    }
  }
  return models;
}

namespace {
// One model object of the OpenAI API.
void append_model(std::string& out, std::string_view id, std::string_view owner) {
  out += R"({"id":")";
  http::append_json_escaped(out, id);
  out += R"(","object":"model","created":0,"owned_by":")";
  http::append_json_escaped(out, owner);
  out += "\"}";
}

// A path segment with its percent-encoding undone (the SDKs encode the '/' of ids like
// org/model); nullopt when an escape is malformed.
std::optional<std::string> percent_decoded(std::string_view s) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out += s[i];
      continue;
    }
    if (i + 2 >= s.size()) return std::nullopt;
    const int hi = hex(s[i + 1]), lo = hex(s[i + 2]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return out;
}
}  // namespace

std::string ClientSession::models_body() const {
  const auto models = served_models();
  std::string out = R"({"object":"list","data":[)";
  for (std::size_t i = 0; i < models.size(); ++i) {
    if (i) out += ',';
    append_model(out, models[i].first, models[i].second);
  }
  out += "]}";
  return out;
}

ClientSession::Reply ClientSession::model_reply(std::string_view encoded_id,
                                                bool keep_alive) const {
  if (auto id = percent_decoded(encoded_id)) {
    for (const auto& [model, owner] : served_models()) {
      if (model != *id) continue;
      Reply r{200, {}, keep_alive, {}};
      append_model(r.body, model, owner);
      return r;
    }
  }
  return error_reply(http::errors::model_not_found,
                     fmt::format("The model '{}' does not exist or no backend serves it.",
                                 encoded_id.substr(0, 200)),
                     keep_alive);
}

// Do `bytes` (the end of an event stream) end with a blank line, so between two events? Lines
// end in \n, \r\n or \r; a final \r may yet be followed by its \n, which changes nothing.
bool ends_with_blank_line(std::string_view bytes) {
  if (bytes.ends_with("\r\n")) {
    bytes.remove_suffix(2);
  } else if (bytes.ends_with('\n') || bytes.ends_with('\r')) {
    bytes.remove_suffix(1);
  } else {
    return false;
  }
  return bytes.ends_with('\n') || bytes.ends_with('\r');
}

// Do `bytes` (the end of an event stream, or all of it) end with an event of its own that is a
// `data: [DONE]` line, terminated or not: after a blank line, or at the start?
bool ends_with_done_line(std::string_view bytes) {
  while (bytes.ends_with('\n') || bytes.ends_with('\r')) bytes.remove_suffix(1);
  if (!bytes.ends_with("[DONE]")) return false;
  bytes.remove_suffix(6);
  if (bytes.ends_with(' ')) bytes.remove_suffix(1);
  if (!bytes.ends_with("data:")) return false;
  bytes.remove_suffix(5);
  return bytes.empty() || ends_with_blank_line(bytes);
}

// The last bytes relayed of an event stream, kept in place (no allocation, a few bytes copied per
// write): enough for ends_with_blank_line() and ends_with_done_line() once the relay is over.
class StreamTail {
 public:
  void push(std::string_view piece) {
    if (piece.size() >= kSize) {
      std::memcpy(bytes_.data(), piece.data() + piece.size() - kSize, kSize);
      size_ = kSize;
      return;
    }
    const std::size_t keep = std::min(size_, kSize - piece.size());
    std::memmove(bytes_.data(), bytes_.data() + size_ - keep, keep);
    std::memcpy(bytes_.data() + keep, piece.data(), piece.size());
    size_ = keep + piece.size();
  }
  std::string_view view() const { return {bytes_.data(), size_}; }

 private:
  static constexpr std::size_t kSize = 24;  // "\r\n\r\ndata: [DONE]\r\n" and bytes to spare
  std::array<char, kSize> bytes_{};
  std::size_t size_ = 0;
};

// Caps a buffer's size while it lives (reads into it then fail with buffer_overflow).
class BufferBound {
 public:
  BufferBound(beast::flat_buffer& buffer, std::size_t limit)
      : buffer_(buffer), previous_(buffer.max_size()) {
    buffer_.max_size(limit);
  }
  ~BufferBound() { buffer_.max_size(previous_); }
  BufferBound(const BufferBound&) = delete;
  BufferBound& operator=(const BufferBound&) = delete;

 private:
  beast::flat_buffer& buffer_;
  std::size_t previous_;
};

// Why a request's framing headers are refused (see handle_request), or empty.
std::string_view framing_problem(const RequestParser::value_type& req) {
  if (const auto codings = req.count(bhttp::field::transfer_encoding); codings != 0) {
    if (req.version() < 11) return "Transfer-Encoding is not allowed in an HTTP/1.0 request.";
    // The parser has taken the optional whitespace around the value off.
    if (codings != 1 || !iequals(req[bhttp::field::transfer_encoding], "chunked")) {
      return "Unsupported Transfer-Encoding; use chunked alone, or Content-Length.";
    }
  }
  if (req.version() >= 11 && req.count(bhttp::field::host) != 1) {
    return "An HTTP/1.1 request needs exactly one Host header.";
  }
  return {};
}

// The absolute form ("http://host/v1/..."), which a server must accept (RFC 9112 3.2.2), as the
// origin form every client sends otherwise: routed and forwarded by its path.
std::optional<std::string> origin_form_of(std::string_view target) {
  if (target.starts_with('/')) return std::nullopt;
  return config::origin_form(target);
}

// Well-formed UTF-8; header values are nearly always ASCII, checked a word at a time before
// simdjson's validator (whose dispatch costs more than a short id).
bool utf8(std::string_view s) {
  std::uint64_t high = 0;
  std::size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    high |= w;
  }
  for (; i < s.size(); ++i) high |= static_cast<unsigned char>(s[i]);
  return (high & 0x8080808080808080ull) == 0 || simdjson::validate_utf8(s.data(), s.size());
}

// An error of Beast's HTTP parser that the peer's bytes caused; the end of the stream before the
// message's end is the peer going away instead.
bool protocol_error(error_code ec) {
  static const auto& http_category = bhttp::make_error_code(bhttp::error::bad_chunk).category();
  return ec.category() == http_category && ec != bhttp::error::end_of_stream &&
         ec != bhttp::error::partial_message;
}

asio::awaitable<bool> ClientSession::handle_request() {
  // Busy from here until the frame ends, after the record (if any) is submitted.
  struct Busy {
    Clock::time_point& since;
    ~Busy() { since = Clock::time_point::max(); }
  } busy{busy_since_};
  RequestContext ctx;
  busy_since_ = ctx.start;
  ctx.wg = w_.cur;
  const auto& cfg = ctx.wg->gen->cfg;
  RequestParser parser;
  parser.header_limit(static_cast<std::uint32_t>(cfg.server.max_header_size));
  parser.body_limit(cfg.server.max_body_size);
  // timeouts.client_header bounds the whole request, header and body, from its first bytes: a
  // deadline re-armed per read would let a body trickled a byte at a time hold the connection.
  const auto request_deadline = ctx.start + cfg.timeouts.client_header;

  error_code hec;
  // The keep-alive wait has usually read the whole header: parsed here, with no operation.
  if (buffer_.size() > 0) {
    buffer_.consume(parser.put(buffer_.data(), hec));
    if (hec == bhttp::error::need_more) hec = {};
  }
  if (!hec && !parser.is_header_done()) {
    arm_until(request_deadline);
    auto [rhec, hn] =
        co_await bhttp::async_read_header(stream_.socket(), buffer_, parser, use_nothrow);
    hec = settle(rhec);
  }
  if (hec) {
    if (hec == bhttp::error::end_of_stream || hec == bhttp::error::partial_message ||
        hec == asio::error::operation_aborted || hec == asio::error::eof ||
        hec == asio::error::connection_reset) {
      // The client left (also in the middle of a header): nothing to answer, nothing to count.
      co_return false;
    }
    // A request refused or cut at its header: no method or path to show, unless read.
    ctx.method = "-";
    ctx.path = "-";
    ctx.request_id = w_.ids.next();
    if (hec == bhttp::error::body_limit) {
      // Content-Length over the limit is detected with the header: refuse before the body. The
      // request line has been read then (a HEAD gets the header alone), and it is counted under
      // its route, as a chunked body refused at the limit is.
      if (const std::string_view method = parser.get().method_string(); !method.empty()) {
        ctx.method = std::string(method);
      }
      const auto origin_form = origin_form_of(parser.get().target());
      const std::string_view target =
          origin_form ? std::string_view(*origin_form) : std::string_view(parser.get().target());
      if (!target.empty()) ctx.path = std::string(target.substr(0, target.find('?')));
      ctx.route = metrics::route_for_path(ctx.path);
      reply_ = error_reply(http::errors::body_too_large,
                           fmt::format("The request body is larger than the limit of {} bytes.",
                                       cfg.server.max_body_size),
                           false);
      co_await send(ctx, reply_);
    } else if (hec == bhttp::error::header_limit) {
      // A request line that does not end within the limit is a target too long (414, as RFC
      // 9112 3 and nginx answer it); otherwise the header fields are (431). The parser has taken
      // the line when it read it whole at once; when it arrived in pieces, the parser waits for
      // the header's end and the line's bytes are still in the buffer.
      const std::string_view held(static_cast<const char*>(buffer_.data().data()), buffer_.size());
      if (parser.get().target().empty() &&
          held.substr(0, cfg.server.max_header_size).find('\n') == std::string_view::npos) {
        reply_ = error_reply(http::errors::uri_too_long,
                             "The request line is longer than server.max_header_size.", false);
      } else {
        reply_ = error_reply(http::errors::headers_too_large,
                             "The request headers are larger than server.max_header_size.", false);
      }
      co_await send(ctx, reply_);
    } else if (hec == beast::error::timeout) {
      // A header still unfinished at client_header (a client trickling it): the deadline closed
      // the socket, so no answer goes out, but the cut is counted and logged as the 408 it is.
      ctx.status = 408;
      ctx.finish = "timeout";
      log(ctx);
    } else {
      reply_ = error_reply(http::errors::invalid_request,
                           "Malformed HTTP request: " + hec.message(), false);
      co_await send(ctx, reply_);
    }
    co_return false;
  }

  auto& req = parser.get();
  ctx.client_version = req.version();
  ctx.method = std::string(req.method_string());
  if (auto origin_form = origin_form_of(req.target())) req.target(*origin_form);
  std::string_view target = req.target();
  std::string_view path = target.substr(0, target.find('?'));
  ctx.path = std::string(path);
  if (auto cid = req["X-Request-Id"]; acceptable_client_request_id(cid)) {
    ctx.request_id = std::string(cid);
    ctx.client_request_id = ctx.request_id;
  } else {
    ctx.request_id = w_.ids.next();
  }
  bool keep_alive = req.keep_alive();
  if (std::string joined; keep_alive) {
    // Beast reads the first Connection field only: with several, a close in any one closes.
    connection_tokens(req.base(), joined);
    if (!joined.empty() && connection_lists(joined, "close")) keep_alive = false;
  }
  // Framing the gateway does not take, refused before any body byte is read, with the connection
  // closed after the answer (RFC 9112 6.1, 6.3), so that no body can be read as a second request:
  // - a Transfer-Encoding other than chunked alone: with another coding before chunked
  //   ("gzip, chunked") the body would be forwarded still coded, under a Content-Length;
  // - Transfer-Encoding from an HTTP/1.0 client, which cannot send it;
  // - an HTTP/1.1 request without exactly one Host (RFC 9112 3.2; nginx refuses it too).
  if (std::string_view problem = framing_problem(req); !problem.empty()) {
    reply_ = error_reply(http::errors::invalid_request, std::string(problem), false);
    co_return co_await send(ctx, reply_);
  }
  Route route = metrics::route_for_path(path);
  bool body_pending = !parser.is_done();
  ctx.route = route;
  if (metrics_only_ ? route != Route::metrics && route != Route::health && route != Route::ready
                    : route == Route::metrics && cfg.metrics.listen.has_value()) {
    // The metrics listener serves /metrics and the probes (which then still answer when client
    // connections are at server.max_connections); the main one then does not serve /metrics.
    route = Route::other;
    ctx.route = route;
  }

  if (route == Route::other) {
    {
      reply_ = error_reply(http::errors::not_found,
                           fmt::format("Unknown path {}.", ctx.path.substr(0, 200)),
                           keep_alive && !body_pending);
      co_return co_await send(ctx, reply_);
    }
  }
  bool llm_route =
      route == Route::chat || route == Route::completions || route == Route::embeddings;
  const bool post_route = llm_route || route == Route::admin_reload;
  // HEAD wherever GET is served (RFC 9110 9.3.2: uptime probes, curl -I): the same header, no
  // body (send()).
  const bool method_ok =
      post_route ? req.method() == bhttp::verb::post
                 : req.method() == bhttp::verb::get || req.method() == bhttp::verb::head;
  if (!method_ok) {
    const std::string_view allow = post_route ? "POST" : "GET, HEAD";
    reply_ = error_reply(
        http::errors::method_not_allowed,
        fmt::format("Method {} is not allowed on {}; use {}.", ctx.method, ctx.path, allow),
        keep_alive && !body_pending, allow);
    co_return co_await send(ctx, reply_);
  }
  if (route == Route::admin_backends || route == Route::admin_config ||
      route == Route::admin_reload) {
    const AdminAccess access =
        admin_access(w_.cfg().admin.token, req[bhttp::field::authorization], client_loopback_);
    if (access == AdminAccess::bad_token) {
      reply_ = error_reply(http::errors::unauthorized,
                           "The admin API needs 'Authorization: Bearer <admin.token>'.",
                           keep_alive && !body_pending);
      reply_.www_authenticate = R"(Bearer realm="llmproxy admin")";
      co_return co_await send(ctx, reply_);
    }
    if (access == AdminAccess::loopback_only) {
      reply_ = error_reply(http::errors::admin_loopback_only,
                           "Without admin.token the admin API answers clients on this host's "
                           "loopback only; set admin.token to use it from elsewhere.",
                           keep_alive && !body_pending);
      co_return co_await send(ctx, reply_);
    }
  }
  if (route == Route::admin_reload) {
    co_await handle_reload(ctx, keep_alive && !body_pending);
    co_return keep_alive && !body_pending;
  }
  if (!llm_route) {
    if (route == Route::admin_backends || route == Route::admin_config) {
      if (route == Route::admin_config) {
        reply_ = Reply{200,
                       config::to_yaml(cfg),
                       keep_alive && !body_pending,
                       {},
                       "application/yaml; charset=utf-8"};
        co_return co_await send(ctx, reply_);
      }
      std::string body = co_await admin_backends_body();
      reply_ = Reply{200, std::move(body), keep_alive && !body_pending, {}};
      co_return co_await send(ctx, reply_);
    }
    if (route == Route::metrics) {
      std::string body = co_await metrics_body();
      reply_ = Reply{200,
                     std::move(body),
                     keep_alive && !body_pending,
                     {},
                     "text/plain; version=0.0.4; charset=utf-8"};
      co_return co_await send(ctx, reply_);
    }
    if (route == Route::models) {
      if (const std::string_view list = metrics::route_label(Route::models);
          ctx.path.size() > list.size()) {
        reply_ = model_reply(std::string_view(ctx.path).substr(list.size() + 1),
                             keep_alive && !body_pending);
      } else {
        reply_ = Reply{200, models_body(), keep_alive && !body_pending, {}};
      }
      co_return co_await send(ctx, reply_);
    }
    if (route == Route::health) {
      {
        reply_ = Reply{200, health_body(false), keep_alive && !body_pending, {}};
        co_return co_await send(ctx, reply_);
      }
    }
    bool ready = ctx.wg->gen->backends.healthy_count(cfg.health_check.enabled) > 0 &&
                 !w_.shared.draining.load(std::memory_order_relaxed);
    if (ready) {
      reply_ = Reply{200, health_body(true), keep_alive && !body_pending, {}};
      co_return co_await send(ctx, reply_);
    }
    {
      const std::string_view why = w_.shared.draining ? "The gateway is shutting down."
                                   : ctx.wg->gen->backends.healthy_count() == 0
                                       ? "No healthy backend is available."
                                       : "No backend has passed a health check yet.";
      reply_ = error_reply(http::errors::no_healthy_backend, why, keep_alive && !body_pending);
      co_return co_await send(ctx, reply_);
    }
  }

  // LLM endpoints: read the whole body (bounded), with room for simdjson's padding.
  const auto len = parser.content_length();
  if (len && *len > cfg.server.max_body_size) {
    {
      reply_ = error_reply(
          http::errors::body_too_large,
          fmt::format("The request body ({} bytes) is larger than the limit of {} bytes.", *len,
                      cfg.server.max_body_size),
          false);
      co_return co_await send(ctx, reply_);
    }
  }
  // The body's room, at most: its announced length, or the limit for a chunked one.
  const std::uint64_t body_cap =
      (len ? *len : cfg.server.max_body_size) + simdjson::SIMDJSON_PADDING;
  // Expect is a list (RFC 9110 10.1.1) whose one defined member is 100-continue: a client that
  // expects anything else gets 417 before its body is read, rather than waiting for a 100 that
  // never comes. An HTTP/1.0 client cannot take a 1xx answer: its 100-continue is ignored.
  bool continue_expected = false;
  std::string_view unsupported;
  const auto unsupported_member = [&](std::string_view member) {
    if (!iequals(member, "100-continue")) unsupported = member;
    continue_expected = continue_expected || unsupported.empty();
    return !unsupported.empty();
  };
  for (auto [it, last] = req.equal_range(bhttp::field::expect); it != last; ++it) {
    if (any_member(it->value(), unsupported_member)) break;
  }
  if (!unsupported.empty()) {
    reply_ =
        error_reply(http::errors::expectation_failed,
                    fmt::format("Unsupported expectation \"{}\": only 100-continue is supported.",
                                unsupported.substr(0, 64)),
                    false);
    co_return co_await send(ctx, reply_);
  }
  if (req.version() >= 11 && continue_expected && !parser.is_done()) {
    // Room for the first read, taken before the 100 Continue invites a body.
    if (!grow_body_room(ctx, req.body(), buffer_.size() + kBodyRead, body_cap)) {
      co_return co_await refuse_body(ctx, 0);
    }
    static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
    arm_until(request_deadline);
    auto [cec, cn] =
        co_await asio::async_write(stream_.socket(), asio::buffer(kContinue), use_nothrow);
    if (settle(cec)) co_return false;
  }
  // A chunked body's trailer fields are appended to the header's by the parser: they are dropped
  // below (RFC 9110 6.5.1), never forwarded or read as Authorization, X-User-Id and the like.
  const auto header_fields =
      parser.chunked() ? static_cast<std::size_t>(std::distance(req.begin(), req.end())) : 0;
  // Bytes the parser cannot use yet are an unfinished chunk-size line or trailer section, which
  // body_limit does not count: bounded like a header (Beast's read then fails with
  // buffer_overflow), or a client could make the buffer grow without end.
  const BufferBound bound(buffer_, buffer_.size() + cfg.server.max_header_size);
  while (!parser.is_done()) {
    // What the header's read brought is parsed here; a read only when that makes no progress.
    error_code bec;
    std::size_t used = 0;
    // Room for what is buffered and one more read (Beast reads at most kBodyRead at a time).
    if (!grow_body_room(ctx, req.body(), buffer_.size() + kBodyRead, body_cap)) {
      co_return co_await refuse_body(ctx, req.body().size());
    }
    if (buffer_.size() > 0) {
      used = parser.put(buffer_.data(), bec);
      buffer_.consume(used);
      if (bec == bhttp::error::need_more) bec = {};
    }
    if (!bec && used == 0) {
      arm_until(request_deadline);
      auto [rbec, bn] =
          co_await bhttp::async_read_some(stream_.socket(), buffer_, parser, use_nothrow);
      bec = settle(rbec);
    }
    if (!bec && !fit_body_room(ctx, req.body(), body_cap)) {
      co_return co_await refuse_body(ctx, req.body().size());
    }
    if (bec == bhttp::error::buffer_overflow) {
      reply_ = error_reply(http::errors::invalid_request,
                           "Malformed HTTP request body: a chunk-size line or the trailer section "
                           "is longer than server.max_header_size.",
                           false);
      co_return co_await send(ctx, reply_);
    }
    if (bec == bhttp::error::body_limit) {
      {
        reply_ = error_reply(http::errors::body_too_large,
                             fmt::format("The request body is larger than the limit of {} bytes.",
                                         cfg.server.max_body_size),
                             false);
        co_return co_await send(ctx, reply_);
      }
    }
    if (bec && protocol_error(bec)) {
      // A body the parser rejects (a malformed chunk) is the client's error, not a hang-up.
      reply_ = error_reply(http::errors::invalid_request,
                           "Malformed HTTP request body: " + bec.message(), false);
      co_return co_await send(ctx, reply_);
    }
    if (bec) {
      // The gateway's deadline (client_header covers the body) is not the client leaving: an
      // operator who sees 408/timeout knows to raise it for slow uploads. The deadline closed
      // the socket, so no answer can go out.
      const bool deadline = bec == beast::error::timeout;
      ctx.bytes_in = req.body().size();  // what arrived before the cut
      ctx.finish = deadline ? "timeout" : "client_disconnected";
      ctx.status = deadline ? 408 : 499;  // 499: client closed the request (nginx's convention)
      log(ctx);
      co_return false;
    }
  }
  if (parser.chunked()) {
    auto field = req.begin();
    std::advance(field, header_fields);
    while (field != req.end()) field = req.erase(field);
  }
  ctx.bytes_in = req.body().size();

  auto endpoint = route == Route::chat          ? llm::Endpoint::chat_completions
                  : route == Route::completions ? llm::Endpoint::completions
                                                : llm::Endpoint::embeddings;
  llm::InspectError ierr;
  const auto& body = req.body();
  bool padded = body.capacity() >= body.size() + simdjson::SIMDJSON_PADDING;
  if (!w_.inspector.inspect(endpoint, body, padded, ctx.info, ierr,
                            /*count_text=*/w_.shared.usage != nullptr)) {
    {
      reply_ = error_reply(ierr.spec, ierr.message, keep_alive, {}, ierr.param);
      co_return co_await send(ctx, reply_);
    }
  }
  if (usage::Pipeline* pipeline = w_.shared.usage) {
    // Serving what cannot be metered would give tokens away: refuse until the log catches up.
    if (!pipeline->accepting()) {
      ++w_.metrics.usage_backlog_rejects;
      reply_ = error_reply(http::errors::usage_backlog,
                           "The gateway cannot record usage right now (usage backlog "
                           "full); retry shortly.",
                           keep_alive);
      reply_.retry_after = 1;
      co_return co_await send(ctx, reply_);
    }
    const auto& ucfg = cfg.usage;
    // One pass over the header for the three fields metering reads (the first of each, as
    // req[name] would give), instead of three lookups.
    std::string_view user, authorization, x_api_key;
    bool have_user = false, have_authorization = false, have_x_api_key = false;
    const std::string_view user_header = ucfg.user_header;
    for (const auto& f : req) {
      const std::string_view name = f.name_string();
      if (!have_user && !user_header.empty() && name.size() == user_header.size() &&
          beast::iequals(name, user_header)) {
        user = f.value();
        have_user = true;
      }
      if (f.name() == bhttp::field::authorization) {
        if (!have_authorization) authorization = f.value();
        have_authorization = true;
      } else if (!have_x_api_key && name.size() == 9 && beast::iequals(name, "X-API-Key")) {
        x_api_key = f.value();
        have_x_api_key = true;
      }
    }
    // Every record keeps these until delivery (and the log for retention_days): bounded as the
    // body's `user` is, refused rather than cut (two callers must not become one). A key is kept
    // whole only with api_key: full; JWTs run past 1 KiB, so it gets 4 KiB.
    const std::string_view key = usage::api_key_from_headers(authorization, x_api_key);
    const std::size_t key_limit =
        ucfg.api_key == config::ApiKeyMode::full ? kMaxStoredKeyBytes : SIZE_MAX;
    const std::string_view key_header = key.data() == x_api_key.data() && !x_api_key.empty()
                                            ? std::string_view("X-API-Key")
                                            : std::string_view("Authorization");
    if (user.size() > llm::kMaxIdentifierBytes || key.size() > key_limit) {
      const bool of_user = user.size() > llm::kMaxIdentifierBytes;
      reply_ = error_reply(
          http::errors::string_too_long,
          fmt::format("Invalid '{}' header: too long for the usage record. Expected at most {} "
                      "bytes, but got {}.",
                      of_user ? user_header : key_header,
                      of_user ? llm::kMaxIdentifierBytes : key_limit,
                      of_user ? user.size() : key.size()),
          keep_alive);
      co_return co_await send(ctx, reply_);
    }
    // The record is JSON: bytes that are not UTF-8 would become U+FFFD there, and "mallory\xff"
    // and "mallory\xfe" one user. A hashed key keeps its bytes; a masked one is lossy anyway.
    const bool bad_user = !utf8(user);
    if (bad_user || (ucfg.api_key == config::ApiKeyMode::full && !utf8(key))) {
      reply_ = error_reply(
          http::errors::invalid_request,
          fmt::format("Invalid '{}' header: not valid UTF-8, so the usage record cannot hold it "
                      "as sent.",
                      bad_user ? user_header : key_header),
          keep_alive);
      co_return co_await send(ctx, reply_);
    }
    ctx.metered = true;
    ctx.endpoint = endpoint;
    ctx.user_id = user.empty() ? std::move(ctx.info.user) : std::string(user);
    ctx.api_key = usage::present_api_key(key, ucfg.api_key);
    if (ucfg.inject_stream_usage && ctx.info.stream && !ctx.info.include_usage &&
        endpoint != llm::Endpoint::embeddings) {
      if (auto rewritten = llm::with_include_usage(body, ctx.info.has_stream_options,
                                                   ctx.info.continuous_usage, w_.usage_parser)) {
        req.body() = std::move(*rewritten);
        // continuous_usage_stats alone asked for usage (vLLM's reading): nothing is removed, so
        // the client gets from every backend what vLLM would have sent it.
        ctx.injected = !ctx.info.continuous_usage;
      }
    }
  }
  co_return co_await proxy(req, ctx, keep_alive);
}

asio::awaitable<ReloadResult> reload_on_control(Shared* shared) {
  co_return shared->reload();
}
asio::awaitable<void> worker_barrier() {
  co_return;
}

// POST /admin/reload: the reload runs on the control thread (as for SIGHUP); the answer waits
// until every worker has switched, so a request sent after it uses the new configuration.
asio::awaitable<void> ClientSession::handle_reload(RequestContext& ctx, bool keep_alive) {
  auto op = asio::co_spawn(*w_.shared.control, reload_on_control(&w_.shared), asio::use_awaitable);
  ReloadResult result = co_await std::move(op);
  if (result.ok) {
    for (Worker* other : w_.shared.workers) {
      auto sync = asio::co_spawn(other->ioc, worker_barrier(), asio::use_awaitable);
      co_await std::move(sync);
    }
    std::string body = fmt::format(R"({{"status":"ok","generation":{},"backends":{},"warnings":[)",
                                   result.generation, result.backends);
    for (std::size_t i = 0; i < result.warnings.size(); ++i) {
      body += i ? ",\"" : "\"";
      http::append_json_escaped(body, result.warnings[i]);
      body += '"';
    }
    body += "]}";
    reply_ = Reply{200, std::move(body), keep_alive, {}};
    co_await send(ctx, reply_);
    co_return;
  }
  std::string message = result.not_applied
                            ? "The configuration could not be applied; nothing was changed: "
                            : "The configuration file is invalid; nothing was changed: ";
  for (std::size_t i = 0; i < result.problems.size(); ++i) {
    if (i) message += "; ";
    message += result.problems[i];
  }
  reply_ =
      error_reply(result.not_applied ? http::errors::reload_failed : http::errors::invalid_config,
                  message, keep_alive);
  co_await send(ctx, reply_);
}

void ClientSession::arm_watch() {
  watch_.client_gone = false;
  watch_.upstream = nullptr;
  watch_.keep_upstream = false;
  watch_.armed = true;
  // The peek itself starts at the worker's next sweep (watch_tick()): most requests end before
  // it, and a peek started now would cost a recv that finds nothing (Asio tries every read at
  // once). A hang-up is so noticed within one sweep interval (kDeadlineSweep or less).
}

void ClientSession::watch_tick() {
  if (!watch_.armed || watch_.pending || watch_.client_gone) return;
  // A socket the deadline sweep just closed (a client too slow to read) is not a hang-up.
  if (timed_out_ || !stream_.socket().is_open()) return;
  watch_.pending = true;
  // A one-byte peek rather than a readiness wait: Asio queues a read without touching epoll
  // (the socket is registered edge-triggered once), where each readiness wait costs an
  // epoll_ctl. stop_watch() cancels it before the next read of the connection.
  auto on_peek = [watch = watch_state_](error_code ec, std::size_t n) {
    watch->pending = false;
    if (ec == asio::error::operation_aborted || !watch->armed) return;
    if (ec || n == 0) {  // end of stream or an error: the client is gone
      watch->client_gone = true;
      if (watch->upstream && !watch->keep_upstream) watch->upstream->close();
    } else {
      // A byte (a pipelined request): the watch ends; a hang-up is then seen on write.
      watch->armed = false;
    }
  };
  stream_.socket().async_receive(asio::buffer(&watch_.peek, 1), tcp::socket::message_peek,
                                 std::move(on_peek));
}

void ClientSession::disarm_watch() {
  watch_.armed = false;
  watch_.upstream = nullptr;
}

void ClientSession::stop_watch() {
  disarm_watch();
  if (!watch_.pending) return;
  error_code ec;
  stream_.socket().cancel(ec);  // only the peek is queued on the client socket now
}

void ClientSession::record_passive(const config::HealthCheck& hc, lb::Backend& backend, bool ok) {
  // Passive results only feed health when active checks run: they alone can bring a
  // backend back, so without them a passive "down" would be permanent. `hc` is the request's
  // generation's; a reload since may have turned the checks off (health_checks_on).
  if (!hc.enabled || !backend.health_checks_on()) return;
  if (ok) {
    // An answer to a request sent before the backend went down ends a run of failures, but
    // only the active checks bring a down backend back (healthy_threshold passed checks).
    if (backend.consecutive_failures() != 0) backend.record_passive_success();
  } else if (backend.record_failure(hc.unhealthy_threshold)) {
    if (!backend.health_checks_on()) {
      backend.reset_health();  // a reload turned the checks off while this failure was counted
      return;
    }
    log::line("warn", "backend {} marked unhealthy after {} consecutive failures", backend.name(),
              backend.consecutive_failures());
  }
}

// ---------------------------------------------------------------------------------------------
// Metering.

RequestContext::BodyUsage ClientSession::read_body(RequestContext& ctx, std::string_view body,
                                                   bool whole) {
  RequestContext::BodyUsage b;
  b.reported = llm::read_body_usage(body, w_.usage_parser, b.usage, b.content, whole);
  // Only a whole body is an error report: a part of one may only quote one.
  b.error = whole && !b.reported && llm::body_reports_error(body, w_.usage_parser);
  if (whole && ctx.info.model.empty()) ctx.answer_model = llm::body_model(body);
  return b;
}

void ClientSession::resolve_usage(RequestContext& ctx) {
  if (ctx.usage_resolved) return;
  ctx.usage_resolved = true;
  llm::Usage u;
  llm::TextCount content;
  bool reported = false;
  bool error_body = false;  // a whole non-stream body that is an error report (2xx or not)
  if (ctx.meter) {
    u = ctx.meter->tracker().usage();
    reported = u.reported();
    content = ctx.meter->tracker().content_text();
    if (ctx.info.model.empty()) ctx.answer_model = ctx.meter->tracker().model();
  } else {
    if (!ctx.body_usage && !ctx.body_copy.empty()) {
      auto& b = ctx.body_usage.emplace(read_body(ctx, ctx.body_copy, ctx.body_copy_complete));
      // A body over the copy limit whose usage was not in its tail: the last usage key that
      // passed, then its head (the tail's text stays the estimate).
      for (const std::string* part : {&ctx.body_mid, &ctx.body_head}) {
        if (b.reported || part->empty()) continue;
        llm::TextCount part_content;
        b.reported = llm::read_body_usage(*part, w_.usage_parser, b.usage, part_content);
      }
    }
    if (ctx.body_usage) {
      reported = ctx.body_usage->reported;
      error_body = ctx.body_usage->error;
      u = ctx.body_usage->usage;
      content = ctx.body_usage->content;
    }
    // A large body: its head, else its tail.
    if (ctx.answer_model.empty() && ctx.info.model.empty() && !ctx.body_copy_complete) {
      ctx.answer_model = llm::body_model(ctx.body_head);
      if (ctx.answer_model.empty()) ctx.answer_model = llm::body_model(ctx.body_copy, true);
    }
  }
  ctx.body_copy.clear();
  ctx.body_copy.shrink_to_fit();
  ctx.copy_ticket.shrink(0);
  std::string().swap(ctx.body_head);
  std::string().swap(ctx.body_mid);
  const auto& info = ctx.info;
  const std::int64_t prompt_estimate = llm::estimate_prompt_tokens(info);
  const std::int64_t completion_estimate =
      ctx.endpoint == llm::Endpoint::embeddings ? 0 : content.tokens();
  if (reported) {
    // Embeddings generate nothing: their missing completion count is a known 0, not an estimate.
    if (ctx.endpoint == llm::Endpoint::embeddings && u.completion_tokens < 0) {
      u.completion_tokens = 0;
    }
    // A report with a count missing: that count from the estimate, and the record says so.
    ctx.estimated = llm::complete_usage(u, prompt_estimate, completion_estimate);
    ctx.usage = u;
    return;
  }
  ctx.estimated = true;
  // A request the gateway cut at its drain deadline before any of the answer's content (no
  // answer yet, or a stream's headers only) was ended by the gateway, not by its client: billed
  // like one the backend failed. So is a stream that failed or went silent before its first
  // content: vLLM, TGI and llama.cpp send a stream's 200 header before queueing and prefill, so
  // a backend that crashes, rejects the prompt (TGI's error event) or hangs there answers 200.
  const bool cut_before_content =
      content.empty() &&
      (aborted_ || (ctx.meter && (ctx.finish == "upstream_error" || ctx.finish == "timeout")));
  // Some servers answer an error with 200: that body, without usage, is billed as an error
  // status is, and the record says the response did not complete.
  const bool ok_status = ctx.upstream_status >= 200 && ctx.upstream_status < 300;
  if (error_body && ok_status && ctx.finish == "completed") ctx.finish = "upstream_error";
  const bool backend_failed =
      cut_before_content || error_body ||
      (ctx.upstream_answered ? (ctx.upstream_status < 200 || ctx.upstream_status >= 300)
                             : ctx.finish != "client_disconnected");
  if (backend_failed) {
    // The backend refused or failed the request (an error status, or no answer: the client got
    // 502/504) and reported nothing: nothing is billed; the record still says what happened.
    ctx.usage.prompt_tokens = ctx.usage.completion_tokens = ctx.usage.total_tokens = 0;
    return;
  }
  ctx.usage.prompt_tokens = prompt_estimate;
  ctx.usage.completion_tokens = completion_estimate;
  ctx.usage.total_tokens = ctx.usage.prompt_tokens + ctx.usage.completion_tokens;
  ctx.prompt_estimated = true;
}

bool ClientSession::wants_tokenize(RequestContext& ctx) {
  if (!ctx.metered || !ctx.forwarded) return false;
  resolve_usage(ctx);
  if (ctx.prompt_estimated && !ctx.retained_body.empty() && ctx.sent_to &&
      ctx.endpoint != llm::Endpoint::embeddings && ctx.wg->gen->cfg.usage.tokenize &&
      !ctx.sent_to->tokenize_unsupported()) {
    return true;
  }
  drop_retained(ctx);
  return false;
}

asio::awaitable<void> ClientSession::tokenize_prompt(RequestContext& ctx, bool client_keep_alive,
                                                     std::string_view authorization) {
  // The request ends here for the client and for the metrics; a body that ends with the
  // connection ends now, not after the /tokenize round trip.
  ctx.end = Clock::now();
  if (!client_keep_alive) {
    error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  }
  counting_prompt_ = true;
  std::int64_t n = co_await tokenize(*ctx.sent_to, ctx, authorization);
  counting_prompt_ = false;
  // 0 is no answer: llama.cpp's /tokenize reads `content` and answers [] to other shapes.
  if (n > 0) {
    ctx.usage.prompt_tokens = n;
    ctx.usage.total_tokens = n + ctx.usage.completion_tokens;
    ctx.prompt_estimated = false;
  }
  drop_retained(ctx);
}

// POST {base}/tokenize with the request's model and messages and tools (chat) or prompt
// (completions), as vLLM's and the mock's /tokenize take them; the answer's `count`, else the
// length of its `tokens`. -1 when the backend has no such endpoint or does not answer in time.
asio::awaitable<std::int64_t> ClientSession::tokenize(const lb::Backend& backend,
                                                      const RequestContext& ctx,
                                                      std::string_view authorization) {
  const auto& gen = *ctx.wg->gen;
  const auto& cfg = gen.cfg;
  std::string body;
  {
    // A padded copy, freed with this block (a session member would keep it for the connection).
    std::string padded;
    padded.reserve(ctx.retained_body.size() + simdjson::SIMDJSON_PADDING);
    padded.assign(ctx.retained_body);
    simdjson::dom::object doc;
    if (w_.usage_parser.parse(padded.data(), padded.size(), false).get_object().get(doc)) {
      co_return -1;
    }
    const bool chat = ctx.endpoint == llm::Endpoint::chat_completions;
    // The last of each key, as the backend reads a repeated one (simdjson's lookup finds the
    // first: a short first copy would have the long prompt the backend ran counted short).
    const std::string_view prompt_key = chat ? "messages" : "prompt";
    std::optional<simdjson::dom::element> prompt;
    std::optional<simdjson::dom::array> tools, functions;
    for (auto field : doc) {
      simdjson::dom::array defs;
      if (field.key == prompt_key) {
        prompt = field.value;
      } else if (chat && (field.key == "tools" || field.key == "functions")) {
        auto& slot = field.key == "tools" ? tools : functions;
        if (field.value.get_array().get(defs)) {
          slot.reset();
        } else {
          slot = defs;
        }
      }
    }
    if (!prompt) co_return -1;
    body = "{\"model\":\"";
    http::append_json_escaped(body, ctx.info.model);
    body += chat ? "\",\"messages\":" : "\",\"prompt\":";
    body += simdjson::minify(*prompt);
    // The tool definitions too: vLLM's chat /tokenize renders them into the template, as the
    // request itself did (the legacy `functions` go along for a server that reads them).
    for (auto [key, defs] : {std::pair{"tools", &tools}, std::pair{"functions", &functions}}) {
      if (!*defs) continue;
      body += ",\"";
      body += key;
      body += "\":";
      body += simdjson::minify(**defs);
    }
    body += '}';
  }
  // The answer lists at most one token per byte of the question, each id written in at most 8
  // bytes: a larger one is no answer to it (a count the size of the question's, which is
  // counted under server.max_body_memory while kept).
  const std::uint64_t answer_limit =
      std::min<std::uint64_t>(kTokenizeAnswerMax, 8 * body.size() + 64 * 1024);
  // A connection of its own, closed afterwards: this rare call never touches the pool. The drain
  // deadline's abort() closes it (its connect is bounded by timeouts.connect, which the grace
  // after the cut outlasts): the record is logged with the local estimate.
  if (aborted_) co_return -1;
  auto cr = co_await connect_backend(w_.ioc.get_executor(), w_.shared, gen, backend,
                                     cfg.timeouts.connect);
  if (!cr.conn || aborted_) co_return -1;
  std::unique_ptr<UpstreamConn> conn = std::move(cr.conn);
  struct Unregister {
    UpstreamConn*& registered;
    ~Unregister() { registered = nullptr; }
  } unregister{tokenize_conn_};
  tokenize_conn_ = conn.get();
  const auto& url = backend.config().parsed;
  bhttp::request<bhttp::string_body> req{bhttp::verb::post, url.base_path + "/tokenize", 11};
  req.set(bhttp::field::host, url.authority());
  req.set(bhttp::field::content_type, "application/json");
  req.set(bhttp::field::user_agent, "llmproxy-metering");
  if (!authorization.empty()) req.set(bhttp::field::authorization, authorization);
  req.keep_alive(false);
  req.body() = std::move(body);
  req.prepare_payload();
  conn->tcp().expires_after(cfg.health_check.timeout + cfg.timeouts.connect);
  auto [wec, wn] = co_await upstream_write(*conn, req);
  if (wec) {
    conn->close();
    co_return -1;
  }
  std::optional<bhttp::response_parser<bhttp::string_body>> parser;
  BodyTicket answer_room;
  for (int interim = 0; interim < 8; ++interim) {  // 1xx answers come before the final one
    parser.emplace();
    parser->body_limit(answer_limit);
    auto [hec, hn] = co_await upstream_read_header(*conn, *parser);
    if (hec) {
      conn->close();
      co_return -1;
    }
    if (parser->get().result_int() < 200) continue;
    // The answer's room held under server.max_body_memory (its length, which the parser has
    // checked against the limit; a chunked one grows to up to twice the limit): past that bound
    // the prompt is estimated.
    if (!hold(answer_room, parser->content_length().value_or(2 * answer_limit))) {
      conn->close();
      co_return -1;
    }
    auto [rec, rn] = co_await upstream_read(*conn, *parser);
    if (rec) {
      conn->close();
      co_return -1;
    }
    break;
  }
  conn->close();
  auto& rp = *parser;
  const unsigned status = rp.get().result_int();
  if (status == 404 || status == 405 || status == 501) {
    backend.set_tokenize_unsupported();
  }
  co_return status == 200 ? llm::tokenize_count(rp.get().body()) : -1;
}

void ClientSession::submit_usage(RequestContext& ctx, double duration_ms) {
  resolve_usage(ctx);  // paths that did not resolve it already (errors answered by the gateway)
  // The record views the context's strings: the pipeline copies its bytes into the queue.
  usage::UsageRecordView r;
  std::string own_id;
  if (ctx.client_request_id.empty()) {
    r.request_id = ctx.request_id;
  } else {
    own_id = w_.ids.next();  // the client's id may repeat; ours never does
    r.request_id = own_id;
    r.client_request_id = ctx.client_request_id;
  }
  r.user_id = ctx.user_id;
  r.api_key = ctx.api_key;
  // A request without `model` (vLLM, TGI and llama.cpp run their default one): the model the
  // answer names.
  r.model = ctx.info.model.empty() ? ctx.answer_model : ctx.info.model;
  r.prompt_tokens = ctx.usage.prompt_tokens;
  r.completion_tokens = ctx.usage.completion_tokens;
  r.total_tokens = ctx.usage.total_tokens;
  r.cached_tokens = ctx.usage.cached_tokens;
  r.reasoning_tokens = ctx.usage.reasoning_tokens;
  r.is_stream = ctx.info.stream;
  r.endpoint = llm::to_string(ctx.endpoint);
  // When the request began: now less the time since, which includes a /tokenize call made
  // after the response (duration_ms does not).
  r.timestamp_ms =
      unix_ms_now() -
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - ctx.start).count();
  if (const lb::Backend* b = ctx.sent_to ? ctx.sent_to : ctx.backend) {
    r.backend_url = b->config().url;
    r.backend = b->name();
  }
  r.status_code = ctx.status;
  r.duration_ms = duration_ms;
  r.ttft_ms = ctx.ttft_ms();
  r.finish = ctx.finish;
  r.usage_source = ctx.estimated ? "estimated" : "backend";
  w_.metrics.usage_prompt_tokens +=
      static_cast<std::uint64_t>(std::max<std::int64_t>(r.prompt_tokens, 0));
  w_.metrics.usage_completion_tokens +=
      static_cast<std::uint64_t>(std::max<std::int64_t>(r.completion_tokens, 0));
  ++w_.metrics.usage_records;
  if (ctx.estimated) ++w_.metrics.usage_estimated;
  w_.shared.usage->submit(r);
}

asio::awaitable<bool> ClientSession::proxy(Request& req, RequestContext& ctx, bool keep_alive) {
  const auto& cfg = ctx.wg->gen->cfg;
  // The client's request is forwarded as it is: attempt() writes the upstream header from its
  // fields (upstream_head()), the body goes out unchanged.
  std::array<std::size_t, 16> tried{};
  std::size_t ntried = 0;
  std::string errors;  // every failed attempt's error: "a: ...; b: ..."
  arm_watch();
  bool client_keep_alive = keep_alive;
  for (int i = 0; i <= cfg.load_balancing.max_retries; ++i) {
    if (watch_.client_gone) break;
    auto pick = ctx.wg->balancer.pick(ctx.info.model, std::span(tried.data(), ntried));
    if (!pick.backend) {
      disarm_watch();
      if (i > 0) {
        // Every attempt failed: the access log says so whether or not one was sent.
        ctx.finish = "upstream_error";
        {
          reply_ =
              error_reply(http::errors::bad_gateway, "No backend answered: " + errors, keep_alive);
          co_return co_await send(ctx, reply_);
        }
      }
      if (pick.error == lb::PickError::no_backend_for_model) {
        {
          reply_ = error_reply(http::errors::model_not_found,
                               fmt::format("The model '{}' does not exist or no backend serves it.",
                                           ctx.info.model.substr(0, 200)),
                               keep_alive);
          co_return co_await send(ctx, reply_);
        }
      }
      {
        reply_ = error_reply(http::errors::no_healthy_backend,
                             ctx.info.model.empty()
                                 ? "No healthy backend is available."
                                 : fmt::format("No healthy backend serves the model '{}'.",
                                               ctx.info.model.substr(0, 200)),
                             keep_alive);
        // A backend comes back after healthy_threshold passed checks, not before.
        if (const auto& hc = cfg.health_check; hc.enabled) {
          const std::int64_t ms = hc.interval.count() * hc.healthy_threshold;
          reply_.retry_after =
              static_cast<unsigned>(std::clamp<std::int64_t>((ms + 999) / 1000, 1, 86'400));
        }
        co_return co_await send(ctx, reply_);
      }
    }
    lb::Backend& backend = *pick.backend;
    tried[ntried++] = backend.index();
    if (i > 0) ++w_.metrics.retries;
    ctx.backend = &backend;
    ++ctx.attempts;
    lb::InFlightGuard in_flight(backend);
    std::string error;
    auto outcome = co_await attempt(backend, req, ctx, keep_alive, client_keep_alive, error);
    if (outcome == Attempt::retry && !error.empty()) {
      errors += errors.empty() ? "" : "; ";
      errors += error;
    }
    if (outcome == Attempt::done) {
      disarm_watch();
      in_flight.release();  // answered: a /tokenize call after it is not a request in flight
      if (wants_tokenize(ctx)) {
        co_await tokenize_prompt(ctx, client_keep_alive, req[bhttp::field::authorization]);
      }
      log(ctx);
      co_return client_keep_alive;
    }
    if (outcome == Attempt::overloaded) {
      // Another backend would fare no better: the gateway itself is out of sockets. No backend
      // was contacted: the request is not counted under one.
      disarm_watch();
      ctx.backend = nullptr;
      ctx.finish = "upstream_error";
      reply_ = error_reply(http::errors::overloaded,
                           "The gateway is overloaded (" + error + "); retry later.", keep_alive);
      reply_.retry_after = 1;
      co_return co_await send(ctx, reply_);
    }
    if (outcome == Attempt::bad_answer) {
      disarm_watch();
      ctx.finish = "upstream_error";
      reply_ = error_reply(http::errors::bad_gateway,
                           "The backend sent an invalid response: " + error, keep_alive);
      co_return co_await send(ctx, reply_);
    }
    if (outcome == Attempt::cut_before_body) {
      disarm_watch();
      reply_ = error_reply(
          ctx.finish == "timeout" ? http::errors::gateway_timeout : http::errors::bad_gateway,
          error, keep_alive);
      co_return co_await send(ctx, reply_);
    }
    if (outcome == Attempt::first_byte_timeout) {
      disarm_watch();
      ctx.finish = "timeout";
      reply_ = error_reply(
          http::errors::gateway_timeout,
          fmt::format("The backend did not answer within {} ms.", cfg.timeouts.first_byte.count()),
          keep_alive);
      co_return co_await send(ctx, reply_);
    }
  }
  disarm_watch();
  if (watch_.client_gone) {
    ctx.finish = "client_disconnected";
    ctx.status = 499;
    // Gone before the answer: the body is still the request's (attempt() keeps it for
    // /tokenize only once the backend answers).
    if (ctx.retained_body.empty() && req.body().size() <= kMaxTokenizeBody) {
      ctx.retained_body = std::move(req.body());
    }
    if (wants_tokenize(ctx)) co_await tokenize_prompt(ctx, false, req[bhttp::field::authorization]);
    log(ctx);
    co_return false;
  }
  ctx.finish = "upstream_error";
  {
    reply_ = error_reply(
        http::errors::bad_gateway,
        (ntried > 1 ? "No backend answered: " : "The backend did not answer: ") + errors,
        keep_alive);
    co_return co_await send(ctx, reply_);
  }
}

void new_response_parser(std::optional<ResponseParser>& parser) {
  parser.emplace();
  parser->body_limit(boost::none);
  parser->header_limit(kUpstreamHeaderLimit);
}

// The upstream request's header, for a gather write with its body: the client's end-to-end
// fields in order, then the gateway's (Host of the backend, X-Forwarded-For/-Proto, the request
// id, identity encoding when metered) and the body's length. Hop-by-hop fields, those the
// client's Connection lists, and Expect (the gateway answered it) are not forwarded.
void ClientSession::upstream_head(std::string& out, const Request& req, const RequestContext& ctx,
                                  const lb::Backend& backend) const {
  const config::Url& url = backend.config().parsed;
  const std::string host = url.authority();
  std::string joined_connection;
  const std::string_view connection = connection_tokens(req.base(), joined_connection);
  std::size_t bound = req.method_string().size() + url.base_path.size() + req.target().size() +
                      host.size() + client_ip_.size() + ctx.request_id.size() + 256;
  for (const auto& f : req.base()) {
    bound += f.name_string().size() + f.value().size() + HeadWriter::kFieldExtra;
  }
  HeadWriter w(out, bound);
  w.put(req.method_string());
  w.put(" ");
  w.put(url.base_path);
  w.put(req.target());
  w.put(" HTTP/1.1\r\n");
  w.field("Host", host);
  // A field the client's Connection lists is hop-by-hop too, X-Forwarded-For included.
  auto listed = [&](std::string_view name) {
    return !connection.empty() && connection_lists(connection, name);
  };
  auto is_forwarded_for = [](const auto& f) {
    return f.name() == bhttp::field::unknown && iequals(f.name_string(), "x-forwarded-for");
  };
  for (const auto& f : req.base()) {
    const std::string_view name = f.name_string();
    switch (f.name()) {
      case bhttp::field::host:
      case bhttp::field::content_length:
      case bhttp::field::expect:
        continue;
      case bhttp::field::accept_encoding:
        if (ctx.metered) continue;  // replaced: compressed answers could not be read for usage
        break;
      case bhttp::field::unknown:
        // X-Forwarded-For is written below, extended; the other two are the gateway's.
        if (is_forwarded_for(f) || iequals(name, "x-forwarded-proto") ||
            iequals(name, "x-request-id")) {
          continue;
        }
        break;
      default:
        if (is_hop_by_hop(f.name())) continue;
        break;
    }
    if (listed(name)) continue;
    w.field(name, f.value());
  }
  // The client's X-Forwarded-For fields joined in order (one list, RFC 9110 5.3), then the
  // client's address.
  w.put("X-Forwarded-For: ");
  for (const auto& f : req.base()) {
    if (!is_forwarded_for(f) || f.value().empty() || listed(f.name_string())) continue;
    w.put(f.value());
    w.put(", ");
  }
  w.put(client_ip_);
  w.put("\r\n");
  w.field("X-Forwarded-Proto", "http");
  w.field("X-Request-Id", ctx.request_id);
  if (ctx.metered) w.field("Accept-Encoding", "identity");
  w.put("Content-Length: ");
  w.put(static_cast<std::uint64_t>(req.body().size()));
  w.put("\r\n\r\n");
  w.done();
}

// What a backend's header, read by Beast's parser, says that cannot be relayed faithfully, as a
// read error: the attempt then ends in a 502 and the connection is closed, never pooled.
// - 101: the gateway never forwards Upgrade, so no switch was asked for.
// - Transfer-Encoding other than exactly "chunked", or with Content-Length: the coding wins
//   (RFC 9112 6.3) and the body ends at the close, but Beast takes the length when
//   Transfer-Encoding comes first (the rest of the body would be read as the next answer on a
//   pooled connection, another client's), and a coding the client would get unnamed (the field
//   is hop by hop) corrupts the body. nginx refuses both as well.
// - Transfer-Encoding in an HTTP/1.0 answer.
// 204 and 304 have no body whatever their fields say: they are not refused for them.
template <class Message>
error_code unrelayable_framing(const Message& msg) {
  const unsigned status = msg.result_int();
  if (status == 101) return bhttp::error::bad_status;
  if (status == 204 || status == 304) return {};
  auto [first, last] = msg.equal_range(bhttp::field::transfer_encoding);
  if (first == last) return {};
  // HTTP/1.0 has no transfer codings: such framing is faulty (RFC 9112 6.1).
  if (msg.version() < 11) return bhttp::error::bad_transfer_encoding;
  if (std::next(first) != last || !iequals(trim_ows(first->value()), "chunked") ||
      msg.find(bhttp::field::content_length) != msg.end()) {
    return bhttp::error::bad_transfer_encoding;
  }
  return {};
}

// Reads response headers until the final one: interim responses (100 Continue, 103 Early
// Hints) are consumed here and never reach the client, or the next response on this
// connection would be misread as this one's body.
// `interims` counts the interim responses read.
asio::awaitable<error_code> read_final_header(UpstreamConn& conn,
                                              std::optional<ResponseParser>& parser,
                                              int& interims) {
  for (; interims < 8; ++interims) {
    new_response_parser(parser);
    auto op = on_upstream(conn, [&](auto& s) {
      return bhttp::async_read_header(s, conn.buffer, *parser, use_nothrow);
    });
    auto [ec, n] = co_await std::move(op);
    if (ec) co_return ec;
    const unsigned status = parser->get().result_int();
    if (status >= 200 || status == 101) co_return error_code{};
  }
  co_return error_code(bhttp::error::bad_status);
}

asio::awaitable<ClientSession::Attempt> ClientSession::attempt(lb::Backend& backend, Request& req,
                                                               RequestContext& ctx, bool keep_alive,
                                                               bool& client_keep_alive,
                                                               std::string& error) {
  WorkerGen& wg = *ctx.wg;
  const auto& cfg = wg.gen->cfg;
  const int metric_id = backend.metric_id();
  std::unique_ptr<UpstreamConn> conn;
  // One parser per response header: interim 1xx responses each need a fresh one.
  std::optional<ResponseParser> parser;
  std::string request_head;  // the upstream request's header, for this backend
  bool fast_head = false;    // the header was read directly: w_.resp_head holds it
  bool send_failed = false;  // the answer read after a failed send never makes the conn reusable

  // Send, and read the response header. A pooled connection the backend closed meanwhile
  // fails with nothing sent, or with EOF/reset (or stray bytes it wrote after its last answer)
  // before any response: retried on a fresh connection to the same backend without counting as
  // its failure. Once the request was sent the backend may have read it (QA: a backend that
  // resets every request got each one twice per attempt), so that replay happens at most once
  // per request and counts as a retry (llmproxy_retries_total, the access log's attempts).
  for (int fresh_retry = 0;; ++fresh_retry) {
    // A replay goes on a new connection: another pooled one may be just as dead.
    conn = fresh_retry == 0 ? w_.take_idle(wg, backend.index()) : nullptr;
    if (!conn) {
      auto cr = co_await connect_backend(w_.ioc.get_executor(), w_.shared, *wg.gen, backend,
                                         cfg.timeouts.connect);
      if (watch_.client_gone) co_return Attempt::retry;
      if (cr.local) {
        error = cr.message();
        co_return Attempt::overloaded;
      }
      if (!cr.conn) {
        w_.metrics.upstream_error(metric_id, cr.timed_out ? metrics::UpstreamError::timeout
                                                          : metrics::UpstreamError::connect);
        error = fmt::format("{}: connect: {}", backend.name(), cr.message());
        record_passive(cfg.health_check, backend, false);
        co_return Attempt::retry;
      }
      conn = std::move(cr.conn);
    }
    watch_.upstream = conn.get();
    error_code wec;
    if (request_head.empty()) upstream_head(request_head, req, ctx, backend);
    std::array<asio::const_buffer, 2> bufs{asio::buffer(request_head), asio::buffer(req.body())};
    if (conn->is_tls()) {
      arm(cfg.timeouts.stream_idle, conn.get());
      auto wop =
          on_upstream(*conn, [&](auto& s) { return asio::async_write(s, bufs, use_nothrow); });
      auto [rwec, wn] = co_await std::move(wop);
      wec = settle(rwec);
    } else {
      // Header and body in one gather write, with no operation when the socket takes them all
      // (the usual case: a request is small next to a socket buffer).
      auto& sock = std::get<UpstreamConn::Plain>(conn->stream).socket();
      std::size_t sent = sock.write_some(bufs, wec);
      if (wec == asio::error::would_block || wec == asio::error::try_again) {
        wec = {};
        sent = 0;
      }
      if (!wec && sent < asio::buffer_size(bufs)) {
        for (auto& b : bufs) {
          const std::size_t skip = std::min(sent, b.size());
          b += skip;
          sent -= skip;
        }
        arm(cfg.timeouts.stream_idle, conn.get());
        auto [rwec, wn] = co_await asio::async_write(sock, bufs, use_nothrow);
        wec = settle(rwec);
      }
    }
    send_failed = static_cast<bool>(wec);
    if (!wec) {
      ctx.forwarded = true;
      ctx.sent_to = &backend;
    }
    if (watch_.client_gone) co_return Attempt::retry;
    if (wec && conn->reused) {
      watch_.upstream = nullptr;
      conn->close();
      continue;
    }
    // After a failed send the backend may still have answered before closing (a 413 for a
    // body over its own limit): read that answer rather than calling the backend down.
    arm(wec ? cfg.timeouts.connect : cfg.timeouts.first_byte, conn.get());
    error_code rhec;
    int interims = 0;           // interim 1xx answers read (and consumed)
    bool answer_bytes = false;  // any byte of an answer arrived on this attempt
    if (conn->is_tls()) {
      rhec = co_await read_final_header(*conn, parser, interims);
      answer_bytes = interims > 0 || parser->got_some() || conn->buffer.size() > 0;
    } else {
      // A stream's answer: read when readable into the worker's space; the connection keeps
      // only the bytes after the header (the start of the body), or a header still incomplete.
      auto& sock = std::get<UpstreamConn::Plain>(conn->stream).socket();
      char* const space = w_.relay_in.get();
      new_response_parser(parser);
      fast_head = false;
      std::size_t direct_seen = 0;  // bytes the direct reader saw without a whole header
      for (;;) {
        if (conn->buffer.size() > 0) {
          // The header is read directly when it has the plain form servers write; Beast's
          // parser then gets only the framing (status, length or chunking, Connection), from a
          // short header of its own. Other forms go to Beast whole.
          auto direct = http::HeadParse::unsupported;
          if (!parser->got_some() && conn->buffer.size() <= kDirectHeadMax) {
            const auto held = conn->buffer.data();
            const std::string_view bytes(static_cast<const char*>(held.data()), held.size());
            // Read again only when a line ended since the last try: no quadratic re-reading of
            // a header that trickles in.
            direct = bytes.find('\n', direct_seen) == std::string_view::npos
                         ? http::HeadParse::need_more
                         : http::parse_response_head(bytes, w_.resp_head);
            if (direct == http::HeadParse::need_more) direct_seen = bytes.size();
          }
          if (direct == http::HeadParse::done) {
            http::ResponseHead& h = w_.resp_head;
            if (h.status < 200) {  // an interim 1xx (101 is left to Beast): the answer follows
              conn->buffer.consume(h.size);
              direct_seen = 0;
              if (++interims == 8) {
                rhec = bhttp::error::bad_status;
                break;
              }
              continue;
            }
            parser->put(asio::buffer(h.framing_header()), rhec);
            if (!rhec && !parser->is_header_done()) rhec = bhttp::error::bad_value;
            if (rhec) break;
            conn->buffer.consume(h.size);  // the views stay valid: nothing is written there
            fast_head = true;
            break;
          }
          if (direct == http::HeadParse::unsupported) {
            conn->buffer.consume(parser->put(conn->buffer.data(), rhec));
            if (rhec == bhttp::error::need_more) rhec = {};
            if (rhec) break;
            if (parser->is_header_done()) {
              const unsigned st = parser->get().result_int();
              if (st >= 200 || st == 101) break;
              if (++interims == 8) {
                rhec = bhttp::error::bad_status;
                break;
              }
              new_response_parser(parser);  // an interim 1xx: the real answer follows
              continue;
            }
          }
        }
        if (!ctx.info.stream) {
          // A non-stream answer is read straight into the connection's buffer: a readiness wait
          // costs an epoll_ctl per request, a read does not. (A stream keeps the wait: while its
          // backend prefills, the connection holds no buffer.)
          const std::size_t room = conn->buffer.max_size() - conn->buffer.size();
          if (room == 0) {
            rhec = bhttp::error::header_limit;
            break;
          }
          auto [rrec, rn] = co_await sock.async_read_some(
              conn->buffer.prepare(std::min(room, kUpstreamInitialBuffer)), use_nothrow);
          conn->buffer.commit(rn);
          answer_bytes = answer_bytes || rn > 0;
          if (rrec == asio::error::eof) {
            rhec = parser->got_some() || conn->buffer.size() > 0 ? bhttp::error::partial_message
                                                                 : bhttp::error::end_of_stream;
            break;
          }
          if (rrec) {
            rhec = rrec;
            break;
          }
          continue;
        }
        auto [rwait] = co_await sock.async_wait(tcp::socket::wait_read, use_nothrow);
        if (rwait) {
          rhec = rwait;
          break;
        }
        const ssize_t got = ::recv(sock.native_handle(), space, kRelayScratch, MSG_DONTWAIT);
        if (got < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
          rhec = error_code(errno, asio::error::get_system_category());
          break;
        }
        if (got == 0) {
          rhec = parser->got_some() || conn->buffer.size() > 0 ? bhttp::error::partial_message
                                                               : bhttp::error::end_of_stream;
          break;
        }
        if (conn->buffer.size() + static_cast<std::size_t>(got) > conn->buffer.max_size()) {
          rhec = bhttp::error::header_limit;
          break;
        }
        auto room = conn->buffer.prepare(static_cast<std::size_t>(got));
        std::memcpy(room.data(), space, static_cast<std::size_t>(got));
        conn->buffer.commit(static_cast<std::size_t>(got));
        answer_bytes = true;
      }
    }
    if (!rhec && !fast_head) rhec = unrelayable_framing(parser->get());
    const error_code hec = settle(rhec);
    if (watch_.client_gone) co_return Attempt::retry;
    if (hec) {
      // Bytes of an answer arrived (an interim 1xx, a header cut short, malformed or too
      // large): the backend read the request and may have run it.
      const bool began_answer = answer_bytes || interims > 0;
      watch_.upstream = nullptr;
      conn->close();
      // A pooled connection the backend closed before any byte of an answer (EOF, reset, or over
      // TLS a close without close_notify, which OpenSSL reports as truncation), or
      // stray bytes (not "HTTP/1.x") where the answer should start: what a backend wrote after
      // its last answer on this connection. Anything else that began an answer means it ran
      // the request: not replayed. (An answer in another version, HTTP/2 or 0.9, also reads as
      // bad_version and is replayed once: no HTTP/1.1 backend sends one.)
      const bool stale = !wec && conn->reused && !ctx.replaced_stale && interims == 0 &&
                         (hec == bhttp::error::bad_version ||
                          (!answer_bytes && (hec == bhttp::error::end_of_stream ||
                                             hec == asio::error::connection_reset ||
                                             hec == asio::ssl::error::stream_truncated)));
      if (!stale) {
        w_.metrics.upstream_error(metric_id, hec == beast::error::timeout
                                                 ? metrics::UpstreamError::timeout
                                                 : metrics::UpstreamError::reset);
      }
      if (wec) {
        error = fmt::format("{}: send: {}", backend.name(), wec.message());
        record_passive(cfg.health_check, backend, false);
        co_return Attempt::retry;
      }
      if (hec == beast::error::timeout) {
        record_passive(cfg.health_check, backend, false);
        co_return Attempt::first_byte_timeout;
      }
      if (stale) {
        ctx.replaced_stale = true;
        ++ctx.attempts;
        ++w_.metrics.retries;
        continue;
      }
      // "end of stream" says little: the backend took the connection and closed it unanswered.
      error = fmt::format("{}: {}", backend.name(),
                          hec == bhttp::error::end_of_stream
                              ? std::string("closed the connection without answering")
                              : hec.message());
      record_passive(cfg.health_check, backend, false);
      co_return began_answer ? Attempt::bad_answer : Attempt::retry;
    }
    break;
  }
  auto& rp = *parser;
  ctx.forwarded = true;
  ctx.sent_to = &backend;
  ctx.upstream_answered = true;
  ctx.ttfb_ms = ms_since(ctx.start);
  // From here on the response belongs to the client: no retry.
  auto& up = rp.get();
  const unsigned status = up.result_int();
  // An answer: a success, or with passive_5xx a failure when it is a 5xx. (Without it a 5xx
  // changes nothing: the backend answered, but not well.)
  if (status < 500 || cfg.health_check.passive_5xx) {
    record_passive(cfg.health_check, backend, status < 500);
  }
  if (status >= 500) {
    w_.metrics.upstream_error(metric_id, metrics::UpstreamError::status_5xx);
  }
  ctx.upstream_status = status;
  if (ctx.metered && cfg.usage.tokenize && req.body().size() <= kMaxTokenizeBody) {
    ctx.retained_body = std::move(req.body());  // moved, not copied; freed with the request
  }
  req.body().clear();
  req.body().shrink_to_fit();
  ctx.body_ticket.shrink(ctx.retained_body.capacity());

  const http::ResponseHead* direct = fast_head ? &w_.resp_head : nullptr;
  const std::string_view content_type = direct ? (*direct)[bhttp::field::content_type]
                                               : std::string_view(up[bhttp::field::content_type]);
  bool is_stream = beast::iequals(content_type.substr(0, 17), "text/event-stream");
  bool draining = w_.shared.draining.load(std::memory_order_relaxed);
  client_keep_alive = keep_alive && !draining;
  // The usage chunk the gateway caused is removed from the stream, which then cannot keep the
  // backend's length (ctx.injected implies metering).
  const bool remove_injected = is_stream && ctx.injected && !rp.is_done();
  // The client's header, written straight from the backend's: its end-to-end fields in order,
  // then the gateway's own (request id, no proxy buffering for streams) and the framing.
  enum class Framing { length, chunked, close, none } framing;
  std::uint64_t length = 0;
  // 204 and 304 end with their header. A 204 may not carry Content-Length (RFC 9110 8.6): the
  // backend's is dropped; a 304's is the stored representation's, kept.
  const bool bodiless = status == 204 || status == 304;
  if (bodiless) {
    framing = Framing::none;
  } else if (auto cl = rp.content_length(); cl && !remove_injected) {
    framing = Framing::length;
    length = *cl;
  } else if (!rp.is_done()) {
    // HTTP/1.0 knows no chunks: the body ends with the connection.
    framing = ctx.client_version >= 11 ? Framing::chunked : Framing::close;
  } else {
    framing = Framing::length;
  }
  if (framing == Framing::close) client_keep_alive = false;
  std::string head;
  auto write_head = [&](const auto& fields, std::string_view reason,
                        std::string_view up_connection) {
    if (reason.empty()) reason = bhttp::obsolete_reason(up.result());
    std::size_t bound = reason.size() + ctx.request_id.size() + 192 + HeadWriter::kNumber;
    for (const auto& f : fields) {
      bound += f.name_string().size() + f.value().size() + HeadWriter::kFieldExtra;
    }
    HeadWriter w(head, bound);
    w.put("HTTP/1.1 ");
    w.put(static_cast<std::uint64_t>(status));
    w.put(" ");
    w.put(reason);
    w.put("\r\n");
    for (const auto& f : fields) {
      const std::string_view name = f.name_string();
      const bhttp::field code = f.name();
      if (is_hop_by_hop(code) || connection_lists(up_connection, name)) continue;
      if (code == bhttp::field::content_length && (framing != Framing::none || status == 204)) {
        continue;
      }
      if (iequals(name, "x-request-id") || (is_stream && iequals(name, "x-accel-buffering"))) {
        continue;
      }
      w.field(name, f.value());
    }
    w.field("X-Request-Id", ctx.request_id);
    if (is_stream) w.field("X-Accel-Buffering", "no");
    if (framing == Framing::length) {
      w.put("Content-Length: ");
      w.put(length);
      w.put("\r\n");
    } else if (framing == Framing::chunked) {
      w.field("Transfer-Encoding", "chunked");
    }
    if (!client_keep_alive) {
      w.field("Connection", "close");
    } else if (ctx.client_version < 11) {
      w.field("Connection", "keep-alive");  // an HTTP/1.0 client assumes close without it
    }
    w.put("\r\n");
    w.done();
  };
  if (direct) {
    write_head(direct->base(), direct->reason, direct->connection);
  } else {
    std::string joined;  // every Connection field's tokens: each names fields not to forward
    write_head(up.base(), up.reason(), connection_tokens(up.base(), joined));
  }
  const bool chunked = framing == Framing::chunked;
  ctx.status = status;
  if (ctx.metered && is_stream) {
    ctx.meter.emplace(&w_.usage_parser, remove_injected);
    if (ctx.info.model.empty()) ctx.meter->want_model();
  }
  const std::size_t copy_limit = cfg.usage.max_response_copy;

  // The body is relayed with the session's own reads and writes: upstream bytes go through the
  // parser (chunked framing and length), each piece is written to the client as it is found,
  // with the header while unsent, framed as a chunk when the client's message is chunked.
  BodyWrite out;
  bool client_ok = true;
  bool client_stalled = false;   // the client stopped reading and stream_idle passed
  bool client_had_done = false;  // the client left after the whole stream, [DONE] included
  // vLLM, TGI and llama.cpp send a stream's header before queueing and prefill: until the
  // stream's first piece reaches the client, the backend's silence is bounded by first_byte
  // (when that is the longer), as the wait for a non-stream answer's header is.
  const auto silence_limit = [&] {
    return is_stream && ctx.first_byte_ms < 0
               ? std::max(cfg.timeouts.stream_idle, cfg.timeouts.first_byte)
               : cfg.timeouts.stream_idle;
  };
  // An event stream's header goes out at once, so the client learns the status while the
  // backend is still prefilling (even when the bytes that came with it hold no whole piece of
  // body yet, such as the start of a chunk-size line); any other header rides with the first
  // piece of body.
  if (is_stream && !rp.is_done()) {
    out.frame(head, false, {}, false);
    error_code whec = write_now(out);
    if (!whec && !pending_.empty()) whec = co_await flush_pending(cfg.timeouts.stream_idle);
    client_ok = !whec;
    std::string().swap(head);  // sent: nothing kept for the rest of the stream
  }
  // A stream holds no buffer of its own while it waits: the request's read space goes too.
  if (is_stream && buffer_.size() == 0) buffer_.shrink_to_fit();
  bool upstream_ok = true;
  error_code upstream_ec;  // why !upstream_ok
  bool ended = false;      // the write that ends the message went out
  StreamTail tail;         // the stream's last bytes: does it end between two events?
  char* const body_space = w_.relay_out.get();
  char* const in_space = w_.relay_in.get();
  const bool plain = !conn->is_tls();
  // Feeds input to the parser until it needs more, the body space is full or the message
  // ends; returns the bytes used.
  auto feed = [&rp](const char* p, std::size_t len, error_code& ec) {
    std::size_t used = 0;
    while (used < len && !rp.is_done()) {
      error_code pec;
      const std::size_t k = rp.put(asio::const_buffer(p + used, len - used), pec);
      used += k;
      if (pec == bhttp::error::need_more || pec == bhttp::error::need_buffer) break;
      if (pec) {
        ec = pec;
        break;
      }
      if (k == 0) break;
    }
    return used;
  };
  Clock::time_point last_write{};
  // Once the upstream response is complete, a client hang-up no longer concerns the upstream
  // connection: it stays reusable, so the watch must not close it.
  if (rp.is_done()) watch_.upstream = nullptr;
  // A non-stream answer was generated whole before its header came, and its usage comes last:
  // when the client leaves or stalls, the rest of the body is read without being sent (up to
  // kReadForUsageMax), so that the tokens the backend spent are billed as it reported them. Only
  // the drain deadline's abort() cuts that.
  const bool usage_in_body = ctx.metered && !is_stream;
  watch_.keep_upstream = usage_in_body;
  const auto client_cut = [&] { return watch_.client_gone && (!usage_in_body || aborted_); };
  bool reading_for_usage = false;  // the client is gone: the body is read, not sent
  std::size_t read_for_usage = 0;
  while ((client_ok || reading_for_usage) && !rp.is_done()) {
    rp.get().body().data = body_space;
    rp.get().body().size = kRelayScratch;
    error_code rec;
    // Parse what the connection holds; read only when that yields no body, so that every piece
    // goes out as soon as it arrived. Bytes the parser leaves (a partial chunk header) stay in
    // conn->buffer for the next round.
    for (;;) {
      if (conn->buffer.size() > 0) {
        const auto held = conn->buffer.data();
        conn->buffer.consume(feed(static_cast<const char*>(held.data()), held.size(), rec));
        if (rec) break;
      }
      if (rp.is_done() || rp.get().body().size != kRelayScratch) break;
      if (plain) {
        // Wait for readability, then read into the worker's space behind what is held.
        auto& sock = std::get<UpstreamConn::Plain>(conn->stream).socket();
        arm(silence_limit(), conn.get());
        auto [rwec] = co_await sock.async_wait(tcp::socket::wait_read, use_nothrow);
        rec = settle(rwec);
        if (rec || client_cut()) break;
        const std::size_t held = conn->buffer.size();
        if (held >= kRelayScratch / 2) {
          rec = bhttp::error::buffer_overflow;  // a chunk header of 16 KiB is not a chunk header
          break;
        }
        if (held > 0) std::memcpy(in_space, conn->buffer.data().data(), held);  // empty: no data()
        const ssize_t got =
            ::recv(sock.native_handle(), in_space + held, kRelayScratch - held, MSG_DONTWAIT);
        if (got < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
          rec = error_code(errno, asio::error::get_system_category());
          break;
        }
        if (got == 0) {
          rp.put_eof(rec);  // ends a body delimited by the connection's close; else an error
          break;
        }
        conn->buffer.consume(held);
        const std::size_t len = held + static_cast<std::size_t>(got);
        const std::size_t used = feed(in_space, len, rec);
        if (used < len) {
          auto room = conn->buffer.prepare(len - used);
          std::memcpy(room.data(), in_space + used, len - used);
          conn->buffer.commit(len - used);
        }
        if (rec || rp.is_done() || rp.get().body().size != kRelayScratch) break;
        continue;
      }
      const std::size_t room =
          std::min(kRelayScratch, conn->buffer.max_size() - conn->buffer.size());
      if (room == 0) {
        rec = bhttp::error::buffer_overflow;
        break;
      }
      arm(silence_limit(), conn.get());
      auto rop = on_upstream(*conn, [&](auto& s) {
        return s.async_read_some(conn->buffer.prepare(room), use_nothrow);
      });
      auto [rrec, rn] = co_await std::move(rop);
      rec = settle(rrec);
      if (client_cut()) break;
      conn->buffer.commit(rn);
      if (rec == asio::error::eof) {
        rec = {};
        rp.put_eof(rec);
        break;
      }
      if (rec) break;
    }
    // A stream keeps no read space between events, only what the parser left: usually the
    // CRLF that ends a chunk (the pool gives a reused connection its space back).
    if (plain && is_stream && conn->buffer.capacity() > 256 && conn->buffer.size() <= 64) {
      conn->buffer.shrink_to_fit();
    }
    if (rec || client_cut()) {
      upstream_ok = false;
      upstream_ec = rec;
      if (client_cut()) {
        client_ok = false;
        // A client that hung up once it had the stream's end marker (the backend's last bytes,
        // the end of its chunked message, still on their way) read a complete stream.
        client_had_done = is_stream && ends_with_done_line(tail.view());
      } else if (rec == beast::error::timeout) {
        ctx.finish = "timeout";
        w_.metrics.upstream_error(metric_id, metrics::UpstreamError::timeout);
      } else {
        ctx.finish = "upstream_error";
        w_.metrics.upstream_error(metric_id, metrics::UpstreamError::reset);
      }
      break;
    }
    if (rp.is_done()) watch_.upstream = nullptr;
    std::size_t n = kRelayScratch - rp.get().body().size;
    std::string_view piece(body_space, n);
    std::string joined;  // only when a held tail must go out with the last piece
    if (ctx.meter) {
      piece = ctx.meter->relay(piece);
      if (!ctx.retained_body.empty() && ctx.meter->tracker().usage().reported()) {
        drop_retained(ctx);  // usage is known: /tokenize will not be needed
      }
      if (rp.is_done()) {
        std::string_view rest = ctx.meter->finish();
        if (!rest.empty()) {
          joined.reserve(piece.size() + rest.size());
          joined.append(piece);
          joined.append(rest);
          piece = joined;
        }
      }
    }
    n = piece.size();
    if (n == 0 && !rp.is_done()) continue;
    // The last piece and the end of the message (chunked: the last chunk) in one write.
    error_code cwec;
    if (!reading_for_usage) {
      out.frame(head, chunked, piece, rp.is_done());
      cwec = write_now(out);
    }
    if (!ctx.meter && ctx.metered && n > 0) {
      // The usage read happens after the response went out. A whole body in one piece that the
      // socket took at once is read where it lies (the worker's space, valid until the next
      // co_await; one piece is never more than the tail the copy would keep); anything else
      // gets a bounded copy, past the limit only its head and its tail (servers write usage
      // last, a few first).
      static_assert(kRelayScratch <= 2 * kResponseTailBytes);
      auto& copy = ctx.body_copy;
      if (rp.is_done() && !cwec && pending_.empty() && copy.empty() && ctx.body_copy_complete) {
        ctx.body_usage = read_body(ctx, piece, true);
      } else if (ctx.body_copy_complete && copy.size() + n <= copy_limit &&
                 grow_room(ctx.copy_ticket, copy, copy.size() + n, copy_limit)) {
        // Held under server.max_body_memory; past that bound the copy keeps only its windows.
        copy.append(piece);
      } else {
        copy.append(piece);
        // Whole still, unless past the copy's limit or trimmed below (a copy that could not be
        // held under max_body_memory keeps a small body whole all the same, uncounted).
        if (ctx.body_copy_complete &&
            (copy.size() > copy_limit || copy.size() > 2 * kResponseTailBytes)) {
          ctx.body_head.assign(copy, 0, kResponseTailBytes);
          ctx.body_copy_complete = false;
        }
        if (copy.size() > 2 * kResponseTailBytes) {
          // Usage in the middle of a large body (vLLM writes prompt_logprobs and
          // prompt_token_ids after it): the last usage key leaving the copy stays, with what
          // follows it.
          const std::size_t drop = copy.size() - kResponseTailBytes;
          // None in what leaves the copy: what was kept stays.
          if (const auto at = llm::rfind_usage_object(copy, drop); at != std::string::npos) {
            ctx.body_mid.assign(copy, at, llm::kUsageWindowBytes);
          }
          copy.erase(0, drop);
          // The windows from here on: the room the whole copy had goes back.
          if (ctx.copy_ticket.held() > 0) {
            copy.shrink_to_fit();
            ctx.copy_ticket.shrink(0);
          }
        }
      }
    }
    if (reading_for_usage) {
      read_for_usage += n;
      if (read_for_usage <= kReadForUsageMax) continue;
      ctx.body_copy_complete = false;  // usage is searched for in what was read, not parsed
      break;
    }
    // `piece` may lie in the worker's shared scratch space, which other sessions overwrite
    // while this one waits for a slow client below: the tail takes its bytes first.
    if (is_stream && n > 0 && !cwec) tail.push(piece);
    if (!cwec && !pending_.empty()) cwec = co_await flush_pending(cfg.timeouts.stream_idle);
    if (cwec) {
      client_ok = false;
      client_stalled = cwec == beast::error::timeout;
      if (usage_in_body && !aborted_) {
        reading_for_usage = true;  // this piece is in the copy already
        continue;
      }
      ctx.body_copy_complete = false;  // a prefix: usage is searched for in it, not parsed
      break;
    }
    if (!head.empty()) std::string().swap(head);
    ctx.bytes_out += n;
    ended = rp.is_done();
    if (n > 0) {
      const auto now = Clock::now();
      if (ctx.first_byte_ms < 0) {
        ctx.first_byte_ms = std::chrono::duration<double, std::milli>(now - ctx.start).count();
      } else if (is_stream) {
        w_.metrics.event_gap(std::chrono::duration<double, std::milli>(now - last_write).count());
      }
      if (ctx.first_token_ms < 0 && ctx.meter && ctx.meter->tracker().token_seen()) {
        ctx.first_token_ms = std::chrono::duration<double, std::milli>(now - ctx.start).count();
      }
      last_write = now;
    }
  }
  if (client_ok && upstream_ok && !ended) {
    // A response complete with its header (no body, or a body already whole) or whose last
    // read carried no body: the header if unsent, and the end of the message.
    out.frame(head, chunked, {}, true);
    error_code fec = write_now(out);
    if (!fec && !pending_.empty()) fec = co_await flush_pending(cfg.timeouts.stream_idle);
    if (fec) {
      client_ok = false;
      client_stalled = fec == beast::error::timeout;
    }
  }
  watch_.upstream = nullptr;
  // Nothing relayed, or a blank line last: the client stands between two events.
  const bool at_event_end = tail.view().empty() || ends_with_blank_line(tail.view());
  bool stream_failed = false;  // the backend ended its stream inside an event or reported an error
  if (client_had_done) {
    client_keep_alive = false;
    if (ctx.meter && ctx.meter->tracker().saw_error()) {
      ctx.finish = "upstream_error";  // an error event before the end marker (vLLM's shape)
      stream_failed = true;
    }
  } else if (!client_ok) {
    // A client that stopped reading was cut by the gateway's deadline (stream_idle): a timeout.
    ctx.finish = client_stalled ? "timeout" : "client_disconnected";
    client_keep_alive = false;
  } else if (upstream_ok && is_stream && !at_event_end && !ends_with_done_line(tail.view())) {
    // The backend ended its response inside an event: the message's framing is whole, but the
    // last event is cut (clients drop it, and its usage was never seen). Relayed as it came; the
    // record says the stream did not complete. A last "data: [DONE]" line without its blank
    // line is a complete stream all the same: that is only the end marker.
    ctx.finish = "upstream_error";
    stream_failed = true;
  } else if (upstream_ok && ctx.meter && ctx.meter->tracker().saw_error()) {
    // The backend reported an error inside its 200 stream (relayed as it came): the response
    // did not complete, whatever the stream's framing says.
    ctx.finish = "upstream_error";
    stream_failed = true;
  }
  // A backend's error on a stream: once per response, and only for a success status (a 5xx is
  // counted as one already; a 4xx with an error event, such as TGI's validation errors, is the
  // client's).
  if (stream_failed && status < 300) {
    w_.metrics.upstream_error(metric_id, metrics::UpstreamError::stream_error);
  }
  if (!upstream_ok && client_ok && !head.empty()) {
    // Nothing of the answer reached the client (a header that waits for the first piece of
    // body): it gets a clean 502/504 rather than a closed connection, and the record bills
    // nothing, like an answer that never came.
    conn->close();
    ctx.upstream_answered = false;
    error = ctx.finish == "timeout"
                ? fmt::format("The backend sent its response header, then nothing within {} ms.",
                              cfg.timeouts.stream_idle.count())
                : "The backend's answer was cut short: " + upstream_ec.message();
    co_return Attempt::cut_before_body;
  }
  if (!upstream_ok) {
    // The response is cut: the client must see a truncated message, never a clean end. A stream
    // the gateway cuts (stream_idle) or the backend broke off first gets an error event, as
    // servers report errors mid-stream, so that SDKs raise an API error rather than a bare
    // "terminated"; only between events, never inside one the backend left unfinished, nor after
    // its end marker or an error event of its own, nor when the drain deadline cut it.
    const bool timed_out = ctx.finish == "timeout";
    const bool backend_reported = ctx.meter && ctx.meter->tracker().saw_error();
    if (client_ok && is_stream && head.empty() && at_event_end && !aborted_ && !backend_reported &&
        (timed_out || ctx.finish == "upstream_error") && !ends_with_done_line(tail.view())) {
      static constexpr std::string_view kIdle =
          "data: {\"error\":{\"message\":\"The backend sent nothing within timeouts.stream_idle; "
          "the gateway ended the stream.\",\"type\":\"server_error\",\"param\":null,\"code\":"
          "\"upstream_timeout\"}}\n\n";
      static constexpr std::string_view kFirst =
          "data: {\"error\":{\"message\":\"The backend sent its stream's header, then nothing "
          "within timeouts.first_byte; the gateway ended the stream.\",\"type\":\"server_error\","
          "\"param\":null,\"code\":\"upstream_timeout\"}}\n\n";
      static constexpr std::string_view kBroken =
          "data: {\"error\":{\"message\":\"The backend's stream broke off before its end; the "
          "gateway ended the stream.\",\"type\":\"server_error\",\"param\":null,\"code\":"
          "\"upstream_error\"}}\n\n";
      out.frame({}, chunked,
                !timed_out ? kBroken
                : ctx.first_byte_ms < 0 && cfg.timeouts.first_byte > cfg.timeouts.stream_idle
                    ? kFirst
                    : kIdle,
                false);
      write_now(out);
    }
    client_keep_alive = false;
    error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
  }
  // A complete response leaves the upstream connection reusable whatever the client does next
  // (it may hang up right after reading it); one the watch closed is not.
  // A 204 that announced a body, or a 204/304 announcing chunks, may yet send them where the
  // next answer should start. (A 304's Content-Length is the stored representation's: normal.)
  const bool announced_body =
      bodiless && (rp.chunked() || (status == 204 && rp.content_length().value_or(0) > 0));
  if (upstream_ok && !send_failed && rp.is_done() && rp.keep_alive() && !announced_body &&
      conn->buffer.size() == 0 && conn->tcp().socket().is_open()) {
    w_.put_idle(wg, std::move(conn));
  } else {
    conn->close();
  }
  co_return Attempt::done;
}

// ---------------------------------------------------------------------------------------------
// Accepting.

asio::awaitable<void> run_session(Worker* w, tcp::socket socket, bool metrics_only) {
  // Client connections: those of the main listener. The metrics listener's (a scraper) neither
  // take a place under server.max_connections nor show in llmproxy_open_connections, but a
  // drain waits for them like for any other (a scrape may be waiting on other workers).
  struct Counted {
    std::atomic<std::int64_t>& n;
    explicit Counted(std::atomic<std::int64_t>& n) : n(n) {
      n.fetch_add(1, std::memory_order_relaxed);
    }
    ~Counted() { n.fetch_sub(1, std::memory_order_relaxed); }
  } counted(metrics_only ? w->metrics_connections : w->connections);
  try {
    ClientSession session(*w, std::move(socket), metrics_only);
    co_await session.run();
  } catch (const std::exception& e) {
    // Untrusted input must never take the process down; this connection ends, others go on.
    log::line("error", "connection closed after an internal error: {}", e.what());
  }
}

// Connections one wake of a worker's accept loop takes at most; the rest wait for its next turn.
constexpr std::int64_t kAcceptBurst = 64;
// How long a worker's request that another close an idle connection for it stands.
constexpr std::chrono::nanoseconds kReclaimAskLife = std::chrono::milliseconds(20);

// A connection waits in the listener's backlog (readable: accept would take one).
bool connection_waiting(tcp::acceptor& acceptor) {
  pollfd p{acceptor.native_handle(), POLLIN, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & POLLIN) != 0;
}

// Opens and binds `acc` to `addr` (port `port`, 0 for any). An empty host is every address:
// IPv6 with IPv4 mapped into it, or IPv4 alone where the machine has no IPv6 (a kernel without
// it, or IPv6 switched off). Returns the address bound; ec says why not.
tcp::endpoint bind_listener(tcp::acceptor& acc, const config::ListenAddress& addr,
                            std::uint16_t port, bool reuse_port, error_code& ec) {
  const auto bind_to = [&](const asio::ip::address& ip, bool dual) {
    const tcp::endpoint ep(ip, port);
    ec.clear();
    if (acc.is_open()) acc.close();
    acc.open(ep.protocol(), ec);
    if (!ec && dual) acc.set_option(asio::ip::v6_only(false), ec);
    if (!ec) acc.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec && reuse_port) {
      int one = 1;
      if (::setsockopt(acc.native_handle(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
        ec = error_code(errno, boost::system::system_category());
      }
    }
    if (!ec) acc.bind(ep, ec);
    return ep;
  };
  if (addr.host.empty()) {
    tcp::endpoint ep = bind_to(asio::ip::address_v6::any(), true);
    if (ec == asio::error::address_family_not_supported ||
        ec == boost::system::errc::address_not_available || ec == asio::error::invalid_argument) {
      ep = bind_to(asio::ip::address_v4::any(), false);
    }
    return ep;
  }
  const auto ip = asio::ip::make_address(addr.host, ec);
  if (ec) return {};
  return bind_to(ip, false);
}

// Where a listener's "listening on" line says it is: http://HOST:PORT.
std::string listen_url(const tcp::endpoint& ep) {
  const std::string host = ep.address().to_string();
  return fmt::format("http://{}:{}", ep.address().is_v6() ? "[" + host + "]" : host, ep.port());
}

// At server.max_connections: idle keep-alive connections make room, as nginx reuses its own when
// it runs out (otherwise a client with one cheap request per connection each keepalive would
// hold every place). Only while one waits, one per turn, the longest idle first. Each worker has
// a backlog of its own: one whose waiting connection finds no idle one of its own asks the
// others.
void make_room(Worker* w) {
  const bool waiting = connection_waiting(w->acceptor);
  const std::int64_t now_ns = Clock::now().time_since_epoch().count();
  std::int64_t asked = w->shared.reclaim_wanted_at.load(std::memory_order_relaxed);
  if (!waiting && (asked == 0 || now_ns - asked >= kReclaimAskLife.count())) return;
  ClientSession* oldest = nullptr;
  Clock::time_point since = Clock::time_point::max();
  for (ClientSession* s : w->sessions) {
    if (const auto t = s->reclaim_since(); t < since) {
      since = t;
      oldest = s;
    }
  }
  // Another's request is taken by one worker only (the exchange from its value).
  if (oldest && (waiting || w->shared.reclaim_wanted_at.compare_exchange_strong(asked, 0))) {
    oldest->reclaim();
  } else if (!oldest && waiting) {
    w->shared.reclaim_wanted_at.store(now_ns, std::memory_order_relaxed);
  }
}

asio::awaitable<void> accept_loop(Worker* w) {
  const std::int64_t limit = std::max<std::int64_t>(1, w->shared.cfg.server.max_connections);
  asio::steady_timer backoff(w->ioc);
  for (;;) {
    if (open_connections(w->shared) >= limit) {
      // At the connection limit new connections wait in the kernel's backlog. (A worker already
      // waiting in accept takes its next one: the limit can be passed by workers - 1.) Idle
      // keep-alive connections make room (make_room).
      make_room(w);
      backoff.expires_after(std::chrono::milliseconds(10));
      co_await backoff.async_wait(use_nothrow);
      if (!w->acceptor.is_open()) co_return;
      continue;
    }
    auto [ec, socket] = co_await w->acceptor.async_accept(use_nothrow);
    if (ec) {
      if (ec == asio::error::operation_aborted || !w->acceptor.is_open()) co_return;
      // Out of descriptors (EMFILE) and the like: back off instead of spinning.
      if (local_error(ec)) {
        log_local_failure(last_accept_failure_log, ec, "accept a client connection",
                          "new connections wait in the listen backlog");
      }
      backoff.expires_after(std::chrono::milliseconds(50));
      co_await backoff.async_wait(use_nothrow);
      continue;
    }
    asio::co_spawn(w->ioc, run_session(w, std::move(socket), false), asio::detached);
    // Then the connections already waiting, up to kAcceptBurst and the limit (a spawned session
    // counts itself only once it runs, so those taken here are counted here). Under load, one
    // accept per turn of the event loop made each connection of a burst wait behind a whole turn
    // of every other session's work. The acceptor is non-blocking: accept() says would_block
    // once none is waiting, and an error is left to the next async_accept.
    for (std::int64_t taken = 1;
         taken < kAcceptBurst && open_connections(w->shared) + taken < limit; ++taken) {
      tcp::socket more = w->acceptor.accept(ec);
      if (ec) break;
      asio::co_spawn(w->ioc, run_session(w, std::move(more), false), asio::detached);
    }
  }
}

// The separate metrics listener (metrics.listen), on the first worker's event loop.
asio::awaitable<void> metrics_accept_loop(Worker* w, tcp::acceptor* acceptor) {
  asio::steady_timer backoff(w->ioc);
  for (;;) {
    auto [ec, socket] = co_await acceptor->async_accept(use_nothrow);
    if (ec) {
      if (ec == asio::error::operation_aborted || !acceptor->is_open()) co_return;
      backoff.expires_after(std::chrono::milliseconds(50));
      co_await backoff.async_wait(use_nothrow);
      continue;
    }
    asio::co_spawn(w->ioc, run_session(w, std::move(socket), true), asio::detached);
  }
}

// The sweep interval for `t`: kDeadlineSweep, or a quarter of the shortest timeout.
Clock::duration deadline_sweep(const config::Timeouts& t) {
  Clock::duration d = kDeadlineSweep;
  for (auto timeout : {t.first_byte, t.stream_idle, t.client_header, t.keepalive, t.connect}) {
    d = std::min<Clock::duration>(d, timeout / 4);
  }
  return std::max<Clock::duration>(d, kDeadlineSweepMin);
}

asio::awaitable<void> housekeeping_loop(Worker* w) {
  Clock::time_point next_flush = Clock::now();
  for (;;) {
    w->housekeeping.expires_after(deadline_sweep(w->cfg().timeouts));
    auto [ec] = co_await w->housekeeping.async_wait(use_nothrow);
    if (ec) co_return;
    const auto now = Clock::now();
    Clock::time_point oldest = now;  // the start of the oldest request in flight
    for (auto* s : w->sessions) {
      s->check_deadline(now);
      s->watch_tick();
      oldest = std::min(oldest, s->busy_since());
    }
    // As the record's timestamp is made (now less the time since), less a second for the two
    // clocks' readings apart. Release: the records this worker submitted before are visible to
    // the writer that reads this value (acquire) and then counts the queue.
    w->settled_ms.store(
        unix_ms_now() -
            std::chrono::duration_cast<std::chrono::milliseconds>(now - oldest).count() - 1000,
        std::memory_order_release);
    if (now >= next_flush) {
      next_flush = now + std::chrono::milliseconds(250);
      w->log.flush();
      w->sweep_idle();
    }
  }
}

// After a burst of large request bodies, glibc keeps the freed heap for the next burst (it raises
// its mmap threshold on the first free of a large block, and trims only the top of the heap):
// 150 uploads of 8 MiB left 1.1 GB resident for good. A fixed low mmap threshold gave it back,
// but made every large body fresh pages, faulted in one by one (6 x the CPU of a 1 MiB prompt
// on this VM). So large bodies come from the heap, and once the bodies held fall well below a
// peak of at least kTrimAfterPeak, the free heap is handed back with malloc_trim, on the control
// thread, once per burst.
constexpr std::uint64_t kTrimAfterPeak = std::uint64_t{64} << 20;

asio::awaitable<void> memory_trim_loop(Shared& shared) {
  asio::steady_timer timer(co_await asio::this_coro::executor);
  for (;;) {
    timer.expires_after(std::chrono::seconds(1));
    auto [ec] = co_await timer.async_wait(use_nothrow);
    if (ec) co_return;
    std::uint64_t peak = shared.body_peak.load(std::memory_order_relaxed);
    const std::uint64_t now = shared.body_bytes.load(std::memory_order_relaxed);
    if (peak < kTrimAfterPeak || now > peak / 8) continue;
    // A worker that raised the peak meanwhile started a new burst: trim after that one.
    if (!shared.body_peak.compare_exchange_strong(peak, now, std::memory_order_relaxed)) continue;
    ::malloc_trim(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Active health checks (control thread): GET {path} on a fresh connection every interval.

struct ProbeResult {
  bool ok = false;
  bool local = false;  // the gateway could not open a socket: no verdict on the backend
  unsigned status = 0;
  std::string body;
  std::string error;
};

asio::awaitable<ProbeResult> probe(asio::io_context& ioc, Shared& shared, const Generation& gen,
                                   const lb::Backend& b, std::string path,
                                   std::chrono::milliseconds timeout) {
  ProbeResult out;
  const auto& url = b.config().parsed;
  // One deadline for the whole check (connect, TLS handshake, request, answer): `timeout`.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto cr = co_await connect_backend(ioc.get_executor(), shared, gen, b, timeout);
  if (!cr.conn) {
    out.error = cr.message();
    out.local = cr.local;
    co_return out;
  }
  auto conn = std::move(cr.conn);
  conn->tcp().expires_at(deadline);
  bhttp::request<bhttp::empty_body> req{bhttp::verb::get, url.base_path + path, 11};
  req.set(bhttp::field::host, url.authority());
  req.set(bhttp::field::user_agent, "llmproxy-health-check");
  req.keep_alive(false);
  auto [wec, wn] = co_await upstream_write(*conn, req);
  if (wec) {
    out.error = wec.message();
    co_return out;
  }
  bhttp::response_parser<bhttp::string_body> rp;
  rp.body_limit(1024 * 1024);
  auto [rec, rn] = co_await upstream_read(*conn, rp);
  conn->close();
  if (rec) {
    out.error = rec.message();
    co_return out;
  }
  out.status = rp.get().result_int();
  out.ok = out.status >= 200 && out.status < 300;
  if (!out.ok) out.error = fmt::format("status {}", out.status);
  out.body = std::move(rp.get().body());
  co_return out;
}

std::vector<std::string> parse_model_ids(const std::string& body) {
  std::vector<std::string> ids;
  simdjson::dom::parser parser;
  simdjson::dom::element doc;
  if (parser.parse(body).get(doc)) return ids;
  simdjson::dom::array data;
  if (doc["data"].get_array().get(data)) return ids;
  for (auto item : data) {
    std::string_view id;
    if (!item["id"].get_string().get(id)) ids.emplace_back(id);
  }
  return ids;
}

// GET /v1/models of a backend that lists no models in the config: what it serves, for
// /v1/models. False when it gave no list.
asio::awaitable<bool> discover_models(asio::io_context& ioc, Shared& shared, const Generation& gen,
                                      lb::Backend& b) {
  auto models = co_await probe(ioc, shared, gen, b, "/v1/models", gen.cfg.health_check.timeout);
  if (models.ok) b.set_discovered_models(parse_model_ids(models.body));
  co_return models.ok;
}

// One loop per backend of a generation; it ends once a reload has replaced that generation.
asio::awaitable<void> health_loop(asio::io_context* ioc, Shared* shared,
                                  std::shared_ptr<Generation> gen, std::size_t index) {
  const auto& hc = gen->cfg.health_check;
  lb::Backend* b = &gen->backends[index];
  LoopTimer wait(*gen, *ioc);
  auto& timer = wait.timer;
  for (std::uint64_t round = 0; !gen->retired.load(); ++round) {
    auto result = co_await probe(*ioc, *shared, *gen, *b, hc.path, hc.timeout);
    if (gen->retired.load()) co_return;
    if (result.local) {
      // Out of sockets here says nothing about the backend: the check is skipped.
    } else if (result.ok) {
      b->set_checked_ok();
      if (b->record_success(hc.healthy_threshold)) {
        log::line("info", "backend {} is healthy again", b->name());
      }
    } else if (b->record_failure(hc.unhealthy_threshold)) {
      log::line("warn", "backend {} marked unhealthy: health check failed: {}", b->name(),
                result.error);
    }
    // After the verdict: a client that sees this check's time sees its effect too.
    b->set_last_check(unix_ms_now());
    if (result.ok && !b->lists_models() && (round % 6 == 0 || b->discovered_models().empty())) {
      co_await discover_models(*ioc, *shared, *gen, *b);
      if (gen->retired.load()) co_return;  // retired meanwhile: no wait to cancel was there
    }
    timer.expires_after(hc.interval);
    co_await timer.async_wait(use_nothrow);
  }
}

// Without health checks: only the models of a backend that lists none in the config, for
// /v1/models (routing never depends on them). At start, then every sixth `interval` as the
// health loop does; after a failed answer sooner: one interval, doubled per failure up to six.
asio::awaitable<void> models_loop(asio::io_context* ioc, Shared* shared,
                                  std::shared_ptr<Generation> gen, std::size_t index) {
  const auto& hc = gen->cfg.health_check;
  lb::Backend* b = &gen->backends[index];
  LoopTimer wait(*gen, *ioc);
  auto& timer = wait.timer;
  int failed = 0;
  while (!gen->retired.load()) {
    const bool ok = co_await discover_models(*ioc, *shared, *gen, *b);
    if (gen->retired.load()) co_return;
    failed = ok ? 0 : std::min(failed + 1, 4);  // 1, 2, 4, then 6 intervals
    timer.expires_after(failed == 0 ? 6 * hc.interval
                                    : std::min(6, 1 << (failed - 1)) * hc.interval);
    co_await timer.async_wait(use_nothrow);
  }
}

void start_health_checks(asio::io_context& control, Shared& shared,
                         const std::shared_ptr<Generation>& gen) {
  const bool checks = gen->cfg.health_check.enabled;
  for (std::size_t i = 0; i < gen->backends.size(); ++i) {
    if (checks) {
      asio::co_spawn(control, health_loop(&control, &shared, gen, i), asio::detached);
    } else if (!gen->backends[i].lists_models()) {
      asio::co_spawn(control, models_loop(&control, &shared, gen, i), asio::detached);
    }
  }
}

std::vector<int> metric_ids(BackendLabels& labels, const config::Config& cfg) {
  std::vector<int> ids;
  for (const auto& b : cfg.backends) ids.push_back(labels.id(b.name));
  return ids;
}

// Settings that only a restart applies: a reload keeps the running value and says so.
std::vector<std::string> keep_restart_only(const config::Config& running, config::Config& next) {
  std::vector<std::string> warnings;
  auto keep = [&](auto& now, const auto& was, std::string_view key, bool same) {
    if (same) return;
    warnings.push_back(fmt::format(
        "{} changed: it takes effect only after a restart; the running value is kept", key));
    now = was;
  };
  auto same_listen = [](const auto& a, const auto& b) { return a.to_string() == b.to_string(); };
  keep(next.listen, running.listen, "listen", same_listen(next.listen, running.listen));
  const auto& rs = running.server;
  auto& ns = next.server;
  keep(ns.workers, rs.workers, "server.workers", ns.workers == rs.workers);
  keep(ns.max_body_size, rs.max_body_size, "server.max_body_size",
       ns.max_body_size == rs.max_body_size);
  keep(ns.max_body_memory, rs.max_body_memory, "server.max_body_memory",
       ns.max_body_memory == rs.max_body_memory);
  keep(ns.max_header_size, rs.max_header_size, "server.max_header_size",
       ns.max_header_size == rs.max_header_size);
  keep(ns.max_connections, rs.max_connections, "server.max_connections",
       ns.max_connections == rs.max_connections);
  keep(ns.drain_timeout, rs.drain_timeout, "server.drain_timeout",
       ns.drain_timeout == rs.drain_timeout);
  keep(ns.access_log, rs.access_log, "server.access_log", ns.access_log == rs.access_log);
  keep(next.metrics.listen, running.metrics.listen, "metrics.listen",
       next.metrics.listen.has_value() == running.metrics.listen.has_value() &&
           (!next.metrics.listen || same_listen(*next.metrics.listen, *running.metrics.listen)));
  keep(next.upstream.ca_file, running.upstream.ca_file, "upstream.ca_file",
       next.upstream.ca_file == running.upstream.ca_file);
  const auto& ru = running.usage;
  auto& nu = next.usage;
  keep(nu.enabled, ru.enabled, "usage.enabled", nu.enabled == ru.enabled);
  keep(nu.durability, ru.durability, "usage.durability", nu.durability == ru.durability);
  keep(nu.log_path, ru.log_path, "usage.log_path", nu.log_path == ru.log_path);
  keep(nu.queue_size, ru.queue_size, "usage.queue_size", nu.queue_size == ru.queue_size);
  keep(nu.commit_interval, ru.commit_interval, "usage.commit_interval",
       nu.commit_interval == ru.commit_interval);
  keep(nu.on_backlog, ru.on_backlog, "usage.on_backlog", nu.on_backlog == ru.on_backlog);
  keep(nu.memory_max_records, ru.memory_max_records, "usage.memory_max_records",
       nu.memory_max_records == ru.memory_max_records);
  keep(nu.retention_days, ru.retention_days, "usage.retention_days",
       nu.retention_days == ru.retention_days);
  return warnings;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Gateway::Impl {
  explicit Impl(config::Config cfg) : shared(std::move(cfg)) {}
  // The usage writer reads the workers (the settled time): it stops before they go, also when
  // run() returns early.
  ~Impl() {
    if (usage) usage->stop(Clock::now());
    // Every loop's pending operations go (their sessions with them) while all workers exist.
    for (auto& w : workers) w->ioc.shut_down();
  }
  Shared shared;
  std::unique_ptr<usage::Pipeline> usage;
  std::vector<std::unique_ptr<Worker>> workers;
  asio::io_context control{1};
};

Gateway::Gateway(config::Config config) : impl_(std::make_unique<Impl>(std::move(config))) {}
Gateway::~Gateway() = default;

// Every client connection may hold an upstream one; pooled idle connections and the gateway's own
// files come on top. The soft open-file limit (1024 under systemd unless LimitNOFILE= says
// otherwise) is raised towards that, up to the hard limit; what remains short is said at start,
// not found out from 503s under load.
void ensure_fd_limit(const config::Config& cfg, int workers) {
  const auto need = static_cast<rlim_t>(2) * static_cast<rlim_t>(cfg.server.max_connections) +
                    static_cast<rlim_t>(workers) * cfg.backends.size() *
                        static_cast<rlim_t>(cfg.upstream.max_idle_per_backend) +
                    64;
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return;
  if (lim.rlim_cur < need && lim.rlim_cur < lim.rlim_max) {
    const rlim_t was = lim.rlim_cur;
    lim.rlim_cur = std::min(need, lim.rlim_max);
    if (::setrlimit(RLIMIT_NOFILE, &lim) == 0) {
      log::line("info", "raised the open-file limit from {} to {}", static_cast<std::uint64_t>(was),
                static_cast<std::uint64_t>(lim.rlim_cur));
    } else {
      lim.rlim_cur = was;
    }
  }
  if (lim.rlim_cur < need) {
    log::line("warn",
              "the open-file limit {} (hard limit {}) is below the ~{} that server.max_connections "
              "{} may need: past it, requests needing a new upstream connection get 503 "
              "overloaded; raise LimitNOFILE= / ulimit -n or lower server.max_connections",
              static_cast<std::uint64_t>(lim.rlim_cur), static_cast<std::uint64_t>(lim.rlim_max),
              static_cast<std::uint64_t>(need), cfg.server.max_connections);
  }
}

int Gateway::run() {
  auto& shared = impl_->shared;
  const auto& cfg = shared.cfg;
  ::signal(SIGPIPE, SIG_IGN);
  ensure_fd_limit(cfg, cfg.effective_workers());

  // Upstream TLS: system trust store (or the configured CA file), peer verification on.
  error_code ec;
  if (!cfg.upstream.ca_file.empty()) {
    shared.tls.load_verify_file(cfg.upstream.ca_file, ec);
    if (ec) {
      // Checked with the configuration; a file changed since would leave the trust store empty
      // and fail every TLS backend.
      log::line("error", "upstream.ca_file \"{}\": {}", cfg.upstream.ca_file, ec.message());
      return 1;
    }
  } else {
    shared.tls.set_default_verify_paths(ec);
    if (ec) log::line("warn", "TLS trust store: {}", ec.message());
  }

  // Metering: the usage log is opened before any request can be served.
  if (cfg.usage.enabled) {
    std::vector<config::SinkConfig> sinks;
    for (const auto* sink : cfg.active_sinks()) sinks.push_back(*sink);
    try {
      impl_->usage = std::make_unique<usage::Pipeline>(cfg.usage, std::move(sinks));
    } catch (const std::exception& e) {
      log::line("error", "{}", e.what());
      return 1;
    }
    // The settled time: the oldest start among requests in flight on any worker (0, nothing
    // settled, until the workers run).
    impl_->usage->set_settled_source([&shared] {
      if (!shared.workers_ready.load(std::memory_order_acquire)) return std::int64_t{0};
      std::int64_t settled = std::numeric_limits<std::int64_t>::max();
      for (const Worker* w : shared.workers) {
        settled = std::min(settled, w->settled_ms.load(std::memory_order_acquire));
      }
      return settled;
    });
    impl_->usage->start();
    shared.usage = impl_->usage.get();
  }

  // Generation 1: the configuration as started. Reloads (SIGHUP, POST /admin/reload) replace it.
  shared.control = &impl_->control;
  const auto boot_ids = metric_ids(shared.labels, cfg);  // before the label count below
  shared.current =
      std::make_shared<Generation>(1, cfg, nullptr, boot_ids, shared.labels.names().size());
  shared.longest_connect = cfg.timeouts.connect;
  shared.reload = [&impl = *impl_]() -> ReloadResult {
    Shared& sh = impl.shared;
    ReloadResult r;
    const std::string& path = sh.cfg.source;
    auto loaded = config::load_file(path);
    auto fail = [&] {
      for (const auto& p : r.problems) log::line("error", "reload: {}", p);
      sh.reloads_failed.fetch_add(1);
      log::line("error", "reload of {} failed ({} problem{}); the running configuration is kept",
                path, r.problems.size(), r.problems.size() == 1 ? "" : "s");
      return r;
    };
    if (!loaded.ok()) {
      for (const auto& e : loaded.errors) r.problems.push_back(e.to_string());
      if (r.problems.empty()) r.problems.push_back(path + ": cannot be loaded");
      return fail();
    }
    config::Config next = std::move(*loaded.config);
    r.warnings = keep_restart_only(sh.cfg, next);
    if (next.source_digest == sh.current->cfg.source_digest) {
      // Likely an edit that never reached this file: a container's single-file bind mount keeps
      // the old file when an editor saves by writing a new one and renaming it over.
      r.warnings.push_back(path +
                           " is unchanged since the running configuration was loaded (in a "
                           "container, mount the file's directory, not the file: a file an "
                           "editor replaced is not seen through a single-file bind mount)");
    }
    std::string sinks_note;
    if (sh.usage) {
      std::vector<config::SinkConfig> sinks;
      for (const auto* sink : next.active_sinks()) sinks.push_back(*sink);
      try {
        sinks_note = sh.usage->reconfigure(std::move(sinks));
      } catch (const std::exception& e) {
        // The file is valid (it loaded): a sink could not start (its log busy, a cursor not
        // stored), which is the gateway's trouble, not the file's.
        r.problems.push_back(e.what());
        r.not_applied = true;
        return fail();
      }
    }
    auto old = sh.current;
    auto ids = metric_ids(sh.labels, next);
    auto gen = std::make_shared<Generation>(old->id + 1, std::move(next), &old->backends, ids,
                                            sh.labels.names().size());
    old->retire();
    sh.current = gen;
    sh.longest_connect = std::max(sh.longest_connect, gen->cfg.timeouts.connect);
    // Workers exist before any reload can run. Each adopts in its queue's order, so reloads
    // complete in order too.
    auto pending = std::make_shared<std::atomic<std::size_t>>(sh.workers.size());
    auto adopted = [&sh, pending, id = gen->id] {
      if (pending->fetch_sub(1) != 1) return;
      sh.live_generation.store(id);
      sh.reloads_ok.fetch_add(1);
    };
    for (Worker* w : sh.workers) {
      asio::post(w->ioc, [w, gen, adopted] {
        w->adopt(gen);
        adopted();
      });
    }
    start_health_checks(impl.control, sh, gen);
    for (const auto& warning : r.warnings) log::line("warn", "reload: {}", warning);
    log::line("info", "reloaded {}: generation {}, {} backend{}{}{}", path, gen->id,
              gen->backends.size(), gen->backends.size() == 1 ? "" : "s",
              sinks_note.empty() ? "" : "; usage sinks: ", sinks_note);
    r.ok = true;
    r.generation = gen->id;
    r.backends = gen->backends.size();
    return r;
  };

  const int nworkers = cfg.effective_workers();
  std::uint16_t port = cfg.listen.port;
  if (port != 0) {
    // The workers' SO_REUSEPORT would let the gateway share a fixed port silently with any
    // process of the same user already listening there (an old instance taking half the
    // traffic). A plain bind first makes that an error; the probe is closed before the workers
    // bind.
    tcp::acceptor probe(impl_->control);
    bind_listener(probe, cfg.listen, port, false, ec);
    if (ec) {
      log::line("error", "cannot listen on {}: {}{}", cfg.listen.to_string(), ec.message(),
                ec == asio::error::address_in_use ? " (another process listens there)" : "");
      return 1;
    }
  }
  tcp::endpoint endpoint;
  for (int i = 0; i < nworkers; ++i) {
    impl_->workers.push_back(std::make_unique<Worker>(shared, i, shared.current));
    auto& acc = impl_->workers.back()->acceptor;
    bind_listener(acc, cfg.listen, port, true, ec);
    if (!ec) acc.listen(asio::socket_base::max_listen_connections, ec);
    if (!ec) acc.non_blocking(true, ec);  // accept_loop's bursts
    if (!ec && i == 0) endpoint = acc.local_endpoint(ec);
    if (ec) {
      log::line("error", "cannot listen on {}: {}", cfg.listen.to_string(), ec.message());
      return 1;
    }
    port = endpoint.port();  // port 0: the others follow the first
  }
  for (auto& wp : impl_->workers) shared.workers.push_back(wp.get());
  shared.workers_ready.store(true, std::memory_order_release);
  std::string metrics_note;
  if (cfg.metrics.listen) {
    Worker* w0 = impl_->workers.front().get();
    auto& acc = w0->metrics_acceptor.emplace(w0->ioc);
    bind_listener(acc, *cfg.metrics.listen, cfg.metrics.listen->port, false, ec);
    if (!ec) acc.listen(asio::socket_base::max_listen_connections, ec);
    tcp::endpoint mep;
    if (!ec) mep = acc.local_endpoint(ec);
    if (ec) {
      log::line("error", "cannot listen for metrics on {}: {}", cfg.metrics.listen->to_string(),
                ec.message());
      return 1;
    }
    metrics_note = fmt::format("; metrics on {}/metrics", listen_url(mep));
    asio::co_spawn(w0->ioc, metrics_accept_loop(w0, &acc), asio::detached);
  }

  for (auto& wp : impl_->workers) {
    Worker* w = wp.get();
    asio::co_spawn(w->ioc, accept_loop(w), asio::detached);
    asio::co_spawn(w->ioc, housekeeping_loop(w), asio::detached);
    w->thread = std::thread([w] {
      log::name_thread(fmt::format("worker-{}", w->id));
      for (;;) {
        try {
          w->ioc.run();
          break;
        } catch (const std::exception& e) {
          log::line("error", "worker {}: internal error, continuing: {}", w->id, e.what());
        }
      }
      w->log.flush();
    });
  }
  start_health_checks(impl_->control, shared, shared.current);
  asio::co_spawn(impl_->control, memory_trim_loop(shared), asio::detached);
  asio::signal_set hangup(impl_->control, SIGHUP);
  std::function<void(error_code, int)> on_hangup = [&](error_code hec, int) {
    if (hec) return;
    log::line("info", "SIGHUP: reloading {}", cfg.source);
    shared.reload();
    hangup.async_wait(on_hangup);
  };
  hangup.async_wait(on_hangup);

  // Shutdown: first signal drains, a second one stops at once.
  asio::signal_set signals(impl_->control, SIGINT, SIGTERM);
  asio::steady_timer drain_timer(impl_->control);
  bool stopping = false;
  Clock::time_point drain_deadline{};
  std::function<void(error_code, int)> on_signal;
  std::function<void(error_code)> on_drain_tick;
  auto stop_all = [&] {
    for (auto& wp : impl_->workers) wp->ioc.stop();
    impl_->control.stop();
  };
  bool cut = false;
  on_drain_tick = [&](error_code) {
    std::int64_t open = 0;
    for (auto& wp : impl_->workers) open += wp->connections.load() + wp->metrics_connections.load();
    if (open > 0 && Clock::now() >= drain_deadline && !cut) {
      // Cut what is still running, but let each request end through log() (its usage record)
      // for a moment before the event loops stop.
      cut = true;
      log::line("warn", "drain timeout: cutting {} connections", open);
      for (auto& wp : impl_->workers) {
        Worker* w = wp.get();
        asio::post(w->ioc, [w] {
          for (auto* s : w->sessions) s->abort();
        });
      }
      // The grace outlasts a connect under way (a retry's, or /tokenize's), which nothing cuts.
      drain_deadline = Clock::now() + std::max<Clock::duration>(
                                          std::chrono::seconds(2),
                                          shared.longest_connect + std::chrono::milliseconds(500));
    } else if (open == 0 || Clock::now() >= drain_deadline) {
      if (open > 0) log::line("warn", "closing {} connections that did not end", open);
      stop_all();
      return;
    }
    drain_timer.expires_after(std::chrono::milliseconds(20));
    drain_timer.async_wait(on_drain_tick);
  };
  on_signal = [&](error_code sec, int signo) {
    if (sec) return;
    if (stopping) {
      log::line("warn", "second signal: stopping now");
      stop_all();
      return;
    }
    stopping = true;
    log::line("info", "signal {}: draining (up to {} ms)", signo, cfg.server.drain_timeout.count());
    shared.draining.store(true);
    hangup.cancel();
    for (auto& wp : impl_->workers) {
      Worker* w = wp.get();
      asio::post(w->ioc, [w] { w->begin_drain(); });
    }
    drain_deadline = Clock::now() + cfg.server.drain_timeout;
    drain_timer.expires_after(std::chrono::milliseconds(10));
    drain_timer.async_wait(on_drain_tick);
    signals.async_wait(on_signal);
  };
  signals.async_wait(on_signal);
  if (cfg.admin.token.empty() && !cfg.listen.loopback()) {
    log::line("info",
              "the admin API has no token (admin.token): on {} it answers loopback clients only "
              "(403 to others; behind a reverse proxy on this host every client is loopback)",
              cfg.listen.to_string());
  }
  // Printed only now: a SIGTERM right after this line must find the handler installed.
  const std::size_t nbackends = shared.current->backends.size();
  // Through the access log's writer: never blocks on a full pipe, never inside an access line.
  log::stdout_lines().write(fmt::format("llmproxy: listening on {} ({} worker{}, {} backend{}){}\n",
                                        listen_url(endpoint), nworkers, nworkers == 1 ? "" : "s",
                                        nbackends, nbackends == 1 ? "" : "s", metrics_note));

  impl_->control.run();
  shared.names.close();  // no lookup posts to an event loop from here on
  for (auto& wp : impl_->workers) {
    wp->ioc.stop();
    if (wp->thread.joinable()) wp->thread.join();
  }
  // A request still running now (a second signal stopped the event loops, or one that did not
  // end within the drain deadline's grace) was cut without its usage record: said, made the exit
  // status, and for the ledger the stop is not clean (the threads are joined: the sessions are
  // still). A metrics scrape makes no record.
  std::size_t cut_requests = 0;
  for (auto& wp : impl_->workers) {
    for (auto* s : wp->sessions) {
      if (!s->metrics_only() && s->busy_since() != Clock::time_point::max()) ++cut_requests;
    }
  }
  if (cut_requests > 0) {
    log::line("error", "stopped with {} request{} in flight{}", cut_requests,
              cut_requests == 1 ? "" : "s",
              impl_->usage ? ": cut without usage records (the usage ledger reports the gap)" : "");
  }
  if (impl_->usage) {
    if (cut_requests > 0) impl_->usage->note_requests_lost();
    // Every record of a finished request is in the queue now: it goes into the log, and the
    // sinks get a few seconds to deliver; what they do not stays in the log for the next start.
    impl_->usage->stop(Clock::now() + std::min<std::chrono::milliseconds>(cfg.server.drain_timeout,
                                                                          std::chrono::seconds(5)));
    shared.usage = nullptr;
  }
  log::line("info", "stopped");
  // The signal_set goes with this frame and puts the default action back: a SIGTERM from then on
  // would end the stopped process as killed (143). Held pending on this thread (the only one
  // left) until main() ignores them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  ::pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  return cut_requests > 0 ? kExitRequestsCut : 0;
}

}  // namespace llmproxy::proxy
