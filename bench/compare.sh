#!/usr/bin/env bash
# bench/compare.sh: LLMProxy side by side with the mock backend served directly (the ceiling),
# nginx (a fair streaming proxy) and the Portkey AI gateway, in one run on this machine (issue 5).
#
# Usage: bench/compare.sh                 RUNS=5 (default; MEM_RUNS=3 memory ramps), ~42 minutes on
#                                         an idle 2-CPU machine
#        RUNS=3 MEM_RUNS=1 bench/compare.sh    fewer interleaved runs (~25 minutes)
#        QUICK=1 bench/compare.sh         smoke version (RUNS=1, a few seconds per scenario, small
#                                         memory ramp, ~4 minutes), written to bench/results/tmp/
#        PEERS="direct llmproxy nginx" bench/compare.sh     a subset of the peers
# Uses the binaries in build/ as they are (scripts/build.sh release llmproxy llmproxy-mock
# llmproxy-loadgen builds them). Needs taskset, ss, ps, node/npm (Portkey, the report), nginx and
# gnuplot (scripts/install-deps.sh --bench; nginx is installed with it when missing).
#
# Peers, all on 127.0.0.1, all started and stopped here:
#   direct            the mock backend itself (1 thread): the ceiling every proxy is compared to
#   llmproxy          1 worker, access log off, usage: {enabled: false}, health checks off
#   llmproxy-metered  the same with usage metering on (defaults: SQLite log, durability disk)
#   llmproxy-hooked   the same plus usage_hook (batch_size 100, batch_interval 200ms) to the mock's
#                     own receiver, POST /mock/usage (C++, on CPU 1 with the mock)
#   nginx             bench/nginx/nginx.conf.template: 1 worker process, upstream keep-alive,
#                     HTTP/1.1, proxy_buffering off, proxy_request_buffering off, access log off
#   portkey           @portkey-ai/gateway pinned in bench/portkey/ (package-lock.json, npm ci),
#                     provider "openai" with x-portkey-custom-host pointing at the mock's /v1
# A peer that fails to start, to answer, or that dies during a run is reported as failed in the
# results (with the reason), never silently left out.
#
# Scenarios (each run interleaves the peers, in an order rotated every run):
#   (1) non-stream chat, small body: max req/s, closed loop, NS_CONCURRENCY connections; then
#       latency p50/p99 at a fixed rate NS_RATE (open loop; a peer whose closed-loop max in the same
#       run is below 2 x NS_RATE is measured at half its max instead, and the table says so)
#   (2) streams of ST_TOKENS tokens at ST_DELAY_MS per token, ST_LEVELS concurrent streams (closed
#       loop, ST_ROUNDS streams per connection measured after a first one): added TTFT and gap
#       p50/p99 against direct in the same run, coalesced reads per stream
#   (3) memory per stream: fresh proxies, MEM_LEVELS concurrent slow streams held (ramp up), RSS of
#       the proxy (all its processes) from /proc once they are all established; slope per stream
#   (4) prompt size PROMPT_SIZES bytes, one connection, closed loop: added latency and CPU per request
#   (5) metering on vs off: llmproxy-metered and llmproxy-hooked against llmproxy in (1) and at the
#       first stream level; after the load runs, the records the receiver got are checked against
#       the hooked gateway's own count
# Pinning: the proxy under test (every proxy; all processes and threads) on CPU 0; the mock, the
# load generator and everything else on CPU 1. CPU time per request from /proc/PID/stat before and
# after each load run; each CPU's busy time from /proc/stat, so other work on a shared machine shows.
# Everything started is stopped on exit (trap), every wait has a timeout, every load run a hard one.
# Writes OUT/compare.md, OUT/compare.png, OUT/compare/ (raw JSON lines per load run, per-run CSVs);
# OUT is bench/results (bench/results/tmp with QUICK=1, git-ignored: a smoke run is not a result).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=compare.sh
. bench/lib.sh

# The command that reproduces this run: the knobs given in the environment, then the script.
KNOBS=(QUICK RUNS PEERS NS_CONCURRENCY NS_DURATION_S NS_RATE NS_RATE_CONCURRENCY NS_RATE_DURATION_S
  ST_LEVELS ST_TOKENS ST_DELAY_MS ST_ROUNDS ST_ARRIVAL MEM_RUNS MEM_LEVELS MEM_TOKENS MEM_DELAY_MS
  PROMPT_SIZES PROMPT_DURATION_S WARMUP_S OUT)
command_line=
for k in "${KNOBS[@]}"; do
  [ -n "${!k+x}" ] || continue
  if [[ ${!k} == *" "* ]]; then command_line+="$k='${!k}' "; else command_line+="$k=${!k} "; fi
done
command_line+="bench/compare.sh"

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  RUNS=${RUNS:-1}
  NS_DURATION_S=${NS_DURATION_S:-2}
  NS_RATE_DURATION_S=${NS_RATE_DURATION_S:-2}
  ST_ROUNDS=${ST_ROUNDS:-1}
  MEM_RUNS=${MEM_RUNS:-1}
  MEM_LEVELS=${MEM_LEVELS:-500 2000}
  MEM_TOKENS=${MEM_TOKENS:-16}
  PROMPT_DURATION_S=${PROMPT_DURATION_S:-1}
  OUT=${OUT:-bench/results/tmp}
else
  RUNS=${RUNS:-5}
fi
PEERS=${PEERS:-direct llmproxy llmproxy-metered llmproxy-hooked nginx portkey}
WARMUP_S=${WARMUP_S:-1}
NS_CONCURRENCY=${NS_CONCURRENCY:-32}
NS_DURATION_S=${NS_DURATION_S:-5}
NS_RATE=${NS_RATE:-5000}
NS_RATE_CONCURRENCY=${NS_RATE_CONCURRENCY:-64}
NS_RATE_DURATION_S=${NS_RATE_DURATION_S:-5}
ST_LEVELS=${ST_LEVELS:-100 1000}
ST_TOKENS=${ST_TOKENS:-200}
ST_DELAY_MS=${ST_DELAY_MS:-20}
# Streams measured per level: ST_ROUNDS x the concurrency, after each connection's first stream (the
# warmup: every connection sends its first at once, so that round is a burst and on a cold
# connection). A count, not a time window: when a saturated CPU stretches the streams (1,000 streams
# = 50,000 events/s through the mock and the load generator on one core), a window shorter than one
# stream would measure nothing.
ST_ROUNDS=${ST_ROUNDS:-2}
# How streams start. burst (default): closed loop, every connection starts its stream at once and,
# all streams being equally long, they stay in step: each round is a burst of `level` requests, and
# the TTFT tail includes the queue of that burst on the proxy's one core. spread: open loop, streams
# start at even intervals (level / stream length per second, on level x 1.25 connections) so that
# about `level` are open at any time, as when clients come and go independently; one stream length
# of warmup lets the count of open streams rise to the level before anything is measured.
ST_ARRIVAL=${ST_ARRIVAL:-burst}
case "$ST_ARRIVAL" in burst | spread) ;; *) die "ST_ARRIVAL must be burst or spread" ;; esac
MEM_RUNS=${MEM_RUNS:-3}         # each ramps fresh proxies to the top level: ~3.5 minutes a run
MEM_LEVELS=${MEM_LEVELS:-1000 3000 6000 9000}
MEM_TOKENS=${MEM_TOKENS:-30}
MEM_DELAY_MS=${MEM_DELAY_MS:-500}
MEM_ESTABLISH_S=20
PROMPT_SIZES=${PROMPT_SIZES:-1024 16384 262144 1048576}
PROMPT_DURATION_S=${PROMPT_DURATION_S:-3}
LP_WORKERS=1                   # LLMProxy workers = nginx worker_processes: one core each
OUT=${OUT:-bench/results}
RAW=$OUT/compare

CPU_PROXY=0
CPU_LOAD=1
if [ "$(nproc)" -lt 2 ]; then
  note "fewer than 2 CPUs; running unpinned (results are not comparable)"
  CPU_LOAD=0
fi
for tool in taskset ss ps node npm; do
  command -v "$tool" >/dev/null || die "needs $tool (scripts/install-deps.sh --bench)"
done
if ! command -v nginx >/dev/null || ! command -v gnuplot >/dev/null; then
  note "nginx or gnuplot missing: scripts/install-deps.sh --bench"
  scripts/install-deps.sh --bench || note "scripts/install-deps.sh --bench failed"
fi
ulimit -n "$(ulimit -Hn)"  # ~9,000 streams through a proxy: two descriptors each

# This script and everything it starts run on CPU 1 unless started with taskset -c CPU_PROXY (the
# proxies): the polling, ss and awk of the harness never take CPU time from the proxy under test.
taskset -cp "$CPU_LOAD" $$ >/dev/null
bench_init llmproxy-compare
chmod 711 "$work"  # nginx workers run as nobody when started by root: they must reach their temp dir
BIN=$work/bin
copy_binaries "$BIN" llmproxy llmproxy-mock llmproxy-loadgen
# The sources the copied binaries were built from, as far as git knows them: read now, not after
# the run (edits made meanwhile are not in these binaries); result files (bench/results) are not
# sources.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- . ":(exclude)bench/results" 2>/dev/null || commit="$commit + uncommitted changes"
bin_built="$(date -u -r build/llmproxy '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$BIN/llmproxy" | cut -c1-12)"

# loadgen (bench/lib.sh) runs $BIN/llmproxy-loadgen.

# How busy the machine is before anything starts (other work is not pinned away from our CPUs).
busy_before=$(other_load "$CPU_PROXY" "$CPU_LOAD")
note "before the run, other processes kept busy: $busy_before"

# --- the mock (required: without it nothing can be measured) -----------------------------------
start_server mock_url mock_pid "$work/mock.log" "$CPU_LOAD" "$BIN/llmproxy-mock" --listen 127.0.0.1:0 --threads 1 --quiet ||
  die "the mock did not start"
mock_port=${mock_url##*:}

# --- peers -------------------------------------------------------------------------------------
declare -A P_PID P_URL P_FAIL P_NOTE
PORTKEY_DIR=bench/portkey
PORTKEY_MAIN=$PORTKEY_DIR/node_modules/@portkey-ai/gateway/build/start-server.js

# peer_headers PEER: the extra request headers a peer needs, one --header argument pair per line.
peer_headers() {
  if [[ $1 == *portkey ]]; then
    # Portkey forwards only the headers it is told to: the mock's controls are listed.
    printf '%s\n' --header 'x-portkey-provider: openai' --header "x-portkey-custom-host: $mock_url/v1" \
      --header 'Authorization: Bearer sk-bench-not-a-key' \
      --header 'x-portkey-forward-headers: x-mock-tokens,x-mock-delay-ms,x-mock-ttft-ms'
  fi
}

# llmproxy_config FILE METERING: metering off, on or hook (bench/lib.sh metering_yaml; the webhook
# goes to the mock's own receiver, POST /mock/usage), health checks off.
llmproxy_config() {
  cat >"$1" <<YAML
listen: "127.0.0.1:0"
server:
  workers: $LP_WORKERS
  access_log: false
  drain_timeout: 2s
  max_connections: 20000
backends:
  - url: "$mock_url"
    name: mock
$(metering_yaml "$2" "${1%.yaml}-usage.db" "$mock_url/mock")
YAML
}

# start_peer NAME KIND: starts one peer pinned to CPU 0; on success sets P_PID/P_URL, on failure
# P_FAIL (the reason) and returns 1. KIND: llmproxy, llmproxy-metered, llmproxy-hooked, nginx,
# portkey.
start_peer() {
  local name=$1 kind=$2 pid url port dir
  case "$kind" in
    llmproxy | llmproxy-metered | llmproxy-hooked)
      case "$kind" in
        llmproxy) llmproxy_config "$work/$name.yaml" off ;;
        llmproxy-metered) llmproxy_config "$work/$name.yaml" on ;;
        llmproxy-hooked) llmproxy_config "$work/$name.yaml" hook ;;
      esac
      start_server url pid "$work/$name.log" "$CPU_PROXY" "$BIN/llmproxy" --config "$work/$name.yaml" || {
        P_FAIL[$name]="did not start: $(tail -n 3 "$work/$name.log" | tr '\n|' '  ')"
        stop_pid "$pid" "$name"
        return 1
      }
      ;;
    nginx)
      command -v nginx >/dev/null || { P_FAIL[$name]="nginx is not installed (scripts/install-deps.sh --bench failed)"; return 1; }
      dir=$work/$name
      mkdir -p "$dir"
      chmod 755 "$dir"
      port=$(free_port)
      sed -e "s|@WORKERS@|$LP_WORKERS|g" -e "s|@TMP@|$dir|g" -e "s|@MOCK_PORT@|$mock_port|g" -e "s|@PORT@|$port|g" \
        bench/nginx/nginx.conf.template >"$dir/nginx.conf"
      cp "$dir/nginx.conf" "$work/$name.conf"
      taskset -c "$CPU_PROXY" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" >"$work/$name.log" 2>&1 &
      pid=$!
      track "$pid"
      if ! listen_port_of "$pid" 10 >/dev/null; then
        cat "$dir/nginx-error.log" >>"$work/$name.log" 2>/dev/null || true
        P_FAIL[$name]="did not start: $(tail -n 3 "$work/$name.log" | tr '\n|' '  ')"
        stop_pid "$pid" "$name"
        return 1
      fi
      url=http://127.0.0.1:$port
      ;;
    portkey)
      if [ ! -f "$PORTKEY_MAIN" ]; then
        note "installing the Portkey gateway (npm ci in $PORTKEY_DIR)"
        if ! (cd "$PORTKEY_DIR" && timeout 600 npm ci --no-audit --no-fund --loglevel=error) >"$work/$name-npm.log" 2>&1; then
          P_FAIL[$name]="npm ci failed: $(tail -n 3 "$work/$name-npm.log" | tr '\n|' '  ')"
          return 1
        fi
      fi
      # Loopback only and port 0: loopback.cjs (preloaded) binds the server the gateway starts to
      # 127.0.0.1 and prints the port it got. NODE_ENV=production and --headless: no web UI.
      # TRUSTED_CUSTOM_HOSTS: the custom host (the mock, on 127.0.0.1) passes its SSRF check.
      (cd "$PORTKEY_DIR" && exec taskset -c "$CPU_PROXY" env NODE_ENV=production TRUSTED_CUSTOM_HOSTS=127.0.0.1,localhost \
        node --require ./loopback.cjs "${PORTKEY_MAIN#"$PORTKEY_DIR"/}" --port=0 --headless) >"$work/$name.log" 2>&1 &
      pid=$!
      track "$pid"
      url=$(wait_listening "$work/$name.log" "$pid" "$name") || {
        P_FAIL[$name]="did not start: $(tail -n 3 "$work/$name.log" | tr '\n|' '  ')"
        stop_pid "$pid" "$name"
        return 1
      }
      ;;
    *) die "unknown peer kind $kind" ;;
  esac
  P_PID[$name]=$pid
  P_URL[$name]=$url
  local p
  for p in $(descendants "$pid"); do track "$p"; done  # nginx workers: stopped even if the master is killed
  note "$name: $url (pid $pid, CPU $CPU_PROXY)"
}

# stop_peer NAME
stop_peer() {
  local name=$1 pid=${P_PID[$1]:-} kids
  [ -n "$pid" ] || return 0
  kids=$(descendants "$pid")
  stop_pid "$pid" "$name"
  for p in $kids; do kill -0 "$p" 2>/dev/null && stop_pid "$p" "$name child"; forget "$p"; done
  unset "P_PID[$name]"
}

# smoke_peer NAME: one non-stream answer 200 and one stream that ends with [DONE], or P_FAIL.
smoke_peer() {
  local name=$1 url hdrs ok=
  url=${P_URL[$name]}
  mapfile -t hdrs < <(peer_headers "$name")
  for _ in $(seq 20); do
    if loadgen 20 --url "$url/v1/chat/completions" --requests 1 "${hdrs[@]}" --json >"$work/smoke.json" 2>"$work/smoke.err" &&
      [ "$(jnum "$work/smoke.json" errors)" = 0 ] && grep -q '"status_counts":{"200":1}' "$work/smoke.json"; then
      ok=1
      break
    fi
    sleep 0.25
  done
  if [ -z "$ok" ]; then
    P_FAIL[$name]="no 200 answer to a chat request: $(head -c 300 "$work/smoke.json" 2>/dev/null) $(curl -s -m 5 "$url/v1/chat/completions" \
      -H 'Content-Type: application/json' "${hdrs[@]/--header/-H}" -d '{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}' 2>&1 | head -c 300)"
    return 1
  fi
  loadgen 20 --url "$url/v1/chat/completions" --mode stream --requests 1 --header 'X-Mock-Tokens: 5' "${hdrs[@]}" \
    --json >"$work/smoke.json" 2>"$work/smoke.err" || true
  if [ "$(jnum "$work/smoke.json" streams_done)" != 1 ]; then
    P_FAIL[$name]="a stream did not end with [DONE]: $(head -c 300 "$work/smoke.json")"
    return 1
  fi
}

declare -a ACTIVE=()
for peer in $PEERS; do
  if [ "$peer" = direct ]; then
    P_URL[direct]=$mock_url
    ACTIVE+=(direct)
    continue
  fi
  if start_peer "$peer" "$peer" && smoke_peer "$peer"; then
    ACTIVE+=("$peer")
  else
    note "$peer FAILED: ${P_FAIL[$peer]}"
    stop_peer "$peer"
  fi
done
grep -qw direct <<<"${ACTIVE[*]}" || die "PEERS must include direct (the ceiling every ratio needs)"
grep -qw llmproxy <<<"${ACTIVE[*]}" || die "llmproxy did not start: ${P_FAIL[llmproxy]:-not in PEERS}"

rm -rf "$RAW"
mkdir -p "$RAW"

# is_active PEER
is_active() { local p; for p in "${ACTIVE[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
# The peers of (5), measured only in (1) and at the first stream level.
is_metered() { [ "$1" = llmproxy-metered ] || [ "$1" = llmproxy-hooked ]; }
deactivate() {  # deactivate PEER REASON
  local p keep=()
  for p in "${ACTIVE[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  ACTIVE=("${keep[@]}")
  P_FAIL[$1]=$2
  note "$1 FAILED: $2"
}

# run_load SCENARIO CASE PEER RUN MAX_SECONDS EXTRA_JSON LOADGEN_ARGS...: one load run; one JSON
# line (the loadgen's object plus the run's identity, CPU and memory) appended to $RAW/runs.jsonl.
run_load() {
  local scen=$1 case=$2 peer=$3 run=$4 max=$5 extra=$6 url pid hdrs p0 p1 m0 m1 c00 c01 c10 c11 i00 i01 i10 i11 t0 t1 rss rc
  shift 6
  url=${P_URL[$peer]}
  pid=${P_PID[$peer]:-}
  mapfile -t hdrs < <(peer_headers "$peer")
  p0=null; p1=null; rss=null
  [ -n "$pid" ] && p0=$(cpu_tree_s "$pid")
  m0=$(cpu_s "$mock_pid")
  c00=$(cpu_busy_s "$CPU_PROXY"); c10=$(cpu_busy_s "$CPU_LOAD"); i00=$(cpu_irq_s "$CPU_PROXY"); i10=$(cpu_irq_s "$CPU_LOAD")
  t0=$(date +%s.%N)
  rc=0
  loadgen "$max" --url "$url/v1/chat/completions" "$@" "${hdrs[@]}" --json >"$work/run.json" 2>"$work/run.txt" || rc=$?
  t1=$(date +%s.%N)
  c01=$(cpu_busy_s "$CPU_PROXY"); c11=$(cpu_busy_s "$CPU_LOAD"); i01=$(cpu_irq_s "$CPU_PROXY"); i11=$(cpu_irq_s "$CPU_LOAD")
  m1=$(cpu_s "$mock_pid")
  if [ -n "$pid" ]; then p1=$(cpu_tree_s "$pid"); rss=$(rss_tree_kib "$pid"); fi
  kill -0 "$mock_pid" 2>/dev/null || die "the mock exited during $scen $case run $run"
  if [ "$rc" != 0 ] || ! grep -q '^{"mode"' "$work/run.json"; then
    printf '{"scenario":"%s","case":"%s","peer":"%s","run":%d,"failed":"loadgen exit %s: %s"}\n' "$scen" "$case" "$peer" "$run" \
      "$rc" "$(tail -n 2 "$work/run.txt" | tr '\n"\\' '   ' | tr -d '\000-\037')" >>"$RAW/runs.jsonl"
    note "[$scen $case $peer $run] loadgen failed (exit $rc): $(tail -n 2 "$work/run.txt" | tr '\n' ' ')"
  else
    sed 's/}$//' "$work/run.json" | tr -d '\n' >>"$RAW/runs.jsonl"
    awk -v s="$scen" -v c="$case" -v p="$peer" -v r="$run" -v w0="$t0" -v w1="$t1" -v p0="$p0" -v p1="$p1" \
      -v m0="$m0" -v m1="$m1" -v c00="$c00" -v c01="$c01" -v c10="$c10" -v c11="$c11" -v i00="$i00" -v i01="$i01" \
      -v i10="$i10" -v i11="$i11" -v rss="$rss" -v x="$extra" 'BEGIN {
        printf ",\"scenario\":\"%s\",\"case\":\"%s\",\"peer\":\"%s\",\"run\":%d,\"wall_s\":%.3f,", s, c, p, r, w1 - w0
        printf "\"proxy_cpu_s\":%s,\"mock_cpu_s\":%.3f,\"proxy_rss_kib\":%s,", p0 == "null" ? "null" : sprintf("%.3f", p1 - p0), m1 - m0, rss
        printf "\"cpu0_busy_s\":%.3f,\"cpu1_busy_s\":%.3f,\"cpu0_irq_s\":%.3f,\"cpu1_irq_s\":%.3f%s}\n", c01 - c00, c11 - c10, i01 - i00, i11 - i10, x
      }' >>"$RAW/runs.jsonl"
    sed -n '1,2p' "$work/run.txt" | sed "s/^/  [$scen $case $peer $run] /" >&2
  fi
  # A metered peer's records still queued or undelivered are drained now, outside every timed
  # window, so that its writer and sink never run during the next peer's load. (Its CPU per request
  # leaves out this drain: the queue holds milliseconds of records when the writer keeps up.)
  if is_metered "$peer" && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    node bench/usage-tools.mjs settle "$url" --timeout-ms 60000 >"$work/settle.json" 2>&1 ||
      note "[$scen $case $peer $run] its usage backlog did not drain within 60 s: $(tail -c 300 "$work/settle.json")"
  fi
  if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
    deactivate "$peer" "exited during $scen $case run $run: $(tail -n 3 "$work/$peer.log" | tr '\n|' '  ')"
  fi
}

# closed_rps PEER RUN: the peer's closed-loop req/s in this run (empty when unknown).
closed_rps() {
  grep "\"scenario\":\"ns_closed\",\"case\":\"[^\"]*\",\"peer\":\"$1\",\"run\":$2," "$RAW/runs.jsonl" 2>/dev/null |
    grep -o '"rps":[0-9.]*' | head -n1 | cut -d: -f2
}

# The prompt bodies: a chat request whose one user message is SIZE bytes of words.
for size in $PROMPT_SIZES; do
  awk -v n="$size" 'BEGIN {
    w = "the quick brown fox jumps over the lazy dog while the gateway inspects the request body "
    s = ""; while (length(s) < n) s = s w; s = substr(s, 1, n)
    printf "{\"model\":\"mock-model\",\"messages\":[{\"role\":\"user\",\"content\":\"%s\"}]}", s
  }' >"$work/prompt-$size.json"
done

ST_HEADERS=(--header "X-Mock-Tokens: $ST_TOKENS" --header "X-Mock-Delay-Ms: $ST_DELAY_MS" --header "X-Mock-TTFT-Ms: $ST_DELAY_MS")
st_len_s=$(awk -v t="$ST_TOKENS" -v d="$ST_DELAY_MS" 'BEGIN { printf "%d", (t + 1) * d / 1000 + 1 }')
first_level=${ST_LEVELS%% *}
started=$(date +%s)

for run in $(seq "$RUNS"); do
  # The order of the peers rotates every run, so no peer always runs first (or after the same one).
  k=$(((run - 1) % ${#ACTIVE[@]}))
  order=("${ACTIVE[@]:$k}" "${ACTIVE[@]:0:$k}")
  note "run $run of $RUNS: ${order[*]}"
  # (1) non-stream: max req/s, closed loop
  for peer in "${order[@]}"; do
    is_active "$peer" || continue
    run_load ns_closed "c$NS_CONCURRENCY" "$peer" "$run" $((NS_DURATION_S + WARMUP_S + 60)) "" \
      --mode nonstream --concurrency "$NS_CONCURRENCY" --duration "${NS_DURATION_S}s" --warmup "${WARMUP_S}s" --timeout 20s
  done
  # (1) non-stream: latency at a fixed rate below saturation
  for peer in "${order[@]}"; do
    is_active "$peer" || continue
    rate=$NS_RATE
    max_rps=$(closed_rps "$peer" "$run")
    if [ -n "$max_rps" ] && awk -v m="$max_rps" -v r="$NS_RATE" 'BEGIN { exit !(m < 2 * r) }'; then
      rate=$(awk -v m="$max_rps" 'BEGIN { r = int(m / 2); print r < 1 ? 1 : r }')
    fi
    run_load ns_rate "r$NS_RATE" "$peer" "$run" $((NS_RATE_DURATION_S + WARMUP_S + 60)) ",\"rate_asked\":$rate,\"rate_common\":$NS_RATE" \
      --mode nonstream --concurrency "$NS_RATE_CONCURRENCY" --rate "$rate" --duration "${NS_RATE_DURATION_S}s" \
      --warmup "${WARMUP_S}s" --timeout 20s
  done
  # (2) streams
  for level in $ST_LEVELS; do
    if [ "$ST_ARRIVAL" = spread ]; then
      st_load=(--concurrency $((level + level / 4)) --rate "$(awk -v l="$level" -v t="$ST_TOKENS" -v d="$ST_DELAY_MS" \
        'BEGIN { printf "%.1f", l * 1000 / ((t + 1) * d) }')" --warmup "$(((ST_TOKENS + 1) * ST_DELAY_MS))ms")
    else
      st_load=(--concurrency "$level" --warmup "${WARMUP_S}s")
    fi
    for peer in "${order[@]}"; do
      is_active "$peer" || continue
      is_metered "$peer" && [ "$level" != "$first_level" ] && continue
      run_load stream "s$level" "$peer" "$run" $((WARMUP_S + 4 * (ST_ROUNDS + 1) * st_len_s + 60)) "" \
        --mode stream "${st_load[@]}" --requests $((ST_ROUNDS * level)) --timeout 60s "${ST_HEADERS[@]}"
    done
  done
  # (4) prompt size
  for size in $PROMPT_SIZES; do
    for peer in "${order[@]}"; do
      is_active "$peer" || continue
      is_metered "$peer" && continue
      run_load prompt "b$size" "$peer" "$run" $((PROMPT_DURATION_S + 60)) ",\"prompt_bytes\":$size" \
        --mode nonstream --concurrency 1 --duration "${PROMPT_DURATION_S}s" --warmup 0.5s --timeout 30s \
        --body-file "$work/prompt-$size.json"
    done
  done
done
load_s=$(($(date +%s) - started))

# Log lines worth a look (errors, warnings) of the peers of (1), (2), (4), before they stop.
: >"$RAW/peer-log-lines.txt"
for peer in $PEERS; do
  [ -f "$work/$peer.log" ] || continue
  grep -i -E '"level":"(error|warn)"|\[(error|crit|alert|emerg)\]|error' "$work/$peer.log" "$work/$peer/nginx-error.log" 2>/dev/null |
    head -n 5 | sed "s|^$work/||; s/^/$peer: /" >>"$RAW/peer-log-lines.txt" || true
done
# (5) every record the hooked gateway logged reached the receiver: its queue and sink backlog drain,
# then its log's record count is compared with the mock's count of records received.
if is_active llmproxy-hooked; then
  if node bench/usage-tools.mjs settle "${P_URL[llmproxy-hooked]}" --timeout-ms 60000 >"$work/hook-settle.json"; then
    logged=$(jnum "$work/hook-settle.json" log_records)
    received=$(node -e 'fetch(process.argv[1] + "/mock/stats").then((r) => r.json()).then((j) => console.log(j.usage_records))' "$mock_url") ||
      received=null
    [[ $received =~ ^[0-9]+$ ]] || received=null
    [[ $logged =~ ^[0-9]+$ ]] || logged=null
    printf '{"settled":true,"logged":%s,"received":%s}\n' "$logged" "$received" >"$RAW/hook-delivery.json"
    [ "$logged" = "$received" ] || note "llmproxy-hooked logged $logged records but the receiver got $received"
  else
    last=null
    if [ -s "$work/hook-settle.json" ] && tail -n 1 "$work/hook-settle.json" | node -e 'JSON.parse(require("fs").readFileSync(0, "utf8"))' 2>/dev/null; then
      last=$(tail -n 1 "$work/hook-settle.json")
    fi
    printf '{"settled":false,"last":%s}\n' "$last" >"$RAW/hook-delivery.json"
    note "llmproxy-hooked did not drain its usage backlog within 60 s"
  fi
fi
for peer in $PEERS; do [ "$peer" = direct ] || stop_peer "$peer"; done

# --- (3) memory per stream: fresh proxies, a ramp of held slow streams ---------------------------
MEM_PEERS=()
for peer in llmproxy nginx portkey; do
  grep -qw "$peer" <<<"$PEERS" && MEM_PEERS+=("$peer")
done
mem_hold() {  # mem_hold NAME PEER LEVEL RUN
  local name=$1 peer=$2 n=$3 run=$4 url pid port hdrs rss0 lg t0 held est rss rc=0 max settle h r left
  url=${P_URL[$name]}
  pid=${P_PID[$name]}
  port=${url##*:}
  mapfile -t hdrs < <(peer_headers "$peer")
  rss0=$(rss_tree_kib "$pid")
  max=$((MEM_ESTABLISH_S + MEM_TOKENS * MEM_DELAY_MS / 1000 + 120))
  taskset -c "$CPU_LOAD" timeout --kill-after=5 "$max" "$BIN/llmproxy-loadgen" --url "$url/v1/chat/completions" --mode stream \
    --concurrency "$n" --requests "$n" --timeout 120s --header "X-Mock-Tokens: $MEM_TOKENS" \
    --header "X-Mock-Delay-Ms: $MEM_DELAY_MS" --header 'X-Mock-TTFT-Ms: 0' "${hdrs[@]}" \
    --json >"$work/mem.json" 2>"$work/mem.txt" &
  lg=$!
  track "$lg"
  # Poll the established client connections and the RSS every 0.2 s: until all N are established
  # plus time for two events each (one every MEM_DELAY_MS), at most MEM_ESTABLISH_S. The sample
  # kept is the one with the most streams held (the latest among equals): a proxy too slow to take
  # N connections at once (its accept queue full, clients retrying) is measured at what it held.
  t0=$(date +%s.%N)
  settle=$(awk -v d="$MEM_DELAY_MS" 'BEGIN { printf "%d", (2 * d + 200) / 200 }')  # polls
  held=0; rss=0; est=null; left=$((MEM_ESTABLISH_S * 5))
  while [ "$left" -gt 0 ]; do
    h=$(established_to "$port")
    r=$(rss_tree_kib "$pid")
    if [ "$h" -ge "$held" ]; then held=$h; rss=$r; fi
    if [ "$h" -ge "$n" ] && [ "$est" = null ]; then
      est=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
      left=$settle
    fi
    kill -0 "$lg" 2>/dev/null || break
    sleep 0.2
    left=$((left - 1))
  done
  wait "$lg" || rc=$?
  forget "$lg"
  if grep -q '^{"mode"' "$work/mem.json"; then
    sed 's/}$//' "$work/mem.json" | tr -d '\n' >>"$RAW/memory.jsonl"
    printf ',"peer":"%s","run":%d,"level":%d,"held":%d,"establish_s":%s,"rss_before_kib":%d,"rss_kib":%d}\n' \
      "$peer" "$run" "$n" "$held" "$est" "$rss0" "$rss" >>"$RAW/memory.jsonl"
  else
    printf '{"peer":"%s","run":%d,"level":%d,"held":%d,"establish_s":%s,"rss_before_kib":%d,"rss_kib":%d,"failed":"loadgen exit %s: %s"}\n' \
      "$peer" "$run" "$n" "$held" "$est" "$rss0" "$rss" "$rc" "$(tail -n 2 "$work/mem.txt" | tr '\n"\\' '   ' | tr -d '\000-\037')" >>"$RAW/memory.jsonl"
  fi
  note "  [memory $peer run $run] $n streams: at most $held held (all established after ${est} s), RSS $rss0 -> $rss KiB"
  # The connections of this level are gone before the next one starts (at most 10 s).
  for _ in $(seq 50); do [ "$(established_to "$port")" -le 0 ] && break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null || return 1
}
declare -A MEM_FAIL
: >"$RAW/memory.jsonl"
for mrun in $(seq "$MEM_RUNS"); do
  mem_active=()
  for peer in "${MEM_PEERS[@]}"; do
    if [ -n "${P_FAIL[$peer]:-}" ] && [[ "${P_FAIL[$peer]}" != exited* ]]; then continue; fi  # failed to start before
    if start_peer "mem-$peer" "$peer" && smoke_peer "mem-$peer"; then
      mem_active+=("$peer")
      P_NOTE[mem-$peer-idle]=$(rss_tree_kib "${P_PID[mem-$peer]}")
    else
      MEM_FAIL[$peer]="run $mrun: ${P_FAIL[mem-$peer]}"
      stop_peer "mem-$peer"
    fi
  done
  for level in $MEM_LEVELS; do
    k=$(((mrun - 1) % (${#mem_active[@]} > 0 ? ${#mem_active[@]} : 1)))
    order=("${mem_active[@]:$k}" "${mem_active[@]:0:$k}")
    for peer in "${order[@]}"; do
      [ -n "${P_PID[mem-$peer]:-}" ] || continue
      if ! mem_hold "mem-$peer" "$peer" "$level" "$mrun"; then
        MEM_FAIL[$peer]="run $mrun: exited at $level streams: $(tail -n 3 "$work/mem-$peer.log" | tr '\n|' '  ')"
        note "memory: $peer ${MEM_FAIL[$peer]}"
        unset "P_PID[mem-$peer]"
      fi
    done
  done
  for peer in "${MEM_PEERS[@]}"; do
    printf '{"peer":"%s","run":%d,"idle_rss_kib":%s}\n' "$peer" "$mrun" "${P_NOTE[mem-$peer-idle]:-null}" >>"$RAW/memory-idle.jsonl"
    stop_peer "mem-$peer"
  done
done

# --- metadata, report, plot ----------------------------------------------------------------------
build_type=$(grep -m1 '^CMAKE_BUILD_TYPE:' build/CMakeCache.txt 2>/dev/null | cut -d= -f2)
build_flags=$(grep -m1 "^CMAKE_CXX_FLAGS_$(tr '[:lower:]' '[:upper:]' <<<"${build_type:-RELEASE}"):" build/CMakeCache.txt 2>/dev/null | cut -d= -f2)
pkver() { node -p "require('./$1/package.json').version" 2>/dev/null || echo '?'; }
{
  echo "{"
  for peer in $PEERS; do
    [ "$peer" = direct ] && continue
    if is_active "$peer"; then st=ok; else st=failed; fi
    printf '"%s":{"status":"%s","reason":%s,"memory_failure":%s},\n' "$peer" "$st" \
      "$(node -e 'console.log(JSON.stringify(process.argv[1]))' "${P_FAIL[$peer]:-}")" \
      "$(node -e 'console.log(JSON.stringify(process.argv[1]))' "${MEM_FAIL[$peer]:-}")"
  done
  echo '"direct":{"status":"ok","reason":"","memory_failure":""}'
  echo "}"
} >"$RAW/peers.json"
machine_rows >"$RAW/machine.md"
cat >>"$RAW/machine.md" <<MD
| build | ${build_type:-?} (${build_flags:-?}), commit $commit; build/llmproxy built $bin_built |
| versions | $("$BIN/llmproxy" --version 2>&1 | head -n1); $(nginx -v 2>&1 | sed 's/^nginx version: //'); node $(node --version); @portkey-ai/gateway $(pkver "$PORTKEY_DIR/node_modules/@portkey-ai/gateway") with @hono/node-server $(pkver "$PORTKEY_DIR/node_modules/@hono/node-server"); $(gnuplot --version) |
| other load | before the run, processes other than this benchmark kept $busy_before busy (2 s sample) |
| pinning | the proxy under test (all its processes and threads) on CPU $CPU_PROXY; the mock (1 thread), the load generator (1 thread) on CPU $CPU_LOAD |
MD
cat >"$RAW/params.json" <<JSON
{"quick":$([ "$QUICK" = 1 ] && echo true || echo false),"runs":$RUNS,"command":"$command_line","peers":"$PEERS",
"ns_concurrency":$NS_CONCURRENCY,"ns_duration_s":$NS_DURATION_S,"ns_rate":$NS_RATE,"ns_rate_concurrency":$NS_RATE_CONCURRENCY,
"ns_rate_duration_s":$NS_RATE_DURATION_S,"warmup_s":$WARMUP_S,"st_levels":"$ST_LEVELS","st_tokens":$ST_TOKENS,
"st_delay_ms":$ST_DELAY_MS,"st_rounds":$ST_ROUNDS,"st_arrival":"$ST_ARRIVAL","mem_runs":$MEM_RUNS,"mem_levels":"$MEM_LEVELS",
"mem_tokens":$MEM_TOKENS,"mem_delay_ms":$MEM_DELAY_MS,"prompt_sizes":"$PROMPT_SIZES","prompt_duration_s":$PROMPT_DURATION_S,
"lp_workers":$LP_WORKERS,"cpu_proxy":$CPU_PROXY,"cpu_load":$CPU_LOAD,"load_s":$load_s,"total_s":$(($(date +%s) - started + 2)),
"mock_url":"$mock_url"}
JSON
cp "$work/llmproxy.yaml" "$RAW/llmproxy.yaml" 2>/dev/null || true
cp "$work/llmproxy-metered.yaml" "$RAW/llmproxy-metered.yaml" 2>/dev/null || true
cp "$work/llmproxy-hooked.yaml" "$RAW/llmproxy-hooked.yaml" 2>/dev/null || true
cp "$work/nginx.conf" "$RAW/nginx.conf" 2>/dev/null || true
sed -i "s|$work|/tmp/llmproxy-compare.XXXXXX|g" "$RAW"/*.yaml "$RAW"/*.conf "$RAW/peer-log-lines.txt" "$RAW/peers.json" 2>/dev/null || true

node bench/compare-report.mjs "$OUT" || die "the report failed"
if command -v gnuplot >/dev/null; then
  gnuplot -e "datadir='$RAW'; outfile='$OUT/compare.png'" bench/compare.gp 2>"$work/gnuplot.log" ||
    note "gnuplot failed: $(head -n 5 "$work/gnuplot.log")"
else
  note "gnuplot missing: no plot"
fi
note "wrote $OUT/compare.md, $OUT/compare.png and $RAW/"
cat "$OUT/compare.md"
