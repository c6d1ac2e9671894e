//go:build linux || darwin

package idempotency

// Benchmarks of the server interceptor (docs/PERFORMANCE.md, bench/run.sh).
//
// Every benchmark runs over bufconn. Each one measured against a baseline
// measures that baseline in the same benchmark function, in two ways:
//
//   - as sub-benchmarks of their own, run first (the bare call, one Redis
//     round trip, the floor), which give the baselines' rows in the table;
//   - in a paired phase after the timed loop of every sub-benchmark that
//     reports a ratio: up to pairedSamples calls of each kind (the measured
//     call, the bare call, a PING, the floor call), in short blocks of one
//     kind taking turns, each call timed on its own (wall clock and process
//     CPU). The ratios come from the medians of these samples, so baseline
//     and measured call see the same machine at the same moment, and a
//     call that lost its CPU to another process does not move them.
//
// Custom metrics (b.ReportMetric), per call:
//
//	roundtrips/op      Redis commands, counted with a go-redis hook (timed loop)
//	cpu-ns/op          process CPU time (user+sys, getrusage) in the timed
//	                   loop: client, server, go-redis, and miniredis when in
//	                   process; not the redis-server process
//	p50-ns/op          median wall time of the call in the paired phase
//	overhead-%         (p50 call - p50 bare) / p50 bare, wall time
//	cpu-overhead-%     the same with the median process CPU time per call
//	rtt-overhead/op    (p50 call - p50 bare) / p50 PING on the same backend
//	rtt-over-floor/op  (p50 call - p50 floor) / p50 PING, where the floor is
//	                   the bare call whose handler makes as many PINGs as the
//	                   call makes round trips (1 replay, 2 first execution)
//	payload-copies/op  bytes allocated per call beyond the bare call's, in
//	                   units of the payload size (large responses)
//	claims/op          Store.Claim calls per call (replay-localcache rows),
//	                   counted by a wrapper around the store
//
// BenchmarkCoalescing's op is a burst of coalesceBurst concurrent identical
// calls (ns/op is wall time per burst); it reports claims/op and, on Redis,
// roundtrips/op per burst.
//
// The parallel benchmarks report overhead-% and cpu-overhead-% from the
// means of their timed loops against the parallel bare sub-benchmark.
//
// The Redis benchmarks use the shared redis-server of the tests: they skip
// when redis-server is not on PATH, and fail when CI is set.

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// benchSeq makes first-execution keys unique across sub-benchmarks and runs.
var benchSeq atomic.Uint64

// cpuTime is the CPU time (user + system) used by this process so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func totalAlloc() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.TotalAlloc
}

// perOp is what one timed loop measured, per call.
type perOp struct {
	ns, cpuNs, bytes, roundTrips float64
}

// meter measures one timed loop: start resets the benchmark timer, stop
// stops it and returns per-call figures.
type meter struct {
	b      *testing.B
	rt     *roundTrips
	rt0    int64
	cpu0   time.Duration
	alloc0 uint64
}

func startMeter(b *testing.B, rt *roundTrips) *meter {
	m := &meter{b: b, rt: rt}
	runtime.GC()
	m.alloc0 = totalAlloc()
	if rt != nil {
		m.rt0 = rt.n.Load()
	}
	m.cpu0 = cpuTime()
	b.ResetTimer()
	return m
}

func (m *meter) stop() perOp {
	m.b.StopTimer()
	cpu := cpuTime() - m.cpu0
	n := float64(m.b.N)
	r := perOp{
		ns:    float64(m.b.Elapsed().Nanoseconds()) / n,
		cpuNs: float64(cpu.Nanoseconds()) / n,
		bytes: float64(totalAlloc()-m.alloc0) / n,
	}
	if m.rt != nil {
		r.roundTrips = float64(m.rt.n.Load()-m.rt0) / n
	}
	return r
}

// report reports the timed loop's custom metrics.
func (r perOp) report(b *testing.B, withRT bool) {
	b.ReportMetric(r.cpuNs, "cpu-ns/op")
	if withRT {
		b.ReportMetric(r.roundTrips, "roundtrips/op")
	}
}

// parallelBase is the parallel bare call's timed loop, for the ratios of
// the parallel benchmarks (BenchmarkUnaryParallel clears it first).
var parallelBase struct {
	mu sync.Mutex
	v  *perOp
	// floors: the parallel floor's timed loop on redis-server, by the
	// number of PINGs its handler makes.
	floors map[int]*perOp
}

// pairedSamples bounds the paired phase: min(b.N, pairedSamples) timed
// calls of each kind.
const pairedSamples = 1000

// pairedBlock is how many calls of one kind the paired phase makes in a
// row; the first of each block is not counted, so that every counted call
// follows a call of its own kind, as in the timed loop.
const pairedBlock = 8

// median is the median wall and process CPU time of one call.
type median struct{ ns, cpuNs float64 }

// paired times samples calls of each of calls, in blocks of pairedBlock
// calls of one kind, the kinds taking turns in an order rotated every
// round, each call timed on its own; it returns the median of each kind.
// Blocks last about a millisecond, so every kind sees the same machine.
func paired(b *testing.B, samples int, calls ...func() error) []median {
	b.Helper()
	wall := make([][]float64, len(calls))
	cpu := make([][]float64, len(calls))
	for r := 0; len(wall[0]) < samples; r++ {
		for j := range calls {
			i := (r + j) % len(calls)
			for k := 0; k < pairedBlock; k++ {
				c0, t0 := cpuTime(), time.Now()
				if err := calls[i](); err != nil {
					b.Fatalf("paired call %d: %v", i, err)
				}
				if k > 0 {
					wall[i] = append(wall[i], float64(time.Since(t0).Nanoseconds()))
					cpu[i] = append(cpu[i], float64((cpuTime() - c0).Nanoseconds()))
				}
			}
		}
	}
	out := make([]median, len(calls))
	for i := range calls {
		out[i] = median{ns: p50(wall[i]), cpuNs: p50(cpu[i])}
	}
	return out
}

func p50(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// reportVsBare reports the ratios of call to bare (medians).
func reportVsBare(b *testing.B, call, bare median) {
	b.ReportMetric(call.ns, "p50-ns/op")
	b.ReportMetric(100*(call.ns-bare.ns)/bare.ns, "overhead-%")
	b.ReportMetric(100*(call.cpuNs-bare.cpuNs)/bare.cpuNs, "cpu-overhead-%")
}

// benchEnv is a gRPC server on bufconn, with the idempotency interceptor
// on store unless store is nil, and a client.
type benchEnv struct {
	svc    *testService
	client testingv1.TestServiceClient
}

// warmUp loads the scripts (the first use of each costs an extra EVAL) and,
// unless path is "first", stores the record a replay answers with; it
// returns that record's key ("" for "first").
func warmUp(b *testing.B, env *benchEnv, path string) string {
	b.Helper()
	replayKey := ""
	if path != "first" {
		replayKey = newKey()
	}
	for _, k := range []string{newKey(), replayKey} {
		if k != "" {
			if err := env.call(benchReq, k)(); err != nil {
				b.Fatal(err)
			}
		}
	}
	return replayKey
}

func newBenchEnv(tb testing.TB, store Store, svc *testService, opts ...Option) *benchEnv {
	tb.Helper()
	if svc == nil {
		svc = &testService{}
	}
	var serverOpts []grpc.ServerOption
	if store != nil {
		serverOpts = append(serverOpts, grpc.ChainUnaryInterceptor(UnaryServerInterceptor(store, opts...)))
	}
	lis := testservice.Serve(tb, svc, serverOpts...)
	client := testservice.Dial(tb, lis, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.MaxCallSendMsgSize(16<<20)))
	env := &benchEnv{svc: svc, client: client}
	// Connect and warm up outside the timer.
	if _, err := env.client.Do(context.Background(), &testingv1.DoRequest{Id: "warm"}); err != nil {
		tb.Fatalf("warm-up call: %v", err)
	}
	return env
}

// call returns one call of req on env: with a new key each time (first
// execution) when key is empty, else with key.
func (env *benchEnv) call(req *testingv1.DoRequest, key string) func() error {
	ctx := context.Background()
	return func() error {
		k := key
		if k == "" {
			k = newKey()
		}
		_, err := env.client.Do(keyCtx(ctx, k), req)
		return err
	}
}

// floorEnv is a server without the interceptor whose handler makes n
// PINGs on r before answering: the floor of a check costing n round trips.
func floorEnv(b *testing.B, r *benchRedis, n int) *benchEnv {
	return newBenchEnv(b, nil, &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, x int64) (*testingv1.DoResponse, error) {
		for i := 0; i < n; i++ {
			if err := r.client.Ping(ctx).Err(); err != nil {
				return nil, err
			}
		}
		return &testingv1.DoResponse{Id: req.GetId(), Execution: x}, nil
	}})
}

// benchRedis is a go-redis client on one backend, with a round-trip
// counter and a key prefix unique to this use.
type benchRedis struct {
	name   string
	client *redis.Client
	rt     *roundTrips
	prefix string
}

func (r *benchRedis) store() Store { return NewRedisStore(r.client, WithKeyPrefix(r.prefix)) }

func (r *benchRedis) ping() error { return r.client.Ping(context.Background()).Err() }

// benchRedisBackend returns a client on a fresh miniredis or on the shared
// redis-server; it skips the benchmark when redis-server is missing (and CI
// is unset).
func benchRedisBackend(b *testing.B, name string) *benchRedis {
	b.Helper()
	var addr string
	switch name {
	case "miniredis":
		addr = miniredis.RunT(b).Addr()
	case "redis-server":
		addr = sharedRedisServer(b).Addr
	default:
		b.Fatalf("unknown backend %q", name)
	}
	c := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	b.Cleanup(func() { c.Close() })
	rt := &roundTrips{}
	c.AddHook(rt)
	if err := c.Ping(context.Background()).Err(); err != nil {
		b.Fatalf("%s: %v", name, err)
	}
	return &benchRedis{name: name, client: c, rt: rt,
		prefix: fmt.Sprintf("bench:%s:%d:", b.Name(), time.Now().UnixNano())}
}

var benchStores = []string{"memory", "miniredis", "redis-server"}

// benchPaths are the interceptor paths benchmarked on store name: first
// execution, replay, and (memory and redis-server only) replay with
// WithLocalCache, answered from process memory.
func benchPaths(name string) []string {
	if name == "miniredis" {
		return []string{"first", "replay"}
	}
	return []string{"first", "replay", "replay-localcache"}
}

// benchLocalCache is the local cache of the replay-localcache rows.
func benchLocalCache() Option { return WithLocalCache(10000, time.Minute) }

// benchTTL keeps the records of first-execution benchmarks from piling up
// in the shared redis-server; its value does not change the cost.
const benchTTL = 2 * time.Minute

// benchOpts are the interceptor options of a benchmark on path: a first
// execution keeps its records for benchTTL only, a replay's record must
// outlive the benchmark.
func benchOpts(path string) []Option {
	switch path {
	case "first":
		return []Option{WithTTL(benchTTL)}
	case "replay-localcache":
		return []Option{benchLocalCache()}
	}
	return nil
}

// keyCtx returns ctx carrying key, as every benchmarked call does (the
// bare baseline too, so the client does the same work in every variant).
func keyCtx(ctx context.Context, key string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, DefaultKeyHeader, key)
}

func newKey() string { return "bench-" + strconv.FormatUint(benchSeq.Add(1), 10) }

var benchReq = &testingv1.DoRequest{Id: "bench", Amount: 100}

// runCalls runs b.N calls of call, failing the benchmark on an error.
func runCalls(b *testing.B, call func() error) {
	for i := 0; i < b.N; i++ {
		if err := call(); err != nil {
			b.Fatalf("call %d: %v", i, err)
		}
	}
}

func runCallsParallel(b *testing.B, env *benchEnv, req *testingv1.DoRequest, replayKey string) {
	b.RunParallel(func(pb *testing.PB) {
		call := env.call(req, replayKey)
		for pb.Next() {
			if err := call(); err != nil {
				b.Errorf("call: %v", err)
				return
			}
		}
	})
}

// noopScript is the cheapest script call: EVALSHA of "return 1".
var noopScript = redis.NewScript("return 1")

// BenchmarkUnary measures one unary call at a time: the bare call, then
// per store the call through the interceptor, first execution (a new key
// per call) and replay (the same key). Each Redis backend's group starts
// with its baselines: one Redis round trip alone (PING, and EVALSHA of a
// no-op script), and the floor: the bare call whose handler makes one
// (two) PINGs itself, what any check costing that many round trips costs
// at least.
func BenchmarkUnary(b *testing.B) {
	b.Run("bare", func(b *testing.B) {
		b.ReportAllocs()
		env := newBenchEnv(b, nil, nil)
		m := startMeter(b, nil)
		runCalls(b, env.call(benchReq, ""))
		m.stop().report(b, false)
	})
	for _, name := range benchStores {
		if name != "memory" {
			benchRedisBaselines(b, name)
		}
		for _, path := range benchPaths(name) {
			b.Run(name+"/"+path, func(b *testing.B) {
				b.ReportAllocs()
				var store Store = NewMemoryStore()
				var r *benchRedis
				if name != "memory" {
					r = benchRedisBackend(b, name)
					store = r.store()
				}
				var counted *countingStore
				if path == "replay-localcache" {
					counted = &countingStore{Store: store}
					store = counted
				}
				bare := newBenchEnv(b, nil, nil)
				env := newBenchEnv(b, store, nil, benchOpts(path)...)
				replayKey := warmUp(b, env, path)
				var rt *roundTrips
				if r != nil {
					rt = r.rt
				}
				call := env.call(benchReq, replayKey)
				runs0 := env.svc.Runs.Load()
				var claims0 int64
				if counted != nil {
					claims0 = counted.claims.Load()
				}
				m := startMeter(b, rt)
				runCalls(b, call)
				res := m.stop()
				checkRuns(b, env, runs0, path)
				res.report(b, r != nil)
				if counted != nil {
					b.ReportMetric(float64(counted.claims.Load()-claims0)/float64(b.N), "claims/op")
				}

				calls := []func() error{call, bare.call(benchReq, "")}
				// The floor: a handler making as many PINGs as the call
				// makes round trips (none for a local-cache replay, whose
				// floor is the bare call itself).
				floorRT := map[string]int{"first": 2, "replay": 1}[path]
				if r != nil {
					calls = append(calls, r.ping)
					if floorRT > 0 {
						calls = append(calls, floorEnv(b, r, floorRT).call(benchReq, ""))
					}
				}
				med := paired(b, min(b.N, pairedSamples), calls...)
				reportVsBare(b, med[0], med[1])
				if r != nil {
					b.ReportMetric((med[0].ns-med[1].ns)/med[2].ns, "rtt-overhead/op")
					if floorRT > 0 {
						b.ReportMetric((med[0].ns-med[3].ns)/med[2].ns, "rtt-over-floor/op")
					}
				}
			})
		}
	}
}

// benchRedisBaselines runs the baseline sub-benchmarks of one Redis
// backend: the round trip alone, and the floor.
func benchRedisBaselines(b *testing.B, name string) {
	b.Run(name+"/rtt/ping", func(b *testing.B) {
		b.ReportAllocs()
		r := benchRedisBackend(b, name)
		m := startMeter(b, r.rt)
		runCalls(b, r.ping)
		m.stop().report(b, true)
		b.ReportMetric(paired(b, min(b.N, pairedSamples), r.ping)[0].ns, "p50-ns/op")
	})
	b.Run(name+"/rtt/evalsha-noop", func(b *testing.B) {
		b.ReportAllocs()
		r := benchRedisBackend(b, name)
		ctx := context.Background()
		if err := noopScript.Load(ctx, r.client).Err(); err != nil {
			b.Fatal(err)
		}
		eval := func() error { return noopScript.EvalSha(ctx, r.client, nil).Err() }
		m := startMeter(b, r.rt)
		runCalls(b, eval)
		m.stop().report(b, true)
		med := paired(b, min(b.N, pairedSamples), eval, r.ping)
		b.ReportMetric(med[0].ns, "p50-ns/op")
		b.ReportMetric(med[0].ns/med[1].ns, "rtt/op")
	})
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("%s/floor/%drt", name, n), func(b *testing.B) {
			b.ReportAllocs()
			r := benchRedisBackend(b, name)
			bare := newBenchEnv(b, nil, nil)
			call := floorEnv(b, r, n).call(benchReq, "")
			m := startMeter(b, r.rt)
			runCalls(b, call)
			m.stop().report(b, true)
			med := paired(b, min(b.N, pairedSamples), call, bare.call(benchReq, ""), r.ping)
			reportVsBare(b, med[0], med[1])
			b.ReportMetric((med[0].ns-med[1].ns)/med[2].ns, "rtt-overhead/op")
		})
	}
}

// checkRuns fails the benchmark when the handler did not run once per
// first-execution call, or ran for a replay.
func checkRuns(b *testing.B, env *benchEnv, before int64, path string) {
	b.Helper()
	got := env.svc.Runs.Load() - before
	want := int64(b.N)
	if path != "first" {
		want = 0
	}
	if got != want {
		b.Fatalf("%s: the handler ran %d times for %d calls, want %d", path, got, b.N, want)
	}
}

// benchParallelism: goroutines per GOMAXPROCS in the parallel benchmarks,
// so that calls waiting on Redis do not leave the CPUs idle.
const benchParallelism = 8

// BenchmarkUnaryParallel measures throughput: benchParallelism ×
// GOMAXPROCS goroutines calling at once. ns/op is wall time per call
// (1e9 / ns/op = calls/s); cpu-ns/op is what each call costs this process.
// overhead-% and cpu-overhead-% compare the means of the timed loops with
// the parallel bare sub-benchmark's; of-floor-throughput-% (redis-server
// first execution and replay) is the row's calls/s as a share of the
// parallel floor's with as many PINGs.
func BenchmarkUnaryParallel(b *testing.B) {
	parallelBase.mu.Lock()
	parallelBase.v, parallelBase.floors = nil, map[int]*perOp{}
	parallelBase.mu.Unlock()
	b.Run("bare", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(benchParallelism)
		env := newBenchEnv(b, nil, nil)
		m := startMeter(b, nil)
		runCallsParallel(b, env, benchReq, "")
		r := m.stop()
		r.report(b, false)
		parallelBase.mu.Lock()
		parallelBase.v = &r
		parallelBase.mu.Unlock()
	})
	b.Run("redis-server/rtt/ping", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(benchParallelism)
		r := benchRedisBackend(b, "redis-server")
		m := startMeter(b, r.rt)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := r.ping(); err != nil {
					b.Errorf("ping: %v", err)
					return
				}
			}
		})
		m.stop().report(b, true)
	})
	// The floor under load: the bare call whose handler makes one (two)
	// PINGs, as many round trips as a replay (first execution) makes.
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("redis-server/floor/%drt", n), func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(benchParallelism)
			r := benchRedisBackend(b, "redis-server")
			env := floorEnv(b, r, n)
			m := startMeter(b, r.rt)
			runCallsParallel(b, env, benchReq, "")
			res := m.stop()
			res.report(b, true)
			parallelBase.mu.Lock()
			parallelBase.floors[n] = &res
			parallelBase.mu.Unlock()
		})
	}
	for _, name := range benchStores {
		for _, path := range benchPaths(name) {
			b.Run(name+"/"+path, func(b *testing.B) {
				b.ReportAllocs()
				b.SetParallelism(benchParallelism)
				var store Store = NewMemoryStore()
				var rt *roundTrips
				if name != "memory" {
					r := benchRedisBackend(b, name)
					store, rt = r.store(), r.rt
				}
				env := newBenchEnv(b, store, nil, benchOpts(path)...)
				replayKey := warmUp(b, env, path)
				runs0 := env.svc.Runs.Load()
				m := startMeter(b, rt)
				runCallsParallel(b, env, benchReq, replayKey)
				res := m.stop()
				checkRuns(b, env, runs0, path)
				res.report(b, rt != nil)
				parallelBase.mu.Lock()
				bare := parallelBase.v
				floor := parallelBase.floors[map[string]int{"first": 2, "replay": 1}[path]]
				parallelBase.mu.Unlock()
				if bare != nil {
					b.ReportMetric(100*(res.ns-bare.ns)/bare.ns, "overhead-%")
					b.ReportMetric(100*(res.cpuNs-bare.cpuNs)/bare.cpuNs, "cpu-overhead-%")
				}
				if floor != nil && name == "redis-server" {
					// Throughput as a share of the floor's: calls/s of
					// this row over calls/s of the floor.
					b.ReportMetric(100*floor.ns/res.ns, "of-floor-throughput-%")
				}
			})
		}
	}
}

// BenchmarkLargeResponse measures 64 KiB and 1 MiB payloads (in the
// request, echoed in the response) on the memory store, next to the bare
// call with the same payload. payload-copies/op counts the bytes allocated
// per call beyond the bare call's, in payload sizes.
func BenchmarkLargeResponse(b *testing.B) {
	for _, size := range []int{64 << 10, 1 << 20} {
		sizeName := fmt.Sprintf("%dKiB", size>>10)
		req := &testingv1.DoRequest{Id: "large", Amount: 1, Payload: make([]byte, size)}
		for i := range req.Payload {
			req.Payload[i] = byte(i)
		}
		samples := pairedSamples
		if size >= 1<<20 {
			samples = pairedSamples / 10
		}
		b.Run(sizeName+"/bare", func(b *testing.B) {
			b.ReportAllocs()
			env := newBenchEnv(b, nil, nil)
			m := startMeter(b, nil)
			runCalls(b, env.call(req, ""))
			m.stop().report(b, false)
		})
		for _, path := range []string{"first", "replay"} {
			b.Run(sizeName+"/memory/"+path, func(b *testing.B) {
				b.ReportAllocs()
				bare := newBenchEnv(b, nil, nil)
				env := newBenchEnv(b, NewMemoryStore(), nil, WithMaxRecordSize(4<<20))
				replayKey := ""
				if path == "replay" {
					replayKey = newKey()
					if err := env.call(req, replayKey)(); err != nil {
						b.Fatal(err)
					}
				}
				call := env.call(req, replayKey)
				runs0 := env.svc.Runs.Load()
				m := startMeter(b, nil)
				runCalls(b, call)
				res := m.stop()
				checkRuns(b, env, runs0, path)
				res.report(b, false)
				// The bare call's allocations, untimed.
				bareCall := bare.call(req, "")
				n := min(b.N, 20)
				runtime.GC()
				a0 := totalAlloc()
				for i := 0; i < n; i++ {
					if err := bareCall(); err != nil {
						b.Fatal(err)
					}
				}
				bareBytes := float64(totalAlloc()-a0) / float64(n)
				b.ReportMetric((res.bytes-bareBytes)/float64(size), "payload-copies/op")
				med := paired(b, min(b.N, samples), call, bareCall)
				reportVsBare(b, med[0], med[1])
			})
		}
	}
}

// BenchmarkRecordMemory reports what one stored record costs on the real
// redis-server (MEMORY USAGE ... SAMPLES 0, which counts the key, the hash
// and its fields): for a small and a 64 KiB response, while the call is in
// progress (measured from inside the handler) and once it is completed.
// Each iteration is one first execution through the interceptor, with the
// default key prefix; ns/op is suppressed, the figures are bytes per
// record. encoded-B/record is the length of the encoded record;
// as-string-B/record what the encoded record alone costs as a plain string
// under the same key (what layout 2 adds to it is its 3-byte header and the
// 32-byte owner token).
func BenchmarkRecordMemory(b *testing.B) {
	for _, v := range []struct {
		name    string
		size    int
		backend string
	}{
		{"small", 0, "redis-server"},
		{"64KiB", 64 << 10, "redis-server"},
	} {
		size := v.size
		b.Run(v.name, func(b *testing.B) {
			r := benchRedisBackend(b, v.backend)
			// The production prefix: the key's length counts in MEMORY
			// USAGE. Keys are unique, and deleted after each measurement.
			r.prefix = DefaultKeyPrefix
			ctx := context.Background()
			storeKey := func(key string) string { return r.prefix + StoreKey(methodDo, "", key) }
			var inProgress atomic.Int64
			var inProgressEnc atomic.Value
			svc := &testService{OnDo: func(hctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
				if key, ok := KeyFromContext(hctx); ok { // not on the warm-up call
					sk := storeKey(key)
					u, err := r.client.MemoryUsage(ctx, sk, 0).Result()
					if err != nil {
						return nil, err
					}
					inProgress.Store(u)
					inProgressEnc.Store(r.client.ObjectEncoding(ctx, sk).Val())
				}
				return &testingv1.DoResponse{Id: req.GetId(), Execution: n, Payload: req.GetPayload()}, nil
			}}
			env := newBenchEnv(b, r.store(), svc, WithTTL(benchTTL))
			req := &testingv1.DoRequest{Id: "capacity", Amount: 100, Payload: make([]byte, size)}
			var sumIn, sumDone, sumRec, sumStr float64
			var doneEnc string
			for i := 0; i < b.N; i++ {
				key := "capacity-" + strconv.FormatUint(benchSeq.Add(1)%1e9, 10)
				if err := env.call(req, key)(); err != nil {
					b.Fatal(err)
				}
				sk := storeKey(key)
				done, err := r.client.MemoryUsage(ctx, sk, 0).Result()
				if err != nil {
					b.Fatal(err)
				}
				rec, err := rawRedisRecord(ctx, r.client, sk)
				if err != nil {
					b.Fatal(err)
				}
				doneEnc = r.client.ObjectEncoding(ctx, sk).Val()
				if err := r.client.Set(ctx, sk+":str", rec, 0).Err(); err != nil {
					b.Fatal(err)
				}
				str, err := r.client.MemoryUsage(ctx, sk+":str", 0).Result()
				if err != nil {
					b.Fatal(err)
				}
				r.client.Del(ctx, sk, sk+":str")
				sumIn += float64(inProgress.Load())
				sumDone += float64(done)
				sumRec += float64(len(rec))
				sumStr += float64(str)
			}
			n := float64(b.N)
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(sumIn/n, "inprogress-B/record")
			b.ReportMetric(sumDone/n, "completed-B/record")
			b.ReportMetric(sumRec/n, "encoded-B/record")
			b.ReportMetric(sumStr/n, "as-string-B/record")
			if b.N == 1 {
				b.Logf("encoding: in progress %v, completed %s", inProgressEnc.Load(), doneEnc)
			}
		})
	}
}

// coalesceBurst is the number of identical concurrent calls per burst in
// BenchmarkCoalescing.
const coalesceBurst = 8

// coalesceHandlerTime is how long the handler of BenchmarkCoalescing works,
// so that the duplicates of a burst arrive while the first call runs.
const coalesceHandlerTime = time.Millisecond

// BenchmarkCoalescing measures a burst of coalesceBurst identical calls
// (one new key per burst, the same request) sent at once to one server,
// without and with WithCoalescing. The handler works for
// coalesceHandlerTime. Both variants use WithWaitForInProgress(1ms), so
// that every caller of the burst gets the response without retrying: without
// coalescing each duplicate claims, finds the key in progress and polls the
// store (after 1, 2, 4 ms ...) until the outcome is stored; with coalescing
// the duplicates wait in process for the first call's outcome. One op is one
// burst: ns/op is the wall time until the last caller has its answer,
// claims/op the Store.Claim calls per burst, roundtrips/op (Redis) all Redis
// commands per burst.
func BenchmarkCoalescing(b *testing.B) {
	for _, name := range []string{"memory", "redis-server"} {
		for _, mode := range []string{"off", "on"} {
			b.Run(fmt.Sprintf("%s/burst%d/%s", name, coalesceBurst, mode), func(b *testing.B) {
				b.ReportAllocs()
				var store Store = NewMemoryStore()
				var rt *roundTrips
				if name != "memory" {
					r := benchRedisBackend(b, name)
					store, rt = r.store(), r.rt
				}
				counted := &countingStore{Store: store}
				opts := []Option{WithTTL(benchTTL), WithWaitForInProgress(time.Millisecond)}
				if mode == "on" {
					opts = append(opts, WithCoalescing())
				}
				svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
					time.Sleep(coalesceHandlerTime)
					return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
				}}
				env := newBenchEnv(b, counted, svc, opts...)
				if err := env.call(benchReq, newKey())(); err != nil { // load the scripts
					b.Fatal(err)
				}
				burst := func() error {
					key := newKey()
					start := make(chan struct{})
					errs := make(chan error, coalesceBurst)
					var wg sync.WaitGroup
					for i := 0; i < coalesceBurst; i++ {
						wg.Add(1)
						go func() {
							defer wg.Done()
							call := env.call(benchReq, key)
							<-start
							if err := call(); err != nil {
								errs <- err
							}
						}()
					}
					close(start)
					wg.Wait()
					close(errs)
					return <-errs
				}
				runs0, claims0 := env.svc.Runs.Load(), counted.claims.Load()
				m := startMeter(b, rt)
				runCalls(b, burst)
				res := m.stop()
				if got := env.svc.Runs.Load() - runs0; got != int64(b.N) {
					b.Fatalf("the handler ran %d times for %d bursts, want once per burst", got, b.N)
				}
				res.report(b, rt != nil)
				b.ReportMetric(float64(counted.claims.Load()-claims0)/float64(b.N), "claims/op")
			})
		}
	}
}

// BenchmarkReplicaAcks measures what acknowledgements cost per call on a
// master with one local replica: the call through the interceptor with
// WithReplicaAcks(1) (redis-server) or WithFsyncAcks(1) (valkey-server with
// appendonly yes on both, appendfsync always or everysec) against the same
// call with no acknowledgements, on the same pair, timed in alternating
// blocks (paired). It reports the acknowledged call's median, the ratio to
// the unacknowledged one (x-no-acks) and the difference in PING round trips
// (extra-rtt/op). The acknowledgement rides in the script's pipeline, so
// the round-trip count does not change; what it adds is the wait for the
// replica (and the fsyncs). With appendfsync everysec a WAITAOF waits for
// the replica's next once-a-second fsync, about a second per write
// (BenchmarkFsyncAcks): run that case with a small -benchtime (e.g. 20x).
func BenchmarkReplicaAcks(b *testing.B) {
	aof := func(fsync string) []string { return []string{"--appendonly", "yes", "--appendfsync", fsync} }
	setups := []struct {
		name, binary string
		extra        []string
		ack          RedisOption
	}{
		{"redis-server/WAIT", "redis-server", nil, WithReplicaAcks(1, 5*time.Second)},
		{"valkey-server/WAITAOF-always", "valkey-server", aof("always"), WithFsyncAcks(1, 5*time.Second)},
		{"valkey-server/WAITAOF-everysec", "valkey-server", aof("everysec"), WithFsyncAcks(1, 5*time.Second)},
	}
	for _, setup := range setups {
		for _, path := range []string{"first", "replay"} {
			b.Run(setup.name+"/"+path, func(b *testing.B) {
				b.ReportAllocs()
				pair := startReplicaPair(b, setup.binary, false, setup.extra...)
				rt := &roundTrips{}
				pair.masterRDB.AddHook(rt)
				prefix := "bench-acks:"
				plain := newBenchEnv(b, NewRedisStore(pair.masterRDB, WithKeyPrefix(prefix), WithRedisLogger(nil)), nil)
				acked := newBenchEnv(b, NewRedisStore(pair.masterRDB, WithKeyPrefix(prefix), setup.ack, WithRedisLogger(nil)), nil)
				plainKey, ackedKey := warmUp(b, plain, path), warmUp(b, acked, path)
				call := acked.call(benchReq, ackedKey)
				m := startMeter(b, rt)
				runCalls(b, call)
				m.stop().report(b, true)
				ping := func() error { return pair.masterRDB.Ping(context.Background()).Err() }
				med := paired(b, min(b.N, pairedSamples), call, plain.call(benchReq, plainKey), ping)
				b.ReportMetric(med[0].ns, "p50-ns/op")
				b.ReportMetric(med[1].ns, "no-acks-p50-ns/op")
				b.ReportMetric(med[0].ns/med[1].ns, "x-no-acks")
				b.ReportMetric((med[0].ns-med[1].ns)/med[2].ns, "extra-rtt/op")
			})
		}
	}
}
