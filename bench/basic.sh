#!/usr/bin/env bash
# bench/basic.sh: the bundled mock backend measured directly and through the gateway, in one run,
# on this machine. Usage: bench/basic.sh            (RUNS=3 by default; RUNS=5 bench/basic.sh;
#                                                    BUILD=0 uses the binaries in build/ as they are)
#
# Why it is built this way:
#  - Direct and gateway runs alternate (and the order flips every run), so drift on a shared
#    machine (other work, thermal, page cache) lands on both sides instead of on one.
#  - Pinning: the gateway alone on CPU 0; the mock and the load generator share CPU 1. The gateway
#    can then use one whole core, and the CPU time it burns is its own. When CPU 1 is saturated
#    the load side is the limit and the table says so (the "CPU 1 busy" column).
#  - Only medians over runs and per-run ratios are reported: absolute numbers on a noisy 2-core
#    machine say little by themselves.
#  - Everything it starts is stopped on exit (trap), every wait has a timeout, every load run has
#    a hard `timeout`, and only 127.0.0.1 is used.
# Writes bench/results/basic.md (tables + machine) and bench/results/basic/*.json (raw per run).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=basic.sh
. bench/lib.sh

RUNS=${RUNS:-3}
NS_CONCURRENCY=32
NS_DURATION_S=5
ST_CONCURRENCY=50
ST_DURATION_S=10
WARMUP_S=1
STREAM_HEADERS=(--header 'X-Mock-Tokens: 50' --header 'X-Mock-Delay-Ms: 20' --header 'X-Mock-TTFT-Ms: 20')

OUT=bench/results
RAW=$OUT/basic
CPU_GATEWAY=0
CPU_LOAD=1
if [ "$(nproc)" -lt 2 ]; then
  note "fewer than 2 CPUs; running unpinned (results are not comparable)"
  CPU_LOAD=0
fi

if [ "${BUILD:-1}" = 1 ]; then
  scripts/build.sh release llmproxy llmproxy-mock llmproxy-loadgen
fi
check_binaries llmproxy llmproxy-mock llmproxy-loadgen
# cleanup on exit, die, start_server, cpu_s, jnum, loadgen (build/llmproxy-loadgen), gateway_config,
# smoke_200, run_anomalies, AWK_MEDIAN and machine_rows: bench/lib.sh.
bench_init llmproxy-bench

# --- start the mock and the gateway ------------------------------------------------------------
start_server mock_url mock_pid "$work/mock.log" "$CPU_LOAD" build/llmproxy-mock --listen 127.0.0.1:0 --threads 1 || exit 1

gateway_config "$work/gateway.yaml" "$mock_url"
start_server gw_url gw_pid "$work/gateway.log" "$CPU_GATEWAY" build/llmproxy --config "$work/gateway.yaml" || exit 1
note "mock $mock_url (pid $mock_pid, CPU $CPU_LOAD), gateway $gw_url (pid $gw_pid, CPU $CPU_GATEWAY)"

# Both answer a request before anything is measured.
for target in "$mock_url" "$gw_url"; do smoke_200 "$target"; done

rm -rf "$RAW"
mkdir -p "$RAW"

# run_one SCENARIO TARGET RUN: one load run, raw JSON (plus CPU and wall time) to $RAW.
run_one() {
  local scenario=$1 target=$2 run=$3 url args gw0 gw1 mock0 mock1 t0 t1 file
  if [ "$target" = direct ]; then url=$mock_url; else url=$gw_url; fi
  if [ "$scenario" = nonstream ]; then
    args=(--mode nonstream --concurrency "$NS_CONCURRENCY" --duration "${NS_DURATION_S}s")
  else
    args=(--mode stream --concurrency "$ST_CONCURRENCY" --duration "${ST_DURATION_S}s" "${STREAM_HEADERS[@]}")
  fi
  file=$RAW/$scenario-$target-$run.json
  gw0=$(cpu_s "$gw_pid")
  mock0=$(cpu_s "$mock_pid")
  t0=$(date +%s.%N)
  if ! loadgen 90 --url "$url/v1/chat/completions" "${args[@]}" --warmup "${WARMUP_S}s" --timeout 20s \
    --json >"$work/run.json" 2>"$work/run.txt"; then
    cat "$work/run.txt" >&2
    die "loadgen failed or timed out: $scenario $target run $run"
  fi
  t1=$(date +%s.%N)
  gw1=$(cpu_s "$gw_pid")
  mock1=$(cpu_s "$mock_pid")
  kill -0 "$gw_pid" 2>/dev/null || die "the gateway exited during $scenario run $run"
  kill -0 "$mock_pid" 2>/dev/null || die "the mock exited during $scenario run $run"
  # The loadgen's JSON with the run's identity and the CPU the servers used during it appended.
  sed 's/}$//' "$work/run.json" | tr -d '\n' >"$file"
  awk -v s="$scenario" -v t="$target" -v r="$run" -v w0="$t0" -v w1="$t1" -v g0="$gw0" -v g1="$gw1" \
    -v m0="$mock0" -v m1="$mock1" 'BEGIN {
      printf ",\"scenario\":\"%s\",\"target\":\"%s\",\"run\":%d,\"wall_s\":%.3f,\"gateway_cpu_s\":%s,\"mock_cpu_s\":%.3f}\n",
        s, t, r, w1 - w0, t == "gateway" ? sprintf("%.3f", g1 - g0) : "null", m1 - m0 }' >>"$file"
  sed -n '1,6p' "$work/run.txt" | sed "s/^/  [$scenario $target $run] /" >&2
}

for run in $(seq "$RUNS"); do
  # Alternate which side goes first, so neither always runs on a "warmer" machine.
  if [ $((run % 2)) -eq 1 ]; then order=(direct gateway); else order=(gateway direct); fi
  for scenario in nonstream stream; do
    for target in "${order[@]}"; do run_one "$scenario" "$target" "$run"; done
  done
done

# --- tables ------------------------------------------------------------------------------------
# One TSV line per run and scenario: direct and gateway metrics side by side.
collect() {  # collect SCENARIO
  local run d g
  for run in $(seq "$RUNS"); do
    d=$RAW/$1-direct-$run.json
    g=$RAW/$1-gateway-$run.json
    if [ "$1" = nonstream ]; then
      printf '%s\t' "$run" \
        "$(jnum "$d" rps)" "$(jnum "$g" rps)" \
        "$(jnum "$d" latency_ms p50)" "$(jnum "$g" latency_ms p50)" \
        "$(jnum "$d" latency_ms p99)" "$(jnum "$g" latency_ms p99)"
    else
      printf '%s\t' "$run" \
        "$(jnum "$d" ttft_ms p50)" "$(jnum "$g" ttft_ms p50)" \
        "$(jnum "$d" ttft_ms p99)" "$(jnum "$g" ttft_ms p99)" \
        "$(jnum "$d" gap_ms p50)" "$(jnum "$g" gap_ms p50)" \
        "$(jnum "$d" gap_ms p99)" "$(jnum "$g" gap_ms p99)" \
        "$(jnum "$d" coalesced_reads)" "$(jnum "$g" coalesced_reads)" \
        "$(jnum "$d" streams_done)" "$(jnum "$g" streams_done)"
    fi
    printf '%s\t' \
      "$(jnum "$d" requests)" "$(jnum "$g" requests)" \
      "$(jnum "$d" errors)" "$(jnum "$g" errors)" \
      "$(jnum "$g" gateway_cpu_s)" "$(jnum "$g" warmup_requests)" "$(jnum "$g" wall_s)" \
      "$(jnum "$d" mock_cpu_s)" "$(jnum "$d" loadgen_cpu_s)" "$(jnum "$d" wall_s)" \
      "$(jnum "$g" mock_cpu_s)" "$(jnum "$g" loadgen_cpu_s)"
    printf '\n'
  done
}

# The tables' awk: AWK_MEDIAN (bench/lib.sh; median, f, ratio, busy) over r[run, name].
nonstream_table() {
  collect nonstream | awk -F'\t' -v runs="$RUNS" "$AWK_MEDIAN"'
  {
    i = $1
    r[i,"drps"] = $2; r[i,"grps"] = $3; r[i,"ratio_rps"] = ratio($3, $2)
    r[i,"dp50"] = $4; r[i,"gp50"] = $5; r[i,"ratio_p50"] = ratio($5, $4)
    r[i,"dp99"] = $6; r[i,"gp99"] = $7; r[i,"ratio_p99"] = ratio($7, $6)
    r[i,"dreq"] = $8; r[i,"greq"] = $9; r[i,"derr"] = $10; r[i,"gerr"] = $11
    # Gateway CPU per request: everything it served during the run, warmup included.
    r[i,"gcpu_us"] = ($9 + $13 > 0) ? 1e6 * $12 / ($9 + $13) : "null"
    r[i,"gbusy"] = busy($12, $14)
    r[i,"dload"] = busy($15 + $16, $17); r[i,"gload"] = busy($18 + $19, $14)
  }
  END {
    print "| run | direct rps | gateway rps | gw/direct rps | direct p50 ms | gateway p50 ms | gw/direct p50 | direct p99 ms | gateway p99 ms | gw/direct p99 | gateway CPU µs/req | CPU 0 busy (gateway) | CPU 1 busy (mock+loadgen) direct / gateway | errors direct / gateway |"
    print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= runs; i++)
      printf "| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s%% | %s%% / %s%% | %s / %s |\n", i,
        f(r[i,"drps"], 0), f(r[i,"grps"], 0), f(r[i,"ratio_rps"], 3), f(r[i,"dp50"], 3), f(r[i,"gp50"], 3),
        f(r[i,"ratio_p50"], 2), f(r[i,"dp99"], 3), f(r[i,"gp99"], 3), f(r[i,"ratio_p99"], 2),
        f(r[i,"gcpu_us"], 1), f(r[i,"gbusy"], 0), f(r[i,"dload"], 0), f(r[i,"gload"], 0), r[i,"derr"], r[i,"gerr"]
    printf "| **median** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s** | %s%% | %s%% / %s%% | |\n",
      f(median("drps"), 0), f(median("grps"), 0), f(median("ratio_rps"), 3), f(median("dp50"), 3), f(median("gp50"), 3),
      f(median("ratio_p50"), 2), f(median("dp99"), 3), f(median("gp99"), 3), f(median("ratio_p99"), 2),
      f(median("gcpu_us"), 1), f(median("gbusy"), 0), f(median("dload"), 0), f(median("gload"), 0)
  }'
}

stream_table() {
  collect stream | awk -F'\t' -v runs="$RUNS" "$AWK_MEDIAN"'
  {
    i = $1
    r[i,"dt50"] = $2; r[i,"gt50"] = $3; r[i,"add50"] = $3 - $2; r[i,"ratio_t50"] = ratio($3, $2)
    r[i,"dt99"] = $4; r[i,"gt99"] = $5; r[i,"add99"] = $5 - $4
    r[i,"dg50"] = $6; r[i,"gg50"] = $7; r[i,"dg99"] = $8; r[i,"gg99"] = $9; r[i,"ratio_g99"] = ratio($9, $8)
    r[i,"dco"] = $10; r[i,"gco"] = $11; r[i,"ddone"] = $12; r[i,"gdone"] = $13
    r[i,"dreq"] = $14; r[i,"greq"] = $15; r[i,"derr"] = $16; r[i,"gerr"] = $17
    r[i,"gcpu_us"] = ($15 + $19 > 0) ? 1e6 * $18 / ($15 + $19) : "null"
    r[i,"gbusy"] = busy($18, $20)
  }
  END {
    print "| run | direct TTFT p50 ms | gateway TTFT p50 ms | added TTFT p50 ms | gw/direct TTFT p50 | direct TTFT p99 ms | gateway TTFT p99 ms | added TTFT p99 ms | direct gap p50 / p99 ms | gateway gap p50 / p99 ms | gw/direct gap p99 | streams (with [DONE]) direct / gateway | coalesced reads direct / gateway | gateway CPU µs/stream | CPU 0 busy (gateway) | errors direct / gateway |"
    print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= runs; i++)
      printf "| %d | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s / %s | %s | %s (%s) / %s (%s) | %s / %s | %s | %s%% | %s / %s |\n", i,
        f(r[i,"dt50"], 2), f(r[i,"gt50"], 2), f(r[i,"add50"], 2), f(r[i,"ratio_t50"], 3),
        f(r[i,"dt99"], 2), f(r[i,"gt99"], 2), f(r[i,"add99"], 2),
        f(r[i,"dg50"], 2), f(r[i,"dg99"], 2), f(r[i,"gg50"], 2), f(r[i,"gg99"], 2), f(r[i,"ratio_g99"], 3),
        r[i,"dreq"], r[i,"ddone"], r[i,"greq"], r[i,"gdone"], r[i,"dco"], r[i,"gco"],
        f(r[i,"gcpu_us"], 1), f(r[i,"gbusy"], 0), r[i,"derr"], r[i,"gerr"]
    printf "| **median** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s / %s** | **%s / %s** | **%s** | | %s / %s | **%s** | %s%% | |\n",
      f(median("dt50"), 2), f(median("gt50"), 2), f(median("add50"), 2), f(median("ratio_t50"), 3),
      f(median("dt99"), 2), f(median("gt99"), 2), f(median("add99"), 2),
      f(median("dg50"), 2), f(median("dg99"), 2), f(median("gg50"), 2), f(median("gg99"), 2), f(median("ratio_g99"), 3),
      median("dco"), median("gco"), f(median("gcpu_us"), 1), f(median("gbusy"), 0)
  }'
}

# Things a reader must not miss: errors, non-200 answers, streams without [DONE].
anomalies() {
  local file
  for file in "$RAW"/*.json; do run_anomalies "$file"; done
}

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit + uncommitted changes"
ns_table=$(nonstream_table)
st_table=$(stream_table)
problems=$(anomalies)

cat >"$OUT/basic.md" <<MD
# Basic benchmark: the mock backend directly vs through the gateway

Produced by \`bench/basic.sh\` ($RUNS runs per side, direct and gateway interleaved). Raw per-run
JSON (the load generator's output plus the servers' CPU time) is in \`bench/results/basic/\`.

| machine | |
|---|---|
$(machine_rows date cpus model kernel compiler)
| build | release (-O2), commit $commit |
| pinning | gateway on CPU $CPU_GATEWAY; mock backend and load generator on CPU $CPU_LOAD |
| gateway | 1 worker, access log off, one backend (the mock, 1 thread) |

## Non-stream chat completions

Closed loop, $NS_CONCURRENCY keep-alive connections, ${NS_DURATION_S} s after ${WARMUP_S} s of warmup, small
request body. Latency: request sent -> whole response received. "CPU µs/req" is the gateway's
utime+stime during the run divided by the requests it served (warmup included). "CPU busy" is CPU
seconds over wall seconds of the run: when CPU 1 is near 100 % the mock and the load generator,
not the gateway, limit the throughput.

$ns_table

## Streams

$ST_CONCURRENCY concurrent streams (closed loop) of 50 tokens, 20 ms before the first token and
between tokens (\`X-Mock-Tokens: 50\`, \`X-Mock-TTFT-Ms: 20\`, \`X-Mock-Delay-Ms: 20\`), ${ST_DURATION_S} s after ${WARMUP_S} s
of warmup. TTFT: request sent -> first \`data:\` event. Gap: time between consecutive events of a
stream (each read is timestamped once; the finish chunk and \`[DONE]\` arrive back to back, so a
small share of gaps is ~0). Added TTFT = gateway minus direct in the same run. A coalesced read
is one socket read that completed more than one event.

$st_table

## Anomalies

${problems:-None: no errors, every answer 200, every stream ended with \`data: [DONE]\`.}
MD

note "wrote $OUT/basic.md and $RAW/"
cat "$OUT/basic.md"
