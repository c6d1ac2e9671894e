// Step 5 of a call (see handle.go), for the key's owner: run the handler,
// then store its outcome or free the key. One skeleton serves every store;
// what a TxStore does differently is in execute_tx.go.

package idempotency

import (
	"context"
	"errors"
	"fmt"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// execute runs the handler as the key's owner, under a lease kept until its
// outcome is written, and ends the run with settle, also when the handler
// panics (the panic then goes on). With a TxStore the handler runs inside
// the store's transaction, which commits with the outcome (see [TxStore]).
func (s *server) execute(ctx context.Context, c *call) (any, error) {
	keeper, hctx, err := s.own(ctx, c)
	if err != nil {
		return nil, err
	}
	defer s.settlePanic(ctx, c, keeper)
	r := c.x.Run(hctx, true)
	c.ran = true
	return s.settle(ctx, c, keeper, &r)
}

// settlePanic settles the run of a handler that panicked (the panic goes
// on), and does nothing when it returned.
func (s *server) settlePanic(ctx context.Context, c *call, keeper *leaseKeeper) {
	if !c.ran {
		s.settle(ctx, c, keeper, nil)
	}
}

// own starts the owner's run: it registers the lease with the renewer and,
// with a TxStore, begins the transaction. It returns the lease keeper and
// the handler's context, or the refusal of a call that must not run.
//
//go:noinline
func (s *server) own(ctx context.Context, c *call) (*leaseKeeper, context.Context, error) {
	if c.ex != nil {
		return s.ownTx(ctx, c)
	}
	// The lease is kept until the outcome is written, so a write that must
	// be retried (Redis briefly unreachable) does not let the lease end
	// under it.
	keeper := s.keepLease(c, true)
	if keeper == nil {
		// The claim's reply came back too late to trust its lease, which
		// may have ended and let another call claim the key: free the
		// claim if it is still ours (fenced by the token), run nothing.
		_ = s.release(ctx, c)
		return nil, nil, s.fail(ctx, c, OutcomeStoreUnavailable, errStoreUnavailable(c.method), errClaimTooLate)
	}
	return keeper, contextWithOwner(ctx, c.key, c.fence), nil
}

// settle ends an owner's run, r (nil when the handler panicked): judge
// decides how it ended, then settle does what that outcome calls for,
// stops the lease keeper, reports the call and returns what the client
// gets. The table:
//
//	the run                 outcome (Event)   the key                       the client gets
//	panicked                panicked          freed                         the panic
//	code not stored         released          freed                         the handler's answer
//	outcome not encodable   not_stored        freed                         the handler's answer ¹
//	record forgotten        lease_lost        left as it is ²               the handler's answer ²
//	otherwise               executed,         outcome stored ³              the handler's answer ⁴
//	                        too_large
//
// Freeing the key stops the keeper first (a key being freed needs no
// lease); storing stops it once the write is done, so a write that is
// retried keeps its lease. With a TxStore, freeing the key and storing an
// error roll the handler's writes back, and:
//
//  1. a response that cannot be stored is refused (Internal): what the
//     handler wrote to make it is gone;
//  2. a forgotten run rolls back and frees the key (rolled_back), and the
//     client is told to retry (Unavailable, NOT_COMMITTED);
//  3. a response commits with the handler's writes (Commit);
//  4. a response that did not commit is refused (Unavailable,
//     NOT_COMMITTED; rolled_back or commit_unknown), see txWriteFailed.
//
// A write that fails reports lease_lost, not_stored or not_replicated
// (outcomeOfStoreErr) and the client still gets the handler's answer.
func (s *server) settle(ctx context.Context, c *call, keeper *leaseKeeper, r *Result) (any, error) {
	rec, final := s.judge(c, keeper, r)
	var refuse error
	switch c.ev.Outcome {
	case OutcomePanicked, OutcomeReleased, OutcomeNotStored:
		keeper.stop(true)
		err := s.release(ctx, c)
		switch {
		case c.ev.Outcome == OutcomePanicked:
			c.ev.Err = err
		case c.ev.Outcome == OutcomeReleased && err != nil:
			c.ev.Outcome, c.ev.Err = outcomeOfStoreErr(err), err
		case c.ev.Outcome == OutcomeNotStored && c.ex != nil && c.ev.Code == codes.OK:
			c.ev.Code, refuse = codes.Internal, errEncodeRecord(c.method)
		}
	case OutcomeLeaseLost, OutcomeRolledBack:
		keeper.stop(false)
		if c.ex != nil {
			_ = s.release(ctx, c)
			refuse = errNotCommitted(c.method, false)
		}
	default: // OutcomeExecuted, OutcomeTooLarge: store the outcome
		written := s.o.now()
		var err error
		if c.ex != nil {
			err = s.writeTx(ctx, c, rec)
		} else {
			err = s.finish(ctx, c, rec)
		}
		keeper.stop(false)
		switch {
		case err == nil:
			c.final = final
			if s.cache != nil {
				// Counted from before the write, so never past the store's
				// own expiry.
				s.cache.put(c.storeKey, final, written, s.o.ttl)
			}
		case c.ex != nil && c.ev.Code == codes.OK:
			refuse = s.txWriteFailed(ctx, c, err)
		default:
			c.ev.Outcome, c.ev.Err = outcomeOfStoreErr(err), err
		}
	}
	s.emit(ctx, c)
	switch {
	case r == nil:
		return nil, nil // the panic goes on
	case refuse != nil:
		return nil, c.x.Refuse(refuse)
	}
	return r.Response, r.Err
}

// judge decides how the owner's run r ended (nil: the handler panicked),
// the first column of settle's table: it sets the Event's outcome, code
// and error, and returns the record to store and its decoded form when
// there is one.
func (s *server) judge(c *call, keeper *leaseKeeper, r *Result) ([]byte, *idempotencyv1.Record) {
	if r == nil {
		c.ev.Outcome, c.ev.Code = OutcomePanicked, codes.Internal
		return nil, nil
	}
	st := r.finalStatus()
	c.ev.Code = st.Code()
	if !s.o.storeOutcome(st.Code()) {
		c.ev.Outcome = OutcomeReleased
		return nil, nil
	}
	rec, final, outcome, err := s.finalRecord(c, r, st)
	switch {
	case err != nil:
		// e.g. a response that is not a protobuf message.
		c.ev.Outcome, c.ev.Err = OutcomeNotStored, err
	case keeper.wasForgotten():
		// An operator deleted the record while the handler ran (Forget):
		// it must not come back.
		c.ev.Outcome, c.ev.Err = OutcomeLeaseLost, errForgotten
		if c.ex != nil {
			c.ev.Outcome, c.ev.Code = OutcomeRolledBack, codes.Unavailable
		}
	default:
		c.ev.Outcome = outcome
	}
	return rec, final
}

// release frees the key: Release (finish without a record); with a
// TxStore, Discard without one, which also rolls the handler's writes
// back.
func (s *server) release(ctx context.Context, c *call) error {
	if c.ex != nil {
		return s.discard(ctx, c, nil)
	}
	return s.finish(ctx, c, nil)
}

// outcomeOfStoreErr is the outcome of a write of the outcome that failed.
func outcomeOfStoreErr(err error) Outcome {
	if errors.Is(err, ErrLeaseLost) {
		return OutcomeLeaseLost
	}
	if errors.Is(err, ErrNotReplicated) {
		return OutcomeNotReplicated
	}
	return OutcomeNotStored
}

// finish completes the key with rec, or releases it when rec is nil. It
// does not use the request's cancellation: a client that went away must not
// cost the outcome. Store failures are retried with backoff until
// WithCompleteTimeout ends; that is safe because both steps are fenced by the
// token and Complete is idempotent for it. The caller's answer waits for it,
// so an answer that reached the client was, in the normal case, stored.
func (s *server) finish(ctx context.Context, c *call, rec []byte) error {
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.o.completeTimeout)
	defer cancel()
	start := time.Now()
	err := s.writeOnce(wctx, c, rec)
	if err != nil && !errors.Is(err, ErrLeaseLost) {
		err = s.retryWrite(wctx, c, rec, err)
	}
	c.ev.StoreLatency += time.Since(start)
	return err
}

// writeOnce is one try of finish: Complete with rec, or Release when rec
// is nil.
func (s *server) writeOnce(ctx context.Context, c *call, rec []byte) error {
	if rec == nil {
		return s.store.Release(ctx, c.storeKey, c.token)
	}
	return s.store.Complete(ctx, c.storeKey, c.token, rec, s.o.ttl)
}

// retryWrite retries finish's write, whose first try failed with err,
// with backoff until ctx ends, and returns the last error (nil once a try
// succeeds).
//
//go:noinline
func (s *server) retryWrite(ctx context.Context, c *call, rec []byte, err error) error {
	backoff := 10 * time.Millisecond
	// Once a write is known stored but not replicated, a later try that
	// times out does not undo it: that is what is reported.
	var notReplicated error
	for {
		if errors.Is(err, ErrNotReplicated) {
			notReplicated = err
		} else if notReplicated != nil && ctx.Err() != nil {
			err = notReplicated
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff = min(2*backoff, 500*time.Millisecond)
		if err = s.writeOnce(ctx, c, rec); err == nil || errors.Is(err, ErrLeaseLost) {
			return err
		}
	}
}

// finalRecord encodes the outcome r of the handler, whose status is st, or a
// too-large marker when it exceeds the size limit.
func (s *server) finalRecord(c *call, r *Result, st *status.Status) ([]byte, *idempotencyv1.Record, Outcome, error) {
	now := s.o.now()
	header, hdropped := mdToEntries(r.Header)
	trailer, tdropped := mdToEntries(r.Trailer)
	c.ev.DroppedMetadata = droppedKeys(hdropped, tdropped)
	rec := &idempotencyv1.Record{
		Version:      recordVersion,
		State:        idempotencyv1.Record_STATE_COMPLETED,
		Fingerprint:  c.fp,
		Method:       c.method,
		Header:       header,
		Trailer:      trailer,
		CompleteTime: timestamppb.New(now),
	}
	rec.Status = wireStatus(st)
	var b []byte
	var err error
	if st.Code() == codes.OK {
		m := r.Message
		if m == nil {
			return nil, nil, "", fmt.Errorf("idempotency: response of type %T is not a protobuf message", r.Response)
		}
		rec.ResponseType = string(m.ProtoReflect().Descriptor().FullName())
		b, err = encodeWithResponse(rec, m)
	} else if b, err = proto.Marshal(rec); err != nil {
		err = fmt.Errorf("idempotency: encode record: %w", err)
	}
	if err != nil {
		return nil, nil, "", err
	}
	if len(b) <= s.o.maxRecordSize {
		return b, rec, OutcomeExecuted, nil
	}
	rec = &idempotencyv1.Record{
		Version:      recordVersion,
		State:        idempotencyv1.Record_STATE_TOO_LARGE,
		Fingerprint:  c.fp,
		Method:       c.method,
		ResponseSize: int64(len(b)),
		CompleteTime: timestamppb.New(now),
	}
	b, err = proto.Marshal(rec)
	return b, rec, OutcomeTooLarge, err
}
