package idempotencypg

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// twoServers is servers A and B, each with a pool and a store of its own on
// one table, serving one Charge handler: it inserts a business row in the
// call's transaction (unless noWrite), counts an "external call" (a
// payment provider's), and runs during as that call's duration.
type twoServers struct {
	a, b    testingv1.TestServiceClient
	storeA  *Store
	pool    *pgxpool.Pool // the test's own
	charges string
	svc     testservice.Service
	noWrite bool
	// before runs in the handler before its first statement.
	before func()
	// copyFirst writes the row with COPY (BEGIN on its own) instead.
	copyFirst bool
	// during runs in the handler after its insert and the external call
	// began, with the PID of the call's database session.
	during func(ctx context.Context, n int64, pid uint32)
	// external counts the external calls; running and overlap count the
	// handlers running at once, and the most there ever were.
	external, running, overlap atomic.Int64
}

// newTwoServers starts the pair; configA tweaks A's pool (may be nil).
func newTwoServers(t *testing.T, configA func(*pgxpool.Config), opts ...idempotency.Option) *twoServers {
	t.Helper()
	first, pool := testStore(t)
	ts := &twoServers{pool: pool, charges: fmt.Sprintf("charges_%d", tables.Add(1))}
	_, err := pool.Exec(testCtx(t), `CREATE TABLE `+ts.charges+` (id bigserial PRIMARY KEY, amount bigint NOT NULL)`)
	require.NoError(t, err)
	ts.svc.OnCharge = func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
		if now := ts.running.Add(1); now > ts.overlap.Load() {
			ts.overlap.Store(now)
		}
		defer ts.running.Add(-1)
		tx := Tx(ctx)
		id := int64(0)
		if ts.before != nil {
			ts.before()
		}
		if ts.copyFirst {
			if _, err := tx.CopyFrom(ctx, pgx.Identifier{ts.charges}, []string{"amount"}, pgx.CopyFromRows([][]any{{req.GetAmount()}})); err != nil {
				return nil, status.Errorf(codes.Internal, "copy: %v", err)
			}
		} else if !ts.noWrite {
			if err := tx.QueryRow(ctx, `INSERT INTO `+ts.charges+` (amount) VALUES ($1) RETURNING id`, req.GetAmount()).Scan(&id); err != nil {
				return nil, status.Errorf(codes.Internal, "insert: %v", err)
			}
		}
		ts.external.Add(1)
		if ts.during != nil {
			ts.during(ctx, n, tx.Conn().PgConn().PID())
		}
		return &testingv1.ChargeResponse{ChargeId: fmt.Sprintf("ch_%d_%d", n, id)}, nil
	}
	table := strings.Join(first.table, ".")
	serve := func(config func(*pgxpool.Config)) (*Store, testingv1.TestServiceClient) {
		p := pgtestPoolWith(t, config)
		s, err := New(testCtx(t), p, WithTable(table))
		require.NoError(t, err)
		lis := testservice.Serve(t, &ts.svc, grpc.ChainUnaryInterceptor(idempotency.UnaryServerInterceptor(s, opts...)))
		return s, testservice.Dial(t, lis)
	}
	ts.storeA, ts.a = serve(configA)
	_, ts.b = serve(nil)
	return ts
}

func pgtestPoolWith(t *testing.T, config func(*pgxpool.Config)) *pgxpool.Pool {
	return pgtest.Shared(t).Pool(t, func(c *pgxpool.Config) {
		c.MaxConns = 24
		if config != nil {
			config(c)
		}
	})
}

// gate is a channel a handler waits on, closed by unblock or, at the
// latest, when the test ends (before its servers stop).
func gate(t *testing.T) (<-chan struct{}, func()) {
	c := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(c) }) }
	t.Cleanup(unblock)
	return c, unblock
}

func (ts *twoServers) charge(ctx context.Context, c testingv1.TestServiceClient, key string) (*testingv1.ChargeResponse, metadata.MD, error) {
	var header metadata.MD
	resp, err := c.Charge(metadata.AppendToOutgoingContext(ctx, "idempotency-key", key), &testingv1.ChargeRequest{Amount: 10}, grpc.Header(&header))
	return resp, header, err
}

func (ts *twoServers) rows(t *testing.T) int {
	t.Helper()
	var n int
	require.NoError(t, ts.pool.QueryRow(testCtx(t), `SELECT count(*) FROM `+ts.charges).Scan(&n))
	return n
}

// sessionGone waits until the backend pid has exited.
// terminateSession ends the backend pid (as an idle timeout or a proxy
// dropping the connection would) and waits until it is gone.
func terminateSession(t *testing.T, pool *pgxpool.Pool, pid uint32) {
	t.Helper()
	var ok bool
	if err := pool.QueryRow(context.Background(), `SELECT pg_terminate_backend($1)`, int64(pid)).Scan(&ok); err != nil || !ok {
		t.Errorf("terminate %d: %v %v", pid, ok, err)
	}
	sessionGone(t, pool, pid)
}

func sessionGone(t *testing.T, pool *pgxpool.Pool, pid uint32) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var alive bool
		require.NoError(t, pool.QueryRow(testCtx(t), `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)`, int64(pid)).Scan(&alive))
		if !alive {
			return
		}
		require.True(t, time.Now().Before(deadline), "session %d never ended", pid)
		time.Sleep(5 * time.Millisecond)
	}
}

// Issue 27 item 4, as reported: a server whose idle_in_transaction_session_timeout
// (300ms) is shorter than the handler's external call (1.5s, after its
// insert). A duplicate on server B 0.6s into A's 30s lease must not run
// the handler, and A's outcome must commit: one external call, one row,
// and the retry replays.
func TestTxIdleInTransactionTimeoutNeitherDuplicatesNorLosesTheCall(t *testing.T) {
	t.Parallel()
	ts := newTwoServers(t, func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["idle_in_transaction_session_timeout"] = "300"
	})
	inserted := make(chan struct{})
	ts.during = func(_ context.Context, n int64, _ uint32) {
		if n == 1 {
			close(inserted)
			time.Sleep(1500 * time.Millisecond) // the external call
		}
	}
	ctx := testCtx(t)
	type result struct {
		resp *testingv1.ChargeResponse
		err  error
	}
	done := make(chan result, 1)
	go func() {
		resp, _, err := ts.charge(ctx, ts.a, "idle-tx")
		done <- result{resp, err}
	}()
	<-inserted
	time.Sleep(600 * time.Millisecond) // twice the idle timeout
	_, _, err := ts.charge(ctx, ts.b, "idle-tx")
	if err != nil {
		require.Equal(t, codes.Aborted, status.Code(err), "the duplicate on B: %v", err)
		require.Equal(t, idempotency.ReasonInProgress, idempotency.ReasonOf(err))
	}
	first := <-done
	require.NoError(t, first.err, "A's call: its transaction must survive the idle timeout")
	again, h, err := ts.charge(ctx, ts.b, "idle-tx")
	require.NoError(t, err)
	require.Equal(t, []string{"true"}, h.Get(idempotency.ReplayedHeader))
	require.Equal(t, first.resp.GetChargeId(), again.GetChargeId())
	require.EqualValues(t, 1, ts.external.Load(), "external calls")
	require.Equal(t, 1, ts.rows(t), "business rows")
}

// A live owner whose database session died mid-call (here terminated, as a
// proxy or firewall dropping an idle connection would) keeps its key while
// it renews its lease: duplicates on another server are refused until it
// answers. Its transaction was rolled back with the session, so it answers
// OUTCOME_NOT_COMMITTED and frees the key; the retry then runs once. Never
// two handlers at once, one business row in all.
func TestTxLiveOwnerWhoseSessionDiedKeepsItsKey(t *testing.T) {
	ts := newTwoServers(t, nil)
	release, unblock := gate(t)
	killed := make(chan struct{})
	ts.during = func(_ context.Context, n int64, pid uint32) {
		if n == 1 {
			terminateSession(t, ts.pool, pid)
			close(killed)
			<-release
		}
	}
	ctx := testCtx(t)
	done := make(chan error, 1)
	go func() {
		_, _, err := ts.charge(ctx, ts.a, "dropped")
		done <- err
	}()
	<-killed
	for i := range 5 {
		_, _, err := ts.charge(ctx, ts.b, "dropped")
		require.Equal(t, codes.Aborted, status.Code(err), "duplicate %d on B, while A runs with its session gone: %v", i, err)
	}
	unblock()
	err := <-done
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	require.Equal(t, idempotency.ReasonNotCommitted, idempotency.ReasonOf(err))
	require.Equal(t, 0, ts.rows(t), "A's row outlived its session")
	_, _, err = ts.charge(ctx, ts.b, "dropped")
	require.NoError(t, err, "the retry")
	require.Equal(t, 1, ts.rows(t), "business rows")
	require.EqualValues(t, 2, ts.svc.Runs.Load(), "A's run, whose transaction died, and the retry's")
	require.EqualValues(t, 1, ts.overlap.Load(), "handlers running at once")
}

// A handler that writes nothing through Tx(ctx) has nothing to roll back:
// when its session dies while it runs, its outcome is still stored (through
// another connection, fenced on its token) and replayed, never run again.
func TestTxSessionDeathWithoutWritesStillStoresTheOutcome(t *testing.T) {
	ts := newTwoServers(t, nil)
	ts.noWrite = true
	ts.during = func(_ context.Context, n int64, pid uint32) {
		terminateSession(t, ts.pool, pid)
	}
	ctx := testCtx(t)
	first, _, err := ts.charge(ctx, ts.a, "no-writes")
	require.NoError(t, err)
	again, h, err := ts.charge(ctx, ts.b, "no-writes")
	require.NoError(t, err)
	require.Equal(t, []string{"true"}, h.Get(idempotency.ReplayedHeader))
	require.Equal(t, first.GetChargeId(), again.GetChargeId())
	require.EqualValues(t, 1, ts.external.Load(), "external calls")
}

// The same as TestTxLiveOwnerWhoseSessionDiedKeepsItsKey in real time
// across renewals: a 3s lease renewed every second by A, whose session is
// gone, while B tries the key every 50ms for 4.5s (past one and a half
// leases). B must never run it.
func TestTxLiveOwnerWhoseSessionDiedKeepsItsKeyAcrossRenewals(t *testing.T) {
	skipUnlessLong(t)
	ts := newTwoServers(t, nil, idempotency.WithLease(3*time.Second))
	release, unblock := gate(t)
	killed := make(chan struct{})
	ts.during = func(_ context.Context, n int64, pid uint32) {
		if n == 1 {
			terminateSession(t, ts.pool, pid)
			close(killed)
			<-release
		}
	}
	ctx := testCtx(t)
	done := make(chan error, 1)
	go func() {
		_, _, err := ts.charge(ctx, ts.a, "renewing")
		done <- err
	}()
	<-killed
	tries := 0
	for end := time.Now().Add(4500 * time.Millisecond); time.Now().Before(end); tries++ {
		_, _, err := ts.charge(ctx, ts.b, "renewing")
		require.Equal(t, codes.Aborted, status.Code(err), "duplicate %d on B: %v", tries, err)
		time.Sleep(50 * time.Millisecond)
	}
	unblock()
	require.Equal(t, codes.Unavailable, status.Code(<-done))
	require.EqualValues(t, 1, ts.svc.Runs.Load(), "runs while A held the key")
	t.Logf("%d duplicates on B refused over 4.5s while A renewed a 3s lease with its session gone", tries)
}

// Calls in flight that hold every connection of the pool must not starve
// their own lease renewals (which need a connection too): a pool of 2, two
// slow calls on server A with a 1.5s lease, and duplicates on B for 2.5s,
// past one and a half leases, of the one whose handler runs. None may run.
// A's other call waits for a connection until the first ends; by then its
// claim may be too old for the interceptor to trust its lease (it answers
// STORE_UNAVAILABLE, nothing run) or it runs: never twice.
func TestTxFullPoolDoesNotStarveTheRenewals(t *testing.T) {
	t.Parallel()
	ts := newTwoServers(t, func(c *pgxpool.Config) { c.MaxConns = 2 }, idempotency.WithLease(1500*time.Millisecond))
	release, unblock := gate(t)
	started := make(chan string, 3)
	var first sync.Map
	ts.during = func(ctx context.Context, _ int64, _ uint32) {
		key, _ := idempotency.KeyFromContext(ctx)
		if _, again := first.LoadOrStore(key, true); !again {
			started <- key
			<-release
		}
	}
	ctx := testCtx(t)
	done := make(chan error, 2)
	for _, key := range []string{"full-1", "full-2"} {
		go func() {
			_, _, err := ts.charge(ctx, ts.a, key)
			done <- err
		}()
	}
	key := <-started
	tries := 0
	for end := time.Now().Add(2500 * time.Millisecond); time.Now().Before(end); tries++ {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, _, err := ts.charge(cctx, ts.b, key)
		cancel()
		if status.Code(err) != codes.Aborted {
			unblock()
			t.Fatalf("duplicate %d of %s on B, while A runs it: %v", tries, key, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	unblock()
	ok := 0
	for range 2 {
		if err := <-done; err == nil {
			ok++
		} else {
			require.Equal(t, idempotency.ReasonStoreUnavailable, idempotency.ReasonOf(err), "%v", err)
		}
	}
	require.GreaterOrEqual(t, ok, 1, "the call that held its key answered")
	require.EqualValues(t, ok, ts.svc.Runs.Load(), "runs")
	require.Equal(t, ok, ts.rows(t), "business rows")
	t.Logf("%d duplicates on B refused; %d of A's 2 calls ran", tries, ok)
}

// Two owners for one key while the first one's transaction is still open:
// A's lease ends (moved into the past by hand) after its handler wrote its
// row, and B claims the key at the same moment as A commits. Whichever way
// each race goes, exactly one of them commits, its row and its outcome
// together; the other's row vanishes.
func TestTxTakeoverWhileTheFirstTransactionIsOpenCommitsOnce(t *testing.T) {
	s, pool := testStore(t)
	ctx := testCtx(t)
	charges := fmt.Sprintf("charges_%d", tables.Add(1))
	_, err := pool.Exec(ctx, `CREATE TABLE `+charges+` (key text NOT NULL, owner text NOT NULL)`)
	require.NoError(t, err)
	run := func(ex idempotency.Execution, key, owner string) error {
		hctx, err := ex.Begin(ctx)
		require.NoError(t, err)
		_, err = Tx(hctx).Exec(hctx, `INSERT INTO `+charges+` VALUES ($1, $2)`, key, owner)
		require.NoError(t, err)
		return ex.Commit(ctx, []byte(owner), time.Hour)
	}
	won := map[string]int{}
	for i := range 40 {
		key := fmt.Sprintf("%064x", 5000+i)
		res, a, err := s.ClaimTx(ctx, key, "A", []byte("in progress"), time.Hour)
		require.NoError(t, err)
		require.True(t, res.Claimed)
		hctx, err := a.Begin(ctx)
		require.NoError(t, err)
		_, err = Tx(hctx).Exec(hctx, `INSERT INTO `+charges+` VALUES ($1, 'A')`, key)
		require.NoError(t, err)
		_, err = pool.Exec(ctx, `UPDATE `+s.table.Sanitize()+` SET expires_at = statement_timestamp() - interval '1 millisecond' WHERE key = $1`, key)
		require.NoError(t, err)

		var wg sync.WaitGroup
		var aErr, bErr error
		bClaimed := false
		wg.Go(func() { aErr = a.Commit(ctx, []byte("A"), time.Hour) })
		wg.Go(func() {
			res, b, err := s.ClaimTx(ctx, key, "B", []byte("in progress"), time.Hour)
			if err != nil || !res.Claimed {
				bErr = err
				return
			}
			bClaimed = true
			bErr = run(b, key, "B")
		})
		wg.Wait()
		require.NoError(t, bErr)
		var owners []string
		rows, err := pool.Query(ctx, `SELECT owner FROM `+charges+` WHERE key = $1`, key)
		require.NoError(t, err)
		for rows.Next() {
			var o string
			require.NoError(t, rows.Scan(&o))
			owners = append(owners, o)
		}
		require.NoError(t, rows.Err())
		require.Len(t, owners, 1, "key %d: business rows of %v (A's commit: %v, B claimed: %v)", i, owners, aErr, bClaimed)
		record, _, err := s.Get(ctx, key)
		require.NoError(t, err)
		require.Equal(t, owners[0], string(record), "key %d: the outcome is not the committed row's owner's", i)
		if owners[0] == "A" {
			require.NoError(t, aErr)
		} else {
			require.ErrorIs(t, aErr, idempotency.ErrLeaseLost)
		}
		won[owners[0]]++
	}
	t.Logf("A committed %d keys, B %d", won["A"], won["B"])
}

// A session that dies before the handler's first statement (here
// idle_session_timeout, 300ms, while the handler calls out for 1s first)
// held nothing but the claim's lock: no transaction had begun. The
// handler's transaction then begins on a new connection, and the call
// commits as if nothing happened; a duplicate on B meanwhile is refused.
//
// It stays serial: side by side with other tests under -race, A's call
// once in 20 runs never reached its handler (likely cause: A's sessions
// end after 300ms idle, and pgxpool checks only connections idle for a
// second before handing one out, so a busy machine's slow setup leaves A a
// connection the server has ended).
func TestTxSessionDeadBeforeTheFirstStatementIsReplaced(t *testing.T) {
	for _, first := range []string{"insert", "copy"} {
		t.Run(first, func(t *testing.T) { testSessionDeadBeforeTheFirstStatement(t, first == "copy") })
	}
}

func testSessionDeadBeforeTheFirstStatement(t *testing.T, copyFirst bool) {
	ts := newTwoServers(t, func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["idle_session_timeout"] = "300"
	})
	ts.copyFirst = copyFirst
	waiting := make(chan struct{})
	ts.before = func() {
		close(waiting)
		time.Sleep(time.Second) // the external call, before any write
	}
	ctx := testCtx(t)
	done := make(chan error, 1)
	go func() {
		_, _, err := ts.charge(ctx, ts.a, "idle-session")
		done <- err
	}()
	select {
	case <-waiting:
	case err := <-done:
		t.Fatalf("A's call ended before its handler ran: %v", err)
	}
	time.Sleep(600 * time.Millisecond) // twice the idle timeout
	_, _, err := ts.charge(ctx, ts.b, "idle-session")
	require.Equal(t, codes.Aborted, status.Code(err), "the duplicate on B: %v", err)
	require.NoError(t, <-done, "A's call")
	_, h, err := ts.charge(ctx, ts.b, "idle-session")
	require.NoError(t, err)
	require.Equal(t, []string{"true"}, h.Get(idempotency.ReplayedHeader))
	require.EqualValues(t, 1, ts.external.Load(), "external calls")
	require.Equal(t, 1, ts.rows(t), "business rows")
}
