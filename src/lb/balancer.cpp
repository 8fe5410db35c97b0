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

void Balancer::continue_from(const Balancer& previous) {
  const std::size_t n = backends_.size();
  const std::size_t npos = n;
  std::vector<std::size_t> to_new(previous.backends_.size(), npos);
  for (std::size_t i = 0; i < previous.backends_.size(); ++i) {
    const Backend& old = previous.backends_[i];
    for (std::size_t j = 0; j < n; ++j) {
      if (backends_[j].name() == old.name() && backends_[j].config().url == old.config().url) {
        to_new[i] = j;
        break;
      }
    }
  }
  for (std::size_t r = 0; r < previous.rotations_.size(); ++r) {
    const Rotation& from = previous.rotations_[r];
    Rotation into{std::vector<std::uint64_t>(serving_.size(), 0), std::vector<std::int64_t>(n, 0)};
    bool any = false;
    for (std::size_t i = 0; i < to_new.size(); ++i) {
      if (to_new[i] == npos || !(from.members[i / 64] >> (i % 64) & 1)) continue;
      into.members[to_new[i] / 64] |= std::uint64_t{1} << (to_new[i] % 64);
      into.current[to_new[i]] = from.current[i];
      any = true;
    }
    if (r == 0) {
      // Every backend, before and now: the backends kept take their place in the rotation (this
      // balancer is new: the others' are 0).
      rotations_[0].current = std::move(into.current);
      continue;
    }
    // A serving set that lost every member, is now every backend or is carried already (two
    // old sets that keep the same members) is not carried.
    if (!any || into.members == rotations_[0].members) continue;
    if (std::any_of(rotations_.begin(), rotations_.end(),
                    [&](const Rotation& r) { return r.members == into.members; })) {
      continue;
    }
    if (rotations_.size() == kMaxRotations) break;
    rotations_.push_back(std::move(into));
  }
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
