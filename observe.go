package idempotency

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"slices"
	"time"

	"google.golang.org/grpc/codes"
)

// Outcome names what the server interceptor did with one call.
type Outcome string

// Outcomes reported in [Event.Outcome].
const (
	// OutcomePassThrough: no key on a method where it is optional; the
	// handler ran unprotected.
	OutcomePassThrough Outcome = "pass_through"
	// OutcomeExecuted: the key was claimed, the handler ran and its outcome
	// was stored.
	OutcomeExecuted Outcome = "executed"
	// OutcomeReleased: the handler ran and ended with a code that is not
	// stored (see [WithStoredCodes]); the key was released for a retry.
	OutcomeReleased Outcome = "released"
	// OutcomePanicked: the handler panicked; the key was released and the
	// panic propagated.
	OutcomePanicked Outcome = "panicked"
	// OutcomeTooLarge: the handler ran but its outcome exceeded
	// [WithMaxRecordSize]; it was recorded as too large.
	OutcomeTooLarge Outcome = "too_large"
	// OutcomeLeaseLost: the handler ran but another call owned the key when
	// its outcome was to be stored; nothing was overwritten. The caller still
	// got the handler's answer.
	OutcomeLeaseLost Outcome = "lease_lost"
	// OutcomeNotStored: the handler ran but storing (or releasing) its
	// outcome failed; the key stays in progress until its lease ends.
	OutcomeNotStored Outcome = "not_stored"
	// OutcomeNotReplicated: the handler ran and its outcome was stored on the
	// Redis master, but fewer replicas than [WithReplicaAcks] asks
	// acknowledged it before the complete timeout ended: a failover could
	// lose it. The caller got the handler's answer.
	OutcomeNotReplicated Outcome = "not_replicated"
	// OutcomeRolledBack: the store is a [TxStore], the handler ran, and its
	// transaction did not commit: another call owned the key by then (Err
	// wraps [ErrLeaseLost]), or the database failed. Nothing the handler
	// wrote in it was kept; the caller was told to retry
	// ([ReasonNotCommitted]).
	OutcomeRolledBack Outcome = "rolled_back"
	// OutcomeCommitUnknown: the store is a [TxStore], the handler ran, and
	// the reply to its commit was lost; the store could not learn whether
	// it committed. The caller was told to retry ([ReasonNotCommitted]),
	// which replays or runs the call safely.
	OutcomeCommitUnknown Outcome = "commit_unknown"
	// OutcomeReplayed: a repeat was answered with the stored outcome.
	OutcomeReplayed Outcome = "replayed"
	// OutcomeAlreadyProcessed: reject-repeats mode refused a repeat
	// (AlreadyExists), or a repeat met a too-large record.
	OutcomeAlreadyProcessed Outcome = "already_processed"
	// OutcomeKeyReused: a repeat carried a different request (FailedPrecondition).
	OutcomeKeyReused Outcome = "key_reused"
	// OutcomeInProgress: a repeat met a running first call (Aborted).
	OutcomeInProgress Outcome = "in_progress"
	// OutcomeKeyMissing: the method requires a key and there was none.
	OutcomeKeyMissing Outcome = "key_missing"
	// OutcomeKeyInvalid: the key was malformed.
	OutcomeKeyInvalid Outcome = "key_invalid"
	// OutcomeStoreUnavailable: the store failed before the handler could be
	// claimed (Unavailable); the handler did not run.
	OutcomeStoreUnavailable Outcome = "store_unavailable"
	// OutcomeCanceled: the caller's context ended before the key could be
	// claimed; the handler did not run.
	OutcomeCanceled Outcome = "canceled"
	// OutcomeFailOpen: the store failed and [WithFailOpen] ran the handler
	// unprotected.
	OutcomeFailOpen Outcome = "fail_open"
	// OutcomeRecordCorrupt: the stored record could not be read (DataLoss).
	OutcomeRecordCorrupt Outcome = "record_corrupt"
	// OutcomeRejected: the scope or fingerprint function failed.
	OutcomeRejected Outcome = "rejected"
)

// Event describes how the server interceptor handled one call. It is passed
// to the observer set with [WithObserver].
type Event struct {
	// Method is the full gRPC method name, or the name of the work given
	// to [Do].
	Method string
	// Outcome is what the interceptor did.
	Outcome Outcome
	// KeyHash is a short, non-reversible hash of the scoped key, safe to log
	// ("" when the call had no valid key).
	KeyHash string
	// Code is the gRPC code the caller received.
	Code codes.Code
	// StoreLatency is the time spent in store calls on the request path
	// (claim, and complete or release).
	StoreLatency time.Duration
	// Err is the store or internal error behind the outcome, if any.
	Err error
	// Local is true when the answer came from this process without a store
	// round trip: the local cache ([WithLocalCache]) or a coalesced
	// duplicate ([WithCoalescing]).
	Local bool
	// DroppedMetadata lists, sorted, the header and trailer keys the
	// handler sent that were not stored with its outcome, so a replay
	// answers without them: reserved "grpc-" keys (grpc-go passes some on,
	// such as grpc-retry-pushback-ms, but a record holding one is refused
	// on replay), the connection-specific HTTP fields (connection,
	// content-length, keep-alive, proxy-connection, te, trailer,
	// transfer-encoding, upgrade), which belong to one connection and not
	// to the call, and keys or values gRPC cannot carry. On a replay it
	// lists the connection-specific keys a record written by an earlier
	// version held, left out of the answer. Nil when nothing was left out;
	// [WithLogger] logs a warning when it is not.
	DroppedMetadata []string
}

// droppedKeys returns the keys of a and b, sorted, without repeats; nil
// when both are empty.
func droppedKeys(a, b []string) []string {
	if len(a)+len(b) == 0 {
		return nil
	}
	keys := append(append(make([]string, 0, len(a)+len(b)), a...), b...)
	slices.Sort(keys)
	return slices.Compact(keys)
}

// keyHash is the short hash of a store key used in logs and events.
func keyHash(storeKey string) string {
	if storeKey == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(storeKey))
	return hex.EncodeToString(sum[:6])
}

// emit reports the call's event to the observer and the logger, when
// either is set. It is small enough to inline, so a call that nobody
// listens to pays neither report's frame nor its work.
func (s *server) emit(ctx context.Context, c *call) {
	if s.o.observer != nil || s.o.logger != nil {
		s.report(ctx, c)
	}
}

// report hands the call's event to the observer and logs the warnings it
// calls for. The key hash is computed only when the observer or a logged
// line needs it.
//
//go:noinline
func (s *server) report(ctx context.Context, c *call) {
	e := c.ev
	if s.o.observer != nil {
		e.KeyHash = keyHash(c.storeKey)
		s.o.observer(ctx, e)
	}
	if s.o.logger == nil {
		return
	}
	warn := false
	switch e.Outcome {
	case OutcomeLeaseLost, OutcomeNotStored, OutcomeNotReplicated, OutcomeRolledBack, OutcomeCommitUnknown, OutcomeFailOpen, OutcomeRecordCorrupt, OutcomeStoreUnavailable:
		warn = true
	}
	if !warn && len(e.DroppedMetadata) == 0 {
		return
	}
	if e.KeyHash == "" {
		e.KeyHash = keyHash(c.storeKey)
	}
	if len(e.DroppedMetadata) > 0 {
		s.o.logger.LogAttrs(ctx, slog.LevelWarn, "idempotency: metadata not stored",
			slog.String("method", e.Method), slog.String("key_hash", e.KeyHash),
			slog.String("outcome", string(e.Outcome)), slog.Any("keys", e.DroppedMetadata))
	}
	if warn {
		s.o.logger.LogAttrs(ctx, slog.LevelWarn, "idempotency: "+string(e.Outcome),
			slog.String("method", e.Method), slog.String("key_hash", e.KeyHash),
			slog.String("code", e.Code.String()), slog.Any("error", e.Err))
	}
}
