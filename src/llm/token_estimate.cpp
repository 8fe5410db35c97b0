#include "llm/token_estimate.h"

#include <algorithm>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llmproxy::llm {

void TextCount::add_utf8(std::string_view text) {
  // Sixteen bytes at a time where SSE2 is there (every x86-64; a 1 MiB prompt took ~7
  // instructions a byte one byte at a time): non-ASCII bytes are those >= 0x80, lead bytes (a
  // code point's first; continuation bytes are 10xxxxxx) those >= 0xC0. Per-lane counters are
  // summed for at most 255 rounds, then folded. The rest, and other CPUs, byte by byte.
  const char* p = text.data();
  std::size_t n = text.size();
#if defined(__SSE2__)
  // As signed bytes: < 0 is non-ASCII; > -65 (0xBF) is ASCII or a lead byte.
  const __m128i zero = _mm_setzero_si128();
  const __m128i above_continuation = _mm_set1_epi8(-65);
  while (n >= 16) {
    const std::size_t rounds = std::min<std::size_t>(n / 16, 255);
    __m128i high = zero, ascii_or_lead = zero;
    for (std::size_t k = 0; k < rounds; ++k, p += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      high = _mm_sub_epi8(high, _mm_cmplt_epi8(b, zero));  // a true lane is -1: subtract it
      ascii_or_lead = _mm_sub_epi8(ascii_or_lead, _mm_cmpgt_epi8(b, above_continuation));
    }
    const auto fold = [&zero](__m128i lanes) {  // the sum of the sixteen byte lanes
      const __m128i sums = _mm_sad_epu8(lanes, zero);
      return static_cast<std::uint64_t>(_mm_cvtsi128_si32(sums)) +
             static_cast<std::uint64_t>(_mm_extract_epi16(sums, 4));
    };
    const std::uint64_t non_ascii = fold(high);
    const std::uint64_t ascii_bytes = 16 * rounds - non_ascii;
    ascii += ascii_bytes;
    other += fold(ascii_or_lead) - ascii_bytes;
    n -= 16 * rounds;
  }
#endif
  for (unsigned char c : std::string_view(p, n)) {
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

std::int64_t TextCount::json_tokens() const {
  if (empty()) return 0;
  return static_cast<std::int64_t>((ascii + 2) / 3 + (4 * other + 4) / 5);
}

}  // namespace llmproxy::llm
