#include "config/config.h"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sched.h>
#include <simdjson.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <thread>

#include "config/duration.h"

namespace llmproxy::config {
namespace {

// The longest duration any key takes (see Reader::duration).
constexpr Millis kMaxDuration = std::chrono::hours(24 * 365);

// What --print-config writes for a secret. Read back as a value, it would become the secret
// (an admin token anyone can guess): refused.
constexpr const char* kRedacted = "<redacted>";
constexpr const char* kRedactedWhy =
    "is the placeholder --print-config writes for a secret: put the real value here";

bool iequals_ascii(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

// Well-formed UTF-8 (simdjson's validator: no overlong forms, surrogates or code points past
// U+10FFFF). Config strings end up in JSON answers, metric labels and records.
bool valid_utf8(std::string_view s) {
  return simdjson::validate_utf8(s.data(), s.size());
}

// A header name as the config accepts it (a sink's headers, usage.user_header).
bool header_name(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_';
  });
}

// A character RFC 3986 allows in a URL path: unreserved, percent-encoded, sub-delims, ':', '@',
// '/'.
bool path_char(char ch) {
  return std::isalnum(static_cast<unsigned char>(ch)) ||
         std::string_view("-._~%!$&'()*+,;=:@/").find(ch) != std::string_view::npos;
}

// A character of a URL's query (RFC 3986 3.4): a path's, or '?'.
bool query_char(char ch) {
  return path_char(ch) || ch == '?';
}

std::string join(const std::string& path, std::string_view key) {
  return path.empty() ? std::string(key) : path + "." + std::string(key);
}

bool is_ip_literal(const std::string& host) {
  unsigned char buf[16];
  return inet_pton(AF_INET, host.c_str(), buf) == 1 || inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

std::optional<std::uint16_t> parse_port(std::string_view text) {
  if (text.empty() || text.size() > 5) return std::nullopt;
  unsigned value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + static_cast<unsigned>(c - '0');
  }
  if (value > 65535) return std::nullopt;
  return static_cast<std::uint16_t>(value);
}

std::optional<ListenAddress> parse_listen(std::string_view text, std::string* error) {
  ListenAddress out;
  std::string_view host, port;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      *error = "expected [IPv6]:PORT";
      return std::nullopt;
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos) {
      *error = "expected HOST:PORT or :PORT (e.g. \":8080\", \"127.0.0.1:8080\", \"[::]:8080\")";
      return std::nullopt;
    }
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  auto p = parse_port(port);
  if (!p) {
    *error = "port must be a number from 0 to 65535";
    return std::nullopt;
  }
  out.port = *p;
  if (host.empty()) {
    out.host.clear();  // every address, IPv6 and IPv4
  } else if (host == "localhost") {
    out.host = "127.0.0.1";
  } else {
    out.host = std::string(host);
    if (!is_ip_literal(out.host)) {
      *error = "host must be an IP address, \"localhost\" or empty (all interfaces)";
      return std::nullopt;
    }
  }
  return out;
}

// Walks the YAML tree, converting scalars and collecting every problem instead of stopping.
class Reader {
 public:
  explicit Reader(std::string file) : file_(std::move(file)) {}

  std::vector<ConfigError> errors;

  void error(const YAML::Mark& mark, const std::string& path, std::string message) {
    ConfigError e;
    e.file = file_;
    e.line = mark.line >= 0 ? mark.line + 1 : 0;
    e.column = mark.column >= 0 ? mark.column + 1 : 0;
    e.key_path = path;
    e.message = std::move(message);
    errors.push_back(std::move(e));
  }

  // True when `node` is a map (or empty); reports keys outside `allowed`.
  bool map(const YAML::Node& node, const std::string& path,
           std::initializer_list<std::string_view> allowed) {
    if (!node.IsDefined() || node.IsNull()) return false;
    if (!node.IsMap()) {
      error(node.Mark(), path.empty() ? "(root)" : path, "expected a mapping of keys to values");
      return false;
    }
    for (auto it = node.begin(); it != node.end(); ++it) {
      std::string key = it->first.IsScalar() ? it->first.Scalar() : "?";
      if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
        std::string known;
        for (auto k : allowed) known += (known.empty() ? "" : ", ") + std::string(k);
        error(it->first.Mark(), join(path, key), "unknown key (known keys here: " + known + ")");
      }
    }
    return true;
  }

  // Present and not null?
  static bool has(const YAML::Node& parent, std::string_view key) {
    if (!parent.IsMap()) return false;
    auto n = parent[std::string(key)];
    return n.IsDefined() && !n.IsNull();
  }

  bool scalar(const YAML::Node& n, const std::string& path, const char* what) {
    if (n.IsScalar()) return true;
    error(n.Mark(), path, std::string("expected ") + what);
    return false;
  }

  void string(const YAML::Node& parent, std::string_view key, const std::string& path,
              std::string& out) {
    if (!has(parent, key)) return;
    auto n = parent[std::string(key)];
    if (!scalar(n, join(path, key), "a string")) return;
    if (!valid_utf8(n.Scalar())) {
      error(n.Mark(), join(path, key), "is not valid UTF-8");
      return;
    }
    out = n.Scalar();
  }

  // A secret: a string, but never the placeholder --print-config writes for one.
  void secret(const YAML::Node& parent, std::string_view key, const std::string& path,
              std::string& out) {
    string(parent, key, path, out);
    if (out == kRedacted) error(parent[std::string(key)].Mark(), join(path, key), kRedactedWhy);
  }

  void integer(const YAML::Node& parent, std::string_view key, const std::string& path, int& out,
               int min, int max) {
    if (!has(parent, key)) return;
    auto n = parent[std::string(key)];
    auto p = join(path, key);
    if (!scalar(n, p, "an integer")) return;
    int v;
    if (!YAML::convert<int>::decode(n, v)) {
      error(n.Mark(), p, "expected an integer, got \"" + n.Scalar() + "\"");
      return;
    }
    if (v < min || v > max) {
      error(n.Mark(), p,
            "must be between " + std::to_string(min) + " and " + std::to_string(max) + ", got " +
                std::to_string(v));
      return;
    }
    out = v;
  }

  void boolean(const YAML::Node& parent, std::string_view key, const std::string& path, bool& out) {
    if (!has(parent, key)) return;
    auto n = parent[std::string(key)];
    auto p = join(path, key);
    if (!scalar(n, p, "true or false")) return;
    bool v;
    if (!YAML::convert<bool>::decode(n, v)) {
      error(n.Mark(), p, "expected true or false, got \"" + n.Scalar() + "\"");
      return;
    }
    out = v;
  }

  void duration(const YAML::Node& parent, std::string_view key, const std::string& path,
                Millis& out, Millis min = Millis{0}) {
    if (!has(parent, key)) return;
    auto n = parent[std::string(key)];
    auto p = join(path, key);
    if (!scalar(n, p, "a duration such as 500ms, 1s, 2m")) return;
    auto d = parse_duration(n.Scalar());
    if (!d) {
      error(n.Mark(), p,
            "expected a duration such as 500ms, 1s, 2m or 1m30s, got \"" + n.Scalar() + "\"");
      return;
    }
    if (*d < min) {
      error(n.Mark(), p, "must be at least " + format_duration(min));
      return;
    }
    // Deadlines are now + duration in nanoseconds: a few hundred years would wrap around and
    // mean "at once". "Effectively never" needs no more than a year.
    if (*d > kMaxDuration) {
      error(n.Mark(), p, "must be at most " + format_duration(kMaxDuration) + " (a year)");
      return;
    }
    out = *d;
  }

  void size(const YAML::Node& parent, std::string_view key, const std::string& path,
            std::uint64_t& out, std::uint64_t min) {
    if (!has(parent, key)) return;
    auto n = parent[std::string(key)];
    auto p = join(path, key);
    if (!scalar(n, p, "a size such as 512KiB or 10MiB")) return;
    auto s = parse_size(n.Scalar());
    if (!s) {
      error(n.Mark(), p,
            "expected a size such as 4096, 512KiB, 10MiB or 1MB, got \"" + n.Scalar() + "\"");
      return;
    }
    if (*s < min) {
      error(n.Mark(), p, "must be at least " + std::to_string(min) + " bytes");
      return;
    }
    out = *s;
  }

 private:
  std::string file_;
};

void read_backends(Reader& r, const YAML::Node& root, Config& c) {
  auto list = root["backends"];
  if (!list.IsDefined() || list.IsNull()) {
    r.error(root.Mark(), "backends", "at least one backend is required");
    return;
  }
  if (!list.IsSequence()) {
    r.error(list.Mark(), "backends", "expected a list of backends");
    return;
  }
  if (list.size() == 0) {
    r.error(list.Mark(), "backends", "at least one backend is required");
    return;
  }
  std::set<std::string> names;
  for (std::size_t i = 0; i < list.size(); ++i) {
    auto node = list[i];
    std::string path = "backends[" + std::to_string(i) + "]";
    BackendConfig b;
    if (!r.map(node, path, {"url", "weight", "name", "models"})) {
      if (!node.IsMap()) {
        if (node.IsNull()) r.error(node.Mark(), path, "empty backend entry");
        continue;
      }
    }
    if (!Reader::has(node, "url")) {
      r.error(node.Mark(), path + ".url", "required");
    } else {
      r.string(node, "url", path, b.url);
      std::string why;
      if (b.url.empty() && node["url"].IsScalar()) {
        r.error(node["url"].Mark(), path + ".url", "must not be empty");
      } else if (!b.url.empty()) {
        if (auto u = parse_url(b.url, &why)) {
          b.parsed = *u;
        } else {
          r.error(node["url"].Mark(), path + ".url", why);
        }
      }
    }
    if (Reader::has(node, "weight")) {
      auto w = node["weight"];
      int v = 0;
      if (w.IsScalar() && YAML::convert<int>::decode(w, v) && v <= 0) {
        r.error(w.Mark(), path + ".weight", "must be greater than 0, got " + w.Scalar());
      } else {
        r.integer(node, "weight", path, b.weight, 1, 1'000'000);
      }
    }
    r.string(node, "name", path, b.name);
    if (b.name.empty()) b.name = b.url;
    if (b.name == "none") {
      // The metrics' backend label for requests that reached no backend: one name, one series.
      r.error(node.Mark(), path + ".name",
              "\"none\" is reserved (the metrics' label for requests no backend served)");
    } else if (!b.name.empty() && !names.insert(b.name).second) {
      r.error(node.Mark(), path + ".name", "duplicate backend name \"" + b.name + "\"");
    }
    if (Reader::has(node, "models")) {
      auto m = node["models"];
      auto model_id = [](const YAML::Node& id) {
        return id.IsScalar() && !id.Scalar().empty() && valid_utf8(id.Scalar());
      };
      if (m.IsScalar() && !model_id(m)) {
        r.error(m.Mark(), path + ".models", "expected a model id (non-empty UTF-8 string)");
      } else if (m.IsScalar()) {
        b.models.push_back(m.Scalar());
      } else if (m.IsSequence()) {
        for (std::size_t j = 0; j < m.size(); ++j) {
          std::string mp = path + ".models[" + std::to_string(j) + "]";
          if (model_id(m[j])) {
            b.models.push_back(m[j].Scalar());
          } else {
            r.error(m[j].Mark(), mp, "expected a model id (non-empty UTF-8 string)");
          }
        }
      } else {
        r.error(m.Mark(), path + ".models", "expected a list of model ids");
      }
    }
    c.backends.push_back(std::move(b));
  }
}

// Does OpenSSL load `path` as a trust store (at least one PEM certificate), as the gateway will?
bool loads_as_trust_store(const std::string& path) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  if (!ctx) return true;  // cannot tell here; the gateway's own load reports it
  const bool ok = SSL_CTX_load_verify_locations(ctx, path.c_str(), nullptr) == 1;
  SSL_CTX_free(ctx);
  ERR_clear_error();
  return ok;
}

const std::initializer_list<std::string_view> kSinkKeys = {
    "name",       "enabled",        "url",     "timeout", "retry", "max_backoff",
    "batch_size", "batch_interval", "headers", "secret",  "replay"};

void read_sink(Reader& r, const YAML::Node& n, const std::string& path, SinkConfig& s) {
  if (!r.map(n, path, kSinkKeys)) return;
  r.string(n, "name", path, s.name);
  r.boolean(n, "enabled", path, s.enabled);
  r.string(n, "url", path, s.url);
  r.duration(n, "timeout", path, s.timeout, Millis{1});
  r.integer(n, "retry", path, s.retry, 0, 100);
  r.duration(n, "max_backoff", path, s.max_backoff, Millis{1});
  r.integer(n, "batch_size", path, s.batch_size, 1, 10'000);
  r.duration(n, "batch_interval", path, s.batch_interval, Millis{0});
  r.secret(n, "secret", path, s.secret);
  r.boolean(n, "replay", path, s.replay);
  if (Reader::has(n, "headers")) {
    auto h = n["headers"];
    if (!h.IsMap()) {
      r.error(h.Mark(), path + ".headers", "expected a mapping of header names to values");
    } else {
      for (auto it = h.begin(); it != h.end(); ++it) {
        std::string key = it->first.IsScalar() ? it->first.Scalar() : "";
        if (!header_name(key) || !it->second.IsScalar()) {
          r.error(it->first.Mark(), path + ".headers." + key,
                  "expected a header name (letters, digits, -) with a string value");
          continue;
        }
        // Fields the sink writes itself: the framing, the record's identity and signature. A
        // configured one would replace them (a fixed Idempotency-Key makes a de-duplicating
        // receiver drop every record after the first).
        static constexpr std::string_view kReserved[] = {"host",
                                                         "content-length",
                                                         "transfer-encoding",
                                                         "connection",
                                                         "idempotency-key",
                                                         "x-llmproxy-signature",
                                                         "x-llmproxy-timestamp"};
        if (std::any_of(std::begin(kReserved), std::end(kReserved),
                        [&](std::string_view r) { return iequals_ascii(key, r); })) {
          r.error(it->first.Mark(), path + ".headers." + key,
                  "is set by the gateway itself and cannot be configured");
          continue;
        }
        const std::string& value = it->second.Scalar();
        if (value == kRedacted) {
          r.error(it->second.Mark(), path + ".headers." + key, kRedactedWhy);
          continue;
        }
        // The body is JSON: a Content-Type may only say so (with parameters, e.g. a charset).
        if (iequals_ascii(key, "content-type")) {
          std::string_view media = std::string_view(value).substr(0, value.find(';'));
          while (!media.empty() && media.back() == ' ') media.remove_suffix(1);
          if (!iequals_ascii(media, "application/json")) {
            r.error(it->second.Mark(), path + ".headers." + key,
                    "the body is JSON: must be application/json (parameters allowed), got \"" +
                        value + "\"");
            continue;
          }
        }
        if (value.find_first_of("\r\n") != std::string::npos) {
          r.error(it->second.Mark(), path + ".headers." + key, "must not contain line breaks");
          continue;
        }
        // Header names are case-insensitive: X-Team and x-team would be sent as two fields. (The
        // same name twice is a duplicate key, reported as such.)
        const auto same = std::find_if(s.headers.begin(), s.headers.end(),
                                       [&](const auto& h) { return iequals_ascii(h.first, key); });
        if (same != s.headers.end()) {
          if (same->first != key) {
            r.error(it->first.Mark(), path + ".headers." + key,
                    "the same header as " + same->first + " (names are case-insensitive)");
          }
          continue;
        }
        s.headers.emplace_back(key, value);
      }
    }
  }
  std::string why;
  if (!s.url.empty()) {
    if (auto u = parse_url(s.url, &why, true)) {
      s.parsed = *u;
    } else {
      r.error(n["url"].Mark(), path + ".url", why);
    }
  } else if (s.enabled) {
    r.error(n.Mark(), path + ".url", "required when " + path + ".enabled is true");
  }
}

template <class Enum>
void enumeration(Reader& r, const YAML::Node& n, std::string_view key, const std::string& path,
                 Enum& out, std::initializer_list<std::pair<std::string_view, Enum>> values) {
  if (!Reader::has(n, key)) return;
  std::string text;
  r.string(n, key, path, text);
  std::string known;
  for (const auto& [name, value] : values) {
    if (name == text) {
      out = value;
      return;
    }
    known += (known.empty() ? "" : ", ") + std::string(name);
  }
  r.error(n[std::string(key)].Mark(), join(path, key),
          "expected one of " + known + ", got \"" + text + "\"");
}

void read_usage(Reader& r, const YAML::Node& root, Config& c) {
  auto n = root["usage"];
  auto& u = c.usage;
  if (!r.map(n, "usage",
             {"enabled", "durability", "log_path", "queue_size", "commit_interval", "on_backlog",
              "memory_max_records", "retention_days", "inject_stream_usage", "tokenize",
              "user_header", "api_key", "max_response_copy", "sinks"})) {
    return;
  }
  r.boolean(n, "enabled", "usage", u.enabled);
  enumeration(r, n, "durability", "usage", u.durability,
              {{"disk", Durability::disk}, {"memory", Durability::memory}});
  r.string(n, "log_path", "usage", u.log_path);
  if (u.durability == Durability::disk && u.log_path.empty()) {
    r.error(n.Mark(), "usage.log_path", "must not be empty with durability: disk");
  }
  r.integer(n, "queue_size", "usage", u.queue_size, 1, 10'000'000);
  r.duration(n, "commit_interval", "usage", u.commit_interval);
  if (u.commit_interval > Millis{1000}) {
    r.error(n["commit_interval"].Mark(), "usage.commit_interval", "must be at most 1s");
  }
  enumeration(r, n, "on_backlog", "usage", u.on_backlog,
              {{"reject", OnBacklog::reject}, {"serve", OnBacklog::serve}});
  r.integer(n, "memory_max_records", "usage", u.memory_max_records, 1, 100'000'000);
  r.integer(n, "retention_days", "usage", u.retention_days, 0, 100'000);
  r.boolean(n, "inject_stream_usage", "usage", u.inject_stream_usage);
  r.boolean(n, "tokenize", "usage", u.tokenize);
  r.string(n, "user_header", "usage", u.user_header);
  if (!header_name(u.user_header)) {
    r.error(Reader::has(n, "user_header") ? n["user_header"].Mark() : n.Mark(), "usage.user_header",
            "must be a header name (letters, digits, -, _), got \"" + u.user_header + "\"");
  }
  enumeration(
      r, n, "api_key", "usage", u.api_key,
      {{"full", ApiKeyMode::full}, {"masked", ApiKeyMode::masked}, {"sha256", ApiKeyMode::sha256}});
  r.size(n, "max_response_copy", "usage", u.max_response_copy, 1024);
  if (Reader::has(n, "sinks")) {
    auto list = n["sinks"];
    if (!list.IsSequence()) {
      r.error(list.Mark(), "usage.sinks", "expected a list of sinks");
      return;
    }
    std::set<std::string> names{"usage_hook"};
    for (std::size_t i = 0; i < list.size(); ++i) {
      std::string path = "usage.sinks[" + std::to_string(i) + "]";
      SinkConfig s;
      s.enabled = true;
      read_sink(r, list[i], path, s);
      if (s.name.empty()) {
        r.error(list[i].Mark(), path + ".name", "required (it names the sink's cursor)");
      } else if (!names.insert(s.name).second) {
        r.error(list[i].Mark(), path + ".name", "duplicate sink name \"" + s.name + "\"");
      }
      u.sinks.push_back(std::move(s));
    }
  }
}

// YAML requires the keys of a mapping to be unique, but the parser keeps every pair and a lookup
// finds the first: a setting repeated further down the file (an override appended at its end)
// would be ignored without a word. Every mapping of the document is checked, free-form ones
// (a sink's headers) too. It reads the parser's events rather than the loaded nodes: an alias is
// one event there, never its anchor's content again, so an alias that refers to itself (which
// the loaded nodes turn into a cycle) or aliases that multiply a node cost nothing.
class DuplicateKeyCheck : public YAML::EventHandler {
 public:
  explicit DuplicateKeyCheck(Reader& r) : r_(r) {}

  void OnDocumentStart(const YAML::Mark&) override {}
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark& mark, YAML::anchor_t) override { node(mark, nullptr); }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t) override { node(mark, nullptr); }
  void OnScalar(const YAML::Mark& mark, const std::string&, YAML::anchor_t,
                const std::string& value) override {
    node(mark, &value);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {
    push(mark, false);
  }
  void OnSequenceEnd() override { frames_.pop_back(); }
  void OnMapStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {
    push(mark, true);
  }
  void OnMapEnd() override { frames_.pop_back(); }

 private:
  struct Frame {
    bool map = false;
    std::string path;
    bool expect_key = true;                         // maps: the next node is a key
    std::string key;                                // maps: the key of the value being read
    std::size_t index = 0;                          // sequences: the index of the next item
    std::vector<std::pair<std::string, int>> keys;  // maps: each key and its line
  };

  // Where a node that starts now sits, for the parent frame: its path (and for a map's key,
  // the duplicate check).
  std::string node(const YAML::Mark& mark, const std::string* scalar) {
    if (frames_.empty()) return "";
    Frame& f = frames_.back();
    if (!f.map) return f.path + "[" + std::to_string(f.index++) + "]";
    if (!f.expect_key) {
      f.expect_key = true;
      return join(f.path, f.key);
    }
    f.expect_key = false;
    f.key = scalar ? *scalar : "?";
    if (scalar) {
      auto first = std::find_if(f.keys.begin(), f.keys.end(),
                                [&](const auto& k) { return k.first == *scalar; });
      if (first != f.keys.end()) {
        r_.error(mark, join(f.path, *scalar),
                 "duplicate key (first given on line " + std::to_string(first->second) +
                     "): remove one of them");
      } else {
        f.keys.emplace_back(*scalar, mark.line + 1);
      }
    }
    return join(f.path, f.key);
  }
  void push(const YAML::Mark& mark, bool map) {
    Frame f;
    f.path = node(mark, nullptr);
    f.map = map;
    frames_.push_back(std::move(f));
  }

  Reader& r_;
  std::vector<Frame> frames_;
};

void read_root(Reader& r, const YAML::Node& root, Config& c) {
  if (!root.IsDefined() || root.IsNull()) {
    r.error(YAML::Mark::null_mark(), "(root)", "the file is empty");
    return;
  }
  if (!r.map(root, "",
             {"listen", "server", "timeouts", "load_balancing", "upstream", "backends",
              "health_check", "usage_hook", "usage", "admin", "metrics"})) {
    return;
  }
  if (Reader::has(root, "listen")) {
    std::string text;
    r.string(root, "listen", "", text);
    std::string why;
    if (auto l = parse_listen(text, &why)) {
      c.listen = *l;
    } else if (root["listen"].IsScalar()) {
      r.error(root["listen"].Mark(), "listen", why + ", got \"" + text + "\"");
    }
  }
  if (auto n = root["server"];
      r.map(n, "server",
            {"workers", "max_body_size", "max_body_memory", "max_header_size", "max_connections",
             "drain_timeout", "access_log"})) {
    r.integer(n, "workers", "server", c.server.workers, 0, 256);
    r.size(n, "max_body_size", "server", c.server.max_body_size, 1024);
    r.size(n, "max_body_memory", "server", c.server.max_body_memory, 1024);
    if (c.server.max_body_memory < c.server.max_body_size) {
      r.error(Reader::has(n, "max_body_memory") ? n["max_body_memory"].Mark() : n.Mark(),
              "server.max_body_memory",
              "must be at least server.max_body_size (" + std::to_string(c.server.max_body_size) +
                  " bytes), or a largest body could never be taken");
    }
    r.size(n, "max_header_size", "server", c.server.max_header_size, 1024);
    // Beast stores a header field in at most 65,535 bytes; stay clear of that bound.
    if (c.server.max_header_size > 60 * 1024) {
      r.error(n["max_header_size"].Mark(), "server.max_header_size", "must be at most 60KiB");
    }
    r.integer(n, "max_connections", "server", c.server.max_connections, 1, 1'000'000);
    r.duration(n, "drain_timeout", "server", c.server.drain_timeout);
    r.boolean(n, "access_log", "server", c.server.access_log);
  }
  if (auto n = root["timeouts"]; r.map(
          n, "timeouts", {"connect", "first_byte", "stream_idle", "client_header", "keepalive"})) {
    r.duration(n, "connect", "timeouts", c.timeouts.connect, Millis{1});
    r.duration(n, "first_byte", "timeouts", c.timeouts.first_byte, Millis{1});
    r.duration(n, "stream_idle", "timeouts", c.timeouts.stream_idle, Millis{1});
    r.duration(n, "client_header", "timeouts", c.timeouts.client_header, Millis{1});
    r.duration(n, "keepalive", "timeouts", c.timeouts.keepalive, Millis{1});
  }
  if (auto n = root["load_balancing"]; r.map(n, "load_balancing", {"strategy", "max_retries"})) {
    if (Reader::has(n, "strategy")) {
      std::string s;
      r.string(n, "strategy", "load_balancing", s);
      if (s == "weighted_round_robin" || s == "round_robin") {
        c.load_balancing.strategy = Strategy::weighted_round_robin;
      } else if (s == "least_in_flight" || s == "least_connections") {
        c.load_balancing.strategy = Strategy::least_in_flight;
      } else if (n["strategy"].IsScalar()) {
        r.error(n["strategy"].Mark(), "load_balancing.strategy",
                "expected weighted_round_robin or least_in_flight, got \"" + s + "\"");
      }
    }
    r.integer(n, "max_retries", "load_balancing", c.load_balancing.max_retries, 0, 10);
  }
  if (auto n = root["upstream"];
      r.map(n, "upstream", {"max_idle_per_backend", "idle_timeout", "tls_verify", "ca_file"})) {
    r.integer(n, "max_idle_per_backend", "upstream", c.upstream.max_idle_per_backend, 0, 100'000);
    r.duration(n, "idle_timeout", "upstream", c.upstream.idle_timeout, Millis{1});
    r.boolean(n, "tls_verify", "upstream", c.upstream.tls_verify);
    r.string(n, "ca_file", "upstream", c.upstream.ca_file);
    if (!c.upstream.ca_file.empty() && !std::ifstream(c.upstream.ca_file).good()) {
      r.error(n["ca_file"].Mark(), "upstream.ca_file",
              "cannot read \"" + c.upstream.ca_file + "\"");
    } else if (!c.upstream.ca_file.empty() && !loads_as_trust_store(c.upstream.ca_file)) {
      // A directory (OpenSSL's CApath habit), an empty file, a key: every TLS backend would fail
      // its handshake.
      r.error(n["ca_file"].Mark(), "upstream.ca_file",
              "no PEM certificate could be loaded from \"" + c.upstream.ca_file +
                  "\" (expected a file of PEM certificates, not a directory or a key)");
    }
  }
  read_backends(r, root, c);
  if (auto n = root["health_check"];
      r.map(n, "health_check",
            {"enabled", "interval", "path", "timeout", "unhealthy_threshold", "healthy_threshold",
             "passive_5xx"})) {
    r.boolean(n, "enabled", "health_check", c.health_check.enabled);
    r.duration(n, "interval", "health_check", c.health_check.interval, Millis{10});
    r.string(n, "path", "health_check", c.health_check.path);
    if (c.health_check.path.empty() || c.health_check.path.front() != '/') {
      r.error(n["path"].Mark(), "health_check.path", "must start with /");
    } else if (!std::all_of(c.health_check.path.begin(), c.health_check.path.end(), query_char)) {
      r.error(n["path"].Mark(), "health_check.path",
              "may hold only URL path and query characters (percent-encode the others), got \"" +
                  c.health_check.path + "\"");
    }
    r.duration(n, "timeout", "health_check", c.health_check.timeout, Millis{1});
    r.integer(n, "unhealthy_threshold", "health_check", c.health_check.unhealthy_threshold, 1, 100);
    r.integer(n, "healthy_threshold", "health_check", c.health_check.healthy_threshold, 1, 100);
    r.boolean(n, "passive_5xx", "health_check", c.health_check.passive_5xx);
  }
  if (auto n = root["usage_hook"]; n.IsDefined() && !n.IsNull()) {
    read_sink(r, n, "usage_hook", c.usage_hook);
    if (Reader::has(n, "name")) {
      // Its name is its cursor's: another would skip what that receiver has not got yet.
      r.error(n["name"].Mark(), "usage_hook.name",
              "usage_hook is the sink named \"usage_hook\"; a sink of another name goes under "
              "usage.sinks");
    }
  }
  c.usage_hook.name = "usage_hook";
  read_usage(r, root, c);
  if (!c.usage.enabled) {
    // With metering off no record is made: an enabled sink would get nothing, without a word.
    std::string enabled_sinks = c.usage_hook.enabled ? "usage_hook" : "";
    for (const auto& sink : c.usage.sinks) {
      if (sink.enabled) enabled_sinks += (enabled_sinks.empty() ? "" : ", ") + sink.name;
    }
    if (!enabled_sinks.empty()) {
      r.error(root["usage"]["enabled"].Mark(), "usage.enabled",
              "is false, so no usage record is made, and the enabled webhook sinks (" +
                  enabled_sinks +
                  ") would receive none: set usage.enabled: true, or enabled: false on them");
    }
  }
  if (auto n = root["admin"]; r.map(n, "admin", {"token"})) {
    r.secret(n, "token", "admin", c.admin.token);
  }
  if (auto n = root["metrics"]; r.map(n, "metrics", {"listen"})) {
    if (Reader::has(n, "listen")) {
      std::string text;
      r.string(n, "listen", "metrics", text);
      std::string why;
      if (auto l = parse_listen(text, &why)) {
        c.metrics.listen = *l;
      } else if (n["listen"].IsScalar()) {
        r.error(n["listen"].Mark(), "metrics.listen", why + ", got \"" + text + "\"");
      }
      // The same port on an overlapping address: the second bind would fail at start.
      const auto& m = c.metrics.listen;
      const auto wildcard = [](const std::string& h) {
        return h.empty() || h == "0.0.0.0" || h == "::";
      };
      if (m && m->port != 0 && m->port == c.listen.port &&
          (m->host == c.listen.host || wildcard(m->host) || wildcard(c.listen.host))) {
        r.error(n["listen"].Mark(), "metrics.listen",
                "uses the port of listen (" + c.listen.to_string() + "): give it another");
      }
    }
  }
}

}  // namespace

std::string ListenAddress::to_string() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  if (host.empty()) return ":" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

bool ListenAddress::loopback() const {
  return host.starts_with("127.") || host == "::1" || host.starts_with("::ffff:127.") ||
         host == "localhost";
}

std::string Url::authority() const {
  std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  if ((tls && port == 443) || (!tls && port == 80)) return h;
  return h + ":" + std::to_string(port);
}

std::optional<std::string> origin_form(std::string_view url) {
  const auto scheme = url.find("://");
  if (scheme == std::string_view::npos || !(iequals_ascii(url.substr(0, scheme), "http") ||
                                            iequals_ascii(url.substr(0, scheme), "https"))) {
    return std::nullopt;
  }
  const auto rest = url.find_first_of("/?", scheme + 3);
  std::string target = rest != std::string_view::npos && url[rest] == '/' ? "" : "/";
  if (rest != std::string_view::npos) target += url.substr(rest);
  return target;
}

std::string redact_query(std::string_view url) {
  const auto q = url.find('?');
  if (q == std::string_view::npos) return std::string(url);
  return std::string(url.substr(0, q + 1)) + kRedacted;
}

std::optional<Url> parse_url(std::string_view text, std::string* error, bool allow_query) {
  Url u;
  std::string_view rest;
  if (text.starts_with("http://")) {
    rest = text.substr(7);
  } else if (text.starts_with("https://")) {
    u.tls = true;
    u.port = 443;
    rest = text.substr(8);
  } else {
    *error = "URL must start with http:// or https://, got \"" + redact_query(text) + "\"";
    return std::nullopt;
  }
  auto slash = rest.find_first_of(allow_query ? "/?#" : "/");
  std::string_view authority = rest.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? "" : rest.substr(slash);
  if (authority.find('@') != std::string_view::npos) {
    *error = "credentials in the URL are not supported";
    return std::nullopt;
  }
  std::string_view query;
  if (allow_query) {
    if (path.find('#') != std::string_view::npos) {
      *error = "URL must not have a fragment";
      return std::nullopt;
    }
    if (auto q = path.find('?'); q != std::string_view::npos) {
      query = path.substr(q + 1);
      path = path.substr(0, q);
    }
  } else if (path.find_first_of("?#") != std::string_view::npos) {
    *error = "URL must not have a query or fragment";
    return std::nullopt;
  }
  if (!std::all_of(query.begin(), query.end(), query_char)) {
    *error = "invalid character in URL query";
    return std::nullopt;
  }
  std::string_view host = authority, port;
  bool bracketed = !authority.empty() && authority.front() == '[';
  if (bracketed) {
    auto close = authority.find(']');
    if (close == std::string_view::npos) {
      *error = "unterminated IPv6 address in URL";
      return std::nullopt;
    }
    host = authority.substr(1, close - 1);
    auto after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') {
        *error = "unexpected text after IPv6 address";
        return std::nullopt;
      }
      port = after.substr(1);
      if (port.empty()) {
        *error = "empty port in URL";
        return std::nullopt;
      }
    }
  } else if (auto colon = authority.rfind(':'); colon != std::string_view::npos) {
    host = authority.substr(0, colon);
    port = authority.substr(colon + 1);
    if (port.empty()) {
      *error = "empty port in URL";
      return std::nullopt;
    }
  }
  if (host.empty()) {
    *error = "URL has no host";
    return std::nullopt;
  }
  for (char ch : host) {
    bool ok = std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '-' || ch == '_' ||
              (bracketed && ch == ':');
    if (!ok) {
      *error = "invalid character in URL host";
      return std::nullopt;
    }
  }
  if (!port.empty()) {
    auto p = parse_port(port);
    if (!p || *p == 0) {
      *error = "URL port must be a number from 1 to 65535";
      return std::nullopt;
    }
    u.port = *p;
  }
  if (!std::all_of(path.begin(), path.end(), path_char)) {
    *error = "invalid character in URL path";
    return std::nullopt;
  }
  u.host = std::string(host);
  while (!path.empty() && path.back() == '/') path.remove_suffix(1);
  u.base_path = std::string(path);
  return u;
}

std::string_view to_string(Strategy s) {
  return s == Strategy::least_in_flight ? "least_in_flight" : "weighted_round_robin";
}

std::string_view to_string(Durability d) {
  return d == Durability::memory ? "memory" : "disk";
}
std::string_view to_string(OnBacklog b) {
  return b == OnBacklog::serve ? "serve" : "reject";
}
std::string_view to_string(ApiKeyMode m) {
  return m == ApiKeyMode::masked ? "masked" : m == ApiKeyMode::sha256 ? "sha256" : "full";
}

std::vector<const SinkConfig*> Config::active_sinks() const {
  std::vector<const SinkConfig*> out;
  if (!usage.enabled) return out;
  if (usage_hook.enabled) out.push_back(&usage_hook);
  for (const auto& s : usage.sinks) {
    if (s.enabled) out.push_back(&s);
  }
  return out;
}

std::optional<double> cpu_max_cpus(std::string_view text) {
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) {
    text.remove_suffix(1);
  }
  const std::size_t sp = text.find(' ');
  if (sp == std::string_view::npos) return std::nullopt;
  std::int64_t quota = 0;
  std::int64_t period = 0;
  const std::string_view q = text.substr(0, sp);
  const std::string_view p = text.substr(sp + 1);
  if (std::from_chars(q.data(), q.data() + q.size(), quota).ptr != q.data() + q.size() ||
      std::from_chars(p.data(), p.data() + p.size(), period).ptr != p.data() + p.size() ||
      quota <= 0 || period <= 0) {
    return std::nullopt;  // "max": no quota
  }
  return static_cast<double>(quota) / static_cast<double>(period);
}

namespace {

std::string read_small_file(const std::string& path) {
  std::ifstream in(path);
  std::string text;
  std::getline(in, text, '\0');
  return text;
}

// The lowest CPU quota of this process's cgroup and its ancestors, in CPUs (cgroup v2, or v1's
// cpu controller at its usual mount); nullopt when none is set or none can be read.
std::optional<double> cgroup_cpu_quota() {
  std::optional<double> lowest;
  auto take = [&lowest](std::optional<double> cpus) {
    if (cpus && (!lowest || *lowest > *cpus)) lowest = cpus;
  };
  std::istringstream lines(read_small_file("/proc/self/cgroup"));
  for (std::string line; std::getline(lines, line);) {
    // v2: "0::/path"; v1: "N:cpu,cpuacct:/path"
    const std::size_t a = line.find(':');
    const std::size_t b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    std::string path = line.substr(b + 1);
    if (controllers.empty()) {
      for (;;) {  // the limit of any ancestor applies too
        take(cpu_max_cpus(read_small_file("/sys/fs/cgroup" + path + "/cpu.max")));
        if (path.empty() || path == "/") break;
        path.erase(path.rfind('/'));
      }
    } else if (("," + controllers + ",").find(",cpu,") != std::string::npos) {
      // The group's directory, or (a container that sees its own group at the mount's root
      // while /proc/self/cgroup names the host's path) the mount itself.
      const std::string own = path == "/" ? "" : path;
      for (const std::string& base :
           {"/sys/fs/cgroup/cpu,cpuacct" + own, "/sys/fs/cgroup/cpu" + own,
            std::string("/sys/fs/cgroup/cpu,cpuacct"), std::string("/sys/fs/cgroup/cpu")}) {
        const std::string quota = read_small_file(base + "/cpu.cfs_quota_us");
        const std::string period = read_small_file(base + "/cpu.cfs_period_us");
        if (quota.empty() || period.empty()) continue;
        std::string both = quota.substr(0, quota.find('\n')) + " " + period;
        take(cpu_max_cpus(both));
        break;
      }
    }
  }
  return lowest;
}

}  // namespace

int usable_cpus() {
  int n = 0;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  if (const auto quota = cgroup_cpu_quota()) {
    n = std::min(n, static_cast<int>(std::ceil(*quota - 1e-9)));
  }
  return std::max(n, 1);
}

int Config::effective_workers() const {
  if (server.workers > 0) return server.workers;
  return usable_cpus();
}

std::string ConfigError::to_string() const {
  std::string out = file;
  if (line > 0) out += ":" + std::to_string(line) + ":" + std::to_string(column);
  out += ": " + key_path + ": " + message;
  return out;
}

LoadResult load_string(std::string_view yaml, const std::string& file_name) {
  LoadResult result;
  Reader reader(file_name);
  Config config;
  config.source = file_name;
  config.source_digest = std::hash<std::string_view>{}(yaml);
  try {
    const std::string text(yaml);
    {
      std::istringstream in(text);
      YAML::Parser parser(in);
      DuplicateKeyCheck check(reader);
      parser.HandleNextDocument(check);
    }
    // A second document (after ---) would be ignored without a word: only the first is read.
    // (Loading builds nodes, never expands aliases: cheap even for the alias bombs the check
    // above reads as events.)
    const std::vector<YAML::Node> docs = YAML::LoadAll(text);
    if (docs.size() > 1 && !docs[1].IsNull()) {
      reader.error(docs[1].Mark(), "(document)",
                   "a second YAML document (after ---): the configuration is one document");
    }
    const YAML::Node root = docs.empty() ? YAML::Node() : docs[0];
    read_root(reader, root, config);
  } catch (const YAML::Exception& e) {
    reader.error(e.mark, "(syntax)", e.msg);
  }
  result.errors = std::move(reader.errors);
  if (result.errors.empty()) result.config = std::move(config);
  return result;
}

LoadResult load_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    LoadResult r;
    r.errors.push_back(ConfigError{path, 0, 0, "(file)", "is a directory, not a file"});
    return r;
  }
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    // Why: "Permission denied" (a 0600 file mounted for another uid) and "No such file or
    // directory" (a wrong mount path) call for different fixes.
    const int why = errno;
    LoadResult r;
    r.errors.push_back(ConfigError{path, 0, 0, "(file)",
                                   why != 0
                                       ? "cannot open the file: " + std::string(std::strerror(why))
                                       : std::string("cannot open the file")});
    return r;
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return load_string(ss.str(), path);
}

namespace {
// Secrets are never printed: the effective config is shown to operators and in logs.
void emit_sink(YAML::Emitter& e, const SinkConfig& s, bool with_name) {
  e << YAML::BeginMap;
  if (with_name) e << YAML::Key << "name" << YAML::Value << s.name;
  e << YAML::Key << "enabled" << YAML::Value << s.enabled;
  e << YAML::Key << "url" << YAML::Value << redact_query(s.url);
  e << YAML::Key << "timeout" << YAML::Value << format_duration(s.timeout);
  e << YAML::Key << "retry" << YAML::Value << s.retry;
  e << YAML::Key << "max_backoff" << YAML::Value << format_duration(s.max_backoff);
  e << YAML::Key << "batch_size" << YAML::Value << s.batch_size;
  e << YAML::Key << "batch_interval" << YAML::Value << format_duration(s.batch_interval);
  e << YAML::Key << "headers" << YAML::Value << YAML::BeginMap;
  for (const auto& [k, v] : s.headers) {
    // A receiver's credentials can sit in any header (X-Auth-Token, Api-Key, ...): every value
    // is hidden but those of the few fields that describe the request.
    const bool shown = iequals_ascii(k, "content-type") || iequals_ascii(k, "user-agent") ||
                       iequals_ascii(k, "accept");
    e << YAML::Key << k << YAML::Value << (shown ? v : std::string(kRedacted));
  }
  e << YAML::EndMap;
  e << YAML::Key << "secret" << YAML::Value << (s.secret.empty() ? "" : kRedacted);
  e << YAML::Key << "replay" << YAML::Value << s.replay;
  e << YAML::EndMap;
}
}  // namespace

std::string to_yaml(const Config& c) {
  YAML::Emitter e;
  e << YAML::BeginMap;
  e << YAML::Key << "listen" << YAML::Value << c.listen.to_string();
  e << YAML::Key << "server" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "workers" << YAML::Value << c.server.workers;
  e << YAML::Key << "max_body_size" << YAML::Value << c.server.max_body_size;
  e << YAML::Key << "max_body_memory" << YAML::Value << c.server.max_body_memory;
  e << YAML::Key << "max_header_size" << YAML::Value << c.server.max_header_size;
  e << YAML::Key << "max_connections" << YAML::Value << c.server.max_connections;
  e << YAML::Key << "drain_timeout" << YAML::Value << format_duration(c.server.drain_timeout);
  e << YAML::Key << "access_log" << YAML::Value << c.server.access_log;
  e << YAML::EndMap;
  e << YAML::Key << "timeouts" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "connect" << YAML::Value << format_duration(c.timeouts.connect);
  e << YAML::Key << "first_byte" << YAML::Value << format_duration(c.timeouts.first_byte);
  e << YAML::Key << "stream_idle" << YAML::Value << format_duration(c.timeouts.stream_idle);
  e << YAML::Key << "client_header" << YAML::Value << format_duration(c.timeouts.client_header);
  e << YAML::Key << "keepalive" << YAML::Value << format_duration(c.timeouts.keepalive);
  e << YAML::EndMap;
  e << YAML::Key << "load_balancing" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "strategy" << YAML::Value << std::string(to_string(c.load_balancing.strategy));
  e << YAML::Key << "max_retries" << YAML::Value << c.load_balancing.max_retries;
  e << YAML::EndMap;
  e << YAML::Key << "upstream" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "max_idle_per_backend" << YAML::Value << c.upstream.max_idle_per_backend;
  e << YAML::Key << "idle_timeout" << YAML::Value << format_duration(c.upstream.idle_timeout);
  e << YAML::Key << "tls_verify" << YAML::Value << c.upstream.tls_verify;
  e << YAML::Key << "ca_file" << YAML::Value << c.upstream.ca_file;
  e << YAML::EndMap;
  e << YAML::Key << "backends" << YAML::Value << YAML::BeginSeq;
  for (const auto& b : c.backends) {
    e << YAML::BeginMap;
    e << YAML::Key << "name" << YAML::Value << b.name;
    e << YAML::Key << "url" << YAML::Value << b.url;
    e << YAML::Key << "weight" << YAML::Value << b.weight;
    e << YAML::Key << "models" << YAML::Value << YAML::Flow << b.models;
    e << YAML::EndMap;
  }
  e << YAML::EndSeq;
  e << YAML::Key << "health_check" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "enabled" << YAML::Value << c.health_check.enabled;
  e << YAML::Key << "interval" << YAML::Value << format_duration(c.health_check.interval);
  e << YAML::Key << "path" << YAML::Value << c.health_check.path;
  e << YAML::Key << "timeout" << YAML::Value << format_duration(c.health_check.timeout);
  e << YAML::Key << "unhealthy_threshold" << YAML::Value << c.health_check.unhealthy_threshold;
  e << YAML::Key << "healthy_threshold" << YAML::Value << c.health_check.healthy_threshold;
  e << YAML::Key << "passive_5xx" << YAML::Value << c.health_check.passive_5xx;
  e << YAML::EndMap;
  e << YAML::Key << "usage_hook" << YAML::Value;
  emit_sink(e, c.usage_hook, false);
  const auto& u = c.usage;
  e << YAML::Key << "usage" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "enabled" << YAML::Value << u.enabled;
  e << YAML::Key << "durability" << YAML::Value << std::string(to_string(u.durability));
  e << YAML::Key << "log_path" << YAML::Value << u.log_path;
  e << YAML::Key << "queue_size" << YAML::Value << u.queue_size;
  e << YAML::Key << "commit_interval" << YAML::Value << format_duration(u.commit_interval);
  e << YAML::Key << "on_backlog" << YAML::Value << std::string(to_string(u.on_backlog));
  e << YAML::Key << "memory_max_records" << YAML::Value << u.memory_max_records;
  e << YAML::Key << "retention_days" << YAML::Value << u.retention_days;
  e << YAML::Key << "inject_stream_usage" << YAML::Value << u.inject_stream_usage;
  e << YAML::Key << "tokenize" << YAML::Value << u.tokenize;
  e << YAML::Key << "user_header" << YAML::Value << u.user_header;
  e << YAML::Key << "api_key" << YAML::Value << std::string(to_string(u.api_key));
  e << YAML::Key << "max_response_copy" << YAML::Value << u.max_response_copy;
  e << YAML::Key << "sinks" << YAML::Value << YAML::BeginSeq;
  for (const auto& s : u.sinks) emit_sink(e, s, true);
  e << YAML::EndSeq;
  e << YAML::EndMap;
  e << YAML::Key << "admin" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "token" << YAML::Value << (c.admin.token.empty() ? "" : kRedacted);
  e << YAML::EndMap;
  e << YAML::Key << "metrics" << YAML::Value << YAML::BeginMap;
  if (c.metrics.listen) {
    e << YAML::Key << "listen" << YAML::Value << c.metrics.listen->to_string();
  } else {
    e << YAML::Key << "listen" << YAML::Value << YAML::Null;  // on the main listener
  }
  e << YAML::EndMap;
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace llmproxy::config
