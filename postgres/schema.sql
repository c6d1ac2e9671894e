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
    renewed_at timestamptz NOT NULL DEFAULT statement_timestamp()
);

-- The sweeper deletes expired rows oldest first, in bounded batches.
CREATE INDEX IF NOT EXISTS idempotency_records_expires_at_idx ON idempotency_records (expires_at);
