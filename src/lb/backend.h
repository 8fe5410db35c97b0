// The set of upstream backends and their live state (health, in-flight requests).
//
// A BackendSet is built once from the config and shared by every worker thread; its state is
// atomics only, so reading it on the request path takes no lock. Health flips only after N
// consecutive results in the other direction (active checks and passive failures both count).
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

class Backend {
 public:
  Backend(std::size_t index, config::BackendConfig cfg);

  std::size_t index() const { return index_; }
  const config::BackendConfig& config() const { return cfg_; }
  const std::string& name() const { return cfg_.name; }
  int weight() const { return cfg_.weight; }

  // A backend that lists no models accepts any; an empty model accepts any backend.
  bool serves(std::string_view model) const;
  bool lists_models() const { return !cfg_.models.empty(); }

  bool healthy() const { return healthy_.load(std::memory_order_relaxed); }
  std::int64_t in_flight() const { return in_flight_.load(std::memory_order_relaxed); }
  int consecutive_failures() const { return failures_.load(std::memory_order_relaxed); }
  std::int64_t last_check_unix_ms() const { return last_check_ms_.load(std::memory_order_relaxed); }

  // Health bookkeeping; both return true when the call flipped the health state.
  bool record_success(int healthy_threshold);
  bool record_failure(int unhealthy_threshold);
  void set_last_check(std::int64_t unix_ms) {
    last_check_ms_.store(unix_ms, std::memory_order_relaxed);
  }

  void add_in_flight(int delta) { in_flight_.fetch_add(delta, std::memory_order_relaxed); }

  // Metering: the backend answered /tokenize with 404/405/501 once; not asked again.
  bool tokenize_unsupported() const { return no_tokenize_.load(std::memory_order_relaxed); }
  void set_tokenize_unsupported() const { no_tokenize_.store(true, std::memory_order_relaxed); }

  // Models the backend reported on GET /v1/models (for backends that list none in the config).
  std::vector<std::string> discovered_models() const;
  void set_discovered_models(std::vector<std::string> models);

 private:
  std::size_t index_;
  config::BackendConfig cfg_;
  std::atomic<bool> healthy_{true};
  std::atomic<int> failures_{0};
  std::atomic<int> successes_{0};
  std::atomic<std::int64_t> in_flight_{0};
  std::atomic<std::int64_t> last_check_ms_{0};
  mutable std::atomic<bool> no_tokenize_{false};  // a hint, not part of the backend's config
  mutable std::mutex discovered_mutex_;           // admin/models path only, never per request
  std::vector<std::string> discovered_;
};

class BackendSet {
 public:
  explicit BackendSet(const std::vector<config::BackendConfig>& configs);

  std::size_t size() const { return backends_.size(); }
  Backend& operator[](std::size_t i) { return *backends_[i]; }
  const Backend& operator[](std::size_t i) const { return *backends_[i]; }
  std::size_t healthy_count() const;
  // Does any backend, healthy or not, serve `model`?
  bool any_serves(std::string_view model) const;

 private:
  std::vector<std::unique_ptr<Backend>> backends_;
};

// RAII in-flight counter for one request on one backend.
class InFlightGuard {
 public:
  InFlightGuard() = default;
  explicit InFlightGuard(Backend& b) : backend_(&b) { b.add_in_flight(1); }
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
  Backend* backend_ = nullptr;
};

}  // namespace llmproxy::lb
