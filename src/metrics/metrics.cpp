#include "metrics/metrics.h"

#include <prometheus/client_metric.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <limits>

namespace llmproxy::metrics {

namespace {

// The requests key's fields (WorkerMetrics::requests): 32 bits of backend id, which a
// process's reloads cannot exhaust (16 bits could: the id then ran into the stream bit).
constexpr int kBackendShift = 10;
constexpr int kStreamShift = 42;
constexpr int kRouteShift = 43;

// The backend id of a requests key (-1: none).
int key_backend(std::uint64_t key) {
  return static_cast<int>(static_cast<std::int64_t>((key >> kBackendShift) & 0xffffffff) - 1);
}

}  // namespace

void Histogram::observe(double value, std::span<const double> bounds) {
  auto it = std::lower_bound(bounds.begin(), bounds.end(), value);
  ++counts_[static_cast<std::size_t>(it - bounds.begin())];
  sum_ += value;
  ++count_;
}

void Histogram::merge(const Histogram& other) {
  for (std::size_t i = 0; i < counts_.size() && i < other.counts_.size(); ++i) {
    counts_[i] += other.counts_[i];
  }
  sum_ += other.sum_;
  count_ += other.count_;
}

std::string_view route_label(Route r) {
  switch (r) {
    case Route::chat:
      return "/v1/chat/completions";
    case Route::completions:
      return "/v1/completions";
    case Route::embeddings:
      return "/v1/embeddings";
    case Route::models:
      return "/v1/models";
    case Route::health:
      return "/health";
    case Route::ready:
      return "/ready";
    case Route::metrics:
      return "/metrics";
    case Route::admin_backends:
      return "/admin/backends";
    case Route::admin_config:
      return "/admin/config";
    case Route::admin_reload:
      return "/admin/reload";
    case Route::other:
      break;
  }
  return "other";
}

Route route_for_path(std::string_view path) {
  for (Route r : {Route::chat, Route::completions, Route::embeddings, Route::models, Route::health,
                  Route::ready, Route::metrics, Route::admin_backends, Route::admin_config,
                  Route::admin_reload}) {
    if (route_label(r) == path) return r;
  }
  // GET /v1/models/{id}: counted with the list (an id is no label).
  const std::string_view models = route_label(Route::models);
  if (path.size() > models.size() + 1 && path.starts_with(models) && path[models.size()] == '/') {
    return Route::models;
  }
  return Route::other;
}

std::string_view upstream_error_label(UpstreamError e) {
  switch (e) {
    case UpstreamError::connect:
      return "connect";
    case UpstreamError::timeout:
      return "timeout";
    case UpstreamError::reset:
      return "reset";
    case UpstreamError::status_5xx:
      return "5xx";
    case UpstreamError::stream_error:
      return "stream_error";
  }
  return "other";
}

WorkerMetrics::WorkerMetrics(std::size_t backends)
    : ttft_by_backend(backends, Histogram(kLatencyBoundsMs.size())),
      upstream_errors(backends, std::array<std::uint64_t, kUpstreamErrorKinds>{}),
      backend_duration_sum_ms(backends, 0.0) {}

void WorkerMetrics::ensure_backends(std::size_t backends) {
  if (ttft_by_backend.size() < backends) {
    ttft_by_backend.resize(backends, Histogram(kLatencyBoundsMs.size()));
  }
  if (upstream_errors.size() < backends) {
    upstream_errors.resize(backends, std::array<std::uint64_t, kUpstreamErrorKinds>{});
  }
  if (backend_duration_sum_ms.size() < backends) backend_duration_sum_ms.resize(backends, 0.0);
}

void WorkerMetrics::request(Route route, bool stream, int backend, unsigned status,
                            double duration_ms) {
  std::uint64_t key =
      (static_cast<std::uint64_t>(route) << kRouteShift) |
      (static_cast<std::uint64_t>(stream) << kStreamShift) |
      (static_cast<std::uint64_t>(static_cast<std::uint32_t>(backend + 1)) << kBackendShift) |
      (status & 0x3ff);
  ++requests[key];
  latency.observe(duration_ms, kLatencyBoundsMs);
  if (backend >= 0 && static_cast<std::size_t>(backend) < backend_duration_sum_ms.size()) {
    backend_duration_sum_ms[static_cast<std::size_t>(backend)] += duration_ms;
  }
}

std::uint64_t WorkerMetrics::requests_to(int backend) const {
  std::uint64_t n = 0;
  for (const auto& [key, count] : requests) {
    if (key_backend(key) == backend) n += count;
  }
  return n;
}

void WorkerMetrics::merge(const WorkerMetrics& other) {
  for (const auto& [key, n] : other.requests) requests[key] += n;
  ensure_backends(other.ttft_by_backend.size());
  latency.merge(other.latency);
  for (std::size_t i = 0; i < ttft_by_backend.size() && i < other.ttft_by_backend.size(); ++i) {
    ttft_by_backend[i].merge(other.ttft_by_backend[i]);
  }
  gaps.merge(other.gaps);
  for (std::size_t i = 0;
       i < backend_duration_sum_ms.size() && i < other.backend_duration_sum_ms.size(); ++i) {
    backend_duration_sum_ms[i] += other.backend_duration_sum_ms[i];
  }
  for (std::size_t i = 0; i < upstream_errors.size() && i < other.upstream_errors.size(); ++i) {
    for (std::size_t k = 0; k < kUpstreamErrorKinds; ++k) {
      upstream_errors[i][k] += other.upstream_errors[i][k];
    }
  }
  retries += other.retries;
  client_disconnects += other.client_disconnects;
  idle_reclaimed += other.idle_reclaimed;
  refused += other.refused;
  usage_prompt_tokens += other.usage_prompt_tokens;
  usage_completion_tokens += other.usage_completion_tokens;
  usage_records += other.usage_records;
  usage_estimated += other.usage_estimated;
  usage_backlog_rejects += other.usage_backlog_rejects;
}

namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily family(std::string name, std::string help, MetricType type) {
  MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = type;
  return f;
}

ClientMetric counter(double value, std::vector<ClientMetric::Label> labels = {}) {
  ClientMetric m;
  m.label = std::move(labels);
  m.counter.value = value;
  return m;
}

ClientMetric gauge(double value, std::vector<ClientMetric::Label> labels = {}) {
  ClientMetric m;
  m.label = std::move(labels);
  m.gauge.value = value;
  return m;
}

ClientMetric histogram(const Histogram& h, std::span<const double> bounds, double scale,
                       std::vector<ClientMetric::Label> labels = {}) {
  ClientMetric m;
  m.label = std::move(labels);
  m.histogram.sample_count = h.count();
  m.histogram.sample_sum = h.sum() * scale;
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < bounds.size(); ++i) {
    cumulative += h.counts()[i];
    m.histogram.bucket.push_back({cumulative, bounds[i] * scale});
  }
  cumulative += h.counts().back();
  m.histogram.bucket.push_back({cumulative, std::numeric_limits<double>::infinity()});
  return m;
}

// A family with one unlabelled sample (a counter or a gauge), appended to `out`.
void add_single(std::vector<MetricFamily>& out, std::string name, std::string help, MetricType type,
                double value) {
  MetricFamily f = family(std::move(name), std::move(help), type);
  f.metric.push_back(type == MetricType::Gauge ? gauge(value) : counter(value));
  out.push_back(std::move(f));
}

}  // namespace

std::string render(const Snapshot& s) {
  const auto& r = s.requests;
  std::vector<MetricFamily> out;
  auto backend_label = [&](int index) -> std::string {
    if (index < 0 || static_cast<std::size_t>(index) >= s.backends.size()) return "none";
    return s.backends[static_cast<std::size_t>(index)].name;
  };

  auto requests = family("llmproxy_requests_total",
                         "Requests served, by route, stream flag, backend and status code.",
                         MetricType::Counter);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> sorted(r.requests.begin(), r.requests.end());
  std::sort(sorted.begin(), sorted.end());
  for (const auto& [key, n] : sorted) {
    auto route = static_cast<Route>(key >> kRouteShift);
    bool stream = (key >> kStreamShift) & 1;
    const int backend = key_backend(key);
    unsigned status = key & 0x3ff;
    requests.metric.push_back(
        counter(static_cast<double>(n), {{"path", std::string(route_label(route))},
                                         {"stream", stream ? "true" : "false"},
                                         {"backend", backend_label(backend)},
                                         {"status", std::to_string(status)}}));
  }
  out.push_back(std::move(requests));

  auto latency_ms = family("llmproxy_latency_ms",
                           "Request latency in milliseconds, from the request header to the end of "
                           "the response (the original metric; see "
                           "llmproxy_request_duration_seconds).",
                           MetricType::Histogram);
  latency_ms.metric.push_back(histogram(r.latency, kLatencyBoundsMs, 1.0));
  out.push_back(std::move(latency_ms));
  auto duration = family("llmproxy_request_duration_seconds",
                         "Request latency in seconds, from the request header to the end of the "
                         "response.",
                         MetricType::Histogram);
  duration.metric.push_back(histogram(r.latency, kLatencyBoundsMs, 0.001));
  out.push_back(std::move(duration));

  auto ttft = family("llmproxy_time_to_first_token_seconds",
                     "Streams: time from the request header to the first body byte relayed to the "
                     "client, by backend.",
                     MetricType::Histogram);
  // A backend a reload removed keeps its series only when they hold something: renaming one
  // backend at every reload would otherwise add ~30 empty series each time, for good.
  for (std::size_t i = 0; i < r.ttft_by_backend.size() && i < s.backends.size(); ++i) {
    if (!s.backends[i].current && r.ttft_by_backend[i].count() == 0) continue;
    ttft.metric.push_back(histogram(r.ttft_by_backend[i], kLatencyBoundsMs, 0.001,
                                    {{"backend", s.backends[i].name}}));
  }
  out.push_back(std::move(ttft));

  auto gaps = family("llmproxy_stream_event_gap_seconds",
                     "Streams: time between two consecutive writes of stream data to a client.",
                     MetricType::Histogram);
  gaps.metric.push_back(histogram(r.gaps, kGapBoundsMs, 0.001));
  out.push_back(std::move(gaps));

  auto errors =
      family("llmproxy_upstream_errors_total",
             "Upstream failures by backend and kind (connect, timeout, reset, 5xx, stream_error).",
             MetricType::Counter);
  for (std::size_t i = 0; i < r.upstream_errors.size() && i < s.backends.size(); ++i) {
    const auto& kinds = r.upstream_errors[i];
    if (!s.backends[i].current &&
        std::all_of(kinds.begin(), kinds.end(), [](std::uint64_t n) { return n == 0; })) {
      continue;
    }
    for (std::size_t k = 0; k < kUpstreamErrorKinds; ++k) {
      errors.metric.push_back(
          counter(static_cast<double>(r.upstream_errors[i][k]),
                  {{"backend", s.backends[i].name},
                   {"kind", std::string(upstream_error_label(static_cast<UpstreamError>(k)))}}));
    }
  }
  out.push_back(std::move(errors));

  add_single(out, "llmproxy_retries_total",
             "Requests sent again after a failure before any response byte: to another "
             "backend (max_retries), or on a new connection in place of a stale pooled one.",
             MetricType::Counter, static_cast<double>(r.retries));
  add_single(out, "llmproxy_client_disconnects_total",
             "Requests whose client hung up before the response was complete.", MetricType::Counter,
             static_cast<double>(r.client_disconnects));
  add_single(out, "llmproxy_idle_connections_reclaimed_total",
             "Idle keep-alive client connections closed to make room at server.max_connections.",
             MetricType::Counter, static_cast<double>(r.idle_reclaimed));
  auto dropped = family("llmproxy_log_lines_dropped_total",
                        "Log lines dropped because their output (a pipe, socket or terminal whose "
                        "reader fell behind) could not take them at once: log=access (stdout), "
                        "process (stderr).",
                        MetricType::Counter);
  dropped.metric.push_back(counter(static_cast<double>(s.access_log_dropped), {{"log", "access"}}));
  dropped.metric.push_back(
      counter(static_cast<double>(s.process_log_dropped), {{"log", "process"}}));
  out.push_back(std::move(dropped));

  auto up =
      family("llmproxy_backend_up", "1 when the backend is healthy, else 0.", MetricType::Gauge);
  auto in_flight = family("llmproxy_backend_in_flight_requests",
                          "Requests currently being served by the backend.", MetricType::Gauge);
  for (const auto& b : s.backends) {
    if (!b.current) continue;
    up.metric.push_back(gauge(b.up ? 1 : 0, {{"backend", b.name}}));
    in_flight.metric.push_back(gauge(static_cast<double>(b.in_flight), {{"backend", b.name}}));
  }
  out.push_back(std::move(up));
  out.push_back(std::move(in_flight));
  add_single(out, "llmproxy_open_connections", "Open client connections.", MetricType::Gauge,
             static_cast<double>(s.open_connections));
  add_single(out, "llmproxy_request_body_bytes",
             "Request body memory held now, bounded by server.max_body_memory.", MetricType::Gauge,
             static_cast<double>(s.request_body_bytes));
  auto reloads =
      family("llmproxy_config_reloads_total",
             "Configuration reloads (SIGHUP, POST /admin/reload) by result.", MetricType::Counter);
  reloads.metric.push_back(counter(static_cast<double>(s.reloads.ok), {{"result", "ok"}}));
  reloads.metric.push_back(counter(static_cast<double>(s.reloads.failed), {{"result", "failed"}}));
  out.push_back(std::move(reloads));
  add_single(out, "llmproxy_config_generation",
             "The running configuration's generation: 1 at start, +1 per successful reload.",
             MetricType::Gauge, static_cast<double>(s.reloads.generation));

  // Usage metering. The original names count records: a webhook success is a record a sink's
  // receiver acknowledged with 2xx, a failure a record in a POST that failed (each attempt).
  const auto& u = s.usage;
  std::uint64_t delivered = u.removed_delivered, failed = u.removed_failed;
  for (const auto& sink : u.sinks) {
    delivered += sink.delivered;
    failed += sink.failed + sink.dead_letters;  // a record rejected for good failed too
  }
  add_single(out, "llmproxy_webhook_success_total",
             "Usage records delivered to a webhook (2xx), over all sinks.", MetricType::Counter,
             static_cast<double>(delivered));
  add_single(out, "llmproxy_webhook_failure_total",
             "Usage records in webhook deliveries that failed (each attempt, and each "
             "record a receiver rejected for good), over all sinks.",
             MetricType::Counter, static_cast<double>(failed));
  auto tokens =
      family("llmproxy_usage_tokens_total", "Tokens metered, by type.", MetricType::Counter);
  tokens.metric.push_back(
      counter(static_cast<double>(r.usage_prompt_tokens), {{"type", "prompt"}}));
  tokens.metric.push_back(
      counter(static_cast<double>(r.usage_completion_tokens), {{"type", "completion"}}));
  out.push_back(std::move(tokens));

  auto records = family("llmproxy_usage_records_total",
                        "Usage records made, by where the numbers came from.", MetricType::Counter);
  records.metric.push_back(
      counter(static_cast<double>(r.usage_records - r.usage_estimated), {{"source", "backend"}}));
  records.metric.push_back(
      counter(static_cast<double>(r.usage_estimated), {{"source", "estimated"}}));
  out.push_back(std::move(records));
  add_single(out, "llmproxy_usage_backlog_rejected_total",
             "Requests refused with 503 because the usage backlog was full.", MetricType::Counter,
             static_cast<double>(r.usage_backlog_rejects));
  add_single(
      out, "llmproxy_usage_records_dropped_total",
      "Usage records dropped: the backlog was full (on_backlog: serve), or the log could not take "
      "them before a shutdown's deadline.",
      MetricType::Counter, static_cast<double>(u.dropped));
  add_single(out, "llmproxy_usage_queue_depth",
             "Usage records waiting to be written to the usage log.", MetricType::Gauge,
             static_cast<double>(u.queue_depth));
  add_single(out, "llmproxy_usage_log_records_total", "Usage records committed to the usage log.",
             MetricType::Counter, static_cast<double>(u.logged));
  add_single(out, "llmproxy_usage_log_commits_total",
             "Usage log transactions (each commits a group of records).", MetricType::Counter,
             static_cast<double>(u.commits));
  add_single(out, "llmproxy_usage_log_file_lost",
             "1 when the file at usage.log_path was deleted or replaced while the gateway writes "
             "its log: what is not delivered when it stops is lost.",
             MetricType::Gauge, u.log_file_lost ? 1.0 : 0.0);

  auto backlog = family("llmproxy_usage_sink_backlog",
                        "Usage records in the log not yet delivered, by sink.", MetricType::Gauge);
  auto deliveries = family("llmproxy_usage_sink_records_total",
                           "Usage records by sink and result (delivered, failed, dead_letter).",
                           MetricType::Counter);
  auto read_errors =
      family("llmproxy_usage_sink_read_errors_total",
             "Failed reads of the usage log by sink, retried every 500 ms (kind: damaged, the file "
             "is damaged where the sink reads, delivery waits there; other, e.g. a lock held "
             "outside the gateway).",
             MetricType::Counter);
  auto delivery_latency = family(
      "llmproxy_usage_delivery_seconds",
      "Time from the end of a request's response to the delivery of its usage record, by sink.",
      MetricType::Histogram);
  for (const auto& sink : u.sinks) {
    backlog.metric.push_back(gauge(static_cast<double>(sink.backlog), {{"sink", sink.name}}));
    deliveries.metric.push_back(counter(static_cast<double>(sink.delivered),
                                        {{"sink", sink.name}, {"result", "delivered"}}));
    deliveries.metric.push_back(
        counter(static_cast<double>(sink.failed), {{"sink", sink.name}, {"result", "failed"}}));
    deliveries.metric.push_back(counter(static_cast<double>(sink.dead_letters),
                                        {{"sink", sink.name}, {"result", "dead_letter"}}));
    read_errors.metric.push_back(counter(static_cast<double>(sink.reads_damaged),
                                         {{"sink", sink.name}, {"kind", "damaged"}}));
    read_errors.metric.push_back(
        counter(static_cast<double>(sink.reads_failed), {{"sink", sink.name}, {"kind", "other"}}));
    delivery_latency.metric.push_back(
        histogram(sink.delivery_latency, kLatencyBoundsMs, 0.001, {{"sink", sink.name}}));
  }
  out.push_back(std::move(backlog));
  out.push_back(std::move(deliveries));
  out.push_back(std::move(read_errors));
  out.push_back(std::move(delivery_latency));

  return prometheus::TextSerializer().Serialize(out);
}

}  // namespace llmproxy::metrics
