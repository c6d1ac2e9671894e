package idempotencypg_test

import (
	"fmt"
	"strings"

	idempotencypg "github.com/idempotency-grpc/idempotency/postgres"
)

// Schema renders the table and its index for a migration tool, under the
// table name the store is given.
func ExampleSchema() {
	sql := idempotencypg.Schema(idempotencypg.WithTable("billing.idempotency"))
	for _, line := range strings.Split(sql, "\n") {
		if strings.HasPrefix(line, "CREATE") {
			fmt.Println(line)
		}
	}
	// Output:
	// CREATE TABLE IF NOT EXISTS "billing"."idempotency" (
	// CREATE INDEX IF NOT EXISTS "idempotency_expires_at_idx" ON "billing"."idempotency" (expires_at);
}
