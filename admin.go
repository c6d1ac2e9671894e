package idempotency

import (
	"context"
	"errors"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/grpc/codes"
)

// ErrNoRecord is returned by [Lookup] and [Forget] when the key holds no
// record (never used, expired, or released).
var ErrNoRecord = errors.New("idempotency: no record for this key")

// AdminStore is implemented by stores that support looking up and deleting
// single records, for support tooling ("my charge is stuck in progress").
// [RedisStore] and [MemoryStore] implement it.
type AdminStore interface {
	Store
	// Get returns the record stored under key and its remaining time to
	// live, or ErrNoRecord.
	Get(ctx context.Context, key string) (record []byte, ttl time.Duration, err error)
	// Delete removes the record under key, whatever its state, or returns
	// ErrNoRecord. Deleting an in-progress record fences its owner token off
	// for the rest of the lease: a new claim may take the key at once, but
	// the owner, if it is still running, can no longer renew, take back,
	// complete or release it (each returns ErrLeaseLost). A forgotten record
	// is never written back.
	Delete(ctx context.Context, key string) error
}

// RecordInfo describes a stored record, as returned by [Lookup]. It never
// holds the response itself.
type RecordInfo struct {
	// StoreKey is the hashed key the record lives under (see [StoreKey]).
	StoreKey string
	// State is "in_progress", "completed" or "too_large".
	State string
	// Method is the full method the key is bound to.
	Method string
	// Created is when the key was claimed (zero for completed records,
	// which keep only their completion time).
	Created time.Time
	// Completed is when the outcome was stored (zero while in progress).
	Completed time.Time
	// TTL is the time left before the record expires: the lease while in
	// progress, the retention once completed.
	TTL time.Duration
	// Code is the stored outcome's code (OK for a stored response).
	Code codes.Code
	// ResponseSize is the size of the stored response, or of the outcome
	// that was too large to store.
	ResponseSize int
}

// Lookup returns what store holds for the key a client sent to fullMethod
// within scope ("" when the server sets no [WithScope]).
func Lookup(ctx context.Context, store AdminStore, fullMethod, scope, key string) (*RecordInfo, error) {
	sk := StoreKey(fullMethod, scope, key)
	b, ttl, err := store.Get(ctx, sk)
	if err != nil {
		return nil, err
	}
	rec, err := decodeRecord(b)
	if err != nil {
		return nil, err
	}
	info := &RecordInfo{StoreKey: sk, Method: rec.GetMethod(), TTL: ttl, Code: codes.Code(rec.GetStatus().GetCode())}
	if t := rec.GetCreateTime(); t != nil {
		info.Created = t.AsTime()
	}
	if t := rec.GetCompleteTime(); t != nil {
		info.Completed = t.AsTime()
	}
	switch rec.GetState() {
	case idempotencyv1.Record_STATE_IN_PROGRESS:
		info.State = "in_progress"
	case idempotencyv1.Record_STATE_COMPLETED:
		info.State, info.ResponseSize = "completed", len(rec.GetResponse())
	case idempotencyv1.Record_STATE_TOO_LARGE:
		info.State, info.ResponseSize = "too_large", int(rec.GetResponseSize())
	}
	return info, nil
}

// Forget deletes the record of the key a client sent to fullMethod within
// scope, so the next call with that key runs the handler. Deleting an
// in-progress record lets a duplicate run while the first may still be
// running: do it only for a call known to be dead. If the owner is in fact
// still running, it finds its lease lost (at its next renewal, or when it
// tries to store its outcome) and writes nothing: its caller still gets the
// handler's answer, the server reports lease_lost, and the key stays
// forgotten until a new call claims it.
func Forget(ctx context.Context, store AdminStore, fullMethod, scope, key string) error {
	return store.Delete(ctx, StoreKey(fullMethod, scope, key))
}
