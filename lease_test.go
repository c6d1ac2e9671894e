package idempotency

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// hookStore wraps a store; each hook, when set, replaces the method and may
// call through to next.
type hookStore struct {
	next     Store
	claim    func(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error)
	renew    func(ctx context.Context, key, token string, lease time.Duration) error
	complete func(ctx context.Context, key, token string, record []byte, ttl time.Duration) error
	release  func(ctx context.Context, key, token string) error
}

func (h *hookStore) Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error) {
	if h.claim != nil {
		return h.claim(ctx, key, token, record, lease)
	}
	return h.next.Claim(ctx, key, token, record, lease)
}

func (h *hookStore) Renew(ctx context.Context, key, token string, lease time.Duration) error {
	if h.renew != nil {
		return h.renew(ctx, key, token, lease)
	}
	return h.next.Renew(ctx, key, token, lease)
}

func (h *hookStore) Complete(ctx context.Context, key, token string, record []byte, ttl time.Duration) error {
	if h.complete != nil {
		return h.complete(ctx, key, token, record, ttl)
	}
	return h.next.Complete(ctx, key, token, record, ttl)
}

func (h *hookStore) Release(ctx context.Context, key, token string) error {
	if h.release != nil {
		return h.release(ctx, key, token)
	}
	return h.next.Release(ctx, key, token)
}

var errOutage = errors.New("test: the store is unreachable")

// blockingFirstRun returns a Do handler whose first execution signals
// started and waits for release; later executions return at once.
func blockingFirstRun(started, release chan struct{}) func(context.Context, *testingv1.DoRequest, int64) (*testingv1.DoResponse, error) {
	return func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		if n == 1 {
			close(started)
			<-release
		}
		return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
	}
}

// waitStarted waits for a handler to signal started, failing the test
// rather than hanging if it never does (its call failed first).
func waitStarted(t *testing.T, started <-chan struct{}) {
	t.Helper()
	select {
	case <-started:
	case <-time.After(testTimeout):
		t.Fatalf("the handler never started within %v", testTimeout)
	}
}

// waitUntil polls cond until it holds, failing the test after testTimeout.
func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestLeaseSurvivesOutageOfTwoRenewals verifies that an outage which makes
// two renewals in a row fail, but ends inside the lease, does not lose the
// lease: the keeper retries within a fraction of the lease instead of
// waiting for the next tick (which lands when the lease ends), and a
// duplicate sent after the first lease would have ended is still told the
// first call is in progress.
func TestLeaseSurvivesOutageOfTwoRenewals(t *testing.T) {
	skipUnlessLong(t)
	const lease = 6 * time.Second // renewals every 2s
	forEachBackend(t, func(t *testing.T, b *backend) {
		t.Parallel()
		b.realTime(t)
		var (
			down      atomic.Bool
			mu        sync.Mutex
			renewedAt []time.Time
		)
		store := &hookStore{next: b.store}
		store.renew = func(ctx context.Context, key, token string, l time.Duration) error {
			if down.Load() {
				return errOutage
			}
			err := b.store.Renew(ctx, key, token, l)
			if err == nil {
				mu.Lock()
				renewedAt = append(renewedAt, time.Now())
				mu.Unlock()
			}
			return err
		}
		store.claim = func(ctx context.Context, key, token string, record []byte, l time.Duration) (ClaimResult, error) {
			if down.Load() {
				return ClaimResult{}, errOutage
			}
			return b.store.Claim(ctx, key, token, record, l)
		}
		renewals := func() []time.Time {
			mu.Lock()
			defer mu.Unlock()
			return append([]time.Time(nil), renewedAt...)
		}
		started, release := make(chan struct{}), make(chan struct{})
		env := newTestEnv(t, store, envConfig{svc: &testService{OnDo: blockingFirstRun(started, release)},
			opts: []Option{WithLease(lease), WithRetryDelay(time.Millisecond)}})
		ctx := withKey(testCtx(t), "outage")
		first := make(chan error, 1)
		go func() {
			_, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "a"})
			first <- err
		}()
		waitStarted(t, started)
		waitUntil(t, "the first renewal succeeds", func() bool { return len(renewals()) >= 1 })
		renewed := renewals()[0]
		down.Store(true)
		// Down for three quarters of the lease: the renewals a third and two
		// thirds of a lease after the last success both fail.
		time.Sleep(time.Until(renewed.Add(lease * 3 / 4)))
		down.Store(false)
		waitUntil(t, "a renewal succeeds after the outage", func() bool { return len(renewals()) >= 2 })
		if got := renewals()[1].Sub(renewed); got > lease*92/100 {
			t.Fatalf("first renewal after the outage came %v after the last one, with a lease of %v: the lease was nearly or wholly lost", got, lease)
		}
		// Past the end of the lease the outage would have lost.
		time.Sleep(time.Until(renewed.Add(lease + lease/5)))
		wantInProgressThenOnce(ctx, t, env, release, first)
	})
}

// TestLeaseTakenBackWhenKeyVanished verifies that when a renewal finds the
// key gone (its lease ran out while the store was unreachable) and nobody
// else owns it, the keeper takes it back under the same token: a duplicate
// is told the first call is in progress instead of running the handler, and
// the first call's outcome is stored and replayed.
func TestLeaseTakenBackWhenKeyVanished(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		var tookBack atomic.Int64
		var tokens sync.Map
		store := &hookStore{next: b.store}
		store.claim = func(ctx context.Context, key, token string, record []byte, l time.Duration) (ClaimResult, error) {
			res, err := b.store.Claim(ctx, key, token, record, l)
			if _, seen := tokens.LoadOrStore(token, true); seen && err == nil && res.Claimed {
				tookBack.Add(1)
			}
			return res, err
		}
		started, release := make(chan struct{}), make(chan struct{})
		env := newTestEnv(t, store, envConfig{svc: &testService{OnDo: blockingFirstRun(started, release)},
			opts: []Option{WithLease(300 * time.Millisecond)}})
		ctx := withKey(testCtx(t), "vanished")
		first := make(chan *testingv1.DoResponse, 1)
		go func() {
			r, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "a"})
			if err != nil {
				t.Errorf("first call: %v", err)
			}
			first <- r
		}()
		waitStarted(t, started)
		b.expire(StoreKey(methodDo, "", "vanished"))
		waitUntil(t, "the keeper takes the key back", func() bool { return tookBack.Load() >= 1 })
		_, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "a"})
		wantStatus(t, err, codes.Aborted, ReasonInProgress)
		close(release)
		r1 := <-first
		r2, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "a"})
		if err != nil || r2.GetExecution() != r1.GetExecution() {
			t.Fatalf("repeat = %v, %v; want the replay of execution %d", r2, err, r1.GetExecution())
		}
		if n := env.svc.Runs.Load(); n != 1 {
			t.Fatalf("handler ran %d times, want 1", n)
		}
	})
}

// TestLeaseOfLessThanAMillisecondIsRefused verifies that no lease or TTL
// below Redis's 1 ms resolution reaches a store: the options panic at
// construction, naming themselves, and every store refuses such an expiry
// without writing (PEXPIRE 0 would delete the claim at once and let every
// concurrent duplicate run).
func TestLeaseOfLessThanAMillisecondIsRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		opt  func()
	}{
		{"WithLease", func() { WithLease(500 * time.Microsecond) }},
		{"WithLease", func() { WithLease(0) }},
		{"WithLease", func() { WithLease(-time.Second) }},
		{"WithTTL", func() { WithTTL(999 * time.Microsecond) }},
		{"WithTTL", func() { WithTTL(0) }},
	} {
		func() {
			defer func() {
				r := recover()
				if msg, _ := r.(string); !strings.Contains(msg, tc.name) || !strings.Contains(msg, "1ms") {
					t.Errorf("%s with a sub-millisecond value: recovered %v, want a panic naming the option and the 1ms floor", tc.name, r)
				}
			}()
			tc.opt()
		}()
	}
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := testCtx(t)
		if _, err := b.store.Claim(ctx, "k", "tok", []byte("rec"), 500*time.Microsecond); err == nil {
			t.Fatalf("Claim with a 500µs lease succeeded, want an error")
		}
		if b.exists("k") {
			t.Fatalf("a refused claim left a record")
		}
		res, err := b.store.Claim(ctx, "k", "tok", []byte("rec"), time.Minute)
		if err != nil || !res.Claimed {
			t.Fatalf("Claim = %+v, %v; want claimed", res, err)
		}
		if err := b.store.Renew(ctx, "k", "tok", 0); err == nil {
			t.Fatalf("Renew with a zero lease succeeded, want an error")
		}
		if err := b.store.Complete(ctx, "k", "tok", []byte("final"), -time.Second); err == nil {
			t.Fatalf("Complete with a negative TTL succeeded, want an error")
		}
		if !b.exists("k") {
			t.Fatalf("a refused renew or complete deleted the claim")
		}
	})
}

// TestAnswerNotDelayedByRenewal verifies that a renewal in flight when the
// handler returns never delays the answer, even when the store ignores its
// context (as go-redis does without ContextTimeoutEnabled).
func TestAnswerNotDelayedByRenewal(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		renewing := make(chan struct{})
		unblock := make(chan struct{})
		var once sync.Once
		store := &hookStore{next: b.store}
		store.renew = func(ctx context.Context, key, token string, l time.Duration) error {
			once.Do(func() { close(renewing) })
			<-unblock // hung, deaf to ctx
			return b.store.Renew(context.Background(), key, token, l)
		}
		defer close(unblock)
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			<-renewing
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		// Long enough that no claim answers too late for its lease (7/8 of
		// it) on a busy machine; the first renewal comes a quarter in.
		env := newTestEnv(t, store, envConfig{svc: svc, opts: []Option{WithLease(200 * time.Millisecond)}})
		done := make(chan error, 1)
		go func() {
			_, err := env.client.Do(withKey(testCtx(t), "hung-renewal"), &testingv1.DoRequest{})
			done <- err
		}()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("call: %v", err)
			}
		case <-time.After(testTimeout):
			t.Fatalf("the answer waited for a hung renewal")
		}
	})
}

// TestNoRenewalAfterRelease verifies that once the interceptor releases a
// key (a transient error), no renewal of it begins: a late renewal could
// otherwise take a released key back and strand it until its lease ends.
func TestNoRenewalAfterRelease(t *testing.T) {
	t.Parallel()
	forEachBackend(t, func(t *testing.T, b *backend) {
		t.Parallel()
		var mu sync.Mutex
		released := map[string]bool{}
		var late, renewals atomic.Int64
		store := &hookStore{next: b.store}
		store.release = func(ctx context.Context, key, token string) error {
			mu.Lock()
			released[key] = true
			mu.Unlock()
			return b.store.Release(ctx, key, token)
		}
		hook := func(o *options) {
			o.renewHook = func(key string) {
				renewals.Add(1)
				mu.Lock()
				defer mu.Unlock()
				if released[key] {
					late.Add(1)
				}
			}
		}
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			time.Sleep(10 * time.Millisecond)
			return nil, status.Error(codes.Unavailable, "downstream busy")
		}}
		// Renewals every 5ms: one or two per call, the last one often in
		// flight when the call releases the key.
		env := newTestEnv(t, store, envConfig{svc: svc, opts: []Option{WithLease(20 * time.Millisecond), hook}})
		ctx := testCtx(t)
		for i := 0; i < 40; i++ {
			_, err := env.client.Do(withKey(ctx, "released-"+string(rune('a'+i%26))+string(rune('a'+i/26))), &testingv1.DoRequest{})
			wantStatus(t, err, codes.Unavailable, "")
		}
		if renewals.Load() == 0 {
			t.Fatalf("no renewal ran at all: the test proves nothing")
		}
		if n := late.Load(); n != 0 {
			t.Fatalf("%d renewals began after their key was released", n)
		}
	})
}

// TestLostReleaseReplyIsNotLeaseLost verifies that a release whose reply
// was lost, and which is therefore sent again, is recognised as done: the
// key is free and nobody else owns it, so the call reports "released", not
// a lost lease.
func TestLostReleaseReplyIsNotLeaseLost(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		var lost atomic.Bool
		store := &hookStore{next: b.store}
		store.release = func(ctx context.Context, key, token string) error {
			err := b.store.Release(ctx, key, token)
			if err == nil && lost.CompareAndSwap(false, true) {
				return errors.New("test: connection reset before the reply")
			}
			return err
		}
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			return nil, status.Error(codes.Unavailable, "downstream busy")
		}}
		env := newTestEnv(t, store, envConfig{svc: svc})
		_, err := env.client.Do(withKey(testCtx(t), "lost-release"), &testingv1.DoRequest{})
		wantStatus(t, err, codes.Unavailable, "")
		env.events.waitFor(t, OutcomeReleased, 1)
		if n := env.events.count(OutcomeLeaseLost); n != 0 || !lost.Load() {
			t.Fatalf("lease_lost events = %d (reply lost: %v), want 0 after a lost release reply", n, lost.Load())
		}
		if b.exists(StoreKey(methodDo, "", "lost-release")) {
			t.Fatalf("the key is still held after the release")
		}
	})
}

// wantInProgressThenOnce checks that a repeat of the held first call (its
// handler waiting on release, its error to come on first) is refused as in
// progress, then lets the first call end and checks that it succeeded and
// the handler ran once.
func wantInProgressThenOnce(ctx context.Context, t *testing.T, env *testEnv, release chan struct{}, first <-chan error) {
	t.Helper()
	_, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "a"})
	wantStatus(t, err, codes.Aborted, ReasonInProgress)
	close(release)
	if err := <-first; err != nil {
		t.Fatalf("first call: %v", err)
	}
	if n := env.svc.Runs.Load(); n != 1 {
		t.Fatalf("handler ran %d times, want 1", n)
	}
}
