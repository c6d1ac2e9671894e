package main

import (
	"context"
	"errors"
	"net/http"
	"path"
	"time"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
	idempotencyconnect "github.com/idempotency-grpc/idempotency/connect"
	"github.com/idempotency-grpc/idempotency/examples/payments/internal/gen/payments/v1/paymentsv1connect"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// newHTTPHandler serves the ledger to HTTP clients through connect-go: the
// Connect protocol (curl, fetch), gRPC-Web (browsers) and gRPC (over h2c),
// with the connect module's interceptor over p, the Protocol the gRPC
// server uses too, so a key is one key on both. The interceptors, outermost
// first: logConnect (one log line per call), then the idempotency one. A
// nil p serves without it (--bare).
func newHTTPHandler(cfg serverConfig, p *idempotency.Protocol) http.Handler {
	interceptors := []connect.Interceptor{logConnect(cfg)}
	if p != nil {
		interceptors = append(interceptors, idempotencyconnect.NewInterceptor(p))
	}
	mux := http.NewServeMux()
	mux.Handle(paymentsv1connect.NewPaymentsServiceHandler(connectLedger{cfg.ledger}, connect.WithInterceptors(interceptors...)))
	return mux
}

// connectLedger is the ledger as a connect-go handler.
type connectLedger struct{ l *ledger }

func (c connectLedger) Charge(ctx context.Context, req *connect.Request[paymentsv1.ChargeRequest]) (*connect.Response[paymentsv1.ChargeResponse], error) {
	resp, err := c.l.Charge(ctx, req.Msg)
	if err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(resp), nil
}

func (c connectLedger) ListCharges(ctx context.Context, req *connect.Request[paymentsv1.ListChargesRequest]) (*connect.Response[paymentsv1.ListChargesResponse], error) {
	resp, err := c.l.ListCharges(ctx, req.Msg)
	if err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(resp), nil
}

// connectError is the ledger's gRPC status error as a connect-go error.
func connectError(err error) error {
	st := status.Convert(err)
	return connect.NewError(connect.Code(st.Code()), errors.New(st.Message()))
}

// logConnect is logCalls for the HTTP side: one log line per call.
func logConnect(cfg serverConfig) connect.Interceptor {
	return connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if cfg.logLine == nil || req.Spec().IsClient {
				return next(ctx, req)
			}
			notes := &callNotes{}
			start := time.Now()
			resp, err := next(context.WithValue(ctx, callNotesKey{}, notes), req)
			var msg any
			if resp != nil {
				msg = resp.Any()
				if m, ok := msg.(proto.Message); ok {
					// A replay's message is a stand-in for the method's
					// type (see the connect module's doc): its reflection
					// leads to the concrete message.
					msg = m.ProtoReflect().Interface()
				}
			}
			cfg.logLine(callLine(cfg, path.Base(req.Spec().Procedure)+" ("+req.Peer().Protocol+")",
				req.Header().Values(idempotency.DefaultKeyHeader), notes, msg, idempotencyconnect.StatusOf(err).Err(), time.Since(start)))
			return resp, err
		}
	})
}
