// Micro-benchmarks for the per-request and per-event work that is not I/O: request inspection
// (simdjson DOM validation + field extraction) from 1 KB to 1 MB, the SSE scanner over a
// realistic chat stream, the same stream through the metering relay, a non-stream answer's usage
// read, a balancer pick, the usage writer cutting a backlog into commit groups, and a sink
// expanding a stored row into the webhook's JSON.
// Run: build/llmproxy_micro_benchmark
#include <benchmark/benchmark.h>
#include <simdjson.h>

#include <string>
#include <vector>

#include "config/config.h"
#include "lb/backend.h"
#include "lb/balancer.h"
#include "llm/request_inspector.h"
#include "llm/sse_scanner.h"
#include "llm/stream_meter.h"
#include "llm/usage.h"
#include "usage/record.h"

namespace {

using namespace llmproxy;

std::string chat_body(std::size_t prompt_bytes) {
  std::string body = R"({"model":"meta-llama/Llama-3-8b-Instruct","stream":true,"user":"alice",)"
                     R"("messages":[{"role":"system","content":"You are helpful."},)"
                     R"({"role":"user","content":")";
  body.append(prompt_bytes, 'a');
  body += R"("}],"temperature":0.7,"max_tokens":256})";
  return body;
}

void BM_InspectRequest(benchmark::State& state) {
  std::string body = chat_body(static_cast<std::size_t>(state.range(0)));
  std::string padded = body;
  padded.reserve(body.size() + simdjson::SIMDJSON_PADDING);
  llm::RequestInspector inspector(2 << 20);
  for (auto _ : state) {
    llm::RequestInfo info;
    llm::InspectError err;
    bool ok = inspector.inspect(llm::Endpoint::chat_completions, padded, true, info, err);
    benchmark::DoNotOptimize(ok);
    benchmark::DoNotOptimize(info.model.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * body.size()));
}
BENCHMARK(BM_InspectRequest)->Arg(1 << 10)->Arg(16 << 10)->Arg(256 << 10)->Arg(1 << 20);

std::string chat_stream(int tokens) {
  std::string s;
  for (int i = 0; i < tokens; ++i) {
    s += R"(data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",)"
         R"("choices":[{"index":0,"delta":{"content":"tok )" +
         std::to_string(i) + R"("},"finish_reason":null}]})" + "\n\n";
  }
  s += "data: [DONE]\n\n";
  return s;
}

// Each event fed as its own read, as the relay sees a token stream.
void BM_SseScanPerEventReads(benchmark::State& state) {
  std::string stream = chat_stream(200);
  std::vector<std::string_view> reads;
  for (std::size_t pos = 0; pos < stream.size();) {
    auto end = stream.find("\n\n", pos) + 2;
    reads.emplace_back(stream.data() + pos, end - pos);
    pos = end;
  }
  std::size_t events = 0;
  for (auto _ : state) {
    llm::SseScanner scanner;
    for (auto r : reads)
      scanner.feed(r, [&](const llm::SseEvent& e) { events += e.data.size() > 0; });
  }
  benchmark::DoNotOptimize(events);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * reads.size()));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * stream.size()));
}
BENCHMARK(BM_SseScanPerEventReads);

// The same reads through the metering relay, as with metering on and usage injected upstream:
// every chunk says `"usage":null` and the last one carries the usage (removed from the client's
// stream). Scanning, content counting, the usage/error key filters and the one parse.
void BM_StreamMeterPerEventReads(benchmark::State& state) {
  std::string stream;
  for (int i = 0; i < 200; ++i) {
    stream +=
        R"(data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",)"
        R"("choices":[{"index":0,"delta":{"content":"tok )" +
        std::to_string(i) + R"("},"finish_reason":null}],"usage":null})" + "\n\n";
  }
  stream +=
      R"(data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",)"
      R"("choices":[],"usage":{"prompt_tokens":9,"completion_tokens":200,"total_tokens":209}})"
      "\n\ndata: [DONE]\n\n";
  std::vector<std::string_view> reads;
  for (std::size_t pos = 0; pos < stream.size();) {
    auto end = stream.find("\n\n", pos) + 2;
    reads.emplace_back(stream.data() + pos, end - pos);
    pos = end;
  }
  simdjson::dom::parser parser;
  std::size_t out = 0;
  for (auto _ : state) {
    llm::StreamMeter meter(&parser, /*remove_injected_usage=*/true);
    for (auto r : reads) out += meter.relay(r).size();
    if (meter.tracker().usage().completion_tokens != 200) state.SkipWithError("usage not read");
  }
  benchmark::DoNotOptimize(out);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * reads.size()));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * stream.size()));
}
BENCHMARK(BM_StreamMeterPerEventReads);

// A non-stream answer's usage, read from the response's copy after it was sent: the last
// `"usage"` key, then the flat reader (the mock's answer to the load generator's request).
void BM_ReadBodyUsage(benchmark::State& state) {
  const std::string body =
      R"({"id":"chatcmpl-mock0-1","object":"chat.completion","created":1795925148,"model":"m",)"
      R"("choices":[{"index":0,"message":{"role":"assistant","content":"tok0 tok1 tok2 tok3 )"
      R"(tok4 tok5 tok6 tok7 tok8 tok9 tok10 tok11 tok12 tok13 tok14 tok15 "},"logprobs":null,)"
      R"("finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":16,)"
      R"("total_tokens":17}})";
  simdjson::dom::parser parser;
  for (auto _ : state) {
    llm::Usage usage;
    llm::TextCount content;
    const bool found = llm::read_body_usage(body, parser, usage, content);
    if (!found || usage.completion_tokens != 16) state.SkipWithError("usage not read");
    benchmark::DoNotOptimize(usage);
  }
}
BENCHMARK(BM_ReadBodyUsage);

void BM_BalancerPick(benchmark::State& state) {
  std::vector<config::BackendConfig> cfgs;
  for (int i = 0; i < state.range(0); ++i) {
    config::BackendConfig b;
    b.name = "b" + std::to_string(i);
    b.url = "http://127.0.0.1:" + std::to_string(9000 + i);
    b.weight = 1 + i % 5;
    cfgs.push_back(b);
  }
  lb::BackendSet set(cfgs);
  lb::Balancer balancer(set, state.range(1) ? config::Strategy::least_in_flight
                                            : config::Strategy::weighted_round_robin);
  for (auto _ : state) {
    auto pick = balancer.pick("m");
    benchmark::DoNotOptimize(pick.backend);
  }
}
BENCHMARK(BM_BalancerPick)->Args({2, 0})->Args({16, 0})->Args({2, 1})->Args({16, 1});

// A usage record of a typical chat request.
usage::UsageRecord sample_record() {
  usage::UsageRecord r;
  r.request_id = "req-0123456789abcdef0123456789abcdef";
  r.user_id = "user-42";
  r.api_key = "sk-test-0123456789abcdef0123456789abcdef";
  r.model = "meta-llama/Llama-3-8b-Instruct";
  r.prompt_tokens = 1234;
  r.completion_tokens = 200;
  r.total_tokens = 1434;
  r.endpoint = "/v1/chat/completions";
  r.timestamp_ms = 1795939200123;
  r.backend_url = "http://127.0.0.1:8000";
  r.backend = "vllm-a";
  r.status_code = 200;
  r.duration_ms = 812.25;
  r.finish = "completed";
  r.usage_source = "backend";
  return r;
}

// The usage writer after a stall: a backlog of N records cut into groups of 4,096 from the front.
// The time per record must not grow with N (moving the rest at each cut made it quadratic).
void BM_BacklogIntoGroups(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const usage::UsageRecord r = sample_record();
  usage::PackedRecords backlog, group;
  for (auto _ : state) {
    state.PauseTiming();
    backlog.clear();
    for (std::size_t i = 0; i < n; ++i) backlog.push(r);
    state.ResumeTiming();
    while (!backlog.empty()) {
      backlog.move_front(backlog.front_fitting(4096, 32 << 20), group);
      benchmark::DoNotOptimize(group.bytes());
      group.clear();
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}
BENCHMARK(BM_BacklogIntoGroups)->Arg(16 << 10)->Arg(64 << 10)->Arg(256 << 10);

// A webhook sink turns each stored row back into the record's JSON object (once per record
// delivered, on the sink's thread).
void BM_ExpandRow(benchmark::State& state) {
  const usage::UsageRecord r = sample_record();
  std::string row;
  usage::append_row(row, r);
  std::string out;
  for (auto _ : state) {
    out.clear();
    benchmark::DoNotOptimize(usage::append_stored_json(out, row));
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}
BENCHMARK(BM_ExpandRow);

}  // namespace

BENCHMARK_MAIN();
