#include "http/errors.h"

#include <cstdint>
#include <cstring>

namespace llmproxy::http {

namespace {

constexpr char kHex[] = "0123456789abcdef";

// Length of the valid UTF-8 sequence starting at s[i] (1..4), or 0 when it is not valid
// (overlong forms, surrogates and code points above U+10FFFF are invalid, as in RFC 3629).
std::size_t utf8_sequence(std::string_view s, std::size_t i) {
  auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
  auto cont = [&](std::size_t k) { return i + k < s.size() && (b(k) & 0xC0) == 0x80; };
  unsigned char c = b(0);
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(1) || !cont(2)) return 0;
    if (c == 0xE0 && b(1) < 0xA0) return 0;   // overlong
    if (c == 0xED && b(1) >= 0xA0) return 0;  // UTF-16 surrogates
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    if (c == 0xF0 && b(1) < 0x90) return 0;   // overlong
    if (c == 0xF4 && b(1) >= 0x90) return 0;  // above U+10FFFF
    return 4;
  }
  return 0;
}

// Do all eight bytes of `x` go out as they are: none a control byte, a quote, a backslash or
// above 0x7f? (Word-at-a-time tests: exact for whether any byte matches, which is all we need.)
bool plain_word(std::uint64_t x) {
  constexpr std::uint64_t kOnes = 0x0101010101010101ull;
  constexpr std::uint64_t kHigh = 0x8080808080808080ull;
  auto has_zero = [](std::uint64_t v) { return (v - kOnes) & ~v & kHigh; };
  const std::uint64_t below_space = (x - kOnes * 0x20) & ~x & kHigh;
  return ((x & kHigh) | below_space | has_zero(x ^ (kOnes * '"')) | has_zero(x ^ (kOnes * '\\'))) ==
         0;
}

// The first byte at or after s[i] that a JSON string cannot hold as it is (a control byte, a
// quote, a backslash, anything above 0x7f), or s.size(): eight bytes at a time, then one.
std::size_t skip_plain(std::string_view s, std::size_t i) {
  const auto plain_at = [&s](std::size_t at) {
    std::uint64_t word;
    std::memcpy(&word, s.data() + at, 8);
    return plain_word(word);
  };
  while (i + 8 <= s.size() && plain_at(i)) i += 8;
  // Fewer than eight left: the last eight bytes (some already seen) answer for them at once.
  if (i + 8 > s.size() && s.size() >= 8 && plain_at(s.size() - 8)) return s.size();
  for (; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c >= 0x80 || c == '"' || c == '\\') break;
  }
  return i;
}

}  // namespace

// Bytes that need no escaping are copied in runs; a byte that does not start a valid UTF-8
// sequence (client input can carry any byte) becomes U+FFFD, so the output is always valid JSON.
char* write_json_escaped(char* p, std::string_view s) {
  std::size_t run = 0;  // start of the bytes not yet copied
  std::size_t i = 0;
  const auto put = [&p](std::string_view piece) {
    if (piece.empty()) return;  // an empty view may have no data pointer to copy from
    std::memcpy(p, piece.data(), piece.size());
    p += piece.size();
  };
  while (i < s.size()) {
    i = skip_plain(s, i);
    if (i == s.size()) break;
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      if (std::size_t n = utf8_sequence(s, i); n != 0) {
        i += n;
        continue;
      }
    }
    put(s.substr(run, i - run));
    switch (c) {
      case '"':
        put("\\\"");
        break;
      case '\\':
        put("\\\\");
        break;
      case '\n':
        put("\\n");
        break;
      case '\r':
        put("\\r");
        break;
      case '\t':
        put("\\t");
        break;
      default:
        if (c < 0x20) {
          const char u[6] = {'\\', 'u', '0', '0', kHex[c >> 4], kHex[c & 0xf]};
          put(std::string_view(u, 6));
        } else {
          put("\\ufffd");  // a byte that does not start a valid UTF-8 sequence
        }
    }
    ++i;
    run = i;
  }
  put(s.substr(run));
  return p;
}

bool is_json_string_body(std::string_view s) {
  const auto hex = [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
  };
  std::size_t i = 0;
  while (i < s.size()) {
    i = skip_plain(s, i);
    if (i == s.size()) break;
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const std::size_t n = utf8_sequence(s, i);
      if (n == 0) return false;
      i += n;
      continue;
    }
    if (c != '\\' || i + 1 == s.size()) return false;  // a quote, a control byte, a '\' at the end
    switch (s[i + 1]) {
      case '"':
      case '\\':
      case '/':
      case 'b':
      case 'f':
      case 'n':
      case 'r':
      case 't':
        i += 2;
        break;
      case 'u':
        if (s.size() - i < 6 || !hex(s[i + 2]) || !hex(s[i + 3]) || !hex(s[i + 4]) ||
            !hex(s[i + 5])) {
          return false;
        }
        i += 6;
        break;
      default:
        return false;
    }
  }
  return true;
}

void append_json_escaped(std::string& out, std::string_view s) {
  const std::size_t old = out.size();
  out.resize(old + kJsonEscapedMax * s.size());
  char* end = write_json_escaped(out.data() + old, s);
  out.resize(static_cast<std::size_t>(end - out.data()));
}

std::string error_body(const ErrorSpec& spec, std::string_view message, std::string_view param) {
  std::string out;
  out.reserve(96 + message.size() + spec.type.size() + spec.code.size() + param.size());
  out += R"({"error":{"message":")";
  append_json_escaped(out, message);
  out += R"(","type":")";
  out += spec.type;
  if (param.empty()) {
    out += R"(","param":null,"code":")";
  } else {
    out += R"(","param":")";
    append_json_escaped(out, param);
    out += R"(","code":")";
  }
  out += spec.code;
  out += "\"}}";
  return out;
}

}  // namespace llmproxy::http
