#!/usr/bin/env bash
# Configures and builds one tree. Usage: scripts/build.sh [release|asan] [ninja targets...]
#   release -> build/       (-O2, what `run.sh` runs and the tests exercise first)
#   asan    -> build-asan/  (-O0 with AddressSanitizer + UndefinedBehaviorSanitizer)
# ccache keeps rebuilds cheap; the one Beast-heavy translation unit dominates a cold build.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-release}
shift || true
case "$kind" in
  release) dir=build; flags=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG") ;;
  asan) dir=build-asan; flags=(-DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O0 -g1" -DLLMPROXY_SANITIZE=ON) ;;
  *) echo "usage: $0 [release|asan] [targets...]" >&2; exit 2 ;;
esac
if [ ! -f "$dir/build.ninja" ]; then
  cmake -S . -B "$dir" -G Ninja "${flags[@]}" -DLLMPROXY_BUILD_TESTS=ON >/dev/null
fi
ninja -C "$dir" "$@"
