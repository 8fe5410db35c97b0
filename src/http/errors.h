// Error bodies in the shape the OpenAI SDKs parse:
//   {"error":{"message":"...","type":"...","param":null,"code":"..."}} (param: the field at fault)
// Every refusal the gateway produces itself goes through here, so clients see one shape.
#pragma once

#include <string>
#include <string_view>

namespace llmproxy::http {

struct ErrorSpec {
  unsigned status;
  std::string_view type;  // invalid_request_error, server_error, ...
  std::string_view code;  // machine-readable, e.g. model_not_found
};

// Well-known refusals, so that status, type and code stay consistent across the code base.
namespace errors {
inline constexpr ErrorSpec invalid_json{400, "invalid_request_error", "invalid_json"};
inline constexpr ErrorSpec invalid_request{400, "invalid_request_error", "invalid_request"};
inline constexpr ErrorSpec string_too_long{400, "invalid_request_error", "string_above_max_length"};
inline constexpr ErrorSpec invalid_config{400, "invalid_request_error", "invalid_config"};
inline constexpr ErrorSpec unauthorized{401, "authentication_error", "invalid_admin_token"};
inline constexpr ErrorSpec admin_loopback_only{403, "permission_error", "admin_loopback_only"};
inline constexpr ErrorSpec not_found{404, "invalid_request_error", "not_found"};
inline constexpr ErrorSpec model_not_found{404, "invalid_request_error", "model_not_found"};
inline constexpr ErrorSpec method_not_allowed{405, "invalid_request_error", "method_not_allowed"};
inline constexpr ErrorSpec request_timeout{408, "invalid_request_error", "request_timeout"};
inline constexpr ErrorSpec body_too_large{413, "invalid_request_error", "request_too_large"};
inline constexpr ErrorSpec uri_too_long{414, "invalid_request_error", "uri_too_long"};
inline constexpr ErrorSpec expectation_failed{417, "invalid_request_error", "expectation_failed"};
inline constexpr ErrorSpec headers_too_large{431, "invalid_request_error", "headers_too_large"};
inline constexpr ErrorSpec reload_failed{500, "server_error", "reload_failed"};
inline constexpr ErrorSpec bad_gateway{502, "server_error", "upstream_error"};
inline constexpr ErrorSpec no_healthy_backend{503, "server_error", "no_healthy_backend"};
inline constexpr ErrorSpec usage_backlog{503, "server_error", "usage_backlog"};
inline constexpr ErrorSpec shutting_down{503, "server_error", "shutting_down"};
inline constexpr ErrorSpec overloaded{503, "server_error", "overloaded"};
inline constexpr ErrorSpec gateway_timeout{504, "server_error", "upstream_timeout"};
}  // namespace errors

// `param`: the request field at fault, as OpenAI's error.param; empty gives null.
std::string error_body(const ErrorSpec& spec, std::string_view message,
                       std::string_view param = {});

// Appends `text` to `out` as the inside of a JSON string literal (quotes not included).
void append_json_escaped(std::string& out, std::string_view text);

// The same bytes written at p, which must have room for kJsonEscapedMax * text.size() bytes (an
// escape is at most six bytes for one); returns the end of what was written.
inline constexpr std::size_t kJsonEscapedMax = 6;
char* write_json_escaped(char* p, std::string_view text);

// Is `text` the inside of a valid JSON string literal (RFC 8259): valid UTF-8, no quote or control
// byte unescaped, every escape one of \" \\ \/ \b \f \n \r \t \uXXXX? (What write_json_escaped
// writes always is; bytes read back from disk may not be.)
bool is_json_string_body(std::string_view text);

}  // namespace llmproxy::http
