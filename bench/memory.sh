#!/usr/bin/env bash
# bench/memory.sh: resident memory of the gateway per concurrent stream, and whether it grows
# with a stream's length. Usage: bench/memory.sh   (writes bench/results/memory.md; BUILD=0 uses the
# binaries in build/ as they are)
#
#  - Slope: slow streams (one token every 500 ms, so none finishes during the run) held open at
#    100, 500, 1000 and 2000 concurrent streams; the gateway's VmRSS is read from /proc once
#    every stream has its first event. Memory per stream = (RSS(max) - RSS(min)) / (max - min).
#  - Length (run first, on the fresh process, so the high-water mark of the slope runs does
#    not hide growth): 100 streams of 20,000 tokens at 1 ms per token; VmRSS sampled every
#    second for 10 s. A relay that buffered would grow with every event; a fixed buffer stays
#    flat after the first second.
# Loopback only, everything started is stopped on exit, every load run has a hard timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=memory.sh
. bench/lib.sh
if [ "${BUILD:-1}" = 1 ]; then
  scripts/build.sh release llmproxy llmproxy-mock llmproxy-loadgen >/dev/null
fi
check_binaries llmproxy llmproxy-mock llmproxy-loadgen
# cleanup on exit, start_server and rss_kib: bench/lib.sh.
bench_init llmproxy-mem

start_server mock mock_pid "$work/mock.log" - build/llmproxy-mock --listen 127.0.0.1:0 --threads 1 --quiet || exit 1
cat >"$work/gw.yaml" <<YAML
listen: "127.0.0.1:0"
server: { workers: 1, access_log: false, max_connections: 20000 }
health_check: { enabled: false }
backends:
  - url: "$mock"
YAML
start_server gw gw_pid "$work/gw.log" - build/llmproxy --config "$work/gw.yaml" || exit 1
url="$gw/v1/chat/completions"

rss_idle=$(rss_kib "$gw_pid")
timeout 60 build/llmproxy-loadgen --url "$url" --mode stream --concurrency 100 --duration 12s \
  --timeout 30s --header 'X-Mock-Tokens: 20000' --header 'X-Mock-Delay-Ms: 1' --threads 1 \
  --json >"$work/length.json" 2>/dev/null &
lg=$!
samples=()
for _ in $(seq 1 10); do
  sleep 1
  samples+=("$(rss_kib "$gw_pid")")
done
kill -INT $lg 2>/dev/null || true
wait $lg 2>/dev/null || true
# A load generator stopped before it printed its summary leaves no count: say so, do not abort.
events=$(grep -o '"events":[0-9]*' "$work/length.json" 2>/dev/null | head -n1 | cut -d: -f2 || true)
events=${events:-unknown}
sleep 1

declare -A rss
for n in 100 500 1000 2000; do
  timeout 60 build/llmproxy-loadgen --url "$url" --mode stream --concurrency "$n" --duration 6s \
    --timeout 20s --header 'X-Mock-Tokens: 1000' --header 'X-Mock-Delay-Ms: 500' \
    --threads 1 --json >"$work/slope-$n.json" 2>/dev/null &
  lg=$!
  sleep 4  # streams ramp up over ~1 s; their first events arrive 500 ms apart
  rss[$n]=$(rss_kib "$gw_pid")
  kill -INT $lg 2>/dev/null || true
  wait $lg 2>/dev/null || true
  sleep 1
done
slope=$(awk -v a="${rss[100]}" -v b="${rss[2000]}" 'BEGIN { printf "%.1f", (b - a) / 1900 }')

mkdir -p bench/results
{
  echo "# Gateway memory per stream"
  echo
  echo "Produced by \`bench/memory.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs,"
  echo "$(uname -sr), commit $(git rev-parse --short HEAD). Gateway: 1 worker, release build."
  echo
  echo "| concurrent streams | gateway VmRSS (KiB) |"
  echo "|---|---|"
  echo "| 0 (idle) | $rss_idle |"
  for n in 100 500 1000 2000; do echo "| $n | ${rss[$n]} |"; done
  echo
  echo "Memory per concurrent stream (slope 100 -> 2000): **$slope KiB**."
  echo
  echo "100 streams of 20,000 tokens at 1 ms per token ($events events relayed), VmRSS (KiB) once"
  echo "a second, measured first on the fresh process:"
  echo
  echo "\`${samples[*]}\`"
  echo
  echo "A relay that kept stream bytes would grow by ~30 MB a second here (100 streams x ~1,000"
  echo "events/s x ~300 bytes); the samples stay flat when memory per stream is constant."
} >bench/results/memory.md
cat bench/results/memory.md
