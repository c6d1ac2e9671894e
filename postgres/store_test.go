package idempotencypg

import (
	"testing"

	"github.com/idempotency-grpc/idempotency/idempotencytest"
)

// TestConformance runs the public Store contract against a real Postgres,
// in real time (the store's clock is the database's).
func TestConformance(t *testing.T) {
	idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
		s, _ := testStore(t)
		return idempotencytest.Harness{Store: s}
	})
}
