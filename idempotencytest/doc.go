// Package idempotencytest is the public conformance suite of the
// [idempotency.Store] contract: the rules the server interceptor's
// guarantee rests on (claims, fencing by token, idempotent completion, the
// "key gone" semantics, expiry, the refusal of an empty owner token,
// hostile bytes, concurrency, and [idempotency.AdminStore] when
// implemented). Every store of this
// repository passes it, and a custom store (DynamoDB, Spanner, Postgres, a
// bank's in-house KV) is a Store only once it does too.
//
// Run it from a test of your store, giving it a fresh store (or a fresh
// namespace) per call, and, if the store's clock can be moved, a way to move
// it; otherwise the suite waits in real time with short leases (a few
// seconds in all, or about the longest rule's 2 s when the stores are
// independent and Parallel is set):
//
//	func TestMyStoreConformance(t *testing.T) {
//		idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
//			db := startMyDatabase(t)
//			return idempotencytest.Harness{
//				Store:    mystore.New(db, mystore.WithTable(t.Name())),
//				Advance:  nil,  // or a fake clock's Advance
//				Parallel: true, // each rule's store has a table of its own
//			}
//		})
//	}
//
// A [idempotency.TxStore] (a store that runs the handler in its own
// transaction) also runs RunTxStoreTests, with a business write to make
// inside the transaction and a count of the committed ones; the postgres
// module's store does.
//
// Each rule is a subtest whose name says the rule; a failure message names
// the rule broken and what the store did instead. Run it with -race: one
// rule has 32 goroutines claim the same key at once.
//
// The test gRPC service and in-memory serve and dial helpers that the
// repository's own tests use are in the sub-package testservice.
package idempotencytest
