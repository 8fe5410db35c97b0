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
  std::string host = "0.0.0.0";  // an IP literal, "::" for IPv6 any
  std::uint16_t port = 8080;
  std::string to_string() const;
};

struct Url {
  bool tls = false;
  std::string host;  // without brackets for IPv6
  std::uint16_t port = 80;
  std::string base_path;          // "" or "/prefix" without trailing slash
  std::string authority() const;  // Host header value: host[:port], port omitted when default
};

// Parses http(s)://host[:port][/path]; returns an error message on failure.
std::optional<Url> parse_url(std::string_view text, std::string* error);

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
};

struct UsageHook {
  bool enabled = false;
  std::string url;
  Millis timeout{1'000};
  int retry = 2;
};

struct Config {
  std::string source;  // file the config came from
  ListenAddress listen;
  ServerConfig server;
  Timeouts timeouts;
  LoadBalancing load_balancing;
  UpstreamConfig upstream;
  std::vector<BackendConfig> backends;
  HealthCheck health_check;
  UsageHook usage_hook;

  int effective_workers() const;
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
LoadResult load_string(std::string_view yaml, const std::string& file_name);

// The effective configuration as YAML, every key with its value (defaults included).
std::string to_yaml(const Config& config);

}  // namespace llmproxy::config
