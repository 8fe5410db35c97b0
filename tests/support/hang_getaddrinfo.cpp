// A test shim (LD_PRELOAD) for a name server that never answers: getaddrinfo of a name ending in
// ".hang.invalid" blocks for an hour; every other name goes to the C library's getaddrinfo.
#include <dlfcn.h>
#include <netdb.h>
#include <unistd.h>

#include <cstring>

using getaddrinfo_fn = int (*)(const char*, const char*, const addrinfo*, addrinfo**);

extern "C" int getaddrinfo(const char* node, const char* service, const addrinfo* hints,
                           addrinfo** res) {
  static constexpr char kHang[] = ".hang.invalid";
  if (node) {
    const std::size_t n = std::strlen(node), k = sizeof kHang - 1;
    if (n >= k && std::strcmp(node + n - k, kHang) == 0) {
      sleep(3600);
      return EAI_AGAIN;
    }
  }
  const auto real = reinterpret_cast<getaddrinfo_fn>(dlsym(RTLD_NEXT, "getaddrinfo"));
  return real ? real(node, service, hints, res) : EAI_SYSTEM;
}
