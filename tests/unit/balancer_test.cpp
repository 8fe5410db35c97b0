// Unit tests for the backend set and the balancer (lb/backend.h, lb/balancer.h): smooth weighted
// round robin, health filtering, exclusion, model routing, least_in_flight and health thresholds.
#include "lb/balancer.h"

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lb/backend.h"

namespace llmproxy::lb {
namespace {

using config::BackendConfig;
using config::Strategy;

BackendConfig backend(std::string name, int weight, std::vector<std::string> models = {}) {
  BackendConfig b;
  b.name = name;
  b.url = "http://" + name + ":8000";
  b.parsed.host = name;
  b.parsed.port = 8000;
  b.weight = weight;
  b.models = std::move(models);
  return b;
}

// Picks `n` times and returns the names in order; an error pick is recorded as "!".
std::vector<std::string> picks(Balancer& lb, int n, std::string_view model = "",
                               std::span<const std::size_t> exclude = {}) {
  std::vector<std::string> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) {
    Pick p = lb.pick(model, exclude);
    out.push_back(p.backend ? p.backend->name() : "!");
  }
  return out;
}

std::map<std::string, int> count(const std::vector<std::string>& seq) {
  std::map<std::string, int> out;
  for (const auto& s : seq) ++out[s];
  return out;
}

void mark_down(Backend& b) {
  b.record_failure(1);
  ASSERT_FALSE(b.healthy());
}

void mark_up(Backend& b) {
  b.record_success(1);
  ASSERT_TRUE(b.healthy());
}

// ---------------------------------------------------------------------------------------------
// Weighted round robin

TEST(WeightedRoundRobin, ExactRatioOverFullCycles) {
  BackendSet set({backend("a", 5), backend("b", 3)});
  Balancer lb(set, Strategy::weighted_round_robin);
  auto c = count(picks(lb, 800));
  EXPECT_EQ(c["a"], 500);
  EXPECT_EQ(c["b"], 300);
  EXPECT_EQ(c.count("!"), 0u);
}

TEST(WeightedRoundRobin, AReloadContinuesTheRotationOfTheBackendsItKeeps) {
  const std::vector<BackendConfig> configs = {backend("a", 5), backend("b", 3)};
  BackendSet reference_set(configs);
  Balancer reference(reference_set, Strategy::weighted_round_robin);
  const auto want = picks(reference, 16);
  // A reload (a new set and balancer) before every pick: the same sequence as none.
  std::vector<std::unique_ptr<BackendSet>> sets;
  std::vector<std::unique_ptr<Balancer>> balancers;
  std::vector<std::string> got;
  for (int i = 0; i < 16; ++i) {
    sets.push_back(std::make_unique<BackendSet>(configs));
    balancers.push_back(std::make_unique<Balancer>(*sets.back(), Strategy::weighted_round_robin));
    if (i > 0) balancers.back()->continue_from(*balancers[balancers.size() - 2]);
    got.push_back(picks(*balancers.back(), 1).at(0));
  }
  EXPECT_EQ(got, want);
  // Weights 1:1 with a reload before each of 10 requests: 5 each (all went to a before).
  BackendSet even_set({backend("a", 1), backend("b", 1)});
  auto prev = std::make_unique<Balancer>(even_set, Strategy::weighted_round_robin);
  std::map<std::string, int> c;
  for (int i = 0; i < 10; ++i) {
    auto next = std::make_unique<Balancer>(even_set, Strategy::weighted_round_robin);
    next->continue_from(*prev);
    ++c[picks(*next, 1).at(0)];
    prev = std::move(next);
  }
  EXPECT_EQ(c["a"], 5);
  EXPECT_EQ(c["b"], 5);
  // A serving set of its own (model m on a and c) continues too; a backend added starts at 0.
  BackendSet before({backend("a", 1, {"m"}), backend("b", 1, {"n"}), backend("c", 1, {"m"})});
  Balancer old_lb(before, Strategy::weighted_round_robin);
  EXPECT_EQ(picks(old_lb, 1, "m").at(0), "a");
  BackendSet after({backend("a", 1, {"m"}), backend("b", 1, {"n"}), backend("c", 1, {"m"}),
                    backend("d", 1, {"n"})});
  Balancer new_lb(after, Strategy::weighted_round_robin);
  new_lb.continue_from(old_lb);
  EXPECT_EQ(picks(new_lb, 1, "m").at(0), "c");
}

TEST(WeightedRoundRobin, EveryCycleHasTheExactRatio) {
  BackendSet set({backend("a", 5), backend("b", 3)});
  Balancer lb(set, Strategy::weighted_round_robin);
  for (int cycle = 0; cycle < 20; ++cycle) {
    auto c = count(picks(lb, 8));
    EXPECT_EQ(c["a"], 5) << "cycle " << cycle;
    EXPECT_EQ(c["b"], 3) << "cycle " << cycle;
  }
}

TEST(WeightedRoundRobin, SmoothSequenceFor511) {
  BackendSet set({backend("a", 5), backend("b", 1), backend("c", 1)});
  Balancer lb(set, Strategy::weighted_round_robin);
  const std::vector<std::string> expected = {"a", "a", "b", "a", "c", "a", "a"};
  for (int cycle = 0; cycle < 10; ++cycle) {
    EXPECT_EQ(picks(lb, 7), expected) << "cycle " << cycle;
  }
}

TEST(WeightedRoundRobin, SmoothNoLightBackendTwiceInARow) {
  BackendSet set({backend("a", 5), backend("b", 1), backend("c", 1)});
  Balancer lb(set, Strategy::weighted_round_robin);
  auto seq = picks(lb, 700);
  auto c = count(seq);
  EXPECT_EQ(c["a"], 500);
  EXPECT_EQ(c["b"], 100);
  EXPECT_EQ(c["c"], 100);
  for (std::size_t i = 1; i < seq.size(); ++i) {
    if (seq[i] == "b" || seq[i] == "c") {
      EXPECT_NE(seq[i - 1], seq[i]) << "at pick " << i;
      EXPECT_EQ(seq[i - 1], "a") << "weight-1 backends should be separated by a, at pick " << i;
    }
  }
}

TEST(WeightedRoundRobin, EqualWeightsAlternate) {
  BackendSet set({backend("a", 1), backend("b", 1), backend("c", 1)});
  Balancer lb(set, Strategy::weighted_round_robin);
  EXPECT_EQ(picks(lb, 6), (std::vector<std::string>{"a", "b", "c", "a", "b", "c"}));
}

TEST(WeightedRoundRobin, SingleBackend) {
  BackendSet set({backend("only", 4)});
  Balancer lb(set, Strategy::weighted_round_robin);
  auto c = count(picks(lb, 10));
  EXPECT_EQ(c["only"], 10);
}

TEST(WeightedRoundRobin, IndependentBalancersEachKeepTheRatio) {
  BackendSet set({backend("a", 5), backend("b", 3)});
  Balancer one(set, Strategy::weighted_round_robin);
  Balancer two(set, Strategy::weighted_round_robin);
  std::map<std::string, int> c;
  for (int i = 0; i < 400; ++i) {
    ++c[one.pick("").backend->name()];
    ++c[two.pick("").backend->name()];
  }
  EXPECT_EQ(c["a"], 500);
  EXPECT_EQ(c["b"], 300);
}

// ---------------------------------------------------------------------------------------------
// Health and exclusion

TEST(BalancerHealth, UnhealthyBackendIsSkippedAndTheRestKeepTheirRatio) {
  BackendSet set({backend("a", 5), backend("b", 3), backend("c", 2)});
  mark_down(set[2]);
  EXPECT_EQ(set.healthy_count(), 2u);
  Balancer lb(set, Strategy::weighted_round_robin);
  auto c = count(picks(lb, 800));
  EXPECT_EQ(c["a"], 500);
  EXPECT_EQ(c["b"], 300);
  EXPECT_EQ(c.count("c"), 0u);
}

TEST(BalancerHealth, BackendGoingDownMidStream) {
  BackendSet set({backend("a", 5), backend("b", 3), backend("c", 2)});
  Balancer lb(set, Strategy::weighted_round_robin);
  picks(lb, 13);  // leave the smooth state mid-cycle
  mark_down(set[1]);
  auto c = count(picks(lb, 700));
  EXPECT_EQ(c.count("b"), 0u);
  EXPECT_NEAR(c["a"], 500, 2);
  EXPECT_NEAR(c["c"], 200, 2);
  EXPECT_EQ(c["a"] + c["c"], 700);

  mark_up(set[1]);
  auto back = count(picks(lb, 1000));
  EXPECT_NEAR(back["a"], 500, 3);
  EXPECT_NEAR(back["b"], 300, 3);
  EXPECT_NEAR(back["c"], 200, 3);
}

TEST(BalancerHealth, AllUnhealthy) {
  BackendSet set({backend("a", 1), backend("b", 1)});
  mark_down(set[0]);
  mark_down(set[1]);
  EXPECT_EQ(set.healthy_count(), 0u);
  for (Strategy s : {Strategy::weighted_round_robin, Strategy::least_in_flight}) {
    Balancer lb(set, s);
    Pick p = lb.pick("");
    EXPECT_EQ(p.backend, nullptr);
    EXPECT_EQ(p.error, PickError::no_healthy_backend);
    p = lb.pick("some-model");
    EXPECT_EQ(p.error, PickError::no_healthy_backend);
  }
}

TEST(BalancerExclude, TriedBackendsAreSkipped) {
  BackendSet set({backend("a", 5), backend("b", 3), backend("c", 1)});
  Balancer lb(set, Strategy::weighted_round_robin);
  const std::size_t tried[] = {0};
  auto c = count(picks(lb, 400, "", tried));
  EXPECT_EQ(c.count("a"), 0u);
  EXPECT_EQ(c["b"], 300);
  EXPECT_EQ(c["c"], 100);

  const std::size_t tried_two[] = {0, 2};
  auto only_b = count(picks(lb, 5, "", tried_two));
  EXPECT_EQ(only_b["b"], 5);
}

TEST(BalancerExclude, EverythingTriedIsNoHealthyBackend) {
  BackendSet set({backend("a", 1), backend("b", 1)});
  const std::size_t tried[] = {1, 0};
  for (Strategy s : {Strategy::weighted_round_robin, Strategy::least_in_flight}) {
    Balancer lb(set, s);
    Pick p = lb.pick("", tried);
    EXPECT_EQ(p.backend, nullptr);
    EXPECT_EQ(p.error, PickError::no_healthy_backend);
  }
}

TEST(BalancerExclude, RetryAfterFirstPickGoesElsewhere) {
  BackendSet set({backend("a", 1), backend("b", 1), backend("c", 1)});
  Balancer lb(set, Strategy::weighted_round_robin);
  for (int i = 0; i < 30; ++i) {
    Pick first = lb.pick("");
    ASSERT_NE(first.backend, nullptr);
    const std::size_t tried[] = {first.backend->index()};
    Pick second = lb.pick("", tried);
    ASSERT_NE(second.backend, nullptr);
    EXPECT_NE(second.backend->index(), first.backend->index());
  }
}

// ---------------------------------------------------------------------------------------------
// Model routing

TEST(BalancerModels, ListedModelsRestrictWhatABackendGets) {
  BackendSet set({backend("m1-only", 1, {"m1"}), backend("any", 1)});
  Balancer lb(set, Strategy::weighted_round_robin);
  auto m1 = count(picks(lb, 100, "m1"));
  EXPECT_EQ(m1["m1-only"], 50);
  EXPECT_EQ(m1["any"], 50);
  auto m2 = count(picks(lb, 100, "m2"));
  EXPECT_EQ(m2["any"], 100);
  EXPECT_EQ(m2.count("m1-only"), 0u);
}

// Requests for a model only some backends serve, mixed with requests any backend takes: each
// kind keeps its own weight ratio (a shared rotation gave m1 293:7 instead of 5:3 here).
TEST(BalancerModels, EachServingSetKeepsItsRatioWhenRequestsMix) {
  BackendSet set({backend("a", 5, {"m1"}), backend("b", 3, {"m1", "m2"}), backend("c", 1, {"m2"})});
  Balancer lb(set, Strategy::weighted_round_robin);
  std::vector<std::string> m1, any;
  for (int round = 0; round < 400; ++round) {
    m1.push_back(lb.pick("m1").backend->name());
    any.push_back(lb.pick("").backend->name());
    any.push_back(lb.pick("").backend->name());
  }
  auto c1 = count(m1);
  EXPECT_EQ(c1["a"], 250);  // 400 picks, 5:3
  EXPECT_EQ(c1["b"], 150);
  any.resize(88 * 9);  // whole cycles of 5:3:1
  auto c2 = count(any);
  EXPECT_EQ(c2["a"], 88 * 5);
  EXPECT_EQ(c2["b"], 88 * 3);
  EXPECT_EQ(c2["c"], 88);
}

TEST(BalancerModels, EmptyModelAcceptsAnyBackend) {
  BackendSet set({backend("a", 1, {"m1"}), backend("b", 1, {"m2"})});
  Balancer lb(set, Strategy::weighted_round_robin);
  auto c = count(picks(lb, 10, ""));
  EXPECT_EQ(c["a"], 5);
  EXPECT_EQ(c["b"], 5);
}

TEST(BalancerModels, UnknownModelWhenEveryBackendListsModels) {
  BackendSet set({backend("a", 1, {"m1"}), backend("b", 1, {"m2", "m3"})});
  EXPECT_FALSE(set.any_serves("m4"));
  EXPECT_TRUE(set.any_serves("m3"));
  for (Strategy s : {Strategy::weighted_round_robin, Strategy::least_in_flight}) {
    Balancer lb(set, s);
    Pick p = lb.pick("m4");
    EXPECT_EQ(p.backend, nullptr);
    EXPECT_EQ(p.error, PickError::no_backend_for_model);
    Pick ok = lb.pick("m3");
    ASSERT_NE(ok.backend, nullptr);
    EXPECT_EQ(ok.backend->name(), "b");
    EXPECT_EQ(ok.error, PickError::none);
  }
}

TEST(BalancerModels, ModelServedOnlyByUnhealthyBackends) {
  BackendSet set({backend("a", 1, {"m1"}), backend("b", 1, {"m2"})});
  mark_down(set[0]);
  Balancer lb(set, Strategy::weighted_round_robin);
  Pick p = lb.pick("m1");
  EXPECT_EQ(p.backend, nullptr);
  EXPECT_EQ(p.error, PickError::no_healthy_backend);
  Pick other = lb.pick("m2");
  ASSERT_NE(other.backend, nullptr);
  EXPECT_EQ(other.backend->name(), "b");
}

TEST(BalancerModels, ModelServedOnlyByExcludedBackend) {
  BackendSet set({backend("a", 1, {"m1"}), backend("b", 1, {"m2"})});
  Balancer lb(set, Strategy::weighted_round_robin);
  const std::size_t tried[] = {0};
  EXPECT_EQ(lb.pick("m1", tried).error, PickError::no_healthy_backend);
}

TEST(BackendServes, Rules) {
  Backend listing(0, backend("x", 1, {"m1", "m2"}));
  EXPECT_TRUE(listing.lists_models());
  EXPECT_TRUE(listing.serves("m1"));
  EXPECT_TRUE(listing.serves("m2"));
  EXPECT_FALSE(listing.serves("m3"));
  EXPECT_FALSE(listing.serves("M1")) << "model ids are case-sensitive";
  EXPECT_TRUE(listing.serves(""));
  Backend open(1, backend("y", 1));
  EXPECT_FALSE(open.lists_models());
  EXPECT_TRUE(open.serves("anything"));
  EXPECT_EQ(open.index(), 1u);
  EXPECT_EQ(open.name(), "y");
  EXPECT_EQ(open.config().url, "http://y:8000");
}

TEST(BackendDiscoveredModels, SetAndGet) {
  Backend b(0, backend("x", 1));
  EXPECT_TRUE(b.discovered_models().empty());
  b.set_discovered_models({"m1", "m2"});
  EXPECT_EQ(b.discovered_models(), (std::vector<std::string>{"m1", "m2"}));
  b.set_last_check(12345);
  EXPECT_EQ(b.last_check_unix_ms(), 12345);
}

// ---------------------------------------------------------------------------------------------
// least_in_flight

TEST(LeastInFlight, PicksTheLeastLoaded) {
  BackendSet set({backend("a", 1), backend("b", 1)});
  set[0].add_in_flight(3);
  Balancer lb(set, Strategy::least_in_flight);
  auto c = count(picks(lb, 10));
  EXPECT_EQ(c["b"], 10);
  EXPECT_EQ(c.count("a"), 0u);
}

TEST(LeastInFlight, FollowsTheLoadAsItChanges) {
  BackendSet set({backend("a", 1), backend("b", 1)});
  Balancer lb(set, Strategy::least_in_flight);
  set[0].add_in_flight(2);
  EXPECT_EQ(lb.pick("").backend->name(), "b");
  set[1].add_in_flight(5);
  EXPECT_EQ(lb.pick("").backend->name(), "a");
  set[1].add_in_flight(-5);
  EXPECT_EQ(lb.pick("").backend->name(), "b");
}

TEST(LeastInFlight, EqualLoadFallsBackToTheWeightRatio) {
  BackendSet set({backend("a", 5), backend("b", 3)});
  Balancer lb(set, Strategy::least_in_flight);
  auto c = count(picks(lb, 800));
  EXPECT_EQ(c["a"], 500);
  EXPECT_EQ(c["b"], 300);
}

TEST(LeastInFlight, LoadIsComparedPerUnitOfWeight) {
  // a: 2 in flight / weight 2 == b: 1 in flight / weight 1 -> tie, smooth WRR 2:1 decides.
  BackendSet set({backend("a", 2), backend("b", 1)});
  set[0].add_in_flight(2);
  set[1].add_in_flight(1);
  Balancer lb(set, Strategy::least_in_flight);
  auto seq = picks(lb, 300);
  auto c = count(seq);
  EXPECT_EQ(c["a"], 200);
  EXPECT_EQ(c["b"], 100);
  auto first = count(std::vector<std::string>(seq.begin(), seq.begin() + 3));
  EXPECT_EQ(first["a"], 2);
  EXPECT_EQ(first["b"], 1);
}

TEST(LeastInFlight, HeavierBackendTakesMoreLoad) {
  // a: 3/4 = 0.75 < b: 1/1 -> a, although it has more requests in flight.
  BackendSet set({backend("a", 4), backend("b", 1)});
  set[0].add_in_flight(3);
  set[1].add_in_flight(1);
  Balancer lb(set, Strategy::least_in_flight);
  auto c = count(picks(lb, 10));
  EXPECT_EQ(c["a"], 10);
  // 5/4 = 1.25 > 1/1 -> b.
  set[0].add_in_flight(2);
  EXPECT_EQ(lb.pick("").backend->name(), "b");
}

TEST(LeastInFlight, SkipsUnhealthyAndExcludedEvenWhenIdle) {
  BackendSet set({backend("busy", 1), backend("idle-down", 1), backend("idle-tried", 1)});
  set[0].add_in_flight(10);
  mark_down(set[1]);
  Balancer lb(set, Strategy::least_in_flight);
  const std::size_t tried[] = {2};
  auto c = count(picks(lb, 5, "", tried));
  EXPECT_EQ(c["busy"], 5);
}

TEST(LeastInFlight, RespectsModels) {
  BackendSet set({backend("a", 1, {"m1"}), backend("b", 1)});
  set[0].add_in_flight(4);
  Balancer lb(set, Strategy::least_in_flight);
  EXPECT_EQ(lb.pick("m2").backend->name(), "b");
  set[1].add_in_flight(10);
  EXPECT_EQ(lb.pick("m1").backend->name(), "a");
  EXPECT_EQ(lb.pick("m2").backend->name(), "b");
}

// ---------------------------------------------------------------------------------------------
// Health thresholds

TEST(BackendHealth, FailuresMustBeConsecutive) {
  Backend b(0, backend("x", 1));
  EXPECT_TRUE(b.healthy());
  EXPECT_FALSE(b.record_failure(3));
  EXPECT_FALSE(b.record_failure(3));
  EXPECT_TRUE(b.healthy());
  EXPECT_EQ(b.consecutive_failures(), 2);
  EXPECT_FALSE(b.record_success(2));  // resets the failure streak
  EXPECT_EQ(b.consecutive_failures(), 0);
  EXPECT_FALSE(b.record_failure(3));
  EXPECT_FALSE(b.record_failure(3));
  EXPECT_TRUE(b.healthy()) << "a success in between must reset the count";
  EXPECT_TRUE(b.record_failure(3)) << "the third consecutive failure flips the state";
  EXPECT_FALSE(b.healthy());
  EXPECT_FALSE(b.record_failure(3)) << "already down: no flip to report";
  EXPECT_FALSE(b.healthy());
}

TEST(BackendHealth, SuccessesMustBeConsecutiveToComeBack) {
  Backend b(0, backend("x", 1));
  ASSERT_TRUE(b.record_failure(1));
  ASSERT_FALSE(b.healthy());
  EXPECT_FALSE(b.record_success(2));
  EXPECT_FALSE(b.healthy());
  EXPECT_FALSE(b.record_failure(1));  // resets the success streak
  EXPECT_FALSE(b.record_success(2));
  EXPECT_FALSE(b.healthy()) << "a failure in between must reset the count";
  EXPECT_TRUE(b.record_success(2)) << "the second consecutive success flips the state";
  EXPECT_TRUE(b.healthy());
  EXPECT_FALSE(b.record_success(2)) << "already up: no flip to report";
}

TEST(BackendHealth, AnswersToRequestsInFlightDoNotBringADownBackendBack) {
  Backend b(0, backend("x", 1));
  EXPECT_FALSE(b.record_failure(2));
  b.record_passive_success();
  EXPECT_EQ(b.consecutive_failures(), 0) << "an answer ends a healthy backend's failure run";
  ASSERT_FALSE(b.record_failure(2));
  ASSERT_TRUE(b.record_failure(2));
  for (int i = 0; i < 5; ++i) b.record_passive_success();
  EXPECT_FALSE(b.healthy()) << "only active checks bring it back";
  EXPECT_EQ(b.consecutive_failures(), 2);
  EXPECT_FALSE(b.record_success(2));
  EXPECT_TRUE(b.record_success(2)) << "two passed checks, as healthy_threshold says";
}

TEST(BackendHealth, SuccessesWhileHealthyDoNotPrecountARecovery) {
  Backend b(0, backend("x", 1));
  for (int i = 0; i < 5; ++i) b.record_success(3);
  EXPECT_TRUE(b.record_failure(1));
  EXPECT_FALSE(b.record_success(3));
  EXPECT_FALSE(b.record_success(3));
  EXPECT_FALSE(b.healthy());
  EXPECT_TRUE(b.record_success(3));
}

TEST(BackendHealth, ThresholdOfOneFlipsImmediately) {
  Backend b(0, backend("x", 1));
  EXPECT_TRUE(b.record_failure(1));
  EXPECT_FALSE(b.healthy());
  EXPECT_TRUE(b.record_success(1));
  EXPECT_TRUE(b.healthy());
}

TEST(BackendHealth, FlipChangesTheBalancersChoice) {
  BackendSet set({backend("a", 1), backend("b", 1)});
  Balancer lb(set, Strategy::weighted_round_robin);
  for (int i = 0; i < 2; ++i) set[0].record_failure(3);
  EXPECT_EQ(count(picks(lb, 4))["a"], 2) << "two failures out of three: still in rotation";
  set[0].record_failure(3);
  EXPECT_EQ(count(picks(lb, 4))["b"], 4);
  set[0].record_success(2);
  EXPECT_EQ(count(picks(lb, 4))["b"], 4);
  set[0].record_success(2);
  EXPECT_EQ(count(picks(lb, 4))["a"], 2);
}

// ---------------------------------------------------------------------------------------------
// InFlightGuard

TEST(InFlightGuard, CountsForItsLifetime) {
  Backend b(0, backend("x", 1));
  {
    InFlightGuard g1(b);
    EXPECT_EQ(b.in_flight(), 1);
    {
      InFlightGuard g2(b);
      EXPECT_EQ(b.in_flight(), 2);
    }
    EXPECT_EQ(b.in_flight(), 1);
  }
  EXPECT_EQ(b.in_flight(), 0);
}

TEST(InFlightGuard, MoveConstructionTransfersOwnership) {
  Backend b(0, backend("x", 1));
  {
    InFlightGuard outer;
    {
      InFlightGuard g(b);
      InFlightGuard moved(std::move(g));
      EXPECT_EQ(b.in_flight(), 1);
      outer = std::move(moved);
      EXPECT_EQ(b.in_flight(), 1);
    }
    EXPECT_EQ(b.in_flight(), 1) << "the moved-from guards must not decrement";
  }
  EXPECT_EQ(b.in_flight(), 0);
}

TEST(InFlightGuard, MoveAssignmentReleasesThePreviousBackend) {
  Backend a(0, backend("a", 1));
  Backend b(1, backend("b", 1));
  InFlightGuard ga(a);
  InFlightGuard gb(b);
  EXPECT_EQ(a.in_flight(), 1);
  EXPECT_EQ(b.in_flight(), 1);
  ga = std::move(gb);
  EXPECT_EQ(a.in_flight(), 0);
  EXPECT_EQ(b.in_flight(), 1);
  InFlightGuard& self = ga;
  ga = std::move(self);
  EXPECT_EQ(b.in_flight(), 1) << "self-move must keep the count";
  ga.release();
  EXPECT_EQ(b.in_flight(), 0);
  ga.release();
  EXPECT_EQ(b.in_flight(), 0) << "release is idempotent";
}

TEST(InFlightGuard, FeedsLeastInFlight) {
  BackendSet set({backend("a", 1), backend("b", 1)});
  Balancer lb(set, Strategy::least_in_flight);
  std::vector<InFlightGuard> guards;
  std::map<std::string, int> c;
  for (int i = 0; i < 10; ++i) {
    Pick p = lb.pick("");
    ASSERT_NE(p.backend, nullptr);
    ++c[p.backend->name()];
    guards.emplace_back(*p.backend);
  }
  EXPECT_EQ(c["a"], 5);
  EXPECT_EQ(c["b"], 5);
  EXPECT_EQ(set[0].in_flight(), 5);
  EXPECT_EQ(set[1].in_flight(), 5);
  guards.clear();
  EXPECT_EQ(set[0].in_flight(), 0);
  EXPECT_EQ(set[1].in_flight(), 0);
}

}  // namespace
}  // namespace llmproxy::lb

namespace llmproxy::lb {
namespace {

// Hot reload: a backend kept with the same name and URL shares its live state with the previous
// generation (health, in-flight requests still running there); a changed URL starts afresh.
TEST(BackendSet, ReloadCarriesLiveStateOfUnchangedBackends) {
  BackendSet before({backend("a", 1), backend("b", 1)});
  mark_down(before[0]);
  InFlightGuard running(before[1]);
  auto b_moved = backend("b", 1);
  b_moved.url = "http://b-new:8000";
  BackendSet after({backend("a", 5), b_moved, backend("c", 1)}, &before, {0, 1, 2});
  EXPECT_FALSE(after[0].healthy());  // still down: same name and URL
  EXPECT_EQ(after[0].weight(), 5);   // with its new weight
  EXPECT_TRUE(after[1].healthy());
  EXPECT_EQ(after[1].in_flight(), 0);  // a different URL is a different backend
  EXPECT_TRUE(after[2].healthy());
  EXPECT_EQ(after[2].metric_id(), 2);
  InFlightGuard old_request(before[0]);
  EXPECT_EQ(after[0].in_flight(), 1);  // a request of the old generation counts in the new
  old_request.release();
  EXPECT_EQ(after[0].in_flight(), 0);
  mark_up(after[0]);
  EXPECT_TRUE(before[0].healthy());
}

}  // namespace
}  // namespace llmproxy::lb
