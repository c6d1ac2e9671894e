// The Connect side of one call: what the protocol asks of the transport,
// and the conversions between connect-go's errors and headers and the
// protocol's gRPC status and metadata.

package idempotencyconnect

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// exchange is one unary call through the interceptor.
type exchange struct {
	next connect.UnaryFunc
	req  connect.AnyRequest
}

var _ idempotency.Exchange = (*exchange)(nil)

// RequestHeader returns the request's values of the header name.
func (x *exchange) RequestHeader(name string) []string {
	return x.req.Header().Values(name)
}

// Run runs the handler. The replay marker is removed from whatever the
// handler sends, owner or not. An owner's header is what the handler put
// in the response's header and in the call's connect.CallInfo; its trailer
// what it put in their trailers, and an error's metadata (sent as trailers
// on gRPC).
func (x *exchange) Run(ctx context.Context, owner bool) idempotency.Result {
	resp, err := x.next(ctx, x.req)
	info, _ := connect.CallInfoForHandlerContext(ctx)
	var ce *connect.Error
	if err != nil && !errors.As(err, &ce) {
		ce = nil
	}
	if info != nil {
		dropMarker(info.ResponseHeader())
		dropMarker(info.ResponseTrailer())
	}
	if resp != nil {
		dropMarker(resp.Header())
		dropMarker(resp.Trailer())
	}
	if ce != nil {
		dropMarker(ce.Meta())
	}
	r := idempotency.Result{Response: resp, Err: err}
	if err != nil {
		r.Status = StatusOf(err)
	}
	if !owner {
		return r
	}
	if err == nil && resp != nil {
		r.Message, _ = resp.Any().(proto.Message)
	}
	header, trailer := metadata.MD{}, metadata.MD{}
	if info != nil {
		addHeader(header, info.ResponseHeader())
		addHeader(trailer, info.ResponseTrailer())
	}
	if resp != nil {
		addHeader(header, resp.Header())
		addHeader(trailer, resp.Trailer())
	}
	if ce != nil {
		addHeader(trailer, ce.Meta())
	}
	r.Header, r.Trailer = header, trailer
	return r
}

// replayedMessage carries a replayed response: connect-go cannot build a
// *connect.Response[T] for a T known only at run time, so the replay's
// message is a *replayedMessage, a proto.Message (ProtoReflect is the
// stored message's) that every protobuf codec encodes as the stored message.
type replayedMessage struct{ proto.Message }

// Replay returns the stored response, with the stored header and trailer
// (the header holds the replay marker), or the stored error with both in
// its metadata.
func (x *exchange) Replay(_ context.Context, s idempotency.Stored) (any, error) {
	if s.Status.Code() != codes.OK {
		ce := connectError(s.Status.Proto())
		setHeader(ce.Meta(), s.Header)
		setHeader(ce.Meta(), s.Trailer)
		return nil, ce
	}
	resp := connect.NewResponse(&replayedMessage{s.Response})
	setHeader(resp.Header(), s.Header)
	setHeader(resp.Trailer(), s.Trailer)
	return resp, nil
}

// Refuse converts the protocol's status error, ErrorInfo and RetryInfo
// included, to a *connect.Error with the same code, message and details.
func (x *exchange) Refuse(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return connect.NewError(connect.CodeInternal, err)
	}
	return connectError(st.Proto())
}

// StatusOf returns the gRPC status an error stands for as connect-go sends
// it: a *connect.Error's code, message and details; a context error's code;
// Unknown with the error's text for anything else; nil for nil. With it,
// the core's helpers (idempotency.ReasonOf, ...) read connect-go errors.
func StatusOf(err error) *status.Status {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if !errors.As(err, &ce) || ce == nil {
		switch {
		case errors.Is(err, context.Canceled):
			return status.New(codes.Canceled, err.Error())
		case errors.Is(err, context.DeadlineExceeded):
			return status.New(codes.DeadlineExceeded, err.Error())
		}
		return status.New(codes.Unknown, err.Error())
	}
	code := codes.Code(ce.Code())
	if code == codes.OK || code > codes.Unauthenticated {
		code = codes.Unknown
	}
	sp := &spb.Status{Code: int32(code), Message: ce.Message()}
	for _, d := range ce.Details() {
		sp.Details = append(sp.Details, &anypb.Any{TypeUrl: "type.googleapis.com/" + d.Type(), Value: d.Bytes()})
	}
	return status.FromProto(sp)
}

// connectError is sp as a *connect.Error.
func connectError(sp *spb.Status) *connect.Error {
	ce := connect.NewError(connect.Code(sp.GetCode()), errors.New(sp.GetMessage()))
	for _, a := range sp.GetDetails() {
		if d, err := connect.NewErrorDetail(a); err == nil {
			ce.AddDetail(d)
		}
	}
	return ce
}

// dropMarker removes the replay marker from h, in any letter case.
func dropMarker(h http.Header) {
	for k := range h {
		if strings.EqualFold(k, idempotency.ReplayedHeader) {
			delete(h, k)
		}
	}
}

// addHeader adds h to md: keys in lower case, values of "-bin" keys
// decoded from base64 (connect-go sends binary headers base64-encoded, as
// gRPC does). A "-bin" value that is not base64 is left out: it cannot be
// replayed through gRPC. The protocol stores only what gRPC can send.
func addHeader(md metadata.MD, h http.Header) {
	for k, vs := range h {
		k = strings.ToLower(k)
		bin := strings.HasSuffix(k, "-bin")
		for _, v := range vs {
			if bin {
				b, err := connect.DecodeBinaryHeader(v)
				if err != nil {
					continue
				}
				v = string(b)
			}
			md[k] = append(md[k], v)
		}
	}
}

// setHeader adds md to h: values of "-bin" keys encoded in base64.
func setHeader(h http.Header, md metadata.MD) {
	for k, vs := range md {
		ck := http.CanonicalHeaderKey(k)
		for _, v := range vs {
			if strings.HasSuffix(k, "-bin") {
				v = connect.EncodeBinaryHeader([]byte(v))
			}
			h[ck] = append(h[ck], v)
		}
	}
}
