// llmproxy: command line entry point. Builds the configuration, reports every problem in it,
// and hands a valid one to the Gateway.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "config/config.h"
#include "proxy/server.h"

namespace {

bool load(const std::string& path, llmproxy::config::Config& out) {
  auto result = llmproxy::config::load_file(path);
  for (const auto& e : result.errors) std::fprintf(stderr, "%s\n", e.to_string().c_str());
  if (!result.ok()) {
    std::fprintf(stderr, "llmproxy: %s: %zu problem%s found, not starting\n", path.c_str(),
                 result.errors.size(), result.errors.size() == 1 ? "" : "s");
    return false;
  }
  out = std::move(*result.config);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "LLMProxy: a zero-buffering, LLM-aware reverse proxy for OpenAI-compatible backends.\n"};
  app.set_version_flag("--version", std::string("llmproxy ") + LLMPROXY_VERSION);
  std::string config_path;
  std::string check_path;
  bool print_config = false;
  app.add_option("-c,--config", config_path, "Run the gateway with this YAML configuration file");
  app.add_option("--check-config", check_path,
                 "Validate this configuration file, print every problem, and exit "
                 "(0 when valid)");
  app.add_flag("--print-config", print_config,
               "With --config or --check-config: print the effective configuration (defaults "
               "filled in) and exit");
  CLI11_PARSE(app, argc, argv);

  if (!check_path.empty()) {
    llmproxy::config::Config cfg;
    if (!load(check_path, cfg)) return 1;
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
  llmproxy::config::Config cfg;
  if (!load(config_path, cfg)) return 1;
  if (print_config) {
    std::fputs(llmproxy::config::to_yaml(cfg).c_str(), stdout);
    return 0;
  }
  llmproxy::proxy::Gateway gateway(std::move(cfg));
  return gateway.run();
}
