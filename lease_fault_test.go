package idempotency

// The lease against a store that hangs or answers late: each test counts
// the handler's executions across two servers sharing one store. Each test
// has a store of its own and mostly waits out real leases, so they run in
// parallel.

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

const leaseTestMethod = "/t/Do"

// leaseTestCall calls icpt with key as the idempotency key, as grpc-go would
// with method leaseTestMethod.
func leaseTestCall(icpt grpc.UnaryServerInterceptor, key string, handler grpc.UnaryHandler) error {
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("idempotency-key", key))
	_, err := icpt(ctx, &testingv1.DoRequest{Id: key}, &grpc.UnaryServerInfo{FullMethod: leaseTestMethod}, handler)
	return err
}

// onceHandler counts executions; the first one signals started and waits
// for release.
type onceHandler struct {
	runs             atomic.Int64
	started, release chan struct{}
}

func newOnceHandler() *onceHandler {
	return &onceHandler{started: make(chan struct{}), release: make(chan struct{})}
}

func (h *onceHandler) handle(ctx context.Context, req any) (any, error) {
	if h.runs.Add(1) == 1 {
		close(h.started)
		<-h.release
	}
	return &testingv1.DoResponse{Id: req.(*testingv1.DoRequest).GetId()}, nil
}

// renewLog records when each renewal try of a server begins.
type renewLog struct {
	mu    sync.Mutex
	tries []time.Time
}

func (l *renewLog) option() Option {
	return func(o *options) {
		o.renewHook = func(string) {
			l.mu.Lock()
			l.tries = append(l.tries, time.Now())
			l.mu.Unlock()
		}
	}
}

func (l *renewLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.tries)
}

// maxGap returns the longest time between two tries that began in [from,
// to], or between the last of them and to.
func (l *renewLog) maxGap(from, to time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	var gap time.Duration
	var last time.Time
	for _, at := range l.tries {
		if at.Before(from) || at.After(to) {
			continue
		}
		if !last.IsZero() {
			gap = max(gap, at.Sub(last))
		}
		last = at
	}
	if last.IsZero() {
		return to.Sub(from)
	}
	return max(gap, to.Sub(last))
}

// TestLeaseSurvivesHungStore cuts server A off from Redis as a dead host
// does (no reply, no reset: every try hangs until its deadline) from just
// after its claim until a quarter of the lease is left, and lets it through
// again right after a renewal try began. A renewal try that hangs must not
// hold back the next one: a new try goes out within 100ms + 1/32 of the
// lease (1/16 for leases of 3.2s and more), renews the key before it
// expires, and a duplicate sent to server B
// after the lease would have ended is told the call is in progress. Before
// the fix each try blocked the renewer for a quarter of the lease, the next
// one came after the lease had ended, and B ran the handler again.
func TestLeaseSurvivesHungStore(t *testing.T) {
	t.Parallel()
	redisSrv := newRedisServer(t)
	proxy := newFaultProxy(t, redisSrv.Addr)
	const lease = 2 * time.Second
	prefix := fmt.Sprintf("hung:%d:", time.Now().UnixNano())
	viaProxy := redis.NewClient(&redis.Options{Addr: proxy.Addr(), ContextTimeoutEnabled: true, MaxRetries: -1, DialTimeout: time.Second})
	t.Cleanup(func() { viaProxy.Close() })
	direct := redis.NewClient(&redis.Options{Addr: redisSrv.Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { direct.Close() })
	var triesA renewLog
	a := UnaryServerInterceptor(NewRedisStore(viaProxy, WithKeyPrefix(prefix), WithRedisLogger(nil)), WithLease(lease), triesA.option())
	b := UnaryServerInterceptor(NewRedisStore(direct, WithKeyPrefix(prefix), WithRedisLogger(nil)), WithLease(lease))
	h := newOnceHandler()
	first := make(chan error, 1)
	go func() { first <- leaseTestCall(a, "hung", h.handle) }()
	waitStarted(t, h.started)

	proxy.Blackhole()
	cut := time.Now()
	ttl, err := direct.PTTL(testCtx(t), prefix+StoreKey(leaseTestMethod, "", "hung")).Result()
	if err != nil || ttl <= lease/2 {
		t.Fatalf("PTTL after the claim = %v, %v; want most of the lease", ttl, err)
	}
	expires := cut.Add(ttl) // A cannot renew while cut off
	time.Sleep(time.Until(expires.Add(-lease / 4)))
	// Wait for a try that hangs: it began, and the blackhole swallowed its
	// bytes (its command, or the handshake of the connection it dialed).
	n := triesA.count()
	waitUntil(t, "A begins a renewal try, or its lease ends", func() bool {
		return triesA.count() > n || time.Now().After(expires)
	})
	swallowed := proxy.Swallowed()
	waitUntil(t, "the try's bytes are swallowed, or A's lease ends", func() bool {
		return proxy.Swallowed() > swallowed || time.Now().After(expires)
	})
	proxy.EndBlackhole()
	healed := time.Now()
	t.Logf("A cut off for %v, let through again with %v of its lease left", healed.Sub(cut).Round(time.Millisecond), expires.Sub(healed).Round(time.Millisecond))

	time.Sleep(time.Until(expires.Add(lease / 8)))
	err = leaseTestCall(b, "hung", h.handle)
	gap := triesA.maxGap(cut, healed)
	wantStatus(t, err, codes.Aborted, ReasonInProgress)
	close(h.release)
	if err := <-first; err != nil {
		t.Fatalf("A's call: %v", err)
	}
	if runs := h.runs.Load(); runs != 1 {
		t.Fatalf("handler ran %d times, want 1", runs)
	}
	r := newRenewer(nil, lease, nil, nil)
	if most := r.tryFor + r.maxBackoff; gap > 2*most { // room for a busy machine's timers
		t.Errorf("A's renewal tries were up to %v apart while Redis hung, want about %v", gap, most)
	}
	t.Logf("reliability: %s: lease %v, A cut off (dead host) for %v; renewal tries at most %v apart meanwhile; B's duplicate after the old expiry: in progress; executions 1",
		t.Name(), lease, healed.Sub(cut).Round(time.Millisecond), gap.Round(time.Millisecond))
}

// TestLeaseCountedFromClaimSend makes the claim's reply come back 0.8 of a
// lease after the store applied it. The lease runs from when the claim was
// sent, so the first renewal is due at once: by 0.95 of a lease the key is
// renewed, and a duplicate on server B after the first lease is told the
// call is in progress. Before the fix the first renewal was timed from the
// reply, a quarter to a third of a lease later, after the lease had ended.
func TestLeaseCountedFromClaimSend(t *testing.T) {
	t.Parallel()
	const lease = 1200 * time.Millisecond
	mem := NewMemoryStore()
	var appliedAt atomic.Pointer[time.Time]
	slow := &hookStore{next: mem}
	slow.claim = func(ctx context.Context, key, token string, record []byte, l time.Duration) (ClaimResult, error) {
		res, err := mem.Claim(ctx, key, token, record, l)
		if err == nil && res.Claimed {
			at := time.Now()
			appliedAt.Store(&at)
			time.Sleep(lease * 8 / 10) // the reply is late
		}
		return res, err
	}
	a := UnaryServerInterceptor(slow, WithLease(lease))
	b := UnaryServerInterceptor(mem, WithLease(lease))
	h := newOnceHandler()
	first := make(chan error, 1)
	go func() { first <- leaseTestCall(a, "late-reply", h.handle) }()
	waitStarted(t, h.started)
	applied := *appliedAt.Load()

	time.Sleep(time.Until(applied.Add(lease * 95 / 100)))
	_, ttl, err := mem.Get(testCtx(t), StoreKey(leaseTestMethod, "", "late-reply"))
	if err != nil || ttl < lease/2 {
		t.Errorf("0.95 lease after the claim was applied its lease has %v left (%v); want it renewed", ttl, err)
	}
	time.Sleep(time.Until(applied.Add(lease + lease/10)))
	err = leaseTestCall(b, "late-reply", h.handle)
	wantStatus(t, err, codes.Aborted, ReasonInProgress)
	close(h.release)
	if err := <-first; err != nil {
		t.Fatalf("A's call: %v", err)
	}
	if runs := h.runs.Load(); runs != 1 {
		t.Fatalf("handler ran %d times, want 1", runs)
	}
}

// TestClaimAnsweredAfterItsLeaseIsNotRun makes the claim's reply come back
// after the claim's lease has ended, and another server claimed the key
// meanwhile and ran the handler. The late claim must not run the handler:
// nothing proves its lease is still held. It answers Unavailable, and frees
// its claim if it still holds it (fenced by its token).
func TestClaimAnsweredAfterItsLeaseIsNotRun(t *testing.T) {
	t.Parallel()
	const lease = 300 * time.Millisecond
	for _, claimedMeanwhile := range []bool{true, false} {
		t.Run(fmt.Sprintf("claimed meanwhile %v", claimedMeanwhile), func(t *testing.T) {
			t.Parallel()
			mem := NewMemoryStore()
			applied, reply := make(chan struct{}), make(chan struct{})
			var once sync.Once
			slow := &hookStore{next: mem}
			slow.claim = func(ctx context.Context, key, token string, record []byte, l time.Duration) (ClaimResult, error) {
				res, err := mem.Claim(ctx, key, token, record, l)
				once.Do(func() {
					close(applied)
					<-reply
				})
				return res, err
			}
			a := UnaryServerInterceptor(slow, WithLease(lease))
			b := UnaryServerInterceptor(mem, WithLease(lease))
			var runs atomic.Int64
			handler := func(ctx context.Context, req any) (any, error) {
				runs.Add(1)
				return &testingv1.DoResponse{}, nil
			}
			first := make(chan error, 1)
			go func() { first <- leaseTestCall(a, "late-claim", handler) }()
			<-applied
			key := StoreKey(leaseTestMethod, "", "late-claim")
			waitUntil(t, "the claim's lease ends", func() bool {
				_, _, err := mem.Get(context.Background(), key)
				return err != nil
			})
			if claimedMeanwhile {
				if err := leaseTestCall(b, "late-claim", handler); err != nil {
					t.Fatalf("B's call: %v", err)
				}
			}
			close(reply)
			err := <-first
			wantStatus(t, err, codes.Unavailable, ReasonStoreUnavailable)
			want := int64(0)
			if claimedMeanwhile {
				want = 1
			}
			if n := runs.Load(); n != want {
				t.Fatalf("handler ran %d times, want %d", n, want)
			}
			// The key is free or holds B's outcome: never A's stranded claim.
			waitUntil(t, "A's late claim is freed", func() bool {
				rec, _, err := mem.Get(context.Background(), key)
				if err != nil {
					return !claimedMeanwhile
				}
				r, derr := decodeRecord(rec)
				return derr == nil && claimedMeanwhile && r.GetState() != idempotencyv1.Record_STATE_IN_PROGRESS
			})
		})
	}
}
