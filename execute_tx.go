// The owner's steps with a TxStore: run the handler inside the store's
// transaction, and commit the outcome in it or roll everything back.

package idempotency

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc/codes"
)

// executeTx runs the handler as the key's owner inside c.ex's transaction.
// The client gets the handler's response only once it committed with the
// outcome; a stored error rolls the handler's writes back and is stored on
// its own; a transient error, a panic or an unencodable outcome rolls back
// and releases the key.
func (s *server) executeTx(ctx context.Context, c *call) (any, error) {
	keeper := s.keepLease(c, false)
	hctx, berr := c.ex.Begin(contextWithOwner(ctx, c.key, c.fence))
	if berr != nil {
		keeper.stop(true)
		_ = s.discard(ctx, c, nil)
		return nil, s.fail(ctx, c, OutcomeStoreUnavailable, errStoreUnavailable(c.method), berr)
	}
	panicked := true
	defer func() {
		if panicked {
			keeper.stop(true)
			c.ev.Outcome, c.ev.Code = OutcomePanicked, codes.Internal
			c.ev.Err = s.discard(ctx, c, nil)
			s.emit(ctx, c)
		}
	}()
	r := c.x.Run(hctx, true)
	panicked = false
	resp, err := r.Response, r.Err

	st := r.finalStatus()
	c.ev.Code = st.Code()
	if !s.o.storeOutcome(st.Code()) {
		keeper.stop(true)
		c.ev.Outcome = OutcomeReleased
		if ferr := s.discard(ctx, c, nil); ferr != nil {
			c.ev.Outcome, c.ev.Err = outcomeOfStoreErr(ferr), ferr
		}
		s.emit(ctx, c)
		return resp, err
	}
	rec, final, outcome, rerr := s.finalRecord(c, &r, st)
	if rerr != nil {
		// The outcome cannot be stored (e.g. a non-protobuf response): roll
		// back and free the key. A response must not reach the client, since
		// what the handler wrote to make it is gone.
		keeper.stop(true)
		c.ev.Outcome, c.ev.Err = OutcomeNotStored, rerr
		_ = s.discard(ctx, c, nil)
		s.emit(ctx, c)
		if st.Code() == codes.OK {
			c.ev.Code = codes.Internal
			return nil, c.x.Refuse(errEncodeRecord(c.method))
		}
		return resp, err
	}
	if keeper.wasForgotten() {
		// An operator deleted the record while the handler ran (Forget):
		// nothing of this run may come back, its writes included.
		keeper.stop(false)
		_ = s.discard(ctx, c, nil)
		c.ev.Outcome, c.ev.Err, c.ev.Code = OutcomeRolledBack, errForgotten, codes.Unavailable
		s.emit(ctx, c)
		return nil, c.x.Refuse(errNotCommitted(c.method, false))
	}
	c.ev.Outcome = outcome
	written := s.o.now()
	var ferr error
	if st.Code() == codes.OK {
		ferr = s.commit(ctx, c, rec)
	} else {
		// A stored error: what the handler wrote before failing is rolled
		// back, and the error is the outcome.
		ferr = s.discard(ctx, c, rec)
	}
	keeper.stop(false)
	switch {
	case ferr == nil:
		c.final = final
		if s.cache != nil {
			s.cache.put(c.storeKey, final, written, s.o.ttl)
		}
	case st.Code() != codes.OK:
		// The handler's writes were rolled back either way; the caller gets
		// the handler's error, as without a TxStore.
		c.ev.Outcome, c.ev.Err = outcomeOfStoreErr(ferr), ferr
	case errors.Is(ferr, ErrCommitUnknown):
		c.ev.Outcome, c.ev.Err, c.ev.Code = OutcomeCommitUnknown, ferr, codes.Unavailable
		s.emit(ctx, c)
		return nil, c.x.Refuse(errNotCommitted(c.method, true))
	default:
		c.ev.Outcome, c.ev.Err, c.ev.Code = OutcomeRolledBack, ferr, codes.Unavailable
		if !errors.Is(ferr, ErrLeaseLost) {
			// Free the claim so the retry runs at once rather than after
			// the lease.
			_ = s.finish(ctx, c, nil)
		}
		s.emit(ctx, c)
		return nil, c.x.Refuse(errNotCommitted(c.method, false))
	}
	s.emit(ctx, c)
	return resp, err
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
