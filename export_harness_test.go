package idempotency

import (
	"context"
	"sync"
	"testing"
	"time"
)

// The real-server harness of this package's tests, for its external tests
// (package idempotency_test), which cannot see unexported test helpers.
// Each skips its test when the binaries are missing, or fails it when CI is
// set.

// SharedRedisAddrForTest returns the address of the redis-server the
// package's tests share.
func SharedRedisAddrForTest(t testing.TB) string { return sharedRedisServer(t).Addr }

// SharedRedisClusterAddrsForTest returns the node addresses of the 3-master
// Redis Cluster the package's tests share.
func SharedRedisClusterAddrsForTest(t *testing.T) []string { return sharedCluster(t) }

// NewMemTxStoreForTest returns the in-memory TxStore of this package's
// tests (store_tx_test.go), with the business write it counts and the count
// of committed writes.
func NewMemTxStoreForTest() (store TxStore, write func(context.Context) error, writes func() int) {
	s := newMemTxStore()
	return s, memWrite, s.writes
}

// NewMemTxStoreOnClockForTest is NewMemTxStoreForTest on a clock that
// moves only by advance.
func NewMemTxStoreOnClockForTest() (store TxStore, write func(context.Context) error, writes func() int, advance func(time.Duration)) {
	s := newMemTxStore()
	return s, memWrite, s.writes, onFakeClock(s.MemoryStore)
}

// NewMemoryStoreOnClockForTest returns a MemoryStore whose clock moves only
// by advance, so expiry tests need not wait.
func NewMemoryStoreOnClockForTest() (store *MemoryStore, advance func(time.Duration)) {
	s := NewMemoryStore()
	return s, onFakeClock(s)
}

// onFakeClock puts s on a clock that starts at the real time and moves only
// by the advance it returns.
func onFakeClock(s *MemoryStore) (advance func(time.Duration)) {
	var mu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	return func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
}

// SkipUnlessLongForTest skips t unless IDEMPOTENCY_LONG is set (long_test.go).
func SkipUnlessLongForTest(t testing.TB) {
	t.Helper()
	skipUnlessLong(t)
}
