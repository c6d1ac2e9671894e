package idempotency

import (
	"container/heap"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
)

// maxRenewBatch is the most renewals one pipeline carries: a tick with
// more leases due sends several pipelines, up to maxRenewPipelines at once,
// so no round trip grows with the number of calls in flight, and one slow
// pipeline delays no other.
const (
	maxRenewBatch     = 256
	maxRenewPipelines = 8
)

// errClaimTooLate is why a call whose claim answered too late did not run.
var errClaimTooLate = errors.New("idempotency: the claim's reply came back too late to trust its lease; the claim was released and the handler not run")

// errNoAnswer is a renewal try that got no answer before its deadline.
var errNoAnswer = errors.New("idempotency: the store did not answer the renewal in time")

// renewer keeps the leases of every call in flight on one server. One
// goroutine schedules them: a lease is due a quarter of the lease after its
// claim or its last renewal was sent, so each renewal lands before a third
// of the lease has passed; the leases due within one slot (a twelfth of
// the lease) are sent together, in pipelines of at most maxRenewBatch keys
// (one round trip per Redis node with a [BatchRenewer]), each from its own
// goroutine, maxRenewPipelines at a time: the scheduling goroutine never
// waits for the store.
//
// Each try has tryFor to answer. One that fails, or does not answer in
// time, is retried after a backoff, so a lease not yet renewed gets a new
// try at least every sixteenth of the lease (tryFor + maxBackoff, plus the
// time to send the pipelines queued before it), also when the store hangs
// instead of refusing (a dead host: no reply, no reset). A renewal that
// finds the key gone with nobody else owning it takes it back under the
// same token.
//
// A call registers and unregisters in O(1) and owns no goroutine; the
// scheduling goroutine exists only while leases do. Stopping a lease never
// waits: an answer is never delayed by a renewal in flight, and no renewal
// of it starts after stop returns.
type renewer struct {
	store Store
	batch BatchRenewer // store, when it is one
	clock leaseClock
	lease time.Duration
	every time.Duration // from one send to the next: a quarter of the lease
	// slot is the width of a bucket of due times: the leases due in one
	// are sent together, up to a slot early.
	slot             time.Duration
	epoch            time.Time // slot 0 starts here
	base, maxBackoff time.Duration
	tryFor           time.Duration // the deadline of one try
	hook             func(key string)
	// pipelines bounds the tries in flight: a try's deadline starts when
	// it gets one, so a tick of many pipelines never times its own last
	// ones out. renewSlots bounds the Renew calls in flight for a store
	// that is not a BatchRenewer.
	pipelines, renewSlots chan struct{}

	mu       sync.Mutex
	due      map[int64]*leaseList // slot → the leases due for their periodic renewal in it
	retries  retryHeap            // *leaseKeeper retrying a failed try, soonest first
	running  bool                 // the goroutine runs
	inFlight int                  // leases with a try in flight
	// sleepUntil is when the goroutine's wait ends, zero while it is not
	// waiting; a lease due sooner wakes it.
	sleepUntil time.Time
	wake       chan struct{}
}

// leaseClock is the renewer's time: the real one, or a test's.
type leaseClock interface {
	Now() time.Time
	// AfterFunc calls f in its own goroutine after d; stop cancels it.
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) func() bool {
	return time.AfterFunc(d, f).Stop
}

func newRenewer(store Store, lease time.Duration, hook func(string), clock leaseClock) *renewer {
	if clock == nil {
		clock = realClock{}
	}
	r := &renewer{store: store, clock: clock, lease: lease, hook: hook,
		every: lease / 4, slot: max(lease/12, 1), epoch: clock.Now(),
		pipelines: make(chan struct{}, maxRenewPipelines), renewSlots: make(chan struct{}, 64), due: make(map[int64]*leaseList), wake: make(chan struct{}, 1)}
	r.batch, _ = store.(BatchRenewer)
	// A try that hangs ends after tryFor and is retried after at most
	// maxBackoff: a sixteenth of the lease between two tries, whatever the
	// store does. At least 100ms, so that a short lease on a busy store
	// (under -race, a Postgres round trip) is not lost to its own deadline.
	r.tryFor = max(lease/32, 100*time.Millisecond)
	r.base = min(max(lease/64, time.Millisecond), 100*time.Millisecond)
	r.maxBackoff = max(lease/32, r.base)
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
	due        time.Time
	backoff    time.Duration
	slot       int64        // of due, while listed
	prev, next *leaseKeeper // in r.due[slot], while listed
	heapIndex  int          // in r.retries, or -1
	listed     bool         // in r.due[slot]
	inFlight   bool         // a renewal or take-back is being sent
	stopped    bool
	release    bool // stop asked for the key to be released
	tookBack   bool // a take-back claim was sent; it may land after a release

	// forgotten: the record was deleted (Forget) while the call ran. Set
	// under r.mu, read without it (wasForgotten).
	forgotten atomic.Bool
}

// leaseList is the leases due in one slot, in the order they were filed:
// a list threaded through leaseKeeper.prev and next, so filing a lease
// allocates nothing. Callers hold the renewer's mu.
type leaseList struct {
	head, tail *leaseKeeper
	n          int
}

// push appends k.
func (l *leaseList) push(k *leaseKeeper) {
	k.prev, k.next = l.tail, nil
	if l.tail != nil {
		l.tail.next = k
	} else {
		l.head = k
	}
	l.tail = k
	l.n++
}

// remove takes k, which is in l, out of it.
func (l *leaseList) remove(k *leaseKeeper) {
	if k.prev != nil {
		k.prev.next = k.next
	} else {
		l.head = k.next
	}
	if k.next != nil {
		k.next.prev = k.prev
	} else {
		l.tail = k.prev
	}
	k.prev, k.next = nil, nil
	l.n--
}

// keepLease registers c's lease with the server's renewer, counted from
// when its claim was sent (the store started the lease after that). It
// returns nil when the claim's reply came back so late that too little of
// the lease may be left to renew it (an eighth: two of the renewer's retry
// intervals): the caller must not run the handler. A TxStore's claim is
// never refused so (refuseLate false): the store may queue it before
// sending it (the Postgres store waits for a connection), and its commit
// is fenced in the handler's own transaction, so an owner whose lease
// lapsed cannot commit a second execution.
func (s *server) keepLease(c *call, refuseLate bool) *leaseKeeper {
	return s.renewer.keep(c.storeKey, c.token, c.inProgress, c.claimSent, refuseLate)
}

func (r *renewer) keep(key, token string, record []byte, sent time.Time, refuseLate bool) *leaseKeeper {
	if refuseLate && !r.clock.Now().Before(sent.Add(r.lease-r.lease/8)) {
		return nil
	}
	k := &leaseKeeper{r: r, key: key, token: token, record: record, heapIndex: -1, backoff: r.base}
	r.mu.Lock()
	r.scheduleLocked(k, sent.Add(r.every))
	r.mu.Unlock()
	return k
}

func (r *renewer) run() {
	for {
		r.mu.Lock()
		r.sleepUntil = time.Time{}
		now := r.clock.Now()
		next, ok := r.nextDueLocked()
		if !ok {
			r.running = false
			r.mu.Unlock()
			return
		}
		if next.After(now) {
			r.sleepUntil = next
			stop := r.clock.AfterFunc(next.Sub(now), r.poke)
			r.mu.Unlock()
			<-r.wake
			stop()
			continue
		}
		batch := r.takeDueLocked(now)
		r.mu.Unlock()
		for len(batch) > 0 {
			n := min(len(batch), maxRenewBatch)
			go r.renew(batch[:n:n], now)
			batch = batch[n:]
		}
	}
}

// poke wakes the goroutine's wait.
func (r *renewer) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

func (r *renewer) slotOf(t time.Time) int64 {
	d := t.Sub(r.epoch)
	s := int64(d / r.slot)
	if d < 0 && d%r.slot != 0 {
		s--
	}
	return s
}

func (r *renewer) slotStart(s int64) time.Time { return r.epoch.Add(time.Duration(s) * r.slot) }

// nextDueLocked returns when the next renewal is due: the start of the
// earliest slot holding a lease, or the earliest retry. Callers hold r.mu.
func (r *renewer) nextDueLocked() (time.Time, bool) {
	var next time.Time
	ok := false
	for s := range r.due {
		if t := r.slotStart(s); !ok || t.Before(next) {
			next, ok = t, true
		}
	}
	if len(r.retries) > 0 && (!ok || r.retries[0].due.Before(next)) {
		next, ok = r.retries[0].due, true
	}
	return next, ok
}

// takeDueLocked removes the leases of every slot that has begun and the
// retries due by now (or within one base backoff of it), marks them in flight and reports each renewal to the
// test hook as it begins. Callers hold r.mu.
func (r *renewer) takeDueLocked(now time.Time) []*leaseKeeper {
	var batch []*leaseKeeper
	cur := r.slotOf(now)
	for s, l := range r.due {
		if s > cur {
			continue
		}
		for k := l.head; k != nil; {
			next := k.next
			k.listed, k.prev, k.next = false, nil, nil
			batch = append(batch, k)
			k = next
		}
		delete(r.due, s)
	}
	// Retries due within one base backoff go together, so retries filed
	// at slightly different times do not each cost a round trip.
	for len(r.retries) > 0 && !r.retries[0].due.After(now.Add(r.base)) {
		batch = append(batch, heap.Pop(&r.retries).(*leaseKeeper))
	}
	r.inFlight += len(batch)
	for _, k := range batch {
		k.inFlight = true
		if r.hook != nil {
			r.hook(k.key)
		}
	}
	return batch
}

// bounded waits for one of the pipelines slots, runs call with a deadline
// of tryFor and then calls file, once: with call's result, or with
// errNoAnswer when the deadline passes first, which frees the slot. A store
// call that outlives its deadline (one deaf to ctx) is left to end on its
// own, its result dropped: no try waits on another.
func (r *renewer) bounded(call func(ctx context.Context) error, file func(err error)) {
	r.pipelines <- struct{}{}
	ctx, cancel := context.WithTimeout(context.Background(), r.tryFor)
	defer cancel()
	var filed atomic.Bool
	done := func(err error) {
		if filed.CompareAndSwap(false, true) {
			<-r.pipelines
			file(err)
		}
	}
	stop := r.clock.AfterFunc(r.tryFor, func() {
		done(errNoAnswer)
		cancel()
	})
	err := call(ctx)
	stop()
	done(err)
}

// renew sends one pipeline of renewals, sent at the tick of time sent, and
// files each lease by its result.
func (r *renewer) renew(batch []*leaseKeeper, sent time.Time) {
	var errs []error
	r.bounded(func(ctx context.Context) error {
		errs = r.renewAll(ctx, batch)
		return nil
	}, func(err error) {
		if err != nil {
			r.file(batch, sent, nil) // not answered in time: errs is not ours to read
			return
		}
		r.file(batch, sent, errs)
	})
}

// file files each lease of batch by its result (errs nil: no answer).
func (r *renewer) file(batch []*leaseKeeper, sent time.Time, errs []error) {
	r.mu.Lock()
	now := r.clock.Now()
	var takeBack []*leaseKeeper
	for i, k := range batch {
		k.inFlight = false
		r.inFlight--
		if k.stopped {
			k.exitLocked()
			continue
		}
		err := errNoAnswer
		if errs != nil {
			err = errs[i]
		}
		switch {
		case err == nil:
			k.backoff = r.base
			r.scheduleLocked(k, sent.Add(r.every))
		case errors.Is(err, ErrLeaseLost):
			// The key is gone (its lease ran out while the store was
			// unreachable) or someone else holds it. Claiming it under our
			// own token succeeds only in the first case, when no other
			// execution can exist.
			k.inFlight, k.tookBack = true, true
			r.inFlight++
			takeBack = append(takeBack, k)
		default:
			r.retryLocked(k, now)
		}
	}
	r.mu.Unlock()
	for _, k := range takeBack {
		go r.takeBack(k)
	}
}

// renewAll renews every lease of batch: in one call of a BatchRenewer, or
// with concurrent Renew calls (at most 64 in flight for the renewer).
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
	var wg sync.WaitGroup
	for i, k := range batch {
		select {
		case r.renewSlots <- struct{}{}:
		case <-ctx.Done():
			errs[i] = ctx.Err()
			continue
		}
		wg.Go(func() {
			defer func() { <-r.renewSlots }()
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
		r.inFlight--
		k.exitLocked()
		r.mu.Unlock()
		return
	}
	sent := r.clock.Now()
	r.mu.Unlock()
	var res ClaimResult
	r.bounded(func(ctx context.Context) error {
		var err error
		res, err = r.store.Claim(ctx, k.key, k.token, k.record, r.lease)
		return err
	}, func(err error) {
		r.mu.Lock()
		defer r.mu.Unlock()
		k.inFlight = false
		r.inFlight--
		switch {
		case k.stopped:
			k.exitLocked()
		case errors.Is(err, ErrLeaseLost):
			k.forgotten.Store(true) // Forget fenced our token
		case err != nil:
			r.retryLocked(k, r.clock.Now())
		case res.Claimed || ownsRecord(res.Record, k.token):
			k.backoff = r.base
			r.scheduleLocked(k, sent.Add(r.every))
		}
		// Otherwise another call owns the key: the lease is lost for good.
	})
}

// scheduleLocked files k for its periodic renewal, due at due, in the
// slot holding due. Callers hold r.mu.
func (r *renewer) scheduleLocked(k *leaseKeeper, due time.Time) {
	k.due = due
	k.slot = r.slotOf(due)
	l := r.due[k.slot]
	if l == nil {
		l = &leaseList{}
		r.due[k.slot] = l
	}
	l.push(k)
	k.listed = true
	r.wakeForLocked(r.slotStart(k.slot))
}

// retryLocked schedules a prompt retry of k's failed try. Callers hold
// r.mu.
func (r *renewer) retryLocked(k *leaseKeeper, now time.Time) {
	k.due = now.Add(k.backoff)
	k.backoff = min(2*k.backoff, r.maxBackoff)
	heap.Push(&r.retries, k)
	r.wakeForLocked(k.due)
}

// wakeForLocked makes sure the goroutine runs and wakes by t. Callers hold
// r.mu.
func (r *renewer) wakeForLocked(t time.Time) {
	if !r.running {
		r.running = true
		go r.run()
		return
	}
	if !r.sleepUntil.IsZero() && t.Before(r.sleepUntil) {
		r.sleepUntil = t
		r.poke()
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
	if k.listed {
		l := r.due[k.slot]
		l.remove(k)
		if l.n == 0 {
			delete(r.due, k.slot)
		}
		k.listed = false
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
	return k.forgotten.Load()
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
