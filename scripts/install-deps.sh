#!/usr/bin/env bash
# Installs every Debian 12 package LLMProxy needs to build, run, test and benchmark.
# Idempotent: packages already present are skipped, so a second run costs one dpkg query.
# Uses sudo when not root. Node.js/npm are installed from Debian only when the commands are
# missing (a machine may already carry a newer Node.js from elsewhere; we keep it).
#
# Usage: scripts/install-deps.sh [--runtime|--build|--test|--bench]   (default: --test)
set -euo pipefail

profile=${1:---test}
runtime=(ca-certificates libssl3 libyaml-cpp0.7 libsqlite3-0 libspdlog1.10 libfmt9 libprometheus-cpp-core1.0
  libsimdjson14)
build=(g++ cmake ninja-build ccache pkg-config curl
  libboost1.81-dev libsimdjson-dev libyaml-cpp-dev libspdlog-dev libfmt-dev libcli11-dev
  libsqlite3-dev libssl-dev prometheus-cpp-dev libgtest-dev libgmock-dev libbenchmark-dev)
test=(prometheus sqlite3)  # promtool checks /metrics; sqlite3 lets the SIGKILL test see commits
bench=(nginx-light wrk gnuplot-nox procps util-linux valgrind)

case "$profile" in
  --runtime) want=("${runtime[@]}") ;;
  --build) want=("${runtime[@]}" "${build[@]}") ;;
  --test) want=("${runtime[@]}" "${build[@]}" "${test[@]}") ;;
  --bench) want=("${runtime[@]}" "${build[@]}" "${test[@]}" "${bench[@]}") ;;
  *) echo "usage: $0 [--runtime|--build|--test|--bench]" >&2; exit 2 ;;
esac
if [ "$profile" != --runtime ] && [ "$profile" != --build ]; then
  command -v node >/dev/null 2>&1 || want+=(nodejs)
  command -v npm >/dev/null 2>&1 || want+=(npm)
fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt_get() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 "$@"; }
# A fresh machine has no package lists yet; refresh them when any wanted package is unknown.
for p in "${missing[@]}"; do
  apt-cache show "$p" >/dev/null 2>&1 || { apt_get update; break; }
done
apt_get install -y --no-install-recommends "${missing[@]}" ||
  { apt_get update && apt_get install -y --no-install-recommends "${missing[@]}"; }
