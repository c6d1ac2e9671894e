// The gRPC adapter: grpc-go's unary server interceptor over the protocol.

package idempotency

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
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
// To serve other transports over the same state (the connect module), build
// a [Protocol] and take its [Protocol.UnaryServerInterceptor] instead.
//
// Panics if store is nil.
func UnaryServerInterceptor(store Store, opts ...Option) grpc.UnaryServerInterceptor {
	if store == nil {
		badOption("UnaryServerInterceptor", "nil", "a Store is required")
	}
	return newServer(store, opts).intercept
}

// grpcCall is one call through the gRPC adapter: the protocol's call state
// with the handler, its request and, for an owner, the stream that
// captures its metadata, in one allocation.
type grpcCall struct {
	call
	ctx     context.Context // the call's incoming context, for its metadata
	req     any
	handler grpc.UnaryHandler
	capture capturingStream
}

func (s *server) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	g := &grpcCall{ctx: ctx, req: req, handler: handler}
	// Field by field: a composite literal of call would be built in this
	// frame first, which is on the stack for the whole call.
	g.method, g.x, g.ev.Method = info.FullMethod, g, info.FullMethod
	return s.handle(ctx, &g.call, req)
}

// RequestHeader returns the call's incoming metadata values of name (read
// without copying the whole metadata).
func (g *grpcCall) RequestHeader(name string) []string {
	return metadata.ValueFromIncomingContext(g.ctx, name)
}

// Run runs the handler. An owner's runs with a stream that captures the
// header and trailer it sends; any other with one that only drops the
// replay marker. Outside a gRPC server (unit tests) there is no stream to
// wrap.
func (g *grpcCall) Run(ctx context.Context, owner bool) Result {
	st := grpc.ServerTransportStreamFromContext(ctx)
	if !owner {
		if st != nil {
			ctx = grpc.NewContextWithServerTransportStream(ctx, markerGuard{st})
		}
		resp, err := g.handler(ctx, g.req)
		return Result{Response: resp, Err: err}
	}
	if st != nil {
		g.capture.ServerTransportStream = st
		ctx = grpc.NewContextWithServerTransportStream(ctx, &g.capture)
	}
	resp, err := g.handler(ctx, g.req)
	r := Result{Response: resp, Err: err, Status: handlerStatus(err)}
	r.Message, _ = resp.(proto.Message)
	if st != nil {
		r.Header, r.Trailer = g.capture.captured()
	}
	return r
}

// Replay sets the stored header and trailer on the call and returns the
// stored response or error.
func (g *grpcCall) Replay(ctx context.Context, s Stored) (any, error) {
	// The stream is absent only when the interceptor is called outside a
	// gRPC server (unit tests); the replay itself is still correct.
	_ = grpc.SetHeader(ctx, s.Header)
	if len(s.Trailer) > 0 {
		_ = grpc.SetTrailer(ctx, s.Trailer)
	}
	if err := s.Status.Err(); err != nil {
		return nil, err
	}
	return s.Response, nil
}

// Refuse returns err: the protocol's errors are gRPC status errors.
func (g *grpcCall) Refuse(err error) error { return err }

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
