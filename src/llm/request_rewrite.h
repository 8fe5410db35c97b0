// The one change the gateway makes to a request body: asking a streaming backend for usage
// (`stream_options.include_usage: true`) when the client did not, so that every stream can be
// billed from the backend's own numbers. Only chat and completions accept the field.
#pragma once

#include <simdjson.h>

#include <optional>
#include <string>
#include <string_view>

namespace llmproxy::llm {

// The body with include_usage set, or nullopt when it cannot be rewritten (not an object).
// Common case (no stream_options key): the field is inserted after the opening brace and the
// rest of the bytes are kept as they are. When stream_options is present (without
// include_usage: true), the document is re-serialized with simdjson (numbers keep their value;
// their spelling may change); of duplicated stream_options the last one is kept, the one
// Python and JavaScript servers read. `keep_continuous` keeps continuous_usage_stats (the client
// asked for usage through it); otherwise it is dropped with the client's include_usage.
std::optional<std::string> with_include_usage(std::string_view body, bool has_stream_options,
                                              bool keep_continuous, simdjson::dom::parser& parser);

}  // namespace llmproxy::llm
