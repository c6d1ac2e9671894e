package idempotency

import (
	"context"
	"errors"
	"sync"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
)

// leaseKeeper keeps the lease of one executing call alive until it is
// stopped: it renews every third of the lease, retries a failed renewal
// promptly with a bounded backoff (so an outage shorter than what is left of
// the lease never loses it), and takes the key back under the same token
// when a renewal finds it gone with nobody else owning it.
//
// Stopping never waits: an answer is never delayed by a renewal in flight.
// No renewal starts after stop returns.
type leaseKeeper struct {
	store  Store
	key    string
	token  string
	record []byte // the in-progress record, to take the key back
	lease  time.Duration
	hook   func(key string) // tests: called as each renewal begins

	done chan struct{} // closed by stop

	mu        sync.Mutex
	stopped   bool
	release   bool // stop asked for the key to be released
	tookBack  bool // a take-back claim was sent; it may land after a release
	forgotten bool // the record was deleted (Forget) while the call ran
}

// keepLease starts the keeper of c's lease.
func (s *server) keepLease(c *call) *leaseKeeper {
	k := &leaseKeeper{store: s.store, key: c.storeKey, token: c.token, record: c.inProgress,
		lease: s.o.lease, hook: s.o.renewHook, done: make(chan struct{})}
	go k.run()
	return k
}

func (k *leaseKeeper) run() {
	every := k.lease / 3
	base := min(max(k.lease/64, time.Millisecond), 100*time.Millisecond)
	maxBackoff := max(k.lease/16, base)
	// One try may take at most a quarter of the lease, so a hung store
	// leaves room for more tries before the lease ends.
	tryFor := max(k.lease/4, time.Millisecond)
	backoff := base
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-k.done:
			k.exit()
			return
		case <-t.C:
		}
		ok, final := k.renewOnce(tryFor)
		if final {
			k.exit()
			return
		}
		if ok {
			backoff = base
			t.Reset(every)
			continue
		}
		t.Reset(backoff)
		backoff = min(2*backoff, maxBackoff)
	}
}

// renewOnce sends one renewal, and a take-back claim if the renewal found
// the lease lost. ok reports a lease held now; final that the keeper must
// end (stopped, or the lease is lost for good).
func (k *leaseKeeper) renewOnce(tryFor time.Duration) (ok, final bool) {
	k.mu.Lock()
	if k.stopped {
		k.mu.Unlock()
		return false, true
	}
	if k.hook != nil {
		k.hook(k.key)
	}
	k.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), tryFor)
	defer cancel()
	err := k.store.Renew(ctx, k.key, k.token, k.lease)
	if err == nil {
		return true, false
	}
	if !errors.Is(err, ErrLeaseLost) {
		return false, false
	}
	// The key is gone (its lease ran out while the store was unreachable)
	// or someone else holds it. Claiming it under our own token succeeds
	// only in the first case, when no other execution can exist.
	k.mu.Lock()
	if k.stopped {
		k.mu.Unlock()
		return false, true
	}
	k.tookBack = true
	k.mu.Unlock()
	res, err := k.store.Claim(ctx, k.key, k.token, k.record, k.lease)
	switch {
	case errors.Is(err, ErrLeaseLost):
		k.mu.Lock()
		k.forgotten = true // Forget fenced our token
		k.mu.Unlock()
		return false, true
	case err != nil:
		return false, false
	case res.Claimed || ownsRecord(res.Record, k.token):
		return true, false
	}
	return false, true // another call owns the key
}

// exit ends the keeper. A take-back claim may have landed after the call
// released the key; releasing again (fenced by the token) frees it.
func (k *leaseKeeper) exit() {
	k.mu.Lock()
	again := k.release && k.tookBack
	k.mu.Unlock()
	if again {
		ctx, cancel := context.WithTimeout(context.Background(), max(k.lease/4, time.Second))
		defer cancel()
		_ = k.store.Release(ctx, k.key, k.token)
	}
}

// stop ends the renewals without waiting for one in flight. release tells
// the keeper the call is releasing the key.
func (k *leaseKeeper) stop(release bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.stopped {
		return
	}
	k.stopped, k.release = true, release
	close(k.done)
}

// wasForgotten reports whether the keeper found the record deleted by
// Forget while the call ran.
func (k *leaseKeeper) wasForgotten() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.forgotten
}

// ownsRecord reports whether record is token's own in-progress record: a
// claim of ours applied by an earlier try whose reply was lost.
func ownsRecord(record []byte, token string) bool {
	rec, err := decodeRecord(record)
	return err == nil && rec.GetState() == idempotencyv1.Record_STATE_IN_PROGRESS && rec.GetLeaseToken() == token
}
