// Request metrics without locks or shared cache lines on the request path.
//
// Each worker thread owns one WorkerMetrics and is the only one to write it: plain integers,
// no atomics. A scrape asks every worker, on its own thread, for a copy (a message through its
// event loop), merges the copies and renders them with prometheus-cpp's text serializer. So a
// request pays a hash lookup and a few additions; the cost of consistency is paid per scrape.
//
// Names: the original product's public ones (llmproxy_requests_total{path,stream,backend,status},
// llmproxy_latency_ms, llmproxy_webhook_success_total, llmproxy_webhook_failure_total,
// llmproxy_usage_tokens_total{type}) exactly, plus conventional and LLM-specific ones.
// Label values are bounded: routes, backends from the config, status codes, fixed kinds.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace llmproxy::metrics {

// Milliseconds. llmproxy_latency_ms and llmproxy_request_duration_seconds are the same
// observations rendered in two units. Up to 20 minutes: a long generation streams for longer
// than 5, and first_byte alone may wait 5 (above the top bucket a quantile reads as that bucket).
inline constexpr std::array<double, 20> kLatencyBoundsMs = {
    1,    2.5,  5,     10,    25,    50,    100,    250,    500,    1000,
    2500, 5000, 10000, 15000, 30000, 60000, 120000, 300000, 600000, 1200000};
inline constexpr std::array<double, 14> kGapBoundsMs = {0.25, 0.5, 1,   2.5, 5,    10,   25,
                                                        50,   100, 250, 500, 1000, 2500, 10000};

class Histogram {
 public:
  explicit Histogram(std::size_t bounds = 0) : counts_(bounds + 1, 0) {}
  void observe(double value, std::span<const double> bounds);
  void merge(const Histogram& other);
  const std::vector<std::uint64_t>& counts() const { return counts_; }  // last: above all bounds
  double sum() const { return sum_; }
  std::uint64_t count() const { return count_; }

 private:
  std::vector<std::uint64_t> counts_;
  double sum_ = 0;
  std::uint64_t count_ = 0;
};

enum class Route : std::uint8_t {
  chat,
  completions,
  embeddings,
  models,
  health,
  ready,
  metrics,
  admin_backends,
  admin_config,
  admin_reload,
  other
};
std::string_view route_label(Route r);
// The route of a request path (without query): the inverse of route_label, one table for both.
Route route_for_path(std::string_view path);

// stream_error: a 200 stream that did not complete although its framing did: the backend ended
// it inside an event, or (metering on: only then are events read) reported an error in it.
enum class UpstreamError : std::uint8_t { connect, timeout, reset, status_5xx, stream_error };
inline constexpr std::size_t kUpstreamErrorKinds = 5;
std::string_view upstream_error_label(UpstreamError e);

inline constexpr int kNoBackend = -1;

struct WorkerMetrics {
  explicit WorkerMetrics(std::size_t backends = 0);
  // A reload added backend labels: grow the per-backend series (never shrinks, ids are stable).
  void ensure_backends(std::size_t backends);

  void request(Route route, bool stream, int backend, unsigned status, double duration_ms);
  void ttft(int backend, double ms) {
    ttft_by_backend[static_cast<std::size_t>(backend)].observe(ms, kLatencyBoundsMs);
  }
  void event_gap(double ms) { gaps.observe(ms, kGapBoundsMs); }
  void upstream_error(int backend, UpstreamError kind) {
    ++upstream_errors[static_cast<std::size_t>(backend)][static_cast<std::size_t>(kind)];
  }
  void merge(const WorkerMetrics& other);

  // Key: route (8 bits) | stream (1) | backend + 1 (32) | status (10).
  std::unordered_map<std::uint64_t, std::uint64_t> requests;
  Histogram latency{kLatencyBoundsMs.size()};
  std::vector<Histogram> ttft_by_backend;
  Histogram gaps{kGapBoundsMs.size()};
  std::vector<std::array<std::uint64_t, kUpstreamErrorKinds>> upstream_errors;
  // Per backend: the sum of request durations in ms, for /admin/backends' average (the count is
  // in `requests`: requests_to()).
  std::vector<double> backend_duration_sum_ms;
  std::uint64_t requests_to(int backend) const;
  std::uint64_t retries = 0;
  std::uint64_t client_disconnects = 0;
  std::uint64_t idle_reclaimed = 0;  // idle keep-alive connections closed at max_connections
  std::uint64_t refused = 0;         // answered by the gateway itself (4xx/5xx before forwarding)
  std::uint64_t usage_prompt_tokens = 0;
  std::uint64_t usage_completion_tokens = 0;
  std::uint64_t usage_records = 0;
  std::uint64_t usage_estimated = 0;        // records whose numbers the gateway estimated
  std::uint64_t usage_backlog_rejects = 0;  // requests refused 503 because of the usage backlog
};

// The usage pipeline's state, filled by usage::Pipeline::stats() off the request path.
struct SinkStats {
  std::string name;
  std::uint64_t delivered = 0;      // records a 2xx acknowledged
  std::uint64_t failed = 0;         // records in POSTs that failed (each attempt counts)
  std::uint64_t dead_letters = 0;   // records rejected for good (4xx other than 408/429)
  std::int64_t backlog = 0;         // records in the log after the sink's cursor
  std::uint64_t reads_damaged = 0;  // reads of the log that found the file damaged (retried)
  std::uint64_t reads_failed = 0;   // reads of the log that failed otherwise (retried)
  Histogram delivery_latency{kLatencyBoundsMs.size()};  // ms from the record's end to its 2xx
};

struct UsageStats {
  bool enabled = false;
  std::int64_t queue_depth = 0;  // records waiting for the log writer
  std::uint64_t logged = 0;      // records committed to the log
  std::uint64_t dropped = 0;     // on_backlog: serve, queue full
  std::uint64_t commits = 0;     // log transactions (group commits)
  bool log_file_lost = false;    // the file at log_path is not the one the log writes
  std::vector<SinkStats> sinks;
  // Sinks a reload removed: their counts stay in the totals (the seed's webhook counters).
  std::uint64_t removed_delivered = 0;
  std::uint64_t removed_failed = 0;  // failed attempts' records and dead letters
};

// One backend label (index: its metrics id, stable across reloads). Live state read at scrape
// time, rendered as gauges for the backends of the running configuration only; a backend that a
// reload removed keeps its counters but has no gauges.
struct BackendState {
  std::string name;
  bool up = false;
  std::int64_t in_flight = 0;
  bool current = true;
};

struct ReloadStats {
  std::uint64_t ok = 0;
  std::uint64_t failed = 0;
  std::uint64_t generation = 1;
};

struct Snapshot {
  WorkerMetrics requests;
  ReloadStats reloads;
  std::vector<BackendState> backends;
  std::int64_t open_connections = 0;
  std::uint64_t request_body_bytes = 0;   // held under server.max_body_memory
  std::uint64_t access_log_dropped = 0;   // lines stdout could not take at once
  std::uint64_t process_log_dropped = 0;  // the same on stderr
  UsageStats usage;
};

// Prometheus text exposition format 0.0.4.
std::string render(const Snapshot& snapshot);

}  // namespace llmproxy::metrics
