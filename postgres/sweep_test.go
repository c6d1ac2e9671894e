package idempotencypg

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// insertRows adds n rows that expired (or expire) at offset from now.
func insertRows(t testing.TB, s *Store, prefix string, n int, offset time.Duration) {
	t.Helper()
	_, err := s.pool.Exec(testCtx(t), `INSERT INTO `+s.table.Sanitize()+` (key, state, token, record, expires_at)
SELECT $1 || g, 2, 'tok', '\x0801'::bytea, statement_timestamp() + $2::bigint * interval '1 millisecond'
FROM generate_series(1, $3) g`, prefix, offset.Milliseconds(), n)
	require.NoError(t, err)
}

func countRows(t testing.TB, s *Store, where string) int {
	t.Helper()
	var n int
	require.NoError(t, s.pool.QueryRow(testCtx(t), `SELECT count(*) FROM `+s.table.Sanitize()+` WHERE `+where).Scan(&n))
	return n
}

func TestSweepDeletesOnlyExpiredRowsInBatches(t *testing.T) {
	s, _ := testStore(t)
	insertRows(t, s, "old-", 2500, -time.Hour)
	insertRows(t, s, "live-", 100, time.Hour)
	ctx := testCtx(t)
	n, err := s.Sweep(ctx, 1000)
	require.NoError(t, err)
	require.Equal(t, 1000, n)
	require.Equal(t, 1600, countRows(t, s, "true"))

	_, err = s.Sweep(ctx, 0)
	require.ErrorContains(t, err, "outside 1..")
	require.ErrorContains(t, s.RunSweeper(ctx, 0, 10, nil), "below 1ms")

	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.RunSweeper(sctx, time.Hour, 500, func(err error) { t.Errorf("sweep: %v", err) }) }()
	deadline := time.Now().Add(30 * time.Second)
	for countRows(t, s, "expires_at <= now()") > 0 {
		require.True(t, time.Now().Before(deadline), "the sweeper left expired rows behind")
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)
	require.Equal(t, 100, countRows(t, s, "true"), "a live row was swept")
}

// BenchmarkSweep measures the sweep rate: expired rows deleted per second
// in batches of 1,000 (the rows are inserted outside the timer).
func BenchmarkSweep(b *testing.B) {
	s, _ := testStore(b)
	const rows = 20_000
	ctx := context.Background()
	deleted := 0
	var elapsed time.Duration
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		insertRows(b, s, fmt.Sprintf("r%d-", i), rows, -time.Minute)
		start := time.Now()
		b.StartTimer()
		for {
			n, err := s.Sweep(ctx, 1000)
			if err != nil {
				b.Fatal(err)
			}
			deleted += n
			if n < 1000 {
				break
			}
		}
		elapsed += time.Since(start)
	}
	b.ReportMetric(float64(deleted)/elapsed.Seconds(), "rows/s")
}
