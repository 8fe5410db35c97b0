#include "http/response_head.h"

#include <algorithm>
#include <boost/beast/core/string.hpp>
#include <charconv>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llmproxy::http {

namespace {

namespace bhttp = boost::beast::http;

// RFC 9110 tchar: the bytes of a field name.
constexpr std::array<bool, 256> make_tchar() {
  std::array<bool, 256> t{};
  for (int c = '0'; c <= '9'; ++c) t[static_cast<unsigned>(c)] = true;
  for (int c = 'a'; c <= 'z'; ++c) t[static_cast<unsigned>(c)] = true;
  for (int c = 'A'; c <= 'Z'; ++c) t[static_cast<unsigned>(c)] = true;
  for (char c : std::string_view("!#$%&'*+-.^_`|~")) t[static_cast<unsigned char>(c)] = true;
  return t;
}
constexpr std::array<bool, 256> kTchar = make_tchar();

// The bytes of a field value or reason phrase: visible, obs-text, space and tab.
constexpr std::array<bool, 256> make_value() {
  std::array<bool, 256> t{};
  for (unsigned c = 0x21; c < 0x100; ++c) t[c] = c != 0x7f;
  t[' '] = t['\t'] = true;
  return t;
}
constexpr std::array<bool, 256> kValue = make_value();

// The first byte in [from, end) that cannot be in a field value or reason phrase (a control
// byte other than HTAB, or DEL), or `end`. Sixteen bytes at a time where sixteen remain: a byte
// is a control byte when max(byte, 0x1f) == 0x1f, unsigned.
const char* first_non_value(const char* from, const char* end) {
#if defined(__SSE2__)
  const __m128i tab = _mm_set1_epi8('\t');
  const __m128i last_control = _mm_set1_epi8(0x1f);
  const __m128i del = _mm_set1_epi8(0x7f);
  while (end - from >= 16) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from));
    const __m128i control = _mm_cmpeq_epi8(_mm_max_epu8(x, last_control), last_control);
    const __m128i bad =
        _mm_or_si128(_mm_andnot_si128(_mm_cmpeq_epi8(x, tab), control), _mm_cmpeq_epi8(x, del));
    if (const int mask = _mm_movemask_epi8(bad); mask != 0) return from + __builtin_ctz(mask);
    from += 16;
  }
#endif
  while (from < end && kValue[static_cast<unsigned char>(*from)]) ++from;
  return from;
}

// A comma-separated list of tokens (Connection), spaces only around the commas: what Beast
// accepts there.
bool token_list(std::string_view v) {
  enum { before, in_token, after } state = before;  // around one element
  bool any = false;
  for (char ch : v) {
    const auto c = static_cast<unsigned char>(ch);
    if (kTchar[c]) {
      if (state == after) return false;  // two tokens without a comma
      state = in_token;
      any = true;
    } else if (c == ',') {
      if (state == before) return false;  // an empty element
      state = before;
    } else if (c == ' ' || c == '\t') {
      if (state == in_token) state = after;
    } else {
      return false;
    }
  }
  return any && state != before;
}

std::string_view trim(std::string_view v) {
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
  return v;
}

// Does the field name `n` (tchar bytes) equal `lower` (lower case letters, digits, '-', of the
// same length, at least 8), ignoring case? Eight bytes at a time: setting bit 0x20 lowers a
// letter and leaves digits and '-' alone; no other tchar byte becomes a letter or '-' by it.
bool name_is(std::string_view n, std::string_view lower) {
  constexpr std::uint64_t kLower = 0x2020202020202020ull;
  auto word = [](const char* p) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    return w;
  };
  const std::size_t last = n.size() - 8;  // the last word overlaps the one before
  for (std::size_t i = 0; i < last; i += 8) {
    if ((word(n.data() + i) | kLower) != word(lower.data() + i)) return false;
  }
  return (word(n.data() + last) | kLower) == word(lower.data() + last);
}

// The fields the gateway acts on (framing, hop-by-hop, Content-Type), by lower-case name.
struct ActedOn {
  std::string_view name;
  bhttp::field code;
};
constexpr ActedOn kActedOn[] = {
    {"te", bhttp::field::te},
    {"trailer", bhttp::field::trailer},
    {"upgrade", bhttp::field::upgrade},
    {"connection", bhttp::field::connection},
    {"keep-alive", bhttp::field::keep_alive},
    {"content-type", bhttp::field::content_type},
    {"content-length", bhttp::field::content_length},
    {"proxy-connection", bhttp::field::proxy_connection},
    {"transfer-encoding", bhttp::field::transfer_encoding},
    {"proxy-authenticate", bhttp::field::proxy_authenticate},
    {"proxy-authorization", bhttp::field::proxy_authorization},
};

// The code of a field the gateway acts on; unknown for the others, which it only forwards.
bhttp::field classify(std::string_view n) {
  for (const auto& [name, code] : kActedOn) {
    if (name.size() != n.size()) continue;
    if (n.size() >= 8 ? name_is(n, name) : boost::beast::iequals(n, name)) return code;
  }
  return bhttp::field::unknown;
}

// No complete header yet: more bytes, unless a line already ends in a bare LF (Beast decides).
HeadParse incomplete(std::string_view bytes) {
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    if (bytes[i] == '\n' && (i == 0 || bytes[i - 1] != '\r')) return HeadParse::unsupported;
  }
  return HeadParse::need_more;
}

}  // namespace

HeadParse parse_response_head(std::string_view bytes, ResponseHead& out) {
  // One pass over the lines; running out of bytes anywhere means an incomplete header.
  const char* const begin = bytes.data();
  const char* const end = begin + bytes.size();
  const char* p = begin;
  // The end of the value-like run at `from`: the CR of its CRLF, or null when the bytes end
  // first; `bad` when something else ends it.
  bool bad = false;
  auto line_end = [&](const char* from) -> const char* {
    const char* cr = first_non_value(from, end);
    if (cr == end) return nullptr;
    if (*cr != '\r') {
      bad = true;  // a control byte (a bare LF among them) before the CR
      return cr;
    }
    if (end - cr < 2) return nullptr;
    if (cr[1] != '\n') bad = true;
    return cr;
  };

  // Status line: HTTP/1.x SP 3DIGIT SP reason CRLF
  if (std::memcmp(p, "HTTP/1.", std::min<std::size_t>(bytes.size(), 7)) != 0) {
    return HeadParse::unsupported;  // not a response Beast could read either: it says so at once
  }
  if (end - p < 13) return incomplete(bytes);
  if (std::memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1') || p[8] != ' ' ||
      p[12] != ' ') {
    return HeadParse::unsupported;
  }
  unsigned status = 0;
  for (int i = 9; i < 12; ++i) {
    if (p[i] < '0' || p[i] > '9') return HeadParse::unsupported;
    status = status * 10 + static_cast<unsigned>(p[i] - '0');
  }
  if (status < 100 || status == 101) return HeadParse::unsupported;
  const char* eol = line_end(p + 13);
  if (!eol) return incomplete(bytes);
  if (bad) return HeadParse::unsupported;
  out.version = p[7] == '1' ? 11 : 10;
  out.status = status;
  out.reason = std::string_view(p + 13, static_cast<std::size_t>(eol - (p + 13)));
  out.count = 0;
  out.content_length.reset();
  out.chunked = false;
  out.connection = {};
  p = eol + 2;

  // Fields: token ":" OWS value OWS CRLF, up to an empty line.
  bool have_length = false;
  bool have_coding = false;
  bool have_connection = false;
  for (;;) {
    if (end - p < 2) return incomplete(bytes);
    if (p[0] == '\r' && p[1] == '\n') break;
    const char* colon = p;
    while (colon < end && kTchar[static_cast<unsigned char>(*colon)]) ++colon;
    if (colon == end) return incomplete(bytes);  // a name cut short by the end of the bytes
    // Not a name (an empty one, a line without a colon, folding, a bare LF...): Beast decides.
    if (*colon != ':' || colon == p) return HeadParse::unsupported;
    eol = line_end(colon + 1);
    if (!eol) return incomplete(bytes);
    if (bad || out.count == out.fields.size()) return HeadParse::unsupported;
    HeadField& f = out.fields[out.count++];
    f.name_text = std::string_view(p, static_cast<std::size_t>(colon - p));
    f.value_text = trim(std::string_view(colon + 1, static_cast<std::size_t>(eol - colon - 1)));
    f.code = classify(f.name_text);
    const std::string_view value = f.value_text;
    switch (f.code) {
      case bhttp::field::content_length: {
        if (have_length || value.empty() || value.size() > 18) return HeadParse::unsupported;
        std::uint64_t n = 0;
        for (char c : value) {
          if (c < '0' || c > '9') return HeadParse::unsupported;
          n = n * 10 + static_cast<std::uint64_t>(c - '0');
        }
        out.content_length = n;
        have_length = true;
        break;
      }
      case bhttp::field::transfer_encoding:
        if (have_coding || out.version < 11 || !boost::beast::iequals(value, "chunked")) {
          return HeadParse::unsupported;
        }
        out.chunked = true;
        have_coding = true;
        break;
      case bhttp::field::connection:
        if (have_connection || value.size() > 128 || !token_list(value)) {
          return HeadParse::unsupported;
        }
        out.connection = value;
        have_connection = true;
        break;
      case bhttp::field::proxy_connection:  // Beast reads it like Connection: its keep-alive
        return HeadParse::unsupported;
      default:
        break;
    }
    p = eol + 2;
  }
  if (have_length && have_coding) return HeadParse::unsupported;
  out.size = static_cast<std::size_t>(p + 2 - begin);
  return HeadParse::done;
}

std::string_view ResponseHead::framing_header() {
  char* p = framing_.data();
  auto put = [&p](std::string_view v) {
    std::memcpy(p, v.data(), v.size());
    p += v.size();
  };
  put(version == 10 ? "HTTP/1.0 " : "HTTP/1.1 ");
  p = std::to_chars(p, p + 3, status).ptr;
  put(" R\r\n");
  if (chunked) put("Transfer-Encoding: chunked\r\n");
  if (content_length) {
    put("Content-Length: ");
    p = std::to_chars(p, p + 20, *content_length).ptr;
    put("\r\n");
  }
  if (!connection.empty()) {
    put("Connection: ");
    put(connection);
    put("\r\n");
  }
  put("\r\n");
  return {framing_.data(), static_cast<std::size_t>(p - framing_.data())};
}

}  // namespace llmproxy::http
