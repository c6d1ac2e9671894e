package idempotencypg

import (
	"context"
	_ "embed"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

//go:embed schema.sql
var schemaSQL string

// Schema returns the SQL that creates the store's table, its index and the
// sequence of its fencing tokens (adding the fence column to a table
// created by an earlier version), for
// a migration tool: schema.sql in this module, with the table of
// [WithTable]. It is idempotent (IF NOT EXISTS).
func Schema(opts ...Option) string {
	o := evaluate(opts)
	index := pgx.Identifier{o.table[len(o.table)-1] + "_expires_at_idx"}.Sanitize()
	return strings.NewReplacer(
		DefaultTable+"_expires_at_idx", index,
		DefaultTable+"_fence_seq", fenceSequence(o.table).Sanitize(),
		DefaultTable, o.table.Sanitize(),
	).Replace(schemaSQL)
}

// fenceSequence is the sequence of table's fencing tokens: the table's
// name with _fence_seq, in the table's schema.
func fenceSequence(table pgx.Identifier) pgx.Identifier {
	seq := append(pgx.Identifier{}, table...)
	seq[len(seq)-1] += "_fence_seq"
	return seq
}

// CreateSchema creates the store's table, index and sequence if they do
// not exist, and adds the fence column to an older table (see [Schema]).
func CreateSchema(ctx context.Context, pool *pgxpool.Pool, opts ...Option) error {
	if _, err := pool.Exec(ctx, Schema(opts...)); err != nil {
		return fmt.Errorf("idempotencypg: create schema: %w", err)
	}
	return nil
}
