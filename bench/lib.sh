# shellcheck shell=bash
# bench/lib.sh: helpers shared by the benchmark scripts. Source it after `cd` to the repository
# root and after setting BENCH_NAME (the prefix of every message), e.g.
#
#   BENCH_NAME=compare.sh
#   . bench/lib.sh
#   bench_init llmproxy-compare        # temp dir in $work, trap on EXIT/INT/TERM, $pids tracked
#
# What it gives (every wait has a timeout; nothing here binds anything but 127.0.0.1):
#   bench_init PREFIX [KEEP_PREFIX]       $work (/tmp/PREFIX.XXXXXX), the traps; a failed run keeps
#                                         its logs in /tmp/KEEP_PREFIX.XXXXXX ($BENCH_NAME-failed)
#   die MSG / note MSG                    message to stderr (die exits 1; the trap then cleans up)
#   track PID / forget PID / stop_pid PID NAME   processes stopped on exit; SIGTERM, 10 s, SIGKILL
#   wait_listening LOG PID NAME           the http://127.0.0.1:PORT a process printed ("listening on";
#                                         LISTEN_WAIT_S seconds, default 10)
#   start_server URL_VAR PID_VAR LOG CPUS CMD...   CMD started (pinned to CPUS, "-": not) and
#                                         tracked; sets the URL it announced and its pid
#   listen_port_of PID                    a TCP port PID listens on (from ss), for servers that
#                                         cannot print the port they got from port 0
#   free_port                             an unused loopback port (bind port 0, release it)
#   established_to PORT                   established TCP connections whose local port is PORT
#   cpu_s PID / cpu_tree_s PID            utime+stime of a process (all threads) / and its children
#   rss_kib PID / rss_tree_kib PID        VmRSS of a process / summed over it and its children
#   descendants PID                       the pids of every process below PID
#   cpu_busy_s N / cpu_irq_s N            CPU N since boot: busy in processes + steal / irq+softirq
#   jnum FILE KEY | jnum FILE OBJ KEY     a number from a flat one-line JSON (the loadgen's), or null
#   check_binaries NAME...                die unless build/NAME... exist (scripts/build.sh release)
#   copy_binaries DIR NAME...             copy build/NAME... to DIR once no link is writing them
#   machine_rows [ROW...]                 Markdown table rows: date, CPUs, model, memory, kernel,
#                                         compiler, fd limit (ROW: date cpus model memory kernel
#                                         compiler fds; all of them by default)
#   other_load CPU_A CPU_B                how busy CPU_A and CPU_B are (2 s sample), before a run
#   loadgen MAX_SECONDS ARGS...           ${BIN:-build}/llmproxy-loadgen on $CPU_LOAD, hard timeout
#   gateway_config FILE MOCK_URL [YAML]   the gateway config of basic.sh/usage.sh (1 worker, access
#                                         log off, the mock its backend), YAML appended
#   smoke_200 URL                         a 200 answer to a chat request (20 tries), or die
#   run_anomalies FILE                    a load run's errors, non-200 answers, streams without [DONE]
#   AWK_MEDIAN                            awk functions for the tables: median(name) over r[run,
#                                         name] (runs), f(x, decimals), ratio(a, b), busy(cpu, wall)

: "${BENCH_NAME:=bench}"

die() { echo "$BENCH_NAME: $*" >&2; exit 1; }
note() { echo "$BENCH_NAME: $*" >&2; }

pids=()
work=
keep_prefix=
# Log files (*.log, *.yaml, *.conf) of a failed run are kept here for a post-mortem.
bench_cleanup() {
  local pid rc=$? keep
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ "$rc" != 0 ]; then
      keep=$(mktemp -d "/tmp/${keep_prefix:-$BENCH_NAME-failed}.XXXXXX")
      cp "$work"/*.log "$work"/*.yaml "$work"/*.conf "$keep"/ 2>/dev/null || true
      note "failed (exit $rc); logs kept in $keep"
    fi
    rm -rf "$work"
  fi
}

# bench_init PREFIX [KEEP_PREFIX]: the temp dir ($work) and the traps; KEEP_PREFIX names the dir
# that keeps the logs of a failed run (default $BENCH_NAME-failed).
bench_init() {
  keep_prefix=${2:-}
  work=$(mktemp -d "/tmp/$1.XXXXXX")
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

track() { pids+=("$1"); }

# forget PID: drop a stopped process from the cleanup list (its id may be reused later).
forget() {
  local p keep=()
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

# stop_pid PID NAME: SIGTERM, up to 10 s, then SIGKILL (reported).
stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$1" 2>/dev/null; then
    note "$2 (pid $1) did not exit within 10 s of SIGTERM; killed"
    kill -KILL "$1" 2>/dev/null || true
  fi
  wait "$1" 2>/dev/null || true
  forget "$1"
}

# wait_listening LOGFILE PID NAME: prints the http://HOST:PORT the process announced (within
# LISTEN_WAIT_S seconds, 10 by default). Returns 1 (after printing the log to stderr) when it exits
# or stays silent: the caller decides whether that is fatal.
wait_listening() {
  local url
  for _ in $(seq $((${LISTEN_WAIT_S:-10} * 10))); do
    url=$(grep -o 'listening on http://127\.0\.0\.1:[0-9]*' "$1" 2>/dev/null | head -n1 | sed 's/^listening on //') || true
    [ -n "$url" ] && { echo "$url"; return 0; }
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$1" >&2; note "$3 exited before listening"; return 1; }
    sleep 0.1
  done
  tail -n 20 "$1" >&2
  note "$3 did not print 'listening on' within ${LISTEN_WAIT_S:-10} s"
  return 1
}

# start_server URL_VAR PID_VAR LOG CPUS CMD...: runs CMD in the background (pinned to CPUS, or
# unpinned when CPUS is "-"), output to LOG, tracked for cleanup; sets PID_VAR to its pid, waits
# for its "listening on" line and sets URL_VAR to the http://HOST:PORT it announced. Returns 1
# when it did not listen (messages name it after LOG). Its own locals start with _ss_ so that a
# caller's local URL_VAR or PID_VAR (pid, url) is the one set.
start_server() {
  local _ss_url_var=$1 _ss_pid_var=$2 _ss_log=$3 _ss_cpus=$4 _ss_url
  shift 4
  if [ "$_ss_cpus" = - ]; then
    "$@" >"$_ss_log" 2>&1 &
  else
    taskset -c "$_ss_cpus" "$@" >"$_ss_log" 2>&1 &
  fi
  printf -v "$_ss_pid_var" '%s' "$!"
  track "${!_ss_pid_var}"
  _ss_url=$(wait_listening "$_ss_log" "${!_ss_pid_var}" "$(basename "$_ss_log" .log)") || return 1
  printf -v "$_ss_url_var" '%s' "$_ss_url"
}

# descendants PID: every process below PID (children, grandchildren, ...), one per line.
descendants() {
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$c"
    descendants "$c"
  done
}

# listen_port_of PID [SECONDS]: the first TCP port on 127.0.0.1 that PID (or a child) listens on.
listen_port_of() {
  local p all port
  for _ in $(seq $((${2:-10} * 10))); do
    all="$1 $(descendants "$1")"
    for p in $all; do
      port=$(ss -Hltnp 2>/dev/null | grep -F "pid=$p," | awk '{print $4}' | grep -o '[0-9]*$' | head -n1) || true
      [ -n "$port" ] && { echo "$port"; return 0; }
    done
    kill -0 "$1" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# free_port: a loopback port nothing listens on now (the kernel's pick for port 0, released).
# Only for servers that cannot bind port 0 themselves and report it; racy in principle.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' 2>/dev/null ||
    node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })'
}

# established_to PORT: established TCP connections on 127.0.0.1 whose local port is PORT.
established_to() {
  ss -Htn state established "( sport = :$1 )" 2>/dev/null | wc -l
}

# CPU seconds (utime + stime, all threads) of a process so far. Field 2 (comm) may hold spaces:
# cut after ')'. 0 for a process that is gone.
cpu_ticks() {
  local v
  v=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}') || true
  echo "${v:-0}"
}
cpu_s() {
  awk -v t="$(cpu_ticks "$1")" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", (t + 0) / hz }'
}
# cpu_tree_s PID: the same over PID and its descendants (nginx: master + workers).
cpu_tree_s() {
  local p t=0
  for p in "$1" $(descendants "$1"); do t=$((t + $(cpu_ticks "$p"))); done
  awk -v t="$t" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}

rss_kib() {
  local v
  v=$(awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null) || true
  echo "${v:-0}"
}
rss_tree_kib() {
  local p t=0
  for p in "$1" $(descendants "$1"); do t=$((t + $(rss_kib "$p"))); done
  echo "$t"
}

# cpu_busy_s N: seconds CPU N has spent in processes (user+nice+system) or stolen by the hypervisor
# since boot; cpu_irq_s N: in interrupts and softirqs, which /proc/PID/stat charges to no process
# (with loopback traffic most of it is the network stack working for our own processes).
cpu_busy_s() {
  awk -v c="cpu$1" -v hz="$(getconf CLK_TCK)" '$1 == c { printf "%.3f\n", ($2 + $3 + $4 + $9) / hz }' /proc/stat
}
cpu_irq_s() {
  awk -v c="cpu$1" -v hz="$(getconf CLK_TCK)" '$1 == c { printf "%.3f\n", ($7 + $8) / hz }' /proc/stat
}

# jnum FILE KEY or jnum FILE OBJECT KEY: a number from a flat JSON line (null -> "null").
jnum() {
  local text v
  if [ $# -eq 3 ]; then
    text=$(grep -o "\"$2\":{[^}]*}" "$1" | head -n1)
    [ -n "$text" ] || { echo null; return; }
    v=$(grep -o "\"$3\":[-0-9.e]*" <<<"$text" | head -n1 | cut -d: -f2)
  else
    v=$(grep -o "\"$2\":[-0-9.e]*" "$1" | head -n1 | cut -d: -f2)
  fi
  echo "${v:-null}"
}

# check_binaries NAME...: every build/NAME is there (after a build, or with BUILD=0).
check_binaries() {
  local bin
  for bin in "$@"; do
    [ -x "build/$bin" ] || die "build/$bin missing (scripts/build.sh release $bin)"
  done
}

# copy_binaries DIR NAME...: build/NAME copied to DIR, so a rebuild of build/ during a long run (the
# machine may be shared) cannot change what later phases run. Waits until no link is writing them
# (modified at least 15 s ago, at most 5 minutes), copies, and compares.
copy_binaries() {
  local dir=$1 bin newest files=()
  shift
  mkdir -p "$dir"
  check_binaries "$@"
  for bin in "$@"; do files+=("build/$bin"); done
  for _ in $(seq 60); do
    newest=$(stat -c %Y "${files[@]}" | sort -n | tail -n1)
    [ $(($(date +%s) - newest)) -ge 15 ] && break
    note "build/ was modified $(($(date +%s) - newest)) s ago (a build is running?); waiting"
    sleep 5
  done
  for bin in "$@"; do
    cp "build/$bin" "$dir/"
    cmp -s "build/$bin" "$dir/$bin" || die "build/$bin changed while it was copied"
  done
}

# machine_rows [ROW...]: the rows every results file starts its machine table with, in the order
# given (ROW: date cpus model memory kernel compiler fds; all of them, in that order, by default).
machine_rows() {
  local row
  [ $# -gt 0 ] || set -- date cpus model memory kernel compiler fds
  for row in "$@"; do
    case "$row" in
      date) echo "| date | $(date -u '+%Y-%m-%d %H:%M:%S UTC') |" ;;
      cpus) echo "| CPUs (nproc --all) | $(nproc --all) |" ;;  # the caller may run pinned to one
      model) echo "| CPU model | $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') |" ;;
      memory) echo "| memory | $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) |" ;;
      kernel) echo "| kernel | $(uname -sr) |" ;;
      compiler) echo "| compiler | $(g++ --version 2>/dev/null | head -n1) |" ;;
      fds) echo "| fd limit (soft / hard) | $(ulimit -Sn) / $(ulimit -Hn) |" ;;
      *) die "machine_rows: unknown row $row" ;;
    esac
  done
}

# other_load CPU_A CPU_B: how busy other work keeps the two CPUs before anything starts (a 2 s
# sample; it is not pinned away from ours): "CPU 0 N %, CPU 1 M %".
other_load() {
  local a0 b0
  a0=$(cpu_busy_s "$1"); b0=$(cpu_busy_s "$2")
  sleep 2
  awk -v a0="$a0" -v b0="$b0" -v a1="$(cpu_busy_s "$1")" -v b1="$(cpu_busy_s "$2")" \
    'BEGIN { printf "CPU 0 %.0f %%, CPU 1 %.0f %%", 100 * (a1 - a0) / 2, 100 * (b1 - b0) / 2 }'
}

# loadgen MAX_SECONDS ARGS...: the load generator (${BIN:-build}/llmproxy-loadgen) on CPU $CPU_LOAD,
# killed after MAX_SECONDS.
loadgen() {
  local max=$1
  shift
  taskset -c "$CPU_LOAD" timeout --kill-after=5 "$max" "${BIN:-build}/llmproxy-loadgen" "$@"
}

# gateway_config FILE MOCK_URL [YAML]: the gateway of basic.sh and usage.sh (1 worker, access log
# off, drain 2 s, one backend: the mock at MOCK_URL), with YAML (a usage block, say) appended.
gateway_config() {
  {
    cat <<YAML
listen: "127.0.0.1:0"
server:
  workers: 1
  access_log: false
  drain_timeout: 2s
backends:
  - url: "$2"
    name: mock
YAML
    [ $# -lt 3 ] || echo "$3"
  } >"$1"
}

# metering_yaml MODE LOG_PATH [RECEIVER_URL]: health checks off and the usage blocks of a gateway
# config (gateway_config's YAML) for MODE off (usage disabled), on (the SQLite log at LOG_PATH) or
# hook (that plus usage_hook, batch_size 100, batch_interval 200ms, to RECEIVER_URL/usage).
metering_yaml() {
  printf 'health_check:\n  enabled: false\nusage:\n'
  if [ "$1" = off ]; then
    printf '  enabled: false\n'
    return
  fi
  printf '  enabled: true\n  log_path: "%s"\n' "$2"
  if [ "$1" = hook ]; then
    printf 'usage_hook:\n  enabled: true\n  url: "%s/usage"\n  batch_size: 100\n' "$3"
    printf '  batch_interval: 200ms\n'
  fi
}

# smoke_200 URL: one 200 answer to a chat request (20 tries, 0.25 s apart), or die.
smoke_200() {
  local ok=
  for _ in $(seq 20); do
    if loadgen 10 --url "$1/v1/chat/completions" --requests 1 --json >"$work/smoke.json" 2>/dev/null &&
      [ "$(jnum "$work/smoke.json" errors)" = 0 ] && grep -q '"status_counts":{"200":1}' "$work/smoke.json"; then
      ok=1
      break
    fi
    sleep 0.25
  done
  [ -n "$ok" ] || die "no 200 answer from $1/v1/chat/completions: $(cat "$work/smoke.json" 2>/dev/null)"
}

# run_anomalies FILE: a Markdown list item per thing a reader of a load run (the loadgen's JSON)
# must not miss: errors, non-200 answers, streams without [DONE].
run_anomalies() {
  local status
  [ "$(jnum "$1" errors)" = 0 ] || echo "- $(basename "$1"): $(jnum "$1" errors) errors: $(grep -o '"error_kinds":{[^}]*}' "$1")"
  status=$(grep -o '"status_counts":{[^}]*}' "$1" || true)
  grep -q '^"status_counts":{"200":[0-9]*}$' <<<"$status" || echo "- $(basename "$1"): $status"
  if grep -q '"mode":"stream"' "$1" && [ "$(jnum "$1" streams_done)" != "$(jnum "$1" requests)" ]; then
    echo "- $(basename "$1"): $(jnum "$1" streams_done) of $(jnum "$1" requests) streams ended with [DONE]"
  fi
}

# AWK_MEDIAN: awk functions for the tables, prepended to a program that fills r[run, name] for runs
# 1..runs (-v runs=N): median(name) ("-" when no run has a number), f(x, decimals) ("-" for none),
# ratio(a, b) and busy(cpu_s, wall_s) (the busy share of one CPU, %), "null" when undefined.
# shellcheck disable=SC2034  # used by the scripts that source this file
AWK_MEDIAN='
function median(name,   n, i, j, v, t) {
  n = 0
  for (i = 1; i <= runs; i++) if (r[i, name] != "" && r[i, name] != "null") v[++n] = r[i, name] + 0
  if (n == 0) return "-"
  for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
  return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
function f(x, d) { return x == "-" || x == "null" || x == "" ? "-" : sprintf("%." d "f", x) }
function ratio(a, b) { return (a == "null" || b == "null" || b + 0 == 0) ? "null" : a / b }
function busy(c, w) { return w + 0 > 0 ? 100 * c / w : "null" }
'
