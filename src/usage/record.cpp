// The usage record's JSON, written by hand.
//
// This runs once per record on the log writer's thread (never on the request path), and its
// output is what every receiver parses, so it is exact rather than generic: the seed's eleven
// fields first, in the seed's order and with the seed's JSON types (strings are never null, an
// unknown value is ""), then the additions. No JSON library and no iostreams: strings are copied
// through http::write_json_escaped (invalid UTF-8 from a header becomes U+FFFD, so a receiver's
// JSON parser never rejects a record because of one odd byte), numbers through std::to_chars.
#include "usage/record.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstring>

#include "http/errors.h"

namespace llmproxy::usage {

namespace {

// The writers below put their bytes at p (the caller reserved room) and return the end.
char* put(char* p, std::string_view text) {
  std::memcpy(p, text.data(), text.size());
  return p + text.size();
}

char* put_int(char* p, std::int64_t v) {
  return std::to_chars(p, p + 20, v).ptr;
}

void append_digits(char* p, int value, int width) {
  for (int i = width - 1; i >= 0; --i) {
    p[i] = static_cast<char>('0' + value % 10);
    value /= 10;
  }
}

// A JSON number with at most three decimals and no trailing zeros ("12.5", "7", "0.125").
char* put_millis(char* p, double v) {
  if (!std::isfinite(v)) v = 0;
  // Most values take an integer path: when 0 <= v * 1000 < 2^40 (about 12 days), the product is
  // off by at most 2^-13 from the exact one, so unless its thousandths are within 1/1000 of a tie
  // it rounds to the integer to_chars would round the exact value to. Ties and the rest go to
  // to_chars.
  const double m = v * 1000;
  if (m >= 0 && m < 0x1p40) {
    const double whole = std::floor(m);
    const double frac = m - whole;
    if (std::fabs(frac - 0.5) > 1e-3) {
      const auto n = static_cast<std::uint64_t>(whole) + (frac > 0.5 ? 1 : 0);
      p = std::to_chars(p, p + 20, n / 1000).ptr;
      if (const auto decimals = static_cast<int>(n % 1000); decimals != 0) {
        char d[4] = {'.'};
        append_digits(d + 1, decimals, 3);
        std::size_t len = 4;
        while (d[len - 1] == '0') --len;
        p = put(p, std::string_view(d, len));
      }
      return p;
    }
  }
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed, 3);
  if (ec != std::errc()) return put(p, "0");  // too large for buf (the trim below needs a '.')
  std::string_view text(buf, static_cast<std::size_t>(end - buf));
  while (text.back() == '0') text.remove_suffix(1);
  if (text.back() == '.') text.remove_suffix(1);
  if (text == "-0") text = "0";
  return put(p, text);
}

// Room for a number written by put_int (19 digits and a sign) or put_millis (at most its 64-byte
// buffer: a value too large for it is written as 0).
constexpr std::size_t kIntMax = 20;
constexpr std::size_t kMillisMax = 64;

}  // namespace

namespace {

// RFC 3339 UTC with seconds, "2026-01-14T10:30:00Z", into p[0..20). The date from the day count
// by the usual proleptic-Gregorian arithmetic (400-year eras), without gmtime_r's locking.
void format_rfc3339(char* p, std::int64_t unix_ms) {
  std::int64_t secs = unix_ms / 1000;
  if (unix_ms % 1000 < 0) --secs;  // floor for times before 1970
  std::int64_t days = secs / 86400;
  std::int64_t sod = secs % 86400;
  if (sod < 0) {
    sod += 86400;
    --days;
  }
  const std::int64_t z = days + 719468;  // days since 0000-03-01
  const std::int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  const std::int64_t doe = z - era * 146097;                                       // [0, 146096]
  const std::int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;  // [0, 399]
  const std::int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);                // [0, 365]
  const std::int64_t mp = (5 * doy + 2) / 153;                                     // March = 0
  const int day = static_cast<int>(doy - (153 * mp + 2) / 5 + 1);
  const int month = static_cast<int>(mp < 10 ? mp + 3 : mp - 9);
  const std::int64_t year = yoe + era * 400 + (month <= 2 ? 1 : 0);
  std::memcpy(p, "0000-00-00T00:00:00Z", 20);
  append_digits(p, static_cast<int>(std::clamp<std::int64_t>(year, 0, 9999)), 4);
  append_digits(p + 5, month, 2);
  append_digits(p + 8, day, 2);
  append_digits(p + 11, static_cast<int>(sod / 3600), 2);
  append_digits(p + 14, static_cast<int>(sod / 60 % 60), 2);
  append_digits(p + 17, static_cast<int>(sod % 60), 2);
}

}  // namespace

std::string rfc3339(std::int64_t unix_ms) {
  char buf[20];
  format_rfc3339(buf, unix_ms);
  return std::string(buf, 20);
}

namespace {

// Text (a key with its punctuation, or a row's punctuation) then a string value, escaped.
char* put_text(char* p, std::string_view before, std::string_view value) {
  return http::write_json_escaped(put(p, before), value);
}

char* put_num(char* p, std::string_view before, std::int64_t value) {
  return put_int(put(p, before), value);
}

// Makes room at the end of `out` for `fixed` bytes plus the record's strings, escaped; returns
// where to write. The caller resizes `out` to what it wrote.
template <class Str>
char* reserve_for(std::string& out, const BasicUsageRecord<Str>& r, std::size_t fixed) {
  const std::size_t strings = r.request_id.size() + r.user_id.size() + r.api_key.size() +
                              r.model.size() + r.endpoint.size() + r.backend_url.size() +
                              r.client_request_id.size() + r.backend.size() + r.finish.size() +
                              r.usage_source.size();
  const std::size_t old = out.size();
  out.resize(old + fixed + http::kJsonEscapedMax * strings);
  return out.data() + old;
}

}  // namespace

// Keys are written with their punctuation as one literal each, into room reserved once (one
// size check per record instead of one per piece): this runs once per record.
template <class Str>
void append_json(std::string& out, const BasicUsageRecord<Str>& r) {
  using namespace std::string_view_literals;
  // Keys and punctuation (~400 bytes), six integers, two millisecond values, the timestamp.
  char* p = reserve_for(out, r, 512 + 6 * kIntMax + 2 * kMillisMax + 20);
  const auto text = [&p](std::string_view key, std::string_view value) {
    p = put_text(p, key, value);
  };
  const auto num = [&p](std::string_view key, std::int64_t value) { p = put_num(p, key, value); };
  text(R"({"request_id":")"sv, r.request_id);
  text(R"(","user_id":")"sv, r.user_id);
  text(R"(","api_key":")"sv, r.api_key);
  text(R"(","model":")"sv, r.model);
  num(R"(","prompt_tokens":)"sv, r.prompt_tokens);
  num(R"(,"completion_tokens":)"sv, r.completion_tokens);
  num(R"(,"total_tokens":)"sv, r.total_tokens);
  text(r.is_stream ? R"(,"is_stream":true,"endpoint":")"sv : R"(,"is_stream":false,"endpoint":")"sv,
       r.endpoint);
  p = put(p, R"(","timestamp":")"sv);
  format_rfc3339(p, r.timestamp_ms);
  p += 20;
  text(R"(","backend_url":")"sv, r.backend_url);
  // Additions.
  if (r.client_request_id.empty()) {
    p = put(p, R"(","client_request_id":null)"sv);
  } else {
    text(R"(","client_request_id":")"sv, r.client_request_id);
    p = put(p, "\""sv);
  }
  text(R"(,"backend":")"sv, r.backend);
  num(R"(","status_code":)"sv, r.status_code);
  p = put_millis(put(p, R"(,"duration_ms":)"sv), r.duration_ms);
  p = put(p, R"(,"ttft_ms":)"sv);
  p = r.ttft_ms < 0 ? put(p, "null"sv) : put_millis(p, r.ttft_ms);
  text(R"(,"finish":")"sv, r.finish);
  text(R"(","usage_source":")"sv, r.usage_source);
  p = put(p, "\""sv);
  if (r.cached_tokens >= 0) num(R"(,"cached_tokens":)"sv, r.cached_tokens);
  if (r.reasoning_tokens >= 0) num(R"(,"reasoning_tokens":)"sv, r.reasoning_tokens);
  p = put(p, "}"sv);
  out.resize(static_cast<std::size_t>(p - out.data()));
}

template void append_json(std::string& out, const UsageRecord& r);
template void append_json(std::string& out, const UsageRecordView& r);

std::string to_json(const UsageRecord& r) {
  std::string out;
  append_json(out, r);
  return out;
}

// Strings are escaped as append_json escapes them, so that expanding a row copies each one.
template <class Str>
void append_row(std::string& out, const BasicUsageRecord<Str>& r) {
  using namespace std::string_view_literals;
  // Punctuation (~60 bytes), eight integers, two millisecond values.
  char* p = reserve_for(out, r, 128 + 8 * kIntMax + 2 * kMillisMax);
  const auto text = [&p](std::string_view before, std::string_view value) {
    p = put_text(p, before, value);
  };
  const auto num = [&p](std::string_view before, std::int64_t value) {
    p = put_num(p, before, value);
  };
  text(R"([")"sv, r.request_id);
  text(R"(",")"sv, r.user_id);
  text(R"(",")"sv, r.api_key);
  text(R"(",")"sv, r.model);
  num(R"(",)"sv, r.prompt_tokens);
  num(","sv, r.completion_tokens);
  num(","sv, r.total_tokens);
  text(r.is_stream ? R"(,1,")"sv : R"(,0,")"sv, r.endpoint);
  num(R"(",)"sv, r.timestamp_ms);
  text(R"(,")"sv, r.backend_url);
  if (r.client_request_id.empty()) {
    p = put(p, R"(",null)"sv);
  } else {
    text(R"(",")"sv, r.client_request_id);
    p = put(p, "\""sv);
  }
  text(R"(,")"sv, r.backend);
  num(R"(",)"sv, r.status_code);
  p = put_millis(put(p, ","sv), r.duration_ms);
  p = put(p, ","sv);
  p = r.ttft_ms < 0 ? put(p, "null"sv) : put_millis(p, r.ttft_ms);
  text(R"(,")"sv, r.finish);
  text(R"(",")"sv, r.usage_source);
  p = put(p, "\""sv);
  if (r.cached_tokens >= 0 || r.reasoning_tokens >= 0) {
    p = r.cached_tokens >= 0 ? put_int(put(p, ","sv), r.cached_tokens) : put(p, ",null"sv);
    if (r.reasoning_tokens >= 0) num(","sv, r.reasoning_tokens);
  }
  p = put(p, "]"sv);
  out.resize(static_cast<std::size_t>(p - out.data()));
}

template void append_row(std::string& out, const UsageRecord& r);
template void append_row(std::string& out, const UsageRecordView& r);

namespace {

using V = RowValue;
// append_row writes the values in this order.
constexpr std::array<RowField, 20> kRowFields{{
    {"request_id", V::string},
    {"user_id", V::string},
    {"api_key", V::string},
    {"model", V::string},
    {"prompt_tokens", V::number},
    {"completion_tokens", V::number},
    {"total_tokens", V::number},
    {"is_stream", V::flag},
    {"endpoint", V::string},
    {"timestamp", V::unix_ms},
    {"backend_url", V::string},
    {"client_request_id", V::string_or_null},
    {"backend", V::string},
    {"status_code", V::number},
    {"duration_ms", V::number},
    {"ttft_ms", V::number_or_null},
    {"finish", V::string},
    {"usage_source", V::string},
    {"cached_tokens", V::optional_number},
    {"reasoning_tokens", V::optional_number},
}};
constexpr std::size_t kRowValues = kRowFields.size();

// One past the closing quote of the string whose opening quote is row[open], or npos when it has
// none before `end`. A quote closes the string when an even number of backslashes precede it (an
// odd run escapes it); row[open] is a quote, so counting them back stops there at the latest.
std::size_t string_end(std::string_view row, std::size_t open, std::size_t end) {
  const char* base = row.data();
  std::size_t from = open + 1;
  while (from < end) {
    const void* q = std::memchr(base + from, '"', end - from);
    if (q == nullptr) break;
    const auto at = static_cast<std::size_t>(static_cast<const char*>(q) - base);
    std::size_t backslashes = 0;
    while (base[at - backslashes - 1] == '\\') ++backslashes;
    if (backslashes % 2 == 0) return at + 1;
    from = at + 1;
  }
  return std::string_view::npos;
}

// One past the value that starts at row[i] (i < end): a string with its quotes and escapes,
// anything else up to the next ',' or `end`; npos for a string that does not close.
std::size_t value_end(std::string_view row, std::size_t i, std::size_t end) {
  if (row[i] == '"') return string_end(row, i, end);
  const void* comma = std::memchr(row.data() + i, ',', end - i);
  return comma == nullptr ? end
                          : static_cast<std::size_t>(static_cast<const char*>(comma) - row.data());
}

// A JSON number (RFC 8259): -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
bool is_number(std::string_view v) {
  std::size_t i = 0;
  const auto digits = [&] {
    const std::size_t from = i;
    while (i < v.size() && v[i] >= '0' && v[i] <= '9') ++i;
    return i - from;
  };
  if (i < v.size() && v[i] == '-') ++i;
  const std::size_t first = i;
  const std::size_t whole = digits();
  if (whole == 0 || (whole > 1 && v[first] == '0')) return false;
  if (i < v.size() && v[i] == '.') {
    ++i;
    if (digits() == 0) return false;
  }
  if (i < v.size() && (v[i] == 'e' || v[i] == 'E')) {
    ++i;
    if (i < v.size() && (v[i] == '+' || v[i] == '-')) ++i;
    if (digits() == 0) return false;
  }
  return i == v.size();
}

// A string as value_end found it (quotes at both ends, none unescaped inside) whose bytes a
// JSON parser accepts: damage on disk can leave the quotes standing around bytes that are not.
bool is_string(std::string_view v) {
  return v.size() >= 2 && v.front() == '"' && http::is_json_string_body(v.substr(1, v.size() - 2));
}

bool is_null(std::string_view v) {
  return v == "null";
}

}  // namespace

std::span<const RowField> row_fields() {
  return kRowFields;
}

namespace {

// `,"key":` for each value of a row, made once from kRowFields.
struct KeyPrefixes {
  std::array<std::string, kRowValues> text;
  std::size_t total = 0;  // all of them
};

const KeyPrefixes& key_prefixes() {
  static const KeyPrefixes prefixes = [] {
    KeyPrefixes out;
    for (std::size_t i = 0; i < kRowValues; ++i) {
      out.text[i] = ",\"" + std::string(kRowFields[i].key) + "\":";
      out.total += out.text[i].size();
    }
    return out;
  }();
  return prefixes;
}

// Writes one value of a row as the object has it (after its key); false if it is not a value
// of this kind as append_row writes it.
bool put_value(char*& p, std::string_view v, RowValue kind) {
  using namespace std::string_view_literals;
  switch (kind) {
    case V::string:
      if (!is_string(v)) return false;
      break;
    case V::number:
      if (!is_number(v)) return false;
      break;
    case V::string_or_null:
      if (!is_null(v) && !is_string(v)) return false;
      break;
    case V::number_or_null:
    case V::optional_number:
      if (!is_null(v) && !is_number(v)) return false;
      break;
    case V::flag:
      if (v != "0"sv && v != "1"sv) return false;
      p = put(p, v == "1"sv ? "true"sv : "false"sv);
      return true;
    case V::unix_ms: {
      std::int64_t ms = 0;
      if (std::from_chars(v.data(), v.data() + v.size(), ms).ptr != v.data() + v.size()) {
        return false;
      }
      *p = '"';
      format_rfc3339(p + 1, ms);
      p[21] = '"';
      p += 22;
      return true;
    }
  }
  p = put(p, v);  // strings, numbers and nulls are the same text in the object
  return true;
}

}  // namespace

bool append_stored_json(std::string& out, std::string_view stored) {
  if (!stored.empty() && stored.front() == '{') {
    out += stored;
    return true;
  }
  if (stored.size() < 2 || stored.front() != '[' || stored.back() != ']') return false;
  const KeyPrefixes& prefix = key_prefixes();
  // One pass: each value is found, checked and written after its key. The object is at most the
  // row's bytes plus every key, a flag's "false" (4 more than "0") and a timestamp's 22 bytes.
  const std::size_t old = out.size();
  out.resize(old + stored.size() + prefix.total + 4 + 22);
  char* p = out.data() + old;
  std::size_t n = 0;
  std::size_t i = 1;
  const std::size_t end = stored.size() - 1;
  bool ok = true;
  while (ok && i < end) {
    const std::size_t stop = n < kRowValues ? value_end(stored, i, end) : std::string_view::npos;
    // Not a row this build reads: more values than it knows, "[1,,2]", a trailing ',', a
    // string that does not close or is followed by something other than ','.
    ok = stop != std::string_view::npos && stop != i &&
         (stop == end || (stored[stop] == ',' && stop + 1 != end));
    if (!ok) break;
    const std::string_view v = stored.substr(i, stop - i);
    const RowValue kind = kRowFields[n].value;
    if (kind != V::optional_number || !is_null(v)) {
      p = put(p, prefix.text[n]);
      ok = put_value(p, v, kind);
    }
    ++n;
    i = stop + 1;
  }
  // Values left out at the end may only be optional ones.
  for (std::size_t k = n; ok && k < kRowValues; ++k) ok = kRowFields[k].value == V::optional_number;
  if (!ok) {
    out.resize(old);
    return false;
  }
  *p++ = '}';
  out[old] = '{';  // the first value's ',' (request_id, never optional: always written)
  out.resize(static_cast<std::size_t>(p - out.data()));
  return true;
}

// ---------------------------------------------------------------------------------------------
// PackedRecords: per record a fixed head (copied with memcpy, so no alignment is needed), then
// the strings' bytes back to back in the order of the head's lengths.

namespace {

struct PackedHead {
  std::uint64_t bytes;  // the whole record, this head included
  std::uint32_t len[10];
  std::int64_t prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens;
  std::int64_t timestamp_ms;
  double duration_ms, ttft_ms;
  std::uint32_t status_code;
  std::uint8_t is_stream;
};

constexpr std::size_t kMaxField = std::size_t{1} << 30;

// The strings of a record, in packed order; the same order for both string types.
template <class R>
auto strings_of(R& r) {
  return std::array{&r.request_id, &r.client_request_id, &r.user_id, &r.api_key,
                    &r.model,      &r.backend_url,       &r.backend};
}

}  // namespace

UsageRecordView view_of(const UsageRecord& r) {
  UsageRecordView v;
  const auto from = strings_of(r);
  const auto to = strings_of(v);
  for (std::size_t i = 0; i < from.size(); ++i) *to[i] = *from[i];
  v.prompt_tokens = r.prompt_tokens;
  v.completion_tokens = r.completion_tokens;
  v.total_tokens = r.total_tokens;
  v.cached_tokens = r.cached_tokens;
  v.reasoning_tokens = r.reasoning_tokens;
  v.is_stream = r.is_stream;
  v.endpoint = r.endpoint;
  v.timestamp_ms = r.timestamp_ms;
  v.status_code = r.status_code;
  v.duration_ms = r.duration_ms;
  v.ttft_ms = r.ttft_ms;
  v.finish = r.finish;
  v.usage_source = r.usage_source;
  return v;
}

// One resize and a memcpy per part: this runs on the request path, once per record.
void PackedRecords::push(const UsageRecordView& r) {
  if (front_ > 0 && front_ >= data_.size() / 2) {  // amortized: each byte moves at most once
    data_.erase(0, front_);
    front_ = 0;
  }
  PackedHead h{};
  const auto strs = strings_of(r);
  std::array<std::string_view, 10> parts;
  for (std::size_t i = 0; i < strs.size(); ++i) parts[i] = *strs[i];
  parts[strs.size()] = r.endpoint;
  parts[strs.size() + 1] = r.finish;
  parts[strs.size() + 2] = r.usage_source;
  std::uint64_t total = sizeof h;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    // A field is cut at kMaxField bytes (no header or body the gateway accepts comes near it),
    // so a length always fits its 32 bits.
    parts[i] = parts[i].substr(0, kMaxField);
    h.len[i] = static_cast<std::uint32_t>(parts[i].size());
    total += parts[i].size();
  }
  h.bytes = total;
  h.prompt_tokens = r.prompt_tokens;
  h.completion_tokens = r.completion_tokens;
  h.total_tokens = r.total_tokens;
  h.cached_tokens = r.cached_tokens;
  h.reasoning_tokens = r.reasoning_tokens;
  h.timestamp_ms = r.timestamp_ms;
  h.duration_ms = r.duration_ms;
  h.ttft_ms = r.ttft_ms;
  h.status_code = r.status_code;
  h.is_stream = r.is_stream ? 1 : 0;
  const std::size_t old = data_.size();
  data_.resize(old + total);
  char* p = data_.data() + old;
  std::memcpy(p, &h, sizeof h);
  p += sizeof h;
  for (std::string_view part : parts) {
    if (!part.empty()) std::memcpy(p, part.data(), part.size());  // "" may have no data()
    p += part.size();
  }
  ++count_;
}

void PackedRecords::views(std::vector<UsageRecordView>& out) const {
  const char* p = data_.data() + front_;
  for (std::size_t k = 0; k < count_; ++k) {
    PackedHead h;
    std::memcpy(&h, p, sizeof h);
    const char* s = p + sizeof h;
    UsageRecordView& v = out.emplace_back();
    const auto strs = strings_of(v);
    std::size_t i = 0;
    for (auto* str : strs) {
      *str = std::string_view(s, h.len[i]);
      s += h.len[i++];
    }
    for (std::string_view* f : {&v.endpoint, &v.finish, &v.usage_source}) {
      *f = std::string_view(s, h.len[i]);
      s += h.len[i++];
    }
    v.prompt_tokens = h.prompt_tokens;
    v.completion_tokens = h.completion_tokens;
    v.total_tokens = h.total_tokens;
    v.cached_tokens = h.cached_tokens;
    v.reasoning_tokens = h.reasoning_tokens;
    v.timestamp_ms = h.timestamp_ms;
    v.duration_ms = h.duration_ms;
    v.ttft_ms = h.ttft_ms;
    v.status_code = h.status_code;
    v.is_stream = h.is_stream != 0;
    p += h.bytes;
  }
}

std::size_t PackedRecords::front_fitting(std::size_t max_n, std::size_t max_bytes) const noexcept {
  std::size_t off = 0, n = 0;
  while (n < count_ && n < max_n) {
    std::uint64_t bytes;
    std::memcpy(&bytes, data_.data() + front_ + off, sizeof bytes);
    if (n > 0 && off + bytes > max_bytes) break;
    off += bytes;
    ++n;
  }
  return n;
}

void PackedRecords::move_front(std::size_t n, PackedRecords& to) {
  std::size_t off = 0;
  for (std::size_t k = 0; k < n; ++k) {
    std::uint64_t bytes;
    std::memcpy(&bytes, data_.data() + front_ + off, sizeof bytes);
    off += bytes;
  }
  to.data_.append(data_, front_, off);
  to.count_ += n;
  count_ -= n;
  if (count_ == 0) {
    clear();
  } else {
    front_ += off;
  }
}

void PackedRecords::trim(std::size_t keep) {
  if (data_.capacity() > keep) {
    std::string fresh;
    fresh.reserve(bytes());
    fresh.append(data_, front_);
    data_.swap(fresh);
    front_ = 0;
  }
}

}  // namespace llmproxy::usage
