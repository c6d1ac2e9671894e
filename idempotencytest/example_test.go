package idempotencytest_test

import (
	"context"
	"io"
	"log"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest"
)

// loggingStore is a custom store: here a wrapper that logs every claim
// around the memory store, standing in for your own (DynamoDB, Spanner, …).
type loggingStore struct {
	*idempotency.MemoryStore
}

func (s loggingStore) Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (idempotency.ClaimResult, error) {
	res, err := s.MemoryStore.Claim(ctx, key, token, record, lease)
	log.Printf("claim %s…: claimed=%v err=%v", key[:8], res.Claimed, err)
	return res, err
}

// A custom store proves it keeps the Store contract by passing the suite:
// put this function in a _test.go file of your store's package. Each rule
// gets a fresh store; Advance is nil here, so the expiry rules wait in real
// time (a few seconds in all). With a fake clock, pass its Advance instead.
func ExampleRunStoreTests() {
	TestLoggingStore := func(t *testing.T) {
		idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
			return idempotencytest.Harness{Store: loggingStore{idempotency.NewMemoryStore()}}
		})
	}
	_ = TestLoggingStore
}

// TestLoggingStore runs the example's store through the suite, so the
// example above is known to pass.
func TestLoggingStore(t *testing.T) {
	prev := log.Writer()
	log.SetOutput(io.Discard)
	defer log.SetOutput(prev)
	idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
		return idempotencytest.Harness{Store: loggingStore{idempotency.NewMemoryStore()}}
	})
}
