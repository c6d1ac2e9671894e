package idempotencypg

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// bank is a test server whose Charge writes a business row in the call's
// transaction.
type bank struct {
	store  *Store
	pool   *pgxpool.Pool
	table  string
	svc    *testservice.Service
	client testingv1.TestServiceClient
	events chan idempotency.Event
}

func newBank(t *testing.T, opts ...idempotency.Option) *bank {
	t.Helper()
	s, pool := testStore(t)
	b := &bank{store: s, pool: pool, svc: &testservice.Service{}, events: make(chan idempotency.Event, 100)}
	b.table = fmt.Sprintf("charges_%d", tables.Add(1))
	_, err := pool.Exec(testCtx(t), `CREATE TABLE `+b.table+` (id bigserial PRIMARY KEY, amount bigint NOT NULL)`)
	require.NoError(t, err)
	b.svc.OnCharge = func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
		tx := Tx(ctx)
		if tx == nil {
			return nil, status.Error(codes.Internal, "no transaction in the context")
		}
		var id int64
		if err := tx.QueryRow(ctx, `INSERT INTO `+b.table+` (amount) VALUES ($1) RETURNING id`, req.GetAmount()).Scan(&id); err != nil {
			return nil, status.Errorf(codes.Internal, "insert: %v", err)
		}
		return &testingv1.ChargeResponse{ChargeId: fmt.Sprintf("ch_%d", id)}, nil
	}
	opts = append([]idempotency.Option{idempotency.WithObserver(func(_ context.Context, e idempotency.Event) {
		select {
		case b.events <- e:
		default:
		}
	})}, opts...)
	lis := testservice.Serve(t, b.svc, grpc.ChainUnaryInterceptor(idempotency.UnaryServerInterceptor(s, opts...)))
	b.client = testservice.Dial(t, lis)
	return b
}

// rows counts the committed business rows.
func (b *bank) rows(t *testing.T) int {
	t.Helper()
	var n int
	require.NoError(t, b.pool.QueryRow(testCtx(t), `SELECT count(*) FROM `+b.table).Scan(&n))
	return n
}

func (b *bank) charge(ctx context.Context, key string, amount int64) (*testingv1.ChargeResponse, metadata.MD, error) {
	var header metadata.MD
	resp, err := b.client.Charge(metadata.AppendToOutgoingContext(ctx, "idempotency-key", key),
		&testingv1.ChargeRequest{Amount: amount}, grpc.Header(&header))
	return resp, header, err
}

// event waits for the next event with outcome o.
func (b *bank) event(t *testing.T, o idempotency.Outcome) idempotency.Event {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case e := <-b.events:
			if e.Outcome == o {
				return e
			}
		case <-deadline:
			t.Fatalf("no %s event", o)
		}
	}
}

func TestTxOutcomeCommitsWithTheBusinessRow(t *testing.T) {
	b := newBank(t)
	ctx := testCtx(t)
	first, h1, err := b.charge(ctx, "key-1", 100)
	require.NoError(t, err)
	require.Empty(t, h1.Get(idempotency.ReplayedHeader))
	again, h2, err := b.charge(ctx, "key-1", 100)
	require.NoError(t, err)
	require.True(t, proto.Equal(first, again), "the replay differs: %v vs %v", first, again)
	require.Equal(t, []string{"true"}, h2.Get(idempotency.ReplayedHeader))
	require.EqualValues(t, 1, b.svc.Runs.Load())
	require.Equal(t, 1, b.rows(t))

	info, err := idempotency.Lookup(ctx, b.store, testservice.MethodCharge, "", "key-1")
	require.NoError(t, err)
	require.Equal(t, "completed", info.State)
}

func TestTxStoredErrorRollsBackTheHandlersWrites(t *testing.T) {
	b := newBank(t)
	b.svc.OnCharge = func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
		if _, err := Tx(ctx).Exec(ctx, `INSERT INTO `+b.table+` (amount) VALUES ($1)`, req.GetAmount()); err != nil {
			return nil, err
		}
		return nil, status.Error(codes.FailedPrecondition, "card declined")
	}
	ctx := testCtx(t)
	for i := range 2 {
		_, h, err := b.charge(ctx, "declined", 100)
		require.Equal(t, codes.FailedPrecondition, status.Code(err), "call %d: %v", i, err)
		require.Equal(t, i == 1, len(h.Get(idempotency.ReplayedHeader)) == 1, "call %d replay marker", i)
	}
	require.EqualValues(t, 1, b.svc.Runs.Load())
	require.Equal(t, 0, b.rows(t), "the declined charge's row survived")
}

func TestTxTransientErrorAndPanicRollBackAndRelease(t *testing.T) {
	b := newBank(t)
	inner := b.svc.OnCharge
	b.svc.OnCharge = func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
		if _, err := Tx(ctx).Exec(ctx, `INSERT INTO `+b.table+` (amount) VALUES (-1)`); err != nil {
			return nil, err
		}
		switch n {
		case 1:
			return nil, status.Error(codes.Unavailable, "the bank is down")
		case 2:
			panic("handler bug")
		}
		return inner(ctx, req, n)
	}
	ctx := testCtx(t)
	_, _, err := b.charge(ctx, "flaky", 5)
	require.Equal(t, codes.Unavailable, status.Code(err))
	b.event(t, idempotency.OutcomeReleased)
	require.Panics(t, func() {
		// grpc-go does not recover handler panics: call the interceptor
		// directly.
		icpt := idempotency.UnaryServerInterceptor(b.store)
		ictx := metadata.NewIncomingContext(ctx, metadata.Pairs("idempotency-key", "flaky"))
		_, _ = icpt(ictx, &testingv1.ChargeRequest{Amount: 5}, &grpc.UnaryServerInfo{FullMethod: testservice.MethodCharge},
			func(ctx context.Context, req any) (any, error) {
				return b.svc.Charge(ctx, req.(*testingv1.ChargeRequest))
			})
	})
	resp, _, err := b.charge(ctx, "flaky", 5)
	require.NoError(t, err)
	require.NotEmpty(t, resp.GetChargeId())
	require.EqualValues(t, 3, b.svc.Runs.Load())
	var amounts []int64
	rows, err := b.pool.Query(ctx, `SELECT amount FROM `+b.table)
	require.NoError(t, err)
	amounts, err = pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	require.Equal(t, []int64{-1, 5}, amounts, "only the third run's writes may commit")
}

// A run whose key was taken over while it ran (its lease ended and another
// call claimed the key) commits nothing: its writes vanish with the
// failed fence, and its caller is told to retry.
func TestTxFenceFailureRollsBackEverything(t *testing.T) {
	b := newBank(t)
	inner := b.svc.OnCharge
	b.svc.OnCharge = func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
		resp, err := inner(ctx, req, n)
		if n == 1 {
			// Another owner, as after an expired lease.
			_, uerr := b.pool.Exec(ctx, `UPDATE `+b.store.table.Sanitize()+` SET token = 'someone-else'`)
			require.NoError(t, uerr)
		}
		return resp, err
	}
	ctx := testCtx(t)
	_, _, err := b.charge(ctx, "taken", 7)
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	require.Equal(t, idempotency.ReasonNotCommitted, idempotency.ReasonOf(err))
	e := b.event(t, idempotency.OutcomeRolledBack)
	require.ErrorIs(t, e.Err, idempotency.ErrLeaseLost)
	require.Equal(t, 0, b.rows(t), "the fenced-off run's row committed")
}

// The commit does not use the client's context: a client that gives up
// after the handler ran does not lose the outcome.
func TestTxClientCancelDoesNotAbortTheCommit(t *testing.T) {
	b := newBank(t)
	inner := b.svc.OnCharge
	ctx, cancel := context.WithCancel(testCtx(t))
	b.svc.OnCharge = func(hctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
		resp, err := inner(hctx, req, n)
		cancel()
		<-hctx.Done() // the server saw the cancellation
		return resp, err
	}
	_, _, err := b.charge(ctx, "gone", 9)
	require.Equal(t, codes.Canceled, status.Code(err))
	b.event(t, idempotency.OutcomeExecuted)
	require.Equal(t, 1, b.rows(t))
	resp, h, err := b.charge(testCtx(t), "gone", 9)
	require.NoError(t, err)
	require.Equal(t, []string{"true"}, h.Get(idempotency.ReplayedHeader))
	require.NotEmpty(t, resp.GetChargeId())
	require.EqualValues(t, 1, b.svc.Runs.Load())
}

// A claim whose owner's session is gone is taken over once the owner has
// also stopped renewing its lease: two thirds of the lease after its last
// renewal, not at the lease's end. While the owner renews, its key stays
// its own, session or not. The lease's clock is moved by hand (the row's
// renewed_at and expires_at, together), so the test takes no time.
func TestTxDeadOwnerIsTakenOverOnceItStopsRenewing(t *testing.T) {
	s, pool := testStore(t)
	ctx := testCtx(t)
	key := fmt.Sprintf("%064x", 42)
	res, ex, err := s.ClaimTx(ctx, key, "owner", []byte("in progress"), time.Hour)
	require.NoError(t, err)
	require.True(t, res.Claimed)
	refused := func(why string) {
		t.Helper()
		res, other, err := s.ClaimTx(ctx, key, "intruder", []byte("x"), time.Hour)
		require.NoError(t, err)
		require.False(t, res.Claimed, "the owner was overtaken: %s", why)
		require.Nil(t, other)
	}
	age := func(d time.Duration) {
		t.Helper()
		_, err := pool.Exec(ctx, `UPDATE `+s.table.Sanitize()+` SET renewed_at = renewed_at - $2::bigint * interval '1 millisecond',
			expires_at = expires_at - $2::bigint * interval '1 millisecond' WHERE key = $1`, key, d.Milliseconds())
		require.NoError(t, err)
	}
	for range 3 {
		refused("its session is alive")
	}
	age(50 * time.Minute)
	refused("its session is alive, though it stopped renewing")
	age(-50 * time.Minute)

	sessionDied(t, pool, ex.(*execution).conn.Conn().PgConn().PID())
	refused("it renewed just now")
	age(39 * time.Minute)
	refused("it renewed 39 minutes ago, within two thirds of its 1h lease")
	require.NoError(t, s.Renew(ctx, key, "owner", time.Hour), "the live owner's renewal")
	age(39 * time.Minute)
	refused("it renewed 39 minutes ago again")
	age(2 * time.Minute)
	res, ex2, err := s.ClaimTx(ctx, key, "successor", []byte("in progress"), time.Hour)
	require.NoError(t, err)
	require.True(t, res.Claimed, "a dead owner that stopped renewing 41 minutes ago, 19 minutes before its lease ends")
	require.NoError(t, ex2.Discard(ctx, nil, 0))
	// The dead owner can no longer write its outcome.
	require.Error(t, ex.Commit(ctx, []byte("late"), time.Hour))
	_, _, err = s.Get(ctx, key)
	require.ErrorIs(t, err, idempotency.ErrNoRecord)
}

// sessionDied terminates the backend pid and waits until it is gone.
func sessionDied(t *testing.T, pool *pgxpool.Pool, pid uint32) {
	t.Helper()
	var ok bool
	require.NoError(t, pool.QueryRow(testCtx(t), `SELECT pg_terminate_backend($1)`, int64(pid)).Scan(&ok))
	require.True(t, ok)
	sessionGone(t, pool, pid)
}

// Concurrent first calls with one key: exactly one business row.
func TestTxConcurrentDuplicates(t *testing.T) {
	b := newBank(t, idempotency.WithWaitForInProgress(5*time.Millisecond))
	ctx := testCtx(t)
	var wg sync.WaitGroup
	ids := make([]string, 16)
	errs := make([]error, 16)
	for i := range ids {
		wg.Go(func() {
			resp, _, err := b.charge(ctx, "storm", 3)
			ids[i], errs[i] = resp.GetChargeId(), err
		})
	}
	wg.Wait()
	for i := range ids {
		require.NoError(t, errs[i])
		require.Equal(t, ids[0], ids[i])
	}
	require.EqualValues(t, 1, b.svc.Runs.Load())
	require.Equal(t, 1, b.rows(t))
}

var _ = errors.New

// The handler's transaction behaves as a pgx.Tx: statements of every kind
// run in it (BEGIN rides in front of the first), savepoints work, and
// Commit and Rollback refuse; a handler that never uses it still gets its
// outcome stored.
func TestTxHandlerUsesTheTransactionLikeAPgxTx(t *testing.T) {
	b := newBank(t)
	b.svc.OnCharge = func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
		tx := Tx(ctx)
		if req.GetAmount() == 0 {
			return &testingv1.ChargeResponse{ChargeId: "untouched"}, nil
		}
		// Query first, read to the end without Close: the next statement
		// must still find the connection free.
		rows, err := tx.Query(ctx, `SELECT g FROM generate_series(1, 3) g`)
		if err != nil {
			return nil, err
		}
		sum := int64(0)
		for rows.Next() {
			var g int64
			if err := rows.Scan(&g); err != nil {
				return nil, err
			}
			sum += g
		}
		if err := rows.Err(); err != nil {
			return nil, err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+b.table+` (amount) VALUES ($1)`, sum); err != nil {
			return nil, err
		}
		sp, err := tx.Begin(ctx)
		if err != nil {
			return nil, err
		}
		if _, err := sp.Exec(ctx, `INSERT INTO `+b.table+` (amount) VALUES (-100)`); err != nil {
			return nil, err
		}
		if err := sp.Rollback(ctx); err != nil {
			return nil, err
		}
		batch := &pgx.Batch{}
		batch.Queue(`INSERT INTO `+b.table+` (amount) VALUES ($1)`, req.GetAmount())
		if err := tx.SendBatch(ctx, batch).Close(); err != nil {
			return nil, err
		}
		if !errors.Is(tx.Commit(ctx), errManaged) || !errors.Is(tx.Rollback(ctx), errManaged) {
			return nil, status.Error(codes.Internal, "the handler could end the transaction")
		}
		var n2 int64
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM `+b.table).Scan(&n2); err != nil {
			return nil, err
		}
		return &testingv1.ChargeResponse{ChargeId: fmt.Sprintf("rows_%d", n2)}, nil
	}
	ctx := testCtx(t)
	resp, _, err := b.charge(ctx, "api", 4)
	require.NoError(t, err)
	require.Equal(t, "rows_2", resp.GetChargeId(), "the savepoint's row was not rolled back, or a row is missing")
	require.Equal(t, 2, b.rows(t))

	resp, _, err = b.charge(ctx, "untouched", 0)
	require.NoError(t, err)
	require.Equal(t, "untouched", resp.GetChargeId())
	again, h, err := b.charge(ctx, "untouched", 0)
	require.NoError(t, err)
	require.Equal(t, []string{"true"}, h.Get(idempotency.ReplayedHeader))
	require.Equal(t, "untouched", again.GetChargeId())
	require.EqualValues(t, 2, b.svc.Runs.Load())
}

// Every statement of each kind, sent first in a call (riding behind BEGIN),
// runs inside the transaction: a stored error rolls each back.
func TestTxFirstStatementOfEachKindIsInTheTransaction(t *testing.T) {
	for _, kind := range []string{"exec", "query", "queryrow", "batch", "copy"} {
		t.Run(kind, func(t *testing.T) {
			b := newBank(t)
			b.svc.OnCharge = func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
				tx := Tx(ctx)
				insert := `INSERT INTO ` + b.table + ` (amount) VALUES (1) RETURNING id`
				var err error
				switch kind {
				case "exec":
					_, err = tx.Exec(ctx, insert)
				case "query":
					var rows pgx.Rows
					if rows, err = tx.Query(ctx, insert); err == nil {
						rows.Close()
						err = rows.Err()
					}
				case "queryrow":
					var id int64
					err = tx.QueryRow(ctx, insert).Scan(&id)
				case "batch":
					batch := &pgx.Batch{}
					batch.Queue(insert)
					err = tx.SendBatch(ctx, batch).Close()
				case "copy":
					_, err = tx.CopyFrom(ctx, pgx.Identifier{b.table}, []string{"amount"}, pgx.CopyFromRows([][]any{{int64(1)}}))
				}
				if err != nil {
					return nil, status.Errorf(codes.Internal, "%s: %v", kind, err)
				}
				return nil, status.Error(codes.InvalidArgument, "refused after writing")
			}
			_, _, err := b.charge(testCtx(t), "k", 1)
			require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
			require.Equal(t, 0, b.rows(t), "the %s write escaped the transaction", kind)
		})
	}
}
