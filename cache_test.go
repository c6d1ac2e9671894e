package idempotency

import (
	"sync"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

// TestLocalCache verifies that with WithLocalCache a repeat on the same
// server costs no Redis round trip, is still marked replayed, and still
// refuses a different request under the key.
func TestLocalCache(t *testing.T) {
	b := newMiniredisBackend(t)
	rt := &roundTrips{}
	b.client.AddHook(rt)
	env := newTestEnv(t, b.store, envConfig{opts: []Option{WithLocalCache(100, time.Minute)}})
	ctx := withKey(testCtx(t), "lc")
	req := &testingv1.DoRequest{Id: "lc", Amount: 1}
	first, err := env.client.Do(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	before := rt.n.Load()
	var h metadata.MD
	again, err := env.client.Do(ctx, req, grpc.Header(&h))
	if err != nil || !proto.Equal(first, again) || !Replayed(h) {
		t.Fatalf("cached repeat = %v, %v (replayed %v); want %v, replayed", again, err, Replayed(h), first)
	}
	if n := rt.n.Load() - before; n != 0 {
		t.Fatalf("cached repeat cost %d Redis round trips, want 0", n)
	}
	if e, _ := env.events.last(OutcomeReplayed); !e.Local {
		t.Fatalf("replay event %+v: want Local", e)
	}
	_, err = env.client.Do(ctx, &testingv1.DoRequest{Id: "lc", Amount: 2})
	wantStatus(t, err, codes.FailedPrecondition, ReasonKeyReused)
	if n := env.svc.Runs.Load(); n != 1 {
		t.Fatalf("executions = %d, want 1", n)
	}

	// A record first seen through a claim reply is cached too.
	env2 := newTestEnv(t, b.store, envConfig{opts: []Option{WithLocalCache(100, time.Minute)}})
	if _, err := env2.client.Do(ctx, req); err != nil {
		t.Fatal(err)
	}
	before = rt.n.Load()
	if _, err := env2.client.Do(ctx, req); err != nil {
		t.Fatal(err)
	}
	if n := rt.n.Load() - before; n != 0 {
		t.Fatalf("second repeat on another server cost %d round trips, want 0", n)
	}
}

// TestLocalCacheBounds verifies LRU eviction and expiry.
func TestLocalCacheBounds(t *testing.T) {
	c := newLocalCache(2, time.Minute)
	now := time.Now()
	for _, k := range []string{"a", "b", "c"} {
		c.put(k, nil, now, time.Hour)
	}
	if c.get("a", now) != nil || c.ll.Len() != 2 {
		t.Fatalf("LRU kept %d entries including the oldest; want 2 without it", c.ll.Len())
	}
	if c.get("c", now.Add(time.Minute)) != nil {
		t.Fatal("entry served after maxAge")
	}
}

// fakeClock is a settable clock for withClock.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// TestLocalCacheBoundedByStoreTTL verifies that a server's local cache
// keeps a record no longer than the store's remaining TTL as this server
// saw it, whatever the clock of the server that completed it says: with
// that server's clock 30s ahead, a new request under an expired key runs
// instead of being refused as KEY_REUSED from a stale cache entry.
func TestLocalCacheBoundedByStoreTTL(t *testing.T) {
	for _, name := range []string{"memory", "miniredis"} {
		t.Run(name, func(t *testing.T) {
			clockB := &fakeClock{now: time.Now()}
			clockA := &fakeClock{now: clockB.Now().Add(30 * time.Second)}
			var store Store
			var advanceStore func(time.Duration)
			if name == "memory" {
				ms := NewMemoryStore()
				storeClock := &fakeClock{now: clockB.Now()}
				ms.now = storeClock.Now
				store, advanceStore = ms, storeClock.Advance
			} else {
				b := newMiniredisBackend(t)
				store, advanceStore = b.store, b.mini.FastForward
			}
			const ttl = time.Minute
			a := newTestEnv(t, store, envConfig{opts: []Option{WithTTL(ttl), withClock(clockA.Now)}})
			bEnv := newTestEnv(t, store, envConfig{opts: []Option{WithTTL(ttl), withClock(clockB.Now), WithLocalCache(100, time.Hour)}})
			ctx := withKey(testCtx(t), "skewed")
			if _, err := a.client.Do(ctx, &testingv1.DoRequest{Id: "first"}); err != nil {
				t.Fatal(err)
			}
			// B learns the record through its claim and caches it.
			if _, err := bEnv.client.Do(ctx, &testingv1.DoRequest{Id: "first"}); err != nil {
				t.Fatal(err)
			}
			_, err := bEnv.client.Do(ctx, &testingv1.DoRequest{Id: "second"})
			wantStatus(t, err, codes.FailedPrecondition, ReasonKeyReused)
			if e, _ := bEnv.events.last(OutcomeKeyReused); !e.Local {
				t.Fatalf("the refusal did not come from B's cache: the test proves nothing")
			}
			// The key expires in the store.
			advanceStore(ttl + time.Second)
			clockB.Advance(ttl + time.Second)
			clockA.Advance(ttl + time.Second)
			r, err := bEnv.client.Do(ctx, &testingv1.DoRequest{Id: "second"})
			if err != nil {
				t.Fatalf("a new request under the expired key: %v; want it executed", err)
			}
			if r.GetExecution() != 1 || bEnv.svc.Runs.Load() != 1 {
				t.Fatalf("B's executions = %d, want 1", bEnv.svc.Runs.Load())
			}
		})
	}
}
