package idempotencygw

import (
	"context"
	"net/http"
	"strings"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"github.com/idempotency-grpc/idempotency"
	"google.golang.org/grpc/metadata"
)

// HTTP headers of the IETF draft (draft-ietf-httpapi-idempotency-key-header)
// as the gateway reads and writes them.
const (
	// KeyHeader is the request header that carries the idempotency key,
	// as an RFC 8941 string ("order-42", quotes included) or bare
	// (order-42). The gateway passes the key on in the gRPC metadata (see
	// [WithKeyHeader]).
	KeyHeader = "Idempotency-Key"

	// ReplayedHeader is the response header, with the value "true", of every
	// answer the server interceptor replayed from its store rather than
	// running the handler: the gRPC response header
	// idempotency.ReplayedHeader under its HTTP name. A first execution
	// never carries it.
	ReplayedHeader = "Idempotency-Replayed"
)

// ServeMuxOption returns the runtime.ServeMuxOption that connects a
// grpc-gateway ServeMux to the server interceptor
// ([idempotency.UnaryServerInterceptor]), so that REST clients get the
// guarantee gRPC clients get:
//
//	mux := runtime.NewServeMux(idempotencygw.ServeMuxOption())
//
// It installs four pieces, all on the mux:
//   - a middleware that reads the [KeyHeader] of every request the mux
//     routes (whatever its method or the gRPC method's policy), unquotes
//     it, and answers 400 (reason KEY_INVALID) when the header cannot be
//     carried faithfully (see the package documentation); the interceptor
//     still validates the key itself;
//   - a metadata annotator that sends the key to the gRPC server in the
//     metadata key [WithKeyHeader] names. grpc-gateway lets its value
//     replace any value an incoming header matcher put under that key, so
//     the raw header (quotes and all) never reaches the interceptor;
//   - an outgoing header matcher that sends the gRPC response header
//     [idempotency.ReplayedHeader] as [ReplayedHeader], and the other
//     headers as [WithOutgoingHeaderMatcher] says;
//   - an error handler that answers the idempotency errors with the draft's
//     statuses, around the handler [WithErrorHandler] sets.
//
// The last two replace the mux's outgoing header matcher and error
// handler: give your own to [WithOutgoingHeaderMatcher] and
// [WithErrorHandler], not to runtime.WithOutgoingHeaderMatcher or
// runtime.WithErrorHandler (placed after this option, those would replace
// ours; placed before, ours replace them). The incoming header matcher is
// left alone.
func ServeMuxOption(opts ...Option) runtime.ServeMuxOption {
	o := evaluateOptions(opts)
	return func(mux *runtime.ServeMux) {
		// Each mux gets a middleware bound to itself, so that its refusals
		// use its marshalers and error handler.
		runtime.WithMiddlewares(keyMiddleware(mux))(mux)
		runtime.WithMetadata(o.annotate)(mux)
		runtime.WithOutgoingHeaderMatcher(outgoingHeaderMatcher(o.outgoing))(mux)
		runtime.WithErrorHandler(errorHandler(o.errors))(mux)
	}
}

type keyCtxKey struct{}

// keyMiddleware parses the Idempotency-Key header of each request the mux
// routes, refuses a malformed one, and hands the key on to annotate in the
// request's context.
func keyMiddleware(mux *runtime.ServeMux) runtime.Middleware {
	return func(next runtime.HandlerFunc) runtime.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request, pathParams map[string]string) {
			key, present, err := idempotency.ParseKeyHeader(r.Header.Values(KeyHeader))
			if err != nil {
				_, outbound := runtime.MarshalerForRequest(mux, r)
				runtime.HTTPError(r.Context(), mux, outbound, w, r, errMalformedKeyHeader(err))
				return
			}
			if present {
				r = r.WithContext(context.WithValue(r.Context(), keyCtxKey{}, key))
			}
			next(w, r, pathParams)
		}
	}
}

// annotate is the mux's metadata annotator: the key keyMiddleware parsed,
// under the configured metadata key.
func (o *options) annotate(_ context.Context, r *http.Request) metadata.MD {
	if key, ok := r.Context().Value(keyCtxKey{}).(string); ok {
		return metadata.Pairs(o.keyHeader, key)
	}
	return nil
}

// outgoingHeaderMatcher sends idempotency-replayed as Idempotency-Replayed
// and asks next about every other response header.
func outgoingHeaderMatcher(next runtime.HeaderMatcherFunc) runtime.HeaderMatcherFunc {
	return func(key string) (string, bool) {
		if strings.EqualFold(key, idempotency.ReplayedHeader) {
			return ReplayedHeader, true
		}
		return next(key)
	}
}
