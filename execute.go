// The owner's steps: run the handler, then store its outcome or release
// the key.

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

// execute runs the handler as the key's owner and stores or releases its
// outcome.
func (s *server) execute(ctx context.Context, c *call) (any, error) {
	if c.ex != nil {
		return s.executeTx(ctx, c)
	}
	// The lease is kept until the outcome is written, so a write that must
	// be retried (Redis briefly unreachable) does not let the lease end under
	// it. A release stops it first: a key being freed needs no lease.
	keeper := s.keepLease(c, true)
	if keeper == nil {
		// The claim's reply came back too late to trust its lease, which
		// may have ended and let another call claim the key: free the
		// claim if it is still ours (fenced by the token), run nothing.
		c.ev.Err = s.finish(ctx, c, nil)
		return nil, s.fail(ctx, c, OutcomeStoreUnavailable, errStoreUnavailable(c.method), errClaimTooLate)
	}
	panicked := true
	defer func() {
		if panicked {
			keeper.stop(true)
			c.ev.Outcome, c.ev.Code = OutcomePanicked, codes.Internal
			c.ev.Err = s.finish(ctx, c, nil)
			s.emit(ctx, c)
		}
	}()
	r := c.x.Run(contextWithOwner(ctx, c.key, c.fence), true)
	panicked = false
	resp, err := r.Response, r.Err

	st := r.finalStatus()
	c.ev.Code = st.Code()
	if !s.o.storeOutcome(st.Code()) {
		keeper.stop(true)
		c.ev.Outcome = OutcomeReleased
		if ferr := s.finish(ctx, c, nil); ferr != nil {
			c.ev.Outcome, c.ev.Err = outcomeOfStoreErr(ferr), ferr
		}
		s.emit(ctx, c)
		return resp, err
	}
	rec, final, outcome, rerr := s.finalRecord(c, &r, st)
	if rerr != nil {
		// The outcome cannot be stored (e.g. a non-protobuf response): free
		// the key rather than leave it stuck in progress.
		keeper.stop(true)
		c.ev.Outcome, c.ev.Err = OutcomeNotStored, rerr
		_ = s.finish(ctx, c, nil)
		s.emit(ctx, c)
		return resp, err
	}
	if keeper.wasForgotten() {
		// An operator deleted the record while the handler ran (Forget):
		// it must not come back.
		keeper.stop(false)
		c.ev.Outcome, c.ev.Err = OutcomeLeaseLost, errForgotten
		s.emit(ctx, c)
		return resp, err
	}
	c.ev.Outcome = outcome
	written := s.o.now()
	ferr := s.finish(ctx, c, rec)
	keeper.stop(false)
	if ferr != nil {
		c.ev.Outcome, c.ev.Err = outcomeOfStoreErr(ferr), ferr
	} else {
		c.final = final
		if s.cache != nil {
			// Counted from before the write, so never past the store's
			// own expiry.
			s.cache.put(c.storeKey, final, written, s.o.ttl)
		}
	}
	s.emit(ctx, c)
	return resp, err
}

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
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.o.completeTimeout)
	defer cancel()
	start := time.Now()
	defer func() { c.ev.StoreLatency += time.Since(start) }()
	backoff := 10 * time.Millisecond
	// Once a write is known stored but not replicated, a later try that
	// times out does not undo it: that is what is reported.
	var notReplicated error
	for {
		var err error
		if rec == nil {
			err = s.store.Release(fctx, c.storeKey, c.token)
		} else {
			err = s.store.Complete(fctx, c.storeKey, c.token, rec, s.o.ttl)
		}
		if err == nil || errors.Is(err, ErrLeaseLost) {
			return err
		}
		if errors.Is(err, ErrNotReplicated) {
			notReplicated = err
		} else if notReplicated != nil && fctx.Err() != nil {
			err = notReplicated
		}
		t := time.NewTimer(backoff)
		select {
		case <-fctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff = min(2*backoff, 500*time.Millisecond)
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
