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
passed=0 failed=0
logdir=$(mktemp -d)
summary() {
  local rc=$?
  echo "=== stage timings"
  for t in "${timings[@]}"; do echo "  $t"; done
  echo "  total                        $((SECONDS - t_start))s"
  rm -rf "$logdir"
  [ $rc -eq 0 ] && echo "tests: $passed passed, $failed failed"
}
trap summary EXIT

count() {  # count LOG: adds the runner's pass/fail totals (ctest or node:test) to the summary
  local p f
  p=$(sed -n 's/^# pass \([0-9]*\)$/\1/p; s/^.*tests passed, \([0-9]*\) tests failed out of \([0-9]*\)$/\2-\1/p' "$1" | tail -n1)
  f=$(sed -n 's/^# fail \([0-9]*\)$/\1/p; s/^.*tests passed, \([0-9]*\) tests failed out of.*$/\1/p' "$1" | tail -n1)
  passed=$((passed + ${p:-0})) failed=$((failed + ${f:-0}))
}

unit() {  # unit BUILD_DIR
  ctest --test-dir "$1" --output-on-failure -j2 | tee "$logdir/unit.log"
  count "$logdir/unit.log"
}

integration() {  # integration BUILD_DIR
  (cd tests/integration &&
    LLMPROXY_BIN="$root/$1/llmproxy" MOCK_BIN="$root/$1/llmproxy-mock" \
      node --test --test-concurrency=1 ./*.test.mjs) | tee "$logdir/integration.log"
  count "$logdir/integration.log"
}

stage "install dependencies" scripts/install-deps.sh --test
stage "npm ci (integration)" bash -c 'cd tests/integration && npm ci --no-audit --no-fund --loglevel=error'
stage "build (release)" scripts/build.sh release
stage "unit tests (release)" unit build
stage "integration (release)" integration build
if [ "${LLMPROXY_SKIP_ASAN:-0}" != 1 ]; then
  export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1:halt_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
  stage "build (asan+ubsan)" scripts/build.sh asan
  stage "unit tests (asan+ubsan)" unit build-asan
  stage "integration (asan+ubsan)" integration build-asan
fi
