// llmproxy: command line entry point. Builds the configuration, reports every problem in it,
// and hands a valid one to the Gateway. `llmproxy usage` reads the usage log instead (read-only,
// safe while the gateway runs); its argument errors exit 2 so that scripts can tell them apart
// from a failed query.

#include <fcntl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>

#include "config/config.h"
#include "log/log.h"
#include "proxy/server.h"
#include "usage/ledger.h"

namespace {

// `outcome`: what the failure means for the caller ("not starting").
bool load(const std::string& path, llmproxy::config::Config& out, const char* outcome) {
  auto result = llmproxy::config::load_file(path);
  for (const auto& e : result.errors) std::fprintf(stderr, "%s\n", e.to_string().c_str());
  if (!result.ok()) {
    std::fprintf(stderr, "llmproxy: %s: %zu problem%s found, %s\n", path.c_str(),
                 result.errors.size(), result.errors.size() == 1 ? "" : "s", outcome);
    return false;
  }
  out = std::move(*result.config);
  return true;
}

struct UsageArgs {
  std::string config_path;
  std::string db_path;
  std::string since;
  std::string until;
  std::string group_by;
  std::string format = "table";
  bool dead_letters = false;
  bool require_complete = false;
};

int usage_error(const std::string& message) {
  std::fprintf(stderr, "llmproxy usage: %s\n", message.c_str());
  return 2;
}

// `llmproxy usage`: totals (or dead letters) from the usage log.
int run_usage(const UsageArgs& a) {
  namespace u = llmproxy::usage;
  std::string db = a.db_path;
  if (db.empty()) {
    std::string config_path = a.config_path.empty() ? "config.yaml" : a.config_path;
    std::error_code ec;
    if (a.config_path.empty() && !std::filesystem::exists(config_path, ec)) {
      return usage_error(
          "no --db PATH given and no config.yaml here (use --config FILE or --db PATH)");
    }
    llmproxy::config::Config cfg;
    if (!load(config_path, cfg, "cannot read usage.log_path from it")) return 2;
    if (cfg.usage.durability == llmproxy::config::Durability::memory) {
      return usage_error(config_path +
                         ": usage.durability is memory: there is no log file to read");
    }
    db = cfg.usage.log_path;  // relative to the working directory, as the gateway opens it
  }
  const std::int64_t now_ms = llmproxy::log::unix_ms_now();
  u::LedgerQuery q;
  for (auto [text, out, name] : {std::tuple{&a.since, &q.since_ms, "--since"},
                                 std::tuple{&a.until, &q.until_ms, "--until"}}) {
    if (text->empty()) continue;
    *out = u::parse_time_arg(*text, now_ms);
    if (!*out) {
      return usage_error(std::string(name) +
                         ": expected a duration back from now (30m, 24h, 7d) or an RFC 3339 time "
                         "(2026-01-14T10:30:00Z) or a date (2026-01-14), got \"" +
                         *text + "\"");
    }
  }
  if (q.since_ms && q.until_ms && *q.since_ms >= *q.until_ms) {
    return usage_error("--since must be before --until");
  }
  std::string_view rest = a.group_by;
  if (rest.ends_with(',')) return usage_error("--group-by: an empty key in \"" + a.group_by + "\"");
  while (!rest.empty()) {
    auto comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    if (item.empty()) return usage_error("--group-by: an empty key in \"" + a.group_by + "\"");
    auto key = u::parse_group_key(item);
    if (!key) {
      return usage_error("--group-by: unknown key \"" + std::string(item) +
                         "\" (known: user, model, api_key, backend, endpoint, finish, day)");
    }
    if (std::find(q.group_by.begin(), q.group_by.end(), *key) != q.group_by.end()) {
      return usage_error("--group-by: \"" + std::string(item) + "\" is given twice");
    }
    q.group_by.push_back(*key);
  }
  auto format = u::parse_output_format(a.format);
  if (!format) {
    return usage_error("--format: expected table, json or csv, got \"" + a.format + "\"");
  }
  if (a.dead_letters && !q.group_by.empty()) {
    return usage_error("--group-by does not apply to --dead-letters");
  }
  if (a.dead_letters && a.require_complete) {
    return usage_error("--require-complete does not apply to --dead-letters");
  }
  std::unique_ptr<u::Ledger> ledger;
  std::error_code exists_ec;
  if (!std::filesystem::exists(db, exists_ec)) {
    return usage_error(db + ": no such file (--db, or the config's usage.log_path)");
  }
  try {
    ledger = std::make_unique<u::Ledger>(db);
  } catch (const std::exception& e) {
    // Not the command line's fault (a foreign file, a lock, a newer schema): 1, like a query.
    std::fprintf(stderr, "llmproxy usage: %s\n", e.what());
    return 1;
  }
  try {
    std::string out = a.dead_letters ? u::format_dead_letters(
                                           ledger->dead_letters(q.since_ms, q.until_ms), *format)
                                     : u::format_totals(q.group_by, ledger->totals(q), *format);
    if (const auto& incomplete = ledger->incomplete()) {
      if (a.require_complete) {
        std::fprintf(stderr, "llmproxy usage: %s (--require-complete: no report)\n",
                     incomplete->c_str());
        return 1;
      }
      std::fprintf(stderr, "llmproxy usage: warning: %s\n", incomplete->c_str());
    }
    std::fwrite(out.data(), 1, out.size(), stdout);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llmproxy usage: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // A standard descriptor the parent left closed (`llmproxy >&-`) would be taken by the next file
  // opened (the usage log's lock file got the access log): /dev/null holds its place.
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) == -1 && errno == EBADF) {
      const int null = ::open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
      if (null >= 0 && null != fd) {
        ::dup2(null, fd);
        ::close(null);
      }
    }
  }
  CLI::App app{
      "LLMProxy: a zero-buffering, LLM-aware reverse proxy for OpenAI-compatible backends.\n"};
  app.set_version_flag("--version", std::string("llmproxy ") + LLMPROXY_VERSION);
  std::string config_path;
  std::string check_path;
  bool print_config = false;
  auto* config_opt = app.add_option("-c,--config", config_path,
                                    "Run the gateway with this YAML configuration file");
  app.add_option("--check-config", check_path,
                 "Validate this configuration file, print every problem, and exit "
                 "(0 when valid)")
      ->excludes(config_opt);
  app.add_flag("--print-config", print_config,
               "With --config or --check-config: print the effective configuration (defaults "
               "filled in) and exit");

  UsageArgs usage_args;
  auto* usage_cmd = app.add_subcommand(
      "usage", "Report token usage from the usage log (read-only; safe while the gateway runs)");
  auto* usage_config = usage_cmd->add_option(
      "-c,--config", usage_args.config_path,
      "Read usage.log_path from this configuration file (default: config.yaml)");
  usage_cmd->add_option("--db", usage_args.db_path, "The usage log file itself")
      ->excludes(usage_config);
  usage_cmd->add_option("--since", usage_args.since,
                        "Records from this time on: 24h, 7d, 30m (back from now), RFC 3339 or a "
                        "date (default: everything kept)");
  usage_cmd->add_option("--until", usage_args.until, "Records before this time (same forms)");
  usage_cmd->add_option("--group-by", usage_args.group_by,
                        "Comma-separated: user, model, api_key, backend, endpoint, finish, day "
                        "(default: one total)");
  usage_cmd->add_option("--format", usage_args.format, "table (default), json or csv");
  usage_cmd->add_flag("--dead-letters", usage_args.dead_letters,
                      "List the records receivers rejected for good instead of totals");
  usage_cmd->add_flag("--require-complete", usage_args.require_complete,
                      "Fail (exit 1, nothing printed) when the window reaches back to records "
                      "that retention or a manual delete took, instead of warning on stderr");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; every wrong command line exits 2, as a missing --config does.
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (usage_cmd->parsed()) {
    if (usage_args.config_path.empty() && usage_args.db_path.empty()) {
      usage_args.config_path = config_path;  // `llmproxy --config x usage`
    }
    return run_usage(usage_args);
  }

  if (!check_path.empty()) {
    llmproxy::config::Config cfg;
    if (!load(check_path, cfg, "the configuration is invalid")) return 1;
    if (print_config) {
      std::fputs(llmproxy::config::to_yaml(cfg).c_str(), stdout);
    } else {
      std::printf("%s: OK (%zu backend%s, listen %s)\n", check_path.c_str(), cfg.backends.size(),
                  cfg.backends.size() == 1 ? "" : "s", cfg.listen.to_string().c_str());
    }
    return 0;
  }
  if (config_path.empty()) {
    std::fprintf(stderr, "llmproxy: --config FILE is required (see --help)\n");
    return 2;
  }
  // Until the reload handler is in place (after the usage log is opened, which may wait up to a
  // minute for another gateway to let go of it), SIGHUP would end the process: a
  // `kill -HUP $(pidof llmproxy)` meant for a running gateway would kill the one starting.
  ::signal(SIGHUP, SIG_IGN);
  llmproxy::config::Config cfg;
  if (!load(config_path, cfg, "not starting")) return 1;
  if (print_config) {
    std::fputs(llmproxy::config::to_yaml(cfg).c_str(), stdout);
    return 0;
  }
  llmproxy::proxy::Gateway gateway(std::move(cfg));
  const int status = gateway.run();  // kExitRequestsCut: the stop cut requests in flight
  ::signal(SIGTERM, SIG_IGN);        // the stop is done: a late signal changes nothing
  ::signal(SIGINT, SIG_IGN);
  return status;
}
