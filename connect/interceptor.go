package idempotencyconnect

import (
	"context"
	"net/http"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
)

// NewInterceptor returns a connect-go interceptor that runs each keyed
// unary call once per key through p and answers every repeat with the
// stored outcome, marked with the header Idempotency-Replayed: true. Install
// it on handlers:
//
//	p := idempotency.NewProtocol(store, opts...)
//	path, h := paymentsv1connect.NewPaymentsServiceHandler(svc,
//		connect.WithInterceptors(idempotencyconnect.NewInterceptor(p)))
//
// It is a handler interceptor: on clients it passes calls through (use
// [NewClientInterceptor] there), as it does streaming calls. Panics if p
// is nil.
func NewInterceptor(p *idempotency.Protocol) connect.Interceptor {
	if p == nil {
		panic("idempotencyconnect.NewInterceptor: nil Protocol: build one with idempotency.NewProtocol")
	}
	return &interceptor{p: p}
}

type interceptor struct {
	p *idempotency.Protocol
}

// WrapUnary runs unary handler calls through the protocol.
func (i *interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		spec := req.Spec()
		if spec.IsClient {
			return next(ctx, req)
		}
		x := &exchange{next: next, req: req}
		resp, err := i.p.Handle(ctx, idempotency.Call{
			Method:     spec.Procedure,
			Request:    req.Any(),
			Idempotent: spec.IdempotencyLevel != connect.IdempotencyUnknown,
			// On the Connect protocol, HTTP's own, the key header is the
			// IETF draft's; on gRPC and gRPC-Web it is metadata, read as
			// grpc-go's interceptor reads it, so a gRPC client's key means
			// the same whichever library serves it.
			HTTPKeyHeader: req.Peer().Protocol == connect.ProtocolConnect,
		}, x)
		if err != nil {
			return nil, err
		}
		r, _ := resp.(connect.AnyResponse)
		return r, nil
	}
}

// WrapStreamingClient leaves streams alone.
func (i *interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

// WrapStreamingHandler leaves streams alone: the protocol covers unary
// calls.
func (i *interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// ReplayedHeader is the response header that marks a replayed answer, as
// net/http writes it: [idempotency.ReplayedHeader] in canonical form.
const ReplayedHeader = "Idempotency-Replayed"

// Replayed reports whether a response's header, or an error's metadata
// (connect.Error.Meta), marks the answer as a replay of a stored outcome
// rather than a fresh execution.
func Replayed(h http.Header) bool {
	for _, v := range h.Values(ReplayedHeader) {
		if v == "true" {
			return true
		}
	}
	return false
}
