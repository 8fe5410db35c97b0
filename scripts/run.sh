#!/usr/bin/env bash
# Sets everything up and runs the gateway on :8080.
#   scripts/run.sh                  installs what is missing, builds, starts the bundled mock
#                                   backend on a free loopback port and the gateway in front of it
#   scripts/run.sh --config FILE    same build, then runs the gateway with your configuration, in
#                                   the directory run.sh was called from (-c FILE, --config=FILE)
set -euo pipefail
config=
case "$#:${1:-}" in
  0:) ;;
  2:--config | 2:-c) config=$2 ;;
  1:--config=?*) config=${1#--config=} ;;
  *)
    echo "usage: scripts/run.sh [--config FILE]" >&2
    exit 2
    ;;
esac
if [ -n "$config" ]; then
  # Read from the caller's directory (the script changes to the repository's below).
  [ -r "$config" ] || { echo "run.sh: cannot read $config" >&2; exit 2; }
  config=$(realpath "$config")
fi
caller=$PWD
cd "$(dirname "$0")/.."
scripts/install-deps.sh --build
scripts/build.sh release llmproxy llmproxy-mock

if [ -n "$config" ]; then
  # From the caller's directory, as if the binary were run there: relative paths in the config
  # (usage.log_path) mean what they would mean to `llmproxy --config`.
  bin=$PWD/build/llmproxy
  cd "$caller"
  exec "$bin" --config "$config"
fi

workdir=$(mktemp -d /tmp/llmproxy-run.XXXXXX)
build/llmproxy-mock --listen 127.0.0.1:0 --threads 1 --name mock --models mock-model \
  >"$workdir/mock.out" 2>&1 &
mock_pid=$!
trap 'kill $mock_pid 2>/dev/null; rm -rf "$workdir"' EXIT
for _ in $(seq 100); do
  grep -q 'listening on' "$workdir/mock.out" 2>/dev/null && break
  kill -0 $mock_pid 2>/dev/null || { cat "$workdir/mock.out" >&2; exit 1; }
  sleep 0.05
done
mock_url=$(grep -o 'http://[0-9.]*:[0-9]*' "$workdir/mock.out" | head -n1)
[ -n "$mock_url" ] || { echo "run.sh: the mock backend did not start" >&2; exit 1; }
sed "s#http://127.0.0.1:9000#$mock_url#" configs/default.yaml >"$workdir/config.yaml"
cat <<MSG
LLMProxy: gateway on http://localhost:8080, upstream: bundled mock backend at $mock_url
Try:
  curl http://localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"mock-model","messages":[{"role":"user","content":"Hello"}]}'
  curl -N http://localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"Hello"}]}'
  curl http://localhost:8080/v1/models ; curl http://localhost:8080/health
Stop with Ctrl-C.
MSG
build/llmproxy --config "$workdir/config.yaml"
