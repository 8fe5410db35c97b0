// The gateway's configuration: YAML parsed once into immutable structs.
//
// The seed's keys (listen, backends[].url/weight, usage_hook.*, health_check.interval/path) keep
// their meaning; everything else is an extension with a default. Loading never stops at the first
// problem: it returns every error it found, each with file, line, column and key path, so that an
// operator fixes a file in one round trip.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace llmproxy::config {

using Millis = std::chrono::milliseconds;

struct ListenAddress {
  // An IP literal ("0.0.0.0": every IPv4 address, "::": every IPv6 one); empty (":PORT", the
  // default) for every address of both, as the seed's Go listener reads it.
  std::string host;
  std::uint16_t port = 8080;
  std::string to_string() const;
  bool loopback() const;  // reachable from this machine only (127.0.0.0/8, ::1)
};

struct Url {
  bool tls = false;
  std::string host;  // without brackets for IPv6
  std::uint16_t port = 80;
  std::string base_path;          // "" or "/prefix" without trailing slash
  std::string authority() const;  // Host header value: host[:port], port omitted when default
};

// Parses http(s)://host[:port][/path]; returns an error message on failure. With `allow_query`
// (webhook URLs: some receivers take their credentials there), a query may follow the path; it is
// left out of base_path. A fragment is never accepted.
std::optional<Url> parse_url(std::string_view text, std::string* error, bool allow_query = false);

// The request-target in origin form (path and query; "/" for an empty path) of an absolute
// http(s) URL: "http://h:1/a?q" -> "/a?q", "http://h:1?q" -> "/?q". None for anything else (a
// target already in origin form). Used for webhook URLs and absolute-form request targets.
std::optional<std::string> origin_form(std::string_view url);

// `url` with its query, if any, replaced by "<redacted>": for logs and printed configurations.
std::string redact_query(std::string_view url);

struct BackendConfig {
  std::string name;  // defaults to the URL
  std::string url;
  Url parsed;
  int weight = 1;
  std::vector<std::string> models;  // empty: accepts any model
};

enum class Strategy { weighted_round_robin, least_in_flight };
std::string_view to_string(Strategy s);

struct ServerConfig {
  int workers = 0;  // 0: one per CPU core
  std::uint64_t max_body_size = 10ull * 1024 * 1024;
  // All request bodies held in memory at once (each counted as its bytes arrive, until the
  // backend's answer begins): beyond it, 503 overloaded.
  std::uint64_t max_body_memory = 1ull << 30;
  std::uint64_t max_header_size = 16 * 1024;
  int max_connections = 8192;
  Millis drain_timeout{30'000};
  bool access_log = true;
};

struct Timeouts {
  Millis connect{3'000};
  Millis first_byte{300'000};  // long prompts take a while to prefill
  Millis stream_idle{120'000};
  Millis client_header{15'000};
  Millis keepalive{75'000};
};

struct LoadBalancing {
  Strategy strategy = Strategy::weighted_round_robin;
  int max_retries = 1;
};

struct UpstreamConfig {
  int max_idle_per_backend = 64;  // per worker thread
  Millis idle_timeout{30'000};
  bool tls_verify = true;
  std::string ca_file;
};

struct HealthCheck {
  bool enabled = true;
  Millis interval{10'000};
  std::string path = "/health";
  Millis timeout{2'000};
  int unhealthy_threshold = 3;
  int healthy_threshold = 2;
  // Whether a backend's 5xx answers to requests count as passive failures (connect errors,
  // timeouts and resets before the answer always do). Off: one client retrying a request that
  // a backend answers 500 or 503 must not take that backend out for everyone.
  bool passive_5xx = false;
};

// One webhook that receives usage records. The seed's `usage_hook` is the sink named
// "usage_hook"; `usage.sinks[]` adds more, each with its own cursor in the usage log.
struct SinkConfig {
  std::string name;
  bool enabled = false;  // usage_hook: the seed's switch; usage.sinks[] entries default to true
  std::string url;
  Url parsed;
  Millis timeout{1'000};       // one POST, connect included
  int retry = 2;               // quick retries (exponential backoff + jitter) before the slow lane
  Millis max_backoff{30'000};  // cap of the slow lane: retried from the log until it succeeds
  int batch_size = 1;          // 1: one JSON object per POST (the seed's format); >1: JSON arrays
  Millis batch_interval{200};  // longest wait to fill a batch
  std::vector<std::pair<std::string, std::string>> headers;  // extra request headers
  std::string secret;   // non-empty: X-LLMProxy-Signature (HMAC-SHA256 over "<t>.<body>")
  bool replay = false;  // a sink new to the log starts at its head unless replay is set
};
using UsageHook = SinkConfig;

enum class Durability { disk, memory };
enum class OnBacklog { reject, serve };
enum class ApiKeyMode { full, masked, sha256 };
std::string_view to_string(Durability d);
std::string_view to_string(OnBacklog b);
std::string_view to_string(ApiKeyMode m);

struct UsageConfig {
  bool enabled = true;  // records are made and logged (the ledger) even without a webhook
  Durability durability = Durability::disk;
  std::string log_path = "data/usage.db";
  int queue_size = 50'000;     // records waiting for the log writer; the backlog bound
  Millis commit_interval{10};  // group commit window: the writer gathers records this long
  OnBacklog on_backlog = OnBacklog::reject;
  int memory_max_records = 1'000'000;  // durability: memory: undelivered records held at most
  int retention_days = 30;             // delivered records older than this are deleted
  bool inject_stream_usage = true;     // add stream_options.include_usage upstream
  bool tokenize = true;                // prompt tokens from the backend's /tokenize when no usage
  std::string user_header = "X-User-Id";
  ApiKeyMode api_key = ApiKeyMode::full;
  std::uint64_t max_response_copy = 1024 * 1024;  // non-stream bodies read for usage
  std::vector<SinkConfig> sinks;                  // usage.sinks
};

struct AdminConfig {
  std::string token;  // non-empty: /admin/* need "Authorization: Bearer <token>"
};

struct MetricsConfig {
  // Set: /metrics is served on this address only (e.g. an internal interface), not on `listen`.
  std::optional<ListenAddress> listen;
};

struct Config {
  std::string source;  // file the config came from
  // The text it was read from, hashed: a reload can tell an unchanged file.
  std::size_t source_digest = 0;
  ListenAddress listen;
  ServerConfig server;
  Timeouts timeouts;
  LoadBalancing load_balancing;
  UpstreamConfig upstream;
  std::vector<BackendConfig> backends;
  HealthCheck health_check;
  UsageHook usage_hook;
  UsageConfig usage;
  AdminConfig admin;
  MetricsConfig metrics;

  // server.workers, or when 0 usable_cpus().
  int effective_workers() const;
  // Every enabled sink: usage_hook (named "usage_hook") first, then usage.sinks in order.
  std::vector<const SinkConfig*> active_sinks() const;
};

struct ConfigError {
  std::string file;
  int line = 0;  // 1-based; 0 when unknown
  int column = 0;
  std::string key_path;
  std::string message;
  std::string to_string() const;  // "file:line:col: key.path: message"
};

struct LoadResult {
  std::optional<Config> config;
  std::vector<ConfigError> errors;
  bool ok() const { return config.has_value() && errors.empty(); }
};

LoadResult load_file(const std::string& path);
// The CPUs this process may use: its affinity mask (taskset, a cpuset), lowered to a cgroup's CPU
// quota rounded up (docker --cpus, a Kubernetes limit), at least 1. Not the machine's count:
// worker threads beyond these are throttled, not run.
int usable_cpus();
// A cgroup v2 cpu.max ("200000 100000": quota and period in µs) as CPUs; nullopt for "max"
// (no quota) or text that is not one.
std::optional<double> cpu_max_cpus(std::string_view text);

LoadResult load_string(std::string_view yaml, const std::string& file_name);

// The effective configuration as YAML, every key with its value (defaults included).
std::string to_yaml(const Config& config);

}  // namespace llmproxy::config
