// What a TxStore's owner does differently (see execute.go): the handler
// runs inside the store's transaction, and its outcome commits in it or
// everything rolls back.

package idempotency

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc/codes"
)

// ownTx starts an owner's run with a TxStore: the lease keeper, then the
// transaction the handler runs in (Execution.Begin). A claim that answered
// late is not refused (see keepLease): the commit is fenced in the
// transaction itself.
func (s *server) ownTx(ctx context.Context, c *call) (*leaseKeeper, context.Context, error) {
	keeper := s.keepLease(c, false)
	hctx, err := c.ex.Begin(contextWithOwner(ctx, c.key, c.fence))
	if err != nil {
		keeper.stop(true)
		_ = s.release(ctx, c)
		return nil, nil, s.fail(ctx, c, OutcomeStoreUnavailable, errStoreUnavailable(c.method), err)
	}
	return keeper, hctx, nil
}

// writeTx stores rec as the outcome of a TxStore's run: Commit in the
// handler's transaction for a response, or, for an error, Discard with rec:
// the handler's writes are rolled back and the error is the outcome.
func (s *server) writeTx(ctx context.Context, c *call, rec []byte) error {
	if c.ev.Code == codes.OK {
		return s.commit(ctx, c, rec)
	}
	return s.discard(ctx, c, rec)
}

// txWriteFailed reports a TxStore's response that did not commit, err
// saying why, and returns the refusal the client gets instead: nothing
// the handler wrote was kept (or, for ErrCommitUnknown, it is unknown), so
// the client is told to retry.
func (s *server) txWriteFailed(ctx context.Context, c *call, err error) error {
	if errors.Is(err, ErrCommitUnknown) {
		c.ev.Outcome, c.ev.Err, c.ev.Code = OutcomeCommitUnknown, err, codes.Unavailable
		return errNotCommitted(c.method, true)
	}
	c.ev.Outcome, c.ev.Err, c.ev.Code = OutcomeRolledBack, err, codes.Unavailable
	if !errors.Is(err, ErrLeaseLost) {
		// Free the claim so the retry runs at once rather than after the
		// lease.
		_ = s.finish(ctx, c, nil)
	}
	return errNotCommitted(c.method, false)
}

// commit writes rec in c.ex's transaction and commits it. Like finish, it
// does not use the request's cancellation: a client that went away must
// not abort a commit.
func (s *server) commit(ctx context.Context, c *call, rec []byte) error {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.o.completeTimeout)
	defer cancel()
	start := time.Now()
	defer func() { c.ev.StoreLatency += time.Since(start) }()
	return c.ex.Commit(cctx, rec, s.o.ttl)
}

// discard rolls c.ex's transaction back and stores rec as the outcome, or
// releases the key when rec is nil; a failed write is retried through
// finish (Complete or Release), which is fenced by the same token.
func (s *server) discard(ctx context.Context, c *call, rec []byte) error {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.o.completeTimeout)
	start := time.Now()
	err := c.ex.Discard(dctx, rec, s.o.ttl)
	c.ev.StoreLatency += time.Since(start)
	cancel()
	if err == nil || errors.Is(err, ErrLeaseLost) {
		return err
	}
	return s.finish(ctx, c, rec)
}
