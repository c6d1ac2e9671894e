-- The idempotency records of github.com/idempotency-grpc/idempotency/postgres:
-- one row per scoped idempotency key. Put this in your migration tool with
-- the table name you give WithTable (the default is the one below), or let
-- CreateSchema run it.
CREATE TABLE IF NOT EXISTS idempotency_records (
    -- The store key: the hex SHA-256 of the method, scope and client key.
    key        text        PRIMARY KEY,
    -- 1 in progress, 2 completed (the outcome is in record), 3 fence (an
    -- in-progress record deleted by Forget: its token may not write back).
    state      smallint    NOT NULL CHECK (state IN (1, 2, 3)),
    -- The owner's token while in progress, the completer's once completed,
    -- the fenced owner's in a fence.
    token      text        NOT NULL,
    -- The owner holds a session advisory lock on the key (see renewed_at).
    locked     boolean     NOT NULL DEFAULT false,
    -- The encoded record (idempotency.v1.Record); NULL in a fence.
    record     bytea,
    -- The lease's end while in progress, the retention's end once
    -- completed, by the database's clock. A row past it is free.
    expires_at timestamptz NOT NULL,
    -- When the owner claimed the key or last renewed its lease (when it was
    -- completed, once completed). A locked claim is taken over before its
    -- lease ends only when its owner is known dead: its session's lock is
    -- free (the session ended) and two thirds of its lease have passed
    -- since renewed_at (its process stopped renewing, which a live one does
    -- every third). A live owner whose session alone died keeps its key.
    renewed_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    -- The owner's fencing token (idempotency.FenceFromContext), from the
    -- sequence below when the row is claimed, so it is greater for every
    -- new owner of the key whatever was deleted since; kept in a fence and
    -- in the completed row.
    fence      bigint      NOT NULL DEFAULT 0
);

-- Fencing tokens. Never cycle it, and keep CACHE 1 (the default): a cached
-- sequence hands each session its own range, out of order.
CREATE SEQUENCE IF NOT EXISTS idempotency_records_fence_seq AS bigint NO CYCLE;

-- A table created by an earlier version gains the newer columns.
ALTER TABLE idempotency_records ADD COLUMN IF NOT EXISTS renewed_at timestamptz NOT NULL DEFAULT statement_timestamp();
ALTER TABLE idempotency_records ADD COLUMN IF NOT EXISTS fence bigint NOT NULL DEFAULT 0;

-- The sweeper deletes expired rows oldest first, in bounded batches.
CREATE INDEX IF NOT EXISTS idempotency_records_expires_at_idx ON idempotency_records (expires_at);
