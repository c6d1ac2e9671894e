package idempotencypg

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Store is an [idempotency.TxStore] and [idempotency.AdminStore] on a
// Postgres table (see [Schema]). With it, [idempotency.UnaryServerInterceptor]
// runs each keyed call's handler in a transaction that the handler gets
// from [Tx], and commits the outcome record in that same transaction: the
// handler's writes to this database happen exactly once per key, crash or
// not.
//
// Every claim is one statement; every lease and TTL is counted on the
// database's clock. A claim held by a transactional call is also guarded
// by a session advisory lock: when the owner's session is gone and the
// owner has not renewed its lease for two thirds of it (its process died
// too), the next retry takes the key then rather than at the lease's end.
// An owner whose session alone died (an idle timeout, a dropped
// connection) keeps renewing, and keeps its key.
//
// The pool needs a connection per call in flight (the handler's
// transaction holds one for the whole call) plus one for lease renewals:
// size it (pool_max_conns) above the server's concurrency. The store never
// lets its calls hold the pool's last connection: a call beyond
// pool_max_conns - 1 waits for one to end, so the leases of the calls in
// flight are always renewed.
type Store struct {
	pool  *pgxpool.Pool
	table pgx.Identifier
	sql   statements
	// slots bounds the executions holding a connection at once to one
	// fewer than the pool's connections: the last one is for renewals.
	slots chan struct{}
	// testHook, when set, runs at named points of an execution (tests).
	testHook func(point string, conn *pgx.Conn)
}

// New returns the store on pool's database. It checks that the table
// exists (create it with [CreateSchema] or apply [Schema] in your
// migrations) and that the server is PostgreSQL 13 or later.
func New(ctx context.Context, pool *pgxpool.Pool, opts ...Option) (*Store, error) {
	if pool == nil {
		return nil, errors.New("idempotencypg: New: a *pgxpool.Pool is required")
	}
	o := evaluate(opts)
	maxConns := int(pool.Config().MaxConns)
	if maxConns < 2 {
		return nil, fmt.Errorf("idempotencypg: New: a pool of %d connection(s) is too small: each call in flight holds one, and lease renewals need one more (set pool_max_conns to 2 or more)", maxConns)
	}
	seq := fenceSequence(o.table).Sanitize()
	s := &Store{pool: pool, table: o.table, sql: newStatements(o.table.Sanitize(), seq), slots: make(chan struct{}, maxConns-1)}
	var version int
	var exists, sequence bool
	err := pool.QueryRow(ctx, `SELECT current_setting('server_version_num')::int, to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL`,
		o.table.Sanitize(), seq).Scan(&version, &exists, &sequence)
	if err != nil {
		return nil, fmt.Errorf("idempotencypg: New: cannot reach the database: %w", err)
	}
	if version < 130000 {
		return nil, fmt.Errorf("idempotencypg: New: PostgreSQL %d.%d is too old: the store needs 13 or later", version/10000, version%10000)
	}
	if !exists {
		return nil, fmt.Errorf("idempotencypg: New: table %s does not exist: create it with CreateSchema, or apply Schema() in your migrations", o.table.Sanitize())
	}
	var missing []string
	err = pool.QueryRow(ctx, `SELECT coalesce(array_agg(c ORDER BY c), '{}') FROM unnest($2::text[]) c
WHERE NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = c AND NOT attisdropped)`,
		o.table.Sanitize(), columns).Scan(&missing)
	if err != nil {
		return nil, fmt.Errorf("idempotencypg: New: cannot read the columns of %s: %w", o.table.Sanitize(), err)
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("idempotencypg: New: table %s lacks the columns %v: it was not made by this version's Schema(); apply the columns of schema.sql", o.table.Sanitize(), missing)
	}
	if !sequence {
		return nil, fmt.Errorf("idempotencypg: New: the sequence %s of the fencing tokens does not exist: apply this version's Schema() (CreateSchema adds it)", seq)
	}
	return s, nil
}

// columns are the columns of schema.sql the statements use.
var columns = []string{"key", "state", "token", "locked", "record", "expires_at", "renewed_at", "fence"}

// lockID is the advisory lock of key: 64 bits of the SHA-256 of the table
// and the key. Two keys sharing one (a 2^-64 chance per pair) only lose the
// early takeover, never the fencing.
func (s *Store) lockID(key string) int64 {
	h := sha256.New()
	h.Write([]byte(s.table.Sanitize()))
	h.Write([]byte{0})
	h.Write([]byte(key))
	return int64(binary.BigEndian.Uint64(h.Sum(nil)))
}

func checkExpiry(what string, d time.Duration) error {
	if d < time.Millisecond {
		return fmt.Errorf("idempotencypg: a %s of %v is below 1ms, the least the store keeps; nothing was written", what, d)
	}
	return nil
}

// checkToken refuses an empty owner token, as every store does (see
// [idempotency.Store]).
func checkToken(token string) error {
	if token == "" {
		return errors.New("idempotencypg: an empty owner token is refused; nothing was written")
	}
	return nil
}

// querier is a pool or a connection.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// attempts bounds the re-runs of a statement that met a row written by a
// concurrent statement after its snapshot (it then sees no row at all).
const attempts = 5

// claim runs the claim statement on q. keep asks for the session lock of
// a transactional claim.
func (s *Store) claim(ctx context.Context, q querier, key, token string, record []byte, lease time.Duration, keep bool) (res idempotency.ClaimResult, locked bool, err error) {
	if err := checkExpiry("lease", lease); err != nil {
		return res, false, err
	}
	if err := checkToken(token); err != nil {
		return res, false, err
	}
	if record == nil {
		record = []byte{}
	}
	for range attempts {
		var outcome int
		var ttl, fence int64
		var stored []byte
		err = q.QueryRow(ctx, s.sql.claim, key, token, record, lease.Milliseconds(), s.lockID(key), keep).
			Scan(&outcome, &locked, &stored, &ttl, &fence)
		if errors.Is(err, pgx.ErrNoRows) {
			continue
		}
		if err != nil {
			return res, false, fmt.Errorf("idempotencypg: claim: %w", err)
		}
		switch outcome {
		case claimTaken:
			return idempotency.ClaimResult{Claimed: true, Fence: uint64(fence)}, locked, nil
		case claimFenced:
			return res, false, idempotency.ErrLeaseLost
		}
		if stored == nil {
			stored = []byte{} // a row without a record: the interceptor reports it corrupt
		}
		return idempotency.ClaimResult{Record: stored, TTL: time.Duration(max(ttl, 1)) * time.Millisecond, Fence: uint64(fence)}, false, nil
	}
	return res, false, fmt.Errorf("idempotencypg: claim: the key changed under %d attempts in a row", attempts)
}

// Claim implements [idempotency.Store.Claim] in one statement.
func (s *Store) Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (idempotency.ClaimResult, error) {
	res, _, err := s.claim(ctx, s.pool, key, token, record, lease, false)
	return res, err
}

// Renew implements [idempotency.Store.Renew].
func (s *Store) Renew(ctx context.Context, key, token string, lease time.Duration) error {
	if err := checkExpiry("lease", lease); err != nil {
		return err
	}
	if err := checkToken(token); err != nil {
		return err
	}
	tag, err := s.pool.Exec(ctx, s.sql.renew, key, token, lease.Milliseconds())
	if err != nil {
		return fmt.Errorf("idempotencypg: renew: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return idempotency.ErrLeaseLost
	}
	return nil
}

// RenewBatch implements [idempotency.BatchRenewer]: one UPDATE for every
// key, so the server's renewer renews all the leases that are due in one
// round trip.
func (s *Store) RenewBatch(ctx context.Context, keys, tokens []string, lease time.Duration) []error {
	errs := make([]error, len(keys))
	fail := func(err error) []error {
		for i := range errs {
			errs[i] = err
		}
		return errs
	}
	if err := checkExpiry("lease", lease); err != nil {
		return fail(err)
	}
	if len(tokens) != len(keys) {
		return fail(fmt.Errorf("idempotencypg: renew: %d keys but %d tokens", len(keys), len(tokens)))
	}
	if slices.Contains(tokens, "") {
		// A caller's bug: Renew refuses each empty token.
		for i := range keys {
			errs[i] = s.Renew(ctx, keys[i], tokens[i], lease)
		}
		return errs
	}
	rows, err := s.pool.Query(ctx, s.sql.renewBatch, keys, tokens, lease.Milliseconds())
	if err != nil {
		return fail(fmt.Errorf("idempotencypg: renew: %w", err))
	}
	// By key and token: one key may come twice, under its owner's token and
	// a stale one (an older call on this server whose lease was taken).
	type pair struct{ key, token string }
	renewed, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (pair, error) {
		var p pair
		err := row.Scan(&p.key, &p.token)
		return p, err
	})
	if err != nil {
		return fail(fmt.Errorf("idempotencypg: renew: %w", err))
	}
	done := make(map[pair]bool, len(renewed))
	for _, p := range renewed {
		done[p] = true
	}
	for i := range keys {
		if !done[pair{keys[i], tokens[i]}] {
			errs[i] = idempotency.ErrLeaseLost
		}
	}
	return errs
}

// Complete implements [idempotency.Store.Complete].
func (s *Store) Complete(ctx context.Context, key, token string, record []byte, ttl time.Duration) error {
	return s.complete(ctx, s.pool, key, token, record, ttl)
}

func (s *Store) complete(ctx context.Context, q querier, key, token string, record []byte, ttl time.Duration) error {
	if err := checkExpiry("ttl", ttl); err != nil {
		return err
	}
	if err := checkToken(token); err != nil {
		return err
	}
	if record == nil {
		record = []byte{}
	}
	var ok bool
	err := q.QueryRow(ctx, s.sql.complete, key, token, record, ttl.Milliseconds()).Scan(&ok)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return idempotency.ErrLeaseLost // written by another call after the snapshot
	case err != nil:
		return fmt.Errorf("idempotencypg: complete: %w", err)
	case !ok:
		return idempotency.ErrLeaseLost
	}
	return nil
}

// Release implements [idempotency.Store.Release].
func (s *Store) Release(ctx context.Context, key, token string) error {
	return s.release(ctx, s.pool, key, token)
}

func (s *Store) release(ctx context.Context, q querier, key, token string) error {
	if err := checkToken(token); err != nil {
		return err
	}
	var ok bool
	if err := q.QueryRow(ctx, s.sql.release, key, token).Scan(&ok); err != nil {
		return fmt.Errorf("idempotencypg: release: %w", err)
	}
	if !ok {
		return idempotency.ErrLeaseLost
	}
	return nil
}

// Get implements [idempotency.AdminStore.Get].
func (s *Store) Get(ctx context.Context, key string) ([]byte, time.Duration, error) {
	var record []byte
	var ttl int64
	err := s.pool.QueryRow(ctx, s.sql.get, key).Scan(&record, &ttl)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, 0, idempotency.ErrNoRecord
	}
	if err != nil {
		return nil, 0, fmt.Errorf("idempotencypg: get: %w", err)
	}
	if record == nil {
		record = []byte{}
	}
	return record, time.Duration(max(ttl, 1)) * time.Millisecond, nil
}

// Delete implements [idempotency.AdminStore.Delete]: a completed record is
// deleted; an in-progress one becomes a fence on its owner's token for the
// rest of its lease.
func (s *Store) Delete(ctx context.Context, key string) error {
	var ok bool
	if err := s.pool.QueryRow(ctx, s.sql.forget, key).Scan(&ok); err != nil {
		return fmt.Errorf("idempotencypg: delete: %w", err)
	}
	if !ok {
		return idempotency.ErrNoRecord
	}
	return nil
}

var (
	_ idempotency.TxStore      = (*Store)(nil)
	_ idempotency.AdminStore   = (*Store)(nil)
	_ idempotency.BatchRenewer = (*Store)(nil)
)
