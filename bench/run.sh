#!/usr/bin/env bash
# Runs the interceptor benchmarks (bench_test.go: BenchmarkUnary,
# BenchmarkUnaryParallel, BenchmarkLargeResponse, BenchmarkRecordMemory,
# BenchmarkCoalescing; and observe_bench_test.go) COUNT times and summarises
# them with benchstat. See docs/PERFORMANCE.md. The full run takes about
# 5 minutes on 2 vCPUs.
#
#   bench/run.sh                      # everything, count 6, benchtime 500ms
#   COUNT=10 BENCHTIME=1s bench/run.sh
#   BENCH='BenchmarkUnary$' bench/run.sh
#   BENCH='BenchmarkCoalescing' bench/run.sh
#   WAIT_IDLE=1 bench/run.sh          # on a shared machine: wait for a quiet moment first
#
# Environment: COUNT (6), BENCHTIME (500ms), BENCH ('.'), OUT (output
# directory, default a new one under ${TMPDIR:-/tmp}), WAIT_IDLE (unset),
# NICE (-10: the benchmark process and the redis-server it starts run at
# this niceness when allowed, so that other work on the machine disturbs
# them less; NICE=0 to disable).
# The Redis benchmarks need redis-server on PATH; without it they skip (and
# fail when CI is set). Raw output: $OUT/bench.txt; summary: $OUT/benchstat.txt.
set -euo pipefail

cd "$(dirname "$0")/.."

COUNT=${COUNT:-6}
BENCHTIME=${BENCHTIME:-500ms}
BENCH=${BENCH:-.}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/idempotency-bench.XXXXXX")}
mkdir -p "$OUT"

BENCHSTAT=$(command -v benchstat || true)
if [ -z "$BENCHSTAT" ]; then
	GOBIN_DIR=$(go env GOBIN)
	GOBIN_DIR=${GOBIN_DIR:-$(go env GOPATH)/bin}
	if [ ! -x "$GOBIN_DIR/benchstat" ]; then
		echo "installing benchstat" >&2
		go install golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da
	fi
	BENCHSTAT=$GOBIN_DIR/benchstat
fi

load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime; }

if [ -n "${WAIT_IDLE:-}" ]; then
	# Wait (at most 10 minutes) until the 1-minute load is below half the CPUs.
	limit=$(awk -v n="$(nproc)" 'BEGIN { print n / 2 }')
	for _ in $(seq 120); do
		awk -v l="$(cut -d' ' -f1 /proc/loadavg)" -v m="$limit" 'BEGIN { exit !(l < m) }' && break
		echo "waiting for an idle machine: load $(load), want < $limit" >&2
		sleep 5
	done
fi

{
	echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')"
	echo "# $(go version)"
	echo "# $(redis-server --version 2>/dev/null || echo 'redis-server: not installed')"
	echo "# commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- '*.go' 2>/dev/null || echo ' + uncommitted changes to .go files')"
	echo "# load average before: $(load)"
	echo "# go test -run '^\$' -bench '$BENCH' -benchmem -benchtime $BENCHTIME -count $COUNT ."
} | tee "$OUT/machine.txt"

NICE=${NICE:--10}
RUN=()
if [ "$NICE" != 0 ] && nice -n "$NICE" true 2>/dev/null; then
	RUN=(nice -n "$NICE")
fi
echo "# niceness: ${NICE} ($([ ${#RUN[@]} -gt 0 ] && echo applied || echo 'not applied'))" | tee -a "$OUT/machine.txt"

# -run '^$': benchmarks only. Lines benchstat does not recognise are ignored.
"${RUN[@]}" go test -run '^$' -bench "$BENCH" -benchmem -benchtime "$BENCHTIME" -count "$COUNT" -timeout 60m . | tee "$OUT/bench.txt"

echo "# load average after: $(load)" | tee -a "$OUT/machine.txt"

"$BENCHSTAT" "$OUT/bench.txt" | tee "$OUT/benchstat.txt"
echo
echo "raw: $OUT/bench.txt  summary: $OUT/benchstat.txt  machine: $OUT/machine.txt"
