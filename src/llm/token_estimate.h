// Token estimates for when a backend reports no usage (an old server, a stream cut off by a
// client hang-up or an upstream error). A tokenizer is not available to the gateway, so it
// counts what tokenizers are sensitive to: ASCII bytes (English text and code run at about four
// bytes per token in BPE vocabularies) and other code points (CJK and most other scripts run at
// 0.7 to 1.1 tokens per character; the estimate takes 0.8). bench/estimate/ measures the error of
// this estimate against real tokenizers; the README quotes it.
#pragma once

#include <cstdint>
#include <string_view>

namespace llmproxy::llm {

struct TextCount {
  std::uint64_t ascii = 0;  // ASCII bytes
  std::uint64_t other = 0;  // non-ASCII code points

  void add_utf8(std::string_view text);
  // Adds the inside of a JSON string literal as it appears on the wire (escapes undecoded):
  // \uXXXX counts as one code point, other escapes as one ASCII byte.
  void add_json_escaped(std::string_view text);
  TextCount& operator+=(const TextCount& o) {
    ascii += o.ascii;
    other += o.other;
    return *this;
  }
  bool empty() const { return ascii == 0 && other == 0; }
  std::int64_t tokens() const;
  // The same for JSON text (tool definitions, call arguments), which runs at about three ASCII
  // bytes per token: quotes, braces and short keys rarely merge (bench/results/estimate.md).
  std::int64_t json_tokens() const;
};

}  // namespace llmproxy::llm
