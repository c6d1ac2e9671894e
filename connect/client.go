package idempotencyconnect

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// NewClientInterceptor returns a connect-go client interceptor that gives
// every unary call to a covered procedure (see [WithClientMethods]) an
// idempotency key and retries the call with that same key, so that the
// server (this package's [NewInterceptor], or the core's gRPC interceptor)
// runs the handler at most once and replays its outcome to the retries.
// It is the core's idempotency.UnaryClientInterceptor run over connect-go:
// the same key choice, retry decisions, backoff and deadline rules, and it
// works on all three protocols a connect-go client speaks.
//
// The key is, in order of preference: a key already in the request's
// header (never overwritten; see [WithClientKeyHeader]), the key from
// idempotency.WithKey on the call's context, or a fresh key from the
// generator (idempotency.NewKey by default; see [WithKeyGenerator]),
// generated once per logical call. Every attempt carries the same key, in
// the request header Idempotency-Key: on the Connect protocol as the IETF
// draft's structured-field string ("key", quotes included), on gRPC and
// gRPC-Web as metadata, as it is. The server reads both as the same key.
//
// Attempts are retried, with exponential backoff and full jitter
// ([WithBackoff]) up to [WithMaxAttempts] attempts, on:
//   - Unavailable (connect-go's code for a connection refused or reset and
//     for HTTP 502, 503 and 504), the store-outage reasons included;
//   - Aborted with reason KEY_IN_PROGRESS (the first call with the key still
//     runs), after at least the delay of its google.rpc.RetryInfo;
//   - DeadlineExceeded caused by [WithPerAttemptTimeout] only;
//   - the codes added with [WithRetryCodes].
//
// Other errors, and every error the server gives about the key itself
// (KEY_REUSED, KEY_INVALID, ...), are returned after one attempt. The
// caller's context bounds the whole loop: when it is done, or when the
// next wait would end past its deadline, the call returns at once; no
// wait runs past the deadline. The error returned is the last attempt's
// *connect.Error, unchanged, except when the context ends during a wait:
// then it is Canceled or DeadlineExceeded with reason RETRY_INTERRUPTED,
// quoting the last attempt's error. A key that fails idempotency.ValidateKey
// fails the call with InvalidArgument, reason KEY_INVALID, before anything
// is sent.
//
// The response is the last attempt's: [Replayed] on its Header() (or on the
// error's Meta()) reports whether the server replayed a stored outcome.
// [WithCallResult] reports the key, the attempts and the replay flag. The
// request's header is left as the caller made it: a request value sent
// again is a new logical call and gets a new key. Except after an attempt
// cut off by its context (a deadline, a per-attempt timeout, a cancel):
// net/http may still be reading that attempt's header, so the key is left
// on the request, and the request sent again is a retry under that key. To retry a call
// yourself, give it its key with idempotency.WithKey or in the header.
//
// Install it first (outermost) among the client's interceptors, before any
// interceptor that retries on its own: connect-go runs the interceptors
// after it on every attempt.
//
//	client := paymentsv1connect.NewPaymentsServiceClient(httpClient, url,
//		connect.WithInterceptors(idempotencyconnect.NewClientInterceptor()))
//
// Streaming calls pass through untouched: no key, no retries (the server
// side covers unary calls only). Installed on a handler, it passes calls
// through too. Options panic on values they refuse, as their docs say.
func NewClientInterceptor(opts ...ClientOption) connect.Interceptor {
	o := clientOptions{header: idempotency.DefaultKeyHeader}
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	return &clientInterceptor{
		header: http.CanonicalHeaderKey(o.header),
		mdKey:  o.header,
		core:   idempotency.UnaryClientInterceptor(append(o.core, idempotency.WithClientKeyHeader(o.header))...),
	}
}

type clientInterceptor struct {
	header string // canonical, for http.Header
	mdKey  string // lower case, for the core's metadata
	core   grpc.UnaryClientInterceptor
}

type callResultKey struct{}

// WithCallResult returns a copy of ctx that makes the interceptor of
// [NewClientInterceptor] store in info, when a call made with the context
// returns (succeeding or failing), the key it sent, the number of attempts
// and whether the final answer was a replay. It is the connect-go form of
// idempotency.CallResult, which is a grpc.CallOption. Without the
// interceptor on the client, info is left untouched. Each call made with
// the context overwrites info: use one context per call, or WithCallResult
// again, as the call's context.
func WithCallResult(ctx context.Context, info *idempotency.CallInfo) context.Context {
	prev, _ := ctx.Value(callResultKey{}).([]*idempotency.CallInfo)
	return context.WithValue(ctx, callResultKey{}, append(slices.Clip(prev), info))
}

// WrapUnary runs unary client calls through the core's client interceptor:
// its invoker is one connect-go attempt.
func (c *clientInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		spec := req.Spec()
		if !spec.IsClient || spec.StreamType != connect.StreamTypeUnary {
			return next(ctx, req)
		}
		h := req.Header()
		connectProtocol := req.Peer().Protocol == connect.ProtocolConnect
		if own := h.Values(c.header); len(own) > 0 {
			// The caller's key wins, as a key in grpc-go's outgoing metadata
			// does in the core: hand it to the core as such, so that it
			// reports it and does not make one.
			key := own[0]
			if connectProtocol {
				if k, _, err := idempotency.ParseKeyHeader(own); err == nil {
					key = k
				}
			}
			md, ok := metadata.FromOutgoingContext(ctx)
			if !ok {
				md = metadata.MD{}
			}
			md.Set(c.mdKey, key)
			ctx = metadata.NewOutgoingContext(ctx, md)
		}

		var (
			resp  connect.AnyResponse
			last  error // the last attempt's error, as connect-go returned it
			added bool  // whether the request's header got the key from us
			// cutOff: an attempt ended by its context. net/http may still be
			// encoding that attempt's request header in a goroutine of its
			// own after connect-go returned (seen under -race with HTTP/2),
			// so the header map must not be written after it.
			cutOff bool
		)
		invoke := func(actx context.Context, _ string, _, _ any, _ *grpc.ClientConn, opts ...grpc.CallOption) error {
			if len(h.Values(c.header)) == 0 {
				// The key the core chose, in the protocol's form. The same on
				// every attempt: set once.
				if md, ok := metadata.FromOutgoingContext(actx); ok {
					if vals := md.Get(c.mdKey); len(vals) > 0 {
						h.Set(c.header, headerValue(vals[0], connectProtocol))
						added = true
					}
				}
			}
			resp, last = next(actx, req)
			if last != nil && actx.Err() != nil {
				cutOff = true
			}
			var header, trailer http.Header
			if resp != nil {
				header, trailer = resp.Header(), resp.Trailer()
			}
			var ce *connect.Error
			if errors.As(last, &ce) {
				trailer = ce.Meta() // an error's header and trailer, merged
			}
			fillMetadata(opts, header, trailer)
			if last != nil {
				return attemptError{last}
			}
			return nil
		}

		infos, _ := ctx.Value(callResultKey{}).([]*idempotency.CallInfo)
		callOpts := make([]grpc.CallOption, 0, len(infos))
		for _, info := range infos {
			callOpts = append(callOpts, idempotency.CallResult(info))
		}
		err := c.core(ctx, spec.Procedure, req.Any(), nil, nil, invoke, callOpts...)
		if added && !cutOff && ctx.Err() == nil {
			// The key belongs to this logical call, not to the request
			// value: sent again, the request is a new call with a new key.
			// Not after an attempt was cut off by its context (see cutOff):
			// the key then stays on the request, so sending it again is
			// a retry of this call under its key, which is what a caller
			// re-sending a timed-out request means anyway.
			h.Del(c.header)
		}
		if err == nil {
			return resp, nil
		}
		var ae attemptError
		if errors.As(err, &ae) {
			return nil, ae.err // the last attempt's error, unchanged
		}
		// The core's own answer (an invalid key, a failed generator, a wait
		// cut short): a status with ErrorInfo, as a *connect.Error.
		return nil, connectError(status.Convert(err).Proto())
	}
}

// WrapStreamingClient leaves streams alone.
func (c *clientInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

// WrapStreamingHandler leaves handlers alone: this is a client interceptor.
func (c *clientInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// attemptError carries one attempt's connect-go error through the core's
// retry loop, which judges errors by their gRPC status.
type attemptError struct{ err error }

func (e attemptError) Error() string { return e.err.Error() }

func (e attemptError) Unwrap() error { return e.err }

// GRPCStatus is the status connect-go's error stands for (see [StatusOf]).
func (e attemptError) GRPCStatus() *status.Status { return StatusOf(e.err) }

// fillMetadata hands an attempt's response header and trailer to the
// core's grpc.Header and grpc.Trailer call options, from which it reads
// the replay marker.
func fillMetadata(opts []grpc.CallOption, header, trailer http.Header) {
	for _, o := range opts {
		switch o := o.(type) {
		case grpc.HeaderCallOption:
			*o.HeaderAddr = toMetadata(header)
		case grpc.TrailerCallOption:
			*o.TrailerAddr = toMetadata(trailer)
		}
	}
}

func toMetadata(h http.Header) metadata.MD {
	md := make(metadata.MD, len(h))
	for k, vs := range h {
		k = strings.ToLower(k)
		md[k] = append(md[k], vs...)
	}
	return md
}

// headerValue is key as the request header carries it: on the Connect
// protocol, HTTP's own, the IETF draft's sf-string; on gRPC and gRPC-Web,
// metadata as it is. A valid key holds only 0x21-0x7E, all of which an
// sf-string can carry.
func headerValue(key string, connectProtocol bool) string {
	if !connectProtocol {
		return key
	}
	var b strings.Builder
	b.Grow(len(key) + 2)
	b.WriteByte('"')
	for i := 0; i < len(key); i++ {
		if c := key[i]; c == '"' || c == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(key[i])
	}
	b.WriteByte('"')
	return b.String()
}
