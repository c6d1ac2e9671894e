package idempotencypg

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest"
	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

// TestConformance runs the public Store contract against a real Postgres,
// in real time (the store's clock is the database's): the rules side by
// side, each on a table of its own.
func TestConformance(t *testing.T) {
	t.Parallel()
	idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
		s, _ := testStore(t)
		return idempotencytest.Harness{Store: s, Parallel: true}
	})
}

func TestNewSaysWhatIsMissing(t *testing.T) {
	_, pool := testStore(t)
	ctx := testCtx(t)
	_, err := New(ctx, pool, WithTable("no_such_table"))
	require.ErrorContains(t, err, `table "no_such_table" does not exist: create it with CreateSchema, or apply Schema() in your migrations`)
	_, err = New(ctx, nil)
	require.ErrorContains(t, err, "a *pgxpool.Pool is required")
	for _, bad := range []string{"", "a.b.c", "1abc", "drop table x;", "a-b", strings.Repeat("x", 64)} {
		require.Panics(t, func() { WithTable(bad) }, bad)
	}
	require.NotPanics(t, func() { WithTable("billing.Idempotency_Records") })

	old := fmt.Sprintf("old_records_%d", tables.Add(1))
	_, err = pool.Exec(ctx, `CREATE TABLE `+old+` (key text PRIMARY KEY, state smallint, token text, locked boolean, record bytea, expires_at timestamptz)`)
	require.NoError(t, err)
	_, err = New(ctx, pool, WithTable(old))
	require.ErrorContains(t, err, `table "`+old+`" lacks the columns [fence renewed_at]`)

	// A table created before fencing tokens: New names what is missing,
	// and CreateSchema adds it (the column and the sequence).
	before := WithTable(fmt.Sprintf("before_fences_%d", tables.Add(1)))
	require.NoError(t, CreateSchema(ctx, pool, before))
	name := evaluate([]Option{before}).table
	_, err = pool.Exec(ctx, `ALTER TABLE `+name.Sanitize()+` DROP COLUMN fence`)
	require.NoError(t, err)
	_, err = New(ctx, pool, before)
	require.ErrorContains(t, err, "lacks the columns [fence]")
	_, err = pool.Exec(ctx, `DROP SEQUENCE `+fenceSequence(name).Sanitize())
	require.NoError(t, err)
	require.NoError(t, CreateSchema(ctx, pool, before))
	_, err = New(ctx, pool, before)
	require.NoError(t, err, "New after CreateSchema added the fence column and sequence")
	_, err = pool.Exec(ctx, `DROP SEQUENCE `+fenceSequence(name).Sanitize())
	require.NoError(t, err)
	_, err = New(ctx, pool, before)
	require.ErrorContains(t, err, "the sequence")

	one := pgtest.Shared(t).Pool(t, func(c *pgxpool.Config) { c.MaxConns = 1 })
	_, err = New(ctx, one)
	require.ErrorContains(t, err, "a pool of 1 connection(s) is too small")
}

// TestTxConformance runs the public TxStore contract: a business table of
// its own per rule, written through Tx(ctx). It stays serial: its fence
// rule gives a 300ms lease to an owner that claims twice, on two
// connections, and takes the same fence back only if the lease has not
// ended in between (once in 20 -race runs side by side with other tests,
// it had).
func TestTxConformance(t *testing.T) {
	idempotencytest.RunTxStoreTests(t, func(t *testing.T) idempotencytest.TxHarness {
		s, pool := testStore(t)
		table := fmt.Sprintf("business_%d", tables.Add(1))
		_, err := pool.Exec(testCtx(t), `CREATE TABLE `+table+` (id bigserial PRIMARY KEY)`)
		require.NoError(t, err)
		return idempotencytest.TxHarness{
			Store: s,
			Write: func(ctx context.Context) error {
				tx := Tx(ctx)
				if tx == nil {
					return errors.New("no transaction in the context")
				}
				_, err := tx.Exec(ctx, `INSERT INTO `+table+` DEFAULT VALUES`)
				return err
			},
			Writes: func(t *testing.T) int {
				var n int
				require.NoError(t, pool.QueryRow(testCtx(t), `SELECT count(*) FROM `+table).Scan(&n))
				return n
			},
		}
	})
}

// RenewBatch renews the keys their tokens own, in one statement, and
// reports the others lost.
func TestRenewBatch(t *testing.T) {
	s, _ := testStore(t)
	ctx := testCtx(t)
	k := func(n int) string { return fmt.Sprintf("%064x", n) }
	for i := range 3 {
		_, err := s.Claim(ctx, k(i), fmt.Sprint("tok", i), []byte("in progress"), time.Minute)
		require.NoError(t, err)
	}
	errs := s.RenewBatch(ctx, []string{k(0), k(1), k(2), k(3)}, []string{"tok0", "other", "tok2", "tok3"}, time.Hour)
	require.Len(t, errs, 4)
	require.NoError(t, errs[0])
	require.ErrorIs(t, errs[1], idempotency.ErrLeaseLost)
	require.NoError(t, errs[2])
	require.ErrorIs(t, errs[3], idempotency.ErrLeaseLost, "an absent key")
	_, ttl, err := s.Get(ctx, k(0))
	require.NoError(t, err)
	require.Greater(t, ttl, 30*time.Minute, "the renewed lease")
	_, ttl, err = s.Get(ctx, k(1))
	require.NoError(t, err)
	require.LessOrEqual(t, ttl, time.Minute, "a lease renewed by another token")
}

// One key twice in a batch, under its owner's token and a stale one (two
// calls on one server, the older one's lease taken over): only the owner's
// renewal succeeds.
func TestRenewBatchMatchesKeyAndToken(t *testing.T) {
	s, _ := testStore(t)
	ctx := testCtx(t)
	k := fmt.Sprintf("%064x", 7)
	_, err := s.Claim(ctx, k, "owner", []byte("in progress"), time.Minute)
	require.NoError(t, err)
	for _, order := range [][]string{{"owner", "stale"}, {"stale", "owner"}} {
		errs := s.RenewBatch(ctx, []string{k, k}, order, time.Hour)
		for i, tok := range order {
			if tok == "owner" {
				require.NoError(t, errs[i], "%v", order)
			} else {
				require.ErrorIs(t, errs[i], idempotency.ErrLeaseLost, "the stale token's renewal, %v", order)
			}
		}
	}
}

// A renewal never brings a finished claim back: renewals race each commit,
// stored outcome and release (of executions and of the plain Store calls),
// and once the call finished, the record is its outcome with the outcome's
// TTL, or nothing, and every later renewal is refused.
func TestRenewalNeverResurrectsAFinishedClaim(t *testing.T) {
	s, _ := testStore(t)
	ctx := testCtx(t)
	const lease = 200 * time.Millisecond
	finishes := []string{"commit", "discard with outcome", "discard", "complete", "release"}
	for i := range 60 {
		how := finishes[i%len(finishes)]
		key, token := fmt.Sprintf("%064x", 1000+i), fmt.Sprintf("tok-%d", i)
		var ex idempotency.Execution
		if i%len(finishes) < 3 {
			res, e, err := s.ClaimTx(ctx, key, token, []byte("in progress"), lease)
			require.NoError(t, err)
			require.True(t, res.Claimed)
			ex = e
		} else {
			res, err := s.Claim(ctx, key, token, []byte("in progress"), lease)
			require.NoError(t, err)
			require.True(t, res.Claimed)
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				_ = s.RenewBatch(ctx, []string{key}, []string{token}, lease)
				_ = s.Renew(ctx, key, token, lease)
			}
		})
		switch how {
		case "commit":
			hctx, err := ex.Begin(ctx)
			require.NoError(t, err)
			_, err = Tx(hctx).Exec(hctx, `SELECT 1`)
			require.NoError(t, err)
			require.NoError(t, ex.Commit(ctx, []byte("final"), time.Hour))
		case "discard with outcome":
			require.NoError(t, ex.Discard(ctx, []byte("final"), time.Hour))
		case "discard":
			require.NoError(t, ex.Discard(ctx, nil, 0))
		case "complete":
			require.NoError(t, s.Complete(ctx, key, token, []byte("final"), time.Hour))
		case "release":
			require.NoError(t, s.Release(ctx, key, token))
		}
		close(stop)
		wg.Wait()
		require.ErrorIs(t, s.Renew(ctx, key, token, lease), idempotency.ErrLeaseLost, "%s: a renewal after it", how)
		require.ErrorIs(t, s.RenewBatch(ctx, []string{key}, []string{token}, lease)[0], idempotency.ErrLeaseLost, "%s: a batch renewal after it", how)
		record, ttl, err := s.Get(ctx, key)
		if how == "discard" || how == "release" {
			require.ErrorIs(t, err, idempotency.ErrNoRecord, "%s: the key came back", how)
			continue
		}
		require.NoError(t, err)
		require.Equal(t, []byte("final"), record, how)
		require.Greater(t, ttl, 30*time.Minute, "%s: the outcome's TTL was cut to a lease", how)
	}
}
