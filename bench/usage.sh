#!/usr/bin/env bash
# bench/usage.sh: what usage metering costs the gateway, how fast the webhook sender drains a
# backlog, and whether the durable log keeps up, in one run on this machine.
# Usage: bench/usage.sh        (RUNS=5 by default, ~7 minutes on an idle 2-CPU machine; RUNS=3
#                               bench/usage.sh for a quicker run; BUILD=0 uses the binaries in
#                               build/ as they are). Needs node (bench/usage-tools.mjs: the webhook
#                               receiver and the /metrics poller), taskset, coreutils, awk.
#
#  (a) Cost: three gateways run side by side, identical but for metering: "off"
#      (usage: {enabled: false}), "log" (records to the SQLite log, no webhook) and "hook" (log +
#      the usage_hook sink, batch_size 100, to a local receiver). Non-stream chat (closed loop,
#      32 connections, 5 s after 1 s warmup) and streams (50 concurrent, as basic.sh), the three
#      configurations in a rotating order every run (off/log/hook, log/hook/off, hook/off/log, ...),
#      so drift on a shared machine lands on all of them. Reported: medians and per-run ratios
#      on/off, and gateway CPU time per request (utime+stime from /proc/PID/stat).
#  (b) Sender: a fresh gateway whose webhook receiver is down serves DRAIN_N requests, so the
#      records pile up in the log (llmproxy_usage_sink_backlog); then the receiver comes up on
#      that port and /metrics is polled every 100 ms until the backlog is 0 and
#      llmproxy_webhook_success_total equals the records logged. batch_size 100 and batch_size 1
#      (the seed's one-object-per-POST format), alternating which goes first.
#  (c) Log: during (a) /metrics is polled every 100 ms (max llmproxy_usage_queue_depth); after each
#      run the records committed must equal the requests served; records per commit = records /
#      commits (group commit).
#
# Pinning as basic.sh: the gateway alone on CPU 0 (its writer and sink threads too: they compete
# with the worker, which is the cost being measured); the mock, the load generator, the webhook
# receiver and the /metrics poller share CPU 1. Loopback only, every process started is stopped on
# exit (trap), every wait and every load run has a hard timeout. Other work on a shared machine is
# not pinned away: /proc/stat shows how much of each CPU it took per run, a non-stream triple it
# disturbed (> FOREIGN_MAX %) is repeated (at most NS_ATTEMPTS tries), and the tables flag it.
# Writes bench/results/usage.md and bench/results/usage/*.json (raw, one flat JSON per run).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=usage.sh
. bench/lib.sh

RUNS=${RUNS:-5}
NS_CONCURRENCY=32
NS_DURATION_S=${NS_DURATION_S:-5}
ST_CONCURRENCY=50
ST_DURATION_S=${ST_DURATION_S:-10}
WARMUP_S=1
STREAM_HEADERS=(--header 'X-Mock-Tokens: 50' --header 'X-Mock-Delay-Ms: 20' --header 'X-Mock-TTFT-Ms: 20')
HOOK_BATCH=100
DRAIN_N=${DRAIN_N:-50000}     # requests whose records pile up, batch_size 100
DRAIN_N1=${DRAIN_N1:-20000}   # the same for batch_size 1 (slower: fewer, so the run stays short)
DRAIN_CONCURRENCY=32
DRAIN_TIMEOUT_S=${DRAIN_TIMEOUT_S:-180}
CONFIGS=(off log hook)
FOREIGN_MAX=${FOREIGN_MAX:-10}   # % of CPU 0 or 1 that other processes may take in a non-stream run
NS_ATTEMPTS=${NS_ATTEMPTS:-3}    # tries of a run's three non-stream runs when they took more

OUT=bench/results
RAW=$OUT/usage
CPU_GATEWAY=0
CPU_LOAD=1
if [ "$(nproc)" -lt 2 ]; then
  note "fewer than 2 CPUs; running unpinned (results are not comparable)"
  CPU_LOAD=0
fi
command -v node >/dev/null || die "needs node (the receiver and the /metrics poller)"
TOOLS=bench/usage-tools.mjs

if [ "${BUILD:-1}" = 1 ]; then
  scripts/build.sh release llmproxy llmproxy-mock llmproxy-loadgen
fi
check_binaries llmproxy llmproxy-mock llmproxy-loadgen

# Cleanup on exit (a failed run keeps the processes' logs, not the binaries and databases, for a
# post-mortem), die, start_server, forget/stop_pid, cpu_s, cpu_busy_s/cpu_irq_s, jnum, loadgen
# ($BIN/llmproxy-loadgen), gateway_config FILE MOCK_URL USAGE_YAML (the gateway of basic.sh plus a
# usage block), other_load, smoke_200, run_anomalies, AWK_MEDIAN and machine_rows: bench/lib.sh.
bench_init llmproxy-usage llmproxy-usage-failed

# The binaries are copied first: a rebuild of build/ during the run (the machine is shared) must not
# change what the later phases run.
BIN=$work/bin
copy_binaries "$BIN" llmproxy llmproxy-mock llmproxy-loadgen
bin_built="$(date -u -r build/llmproxy '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$BIN/llmproxy" | cut -c1-12)"

# thread_ticks PID: "TID TICKS" for every thread of a process (utime + stime).
thread_ticks() {
  local t
  for t in /proc/"$1"/task/*; do
    printf '%s %s\n' "${t##*/}" "$(sed 's/^.*) //' "$t/stat" 2>/dev/null | awk '{print $12 + $13}')"
  done
}
# busiest_thread BEFORE AFTER: CPU seconds of the busiest thread between two thread_ticks (the
# worker: it serves every request) and of all the others (usage writer, sink, main, ...).
busiest_thread() {
  awk -v hz="$(getconf CLK_TCK)" 'NR == FNR { a[$1] = $2; next }
    { d = $2 - a[$1]; tot += d; if (d > mx) mx = d }
    END { printf "%.3f %.3f\n", mx / hz, (tot - mx) / hz }' "$1" "$2"
}

tools() {  # tools MAX_SECONDS SUBCOMMAND ARGS...
  local max=$1
  shift
  taskset -c "$CPU_LOAD" timeout --kill-after=5 "$max" node "$TOOLS" "$@"
}

# start_receiver NAME PORT: a webhook receiver on CPU 1; sets rc_pid, rc_url, rc_up_ms.
start_receiver() {
  start_server rc_url rc_pid "$work/$1.log" "$CPU_LOAD" node "$TOOLS" receiver --port "$2" || exit 1
  rc_up_ms=$(grep -o 'listening on http://[0-9.:]* at [0-9]*' "$work/$1.log" | head -n1 | awk '{print $NF}')
}

# start_gateway NAME CONFIG: on CPU 0; sets gw_pid, gw_url.
start_gateway() {
  start_server gw_url gw_pid "$work/gw-$1.log" "$CPU_GATEWAY" "$BIN/llmproxy" --config "$2" || exit 1
}

# How busy the machine is before anything starts (other work is not pinned away from our CPUs).
busy_before=$(other_load "$CPU_GATEWAY" "$CPU_LOAD")
note "before the run, other processes kept busy: $busy_before"

# --- start the mock, the receiver of (a) and the three gateways --------------------------------
start_server mock_url mock_pid "$work/mock.log" "$CPU_LOAD" "$BIN/llmproxy-mock" --listen 127.0.0.1:0 --threads 1 --quiet || exit 1

start_receiver recv-a 0
recv_pid=$rc_pid
recv_url=$rc_url

gateway_config "$work/off.yaml" "$mock_url" "usage:
  enabled: false"
gateway_config "$work/log.yaml" "$mock_url" "usage:
  enabled: true
  durability: disk
  log_path: \"$work/log.db\""
gateway_config "$work/hook.yaml" "$mock_url" "usage:
  enabled: true
  durability: disk
  log_path: \"$work/hook.db\"
usage_hook:
  enabled: true
  url: \"$recv_url/usage\"
  batch_size: $HOOK_BATCH
  batch_interval: 200ms"
declare -A GW_PID GW_URL
for c in "${CONFIGS[@]}"; do
  start_gateway "$c" "$work/$c.yaml"
  GW_PID[$c]=$gw_pid
  GW_URL[$c]=$gw_url
  smoke_200 "$gw_url"
done
note "mock $mock_url, receiver $recv_url (CPU $CPU_LOAD); gateways off ${GW_URL[off]}," \
  "log ${GW_URL[log]}, hook ${GW_URL[hook]} (CPU $CPU_GATEWAY)"

rm -rf "$RAW"
mkdir -p "$RAW"

# --- (a) + (c): one load run against one configuration --------------------------------------------
run_one() {  # run_one SCENARIO CONFIG RUN
  local scenario=$1 c=$2 run=$3 url pid args file g0 g1 m0 m1 r0 r1 t0 t1 wpid
  url=${GW_URL[$c]}
  pid=${GW_PID[$c]}
  if [ "$scenario" = nonstream ]; then
    args=(--mode nonstream --concurrency "$NS_CONCURRENCY" --duration "${NS_DURATION_S}s")
  else
    args=(--mode stream --concurrency "$ST_CONCURRENCY" --duration "${ST_DURATION_S}s" "${STREAM_HEADERS[@]}")
  fi
  file=$RAW/$scenario-$c-$run.json
  tools 20 settle "$url" --timeout-ms 10000 >"$work/pre.json" || die "$c: usage not settled before $scenario run $run: $(cat "$work/pre.json")"
  # Started directly (not through the tools function, which would fork a subshell): $! is then
  # the process that receives the SIGTERM (timeout, which forwards it to node).
  # A poller that prints nothing within 20 s is started once more (seen twice in 2026-11 runs, with
  # an empty stderr and /metrics answering curl in 15 ms meanwhile; cause not found).
  for attempt in 1 2; do
    taskset -c "$CPU_LOAD" timeout --kill-after=5 120 node "$TOOLS" watch "$url" --interval-ms 100 \
      </dev/null >"$work/watch.json" 2>"$work/watch.err" &
    wpid=$!
    track "$wpid"
    for _ in $(seq 400); do grep -q ready "$work/watch.err" 2>/dev/null && break; sleep 0.05; done
    grep -q ready "$work/watch.err" && break
    note "the /metrics poller printed nothing in 20 s (attempt $attempt, state $(ps -o stat= -p "$wpid" 2>/dev/null | tr -d ' '), stderr: $(cat "$work/watch.err"))"
    kill "$wpid" 2>/dev/null || true
    wait "$wpid" 2>/dev/null || true
  done
  grep -q ready "$work/watch.err" || die "the /metrics poller did not start: $(cat "$work/watch.err")"
  g0=$(cpu_s "$pid"); m0=$(cpu_s "$mock_pid"); r0=$(cpu_s "$recv_pid")
  thread_ticks "$pid" >"$work/threads0.txt"
  tc0=$(date +%s.%N)
  c00=$(cpu_busy_s "$CPU_GATEWAY"); c10=$(cpu_busy_s "$CPU_LOAD"); i00=$(cpu_irq_s "$CPU_GATEWAY"); i10=$(cpu_irq_s "$CPU_LOAD")
  t0=$(date +%s.%N)
  if ! loadgen 90 --url "$url/v1/chat/completions" "${args[@]}" --warmup "${WARMUP_S}s" --timeout 20s \
    --json >"$work/run.json" 2>"$work/run.txt"; then
    cat "$work/run.txt" >&2
    die "loadgen failed or timed out: $scenario $c run $run"
  fi
  t1=$(date +%s.%N)
  g1=$(cpu_s "$pid"); m1=$(cpu_s "$mock_pid"); r1=$(cpu_s "$recv_pid")
  c01=$(cpu_busy_s "$CPU_GATEWAY"); c11=$(cpu_busy_s "$CPU_LOAD"); i01=$(cpu_irq_s "$CPU_GATEWAY"); i11=$(cpu_irq_s "$CPU_LOAD")
  tc1=$(date +%s.%N)
  thread_ticks "$pid" >"$work/threads1.txt"
  read -r worker_s others_s < <(busiest_thread "$work/threads0.txt" "$work/threads1.txt")
  stop_pid "$wpid" "the /metrics poller"
  # Everything served in this run committed (and delivered, for hook): counters are compared then.
  tools 20 settle "$url" --timeout-ms 10000 >"$work/post.json" ||
    note "$c: usage queue or sink backlog not 0 within 10 s after $scenario run $run: $(cat "$work/post.json")"
  kill -0 "$pid" 2>/dev/null || die "the $c gateway exited during $scenario run $run"
  kill -0 "$mock_pid" 2>/dev/null || die "the mock exited during $scenario run $run"
  sed 's/}$//' "$work/run.json" | tr -d '\n' >"$file"
  awk -v s="$scenario" -v c="$c" -v r="$run" -v w0="$t0" -v w1="$t1" -v g0="$g0" -v g1="$g1" \
    -v m0="$m0" -v m1="$m1" -v r0="$r0" -v r1="$r1" -v wk="$worker_s" -v ot="$others_s" -v c00="$c00" -v c01="$c01" -v c10="$c10" -v c11="$c11" -v i00="$i00" -v i01="$i01" -v i10="$i10" -v i11="$i11" -v tc0="$tc0" -v tc1="$tc1" -v wcpu="$(jnum "$work/watch.json" cpu_s)" \
    -v maxq="$(jnum "$work/watch.json" max_queue_depth)" -v maxb="$(jnum "$work/watch.json" max_sink_backlog)" \
    -v samples="$(jnum "$work/watch.json" samples)" -v settled="$(grep -q '"settled":true' "$work/post.json" && echo true || echo false)" \
    -v a_req="$(jnum "$work/pre.json" requests)" -v b_req="$(jnum "$work/post.json" requests)" \
    -v a_rec="$(jnum "$work/pre.json" log_records)" -v b_rec="$(jnum "$work/post.json" log_records)" \
    -v a_com="$(jnum "$work/pre.json" log_commits)" -v b_com="$(jnum "$work/post.json" log_commits)" \
    -v a_ok="$(jnum "$work/pre.json" webhook_success)" -v b_ok="$(jnum "$work/post.json" webhook_success)" \
    -v a_fail="$(jnum "$work/pre.json" webhook_failure)" -v b_fail="$(jnum "$work/post.json" webhook_failure)" \
    -v a_be="$(jnum "$work/pre.json" records_backend)" -v b_be="$(jnum "$work/post.json" records_backend)" \
    -v a_es="$(jnum "$work/pre.json" records_estimated)" -v b_es="$(jnum "$work/post.json" records_estimated)" \
    -v a_dr="$(jnum "$work/pre.json" records_dropped)" -v b_dr="$(jnum "$work/post.json" records_dropped)" \
    -v a_rj="$(jnum "$work/pre.json" backlog_rejected)" -v b_rj="$(jnum "$work/post.json" backlog_rejected)" 'BEGIN {
      printf ",\"scenario\":\"%s\",\"config\":\"%s\",\"run\":%d,\"wall_s\":%.3f,\"gateway_cpu_s\":%.3f,\"worker_thread_cpu_s\":%s,\"other_threads_cpu_s\":%s,\"mock_cpu_s\":%.3f,\"receiver_cpu_s\":%.3f,\"poller_cpu_s\":%s,", s, c, r, w1 - w0, g1 - g0, wk, ot, m1 - m0, r1 - r0, wcpu
      printf "\"cpu_gateway_busy_s\":%.3f,\"cpu_load_busy_s\":%.3f,\"cpu_gateway_irq_s\":%.3f,\"cpu_load_irq_s\":%.3f,\"cpu_wall_s\":%.3f,", c01 - c00, c11 - c10, i01 - i00, i11 - i10, tc1 - tc0
      printf "\"max_queue_depth\":%s,\"max_sink_backlog\":%s,\"metric_samples\":%s,\"settled\":%s,", maxq, maxb, samples, settled
      printf "\"d_requests_total\":%d,\"d_log_records\":%d,\"d_log_commits\":%d,\"d_webhook_success\":%d,\"d_webhook_failure\":%d,", b_req - a_req, b_rec - a_rec, b_com - a_com, b_ok - a_ok, b_fail - a_fail
      printf "\"d_records_backend\":%d,\"d_records_estimated\":%d,\"d_records_dropped\":%d,\"d_backlog_rejected\":%d}\n", b_be - a_be, b_es - a_es, b_dr - a_dr, b_rj - a_rj
    }' >>"$file"
  sed -n '1,2p' "$work/run.txt" | sed "s/^/  [$scenario $c $run] /" >&2
}

# foreign_pct FILE: how busy other processes kept CPU 0 or CPU 1 (the larger) during a run, in % of
# the run's wall time: CPU 0 busy beyond the gateway, CPU 1 busy beyond the mock, the load generator,
# the receiver and the poller.
foreign_pct() {
  awk -v a="$(jnum "$1" cpu_gateway_busy_s)" -v g="$(jnum "$1" gateway_cpu_s)" -v w="$(jnum "$1" cpu_wall_s)" \
    -v b="$(jnum "$1" cpu_load_busy_s)" -v m="$(jnum "$1" mock_cpu_s)" -v l="$(jnum "$1" loadgen_cpu_s)" \
    -v rc="$(jnum "$1" receiver_cpu_s)" -v pc="$(jnum "$1" poller_cpu_s)" \
    'BEGIN { x = 100 * (a - g) / w; y = 100 * (b - m - l - rc - pc) / w; if (y > x) x = y; printf "%.0f\n", x < 0 ? 0 : x }'
}

for run in $(seq "$RUNS"); do
  k=$(((run - 1) % 3))
  order=("${CONFIGS[@]:$k}" "${CONFIGS[@]:0:$k}")
  # Non-stream throughput needs CPU 0 to itself: when other work took more than FOREIGN_MAX % of it
  # in any of the three runs, the three are done again (at most NS_ATTEMPTS times in all; the last
  # attempt is kept and the tables say how many it took). Streams are not repeated: their rate is
  # set by the mock's delays.
  for attempt in $(seq "$NS_ATTEMPTS"); do
    for c in "${order[@]}"; do run_one nonstream "$c" "$run"; done
    worst=0
    for c in "${CONFIGS[@]}"; do
      x=$(foreign_pct "$RAW/nonstream-$c-$run.json")
      [ "$x" -gt "$worst" ] && worst=$x
    done
    for c in "${CONFIGS[@]}"; do
      sed -i "s/}\$/,\"attempt\":$attempt,\"run_foreign_cpu0_pct\":$worst}/" "$RAW/nonstream-$c-$run.json"
    done
    [ "$worst" -le "$FOREIGN_MAX" ] && break
    [ "$attempt" -lt "$NS_ATTEMPTS" ] && note "run $run: other processes took up to $worst % of a CPU; non-stream runs again"
  done
  for c in "${order[@]}"; do run_one stream "$c" "$run"; done
done

# The gateways of (a) are stopped before (b): the drain gateway then has CPU 0 to itself.
for c in "${CONFIGS[@]}"; do stop_pid "${GW_PID[$c]}" "gateway $c"; done
stop_pid "$recv_pid" "receiver"
for c in "${CONFIGS[@]}"; do
  grep -h '"level":"\(error\|warn\)"' "$work/gw-$c.log" | head -n 5 | sed "s/^/gateway $c: /" >"$work/warn-$c.txt" || true
  grep -h 'usage pipeline stopped' "$work/gw-$c.log" | sed "s/^/gateway $c: /" >"$work/stop-$c.txt" || true
done
tail -n1 "$work/recv-a.log" >"$RAW/receiver-a.json"

# --- (b): drain a backlog -------------------------------------------------------------------------
drain_one() {  # drain_one BATCH N RUN
  local batch=$1 n=$2 run=$3 port name file logged g0 g1 r_pid r_up stop_line
  name=drain-b$batch-$run
  file=$RAW/$name.json
  # A free port for the receiver: take one (port 0), release it, give it to the gateway's config.
  start_receiver "$name-probe" 0
  port=${rc_url##*:}
  stop_pid "$rc_pid" "receiver probe"
  gateway_config "$work/$name.yaml" "$mock_url" "usage:
  enabled: true
  durability: disk
  log_path: \"$work/$name.db\"
usage_hook:
  enabled: true
  url: \"http://127.0.0.1:$port/usage\"
  batch_size: $batch
  batch_interval: 200ms
  timeout: 1s
  retry: 2
  max_backoff: 200ms"
  start_gateway "$name" "$work/$name.yaml"
  if ! loadgen 180 --url "$gw_url/v1/chat/completions" --mode nonstream --concurrency "$DRAIN_CONCURRENCY" \
    --requests "$n" --timeout 20s --json >"$work/$name-load.json" 2>"$work/$name-load.txt"; then
    cat "$work/$name-load.txt" >&2
    die "loadgen failed or timed out: $name"
  fi
  sed -n '1,2p' "$work/$name-load.txt" | sed "s/^/  [$name] /" >&2
  tools 40 settle "$gw_url" --queue-only --timeout-ms 30000 >"$work/$name-before.json" ||
    die "$name: usage queue not empty 30 s after the load: $(cat "$work/$name-before.json")"
  logged=$(jnum "$work/$name-before.json" log_records)
  g0=$(cpu_s "$gw_pid")
  thread_ticks "$gw_pid" >"$work/threads0.txt"
  start_receiver "$name" "$port"
  r_pid=$rc_pid
  r_up=$rc_up_ms
  if ! tools $((DRAIN_TIMEOUT_S + 10)) settle "$gw_url" --expect-success "$logged" --since "$r_up" \
    --timeout-ms $((DRAIN_TIMEOUT_S * 1000)) >"$work/$name-after.json"; then
    note "$name: backlog not drained within $DRAIN_TIMEOUT_S s: $(cat "$work/$name-after.json")"
  fi
  g1=$(cpu_s "$gw_pid")
  thread_ticks "$gw_pid" >"$work/threads1.txt"
  read -r busiest_s others_s < <(busiest_thread "$work/threads0.txt" "$work/threads1.txt")
  stop_pid "$gw_pid" "gateway $name"
  stop_pid "$r_pid" "receiver $name"
  stop_line=$(grep -o 'usage pipeline stopped[^"]*' "$work/gw-$name.log" | head -n1 || true)
  grep -h '"level":"\(error\|warn\)"' "$work/gw-$name.log" | grep -v 'POST of .* failed: \|delivering again' |
    head -n 5 | sed "s/^/gateway $name: /" >>"$work/warn-drain.txt" || true
  tail -n1 "$work/$name.log" >"$work/$name-recv.json"
  awk -v b="$batch" -v n="$n" -v r="$run" -v logged="$logged" -v g0="$g0" -v g1="$g1" \
    -v sent="$(jnum "$work/$name-load.json" requests)" -v errors="$(jnum "$work/$name-load.json" errors)" \
    -v load_s="$(jnum "$work/$name-load.json" duration_s)" \
    -v backlog0="$(jnum "$work/$name-before.json" sink_backlog)" -v ok0="$(jnum "$work/$name-before.json" webhook_success)" \
    -v fail0="$(jnum "$work/$name-before.json" webhook_failure)" \
    -v settled="$(grep -q '"settled":true' "$work/$name-after.json" && echo true || echo false)" \
    -v elapsed="$(jnum "$work/$name-after.json" elapsed_ms)" -v ok1="$(jnum "$work/$name-after.json" webhook_success)" \
    -v backlog1="$(jnum "$work/$name-after.json" sink_backlog)" -v polls="$(jnum "$work/$name-after.json" polls)" \
    -v rposts="$(jnum "$work/$name-recv.json" posts)" -v rrec="$(jnum "$work/$name-recv.json" records)" \
    -v runiq="$(jnum "$work/$name-recv.json" unique)" -v rdup="$(jnum "$work/$name-recv.json" duplicates)" \
    -v rbad="$(jnum "$work/$name-recv.json" bad_bodies)" -v rbytes="$(jnum "$work/$name-recv.json" bytes)" \
    -v rfirst="$(jnum "$work/$name-recv.json" first_post_ms)" -v rlast="$(jnum "$work/$name-recv.json" last_post_ms)" \
    -v rcpu="$(jnum "$work/$name-recv.json" cpu_s)" -v rcpu0="$(jnum "$work/$name-recv.json" cpu_at_first_post_s)" \
    -v bs="$busiest_s" -v os="$others_s" -v rup="$r_up" -v stopl="$stop_line" 'BEGIN {
      printf "{\"batch_size\":%d,\"run\":%d,\"requests_asked\":%d,\"requests_ok\":%s,\"load_errors\":%s,\"load_s\":%s,", b, r, n, sent, errors, load_s
      printf "\"logged\":%s,\"backlog_before\":%s,\"success_before\":%s,\"failed_records_before\":%s,", logged, backlog0, ok0, fail0
      printf "\"drained\":%s,\"drain_ms\":%s,\"polls\":%s,\"success_after\":%s,\"backlog_after\":%s,", settled, elapsed, polls, ok1, backlog1
      printf "\"gateway_cpu_s\":%.3f,\"receiver_up_ms\":%s,\"recv_posts\":%s,\"recv_records\":%s,\"recv_unique\":%s,", g1 - g0, rup, rposts, rrec, runiq
      printf "\"recv_duplicates\":%s,\"recv_bad_bodies\":%s,\"recv_bytes\":%s,\"recv_first_post_ms\":%s,\"recv_last_post_ms\":%s,\"receiver_cpu_s\":%s,\"receiver_cpu_at_first_post_s\":%s,", rdup, rbad, rbytes, rfirst, rlast, rcpu, rcpu0
      printf "\"busiest_thread_cpu_s\":%s,\"other_threads_cpu_s\":%s,", bs, os
      gsub(/"/, "\\\"", stopl)
      printf "\"gateway_stop_line\":\"%s\"}\n", stopl
    }' >"$file"
  rm -f "$work/$name.db" "$work/$name.db-wal" "$work/$name.db-shm"
  echo "  [$name] $(jnum "$file" logged) records logged; drained: $(grep -o '"drained":[a-z]*' "$file" | cut -d: -f2)" \
    "in $(jnum "$file" drain_ms) ms; receiver got $(jnum "$file" recv_records) in $(jnum "$file" recv_posts) POSTs" >&2
}

: >"$work/warn-drain.txt"
for run in $(seq "$RUNS"); do
  if [ $((run % 2)) -eq 1 ]; then batches=("$HOOK_BATCH" 1); else batches=(1 "$HOOK_BATCH"); fi
  for b in "${batches[@]}"; do
    if [ "$b" = 1 ]; then drain_one 1 "$DRAIN_N1" "$run"; else drain_one "$b" "$DRAIN_N" "$run"; fi
  done
done

# --- tables ------------------------------------------------------------------------------------
# AWK_MEDIAN (bench/lib.sh: median, f, ratio, busy) and two formats of pairs.
AWK_MEDIAN=$AWK_MEDIAN'
function fp(a, b) { return f(a, 0) " / " f(b, 0) }
function fa(a, b) { return f(a, 0) " (" f(b, 0) ")" }
'

# One TSV line per run of a scenario: for each config (off, log, hook) the same 15 columns, then the
# attempt and the contention of the run.
collect() {  # collect SCENARIO
  local run c g
  for run in $(seq "$RUNS"); do
    printf '%s' "$run"
    for c in "${CONFIGS[@]}"; do
      g=$RAW/$1-$c-$run.json
      printf '\t%s' "$(jnum "$g" rps)" "$(jnum "$g" requests)" "$(jnum "$g" warmup_requests)" \
        "$(jnum "$g" gateway_cpu_s)" "$(jnum "$g" wall_s)" \
        "$(awk -v a="$(jnum "$g" mock_cpu_s)" -v b="$(jnum "$g" loadgen_cpu_s)" -v c="$(jnum "$g" receiver_cpu_s)" \
          -v d="$(jnum "$g" poller_cpu_s)" 'BEGIN { print a + b + c + d }')" \
        "$(jnum "$g" errors)" "$(jnum "$g" latency_ms p50)" "$(jnum "$g" ttft_ms p50)" \
        "$(jnum "$g" other_threads_cpu_s)" \
        "$(awk -v a="$(jnum "$g" cpu_gateway_busy_s)" -v b="$(jnum "$g" gateway_cpu_s)" 'BEGIN { x = a - b; print x < 0 ? 0 : x }')" \
        "$(awk -v a="$(jnum "$g" cpu_load_busy_s)" -v m="$(jnum "$g" mock_cpu_s)" -v l="$(jnum "$g" loadgen_cpu_s)" \
          -v rc="$(jnum "$g" receiver_cpu_s)" -v pc="$(jnum "$g" poller_cpu_s)" 'BEGIN { x = a - m - l - rc - pc; print x < 0 ? 0 : x }')" \
        "$(awk -v a="$(jnum "$g" cpu_gateway_busy_s)" -v b="$(jnum "$g" cpu_gateway_irq_s)" 'BEGIN { print a + b }')" \
        "$(awk -v a="$(jnum "$g" cpu_load_busy_s)" -v b="$(jnum "$g" cpu_load_irq_s)" 'BEGIN { print a + b }')" \
        "$(jnum "$g" cpu_wall_s)"
    done
    printf '\t%s\t%s\n' "$(jnum "$RAW/$1-off-$run.json" attempt)" "$(jnum "$RAW/$1-off-$run.json" run_foreign_cpu0_pct)"
  done
}

throughput_table() {  # throughput_table SCENARIO UNIT
  collect "$1" | awk -F'\t' -v runs="$RUNS" -v unit="$2" -v fmax="$FOREIGN_MAX" "$AWK_MEDIAN"'
  # The median over the runs where other processes took at most fmax % of CPU 0 (non-stream).
  function cmedian(name,   n, i, j, v, t) {
    n = 0
    for (i = 1; i <= runs; i++) if (r[i, "clean"] && r[i, name] != "" && r[i, name] != "null") v[++n] = r[i, name] + 0
    if (n == 0) return "-"
    for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  {
    i = $1
    r[i, "att"] = $(NF - 1); r[i, "rf"] = $NF; r[i, "clean"] = $NF != "null" && $NF + 0 <= fmax + 0
    if (r[i, "clean"]) nclean++
    for (k = 0; k < 3; k++) {
      o = 2 + 15 * k; c = k == 0 ? "off" : k == 1 ? "log" : "hook"
      r[i, c "rps"] = $(o); r[i, c "cpu"] = ($(o+1) + $(o+2) > 0) ? 1e6 * $(o+3) / ($(o+1) + $(o+2)) : "null"
      r[i, c "oth"] = ($(o+1) + $(o+2) > 0) ? 1e6 * $(o+9) / ($(o+1) + $(o+2)) : "null"
      r[i, c "foreign0"] = busy($(o+10), $(o+14)); r[i, c "foreign1"] = busy($(o+11), $(o+14))
      r[i, c "all0"] = busy($(o+12), $(o+14)); r[i, c "all1"] = busy($(o+13), $(o+14))
      r[i, c "busy0"] = busy($(o+3), $(o+14)); r[i, c "busy1"] = busy($(o+5), $(o+14)); r[i, c "err"] = $(o+6)
      r[i, c "lat"] = unit == "req" ? $(o+7) : $(o+8)
    }
    r[i, "rlog"] = ratio(r[i, "logrps"], r[i, "offrps"]); r[i, "rhook"] = ratio(r[i, "hookrps"], r[i, "offrps"])
    r[i, "dlog"] = r[i, "logcpu"] - r[i, "offcpu"]; r[i, "dhook"] = r[i, "hookcpu"] - r[i, "offcpu"]
  }
  END {
    lat = unit == "req" ? "latency p50 ms" : "TTFT p50 ms"
    print "| run | off " unit "/s | log " unit "/s | hook " unit "/s | **log/off** | **hook/off** | gateway CPU µs/" unit " off / log / hook | added CPU µs/" unit " log / hook | of which outside the worker thread µs/" unit " off / log / hook | " lat " off / log / hook | CPU 0 busy in all (the gateway) off; log; hook | other processes on CPU 0 / CPU 1 off; log; hook | CPU 1 busy in all (the load side) off; log; hook | errors |"
    print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= runs; i++)
      printf "| %s | %s | %s | %s | **%s** | **%s** | %s / %s / %s | %s / %s | %s / %s / %s | %s / %s / %s | %s %% | %s %% | %s %% | %s / %s / %s |\n",
        i (r[i, "att"] != "null" && r[i, "att"] > 1 ? " (attempt " r[i, "att"] ")" : "") (r[i, "rf"] != "null" && !r[i, "clean"] ? " (contended)" : ""),
        f(r[i,"offrps"], 1), f(r[i,"logrps"], 1), f(r[i,"hookrps"], 1), f(r[i,"rlog"], 3), f(r[i,"rhook"], 3),
        f(r[i,"offcpu"], 1), f(r[i,"logcpu"], 1), f(r[i,"hookcpu"], 1), f(r[i,"dlog"], 1), f(r[i,"dhook"], 1),
        f(r[i,"offoth"], 1), f(r[i,"logoth"], 1), f(r[i,"hookoth"], 1),
        f(r[i,"offlat"], 2), f(r[i,"loglat"], 2), f(r[i,"hooklat"], 2),
        fa(r[i,"offall0"], r[i,"offbusy0"]) "; " fa(r[i,"logall0"], r[i,"logbusy0"]) "; " fa(r[i,"hookall0"], r[i,"hookbusy0"]),
        fp(r[i,"offforeign0"], r[i,"offforeign1"]) "; " fp(r[i,"logforeign0"], r[i,"logforeign1"]) "; " fp(r[i,"hookforeign0"], r[i,"hookforeign1"]),
        fa(r[i,"offall1"], r[i,"offbusy1"]) "; " fa(r[i,"logall1"], r[i,"logbusy1"]) "; " fa(r[i,"hookall1"], r[i,"hookbusy1"]), r[i,"offerr"], r[i,"logerr"], r[i,"hookerr"]
    printf "| **median** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s / %s / %s** | **%s / %s** | %s / %s / %s | %s / %s / %s | %s %% | %s %% | %s %% | |\n",
      f(median("offrps"), 1), f(median("logrps"), 1), f(median("hookrps"), 1), f(median("rlog"), 3), f(median("rhook"), 3),
      f(median("offcpu"), 1), f(median("logcpu"), 1), f(median("hookcpu"), 1), f(median("dlog"), 1), f(median("dhook"), 1),
      f(median("offoth"), 1), f(median("logoth"), 1), f(median("hookoth"), 1),
      f(median("offlat"), 2), f(median("loglat"), 2), f(median("hooklat"), 2),
      fa(median("offall0"), median("offbusy0")) "; " fa(median("logall0"), median("logbusy0")) "; " fa(median("hookall0"), median("hookbusy0")),
      fp(median("offforeign0"), median("offforeign1")) "; " fp(median("logforeign0"), median("logforeign1")) "; " fp(median("hookforeign0"), median("hookforeign1")),
      fa(median("offall1"), median("offbusy1")) "; " fa(median("logall1"), median("logbusy1")) "; " fa(median("hookall1"), median("hookbusy1"))
    if (unit == "req")
      printf "| **median of the %d uncontended runs** | **%s** | **%s** | **%s** | **%s** | **%s** | **%s / %s / %s** | **%s / %s** | %s / %s / %s | %s / %s / %s | %s %% | %s %% | %s %% | |\n", nclean,
        f(cmedian("offrps"), 1), f(cmedian("logrps"), 1), f(cmedian("hookrps"), 1), f(cmedian("rlog"), 3), f(cmedian("rhook"), 3),
        f(cmedian("offcpu"), 1), f(cmedian("logcpu"), 1), f(cmedian("hookcpu"), 1), f(cmedian("dlog"), 1), f(cmedian("dhook"), 1),
        f(cmedian("offoth"), 1), f(cmedian("logoth"), 1), f(cmedian("hookoth"), 1),
        f(cmedian("offlat"), 2), f(cmedian("loglat"), 2), f(cmedian("hooklat"), 2),
        fa(cmedian("offall0"), cmedian("offbusy0")) "; " fa(cmedian("logall0"), cmedian("logbusy0")) "; " fa(cmedian("hookall0"), cmedian("hookbusy0")),
        fp(cmedian("offforeign0"), cmedian("offforeign1")) "; " fp(cmedian("logforeign0"), cmedian("logforeign1")) "; " fp(cmedian("hookforeign0"), cmedian("hookforeign1")),
        fa(cmedian("offall1"), cmedian("offbusy1")) "; " fa(cmedian("logall1"), cmedian("logbusy1")) "; " fa(cmedian("hookall1"), cmedian("hookbusy1"))
  }'
}

# (c): one row per scenario, config and run where metering is on.
log_table() {
  local scenario c run g
  echo "| scenario | config | run | requests served (gateway) | sent by loadgen (measured + warmup) | records committed | committed = served | commits | records / commit | max queue depth | max sink backlog | delivered to the webhook | records with backend usage / estimated |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  for scenario in nonstream stream; do
    for c in log hook; do
      for run in $(seq "$RUNS"); do
        g=$RAW/$scenario-$c-$run.json
        awk -v s="$scenario" -v c="$c" -v r="$run" -v served="$(jnum "$g" d_requests_total)" \
          -v sent="$(awk -v a="$(jnum "$g" requests)" -v b="$(jnum "$g" warmup_requests)" 'BEGIN { print a + b }')" \
          -v rec="$(jnum "$g" d_log_records)" -v com="$(jnum "$g" d_log_commits)" -v q="$(jnum "$g" max_queue_depth)" \
          -v bl="$(jnum "$g" max_sink_backlog)" -v ok="$(jnum "$g" d_webhook_success)" \
          -v be="$(jnum "$g" d_records_backend)" -v es="$(jnum "$g" d_records_estimated)" 'BEGIN {
            same = rec == served ? "yes" : "**NO**"
            rpc = com > 0 ? sprintf("%.1f", rec / com) : "-"
            blt = c == "hook" ? bl : "-"
            okt = c == "hook" ? (ok == rec ? ok : "**" ok "**") : "-"
            printf "| %s | %s | %d | %d | %d | %d | %s | %d | %s | %d | %s | %s | %d / %d |\n", s, c, r, served, sent, rec,
              same, com, rpc, q, blt, okt, be, es
          }'
      done
    done
  done
}

log_summary() {  # medians of records/commit and max queue depth per scenario and config
  local scenario c run g
  echo "| scenario | config | median records / commit | median commits / s | largest queue depth seen (all runs) |"
  echo "|---|---|---|---|---|"
  for scenario in nonstream stream; do
    for c in log hook; do
      for run in $(seq "$RUNS"); do
        g=$RAW/$scenario-$c-$run.json
        printf '%s\t%s\t%s\t%s\n' "$run" "$(jnum "$g" d_log_records)" "$(jnum "$g" d_log_commits)" "$(jnum "$g" max_queue_depth)" \
          | sed "s/\$/\t$(jnum "$g" wall_s)/"
      done | awk -F'\t' -v runs="$RUNS" -v s="$scenario" -v c="$c" "$AWK_MEDIAN"'
        { i = $1; r[i, "rpc"] = $3 > 0 ? $2 / $3 : "null"; r[i, "cps"] = $5 > 0 ? $3 / $5 : "null"; if ($4 > mq) mq = $4 }
        END { printf "| %s | %s | %s | %s | %d |\n", s, c, f(median("rpc"), 1), f(median("cps"), 0), mq }'
    done
  done
}

drain_table() {
  local run b g
  echo "| batch_size | run | records logged (= requests) | backlog before | drain s (receiver up -> backlog 0, 100 ms polls) | **records/s** | receiver first -> last POST s | records/s (receiver side) | POSTs | gateway CPU µs/record | CPU 0 busy (gateway, over the drain) | CPU 1 busy (receiver, first -> last POST) | duplicates / bad bodies at the receiver |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  for b in "$HOOK_BATCH" 1; do
    for run in $(seq "$RUNS"); do
      g=$RAW/drain-b$b-$run.json
      printf '%s\t' "$run" "$(jnum "$g" logged)" "$(jnum "$g" backlog_before)" "$(jnum "$g" drain_ms)" \
        "$(jnum "$g" recv_first_post_ms)" "$(jnum "$g" recv_last_post_ms)" "$(jnum "$g" recv_posts)" \
        "$(jnum "$g" gateway_cpu_s)" "$(jnum "$g" receiver_cpu_s)" "$(jnum "$g" recv_duplicates)" \
        "$(jnum "$g" recv_bad_bodies)" "$(grep -q '"drained":true' "$g" && echo 1 || echo 0)" "$(jnum "$g" recv_records)" \
        "$(jnum "$g" receiver_cpu_at_first_post_s)"
      printf '\n'
    done | awk -F'\t' -v runs="$RUNS" -v b="$b" "$AWK_MEDIAN"'
      {
        i = $1; r[i, "n"] = $2; r[i, "bl"] = $3; r[i, "ok"] = $12
        r[i, "ds"] = $12 ? $4 / 1000 : "null"; r[i, "rate"] = $12 && $4 > 0 ? $2 / ($4 / 1000) : "null"
        r[i, "rs"] = ($6 - $5) / 1000; r[i, "rrate"] = $6 > $5 ? $13 / (($6 - $5) / 1000) : "null"
        r[i, "posts"] = $7; r[i, "cpu"] = $2 > 0 ? 1e6 * $8 / $2 : "null"
        r[i, "rbusy"] = $6 > $5 && $14 != "null" ? 100 * ($9 - $14) / (($6 - $5) / 1000) : "null"
        r[i, "gbusy"] = $12 && $4 > 0 ? 100 * $8 / ($4 / 1000) : "null"; r[i, "dup"] = $10; r[i, "bad"] = $11
      }
      END {
        for (i = 1; i <= runs; i++)
          printf "| %d | %d | %d | %d | %s | **%s** | %s | %s | %d | %s | %s %% | %s %% | %d / %d |\n", b, i, r[i,"n"], r[i,"bl"],
            r[i,"ok"] ? f(r[i,"ds"], 2) : "**not drained**", f(r[i,"rate"], 0), f(r[i,"rs"], 2), f(r[i,"rrate"], 0),
            r[i,"posts"], f(r[i,"cpu"], 1), f(r[i,"gbusy"], 0), f(r[i,"rbusy"], 0), r[i,"dup"], r[i,"bad"]
        printf "| %d | **median** | | | **%s** | **%s** | %s | **%s** | | **%s** | %s %% | %s %% | |\n", b, f(median("ds"), 2),
          f(median("rate"), 0), f(median("rs"), 2), f(median("rrate"), 0), f(median("cpu"), 1), f(median("gbusy"), 0), f(median("rbusy"), 0)
      }'
  done
}

anomalies() {
  local file
  for file in "$RAW"/nonstream-*.json "$RAW"/stream-*.json; do
    run_anomalies "$file"
    grep -q '"settled":true' "$file" || echo "- $(basename "$file"): usage queue / sink backlog not 0 within 10 s after the run"
    if grep -q '"mode":"nonstream"' "$file" && [ "$(foreign_pct "$file")" -gt "$FOREIGN_MAX" ]; then
      echo "- $(basename "$file"): other processes kept a CPU $(foreign_pct "$file") % busy (after $(jnum "$file" attempt) attempts): its throughput is not comparable"
    fi
    if ! grep -q '"config":"off"' "$file"; then
      [ "$(jnum "$file" d_log_records)" = "$(jnum "$file" d_requests_total)" ] ||
        echo "- $(basename "$file"): $(jnum "$file" d_log_records) records committed for $(jnum "$file" d_requests_total) requests served"
      [ "$(jnum "$file" d_records_dropped)" = 0 ] || echo "- $(basename "$file"): $(jnum "$file" d_records_dropped) records dropped"
      [ "$(jnum "$file" d_backlog_rejected)" = 0 ] || echo "- $(basename "$file"): $(jnum "$file" d_backlog_rejected) requests rejected for backlog"
      [ "$(jnum "$file" d_records_estimated)" = 0 ] || echo "- $(basename "$file"): $(jnum "$file" d_records_estimated) records with estimated usage (the mock reports usage)"
    fi
    if grep -q '"config":"hook"' "$file"; then
      [ "$(jnum "$file" d_webhook_success)" = "$(jnum "$file" d_log_records)" ] ||
        echo "- $(basename "$file"): $(jnum "$file" d_webhook_success) delivered for $(jnum "$file" d_log_records) committed"
      [ "$(jnum "$file" d_webhook_failure)" = 0 ] || echo "- $(basename "$file"): $(jnum "$file" d_webhook_failure) records in failed webhook attempts"
    fi
  done
  for file in "$RAW"/drain-*.json; do
    grep -q '"drained":true' "$file" || echo "- $(basename "$file"): backlog not drained within $DRAIN_TIMEOUT_S s (webhook_success $(jnum "$file" success_after), backlog $(jnum "$file" backlog_after))"
    [ "$(jnum "$file" requests_ok)" = "$(jnum "$file" requests_asked)" ] && [ "$(jnum "$file" load_errors)" = 0 ] ||
      echo "- $(basename "$file"): $(jnum "$file" requests_ok) of $(jnum "$file" requests_asked) requests answered, $(jnum "$file" load_errors) errors"
    [ "$(jnum "$file" logged)" = "$(jnum "$file" requests_asked)" ] || echo "- $(basename "$file"): $(jnum "$file" logged) records logged for $(jnum "$file" requests_asked) requests"
    [ "$(jnum "$file" backlog_before)" = "$(jnum "$file" logged)" ] && [ "$(jnum "$file" success_before)" = 0 ] ||
      echo "- $(basename "$file"): before the receiver came up: backlog $(jnum "$file" backlog_before), delivered $(jnum "$file" success_before)"
    [ "$(jnum "$file" recv_unique)" = "$(jnum "$file" logged)" ] && [ "$(jnum "$file" recv_duplicates)" = 0 ] && [ "$(jnum "$file" recv_bad_bodies)" = 0 ] ||
      echo "- $(basename "$file"): the receiver got $(jnum "$file" recv_records) records ($(jnum "$file" recv_unique) distinct, $(jnum "$file" recv_duplicates) duplicates, $(jnum "$file" recv_bad_bodies) unparsable) for $(jnum "$file" logged) logged"
    grep -q "records logged, sink usage_hook: $(jnum "$file" logged) delivered, backlog 0" "$file" ||
      echo "- $(basename "$file"): gateway at exit: $(grep -o '"gateway_stop_line":"[^"]*"' "$file")"
  done
  file=$RAW/receiver-a.json
  [ "$(jnum "$file" duplicates)" = 0 ] && [ "$(jnum "$file" bad_bodies)" = 0 ] ||
    echo "- receiver of (a): $(cat "$file")"
  cat "$work"/warn-*.txt | sed 's/^/- log line: /'
  for c in "${CONFIGS[@]}"; do
    [ "$c" = off ] && continue
    grep -q 'usage pipeline stopped' "$work/stop-$c.txt" || echo "- gateway $c: no 'usage pipeline stopped' line at exit"
  done
}

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit + uncommitted changes"
build_type=$(grep -m1 '^CMAKE_BUILD_TYPE:' build/CMakeCache.txt 2>/dev/null | cut -d= -f2)
build_flags=$(grep -m1 "^CMAKE_CXX_FLAGS_$(tr '[:lower:]' '[:upper:]' <<<"${build_type:-RELEASE}"):" build/CMakeCache.txt 2>/dev/null | cut -d= -f2)
ns_table=$(throughput_table nonstream req)
st_table=$(throughput_table stream stream)
lg_table=$(log_table)
lg_summary=$(log_summary)
dr_table=$(drain_table)
problems=$(anomalies)
recv_a_line=$(cat "$RAW/receiver-a.json")
gw_stops=$(cat "$work"/stop-*.txt | sed 's/^/    /')

cat >"$OUT/usage.md" <<MD
# Usage metering: cost, webhook sender throughput, log group commit

Produced by \`RUNS=$RUNS bench/usage.sh\` ($RUNS runs; the three configurations interleaved in a
rotating order). Raw per-run JSON (the load generator's output plus CPU times and /metrics deltas) is
in \`bench/results/usage/\`. The receiver and the /metrics poller are \`bench/usage-tools.mjs\`
(node:http, keep-alive, no dependencies).

| machine | |
|---|---|
$(machine_rows date cpus model kernel compiler)
| build | ${build_type:-?} (${build_flags:-?}), commit $commit; build/llmproxy built $bin_built |
| versions | $("$BIN/llmproxy" --version 2>&1 | head -n1); node $(node --version); libsqlite3 $(dpkg-query -W -f='${Version}' libsqlite3-0 2>/dev/null || echo '?') (linked dynamically) |
| other load | before the run, processes other than this benchmark kept $busy_before busy (2 s sample) |
| pinning | gateway (all its threads: worker, usage log writer, sink) on CPU $CPU_GATEWAY; mock, load generator, webhook receiver and /metrics poller on CPU $CPU_LOAD |
| gateways | 1 worker, access log off, one backend (the mock, 1 thread); usage log in a temp dir (durability: disk, WAL, synchronous=NORMAL) |
| configurations | **off**: \`usage: {enabled: false}\`; **log**: metering on, SQLite log only; **hook**: metering on + \`usage_hook\` (batch_size $HOOK_BATCH, batch_interval 200ms) to a local receiver |

## (a) Throughput with metering off / on

"log/off" and "hook/off" are the ratios of throughput in the same run (the target: metering costs
under 5 %, i.e. a ratio of at least 0.95). "Gateway CPU µs" is the gateway's utime+stime (all
threads) during the run divided by the requests it served (warmup included); "added" is on minus
off in the same run; "outside the worker thread" is the CPU of every gateway thread but the busiest
one (the worker, which serves every request): the usage log writer and the sink. CPU busy = CPU
seconds over wall seconds, from /proc/stat: "in all" counts everything the CPU did, softirqs
included (with loopback traffic they are mostly the network stack working for our own processes,
and /proc/PID/stat charges them to nobody: ~25 % of CPU 1 when the load generator drives the mock
directly); "(the gateway)" on CPU 0 and "(the load side)" on CPU 1 (mock + load generator +
receiver + poller) are those processes' own utime+stime. "Other processes" is CPU 0 (CPU 1) busy in
processes beyond ours, plus hypervisor steal: other work on this shared machine, which this
script does not pin away. When CPU 0 is ~100 % busy in all, the gateway is the limit and the
throughput ratio shows the metering cost; when CPU 1 is, the load side limits.

On a shared machine, check "other processes" first: the kernel shares a contended CPU per runnable
*thread*, so a gateway with a busy usage-writer thread gets a larger share of CPU 0 against other
work than the "off" gateway with its single worker, and a contended CPU 1 slows the load side most
for the fastest configuration; under such contention the throughput ratio can even exceed 1 and
says little about the metering cost (the CPU per request is less affected, not immune).

### Non-stream chat completions

Closed loop, $NS_CONCURRENCY keep-alive connections, ${NS_DURATION_S} s after ${WARMUP_S} s of warmup, the load
generator's small default body. A run whose three measurements saw other processes take more than
$FOREIGN_MAX % of either CPU was done again, up to $NS_ATTEMPTS attempts ("attempt N"); a run still contended after that is
marked "(contended)", and the last row is the median over the uncontended runs only, the row to read.

$ns_table

### Streams

$ST_CONCURRENCY concurrent streams (closed loop) of 50 tokens, 20 ms to the first token and between tokens
(\`X-Mock-Tokens: 50\`, \`X-Mock-TTFT-Ms: 20\`, \`X-Mock-Delay-Ms: 20\`, as basic.sh), ${ST_DURATION_S} s after ${WARMUP_S} s
of warmup. Stream throughput is set by the mock's delays (50 streams / ~1.04 s each), not by the
gateway, so the ratio is ~1 by construction; the CPU per stream is the number that shows the cost.

$st_table

## (c) The durable log keeps up

/metrics polled every 100 ms during each run (\`llmproxy_usage_queue_depth\`,
\`llmproxy_usage_sink_backlog\`); counters read before the run and after it settled (queue 0, backlog
0). "Requests served" is the delta of \`llmproxy_requests_total\`; "records committed" of
\`llmproxy_usage_log_records_total\`; commits of \`llmproxy_usage_log_commits_total\`.

$lg_summary

<details><summary>Per run</summary>

$lg_table

</details>

Receiver of (a) at exit: \`$recv_a_line\`

Gateways of (a) at exit:

$gw_stops

## (b) Webhook sender: draining a backlog

A fresh gateway (empty log) whose \`usage_hook\` points at a port where nothing listens serves N
requests (closed loop, $DRAIN_CONCURRENCY connections; N = $DRAIN_N for batch_size $HOOK_BATCH, $DRAIN_N1 for batch_size 1),
so the records pile up in the log. Once the queue is committed, the receiver starts on that
port; /metrics is then polled every 100 ms until \`llmproxy_usage_sink_backlog\` is 0 and
\`llmproxy_webhook_success_total\` equals the records logged. Sink settings: \`timeout: 1s, retry: 2,
max_backoff: 200ms\`: with the default max_backoff of 30 s the first retry after the receiver comes
back could come up to 30 s later, which would measure the backoff, not the sender. "Drain s" therefore
includes up to 200 ms of backoff plus up to 100 ms of polling; "receiver first -> last POST" is the
sending itself. Target: ≥ 20,000 records/s with batch_size $HOOK_BATCH. The gateway is otherwise idle
(CPU 0); the receiver is alone on CPU 1.

$dr_table

## Anomalies

${problems:-None: no errors, every answer 200, every stream ended with \`data: [DONE]\`, every request served has its record committed, every record was delivered exactly once.}
MD

note "wrote $OUT/usage.md and $RAW/"
cat "$OUT/usage.md"
