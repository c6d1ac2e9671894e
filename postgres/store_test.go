package idempotencypg

import (
	"strings"

	"github.com/stretchr/testify/require"
	"testing"

	"github.com/idempotency-grpc/idempotency/idempotencytest"
)

// TestConformance runs the public Store contract against a real Postgres,
// in real time (the store's clock is the database's).
func TestConformance(t *testing.T) {
	idempotencytest.RunStoreTests(t, func(t *testing.T) idempotencytest.Harness {
		s, _ := testStore(t)
		return idempotencytest.Harness{Store: s}
	})
}

func TestNewSaysWhatIsMissing(t *testing.T) {
	_, pool := testStore(t)
	ctx := testCtx(t)
	_, err := New(ctx, pool, WithTable("no_such_table"))
	require.ErrorContains(t, err, `table "no_such_table" does not exist: create it with CreateSchema, or apply Schema() in your migrations`)
	_, err = New(ctx, nil)
	require.ErrorContains(t, err, "a *pgxpool.Pool is required")
	for _, bad := range []string{"", "a.b.c", "1abc", "drop table x;", "a-b", strings.Repeat("x", 64)} {
		require.Panics(t, func() { WithTable(bad) }, bad)
	}
	require.NotPanics(t, func() { WithTable("billing.Idempotency_Records") })
}
