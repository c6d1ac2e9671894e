// The first step of the protocol: claim the key, or learn what is stored
// under it.

package idempotency

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
)

// claim claims the key and either executes the handler or answers from the
// stored record. It loops only when waiting for a running first call.
func (s *server) claim(ctx context.Context, c *call) (any, error) {
	var err error
	c.inProgress = encodeInProgress(c.fp, c.method, s.o.now(), c.token)
	wait := s.o.pollInterval
	for {
		start, sent := time.Now(), s.o.now()
		c.claimSent = s.renewer.clock.Now()
		var res ClaimResult
		if s.txs != nil {
			res, c.ex, err = s.txs.ClaimTx(ctx, c.storeKey, c.token, c.inProgress, s.o.lease)
			if err == nil && res.Claimed != (c.ex != nil) {
				err = fmt.Errorf("idempotency: the TxStore's ClaimTx answered Claimed %v with an Execution %v", res.Claimed, c.ex != nil)
				if c.ex != nil {
					_ = c.ex.Discard(context.WithoutCancel(ctx), nil, 0)
					c.ex = nil
				}
			}
		} else {
			res, err = s.store.Claim(ctx, c.storeKey, c.token, c.inProgress, s.o.lease)
		}
		c.ev.StoreLatency += time.Since(start)
		if err != nil {
			// The claim may have been applied with its reply lost: free it
			// in the background rather than leave it until its lease ends.
			// The release is fenced by the token, so it frees nothing else.
			s.releaseInBackground(ctx, c)
			if ctx.Err() != nil {
				return nil, s.fail(ctx, c, OutcomeCanceled, errCallEnded(c.method, ctx.Err()), err)
			}
			if errors.Is(err, ErrCorruptRecord) {
				return nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), err)
			}
			if s.o.failOpen {
				c.ev.Outcome, c.ev.Err = OutcomeFailOpen, err
				r := c.x.Run(contextWithServerKey(ctx, c.key), false)
				c.ev.Code = r.finalStatus().Code()
				s.emit(ctx, c)
				return r.Response, r.Err
			}
			if errors.Is(err, ErrNotReplicated) {
				return nil, s.fail(ctx, c, OutcomeStoreUnavailable, errNotReplicated(c.method), err)
			}
			return nil, s.fail(ctx, c, OutcomeStoreUnavailable, errStoreUnavailable(c.method), err)
		}
		if res.Claimed {
			c.fence = res.Fence
			return s.execute(ctx, c)
		}
		rec, err := decodeRecord(res.Record)
		if err == nil && rec.GetState() == idempotencyv1.Record_STATE_IN_PROGRESS && rec.GetLeaseToken() == c.token {
			// Our own claim, applied by an earlier try of the same command
			// whose reply was lost (a client-library retry). A TxStore
			// claims its own record again instead (see ClaimTx): without an
			// Execution the handler has no transaction to run in.
			if s.txs != nil {
				s.releaseInBackground(ctx, c)
				return nil, s.fail(ctx, c, OutcomeStoreUnavailable, errStoreUnavailable(c.method),
					errors.New("idempotency: the TxStore's ClaimTx returned the caller's own claim without claiming it"))
			}
			c.fence = res.Fence
			return s.execute(ctx, c)
		}
		if err == nil && rec.GetMethod() != c.method {
			err = fmt.Errorf("%w: record of method %q", ErrCorruptRecord, rec.GetMethod())
		}
		if err != nil {
			return nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), err)
		}
		if rec.GetState() != idempotencyv1.Record_STATE_IN_PROGRESS {
			if s.cache != nil && res.TTL > 0 && bytes.Equal(rec.GetFingerprint(), c.fp) {
				// Kept no longer than the store said the record has left,
				// counted from before the claim was sent: another server's
				// clock never decides how long this one replays.
				s.cache.put(c.storeKey, rec, sent, res.TTL)
			}
			return s.answer(ctx, c, rec)
		}
		if !bytes.Equal(rec.GetFingerprint(), c.fp) {
			return nil, s.fail(ctx, c, OutcomeKeyReused, errKeyReused(c.method), nil)
		}
		if !s.o.waitInProgress {
			return nil, s.fail(ctx, c, OutcomeInProgress, errInProgress(c.method, s.o.retryDelay), nil)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, s.fail(ctx, c, OutcomeInProgress, errCallEnded(c.method, ctx.Err()), nil)
		case <-t.C:
		}
		if wait < 16*s.o.pollInterval {
			wait *= 2
		}
	}
}

// releaseInBackground frees c's claim, if it was applied, without delaying
// the answer. The release is fenced by the token, so it frees nothing else.
func (s *server) releaseInBackground(ctx context.Context, c *call) {
	go func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.o.completeTimeout)
		defer cancel()
		_ = s.store.Release(rctx, c.storeKey, c.token)
	}()
}
