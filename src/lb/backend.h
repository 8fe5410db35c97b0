// The set of upstream backends and their live state (health, in-flight requests).
//
// A BackendSet is built from one configuration generation and shared by every worker thread; its
// state is atomics only, so reading it on the request path takes no lock. Health flips only after
// N consecutive results in the other direction (active checks and passive failures both count).
//
// Hot reload builds a new BackendSet; a backend that keeps its name and URL keeps its live state
// (health, in-flight count, discovered models): both generations' Backend objects share one
// BackendLive, so requests still running on the old generation count where the new one looks.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.h"

namespace llmproxy::lb {

// What is known about a backend at run time, as opposed to what was configured.
struct BackendLive {
  std::atomic<bool> healthy{true};
  std::atomic<int> failures{0};
  std::atomic<int> successes{0};
  std::atomic<std::int64_t> in_flight{0};
  std::atomic<std::int64_t> last_check_ms{0};
  // An active health check has passed at least once: a backend starts healthy (requests may go
  // to it at once), but readiness waits for one proof that it answers.
  std::atomic<bool> checked_ok{false};
  std::atomic<bool> no_tokenize{false};  // a hint, not part of the backend's config
  // Health checks run in the newest generation that has this backend. Passive results count only
  // then: without checks nothing could bring a backend they marked down back up.
  std::atomic<bool> checks_on{true};
  std::mutex discovered_mutex;  // admin/models path only, never per request
  std::vector<std::string> discovered;
};

class Backend {
 public:
  // `live`: the state of the same backend in the previous generation, or null for a new one.
  // `metric_id`: the backend's index among every backend label the process has seen (stable
  // across reloads, so per-thread metrics keep counting under the same name).
  Backend(std::size_t index, config::BackendConfig cfg, std::shared_ptr<BackendLive> live = {},
          int metric_id = -1);

  std::size_t index() const { return index_; }
  // Up, with no failures or successes counted: for a configuration without health checks,
  // where nothing else could ever bring a backend that was marked down back.
  void reset_health();
  // A generation takes this backend over (at start, or in a reload): whether it runs health
  // checks. Off: the backend is up (reset_health) and passive results stop counting, also those
  // of requests still running on an older generation that had checks on.
  void set_health_checks(bool on);
  bool health_checks_on() const { return live_->checks_on.load(); }
  const config::BackendConfig& config() const { return cfg_; }
  const std::string& name() const { return cfg_.name; }
  int weight() const { return cfg_.weight; }

  // A backend that lists no models accepts any; an empty model accepts any backend.
  bool serves(std::string_view model) const;
  bool lists_models() const { return !cfg_.models.empty(); }

  int metric_id() const { return metric_id_ >= 0 ? metric_id_ : static_cast<int>(index_); }
  const std::shared_ptr<BackendLive>& live() const { return live_; }

  bool healthy() const { return live_->healthy.load(std::memory_order_relaxed); }
  std::int64_t in_flight() const { return live_->in_flight.load(std::memory_order_relaxed); }
  int consecutive_failures() const { return live_->failures.load(std::memory_order_relaxed); }
  std::int64_t last_check_unix_ms() const {
    return live_->last_check_ms.load(std::memory_order_relaxed);
  }

  // Health bookkeeping; both return true when the call flipped the health state.
  bool record_success(int healthy_threshold);
  bool record_failure(int unhealthy_threshold);
  // A request's answer: ends a healthy backend's run of failures; never brings a down one back.
  void record_passive_success();
  void set_last_check(std::int64_t unix_ms) {
    live_->last_check_ms.store(unix_ms, std::memory_order_relaxed);
  }
  bool checked_ok() const { return live_->checked_ok.load(std::memory_order_relaxed); }
  void set_checked_ok() { live_->checked_ok.store(true, std::memory_order_relaxed); }

  void add_in_flight(int delta) const {
    live_->in_flight.fetch_add(delta, std::memory_order_relaxed);
  }

  // Metering: the backend answered /tokenize with 404/405/501 once; not asked again.
  bool tokenize_unsupported() const { return live_->no_tokenize.load(std::memory_order_relaxed); }
  void set_tokenize_unsupported() const {
    live_->no_tokenize.store(true, std::memory_order_relaxed);
  }

  // Models the backend reported on GET /v1/models (for backends that list none in the config).
  std::vector<std::string> discovered_models() const;
  void set_discovered_models(std::vector<std::string> models);

 private:
  std::size_t index_;
  config::BackendConfig cfg_;
  std::shared_ptr<BackendLive> live_;
  int metric_id_;
};

class BackendSet {
 public:
  explicit BackendSet(const std::vector<config::BackendConfig>& configs);
  // A reload: backends of `previous` with the same name and URL keep their live state;
  // `metric_ids[i]` is backend i's stable metrics index.
  BackendSet(const std::vector<config::BackendConfig>& configs, const BackendSet* previous,
             const std::vector<int>& metric_ids);

  std::size_t size() const { return backends_.size(); }
  Backend& operator[](std::size_t i) { return *backends_[i]; }
  const Backend& operator[](std::size_t i) const { return *backends_[i]; }
  // Healthy backends; with `checked_only`, only those an active check has seen answer (for
  // /ready: the start state "healthy" is an assumption until then).
  std::size_t healthy_count(bool checked_only = false) const;
  // Does any backend, healthy or not, serve `model`?
  bool any_serves(std::string_view model) const;

 private:
  std::vector<std::unique_ptr<Backend>> backends_;
};

// RAII in-flight counter for one request on one backend.
class InFlightGuard {
 public:
  InFlightGuard() = default;
  explicit InFlightGuard(const Backend& b) : backend_(&b) { b.add_in_flight(1); }
  InFlightGuard(InFlightGuard&& o) noexcept : backend_(o.backend_) { o.backend_ = nullptr; }
  InFlightGuard& operator=(InFlightGuard&& o) noexcept {
    if (this != &o) {
      release();
      backend_ = o.backend_;
      o.backend_ = nullptr;
    }
    return *this;
  }
  ~InFlightGuard() { release(); }
  void release() {
    if (backend_) backend_->add_in_flight(-1);
    backend_ = nullptr;
  }

 private:
  const Backend* backend_ = nullptr;
};

}  // namespace llmproxy::lb
