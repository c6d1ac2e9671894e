package idempotency_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest"
	"github.com/redis/go-redis/v9"
)

// conformancePrefixes makes every rule's Redis keys unique.
var conformancePrefixes atomic.Int64

func conformancePrefix() string {
	return fmt.Sprintf("conformance:%d:%d:", time.Now().UnixNano(), conformancePrefixes.Add(1))
}

// TestStoreConformance runs the public Store contract suite
// (idempotencytest.RunStoreTests) against every store of this repository:
// the memory store (on a clock the suite moves; in real time too under
// IDEMPOTENCY_LONG), Redis on miniredis (its clock moved with FastForward),
// a real redis-server (with and without pipelining) and a real 3-master
// Redis Cluster (in real time). The stores run side by side, and so do the
// real-time ones' rules (each on a key prefix of its own): they mostly wait
// out leases.
func TestStoreConformance(t *testing.T) {
	t.Parallel()
	t.Run("memory", func(t *testing.T) {
		t.Parallel()
		idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
			s, advance := idempotency.NewMemoryStoreOnClockForTest()
			return idempotencytest.Harness{Store: s, Advance: advance}
		})
	})
	// The memory store on the wall clock: the suite's expiry rules then wait
	// about 4 s. The fake clock above runs the same rules; the memory
	// store's real-time expiry is also what every forEachBackend test uses.
	t.Run("memory in real time", func(t *testing.T) {
		idempotency.SkipUnlessLongForTest(t)
		t.Parallel()
		idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
			return idempotencytest.Harness{Store: idempotency.NewMemoryStore(), Parallel: true}
		})
	})
	t.Run("miniredis", func(t *testing.T) {
		t.Parallel()
		idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
			m := miniredis.RunT(t)
			c := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
			t.Cleanup(func() { c.Close() })
			return idempotencytest.Harness{
				Store:   idempotency.NewRedisStore(c, idempotency.WithKeyPrefix(conformancePrefix()), idempotency.WithRedisLogger(nil)),
				Advance: m.FastForward,
			}
		})
	})
	t.Run("redis-server", func(t *testing.T) {
		t.Parallel()
		c := redis.NewClient(&redis.Options{Addr: idempotency.SharedRedisAddrForTest(t), ContextTimeoutEnabled: true})
		t.Cleanup(func() { c.Close() })
		idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
			return idempotencytest.Harness{Store: idempotency.NewRedisStore(c, idempotency.WithKeyPrefix(conformancePrefix()), idempotency.WithRedisLogger(nil)), Parallel: true}
		})
	})
	t.Run("redis-server-unpipelined", func(t *testing.T) {
		// WithPipelining(0): each script call on its own, on a client that
		// does not bound calls by their context (the store does).
		t.Parallel()
		c := redis.NewClient(&redis.Options{Addr: idempotency.SharedRedisAddrForTest(t)})
		t.Cleanup(func() { c.Close() })
		idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
			return idempotencytest.Harness{Store: idempotency.NewRedisStore(c, idempotency.WithPipelining(0), idempotency.WithKeyPrefix(conformancePrefix()), idempotency.WithRedisLogger(nil)), Parallel: true}
		})
	})
	t.Run("redis-cluster", func(t *testing.T) {
		t.Parallel()
		c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: idempotency.SharedRedisClusterAddrsForTest(t), ContextTimeoutEnabled: true})
		t.Cleanup(func() { c.Close() })
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error { return m.Ping(ctx).Err() }); err != nil {
			t.Fatalf("cluster: %v", err)
		}
		idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
			return idempotencytest.Harness{Store: idempotency.NewRedisStore(c, idempotency.WithKeyPrefix(conformancePrefix()), idempotency.WithRedisLogger(nil)), Parallel: true}
		})
	})
}

// The TxStore contract against the in-memory TxStore of the tests: a
// second implementation, so the suite is not shaped to Postgres alone. It
// runs on a clock the suite moves, and under IDEMPOTENCY_LONG in real time
// too.
func TestMemTxStoreConformance(t *testing.T) {
	t.Parallel()
	t.Run("fake clock", func(t *testing.T) {
		idempotencytest.RunTxStoreTests(t, func(t *testing.T) idempotencytest.TxHarness {
			s, write, writes, advance := idempotency.NewMemTxStoreOnClockForTest()
			return idempotencytest.TxHarness{Store: s, Write: write, Writes: func(*testing.T) int { return writes() }, Advance: advance}
		})
	})
	t.Run("real time", func(t *testing.T) {
		idempotency.SkipUnlessLongForTest(t)
		idempotencytest.RunTxStoreTests(t, func(t *testing.T) idempotencytest.TxHarness {
			s, write, writes := idempotency.NewMemTxStoreForTest()
			return idempotencytest.TxHarness{Store: s, Write: write, Writes: func(*testing.T) int { return writes() }}
		})
	})
}
