package idempotencypg

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// pausedStore is the store as a paused owner's process sees it: its lease
// renewals hang until resume is closed (a GC pause, a stalled VM stops the
// renewer too). RenewBatch answers nil, so the renewer falls back to Renew.
type pausedStore struct {
	*Store
	resume chan struct{}
}

func (p *pausedStore) Renew(ctx context.Context, key, token string, lease time.Duration) error {
	<-p.resume
	return p.Store.Renew(ctx, key, token, lease)
}

func (p *pausedStore) RenewBatch(context.Context, []string, []string, time.Duration) []error {
	return nil
}

// TestFenceRefusesStaleOwner is issue 26's proof on Postgres: the first
// owner of a key is paused past its lease (its handler held at a gate, its
// renewals held too) while a second owner, through a second store on the
// same table, takes the key over once the lease expired on the database's
// clock, writes its ledger row and finishes. Then the first owner wakes and
// writes its row with its own (older) fence. The ledger write is the
// README's recipe, made outside the call's transaction (as a write to
// another database or service would be, where the store's commit fence
// cannot reach): the late write is refused, and the ledger holds one row,
// the second owner's, although both wrote.
func TestFenceRefusesStaleOwner(t *testing.T) {
	t.Parallel()
	storeA, pool := testStore(t)
	ctx := testCtx(t)
	storeB, err := New(ctx, pool, WithTable(strings.Join(storeA.table, ".")))
	require.NoError(t, err)
	ledger := fmt.Sprintf("ledger_%d", tables.Add(1))
	_, err = pool.Exec(ctx, `CREATE TABLE `+ledger+` (key text PRIMARY KEY, writer text NOT NULL, fence bigint NOT NULL)`)
	require.NoError(t, err)
	var attempts int
	var mu sync.Mutex
	write := func(ctx context.Context, key, writer string) error {
		fence, ok := idempotency.FenceFromContext(ctx)
		if !ok {
			return errors.New("the owner's context has no fence")
		}
		mu.Lock()
		attempts++
		mu.Unlock()
		tag, err := pool.Exec(ctx, `INSERT INTO `+ledger+` (key, writer, fence) VALUES ($1, $2, $3)
ON CONFLICT (key) DO UPDATE SET writer = excluded.writer, fence = excluded.fence
WHERE `+ledger+`.fence < excluded.fence`, key, writer, int64(fence))
		if err != nil {
			return status.Errorf(codes.Unavailable, "ledger: %v", err)
		}
		if tag.RowsAffected() == 0 {
			return status.Error(codes.Aborted, "a newer owner of the key has written: this one is stale")
		}
		return nil
	}

	const lease = 1500 * time.Millisecond
	paused := &pausedStore{Store: storeA, resume: make(chan struct{})}
	var once sync.Once
	wake := func() { once.Do(func() { close(paused.resume) }) }
	t.Cleanup(wake)
	first := idempotency.NewProtocol(paused, idempotency.WithLease(lease))
	second := idempotency.NewProtocol(storeB, idempotency.WithLease(lease))
	const work, key = "test.Charge", "pay-1"
	req := &testingv1.DoRequest{Id: "charge-1"}

	started := make(chan uint64, 1)
	gate := make(chan struct{})
	firstErr := make(chan error, 1)
	go func() {
		_, _, err := idempotency.Do(ctx, first, work, key, req, func(ctx context.Context) (*testingv1.DoResponse, error) {
			fence, _ := idempotency.FenceFromContext(ctx)
			started <- fence
			<-gate // paused past the lease
			if err := write(ctx, key, "first"); err != nil {
				return nil, err
			}
			return &testingv1.DoResponse{Id: "first"}, nil
		})
		firstErr <- err
	}()
	var firstFence uint64
	select {
	case firstFence = <-started:
	case <-ctx.Done():
		t.Fatal("the first owner's handler never started")
	}
	require.NotZero(t, firstFence, "the first owner's context has no fence")

	// The lease runs out on the database's clock while the owner is paused.
	storeKey := idempotency.StoreKey(work, "", key)
	for {
		var expired bool
		require.NoError(t, pool.QueryRow(ctx, `SELECT expires_at <= statement_timestamp() FROM `+storeA.table.Sanitize()+` WHERE key = $1`, storeKey).Scan(&expired))
		if expired {
			break
		}
		require.NoError(t, ctx.Err(), "the paused owner's lease never expired")
		time.Sleep(10 * time.Millisecond)
	}

	var secondFence uint64
	resp, replayed, err := idempotency.Do(ctx, second, work, key, req, func(ctx context.Context) (*testingv1.DoResponse, error) {
		secondFence, _ = idempotency.FenceFromContext(ctx)
		if err := write(ctx, key, "second"); err != nil {
			return nil, err
		}
		return &testingv1.DoResponse{Id: "second"}, nil
	})
	require.NoError(t, err, "the second owner after the lease")
	require.False(t, replayed, "the second owner after the lease was answered with a replay")
	require.Equal(t, "second", resp.GetId())
	require.Greater(t, secondFence, firstFence, "the second owner's fence must be greater than the paused owner's")

	close(gate)
	wake()
	select {
	case err = <-firstErr:
	case <-ctx.Done():
		t.Fatal("the first owner never finished")
	}
	require.Equal(t, codes.Aborted, status.Code(err), "the stale owner's answer: %v", err)
	require.Equal(t, 2, attempts, "ledger writes attempted (the scenario did not pause the first owner past its lease)")
	var rows int
	var writer string
	var fence int64
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*), min(writer), min(fence) FROM `+ledger).Scan(&rows, &writer, &fence))
	require.Equal(t, 1, rows, "ledger rows: duplicates")
	require.Equal(t, "second", writer, "the row kept")
	require.Equal(t, int64(secondFence), fence, "the row's fence")

	again, replayed, err := idempotency.Do(ctx, second, work, key, req, func(context.Context) (*testingv1.DoResponse, error) {
		return nil, errors.New("ran again")
	})
	require.NoError(t, err)
	require.True(t, replayed && again.GetId() == "second", "a retry after both: %v, replayed %v; want the second owner's outcome", again, replayed)
}
