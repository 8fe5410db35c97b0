// Picks the backend for one request attempt.
//
// One Balancer per worker thread: its smooth-weighted-round-robin state is thread-local, so a
// pick takes no lock and touches no shared cache line except the backends' health and in-flight
// atomics. Each thread on its own yields the exact weight ratio, so the sum over threads does too.
//
// Smooth WRR (as popularised by nginx): every eligible backend's current weight grows by its
// weight, the largest wins and pays back the total; weights 5,1,1 give a a b a c a a, not
// a a a a a b c. least_in_flight picks the smallest in_flight/weight and breaks ties with the
// same smooth WRR, so an idle pool still gets the weight ratio.
//
// The state is kept per set of backends that serve the request's model: requests for a model
// that only some backends serve must not move the rotation of the others. (With one shared
// state, m1 on {a:5, b:3} between requests for any model on {a, b, c} went 293:7, not 5:3.)
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "config/config.h"
#include "lb/backend.h"

namespace llmproxy::lb {

enum class PickError { none, no_backend_for_model, no_healthy_backend };

struct Pick {
  Backend* backend = nullptr;
  PickError error = PickError::none;
};

class Balancer {
 public:
  Balancer(BackendSet& backends, config::Strategy strategy);

  // Picks among healthy backends that serve `model`, skipping those in `exclude` (indices
  // already tried by this request). no_backend_for_model: no backend at all (healthy or not)
  // serves the model; no_healthy_backend: some do, but none is available now.
  Pick pick(std::string_view model, std::span<const std::size_t> exclude = {});

  // On a new balancer, before its first pick: takes over the rotations of `previous` (the
  // balancer of the configuration a reload replaced)
  // for the backends both have (same name and URL): a reload would otherwise restart every
  // rotation, and the heaviest backend would get the first request after each one.
  void continue_from(const Balancer& previous);

 private:
  // The smooth WRR state of one serving set: its members (a bit per backend) and one current
  // weight per backend.
  struct Rotation {
    std::vector<std::uint64_t> members;
    std::vector<std::int64_t> current;
  };
  // At most this many serving sets get a rotation of their own (they come from the models the
  // backends list, so a handful); any further set shares the first one's.
  static constexpr std::size_t kMaxRotations = 64;
  std::vector<std::int64_t>& rotation_for_serving_set();

  BackendSet& backends_;
  config::Strategy strategy_;
  std::vector<Rotation> rotations_;     // [0]: every backend serves the model (the usual case)
  std::vector<std::uint64_t> serving_;  // scratch: this pick's serving set, a bit per backend
  std::vector<std::uint8_t> eligible_;  // scratch, kept to avoid allocating per pick
  std::vector<std::int64_t> loads_;     // scratch: in_flight snapshot for least_in_flight
};

}  // namespace llmproxy::lb
