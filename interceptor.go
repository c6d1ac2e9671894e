package idempotency

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"
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
	s := &server{store: store, o: evaluateOptions(opts)}
	s.policies.override = s.o.policy
	if s.o.localCacheSize > 0 {
		s.cache = newLocalCache(s.o.localCacheSize, s.o.localCacheAge)
	}
	if s.o.coalesce {
		s.flights = &flights{m: make(map[string]*flight)}
	}
	return s.intercept
}

type server struct {
	store    Store
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
	ev         Event
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

// claim claims the key and either executes the handler or answers from the
// stored record. It loops only when waiting for a running first call.
func (s *server) claim(ctx context.Context, c *call, req any, handler grpc.UnaryHandler) (any, error) {
	var err error
	c.inProgress, err = proto.Marshal(&idempotencyv1.Record{
		Version:     recordVersion,
		State:       idempotencyv1.Record_STATE_IN_PROGRESS,
		Fingerprint: c.fp,
		Method:      c.method,
		CreateTime:  timestamppb.New(s.o.now()),
		LeaseToken:  c.token,
	})
	if err != nil {
		return nil, s.fail(ctx, c, OutcomeRejected, errEncodeRecord(c.method), err)
	}
	wait := s.o.pollInterval
	for {
		start, sent := time.Now(), s.o.now()
		res, err := s.store.Claim(ctx, c.storeKey, c.token, c.inProgress, s.o.lease)
		c.ev.StoreLatency += time.Since(start)
		if err != nil {
			// The claim may have been applied with its reply lost: free it
			// in the background rather than leave it until its lease ends.
			// The release is fenced by the token, so it frees nothing else.
			go func() {
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.o.completeTimeout)
				defer cancel()
				_ = s.store.Release(rctx, c.storeKey, c.token)
			}()
			if ctx.Err() != nil {
				return nil, s.fail(ctx, c, OutcomeCanceled, errCallEnded(c.method, ctx.Err()), err)
			}
			if errors.Is(err, ErrCorruptRecord) {
				return nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), err)
			}
			if s.o.failOpen {
				c.ev.Outcome, c.ev.Err = OutcomeFailOpen, err
				resp, herr := handler(contextWithServerKey(guardMarker(ctx), c.key), req)
				c.ev.Code = handlerStatus(herr).Code()
				s.emit(ctx, c)
				return resp, herr
			}
			return nil, s.fail(ctx, c, OutcomeStoreUnavailable, errStoreUnavailable(c.method), err)
		}
		if res.Claimed {
			return s.execute(ctx, c, req, handler)
		}
		rec, err := decodeRecord(res.Record)
		if err == nil && rec.GetState() == idempotencyv1.Record_STATE_IN_PROGRESS && rec.GetLeaseToken() == c.token {
			// Our own claim, applied by an earlier try of the same command
			// whose reply was lost (a client-library retry).
			return s.execute(ctx, c, req, handler)
		}
		if err == nil && rec.GetMethod() != c.method {
			err = fmt.Errorf("%w: record of method %q", ErrCorruptRecord, rec.GetMethod())
		}
		if err != nil {
			return nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), err)
		}
		if rec.GetState() != idempotencyv1.Record_STATE_IN_PROGRESS {
			if s.cache != nil && res.TTL > 0 && bytes.Equal(rec.GetFingerprint(), c.fp) {
				// Kept no longer than the store said the record has left,
				// counted from before the claim was sent: another server's
				// clock never decides how long this one replays.
				s.cache.put(c.storeKey, rec, sent, res.TTL)
			}
			return s.answer(ctx, c, rec)
		}
		if !bytes.Equal(rec.GetFingerprint(), c.fp) {
			return nil, s.fail(ctx, c, OutcomeKeyReused, errKeyReused(c.method), nil)
		}
		if !s.o.waitInProgress {
			return nil, s.fail(ctx, c, OutcomeInProgress, errInProgress(c.method, s.o.retryDelay), nil)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, s.fail(ctx, c, OutcomeInProgress, errCallEnded(c.method, ctx.Err()), nil)
		case <-t.C:
		}
		if wait < 16*s.o.pollInterval {
			wait *= 2
		}
	}
}

// answer answers a repeat from a completed or too-large record.
func (s *server) answer(ctx context.Context, c *call, rec *idempotencyv1.Record) (any, error) {
	if !bytes.Equal(rec.GetFingerprint(), c.fp) {
		return nil, s.fail(ctx, c, OutcomeKeyReused, errKeyReused(c.method), nil)
	}
	c.final = rec
	if rec.GetState() == idempotencyv1.Record_STATE_TOO_LARGE {
		return nil, s.fail(ctx, c, OutcomeAlreadyProcessed, errTooLarge(c.method, rec.GetResponseSize()), nil)
	}
	return s.replay(ctx, c, rec)
}

// execute runs the handler as the key's owner and stores or releases its
// outcome.
func (s *server) execute(ctx context.Context, c *call, req any, handler grpc.UnaryHandler) (resp any, err error) {
	hctx := contextWithServerKey(ctx, c.key)
	var cs *capturingStream
	if st := grpc.ServerTransportStreamFromContext(ctx); st != nil {
		cs = &capturingStream{ServerTransportStream: st}
		hctx = grpc.NewContextWithServerTransportStream(hctx, cs)
	}
	// The lease is kept until the outcome is written, so a write that must
	// be retried (Redis briefly unreachable) does not let the lease end under
	// it. A release stops it first: a key being freed needs no lease.
	keeper := s.keepLease(c)
	panicked := true
	defer func() {
		if panicked {
			keeper.stop(true)
			c.ev.Outcome, c.ev.Code = OutcomePanicked, codes.Internal
			c.ev.Err = s.finish(ctx, c, nil)
			s.emit(ctx, c)
		}
	}()
	resp, err = handler(hctx, req)
	panicked = false

	st := handlerStatus(err)
	c.ev.Code = st.Code()
	if !s.o.storeOutcome(st.Code()) {
		keeper.stop(true)
		c.ev.Outcome = OutcomeReleased
		if ferr := s.finish(ctx, c, nil); ferr != nil {
			c.ev.Outcome, c.ev.Err = outcomeOfStoreErr(ferr), ferr
		}
		s.emit(ctx, c)
		return resp, err
	}
	var header, trailer metadata.MD
	if cs != nil {
		header, trailer = cs.captured()
	}
	rec, final, outcome, rerr := s.finalRecord(c, resp, st, header, trailer)
	if rerr != nil {
		// The outcome cannot be stored (e.g. a non-protobuf response): free
		// the key rather than leave it stuck in progress.
		keeper.stop(true)
		c.ev.Outcome, c.ev.Err = OutcomeNotStored, rerr
		_ = s.finish(ctx, c, nil)
		s.emit(ctx, c)
		return resp, err
	}
	if keeper.wasForgotten() {
		// An operator deleted the record while the handler ran (Forget):
		// it must not come back.
		keeper.stop(false)
		c.ev.Outcome, c.ev.Err = OutcomeLeaseLost, errForgotten
		s.emit(ctx, c)
		return resp, err
	}
	c.ev.Outcome = outcome
	written := s.o.now()
	ferr := s.finish(ctx, c, rec)
	keeper.stop(false)
	if ferr != nil {
		c.ev.Outcome, c.ev.Err = outcomeOfStoreErr(ferr), ferr
	} else {
		c.final = final
		if s.cache != nil {
			// Counted from before the write, so never past the store's
			// own expiry.
			s.cache.put(c.storeKey, final, written, s.o.ttl)
		}
	}
	s.emit(ctx, c)
	return resp, err
}

// handlerStatus returns the status grpc-go sends for a handler's error: the
// error's own status, or, for an error that is not a status, the status of
// a context error (a bare context.DeadlineExceeded is DeadlineExceeded, not
// Unknown), exactly as grpc-go's server does. The stored code is therefore
// always the code the client received.
func handlerStatus(err error) *status.Status {
	if st, ok := status.FromError(err); ok {
		return st
	}
	return status.FromContextError(err)
}

func outcomeOfStoreErr(err error) Outcome {
	if errors.Is(err, ErrLeaseLost) {
		return OutcomeLeaseLost
	}
	return OutcomeNotStored
}

// finish completes the key with rec, or releases it when rec is nil. It
// does not use the request's cancellation: a client that went away must not
// cost the outcome. Store failures are retried with backoff until
// WithCompleteTimeout ends; that is safe because both steps are fenced by the
// token and Complete is idempotent for it. The caller's answer waits for it,
// so an answer that reached the client was, in the normal case, stored.
func (s *server) finish(ctx context.Context, c *call, rec []byte) error {
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.o.completeTimeout)
	defer cancel()
	start := time.Now()
	defer func() { c.ev.StoreLatency += time.Since(start) }()
	backoff := 10 * time.Millisecond
	for {
		var err error
		if rec == nil {
			err = s.store.Release(fctx, c.storeKey, c.token)
		} else {
			err = s.store.Complete(fctx, c.storeKey, c.token, rec, s.o.ttl)
		}
		if err == nil || errors.Is(err, ErrLeaseLost) {
			return err
		}
		t := time.NewTimer(backoff)
		select {
		case <-fctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

// finalRecord encodes the outcome of the handler, or a too-large marker when
// it exceeds the size limit.
func (s *server) finalRecord(c *call, resp any, st *status.Status, header, trailer metadata.MD) ([]byte, *idempotencyv1.Record, Outcome, error) {
	now := s.o.now()
	rec := &idempotencyv1.Record{
		Version:      recordVersion,
		State:        idempotencyv1.Record_STATE_COMPLETED,
		Fingerprint:  c.fp,
		Method:       c.method,
		Header:       mdToEntries(header),
		Trailer:      mdToEntries(trailer),
		CompleteTime: timestamppb.New(now),
	}
	rec.Status = wireStatus(st)
	if st.Code() == codes.OK {
		m, ok := resp.(proto.Message)
		if !ok {
			return nil, nil, "", fmt.Errorf("idempotency: response of type %T is not a protobuf message", resp)
		}
		b, err := deterministic.Marshal(m)
		if err != nil {
			return nil, nil, "", fmt.Errorf("idempotency: encode response: %w", err)
		}
		rec.Response = b
		rec.ResponseType = string(m.ProtoReflect().Descriptor().FullName())
	}
	b, err := proto.Marshal(rec)
	if err != nil {
		return nil, nil, "", fmt.Errorf("idempotency: encode record: %w", err)
	}
	if len(b) <= s.o.maxRecordSize {
		return b, rec, OutcomeExecuted, nil
	}
	rec = &idempotencyv1.Record{
		Version:      recordVersion,
		State:        idempotencyv1.Record_STATE_TOO_LARGE,
		Fingerprint:  c.fp,
		Method:       c.method,
		ResponseSize: int64(len(b)),
		CompleteTime: timestamppb.New(now),
	}
	b, err = proto.Marshal(rec)
	return b, rec, OutcomeTooLarge, err
}

// replay answers a repeat from a completed record.
func (s *server) replay(ctx context.Context, c *call, rec *idempotencyv1.Record) (any, error) {
	sp := &spb.Status{Code: rec.GetStatus().GetCode(), Message: rec.GetStatus().GetMessage(), Details: rec.GetStatus().GetDetails()}
	if s.o.rejectRepeats {
		// The stored outcome travels as is: the response bytes in an Any of
		// the response type, or the stored error as a google.rpc.Status.
		var detail proto.Message = sp
		if sp.Code == int32(codes.OK) {
			detail = &anypb.Any{TypeUrl: "type.googleapis.com/" + rec.GetResponseType(), Value: rec.GetResponse()}
		}
		return nil, s.fail(ctx, c, OutcomeAlreadyProcessed, errAlreadyProcessed(c.method, detail), nil)
	}
	var resp proto.Message
	if sp.Code == int32(codes.OK) {
		mt, err := s.policies.messageType(c.method, rec.GetResponseType())
		if err != nil {
			return nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), err)
		}
		resp = mt.New().Interface()
		if err := proto.Unmarshal(rec.GetResponse(), resp); err != nil {
			return nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), fmt.Errorf("%w: response: %v", ErrCorruptRecord, err))
		}
	}
	header := entriesToMD(rec.GetHeader())
	header.Append(ReplayedHeader, "true")
	// The stream is absent only when the interceptor is called outside a
	// gRPC server (unit tests); the replay itself is still correct.
	_ = grpc.SetHeader(ctx, header)
	if len(rec.GetTrailer()) > 0 {
		_ = grpc.SetTrailer(ctx, entriesToMD(rec.GetTrailer()))
	}
	c.ev.Outcome, c.ev.Code = OutcomeReplayed, codes.Code(sp.Code)
	s.emit(ctx, c)
	if sp.Code != int32(codes.OK) {
		return nil, status.FromProto(sp).Err()
	}
	return resp, nil
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
// token may renew, complete or release the key.
func newToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
