package idempotency

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc/codes"
)

// TestLookupAndForget verifies the support tooling: a stuck in-progress
// record is visible with its state and lease, Forget frees it, and the next
// call runs; a completed record shows its code and retention.
func TestLookupAndForget(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		admin, ok := b.store.(AdminStore)
		if !ok {
			t.Fatalf("%T does not implement AdminStore", b.store)
		}
		started, release := make(chan struct{}), make(chan struct{})
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			if n == 1 {
				close(started)
				<-release
			}
			return &testingv1.DoResponse{Execution: n, Payload: []byte("abc")}, nil
		}}
		env := newTestEnv(t, b.store, envConfig{svc: svc, opts: []Option{WithLease(time.Minute), WithTTL(time.Hour)}})
		ctx := withKey(testCtx(t), "stuck")
		done := make(chan error, 1)
		go func() {
			_, err := env.client.Do(ctx, &testingv1.DoRequest{})
			done <- err
		}()
		waitStarted(t, started)
		info, err := Lookup(ctx, admin, methodDo, "", "stuck")
		if err != nil || info.State != "in_progress" || info.TTL <= 0 || info.TTL > time.Minute || info.Created.IsZero() {
			t.Fatalf("Lookup of a running call = %+v, %v; want in_progress with a lease of at most 1m", info, err)
		}
		if err := Forget(ctx, admin, methodDo, "", "stuck"); err != nil {
			t.Fatal(err)
		}
		if _, err := Lookup(ctx, admin, methodDo, "", "stuck"); !errors.Is(err, ErrNoRecord) {
			t.Fatalf("Lookup after Forget: %v, want ErrNoRecord", err)
		}
		r, err := env.client.Do(ctx, &testingv1.DoRequest{})
		if err != nil || r.GetExecution() != 2 {
			t.Fatalf("call after Forget = %v, %v; want execution 2", r, err)
		}
		close(release)
		<-done
		env.events.waitFor(t, OutcomeLeaseLost, 1) // the forgotten owner wrote nothing
		info, err = Lookup(ctx, admin, methodDo, "", "stuck")
		if err != nil || info.State != "completed" || info.Code != codes.OK || info.TTL <= 59*time.Minute || info.ResponseSize == 0 {
			t.Fatalf("Lookup of a completed call = %+v, %v", info, err)
		}
		if err := Forget(ctx, admin, methodDo, "", "never"); !errors.Is(err, ErrNoRecord) {
			t.Fatalf("Forget of an unknown key: %v, want ErrNoRecord", err)
		}
	})
}

// TestForgottenRecordIsNotWrittenBack verifies what Forget promises about a
// call that was in fact still running: when nobody claims the key in
// between, the owner writes nothing back, whether it learns of the Forget
// when it stores its outcome or at a renewal (even one long after the
// forgotten lease would have ended); its caller still gets the answer, the
// server reports lease_lost, and the next call runs the handler.
func TestForgottenRecordIsNotWrittenBack(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		lease time.Duration
	}{
		{"learns at completion", time.Minute},
		{"learns at a renewal", 300 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forEachBackend(t, func(t *testing.T, b *backend) {
				t.Parallel()
				admin := b.store.(AdminStore)
				b.realTime(t)
				var fenced atomic.Int64
				store := &hookStore{next: b.store}
				store.claim = func(ctx context.Context, key, token string, record []byte, l time.Duration) (ClaimResult, error) {
					res, err := b.store.Claim(ctx, key, token, record, l)
					if errors.Is(err, ErrLeaseLost) {
						fenced.Add(1)
					}
					return res, err
				}
				started, release := make(chan struct{}), make(chan struct{})
				env := newTestEnv(t, store, envConfig{svc: &testService{OnDo: blockingFirstRun(started, release)},
					opts: []Option{WithLease(tc.lease)}})
				ctx := withKey(testCtx(t), "forgotten")
				done := make(chan error, 1)
				go func() {
					_, err := env.client.Do(ctx, &testingv1.DoRequest{})
					done <- err
				}()
				waitStarted(t, started)
				if err := Forget(ctx, admin, methodDo, "", "forgotten"); err != nil {
					t.Fatal(err)
				}
				if tc.lease < time.Minute {
					waitUntil(t, "a renewal finds the record forgotten", func() bool { return fenced.Load() >= 1 })
					// Long past the forgotten lease: no fence is left in
					// the store to stop a write.
					deadline := time.Now().Add(3 * tc.lease)
					waitUntil(t, "the forgotten lease has ended", func() bool { return time.Now().After(deadline) })
				}
				close(release)
				if err := <-done; err != nil {
					t.Fatalf("the forgotten call's own answer: %v", err)
				}
				env.events.waitFor(t, OutcomeLeaseLost, 1)
				if _, err := Lookup(ctx, admin, methodDo, "", "forgotten"); !errors.Is(err, ErrNoRecord) {
					t.Fatalf("Lookup after the forgotten call finished: %v, want ErrNoRecord (written back)", err)
				}
				r, err := env.client.Do(ctx, &testingv1.DoRequest{})
				if err != nil || r.GetExecution() != 2 {
					t.Fatalf("call after Forget = %v, %v; want execution 2", r, err)
				}
			})
		})
	}
}
