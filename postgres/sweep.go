package idempotencypg

import (
	"context"
	"fmt"
	"time"
)

// MaxSweepBatch is the largest batch [Store.Sweep] accepts: a bigger
// DELETE holds its row locks and its WAL longer than a sweep should.
const MaxSweepBatch = 100_000

// Sweep deletes up to batch expired records (completed records past their
// TTL, in-progress claims past their lease, fences), oldest first, through
// the index on expires_at, and returns how many it deleted. Rows locked by
// a claim at that moment are skipped, never waited for. Expired rows are
// already free for new claims; deleting them only keeps the table small.
func (s *Store) Sweep(ctx context.Context, batch int) (int, error) {
	if batch < 1 || batch > MaxSweepBatch {
		return 0, fmt.Errorf("idempotencypg: Sweep: a batch of %d is outside 1..%d", batch, MaxSweepBatch)
	}
	tag, err := s.pool.Exec(ctx, s.sql.sweep, batch)
	if err != nil {
		return 0, fmt.Errorf("idempotencypg: sweep: %w", err)
	}
	return int(tag.RowsAffected()), nil
}

// RunSweeper deletes expired records until ctx ends, so the table never
// grows without bound: batches of batch rows back to back while they come
// back full (a backlog), then one batch every interval. A failed batch is
// passed to onError (when not nil) and tried again after interval. It
// returns ctx's error, or an error at once for an interval below 1ms or a
// batch outside 1..[MaxSweepBatch].
//
// Run it in one or more servers (concurrent sweepers skip each other's
// rows), or from cron with cmd/idempotency-sweep.
func (s *Store) RunSweeper(ctx context.Context, interval time.Duration, batch int, onError func(error)) error {
	if interval < time.Millisecond {
		return fmt.Errorf("idempotencypg: RunSweeper: an interval of %v is below 1ms", interval)
	}
	if batch < 1 || batch > MaxSweepBatch {
		return fmt.Errorf("idempotencypg: RunSweeper: a batch of %d is outside 1..%d", batch, MaxSweepBatch)
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		n, err := s.Sweep(ctx, batch)
		switch {
		case err != nil && ctx.Err() == nil:
			if onError != nil {
				onError(err)
			}
			t.Reset(interval)
		case ctx.Err() != nil:
			return ctx.Err()
		case n == batch:
			t.Reset(0) // more are waiting
		default:
			t.Reset(interval)
		}
	}
}
