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
			icpt := srv.intercept
			const calls = 100
			release := make(chan struct{})
			var entered atomic.Int64
			handler := func(ctx context.Context, req any) (any, error) {
				entered.Add(1)
				<-release
				return &testingv1.DoResponse{}, nil
			}
			var wg sync.WaitGroup
			for i := range calls {
				wg.Go(func() {
					ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("idempotency-key", fmt.Sprintf("renew-%d", i)))
					if _, err := icpt(ctx, &testingv1.DoRequest{}, &grpc.UnaryServerInfo{FullMethod: "/t/Do"}, handler); err != nil {
						t.Error(err)
					}
				})
			}
			waitUntil(t, "every call runs", func() bool { return entered.Load() == calls })
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
			close(release)
			wg.Wait()
			waitUntil(t, "the renewer's goroutine ends with the last lease", func() bool {
				srv.renewer.mu.Lock()
				defer srv.renewer.mu.Unlock()
				return !srv.renewer.running && srv.renewer.queue.Len() == 0 && len(srv.renewer.retries) == 0
			})
		})
	}
}
