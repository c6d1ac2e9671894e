#!/usr/bin/env bash
# The newcomer path, timed: a fresh clone, an empty module cache and an empty
# build cache (GOMODCACHE and GOCACHE pointed at new directories), then the
# README's two commands from the root, `go run ./examples/payments` and
# `go test -vet=off work`. The README's Development section quotes its figures; the
# goal is under 3 minutes for both together.
#
#   bash bench/newcomer.sh            # clones this repository's HEAD
#   bash bench/newcomer.sh <repo>     # clones <repo> (a path or URL) instead
#
# Each command's time is split in two: its downloads (`go list -deps` of the
# same packages, which fetches what the command would fetch first, and
# builds nothing), then the command itself (building and running). The sum
# is the newcomer's wait. IDEMPOTENCY_LONG is unset, as on a newcomer's
# machine; redis-server and PostgreSQL should be installed (the tests that
# need them skip without them, which would make the figures look better).
# Go's own toolchain download is not counted: the local go must satisfy
# go.work. Output: a table on stdout and in $OUT/summary.md, with the logs
# ($OUT: default a new directory under ${TMPDIR:-/tmp}); the exit status is
# 1 if a command failed.
set -euo pipefail

src="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/idempotency-newcomer.XXXXXX")}
mkdir -p "$OUT"
work="$(mktemp -d "${TMPDIR:-/tmp}/idempotency-newcomer-work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

git clone -q "$src" "$work/repo"
export GOMODCACHE="$work/gomodcache" GOCACHE="$work/gocache"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-modcacherw" # so the trap can remove the module cache
unset IDEMPOTENCY_LONG
cd "$work/repo"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
modules() { [ -d "$GOMODCACHE/cache/download" ] && find "$GOMODCACHE/cache/download" -name '*.zip' | wc -l || echo 0; }

# step NAME GO-LIST-ARGS... -- COMMAND...: times the downloads (go list
# with those arguments), then the command.
step() {
  local name="$1"; shift
  local list=()
  while [ "$1" != "--" ]; do list+=("$1"); shift; done
  shift
  local before t0 t1 t2
  before=$(modules)
  t0=$(now)
  go list "${list[@]}" >/dev/null 2>"$OUT/$name.download.log"
  t1=$(now)
  local result=ok
  if ! "$@" >"$OUT/$name.log" 2>&1; then
    result="FAILED (see $OUT/$name.log)"; failed=1
  fi
  t2=$(now)
  printf '| `%s` | %s | %s | %s | %s | %s |\n' "$*" "$(secs "$t0" "$t1")" "$(secs "$t1" "$t2")" "$(secs "$t0" "$t2")" "$(( $(modules) - before ))" "$result" | tee -a "$OUT/summary.md"
  total=$(awk -v a="$total" -v b="$(secs "$t0" "$t2")" 'BEGIN { printf "%.1f", a + b }')
}

{
  echo "newcomer path on $(git log -1 --format='%h %cs'), $(go version | cut -d' ' -f3-4), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo '| command | downloads (s) | build and run (s) | total (s) | modules fetched | result |'
  echo '| --- | ---: | ---: | ---: | ---: | --- |'
} | tee "$OUT/summary.md"
total=0 failed=0
step demo -deps ./examples/payments -- go run ./examples/payments
step test -deps -test work -- go test -vet=off work
{
  echo
  echo "both commands: ${total} s, load afterwards $(cut -d' ' -f1-3 /proc/loadavg) ($(modules) modules, $(du -sh "$GOMODCACHE/cache/download" | cut -f1) of module downloads; build cache $(du -sh "$GOCACHE" | cut -f1)); logs in $OUT"
  awk -v t="$total" 'BEGIN { exit !(t < 180) }' && echo "under 3 minutes: yes" || echo "under 3 minutes: NO"
} | tee -a "$OUT/summary.md"
exit "$failed"
