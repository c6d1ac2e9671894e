package idempotencypg

import (
	"context"
	"errors"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

type txKey struct{}

// Tx returns the transaction the interceptor runs the call's handler in:
// write the call's business rows with it, and they commit together with
// the call's outcome record, or not at all. It returns nil when ctx has
// none: a call without an idempotency key (it passes through), or a server
// whose interceptor uses another store. [InTx] covers both cases.
//
// The interceptor commits and rolls back; the transaction's Commit and
// Rollback refuse (use Begin for a savepoint the handler may roll back).
// Do not run COMMIT, ROLLBACK or SET TRANSACTION through Exec, and do not
// use the transaction after the handler returned.
func Tx(ctx context.Context) pgx.Tx {
	if t, ok := ctx.Value(txKey{}).(*handlerTx); ok {
		return t
	}
	return nil
}

// beginner is what InTx needs of a pool: pgxpool.Pool and pgx.Conn are.
type beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// InTx runs fn in the call's transaction ([Tx]) when ctx has one, so fn's
// writes commit with the outcome; otherwise (a call without a key) in a
// transaction of its own on db, committed when fn returns nil and rolled
// back otherwise.
func InTx(ctx context.Context, db beginner, fn func(tx pgx.Tx) error) error {
	if tx := Tx(ctx); tx != nil {
		return fn(tx)
	}
	tx, err := db.Begin(ctx)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback(ctx)
		return err
	}
	return tx.Commit(ctx)
}

var (
	errManaged = errors.New("idempotencypg: the interceptor commits or rolls back the call's transaction with its outcome; the handler must not (use Begin for a savepoint)")
	errEnded   = errors.New("idempotencypg: the call's transaction has ended: it cannot be used after the handler returned")
)

// handlerTx is the call's transaction as the handler sees it: pgx's own
// transaction, whose Commit and Rollback refuse, and which refuses to run
// statements once the handler returned.
type handlerTx struct {
	pgx.Tx
	ended atomic.Bool
}

func (t *handlerTx) end() { t.ended.Store(true) }

func (t *handlerTx) check() error {
	if t.ended.Load() {
		return errEnded
	}
	return nil
}

// Begin starts a savepoint: a pseudo nested transaction the handler may
// commit (release) or roll back on its own.
func (t *handlerTx) Begin(ctx context.Context) (pgx.Tx, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	return t.Tx.Begin(ctx)
}

// Commit refuses: the interceptor commits with the outcome.
func (t *handlerTx) Commit(context.Context) error { return errManaged }

// Rollback refuses: return an error from the handler to roll back.
func (t *handlerTx) Rollback(context.Context) error { return errManaged }

// CopyFrom implements pgx.Tx.
func (t *handlerTx) CopyFrom(ctx context.Context, table pgx.Identifier, columns []string, src pgx.CopyFromSource) (int64, error) {
	if err := t.check(); err != nil {
		return 0, err
	}
	return t.Tx.CopyFrom(ctx, table, columns, src)
}

// SendBatch implements pgx.Tx.
func (t *handlerTx) SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults {
	if err := t.check(); err != nil {
		return errBatch{err}
	}
	return t.Tx.SendBatch(ctx, b)
}

// Prepare implements pgx.Tx.
func (t *handlerTx) Prepare(ctx context.Context, name, sql string) (*pgconn.StatementDescription, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	return t.Tx.Prepare(ctx, name, sql)
}

// Exec implements pgx.Tx.
func (t *handlerTx) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	if err := t.check(); err != nil {
		return pgconn.CommandTag{}, err
	}
	return t.Tx.Exec(ctx, sql, args...)
}

// Query implements pgx.Tx.
func (t *handlerTx) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	return t.Tx.Query(ctx, sql, args...)
}

// QueryRow implements pgx.Tx.
func (t *handlerTx) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	if err := t.check(); err != nil {
		return errRow{err}
	}
	return t.Tx.QueryRow(ctx, sql, args...)
}

// errBatch and errRow carry an error where pgx.Tx returns no error.
type errBatch struct{ err error }

func (b errBatch) Exec() (pgconn.CommandTag, error) { return pgconn.CommandTag{}, b.err }
func (b errBatch) Query() (pgx.Rows, error)         { return nil, b.err }
func (b errBatch) QueryRow() pgx.Row                { return errRow(b) }
func (b errBatch) Close() error                     { return b.err }
func (b errBatch) Tx() pgx.Tx                       { return nil }

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }
