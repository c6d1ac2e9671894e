package idempotencytest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Harness is one store under test, and how to move its clock.
type Harness struct {
	// Store is the store under test, empty (or in a namespace of its own).
	Store idempotency.Store
	// Advance moves the store's clock forward by d: miniredis's
	// FastForward, a fake clock's Advance. Nil: the suite waits in real
	// time, with leases of a few hundred milliseconds.
	Advance func(d time.Duration)
	// Parallel runs the rules side by side (t.Parallel, once newStore has
	// returned), up to go test's -parallel at a time, so that in real time
	// the suite waits out its leases once rather than once per rule. Set
	// it only when the stores newStore makes share nothing that a rule
	// could see (each on a table, key prefix or server of its own): the
	// rules' keys differ, but a rule may assume its store starts empty.
	Parallel bool
}

// RunStoreTests runs the Store contract against the stores newStore makes:
// it is called once per rule, so each rule starts from a clean store.
func RunStoreTests(t *testing.T, newStore func(t *testing.T) Harness) {
	t.Helper()
	for _, r := range rules {
		t.Run(r.name, func(t *testing.T) {
			h := newStore(t)
			require.NotNil(t, h.Store, "the harness has no store")
			if h.Parallel {
				t.Parallel()
			}
			r.run(&run{t: t, h: h, ctx: context.Background()})
		})
	}
}

// run is one rule's test against one store.
type run struct {
	t   *testing.T
	h   Harness
	ctx context.Context
}

// The leases and TTLs the expiry rules use: short in real time, and with
// enough slack to hold on a busy machine (every assertion is that something
// happened after a generous wait, never before a short one).
const (
	shortLease = 300 * time.Millisecond
	longLease  = time.Minute
	slack      = 250 * time.Millisecond
)

// key returns a store key as the interceptor makes them (64 hex digits),
// unique to the rule and n.
func (r *run) key(n int) string {
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s/%d", r.t.Name(), n)))
	return hex.EncodeToString(sum[:])
}

// pass lets d go by on the store's clock.
func (r *run) pass(d time.Duration) {
	if r.h.Advance != nil {
		r.h.Advance(d)
		return
	}
	time.Sleep(d)
}

func (r *run) claim(key, token string, rec []byte, lease time.Duration) idempotency.ClaimResult {
	r.t.Helper()
	res, err := r.h.Store.Claim(r.ctx, key, token, rec, lease)
	require.NoError(r.t, err, "Claim(%s) failed", token)
	return res
}

// mustClaim claims a free key and fails the rule unless it was claimed.
func (r *run) mustClaim(rule, key, token string, rec []byte, lease time.Duration) {
	r.t.Helper()
	res := r.claim(key, token, rec, lease)
	require.True(r.t, res.Claimed, "%s: Claim by %s of a free key returned Claimed=false (record %q)", rule, token, res.Record)
}

// held asserts that another token cannot claim key, and that the record
// stored is want.
func (r *run) held(rule, key string, want []byte) {
	r.t.Helper()
	res := r.claim(key, "probe-"+r.key(99)[:8], []byte("probe"), longLease)
	require.False(r.t, res.Claimed, "%s: another token claimed a key that should be held", rule)
	require.True(r.t, bytes.Equal(res.Record, want), "%s: the stored record is %q, want %q", rule, res.Record, want)
}

// free asserts that a new token can claim key.
func (r *run) free(rule, key string) {
	r.t.Helper()
	res := r.claim(key, "fresh-"+r.key(98)[:8], []byte("fresh"), longLease)
	require.True(r.t, res.Claimed, "%s: a new token could not claim a key that should be free (record %q)", rule, res.Record)
}

func (r *run) lost(rule string, err error) {
	r.t.Helper()
	require.True(r.t, errors.Is(err, idempotency.ErrLeaseLost), "%s: got %v, want ErrLeaseLost", rule, err)
}

type rule struct {
	name string
	run  func(r *run)
}

var rules = []rule{
	{"claim a free key, and return the record to every other claim", func(r *run) {
		k := r.key(1)
		r.mustClaim("Claim", k, "owner", []byte("in progress"), longLease)
		res := r.claim(k, "other", []byte("other record"), longLease)
		require.False(r.t, res.Claimed, "Claim: a second token claimed a held key")
		require.Equal(r.t, []byte("in progress"), res.Record, "Claim: the record returned to a second claim is not the one stored")
		assert.True(r.t, res.TTL >= 0 && res.TTL <= longLease, "Claim: TTL %v of an in-progress record is outside [0, lease %v] (0 means unknown)", res.TTL, longLease)
		r.held("Claim changes nothing when the key is held", k, []byte("in progress"))
	}},
	{"fencing by token: only the owner renews, completes or releases", func(r *run) {
		k := r.key(1)
		r.mustClaim("fencing", k, "owner", []byte("in progress"), longLease)
		require.NoError(r.t, r.h.Store.Renew(r.ctx, k, "owner", longLease), "fencing: Renew by the owner")
		r.lost("fencing: Renew by another token", r.h.Store.Renew(r.ctx, k, "intruder", longLease))
		r.lost("fencing: Renew of an absent key", r.h.Store.Renew(r.ctx, r.key(2), "owner", longLease))
		r.lost("fencing: Complete by another token", r.h.Store.Complete(r.ctx, k, "intruder", []byte("forged"), longLease))
		r.lost("fencing: Release by another token", r.h.Store.Release(r.ctx, k, "intruder"))
		r.held("fencing: the record after refused writes", k, []byte("in progress"))
	}},
	{"complete by the owner stores the final record", func(r *run) {
		k := r.key(1)
		r.mustClaim("Complete", k, "owner", []byte("in progress"), longLease)
		require.NoError(r.t, r.h.Store.Complete(r.ctx, k, "owner", []byte("final"), time.Hour), "Complete by the owner")
		res := r.claim(k, "other", []byte("x"), longLease)
		require.False(r.t, res.Claimed, "Complete: a completed key was claimed again")
		require.Equal(r.t, []byte("final"), res.Record, "Complete: a claim after completion does not return the final record")
		assert.True(r.t, res.TTL >= 0 && res.TTL <= time.Hour, "Complete: TTL %v of a completed record is outside [0, ttl 1h]", res.TTL)
	}},
	{"complete is idempotent for one token", func(r *run) {
		k := r.key(1)
		r.mustClaim("Complete is idempotent", k, "owner", []byte("in progress"), longLease)
		require.NoError(r.t, r.h.Store.Complete(r.ctx, k, "owner", []byte("final"), time.Hour))
		require.NoError(r.t, r.h.Store.Complete(r.ctx, k, "owner", []byte("final"), time.Hour),
			"Complete is idempotent for one token: a repeated Complete (its first reply lost) must return nil")
		r.lost("Complete by another token after completion", r.h.Store.Complete(r.ctx, k, "other", []byte("overwrite"), time.Hour))
		r.held("Complete is idempotent: the record", k, []byte("final"))
	}},
	{"a lost claim reply is recognisable: the same token gets its own record", func(r *run) {
		k := r.key(1)
		r.mustClaim("lost claim reply", k, "owner", []byte("in progress of owner"), longLease)
		res := r.claim(k, "owner", []byte("in progress of owner"), longLease)
		require.False(r.t, res.Claimed, "lost claim reply: a repeated Claim by the owner must not claim again")
		require.Equal(r.t, []byte("in progress of owner"), res.Record, "lost claim reply: the owner's repeated Claim must return its own in-progress record")
	}},
	{"key gone: complete stores, release succeeds, a completed record stays", func(r *run) {
		never := r.key(1)
		require.NoError(r.t, r.h.Store.Complete(r.ctx, never, "late", []byte("late outcome"), time.Hour),
			"key gone: Complete on a key that holds nothing must store the record (no other execution can exist)")
		r.held("key gone: the late outcome", never, []byte("late outcome"))
		require.NoError(r.t, r.h.Store.Release(r.ctx, r.key(2), "nobody"), "key gone: Release of a key that holds nothing must return nil")
		r.lost("key gone: Release of a completed record", r.h.Store.Release(r.ctx, never, "late"))
		r.held("key gone: Release must not delete a completed record", never, []byte("late outcome"))
		k := r.key(3)
		r.mustClaim("Release", k, "owner", []byte("in progress"), longLease)
		require.NoError(r.t, r.h.Store.Release(r.ctx, k, "owner"), "Release by the owner")
		require.NoError(r.t, r.h.Store.Release(r.ctx, k, "owner"), "key gone: a repeated Release (its first reply lost) must return nil")
		r.free("Release frees the key", k)
	}},
	{"lease expiry frees the key, and the owner can take it back", func(r *run) {
		k := r.key(1)
		r.mustClaim("lease expiry", k, "owner", []byte("in progress"), shortLease)
		r.pass(shortLease + slack)
		r.lost("lease expiry: Renew after the lease ended", r.h.Store.Renew(r.ctx, k, "owner", shortLease))
		r.mustClaim("take-back: the owner's Claim of its expired, unclaimed key", k, "owner", []byte("in progress"), longLease)
		r.held("take-back", k, []byte("in progress"))

		k2 := r.key(2)
		r.mustClaim("lease expiry", k2, "first", []byte("first"), shortLease)
		r.pass(shortLease + slack)
		r.mustClaim("lease expiry: a new token claims a key whose lease ended", k2, "second", []byte("second"), longLease)
		r.lost("lease expiry: Complete by the expired owner after another claimed", r.h.Store.Complete(r.ctx, k2, "first", []byte("stale"), time.Hour))
		r.held("fencing after expiry", k2, []byte("second"))
	}},
	{"renew extends the lease", func(r *run) {
		k := r.key(1)
		r.mustClaim("Renew", k, "owner", []byte("in progress"), shortLease)
		r.pass(shortLease / 3)
		require.NoError(r.t, r.h.Store.Renew(r.ctx, k, "owner", 10*shortLease), "Renew by the owner")
		r.pass(shortLease + slack) // past the first lease, well inside the renewed one
		r.held("Renew extends the lease: still held after the first lease", k, []byte("in progress"))
	}},
	{"TTL expiry frees a completed key", func(r *run) {
		k := r.key(1)
		r.mustClaim("TTL", k, "owner", []byte("in progress"), longLease)
		require.NoError(r.t, r.h.Store.Complete(r.ctx, k, "owner", []byte("final"), shortLease))
		r.pass(shortLease + slack)
		r.free("TTL expiry: a completed key after its TTL", k)
	}},
	{"expiries below 1ms are refused without writing", func(r *run) {
		k := r.key(1)
		for _, lease := range []time.Duration{500 * time.Microsecond, 0, -time.Second} {
			_, err := r.h.Store.Claim(r.ctx, k, "owner", []byte("x"), lease)
			require.Error(r.t, err, "Claim with lease %v must be refused", lease)
			require.False(r.t, errors.Is(err, idempotency.ErrLeaseLost), "Claim with lease %v: refused with ErrLeaseLost, want a plain error", lease)
		}
		r.free("a refused Claim writes nothing", k)
		k2 := r.key(2)
		r.mustClaim("expiries", k2, "owner", []byte("in progress"), longLease)
		require.Error(r.t, r.h.Store.Renew(r.ctx, k2, "owner", 0), "Renew with lease 0 must be refused")
		require.Error(r.t, r.h.Store.Complete(r.ctx, k2, "owner", []byte("final"), 0), "Complete with TTL 0 must be refused")
		require.Error(r.t, r.h.Store.Complete(r.ctx, k2, "owner", []byte("final"), -time.Minute), "Complete with a negative TTL must be refused")
		r.held("refused writes leave the claim as it was", k2, []byte("in progress"))
	}},
	{"an empty owner token is refused without writing", func(r *run) {
		// The interceptor never sends one (its tokens are random); a store
		// that took one might confuse it with "no owner" and lose an
		// outcome, so every method refuses it, and not as a lost lease.
		refused := func(what string, err error) {
			r.t.Helper()
			require.Error(r.t, err, "empty token: %s must be refused with an error", what)
			require.False(r.t, errors.Is(err, idempotency.ErrLeaseLost), "empty token: %s refused with ErrLeaseLost, want a plain error (a caller's bug, not a lost lease)", what)
		}
		k := r.key(1)
		_, err := r.h.Store.Claim(r.ctx, k, "", []byte("x"), longLease)
		refused("Claim", err)
		refused("Complete of a free key", r.h.Store.Complete(r.ctx, k, "", []byte("final"), time.Hour))
		refused("Release of a free key", r.h.Store.Release(r.ctx, k, ""))
		refused("Renew of a free key", r.h.Store.Renew(r.ctx, k, "", longLease))
		r.free("empty token: refused calls write nothing", k)

		k2 := r.key(2)
		r.mustClaim("empty token", k2, "owner", []byte("in progress"), longLease)
		refused("Renew of a held key", r.h.Store.Renew(r.ctx, k2, "", longLease))
		refused("Complete of a held key", r.h.Store.Complete(r.ctx, k2, "", []byte("forged"), time.Hour))
		refused("Release of a held key", r.h.Store.Release(r.ctx, k2, ""))
		r.held("empty token: a held key after refused calls", k2, []byte("in progress"))
		require.NoError(r.t, r.h.Store.Complete(r.ctx, k2, "owner", []byte("final"), time.Hour), "empty token: Complete by the owner after refused calls")
		refused("Renew of a completed key", r.h.Store.Renew(r.ctx, k2, "", longLease))
		refused("Complete of a completed key", r.h.Store.Complete(r.ctx, k2, "", []byte("overwrite"), time.Hour))
		refused("Release of a completed key", r.h.Store.Release(r.ctx, k2, ""))
		r.held("empty token: a completed key after refused calls", k2, []byte("final"))
		if b, ok := r.h.Store.(idempotency.BatchRenewer); ok {
			errs := b.RenewBatch(r.ctx, []string{k2, k}, []string{"", ""}, longLease)
			require.Len(r.t, errs, 2, "empty token: RenewBatch of two keys")
			refused("RenewBatch of a completed key", errs[0])
			refused("RenewBatch of a held key", errs[1])
		}
		r.held("empty token: refused calls write nothing", k, []byte("fresh"))
	}},
	{"hostile bytes round-trip exactly", func(r *run) {
		every := make([]byte, 256)
		for i := range every {
			every[i] = byte(i)
		}
		big := bytes.Repeat([]byte{0xff, 0x00, 0xc3}, 1<<20/3)
		for i, rec := range [][]byte{every, big, []byte("\xc3\x28 not UTF-8 \xff\xfe")} {
			k := r.key(i)
			r.mustClaim("hostile bytes", k, "owner", rec, longLease)
			res := r.claim(k, "other", []byte("x"), longLease)
			require.True(r.t, bytes.Equal(res.Record, rec), "hostile bytes: record %d (%d bytes) came back as %d different bytes", i, len(rec), len(res.Record))
			require.NoError(r.t, r.h.Store.Complete(r.ctx, k, "owner", rec, time.Hour))
			r.held("hostile bytes after Complete", k, rec)
			if a, ok := r.h.Store.(idempotency.AdminStore); ok {
				got, _, err := a.Get(r.ctx, k)
				require.NoError(r.t, err)
				require.True(r.t, bytes.Equal(got, rec), "hostile bytes: AdminStore.Get returned different bytes for record %d", i)
			}
		}
	}},
	{"keys are independent", func(r *run) {
		a, b := r.key(1), r.key(2)
		r.mustClaim("independence", a, "owner-a", []byte("a"), longLease)
		r.mustClaim("independence: claiming one key must not hold another", b, "owner-b", []byte("b"), longLease)
		require.NoError(r.t, r.h.Store.Complete(r.ctx, a, "owner-a", []byte("a final"), time.Hour))
		require.NoError(r.t, r.h.Store.Release(r.ctx, b, "owner-b"))
		r.held("independence: completing and releasing others", a, []byte("a final"))
		r.free("independence", b)
	}},
	{"concurrent claims: exactly one wins", func(r *run) {
		k := r.key(1)
		const n = 32
		var (
			wg      sync.WaitGroup
			mu      sync.Mutex
			winners []string
			records = map[string]int{}
			errs    []error
		)
		start := make(chan struct{})
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				token := fmt.Sprintf("token-%02d", i)
				<-start
				res, err := r.h.Store.Claim(r.ctx, k, token, []byte("record of "+token), longLease)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err != nil:
					errs = append(errs, err)
				case res.Claimed:
					winners = append(winners, token)
				default:
					records[string(res.Record)]++
				}
			}()
		}
		close(start)
		wg.Wait()
		require.Empty(r.t, errs, "concurrent claims: errors")
		require.Len(r.t, winners, 1, "concurrent claims: exactly one of %d must win, got %v", n, winners)
		require.Equal(r.t, map[string]int{"record of " + winners[0]: n - 1}, records, "concurrent claims: every loser must see the winner's record")
	}},
	{"complete racing claims: every claim sees a record", func(r *run) {
		k := r.key(1)
		r.mustClaim("race", k, "owner", []byte("in progress"), longLease)
		var wg sync.WaitGroup
		bad := make(chan string, 64)
		start := make(chan struct{})
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if err := r.h.Store.Complete(r.ctx, k, "owner", []byte("final"), time.Hour); err != nil {
				bad <- "Complete: " + err.Error()
			}
		}()
		for i := 0; i < 16; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				res, err := r.h.Store.Claim(r.ctx, k, fmt.Sprintf("racer-%d", i), []byte("racer"), longLease)
				switch {
				case err != nil:
					bad <- "Claim: " + err.Error()
				case res.Claimed:
					bad <- "a racer claimed a key that was held or completed"
				case string(res.Record) != "in progress" && string(res.Record) != "final":
					bad <- fmt.Sprintf("a racer saw record %q", res.Record)
				}
			}()
		}
		close(start)
		wg.Wait()
		close(bad)
		for b := range bad {
			r.t.Errorf("complete racing claims: %s", b)
		}
	}},
	{"fences: every new owner of a key gets a greater fence", func(r *run) {
		k := r.key(1)
		last := uint64(0)
		// next claims k with token and requires a fence above every earlier
		// owner's.
		next := func(step, token string, lease time.Duration) {
			r.t.Helper()
			res := r.claim(k, token, []byte("in progress of "+token), lease)
			require.True(r.t, res.Claimed, "fences: %s: the claim by %s was refused (record %q)", step, token, res.Record)
			require.NotZero(r.t, res.Fence, "fences: %s: a claim must give a fence (ClaimResult.Fence), got 0", step)
			require.Greater(r.t, res.Fence, last, "fences: %s: the fence must be greater than the previous owner's", step)
			last = res.Fence
		}
		next("the first claim", "first", longLease)
		res := r.claim(k, "first", []byte("in progress of first"), longLease)
		require.False(r.t, res.Claimed, "fences: a repeated claim by the owner claimed again")
		require.Equal(r.t, last, res.Fence, "fences: the owner's repeated claim (its first reply lost) must return its fence")
		require.NoError(r.t, r.h.Store.Release(r.ctx, k, "first"))
		next("after a release", "second", shortLease)
		r.pass(shortLease + slack)
		next("a takeover after the lease expired", "third", shortLease)
		r.pass(shortLease + slack)
		next("the owner taking back its own expired key", "third", longLease)
		require.NoError(r.t, r.h.Store.Complete(r.ctx, k, "third", []byte("final"), shortLease))
		r.pass(shortLease + slack)
		next("after the completed record expired", "fourth", longLease)
		if a, ok := r.h.Store.(idempotency.AdminStore); ok {
			require.NoError(r.t, a.Delete(r.ctx, k), "fences: AdminStore.Delete of an in-progress record")
			next("after the owner's record was deleted", "fifth", longLease)
			require.NoError(r.t, r.h.Store.Complete(r.ctx, k, "fifth", []byte("final"), time.Hour))
			require.NoError(r.t, a.Delete(r.ctx, k), "fences: AdminStore.Delete of a completed record")
			next("after the completed record was deleted", "sixth", longLease)
		}
	}},
	{"AdminStore: get, delete, and forgetting fences the owner", func(r *run) {
		a, ok := r.h.Store.(idempotency.AdminStore)
		if !ok {
			r.t.Skipf("%T does not implement AdminStore: its rules do not apply", r.h.Store)
		}
		k := r.key(1)
		r.mustClaim("AdminStore", k, "owner", []byte("in progress"), longLease)
		got, ttl, err := a.Get(r.ctx, k)
		require.NoError(r.t, err, "AdminStore.Get of a held key")
		require.Equal(r.t, []byte("in progress"), got, "AdminStore.Get returned another record")
		require.True(r.t, ttl > 0 && ttl <= longLease, "AdminStore.Get: TTL %v outside (0, lease %v]", ttl, longLease)
		_, _, err = a.Get(r.ctx, r.key(2))
		require.ErrorIs(r.t, err, idempotency.ErrNoRecord, "AdminStore.Get of an absent key")
		require.ErrorIs(r.t, a.Delete(r.ctx, r.key(2)), idempotency.ErrNoRecord, "AdminStore.Delete of an absent key")

		// Forgetting a running call fences its owner off.
		require.NoError(r.t, a.Delete(r.ctx, k), "AdminStore.Delete of an in-progress record")
		_, _, err = a.Get(r.ctx, k)
		require.ErrorIs(r.t, err, idempotency.ErrNoRecord, "AdminStore.Get after Delete")
		r.lost("Delete fences the owner: Renew", a.Renew(r.ctx, k, "owner", longLease))
		r.lost("Delete fences the owner: Complete", a.Complete(r.ctx, k, "owner", []byte("written back"), time.Hour))
		r.lost("Delete fences the owner: Release", a.Release(r.ctx, k, "owner"))
		_, err = a.Claim(r.ctx, k, "owner", []byte("taken back"), longLease)
		r.lost("Delete fences the owner: Claim with its own token", err)
		_, _, err = a.Get(r.ctx, k)
		require.ErrorIs(r.t, err, idempotency.ErrNoRecord, "Delete fences the owner: nothing may be written back")
		r.mustClaim("after Delete a new token claims at once", k, "new", []byte("new"), longLease)

		// Deleting a completed record frees the key.
		k3 := r.key(3)
		r.mustClaim("AdminStore", k3, "owner", []byte("in progress"), longLease)
		require.NoError(r.t, a.Complete(r.ctx, k3, "owner", []byte("final"), time.Hour))
		require.NoError(r.t, a.Delete(r.ctx, k3), "AdminStore.Delete of a completed record")
		r.free("AdminStore.Delete of a completed record", k3)
	}},
}
