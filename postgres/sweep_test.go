package idempotencypg

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
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

// The sweeper never deletes a live record, however it races the claims and
// renewals that make expired rows live again: sweeps back to back against
// 32 keys claimed with 30ms leases and renewed every 5ms (claimed again
// under a new token when a renewal finds the lease gone), for 1.5s. A
// trigger records every row the sweeper deletes whose lease or TTL had not
// ended when the sweep began (only the sweeper deletes here).
func TestSweepNeverDeletesALiveRecord(t *testing.T) {
	s, pool := testStore(t)
	ctx := testCtx(t)
	table := s.table.Sanitize()
	name := s.table[len(s.table)-1]
	_, err := pool.Exec(ctx, `CREATE TABLE `+name+`_live_deleted (key text, expires_at timestamptz, swept_at timestamptz);
CREATE FUNCTION `+name+`_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.expires_at > statement_timestamp() THEN
    INSERT INTO `+name+`_live_deleted VALUES (OLD.key, OLD.expires_at, statement_timestamp());
  END IF;
  RETURN OLD;
END $$;
CREATE TRIGGER `+name+`_check AFTER DELETE ON `+table+` FOR EACH ROW EXECUTE FUNCTION `+name+`_check();`)
	require.NoError(t, err)

	const keys, lease = 32, 30 * time.Millisecond
	end := time.Now().Add(1500 * time.Millisecond)
	var swept, lost, renewed atomic.Int64
	var wg sync.WaitGroup
	for k := range keys {
		wg.Go(func() {
			key := fmt.Sprintf("live-%02d", k)
			for gen := 0; time.Now().Before(end); gen++ {
				token := fmt.Sprintf("%s-%d", key, gen)
				res, err := s.Claim(ctx, key, token, []byte("in progress"), lease)
				if err != nil || !res.Claimed {
					time.Sleep(2 * time.Millisecond)
					continue
				}
				for time.Now().Before(end) {
					time.Sleep(5 * time.Millisecond)
					if err := s.Renew(ctx, key, token, lease); err != nil {
						lost.Add(1)
						break
					}
					renewed.Add(1)
				}
			}
		})
	}
	wg.Go(func() {
		for time.Now().Before(end) {
			n, err := s.Sweep(ctx, 1000)
			if err != nil {
				t.Errorf("sweep: %v", err)
				return
			}
			swept.Add(int64(n))
		}
	})
	wg.Wait()
	var live int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM `+name+`_live_deleted`).Scan(&live))
	t.Logf("%d renewals, %d leases lost, %d expired rows swept, %d live rows swept", renewed.Load(), lost.Load(), swept.Load(), live)
	require.Zero(t, live, "live records the sweeper deleted")
	require.Positive(t, swept.Load(), "the sweeper never raced an expired lease: the test proves nothing")
}
