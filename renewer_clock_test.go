package idempotency

// The renewer's schedule on a fake clock and a fake store: which lease is
// tried when, deterministically, with tens of thousands of leases.

import (
	"context"
	"fmt"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// fakeLeaseClock is a leaseClock that moves only when the test advances it.
// Timers due run inline, in Advance.
type fakeLeaseClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeLeaseTimer
}

type fakeLeaseTimer struct {
	at   time.Time
	f    func()
	done bool // fired or stopped
}

func newFakeLeaseClock() *fakeLeaseClock {
	return &fakeLeaseClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeLeaseClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeLeaseClock) AfterFunc(d time.Duration, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	tm := &fakeLeaseTimer{at: c.now.Add(d), f: f}
	c.timers = append(c.timers, tm)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		stopped := !tm.done
		tm.done = true
		return stopped
	}
}

// Advance moves the clock by d and runs the timers due, soonest first.
func (c *fakeLeaseClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []*fakeLeaseTimer
	live := c.timers[:0]
	for _, tm := range c.timers {
		switch {
		case tm.done:
		case !tm.at.After(c.now):
			tm.done = true
			due = append(due, tm)
		default:
			live = append(live, tm)
		}
	}
	c.timers = live
	c.mu.Unlock()
	sort.SliceStable(due, func(i, j int) bool { return due[i].at.Before(due[j].at) })
	for _, tm := range due {
		tm.f()
	}
}

// fakeRenewStore is a BatchRenewer that records, per key, when each renewal
// try reached it and when the last one succeeded (on the fake clock), and
// hangs the calls hang selects until their context ends, or, when deaf,
// until the test closes deafUntil.
type fakeRenewStore struct {
	*MemoryStore
	clock     *fakeLeaseClock
	hang      func(now time.Time, keys []string) bool
	deaf      bool
	deafUntil chan struct{}

	mu          sync.Mutex
	hanging     int // keys in a hung call whose context has not ended
	deafBlocked int // deaf calls still blocked
	duringDeaf  int // calls that reached the store while a deaf one was blocked
	batches     int
	largest     int
	perTick     map[time.Time]int // pipelines per tick
	keys        map[string]*fakeKeyLog
	inFlights   int // calls in the store at once, at most
	inStore     int
}

type fakeKeyLog struct {
	tries, renewals  int
	lastTry, renewed time.Time // both start as the claim's send
	lastFailed       bool
	maxRetryGap      time.Duration // the longest from a failed try to the next
	maxLeaseAge      time.Duration // the longest a lease went unrenewed, at a renewal
}

func newFakeRenewStore(clock *fakeLeaseClock) *fakeRenewStore {
	return &fakeRenewStore{MemoryStore: NewMemoryStore(), clock: clock, perTick: map[time.Time]int{}, keys: map[string]*fakeKeyLog{}}
}

// claimed records key's claim, sent at sent.
func (f *fakeRenewStore) claimed(key string, sent time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.keys[key] = &fakeKeyLog{lastTry: sent, renewed: sent}
}

func (f *fakeRenewStore) RenewBatch(ctx context.Context, keys, tokens []string, lease time.Duration) []error {
	now := f.clock.Now()
	f.mu.Lock()
	f.batches++
	f.largest = max(f.largest, len(keys))
	f.perTick[now]++
	f.inStore++
	f.inFlights = max(f.inFlights, f.inStore)
	if f.deafBlocked > 0 {
		f.duringDeaf++
	}
	hung := f.hang != nil && f.hang(now, keys)
	for _, k := range keys {
		l := f.keys[k]
		l.tries++
		if l.lastFailed {
			l.maxRetryGap = max(l.maxRetryGap, now.Sub(l.lastTry))
		}
		l.lastTry, l.lastFailed = now, hung
		if !hung {
			l.renewals++
			l.maxLeaseAge = max(l.maxLeaseAge, now.Sub(l.renewed))
			l.renewed = now
		}
	}
	if hung {
		f.hanging += len(keys)
		if f.deaf {
			f.deafBlocked++
		}
	}
	f.mu.Unlock()
	errs := make([]error, len(keys))
	if hung {
		<-ctx.Done()
		f.mu.Lock()
		f.hanging -= len(keys)
		f.mu.Unlock()
		if f.deaf {
			<-f.deafUntil
			f.mu.Lock()
			f.deafBlocked--
			f.mu.Unlock()
		}
		for i := range errs {
			errs[i] = errOutage
		}
	}
	f.mu.Lock()
	f.inStore--
	f.mu.Unlock()
	return errs
}

// waitIdle waits until the renewer has sent every try due by now and every
// try it sent has been filed, except those hung in the store.
func waitRenewerIdle(t *testing.T, r *renewer, clock *fakeLeaseClock, store *fakeRenewStore) {
	t.Helper()
	var state string
	deadline := time.Now().Add(testTimeout)
	for {
		r.mu.Lock()
		now := clock.Now()
		asleep := !r.running || (r.sleepUntil.After(now) && len(r.wake) == 0)
		store.mu.Lock()
		idle := asleep && r.inFlight == store.hanging
		state = fmt.Sprintf("running %v, sleeping until %v (now %v), wake %d, in flight %d, hanging in the store %d, retries %d, slots %d",
			r.running, r.sleepUntil.Sub(now), now, len(r.wake), r.inFlight, store.hanging, len(r.retries), len(r.due))
		store.mu.Unlock()
		r.mu.Unlock()
		if idle {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the renewer is not idle after %v: %s", testTimeout, state)
		}
		time.Sleep(time.Millisecond)
	}
}

// runRenewer advances the clock by step until it has moved by d, letting
// the renewer settle after each step.
func runRenewer(t *testing.T, r *renewer, clock *fakeLeaseClock, store *fakeRenewStore, d, step time.Duration) {
	t.Helper()
	for moved := time.Duration(0); moved < d; moved += step {
		clock.Advance(step)
		waitRenewerIdle(t, r, clock, store)
	}
}

// fakeLease is the lease of the fake-clock tests: an hour, so that the
// real deadline the renewer also gives each store call (a thirty-second of
// the lease) never ends a call before the fake clock does.
const fakeLease = time.Hour

// keepFake registers n leases named prefix-i, their claims sent at sent.
func keepFake(r *renewer, store *fakeRenewStore, prefix string, n int, sent time.Time) []*leaseKeeper {
	ks := make([]*leaseKeeper, n)
	for i := range ks {
		key := fmt.Sprintf("%s-%d", prefix, i)
		store.claimed(key, sent)
		ks[i] = r.keep(key, "tok", nil, sent, true)
	}
	return ks
}

// A tick with 50,000 leases (5,000 unless IDEMPOTENCY_LONG is set) due at once sends them all, in pipelines of at
// most 256 renewals, all in flight together, and every lease is renewed a
// quarter of the lease after its claim or last renewal was sent: before a
// third of the lease has passed.
func TestRenewerTickOf50000Leases(t *testing.T) {
	clock := newFakeLeaseClock()
	store := newFakeRenewStore(clock)
	r := newRenewer(store, fakeLease, nil, clock)
	n := 5000
	if os.Getenv(longEnv) != "" {
		n = 50000 // about 5 s, 20 s under -race
	}
	ks := keepFake(r, store, "k", n, clock.Now())
	runRenewer(t, r, clock, store, fakeLease, fakeLease/96)
	for _, k := range ks {
		k.stop(false)
	}
	store.mu.Lock()
	defer store.mu.Unlock()
	var maxAge time.Duration
	for key, l := range store.keys {
		if l.renewals != 4 {
			t.Fatalf("%s renewed %d times in one lease, want 4", key, l.renewals)
		}
		maxAge = max(maxAge, l.maxLeaseAge)
	}
	wantPipelines := (n + maxRenewBatch - 1) / maxRenewBatch
	if store.largest > maxRenewBatch || store.batches != 4*wantPipelines {
		t.Fatalf("%d pipelines, the largest of %d renewals; want %d of at most %d", store.batches, store.largest, 4*wantPipelines, maxRenewBatch)
	}
	for tick, p := range store.perTick {
		if p != wantPipelines {
			t.Fatalf("the tick at %v sent %d pipelines, want %d", tick, p, wantPipelines)
		}
	}
	if maxAge > fakeLease/4 {
		t.Fatalf("a lease went %v unrenewed, want at most a quarter of the lease (%v)", maxAge, fakeLease/4)
	}
	t.Logf("reliability: %s: %d leases due in one tick: %d pipelines of at most %d, each lease renewed at most %v (%.2f of the lease) after the last send",
		t.Name(), n, wantPipelines, store.largest, maxAge, float64(maxAge)/float64(fakeLease))
}

// A tick with one pipeline that hangs (the store never answers it, deaf to
// its context) holds back nothing: the tick's other pipelines are
// answered, the next ticks' leases are sent on time while it is still
// blocked, and the hung pipeline's leases are tried again, timed out by the
// renewer itself, within a sixteenth of the lease.
func TestRenewerSlowTickSkipsNoLease(t *testing.T) {
	clock := newFakeLeaseClock()
	store := newFakeRenewStore(clock)
	r := newRenewer(store, fakeLease, nil, clock)
	t0 := clock.Now()
	firstTick := t0.Add(fakeLease / 4)
	store.hang = func(now time.Time, keys []string) bool {
		return now.Equal(firstTick) && keys[0] == "a-0"
	}
	store.deaf, store.deafUntil = true, make(chan struct{})
	defer close(store.deafUntil)
	n := 2500
	if os.Getenv(longEnv) != "" {
		n = 25000
	}
	step := fakeLease / 96
	a := keepFake(r, store, "a", n, t0)
	runRenewer(t, r, clock, store, fakeLease/8, step)
	b := keepFake(r, store, "b", n, clock.Now())
	runRenewer(t, r, clock, store, fakeLease*7/8, step)
	for _, k := range append(a, b...) {
		k.stop(false)
	}
	store.mu.Lock()
	defer store.mu.Unlock()
	var hungAge, otherAge, retryGap time.Duration
	hung := 0
	for key, l := range store.keys {
		if l.renewals < 3 {
			t.Fatalf("%s renewed %d times, want 3 or more", key, l.renewals)
		}
		if l.tries > l.renewals {
			hung++
			hungAge, retryGap = max(hungAge, l.maxLeaseAge), max(retryGap, l.maxRetryGap)
		} else {
			otherAge = max(otherAge, l.maxLeaseAge)
		}
	}
	if store.duringDeaf == 0 || store.deafBlocked != 1 {
		t.Fatalf("%d calls reached the store while the hung one was blocked (%d still blocked); the test proves nothing", store.duringDeaf, store.deafBlocked)
	}
	if hung != maxRenewBatch {
		t.Fatalf("%d leases were in the hung pipeline, want %d", hung, maxRenewBatch)
	}
	if otherAge > fakeLease/4 {
		t.Errorf("while a pipeline hung, another lease went %v unrenewed; want at most a quarter of the lease (%v)", otherAge, fakeLease/4)
	}
	if retryGap > fakeLease/16+step || hungAge > fakeLease/4+fakeLease/16+step {
		t.Errorf("the hung leases were tried again %v after the hung try and renewed %v after the last renewal; want within a sixteenth of the lease (%v) of the hung try", retryGap, hungAge, fakeLease/16)
	}
	t.Logf("reliability: %s: one pipeline of %d hung for good in a tick of %d leases, %d more due a slot later; %d pipelines went out while it hung: the others renewed at most %.3f of the lease apart; the hung ones tried again %.3f of the lease after the hung try",
		t.Name(), maxRenewBatch, n, n, store.duringDeaf, float64(otherAge)/float64(fakeLease), float64(retryGap)/float64(fakeLease))
}

// While the store hangs (every try times out), a lease is tried again at
// least every sixteenth of the lease, and once the store answers, the next
// try renews it: an outage that ends an eighth of the lease before the
// lease would end never loses it. The renewer times each try out on its own
// clock, whether or not the store honours its context.
func TestRenewerTriesEverySixteenthWhileStoreHangs(t *testing.T) {
	clock := newFakeLeaseClock()
	store := newFakeRenewStore(clock)
	r := newRenewer(store, fakeLease, nil, clock)
	t0 := clock.Now()
	healAt := t0.Add(fakeLease * 7 / 8)
	store.hang = func(now time.Time, keys []string) bool {
		return now.After(t0.Add(fakeLease/8)) && now.Before(healAt)
	}
	step := fakeLease / 192
	k := keepFake(r, store, "k", 1, t0)
	runRenewer(t, r, clock, store, fakeLease, step)
	k[0].stop(false)
	store.mu.Lock()
	defer store.mu.Unlock()
	l := store.keys["k-0"]
	if l.maxRetryGap > fakeLease/16+step {
		t.Errorf("tries up to %v apart while the store hung, want at most a sixteenth of the lease (%v)", l.maxRetryGap, fakeLease/16)
	}
	if l.renewed.Before(healAt) || !l.renewed.Before(t0.Add(fakeLease)) {
		t.Errorf("renewed at %v after the claim, want after the store answered again (%v) and before the lease ended (%v)", l.renewed.Sub(t0), healAt.Sub(t0), fakeLease)
	}
	t.Logf("reliability: %s: store hung from 0.25 to 0.875 of the lease: %d tries, at most %.4f of the lease apart; renewed %.3f of the lease after the claim",
		t.Name(), l.tries, float64(l.maxRetryGap)/float64(fakeLease), float64(l.renewed.Sub(t0))/float64(fakeLease))
}

// timedRenewStore records, per key, the longest a lease went unrenewed on
// a real store: from the send of one renewal (or the claim) to the reply
// of the next, a bound on how old the lease was when Redis renewed it.
type timedRenewStore struct {
	*RedisStore
	mu       sync.Mutex
	sent     map[string]time.Time
	renewals map[string]int
	maxAge   time.Duration
	lost     int           // failed renewals
	longest  time.Duration // the slowest pipeline
}

func (s *timedRenewStore) RenewBatch(ctx context.Context, keys, tokens []string, lease time.Duration) []error {
	start := time.Now()
	errs := s.RedisStore.RenewBatch(ctx, keys, tokens, lease)
	end := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.longest = max(s.longest, end.Sub(start))
	for i, k := range keys {
		if errs[i] != nil {
			s.lost++
			continue
		}
		s.maxAge = max(s.maxAge, end.Sub(s.sent[k]))
		s.sent[k] = start
		s.renewals[k]++
	}
	return errs
}

// On a real redis-server, 50,000 leases claimed at once, so that one tick
// renews them all, are each renewed before a third of the lease has passed,
// counted from the send of the claim to the reply of the renewal.
func TestRenewalOf50000LeasesOnRedis(t *testing.T) {
	skipUnlessLong(t)
	srv := newRedisServer(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { rdb.Close() })
	store := &timedRenewStore{RedisStore: NewRedisStore(rdb, WithKeyPrefix("leases:"), WithRedisLogger(nil)),
		sent: map[string]time.Time{}, renewals: map[string]int{}}
	const n = 50000
	const lease = 20 * time.Second // renewed every 5 s
	ctx := testCtx(t)
	value, err := layoutValue(stateInProgress, "tok", []byte("in progress"))
	if err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	pipe := rdb.Pipeline()
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("k-%d", i)
		pipe.Set(ctx, "leases:"+keys[i], value, lease)
		store.sent[keys[i]] = sent
	}
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatalf("claiming %d keys: %v", n, err)
	}
	r := newRenewer(store, lease, nil, nil)
	ks := make([]*leaseKeeper, n)
	for i, k := range keys {
		ks[i] = r.keep(k, "tok", nil, sent, true)
	}
	waitUntil(t, "every lease is renewed", func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		for _, k := range keys {
			if store.renewals[k] < 1 {
				return false
			}
		}
		return true
	})
	for _, k := range ks {
		k.stop(false)
	}
	store.mu.Lock()
	defer store.mu.Unlock()
	if store.maxAge >= lease/3 {
		t.Fatalf("a lease went %v unrenewed, want less than a third of the lease (%v)", store.maxAge, lease/3)
	}
	t.Logf("reliability: %s: %d leases of %v renewed by each tick in pipelines of %d: the slowest pipeline took %v, %d renewals failed (retried); each lease was renewed at most %v (%.3f of the lease) after the previous send",
		t.Name(), n, lease, maxRenewBatch, store.longest.Round(time.Millisecond), store.lost, store.maxAge.Round(time.Millisecond), float64(store.maxAge)/float64(lease))
}
