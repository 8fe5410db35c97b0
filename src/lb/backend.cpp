#include "lb/backend.h"

#include <algorithm>

namespace llmproxy::lb {

Backend::Backend(std::size_t index, config::BackendConfig cfg)
    : index_(index), cfg_(std::move(cfg)) {}

bool Backend::serves(std::string_view model) const {
  if (cfg_.models.empty() || model.empty()) return true;
  return std::find(cfg_.models.begin(), cfg_.models.end(), model) != cfg_.models.end();
}

bool Backend::record_success(int healthy_threshold) {
  failures_.store(0, std::memory_order_relaxed);
  int s = successes_.fetch_add(1, std::memory_order_relaxed) + 1;
  if (!healthy_.load(std::memory_order_relaxed) && s >= healthy_threshold) {
    bool expected = false;
    return healthy_.compare_exchange_strong(expected, true);
  }
  return false;
}

bool Backend::record_failure(int unhealthy_threshold) {
  successes_.store(0, std::memory_order_relaxed);
  int f = failures_.fetch_add(1, std::memory_order_relaxed) + 1;
  if (healthy_.load(std::memory_order_relaxed) && f >= unhealthy_threshold) {
    bool expected = true;
    return healthy_.compare_exchange_strong(expected, false);
  }
  return false;
}

std::vector<std::string> Backend::discovered_models() const {
  std::lock_guard lock(discovered_mutex_);
  return discovered_;
}

void Backend::set_discovered_models(std::vector<std::string> models) {
  std::lock_guard lock(discovered_mutex_);
  discovered_ = std::move(models);
}

BackendSet::BackendSet(const std::vector<config::BackendConfig>& configs) {
  backends_.reserve(configs.size());
  for (std::size_t i = 0; i < configs.size(); ++i) {
    backends_.push_back(std::make_unique<Backend>(i, configs[i]));
  }
}

std::size_t BackendSet::healthy_count() const {
  std::size_t n = 0;
  for (const auto& b : backends_) n += b->healthy() ? 1 : 0;
  return n;
}

bool BackendSet::any_serves(std::string_view model) const {
  return std::any_of(backends_.begin(), backends_.end(),
                     [&](const auto& b) { return b->serves(model); });
}

}  // namespace llmproxy::lb
