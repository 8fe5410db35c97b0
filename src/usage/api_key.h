// How a client's API key appears in usage records: `full` (the original product's behaviour),
// `masked` (enough to recognise a key, not to use it) or `sha256` (joinable with a key table
// without storing keys).
#pragma once

#include <string>
#include <string_view>

#include "config/config.h"

namespace llmproxy::usage {

// The key of a request: `Authorization: Bearer <key>`, else `X-API-Key`; empty when none.
std::string_view api_key_from_headers(std::string_view authorization, std::string_view x_api_key);

// "sk-pro...xxx1" for keys longer than 12 characters, "***" for shorter ones, "" for none;
// "sha256:<hex>" in sha256 mode.
std::string present_api_key(std::string_view key, config::ApiKeyMode mode);

}  // namespace llmproxy::usage
