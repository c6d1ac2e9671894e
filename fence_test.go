package idempotency

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fencedLedger is a business table written as the README's recipe says:
// one row per key, written only with a fence greater than the row's
// (INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE fence < excluded.fence).
// It also counts every write attempted, as a ledger without the check
// would have appended it.
type fencedLedger struct {
	mu       sync.Mutex
	rows     map[string]ledgerRow
	attempts int // writes attempted: the rows an unfenced ledger would hold
	refused  int
}

type ledgerRow struct {
	fence  uint64
	writer string
}

var errStaleFence = status.Error(codes.Aborted, "a newer owner of the key has written: this one is stale")

func (l *fencedLedger) write(key string, fence uint64, writer string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.attempts++
	if l.rows == nil {
		l.rows = map[string]ledgerRow{}
	}
	if r, ok := l.rows[key]; ok && r.fence >= fence {
		l.refused++
		return errStaleFence
	}
	l.rows[key] = ledgerRow{fence: fence, writer: writer}
	return nil
}

// pausedRenewals is the store as a paused owner's process sees it: its
// renewals hang until resume is closed, as they would while the process
// is stopped (a GC pause, a stalled VM). Everything else passes through.
type pausedRenewals struct {
	Store
	resume chan struct{}
}

func (p *pausedRenewals) Renew(ctx context.Context, key, token string, lease time.Duration) error {
	<-p.resume
	return p.Store.Renew(ctx, key, token, lease)
}

// TestFenceRefusesStaleOwner is issue 26's proof on every store (memory,
// miniredis, a real redis-server): the first owner of a key is paused past
// its lease (its handler held at a gate, its renewals held too), a second
// owner takes the key over once the lease has expired in the store and
// finishes; then the first owner wakes and writes. Its write carries the
// older fence and is refused: the ledger holds one row, the second owner's,
// although two writes were attempted, and the key replays the second
// owner's outcome. The pause is deterministic: the store's clock is moved
// (miniredis FastForward, the memory store's clock), or, on redis-server,
// the test waits until the key has expired.
func TestFenceRefusesStaleOwner(t *testing.T) {
	t.Parallel()
	for _, bf := range backendFactories {
		t.Run(bf.name, func(t *testing.T) {
			b := bf.new(t)
			lease := time.Minute
			expire := func() { b.mini.FastForward(2 * lease) }
			switch b.name {
			case "memory":
				var mu sync.Mutex
				now := time.Now()
				s := NewMemoryStore()
				s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
				b.store = s
				expire = func() { mu.Lock(); now = now.Add(2 * lease); mu.Unlock() }
			case "redis-server":
				lease = 1500 * time.Millisecond
				expire = nil // waited for below
			}
			ctx := testCtx(t)
			paused := &pausedRenewals{Store: b.store, resume: make(chan struct{})}
			var once sync.Once
			wake := func() { once.Do(func() { close(paused.resume) }) }
			t.Cleanup(wake)
			first := NewProtocol(paused, WithLease(lease))
			second := NewProtocol(b.store, WithLease(lease))
			var led fencedLedger
			req := &testingv1.DoRequest{Id: "charge-1"}
			const key = "pay-1"

			started := make(chan uint64, 1)
			gate := make(chan struct{})
			type result struct {
				resp *testingv1.DoResponse
				err  error
			}
			firstDone := make(chan result, 1)
			go func() {
				resp, _, err := Do(ctx, first, doWork, key, req, func(ctx context.Context) (*testingv1.DoResponse, error) {
					fence, ok := FenceFromContext(ctx)
					if !ok {
						return nil, errors.New("the owner's context has no fence")
					}
					started <- fence
					<-gate // paused past the lease
					if err := led.write(key, fence, "first"); err != nil {
						return nil, err
					}
					return &testingv1.DoResponse{Id: "first", Execution: 1}, nil
				})
				firstDone <- result{resp, err}
			}()
			var firstFence uint64
			select {
			case firstFence = <-started:
			case <-ctx.Done():
				t.Fatal("the first owner's handler never started")
			}

			// The lease runs out while the first owner is paused.
			storeKey := StoreKey(doWork, "", key)
			if expire != nil {
				expire()
			} else {
				for b.exists(storeKey) {
					if ctx.Err() != nil {
						t.Fatal("the paused owner's key never expired")
					}
					time.Sleep(10 * time.Millisecond)
				}
			}

			var secondFence uint64
			resp, replayed, err := Do(ctx, second, doWork, key, req, func(ctx context.Context) (*testingv1.DoResponse, error) {
				fence, ok := FenceFromContext(ctx)
				if !ok {
					return nil, errors.New("the owner's context has no fence")
				}
				secondFence = fence
				if err := led.write(key, fence, "second"); err != nil {
					return nil, err
				}
				return &testingv1.DoResponse{Id: "second", Execution: 2}, nil
			})
			if err != nil || replayed || resp.GetId() != "second" {
				t.Fatalf("the second owner after the lease: %v, replayed %v, %v; want its own run", resp, replayed, err)
			}
			if secondFence <= firstFence {
				t.Fatalf("the second owner's fence %d is not greater than the first's %d", secondFence, firstFence)
			}

			// The first owner wakes and writes late.
			close(gate)
			wake()
			var r result
			select {
			case r = <-firstDone:
			case <-ctx.Done():
				t.Fatal("the first owner never finished")
			}
			if status.Code(r.err) != codes.Aborted {
				t.Errorf("the stale owner got %v, %v; want its refused write's Aborted", r.resp, r.err)
			}
			led.mu.Lock()
			rows, attempts, refused, row := len(led.rows), led.attempts, led.refused, led.rows[key]
			led.mu.Unlock()
			if attempts != 2 {
				t.Fatalf("%d ledger writes attempted, want 2 (the scenario did not pause the first owner past the lease)", attempts)
			}
			if rows != 1 || refused != 1 || row.writer != "second" || row.fence != secondFence {
				t.Fatalf("ledger: %d rows, %d refused, row %+v; want 1 row (the second owner's, fence %d), 1 refused", rows, refused, row, secondFence)
			}
			again, replayed, err := Do(ctx, second, doWork, key, req, func(context.Context) (*testingv1.DoResponse, error) {
				t.Error("a third call ran the work again")
				return nil, errors.New("ran again")
			})
			if err != nil || !replayed || again.GetId() != "second" {
				t.Errorf("a retry after both: %v, replayed %v, %v; want the second owner's outcome replayed", again, replayed, err)
			}
		})
	}
}

// TestFenceInHandlerContext checks the gRPC path on every store: the
// handler of a keyed call finds its owner's fence in its context, and a
// retry after a transient error (the key released) runs with a greater one.
func TestFenceInHandlerContext(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		var mu sync.Mutex
		var fences []uint64
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			fence, ok := FenceFromContext(ctx)
			if !ok {
				return nil, status.Error(codes.Internal, "no fence in the handler's context")
			}
			mu.Lock()
			fences = append(fences, fence)
			mu.Unlock()
			if n == 1 {
				return nil, status.Error(codes.Unavailable, "transient: the key is released")
			}
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		env := newTestEnv(t, b.store, envConfig{svc: svc})
		ctx := withKey(testCtx(t), "fenced")
		if _, err := env.client.Do(ctx, &testingv1.DoRequest{}); status.Code(err) != codes.Unavailable {
			t.Fatalf("first call: %v, want the handler's Unavailable", err)
		}
		if _, err := env.client.Do(ctx, &testingv1.DoRequest{}); err != nil {
			t.Fatalf("retry: %v", err)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(fences) != 2 || fences[0] == 0 || fences[1] <= fences[0] {
			t.Fatalf("the handlers' fences: %v; want two, nonzero, the retry's greater", fences)
		}
	})
}
