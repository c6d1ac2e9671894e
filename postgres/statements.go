package idempotencypg

import "strings"

// The state column: 1 in progress, 2 completed, 3 fence (see schema.sql).

// statements are the store's SQL for one table. Every lease and TTL is
// counted on the database's clock (statement_timestamp(), the start of the
// statement, also inside the handler's long transaction), so the clocks of
// the application servers never matter.
type statements struct {
	claim, renew, renewBatch, complete, release, get, forget, commit, sweep, resolve string
}

// claimOutcome values of the claim statement's first column.
const (
	claimTaken  = 1 // claimed; locked says whether the session lock is held
	claimStored = 2 // not claimed: record is what the key holds
	claimFenced = 3 // token was fenced off by Forget
)

// writeOutcome is the fenced write of a completed record that complete
// and commit share: it stores the record when the key is free (absent or
// expired) or held by the token, and names the row written "c".
const writeOutcome = `WITH c AS (
  INSERT INTO {table} AS r (key, state, token, locked, record, expires_at, renewed_at)
  VALUES ($1, 2, $2, false, $3::bytea, statement_timestamp() + $4::bigint * interval '1 millisecond', statement_timestamp())
  ON CONFLICT (key) DO UPDATE
  SET state = 2, token = excluded.token, locked = false, record = excluded.record, expires_at = excluded.expires_at, renewed_at = excluded.renewed_at
  WHERE r.expires_at <= statement_timestamp() OR (r.state = 1 AND r.token = excluded.token)
  RETURNING 1
)
`

func newStatements(table, seq string) statements {
	r := strings.NewReplacer("{table}", table, "{seq}", seq)
	return statements{
		// One statement. l takes the key's advisory lock for the length of
		// the statement, if nobody holds it. An in-progress row whose owner
		// took the lock in its session ("locked") is taken over before its
		// lease ends only when the owner is known dead: that lock is free
		// (its session is gone) and it has not renewed its lease for two
		// thirds of it (its process is gone too: a live one renews every
		// quarter, and retries a failed renewal within a sixteenth). A session can die under a live process (an idle timeout,
		// a proxy dropping the connection); such an owner keeps renewing,
		// and keeps its key until it answers. $6
		// asks for the lock to be kept for the session of a transactional
		// claim: RETURNING takes it (re-entrant, so it cannot fail while l
		// holds it) only when the row was written with locked true. A key
		// written by a concurrent claim after this statement's snapshot
		// gives no row; the caller runs the statement again. The fence of a
		// takeover is drawn once the row is locked, after the previous
		// owner's claim committed, so it is greater than that owner's; a
		// new row's is drawn just before it is inserted (see the README,
		// "Fencing a handler's writes", for the one gap that leaves).
		claim: r.Replace(`WITH l AS (SELECT pg_try_advisory_xact_lock($5::bigint) AS free),
c AS (
  INSERT INTO {table} AS r (key, state, token, locked, record, expires_at, renewed_at, fence)
  SELECT $1, 1, $2, $6::boolean AND l.free, $3::bytea, statement_timestamp() + $4::bigint * interval '1 millisecond', statement_timestamp(), nextval('{seq}') FROM l
  ON CONFLICT (key) DO UPDATE
  SET state = 1, token = excluded.token, locked = excluded.locked, record = excluded.record, expires_at = excluded.expires_at, renewed_at = excluded.renewed_at,
      fence = CASE WHEN r.state = 1 AND r.token = excluded.token AND r.expires_at > statement_timestamp() THEN r.fence ELSE nextval('{seq}') END
  WHERE r.expires_at <= statement_timestamp()
     OR (r.state = 3 AND r.token <> excluded.token)
     OR (r.state = 1 AND r.locked AND (SELECT free FROM l)
         AND statement_timestamp() >= r.renewed_at + (r.expires_at - r.renewed_at) * 2 / 3)
     OR ($6::boolean AND r.state = 1 AND r.token = excluded.token)
  RETURNING CASE WHEN r.locked THEN pg_try_advisory_lock($5::bigint) ELSE false END AS locked, r.fence
)
SELECT 1, c.locked, NULL::bytea, 0::bigint, c.fence FROM c
UNION ALL
SELECT CASE WHEN r.state = 3 AND r.token = $2 THEN 3 ELSE 2 END, false, r.record,
       ceil(extract(epoch FROM r.expires_at - statement_timestamp()) * 1000)::bigint,
       CASE WHEN r.state = 1 THEN r.fence ELSE 0 END
FROM {table} r WHERE r.key = $1 AND NOT EXISTS (SELECT 1 FROM c)`),

		renew: r.Replace(`UPDATE {table} SET expires_at = statement_timestamp() + $3::bigint * interval '1 millisecond', renewed_at = statement_timestamp()
WHERE key = $1 AND state = 1 AND token = $2 AND expires_at > statement_timestamp()`),

		// Every (key, token) pair at once; the pairs renewed come back.
		renewBatch: r.Replace(`UPDATE {table} AS r SET expires_at = statement_timestamp() + $3::bigint * interval '1 millisecond', renewed_at = statement_timestamp()
FROM unnest($1::text[], $2::text[]) AS u(key, token)
WHERE r.key = u.key AND r.token = u.token AND r.state = 1 AND r.expires_at > statement_timestamp()
RETURNING r.key, r.token`),

		// true: written, or already completed by token (idempotent); false:
		// another owner, a completed record of another token, or token's
		// fence. No row: written by a concurrent call after the snapshot,
		// so not token's.
		complete: r.Replace(writeOutcome + `SELECT true FROM c
UNION ALL
SELECT r.state = 2 AND r.token = $2 FROM {table} r WHERE r.key = $1 AND NOT EXISTS (SELECT 1 FROM c)`),

		// true: deleted, or no live record (already gone); false: a live
		// record that is not token's in-progress one.
		release: r.Replace(`WITH d AS (
  DELETE FROM {table} r WHERE r.key = $1 AND ((r.state = 1 AND r.token = $2) OR r.expires_at <= statement_timestamp())
  RETURNING r.state, r.token
)
SELECT EXISTS (SELECT 1 FROM d WHERE d.state = 1 AND d.token = $2)
    OR NOT EXISTS (SELECT 1 FROM {table} r WHERE r.key = $1 AND r.expires_at > statement_timestamp())`),

		get: r.Replace(`SELECT record, ceil(extract(epoch FROM expires_at - statement_timestamp()) * 1000)::bigint
FROM {table} WHERE key = $1 AND state IN (1, 2) AND expires_at > statement_timestamp()`),

		// An in-progress record becomes a fence on its owner's token for the
		// rest of its lease; a completed one is deleted.
		forget: r.Replace(`WITH f AS (
  UPDATE {table} SET state = 3, record = NULL, locked = false
  WHERE key = $1 AND state = 1 AND expires_at > statement_timestamp() RETURNING 1
), d AS (
  DELETE FROM {table} WHERE key = $1 AND state = 2 AND expires_at > statement_timestamp() RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM f) OR EXISTS (SELECT 1 FROM d)`),

		// The outcome, written in the handler's transaction and fenced on
		// the token like complete. When the fence fails the division by
		// zero aborts the transaction, so the COMMIT queued behind it in the
		// same round trip never runs.
		commit: r.Replace(writeOutcome + `SELECT 1 / (SELECT count(*)::int FROM c)`),

		// Oldest first, skipping rows a claim holds locked right now.
		sweep: r.Replace(`DELETE FROM {table} WHERE key IN (
  SELECT key FROM {table} WHERE expires_at <= statement_timestamp()
  ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)`),

		// Whether a commit whose reply was lost happened: is the owner's
		// session still alive (its COMMIT may be in flight), and is the key
		// completed by the owner's token (it committed).
		resolve: r.Replace(`SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1),
       COALESCE((SELECT state = 2 AND token = $3 FROM {table} WHERE key = $2), false)`),
	}
}
