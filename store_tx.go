package idempotency

import (
	"context"
	"errors"
	"time"
)

// TxStore is a [Store] that keeps its records in the same database as the
// handler's own data, and runs the handler of a claimed key inside a
// transaction whose commit also writes the outcome. The handler's writes
// and the outcome record then commit together or not at all: a crash after
// the handler's writes but before the commit leaves neither, so the retry
// runs the handler again on a database that never saw the first try, and
// a crash after the commit leaves both, so the retry replays. When the
// store is a TxStore, [UnaryServerInterceptor] uses it for every keyed
// call; the handler finds its transaction in its context (the store's
// package says how, e.g. the postgres module's Tx(ctx)).
//
// The protocol for one call, as the interceptor drives it:
//
//  1. ClaimTx commits the in-progress claim on its own, so every other
//     server sees it at once, and returns the call's [Execution].
//  2. Execution.Begin starts the transaction; the handler runs with the
//     context Begin returned.
//  3. On a response (code OK) Execution.Commit writes the outcome in the
//     transaction, fenced on the claim's token, and commits it. On an
//     error that is stored, a transient error, a panic, or an outcome that
//     cannot be encoded, Execution.Discard rolls the handler's writes back
//     and stores the error outcome or releases the key.
//
// The interceptor answers the client with the handler's response only
// once Commit returned nil: when it did not commit, nothing the handler
// wrote was kept, and the client is told to retry (Unavailable, reason
// [ReasonNotCommitted]).
//
// The lease is still renewed through [Store.Renew] while the handler runs,
// and every Store rule holds; a store may also notice a dead owner sooner
// than its lease (the postgres store does, through a lock held by the
// owner's database session). The public conformance suite of TxStore is
// RunTxStoreTests in package idempotencytest.
type TxStore interface {
	Store
	// ClaimTx is [Store.Claim] for a call whose handler runs in a
	// transaction. When it claims key (a free key, an expired one, or token's
	// own in-progress record) it returns Claimed true and the Execution
	// bound to the claim; otherwise it returns what Claim returns and a nil
	// Execution. An error leaves nothing held but, possibly, the claim
	// itself, which the interceptor releases.
	ClaimTx(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, Execution, error)
}

// Execution is one claimed key's run in a [TxStore]: the database session
// that holds the claim and the handler's transaction. The interceptor calls
// Begin at most once, then exactly one of Commit and Discard (Discard also
// when Begin failed or was never called); after either, the execution has
// given back everything it held (its connection, its locks), whatever it
// returns. Neither may use ctx's cancellation to abandon a commit that
// already happened: the interceptor passes a context detached from the
// client's, bounded by [WithCompleteTimeout].
type Execution interface {
	// Begin starts the transaction the handler runs in and returns ctx
	// carrying it.
	Begin(ctx context.Context) (context.Context, error)

	// Commit writes record as key's outcome, kept for ttl and fenced on the
	// claim's token as [Store.Complete] is, inside the transaction, and
	// commits it. It returns nil once both committed; ErrLeaseLost, having
	// rolled everything back, when the token no longer owns the key;
	// an error wrapping [ErrCommitUnknown] when the commit's reply was lost
	// and the store could not learn which way it went; any other error when
	// the transaction is known not to have committed (and the key's record
	// is what it was before the call, or gone).
	Commit(ctx context.Context, record []byte, ttl time.Duration) error

	// Discard rolls the transaction back, so the handler's writes vanish,
	// then stores record as key's outcome for ttl (a stored error), or
	// releases the key when record is nil, fenced on the token exactly as
	// [Store.Complete] and [Store.Release] are, with their errors. After an
	// error other than ErrLeaseLost the interceptor retries the write with
	// Complete or Release.
	Discard(ctx context.Context, record []byte, ttl time.Duration) error
}

// ErrCommitUnknown is wrapped by the error of [Execution.Commit] when the
// commit's reply was lost (the connection failed during COMMIT) and the
// store could not read back which way it went. The handler's writes and the
// outcome either both committed or both did not, so a retry with the same
// key is safe either way: it replays the outcome, or runs the handler on a
// database that never saw the first try.
var ErrCommitUnknown = errors.New("idempotency: the commit's outcome is unknown")
