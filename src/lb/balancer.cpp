#include "lb/balancer.h"

#include <algorithm>

namespace llmproxy::lb {

Balancer::Balancer(BackendSet& backends, config::Strategy strategy)
    : backends_(backends),
      strategy_(strategy),
      serving_((backends.size() + 63) / 64, 0),
      eligible_(backends.size(), 0),
      loads_(backends.size(), 0) {
  Rotation all;
  all.members.assign(serving_.size(), 0);
  for (std::size_t i = 0; i < backends.size(); ++i)
    all.members[i / 64] |= std::uint64_t{1} << (i % 64);
  all.current.assign(backends.size(), 0);
  rotations_.push_back(std::move(all));
}

std::vector<std::int64_t>& Balancer::rotation_for_serving_set() {
  for (auto& r : rotations_) {
    if (r.members == serving_) return r.current;
  }
  if (rotations_.size() == kMaxRotations) return rotations_.front().current;
  rotations_.push_back(Rotation{serving_, std::vector<std::int64_t>(backends_.size(), 0)});
  return rotations_.back().current;
}

Pick Balancer::pick(std::string_view model, std::span<const std::size_t> exclude) {
  const std::size_t n = backends_.size();
  bool any_serves = false;
  std::size_t count = 0;
  std::fill(serving_.begin(), serving_.end(), 0);
  for (std::size_t i = 0; i < n; ++i) {
    const Backend& b = backends_[i];
    eligible_[i] = 0;
    if (!b.serves(model)) continue;
    any_serves = true;
    serving_[i / 64] |= std::uint64_t{1} << (i % 64);
    if (!b.healthy()) continue;
    if (std::find(exclude.begin(), exclude.end(), i) != exclude.end()) continue;
    eligible_[i] = 1;
    ++count;
  }
  if (count == 0) {
    return Pick{nullptr,
                any_serves ? PickError::no_healthy_backend : PickError::no_backend_for_model};
  }
  if (strategy_ == config::Strategy::least_in_flight && count > 1) {
    // Keep only the backends with the smallest in_flight / weight (cross-multiplied: no division).
    // Other threads move in_flight concurrently: read each once, then compare the snapshot.
    std::int64_t best_load = -1, best_weight = 1;
    for (std::size_t i = 0; i < n; ++i) {
      if (!eligible_[i]) continue;
      loads_[i] = backends_[i].in_flight();
      std::int64_t load = loads_[i], w = backends_[i].weight();
      if (best_load < 0 || load * best_weight < best_load * w) {
        best_load = load;
        best_weight = w;
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (eligible_[i] && loads_[i] * best_weight != best_load * backends_[i].weight()) {
        eligible_[i] = 0;
      }
    }
  }
  std::vector<std::int64_t>& current = rotation_for_serving_set();
  std::int64_t total = 0;
  std::size_t best = n;
  for (std::size_t i = 0; i < n; ++i) {
    if (!eligible_[i]) continue;
    current[i] += backends_[i].weight();
    total += backends_[i].weight();
    if (best == n || current[i] > current[best]) best = i;
  }
  current[best] -= total;
  return Pick{&backends_[best], PickError::none};
}

}  // namespace llmproxy::lb
