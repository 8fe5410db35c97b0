#!/usr/bin/env bash
# bench/threads.sh: CPU time per request of each gateway thread (worker-N, usage-writer,
# sink-usage_hook), metering off, on (the SQLite log), apart (on, the usage writer on another
# CPU) and on with the webhook, interleaved. Where callgrind.sh counts instructions, this reads
# what the kernel charged each thread (utime and stime from /proc/PID/task/TID/stat), so
# system-call and page-cache work (the usage log's writes) shows too.
#
# Usage: bench/threads.sh [RUNS] [REQUESTS]        (default: 3 runs of 300000 requests per mode)
# The gateway (1 worker) on CPU 0, the mock (1 thread) and the load generator (32 connections,
# non-stream chat, closed loop) on CPU 1, and in "hook" the webhook receiver
# (bench/usage-tools.mjs, batch_size 100, batch_interval 200ms) too; in "apart" the usage-writer
# thread is moved to CPU 1 once the gateway listens. MODES="off on apart hook" (default) picks the
# configurations. Prints one line per thread and run, then the medians,
# and writes the same to bench/results/threads.md (OUT=... elsewhere).
# The clock tick is 10 ms: with 300,000 requests one tick is 0.03 us per request. BUILD=0 uses the
# binaries in build/ as they are. Loopback only; everything stops on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=threads.sh
. bench/lib.sh
runs=${1:-3}
requests=${2:-300000}
MODES=${MODES:-off on apart hook}
OUT=${OUT:-bench/results/threads.md}
if [ "${BUILD:-1}" = 1 ]; then
  scripts/build.sh release llmproxy llmproxy-mock llmproxy-loadgen >/dev/null
fi
check_binaries llmproxy llmproxy-mock llmproxy-loadgen
bench_init llmproxy-threads
CPU_LOAD=$(($(nproc) - 1))
hz=$(getconf CLK_TCK)

start_server mock mock_pid "$work/mock.log" "$CPU_LOAD" build/llmproxy-mock --listen 127.0.0.1:0 \
  --threads 1 --quiet || exit 1
receiver=
if [[ " $MODES " == *" hook "* ]]; then
  start_server receiver receiver_pid "$work/receiver.log" "$CPU_LOAD" node bench/usage-tools.mjs \
    receiver || exit 1
fi

# thread_ticks PID: "name utime stime" per thread, sorted by name.
thread_ticks() {
  local t
  for t in /proc/"$1"/task/*; do
    printf '%s %s\n' "$(cat "$t/comm")" "$(awk '{print $14, $15}' "$t/stat")"
  done 2>/dev/null | sort
}

rows=$work/rows.txt
: >"$rows"
for run in $(seq "$runs"); do
  for mode in $MODES; do
    cfg=$work/$mode-$run.yaml
    rm -f "$work"/usage-*.db*
    yaml_mode=$mode
    [ "$mode" != apart ] || yaml_mode=on
    gateway_config "$cfg" "$mock" "$(metering_yaml "$yaml_mode" "$work/usage-$run.db" "$receiver")"
    start_server gw gw_pid "$work/gw-$mode.log" 0 build/llmproxy --config "$cfg" || exit 1
    if [ "$mode" = apart ]; then
      writer_tid=$({ grep -lx usage-writer /proc/"$gw_pid"/task/*/comm || true; } | cut -d/ -f5)
      [ -n "$writer_tid" ] || die "no usage-writer thread in the gateway"
      taskset -p -c "$CPU_LOAD" "$writer_tid" >/dev/null || die "cannot move the usage writer"
    fi
    thread_ticks "$gw_pid" >"$work/before"
    loadgen 600 --url "$gw/v1/chat/completions" --mode nonstream --concurrency 32 \
      --requests "$requests" --json >"$work/load.json" 2>/dev/null ||
      die "the load generator failed: $(cat "$work/load.json")"
    if [ "$mode" != off ]; then
      # Until the log and the sink have caught up: their work for these requests is counted.
      taskset -c "$CPU_LOAD" node bench/usage-tools.mjs settle "$gw" --timeout-ms 30000 \
        >"$work/settle.json" || die "the usage backlog did not drain: $(cat "$work/settle.json")"
    fi
    thread_ticks "$gw_pid" >"$work/after"
    stop_pid "$gw_pid" gateway
    [ "$(jnum "$work/load.json" errors)" = 0 ] || die "load errors: $(cat "$work/load.json")"
    rps=$(jnum "$work/load.json" rps)
    # Requests the gateway served while measured: the load generator's (its warmup included).
    served=$(node -e 'const j=require(process.argv[1]);console.log(j.requests+(j.warmup_requests||0))' \
      "$work/load.json")
    join <(awk '{print $1, $2, $3}' "$work/before") <(awk '{print $1, $2, $3}' "$work/after") |
      awk -v run="$run" -v mode="$mode" -v n="$served" -v hz="$hz" -v rps="$rps" '{
        u = ($4 - $2) * 1e6 / hz / n; s = ($5 - $3) * 1e6 / hz / n
        if (u + s > 0.02) printf "%s %s %s %.0f %.2f %.2f\n", run, mode, $1, rps, u, s
      }' >>"$rows"
  done
done

# The commit, read before the results file is rewritten (it would count as a change itself).
rev="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet -- . ":(exclude)$OUT" 2>/dev/null || echo ' + uncommitted changes')"
mkdir -p "$(dirname "$OUT")"
exec > >(tee "$OUT")
echo "# CPU per request by gateway thread"
echo
echo "\`bench/threads.sh $runs $requests\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $rev:" \
  "the gateway (1 worker) on CPU 0, the mock and the load generator (32 connections, non-stream" \
  "chat, closed loop) on CPU 1; utime/stime of each thread from /proc over each run, divided by" \
  "the requests served. on: metering with the SQLite usage log (its defaults); apart: the same" \
  "with the usage-writer thread moved to CPU 1 after start, as on a machine with a core to spare" \
  "(the worker's cost without the writer sharing its core); hook: on plus usage_hook" \
  "(batch_size 100, batch_interval 200ms) to a local receiver on CPU 1."
echo
echo "| run | metering | thread | req/s | user µs/req | system µs/req | total µs/req |"
echo "|---|---|---|---|---|---|---|"
awk '{printf "| %s | %s | %s | %s | %.2f | %.2f | %.2f |\n", $1, $2, $3, $4, $5, $6, $5 + $6}' "$rows"
echo
echo "Medians over $runs runs (the gateway's whole CPU per request is the sum of its threads):"
echo
echo "| metering | thread | user µs/req | system µs/req | total µs/req |"
echo "|---|---|---|---|---|"
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
for mode in $MODES; do
  for th in $(awk -v m="$mode" '$2 == m {print $3}' "$rows" | sort -u); do
    sel() { awk -v m="$mode" -v t="$th" "\$2 == m && \$3 == t {print $1}" "$rows" | median; }
    printf '| %s | %s | %s | %s | %.2f |\n' "$mode" "$th" "$(sel '$5')" "$(sel '$6')" "$(sel '$5 + $6')"
  done
done
