package idempotency

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

const doWork = "test.DoWork"

// doCounter is a Do function that counts its runs and answers with the run
// number.
type doCounter struct {
	runs atomic.Int64
	// keys are the keys fn found in its context.
	mu   sync.Mutex
	keys []string
}

func (d *doCounter) fn(id string) func(context.Context) (*testingv1.DoResponse, error) {
	return func(ctx context.Context) (*testingv1.DoResponse, error) {
		n := d.runs.Add(1)
		k, _ := KeyFromContext(ctx)
		d.mu.Lock()
		d.keys = append(d.keys, k)
		d.mu.Unlock()
		return &testingv1.DoResponse{Id: id, Execution: n}, nil
	}
}

// TestDoRunsOncePerKey checks Do's basic promise on every store: the
// second Do with a key does not run fn and returns the stored response,
// marked replayed; fn's context carries the key; events name the work;
// the same key under another name is another key.
func TestDoRunsOncePerKey(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		events := newEventLog()
		p := NewProtocol(b.store, WithObserver(events.observe))
		ctx := testCtx(t)
		var d doCounter
		req := &testingv1.DoRequest{Id: "m-1"}

		first, replayed, err := Do(ctx, p, doWork, "msg-1", req, d.fn("m-1"))
		if err != nil || replayed || first.GetExecution() != 1 {
			t.Fatalf("first Do: %v, replayed %v, %v; want execution 1, not replayed", first, replayed, err)
		}
		again, replayed, err := Do(ctx, p, doWork, "msg-1", req, d.fn("m-1"))
		if err != nil || !replayed || !proto.Equal(again, first) {
			t.Fatalf("second Do: %v, replayed %v, %v; want %v replayed", again, replayed, err, first)
		}
		if n := d.runs.Load(); n != 1 {
			t.Fatalf("fn ran %d times for one key, want 1", n)
		}
		if len(d.keys) != 1 || d.keys[0] != "msg-1" {
			t.Errorf("fn's context carried keys %q, want [msg-1]", d.keys)
		}
		for _, o := range []Outcome{OutcomeExecuted, OutcomeReplayed} {
			e, ok := events.last(o)
			if !ok || e.Method != doWork || e.KeyHash == "" || e.Code != codes.OK {
				t.Errorf("%s event: %+v (seen %v); want Method %q, a key hash, code OK", o, e, ok, doWork)
			}
		}

		other, replayed, err := Do(ctx, p, "test.OtherWork", "msg-1", req, d.fn("m-1"))
		if err != nil || replayed || other.GetExecution() != 2 {
			t.Errorf("same key under another name: %v, replayed %v, %v; want a run of its own", other, replayed, err)
		}
	})
}

// TestDoConcurrentDeliveries delivers one message to 16 consumers at once,
// as a queue redelivering to a crowd would: fn runs once, every consumer
// gets the same response, and only the one that ran it is not a replay.
func TestDoConcurrentDeliveries(t *testing.T) {
	const consumers = 16
	forEachBackend(t, func(t *testing.T, b *backend) {
		events := newEventLog()
		p := NewProtocol(b.store, WithObserver(events.observe), WithRetryDelay(time.Millisecond))
		ctx := testCtx(t)
		release := make(chan struct{})
		var runs atomic.Int64
		fn := func(context.Context) (*testingv1.DoResponse, error) {
			n := runs.Add(1)
			<-release
			return &testingv1.DoResponse{Id: "m", Execution: n}, nil
		}
		type answer struct {
			resp     *testingv1.DoResponse
			replayed bool
			err      error
		}
		answers := make(chan answer, consumers)
		for range consumers {
			go func() {
				for {
					resp, replayed, err := Do(ctx, p, doWork, "hot", &testingv1.DoRequest{Id: "m"}, fn)
					if ReasonOf(err) == ReasonInProgress {
						d, ok := RetryDelayOf(err)
						if !ok {
							answers <- answer{err: errors.New("KEY_IN_PROGRESS without a retry delay")}
							return
						}
						time.Sleep(d)
						continue
					}
					answers <- answer{resp, replayed, err}
					return
				}
			}()
		}
		// Every other consumer was turned away at least once while fn ran.
		events.waitFor(t, OutcomeInProgress, consumers-1)
		close(release)
		fresh := 0
		for range consumers {
			a := <-answers
			if a.err != nil || a.resp.GetExecution() != 1 {
				t.Fatalf("a consumer got %v, %v; want execution 1", a.resp, a.err)
			}
			if !a.replayed {
				fresh++
			}
		}
		if n := runs.Load(); n != 1 || fresh != 1 {
			t.Fatalf("fn ran %d times and %d answers were not replays, want 1 and 1", n, fresh)
		}
	})
}

// TestDoStoredError checks what Do returns for fn's errors: the first time
// fn's own error value; then, for a code that is stored, the stored status
// (code, message, details) marked replayed without running fn; for one
// that is not (a plain error is Unknown), fn runs again.
func TestDoStoredError(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		p := NewProtocol(b.store)
		ctx := testCtx(t)
		st, err := status.New(codes.FailedPrecondition, "card declined").WithDetails(&errdetails.ErrorInfo{Reason: "CARD_DECLINED", Domain: "payments.example"})
		if err != nil {
			t.Fatal(err)
		}
		declined := st.Err()
		runs := 0
		fn := func(context.Context) (*testingv1.DoResponse, error) { runs++; return nil, declined }
		req := &testingv1.DoRequest{Id: "d"}

		resp, replayed, err := Do(ctx, p, doWork, "declined", req, fn)
		if err != declined || replayed || resp != nil {
			t.Fatalf("first Do: %v, replayed %v, %v; want fn's own error", resp, replayed, err)
		}
		resp, replayed, err = Do(ctx, p, doWork, "declined", req, fn)
		got, ok := status.FromError(err)
		if !ok || !replayed || resp != nil || runs != 1 {
			t.Fatalf("second Do: %v, replayed %v, %v, fn ran %d times; want the stored status, replayed, one run", resp, replayed, err, runs)
		}
		if !proto.Equal(got.Proto(), st.Proto()) {
			t.Errorf("replayed status %v, want %v", got.Proto(), st.Proto())
		}

		transient := errors.New("the provider timed out")
		fn = func(context.Context) (*testingv1.DoResponse, error) { runs++; return nil, transient }
		for i := range 2 {
			_, replayed, err = Do(ctx, p, doWork, "transient", req, fn)
			if !errors.Is(err, transient) || replayed {
				t.Fatalf("Do %d with a plain error: replayed %v, %v; want fn's own error, not stored", i+1, replayed, err)
			}
		}
		if runs != 3 {
			t.Errorf("fn ran %d times, want 3: a plain error releases the key", runs)
		}
	})
}

// TestDoKeyReused: the same key with a different request is refused,
// KEY_REUSED, and fn does not run.
func TestDoKeyReused(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		p := NewProtocol(b.store)
		ctx := testCtx(t)
		var d doCounter
		if _, _, err := Do(ctx, p, doWork, "k", &testingv1.DoRequest{Id: "a"}, d.fn("a")); err != nil {
			t.Fatal(err)
		}
		resp, replayed, err := Do(ctx, p, doWork, "k", &testingv1.DoRequest{Id: "b"}, d.fn("b"))
		wantStatus(t, err, codes.FailedPrecondition, ReasonKeyReused)
		if resp != nil || replayed || d.runs.Load() != 1 {
			t.Errorf("refused Do: %v, replayed %v, fn ran %d times; want nothing, 1 run", resp, replayed, d.runs.Load())
		}
	})
}

// TestDoInProgress: while fn runs, another Do with its key is refused
// (Aborted, KEY_IN_PROGRESS, with the retry delay), or, on a Protocol with
// WithWaitForInProgress (a second process on the same store), waits and
// gets the replay.
func TestDoInProgress(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		refuse := NewProtocol(b.store, WithRetryDelay(250*time.Millisecond))
		wait := NewProtocol(b.store, WithWaitForInProgress(time.Millisecond))
		ctx := testCtx(t)
		started, release := make(chan struct{}), make(chan struct{})
		var runs atomic.Int64
		fn := func(context.Context) (*testingv1.DoResponse, error) {
			if runs.Add(1) == 1 {
				close(started)
				<-release
			}
			return &testingv1.DoResponse{Id: "slow"}, nil
		}
		req := &testingv1.DoRequest{Id: "slow"}
		first := make(chan error, 1)
		go func() { _, _, err := Do(ctx, refuse, doWork, "slow", req, fn); first <- err }()
		waitStarted(t, started)

		_, replayed, err := Do(ctx, refuse, doWork, "slow", req, fn)
		wantStatus(t, err, codes.Aborted, ReasonInProgress)
		if d, ok := RetryDelayOf(err); !ok || d != 250*time.Millisecond || replayed {
			t.Errorf("in-progress refusal: retry delay %v (%v), replayed %v; want 250ms, not replayed", d, ok, replayed)
		}

		waited := make(chan error, 1)
		var waitedReplay bool
		go func() {
			var err error
			_, waitedReplay, err = Do(ctx, wait, doWork, "slow", req, fn)
			waited <- err
		}()
		close(release)
		if err := <-first; err != nil {
			t.Fatal(err)
		}
		if err := <-waited; err != nil || !waitedReplay {
			t.Fatalf("the waiting Do: replayed %v, %v; want the replay", waitedReplay, err)
		}
		if n := runs.Load(); n != 1 {
			t.Fatalf("fn ran %d times, want 1", n)
		}
	})
}

// TestDoStoreUnavailable: with the store down, Do refuses (Unavailable,
// STORE_UNAVAILABLE) and fn does not run.
func TestDoStoreUnavailable(t *testing.T) {
	store := &hookStore{next: NewMemoryStore(), claim: func(context.Context, string, string, []byte, time.Duration) (ClaimResult, error) {
		return ClaimResult{}, errOutage
	}}
	var d doCounter
	_, _, err := Do(testCtx(t), NewProtocol(store), doWork, "k", &testingv1.DoRequest{}, d.fn(""))
	wantStatus(t, err, codes.Unavailable, ReasonStoreUnavailable)
	if n := d.runs.Load(); n != 0 {
		t.Fatalf("fn ran %d times with the store down, want 0", n)
	}
}

// TestDoLeaseRenewed: fn running for several leases keeps its key; a Do
// with the key after the first lease would have ended is refused as in
// progress rather than run a second time.
func TestDoLeaseRenewed(t *testing.T) {
	t.Parallel()
	const lease = 1500 * time.Millisecond // renewed every 375ms
	forEachBackend(t, func(t *testing.T, b *backend) {
		t.Parallel()
		b.realTime(t)
		var renewals atomic.Int64
		store := &hookStore{next: b.store, renew: func(ctx context.Context, key, token string, l time.Duration) error {
			err := b.store.Renew(ctx, key, token, l)
			if err == nil {
				renewals.Add(1)
			}
			return err
		}}
		p := NewProtocol(store, WithLease(lease))
		ctx := testCtx(t)
		started, release := make(chan struct{}), make(chan struct{})
		var runs atomic.Int64
		fn := func(context.Context) (*testingv1.DoResponse, error) {
			if runs.Add(1) == 1 {
				close(started)
				<-release
			}
			return &testingv1.DoResponse{}, nil
		}
		first := make(chan error, 1)
		go func() { _, _, err := Do(ctx, p, doWork, "long", &testingv1.DoRequest{}, fn); first <- err }()
		waitStarted(t, started)
		start := time.Now()
		waitUntil(t, "four renewals, and past the first lease", func() bool {
			return renewals.Load() >= 4 && time.Since(start) > lease+lease/10
		})
		_, _, err := Do(ctx, p, doWork, "long", &testingv1.DoRequest{}, fn)
		wantStatus(t, err, codes.Aborted, ReasonInProgress)
		close(release)
		if err := <-first; err != nil {
			t.Fatal(err)
		}
		if n := runs.Load(); n != 1 {
			t.Fatalf("fn ran %d times, want 1", n)
		}
	})
}

// TestDoTxStore runs Do over a TxStore: fn's write is in the store's
// transaction and commits with the outcome, once per key; a failed commit
// keeps nothing fn wrote and tells the caller (OUTCOME_NOT_COMMITTED) to
// try again, which then runs fn; a nil response commits nothing, and its
// event reports the Internal the caller got.
func TestDoTxStore(t *testing.T) {
	store := newMemTxStore()
	events := newEventLog()
	p := NewProtocol(store, WithObserver(events.observe))
	ctx := testCtx(t)
	runs := 0
	fn := func(ctx context.Context) (*testingv1.DoResponse, error) {
		runs++
		if err := memWrite(ctx); err != nil {
			return nil, err
		}
		return &testingv1.DoResponse{Execution: int64(runs)}, nil
	}
	for i := range 2 {
		resp, replayed, err := Do(ctx, p, doWork, "tx-1", &testingv1.DoRequest{}, fn)
		if err != nil || resp.GetExecution() != 1 || replayed != (i == 1) {
			t.Fatalf("Do %d: %v, replayed %v, %v", i+1, resp, replayed, err)
		}
	}
	if n := store.writes(); n != 1 || runs != 1 {
		t.Fatalf("%d committed writes and %d runs for two Do with one key, want 1 and 1", n, runs)
	}

	store.mu.Lock()
	store.commitErr = errors.New("serialization failure")
	store.mu.Unlock()
	_, _, err := Do(ctx, p, doWork, "tx-2", &testingv1.DoRequest{}, fn)
	wantStatus(t, err, codes.Unavailable, ReasonNotCommitted)
	if n := store.writes(); n != 1 {
		t.Fatalf("%d committed writes after a failed commit, want still 1", n)
	}
	resp, replayed, err := Do(ctx, p, doWork, "tx-2", &testingv1.DoRequest{}, fn)
	if err != nil || replayed || resp.GetExecution() != 3 || store.writes() != 2 {
		t.Fatalf("retry after a failed commit: %v, replayed %v, %v, %d writes; want a fresh run and 2 writes", resp, replayed, err, store.writes())
	}

	nilResp := func(ctx context.Context) (*testingv1.DoResponse, error) { _ = memWrite(ctx); return nil, nil }
	_, _, err = Do(ctx, p, doWork, "tx-3", &testingv1.DoRequest{}, nilResp)
	wantStatus(t, err, codes.Internal, ReasonInternal)
	if n := store.writes(); n != 2 {
		t.Fatalf("%d committed writes after a nil response, want still 2", n)
	}
	if e, ok := events.last(OutcomeNotStored); !ok || e.Code != codes.Internal {
		t.Fatalf("not_stored event %+v (found %v), want code Internal, as the caller got", e, ok)
	}
}

// TestDoNilResponseNotStored: fn's nil response with a nil error has
// nothing to store; the key is released and the next Do runs fn.
func TestDoNilResponseNotStored(t *testing.T) {
	events := newEventLog()
	p := NewProtocol(NewMemoryStore(), WithObserver(events.observe))
	runs := 0
	fn := func(context.Context) (*testingv1.DoResponse, error) { runs++; return nil, nil }
	for range 2 {
		if resp, replayed, err := Do(testCtx(t), p, doWork, "nil", &testingv1.DoRequest{}, fn); resp != nil || replayed || err != nil {
			t.Fatalf("Do: %v, replayed %v, %v; want fn's nil answer", resp, replayed, err)
		}
	}
	if runs != 2 || events.count(OutcomeNotStored) != 2 {
		t.Fatalf("fn ran %d times with %d not_stored events, want 2 and 2", runs, events.count(OutcomeNotStored))
	}
}

// TestDoPanic: a panic in fn propagates and releases the key.
func TestDoPanic(t *testing.T) {
	p := NewProtocol(NewMemoryStore())
	ctx := testCtx(t)
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Fatalf("recovered %v, want the panic of fn", r)
			}
		}()
		_, _, _ = Do(ctx, p, doWork, "p", &testingv1.DoRequest{}, func(context.Context) (*testingv1.DoResponse, error) { panic("boom") })
	}()
	var d doCounter
	if _, replayed, err := Do(ctx, p, doWork, "p", &testingv1.DoRequest{}, d.fn("")); err != nil || replayed || d.runs.Load() != 1 {
		t.Fatalf("Do after a panic: replayed %v, %v, %d runs; want a fresh run", replayed, err, d.runs.Load())
	}
}

// TestDoRefusesMisuse: an invalid key is refused as the interceptor
// refuses one (KEY_INVALID); a nil Protocol, an empty name or a nil
// function is an Internal error; fn never runs.
func TestDoRefusesMisuse(t *testing.T) {
	p := NewProtocol(NewMemoryStore())
	ctx := testCtx(t)
	var d doCounter
	for _, key := range []string{"", "has space", string(make([]byte, MaxKeyLength+1))} {
		_, _, err := Do(ctx, p, doWork, key, &testingv1.DoRequest{}, d.fn(""))
		wantStatus(t, err, codes.InvalidArgument, ReasonKeyInvalid)
	}
	_, _, err := Do(ctx, nil, doWork, "k", &testingv1.DoRequest{}, d.fn(""))
	wantStatus(t, err, codes.Internal, ReasonInternal)
	_, _, err = Do(ctx, p, "", "k", &testingv1.DoRequest{}, d.fn(""))
	wantStatus(t, err, codes.Internal, ReasonInternal)
	_, _, err = Do[*testingv1.DoResponse](ctx, p, doWork, "k", &testingv1.DoRequest{}, nil)
	wantStatus(t, err, codes.Internal, ReasonInternal)
	if n := d.runs.Load(); n != 0 {
		t.Fatalf("fn ran %d times, want 0", n)
	}
}

// TestDoKeyPolicyIgnored: WithKeyPolicy decides for RPCs; Do always
// protects its work, even when the policy ignores every key.
func TestDoKeyPolicyIgnored(t *testing.T) {
	p := NewProtocol(NewMemoryStore(), WithKeyPolicy(func(string, KeyPolicy) KeyPolicy { return KeyIgnored }))
	var d doCounter
	for range 2 {
		if _, _, err := Do(testCtx(t), p, doWork, "k", &testingv1.DoRequest{}, d.fn("")); err != nil {
			t.Fatal(err)
		}
	}
	if n := d.runs.Load(); n != 1 {
		t.Fatalf("fn ran %d times under a policy that ignores keys, want 1", n)
	}
}

// TestDoSharesRecordsWithRPC: a Do whose name is a gRPC method's full name
// shares that method's records: a call through the gRPC adapter with the
// same key and request is the replay of the Do, and the reverse.
func TestDoSharesRecordsWithRPC(t *testing.T) {
	p := NewProtocol(NewMemoryStore())
	ctx := testCtx(t)
	intercept := p.UnaryServerInterceptor()
	info := &grpc.UnaryServerInfo{FullMethod: testservice.MethodDo}
	handlerRuns := 0
	handler := func(context.Context, any) (any, error) {
		handlerRuns++
		return &testingv1.DoResponse{Id: "rpc"}, nil
	}
	var d doCounter
	req := &testingv1.DoRequest{Id: "x"}

	if _, _, err := Do(ctx, p, testservice.MethodDo, "from-queue", req, d.fn("queue")); err != nil {
		t.Fatal(err)
	}
	resp, err := intercept(metadata.NewIncomingContext(ctx, metadata.Pairs(DefaultKeyHeader, "from-queue")), req, info, handler)
	if r, ok := resp.(*testingv1.DoResponse); err != nil || !ok || r.GetId() != "queue" {
		t.Errorf("RPC after Do with its key: %v, %v; want the Do's stored response", resp, err)
	}

	if _, err := intercept(metadata.NewIncomingContext(ctx, metadata.Pairs(DefaultKeyHeader, "from-rpc")), req, info, handler); err != nil {
		t.Fatal(err)
	}
	got, replayed, err := Do(ctx, p, testservice.MethodDo, "from-rpc", req, d.fn("queue"))
	if err != nil || !replayed || got.GetId() != "rpc" {
		t.Errorf("Do after an RPC with its key: %v, replayed %v, %v; want the RPC's stored response", got, replayed, err)
	}
	if d.runs.Load() != 1 || handlerRuns != 1 {
		t.Errorf("Do's fn ran %d times and the handler %d, want 1 and 1", d.runs.Load(), handlerRuns)
	}
}
