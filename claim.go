// Step 4 of a call (see handle.go): claim the key, or learn what is stored
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

// claimNext is where a claim leads.
type claimNext uint8

const (
	// claimRefused: the call was refused; the error says how.
	claimRefused claimNext = iota
	// claimStored: the key holds a completed (or too-large) record, which
	// answers the call.
	claimStored
	// claimOwned: the call owns the key (c.fence, and c.ex with a TxStore,
	// are set): it runs the handler.
	claimOwned
	// claimFailOpen: the store failed and WithFailOpen runs the handler
	// unprotected.
	claimFailOpen
)

// claim claims the key. It returns where the call goes next, the stored
// record that answers it (claimStored), or the refusal, already reported.
// It loops only to wait for a running first call (WithWaitForInProgress).
func (s *server) claim(ctx context.Context, c *call) (claimNext, *idempotencyv1.Record, error) {
	c.inProgress = encodeInProgress(c.fp, c.method, s.o.now(), c.token)
	for wait := s.o.pollInterval; ; wait = min(2*wait, 16*s.o.pollInterval) {
		start, sent := time.Now(), s.o.now()
		c.claimSent = s.renewer.clock.Now()
		var res ClaimResult
		var err error
		if s.txs != nil {
			res, err = s.claimTx(ctx, c)
		} else {
			res, err = s.store.Claim(ctx, c.storeKey, c.token, c.inProgress, s.o.lease)
		}
		c.ev.StoreLatency += time.Since(start)
		if err != nil {
			return s.claimFailed(ctx, c, err)
		}
		if res.Claimed {
			c.fence = res.Fence
			return claimOwned, nil, nil
		}
		rec, err := decodeRecord(res.Record)
		if err == nil && rec.GetState() == idempotencyv1.Record_STATE_IN_PROGRESS && rec.GetLeaseToken() == c.token {
			return s.ownClaim(ctx, c, res.Fence)
		}
		if err != nil || rec.GetMethod() != c.method {
			return claimRefused, nil, s.corrupt(ctx, c, rec, err)
		}
		if rec.GetState() != idempotencyv1.Record_STATE_IN_PROGRESS {
			if s.cache != nil && res.TTL > 0 && bytes.Equal(rec.GetFingerprint(), c.fp) {
				// Kept no longer than the store said the record has left,
				// counted from before the claim was sent: another server's
				// clock never decides how long this one replays.
				s.cache.put(c.storeKey, rec, sent, res.TTL)
			}
			return claimStored, rec, nil
		}
		if err := s.awaitRunning(ctx, c, rec, wait); err != nil {
			return claimRefused, nil, err
		}
	}
}

// claimTx is the claim of a TxStore: ClaimTx, which also returns the
// Execution the owner's handler runs in (c.ex).
//
//go:noinline
func (s *server) claimTx(ctx context.Context, c *call) (ClaimResult, error) {
	res, ex, err := s.txs.ClaimTx(ctx, c.storeKey, c.token, c.inProgress, s.o.lease)
	if err == nil && res.Claimed != (ex != nil) {
		err = fmt.Errorf("idempotency: the TxStore's ClaimTx answered Claimed %v with an Execution %v", res.Claimed, ex != nil)
		if ex != nil {
			_ = ex.Discard(context.WithoutCancel(ctx), nil, 0)
			ex = nil
		}
	}
	c.ex = ex
	return res, err
}

// claimFailed handles a claim the store failed: the call is refused, or
// runs unprotected under WithFailOpen.
//
//go:noinline
func (s *server) claimFailed(ctx context.Context, c *call, err error) (claimNext, *idempotencyv1.Record, error) {
	// The claim may have been applied with its reply lost: free it in the
	// background rather than leave it until its lease ends. The release is
	// fenced by the token, so it frees nothing else.
	s.releaseInBackground(ctx, c)
	switch {
	case ctx.Err() != nil:
		return claimRefused, nil, s.fail(ctx, c, OutcomeCanceled, errCallEnded(c.method, ctx.Err()), err)
	case errors.Is(err, ErrCorruptRecord):
		return claimRefused, nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), err)
	case s.o.failOpen:
		c.ev.Outcome, c.ev.Err = OutcomeFailOpen, err
		return claimFailOpen, nil, nil
	case errors.Is(err, ErrNotReplicated):
		return claimRefused, nil, s.fail(ctx, c, OutcomeStoreUnavailable, errNotReplicated(c.method), err)
	}
	return claimRefused, nil, s.fail(ctx, c, OutcomeStoreUnavailable, errStoreUnavailable(c.method), err)
}

// ownClaim handles the store's answer that the key holds the call's own
// in-progress claim, applied by an earlier try of the same command whose
// reply was lost (a client-library retry): the call owns the key. A
// TxStore claims its own record again instead (see ClaimTx): without an
// Execution the handler has no transaction to run in, so the call is
// refused.
//
//go:noinline
func (s *server) ownClaim(ctx context.Context, c *call, fence uint64) (claimNext, *idempotencyv1.Record, error) {
	if s.txs != nil {
		s.releaseInBackground(ctx, c)
		return claimRefused, nil, s.fail(ctx, c, OutcomeStoreUnavailable, errStoreUnavailable(c.method),
			errors.New("idempotency: the TxStore's ClaimTx returned the caller's own claim without claiming it"))
	}
	c.fence = fence
	return claimOwned, nil, nil
}

// corrupt refuses a call whose stored record could not be read (decodeErr)
// or belongs to another method.
//
//go:noinline
func (s *server) corrupt(ctx context.Context, c *call, rec *idempotencyv1.Record, decodeErr error) error {
	err := decodeErr
	if err == nil {
		err = fmt.Errorf("%w: record of method %q", ErrCorruptRecord, rec.GetMethod())
	}
	return s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), err)
}

// awaitRunning handles a key held by a running first call (rec): it
// refuses a different request, or a repeat unless WithWaitForInProgress
// waits; then it waits wait, and returns nil to claim again.
//
//go:noinline
func (s *server) awaitRunning(ctx context.Context, c *call, rec *idempotencyv1.Record, wait time.Duration) error {
	if !bytes.Equal(rec.GetFingerprint(), c.fp) {
		return s.fail(ctx, c, OutcomeKeyReused, errKeyReused(c.method), nil)
	}
	if !s.o.waitInProgress {
		return s.fail(ctx, c, OutcomeInProgress, errInProgress(c.method, s.o.retryDelay), nil)
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return s.fail(ctx, c, OutcomeInProgress, errCallEnded(c.method, ctx.Err()), nil)
	case <-t.C:
		return nil
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
