#!/usr/bin/env bash
# bench/callgrind.sh: instructions per request of the gateway, counted by valgrind's callgrind.
# Timings on this shared 2-core VM move from run to run; instruction counts do not, so this is the
# number to compare before and after a change to the request path (the ratios against nginx come
# from bench/compare.sh).
#
# Usage: bench/callgrind.sh [off|on|hook] [REQUESTS]      (default: off 20000)
#   off  the gateway with usage: {enabled: false}; on: with the SQLite usage log (its defaults);
#   hook: on plus usage_hook (batch_size 100) to bench/usage-tools.mjs's receiver (the sink thread
#   is counted too; the gateway drains its backlog on SIGTERM, so every record is delivered)
# The mock and the load generator (8 connections, non-stream chat) run natively; the gateway (1
# worker) runs under callgrind. Prints the instructions per request of the worker thread and of the
# usage writer (startup excluded: they are the threads' own totals), then the functions with the
# most inclusive instructions per request. Output: bench/results/tmp/callgrind-MODE.out (ignored
# by git; open it with callgrind_annotate). BUILD=0 uses the binaries in build/ as they are.
# Needs valgrind (scripts/install-deps.sh --bench). Loopback only; everything stops on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=callgrind.sh
. bench/lib.sh
mode=${1:-off}
requests=${2:-20000}
case "$mode" in off | on | hook) ;; *) die "usage: bench/callgrind.sh [off|on|hook] [REQUESTS]" ;; esac
command -v valgrind >/dev/null || scripts/install-deps.sh --bench >/dev/null ||
  die "valgrind missing (scripts/install-deps.sh --bench)"
if [ "${BUILD:-1}" = 1 ]; then
  scripts/build.sh release llmproxy llmproxy-mock llmproxy-loadgen >/dev/null
fi
check_binaries llmproxy llmproxy-mock llmproxy-loadgen
bench_init llmproxy-callgrind
CPU_LOAD=$(($(nproc) - 1)) # loadgen() pins the load generator here

start_server mock mock_pid "$work/mock.log" - build/llmproxy-mock --listen 127.0.0.1:0 --threads 1 --quiet ||
  exit 1
receiver=
if [ "$mode" = hook ]; then
  start_server receiver receiver_pid "$work/receiver.log" - node bench/usage-tools.mjs receiver ||
    exit 1
fi
gateway_config "$work/gw.yaml" "$mock" "$(metering_yaml "$mode" "$work/usage.db" "$receiver")"
out=bench/results/tmp/callgrind-$mode.out
mkdir -p bench/results/tmp
# Under callgrind the gateway starts ~50 x slower than natively: give it a minute to listen.
LISTEN_WAIT_S=60 start_server gw gw_pid "$work/gw.log" - \
  valgrind --tool=callgrind --callgrind-out-file="$out" build/llmproxy --config "$work/gw.yaml" || exit 1
loadgen 600 --url "$gw/v1/chat/completions" --mode nonstream --concurrency 8 --requests "$requests" \
  --json >"$work/load.json" 2>/dev/null || die "the load generator failed: $(cat "$work/load.json")"
[ "$(jnum "$work/load.json" errors)" = 0 ] || die "load errors: $(cat "$work/load.json")"
stop_pid "$gw_pid" gateway # SIGTERM: callgrind writes its output as the gateway exits
[ -s "$out" ] || die "callgrind wrote no output ($out)"

callgrind_annotate --inclusive=yes "$out" 2>/dev/null | awk -v n="$requests" -v mode="$mode" '
  /^ *[0-9,]+ / {
    ir = $1; gsub(",", "", ir)
    name = $0; sub(/^ *[0-9,]+ +(\([^)]*\) +)?/, "", name)
    # The worker threads run a lambda of Gateway::run() (its number moves as lambdas are added):
    # the busiest thread started there is the worker.
    if (name ~ /Gateway::run\(\)::\{lambda\(\)#[0-9]+\}.*_M_run/ && ir + 0 > worker + 0) worker = ir
    else if (name ~ /usage::Pipeline::Impl::writer_loop/) writer = ir
    else if (name ~ /usage::Pipeline::Impl::sink_loop/) sink = ir
    if (name ~ /_M_run|Gateway::run\(\) \[|Gateway::Impl|Gateway::Gateway|main \[/) next  # threads, startup
    if (name ~ /llmproxy::|beast::http::basic_parser|malloc\.c:(malloc|free) |simdjson.*parse/ && rows < 14) {
      gsub(/\(anonymous namespace\)/, "{anon}", name)
      sub(/\(.*$/, "", name); sub(/^\?\?\?:/, "", name)
      top[++rows] = sprintf("%9.0f  %s", ir / n, substr(name, 1, 110))
    }
  }
  END {
    printf "metering %s, %d requests\n", mode, n
    printf "worker thread: %.0f instructions per request\n", worker / n
    if (writer) printf "usage writer:  %.0f instructions per request\n", writer / n
    if (sink) printf "usage sink:    %.0f instructions per request\n", sink / n
    print "heaviest (inclusive, per request):"
    for (i = 1; i <= rows; ++i) print top[i]
  }'
note "callgrind output: $out"
