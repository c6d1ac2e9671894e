#!/usr/bin/env bash
# End-to-end benchmark: ghz (a gRPC load generator) against the example
# server (go run ./examples/payments serve) on one real redis-server. Each
# kind of call is run against the bare server (serve --bare: the same
# service without the idempotency interceptor, sent the same metadata) and
# against the interceptor, one after the other in one script, so that both
# share the machine's noise. The kinds:
#
#   first    first executions: every call has a new key (the handler runs
#            and its outcome is stored in Redis)
#   replay   replays: every call repeats one of KEYS keys primed before,
#            with the same request (answered from Redis; no handler)
#   local    replays with the local cache (serve --local-cache): answered
#            from the server's memory, with no Redis round trip
#
# Each measured run has a server process of its own (started on the same
# Redis, flushed before) and follows a warm-up run of WARMUP calls on it,
# not counted; the bare and interceptor runs of a kind alternate in ABBA
# order over the rounds. Every ghz run must end with 0 errors, and each
# interceptor run must have done what it measures, per the scripts Redis
# ran during it (INFO commandstats): two per call for first executions (the
# claim, then the outcome: the handler ran in between), one per call for
# replays from Redis (the claim, answered with the record), at most 1 % of
# the calls for replays with the local cache; the bare runs none. The
# script fails otherwise. The servers run without --metrics-addr, so no
# metrics observer adds its cost to the interceptor's.
# It prints, per kind, the median over ROUNDS rounds of requests/s (and the
# interceptor's as "× bare"), p50 and p99 latency as ghz sees it (ms), and
# the CPU time per call (utime+stime from /proc/PID/stat around the
# measured run, in µs) of the server and of redis-server.
#
# ghz, the server and Redis share the machine (2 CPUs on the project's
# machines, and ghz needs about as much CPU as the server): requests/s and
# latencies are comparable within one run of this script, not across
# machines; the server's CPU per call is the steadiest measure of the
# interceptor's cost. It takes a minute or two with the defaults.
#
#   bench/ghz.sh                          # 3 rounds, 4,000 calls at concurrency 50
#   ROUNDS=5 TOTAL=10000 bench/ghz.sh
#   KINDS='first replay' bench/ghz.sh
#   ROUNDS=1 TOTAL=500 WARMUP=100 bench/ghz.sh   # a quick check that it works
#
# Environment: ROUNDS (3), TOTAL (4000: calls per measured run), CONC (50:
# ghz --concurrency), WARMUP (500: calls of the warm-up run, 0 for none),
# KEYS (100: the keys the replay runs cycle through), LOCAL_CACHE (10000:
# serve --local-cache, at least KEYS), LATENCY (0s: serve --latency, the
# handler's time), KINDS ('first replay local'), GHZ_FLAGS (extra ghz flags,
# e.g. '--connections 4'), OUT (output directory, default a new one under
# ${TMPDIR:-/tmp}), GHZ (the ghz binary; default: ghz on PATH or in GOBIN,
# installed with go install when missing).
# Needs go, redis-server and python3 on PATH. Raw ghz output of the measured
# runs: $OUT/<kind>-<bare|interceptor>-r<round>.json; one line per run:
# $OUT/runs.tsv; summary: $OUT/summary.txt; machine: $OUT/machine.txt;
# server and Redis logs: $OUT/logs/.
set -euo pipefail

cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
TOTAL=${TOTAL:-4000}
CONC=${CONC:-50}
WARMUP=${WARMUP:-500}
KEYS=${KEYS:-100}
LOCAL_CACHE=${LOCAL_CACHE:-10000}
LATENCY=${LATENCY:-0s}
KINDS=${KINDS:-first replay local}
GHZ_FLAGS=${GHZ_FLAGS:-}
GHZ_VERSION=v0.120.0

die() {
	echo "bench/ghz.sh: $*" >&2
	exit 1
}

for v in ROUNDS TOTAL CONC KEYS LOCAL_CACHE; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v=${!v}: want a positive integer"
done
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP=$WARMUP: want a number of calls (0 for none)"
[ "$TOTAL" -ge "$CONC" ] || die "TOTAL=$TOTAL is less than CONC=$CONC (ghz refuses that)"
[ "$LOCAL_CACHE" -ge "$KEYS" ] || die "LOCAL_CACHE=$LOCAL_CACHE is less than KEYS=$KEYS: the local runs would miss the cache"
for kind in $KINDS; do
	case $kind in
	first | replay | local) ;;
	*) die "KINDS: unknown kind '$kind' (want first, replay, local)" ;;
	esac
done

command -v go >/dev/null || die "go is not on PATH"
command -v redis-server >/dev/null || die "redis-server is not on PATH (Debian: apt-get install redis-server)"
command -v python3 >/dev/null || die "python3 is not on PATH"

GHZ=${GHZ:-$(command -v ghz || true)}
if [ -z "$GHZ" ]; then
	GOBIN_DIR=$(go env GOBIN)
	GOBIN_DIR=${GOBIN_DIR:-$(go env GOPATH)/bin}
	if [ ! -x "$GOBIN_DIR/ghz" ]; then
		echo "installing ghz $GHZ_VERSION" >&2
		go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
	fi
	GHZ=$GOBIN_DIR/ghz
fi

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/idempotency-ghz.XXXXXX")}
mkdir -p "$OUT/logs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/idempotency-ghz-work.XXXXXX")
SERVER_PID=
REDIS_PID=

cleanup() {
	if [ -n "$SERVER_PID" ]; then
		kill -TERM "$SERVER_PID" 2>/dev/null || true
		wait "$SERVER_PID" 2>/dev/null || true
	fi
	if [ -n "$REDIS_PID" ]; then
		kill -TERM "$REDIS_PID" 2>/dev/null || true
		wait "$REDIS_PID" 2>/dev/null || true
	fi
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The helper: Redis commands, the script counts and their check, the check
# of ghz's JSON output, the summary.
cat >"$WORK/helper.py" <<'PY'
import json, socket, statistics, sys

def fail(msg):
    sys.exit("bench/ghz.sh: " + msg)

def redis_cmd(port, *words):
    """Sends one command (RESP) to Redis on 127.0.0.1:port; returns the first reply line."""
    with socket.create_connection(("127.0.0.1", int(port)), timeout=2) as s:
        s.sendall(("*%d\r\n" % len(words) + "".join("$%d\r\n%s\r\n" % (len(w), w) for w in words)).encode())
        return s.makefile("rb").readline().decode().strip()

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def script_calls(port):
    """Script calls Redis has executed so far (EVALSHA and EVAL, failed ones
    excluded), from INFO commandstats."""
    with socket.create_connection(("127.0.0.1", int(port)), timeout=2) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        f = s.makefile("rb")
        head = f.readline().decode().strip()
        if not head.startswith("$"):
            fail("INFO commandstats replied %r" % head)
        body = f.read(int(head[1:])).decode()
    n = 0
    for line in body.splitlines():
        name, _, fields = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_eval"):
            kv = dict(x.split("=", 1) for x in fields.split(","))
            n += int(kv["calls"]) - int(kv.get("failed_calls", 0))
    return n

def check_scripts(kind, before, after, total):
    """Checks what a measured interceptor run did from the scripts Redis ran:
    a first execution runs two (the claim, then the outcome: the handler ran
    in between), a replay from Redis one (the claim, which returns the
    record), a local-cache replay none."""
    n, total = int(after) - int(before), int(total)
    want = {"first": 2 * total, "replay": total}.get(kind)
    if kind == "local":
        if n > total // 100:
            fail("local: Redis ran %d scripts for %d calls, want at most 1%% (the others answered from the local cache)" % (n, total))
        print("local: Redis ran %d scripts for %d calls: %d answered from the local cache" % (n, total, total - n))
    elif n != want:
        fail("%s: Redis ran %d scripts for %d calls, want %d" % (kind, n, total, want))
    else:
        print("%s: Redis ran %d scripts for %d calls, as it should" % (kind, n, total))

def check_ghz(path, total):
    d, total = json.load(open(path)), int(total)
    codes, errs = d.get("statusCodeDistribution") or {}, d.get("errorDistribution") or {}
    if d.get("count") != total or codes != {"OK": total} or errs:
        fail("%s: %s calls, status codes %s, errors %s; want %d OK and no error" % (path, d.get("count"), codes, errs, total))

def row(path, kind, side, rnd, cpu_ticks, redis_ticks, hz, total):
    """One line of runs.tsv for a measured run."""
    d, total, hz = json.load(open(path)), int(total), int(hz)
    pct = {p["percentage"]: p["latency"] / 1e6 for p in d.get("latencyDistribution") or []}
    print("\t".join([kind, side, rnd, "%.0f" % d["rps"], "%.3f" % pct[50], "%.3f" % pct[99],
                     "%.1f" % (int(cpu_ticks) * 1e6 / hz / total), "%.1f" % (int(redis_ticks) * 1e6 / hz / total)]))

TITLES = {"first": "first executions (every call a new key)",
          "replay": "replays (each call repeats a primed key, answered from Redis)",
          "local": "replays with the local cache (serve --local-cache)"}

def summary(tsv, kinds, rounds, total, conc, hz):
    runs = [l.rstrip("\n").split("\t") for l in open(tsv)][1:]
    print("(CPU times are counted in clock ticks of 1/%s s: %.1f µs per call at %s calls)\n" % (hz, 1e6 / int(hz) / int(total), total))
    for kind in kinds.split():
        med = {}
        for side in ("bare", "interceptor"):
            rs = [r for r in runs if r[0] == kind and r[1] == side]
            if rs:
                med[side] = [statistics.median(float(r[i]) for r in rs) for i in range(3, 8)]
        if not med:
            continue
        print("%s: median of %s rounds, %s calls at concurrency %s" % (TITLES[kind], rounds, total, conc))
        print("  %-12s %9s %8s %8s %8s %15s %14s" % ("", "req/s", "× bare", "p50 ms", "p99 ms", "server µs/call", "redis µs/call"))
        for side, m in med.items():
            ratio = "%.2f×" % (m[0] / med["bare"][0]) if "bare" in med else "-"
            print("  %-12s %9.0f %8s %8.2f %8.2f %15.1f %14.1f" % (side, m[0], ratio, m[1], m[2], m[3], m[4]))
        # The ratio of each round (its two runs ran back to back), which
        # shares the machine's noise better than the ratio of the medians.
        per_round = {}
        for r in runs:
            if r[0] == kind:
                per_round.setdefault(r[2], {})[r[1]] = float(r[3])
        ratios = sorted(v["interceptor"] / v["bare"] for v in per_round.values() if len(v) == 2)
        if ratios:
            print("  interceptor req/s ÷ bare req/s, round by round: median %.2f×, range %.2f–%.2f× (%s)" % (
                statistics.median(ratios), ratios[0], ratios[-1], " ".join("%.2f" % x for x in ratios)))
        if len(med) == 2:
            print("  interceptor - bare: %+.1f µs of server CPU per call, %+.1f µs of Redis CPU per call" % (
                med["interceptor"][3] - med["bare"][3], med["interceptor"][4] - med["bare"][4]))
        print()

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "free-port":
    print(free_port())
elif cmd == "redis":
    print(redis_cmd(*args))
elif cmd == "script-calls":
    print(script_calls(*args))
else:
    {"check-scripts": check_scripts, "check-ghz": check_ghz, "row": row, "summary": summary}[cmd](*args)
PY
helper() { python3 "$WORK/helper.py" "$@"; }

load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime; }
{
	echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')"
	echo "# $(go version)"
	echo "# $(redis-server --version 2>/dev/null)"
	echo "# ghz: $GHZ ($(go version -m "$GHZ" 2>/dev/null | awk '$1 == "mod" { print $2, $3 }'))"
	echo "# commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- '*.go' 2>/dev/null || echo ' + uncommitted changes to .go files')"
	echo "# load average before: $(load)"
	echo "# ROUNDS=$ROUNDS TOTAL=$TOTAL CONC=$CONC WARMUP=$WARMUP KEYS=$KEYS LOCAL_CACHE=$LOCAL_CACHE LATENCY=$LATENCY KINDS='$KINDS' GHZ_FLAGS='$GHZ_FLAGS'"
} | tee "$OUT/machine.txt"

echo "building the example server" >&2
go build -o "$WORK/payments" ./examples/payments

# One redis-server for the whole run, on a free port (tried again if another
# process takes the port first).
mkdir -p "$WORK/redis"
for attempt in 1 2 3 4 5; do
	REDIS_PORT=$(helper free-port)
	redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
		--dir "$WORK/redis" --logfile "$OUT/logs/redis.log" &
	REDIS_PID=$!
	for _ in $(seq 50); do
		[ "$(helper redis "$REDIS_PORT" PING 2>/dev/null)" = "+PONG" ] && break 2
		kill -0 "$REDIS_PID" 2>/dev/null || break
		sleep 0.1
	done
	kill -TERM "$REDIS_PID" 2>/dev/null || true
	wait "$REDIS_PID" 2>/dev/null || true
	REDIS_PID=
	[ "$attempt" -lt 5 ] || die "redis-server did not start; see $OUT/logs/redis.log"
done
echo "# redis-server on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)" | tee -a "$OUT/machine.txt"

HZ=$(getconf CLK_TCK)
# cpu_ticks PID: the user and system CPU time of PID so far, in clock ticks
# (fields 14 and 15 of /proc/PID/stat, counted after the command name).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

# start_server NAME ARGS...: starts "payments serve" with ARGS, sets
# SERVER_PID and SERVER_ADDR. No --metrics-addr: the metrics observer would
# add its own cost to the interceptor's.
start_server() {
	local log="$OUT/logs/$1.log"
	shift
	"$WORK/payments" serve --addr 127.0.0.1:0 --quiet --latency "$LATENCY" "$@" 2>"$log" &
	SERVER_PID=$!
	SERVER_ADDR=
	for _ in $(seq 200); do
		SERVER_ADDR=$(sed -n 's/.* serving payments\.v1\.PaymentsService on \([^ ]*\) .*/\1/p' "$log")
		[ -n "$SERVER_ADDR" ] && return 0
		kill -0 "$SERVER_PID" 2>/dev/null || break
		sleep 0.1
	done
	cat "$log" >&2
	die "payments serve $* did not start (log: $log)"
}

stop_server() {
	kill -TERM "$SERVER_PID"
	if ! wait "$SERVER_PID"; then
		SERVER_PID=
		die "the server exited with an error; see its log in $OUT/logs/"
	fi
	SERVER_PID=
}

BODY='{"account_id":"acct_1","amount_cents":1999,"currency":"EUR"}'
# ghz_run OUTPUT CALLS CONCURRENCY KEY_TEMPLATE: Charge, CALLS times, with
# the idempotency key KEY_TEMPLATE (a ghz template, executed per call); fails
# unless every call was OK.
ghz_run() {
	local flags=()
	read -r -a flags <<<"$GHZ_FLAGS"
	if ! "$GHZ" --insecure --proto proto/payments/v1/payments.proto --import-paths proto \
		--call payments.v1.PaymentsService/Charge -d "$BODY" \
		-m "{\"idempotency-key\":\"$4\"}" -n "$2" -c "$3" "${flags[@]}" -O json -o "$1" "$SERVER_ADDR"; then
		die "ghz failed (output: $1)"
	fi
	helper check-ghz "$1" "$2"
}

RUN_ID=$(date +%s)-$$
printf 'kind\tserver\tround\treq/s\tp50 ms\tp99 ms\tserver us/call\tredis us/call\n' >"$OUT/runs.tsv"

# measure KIND SIDE ROUND: one measured run on a fresh server.
measure() {
	local kind=$1 side=$2 round=$3
	local name="$kind-$side-r$round"
	local prefix="$RUN_ID-$name" args=()
	case $side in
	bare) args=(--bare) ;;
	interceptor) args=(--redis "127.0.0.1:$REDIS_PORT") ;;
	esac
	[ "$kind" = local ] && [ "$side" = interceptor ] && args+=(--local-cache "$LOCAL_CACHE")
	[ "$(helper redis "$REDIS_PORT" FLUSHALL)" = "+OK" ] || die "FLUSHALL failed"
	start_server "$name" "${args[@]}"

	local warm_key key
	case $kind in
	first)
		warm_key="$prefix-w-{{.RequestNumber}}"
		key="$prefix-{{.RequestNumber}}"
		;;
	replay | local)
		key="$prefix-{{mod .RequestNumber $KEYS}}"
		warm_key=$key
		# Prime: one call per key, one at a time (concurrent first calls
		# of a key would be refused as in progress).
		ghz_run "$WORK/prime.json" "$KEYS" 1 "$key"
		;;
	esac
	if [ "$WARMUP" -gt 0 ]; then
		ghz_run "$WORK/warmup.json" "$WARMUP" "$((WARMUP < CONC ? WARMUP : CONC))" "$warm_key"
	fi

	local cpu0 redis0 cpu1 redis1 scripts0 scripts1
	scripts0=$(helper script-calls "$REDIS_PORT")
	cpu0=$(cpu_ticks "$SERVER_PID")
	redis0=$(cpu_ticks "$REDIS_PID")
	ghz_run "$OUT/$name.json" "$TOTAL" "$CONC" "$key"
	cpu1=$(cpu_ticks "$SERVER_PID")
	redis1=$(cpu_ticks "$REDIS_PID")
	scripts1=$(helper script-calls "$REDIS_PORT")
	if [ "$side" = interceptor ]; then
		helper check-scripts "$kind" "$scripts0" "$scripts1" "$TOTAL"
	elif [ "$scripts1" != "$scripts0" ]; then
		die "$name: the bare server ran $((scripts1 - scripts0)) Redis scripts"
	fi
	stop_server
	helper row "$OUT/$name.json" "$kind" "$side" "$round" "$((cpu1 - cpu0))" "$((redis1 - redis0))" "$HZ" "$TOTAL" |
		tee -a "$OUT/runs.tsv"
}

for round in $(seq "$ROUNDS"); do
	# ABBA: bare first in odd rounds, the interceptor first in even ones.
	sides="bare interceptor"
	[ $((round % 2)) -eq 0 ] && sides="interceptor bare"
	for kind in $KINDS; do
		for side in $sides; do
			measure "$kind" "$side" "$round"
		done
	done
done

echo "# load average after: $(load)" | tee -a "$OUT/machine.txt"
echo
helper summary "$OUT/runs.tsv" "$KINDS" "$ROUNDS" "$TOTAL" "$CONC" "$HZ" | tee "$OUT/summary.txt"
echo "raw: $OUT/<kind>-<server>-r<round>.json  runs: $OUT/runs.tsv  summary: $OUT/summary.txt  machine: $OUT/machine.txt"
