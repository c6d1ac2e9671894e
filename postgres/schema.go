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

// Schema returns the SQL that creates the store's table and its index, for
// a migration tool: schema.sql in this module, with the table of
// [WithTable]. It is idempotent (IF NOT EXISTS).
func Schema(opts ...Option) string {
	o := evaluate(opts)
	index := pgx.Identifier{o.table[len(o.table)-1] + "_expires_at_idx"}.Sanitize()
	return strings.NewReplacer(
		DefaultTable+"_expires_at_idx", index,
		DefaultTable, o.table.Sanitize(),
	).Replace(schemaSQL)
}

// CreateSchema creates the store's table and index if they do not exist
// (see [Schema]).
func CreateSchema(ctx context.Context, pool *pgxpool.Pool, opts ...Option) error {
	if _, err := pool.Exec(ctx, Schema(opts...)); err != nil {
		return fmt.Errorf("idempotencypg: create schema: %w", err)
	}
	return nil
}
