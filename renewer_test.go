package idempotency

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// batchCounter is a MemoryStore that records the size of each RenewBatch.
type batchCounter struct {
	*MemoryStore
	mu      sync.Mutex
	largest int
	batches int
}

func (b *batchCounter) RenewBatch(ctx context.Context, keys, tokens []string, lease time.Duration) []error {
	b.mu.Lock()
	b.batches++
	b.largest = max(b.largest, len(keys))
	b.mu.Unlock()
	return b.MemoryStore.RenewBatch(ctx, keys, tokens, lease)
}

// onlyStore hides every method but the Store's: no BatchRenewer.
type onlyStore struct{ Store }

// One server keeps the leases of all its calls in flight with one
// goroutine, renewing the keys that are due together in one batch; the
// goroutine ends when no lease is left. Without a BatchRenewer the same
// leases are renewed one by one.
func TestRenewerBatchesTheLeasesOfAllCalls(t *testing.T) {
	t.Parallel()
	for _, batched := range []bool{true, false} {
		name := "batch"
		if !batched {
			name = "one by one"
		}
		t.Run(name, func(t *testing.T) {
			counter := &batchCounter{MemoryStore: NewMemoryStore()}
			var store Store = counter
			if !batched {
				store = onlyStore{counter.MemoryStore}
			}
			var renewals atomic.Int64
			o := WithLease(300 * time.Millisecond)
			srv := newServer(store, []Option{o, func(o *options) { o.renewHook = func(string) { renewals.Add(1) } }})
			const calls = 100
			release := holdCalls(t, srv, "renew", calls)
			// Each lease renewed twice, at least (every 100 ms).
			waitUntil(t, "two renewals of every lease", func() bool { return renewals.Load() >= 2*calls })
			counter.mu.Lock()
			largest := counter.largest
			counter.mu.Unlock()
			if batched && largest < calls/2 {
				t.Errorf("the largest renewal batch had %d keys; calls that started together should share one", largest)
			}
			if !batched && largest != 0 {
				t.Errorf("RenewBatch was called on a store that is not a BatchRenewer")
			}
			release()
			waitUntil(t, "the renewer's goroutine ends with the last lease", func() bool {
				srv.renewer.mu.Lock()
				defer srv.renewer.mu.Unlock()
				return !srv.renewer.running && len(srv.renewer.due) == 0 && len(srv.renewer.retries) == 0
			})
		})
	}
}

// A tick sends at most 256 renewals per pipeline: 1,000 calls in flight,
// started together, are renewed in several capped batches.
func TestRenewalBatchesAreCapped(t *testing.T) {
	t.Parallel()
	counter := &batchCounter{MemoryStore: NewMemoryStore()}
	var renewals atomic.Int64
	// A lease long enough that no claim answers too late for it, even
	// with 1,000 calls under -race on a busy machine.
	srv := newServer(counter, []Option{WithLease(3 * time.Second), func(o *options) { o.renewHook = func(string) { renewals.Add(1) } }})
	const calls = 1000
	release := holdCalls(t, srv, "cap", calls)
	waitUntil(t, "two renewals of every lease", func() bool { return renewals.Load() >= 2*calls })
	release()
	counter.mu.Lock()
	defer counter.mu.Unlock()
	if counter.largest > 256 || counter.batches < 2*calls/256 {
		t.Fatalf("%d renewal batches, the largest of %d keys; want at most 256 keys each", counter.batches, counter.largest)
	}
}

// holdCalls starts n keyed calls (keys prefix-0 ... prefix-n-1) through srv's
// interceptor and waits until every handler runs; each handler then waits.
// release lets them return and waits for the calls to end.
func holdCalls(t *testing.T, srv *server, prefix string, n int) (release func()) {
	t.Helper()
	gate := make(chan struct{})
	var entered atomic.Int64
	handler := func(ctx context.Context, req any) (any, error) {
		entered.Add(1)
		<-gate
		return &testingv1.DoResponse{}, nil
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("idempotency-key", fmt.Sprintf("%s-%d", prefix, i)))
			if _, err := srv.intercept(ctx, &testingv1.DoRequest{}, &grpc.UnaryServerInfo{FullMethod: "/t/Do"}, handler); err != nil {
				t.Error(err)
			}
		})
	}
	waitUntil(t, "every call runs", func() bool { return entered.Load() == int64(n) })
	return func() {
		close(gate)
		wg.Wait()
	}
}
