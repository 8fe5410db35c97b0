#include "usage/api_key.h"

#include <openssl/evp.h>

namespace llmproxy::usage {

std::string_view api_key_from_headers(std::string_view authorization, std::string_view x_api_key) {
  constexpr std::string_view kBearer = "bearer ";
  if (authorization.size() > kBearer.size()) {
    bool bearer = true;
    for (std::size_t i = 0; i < kBearer.size(); ++i) {
      char c = authorization[i];
      if ((c >= 'A' && c <= 'Z' ? c + 32 : c) != kBearer[i]) bearer = false;
    }
    if (bearer) {
      std::string_view key = authorization.substr(kBearer.size());
      while (!key.empty() && key.front() == ' ') key.remove_prefix(1);
      while (!key.empty() && key.back() == ' ') key.remove_suffix(1);
      if (!key.empty()) return key;
    }
  }
  return x_api_key;
}

std::string present_api_key(std::string_view key, config::ApiKeyMode mode) {
  if (key.empty()) return {};
  switch (mode) {
    case config::ApiKeyMode::full:
      return std::string(key);
    case config::ApiKeyMode::masked:
      if (key.size() <= 12) return "***";
      return std::string(key.substr(0, 6)) + "..." + std::string(key.substr(key.size() - 4));
    case config::ApiKeyMode::sha256: {
      unsigned char digest[EVP_MAX_MD_SIZE];
      unsigned int len = 0;
      EVP_Digest(key.data(), key.size(), digest, &len, EVP_sha256(), nullptr);
      static constexpr char kHex[] = "0123456789abcdef";
      std::string out = "sha256:";
      for (unsigned i = 0; i < len; ++i) {
        out.push_back(kHex[digest[i] >> 4]);
        out.push_back(kHex[digest[i] & 0xf]);
      }
      return out;
    }
  }
  return {};
}

}  // namespace llmproxy::usage
