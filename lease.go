package idempotency

import (
	"container/heap"
	"container/list"
	"context"
	"errors"
	"sync"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
)

// renewer keeps the leases of every call in flight on one server with one
// goroutine: each tick sends the renewals of all the keys that are due in
// one batch (one pipelined round trip per Redis node with a
// [BatchRenewer]), retries a failed renewal promptly with a bounded backoff
// (so an outage shorter than what is left of the lease never loses it), and
// takes a key back under the same token when a renewal finds it gone with
// nobody else owning it. A call registers and unregisters in O(1) and owns
// no goroutine; the renewer's goroutine exists only while leases do.
//
// Stopping a lease never waits: an answer is never delayed by a renewal in
// flight, and no renewal of it starts after stop returns.
type renewer struct {
	store Store
	batch BatchRenewer // store, when it is one
	lease time.Duration
	every time.Duration // a third of the lease
	// early: a tick also renews the leases due within this much, so calls
	// that started close together share a batch.
	early            time.Duration
	base, maxBackoff time.Duration
	tryFor           time.Duration // the bound of one batch
	hook             func(key string)

	mu      sync.Mutex
	queue   list.List // *leaseKeeper in order of their next renewal
	retries retryHeap // *leaseKeeper retrying a failed renewal, soonest first
	running bool      // the goroutine runs
	// wake interrupts the goroutine's wait when a retry is scheduled from
	// outside it (a take-back), which may be due sooner.
	wake chan struct{}
}

func newRenewer(store Store, lease time.Duration, hook func(string)) *renewer {
	r := &renewer{store: store, lease: lease, every: lease / 3, hook: hook, wake: make(chan struct{}, 1)}
	r.batch, _ = store.(BatchRenewer)
	r.early = r.every / 4
	r.base = min(max(lease/64, time.Millisecond), 100*time.Millisecond)
	r.maxBackoff = max(lease/16, r.base)
	// One try may take at most a quarter of the lease, so a hung store
	// leaves room for more tries before the lease ends.
	r.tryFor = max(lease/4, time.Millisecond)
	return r
}

// leaseKeeper is one call's lease, kept by the server's renewer until the
// call stops it.
type leaseKeeper struct {
	r      *renewer
	key    string
	token  string
	record []byte // the in-progress record, to take the key back

	// Guarded by r.mu.
	due       time.Time
	backoff   time.Duration
	elem      *list.Element // in r.queue, or nil
	heapIndex int           // in r.retries, or -1
	inFlight  bool          // a renewal or take-back is being sent
	stopped   bool
	release   bool // stop asked for the key to be released
	tookBack  bool // a take-back claim was sent; it may land after a release
	forgotten bool // the record was deleted (Forget) while the call ran
}

// keepLease registers c's lease with the server's renewer.
func (s *server) keepLease(c *call) *leaseKeeper {
	r := s.renewer
	k := &leaseKeeper{r: r, key: c.storeKey, token: c.token, record: c.inProgress, heapIndex: -1, backoff: r.base}
	r.mu.Lock()
	r.requeueLocked(k, time.Now())
	r.mu.Unlock()
	return k
}

func (r *renewer) run() {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		r.mu.Lock()
		next, ok := r.nextDue()
		if !ok {
			r.running = false
			r.mu.Unlock()
			return
		}
		now := time.Now()
		if d := next.Sub(now); d > 0 {
			r.mu.Unlock()
			t.Reset(d)
			select {
			case <-t.C:
			case <-r.wake:
				if !t.Stop() {
					<-t.C
				}
			}
			continue
		}
		batch := r.takeDue(now.Add(r.early))
		r.mu.Unlock()
		r.renew(batch)
	}
}

// nextDue returns when the next renewal is due. Callers hold r.mu.
func (r *renewer) nextDue() (time.Time, bool) {
	var next time.Time
	ok := false
	if f := r.queue.Front(); f != nil {
		next, ok = f.Value.(*leaseKeeper).due, true
	}
	if len(r.retries) > 0 && (!ok || r.retries[0].due.Before(next)) {
		next, ok = r.retries[0].due, true
	}
	return next, ok
}

// takeDue removes the leases due by horizon, marks them in flight and
// reports each renewal to the test hook as it begins. Callers hold r.mu.
func (r *renewer) takeDue(horizon time.Time) []*leaseKeeper {
	var batch []*leaseKeeper
	for f := r.queue.Front(); f != nil && !f.Value.(*leaseKeeper).due.After(horizon); f = r.queue.Front() {
		k := r.queue.Remove(f).(*leaseKeeper)
		k.elem = nil
		batch = append(batch, k)
	}
	for len(r.retries) > 0 && !r.retries[0].due.After(horizon) {
		batch = append(batch, heap.Pop(&r.retries).(*leaseKeeper))
	}
	for _, k := range batch {
		k.inFlight = true
		if r.hook != nil {
			r.hook(k.key)
		}
	}
	return batch
}

// renew sends one batch of renewals and files each lease by its result.
func (r *renewer) renew(batch []*leaseKeeper) {
	ctx, cancel := context.WithTimeout(context.Background(), r.tryFor)
	errs := r.renewAll(ctx, batch)
	cancel()
	r.mu.Lock()
	now := time.Now()
	var takeBack []*leaseKeeper
	for i, k := range batch {
		if k.stopped {
			k.inFlight = false
			k.exitLocked()
			continue
		}
		switch err := errs[i]; {
		case err == nil:
			k.inFlight = false
			k.backoff = r.base
			r.requeueLocked(k, now)
		case errors.Is(err, ErrLeaseLost):
			// The key is gone (its lease ran out while the store was
			// unreachable) or someone else holds it. Claiming it under our
			// own token succeeds only in the first case, when no other
			// execution can exist.
			k.tookBack = true
			takeBack = append(takeBack, k) // still in flight
		default:
			k.inFlight = false
			r.retryLocked(k, now)
		}
	}
	r.mu.Unlock()
	for _, k := range takeBack {
		go r.takeBack(k)
	}
}

// renewAll renews every lease of batch: in one call of a BatchRenewer, or
// with up to 64 Renew calls at a time.
func (r *renewer) renewAll(ctx context.Context, batch []*leaseKeeper) []error {
	if r.batch != nil {
		keys, tokens := make([]string, len(batch)), make([]string, len(batch))
		for i, k := range batch {
			keys[i], tokens[i] = k.key, k.token
		}
		if errs := r.batch.RenewBatch(ctx, keys, tokens, r.lease); len(errs) == len(batch) {
			return errs
		}
	}
	errs := make([]error, len(batch))
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i, k := range batch {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			errs[i] = r.store.Renew(ctx, k.key, k.token, r.lease)
		})
	}
	wg.Wait()
	return errs
}

// takeBack claims k's key again under its own token after a renewal found
// it gone.
func (r *renewer) takeBack(k *leaseKeeper) {
	r.mu.Lock()
	if k.stopped {
		k.inFlight = false
		k.exitLocked()
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), r.tryFor)
	res, err := r.store.Claim(ctx, k.key, k.token, k.record, r.lease)
	cancel()
	r.mu.Lock()
	defer r.mu.Unlock()
	k.inFlight = false
	now := time.Now()
	switch {
	case k.stopped:
		k.exitLocked()
	case errors.Is(err, ErrLeaseLost):
		k.forgotten = true // Forget fenced our token
	case err != nil:
		r.retryLocked(k, now)
	case res.Claimed || ownsRecord(res.Record, k.token):
		k.backoff = r.base
		r.requeueLocked(k, now)
	}
	// Otherwise another call owns the key: the lease is lost for good.
}

// requeueLocked schedules k's next periodic renewal. Every due time is
// now + every, so the queue stays in order. Callers hold r.mu.
func (r *renewer) requeueLocked(k *leaseKeeper, now time.Time) {
	k.due = now.Add(r.every)
	k.elem = r.queue.PushBack(k)
	r.ensureRunningLocked()
}

// retryLocked schedules a prompt retry of k's failed renewal. Callers
// hold r.mu.
func (r *renewer) retryLocked(k *leaseKeeper, now time.Time) {
	k.due = now.Add(k.backoff)
	k.backoff = min(2*k.backoff, r.maxBackoff)
	heap.Push(&r.retries, k)
	r.ensureRunningLocked()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// ensureRunningLocked starts the goroutine if it ended. Callers hold r.mu.
func (r *renewer) ensureRunningLocked() {
	if !r.running {
		r.running = true
		go r.run()
	}
}

// exitLocked ends a stopped lease once nothing of it is in flight. A
// take-back claim may have landed after the call released the key;
// releasing again (fenced by the token) frees it. Callers hold r.mu.
func (k *leaseKeeper) exitLocked() {
	if !k.release || !k.tookBack {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), max(k.r.lease/4, time.Second))
		defer cancel()
		_ = k.r.store.Release(ctx, k.key, k.token)
	}()
}

// stop ends the renewals of k without waiting for one in flight. release
// tells the renewer the call is releasing the key.
func (k *leaseKeeper) stop(release bool) {
	r := k.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if k.stopped {
		return
	}
	k.stopped, k.release = true, release
	if k.elem != nil {
		r.queue.Remove(k.elem)
		k.elem = nil
	}
	if k.heapIndex >= 0 {
		heap.Remove(&r.retries, k.heapIndex)
	}
	if !k.inFlight {
		k.exitLocked()
	}
}

// wasForgotten reports whether the renewer found the record deleted by
// Forget while the call ran.
func (k *leaseKeeper) wasForgotten() bool {
	k.r.mu.Lock()
	defer k.r.mu.Unlock()
	return k.forgotten
}

// retryHeap orders leases waiting to retry by due time.
type retryHeap []*leaseKeeper

func (h retryHeap) Len() int           { return len(h) }
func (h retryHeap) Less(i, j int) bool { return h[i].due.Before(h[j].due) }
func (h retryHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].heapIndex, h[j].heapIndex = i, j
}
func (h *retryHeap) Push(x any) {
	k := x.(*leaseKeeper)
	k.heapIndex = len(*h)
	*h = append(*h, k)
}
func (h *retryHeap) Pop() any {
	old := *h
	k := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	k.heapIndex = -1
	return k
}

// ownsRecord reports whether record is token's own in-progress record: a
// claim of ours applied by an earlier try whose reply was lost.
func ownsRecord(record []byte, token string) bool {
	rec, err := decodeRecord(record)
	return err == nil && rec.GetState() == idempotencyv1.Record_STATE_IN_PROGRESS && rec.GetLeaseToken() == token
}
