# shellcheck shell=bash
# bench/lib.sh: helpers shared by the benchmark scripts. Source it after `cd` to the repository
# root and after setting BENCH_NAME (the prefix of every message), e.g.
#
#   BENCH_NAME=compare.sh
#   . bench/lib.sh
#   bench_init llmproxy-compare        # temp dir in $work, trap on EXIT/INT/TERM, $pids tracked
#
# What it gives (every wait has a timeout; nothing here binds anything but 127.0.0.1):
#   die MSG / note MSG                    message to stderr (die exits 1; the trap then cleans up)
#   track PID / forget PID / stop_pid PID NAME   processes stopped on exit; SIGTERM, 10 s, SIGKILL
#   wait_listening LOG PID NAME           the http://127.0.0.1:PORT a process printed ("listening on")
#   listen_port_of PID                    a TCP port PID listens on (from ss), for servers that
#                                         cannot print the port they got from port 0
#   free_port                             an unused loopback port (bind port 0, release it)
#   established_to PORT                   established TCP connections whose local port is PORT
#   cpu_s PID / cpu_tree_s PID            utime+stime of a process (all threads) / and its children
#   rss_kib PID / rss_tree_kib PID        VmRSS of a process / summed over it and its children
#   descendants PID                       the pids of every process below PID
#   cpu_busy_s N / cpu_irq_s N            CPU N since boot: busy in processes + steal / irq+softirq
#   jnum FILE KEY | jnum FILE OBJ KEY     a number from a flat one-line JSON (the loadgen's), or null
#   copy_binaries DIR NAME...             copy build/NAME... to DIR once no link is writing them
#   machine_rows                          Markdown table rows: date, CPUs, model, kernel, compiler

: "${BENCH_NAME:=bench}"

die() { echo "$BENCH_NAME: $*" >&2; exit 1; }
note() { echo "$BENCH_NAME: $*" >&2; }

pids=()
work=
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
      keep=$(mktemp -d "/tmp/$BENCH_NAME-failed.XXXXXX")
      cp "$work"/*.log "$work"/*.yaml "$work"/*.conf "$keep"/ 2>/dev/null || true
      note "failed (exit $rc); logs kept in $keep"
    fi
    rm -rf "$work"
  fi
}

# bench_init PREFIX: the temp dir ($work) and the traps.
bench_init() {
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

# wait_listening LOGFILE PID NAME: prints the http://HOST:PORT the process announced (10 s).
# Returns 1 (after printing the log to stderr) when it exits or stays silent: the caller decides
# whether that is fatal.
wait_listening() {
  local url
  for _ in $(seq 100); do
    url=$(grep -o 'listening on http://127\.0\.0\.1:[0-9]*' "$1" 2>/dev/null | head -n1 | sed 's/^listening on //') || true
    [ -n "$url" ] && { echo "$url"; return 0; }
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$1" >&2; note "$3 exited before listening"; return 1; }
    sleep 0.1
  done
  tail -n 20 "$1" >&2
  note "$3 did not print 'listening on' within 10 s"
  return 1
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

# copy_binaries DIR NAME...: build/NAME copied to DIR, so a rebuild of build/ during a long run (the
# machine may be shared) cannot change what later phases run. Waits until no link is writing them
# (modified at least 15 s ago, at most 5 minutes), copies, and compares.
copy_binaries() {
  local dir=$1 bin newest files=()
  shift
  mkdir -p "$dir"
  for bin in "$@"; do
    [ -x "build/$bin" ] || die "build/$bin missing (scripts/build.sh release $bin)"
    files+=("build/$bin")
  done
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

# machine_rows: the rows every results file starts its machine table with.
machine_rows() {
  echo "| date | $(date -u '+%Y-%m-%d %H:%M:%S UTC') |"
  echo "| CPUs (nproc) | $(nproc) |"
  echo "| CPU model | $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') |"
  echo "| memory | $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) |"
  echo "| kernel | $(uname -sr) |"
  echo "| compiler | $(g++ --version 2>/dev/null | head -n1) |"
  echo "| fd limit (soft / hard) | $(ulimit -Sn) / $(ulimit -Hn) |"
}
