package idempotencypg

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestStormPrimaryFailover runs a storm across a Postgres failover: a
// primary with one streaming standby, 3 gRPC servers each with its own
// pool and store on a connection string that names both hosts with
// target_session_attrs=read-write, and a handler that inserts a business
// row in the call's transaction. A quarter of the way in, the primary's
// whole process group is SIGKILLed (the machine is lost), the standby is
// promoted (pg_ctl promote), and the retries go on against it. At the end
// it counts, per key, the business rows on the promoted standby and every
// answer the callers were given:
//
//   - duplicated: a key with more than one row;
//   - lost: a key answered OK with a charge whose row is not there (the
//     row and the outcome record vanished together);
//   - re-run: a key answered OK with two different charges, so the
//     handler's effect outside the database happened twice;
//   - reissued: a lost charge's id that the promoted standby's sequence
//     gave to another key's row.
//
// Two shapes of fault, each with an asynchronous standby and with a
// synchronous one (synchronous_commit on, synchronous_standby_names '*'):
//
//   - "in sync": the standby streams the primary's WAL until the kill;
//   - "lagging": the replication link goes through a proxy that is
//     partitioned before the kill, so the primary goes on committing what
//     the standby never receives (a standby cut off or far behind).
//
// With a synchronous standby every figure is asserted zero; with an
// asynchronous one they are measured and logged.
func TestStormPrimaryFailover(t *testing.T) {
	skipUnlessLong(t)
	for _, tc := range []struct {
		name          string
		sync, lagging bool
	}{
		{"in sync/async standby", false, false},
		{"in sync/sync standby", true, false},
		{"lagging/async standby", false, true},
		{"lagging/sync standby", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := runFailoverStorm(t, tc.sync, tc.lagging)
			t.Logf("reliability: %s: %d calls over %d keys, %d handler executions; %d successes while the standby was cut off; primary killed at %d answers (down in %v), standby promoted %v after the kill, %d successes after; duplicated keys=%d lost-outcome keys=%d re-run (different-answer) keys=%d keys without a row=%d reissued charge ids=%d; events %s",
				t.Name(), r.calls, r.keys, r.executions, r.lagOK, r.killedAt, r.kill.Round(time.Millisecond), r.failover.Round(time.Millisecond), r.afterFailover,
				r.duplicated, r.lost, r.rerun, r.noRow, r.reissued, r.events)
			require.GreaterOrEqual(t, r.afterFailover, int64(50), "traffic did not resume on the promoted standby")
			if tc.sync {
				require.Zero(t, r.duplicated, "duplicated keys")
				require.Zero(t, r.lost, "keys whose acknowledged outcome was lost")
				require.Zero(t, r.rerun, "keys answered with two different charges")
				require.Zero(t, r.noRow, "keys without a row")
			}
		})
	}
}

// failoverRun is what one failover storm measured.
type failoverRun struct {
	calls, keys, executions int
	lagOK, afterFailover    int64
	killedAt                int64
	kill, failover          time.Duration
	duplicated, lost, rerun int
	noRow, reissued         int
	faultErr                error
	events                  string // outcomes the servers reported
}

func runFailoverStorm(t *testing.T, syncStandby, lagging bool) failoverRun {
	const servers, keys, repeats, callers = 3, 300, 4, 24
	primary := pgtest.StartPrimary(t)
	var link *linkProxy
	upstream := ""
	if lagging {
		link = newLinkProxy(t, fmt.Sprintf("127.0.0.1:%d", primary.Port))
		upstream = link.addr()
	}
	standby := primary.StartStandby(t, upstream)
	if syncStandby {
		primary.SyncStandby(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	setup := primary.Pool(t, nil)
	const table, charges = "failover_records", "failover_charges"
	require.NoError(t, CreateSchema(ctx, setup, WithTable(table)))
	_, err := setup.Exec(ctx, `CREATE TABLE `+charges+` (id bigserial PRIMARY KEY, key text NOT NULL)`)
	require.NoError(t, err)
	setup.Close()

	// Both hosts: the pools reconnect to whichever accepts writes.
	dsn := fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/postgres?sslmode=disable&target_session_attrs=read-write&connect_timeout=5",
		primary.Port, standby.Port)
	var runsMu sync.Mutex
	runs := map[string]int{}
	events := map[idempotency.Outcome]int{}
	observe := idempotency.WithObserver(func(_ context.Context, e idempotency.Event) {
		runsMu.Lock()
		events[e.Outcome]++
		runsMu.Unlock()
	})
	clients := make([]testingv1.TestServiceClient, servers)
	for i := range clients {
		cfg, err := pgxpool.ParseConfig(dsn)
		require.NoError(t, err)
		cfg.MaxConns = 32
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		require.NoError(t, err)
		t.Cleanup(pool.Close)
		store, err := New(ctx, pool, WithTable(table))
		require.NoError(t, err)
		svc := &testservice.Service{OnCharge: func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
			key, _ := idempotency.KeyFromContext(ctx)
			runsMu.Lock()
			runs[key]++
			runsMu.Unlock()
			var id int64
			if err := Tx(ctx).QueryRow(ctx, `INSERT INTO `+charges+` (key) VALUES ($1) RETURNING id`, key).Scan(&id); err != nil {
				return nil, status.Errorf(codes.Unavailable, "insert: %v", err)
			}
			switch rand.IntN(20) {
			case 0:
				return nil, status.Error(codes.Unavailable, "flaky provider") // released: runs again
			case 1:
				time.Sleep(time.Duration(rand.IntN(50)) * time.Millisecond)
			}
			return &testingv1.ChargeResponse{ChargeId: fmt.Sprintf("ch_%d", id)}, nil
		}}
		lis := testservice.Serve(t, svc, grpc.ChainUnaryInterceptor(idempotency.UnaryServerInterceptor(store, idempotency.WithLease(5*time.Second), observe)))
		clients[i] = testservice.Dial(t, lis)
	}

	plan := make([]int, 0, keys*repeats)
	for k := range keys {
		for range repeats {
			plan = append(plan, k)
		}
	}
	rand.Shuffle(len(plan), func(i, j int) { plan[i], plan[j] = plan[j], plan[i] })
	var mu sync.Mutex
	answers := map[string][]string{} // key -> charge ids answered OK
	var answered, ok atomic.Int64
	work := make(chan int)
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			for k := range work {
				key := fmt.Sprintf("failover-%03d", k)
				for {
					actx, acancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "idempotency-key", key), 30*time.Second)
					resp, err := clients[rand.IntN(servers)].Charge(actx, &testingv1.ChargeRequest{Amount: int64(k + 1)})
					acancel()
					code := status.Code(err)
					if code == codes.OK {
						mu.Lock()
						answers[key] = append(answers[key], resp.GetChargeId())
						mu.Unlock()
						ok.Add(1)
						break
					}
					if code != codes.Aborted && code != codes.Unavailable && code != codes.DeadlineExceeded {
						t.Errorf("%s: %v", key, err)
						break
					}
					if ctx.Err() != nil {
						t.Errorf("%s never got an answer: %v", key, err)
						break
					}
					time.Sleep(time.Duration(2+rand.IntN(10)) * time.Millisecond)
				}
				answered.Add(1)
			}
		})
	}

	var r failoverRun
	faultDone := make(chan struct{})
	go func() {
		defer close(faultDone)
		for answered.Load() < int64(len(plan)/4) && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond)
		}
		if lagging {
			// The primary goes on committing what the standby never gets
			// (with a synchronous standby, its commits wait instead).
			link.partition()
			okAt, cut := ok.Load(), time.Now()
			for ok.Load() < okAt+40 && time.Since(cut) < 2*time.Second {
				time.Sleep(5 * time.Millisecond)
			}
			r.lagOK = ok.Load() - okAt
		}
		r.killedAt = answered.Load()
		killed := time.Now()
		if r.faultErr = primary.Kill(); r.faultErr != nil {
			cancel() // the callers give up
			return
		}
		r.kill = time.Since(killed)
		if r.faultErr = standby.Promote(); r.faultErr != nil {
			cancel()
			return
		}
		r.failover = time.Since(killed)
		okAt := ok.Load()
		for ok.Load() < okAt+50 && answered.Load() < int64(len(plan)) && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond)
		}
		r.afterFailover = ok.Load() - okAt
	}()
	for _, k := range plan {
		work <- k
	}
	close(work)
	wg.Wait()
	<-faultDone
	require.NoError(t, r.faultErr)

	// The count, on the promoted standby.
	check := standby.Pool(t, nil)
	rowsOf := map[string]map[string]bool{} // key -> its charge ids
	owner := map[string]string{}           // charge id -> key
	rows, err := check.Query(ctx, `SELECT key, 'ch_' || id FROM `+charges)
	require.NoError(t, err)
	for rows.Next() {
		var key, id string
		require.NoError(t, rows.Scan(&key, &id))
		if rowsOf[key] == nil {
			rowsOf[key] = map[string]bool{}
		}
		rowsOf[key][id] = true
		owner[id] = key
	}
	require.NoError(t, rows.Err())
	r.calls, r.keys = len(plan), keys
	r.events = fmt.Sprintf("rolled_back=%d commit_unknown=%d lease_lost=%d store_unavailable=%d",
		events[idempotency.OutcomeRolledBack], events[idempotency.OutcomeCommitUnknown], events[idempotency.OutcomeLeaseLost], events[idempotency.OutcomeStoreUnavailable])
	for k := range keys {
		key := fmt.Sprintf("failover-%03d", k)
		list := answers[key]
		require.Len(t, list, repeats, "%s: answers", key)
		r.executions += runs[key]
		have := rowsOf[key]
		switch {
		case len(have) > 1:
			r.duplicated++
			t.Logf("%s: %d business rows %v", key, len(have), have)
		case len(have) == 0:
			r.noRow++
		}
		distinct := map[string]bool{}
		lost := false
		for _, id := range list {
			distinct[id] = true
			if !have[id] {
				lost = true
				if other, ok := owner[id]; ok {
					r.reissued++
					t.Logf("%s: acknowledged %s, which the promoted standby gave to %s", key, id, other)
				}
			}
		}
		if lost {
			r.lost++
		}
		if len(distinct) > 1 {
			r.rerun++
			t.Logf("%s: answered %v; rows %v", key, list, have)
		}
	}
	return r
}

// linkProxy forwards TCP connections (the standby's replication link) to
// upstream, and can partition them: from then on it holds every byte it
// reads, in both directions, as a network that drops the link would.
type linkProxy struct {
	lis      net.Listener
	upstream string
	mu       sync.Mutex
	cond     *sync.Cond
	cut      bool
	closed   bool
	conns    []net.Conn
}

func newLinkProxy(t *testing.T, upstream string) *linkProxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &linkProxy{lis: lis, upstream: upstream}
	p.cond = sync.NewCond(&p.mu)
	t.Cleanup(p.close)
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", upstream)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, s)
			p.mu.Unlock()
			go p.pipe(s, c)
			go p.pipe(c, s)
		}
	}()
	return p
}

func (p *linkProxy) addr() string { return p.lis.Addr().String() }

func (p *linkProxy) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			for p.cut && !p.closed {
				p.cond.Wait()
			}
			closed := p.closed
			p.mu.Unlock()
			if closed {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *linkProxy) partition() {
	p.mu.Lock()
	p.cut = true
	p.mu.Unlock()
}

func (p *linkProxy) close() {
	p.mu.Lock()
	p.closed = true
	p.cond.Broadcast()
	conns := p.conns
	p.mu.Unlock()
	p.lis.Close()
	for _, c := range conns {
		c.Close()
	}
}

// TestSyncStandbyDownClaimsWait verifies what a primary with a synchronous
// standby does while that standby is gone: every claim waits for it, a
// replay's included (the claim statement locks the row it finds, which
// makes it a write that waits for the standby like any commit), until the
// caller's deadline; only reads (Get) answer.
func TestSyncStandbyDownClaimsWait(t *testing.T) {
	skipUnlessLong(t)
	primary := pgtest.StartPrimary(t)
	standby := primary.StartStandby(t, "")
	primary.SyncStandby(t)
	pool := primary.Pool(t, nil)
	ctx := testCtx(t)
	require.NoError(t, CreateSchema(ctx, pool))
	store, err := New(ctx, pool)
	require.NoError(t, err)
	res, err := store.Claim(ctx, "done", "t1", nil, time.Minute)
	require.NoError(t, err)
	require.True(t, res.Claimed)
	require.NoError(t, store.Complete(ctx, "done", "t1", []byte("outcome"), time.Hour))

	require.NoError(t, standby.Kill())
	for _, key := range []string{"done", "new"} {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		start := time.Now()
		res, err := store.Claim(cctx, key, "t2", nil, time.Minute)
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded, "claim of %q answered %+v without the synchronous standby", key, res)
		require.GreaterOrEqual(t, time.Since(start), 900*time.Millisecond, "claim of %q failed before its deadline: %v", key, err)
	}
	rec, _, err := store.Get(ctx, "done")
	require.NoError(t, err)
	require.Equal(t, "outcome", string(rec))
}
