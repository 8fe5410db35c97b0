#include "lb/balancer.h"

#include <algorithm>

namespace llmproxy::lb {

Balancer::Balancer(BackendSet& backends, config::Strategy strategy)
    : backends_(backends),
      strategy_(strategy),
      current_(backends.size(), 0),
      eligible_(backends.size(), 0),
      loads_(backends.size(), 0) {}

Pick Balancer::pick(std::string_view model, std::span<const std::size_t> exclude) {
  const std::size_t n = backends_.size();
  bool any_serves = false;
  std::size_t count = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const Backend& b = backends_[i];
    eligible_[i] = 0;
    if (!b.serves(model)) continue;
    any_serves = true;
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
  std::int64_t total = 0;
  std::size_t best = n;
  for (std::size_t i = 0; i < n; ++i) {
    if (!eligible_[i]) continue;
    current_[i] += backends_[i].weight();
    total += backends_[i].weight();
    if (best == n || current_[i] > current_[best]) best = i;
  }
  current_[best] -= total;
  return Pick{&backends_[best], PickError::none};
}

}  // namespace llmproxy::lb
