package idempotency

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// pipelineHook is a go-redis hook that records the EVALSHA script calls a
// client sends, in pipelines or on their own, and can hold pipelines until
// released. (A script Redis lacks is sent again with EVAL, and a new
// connection pipelines HELLO and CLIENT SETINFO: neither is counted.)
type pipelineHook struct {
	mu        sync.Mutex
	sizes     []int // EVALSHA calls per pipeline, in the order they were sent
	waits     []int // WAIT commands in each of them
	singles   int   // EVALSHA calls sent on their own
	inFlight  int
	maxFlight int
	hold      chan struct{} // non-nil: each pipeline waits for it to close
	held      chan struct{} // a pipeline reached the hold (buffered)
	panicNext bool
}

func (h *pipelineHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *pipelineHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "evalsha" {
			h.mu.Lock()
			h.singles++
			h.mu.Unlock()
		}
		return next(ctx, cmd)
	}
}

func (h *pipelineHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		n, waits := 0, 0
		for _, c := range cmds {
			switch c.Name() {
			case "evalsha":
				n++
			case "wait":
				waits++
			}
		}
		if n == 0 {
			return next(ctx, cmds)
		}
		h.mu.Lock()
		h.sizes = append(h.sizes, n)
		h.waits = append(h.waits, waits)
		h.inFlight++
		h.maxFlight = max(h.maxFlight, h.inFlight)
		hold, panicNow := h.hold, h.panicNext
		h.panicNext = false
		h.mu.Unlock()
		defer func() {
			h.mu.Lock()
			h.inFlight--
			h.mu.Unlock()
		}()
		if panicNow {
			panic("pipelineHook: told to panic")
		}
		if hold != nil {
			h.held <- struct{}{}
			<-hold
		}
		return next(ctx, cmds)
	}
}

func (h *pipelineHook) snapshot() (sizes []int, singles, maxFlight int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]int(nil), h.sizes...), h.singles, h.maxFlight
}

// holdFromNow makes the pipelines sent from now on wait for hold to close,
// after forgetting what was sent so far.
func (h *pipelineHook) holdFromNow() (hold chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.sizes, h.waits, h.singles, h.maxFlight = nil, nil, 0, 0
	h.hold, h.held = make(chan struct{}), make(chan struct{}, 10)
	return h.hold
}

// loadClaimScript claims a key of its own through s, so the claim script is in
// Redis's cache and a connection is open.
func loadClaimScript(t *testing.T, s *RedisStore) {
	t.Helper()
	if _, err := s.Claim(context.Background(), "warm-up", "tok-warm", []byte("rec"), time.Minute); err != nil {
		t.Fatal(err)
	}
}

// pipelinedStore is a RedisStore on a fresh miniredis whose client carries
// h, with WithPipelining(n).
func pipelinedStore(t *testing.T, h *pipelineHook, n int) (*RedisStore, *miniredis.Miniredis) {
	t.Helper()
	m := miniredis.RunT(t)
	c := redis.NewClient(&redis.Options{Addr: m.Addr()})
	c.AddHook(h)
	t.Cleanup(func() { c.Close() })
	s := NewRedisStore(c, WithPipelining(n), WithRedisLogger(nil))
	if s.pipe != nil {
		// Every call queued, so the tests see each in a pipeline
		// (TestPipelineLoneCallGoesAlone tests the lone call).
		s.pipe.alone = nil
	}
	return s, m
}

// queued returns how many calls wait in s's pipeline queues.
func queued(s *RedisStore) int {
	n := 0
	for _, p := range []*autoPipeline{s.pipe, s.ackedPipe} {
		if p != nil {
			p.mu.Lock()
			n += len(p.queue)
			p.mu.Unlock()
		}
	}
	return n
}

// The calls that queue while a pipeline is out go together in the next
// one, and each gets its own reply.
func TestPipelineSendsQueuedCallsTogether(t *testing.T) {
	h := &pipelineHook{}
	s, _ := pipelinedStore(t, h, 1)
	loadClaimScript(t, s)
	hold := h.holdFromNow()
	ctx := context.Background()

	first := make(chan error, 1)
	go func() {
		_, err := s.Claim(ctx, "first", "tok-first", []byte("rec"), time.Minute)
		first <- err
	}()
	<-h.held // the only pipeline is out and held

	const n = 20
	type result struct {
		res ClaimResult
		err error
	}
	results := make([]chan result, n)
	for i := range results {
		results[i] = make(chan result, 1)
		go func() {
			r, err := s.Claim(ctx, fmt.Sprintf("k%d", i), fmt.Sprintf("tok-%d", i), []byte("rec"), time.Minute)
			results[i] <- result{r, err}
		}()
	}
	waitUntil(t, "20 queued calls", func() bool { return queued(s) == n })
	h.mu.Lock()
	h.hold = nil
	h.mu.Unlock()
	close(hold)
	if err := <-first; err != nil {
		t.Fatalf("first claim: %v", err)
	}
	fences := map[uint64]bool{}
	for i, ch := range results {
		r := <-ch
		if r.err != nil || !r.res.Claimed {
			t.Fatalf("claim %d: %+v, %v", i, r.res, r.err)
		}
		fences[r.res.Fence] = true
	}
	// Each call got its own reply: claiming its key again from another
	// token finds it taken.
	for i := range n {
		r, err := s.Claim(ctx, fmt.Sprintf("k%d", i), "someone-else", []byte("rec"), time.Minute)
		if err != nil || r.Claimed || r.Record == nil {
			t.Fatalf("k%d claimed again by another token: %+v, %v", i, r, err)
		}
	}
	sizes, singles, _ := h.snapshot()
	if len(sizes) < 2 || sizes[0] != 1 || sizes[1] != n {
		t.Fatalf("pipelines of %v commands, want [1 %d ...]: the queued calls were not sent together", sizes, n)
	}
	if singles != 0 {
		t.Fatalf("%d script calls were sent on their own", singles)
	}
}

// A call whose context ends while it is queued returns at once, and its
// script is never sent.
func TestPipelineAbandonedCallIsNotSent(t *testing.T) {
	h := &pipelineHook{}
	s, m := pipelinedStore(t, h, 1)
	loadClaimScript(t, s)
	hold := h.holdFromNow()
	first := make(chan error, 1)
	go func() {
		_, err := s.Claim(context.Background(), "first", "tok-first", []byte("rec"), time.Minute)
		first <- err
	}()
	<-h.held

	ctx, cancel := context.WithCancel(context.Background())
	gone := make(chan error, 1)
	go func() {
		_, err := s.Claim(ctx, "abandoned", "tok-a", []byte("rec"), time.Minute)
		gone <- err
	}()
	waitUntil(t, "the call to queue", func() bool { return queued(s) == 1 })
	cancel()
	// It returns while the pipeline ahead of it is still held: its wait
	// is bounded by its own context, not by the store.
	if err := <-gone; !errors.Is(err, context.Canceled) {
		t.Fatalf("abandoned claim: %v, want context.Canceled", err)
	}
	if q := queued(s); q != 0 {
		t.Fatalf("%d calls still queued after the caller left", q)
	}
	close(hold)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	// Another pipeline would have been needed to send it.
	waitUntil(t, "the sender to go idle", func() bool {
		s.pipe.mu.Lock()
		defer s.pipe.mu.Unlock()
		return s.pipe.idle == s.pipe.senders
	})
	if m.Exists(DefaultKeyPrefix + "abandoned") {
		t.Fatal("the abandoned claim was sent and applied")
	}
	if sizes, _, _ := h.snapshot(); len(sizes) != 1 {
		t.Fatalf("pipelines %v: the abandoned call was sent", sizes)
	}
}

// No more pipelines than WithPipelining's n are in flight, and every one
// of many concurrent calls gets its own reply.
func TestPipelineBoundsPipelinesInFlight(t *testing.T) {
	h := &pipelineHook{}
	s, _ := pipelinedStore(t, h, 3)
	ctx := context.Background()
	const n = 400
	var wg sync.WaitGroup
	var wrong atomic.Int64
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key, tok := fmt.Sprintf("k%d", i), fmt.Sprintf("tok-%d", i)
			r, err := s.Claim(ctx, key, tok, []byte("rec"), time.Minute)
			if err != nil || !r.Claimed {
				wrong.Add(1)
				return
			}
			if err := s.Complete(ctx, key, tok, []byte("done"), time.Hour); err != nil {
				wrong.Add(1)
			}
			// The completed record comes back to a repeat.
			r, err = s.Claim(ctx, key, "tok-repeat", []byte("rec"), time.Minute)
			if err != nil || r.Claimed || string(r.Record) != "done" {
				wrong.Add(1)
			}
		}()
	}
	wg.Wait()
	if w := wrong.Load(); w != 0 {
		t.Fatalf("%d of %d calls got a wrong answer", w, n)
	}
	sizes, _, maxFlight := h.snapshot()
	total := 0
	for _, n := range sizes {
		total += n
	}
	if total != 3*n {
		t.Fatalf("%d script calls sent in pipelines, want %d", total, 3*n)
	}
	if maxFlight > 3 {
		t.Fatalf("%d pipelines in flight at once, want at most 3", maxFlight)
	}
}

// Scripts missing from Redis's cache (a restart, SCRIPT FLUSH) are sent
// again with EVAL, which loads them.
func TestPipelineLoadsScriptsAgain(t *testing.T) {
	h := &pipelineHook{}
	s, _ := pipelinedStore(t, h, 2)
	ctx := context.Background()
	for round := range 3 {
		if _, err := s.client.(*redis.Client).ScriptFlush(ctx).Result(); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 10)
		for i := range 10 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := s.Claim(ctx, fmt.Sprintf("r%d-%d", round, i), "tok", []byte("rec"), time.Minute)
				if err == nil && !r.Claimed {
					err = fmt.Errorf("not claimed: %+v", r)
				}
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("round %d after SCRIPT FLUSH: %v", round, err)
			}
		}
	}
}

// WithPipelining(0) sends each script call on its own.
func TestPipeliningOff(t *testing.T) {
	h := &pipelineHook{}
	s, _ := pipelinedStore(t, h, 0)
	if s.pipe != nil {
		t.Fatal("WithPipelining(0) built a pipeline")
	}
	ctx := context.Background()
	if _, err := s.Claim(ctx, "k", "tok", []byte("rec"), time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, "k", "tok", []byte("done"), time.Hour); err != nil {
		t.Fatal(err)
	}
	sizes, singles, _ := h.snapshot()
	if len(sizes) != 0 || singles != 2 {
		t.Fatalf("pipelines %v and %d single script calls, want none and 2", sizes, singles)
	}
	defer func() {
		if v := recover(); v == nil || !strings.Contains(fmt.Sprint(v), "WithPipelining") {
			t.Fatalf("WithPipelining(-1) panicked with %v, want a message naming the option", v)
		}
	}()
	WithPipelining(-1)
}

// With acknowledgements a plain client's calls are pipelined, each
// pipeline ending with the WAIT; a Cluster's or a Ring's are not, since
// their WAIT must reach each key's own node.
func TestPipeliningWithAcks(t *testing.T) {
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer c.Close()
	if s := NewRedisStore(c, WithReplicaAcks(1, time.Second), WithRedisLogger(nil)); s.ackedPipe == nil || s.ackedPipe.acks.none() || s.pipe == nil || !s.pipe.acks.none() {
		t.Fatal("WithReplicaAcks on a client: want the acknowledged writes pipelined with their WAIT, the rest without")
	}
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}})
	defer cc.Close()
	if s := NewRedisStore(cc, WithReplicaAcks(1, time.Second), WithRedisLogger(nil)); s.ackedPipe != nil {
		t.Fatal("WithReplicaAcks on a Cluster built a shared acknowledged pipeline")
	}
	if s := NewRedisStore(cc, WithRedisLogger(nil)); s.pipe == nil {
		t.Fatal("a Cluster without acknowledgements is not pipelined")
	}
	r := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}})
	defer r.Close()
	if s := NewRedisStore(r, WithFsyncAcks(0, time.Second), WithRedisLogger(nil)); s.ackedPipe != nil {
		t.Fatal("WithFsyncAcks on a Ring built a shared acknowledged pipeline")
	}
}

// A panic inside the client while a pipeline is sent reaches every caller
// of that pipeline as an error, and the store keeps working.
func TestPipelinePanicIsAnError(t *testing.T) {
	h := &pipelineHook{panicNext: true}
	s, _ := pipelinedStore(t, h, 1)
	ctx := context.Background()
	if _, err := s.Claim(ctx, "k", "tok", []byte("rec"), time.Minute); err == nil || !strings.Contains(err.Error(), "panicked") {
		t.Fatalf("claim through a panicking pipeline: %v, want an error saying it panicked", err)
	}
	if r, err := s.Claim(ctx, "k2", "tok", []byte("rec"), time.Minute); err != nil || !r.Claimed {
		t.Fatalf("claim after the panic: %+v, %v", r, err)
	}
}

// A hung server (accepts, never answers) holds no call past its context,
// with a client that does not honour context deadlines itself.
func TestPipelineHungServerBoundedByContext(t *testing.T) {
	c := redis.NewClient(&redis.Options{Addr: silentRedis(t), ReadTimeout: time.Hour, WriteTimeout: time.Hour, MaxRetries: -1, Protocol: 2})
	defer c.Close()
	s := NewRedisStore(c, WithRedisLogger(nil))
	var wg sync.WaitGroup
	for i := range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			if _, err := s.Claim(ctx, fmt.Sprintf("k%d", i), "tok", []byte("rec"), time.Minute); !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("claim %d on a hung server: %v, want DeadlineExceeded", i, err)
			}
		}()
	}
	wg.Wait() // would hang for an hour (ReadTimeout) if the wait were not bounded
	if q := queued(s); q != 0 {
		t.Fatalf("%d abandoned calls left queued", q)
	}
}

// A sender with nothing to send ends after senderLinger: a store leaves
// no goroutine behind once idle.
func TestPipelineSendersEndWhenIdle(t *testing.T) {
	h := &pipelineHook{}
	s, _ := pipelinedStore(t, h, 2)
	if _, err := s.Claim(context.Background(), "k", "tok", []byte("rec"), time.Minute); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the senders to end", func() bool {
		s.pipe.mu.Lock()
		defer s.pipe.mu.Unlock()
		return s.pipe.senders == 0 && s.pipe.idle == 0
	})
	// And a later call starts one again.
	if r, err := s.Claim(context.Background(), "k2", "tok", []byte("rec"), time.Minute); err != nil || !r.Claimed {
		t.Fatalf("claim after the senders ended: %+v, %v", r, err)
	}
}

// A pipeline carries at most maxPipelineCalls calls and, beyond its first
// call, at most maxPipelineBytes of arguments: the rest go in the next.
func TestPipelineSplitsLongQueues(t *testing.T) {
	h := &pipelineHook{}
	s, _ := pipelinedStore(t, h, 1)
	loadClaimScript(t, s)
	ctx := context.Background()
	for _, tc := range []struct {
		name      string
		calls     int
		record    []byte
		wantSizes []int // after the held pipeline of 1
	}{
		{"many small", maxPipelineCalls + 2, []byte("rec"), []int{maxPipelineCalls, 2}},
		{"large", 3, make([]byte, 600<<10), []int{1, 1, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hold := h.holdFromNow()
			var wg sync.WaitGroup
			errs := make(chan error, tc.calls+1)
			claim := func(key string, record []byte) {
				defer wg.Done()
				r, err := s.Claim(ctx, key, "tok", record, time.Minute)
				if err == nil && !r.Claimed {
					err = fmt.Errorf("%s not claimed", key)
				}
				errs <- err
			}
			wg.Add(1)
			go claim(tc.name+"-held", []byte("rec"))
			<-h.held
			for i := range tc.calls {
				wg.Add(1)
				go claim(fmt.Sprintf("%s-%d", tc.name, i), tc.record)
			}
			waitUntil(t, "the calls to queue", func() bool { return queued(s) == tc.calls })
			h.mu.Lock()
			h.hold = nil
			h.mu.Unlock()
			close(hold)
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			sizes, _, _ := h.snapshot()
			if want := append([]int{1}, tc.wantSizes...); !slices.Equal(sizes, want) {
				t.Fatalf("pipelines of %v calls, want %v", sizes, want)
			}
		})
	}
}

// queueClaims starts a claim of each key through s while a pipeline is
// held, waits until all are queued behind it, releases the pipelines and
// returns each claim's error.
func queueClaims(t *testing.T, s *RedisStore, h *pipelineHook, keys []string) []error {
	t.Helper()
	hold := h.holdFromNow()
	ctx := context.Background()
	errs := make([]error, len(keys)+1)
	var wg sync.WaitGroup
	claim := func(i int, key string) {
		defer wg.Done()
		r, err := s.Claim(ctx, key, "tok-"+key, []byte("rec"), time.Minute)
		if err == nil && !r.Claimed {
			err = fmt.Errorf("%s not claimed: %+v", key, r)
		}
		errs[i] = err
	}
	wg.Add(1)
	go claim(len(keys), keys[0]+"-held")
	<-h.held
	for i, k := range keys {
		wg.Add(1)
		go claim(i, k)
	}
	waitUntil(t, "the claims to queue", func() bool { return queued(s) == len(keys) })
	h.mu.Lock()
	h.hold = nil
	h.mu.Unlock()
	close(hold)
	wg.Wait()
	return errs[:len(keys)]
}

// With WithReplicaAcks on a real replica, the claims of one pipeline share
// one WAIT, and each is on the replica when its caller gets it; with the
// replica stopped, every claim of a pipeline is refused as not replicated
// and released.
func TestPipelinedAcksOnARealReplica(t *testing.T) {
	t.Parallel() // its own master and replica; it mostly waits on them
	p := newReplicaPair(t)
	c := redis.NewClient(&redis.Options{Addr: p.master.Addr, ContextTimeoutEnabled: true})
	h := &pipelineHook{}
	c.AddHook(h)
	t.Cleanup(func() { c.Close() })
	prefix := "acks:" + t.Name() + ":"
	s := NewRedisStore(c, WithKeyPrefix(prefix), WithPipelining(1), WithReplicaAcks(1, 500*time.Millisecond), WithRedisLogger(nil))
	s.pipe.alone, s.ackedPipe.alone = nil, nil
	loadClaimScript(t, s)
	ctx := context.Background()

	keys := make([]string, 20)
	for i := range keys {
		keys[i] = fmt.Sprintf("acked-%d", i)
	}
	for i, err := range queueClaims(t, s, h, keys) {
		if err != nil {
			t.Fatalf("claim %s: %v", keys[i], err)
		}
	}
	if sizes, _, _ := h.snapshot(); !slices.Equal(sizes, []int{1, len(keys)}) {
		t.Fatalf("pipelines of %v claims, want [1 %d]", sizes, len(keys))
	}
	h.mu.Lock()
	waits := slices.Clone(h.waits)
	h.mu.Unlock()
	if !slices.Equal(waits, []int{1, 1}) {
		t.Fatalf("WAITs per pipeline %v, want one each", waits)
	}
	for _, k := range keys {
		// No polling: each caller got its claim after the WAIT counted
		// the replica.
		if n, err := p.replicaRDB.Exists(ctx, prefix+k).Result(); err != nil || n != 1 {
			t.Fatalf("the replica lacks %s after its claim returned: %d, %v", k, n, err)
		}
	}

	p.freeze(t)
	refused := make([]string, 10)
	for i := range refused {
		refused[i] = fmt.Sprintf("unacked-%d", i)
	}
	for i, err := range queueClaims(t, s, h, refused) {
		if !errors.Is(err, ErrNotReplicated) {
			t.Fatalf("claim %s with the replica stopped: %v, want ErrNotReplicated", refused[i], err)
		}
		if n := p.masterRDB.Exists(ctx, prefix+refused[i]).Val(); n != 0 {
			t.Fatalf("the unreplicated claim %s was left on the master", refused[i])
		}
	}
}

// A call with nothing else in flight is sent alone from its caller's
// goroutine; a call that comes while it is in flight is queued and sent by
// a sender.
func TestPipelineLoneCallGoesAlone(t *testing.T) {
	for _, acked := range []bool{false, true} {
		t.Run(fmt.Sprintf("acks=%v", acked), func(t *testing.T) {
			m := miniredis.RunT(t)
			c := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
			h := &holdOnce{}
			c.AddHook(h)
			t.Cleanup(func() { c.Close() })
			opts := []RedisOption{WithPipelining(2), WithRedisLogger(nil)}
			if acked {
				opts = append(opts, WithReplicaAcks(1, 10*time.Millisecond))
			}
			s := NewRedisStore(c, opts...)
			p := s.pipe
			if acked {
				p = s.ackedPipe
			}
			ctx := context.Background()
			claim := func(key string) error {
				r, err := s.Claim(ctx, key, "tok-"+key, []byte("rec"), time.Minute)
				if acked && errors.Is(err, ErrNotReplicated) {
					return nil // miniredis has no replica: sent, then refused
				}
				if err == nil && !r.Claimed {
					err = fmt.Errorf("%s not claimed", key)
				}
				return err
			}
			sentBySenders := func() int {
				p.mu.Lock()
				defer p.mu.Unlock()
				return p.queuedSent
			}
			if err := claim("lone"); err != nil {
				t.Fatal(err)
			}
			if n := sentBySenders(); n != 0 {
				t.Fatalf("a lone call was queued for a sender (%d sent so)", n)
			}
			// Hold the next lone call in the hook; one made meanwhile is
			// queued and sent by a sender.
			held, release := h.holdNext()
			first := make(chan error, 1)
			go func() { first <- claim("held") }()
			<-held
			if err := claim("meanwhile"); err != nil {
				t.Fatal(err)
			}
			if n := sentBySenders(); n != 1 {
				t.Fatalf("%d calls sent by senders, want 1: the call made meanwhile", n)
			}
			close(release)
			if err := <-first; err != nil {
				t.Fatal(err)
			}
			p.mu.Lock()
			solo := p.solo
			// As if the last pipeline had been shared: the next lone call
			// is queued for a sender too.
			p.lastBatch = 5
			p.mu.Unlock()
			if solo {
				t.Fatal("the lone call's turn did not end")
			}
			if err := claim("after-a-shared-pipeline"); err != nil {
				t.Fatal(err)
			}
			if n := sentBySenders(); n != 2 {
				t.Fatalf("%d calls sent by senders, want 2: after a shared pipeline, a lone call is queued", n)
			}
		})
	}
	// A client that does not honour contexts itself: a lone call is queued
	// too, since bounding it alone would cost a goroutine.
	m := miniredis.RunT(t)
	c := redis.NewClient(&redis.Options{Addr: m.Addr()})
	t.Cleanup(func() { c.Close() })
	s := NewRedisStore(c, WithRedisLogger(nil))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := s.Claim(ctx, "k", "tok", []byte("rec"), time.Minute); err != nil {
		t.Fatal(err)
	}
	s.pipe.mu.Lock()
	n := s.pipe.queuedSent
	s.pipe.mu.Unlock()
	if n != 1 {
		t.Fatalf("unbounded client: %d calls sent by senders, want 1", n)
	}
}

// holdOnce holds the next EVALSHA, sent alone or in a pipeline, until
// released.
type holdOnce struct {
	mu            sync.Mutex
	held, release chan struct{}
}

func (h *holdOnce) holdNext() (held, release chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.held, h.release = make(chan struct{}), make(chan struct{})
	return h.held, h.release
}

func (h *holdOnce) wait(cmds ...redis.Cmder) {
	for _, c := range cmds {
		if c.Name() != "evalsha" {
			continue
		}
		h.mu.Lock()
		held, release := h.held, h.release
		h.held, h.release = nil, nil
		h.mu.Unlock()
		if held != nil {
			close(held)
			<-release
		}
		return
	}
}

func (h *holdOnce) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *holdOnce) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.wait(cmd)
		return next(ctx, cmd)
	}
}

func (h *holdOnce) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.wait(cmds...)
		return next(ctx, cmds)
	}
}
