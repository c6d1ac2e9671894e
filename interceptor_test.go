package idempotency

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

const (
	methodDo     = "/idempotency.testing.v1.TestService/Do"
	methodCharge = "/idempotency.testing.v1.TestService/Charge"
)

func withKey(ctx context.Context, key string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, DefaultKeyHeader, key)
}

// TestReplayIsIdentical verifies that a repeat does not run the handler and
// gets the first answer byte for byte: the message on the wire, the header
// and trailer metadata, plus the replay marker that the first answer lacks.
func TestReplayIsIdentical(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			_ = grpc.SetHeader(ctx, metadata.Pairs("x-charge", "ch_1", "x-bin-bin", "\x00\xff"))
			_ = grpc.SetTrailer(ctx, metadata.Pairs("x-trailer", "t1"))
			return &testingv1.DoResponse{Id: req.GetId(), Execution: n, Payload: req.GetPayload()}, nil
		}}
		env := newTestEnv(t, b.store, envConfig{svc: svc})
		ctx := withKey(testCtx(t), "key-1")
		req := &testingv1.DoRequest{Id: "a", Amount: 100, Payload: bytes.Repeat([]byte{7}, 1000)}

		var h1, t1, h2, t2 metadata.MD
		r1, err := env.client.Do(ctx, req, grpc.Header(&h1), grpc.Trailer(&t1))
		if err != nil {
			t.Fatalf("first call: %v", err)
		}
		r2, err := env.client.Do(ctx, req, grpc.Header(&h2), grpc.Trailer(&t2))
		if err != nil {
			t.Fatalf("repeat: %v", err)
		}
		if n := svc.Runs.Load(); n != 1 {
			t.Fatalf("handler executions = %d, want 1", n)
		}
		if !proto.Equal(r1, r2) {
			t.Fatalf("replayed response %v, want %v", r2, r1)
		}
		wire := env.wire.lastN(2)
		if !bytes.Equal(wire[0], wire[1]) {
			t.Fatalf("replay is not byte-identical on the wire:\n first %x\nreplay %x", wire[0], wire[1])
		}
		if Replayed(h1) {
			t.Fatalf("first answer carries %s: %v", ReplayedHeader, h1)
		}
		if !Replayed(h2) {
			t.Fatalf("replay lacks %s: true; header %v", ReplayedHeader, h2)
		}
		for _, k := range []string{"x-charge", "x-bin-bin"} {
			if got, want := h2.Get(k), h1.Get(k); len(want) != 1 || len(got) != 1 || got[0] != want[0] {
				t.Fatalf("replayed header %s = %q, want %q", k, got, want)
			}
		}
		if got, want := t2.Get("x-trailer"), t1.Get("x-trailer"); len(want) != 1 || len(got) != 1 || got[0] != want[0] {
			t.Fatalf("replayed trailer = %q, want %q", got, want)
		}
		if e, _ := env.events.last(OutcomeReplayed); e.KeyHash == "" || strings.Contains(e.KeyHash, "key-1") {
			t.Fatalf("replay event key hash %q: want a hash that does not reveal the key", e.KeyHash)
		}
	})
}

// TestStoredErrorIsReplayed verifies that a deterministic error is stored
// and replayed with its code, message and details, and a transient one
// releases the key so the retry runs the handler again.
func TestStoredErrorIsReplayed(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		var failedOnce atomic.Bool
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			if req.GetId() == "transient" && failedOnce.CompareAndSwap(false, true) {
				return nil, status.Error(codes.Unavailable, "provider down")
			}
			if req.GetId() == "notfound" {
				st, _ := status.New(codes.NotFound, "no such account").WithDetails(&errdetails.ResourceInfo{ResourceName: "acct-9"})
				return nil, st.Err()
			}
			return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
		}}
		env := newTestEnv(t, b.store, envConfig{svc: svc})
		ctx := testCtx(t)

		nf := &testingv1.DoRequest{Id: "notfound"}
		var h metadata.MD
		_, err1 := env.client.Do(withKey(ctx, "nf"), nf)
		_, err2 := env.client.Do(withKey(ctx, "nf"), nf, grpc.Header(&h))
		if n := svc.Runs.Load(); n != 1 {
			t.Fatalf("handler executions after a stored NotFound = %d, want 1", n)
		}
		if !proto.Equal(status.Convert(err1).Proto(), status.Convert(err2).Proto()) {
			t.Fatalf("replayed status %v, want %v", status.Convert(err2).Proto(), status.Convert(err1).Proto())
		}
		if status.Code(err2) != codes.NotFound || len(status.Convert(err2).Details()) != 1 || !Replayed(h) {
			t.Fatalf("replayed error = %v (details %v, header %v), want NotFound with its detail, marked replayed", err2, status.Convert(err2).Details(), h)
		}

		tr := &testingv1.DoRequest{Id: "transient"}
		if _, err := env.client.Do(withKey(ctx, "tr"), tr); status.Code(err) != codes.Unavailable {
			t.Fatalf("first transient call: %v, want Unavailable", err)
		}
		resp, err := env.client.Do(withKey(ctx, "tr"), tr)
		if err != nil || resp.GetExecution() != 3 {
			t.Fatalf("retry after a transient error = %v, %v; want a new execution (3)", resp, err)
		}
		if got := env.events.count(OutcomeReleased); got != 1 {
			t.Fatalf("released events = %d, want 1", got)
		}
	})
}

// TestKeyReusedForAnotherRequest verifies that a key bound to one request
// refuses a different one with FailedPrecondition, running nothing.
func TestKeyReusedForAnotherRequest(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		env := newTestEnv(t, b.store, envConfig{})
		ctx := withKey(testCtx(t), "k")
		if _, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "a", Amount: 100}); err != nil {
			t.Fatal(err)
		}
		_, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "a", Amount: 200})
		wantStatus(t, err, codes.FailedPrecondition, ReasonKeyReused)
		if n := env.svc.Runs.Load(); n != 1 {
			t.Fatalf("handler executions = %d, want 1", n)
		}
	})
}

// TestBadKeys verifies that missing and malformed keys are refused with
// InvalidArgument and the right reason, before the handler runs.
func TestBadKeys(t *testing.T) {
	env := newTestEnv(t, NewMemoryStore(), envConfig{})
	ctx := testCtx(t)
	for _, tc := range []struct {
		name   string
		md     metadata.MD
		method string
		reason string
	}{
		{"required and missing", nil, "charge", ReasonKeyRequired},
		{"empty", metadata.Pairs(DefaultKeyHeader, ""), "do", ReasonKeyInvalid},
		{"256 bytes", metadata.Pairs(DefaultKeyHeader, strings.Repeat("k", 256)), "do", ReasonKeyInvalid},
		{"space", metadata.Pairs(DefaultKeyHeader, "a b"), "do", ReasonKeyInvalid},
		{"two values", metadata.Pairs(DefaultKeyHeader, "a", DefaultKeyHeader, "b"), "do", ReasonKeyInvalid},
		{"binary header", metadata.Pairs(DefaultKeyHeader+"-bin", "abc"), "charge", ReasonKeyInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := env.svc.Runs.Load()
			cctx := metadata.NewOutgoingContext(ctx, tc.md)
			var err error
			if tc.method == "charge" {
				_, err = env.client.Charge(cctx, &testingv1.ChargeRequest{Amount: 1})
			} else {
				_, err = env.client.Do(cctx, &testingv1.DoRequest{Id: "x"})
			}
			wantStatus(t, err, codes.InvalidArgument, tc.reason)
			if n := env.svc.Runs.Load(); n != before {
				t.Fatalf("handler ran %d times for a refused key", n-before)
			}
		})
	}
}

// TestValidateKey covers the bytes a gRPC client cannot even send (control
// characters, DEL, non-ASCII) along with the ones it can.
func TestValidateKey(t *testing.T) {
	for _, tc := range []struct {
		key string
		ok  bool
	}{
		{"a", true},
		{"!~", true},
		{strings.Repeat("k", 255), true},
		{"", false},
		{strings.Repeat("k", 256), false},
		{strings.Repeat("k", 1<<20), false},
		{"a b", false},
		{"a\tb", false},
		{"a\x00", false},
		{"a\x7f", false},
		{"ключ", false},
	} {
		err := ValidateKey(tc.key)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateKey(%.20q) = %v, want ok=%v", tc.key, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidKey) {
			t.Errorf("ValidateKey(%.20q) error %v does not wrap ErrInvalidKey", tc.key, err)
		}
	}
	if _, _, err := keyFromMetadata(metadata.MD{DefaultKeyHeader: {"a\x01"}}, DefaultKeyHeader); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("control character in metadata: %v, want ErrInvalidKey", err)
	}
}

// TestMethodPolicies verifies the defaults read from the proto descriptors:
// NO_SIDE_EFFECTS methods are never intercepted, methods without a
// declaration pass through without a key, and key_required methods work
// with one; and that code options override them.
func TestMethodPolicies(t *testing.T) {
	env := newTestEnv(t, NewMemoryStore(), envConfig{})
	ctx := testCtx(t)
	for i := 0; i < 2; i++ {
		if _, err := env.client.Read(withKey(ctx, "r"), &testingv1.ReadRequest{Id: "x"}); err != nil {
			t.Fatal(err)
		}
		if _, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "nokey"}); err != nil {
			t.Fatal(err)
		}
	}
	if env.svc.Reads.Load() != 2 || env.svc.Runs.Load() != 2 {
		t.Fatalf("reads=%d runs=%d, want 2 and 2: Read (NO_SIDE_EFFECTS) and keyless Do pass through", env.svc.Reads.Load(), env.svc.Runs.Load())
	}
	if got := env.events.count(OutcomePassThrough); got != 2 {
		t.Fatalf("pass-through events = %d, want 2 (Read is not intercepted at all)", got)
	}
	r1, err := env.client.Charge(withKey(ctx, "c"), &testingv1.ChargeRequest{Amount: 5})
	if err != nil {
		t.Fatal(err)
	}
	r2, err := env.client.Charge(withKey(ctx, "c"), &testingv1.ChargeRequest{Amount: 5})
	if err != nil || r1.GetChargeId() != r2.GetChargeId() {
		t.Fatalf("charge replay = %v, %v; want %v", r2, err, r1)
	}

	env2 := newTestEnv(t, NewMemoryStore(), envConfig{opts: []Option{WithRequiredKey(methodDo), WithIgnoredMethods(methodCharge)}})
	_, err = env2.client.Do(ctx, &testingv1.DoRequest{Id: "nokey"})
	wantStatus(t, err, codes.InvalidArgument, ReasonKeyRequired)
	for i := 0; i < 2; i++ {
		if _, err := env2.client.Charge(withKey(ctx, "c"), &testingv1.ChargeRequest{Amount: 5}); err != nil {
			t.Fatal(err)
		}
	}
	if n := env2.svc.Runs.Load(); n != 2 {
		t.Fatalf("ignored Charge ran %d times, want 2", n)
	}
	if got := DeclaredKeyPolicy(methodCharge); got != KeyRequired {
		t.Fatalf("DeclaredKeyPolicy(Charge) = %v, want required", got)
	}
}

// TestConcurrentDuplicates verifies that N simultaneous calls with one key
// run the handler exactly once: with the default mode the others get the
// replay or Aborted (in progress); with WithWaitForInProgress every caller
// gets the one response.
func TestConcurrentDuplicates(t *testing.T) {
	for _, wait := range []bool{false, true} {
		name := "abort"
		if wait {
			name = "wait"
		}
		t.Run(name, func(t *testing.T) {
			forEachBackend(t, func(t *testing.T, b *backend) {
				release := make(chan struct{})
				svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
					<-release
					return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
				}}
				var opts []Option
				if wait {
					opts = append(opts, WithWaitForInProgress(5*time.Millisecond))
				}
				store := &countingStore{Store: b.store}
				env := newTestEnv(t, store, envConfig{svc: svc, opts: opts})
				ctx := withKey(testCtx(t), "dup")
				const n = 20
				var wg sync.WaitGroup
				resps := make([]*testingv1.DoResponse, n)
				errs := make([]error, n)
				for i := 0; i < n; i++ {
					wg.Add(1)
					go func(i int) {
						defer wg.Done()
						resps[i], errs[i] = env.client.Do(ctx, &testingv1.DoRequest{Id: "same"})
					}(i)
				}
				// Let the handler finish only once every duplicate has met the
				// running first call.
				if wait {
					for store.claims.Load() < 2*n { // every waiter has polled at least twice
						select {
						case <-ctx.Done():
							t.Fatal("timed out waiting for the waiters to poll")
						case <-time.After(time.Millisecond):
						}
					}
				} else {
					env.events.waitFor(t, OutcomeInProgress, n-1)
				}
				close(release)
				wg.Wait()
				if got := svc.Runs.Load(); got != 1 {
					t.Fatalf("handler executions = %d, want 1", got)
				}
				ok := 0
				for i := range errs {
					switch {
					case errs[i] == nil:
						ok++
						if resps[i].GetExecution() != 1 {
							t.Fatalf("caller %d got execution %d, want 1", i, resps[i].GetExecution())
						}
					case !wait:
						wantStatus(t, errs[i], codes.Aborted, ReasonInProgress)
						if d, ok := RetryDelayOf(errs[i]); !ok || d != DefaultRetryDelay {
							t.Fatalf("RetryInfo delay = %v, %v; want %v", d, ok, DefaultRetryDelay)
						}
					default:
						t.Fatalf("caller %d: %v, want the replay", i, errs[i])
					}
				}
				if wait && ok != n {
					t.Fatalf("%d of %d callers got the response, want all", ok, n)
				}
				if !wait && ok != 1 {
					t.Fatalf("%d callers got a response, want 1 (the others met it in progress)", ok)
				}
			})
		})
	}
}

// TestScopeIsolation verifies that two callers using the same key get
// independent records: neither sees the other's response.
func TestScopeIsolation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		scope := func(ctx context.Context) (string, error) {
			md, _ := metadata.FromIncomingContext(ctx)
			if v := md.Get("x-user"); len(v) == 1 {
				return v[0], nil
			}
			return "", status.Error(codes.Unauthenticated, "no user")
		}
		env := newTestEnv(t, b.store, envConfig{opts: []Option{WithScope(scope)}})
		ctx := withKey(testCtx(t), "shared-key")
		alice := metadata.AppendToOutgoingContext(ctx, "x-user", "alice")
		bob := metadata.AppendToOutgoingContext(ctx, "x-user", "bob")
		req := &testingv1.DoRequest{Id: "same"}
		ra, err := env.client.Do(alice, req)
		if err != nil {
			t.Fatal(err)
		}
		rb, err := env.client.Do(bob, req)
		if err != nil {
			t.Fatal(err)
		}
		if ra.GetExecution() == rb.GetExecution() {
			t.Fatalf("bob got alice's response (execution %d)", rb.GetExecution())
		}
		ra2, err := env.client.Do(alice, req)
		if err != nil || ra2.GetExecution() != ra.GetExecution() {
			t.Fatalf("alice's repeat = %v, %v; want her own replay", ra2, err)
		}
		_, err = env.client.Do(ctx, req)
		wantStatus(t, err, codes.Unauthenticated, "")
		if n := env.svc.Runs.Load(); n != 2 {
			t.Fatalf("handler executions = %d, want 2", n)
		}
	})
}

// TestPanicReleasesKey verifies that a panicking handler frees its key (the
// panic reaches the outer recovery interceptor) and the retry runs.
func TestPanicReleasesKey(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			if n == 1 {
				panic("boom")
			}
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		env := newTestEnv(t, b.store, envConfig{svc: svc, outer: []grpc.UnaryServerInterceptor{recoverInterceptor}})
		ctx := withKey(testCtx(t), "p")
		_, err := env.client.Do(ctx, &testingv1.DoRequest{})
		if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("panicking call: %v, want the panic as Internal from the recovery interceptor", err)
		}
		resp, err := env.client.Do(ctx, &testingv1.DoRequest{})
		if err != nil || resp.GetExecution() != 2 {
			t.Fatalf("retry after panic = %v, %v; want execution 2", resp, err)
		}
		if env.events.count(OutcomePanicked) != 1 {
			t.Fatalf("panicked events = %d, want 1", env.events.count(OutcomePanicked))
		}
	})
}

// TestCanceledClientStillStores verifies that when the client goes away
// while the handler runs, the outcome is stored anyway and the retry gets
// the replay.
func TestCanceledClientStillStores(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		started, release := make(chan struct{}), make(chan struct{})
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			close(started)
			<-ctx.Done() // the client is gone
			<-release
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		env := newTestEnv(t, b.store, envConfig{svc: svc})
		base := withKey(testCtx(t), "c")
		cctx, cancel := context.WithCancel(base)
		errc := make(chan error, 1)
		go func() {
			_, err := env.client.Do(cctx, &testingv1.DoRequest{})
			errc <- err
		}()
		<-started
		cancel()
		if err := <-errc; status.Code(err) != codes.Canceled {
			t.Fatalf("canceled call: %v, want Canceled", err)
		}
		close(release)
		env.events.waitFor(t, OutcomeExecuted, 1)
		var h metadata.MD
		resp, err := env.client.Do(base, &testingv1.DoRequest{}, grpc.Header(&h))
		if err != nil || resp.GetExecution() != 1 || !Replayed(h) {
			t.Fatalf("retry = %v, %v (replayed %v); want the replay of execution 1", resp, err, Replayed(h))
		}
	})
}

// countingStore counts Claim and Renew calls.
type countingStore struct {
	Store
	claims   atomic.Int64
	renewals atomic.Int64
	renewed  chan struct{}
}

func (c *countingStore) Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error) {
	res, err := c.Store.Claim(ctx, key, token, record, lease)
	c.claims.Add(1)
	return res, err
}

func (c *countingStore) Renew(ctx context.Context, key, token string, lease time.Duration) error {
	err := c.Store.Renew(ctx, key, token, lease)
	if err == nil {
		c.renewals.Add(1)
		select {
		case c.renewed <- struct{}{}:
		default:
		}
	}
	return err
}

// TestLeaseRenewal verifies that a handler running several times its lease
// keeps the key: duplicates arriving meanwhile meet it in progress and never
// run it again.
func TestLeaseRenewal(t *testing.T) {
	t.Parallel()
	forEachBackend(t, func(t *testing.T, b *backend) {
		t.Parallel() // each waits out three leases
		release := make(chan struct{})
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			<-release
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		store := &countingStore{Store: b.store, renewed: make(chan struct{}, 1)}
		const lease = 300 * time.Millisecond
		env := newTestEnv(t, store, envConfig{svc: svc, opts: []Option{WithLease(lease)}})
		ctx := withKey(testCtx(t), "slow")
		done := make(chan error, 1)
		go func() {
			_, err := env.client.Do(ctx, &testingv1.DoRequest{})
			done <- err
		}()
		// Wait for 13 renewals, one every quarter of the lease: at least 3
		// leases of wall time have passed.
		for store.renewals.Load() < 13 {
			select {
			case <-store.renewed:
			case <-ctx.Done():
				t.Fatal("timed out waiting for renewals")
			}
			_, err := env.client.Do(ctx, &testingv1.DoRequest{})
			wantStatus(t, err, codes.Aborted, ReasonInProgress)
		}
		close(release)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if n := svc.Runs.Load(); n != 1 {
			t.Fatalf("handler executions = %d, want 1", n)
		}
	})
}

// TestFencingStaleOwner verifies that an owner whose lease ran out and whose
// key was claimed by another call cannot overwrite the new owner's result,
// and that the loss is reported.
func TestFencingStaleOwner(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		started, release := make(chan struct{}, 2), make(chan struct{})
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			if n == 1 {
				started <- struct{}{}
				<-release
			}
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		env := newTestEnv(t, b.store, envConfig{svc: svc})
		ctx := withKey(testCtx(t), "f")
		req := &testingv1.DoRequest{Id: "f"}
		done := make(chan error, 1)
		go func() {
			_, err := env.client.Do(ctx, req)
			done <- err
		}()
		<-started
		b.expire(StoreKey(methodDo, "", "f")) // the stalled owner's lease runs out
		second, err := env.client.Do(ctx, req)
		if err != nil || second.GetExecution() != 2 {
			t.Fatalf("takeover = %v, %v; want execution 2", second, err)
		}
		close(release)
		if err := <-done; err != nil {
			t.Fatalf("stale owner's caller: %v (it still gets its own answer)", err)
		}
		e, ok := env.events.last(OutcomeLeaseLost)
		if !ok || !errors.Is(e.Err, ErrLeaseLost) {
			t.Fatalf("no lease_lost event with ErrLeaseLost: %+v", e)
		}
		third, err := env.client.Do(ctx, req)
		if err != nil || third.GetExecution() != 2 {
			t.Fatalf("replay = %v, %v; want the new owner's execution 2, not the stale one", third, err)
		}
	})
}

// TestStoreDownFailsClosed verifies that when Redis is unreachable calls get
// Unavailable and the handler never runs, and that fail-open runs it.
func TestStoreDownFailsClosed(t *testing.T) {
	t.Parallel()
	for _, real := range []bool{false, true} {
		name := map[bool]string{false: "miniredis", true: "redis-server"}[real]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			var addr string
			var stop func()
			if real {
				srv := newRedisServer(t)
				addr, stop = srv.Addr, srv.Stop
			} else {
				m := miniredis.RunT(t)
				addr, stop = m.Addr(), m.Close
			}
			c := newRedisClient(t, addr)
			env := newTestEnv(t, NewRedisStore(c), envConfig{})
			ctx := withKey(testCtx(t), "down")
			if _, err := env.client.Do(ctx, &testingv1.DoRequest{}); err != nil {
				t.Fatal(err)
			}
			stop()
			_, err := env.client.Do(withKey(testCtx(t), "other"), &testingv1.DoRequest{})
			wantStatus(t, err, codes.Unavailable, ReasonStoreUnavailable)
			if n := env.svc.Runs.Load(); n != 1 {
				t.Fatalf("handler executions = %d, want 1: nothing runs without a claim", n)
			}
			open := newTestEnv(t, NewRedisStore(c), envConfig{opts: []Option{WithFailOpen()}})
			if _, err := open.client.Do(ctx, &testingv1.DoRequest{}); err != nil || open.events.count(OutcomeFailOpen) != 1 {
				t.Fatalf("fail-open call: %v, fail_open events %d; want it to run unprotected", err, open.events.count(OutcomeFailOpen))
			}
		})
	}
}

// TestCorruptRecord verifies that garbage, truncated, unknown-version and
// unknown-type records in the store give DataLoss, and nothing runs.
func TestCorruptRecord(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		env := newTestEnv(t, b.store, envConfig{})
		ctx := testCtx(t)
		req := &testingv1.DoRequest{Id: "x"}
		fp, _ := DefaultFingerprint(methodDo, req)
		good, _ := proto.Marshal(&idempotencyv1.Record{Version: recordVersion, State: idempotencyv1.Record_STATE_COMPLETED,
			Fingerprint: fp, Method: methodDo, Status: &idempotencyv1.Status{}, ResponseType: "idempotency.testing.v1.DoResponse"})
		unknownType, _ := proto.Marshal(&idempotencyv1.Record{Version: recordVersion, State: idempotencyv1.Record_STATE_COMPLETED,
			Fingerprint: fp, Method: methodDo, Status: &idempotencyv1.Status{}, ResponseType: "no.such.Message", Response: []byte{1}})
		v2, _ := proto.Marshal(&idempotencyv1.Record{Version: 2, State: idempotencyv1.Record_STATE_COMPLETED, Fingerprint: fp, Method: methodDo})
		for name, rec := range map[string][]byte{
			"garbage":      []byte("\xff\xff\xff garbage"),
			"truncated":    good[:len(good)-3],
			"unknown type": unknownType,
			"version 2":    v2,
			"empty":        {},
		} {
			key := "corrupt-" + strings.ReplaceAll(name, " ", "-")
			b.plant(StoreKey(methodDo, "", key), rec)
			_, err := env.client.Do(withKey(ctx, key), req)
			if status.Code(err) != codes.DataLoss || ReasonOf(err) != ReasonRecordCorrupt {
				t.Fatalf("%s record: %v, want DataLoss RECORD_CORRUPT", name, err)
			}
		}
		if n := env.svc.Runs.Load(); n != 0 {
			t.Fatalf("handler executions = %d, want 0", n)
		}
	})
}

// TestTooLargeIsNeverRerun verifies that an outcome over the size limit is
// returned to the first caller, and repeats are refused rather than run.
func TestTooLargeIsNeverRerun(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		env := newTestEnv(t, b.store, envConfig{opts: []Option{WithMaxRecordSize(4096)}})
		ctx := withKey(testCtx(t), "big")
		req := &testingv1.DoRequest{Payload: bytes.Repeat([]byte("x"), 8192)}
		resp, err := env.client.Do(ctx, req)
		if err != nil || len(resp.GetPayload()) != 8192 {
			t.Fatalf("first call: %v", err)
		}
		_, err = env.client.Do(ctx, req)
		wantStatus(t, err, codes.AlreadyExists, ReasonResponseTooLarge)
		if n := env.svc.Runs.Load(); n != 1 {
			t.Fatalf("handler executions = %d, want 1", n)
		}
	})
}

// TestRejectRepeats verifies the reject mode: repeats get AlreadyExists with
// the stored response attached.
func TestRejectRepeats(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		env := newTestEnv(t, b.store, envConfig{opts: []Option{WithRejectRepeats()}})
		ctx := withKey(testCtx(t), "rr")
		first, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "r"})
		if err != nil {
			t.Fatal(err)
		}
		_, err = env.client.Do(ctx, &testingv1.DoRequest{Id: "r"})
		wantStatus(t, err, codes.AlreadyExists, ReasonAlreadyProcessed)
		var got *testingv1.DoResponse
		for _, d := range status.Convert(err).Proto().GetDetails() {
			m := &testingv1.DoResponse{}
			if d.MessageIs(m) && anypb.UnmarshalTo(d, m, proto.UnmarshalOptions{}) == nil {
				got = m
			}
		}
		if !proto.Equal(got, first) {
			t.Fatalf("attached response %v, want %v", got, first)
		}
	})
}

// TestKeyFromRequestField verifies the AIP-155 mode: the key comes from the
// request_id field and the handler sees it through KeyFromContext.
func TestKeyFromRequestField(t *testing.T) {
	var seen atomic.Value
	svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		k, _ := KeyFromContext(ctx)
		seen.Store(k)
		return &testingv1.DoResponse{Execution: n}, nil
	}}
	env := newTestEnv(t, NewMemoryStore(), envConfig{svc: svc, opts: []Option{WithKeyField("request_id")}})
	ctx := testCtx(t)
	req := &testingv1.DoRequest{RequestId: "9f1c-uuid"}
	for i := 0; i < 3; i++ {
		if _, err := env.client.Do(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	if n := svc.Runs.Load(); n != 1 || seen.Load() != "9f1c-uuid" {
		t.Fatalf("executions %d, key seen %v; want 1 and the request_id", n, seen.Load())
	}
	_, err := env.client.Do(ctx, &testingv1.DoRequest{RequestId: "bad key"})
	wantStatus(t, err, codes.InvalidArgument, ReasonKeyInvalid)
}

// lostReplyStore applies a claim and then loses its reply: with retry set it
// sends the claim again (as a client library retrying after a network error
// would) and returns that answer; without, it returns an error.
type lostReplyStore struct {
	Store
	retry bool
	once  sync.Once
}

func (s *lostReplyStore) Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error) {
	lost := false
	s.once.Do(func() { lost = true })
	res, err := s.Store.Claim(ctx, key, token, record, lease)
	if !lost || err != nil {
		return res, err
	}
	if s.retry {
		return s.Store.Claim(ctx, key, token, record, lease)
	}
	return ClaimResult{}, errors.New("i/o timeout")
}

// TestLostClaimReply verifies the two ways a claim's reply can be lost: a
// retried claim recognises its own record and runs the handler (not "in
// progress" to itself), and a failed claim is released in the background so
// the client's retry runs without waiting for the lease.
func TestLostClaimReply(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		env := newTestEnv(t, &lostReplyStore{Store: b.store, retry: true}, envConfig{})
		ctx := withKey(testCtx(t), "retried")
		if r, err := env.client.Do(ctx, &testingv1.DoRequest{}); err != nil || r.GetExecution() != 1 {
			t.Fatalf("call whose claim was retried = %v, %v; want execution 1", r, err)
		}

		env2 := newTestEnv(t, &lostReplyStore{Store: b.store}, envConfig{})
		ctx2 := withKey(testCtx(t), "failed")
		_, err := env2.client.Do(ctx2, &testingv1.DoRequest{})
		wantStatus(t, err, codes.Unavailable, ReasonStoreUnavailable)
		sk := StoreKey(methodDo, "", "failed")
		for b.exists(sk) {
			select {
			case <-ctx2.Done():
				t.Fatal("the applied claim was never released")
			case <-time.After(time.Millisecond):
			}
		}
		if r, err := env2.client.Do(ctx2, &testingv1.DoRequest{}); err != nil || r.GetExecution() != 1 {
			t.Fatalf("retry after a failed claim = %v, %v; want execution 1", r, err)
		}
	})
}

// TestCallEndedCarriesErrorInfo verifies that when the caller's context ends
// while its call waits for the first call with its key, the answer has the
// context's code and an ErrorInfo (reason CALL_ENDED), like every error the
// interceptor makes, and the handler does not run.
func TestCallEndedCarriesErrorInfo(t *testing.T) {
	store := NewMemoryStore()
	sk := StoreKey(methodDo, "", "waiting")
	fp, err := DefaultFingerprint(methodDo, &testingv1.DoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	rec, err := proto.Marshal(&idempotencyv1.Record{Version: recordVersion, State: idempotencyv1.Record_STATE_IN_PROGRESS,
		Fingerprint: fp, Method: methodDo, LeaseToken: "someone-else"})
	if err != nil {
		t.Fatal(err)
	}
	if res, err := store.Claim(testCtx(t), sk, "someone-else", rec, time.Minute); err != nil || !res.Claimed {
		t.Fatalf("plant the running call: %+v, %v", res, err)
	}
	intercept := UnaryServerInterceptor(store, WithWaitForInProgress(time.Millisecond))
	ctx, cancel := context.WithTimeout(metadata.NewIncomingContext(context.Background(), metadata.Pairs(DefaultKeyHeader, "waiting")), 50*time.Millisecond)
	defer cancel()
	ran := false
	_, err = intercept(ctx, &testingv1.DoRequest{}, &grpc.UnaryServerInfo{FullMethod: methodDo},
		func(context.Context, any) (any, error) { ran = true; return &testingv1.DoResponse{}, nil })
	wantStatus(t, err, codes.DeadlineExceeded, ReasonCallEnded)
	if ran {
		t.Fatalf("the handler ran while the first call held the key")
	}
}
