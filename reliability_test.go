package idempotency

// Reliability suites: many independent servers sharing one Redis (or a Redis
// Cluster), thousands of calls through the client interceptor with random
// duplication, cancellation and handler latency, and Redis killed and
// restarted mid-storm. Each suite logs its figures ("reliability: ..."),
// which docs/RELIABILITY.md quotes.

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// stormSeed is the default seed of every storm; set IDEMPOTENCY_STORM_SEED
// to replay another one.
const stormSeed = 20261124

func stormSeedFor(t *testing.T) uint64 {
	t.Helper()
	seed := uint64(stormSeed)
	if s := os.Getenv("IDEMPOTENCY_STORM_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("IDEMPOTENCY_STORM_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("storm seed %d (IDEMPOTENCY_STORM_SEED=%d reproduces the plan)", seed, seed)
	return seed
}

// stormConfig describes one storm.
type stormConfig struct {
	seed    uint64
	servers int
	keys    int
	calls   int // logical calls, each possibly sent as several simultaneous copies
	workers int // concurrent callers
	tenants int // > 1: WithScope by the x-tenant header; the same keys in every tenant
	// newClient returns the go-redis client of server i (each server its own).
	newClient func(i int) redis.UniversalClient
	// check is the client used to read records after the storm.
	check      redis.UniversalClient
	lease      time.Duration
	cancelRate float64       // share of calls canceled at a random moment
	maxLatency time.Duration // handler latency is uniform in [0, maxLatency]
	// fault, when set, is started once faultAt calls have finished, and
	// the storm waits for it before the final checks.
	fault   func(r *stormRun)
	faultAt int
	// measureOnly counts per-key violations (duplicates, lost outcomes)
	// instead of failing: for storms that measure a documented gap.
	measureOnly bool
	// storeOpts are extra options of every server's Redis store.
	storeOpts []RedisOption
}

// stormKeyStats is what happened to one (tenant, key).
type stormKeyStats struct {
	mu        sync.Mutex
	execs     int
	started   []time.Time // when each execution started
	produced  [][]byte    // what the handler returned, per execution
	successes [][]byte    // what callers received (deterministic encoding)
	foreign   int         // successes that carried another tenant's answer
}

// stormStore wraps a server's store: it counts claims and knows which keys
// this server holds, and under which lease token, so the handler can check
// it runs under a claim.
type stormStore struct {
	Store
	mu      sync.Mutex
	held    map[string]map[string]bool // store key -> tokens holding it
	claims  atomic.Int64
	claimed atomic.Int64
	errors  atomic.Int64
}

func (s *stormStore) Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error) {
	s.claims.Add(1)
	res, err := s.Store.Claim(ctx, key, token, record, lease)
	if err != nil {
		s.errors.Add(1)
		return res, err
	}
	own := res.Claimed
	if !own {
		// A retried claim whose first try was applied returns our own
		// in-progress record: the key is ours.
		rec, derr := decodeRecord(res.Record)
		own = derr == nil && rec.GetState() == idempotencyv1.Record_STATE_IN_PROGRESS && rec.GetLeaseToken() == token
	}
	if own {
		s.claimed.Add(1)
		s.mu.Lock()
		if s.held[key] == nil {
			s.held[key] = map[string]bool{}
		}
		s.held[key][token] = true
		s.mu.Unlock()
	}
	return res, err
}

func (s *stormStore) drop(key, token string) {
	s.mu.Lock()
	delete(s.held[key], token)
	s.mu.Unlock()
}

func (s *stormStore) Complete(ctx context.Context, key, token string, record []byte, ttl time.Duration) error {
	s.drop(key, token)
	return s.Store.Complete(ctx, key, token, record, ttl)
}

func (s *stormStore) Release(ctx context.Context, key, token string) error {
	s.drop(key, token)
	return s.Store.Release(ctx, key, token)
}

func (s *stormStore) holds(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.held[key]) > 0
}

// stormServer is one independent server: its own go-redis client, store,
// grpc.Server, listener and client connection.
type stormServer struct {
	idx     int
	store   *stormStore
	events  *eventLog
	patient testingv1.TestServiceClient // retries long enough to outlast a lease
	brief   testingv1.TestServiceClient // three attempts
}

// stormRun is a storm in progress.
type stormRun struct {
	t        *testing.T
	cfg      stormConfig
	prefix   string
	servers  []*stormServer
	keyNames []string
	stats    sync.Map // "tenant/key" -> *stormKeyStats

	mu       sync.Mutex
	rng      *rand.Rand // handler latency and payloads
	finished atomic.Int64
	unclaim  atomic.Int64 // handler runs without a claim held by its server
	// inflight counts server-side calls not yet finished: a canceled
	// caller returns at once while its server-side call may still be
	// writing its outcome (and reporting it) for up to the complete timeout.
	inflight atomic.Int64

	results sync.Map // "code reason" -> *atomic.Int64

	measured map[string]int // violations by kind, with cfg.measureOnly
}

func (r *stormRun) keyStats(id string) *stormKeyStats {
	v, _ := r.stats.LoadOrStore(id, &stormKeyStats{})
	return v.(*stormKeyStats)
}

func stormTenantOf(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("x-tenant"); len(v) == 1 {
		return v[0]
	}
	return ""
}

// handler is the storm's Do: it counts executions per (tenant, key), sleeps
// a random latency ignoring cancellation (like a handler committed to its
// side effect), and returns an answer unique to this execution.
func (r *stormRun) handler(srv *stormServer) func(ctx context.Context, req *testingv1.DoRequest, _ int64) (*testingv1.DoResponse, error) {
	return func(ctx context.Context, req *testingv1.DoRequest, _ int64) (*testingv1.DoResponse, error) {
		key, ok := KeyFromContext(ctx)
		tenant := stormTenantOf(ctx)
		scope := ""
		if r.cfg.tenants > 1 {
			scope = tenant
		}
		if !ok || !srv.store.holds(StoreKey(methodDo, scope, key)) {
			r.unclaim.Add(1)
		}
		r.mu.Lock()
		lat := time.Duration(r.rng.Int64N(int64(r.cfg.maxLatency) + 1))
		nonce := r.rng.Uint64()
		r.mu.Unlock()
		ks := r.keyStats(tenant + "/" + key)
		ks.mu.Lock()
		ks.execs++
		ks.started = append(ks.started, time.Now())
		n := ks.execs
		ks.mu.Unlock()
		time.Sleep(lat)
		resp := &testingv1.DoResponse{
			Id:        req.GetId(),
			Execution: int64(n),
			Payload:   []byte(fmt.Sprintf("tenant=%s server=%d nonce=%016x", tenant, srv.idx, nonce)),
		}
		b, err := deterministic.Marshal(resp)
		if err != nil {
			return nil, err
		}
		ks.mu.Lock()
		ks.produced = append(ks.produced, b)
		ks.mu.Unlock()
		return resp, nil
	}
}

// track is the outermost server interceptor of every storm server: it
// counts the calls in flight, so the checks can wait until every
// server-side call has finished and reported its outcome.
func (r *stormRun) track(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	r.inflight.Add(1)
	defer r.inflight.Add(-1)
	return h(ctx, req)
}

func (r *stormRun) count(err error) {
	name := "OK"
	if err != nil {
		name = status.Code(err).String()
		if reason := ReasonOf(err); reason != "" {
			name += " " + reason
		}
	}
	v, _ := r.results.LoadOrStore(name, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

func (r *stormRun) resultCount(name string) int64 {
	if v, ok := r.results.Load(name); ok {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

func (r *stormRun) resultSummary() string {
	var parts []string
	r.results.Range(func(k, v any) bool {
		parts = append(parts, fmt.Sprintf("%s=%d", k, v.(*atomic.Int64).Load()))
		return true
	})
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

// eventCount sums an outcome over every server.
func (r *stormRun) eventCount(o Outcome) int {
	n := 0
	for _, s := range r.servers {
		n += s.events.count(o)
	}
	return n
}

// keyHashesWith returns the key hashes that had an event with outcome o.
func (r *stormRun) keyHashesWith(o Outcome) map[string]bool {
	out := map[string]bool{}
	for _, s := range r.servers {
		s.events.mu.Lock()
		for _, e := range s.events.events {
			if e.Outcome == o {
				out[e.KeyHash] = true
			}
		}
		s.events.mu.Unlock()
	}
	return out
}

// stormCall is one planned logical call.
type stormCall struct {
	key         int
	tenant      int
	copies      []int         // the servers its simultaneous copies go to
	cancelAfter time.Duration // 0: never canceled
	patient     bool
}

func (r *stormRun) plan() []stormCall {
	cfg := r.cfg
	rng := rand.New(rand.NewPCG(cfg.seed, 1))
	calls := make([]stormCall, 0, cfg.calls)
	for i := 0; i < cfg.calls; i++ {
		c := stormCall{tenant: rng.IntN(max(cfg.tenants, 1)), patient: rng.IntN(4) != 0}
		if i < cfg.keys {
			c.key = i // every key is used at least once
		} else {
			// Skewed: a few hot keys take many duplicates.
			f := rng.Float64()
			c.key = int(f * f * float64(cfg.keys))
		}
		copies := 1
		switch x := rng.IntN(10); {
		case x == 0:
			copies = 3
		case x < 3:
			copies = 2
		}
		for j := 0; j < copies; j++ {
			c.copies = append(c.copies, rng.IntN(cfg.servers))
		}
		if rng.Float64() < cfg.cancelRate {
			c.cancelAfter = time.Duration(1 + rng.Int64N(int64(8*time.Millisecond)))
		}
		calls = append(calls, c)
	}
	rng.Shuffle(len(calls), func(i, j int) { calls[i], calls[j] = calls[j], calls[i] })
	return calls
}

// startServers starts cfg.servers independent servers.
func (r *stormRun) startServers() {
	t := r.t
	for i := 0; i < r.cfg.servers; i++ {
		srv := &stormServer{idx: i, events: newEventLog()}
		client := r.cfg.newClient(i)
		srv.store = &stormStore{Store: NewRedisStore(client, append([]RedisOption{WithKeyPrefix(r.prefix), WithRedisLogger(nil)}, r.cfg.storeOpts...)...), held: map[string]map[string]bool{}}
		opts := []Option{
			WithObserver(srv.events.observe),
			WithLease(r.cfg.lease),
			WithRetryDelay(5 * time.Millisecond),
		}
		if i%2 == 1 {
			opts = append(opts, WithWaitForInProgress(2*time.Millisecond))
		}
		if r.cfg.tenants > 1 {
			opts = append(opts, WithScope(func(ctx context.Context) (string, error) {
				if tn := stormTenantOf(ctx); tn != "" {
					return tn, nil
				}
				return "", status.Error(codes.Unauthenticated, "no tenant")
			}))
		}
		svc := &testService{OnDo: r.handler(srv)}
		lis := testservice.Serve(t, svc, grpc.ChainUnaryInterceptor(r.track, UnaryServerInterceptor(srv.store, opts...)))
		dial := func(copts ...ClientOption) testingv1.TestServiceClient {
			return testservice.Dial(t, lis, grpc.WithChainUnaryInterceptor(UnaryClientInterceptor(copts...)))
		}
		// Patient callers retry for longer than a lease, so they outlast a
		// key orphaned by a lost claim reply; brief callers give up after
		// three attempts and show what a caller sees.
		srv.patient = dial(WithMaxAttempts(60), WithBackoff(5*time.Millisecond, 100*time.Millisecond))
		srv.brief = dial(WithMaxAttempts(3), WithBackoff(2*time.Millisecond, 10*time.Millisecond))
		r.servers = append(r.servers, srv)
	}
}

func (r *stormRun) request(key int) *testingv1.DoRequest {
	return &testingv1.DoRequest{Id: r.keyNames[key], Amount: int64(key)}
}

// send makes one copy of call c to server s and records what came back.
func (r *stormRun) send(ctx context.Context, c stormCall, s int, canceled *atomic.Bool) {
	srv := r.servers[s]
	tenant := fmt.Sprintf("tenant-%d", c.tenant)
	ctx = metadata.AppendToOutgoingContext(WithKey(ctx, r.keyNames[c.key]), "x-tenant", tenant)
	client := srv.brief
	if c.patient {
		client = srv.patient
	}
	resp, err := client.Do(ctx, r.request(c.key))
	if err != nil && canceled.Load() && status.Code(err) == codes.Canceled {
		r.count(status.Error(codes.Canceled, "canceled by the storm"))
		return
	}
	r.count(err)
	if err != nil {
		return
	}
	b, merr := deterministic.Marshal(resp)
	if merr != nil {
		r.t.Errorf("marshal response: %v", merr)
		return
	}
	ks := r.keyStats(tenant + "/" + r.keyNames[c.key])
	ks.mu.Lock()
	ks.successes = append(ks.successes, b)
	if !bytes.Contains(resp.GetPayload(), []byte("tenant="+tenant+" ")) {
		ks.foreign++
	}
	ks.mu.Unlock()
}

// runStorm runs the storm and checks the per-key guarantees. lossy reports,
// for a key hash, that the key's outcome is known lost (its completion
// failed), so it may run again once its lease ends.
func runStorm(t *testing.T, cfg stormConfig) *stormRun {
	t.Helper()
	r := &stormRun{
		t:      t,
		cfg:    cfg,
		prefix: fmt.Sprintf("storm:%s:%d:", t.Name(), time.Now().UnixNano()),
		rng:    rand.New(rand.NewPCG(cfg.seed, 2)),
	}
	for i := 0; i < cfg.keys; i++ {
		r.keyNames = append(r.keyNames, fmt.Sprintf("storm-key-%04d", i))
	}
	r.startServers()
	calls := r.plan()

	base, cancelAll := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancelAll()
	work := make(chan stormCall)
	var wg sync.WaitGroup
	var faultWG sync.WaitGroup
	var faultOnce sync.Once
	start := time.Now()
	for w := 0; w < cfg.workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range work {
				ctx, cancel := context.WithTimeout(base, 30*time.Second)
				var canceled atomic.Bool
				timer := time.AfterFunc(time.Hour, func() { canceled.Store(true); cancel() })
				if c.cancelAfter > 0 {
					timer.Reset(c.cancelAfter)
				}
				var cwg sync.WaitGroup
				for _, s := range c.copies {
					cwg.Add(1)
					go func() {
						defer cwg.Done()
						r.send(ctx, c, s, &canceled)
					}()
				}
				cwg.Wait()
				timer.Stop()
				cancel()
				if n := r.finished.Add(1); cfg.fault != nil && int(n) == cfg.faultAt {
					faultOnce.Do(func() {
						faultWG.Add(1)
						go func() { defer faultWG.Done(); cfg.fault(r) }()
					})
				}
			}
		}()
	}
	for _, c := range calls {
		work <- c
	}
	close(work)
	wg.Wait()
	faultWG.Wait()
	elapsed := time.Since(start)
	// Classify from complete events: a call whose caller gave up may still
	// be writing its outcome.
	settle := time.Now().Add(time.Minute)
	for r.inflight.Load() != 0 {
		if time.Now().After(settle) {
			t.Fatalf("%d server-side calls still running a minute after the storm", r.inflight.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	r.check()
	sent := 0
	for _, c := range calls {
		sent += len(c.copies)
	}
	t.Logf("reliability: storm %s: %d logical calls (%d requests with duplicates) over %d keys x %d tenants, %d servers, %d concurrent callers, in %v; results: %s",
		t.Name(), len(calls), sent, cfg.keys, max(cfg.tenants, 1), cfg.servers, cfg.workers, elapsed.Round(time.Millisecond), r.resultSummary())
	return r
}

// check verifies the per-key guarantees after the storm. Keys whose outcome
// could not be written (a not_stored event, or a lease_lost event: the store
// was unreachable for longer than the lease, which then ended and let another
// call claim the key — the documented "outcome lost" gap; or a
// not_replicated event: an outcome no replica acknowledged, which a failover
// may lose) may run again after their lease; they are counted apart.
func (r *stormRun) check() {
	t := r.t
	ctx := context.Background()
	// violation fails the test, or, in a storm that measures a documented
	// gap (cfg.measureOnly), counts it by kind and logs it.
	violation := func(kind, format string, args ...any) {
		t.Helper()
		if !r.cfg.measureOnly {
			t.Errorf(format, args...)
			return
		}
		r.mu.Lock()
		if r.measured == nil {
			r.measured = map[string]int{}
		}
		r.measured[kind]++
		r.mu.Unlock()
		t.Logf("measured: "+format, args...)
	}
	lost := r.keyHashesWith(OutcomeNotStored)
	for _, o := range []Outcome{OutcomeLeaseLost, OutcomeNotReplicated} {
		for k := range r.keyHashesWith(o) {
			lost[k] = true
		}
	}
	var keysUsed, execs, zero, twice, lostKeys, lostTwice, lostStored, identical, foreign int
	r.stats.Range(func(k, v any) bool {
		id := k.(string)
		ks := v.(*stormKeyStats)
		keysUsed++
		tenant, key, _ := strings.Cut(id, "/")
		scope := ""
		if r.cfg.tenants > 1 {
			scope = tenant
		}
		storeKey := StoreKey(methodDo, scope, key)
		isLost := lost[keyHash(storeKey)]
		if isLost {
			lostKeys++
		}
		execs += ks.execs
		foreign += ks.foreign
		switch {
		case ks.execs == 0:
			zero++
			if len(ks.successes) > 0 {
				t.Errorf("key %s: %d successful answers but the handler never ran", id, len(ks.successes))
			}
			return true
		case ks.execs > 1 && isLost:
			// The first outcome was never stored; the key may run again,
			// but only once the first claim's lease has ended.
			lostTwice++
			for i := 1; i < len(ks.started); i++ {
				if gap := ks.started[i].Sub(ks.started[i-1]); gap < r.cfg.lease-250*time.Millisecond {
					violation("duplicate", "key %s: execution %d started %v after the previous one, inside its lease (%v)", id, i+1, gap, r.cfg.lease)
				}
			}
			return true
		case ks.execs > 1:
			twice++
			violation("duplicate", "key %s: handler ran %d times, want at most 1", id, ks.execs)
			return true
		}
		// Exactly one execution: every caller got its answer, byte for byte.
		want := ks.produced[0]
		same := true
		for i, got := range ks.successes {
			if !bytes.Equal(got, want) {
				same = false
				violation("different-answer", "key %s: success %d differs from the execution's answer:\n got %x\nwant %x", id, i, got, want)
			}
		}
		if same && len(ks.successes) > 0 {
			identical++
		}
		raw, err := rawRedisRecord(ctx, r.cfg.check, r.prefix+storeKey)
		if isLost {
			// Reported as not stored; it may have landed after all (a write
			// whose reply was lost, or held by a partition).
			if rec, derr := decodeRecord(raw); err == nil && derr == nil && rec.GetState() == idempotencyv1.Record_STATE_COMPLETED &&
				bytes.Equal(rec.GetResponse(), want) {
				lostStored++
			}
			return true
		}
		// And the outcome is stored: a later repeat replays it.
		if err != nil {
			violation("lost-outcome", "key %s: no stored record after the storm: %v", id, err)
			return true
		}
		rec, err := decodeRecord(raw)
		if err != nil || rec.GetState() != idempotencyv1.Record_STATE_COMPLETED {
			violation("lost-outcome", "key %s: stored record %v, %v; want a completed record", id, rec.GetState(), err)
			return true
		}
		if !bytes.Equal(rec.GetResponse(), want) {
			violation("lost-outcome", "key %s: stored response differs from the execution's answer", id)
		}
		return true
	})
	if n := r.unclaim.Load(); n != 0 {
		t.Errorf("%d handler executions ran without a claim held by their server", n)
	}
	if foreign != 0 {
		t.Errorf("%d answers carried another tenant's response", foreign)
	}
	var claims, claimed, claimErrs int64
	for _, s := range r.servers {
		claims += s.store.claims.Load()
		claimed += s.store.claimed.Load()
		claimErrs += s.store.errors.Load()
	}
	if int64(execs) > claimed {
		t.Errorf("%d executions but only %d successful claims", execs, claimed)
	}
	t.Logf("reliability: %s: keys=%d executions=%d (expected <= %d, one per key) keys-never-run=%d keys-run-twice=%d identical-answer-keys=%d foreign-answers=%d; outcome-lost-keys=%d of which stored after all=%d, re-run after their lease=%d; claims=%d claimed=%d claim-errors=%d; events executed=%d replayed=%d in_progress=%d canceled=%d store_unavailable=%d not_stored=%d lease_lost=%d",
		t.Name(), keysUsed, execs, keysUsed, zero, twice, identical, foreign, lostKeys, lostStored, lostTwice, claims, claimed, claimErrs,
		r.eventCount(OutcomeExecuted), r.eventCount(OutcomeReplayed), r.eventCount(OutcomeInProgress), r.eventCount(OutcomeCanceled),
		r.eventCount(OutcomeStoreUnavailable), r.eventCount(OutcomeNotStored), r.eventCount(OutcomeLeaseLost))
}

// allowOnly fails the test when any call ended with a result outside allowed
// ("OK", "Canceled", "Aborted KEY_IN_PROGRESS", ...).
func (r *stormRun) allowOnly(allowed ...string) {
	ok := map[string]bool{}
	for _, a := range allowed {
		ok[a] = true
	}
	r.results.Range(func(k, v any) bool {
		if !ok[k.(string)] {
			r.t.Errorf("%d calls ended with %s, which this storm does not allow (results: %s)", v.(*atomic.Int64).Load(), k, r.resultSummary())
		}
		return true
	})
}

func defaultStorm(t *testing.T) stormConfig {
	return stormConfig{
		seed:       stormSeedFor(t),
		servers:    4,
		keys:       150,
		calls:      2000,
		workers:    32,
		lease:      2 * time.Second,
		cancelRate: 0.1,
		maxLatency: 5 * time.Millisecond,
	}
}

// TestStormSharedRedis runs 2,000 logical calls (about 2,600 requests with
// simultaneous duplicates) over 150 keys through four independent servers
// sharing one redis-server, with random cancellation and handler latency:
// every key runs at most once, once if anyone got an answer, and every
// answer is byte-identical to the one execution's.
func TestStormSharedRedis(t *testing.T) {
	srv := newRedisServer(t)
	cfg := defaultStorm(t)
	cfg.newClient = func(int) redis.UniversalClient { return newRedisClient(t, srv.Addr) }
	cfg.check = newRedisClient(t, srv.Addr)
	r := runStorm(t, cfg)
	r.allowOnly("OK", "Canceled", "Aborted KEY_IN_PROGRESS")
	if ok := r.resultCount("OK"); ok < int64(cfg.calls)/2 {
		t.Errorf("only %d successful answers", ok)
	}
}

// TestStormScopeIsolation runs the storm with two tenants sending the same
// keys with the same requests: each (tenant, key) runs once and no tenant
// ever receives the other's answer.
func TestStormScopeIsolation(t *testing.T) {
	srv := newRedisServer(t)
	cfg := defaultStorm(t)
	cfg.tenants = 2
	cfg.keys = 100
	cfg.newClient = func(int) redis.UniversalClient { return newRedisClient(t, srv.Addr) }
	cfg.check = newRedisClient(t, srv.Addr)
	r := runStorm(t, cfg)
	r.allowOnly("OK", "Canceled", "Aborted KEY_IN_PROGRESS")
	both := 0
	for _, k := range r.keyNames {
		a, b := r.keyStats("tenant-0/"+k), r.keyStats("tenant-1/"+k)
		if a.execs == 1 && b.execs == 1 {
			both++
			if bytes.Equal(a.produced[0], b.produced[0]) {
				t.Errorf("key %s: both tenants have the same answer", k)
			}
		}
	}
	if both == 0 {
		t.Fatal("no key was executed by both tenants: the storm did not exercise isolation")
	}
	t.Logf("reliability: %s: %d keys executed once in each tenant, answers kept apart", t.Name(), both)
}

// relRequireRedisCLI skips (or fails under CI) when redis-cli is missing.
func relRequireRedisCLI(t *testing.T) {
	t.Helper()
	requireRedisServer(t)
	if _, err := exec.LookPath("redis-cli"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("redis-cli is not on PATH and CI is set: the Redis Cluster test must run in CI (install redis-tools)")
		}
		t.Skip("redis-cli is not on PATH; install it to run the Redis Cluster test")
	}
}

// relClusterPort picks a random port in 20000-45000 that is free along with its
// cluster-bus twin (port + 10000).
func relClusterPort(t testing.TB, taken map[int]bool) int {
	t.Helper()
	for i := 0; i < 200; i++ {
		p := 20000 + rand.IntN(25001)
		if taken[p] || taken[p+10000] {
			continue
		}
		l1, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p+10000))
		l1.Close()
		if err != nil {
			continue
		}
		l2.Close()
		taken[p], taken[p+10000] = true, true
		return p
	}
	t.Fatal("no free port pair for a cluster node")
	return 0
}

// relStartCluster starts a three-master Redis Cluster on loopback for t and
// returns the node addresses.
func relStartCluster(t *testing.T) []string {
	t.Helper()
	relRequireRedisCLI(t)
	return startCluster(t, t.TempDir, t.Cleanup)
}

var (
	sharedClusterOnce  sync.Once
	sharedClusterAddrs []string
	sharedClusterStops []func()
)

// sharedCluster returns the three-master Redis Cluster shared by the
// package's tests that touch only keys of their own (starting one costs
// seconds): started on first use, stopped by TestMain.
func sharedCluster(t *testing.T) []string {
	t.Helper()
	relRequireRedisCLI(t)
	sharedClusterOnce.Do(func() {
		dir, err := os.MkdirTemp("", "idempotency-cluster-")
		if err != nil {
			t.Fatal(err)
		}
		sharedClusterStops = append(sharedClusterStops, func() { _ = os.RemoveAll(dir) })
		nodes := 0
		nodeDir := func() string {
			nodes++
			d := filepath.Join(dir, strconv.Itoa(nodes))
			if err := os.Mkdir(d, 0o700); err != nil {
				t.Fatal(err)
			}
			return d
		}
		// Servers stop before their directory is removed.
		onStop := func(f func()) { sharedClusterStops = append([]func(){f}, sharedClusterStops...) }
		sharedClusterAddrs = startCluster(t, nodeDir, onStop)
	})
	if sharedClusterAddrs == nil {
		t.Fatal("the shared Redis Cluster did not start: see the first test that used it")
	}
	return sharedClusterAddrs
}

// stopSharedCluster stops the shared cluster, if a test started it.
func stopSharedCluster() {
	for _, stop := range sharedClusterStops {
		stop()
	}
}

// startCluster starts the three nodes in directories from nodeDir, hands
// each node's stop to onStop, makes them one cluster and waits until every
// node reports cluster_state:ok.
func startCluster(t testing.TB, nodeDir func() string, onStop func(func())) []string {
	t.Helper()
	taken := map[int]bool{}
	var addrs []string
	for i := 0; i < 3; i++ {
		var srv *redisServer
		var err error
		for attempt := 0; attempt < 3; attempt++ {
			p := relClusterPort(t, taken)
			srv, err = startRedisServer(nodeDir(), p, "--cluster-enabled", "yes",
				"--cluster-config-file", fmt.Sprintf("nodes-%d.conf", p), "--cluster-node-timeout", "5000")
			if err == nil {
				break
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		onStop(srv.Stop)
		addrs = append(addrs, srv.Addr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	if out, err := exec.CommandContext(ctx, "redis-cli", args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	for _, a := range addrs {
		c := newRedisClient(t, a)
		for {
			info, err := c.ClusterInfo(ctx).Result()
			if err == nil && strings.Contains(info, "cluster_state:ok") {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("cluster node %s never reached cluster_state:ok: %v %q", a, err, info)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return addrs
}

// TestStormRedisCluster runs the storm against a three-master Redis Cluster
// started by the test, each server with its own ClusterClient, and checks
// that the records spread over all three masters.
func TestStormRedisCluster(t *testing.T) {
	skipUnlessLong(t)
	addrs := relStartCluster(t)
	newCluster := func() *redis.ClusterClient {
		c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, DialTimeout: time.Second})
		t.Cleanup(func() { c.Close() })
		return c
	}
	cfg := defaultStorm(t)
	cfg.newClient = func(int) redis.UniversalClient { return newCluster() }
	cfg.check = newCluster()
	r := runStorm(t, cfg)
	r.allowOnly("OK", "Canceled", "Aborted KEY_IN_PROGRESS")
	ctx := context.Background()
	var sizes []int64
	for _, a := range addrs {
		n, err := newRedisClient(t, a).DBSize(ctx).Result()
		if err != nil {
			t.Fatalf("DBSIZE on %s: %v", a, err)
		}
		if n == 0 {
			t.Errorf("master %s holds no records: keys did not spread", a)
		}
		sizes = append(sizes, n)
	}
	t.Logf("reliability: %s: records per master %v", t.Name(), sizes)
}

// TestStormRedisOutage kills redis-server (SIGKILL) in the middle of a storm
// and restarts it on the same port and directory with appendonly yes
// (appendfsync always): while it is down calls fail Unavailable
// (STORE_UNAVAILABLE) and no handler runs without a claim; after the restart
// traffic resumes, and no key whose outcome was stored runs twice. Redis
// stays down until ten calls have failed (about 1.3 s here), less than the
// 2 s lease.
func TestStormRedisOutage(t *testing.T) { stormRedisOutage(t, 0) }

// TestStormRedisOutageLongerThanLease is the same storm with Redis down for
// at least one and a half leases (3 s against 2 s): the leases of the keys
// in flight end during the outage, so a retry that reaches Redis before the
// owner takes its key back may run it again. It measures that documented
// gap; the check asserts that every such re-run is a key whose outcome was
// reported lost and that it started only after the first claim's lease.
func TestStormRedisOutageLongerThanLease(t *testing.T) { stormRedisOutage(t, 3*time.Second) }

func stormRedisOutage(t *testing.T, minDown time.Duration) {
	skipUnlessLong(t)
	aof := []string{"--appendonly", "yes", "--appendfsync", "always"}
	srv := newRedisServer(t, aof...)
	var mu sync.Mutex
	current := srv
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		current.Stop()
	})
	cfg := defaultStorm(t)
	cfg.newClient = func(int) redis.UniversalClient {
		return redis.NewClient(&redis.Options{Addr: srv.Addr, DialTimeout: 200 * time.Millisecond,
			ReadTimeout: time.Second, WriteTimeout: time.Second})
	}
	cfg.check = newRedisClient(t, srv.Addr)
	var downFailures, afterRestart int64
	var restarted atomic.Bool
	var okBefore int64
	var outage time.Duration
	cfg.faultAt = cfg.calls / 3
	cfg.fault = func(r *stormRun) {
		okBefore = r.resultCount("OK")
		killed := time.Now()
		srv.Stop()
		before := r.resultCount("Unavailable STORE_UNAVAILABLE")
		deadline := time.Now().Add(10 * time.Second)
		// Stay down until callers have seen the outage.
		for (r.resultCount("Unavailable STORE_UNAVAILABLE") < before+10 || time.Since(killed) < minDown) && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		downFailures = r.resultCount("Unavailable STORE_UNAVAILABLE") - before
		ns, err := startRedisServer(srv.dir, srv.port, aof...)
		outage = time.Since(killed)
		if err != nil {
			t.Errorf("restart redis-server: %v", err)
			return
		}
		mu.Lock()
		current = ns
		mu.Unlock()
		restarted.Store(true)
		okAt := r.resultCount("OK")
		for r.resultCount("OK") < okAt+50 && time.Now().Before(deadline.Add(10*time.Second)) {
			time.Sleep(5 * time.Millisecond)
		}
		afterRestart = r.resultCount("OK") - okAt
	}
	r := runStorm(t, cfg)
	r.allowOnly("OK", "Canceled", "Aborted KEY_IN_PROGRESS", "Unavailable STORE_UNAVAILABLE")
	if downFailures == 0 {
		t.Errorf("no call failed Unavailable STORE_UNAVAILABLE while Redis was down")
	}
	if !restarted.Load() || afterRestart < 50 {
		t.Errorf("traffic did not resume after the restart: %d successes", afterRestart)
	}
	t.Logf("reliability: %s: %d successes before the kill; Redis down for %v, %d calls failed Unavailable STORE_UNAVAILABLE meanwhile; %d successes after the restart",
		t.Name(), okBefore, outage.Round(time.Millisecond), downFailures, afterRestart)
}
