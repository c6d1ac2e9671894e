package idempotencypg

import (
	"context"
	"errors"
	"fmt"
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

// TestTxConformance runs the public TxStore contract: a business table of
// its own per rule, written through Tx(ctx).
func TestTxConformance(t *testing.T) {
	idempotencytest.RunTxStoreTests(t, func(t *testing.T) idempotencytest.TxHarness {
		s, pool := testStore(t)
		table := fmt.Sprintf("business_%d", tables.Add(1))
		_, err := pool.Exec(testCtx(t), `CREATE TABLE `+table+` (id bigserial PRIMARY KEY)`)
		require.NoError(t, err)
		return idempotencytest.TxHarness{
			Store: s,
			Write: func(ctx context.Context) error {
				tx := Tx(ctx)
				if tx == nil {
					return errors.New("no transaction in the context")
				}
				_, err := tx.Exec(ctx, `INSERT INTO `+table+` DEFAULT VALUES`)
				return err
			},
			Writes: func(t *testing.T) int {
				var n int
				require.NoError(t, pool.QueryRow(testCtx(t), `SELECT count(*) FROM `+table).Scan(&n))
				return n
			},
		}
	})
}
