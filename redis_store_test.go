package idempotency

import (
	"context"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
)

// roundTrips is a go-redis hook counting commands sent to Redis.
type roundTrips struct{ n atomic.Int64 }

func (r *roundTrips) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) { return next(ctx, network, addr) }
}

func (r *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		r.n.Add(1)
		return next(ctx, cmd)
	}
}

func (r *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		r.n.Add(1)
		return next(ctx, cmds)
	}
}

// TestRedisRoundTrips verifies the cost floor: one Redis round trip per
// replay, two per first execution (claim, complete), once the scripts are
// loaded.
func TestRedisRoundTrips(t *testing.T) {
	for _, bf := range backendFactories[1:] {
		t.Run(bf.name, func(t *testing.T) {
			b := bf.new(t)
			rt := &roundTrips{}
			b.client.AddHook(rt)
			env := newTestEnv(t, b.store, envConfig{})
			ctx := testCtx(t)
			// Warm up: the first use of each script costs an extra EVAL.
			if _, err := env.client.Do(withKey(ctx, "warm"), &testingv1.DoRequest{}); err != nil {
				t.Fatal(err)
			}
			for i, want := range []int64{2, 1, 1} {
				before := rt.n.Load()
				if _, err := env.client.Do(withKey(ctx, "rt"), &testingv1.DoRequest{}); err != nil {
					t.Fatal(err)
				}
				if got := rt.n.Load() - before; got != want {
					t.Fatalf("call %d: %d Redis round trips, want %d", i+1, got, want)
				}
			}
		})
	}
}

// TestRedisStoreFencing drives the store directly: only the token that
// claimed a key may renew, complete or release it.
func TestRedisStoreFencing(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := testCtx(t)
		s := b.store
		res, err := s.Claim(ctx, "k", "tok-a", []byte("in-progress"), 60_000_000_000)
		if err != nil || !res.Claimed {
			t.Fatalf("claim = %+v, %v", res, err)
		}
		res, err = s.Claim(ctx, "k", "tok-b", []byte("other"), 60_000_000_000)
		if err != nil || res.Claimed || string(res.Record) != "in-progress" {
			t.Fatalf("second claim = %+v, %v; want the stored record", res, err)
		}
		for name, err := range map[string]error{
			"renew":    s.Renew(ctx, "k", "tok-b", 60_000_000_000),
			"complete": s.Complete(ctx, "k", "tok-b", []byte("stale"), 60_000_000_000),
			"release":  s.Release(ctx, "k", "tok-b"),
		} {
			if err != ErrLeaseLost {
				t.Fatalf("%s by a non-owner: %v, want ErrLeaseLost", name, err)
			}
		}
		if err := s.Renew(ctx, "k", "tok-a", 60_000_000_000); err != nil {
			t.Fatalf("renew by owner: %v", err)
		}
		if err := s.Complete(ctx, "k", "tok-a", []byte("done"), 60_000_000_000); err != nil {
			t.Fatalf("complete by owner: %v", err)
		}
		if err := s.Complete(ctx, "k", "tok-a", []byte("again"), 60_000_000_000); err != nil {
			t.Fatalf("repeated complete by the same token: %v, want nil (idempotent)", err)
		}
		if err := s.Complete(ctx, "k", "tok-b", []byte("stale"), 60_000_000_000); err != ErrLeaseLost {
			t.Fatalf("complete of a completed key by another token: %v, want ErrLeaseLost", err)
		}
		if err := s.Renew(ctx, "k", "tok-a", 60_000_000_000); err != ErrLeaseLost {
			t.Fatalf("renew of a completed key: %v, want ErrLeaseLost", err)
		}
		if err := s.Release(ctx, "k", "tok-a"); err != ErrLeaseLost {
			t.Fatalf("release of a completed key: %v, want ErrLeaseLost", err)
		}
		res, _ = s.Claim(ctx, "k", "tok-c", nil, 60_000_000_000)
		if res.Claimed || string(res.Record) != "done" { // the repeat wrote nothing
			t.Fatalf("claim after completion = %+v; want the completed record", res)
		}
		// Completing a key whose lease ran out with nobody claiming it since
		// stores the outcome: no other execution can exist.
		if _, err := s.Claim(ctx, "gone", "tok-x", []byte("p"), 60_000_000_000); err != nil {
			t.Fatal(err)
		}
		b.expire("gone")
		if err := s.Complete(ctx, "gone", "tok-x", []byte("late"), 60_000_000_000); err != nil {
			t.Fatalf("late complete: %v", err)
		}
		if res, _ := s.Claim(ctx, "gone", "tok-y", nil, 60_000_000_000); res.Claimed || string(res.Record) != "late" {
			t.Fatalf("after late complete: %+v", res)
		}
	})
}

// TestExpiry verifies time-driven behaviour with miniredis FastForward and
// the memory store's clock: a crashed owner's lease frees the key, and a
// completed record is replayed until its TTL ends, then the key is new.
func TestExpiry(t *testing.T) {
	type clock struct {
		store   Store
		advance func(d time.Duration)
	}
	for name, mk := range map[string]func(t *testing.T) clock{
		"miniredis": func(t *testing.T) clock {
			m := miniredis.RunT(t)
			return clock{NewRedisStore(newRedisClient(t, m.Addr())), m.FastForward}
		},
		"memory": func(t *testing.T) clock {
			s := NewMemoryStore()
			var mu sync.Mutex
			now := time.Now()
			s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
			return clock{s, func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }}
		},
	} {
		t.Run(name, func(t *testing.T) {
			c := mk(t)
			env := newTestEnv(t, c.store, envConfig{opts: []Option{WithTTL(time.Hour), WithLease(time.Minute)}})
			ctx := testCtx(t)
			req := &testingv1.DoRequest{Id: "e"}
			// A server that crashed mid-call left its claim behind.
			inProgress, _ := proto.Marshal(&idempotencyv1.Record{Version: recordVersion, State: idempotencyv1.Record_STATE_IN_PROGRESS,
				Fingerprint: mustFingerprint(t, req), Method: methodDo})
			if _, err := c.store.Claim(ctx, StoreKey(methodDo, "", "crashed"), "dead-owner", inProgress, time.Minute); err != nil {
				t.Fatal(err)
			}
			_, err := env.client.Do(withKey(ctx, "crashed"), req)
			wantStatus(t, err, codes.Aborted, ReasonInProgress)
			c.advance(time.Minute + time.Second)
			if _, err := env.client.Do(withKey(ctx, "crashed"), req); err != nil {
				t.Fatalf("after the dead owner's lease: %v, want a new execution", err)
			}
			c.advance(59 * time.Minute)
			if r, err := env.client.Do(withKey(ctx, "crashed"), req); err != nil || r.GetExecution() != 1 {
				t.Fatalf("within the TTL: %v, %v; want the replay of execution 1", r, err)
			}
			c.advance(2 * time.Minute)
			if r, err := env.client.Do(withKey(ctx, "crashed"), req); err != nil || r.GetExecution() != 2 {
				t.Fatalf("after the TTL: %v, %v; want a new execution 2", r, err)
			}
		})
	}
}

func mustFingerprint(t *testing.T, req proto.Message) []byte {
	t.Helper()
	fp, err := DefaultFingerprint("", req)
	if err != nil {
		t.Fatal(err)
	}
	return fp
}

// TestMemoryStoreSweep verifies that expired records do not accumulate:
// writes drop them as they go.
func TestMemoryStoreSweep(t *testing.T) {
	s := NewMemoryStore()
	var mu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	ctx := context.Background()
	for i := 0; i < 5000; i++ {
		if _, err := s.Claim(ctx, "old-"+strconv.Itoa(i), "t", []byte("r"), time.Second); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	for i := 0; i < 5000; i++ {
		if _, err := s.Claim(ctx, "new-"+strconv.Itoa(i), "t", []byte("r"), time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	s.mu.Lock()
	total := len(s.entries)
	s.mu.Unlock()
	if total > 7500 { // without the sweep: 10000
		t.Fatalf("%d entries held for 5000 live records: expired ones are not being dropped", total)
	}
	if n := s.Len(); n != 5000 {
		t.Fatalf("Len = %d, want 5000", n)
	}
}
