package idempotencytest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/stretchr/testify/require"
)

// TxHarness is one [idempotency.TxStore] under test, and the business
// writes its transactions carry.
type TxHarness struct {
	// Store is the store under test, empty (or in a namespace of its own).
	Store idempotency.TxStore
	// Write makes one business write inside the transaction that ctx (a
	// context returned by Execution.Begin) carries, e.g. an INSERT through
	// the store's own accessor of the transaction.
	Write func(ctx context.Context) error
	// Writes counts the business writes committed so far.
	Writes func(t *testing.T) int
	// Advance moves the store's clock, as in [Harness]; nil waits in real
	// time.
	Advance func(d time.Duration)
}

// RunTxStoreTests runs the [idempotency.TxStore] contract against the
// stores newStore makes, once per rule: the handler's writes commit with
// the outcome or not at all, the fence on the token rolls everything back,
// and one claim at a time gets an Execution. A TxStore must pass
// [RunStoreTests] too.
func RunTxStoreTests(t *testing.T, newStore func(t *testing.T) TxHarness) {
	t.Helper()
	for _, r := range txRules {
		t.Run(r.name, func(t *testing.T) {
			h := newStore(t)
			require.NotNil(t, h.Store, "the harness has no store")
			require.NotNil(t, h.Write, "the harness has no Write")
			require.NotNil(t, h.Writes, "the harness has no Writes")
			r.run(&txRun{run: run{t: t, h: Harness{Store: h.Store, Advance: h.Advance}, ctx: context.Background()}, tx: h})
		})
	}
}

type txRun struct {
	run
	tx TxHarness
}

// claimTx claims key for a transactional run, failing the rule unless it
// was claimed with an Execution.
func (r *txRun) claimTx(rule, key, token string, lease time.Duration) idempotency.Execution {
	r.t.Helper()
	res, ex, err := r.tx.Store.ClaimTx(r.ctx, key, token, []byte("in progress"), lease)
	require.NoError(r.t, err, "%s: ClaimTx", rule)
	require.True(r.t, res.Claimed, "%s: ClaimTx of a free key returned Claimed=false (record %q)", rule, res.Record)
	require.NotNil(r.t, ex, "%s: ClaimTx claimed without an Execution", rule)
	return ex
}

// begin starts ex's transaction and makes n business writes in it.
func (r *txRun) begin(rule string, ex idempotency.Execution, n int) {
	r.t.Helper()
	ctx, err := ex.Begin(r.ctx)
	require.NoError(r.t, err, "%s: Begin", rule)
	for range n {
		require.NoError(r.t, r.tx.Write(ctx), "%s: a business write in the transaction", rule)
	}
}

func (r *txRun) writes(rule string, want int) {
	r.t.Helper()
	require.Equal(r.t, want, r.tx.Writes(r.t), "%s: committed business writes", rule)
}

type txRule struct {
	name string
	run  func(r *txRun)
}

var txRules = []txRule{
	{"commit keeps the writes and completes the key", func(r *txRun) {
		k := r.key(1)
		ex := r.claimTx("commit", k, "owner", longLease)
		r.begin("commit", ex, 2)
		r.writes("commit: before the commit", 0)
		require.NoError(r.t, ex.Commit(r.ctx, []byte("final"), time.Hour), "commit")
		r.writes("commit", 2)
		r.held("commit: the key after the commit", k, []byte("final"))
	}},
	{"discard with a record rolls the writes back and stores the record", func(r *txRun) {
		k := r.key(1)
		ex := r.claimTx("discard", k, "owner", longLease)
		r.begin("discard", ex, 2)
		require.NoError(r.t, ex.Discard(r.ctx, []byte("stored error"), time.Hour), "discard with a record")
		r.writes("discard with a record", 0)
		r.held("discard: the key after it", k, []byte("stored error"))
	}},
	{"discard without a record rolls back and frees the key", func(r *txRun) {
		k := r.key(1)
		ex := r.claimTx("release", k, "owner", longLease)
		r.begin("release", ex, 1)
		require.NoError(r.t, ex.Discard(r.ctx, nil, 0), "discard without a record")
		r.writes("release", 0)
		again := r.claimTx("release: a new claim", k, "next", longLease)
		require.NoError(r.t, again.Discard(r.ctx, nil, 0))
	}},
	{"a held key gives no Execution", func(r *txRun) {
		k := r.key(1)
		ex := r.claimTx("held", k, "owner", longLease)
		res, other, err := r.tx.Store.ClaimTx(r.ctx, k, "other", []byte("x"), longLease)
		require.NoError(r.t, err)
		require.False(r.t, res.Claimed, "held: a second token claimed a held key")
		require.Nil(r.t, other, "held: ClaimTx returned an Execution without claiming")
		require.Equal(r.t, []byte("in progress"), res.Record, "held: the record returned")
		require.NoError(r.t, ex.Discard(r.ctx, nil, 0))
	}},
	{"a commit after another owner took the key rolls everything back", func(r *txRun) {
		k := r.key(1)
		ex := r.claimTx("taken over", k, "slow", shortLease)
		r.begin("taken over", ex, 2)
		r.pass(shortLease + slack)
		next := r.claimTx("taken over: the key after the lease", k, "next", longLease)
		r.lost("taken over: Commit by the expired owner", ex.Commit(r.ctx, []byte("late"), time.Hour))
		r.writes("taken over: the expired owner's writes", 0)
		r.held("taken over: the new owner's claim", k, []byte("in progress"))
		r.begin("taken over: the new owner", next, 1)
		require.NoError(r.t, next.Commit(r.ctx, []byte("final"), time.Hour))
		r.writes("taken over: the new owner's write", 1)
	}},
	{"fences: ClaimTx gives a greater fence to every new owner, and the same to the owner's repeat", func(r *txRun) {
		k := r.key(1)
		res, ex, err := r.tx.Store.ClaimTx(r.ctx, k, "slow", []byte("in progress"), shortLease)
		require.NoError(r.t, err, "fences: ClaimTx")
		require.True(r.t, res.Claimed && ex != nil, "fences: ClaimTx of a free key did not claim it")
		require.NotZero(r.t, res.Fence, "fences: ClaimTx must give a fence (ClaimResult.Fence), got 0")
		again, ex2, err := r.tx.Store.ClaimTx(r.ctx, k, "slow", []byte("in progress"), shortLease)
		require.NoError(r.t, err, "fences: the owner's repeated ClaimTx")
		if again.Claimed {
			require.Equal(r.t, res.Fence, again.Fence, "fences: the owner's repeated ClaimTx (its first reply lost) must keep its fence")
			require.NoError(r.t, ex2.Discard(r.ctx, []byte("x"), time.Hour), "fences: Discard")
			require.NoError(r.t, ex.Discard(r.ctx, []byte("x"), time.Hour), "fences: Discard")
			return
		}
		r.pass(shortLease + slack)
		next, nex, err := r.tx.Store.ClaimTx(r.ctx, k, "next", []byte("in progress"), longLease)
		require.NoError(r.t, err, "fences: ClaimTx after the lease")
		require.True(r.t, next.Claimed && nex != nil, "fences: ClaimTx after the lease did not claim")
		require.Greater(r.t, next.Fence, res.Fence, "fences: the new owner's fence must be greater than the expired owner's")
		r.lost("fences: Commit by the expired owner", ex.Commit(r.ctx, []byte("late"), time.Hour))
		require.NoError(r.t, nex.Commit(r.ctx, []byte("final"), time.Hour))
	}},
	{"a commit after Forget writes nothing back", func(r *txRun) {
		admin, ok := r.tx.Store.(idempotency.AdminStore)
		if !ok {
			r.t.Skip("not an AdminStore")
		}
		k := r.key(1)
		ex := r.claimTx("forget", k, "owner", longLease)
		r.begin("forget", ex, 1)
		require.NoError(r.t, admin.Delete(r.ctx, k), "forget: Delete of an in-progress key")
		r.lost("forget: Commit by the forgotten owner", ex.Commit(r.ctx, []byte("late"), time.Hour))
		r.writes("forget", 0)
		_, _, err := admin.Get(r.ctx, k)
		require.True(r.t, errors.Is(err, idempotency.ErrNoRecord), "forget: the record came back (%v)", err)
	}},
	{"ClaimTx refuses an empty owner token without writing", func(r *txRun) {
		k := r.key(1)
		res, ex, err := r.tx.Store.ClaimTx(r.ctx, k, "", []byte("x"), longLease)
		if ex != nil {
			// Give back what the wrongly claimed execution holds (a
			// connection), so the store can shut down after the failure.
			_ = ex.Discard(r.ctx, nil, 0)
		}
		require.Error(r.t, err, "empty token: ClaimTx must be refused with an error (got %+v)", res)
		require.False(r.t, errors.Is(err, idempotency.ErrLeaseLost), "empty token: ClaimTx refused with ErrLeaseLost, want a plain error")
		require.Nil(r.t, ex, "empty token: ClaimTx returned an Execution with its error")
		r.free("empty token: a refused ClaimTx writes nothing", k)
	}},
	{"one of many concurrent ClaimTx gets the Execution", func(r *txRun) {
		k := r.key(1)
		var mu sync.Mutex
		var winners []idempotency.Execution
		var wg sync.WaitGroup
		for i := range 16 {
			wg.Go(func() {
				res, ex, err := r.tx.Store.ClaimTx(r.ctx, k, fmt.Sprintf("racer-%d", i), []byte("in progress"), longLease)
				if err != nil {
					r.t.Errorf("concurrent ClaimTx: %v", err)
					return
				}
				if res.Claimed {
					mu.Lock()
					winners = append(winners, ex)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		require.Len(r.t, winners, 1, "concurrent ClaimTx: executions handed out")
		require.NoError(r.t, winners[0].Discard(r.ctx, nil, 0))
	}},
}
