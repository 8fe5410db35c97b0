#!/usr/bin/env bash
# Builds the Docker image and checks it for real against the local Docker daemon:
#   1. sets up the daemon and the debian:bookworm base image with $DEBIAN_DOCKER
#      (default: ../shared/tools/debian-docker next to this repository; set it to an empty
#      string to skip that step and use whatever daemon `docker` already reaches);
#   2. docker build --network host -t llmproxy:check .
#   3. runs the mock backend and the gateway from that image with host networking (this daemon
#      has no bridge) on free loopback ports, the gateway's configuration mounted at
#      /home/llmproxy/config.yaml as the README says;
#   4. waits for /health, sends one chat request and one stream through the gateway, reads
#      /metrics, checks that the gateway runs as non-root and that the image's HEALTHCHECK
#      reports healthy;
#   5. prints the image size, and renders deployments/docker-compose.yml with `docker compose` or
#      Debian's docker-compose (installed with apt-get when neither is there).
# Containers and temporary files are removed on exit. Needs root (debian-docker, apt-get).
# Usage: scripts/docker-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
DEBIAN_DOCKER=${DEBIAN_DOCKER-$repo/../shared/tools/debian-docker}
IMAGE=${IMAGE:-llmproxy:check}

say() { printf '\n== %s\n' "$*"; }
die() { echo "docker-check: ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
timings=()
took() { timings+=("$(awk -v n="$1" -v a="$(now)" -v b="$2" 'BEGIN { printf "%-34s %6.1f s", n, a - b }')"); }
command -v curl >/dev/null || die "curl is missing (apt-get install curl)"

# 1. daemon and base image
if [ -n "$DEBIAN_DOCKER" ]; then
  [ -x "$DEBIAN_DOCKER" ] || die "DEBIAN_DOCKER=$DEBIAN_DOCKER: no such executable (it sets up the \
local Docker daemon and the debian:bookworm image; point DEBIAN_DOCKER at it, or set DEBIAN_DOCKER= \
to use an already running daemon)"
  say "setting up Docker with $DEBIAN_DOCKER"
  t=$(now); "$DEBIAN_DOCKER"; took "debian-docker" "$t"
fi
docker info >/dev/null 2>&1 || die "no Docker daemon answers (docker info failed)"
docker image inspect debian:bookworm >/dev/null 2>&1 || die "the debian:bookworm image is missing"

work=$(mktemp -d /tmp/llmproxy-docker-check.XXXXXX)
containers=()
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    for c in "${containers[@]}"; do
      echo "--- last log lines of $c:" >&2; docker logs --tail 30 "$c" >&2 2>&1 || true
    done
  fi
  for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 2. build (one build at a time from this script; the Docker build itself compiles the project)
say "docker build --network host -t $IMAGE ."
exec 8>/var/tmp/llmproxy-docker-check.lock
flock -n 8 || { echo "waiting for another docker-check build to finish..."; flock 8; }
t=$(now)
# The build's own exit status decides (a pipeline into grep would hide it); the log is filtered after.
build_rc=0
docker build --network host -t "$IMAGE" . >"$work/build.log" 2>&1 || build_rc=$?
grep -E '^Step |runtime packages:|llmproxy [0-9]|OK \(|Successfully|ERROR|error:' "$work/build.log" || true
[ "$build_rc" -eq 0 ] || { tail -n 40 "$work/build.log" >&2; die "docker build failed (exit status $build_rc)"; }
took "docker build" "$t"
flock -u 8

# 3. containers. Host networking: the containers share this machine's ports, so the mock binds
# port 0 and reports the one it got; the gateway's port (needed up front by its HEALTHCHECK, via
# LLMPROXY_HEALTHCHECK_PORT) is one the kernel hands out as free just before.
free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  else
    local p; for _ in $(seq 50); do
      p=$((20000 + RANDOM % 40000))
      (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done; return 1
  fi
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s
  local limit=$1 what=$2; shift 2
  local end=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "$what: not within ${limit} s"
    sleep 0.2
  done
}

say "starting the mock backend and the gateway (--network host)"
mock=llmproxy-check-mock-$$ gw=llmproxy-check-gw-$$
t=$(now)
containers+=("$mock")
docker run -d --name "$mock" --network host --no-healthcheck --entrypoint llmproxy-mock "$IMAGE" \
  --listen 127.0.0.1:0 --name mock --models mock-model >/dev/null
wait_for 20 "the mock's 'listening on' line" bash -c "docker logs '$mock' 2>/dev/null | grep -q 'listening on'"
mock_url=$(docker logs "$mock" 2>/dev/null | grep -o 'http://127.0.0.1:[0-9]*' | head -n 1)
echo "mock backend: $mock_url"

gw_port=$(free_port) || die "found no free port"
cat >"$work/config.yaml" <<EOF
listen: "127.0.0.1:$gw_port"
backends:
  - name: mock
    url: "$mock_url"
    weight: 1
    models: ["mock-model"]
health_check:
  interval: 2s
  path: /health
EOF
chmod 0644 "$work/config.yaml"
containers+=("$gw")
docker run -d --name "$gw" --network host -e LLMPROXY_HEALTHCHECK_PORT="$gw_port" \
  -v "$work/config.yaml:/home/llmproxy/config.yaml:ro" "$IMAGE" >/dev/null
gw_url=http://127.0.0.1:$gw_port
echo "gateway: $gw_url (image's default ENTRYPOINT/CMD, config mounted at /home/llmproxy/config.yaml)"
wait_for 30 "GET $gw_url/health" curl -fsS --max-time 2 "$gw_url/health"
took "containers up, /health answers" "$t"
echo "GET /health -> $(curl -sS --max-time 5 "$gw_url/health")"

# 4. requests through the gateway container
say "one chat request through the gateway"
t=$(now)
code=$(curl -sS --max-time 10 -D "$work/chat.headers" -o "$work/chat.body" -w '%{http_code}' \
  "$gw_url/v1/chat/completions" -H 'Content-Type: application/json' -H 'X-Mock-Tokens: 5' \
  -d '{"model":"mock-model","messages":[{"role":"user","content":"Hello"}]}')
took "chat request" "$t"
echo "HTTP $code; $(grep -i -E '^(x-mock-backend|x-request-id):' "$work/chat.headers" | tr -d '\r' | paste -sd' ')"
cat "$work/chat.body"; echo
[ "$code" = 200 ] || die "chat request: HTTP $code"
grep -q '"object":"chat.completion"' "$work/chat.body" || die "chat request: no chat.completion in the body"
grep -qi '^x-mock-backend: mock' "$work/chat.headers" || die "chat request: not answered by the mock"

say "one stream through the gateway (5 tokens, 20 ms apart)"
t=$(now)
code=$(curl -sSN --max-time 10 -D "$work/stream.headers" -o "$work/stream.body" -w '%{http_code}' \
  "$gw_url/v1/chat/completions" -H 'Content-Type: application/json' \
  -H 'X-Mock-Tokens: 5' -H 'X-Mock-Delay-Ms: 20' \
  -d '{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"Hello"}]}')
took "stream (5 tokens x 20 ms)" "$t"
echo "HTTP $code; $(grep -i '^content-type:' "$work/stream.headers" | tr -d '\r')"
cat "$work/stream.body"
events=$(grep -c '^data: {' "$work/stream.body" || true)
[ "$code" = 200 ] || die "stream: HTTP $code"
grep -q '^data: \[DONE\]' "$work/stream.body" || die "stream: no [DONE]"
[ "$events" -eq 6 ] || die "stream: expected 6 events (5 tokens + finish), got $events"
echo "stream: $events JSON events then [DONE]"

say "GET /metrics (Prometheus scrapes it in deployments/)"
code=$(curl -sS --max-time 5 -o "$work/metrics" -w '%{http_code}' "$gw_url/metrics")
[ "$code" = 200 ] || die "/metrics: HTTP $code"
grep '^llmproxy_requests_total{' "$work/metrics" || die "/metrics: no llmproxy_requests_total series"

say "user inside the gateway container"
uid=$(docker exec "$gw" id -u)
docker exec "$gw" id
[ "$uid" != 0 ] || die "the gateway runs as root"

say "HEALTHCHECK status (image: --interval=10s, so the first probe runs ~10 s after start)"
t=$(now)
end=$(( $(date +%s) + 60 ))
while :; do
  status=$(docker inspect --format '{{.State.Health.Status}}' "$gw")
  [ "$status" = healthy ] && break
  [ "$status" != unhealthy ] || { docker inspect --format '{{json .State.Health}}' "$gw"; die "unhealthy"; }
  [ "$(date +%s)" -lt "$end" ] || die "HEALTHCHECK still '$status' after 60 s"
  sleep 1
done
took "wait for HEALTHCHECK healthy" "$t"
echo "health status: $status; probe exit codes so far: $(docker inspect --format \
  '{{range .State.Health.Log}}{{.ExitCode}} {{end}}' "$gw")"

say "gateway log (access log lines)"
docker logs "$gw" 2>&1 | tail -n 8

say "image"
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
echo "$IMAGE: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }') MB)"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' | grep -E "^(${IMAGE%%:*}|debian):" || true
docker image inspect --format 'user={{.Config.User}} workdir={{.Config.WorkingDir}} entrypoint={{json .Config.Entrypoint}} cmd={{json .Config.Cmd}} exposed={{json .Config.ExposedPorts}}' "$IMAGE"

# 5. the compose file renders
say "rendering deployments/docker-compose.yml"
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  if ! command -v docker-compose >/dev/null; then
    echo "installing Debian's docker-compose with apt-get..."
    apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 "$@"; }
    apt_get install -y --no-install-recommends docker-compose >/dev/null ||
      { apt_get update >/dev/null && apt_get install -y --no-install-recommends docker-compose >/dev/null; } ||
      die "apt-get install docker-compose failed"
  fi
  compose=(docker-compose)
fi
echo "with: $("${compose[@]}" version 2>/dev/null | head -n 1)"
t=$(now)
"${compose[@]}" -f deployments/docker-compose.yml config >"$work/compose.yaml" || die "compose config failed"
"${compose[@]}" -f deployments/docker-compose.yml --profile gpu config >"$work/compose-gpu.yaml" ||
  die "compose config --profile gpu failed"
took "compose config (default, gpu)" "$t"
echo "services: $("${compose[@]}" -f deployments/docker-compose.yml config --services | sort | paste -sd' ')"
profiles=$("${compose[@]}" -f deployments/docker-compose.yml config --profiles | paste -sd' ')
echo "profiles: $profiles"
[ "$profiles" = gpu ] || die "expected exactly one profile, gpu (for vllm), got '$profiles'"
echo "rendered: $(wc -l <"$work/compose.yaml") lines (default), $(wc -l <"$work/compose-gpu.yaml") lines (gpu)"

say "timings"
printf '%s\n' "${timings[@]}"
say "docker-check: all checks passed"
