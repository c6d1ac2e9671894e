package idempotency

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	mrand "math/rand/v2"
	"sync"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// UnaryServerInterceptor returns a server interceptor that runs each keyed
// call once per key and answers every repeat with the stored outcome.
//
// The protocol, per call with a valid key:
//
//  1. Claim the scoped key in store (one round trip). If it was free, the
//     call owns it under a lease, renewed while the handler runs.
//  2. Otherwise the claim returned the stored record: a different request
//     fingerprint is refused (FailedPrecondition, KEY_REUSED); a running first
//     call is reported (Aborted, KEY_IN_PROGRESS, with RetryInfo) or waited
//     for ([WithWaitForInProgress]); a completed one is replayed: the
//     response or error status, the header and trailer metadata, plus the
//     header "idempotency-replayed: true".
//  3. The owner runs the handler and stores its outcome (second round trip)
//     with the TTL, or releases the key when the code is transient (see
//     [DefaultStoredCode]) or the handler panics.
//
// When store is a [TxStore] (the postgres module's store), step 3 runs the
// handler inside the store's transaction and commits the outcome in it:
// the client gets the response only once both committed.
//
// Calls without a key pass through unless the method requires one (see
// [KeyPolicy]). Store failures fail closed (Unavailable, STORE_UNAVAILABLE).
// Every error the interceptor produces carries a google.rpc.ErrorInfo with
// domain [ErrorDomain].
//
// Panics if store is nil.
func UnaryServerInterceptor(store Store, opts ...Option) grpc.UnaryServerInterceptor {
	if store == nil {
		badOption("UnaryServerInterceptor", "nil", "a Store is required")
	}
	return newServer(store, opts).intercept
}

// newServer is the server interceptor's state.
func newServer(store Store, opts []Option) *server {
	s := &server{store: store, o: evaluateOptions(opts)}
	s.txs, _ = store.(TxStore)
	s.renewer = newRenewer(store, s.o.lease, s.o.renewHook)
	s.policies.override = s.o.policy
	if s.o.localCacheSize > 0 {
		s.cache = newLocalCache(s.o.localCacheSize, s.o.localCacheAge)
	}
	if s.o.coalesce {
		s.flights = &flights{m: make(map[string]*flight)}
	}
	return s
}

type server struct {
	store    Store
	txs      TxStore // store, when it is one
	renewer  *renewer
	o        *options
	policies policyCache
	cache    *localCache // nil unless WithLocalCache
	flights  *flights    // nil unless WithCoalescing
}

// call is the state of one keyed call.
type call struct {
	method   string
	key      string
	storeKey string
	fp       []byte
	token    string
	// inProgress is the encoded in-progress record the call claims with.
	inProgress []byte
	// ex is the claim's Execution when the store is a TxStore.
	ex Execution
	ev Event
	// final is the completed record the call ended with (executed or
	// replayed), shared with the local cache and coalesced duplicates.
	final *idempotencyv1.Record
}

func (s *server) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	policy := s.policies.get(info.FullMethod)
	if policy == KeyIgnored {
		return handler(guardMarker(ctx), req)
	}
	c := &call{method: info.FullMethod, ev: Event{Method: info.FullMethod}}
	key, present, err := s.extractKey(ctx, req)
	if err != nil {
		return nil, s.fail(ctx, c, OutcomeKeyInvalid, errKeyInvalid(c.method, s.keySource(), err), nil)
	}
	if !present {
		if policy == KeyRequired {
			return nil, s.fail(ctx, c, OutcomeKeyMissing, errKeyRequired(c.method, s.keySource()), nil)
		}
		c.ev.Outcome = OutcomePassThrough
		resp, err := handler(guardMarker(ctx), req)
		c.ev.Code = handlerStatus(err).Code()
		s.emit(ctx, c)
		return resp, err
	}
	c.key = key

	var scope string
	if s.o.scope != nil {
		if scope, err = s.o.scope(ctx); err != nil {
			if _, ok := status.FromError(err); !ok {
				err = errScopeFailed(c.method)
			}
			return nil, s.fail(ctx, c, OutcomeRejected, err, nil)
		}
	}
	c.storeKey = StoreKey(c.method, scope, key)
	if c.fp, err = s.o.fingerprint(c.method, req); err != nil {
		return nil, s.fail(ctx, c, OutcomeRejected, errFingerprintFailed(c.method), err)
	}
	c.token = newToken()
	if s.cache != nil {
		if rec := s.cache.get(c.storeKey, s.o.now()); rec != nil {
			c.ev.Local = true
			return s.answer(ctx, c, rec)
		}
	}
	if s.flights == nil {
		return s.claim(ctx, c, req, handler)
	}
	f, leader := s.flights.join(c.storeKey, c.fp)
	if leader {
		defer func() { s.flights.finish(c.storeKey, f, c.final) }()
		return s.claim(ctx, c, req, handler)
	}
	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, s.fail(ctx, c, OutcomeInProgress, errCallEnded(c.method, ctx.Err()), nil)
	}
	if f.final != nil {
		c.ev.Local = true
		return s.answer(ctx, c, f.final)
	}
	return s.claim(ctx, c, req, handler)
}

func (s *server) fail(ctx context.Context, c *call, o Outcome, err error, cause error) error {
	c.ev.Outcome, c.ev.Code, c.ev.Err = o, status.Code(err), cause
	s.emit(ctx, c)
	return err
}

// extractKey returns the call's key from the metadata, or from the request
// field set with WithKeyField.
func (s *server) extractKey(ctx context.Context, req any) (string, bool, error) {
	if s.o.keyField == "" {
		// ValueFromIncomingContext avoids copying the whole metadata.
		vals := metadata.ValueFromIncomingContext(ctx, s.o.keyHeader)
		binary := len(vals) == 0 && len(metadata.ValueFromIncomingContext(ctx, s.o.binHeader)) > 0
		return keyFromValues(vals, binary, s.o.keyHeader)
	}
	m, ok := req.(proto.Message)
	if !ok {
		return "", false, nil
	}
	fd := m.ProtoReflect().Descriptor().Fields().ByName(protoreflect.Name(s.o.keyField))
	if fd == nil || fd.Kind() != protoreflect.StringKind || fd.IsList() {
		return "", false, nil
	}
	v := m.ProtoReflect().Get(fd).String()
	if v == "" {
		return "", false, nil
	}
	if err := ValidateKey(v); err != nil {
		return "", true, err
	}
	return v, true, nil
}

func (s *server) keySource() string {
	if s.o.keyField != "" {
		return "request field " + s.o.keyField
	}
	return s.o.keyHeader
}

// newToken returns a random owner token for a claim: only the holder of the
// token may renew, complete or release the key. The 128 bits come from a
// ChaCha8 generator seeded from crypto/rand (a cryptographically secure
// stream), one per P through a sync.Pool, which costs a fraction of a
// crypto/rand read per call.
func newToken() string {
	g := tokenRand.Get().(*mrand.ChaCha8)
	var b [16]byte
	_, _ = g.Read(b[:])
	tokenRand.Put(g)
	return hex.EncodeToString(b[:])
}

var tokenRand = sync.Pool{New: func() any {
	var seed [32]byte
	_, _ = rand.Read(seed[:])
	return mrand.NewChaCha8(seed)
}}
