package idempotency

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"time"
)

// Store keeps one record per scoped idempotency key. It is the only state the
// server interceptor has; every server sharing a store shares the
// guarantee. Records are opaque bytes to the store; the interceptor encodes
// and decodes them. Keys passed to a Store are fixed-length hashes (see
// [StoreKey]), never the raw client key.
//
// Every method must be atomic with respect to the others on the same key.
// Errors other than [ErrLeaseLost] mean the store failed; the interceptor
// turns them into Unavailable (reason STORE_UNAVAILABLE) and does not run
// the handler, except errors wrapping [ErrCorruptRecord] (the key holds
// something that is not a record), which become DataLoss. A lease or TTL
// below one millisecond is refused with an error, writing nothing: a store
// must never turn it into "expire now". An empty owner token is refused
// the same way by every method (an error that is not ErrLeaseLost, nothing
// written): the interceptor's tokens are random and never empty, and a
// store that took one could confuse it with "no owner" and lose an outcome.
//
// [RedisStore] and [MemoryStore] implement it.
type Store interface {
	// Claim atomically claims key for a new execution, or returns what is
	// stored under it. When key holds no record, Claim stores record with
	// owner token and the lease, and returns Claimed true with the claim's
	// fence ([ClaimResult.Fence], greater than every earlier claim's of
	// key). Otherwise it returns the stored record (in progress or
	// completed) and its remaining time to live, with Claimed false, and
	// changes nothing. The interceptor
	// also calls Claim with the token it already holds, to take back a key
	// whose lease ran out while nobody else claimed it; if token was fenced
	// off by [AdminStore.Delete], Claim returns ErrLeaseLost instead.
	Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error)

	// Renew extends the lease of an in-progress key owned by token. It
	// returns ErrLeaseLost if token no longer owns key, including when the
	// key is gone.
	Renew(ctx context.Context, key, token string, lease time.Duration) error

	// Complete replaces the in-progress record owned by token with the final
	// record, kept for ttl, and ends token's ownership. If another token owns
	// the key, or token was fenced off by [AdminStore.Delete], it writes
	// nothing and returns ErrLeaseLost. If the key is gone (the lease expired
	// and nobody claimed it since) it stores the record anyway, since no
	// other execution can exist, and returns nil. Complete is idempotent for
	// one token: repeating it after success (a retry whose first reply was
	// lost) returns nil.
	Complete(ctx context.Context, key, token string, record []byte, ttl time.Duration) error

	// Release deletes the in-progress record owned by token, so the next
	// call with the key runs the handler. When the key is already gone it
	// returns nil: nobody owns it, which is what a release wants, and a
	// retried release whose first reply was lost must not look like a lost
	// lease. It returns ErrLeaseLost, deleting nothing, if another token owns
	// the key, the key holds a completed record, or token was fenced off.
	Release(ctx context.Context, key, token string) error
}

// checkExpiry refuses, for every store, a lease or TTL below 1ms: Redis
// counts in milliseconds, and PEXPIRE 0 deletes the key at once, which would
// let every concurrent duplicate run.
func checkExpiry(store, what string, d time.Duration) error {
	if d < time.Millisecond {
		return fmt.Errorf("idempotency: %s: a %s of %v is below 1ms, the least a store keeps; nothing was written", store, what, d)
	}
	return nil
}

// checkToken refuses, for every store, an empty owner token (see [Store]).
func checkToken(store, token string) error {
	if token == "" {
		return fmt.Errorf("idempotency: %s: an empty owner token is refused; nothing was written", store)
	}
	return nil
}

// ClaimResult is the answer of [Store.Claim].
type ClaimResult struct {
	// Claimed is true when the caller now owns the key.
	Claimed bool
	// Record is the stored record when Claimed is false.
	Record []byte
	// TTL is the time Record has left to live, as the store measured it
	// when it answered, or 0 when the store cannot tell. The local cache
	// ([WithLocalCache]) keeps a record no longer than this, so it never
	// outlives the store's copy whatever the servers' clocks say; a record
	// of unknown TTL is not cached.
	TTL time.Duration
	// Fence is the claim's fencing token when Claimed is true: a number
	// that is strictly greater than the Fence of every earlier claim of the
	// same key, whether the key was released, completed, deleted or its
	// lease expired in between, so a write fenced on it refuses an owner
	// whose lease ended (see [FenceFromContext]). When Claimed is false and
	// Record is in progress, it is the Fence of Record's owner, so an owner
	// whose claim reply was lost learns its fence again; 0 otherwise. A store
	// that cannot give fences leaves it 0, and the handler then finds none.
	Fence uint64
}

// StoreKey returns the store key of an idempotency key: the hex SHA-256 of
// the method, the scope and the client key, so its length
// is bounded whatever the client sends, and two scopes or two methods never
// share a record. Stores may prepend a namespace (see [WithKeyPrefix]).
func StoreKey(fullMethod, scope, key string) string {
	// Length-prefixed parts, so ("a", "bc") and ("ab", "c") differ. The buffer
	// stays on the stack for the usual sizes.
	var stack [512]byte
	buf := stack[:0]
	for _, part := range []string{fullMethod, scope, key} {
		l := len(part)
		buf = append(buf, byte(l>>24), byte(l>>16), byte(l>>8), byte(l))
		buf = append(buf, part...)
	}
	sum := sha256.Sum256(buf)
	var out [2 * sha256.Size]byte // one allocation: the string
	hex.Encode(out[:], sum[:])
	return string(out[:])
}

// BatchRenewer is implemented by stores that renew many leases in one
// round trip. The server interceptor keeps the leases of all its calls in
// flight with one goroutine, and renews the ones that are due together: with
// a BatchRenewer in one call, otherwise with concurrent Renew calls.
// [RedisStore] (one pipelined round trip per Redis node) and [MemoryStore]
// implement it.
type BatchRenewer interface {
	// RenewBatch renews the lease of each key, owned by the token at the
	// same index, exactly as Renew does, and returns one error per key:
	// nil, ErrLeaseLost, or the store's failure. A result of another length
	// makes the caller renew the keys one by one.
	RenewBatch(ctx context.Context, keys, tokens []string, lease time.Duration) []error
}
