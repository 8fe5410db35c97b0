#include "lb/backend.h"

#include <algorithm>

namespace llmproxy::lb {

Backend::Backend(std::size_t index, config::BackendConfig cfg, std::shared_ptr<BackendLive> live,
                 int metric_id)
    : index_(index),
      cfg_(std::move(cfg)),
      live_(live ? std::move(live) : std::make_shared<BackendLive>()),
      metric_id_(metric_id) {}

bool Backend::serves(std::string_view model) const {
  if (cfg_.models.empty() || model.empty()) return true;
  return std::find(cfg_.models.begin(), cfg_.models.end(), model) != cfg_.models.end();
}

bool Backend::record_success(int healthy_threshold) {
  auto& l = *live_;
  l.failures.store(0, std::memory_order_relaxed);
  int s = l.successes.fetch_add(1, std::memory_order_relaxed) + 1;
  if (!l.healthy.load(std::memory_order_relaxed) && s >= healthy_threshold) {
    bool expected = false;
    return l.healthy.compare_exchange_strong(expected, true);
  }
  return false;
}

void Backend::record_passive_success() {
  auto& l = *live_;
  if (l.healthy.load(std::memory_order_relaxed)) l.failures.store(0, std::memory_order_relaxed);
}

bool Backend::record_failure(int unhealthy_threshold) {
  auto& l = *live_;
  l.successes.store(0, std::memory_order_relaxed);
  int f = l.failures.fetch_add(1, std::memory_order_relaxed) + 1;
  if (l.healthy.load(std::memory_order_relaxed) && f >= unhealthy_threshold) {
    bool expected = true;
    return l.healthy.compare_exchange_strong(expected, false);
  }
  return false;
}

void Backend::reset_health() {
  auto& l = *live_;
  l.failures.store(0, std::memory_order_relaxed);
  l.successes.store(0, std::memory_order_relaxed);
  // seq_cst, like the checks_on store before it (set_health_checks): a passive failure that
  // flips the backend down after this store then sees the checks off, on any CPU.
  l.healthy.store(true);
}

void Backend::set_health_checks(bool on) {
  live_->checks_on.store(on);  // before the reset: a passive failure after it sees `off`
  if (!on) reset_health();
}

std::vector<std::string> Backend::discovered_models() const {
  std::lock_guard lock(live_->discovered_mutex);
  return live_->discovered;
}

void Backend::set_discovered_models(std::vector<std::string> models) {
  std::lock_guard lock(live_->discovered_mutex);
  live_->discovered = std::move(models);
}

BackendSet::BackendSet(const std::vector<config::BackendConfig>& configs) {
  backends_.reserve(configs.size());
  for (std::size_t i = 0; i < configs.size(); ++i) {
    backends_.push_back(std::make_unique<Backend>(i, configs[i]));
  }
}

BackendSet::BackendSet(const std::vector<config::BackendConfig>& configs,
                       const BackendSet* previous, const std::vector<int>& metric_ids) {
  backends_.reserve(configs.size());
  for (std::size_t i = 0; i < configs.size(); ++i) {
    std::shared_ptr<BackendLive> live;
    if (previous) {
      for (const auto& old : previous->backends_) {
        if (old->name() == configs[i].name && old->config().url == configs[i].url) {
          live = old->live();
          break;
        }
      }
    }
    int id = i < metric_ids.size() ? metric_ids[i] : -1;
    backends_.push_back(std::make_unique<Backend>(i, configs[i], std::move(live), id));
  }
}

std::size_t BackendSet::healthy_count(bool checked_only) const {
  std::size_t n = 0;
  for (const auto& b : backends_) n += b->healthy() && (!checked_only || b->checked_ok()) ? 1 : 0;
  return n;
}

bool BackendSet::any_serves(std::string_view model) const {
  return std::any_of(backends_.begin(), backends_.end(),
                     [&](const auto& b) { return b->serves(model); });
}

}  // namespace llmproxy::lb
