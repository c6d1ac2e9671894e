package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"syscall"
	"time"

	"github.com/idempotency-grpc/idempotency"
	idempotencypg "github.com/idempotency-grpc/idempotency/postgres"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// chargesSchema is the business table of serve --postgres. The
// idempotency_key column is only there so that tests (and you) can count
// the rows each key produced; the interceptor does not need it.
const chargesSchema = `CREATE TABLE IF NOT EXISTS charges (
    id              text        PRIMARY KEY,
    account_id      text        NOT NULL,
    amount_cents    bigint      NOT NULL,
    currency        text        NOT NULL,
    created_at      timestamptz NOT NULL,
    idempotency_key text
);
CREATE INDEX IF NOT EXISTS charges_account_idx ON charges (account_id, created_at);
-- The highest fence (idempotency.FenceFromContext) that charged, per key:
-- a charge is written only with a greater one, so an owner whose lease ran
-- out while a newer owner of the key charged charges nothing.
CREATE TABLE IF NOT EXISTS charge_fences (
    idempotency_key text   PRIMARY KEY,
    fence           bigint NOT NULL
);`

// pgBook keeps the ledger's charges in the charges table. Each charge is
// inserted in the call's transaction when the idempotency store is the
// Postgres one (idempotencypg.Tx), so it commits together with the call's
// outcome; with any other store it commits in a transaction of its own,
// before the outcome is stored elsewhere.
type pgBook struct{ pool *pgxpool.Pool }

func openBook(ctx context.Context, dsn string) (*pgBook, error) {
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := createSchema(pctx, pool, chargesSchema); err != nil {
		pool.Close()
		return nil, fmt.Errorf("postgres: creating the charges table: %w", err)
	}
	return &pgBook{pool: pool}, nil
}

// schemaLockID is the advisory lock that serialises the schema creation
// of the example's processes.
const schemaLockID = 0x7061796d656e7473 // "payments"

// createSchema runs sql, which creates tables if they do not exist, in a
// transaction that holds an advisory lock first: two processes that start
// at once (two consumers, two servers) would otherwise both run CREATE
// TABLE IF NOT EXISTS for one table, and one of them can fail with a unique
// violation in Postgres's catalog (pg_type_typname_nsp_index). The lock
// and the statements share one session, so a process killed meanwhile
// releases the lock only once its statements are rolled back.
func createSchema(ctx context.Context, pool *pgxpool.Pool, sql string) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(schemaLockID)); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, sql)
		return err
	})
}

func (b *pgBook) add(ctx context.Context, c *paymentsv1.Charge) error {
	key, _ := idempotency.KeyFromContext(ctx)
	return idempotencypg.InTx(ctx, b.pool, func(tx pgx.Tx) error {
		if key, fence, ok := fenceOf(ctx); ok {
			// The fenced write: it locks the key's row, so a stale owner
			// and a newer one cannot both pass; the charge below commits
			// with it or not at all.
			tag, err := tx.Exec(ctx, `INSERT INTO charge_fences (idempotency_key, fence) VALUES ($1, $2)
ON CONFLICT (idempotency_key) DO UPDATE SET fence = excluded.fence WHERE charge_fences.fence < excluded.fence`, key, int64(fence))
			if err != nil {
				return err
			}
			if tag.RowsAffected() == 0 {
				return errStaleFence
			}
		}
		_, err := tx.Exec(ctx, `INSERT INTO charges (id, account_id, amount_cents, currency, created_at, idempotency_key)
VALUES ($1, $2, $3, $4, $5, NULLIF($6, ''))`, c.GetId(), c.GetAccountId(), c.GetAmountCents(), c.GetCurrency(), c.GetCreatedAt().AsTime(), key)
		return err
	})
}

func (b *pgBook) list(ctx context.Context, account string) ([]*paymentsv1.Charge, error) {
	rows, err := b.pool.Query(ctx, `SELECT id, account_id, amount_cents, currency, created_at FROM charges
WHERE $1 = '' OR account_id = $1 ORDER BY created_at, id`, account)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (*paymentsv1.Charge, error) {
		c := &paymentsv1.Charge{}
		var created time.Time
		err := row.Scan(&c.Id, &c.AccountId, &c.AmountCents, &c.Currency, &created)
		c.CreatedAt = timestamppb.New(created)
		return c, err
	})
}

// openPostgresStore returns the transactional idempotency store on pool,
// creating its table if needed, and runs its sweeper until ctx ends.
func openPostgresStore(ctx context.Context, pool *pgxpool.Pool, logf func(format string, args ...any)) (*idempotencypg.Store, error) {
	// idempotencypg.CreateSchema(ctx, pool) would do, but for processes
	// that start at once (see createSchema).
	if err := createSchema(ctx, pool, idempotencypg.Schema()); err != nil {
		return nil, fmt.Errorf("idempotencypg: create schema: %w", err)
	}
	store, err := idempotencypg.New(ctx, pool)
	if err != nil {
		return nil, err
	}
	go func() {
		_ = store.RunSweeper(ctx, time.Minute, 1000, func(err error) { logf("idempotency sweeper: %v", err) })
	}()
	return store, nil
}

// chaos kills this process with SIGKILL, with probability rate, at each
// point of a charge it is called at ("before-write", "after-write",
// "after-commit"): serve --chaos-kill, for the crash tests.
type chaos struct {
	rate float64
	logf func(format string, args ...any)
}

func (c *chaos) maybeKill(point string) {
	if c == nil || c.rate <= 0 || rand.Float64() >= c.rate {
		return
	}
	c.logf("chaos: SIGKILL at %s", point)
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // the signal is on its way
}
