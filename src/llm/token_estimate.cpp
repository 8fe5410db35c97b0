#include "llm/token_estimate.h"

namespace llmproxy::llm {

void TextCount::add_utf8(std::string_view text) {
  for (unsigned char c : text) {
    if (c < 0x80) {
      ++ascii;
    } else if ((c & 0xC0) != 0x80) {
      ++other;  // a lead byte starts a code point; continuation bytes do not
    }
  }
}

void TextCount::add_json_escaped(std::string_view text) {
  for (std::size_t i = 0; i < text.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == '\\' && i + 1 < text.size()) {
      if (text[i + 1] == 'u' && i + 5 < text.size()) {
        // \uXXXX: ASCII when below 0x80; a surrogate pair counts as two halves of one point.
        unsigned v = 0;
        for (std::size_t k = i + 2; k < i + 6; ++k) {
          char h = text[k];
          v = v * 16 + static_cast<unsigned>(h >= 'a'   ? h - 'a' + 10
                                             : h >= 'A' ? h - 'A' + 10
                                                        : h - '0');
        }
        if (v < 0x80) {
          ++ascii;
        } else if (v < 0xDC00 || v > 0xDFFF) {
          ++other;
        }
        i += 5;
      } else {
        ++ascii;
        ++i;
      }
    } else if (c < 0x80) {
      ++ascii;
    } else if ((c & 0xC0) != 0x80) {
      ++other;
    }
  }
}

std::int64_t TextCount::tokens() const {
  if (empty()) return 0;
  // Each part rounded up: a non-empty text is at least one token. 0.8 tokens per non-ASCII code
  // point fits the vocabularies measured in bench/results/estimate.md best (CJK: 0.66 for
  // Qwen3 to 1.14 for cl100k).
  return static_cast<std::int64_t>((ascii + 3) / 4 + (4 * other + 4) / 5);
}

}  // namespace llmproxy::llm
