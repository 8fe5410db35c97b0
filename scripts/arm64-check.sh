#!/usr/bin/env bash
# Proves that LLMProxy builds and runs on 64-bit ARM (arm64/aarch64) from an amd64 Debian 12 machine
# that cannot pull an arm64 base image (so `docker buildx --platform linux/arm64` is not available):
#   1. installs Debian's arm64 cross tool chain (crossbuild-essential-arm64), QEMU user-mode
#      emulation (qemu-user-static) and, through multiarch (dpkg --add-architecture arm64), the
#      arm64 builds of the library -dev packages that scripts/install-deps.sh lists for building the
#      gateway: the very Debian packages an arm64 image's builder stage installs. A package is
#      installed as PKG:arm64 only when that removes no amd64 package (the native build needs them):
#      libsimdjson-dev and libyaml-cpp-dev are not "Multi-Arch: same", and prometheus-cpp-dev is but
#      depends on the civetweb program, which is not; those three are unpacked into
#      build-arm64/dev-root/ instead, and their libraries (all "Multi-Arch: same") are installed
#      with apt-get. Multiarch needs equal versions on both architectures, so the first run may
#      upgrade some amd64 packages to the archive's current version (e.g. libssl-dev);
#   2. cross-compiles llmproxy and llmproxy-mock for aarch64 into build-arm64/ with
#      cmake/aarch64-linux-gnu.cmake (Release, no unit tests; nice -n 19 ninja -j1);
#   3. checks that they are aarch64 ELF files, that every shared library they need resolves to an
#      arm64 Debian package (the Dockerfile's runtime stage installs exactly those), and that every
#      package the Dockerfile installs (install-deps.sh --build and --runtime) exists for arm64;
#   4. runs the arm64 mock backend and the arm64 gateway in front of it under qemu-aarch64-static on
#      127.0.0.1 (port 0: each reports the port it got), waits for /health, sends one chat request
#      and one stream through the gateway, checks the answers, stops both with SIGTERM.
# What it proves: the source compiles for aarch64 with Debian 12's arm64 packages and the resulting
# binaries serve requests on an arm64 CPU (emulated), i.e. what the Dockerfile does on arm64.
# What it does not: run the Dockerfile itself on arm64 (scripts/docker-check.sh does it for amd64).
# Idempotent: a second run installs nothing and rebuilds only what changed. Needs root or sudo.
# Usage: scripts/arm64-check.sh        (BUILD_DIR=build-arm64 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
build=${BUILD_DIR:-build-arm64}
case $build in /*) ;; *) build=$repo/$build ;; esac
devroot=$build/dev-root

say() { printf '\n== %s\n' "$*"; }
die() { echo "arm64-check: ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
timings=()
took() { timings+=("$(awk -v n="$1" -v a="$(now)" -v b="$2" 'BEGIN { printf "%-44s %7.1f s", n, a - b }')"); }
t_all=$(now)

SUDO=
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "needs root or sudo (dpkg --add-architecture, apt-get)"
  SUDO=sudo
fi
apt_get() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 "$@"; }
updated=0
apt_update_once() { [ $updated = 1 ] || { apt_get update >/dev/null; updated=1; }; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
# Candidate versions' control fields, from one apt-cache call per batch (each call reads the whole
# package cache, which takes seconds): KNOWN, MA, VER and DEP are keyed by PACKAGE:ARCH, ARCH being
# the stanza's own (arm64, amd64 or all).
declare -A KNOWN MA VER DEP
load() {  # load PACKAGE:ARCH...
  local key m v d
  while IFS=$'\x1f' read -r key m v d; do
    KNOWN[$key]=1 MA[$key]=$m VER[$key]=$v DEP[$key]=$d
  done < <(apt-cache show --no-all-versions "$@" 2>/dev/null | awk 'BEGIN { RS = ""; FS = "\n" } {
      p = a = m = v = d = ""
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^Package: /) p = substr($i, 10); else if ($i ~ /^Architecture: /) a = substr($i, 15)
        else if ($i ~ /^Multi-Arch: /) m = substr($i, 13); else if ($i ~ /^Version: /) v = substr($i, 10)
        else if ($i ~ /^Depends: /) d = substr($i, 10)
      }
      printf "%s:%s\x1f%s\x1f%s\x1f%s\n", p, a, m, v, d }')
}
on_arm64() { [ -n "${KNOWN[$1:arm64]:-}" ] || [ -n "${KNOWN[$1:all]:-}" ]; }  # after load P:arm64 P:all
depends() {  # depends PACKAGE:ARCH: the names it depends on (first of alternatives)
  tr ',' '\n' <<<"${DEP[$1]:-}" | sed 's/|.*//; s/(.*)//; s/:any//; s/ //g' | grep -v '^$' || true
}
array_of() {  # array_of NAME: the words of install-deps.sh's NAME=( ... ) list
  sed -n "/^$1=(/,/)/p" scripts/install-deps.sh | sed "s/^$1=(//; s/#.*//; s/)//" | tr -s ' \n' '\n' |
    grep -v '^$'
}

# ---- 1. packages ------------------------------------------------------------------------------------
say "1. Debian packages (cross tool chain, QEMU, arm64 libraries)"
t=$(now)
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "dpkg --add-architecture arm64"
  $SUDO dpkg --add-architecture arm64
  apt_update_once
fi
apt-cache show --no-all-versions libc6:arm64 >/dev/null 2>&1 || apt_update_once  # no arm64 lists yet

# The native set first (cmake, ninja, pkg-config, curl and the amd64 libraries): what follows must
# keep it intact, so it must be there to be seen.
scripts/install-deps.sh --build
host=(crossbuild-essential-arm64 qemu-user-static file)
# The gateway's library -dev packages: install-deps.sh's build list, less the tools and the
# test/benchmark libraries.
mapfile -t libdev < <(array_of build | grep -- '-dev$' | grep -vxE 'libgtest-dev|libgmock-dev|libbenchmark-dev')
[ ${#libdev[@]} -gt 0 ] || die "found no -dev package in scripts/install-deps.sh's build list"
multiarch=()    # installed as PKG:arm64 next to the amd64 one
unpack=()       # not co-installable: unpacked into $devroot
unpack_libs=()  # the co-installable arm64 dependencies of those (their shared libraries)
native=()       # Architecture: all (headers only), or a program: the host's package serves
removes() {  # removes PKG...: what `apt-get install PKG...` would remove (nothing: co-installable)
  apt-get install -s --no-install-recommends "$@" 2>/dev/null | awk '/^Remv /{print $2}' | paste -sd' '
}
load "${libdev[@]/%/:arm64}" "${libdev[@]/%/:all}"
for p in "${libdev[@]}"; do
  if [ -n "${KNOWN[$p:arm64]:-}" ]; then
    # Co-installable: "Multi-Arch: same" and nothing it pulls in replaces an amd64 package (e.g.
    # prometheus-cpp-dev is "same" but depends on the civetweb program, which is not).
    if installed "$p:arm64" && installed "$p:amd64"; then
      multiarch+=("$p")
    elif [ "${MA[$p:arm64]}" = same ] && [ -z "$(removes "$p:arm64")" ]; then
      multiarch+=("$p")
    else
      unpack+=("$p")
    fi
  elif [ -n "${KNOWN[$p:all]:-}" ]; then
    native+=("$p")
  else
    die "$p: Debian has no arm64 build of it"
  fi
done
# An unpacked package's dependencies: arm64 ones when co-installable (its shared libraries, which
# the binaries link and QEMU loads; the -dev ones that its CMake package looks for), else the
# host's (e.g. the civetweb program that prometheus-cpp-dev depends on: never linked).
deps=()
for p in "${unpack[@]}"; do mapfile -t -O ${#deps[@]} deps < <(depends "$p:arm64"); done
if [ ${#deps[@]} -gt 0 ]; then
  load "${deps[@]/%/:arm64}"
  for d in "${deps[@]}"; do
    if [ "${MA[$d:arm64]:-}" = same ]; then
      multiarch+=("$d")
      case $d in *-dev) ;; *) unpack_libs+=("$d") ;; esac
    else
      native+=("$d")
    fi
  done
fi
mapfile -t multiarch < <(printf '%s\n' "${multiarch[@]}" | sort -u)
mapfile -t native < <(printf '%s\n' "${native[@]}" | sort -u)
echo "library -dev packages (install-deps.sh --build): ${libdev[*]}"
echo "  Multi-Arch: same, installed as :arm64 : $(printf '%s ' "${multiarch[@]}")"
echo "  not co-installable, unpacked into ${devroot#"$repo"/}: ${unpack[*]:-none}"
echo "  the host's package serves arm64 too    : ${native[*]:-none}"

missing=()
for p in "${host[@]}" "${native[@]}"; do installed "$p" || missing+=("$p"); done
for p in "${multiarch[@]}"; do installed "$p:arm64" || missing+=("$p:arm64"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "apt-get install ${missing[*]}"
  apt_update_once
  # Never at the expense of an amd64 package (the native build needs them all).
  gone=$(removes "${missing[@]}")
  [ -z "$gone" ] || die "installing ${missing[*]} would remove $gone: not doing it"
  apt_get install -y --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "all installed"
fi

# The unpacked -dev packages, at the candidate version (the one that its :arm64 runtime library,
# installed above, has: the -dev packages depend on it with "=").
want_stamp=$(for p in "${unpack[@]}"; do echo "$p ${VER[$p:arm64]}"; done)
if [ "$(cat "$devroot/.stamp" 2>/dev/null)" != "$want_stamp" ]; then
  echo "unpacking into ${devroot#"$repo"/}: ${unpack[*]}"
  rm -rf "$devroot" "$build/debs"
  mkdir -p "$devroot" "$build/debs"
  # (as root, apt's _apt download user may not write there: download as the caller)
  download() { (cd "$build/debs" && apt-get -q -o APT::Sandbox::User="$(id -un)" download \
    "${unpack[@]/%/:arm64}" >/dev/null); }
  download || { apt_update_once; download; }
  for deb in "$build"/debs/*.deb; do dpkg-deb -x "$deb" "$devroot"; done
  # Their CMake packages and lib*.so links name the shared libraries next to themselves: link the
  # installed arm64 ones in.
  mkdir -p "$devroot/usr/lib/aarch64-linux-gnu"
  for p in "${unpack_libs[@]}"; do
    dpkg -L "$p:arm64" | grep -E '^/usr/lib/aarch64-linux-gnu/lib[^/]*\.so' | while read -r f; do
      [ -e "$devroot$f" ] || [ -L "$devroot$f" ] || ln -s "$f" "$devroot$f"
    done
  done
  echo "$want_stamp" >"$devroot/.stamp"
  rm -rf "$build/debs"
fi
sed 's/^/  unpacked: /' "$devroot/.stamp"
for p in "${unpack[@]}"; do  # no version skew between an unpacked -dev and its installed libraries
  while read -r n v; do
    [ "$(dpkg-query -W -f='${Version}' "$n:arm64" 2>/dev/null)" = "$v" ] ||
      die "$p wants $n:arm64 $v, which is not the installed version"
  done < <(tr ',' '\n' <<<"${DEP[$p:arm64]}" | sed -n 's/^ *\([^ ]*\) *(= \(.*\))$/\1 \2/p')
done
took "1. packages" "$t"

# ---- 2. cross compile -------------------------------------------------------------------------------
say "2. cross-compiling llmproxy and llmproxy-mock for aarch64 into ${build#"$repo"/}/ (nice -n 19, -j1)"
aarch64-linux-gnu-g++ --version | head -n 1
t=$(now)
mkdir -p "$build"
nice -n 19 cmake -S . -B "$build" -G Ninja \
  -DCMAKE_TOOLCHAIN_FILE="$repo/cmake/aarch64-linux-gnu.cmake" \
  -DLLMPROXY_AARCH64_EXTRA_ROOT="$devroot" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" \
  -DLLMPROXY_BUILD_TESTS=OFF -DLLMPROXY_BUILD_BENCH=OFF -DLLMPROXY_SANITIZE=OFF >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log" >&2; die "cmake configure failed"; }
took "2a. cmake configure" "$t"
t=$(now)
nice -n 19 ninja -C "$build" -j1 llmproxy llmproxy-mock
took "2b. ninja -j1 llmproxy llmproxy-mock" "$t"

# ---- 3. what was built ------------------------------------------------------------------------------
say "3. the binaries"
t=$(now)
for b in llmproxy llmproxy-mock; do
  line=$(file "$build/$b")
  echo "$line"
  grep -q 'ELF 64-bit LSB .*ARM aarch64' <<<"$line" || die "$b is not an aarch64 ELF executable"
done
for b in llmproxy llmproxy-mock; do
  ! aarch64-linux-gnu-readelf -d "$build/$b" | grep -E 'RPATH|RUNPATH' || die "$b has a RUNPATH"
done
# Run under QEMU with Debian's arm64 multiarch loader and libraries (libc6:arm64 etc., installed
# above as dependencies), which is what an arm64 Debian 12 image has; the cross tool chain's own
# copy (/usr/aarch64-linux-gnu) only when the multiarch loader is missing.
qemu=(qemu-aarch64-static)
if [ ! -e /lib/ld-linux-aarch64.so.1 ]; then qemu+=(-L /usr/aarch64-linux-gnu); fi
loader=/lib/ld-linux-aarch64.so.1
[ -e "$loader" ] || loader=/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1
echo "runs with: ${qemu[*]} (loader $loader)"
"${qemu[@]}" --version | head -n 1
# What `ldd` prints inside an arm64 image: the loader's --list, run under QEMU.
libs=$("${qemu[@]}" "$loader" --list "$build/llmproxy" && "${qemu[@]}" "$loader" --list "$build/llmproxy-mock")
! grep 'not found' <<<"$libs" || die "shared libraries not found"
# The Dockerfile's runtime stage installs the packages owning these libraries (same derivation).
runtime_pkgs=$(awk '$2 == "=>" && $3 ~ /^\// {print $3}' <<<"$libs" | sort -u | while read -r lib; do
    case $lib in /usr/*) alt=${lib#/usr} ;; *) alt=/usr$lib ;; esac
    dpkg-query -S "$lib" 2>/dev/null || dpkg-query -S "$alt" 2>/dev/null || die "no package owns $lib"
  done | sed 's/: .*//' | sort -u | paste -sd' ')
echo "linked libraries' packages: $runtime_pkgs"
! grep -q ':amd64' <<<"$runtime_pkgs" || die "an amd64 library was linked"
# Every package that the Dockerfile installs (install-deps.sh --build in the builder stage,
# --runtime and the derived list in the runtime stage) has an arm64 build in Debian 12.
mapfile -t docker_pkgs < <({ array_of runtime; array_of build; tr ' ' '\n' <<<"$runtime_pkgs" |
  cut -d: -f1; } | sort -u)
load "${docker_pkgs[@]/%/:arm64}" "${docker_pkgs[@]/%/:all}"
for p in "${docker_pkgs[@]}"; do
  on_arm64 "$p" || die "the Dockerfile installs $p, which Debian 12 does not have for arm64"
done
echo "all ${#docker_pkgs[@]} packages of install-deps.sh --build/--runtime and of that list exist for arm64"
took "3. file, libraries, package lists" "$t"

# ---- 4. run it --------------------------------------------------------------------------------------
work=$(mktemp -d /tmp/llmproxy-arm64-check.XXXXXX)
mock_pid= gw_pid=
cleanup() {
  local rc=$?
  for p in $gw_pid $mock_pid; do kill -KILL "$p" 2>/dev/null || true; done
  if [ $rc -ne 0 ]; then
    for f in mock.out gw.out; do
      [ -s "$work/$f" ] && { echo "--- last lines of $f:" >&2; tail -n 20 "$work/$f" >&2; }
    done
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
wait_line() {  # wait_line SECONDS PID FILE: until FILE has a "listening on" line (PID must live)
  local end=$(( $(date +%s) + $1 ))
  until grep -q 'listening on' "$3" 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || die "process $2 exited: $(tail -n 5 "$3")"
    [ "$(date +%s)" -lt "$end" ] || die "no 'listening on' line in $3 within $1 s"
    sleep 0.1
  done
}
stop() {  # stop PID NAME: SIGTERM, then wait for the exit (20 s), which must be clean
  local end=$(( $(date +%s) + 20 )) rc=0
  kill -TERM "$1"
  while kill -0 "$1" 2>/dev/null; do
    [ "$(date +%s)" -lt "$end" ] || die "$2 still running 20 s after SIGTERM"
    sleep 0.1
  done
  wait "$1" || rc=$?
  echo "$2 exited with status $rc after SIGTERM"
  [ $rc -eq 0 ] || [ $rc -eq 143 ] || die "$2: exit status $rc"
}

say "4. the arm64 mock backend and gateway under QEMU on 127.0.0.1"
t=$(now)
"${qemu[@]}" "$build/llmproxy-mock" --listen 127.0.0.1:0 --threads 1 --name mock --models mock-model \
  >"$work/mock.out" 2>&1 &
mock_pid=$!
wait_line 60 "$mock_pid" "$work/mock.out"
mock_url=$(grep -o 'http://127.0.0.1:[0-9]*' "$work/mock.out" | head -n 1)
took "4a. mock started (listening line)" "$t"
echo "mock backend: $mock_url (pid $mock_pid)"

cat >"$work/config.yaml" <<EOF
listen: "127.0.0.1:0"
server:
  workers: 1
backends:
  - name: mock
    url: "$mock_url"
    weight: 1
    models: ["mock-model"]
health_check:
  interval: 2s
  path: /health
EOF
t=$(now)
"${qemu[@]}" "$build/llmproxy" --version
"${qemu[@]}" "$build/llmproxy" --check-config "$work/config.yaml"
"${qemu[@]}" "$build/llmproxy" --config "$work/config.yaml" >"$work/gw.out" 2>&1 &
gw_pid=$!
wait_line 60 "$gw_pid" "$work/gw.out"
gw_url=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$work/gw.out" | head -n 1 | sed 's/listening on //')
echo "gateway: $gw_url (pid $gw_pid)"
end=$(( $(date +%s) + 60 ))
until curl -fsS --max-time 5 -o "$work/health" "$gw_url/health" 2>/dev/null; do
  kill -0 "$gw_pid" 2>/dev/null || die "the gateway exited"
  [ "$(date +%s)" -lt "$end" ] || die "GET $gw_url/health: no 200 within 60 s"
  sleep 0.1
done
took "4b. gateway started, /health answers 200" "$t"
echo "GET /health -> $(head -c 200 "$work/health")"

t=$(now)
code=$(curl -sS --max-time 30 -D "$work/chat.headers" -o "$work/chat.body" -w '%{http_code}' \
  "$gw_url/v1/chat/completions" -H 'Content-Type: application/json' -H 'X-Mock-Tokens: 5' \
  -d '{"model":"mock-model","messages":[{"role":"user","content":"Hello"}]}')
took "4c. chat request" "$t"
echo "chat: HTTP $code, $(wc -c <"$work/chat.body") bytes; first bytes:"
head -c 240 "$work/chat.body"; echo
[ "$code" = 200 ] || die "chat request: HTTP $code"
grep -q '"object":"chat.completion"' "$work/chat.body" || die "chat request: no chat.completion"

t=$(now)
code=$(curl -sSN --max-time 30 -D "$work/stream.headers" -o "$work/stream.body" -w '%{http_code}' \
  "$gw_url/v1/chat/completions" -H 'Content-Type: application/json' \
  -H 'X-Mock-Tokens: 5' -H 'X-Mock-Delay-Ms: 20' \
  -d '{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"Hello"}]}')
took "4d. stream (5 tokens x 20 ms)" "$t"
echo "stream: HTTP $code, $(grep -c '^data: ' "$work/stream.body" || true) data lines; first and last:"
grep '^data: ' "$work/stream.body" | head -n 1 | cut -c 1-240
grep '^data: ' "$work/stream.body" | tail -n 1
[ "$code" = 200 ] || die "stream: HTTP $code"
grep -q '^data: \[DONE\]' "$work/stream.body" || die "stream: no data: [DONE]"

t=$(now)
stop "$gw_pid" gateway; gw_pid=
stop "$mock_pid" mock; mock_pid=
took "4e. SIGTERM both, wait for exit" "$t"
echo "gateway log (last lines):"
tail -n 4 "$work/gw.out" | cut -c 1-200

took "total" "$t_all"
say "timings"
printf '%s\n' "${timings[@]}"
echo arm64-check-ok
