package idempotencypg

import (
	"strings"
	"testing"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Rows the store cannot read (damaged by hand, or by another program) are
// answered DATA_LOSS with reason RECORD_CORRUPT, like damaged Redis
// records: the handler never runs again on them, and nothing panics.
func TestHostileRowsAnswerDataLoss(t *testing.T) {
	b := newBank(t)
	ctx := testCtx(t)
	for name, set := range map[string]string{
		"garbage record":         `record = '\xdeadbeef'::bytea`,
		"no record":              `record = NULL`,
		"empty record":           `record = ''::bytea`,
		"record without a state": `state = 2, record = '\x0801'::bytea`,
		"completed, truncated":   `state = 2, record = substring(record from 1 for 5)`,
	} {
		t.Run(name, func(t *testing.T) {
			key := "hostile-" + strings.ReplaceAll(name, " ", "-")
			_, _, err := b.charge(ctx, key, 1)
			require.NoError(t, err)
			sk := idempotency.StoreKey(testservice.MethodCharge, "", key)
			_, err = b.pool.Exec(ctx, `UPDATE `+b.store.table.Sanitize()+` SET `+set+` WHERE key = $1`, sk)
			require.NoError(t, err)
			runs := b.svc.Runs.Load()
			_, _, err = b.charge(ctx, key, 1)
			require.Equal(t, codes.DataLoss, status.Code(err), "%v", err)
			require.Equal(t, idempotency.ReasonRecordCorrupt, idempotency.ReasonOf(err))
			require.Equal(t, runs, b.svc.Runs.Load(), "the handler ran on a damaged record")
		})
	}
}
