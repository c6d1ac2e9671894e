package idempotency

// Slow handlers and short deadlines across several servers sharing one
// redis-server, through the client interceptor (the single-server cases are
// in interceptor_test.go: TestLeaseRenewal, TestCanceledClientStillStores,
// TestFencingStaleOwner).

import (
	"bytes"
	"context"
	"fmt"
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
	"google.golang.org/grpc/status"
)

// relFleet is n independent servers (own go-redis client, store, grpc.Server)
// on one Redis, sharing a handler, each with a client connection through the
// client interceptor.
type relFleet struct {
	prefix  string
	events  []*eventLog
	clients []testingv1.TestServiceClient
}

func newRelFleet(t *testing.T, n int, redisAddr string, handler func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error),
	serverOpts func(i int) []Option, clientOpts ...ClientOption) *relFleet {
	t.Helper()
	f := &relFleet{prefix: fmt.Sprintf("fleet:%s:%d:", t.Name(), time.Now().UnixNano())}
	svc := &testService{OnDo: handler}
	for i := 0; i < n; i++ {
		events := newEventLog()
		rc := redis.NewClient(&redis.Options{Addr: redisAddr, ContextTimeoutEnabled: true})
		t.Cleanup(func() { rc.Close() })
		opts := append([]Option{WithObserver(events.observe)}, serverOpts(i)...)
		lis := testservice.Serve(t, svc, grpc.UnaryInterceptor(UnaryServerInterceptor(NewRedisStore(rc, WithKeyPrefix(f.prefix)), opts...)))
		f.events = append(f.events, events)
		f.clients = append(f.clients, testservice.Dial(t, lis, grpc.WithChainUnaryInterceptor(UnaryClientInterceptor(clientOpts...))))
	}
	return f
}

func (f *relFleet) count(o Outcome) int {
	n := 0
	for _, e := range f.events {
		n += e.count(o)
	}
	return n
}

// TestSlowHandlerAcrossServers runs a handler for 3.5 times its lease on one
// server while 12 duplicates arrive on three servers (one of them waiting
// for in-progress calls): the lease is renewed, the record stays in
// progress throughout, the handler runs once, and all 13 callers get the
// same bytes.
func TestSlowHandlerAcrossServers(t *testing.T) {
	skipUnlessLong(t)
	redisSrv := newRedisServer(t)
	const lease = 600 * time.Millisecond
	const runFor = 3*lease + lease/2
	started := make(chan struct{})
	var execs atomic.Int64
	handler := func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		if execs.Add(1) == 1 {
			close(started)
		}
		time.Sleep(runFor) // ignores cancellation: committed to its side effect
		return &testingv1.DoResponse{Id: req.GetId(), Execution: n, Payload: []byte(time.Now().String())}, nil
	}
	f := newRelFleet(t, 3, redisSrv.Addr, handler, func(i int) []Option {
		opts := []Option{WithLease(lease), WithRetryDelay(20 * time.Millisecond)}
		if i == 1 {
			opts = append(opts, WithWaitForInProgress(10*time.Millisecond))
		}
		return opts
	}, WithMaxAttempts(500), WithBackoff(10*time.Millisecond, 50*time.Millisecond))
	ctx := WithKey(testCtx(t), "slow-key")
	req := &testingv1.DoRequest{Id: "slow"}

	const dups = 12
	answers := make([][]byte, dups+1)
	infos := make([]CallInfo, dups+1)
	errs := make([]error, dups+1)
	var wg sync.WaitGroup
	call := func(i, server int) {
		defer wg.Done()
		resp, err := f.clients[server].Do(ctx, req, CallResult(&infos[i]))
		errs[i] = err
		if err == nil {
			answers[i], _ = deterministic.Marshal(resp)
		}
	}
	start := time.Now()
	wg.Add(1)
	go call(0, 0)
	<-started
	for i := 1; i <= dups; i++ {
		wg.Add(1)
		go call(i, i%3)
		time.Sleep(lease / 4) // spread the duplicates over the handler's run
	}
	// Past two leases the record is still there, in progress: renewed.
	rc := newRedisClient(t, redisSrv.Addr)
	for time.Since(start) < 2*lease+lease/2 {
		time.Sleep(10 * time.Millisecond)
	}
	raw, err := rawRedisRecord(ctx, rc, f.prefix+StoreKey(methodDo, "", "slow-key"))
	if rec, derr := decodeRecord(raw); err != nil || derr != nil || rec.GetState() != idempotencyv1.Record_STATE_IN_PROGRESS {
		t.Fatalf("record after %v (lease %v): %v %v %v; want in progress", time.Since(start).Round(time.Millisecond), lease, rec.GetState(), err, derr)
	}
	wg.Wait()
	for i := range errs {
		if errs[i] != nil {
			t.Fatalf("caller %d: %v", i, errs[i])
		}
		if !bytes.Equal(answers[i], answers[0]) {
			t.Fatalf("caller %d got a different answer", i)
		}
		if i > 0 && !infos[i].Replayed {
			t.Fatalf("caller %d: not a replay (%+v)", i, infos[i])
		}
	}
	if n := execs.Load(); n != 1 {
		t.Fatalf("handler executions = %d, want 1", n)
	}
	attempts := 0
	for _, in := range infos[1:] {
		attempts += in.Attempts
	}
	t.Logf("reliability: %s: handler ran %v with a %v lease on 1 of 3 servers; %d duplicates made %d attempts (in_progress answers %d), all replayed; executions 1",
		t.Name(), runFor, lease, dups, attempts, f.count(OutcomeInProgress))
}

// TestDeadlineShorterThanHandlerAcrossServers: the caller's deadline (or its
// cancellation) ends the call on one server while the handler, which ignores
// it, goes on; the outcome is stored, and the retry with the same key on
// another server gets the replay. A per-attempt timeout shorter than the
// handler gets the replay within one logical call. A handler that stops on
// cancellation returns Canceled, which is not stored: its retry runs again.
func TestDeadlineShorterThanHandlerAcrossServers(t *testing.T) {
	skipUnlessLong(t)
	redisSrv := newRedisServer(t)
	const handlerTime = 400 * time.Millisecond
	var execs atomic.Int64
	handler := func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		execs.Add(1)
		if req.GetId() == "honours-cancel" {
			select {
			case <-ctx.Done():
				return nil, status.FromContextError(ctx.Err()).Err()
			case <-time.After(handlerTime):
			}
		} else {
			time.Sleep(handlerTime)
		}
		return &testingv1.DoResponse{Id: req.GetId(), Execution: n, Payload: []byte(time.Now().String())}, nil
	}
	servers := func(int) []Option { return []Option{WithLease(time.Second), WithRetryDelay(20 * time.Millisecond)} }
	f := newRelFleet(t, 3, redisSrv.Addr, handler, servers, WithMaxAttempts(200), WithBackoff(10*time.Millisecond, 50*time.Millisecond))
	timed := newRelFleet(t, 1, redisSrv.Addr, handler, servers, WithPerAttemptTimeout(100*time.Millisecond),
		WithMaxAttempts(200), WithBackoff(10*time.Millisecond, 50*time.Millisecond))
	base := testCtx(t)

	for _, tc := range []struct {
		name      string
		id        string
		end       func(ctx context.Context) (context.Context, context.CancelFunc)
		wantFirst codes.Code
		wantExecs int64
	}{
		{"deadline 100ms", "deadline", func(ctx context.Context) (context.Context, context.CancelFunc) {
			return context.WithTimeout(ctx, 100*time.Millisecond)
		}, codes.DeadlineExceeded, 1},
		{"canceled at 50ms", "cancel", func(ctx context.Context) (context.Context, context.CancelFunc) {
			ctx, cancel := context.WithCancel(ctx)
			time.AfterFunc(50*time.Millisecond, cancel)
			return ctx, cancel
		}, codes.Canceled, 1},
		{"handler honours cancellation", "honours-cancel", func(ctx context.Context) (context.Context, context.CancelFunc) {
			return context.WithTimeout(ctx, 100*time.Millisecond)
		}, codes.DeadlineExceeded, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			execs.Store(0)
			key := "short-" + tc.id
			req := &testingv1.DoRequest{Id: tc.id}
			cctx, cancel := tc.end(WithKey(base, key))
			_, err := f.clients[0].Do(cctx, req)
			cancel()
			if status.Code(err) != tc.wantFirst {
				t.Fatalf("first call: %v, want %v", err, tc.wantFirst)
			}
			var info CallInfo
			resp, err := f.clients[1].Do(WithKey(base, key), req, CallResult(&info))
			if err != nil {
				t.Fatalf("retry on another server: %v", err)
			}
			if n := execs.Load(); n != tc.wantExecs {
				t.Fatalf("handler executions = %d, want %d", n, tc.wantExecs)
			}
			if wantReplay := tc.wantExecs == 1; info.Replayed != wantReplay {
				t.Fatalf("retry replayed = %v, want %v (%+v)", info.Replayed, wantReplay, info)
			}
			var again CallInfo
			resp2, err := f.clients[2].Do(WithKey(base, key), req, CallResult(&again))
			b1, _ := deterministic.Marshal(resp)
			b2, _ := deterministic.Marshal(resp2)
			if err != nil || !again.Replayed || !bytes.Equal(b1, b2) || execs.Load() != tc.wantExecs {
				t.Fatalf("third call on a third server: %v (replayed %v), executions %d; want the same replay", err, again.Replayed, execs.Load())
			}
			t.Logf("reliability: %s: first call %v; retry on another server replayed=%v after %d attempt(s); executions %d",
				tc.name, tc.wantFirst, info.Replayed, info.Attempts, execs.Load())
		})
	}

	t.Run("per-attempt timeout 100ms", func(t *testing.T) {
		execs.Store(0)
		var info CallInfo
		_, err := timed.clients[0].Do(WithKey(base, "per-attempt"), &testingv1.DoRequest{Id: "per-attempt"}, CallResult(&info))
		if err != nil || !info.Replayed || info.Attempts < 2 || execs.Load() != 1 {
			t.Fatalf("call with per-attempt timeouts: %v, %+v, executions %d; want the replay after several attempts, 1 execution", err, info, execs.Load())
		}
		t.Logf("reliability: per-attempt timeout 100ms, handler %v: OK replayed after %d attempts; executions 1", handlerTime, info.Attempts)
	})
}
