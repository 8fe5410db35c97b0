// Parsing of the human-friendly scalars the config file uses: durations ("500ms", "1s", "2m",
// "1m30s", "1.5s") and byte sizes ("512KiB", "10MiB", "1MB", "4096").
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace llmproxy::config {

// Go-style duration: one or more <number><unit> groups, unit in {ms, s, m, h}; "0" alone is zero.
// A bare number other than 0 is rejected: "10" could mean seconds or milliseconds.
std::optional<std::chrono::milliseconds> parse_duration(std::string_view text);

// Byte size: a non-negative integer with an optional unit: B, KB/MB/GB (powers of 1000),
// KiB/MiB/GiB or K/M/G (powers of 1024). Case-sensitive units avoid "mb" vs "Mb" guesswork.
std::optional<std::uint64_t> parse_size(std::string_view text);

// Formats a duration the way parse_duration reads it back ("1m30s", "250ms", "0s").
std::string format_duration(std::chrono::milliseconds d);

}  // namespace llmproxy::config
