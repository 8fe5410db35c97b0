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

# Every runner stops by itself: a hung test fails the run instead of holding CI until its kill.
# CTest: 300 s per unit test. node:test: --test-timeout=300000 where this Node.js has the flag
# (added in v20.11 and v21.2; probed, as an older Node.js exits on it): it bounds each test that
# sets no timeout of its own, and also each test file as a whole, so it stays above the longest
# timeout a test sets itself (240 s). Around the whole integration run, whatever the Node.js
# version, `timeout` sends TERM to the runner's process group (test files, gateways, mocks) after
# INTEGRATION_TIMEOUT s, and KILL 30 s later.
INTEGRATION_TIMEOUT=${INTEGRATION_TIMEOUT:-1500}
NODE_TEST_TIMEOUT_MS=300000

unit() {  # unit BUILD_DIR
  ctest --test-dir "$1" --output-on-failure -j2 --timeout 300 | tee "$logdir/unit.log"
  count "$logdir/unit.log"
}

integration() {  # integration BUILD_DIR
  local rc=0 node_test_timeout=()
  # Probed here, after the dependency stage: a bad option makes node exit 9 before running anything.
  if node "--test-timeout=$NODE_TEST_TIMEOUT_MS" -e '' >/dev/null 2>&1; then
    node_test_timeout=("--test-timeout=$NODE_TEST_TIMEOUT_MS")
  else
    echo "note: node $(node --version) has no --test-timeout: only the ${INTEGRATION_TIMEOUT} s bound on the whole run applies"
  fi
  (
    cd tests/integration || exit
    export LLMPROXY_BIN="$root/$1/llmproxy" MOCK_BIN="$root/$1/llmproxy-mock"
    timeout -k 30 "$INTEGRATION_TIMEOUT" node --test --test-concurrency=1 "${node_test_timeout[@]}" ./*.test.mjs &
    runner=$!
    # The tests run in timeout's own process group, which an interrupt (^C) or a TERM sent to
    # this script's process group does not reach: passed on to timeout, it stops that whole
    # group the same way. (A TERM to this script's pid alone reaches only the outer shell, which
    # defers traps while its pipeline runs: the run then ends at INTEGRATION_TIMEOUT.)
    trap 'kill -TERM "$runner" 2>/dev/null; wait "$runner"; exit 130' INT TERM
    wait "$runner"
  ) | tee "$logdir/integration.log" || rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "=== integration tests stopped: not finished within ${INTEGRATION_TIMEOUT} s (exit $rc)" >&2
  fi
  [ $rc -eq 0 ] || return $rc
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
