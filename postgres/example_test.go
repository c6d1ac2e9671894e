package idempotencypg_test

import (
	"fmt"
	"strings"

	idempotencypg "github.com/idempotency-grpc/idempotency/postgres"
)

// Schema renders the table, its sequence of fencing tokens, the columns an
// older table gains, and its index for a migration tool, under the
// table name the store is given.
func ExampleSchema() {
	sql := idempotencypg.Schema(idempotencypg.WithTable("billing.idempotency"))
	for _, line := range strings.Split(sql, "\n") {
		if strings.HasPrefix(line, "CREATE") || strings.HasPrefix(line, "ALTER") {
			fmt.Println(line)
		}
	}
	// Output:
	// CREATE TABLE IF NOT EXISTS "billing"."idempotency" (
	// CREATE SEQUENCE IF NOT EXISTS "billing"."idempotency_fence_seq" AS bigint NO CYCLE;
	// ALTER TABLE "billing"."idempotency" ADD COLUMN IF NOT EXISTS renewed_at timestamptz NOT NULL DEFAULT statement_timestamp();
	// ALTER TABLE "billing"."idempotency" ADD COLUMN IF NOT EXISTS fence bigint NOT NULL DEFAULT 0;
	// CREATE INDEX IF NOT EXISTS "idempotency_expires_at_idx" ON "billing"."idempotency" (expires_at);
}
