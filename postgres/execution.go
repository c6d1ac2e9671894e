package idempotencypg

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ClaimTx implements [idempotency.TxStore.ClaimTx]: the claim statement on a
// connection of its own, which the call keeps for its transaction. When
// the key is claimed, that connection's session also holds the key's
// advisory lock until the outcome is committed or the key released, so a
// claim that finds the key in progress while the lock is free knows the
// owner's session is gone. It takes the key before the lease ends only if
// the owner has also stopped renewing (see the claim statement): a session
// can die under a live owner, which keeps its key.
func (s *Store) ClaimTx(ctx context.Context, key, token string, record []byte, lease time.Duration) (idempotency.ClaimResult, idempotency.Execution, error) {
	// A slot first: the calls in flight never hold the pool's last
	// connection, which their lease renewals need.
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		return idempotency.ClaimResult{}, nil, fmt.Errorf("idempotencypg: claim: waiting for a connection: %w", ctx.Err())
	}
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		<-s.slots
		return idempotency.ClaimResult{}, nil, fmt.Errorf("idempotencypg: claim: %w", err)
	}
	res, locked, err := s.claim(ctx, conn, key, token, record, lease, true)
	if err != nil || !res.Claimed {
		// A connection that failed is closed by the pool, and its session
		// (with any lock the claim took) ends with it.
		conn.Release()
		<-s.slots
		return res, nil, err
	}
	return res, &execution{s: s, conn: conn, key: key, token: token, lockID: s.lockID(key), locked: locked}, nil
}

// execution is one claimed key's run: the session holding the claim (and
// its lock), and the handler's transaction on it.
type execution struct {
	s          *Store
	conn       *pgxpool.Conn
	key, token string
	lockID     int64
	locked     bool // the session holds the key's advisory lock
	tx         *handlerTx
	unlocked   bool // the lock was given back
}

// Begin implements [idempotency.Execution.Begin]. It sends nothing: BEGIN
// goes out in front of the handler's first statement (see handlerTx).
func (e *execution) Begin(ctx context.Context) (context.Context, error) {
	e.tx = &handlerTx{conn: e.conn.Conn(), replace: e.replaceConn}
	return context.WithValue(ctx, txKey{}, e.tx), nil
}

// replaceConn swaps the call's connection, whose session died before its
// transaction began, for a new one from the pool (the call keeps its
// slot). The new session does not hold the key's lock. The row still says
// locked, which lets a claim take the key early only once the owner has
// also stopped renewing, so nothing changes while this call lives; a crash
// of it is noticed as before.
func (e *execution) replaceConn(ctx context.Context) (*pgx.Conn, error) {
	conn, err := e.s.pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	old := e.conn.Hijack()
	e.conn = conn
	e.locked, e.unlocked = false, true
	cctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = old.Close(cctx) // already closed: frees its resources
	return conn.Conn(), nil
}

// Commit implements [idempotency.Execution.Commit]: the fenced outcome
// write, COMMIT and the lock's release go in one round trip. When the
// fence fails, the outcome statement fails the transaction, and the COMMIT
// behind it is skipped.
func (e *execution) Commit(ctx context.Context, record []byte, ttl time.Duration) error {
	defer e.done()
	if err := checkExpiry("ttl", ttl); err != nil {
		e.rollback(ctx)
		return err
	}
	if e.tx == nil {
		e.rollback(ctx)
		return errors.New("idempotencypg: commit without a transaction")
	}
	e.tx.end()
	if !e.tx.begun() {
		// The handler sent no statement: nothing to commit with the
		// outcome, which is written on its own, like Complete. Should the
		// session have died meanwhile (an idle timeout, a dropped
		// connection), nothing was lost with it, so the outcome is written
		// through another connection, fenced on the token as ever, rather
		// than refused: refusing would free the key and run the handler,
		// and its calls to other systems, again.
		err := e.Discard(ctx, record, ttl)
		if err != nil && !errors.Is(err, idempotency.ErrLeaseLost) {
			err = e.s.complete(ctx, e.s.pool, e.key, e.token, record, ttl)
		}
		return err
	}
	pg := e.conn.Conn().PgConn()
	switch pg.TxStatus() {
	case 'T':
	case 'E':
		e.rollback(ctx)
		return errors.New("idempotencypg: the handler's transaction had failed (a statement in it returned an error); it was rolled back")
	default:
		// The handler ended the transaction itself (COMMIT or ROLLBACK
		// through Exec): whatever it wrote may have committed on its own.
		e.rollback(ctx)
		return fmt.Errorf("%w: the handler ended the call's transaction itself, so its writes are not tied to the outcome", idempotency.ErrCommitUnknown)
	}
	if record == nil {
		record = []byte{}
	}
	b := &pgx.Batch{}
	b.Queue(e.s.sql.commit, e.key, e.token, record, ttl.Milliseconds())
	b.Queue("COMMIT")
	if e.locked {
		b.Queue("SELECT pg_advisory_unlock($1)", e.lockID)
	}
	if e.s.testHook != nil {
		e.s.testHook("commit", e.conn.Conn())
	}
	br := e.conn.SendBatch(ctx, b)
	_, werr := br.Exec()
	tag, cerr := br.Exec()
	var uerr error
	unlocked := false
	if e.locked {
		uerr = br.QueryRow().Scan(&unlocked)
	}
	closeErr := br.Close()
	var pgErr *pgconn.PgError
	switch {
	case werr == nil && cerr == nil && tag.String() == "COMMIT":
		e.unlocked = !e.locked || (uerr == nil && closeErr == nil && unlocked)
		return nil
	case errors.As(werr, &pgErr) && pgErr.Code == "22012":
		e.rollback(ctx)
		return idempotency.ErrLeaseLost
	case werr == nil && cerr == nil:
		// COMMIT answered ROLLBACK: the transaction had failed.
		e.rollback(ctx)
		return fmt.Errorf("idempotencypg: commit: the transaction rolled back (%s)", tag)
	case errors.As(werr, &pgErr), werr == nil && errors.As(cerr, &pgErr):
		// The server refused the outcome or the commit (a deferred
		// constraint, a serialization failure): nothing committed.
		e.rollback(ctx)
		return fmt.Errorf("idempotencypg: commit: %w", pgErr)
	}
	// The connection failed somewhere in the round trip: the COMMIT may or
	// may not have been applied.
	return e.resolve(ctx, errors.Join(werr, cerr, closeErr))
}

// resolve learns whether a commit whose reply was lost happened: the
// connection is closed first, so its server session ends; then the row
// answers. A completed record of this token means it committed (only this
// call's transaction writes it). Otherwise it did not, once the session
// is known gone; while the session lives, the COMMIT may still be in
// flight, so resolve waits, and gives up with ErrCommitUnknown when ctx
// ends or the database stays unreachable.
func (e *execution) resolve(ctx context.Context, cause error) error {
	pid := e.conn.Conn().PgConn().PID()
	e.destroy()
	backoff := 5 * time.Millisecond
	for {
		var sessionAlive, committed bool
		err := e.s.pool.QueryRow(ctx, e.s.sql.resolve, pid, e.key, e.token).Scan(&sessionAlive, &committed)
		switch {
		case err == nil && committed:
			return nil
		case err == nil && !sessionAlive:
			return fmt.Errorf("idempotencypg: commit: the connection failed and the transaction did not commit: %w", cause)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w: the connection failed during the commit (%v), and the database could not tell which way it went before the complete timeout", idempotency.ErrCommitUnknown, cause)
		case <-t.C:
		}
		backoff = min(2*backoff, 200*time.Millisecond)
	}
}

// Discard implements [idempotency.Execution.Discard]: ROLLBACK, the
// outcome write or the release, and the lock's release in one round trip.
func (e *execution) Discard(ctx context.Context, record []byte, ttl time.Duration) error {
	defer e.done()
	if e.tx != nil {
		e.tx.end()
	}
	if record != nil {
		if err := checkExpiry("ttl", ttl); err != nil {
			e.rollback(ctx)
			return err
		}
	}
	b := &pgx.Batch{}
	inTx := e.conn.Conn().PgConn().TxStatus() != 'I'
	if inTx {
		b.Queue("ROLLBACK")
	}
	if record != nil {
		b.Queue(e.s.sql.complete, e.key, e.token, record, ttl.Milliseconds())
	} else {
		b.Queue(e.s.sql.release, e.key, e.token)
	}
	if e.locked {
		b.Queue("SELECT pg_advisory_unlock($1)", e.lockID)
	}
	br := e.conn.SendBatch(ctx, b)
	var rerr error
	if inTx {
		_, rerr = br.Exec()
	}
	var ok bool
	werr := br.QueryRow().Scan(&ok)
	noRow := errors.Is(werr, pgx.ErrNoRows)
	if noRow {
		werr = nil // complete: written by another call after the snapshot
	}
	unlocked := false
	var uerr error
	if e.locked {
		uerr = br.QueryRow().Scan(&unlocked)
	}
	closeErr := br.Close()
	if err := errors.Join(rerr, werr); err != nil {
		e.destroy() // its session's end rolls back and frees the lock
		return fmt.Errorf("idempotencypg: discard: %w", err)
	}
	e.unlocked = !e.locked || (uerr == nil && closeErr == nil && unlocked)
	if !ok || noRow {
		return idempotency.ErrLeaseLost
	}
	return nil
}

// rollback ends a transaction the execution will not commit, and gives the
// lock back. On any failure the connection is closed instead: the session's
// end does both.
func (e *execution) rollback(ctx context.Context) {
	if e.conn == nil {
		return
	}
	b := &pgx.Batch{}
	if e.conn.Conn().PgConn().TxStatus() != 'I' {
		b.Queue("ROLLBACK")
	}
	if e.locked && !e.unlocked {
		b.Queue("SELECT pg_advisory_unlock($1)", e.lockID)
	}
	if b.Len() == 0 {
		e.unlocked = true
		return
	}
	if err := e.conn.SendBatch(ctx, b).Close(); err != nil {
		e.destroy()
		return
	}
	e.unlocked = true
}

// done gives the connection back to the pool, or closes it when its
// session may still hold the lock or a transaction.
func (e *execution) done() {
	if e.conn == nil {
		return
	}
	if !e.unlocked || e.conn.Conn().PgConn().TxStatus() != 'I' {
		e.destroy()
		return
	}
	e.conn.Release()
	e.conn = nil
	<-e.s.slots
}

// destroy closes the connection: the server ends its session, rolling back
// its transaction and freeing its locks.
func (e *execution) destroy() {
	if e.conn == nil {
		return
	}
	c := e.conn.Hijack()
	e.conn = nil
	<-e.s.slots
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = c.Close(ctx)
}
