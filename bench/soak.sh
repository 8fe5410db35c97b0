#!/usr/bin/env bash
# bench/soak.sh: does the gateway's memory stay flat under steady load for minutes (issue 5)?
#
# Usage: bench/soak.sh                     10 minutes (SOAK_S=600), writes bench/results/soak.md
#        SOAK_S=60 OUT=bench/results/tmp bench/soak.sh     a short smoke run
#        METERING=1 OUT=bench/results/soak-metered bench/soak.sh   with usage metering on (the SQLite
#                                          log in a temp dir, no webhook): its queue and buffers too
# Uses the binaries in build/ (BUILD=1 builds them first with scripts/build.sh release).
#
# Load, all on 127.0.0.1: STREAMS concurrent streams, closed loop (each connection starts its next
# stream when one ends), TOKENS tokens at DELAY_MS per token, so a stream lasts ~TOKENS x DELAY_MS
# and thousands of streams start and end during the run; beside them, NS_RATE non-stream requests
# per second (open loop). The gateway (1 worker, metering off unless METERING=1) is pinned to CPU 0, the mock and the
# load generators to CPU 1. Every SAMPLE_S seconds: the gateway's VmRSS, open descriptors,
# established client connections and CPU time. Reported: RSS after the first minute (the warm-up:
# pools, allocator arenas, the first high-water mark), at the end and its largest value, and the
# least-squares slope of RSS over the run after the first minute, in KiB per minute and in
# bytes per completed stream. "Flat" means the end is within 5 % of the first-minute level.
# Everything started is stopped on exit; each load generator has a hard timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=soak.sh
. bench/lib.sh

SOAK_S=${SOAK_S:-600}
STREAMS=${STREAMS:-1000}
TOKENS=${TOKENS:-20}
DELAY_MS=${DELAY_MS:-100}
NS_RATE=${NS_RATE:-500}
SAMPLE_S=${SAMPLE_S:-10}
OUT=${OUT:-bench/results}
METERING=${METERING:-0}
CPU_PROXY=0
CPU_LOAD=1
[ "$(nproc)" -ge 2 ] || CPU_LOAD=0
command_line=
for k in SOAK_S STREAMS TOKENS DELAY_MS NS_RATE SAMPLE_S METERING OUT; do
  [ -n "${!k+x}" ] && command_line+="$k=${!k} "
done
command_line+="bench/soak.sh"

if [ "${BUILD:-0}" = 1 ]; then
  scripts/build.sh release llmproxy llmproxy-mock llmproxy-loadgen >/dev/null
fi
check_binaries llmproxy llmproxy-mock llmproxy-loadgen
bench_init llmproxy-soak
taskset -cp "$CPU_LOAD" $$ >/dev/null

start_server mock mock_pid "$work/mock.log" "$CPU_LOAD" build/llmproxy-mock --listen 127.0.0.1:0 --threads 1 --quiet || exit 1
cat >"$work/gw.yaml" <<YAML
listen: "127.0.0.1:0"
server: { workers: 1, access_log: false, max_connections: 20000 }
backends:
  - url: "$mock"
$(metering_yaml "$([ "$METERING" = 1 ] && echo on || echo off)" "$work/usage.db")
YAML
start_server gw gw_pid "$work/gw.log" "$CPU_PROXY" build/llmproxy --config "$work/gw.yaml" || exit 1
gw_port=${gw##*:}
smoke_200 "$gw"
idle_rss=$(rss_kib "$gw_pid")

note "soak: $STREAMS streams ($TOKENS tokens x $DELAY_MS ms) + $NS_RATE req/s for $SOAK_S s against $gw"
loadgen $((SOAK_S + 60)) --url "$gw/v1/chat/completions" --mode stream --concurrency "$STREAMS" \
  --duration "${SOAK_S}s" --timeout 60s --header "X-Mock-Tokens: $TOKENS" --header "X-Mock-Delay-Ms: $DELAY_MS" \
  --json >"$work/streams.json" 2>"$work/streams.log" &
streams_pid=$!
track "$streams_pid"
loadgen $((SOAK_S + 60)) --url "$gw/v1/chat/completions" --concurrency 16 --rate "$NS_RATE" \
  --duration "${SOAK_S}s" --timeout 30s --json >"$work/nonstream.json" 2>"$work/nonstream.log" &
ns_pid=$!
track "$ns_pid"

mkdir -p "$OUT/soak"
samples="$OUT/soak/samples.csv"
echo "elapsed_s,rss_kib,fds,client_connections,gateway_cpu_s" >"$samples"
start=$(date +%s.%N)
while kill -0 "$streams_pid" 2>/dev/null; do
  sleep "$SAMPLE_S"
  kill -0 "$gw_pid" 2>/dev/null || die "the gateway exited during the soak: $(tail -n 5 "$work/gw.log")"
  now=$(date +%s.%N)
  printf '%.0f,%d,%d,%d,%s\n' "$(awk -v a="$start" -v b="$now" 'BEGIN { print b - a }')" "$(rss_kib "$gw_pid")" \
    "$(ls "/proc/$gw_pid/fd" 2>/dev/null | wc -l)" "$(established_to "$gw_port")" "$(cpu_s "$gw_pid")" >>"$samples"
done
wait "$streams_pid" || die "stream load generator failed: $(tail -n 3 "$work/streams.log")"
forget "$streams_pid"
wait "$ns_pid" || die "non-stream load generator failed: $(tail -n 3 "$work/nonstream.log")"
forget "$ns_pid"
after_rss=$(rss_kib "$gw_pid")

streams_done=$(jnum "$work/streams.json" streams_done)
stream_errors=$(jnum "$work/streams.json" errors)
ttft_p99=$(jnum "$work/streams.json" ttft_ms p99)
gap_p99=$(jnum "$work/streams.json" gap_ms p99)
ns_requests=$(jnum "$work/nonstream.json" requests)
ns_errors=$(jnum "$work/nonstream.json" errors)
ns_p99=$(jnum "$work/nonstream.json" latency_ms p99)
anomalies=$( (run_anomalies "$work/streams.json"; run_anomalies "$work/nonstream.json") || true)

# The verdict from the samples: level after the first minute, end, max, slope after the first minute.
read -r first_rss last_rss max_rss slope_kib_min held < <(awk -F, -v warm=60 '
  NR == 1 { next }
  { t = $1; r = $2 }
  t >= warm && !have_first { first = r; have_first = 1; held = $4 }
  t >= warm { n++; sx += t; sy += r; sxx += t * t; sxy += t * r }
  r > max { max = r }
  { last = r }
  END {
    slope = (n > 1 && n * sxx - sx * sx != 0) ? (n * sxy - sx * sy) / (n * sxx - sx * sx) * 60 : 0
    printf "%d %d %d %.1f %d\n", first, last, max, slope, held
  }' "$samples")
per_stream_bytes=$(awk -v s="$slope_kib_min" -v soak="$SOAK_S" -v done="$streams_done" \
  'BEGIN { if (done > 0) printf "%.2f", s * 1024 * (soak - 60) / 60 / (done * (soak - 60) / soak); else print "n/a" }')
growth_pct=$(awk -v a="$first_rss" -v b="$last_rss" 'BEGIN { if (a > 0) printf "%.1f", 100 * (b - a) / a; else print "n/a" }')
flat=$(awk -v g="$growth_pct" 'BEGIN { print (g + 0 <= 5) ? "yes" : "no" }')

{
  echo "# Soak: gateway memory under steady load"
  echo
  echo "Produced by \`$command_line\`. Samples every $SAMPLE_S s: \`soak/samples.csv\` (elapsed s, VmRSS KiB,"
  echo "open descriptors, established client connections, gateway CPU s)."
  echo
  echo "| machine | |"
  echo "|---|---|"
  machine_rows
  echo "| build | $(git rev-parse --short HEAD 2>/dev/null || echo unknown); build/llmproxy $(date -u -r build/llmproxy '+%Y-%m-%d %H:%M:%S UTC') |"
  echo
  echo "Load: $STREAMS concurrent streams of $TOKENS tokens at $DELAY_MS ms per token (closed loop) and"
  echo "$NS_RATE non-stream requests/s (open loop, 16 connections), for $SOAK_S s; gateway (1 worker,"
  echo "metering $([ "$METERING" = 1 ] && echo "on: the SQLite usage log, no webhook" || echo off)) on CPU $CPU_PROXY, mock and load generators on CPU $CPU_LOAD."
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| streams completed (errors) | $streams_done ($stream_errors) |"
  echo "| stream TTFT p99 / gap p99 | $ttft_p99 ms / $gap_p99 ms |"
  echo "| non-stream requests (errors), latency p99 | $ns_requests ($ns_errors), $ns_p99 ms |"
  echo "| idle RSS before the load | $((idle_rss / 1024)).$(((idle_rss % 1024) * 10 / 1024)) MiB |"
  echo "| RSS after the first minute ($held client connections) | $first_rss KiB |"
  echo "| RSS at the end / largest | $last_rss KiB / $max_rss KiB |"
  echo "| growth from minute 1 to the end | $growth_pct % (**flat: $flat**, limit 5 %) |"
  echo "| slope after minute 1 | $slope_kib_min KiB/min ($per_stream_bytes bytes per completed stream) |"
  echo "| RSS after the load stopped | $after_rss KiB |"
  if [ -n "$anomalies" ]; then
    echo
    echo "Anomalies:"
    echo "$anomalies"
  fi
} >"$OUT/soak.md"
note "wrote $OUT/soak.md: RSS $first_rss -> $last_rss KiB (max $max_rss), slope $slope_kib_min KiB/min, flat: $flat"
