// Unit tests for the request path's small pieces: the request body inspector
// (llm/request_inspector.h), OpenAI-shaped error bodies (http/errors.h) and request ids
// (proxy/request_id.h).
#include "llm/request_inspector.h"

#include <gtest/gtest.h>
#include <simdjson.h>

#include <random>
#include <regex>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "http/errors.h"
#include "proxy/request_id.h"

namespace llmproxy {
namespace {

using llm::Endpoint;
using llm::InspectError;
using llm::RequestInfo;
using llm::RequestInspector;

struct Outcome {
  bool ok = false;
  RequestInfo info;
  InspectError error;
};

Outcome inspect(std::string_view body, Endpoint endpoint = Endpoint::chat_completions) {
  RequestInspector insp(1 << 20);
  Outcome out;
  out.ok = insp.inspect(endpoint, body, /*padded=*/false, out.info, out.error);
  return out;
}

bool same_spec(const http::ErrorSpec& a, const http::ErrorSpec& b) {
  return a.status == b.status && a.type == b.type && a.code == b.code;
}

// The body must be refused with the given spec (and a message).
::testing::AssertionResult refused(std::string_view body, const http::ErrorSpec& spec,
                                   Endpoint endpoint = Endpoint::chat_completions) {
  Outcome o = inspect(body, endpoint);
  if (o.ok) return ::testing::AssertionFailure() << "accepted: " << body;
  if (!same_spec(o.error.spec, spec)) {
    return ::testing::AssertionFailure()
           << "refused with " << o.error.spec.status << " " << o.error.spec.code << ", expected "
           << spec.status << " " << spec.code << " (" << o.error.message << ")";
  }
  if (o.error.spec.status != 400) {
    return ::testing::AssertionFailure() << "status " << o.error.spec.status;
  }
  if (o.error.message.empty()) return ::testing::AssertionFailure() << "empty message";
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Fields

TEST(RequestInspector, StreamFlag) {
  Outcome t = inspect(R"({"model":"m","stream":true})");
  ASSERT_TRUE(t.ok) << t.error.message;
  EXPECT_TRUE(t.info.stream);

  Outcome f = inspect(R"({"model":"m","stream":false})");
  ASSERT_TRUE(f.ok) << f.error.message;
  EXPECT_FALSE(f.info.stream);

  Outcome absent = inspect(R"({"model":"m"})");
  ASSERT_TRUE(absent.ok) << absent.error.message;
  EXPECT_FALSE(absent.info.stream);

  Outcome null = inspect(R"({"model":"m","stream":null})");
  ASSERT_TRUE(null.ok) << null.error.message;
  EXPECT_FALSE(null.info.stream);

  // Duplicates: the last one wins, a null too, as the backends read them.
  Outcome later_null = inspect(R"({"model":"m","stream":true,"stream":null})");
  ASSERT_TRUE(later_null.ok) << later_null.error.message;
  EXPECT_FALSE(later_null.info.stream);
  Outcome user_null = inspect(R"({"model":"m","user":"alice","user":null})");
  ASSERT_TRUE(user_null.ok) << user_null.error.message;
  EXPECT_EQ(user_null.info.user, "");
}

TEST(RequestInspector, ModelAndUserExtracted) {
  Outcome o = inspect(R"({
    "model": "meta-llama/Llama-3-8b-Instruct",
    "messages": [{"role": "user", "content": "hi"}],
    "user": "alice@example.com",
    "temperature": 0.2
  })");
  ASSERT_TRUE(o.ok) << o.error.message;
  EXPECT_EQ(o.info.model, "meta-llama/Llama-3-8b-Instruct");
  EXPECT_EQ(o.info.user, "alice@example.com");
  EXPECT_FALSE(o.info.stream);
  EXPECT_FALSE(o.info.include_usage);
}

// safety_identifier, OpenAI's successor of `user`, names the caller when `user` does not.
TEST(RequestInspector, SafetyIdentifierWhenNoUser) {
  Outcome alone = inspect(R"({"model":"m","safety_identifier":"sid-1"})");
  ASSERT_TRUE(alone.ok) << alone.error.message;
  EXPECT_EQ(alone.info.user, "sid-1");
  Outcome both = inspect(R"({"model":"m","safety_identifier":"sid-1","user":"alice"})");
  ASSERT_TRUE(both.ok) << both.error.message;
  EXPECT_EQ(both.info.user, "alice");
  Outcome null_user = inspect(R"({"model":"m","user":null,"safety_identifier":"sid-2"})");
  ASSERT_TRUE(null_user.ok) << null_user.error.message;
  EXPECT_EQ(null_user.info.user, "sid-2");
  EXPECT_TRUE(refused(R"({"model":"m","safety_identifier":7})", http::errors::invalid_request));
  EXPECT_EQ(inspect(R"({"model":"m","safety_identifier":7})").error.param, "safety_identifier");
  const std::string over(llm::kMaxIdentifierBytes + 1, 's');
  EXPECT_TRUE(refused(R"({"model":"m","safety_identifier":")" + over + R"("})",
                      http::errors::string_too_long));
}

// Without metering the prompt is not counted (the estimate is never needed); the rest is read.
TEST(RequestInspector, PromptCountedOnlyWhenAsked) {
  const std::string body =
      R"({"model":"m","stream":true,"messages":[{"role":"user","content":"hello there"},)"
      R"({"role":"user","content":[{"type":"text","text":"again"}]}]})";
  RequestInspector insp(1 << 20);
  RequestInfo counted, plain;
  InspectError error;
  ASSERT_TRUE(insp.inspect(Endpoint::chat_completions, body, false, counted, error));
  ASSERT_TRUE(insp.inspect(Endpoint::chat_completions, body, false, plain, error, false));
  EXPECT_EQ(counted.prompt_text.ascii, 16u);  // "hello there" + "again"
  EXPECT_TRUE(plain.prompt_text.empty());
  for (const RequestInfo* i : {&counted, &plain}) {
    EXPECT_EQ(i->model, "m");
    EXPECT_TRUE(i->stream);
    EXPECT_EQ(i->messages, 2);
  }
  RequestInfo ids;
  ASSERT_TRUE(
      insp.inspect(Endpoint::completions, R"({"prompt":[1,2,3]})", false, ids, error, false));
  EXPECT_EQ(ids.prompt_token_ids, 0);
}

// A repeated key: the backends (Python, JS) take its last value, so the estimate counts that one
// only; counting the first (or every copy) would let a client make its real prompt look short.
TEST(RequestInspector, RepeatedPromptKeysCountTheLastValue) {
  const std::string longer = std::string(500, 'x');
  const Outcome chat =
      inspect(R"({"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"a":1}],)"
              R"("messages":[{"role":"user","content":")" +
              longer + R"("},{"role":"user","content":"ok"}],"tools":[]})");
  ASSERT_TRUE(chat.ok);
  EXPECT_EQ(chat.info.messages, 2);
  EXPECT_EQ(chat.info.prompt_text.ascii, 502u);
  EXPECT_EQ(chat.info.tools, 0);
  const Outcome completion =
      inspect(R"({"model":"m","prompt":")" + longer + R"(","prompt":"hi"})", Endpoint::completions);
  ASSERT_TRUE(completion.ok);
  EXPECT_EQ(completion.info.prompt_text.ascii, 2u);
}

// Only the last copy of a repeated key is validated and read: an earlier one of another type is
// no error to the backends either.
TEST(RequestInspector, RepeatedKeysAreJudgedByTheirLastCopy) {
  const std::string long_user = std::string(2000, 'u');
  const Outcome ok = inspect(R"({"model":5,"model":"m","stream":"yes","stream":true,"user":")" +
                             long_user + R"(","user":"bob","messages":[]})");
  ASSERT_TRUE(ok.ok) << ok.error.message;
  EXPECT_EQ(ok.info.model, "m");
  EXPECT_TRUE(ok.info.stream);
  EXPECT_EQ(ok.info.user, "bob");
  EXPECT_TRUE(refused(R"({"model":"m","model":5})", http::errors::invalid_request));
  EXPECT_TRUE(refused(R"({"stream":true,"stream":"yes"})", http::errors::invalid_request));
  EXPECT_TRUE(
      refused(R"({"user":"bob","user":")" + long_user + R"("})", http::errors::string_too_long));
  const Outcome nulls = inspect(R"({"stream":true,"stream":null,"user":"bob","user":null})");
  ASSERT_TRUE(nulls.ok);
  EXPECT_FALSE(nulls.info.stream);
  EXPECT_EQ(nulls.info.user, "");
}

// Tools are written into the prompt by chat templates: their definitions count as JSON text
// (as long as their minified JSON), tool calls as the function's name plus its arguments; the
// estimate adds the template's tool instruction once and its markup per call.
TEST(RequestInspector, ToolDefinitionsAndCallsCountTowardsThePromptEstimate) {
  const std::string tool =
      R"({"type":"function","function":{"name":"get_weather","parameters":{"type":"object",)"
      R"("properties":{"days":{"type":"integer","minimum":-1,"maximum":7.5,"default":null,)"
      R"("nullable":true,"strict":false,"enum":[1,2,18446744073709551615]}}}}})";
  const std::string body =
      R"({"model":"m","tools":[ )" + tool +
      R"( ],"messages":[)"
      R"({"role":"user","content":"rain?"},)"
      R"({"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",)"
      R"("function":{"name":"get_weather","arguments":"{\"city\":\"Porto\"}"}},)"
      R"({"id":"c2","type":"custom","custom":{"name":"sql","input":"SELECT 1"}},{},{"id":"x"}]},)"
      R"({"role":"assistant","function_call":{"name":"f","arguments":{"a":1}}},)"
      R"({"role":"tool","tool_call_id":"c1","content":"sunny"}]})";
  Outcome o = inspect(body);
  ASSERT_TRUE(o.ok) << o.error.message;
  const RequestInfo& i = o.info;
  EXPECT_EQ(i.tools, 1);
  EXPECT_EQ(i.tool_calls, 3) << "function, custom and the legacy function_call; {} is none";
  EXPECT_EQ(i.messages, 4);
  // tool (minified) + "get_weather" + {"city":"Porto"} + "sql" + "SELECT 1" + "f" + {"a":1}
  const std::uint64_t tool_bytes = tool.size() + 11 + 16 + 3 + 8 + 1 + 7;
  EXPECT_EQ(i.tool_text.ascii, tool_bytes);
  EXPECT_EQ(i.prompt_text.ascii, 10u);  // "rain?" + "sunny"
  const std::int64_t text = (10 + 3) / 4, overhead = 4 * 4 + 3;
  EXPECT_EQ(llm::estimate_prompt_tokens(i), text + overhead +
                                                static_cast<std::int64_t>((tool_bytes + 2) / 3) +
                                                llm::kToolsPromptTokens + 3 * llm::kToolCallTokens);

  // The legacy `functions` list counts as tools; without metering nothing is counted.
  Outcome legacy = inspect(R"({"functions":[{"name":"f","parameters":{}}],"messages":[]})");
  ASSERT_TRUE(legacy.ok);
  EXPECT_EQ(legacy.info.tools, 1);
  EXPECT_EQ(legacy.info.tool_text.ascii, std::string(R"({"name":"f","parameters":{}})").size());
  RequestInspector insp(1 << 20);
  RequestInfo plain;
  InspectError error;
  ASSERT_TRUE(insp.inspect(Endpoint::chat_completions, body, false, plain, error, false));
  EXPECT_EQ(plain.tools, 0);
  EXPECT_EQ(plain.tool_calls, 0);
  EXPECT_TRUE(plain.tool_text.empty());
  // Only chat templates render tools.
  Outcome completion = inspect(R"({"prompt":"x","tools":[{"a":1}]})", Endpoint::completions);
  ASSERT_TRUE(completion.ok);
  EXPECT_EQ(completion.info.tools, 0);
  EXPECT_EQ(llm::estimate_prompt_tokens(completion.info), 1);
  // Odd shapes are not refused (the backend judges them) and count nothing.
  Outcome odd = inspect(
      R"({"tools":{"a":1},"messages":[{"tool_calls":7},{"tool_calls":[3,{},{"function":1}]},)"
      R"({"function_call":"auto"}]})");
  ASSERT_TRUE(odd.ok);
  EXPECT_EQ(odd.info.tools, 0);
  EXPECT_EQ(odd.info.tool_calls, 0);
  EXPECT_TRUE(odd.info.tool_text.empty());
}

TEST(RequestInspector, AbsentFieldsStayEmpty) {
  Outcome o = inspect(R"({"messages":[]})");
  ASSERT_TRUE(o.ok) << o.error.message;
  EXPECT_EQ(o.info.model, "");
  EXPECT_EQ(o.info.user, "");
  Outcome null_user = inspect(R"({"model":"m","user":null})");
  ASSERT_TRUE(null_user.ok) << null_user.error.message;
  EXPECT_EQ(null_user.info.user, "");
  Outcome empty_object = inspect("{}");
  ASSERT_TRUE(empty_object.ok) << empty_object.error.message;
}

TEST(RequestInspector, FieldsInsideMessagesAreNotMistakenForTopLevel) {
  Outcome o = inspect(
      R"({"messages":[{"role":"user","content":"x","model":"inner","stream":true}],"model":"outer"})");
  ASSERT_TRUE(o.ok) << o.error.message;
  EXPECT_EQ(o.info.model, "outer");
  EXPECT_FALSE(o.info.stream);
}

TEST(RequestInspector, IncludeUsageFromStreamOptions) {
  Outcome yes = inspect(R"({"model":"m","stream":true,"stream_options":{"include_usage":true}})");
  ASSERT_TRUE(yes.ok) << yes.error.message;
  EXPECT_TRUE(yes.info.include_usage);
  EXPECT_TRUE(yes.info.stream);

  Outcome no = inspect(R"({"model":"m","stream":true,"stream_options":{"include_usage":false}})");
  ASSERT_TRUE(no.ok) << no.error.message;
  EXPECT_FALSE(no.info.include_usage);

  Outcome empty = inspect(R"({"model":"m","stream":true,"stream_options":{}})");
  ASSERT_TRUE(empty.ok) << empty.error.message;
  EXPECT_FALSE(empty.info.include_usage);

  Outcome absent = inspect(R"({"model":"m","stream":true})");
  ASSERT_TRUE(absent.ok) << absent.error.message;
  EXPECT_FALSE(absent.info.include_usage);

  Outcome null = inspect(R"({"model":"m","stream":true,"stream_options":null})");
  ASSERT_TRUE(null.ok) << null.error.message;
  EXPECT_FALSE(null.info.include_usage);

  // Not a boolean: read as vLLM reads it (pydantic, lax). True: the client's own request for
  // usage, left alone. False or unknown: not asked, so the gateway asks (never an estimate).
  for (const char* value : {R"("yes")", R"("True")", "1", R"("on")"}) {
    Outcome lax = inspect(R"({"model":"m","stream":true,"stream_options":{"include_usage":)" +
                          std::string(value) + "}}");
    ASSERT_TRUE(lax.ok) << lax.error.message;
    EXPECT_TRUE(lax.info.include_usage) << value;
  }
  for (const char* value : {R"("false")", R"("no")", "0", "2", R"("")", "{}", R"("maybe")"}) {
    Outcome lax = inspect(R"({"model":"m","stream":true,"stream_options":{"include_usage":)" +
                          std::string(value) + "}}");
    ASSERT_TRUE(lax.ok) << lax.error.message;
    EXPECT_FALSE(lax.info.include_usage) << value;
  }
  Outcome null_usage =
      inspect(R"({"model":"m","stream":true,"stream_options":{"include_usage":null}})");
  ASSERT_TRUE(null_usage.ok) << null_usage.error.message;
  EXPECT_FALSE(null_usage.info.include_usage);

  // Duplicates: the last one wins, as Python and JS backends read them.
  auto include_usage = [](std::string_view so) {
    Outcome o = inspect(R"({"model":"m","stream":true,"stream_options":)" + std::string(so) + "}");
    EXPECT_TRUE(o.ok) << o.error.message;
    return o.info.include_usage;
  };
  EXPECT_TRUE(include_usage(R"({"include_usage":false,"include_usage":true})"));
  EXPECT_FALSE(include_usage(R"({"include_usage":true,"include_usage":false})"));
  Outcome twice =
      inspect(R"({"stream":true,"stream_options":{"include_usage":true},"stream_options":{}})");
  EXPECT_FALSE(twice.info.include_usage);
  // vLLM's continuous_usage_stats alone asks for usage (its include_usage defaults to true
  // there), but include_usage itself was not sent: other servers would send no usage.
  auto continuous = [](std::string_view so) {
    Outcome o = inspect(R"({"model":"m","stream":true,"stream_options":)" + std::string(so) + "}");
    EXPECT_TRUE(o.ok) << o.error.message;
    return std::pair(o.info.include_usage, o.info.continuous_usage);
  };
  EXPECT_EQ(continuous(R"({"continuous_usage_stats":true})"), std::pair(false, true));
  EXPECT_EQ(continuous(R"({"continuous_usage_stats":false})"), std::pair(false, false));
  EXPECT_EQ(continuous(R"({"include_usage":false,"continuous_usage_stats":true})"),
            std::pair(false, false));
  EXPECT_EQ(continuous(R"({"include_usage":true,"continuous_usage_stats":true})"),
            std::pair(true, false));
  Outcome later = inspect(
      R"({"stream":true,"stream_options":{"continuous_usage_stats":true},"stream_options":{}})");
  EXPECT_FALSE(later.info.continuous_usage);
}

TEST(RequestInspector, UnicodeEscapesInModel) {
  Outcome o = inspect(R"({"model":"caf\u00e9-\ud83d\ude00-\"q\""})");
  ASSERT_TRUE(o.ok) << o.error.message;
  EXPECT_EQ(o.info.model, "caf\xc3\xa9-\xf0\x9f\x98\x80-\"q\"");
  Outcome raw = inspect("{\"model\":\"\xe6\xa8\xa1\xe5\x9e\x8b\"}");
  ASSERT_TRUE(raw.ok) << raw.error.message;
  EXPECT_EQ(raw.info.model, "\xe6\xa8\xa1\xe5\x9e\x8b");
}

TEST(RequestInspector, DeeplyNestedButValidBody) {
  std::string nested;
  for (int i = 0; i < 200; ++i) nested += R"({"a":[)";
  nested += "1";
  for (int i = 0; i < 200; ++i) nested += "]}";
  const std::string body = R"({"model":"deep","metadata":)" + nested + R"(,"stream":true})";
  Outcome o = inspect(body);
  ASSERT_TRUE(o.ok) << o.error.message;
  EXPECT_EQ(o.info.model, "deep");
  EXPECT_TRUE(o.info.stream);
}

TEST(RequestInspector, WhitespaceAroundTheObjectIsFine) {
  Outcome o = inspect(" \n\t{\"model\" : \"m\" , \"stream\" : true }\r\n ");
  ASSERT_TRUE(o.ok) << o.error.message;
  EXPECT_EQ(o.info.model, "m");
  EXPECT_TRUE(o.info.stream);
}

TEST(RequestInspector, EndpointsOtherThanEmbeddingsMayStream) {
  Outcome completions =
      inspect(R"({"model":"m","prompt":"x","stream":true})", Endpoint::completions);
  ASSERT_TRUE(completions.ok) << completions.error.message;
  EXPECT_TRUE(completions.info.stream);
  Outcome embeddings = inspect(R"({"model":"e","input":"x","stream":false})", Endpoint::embeddings);
  ASSERT_TRUE(embeddings.ok) << embeddings.error.message;
  EXPECT_EQ(embeddings.info.model, "e");
  EXPECT_FALSE(embeddings.info.stream);
}

TEST(RequestInspector, EndpointNames) {
  EXPECT_EQ(llm::to_string(Endpoint::chat_completions), "/v1/chat/completions");
  EXPECT_EQ(llm::to_string(Endpoint::completions), "/v1/completions");
  EXPECT_EQ(llm::to_string(Endpoint::embeddings), "/v1/embeddings");
}

// ---------------------------------------------------------------------------------------------
// Refusals

TEST(RequestInspectorRefuses, InvalidJson) {
  EXPECT_TRUE(refused(R"({"model":"m","messages":[{"role":"user")", http::errors::invalid_json));
  EXPECT_TRUE(refused(R"({"model":"m"} trailing)", http::errors::invalid_json));
  EXPECT_TRUE(refused(R"({"model":"m"}{})", http::errors::invalid_json));
  EXPECT_TRUE(refused("{bad", http::errors::invalid_json));
  EXPECT_TRUE(refused(R"({"model":"m",})", http::errors::invalid_json));
  EXPECT_TRUE(refused(R"({'model':'m'})", http::errors::invalid_json));
  EXPECT_TRUE(refused("{\"model\":\"a\xff\"}", http::errors::invalid_json)) << "invalid UTF-8";
  EXPECT_TRUE(refused(R"({"model":"m","n":01})", http::errors::invalid_json));
  Outcome o = inspect("{bad");
  EXPECT_NE(o.error.message.find("not valid JSON"), std::string::npos) << o.error.message;
  EXPECT_EQ(o.error.spec.code, "invalid_json");
  EXPECT_EQ(o.error.spec.type, "invalid_request_error");
  // Numbers past the parser's range are valid JSON: the message says what is wrong instead.
  for (std::string_view big : {R"({"model":"m","seed":18446744073709551616})",
                               R"({"model":"m","max_tokens":123456789012345678901234567890})",
                               R"({"model":"m","t":1e999999})"}) {
    Outcome n = inspect(big);
    EXPECT_FALSE(n.ok) << big;
    EXPECT_NE(n.error.message.find("a number the gateway cannot read"), std::string::npos)
        << n.error.message;
  }
}

TEST(RequestInspectorRefuses, EmptyBody) {
  EXPECT_TRUE(refused("", http::errors::invalid_json));
  Outcome o = inspect("");
  EXPECT_NE(o.error.message.find("empty"), std::string::npos) << o.error.message;
  EXPECT_TRUE(refused("   ", http::errors::invalid_json));
}

TEST(RequestInspectorRefuses, NonObjectBodies) {
  for (const char* body : {"[1]", R"("str")", "3", "null", "true", "[]"}) {
    SCOPED_TRACE(body);
    EXPECT_TRUE(refused(body, http::errors::invalid_request));
    Outcome o = inspect(body);
    EXPECT_NE(o.error.message.find("JSON object"), std::string::npos) << o.error.message;
  }
}

TEST(RequestInspectorRefuses, StreamOfWrongType) {
  for (const char* body : {R"({"model":"m","stream":"yes"})", R"({"model":"m","stream":1})",
                           R"({"model":"m","stream":{}})", R"({"model":"m","stream":[true]})"}) {
    SCOPED_TRACE(body);
    EXPECT_TRUE(refused(body, http::errors::invalid_request));
    Outcome o = inspect(body);
    EXPECT_NE(o.error.message.find("'stream'"), std::string::npos) << o.error.message;
    EXPECT_EQ(o.error.param, "stream");
  }
}

TEST(RequestInspectorRefuses, ModelNotAString) {
  for (const char* body : {R"({"model":42})", R"({"model":["m"]})", R"({"model":{"id":"m"}})",
                           R"({"model":true})", R"({"model":null})"}) {
    SCOPED_TRACE(body);
    EXPECT_TRUE(refused(body, http::errors::invalid_request));
    Outcome o = inspect(body);
    EXPECT_NE(o.error.message.find("'model'"), std::string::npos) << o.error.message;
    EXPECT_EQ(o.error.param, "model");
  }
}

TEST(RequestInspectorRefuses, UserNotAString) {
  EXPECT_TRUE(refused(R"({"model":"m","user":7})", http::errors::invalid_request));
  EXPECT_EQ(inspect(R"({"model":"m","user":7})").error.param, "user");
}

TEST(RequestInspectorRefuses, ModelOrUserLongerThanTheLimit) {
  const std::string at_limit(llm::kMaxIdentifierBytes, 'u');
  const std::string over = at_limit + "v";
  for (std::string field : {"model", "user"}) {
    SCOPED_TRACE(field);
    const std::string ok = R"({"model":"m",")" + field + R"(":")" + at_limit + R"("})";
    Outcome fine = inspect(ok);
    ASSERT_TRUE(fine.ok) << fine.error.message;
    EXPECT_EQ(field == "model" ? fine.info.model : fine.info.user, at_limit);
    const std::string body = R"({"model":"m",")" + field + R"(":")" + over + R"("})";
    EXPECT_TRUE(refused(body, http::errors::string_too_long));
    Outcome o = inspect(body);
    EXPECT_EQ(o.error.param, field);
    EXPECT_NE(o.error.message.find("maximum length 1024"), std::string::npos) << o.error.message;
    EXPECT_NE(o.error.message.find("got 1025"), std::string::npos) << o.error.message;
  }
}

TEST(RequestInspectorRefuses, StreamingEmbeddings) {
  EXPECT_TRUE(refused(R"({"model":"e","input":"x","stream":true})", http::errors::invalid_request,
                      Endpoint::embeddings));
  Outcome o = inspect(R"({"model":"e","input":"x","stream":true})", Endpoint::embeddings);
  EXPECT_NE(o.error.message.find("Embeddings"), std::string::npos) << o.error.message;
  EXPECT_EQ(o.error.param, "stream");
  // Errors about the body as a whole name no field.
  EXPECT_EQ(inspect("{bad").error.param, "");
}

TEST(RequestInspectorRefuses, BodyLargerThanTheParserCapacity) {
  RequestInspector insp(64);
  RequestInfo info;
  InspectError err;
  const std::string body = R"({"model":"m","input":")" + std::string(200, 'x') + R"("})";
  EXPECT_FALSE(insp.inspect(Endpoint::embeddings, body, false, info, err));
  EXPECT_EQ(err.spec.status, 400u);
}

// ---------------------------------------------------------------------------------------------
// Padded input and parser reuse

TEST(RequestInspector, PaddedBodyGivesTheSameResult) {
  const std::string_view json =
      R"({"model":"m-1","user":"u","stream":true,"stream_options":{"include_usage":true}})";
  std::string padded;
  padded.reserve(json.size() + simdjson::SIMDJSON_PADDING);
  padded.assign(json);
  ASSERT_GE(padded.capacity(), padded.size() + simdjson::SIMDJSON_PADDING);

  RequestInspector insp(1 << 20);
  RequestInfo a, b;
  InspectError ea, eb;
  ASSERT_TRUE(insp.inspect(Endpoint::chat_completions, padded, /*padded=*/true, a, ea))
      << ea.message;
  ASSERT_TRUE(insp.inspect(Endpoint::chat_completions, json, /*padded=*/false, b, eb))
      << eb.message;
  EXPECT_EQ(a.model, "m-1");
  EXPECT_EQ(a.user, "u");
  EXPECT_TRUE(a.stream);
  EXPECT_TRUE(a.include_usage);
  EXPECT_EQ(a.model, b.model);
  EXPECT_EQ(a.user, b.user);
  EXPECT_EQ(a.stream, b.stream);
  EXPECT_EQ(a.include_usage, b.include_usage);
}

TEST(RequestInspector, PaddedInvalidBodyIsRefusedToo) {
  const std::string_view json = R"({"model":"m",)";
  std::string padded;
  padded.reserve(json.size() + simdjson::SIMDJSON_PADDING);
  padded.assign(json);
  RequestInspector insp(1 << 20);
  RequestInfo info;
  InspectError err;
  EXPECT_FALSE(insp.inspect(Endpoint::chat_completions, padded, /*padded=*/true, info, err));
  EXPECT_TRUE(same_spec(err.spec, http::errors::invalid_json));
}

TEST(RequestInspector, ParserIsReusableAcrossRequests) {
  RequestInspector insp(1 << 20);
  const std::string big = R"({"model":"big","input":")" + std::string(100'000, 'y') + R"("})";
  const std::string_view bodies[] = {R"({"model":"first"})", big, "{bad", R"({"model":"last"})"};
  const char* models[] = {"first", "big", "", "last"};
  const bool oks[] = {true, true, false, true};
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE(i);
    RequestInfo info;
    InspectError err;
    EXPECT_EQ(insp.inspect(Endpoint::chat_completions, bodies[i], false, info, err), oks[i]);
    if (oks[i]) {
      EXPECT_EQ(info.model, models[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// error_body

struct ParsedError {
  std::string message, type, code;
  bool param_is_null = false;
};

ParsedError parse_error_body(const std::string& body) {
  simdjson::dom::parser parser;
  simdjson::dom::element root;
  ParsedError out;
  auto err = parser.parse(body).get(root);
  EXPECT_FALSE(err) << "not JSON: " << body;
  if (err) return out;
  simdjson::dom::object error;
  EXPECT_FALSE(root["error"].get_object().get(error)) << body;
  std::string_view s;
  EXPECT_FALSE(error["message"].get_string().get(s)) << body;
  out.message = std::string(s);
  EXPECT_FALSE(error["type"].get_string().get(s)) << body;
  out.type = std::string(s);
  EXPECT_FALSE(error["code"].get_string().get(s)) << body;
  out.code = std::string(s);
  simdjson::dom::element param;
  EXPECT_FALSE(error["param"].get(param)) << "param missing: " << body;
  out.param_is_null = param.is_null();
  return out;
}

TEST(ErrorBody, ShapeOfTheOpenAiSdks) {
  const std::string body = http::error_body(http::errors::model_not_found, "No such model.");
  EXPECT_EQ(body, R"({"error":{"message":"No such model.","type":"invalid_request_error",)"
                  R"("param":null,"code":"model_not_found"}})");
  ParsedError e = parse_error_body(body);
  EXPECT_EQ(e.message, "No such model.");
  EXPECT_EQ(e.type, "invalid_request_error");
  EXPECT_EQ(e.code, "model_not_found");
  EXPECT_TRUE(e.param_is_null);
}

// A field error names the field, as OpenAI's own validation errors do (the SDKs expose it as
// error.param).
TEST(ErrorBody, NamesTheFieldAtFault) {
  const std::string body =
      http::error_body(http::errors::invalid_request, "'stream' must be a boolean.", "stream");
  EXPECT_EQ(body, R"({"error":{"message":"'stream' must be a boolean.",)"
                  R"("type":"invalid_request_error","param":"stream","code":"invalid_request"}})");
  EXPECT_FALSE(parse_error_body(body).param_is_null);
}

TEST(ErrorBody, EscapesQuotesBackslashesAndControlCharacters) {
  const std::string message = std::string("say \"hi\" \\ path C:\\x\nline2\r\tend ") + '\x01' +
                              '\x1f' + '\0' + " caf\xc3\xa9";
  const std::string body = http::error_body(http::errors::bad_gateway, message);
  EXPECT_NE(body.find(R"(\"hi\")"), std::string::npos) << body;
  EXPECT_NE(body.find(R"(C:\\x)"), std::string::npos) << body;
  EXPECT_NE(body.find(R"(\n)"), std::string::npos) << body;
  EXPECT_NE(body.find(R"(\r)"), std::string::npos) << body;
  EXPECT_NE(body.find(R"(\t)"), std::string::npos) << body;
  EXPECT_NE(body.find(R"(\u0001)"), std::string::npos) << body;
  EXPECT_NE(body.find(R"(\u001f)"), std::string::npos) << body;
  EXPECT_NE(body.find(R"(\u0000)"), std::string::npos) << body;
  for (char ch : body) {
    EXPECT_GE(static_cast<unsigned char>(ch), 0x20u) << "raw control character in " << body;
  }
  ParsedError e = parse_error_body(body);
  EXPECT_EQ(e.message, message) << "the message must survive the round trip byte for byte";
  EXPECT_EQ(e.type, "server_error");
  EXPECT_EQ(e.code, "upstream_error");
  EXPECT_TRUE(e.param_is_null);
}

TEST(ErrorBody, EveryWellKnownSpecIsValidJson) {
  const http::ErrorSpec specs[] = {
      http::errors::invalid_json,       http::errors::invalid_request,
      http::errors::string_too_long,    http::errors::not_found,
      http::errors::model_not_found,    http::errors::method_not_allowed,
      http::errors::request_timeout,    http::errors::body_too_large,
      http::errors::headers_too_large,  http::errors::bad_gateway,
      http::errors::no_healthy_backend, http::errors::shutting_down,
      http::errors::gateway_timeout,    http::errors::uri_too_long,
      http::errors::expectation_failed, http::errors::usage_backlog,
      http::errors::overloaded,         http::errors::reload_failed,
      http::errors::unauthorized,       http::errors::invalid_config,
  };
  for (const auto& spec : specs) {
    SCOPED_TRACE(spec.code);
    ParsedError e = parse_error_body(http::error_body(spec, ""));
    EXPECT_EQ(e.message, "");
    EXPECT_EQ(e.type, spec.type);
    EXPECT_EQ(e.code, spec.code);
    EXPECT_TRUE(e.param_is_null);
    EXPECT_GE(spec.status, 400u);
    EXPECT_LT(spec.status, 600u);
  }
}

TEST(ErrorBody, AppendJsonEscapedAppends) {
  std::string out = "prefix:";
  http::append_json_escaped(out, "a\"b\\c\x7f");
  EXPECT_EQ(out, "prefix:a\\\"b\\\\c\x7f");
}

TEST(ErrorBody, AppendJsonEscapedAtEveryAlignment) {
  // Random runs of pieces with known escapes: the word-at-a-time skip must find every byte
  // that needs a look, wherever it falls in a word.
  const std::vector<std::pair<std::string, std::string>> pieces = {
      {"a", "a"},
      {"plain-ascii-0123456789", "plain-ascii-0123456789"},
      {"\"", "\\\""},
      {"\\", "\\\\"},
      {"\n", "\\n"},
      {"\t", "\\t"},
      {std::string("\x01", 1), "\\u0001"},
      {std::string("\x1f", 1), "\\u001f"},
      {" ", " "},
      {"~\x7f", "~\x7f"},
      {"\xc3\xa9", "\xc3\xa9"},          // é
      {"\xe2\x82\xac", "\xe2\x82\xac"},  // €
      {"\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80"},
      {"\xff", "\\ufffd"},
      {"\x80", "\\ufffd"},
  };
  std::mt19937 rng(7);
  for (int round = 0; round < 2000; ++round) {
    std::string in, want;
    const int n = static_cast<int>(rng() % 24);
    for (int k = 0; k < n; ++k) {
      const auto& [raw, escaped] = pieces[rng() % pieces.size()];
      in += raw;
      want += escaped;
    }
    std::string out = "p";
    http::append_json_escaped(out, in);
    ASSERT_EQ(out, "p" + want) << "round " << round;
    ASSERT_TRUE(http::is_json_string_body(want)) << "round " << round;
  }
}

// What the usage log reads back from disk is checked with is_json_string_body: each way a string
// can be invalid is found wherever it falls in an 8-byte word.
TEST(ErrorBody, IsJsonStringBodyRefusesWhatAParserRefuses) {
  const std::vector<std::string> good{"",
                                      "plain",
                                      "\\\"\\/\\b\\f\\n\\r\\t",
                                      "\\u00e9\\uFFFD",
                                      "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80",
                                      "\x7f"};
  const std::vector<std::string> bad{"\"",
                                     "\\",
                                     "\\x",
                                     "\\u12",
                                     "\\u12g4",
                                     "\\U0041",
                                     "\xa5",
                                     "\xa5\xa5\xa5\xa5",
                                     "\xc3",
                                     "\xc3(",
                                     "\xe0\x80\x80",
                                     "\xed\xa0\x80",
                                     "\xf4\x90\x80\x80",
                                     std::string("\0", 1),
                                     "\n",
                                     "\x1f"};
  for (std::size_t pad = 0; pad < 9; ++pad) {
    const std::string before(pad, 'a'), after(9 - pad, 'z');
    for (const auto& g : good) {
      EXPECT_TRUE(http::is_json_string_body(before + g + after)) << pad << " " << g;
    }
    for (const auto& b : bad) {
      EXPECT_FALSE(http::is_json_string_body(before + b + after)) << pad << " " << b;
      EXPECT_FALSE(http::is_json_string_body(before + b)) << pad << " " << b;
    }
  }
}

TEST(ErrorBody, InspectorMessagesMakeValidBodies) {
  Outcome o = inspect(R"({"model":"m"} "x")");
  ASSERT_FALSE(o.ok);
  ParsedError e = parse_error_body(http::error_body(o.error.spec, o.error.message));
  EXPECT_EQ(e.message, o.error.message);
  EXPECT_EQ(e.code, "invalid_json");
}

// ---------------------------------------------------------------------------------------------
// Request ids

TEST(RequestId, UniqueAndWellFormed) {
  proxy::RequestIdGenerator gen;
  const std::regex shape("^req_[0-9a-f]{24}$");
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    std::string id = gen.next();
    EXPECT_TRUE(std::regex_match(id, shape)) << id;
    EXPECT_TRUE(seen.insert(id).second) << "duplicate " << id;
  }
  EXPECT_EQ(seen.size(), 1000u);
}

// 2^32 ids later the counter wraps: the ids after it get another prefix, never an earlier id.
TEST(RequestId, TheCounterWrapsToANewPrefix) {
  proxy::RequestIdGenerator gen(0xFFFFFFFEu);
  const std::string a = gen.next(), b = gen.next(), c = gen.next(), d = gen.next();
  EXPECT_EQ(a.substr(20), "fffffffe");
  EXPECT_EQ(b.substr(20), "ffffffff");
  EXPECT_EQ(a.substr(0, 20), b.substr(0, 20));
  EXPECT_EQ(c.substr(20), "00000000");
  EXPECT_NE(c.substr(0, 20), b.substr(0, 20));
  EXPECT_EQ(c.substr(0, 20), d.substr(0, 20));
  EXPECT_EQ(d.substr(20), "00000001");
}

TEST(RequestId, OneGeneratorSharesAPrefixAndCounts) {
  proxy::RequestIdGenerator gen;
  std::string first = gen.next();
  std::string second = gen.next();
  EXPECT_EQ(first.substr(0, 20), second.substr(0, 20));
  EXPECT_EQ(first.substr(20), "00000000");
  EXPECT_EQ(second.substr(20), "00000001");
  for (int i = 2; i < 17; ++i) gen.next();
  EXPECT_EQ(gen.next().substr(20), "00000011");
}

TEST(RequestId, TwoGeneratorsDifferInPrefix) {
  proxy::RequestIdGenerator one;
  proxy::RequestIdGenerator two;
  const std::string a = one.next();
  const std::string b = two.next();
  EXPECT_NE(a.substr(4, 16), b.substr(4, 16));
  EXPECT_NE(a, b);
}

TEST(RequestId, AcceptableClientIds) {
  EXPECT_TRUE(proxy::acceptable_client_request_id("abc-123"));
  EXPECT_TRUE(proxy::acceptable_client_request_id("x"));
  EXPECT_TRUE(proxy::acceptable_client_request_id(std::string(128, 'a')));
  EXPECT_TRUE(proxy::acceptable_client_request_id("!~{}[]:;/._=+"));
  EXPECT_FALSE(proxy::acceptable_client_request_id(""));
  EXPECT_FALSE(proxy::acceptable_client_request_id(std::string(129, 'a')));
  EXPECT_FALSE(proxy::acceptable_client_request_id("abc 123"));
  EXPECT_FALSE(proxy::acceptable_client_request_id(" abc"));
  EXPECT_FALSE(proxy::acceptable_client_request_id("abc\t"));
  EXPECT_FALSE(proxy::acceptable_client_request_id("abc\r\nX-Injected: 1"));
  EXPECT_FALSE(proxy::acceptable_client_request_id(std::string("a\0b", 3)));
  EXPECT_FALSE(proxy::acceptable_client_request_id("a\x7f"));
  EXPECT_FALSE(proxy::acceptable_client_request_id("caf\xc3\xa9"));
}

}  // namespace
}  // namespace llmproxy
