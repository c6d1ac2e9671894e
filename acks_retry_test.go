package idempotency

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ackServers are the servers every acknowledgement test runs on: Redis
// and Valkey differ in what a WAIT on a connection that wrote nothing
// answers. Each test starts its own master and replica per server (most
// freeze the replica) and mostly waits on them, so the tests and their
// per-server subtests run in parallel.
var ackServers = []string{"redis-server", "valkey-server"}

// retryingClient is a client on addr whose reads time out after
// readTimeout, well before the acknowledgement timeout, so that go-redis
// retries an unacknowledged pipeline by itself (MaxRetries, default 3).
func retryingClient(t *testing.T, addr string, readTimeout time.Duration) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: addr, ReadTimeout: readTimeout, ContextTimeoutEnabled: true})
	t.Cleanup(func() { c.Close() })
	return c
}

// TestReplicaAcksClaimRetriedByClient verifies that a claim no replica
// acknowledged never runs the handler when go-redis retries the claim's
// pipeline by itself (issue 27, item 3): the read times out while WAIT
// waits for the frozen replica, the retry's claim.lua finds the caller's
// own in-progress record, and a WAIT on the retry's fresh connection must
// still wait for a replica to hold that record. The call is answered
// Unavailable (STORE_NOT_REPLICATED), the handler never runs, and the
// claim is not left on the master.
func TestReplicaAcksClaimRetriedByClient(t *testing.T) {
	t.Parallel()
	for _, binary := range ackServers {
		t.Run(binary, func(t *testing.T) {
			t.Parallel()
			p := startReplicaPair(t, binary, false)
			c := retryingClient(t, p.master.Addr, 150*time.Millisecond)
			prefix := "acks:" + t.Name() + ":"
			store := NewRedisStore(c, WithKeyPrefix(prefix), WithReplicaAcks(1, 2*time.Second), WithRedisLogger(nil))
			env := newTestEnv(t, store, envConfig{opts: []Option{WithCompleteTimeout(time.Second)}})
			ctx := testCtx(t)
			if _, err := env.client.Do(withKey(ctx, "warm"), &testingv1.DoRequest{}); err != nil {
				t.Fatal(err) // loads the scripts, so no NOSCRIPT round trip blurs the retries
			}
			p.freeze(t)
			_, err := env.client.Do(withKey(ctx, "retried-claim"), &testingv1.DoRequest{})
			if n := env.svc.Runs.Load(); n != 1 {
				t.Fatalf("handler ran %d times on a claim no replica acknowledged (want only the warm-up's run)", n-1)
			}
			if got := status.Code(err); got != codes.Unavailable {
				t.Fatalf("the call: %v, want Unavailable", err)
			}
			waitUntil(t, "the unacknowledged claim is released", func() bool {
				return p.masterRDB.Exists(ctx, prefix+StoreKey(methodDo, "", "retried-claim")).Val() == 0
			})
		})
	}
}

// TestReplicaAcksStoreClaimRetriedByClient is the store-level form of
// TestReplicaAcksClaimRetriedByClient: RedisStore.Claim answers
// ErrNotReplicated, never the caller's own record, when the client retried
// the claim and no replica holds it. (With a read timeout shorter than the
// WAIT timeout every try times out, so the error is the client's timeout.)
func TestReplicaAcksStoreClaimRetriedByClient(t *testing.T) {
	t.Parallel()
	for _, binary := range ackServers {
		t.Run(binary, func(t *testing.T) {
			t.Parallel()
			p := startReplicaPair(t, binary, false)
			c := retryingClient(t, p.master.Addr, 150*time.Millisecond)
			store := NewRedisStore(c, WithKeyPrefix("acks:"+t.Name()+":"), WithReplicaAcks(1, 2*time.Second), WithRedisLogger(nil))
			ctx := testCtx(t)
			if _, err := store.Claim(ctx, "warm", "w", []byte("in progress"), time.Minute); err != nil {
				t.Fatal(err)
			}
			p.freeze(t)
			res, err := store.Claim(ctx, "k", "owner", []byte("in progress"), time.Minute)
			if err == nil {
				t.Fatalf("Claim with the replica frozen: %+v, nil error (own record %v); want an error", res, ownsRecord(res.Record, "owner"))
			}
		})
	}
}

// TestReplicaAcksStoreCompleteRetriedByClient verifies the outcome write's
// side of TestReplicaAcksStoreClaimRetriedByClient: with the replica frozen
// and go-redis resending the [EVALSHA complete, WAIT] pipeline after each
// read timeout, the resent complete.lua finds the record it completed and
// rewrites its TTL, so every resend's WAIT waits too, and Complete reports
// an error, never a stored and acknowledged outcome.
func TestReplicaAcksStoreCompleteRetriedByClient(t *testing.T) {
	t.Parallel()
	for _, binary := range ackServers {
		t.Run(binary, func(t *testing.T) {
			t.Parallel()
			p := startReplicaPair(t, binary, false)
			c := retryingClient(t, p.master.Addr, 150*time.Millisecond)
			store := NewRedisStore(c, WithKeyPrefix("acks:"+t.Name()+":"), WithReplicaAcks(1, 2*time.Second), WithRedisLogger(nil))
			ctx := testCtx(t)
			if res, err := store.Claim(ctx, "k", "owner", []byte("in progress"), time.Minute); err != nil || !res.Claimed {
				t.Fatalf("claim: %+v, %v", res, err)
			}
			p.freeze(t)
			if err := store.Complete(ctx, "k", "owner", []byte("final"), time.Hour); err == nil {
				t.Fatal("Complete with the replica frozen returned nil: an outcome no replica holds was reported acknowledged")
			}
		})
	}
}

// TestReplicaAcksOwnClaimNeedsAck verifies that Claim counts the caller's
// own in-progress record (what a retried claim whose first reply was lost
// finds) as claimed only when a replica acknowledged it: with the replica
// frozen, a repeated Claim under the owner's token answers ErrNotReplicated
// and frees the key, where it used to return the record as if claimed;
// with the replica healthy it returns the record, its lease renewed.
func TestReplicaAcksOwnClaimNeedsAck(t *testing.T) {
	t.Parallel()
	for _, binary := range ackServers {
		t.Run(binary, func(t *testing.T) {
			t.Parallel()
			p := startReplicaPair(t, binary, false)
			prefix := "acks:" + t.Name() + ":"
			store := NewRedisStore(p.masterRDB, WithKeyPrefix(prefix), WithReplicaAcks(1, 300*time.Millisecond), WithRedisLogger(nil))
			ctx := testCtx(t)
			mustClaim := func(key string) {
				t.Helper()
				if res, err := store.Claim(ctx, key, "owner", []byte("in progress"), time.Minute); err != nil || !res.Claimed {
					t.Fatalf("claim of %s: %+v, %v", key, res, err)
				}
			}
			mustClaim("frozen")
			thaw := p.freeze(t)
			res, err := store.Claim(ctx, "frozen", "owner", []byte("in progress"), time.Minute)
			if !errors.Is(err, ErrNotReplicated) {
				t.Fatalf("repeated claim, replica frozen: %+v, %v; want ErrNotReplicated", res, err)
			}
			if n := p.masterRDB.Exists(ctx, prefix+"frozen").Val(); n != 0 {
				t.Fatalf("the unacknowledged claim was left on the master")
			}
			thaw()
			waitUntil(t, "the replica acknowledges again", func() bool {
				_, err := store.Claim(ctx, "probe", "probe", []byte("in progress"), time.Minute)
				return err == nil
			})
			mustClaim("healthy")
			res, err = store.Claim(ctx, "healthy", "owner", []byte("in progress"), 2*time.Minute)
			if err != nil || res.Claimed || !bytes.Equal(res.Record, []byte("in progress")) {
				t.Fatalf("repeated claim, replica healthy: %+v, %v; want the own record", res, err)
			}
			if res.TTL <= time.Minute {
				t.Fatalf("repeated claim: TTL %v, want the own claim's lease renewed to 2m", res.TTL)
			}
		})
	}
}

// TestAckTimeoutAgainstReadTimeout verifies that CheckConfig warns when the
// client's ReadTimeout would end before an acknowledgement wait (go-redis
// then resends the write while WAIT still waits), and not when it is long
// enough or the store asks for no acknowledgements.
func TestAckTimeoutAgainstReadTimeout(t *testing.T) {
	mr := miniredis.RunT(t)
	for _, tc := range []struct {
		name string
		read time.Duration
		ack  RedisOption
		warn bool
	}{
		{"default ReadTimeout, WithReplicaAcks(1, 5s)", 0, WithReplicaAcks(1, 5*time.Second), true},
		{"ReadTimeout 1s, WithFsyncAcks(0, 2s)", time.Second, WithFsyncAcks(0, 2*time.Second), true},
		{"ReadTimeout 10s, WithReplicaAcks(1, 5s)", 10 * time.Second, WithReplicaAcks(1, 5*time.Second), false},
		{"no read deadline, WithReplicaAcks(1, 5s)", -1, WithReplicaAcks(1, 5*time.Second), false},
		{"ReadTimeout 1s, no acks", time.Second, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := redis.NewClient(&redis.Options{Addr: mr.Addr(), ReadTimeout: tc.read, ContextTimeoutEnabled: true})
			t.Cleanup(func() { c.Close() })
			store := NewRedisStore(c, tc.ack, WithRedisLogger(nil))
			w := strings.Join(store.CheckConfig(testCtx(t)), "\n")
			if got := strings.Contains(w, "ReadTimeout"); got != tc.warn {
				t.Fatalf("warned about ReadTimeout: %v, want %v:\n%s", got, tc.warn, w)
			}
		})
	}
}

// TestReplicaAcksTakeBack verifies the renewer's take-back under
// WithReplicaAcks: when a renewal finds the key gone, the keeper claims it
// back under its own token, the claim is acknowledged by the replica (the
// replica holds the in-progress record when the take-back returns), a
// duplicate is told the call is in progress, and the handler runs once.
func TestReplicaAcksTakeBack(t *testing.T) {
	t.Parallel()
	for _, binary := range ackServers {
		t.Run(binary, func(t *testing.T) {
			t.Parallel()
			p := startReplicaPair(t, binary, false)
			prefix := "acks:" + t.Name() + ":"
			acked := NewRedisStore(p.masterRDB, WithKeyPrefix(prefix), WithReplicaAcks(1, 2*time.Second), WithRedisLogger(nil))
			storeKey := StoreKey(methodDo, "", "vanished")
			var tokens sync.Map
			tookBack := make(chan error, 10)
			store := &hookStore{next: acked}
			store.claim = func(ctx context.Context, key, token string, record []byte, l time.Duration) (ClaimResult, error) {
				// Not bounded by the renewer's try deadline (1/32 of the
				// lease): on a busy machine a take-back's WAIT can outlast
				// it, and the renewal after it then keeps the key anyway.
				ctx = context.WithoutCancel(ctx)
				res, err := acked.Claim(ctx, key, token, record, l)
				if _, seen := tokens.LoadOrStore(token, true); seen && err == nil && (res.Claimed || ownsRecord(res.Record, token)) {
					// The replica must hold the record now.
					_, rerr := rawRedisRecord(ctx, p.replicaRDB, prefix+key)
					tookBack <- rerr
				}
				return res, err
			}
			started, release := make(chan struct{}), make(chan struct{})
			env := newTestEnv(t, store, envConfig{svc: &testService{OnDo: blockingFirstRun(started, release)},
				opts: []Option{WithLease(600 * time.Millisecond)}})
			ctx := withKey(testCtx(t), "vanished")
			first := make(chan error, 1)
			go func() {
				_, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "a"})
				first <- err
			}()
			waitStarted(t, started)
			if err := p.masterRDB.Del(ctx, prefix+storeKey).Err(); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-tookBack:
				if err != nil {
					t.Fatalf("the replica lacks the taken-back record when the take-back returned: %v", err)
				}
			case <-ctx.Done():
				t.Fatal("the keeper never took the key back")
			}
			wantInProgressThenOnce(ctx, t, env, release, first)
		})
	}
}

// TestReplicaAcksOnRing verifies that on a redis.Ring the acknowledgement
// is asked of the shard that holds the key. A Ring routes a keyless WAIT to
// a random shard, so behind a claim on a shard without replicas it went,
// about every other time, to a shard whose replica acknowledged it at once,
// and the claim counted as replicated. Shard "lone" has no replica; shard
// "paired" has a healthy one: every claim of a key on "lone" must be
// refused, every claim on "paired" accepted; CheckConfig names the shard
// without replicas (it used to ask one shard chosen at random).
func TestReplicaAcksOnRing(t *testing.T) {
	t.Parallel()
	for _, binary := range ackServers {
		t.Run(binary, func(t *testing.T) {
			t.Parallel()
			lone := func() *redisServer {
				if binary == "valkey-server" {
					return newValkeyServer(t)
				}
				return newRedisServer(t)
			}()
			p := startReplicaPair(t, binary, false)
			ring := redis.NewRing(&redis.RingOptions{
				Addrs:                 map[string]string{"lone": lone.Addr, "paired": p.master.Addr},
				ContextTimeoutEnabled: true,
			})
			t.Cleanup(func() { ring.Close() })
			prefix := "acks:" + t.Name() + ":"
			store := NewRedisStore(ring, WithKeyPrefix(prefix), WithReplicaAcks(1, 100*time.Millisecond), WithRedisLogger(nil))
			ctx := testCtx(t)
			var onLone, onPaired int
			for i := 0; onLone < 8 || onPaired < 4; i++ {
				key := "k" + strconv.Itoa(i)
				shard, err := ring.GetShardClientForKey(prefix + key)
				if err != nil {
					t.Fatal(err)
				}
				res, err := store.Claim(ctx, key, "owner", []byte("in progress"), time.Minute)
				if shard.Options().Addr == lone.Addr {
					onLone++
					if !errors.Is(err, ErrNotReplicated) {
						t.Fatalf("claim of %s on the shard without replicas: %+v, %v; want ErrNotReplicated", key, res, err)
					}
				} else {
					onPaired++
					if err != nil || !res.Claimed {
						t.Fatalf("claim of %s on the shard with a replica: %+v, %v", key, res, err)
					}
				}
			}
			// CheckConfig asks every shard, not one chosen at random.
			w := strings.Join(store.CheckConfig(ctx), "\n")
			if want := "shard " + lone.Addr + " has 0 connected replicas"; !strings.Contains(w, want) {
				t.Fatalf("CheckConfig: %q, want %q", w, want)
			}
			if strings.Contains(w, "shard "+p.master.Addr+" has") {
				t.Fatalf("CheckConfig warns about the shard with a replica: %q", w)
			}
		})
	}
}
