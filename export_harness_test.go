package idempotency

import (
	"context"
	"testing"
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
