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

// Beginner is what [InTx] needs of a database handle: *pgxpool.Pool,
// *pgx.Conn and pgx.Tx are Beginners.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// InTx runs fn in the call's transaction ([Tx]) when ctx has one, so fn's
// writes commit with the outcome; otherwise (a call without a key) in a
// transaction of its own on db, committed when fn returns nil and rolled
// back otherwise.
func InTx(ctx context.Context, db Beginner, fn func(tx pgx.Tx) error) error {
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

// handlerTx is the call's transaction as the handler sees it. BEGIN is
// not sent on its own: it rides in front of the handler's first statement
// (a pgx batch begun with BeginTx), so the transaction costs no round trip
// of its own, and a handler that never touches it costs none at all. Its
// Commit and Rollback refuse, and it refuses every statement once the
// handler returned.
type handlerTx struct {
	conn  *pgx.Conn
	tx    pgx.Tx // nil until the first statement began it
	ended atomic.Bool
	// replace gives the call a new connection when its session died
	// before the transaction began (nil: none is given).
	replace func(ctx context.Context) (*pgx.Conn, error)
}

func (t *handlerTx) end() { t.ended.Store(true) }

func (t *handlerTx) begun() bool { return t.tx != nil }

func (t *handlerTx) check() error {
	if t.ended.Load() {
		return errEnded
	}
	return nil
}

// send sends b (the handler's statements) behind BEGIN when the
// transaction has not begun yet, and returns the results with BEGIN's
// already read.
func (t *handlerTx) send(ctx context.Context, queue func(b *pgx.Batch)) pgx.BatchResults {
	if err := t.check(); err != nil {
		return errBatch{err}
	}
	if t.tx != nil {
		b := &pgx.Batch{}
		queue(b)
		return t.tx.SendBatch(ctx, b)
	}
	for try := 0; ; try++ {
		b := &pgx.Batch{}
		b.BeginTx(pgx.TxOptions{})
		b.Queue(exemptIdle)
		queue(b)
		br := t.conn.SendBatch(ctx, b)
		tx := br.Tx()
		var err error
		for range 2 { // BEGIN and exemptIdle
			if _, err = br.Exec(); err != nil {
				break
			}
		}
		if err == nil {
			t.tx = tx
			return br
		}
		_ = br.Close()
		if try == 0 && t.renewable() {
			if err = t.renew(ctx); err == nil {
				continue
			}
		}
		t.tx = tx
		return errBatch{err}
	}
}

// renewable reports whether the call's session is gone before its
// transaction began. It then held nothing but the claim's lock (whatever
// the failed batch began ended with it), so the transaction can begin on
// a new connection: an idle_session_timeout, or a proxy that dropped the
// idle connection while the handler called out, costs the call nothing.
func (t *handlerTx) renewable() bool {
	return t.tx == nil && t.replace != nil && t.conn.IsClosed()
}

func (t *handlerTx) renew(ctx context.Context) error {
	conn, err := t.replace(ctx)
	if err != nil {
		return err
	}
	t.conn = conn
	return nil
}

// exemptIdle exempts the call's transaction from the server's
// idle_in_transaction_session_timeout. The transaction is idle by design
// whenever the handler works outside the database (a payment provider's
// call between its INSERT and its return); a server that ended the session
// then would roll the handler's writes back under a live call, which could
// only answer OUTCOME_NOT_COMMITTED and have the retry run the handler
// again. SET LOCAL ends with the transaction, so the pooled connection
// keeps the server's setting.
const exemptIdle = "SET LOCAL idle_in_transaction_session_timeout = 0"

// begin sends BEGIN on its own, for the calls that cannot ride in a batch.
func (t *handlerTx) begin(ctx context.Context) error {
	if err := t.check(); err != nil {
		return err
	}
	if t.tx != nil {
		return nil
	}
	begin := pgx.TxOptions{BeginQuery: "BEGIN; " + exemptIdle} // one round trip: simple protocol
	tx, err := t.conn.BeginTx(ctx, begin)
	if err != nil && t.renewable() {
		if err = t.renew(ctx); err == nil {
			tx, err = t.conn.BeginTx(ctx, begin)
		}
	}
	if err != nil {
		return err
	}
	t.tx = tx
	return nil
}

// Begin starts a savepoint: a pseudo nested transaction the handler may
// commit (release) or roll back on its own.
func (t *handlerTx) Begin(ctx context.Context) (pgx.Tx, error) {
	if err := t.begin(ctx); err != nil {
		return nil, err
	}
	return t.tx.Begin(ctx)
}

// Commit refuses: the interceptor commits with the outcome.
func (t *handlerTx) Commit(context.Context) error { return errManaged }

// Rollback refuses: return an error from the handler to roll back.
func (t *handlerTx) Rollback(context.Context) error { return errManaged }

// CopyFrom implements pgx.Tx.
func (t *handlerTx) CopyFrom(ctx context.Context, table pgx.Identifier, columns []string, src pgx.CopyFromSource) (int64, error) {
	if err := t.begin(ctx); err != nil {
		return 0, err
	}
	return t.tx.CopyFrom(ctx, table, columns, src)
}

// SendBatch implements pgx.Tx.
func (t *handlerTx) SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults {
	return t.send(ctx, func(nb *pgx.Batch) { nb.QueuedQueries = append(nb.QueuedQueries, b.QueuedQueries...) })
}

// LargeObjects implements pgx.Tx.
func (t *handlerTx) LargeObjects() pgx.LargeObjects {
	if err := t.begin(context.Background()); err != nil {
		return pgx.LargeObjects{}
	}
	return t.tx.LargeObjects()
}

// Prepare implements pgx.Tx.
func (t *handlerTx) Prepare(ctx context.Context, name, sql string) (*pgconn.StatementDescription, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	return t.conn.Prepare(ctx, name, sql) // outside any transaction: no need to begin
}

// Exec implements pgx.Tx.
func (t *handlerTx) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	if t.tx != nil {
		if err := t.check(); err != nil {
			return pgconn.CommandTag{}, err
		}
		return t.tx.Exec(ctx, sql, args...)
	}
	br := t.send(ctx, func(b *pgx.Batch) { b.Queue(sql, args...) })
	tag, err := br.Exec()
	return tag, errors.Join(err, br.Close())
}

// Query implements pgx.Tx.
func (t *handlerTx) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	if t.tx != nil {
		if err := t.check(); err != nil {
			return nil, err
		}
		return t.tx.Query(ctx, sql, args...)
	}
	br := t.send(ctx, func(b *pgx.Batch) { b.Queue(sql, args...) })
	rows, err := br.Query()
	if err != nil {
		_ = br.Close()
		return nil, err
	}
	return &batchRows{Rows: rows, br: br}, nil
}

// QueryRow implements pgx.Tx.
func (t *handlerTx) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	if t.tx != nil {
		if err := t.check(); err != nil {
			return errRow{err}
		}
		return t.tx.QueryRow(ctx, sql, args...)
	}
	br := t.send(ctx, func(b *pgx.Batch) { b.Queue(sql, args...) })
	return batchRow{br: br}
}

// Conn implements pgx.Tx.
func (t *handlerTx) Conn() *pgx.Conn { return t.conn }

// batchRows are the rows of a statement sent behind BEGIN: closing them
// (or reading them to the end) also closes the batch, so the connection
// is free for the next statement.
type batchRows struct {
	pgx.Rows
	br     pgx.BatchResults
	closed bool
	err    error
}

func (r *batchRows) Next() bool {
	if r.Rows.Next() {
		return true
	}
	r.Close()
	return false
}

func (r *batchRows) Close() {
	if r.closed {
		return
	}
	r.closed = true
	r.Rows.Close()
	r.err = r.br.Close()
}

func (r *batchRows) Err() error {
	if err := r.Rows.Err(); err != nil {
		return err
	}
	return r.err
}

// batchRow is QueryRow's row of a statement sent behind BEGIN.
type batchRow struct{ br pgx.BatchResults }

func (r batchRow) Scan(dest ...any) error {
	err := r.br.QueryRow().Scan(dest...)
	return errors.Join(err, r.br.Close())
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
