#!/usr/bin/env bash
# Sets everything up and runs every test:
#   1. unit tests (GoogleTest via CTest) on the release build
#   2. black-box integration tests (node:test + the official openai npm client) that start the
#      real gateway and mock backends on loopback port 0
#   3. the same two suites again on an AddressSanitizer + UndefinedBehaviorSanitizer build
# Prints how long each stage took. Set LLMPROXY_SKIP_ASAN=1 to skip stage 3 locally.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
t_start=$SECONDS
declare -a timings=()
stage() {  # stage NAME CMD...
  local name=$1 t0=$SECONDS
  shift
  echo "=== $name"
  "$@"
  timings+=("$(printf '%-28s %4ds' "$name" $((SECONDS - t0)))")
  echo "=== $name: done in $((SECONDS - t0))s"
}
summary() {
  echo "=== stage timings"
  for t in "${timings[@]}"; do echo "  $t"; done
  echo "  total                        $((SECONDS - t_start))s"
}
trap summary EXIT

integration() {  # integration BUILD_DIR
  (cd tests/integration &&
    LLMPROXY_BIN="$root/$1/llmproxy" MOCK_BIN="$root/$1/llmproxy-mock" \
      node --test --test-concurrency=1 ./*.test.mjs)
}

stage "install dependencies" scripts/install-deps.sh --test
stage "npm ci (integration)" bash -c 'cd tests/integration && npm ci --no-audit --no-fund --loglevel=error'
stage "build (release)" scripts/build.sh release
stage "unit tests (release)" ctest --test-dir build --output-on-failure -j2
stage "integration (release)" integration build
if [ "${LLMPROXY_SKIP_ASAN:-0}" != 1 ]; then
  export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1:halt_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
  stage "build (asan+ubsan)" scripts/build.sh asan
  stage "unit tests (asan+ubsan)" ctest --test-dir build-asan --output-on-failure -j2
  stage "integration (asan+ubsan)" integration build-asan
fi
