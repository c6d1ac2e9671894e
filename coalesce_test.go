package idempotency

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
)

// TestCoalescing verifies that with WithCoalescing a burst of identical
// calls on one server makes one claim and one execution, and every caller
// gets the response.
func TestCoalescing(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		release := make(chan struct{})
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			<-release
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		var joined atomic.Int64
		testHookJoined = func() { joined.Add(1) }
		t.Cleanup(func() { testHookJoined = nil })
		store := &countingStore{Store: b.store}
		env := newTestEnv(t, store, envConfig{svc: svc, opts: []Option{WithCoalescing()}})
		ctx := withKey(testCtx(t), "burst")
		const n = 16
		var wg sync.WaitGroup
		errs := make([]error, n)
		resps := make([]*testingv1.DoResponse, n)
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				resps[i], errs[i] = env.client.Do(ctx, &testingv1.DoRequest{Id: "burst"})
			}(i)
		}
		// All but the leader join its flight before it finishes.
		for joined.Load() < n-1 {
			select {
			case <-ctx.Done():
				t.Fatalf("timed out: %d waiters joined", joined.Load())
			case <-time.After(time.Millisecond):
			}
		}
		close(release)
		wg.Wait()
		for i := range errs {
			if errs[i] != nil || resps[i].GetExecution() != 1 {
				t.Fatalf("caller %d: %v, %v; want execution 1", i, resps[i], errs[i])
			}
		}
		if c := store.claims.Load(); c != 1 {
			t.Fatalf("store claims = %d, want 1", c)
		}
		if r := svc.Runs.Load(); r != 1 {
			t.Fatalf("executions = %d, want 1", r)
		}
	})
}
