// How to read the protocol: one call, top down.
//
// handle, below, is the whole path of a call; each step is a function of
// its own, called in this order:
//
//  1. findKey: the call's key, from the request header or field. A call
//     without one passes through (runUnprotected) or is refused.
//  2. prepare: the store key (the scoped key), the request's fingerprint
//     and the owner token.
//  3. local: an answer this process already has ([WithLocalCache]), or the
//     outcome of a duplicate running on this server ([WithCoalescing]).
//  4. claim (claim.go): one store round trip, which makes the call the
//     key's owner or returns what is stored under the key.
//  5. execute (execute.go), for the owner: run the handler, then store its
//     outcome or free the key, as one table decides (settle); or answer
//     (replay.go), for a repeat: replay the stored outcome.
//
// Each step that ends the call reports it once (emit, observe.go) and
// returns the transport's answer; a refusal goes through fail. The steps
// that run while a store call or the handler is on the stack (claim,
// execute) keep their frames small and leave their cold branches to
// helpers: grpc-go runs each call in a fresh goroutine, whose stack grows
// by copying once the path is deep.

package idempotency

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	mrand "math/rand/v2"
	"sync"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// handle runs one call through the protocol. c.key is set when the caller
// gives the key ([Do]); otherwise the transport's request carries it.
func (s *server) handle(ctx context.Context, c *call, req any) (any, error) {
	if c.key == "" {
		if found, resp, err := s.findKey(ctx, c, req); !found {
			return resp, err
		}
	}
	if err := s.prepare(ctx, c, req); err != nil {
		return nil, err
	}
	rec, f, err := s.local(ctx, c)
	if err != nil {
		return nil, err
	}
	if f != nil {
		// This call leads the duplicates that wait for it on this server.
		defer s.endFlight(f, c)
	}
	if rec == nil {
		var next claimNext
		if next, rec, err = s.claim(ctx, c); err != nil {
			return nil, err
		}
		switch next {
		case claimOwned:
			return s.execute(ctx, c)
		case claimFailOpen:
			return s.runUnprotected(ctx, c)
		}
	}
	return s.answer(ctx, c, rec)
}

// findKey finds the call's key (c.key). found is false when the call ends
// without one: it passed through (the method ignores keys, or has none and
// does not require one) or was refused, and resp and err are its answer.
func (s *server) findKey(ctx context.Context, c *call, req any) (found bool, resp any, err error) {
	policy := s.policies.get(c.method, c.idempotent)
	if policy == KeyIgnored {
		r := c.x.Run(ctx, false)
		return false, r.Response, r.Err
	}
	key, present, err := s.extractKey(c, req)
	switch {
	case err != nil:
		return false, nil, s.fail(ctx, c, OutcomeKeyInvalid, errKeyInvalid(c.method, s.keySource(), err), nil)
	case !present && policy == KeyRequired:
		return false, nil, s.fail(ctx, c, OutcomeKeyMissing, errKeyRequired(c.method, s.keySource()), nil)
	case !present:
		c.ev.Outcome = OutcomePassThrough
		resp, err = s.runUnprotected(ctx, c)
		return false, resp, err
	}
	c.key = key
	return true, nil, nil
}

// prepare scopes the key (c.storeKey), fingerprints the request (c.fp) and
// draws the owner token (c.token). It returns the refusal when the scope
// or the fingerprint function failed.
func (s *server) prepare(ctx context.Context, c *call, req any) error {
	var scope string
	var err error
	if s.o.scope != nil {
		if scope, err = s.o.scope(ctx); err != nil {
			if _, ok := status.FromError(err); !ok {
				err = errScopeFailed(c.method)
			}
			return s.fail(ctx, c, OutcomeRejected, err, nil)
		}
	}
	c.storeKey = StoreKey(c.method, scope, c.key)
	if c.fp, err = s.o.fingerprint(c.method, req); err != nil {
		return s.fail(ctx, c, OutcomeRejected, errFingerprintFailed(c.method), err)
	}
	c.token = newToken()
	return nil
}

// local answers from this process when it can: it returns the local
// cache's record of the key, or waits for a duplicate of the call running
// on this server and returns its stored outcome. Both nil: the store
// decides, and f, when set, is the flight the call leads, which it ends
// with endFlight. err is the refusal of a call whose context ended while
// it waited.
func (s *server) local(ctx context.Context, c *call) (rec *idempotencyv1.Record, f *flight, err error) {
	if s.cache != nil {
		if rec = s.cache.get(c.storeKey, s.o.now()); rec != nil {
			c.ev.Local = true
			return rec, nil, nil
		}
	}
	if s.flights == nil {
		return nil, nil, nil
	}
	f, leader := s.flights.join(c.storeKey, c.fp)
	if leader {
		return nil, f, nil
	}
	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, nil, s.fail(ctx, c, OutcomeInProgress, errCallEnded(c.method, ctx.Err()), nil)
	}
	if f.final != nil {
		c.ev.Local = true
		return f.final, nil, nil
	}
	// The leader stored nothing: its duplicates go to the store.
	return nil, nil, nil
}

// endFlight ends the flight c leads, handing its duplicates the outcome c
// ended with (none when it stored nothing).
func (s *server) endFlight(f *flight, c *call) {
	s.flights.finish(c.storeKey, f, c.final)
}

// runUnprotected runs the handler outside the protocol and reports it: a
// call without a key (c.ev.Outcome is OutcomePassThrough), or one whose
// store failed under WithFailOpen (OutcomeFailOpen; its context carries
// the key).
func (s *server) runUnprotected(ctx context.Context, c *call) (any, error) {
	hctx := ctx
	if c.key != "" {
		hctx = contextWithServerKey(ctx, c.key)
	}
	r := c.x.Run(hctx, false)
	c.ev.Code = r.finalStatus().Code()
	s.emit(ctx, c)
	return r.Response, r.Err
}

// fail reports a refused call and returns err in the transport's form.
func (s *server) fail(ctx context.Context, c *call, o Outcome, err error, cause error) error {
	c.ev.Outcome, c.ev.Code, c.ev.Err = o, status.Code(err), cause
	s.emit(ctx, c)
	return c.x.Refuse(err)
}

// extractKey returns the call's key from the request header, or from the
// request field set with WithKeyField.
func (s *server) extractKey(c *call, req any) (string, bool, error) {
	if s.o.keyField == "" {
		vals := c.x.RequestHeader(s.o.keyHeader)
		if c.httpKey && len(vals) > 0 {
			key, _, err := ParseKeyHeader(vals)
			if err == nil {
				err = ValidateKey(key)
			}
			return key, true, err
		}
		binary := len(vals) == 0 && len(c.x.RequestHeader(s.o.binHeader)) > 0
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

// keySource names where the key is read, for the refusals of a missing or
// invalid key.
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
