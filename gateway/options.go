package idempotencygw

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"github.com/idempotency-grpc/idempotency"
)

// Option configures [ServeMuxOption]. A nil Option is skipped.
type Option func(*options)

type options struct {
	keyHeader string
	errors    runtime.ErrorHandlerFunc
	outgoing  runtime.HeaderMatcherFunc
}

func evaluateOptions(opts []Option) *options {
	o := &options{
		keyHeader: idempotency.DefaultKeyHeader,
		errors:    runtime.DefaultHTTPErrorHandler,
		outgoing:  defaultOutgoingHeaderMatcher,
	}
	for _, opt := range opts {
		if opt != nil {
			opt(o)
		}
	}
	return o
}

// WithKeyHeader sets the gRPC metadata key the gateway puts the key in; it
// must be the server's (idempotency.WithKeyHeader), and is lower-cased, as
// gRPC requires. The HTTP header stays Idempotency-Key ([KeyHeader]).
// Default [idempotency.DefaultKeyHeader] ("idempotency-key"). Panics if
// name is empty, holds a character gRPC does not allow in a metadata key,
// starts with "grpc-" or ends with "-bin".
func WithKeyHeader(name string) Option {
	name = strings.ToLower(name)
	switch {
	case name == "":
		badOption("WithKeyHeader", `""`, "the metadata key must not be empty")
	case !metadataKeyChars(name):
		badOption("WithKeyHeader", strconv.Quote(name), "a gRPC metadata key may hold only 0-9 a-z - _ .")
	case strings.HasPrefix(name, "grpc-"):
		badOption("WithKeyHeader", strconv.Quote(name), `the "grpc-" prefix is reserved by gRPC`)
	case strings.HasSuffix(name, "-bin"):
		badOption("WithKeyHeader", strconv.Quote(name), `a "-bin" key carries binary values; the idempotency key is text`)
	}
	return func(o *options) { o.keyHeader = name }
}

// WithErrorHandler sets the error handler that writes every error response
// of the mux; [ServeMuxOption] wraps it to set the status of the
// idempotency errors (see the package documentation). Use it instead of
// runtime.WithErrorHandler, which would replace the wrapper. The handler
// gets the gRPC error unchanged; when it answers with the gateway's own
// status for the error's code (runtime.HTTPStatusFromCode), that status is
// replaced, and any other status it chooses is kept. Default
// runtime.DefaultHTTPErrorHandler. Panics if h is nil.
func WithErrorHandler(h runtime.ErrorHandlerFunc) Option {
	if h == nil {
		badOption("WithErrorHandler", "nil", "the error handler must not be nil")
	}
	return func(o *options) { o.errors = h }
}

// WithOutgoingHeaderMatcher sets how the gRPC response header metadata
// other than idempotency-replayed becomes HTTP response headers. Use it
// instead of runtime.WithOutgoingHeaderMatcher, which would replace the
// matcher that sends [ReplayedHeader]. Default: grpc-gateway's own, which
// prefixes each key with "Grpc-Metadata-". Panics if m is nil.
func WithOutgoingHeaderMatcher(m runtime.HeaderMatcherFunc) Option {
	if m == nil {
		badOption("WithOutgoingHeaderMatcher", "nil", "the header matcher must not be nil")
	}
	return func(o *options) { o.outgoing = m }
}

// defaultOutgoingHeaderMatcher is grpc-gateway's default outgoing matcher,
// which it does not export.
func defaultOutgoingHeaderMatcher(key string) (string, bool) {
	return runtime.MetadataHeaderPrefix + key, true
}

// badOption panics with the message every option uses for a value it
// refuses: an option that cannot be honoured is a programming error found
// at startup, never a silent default.
func badOption(option string, value any, why string) {
	panic(fmt.Sprintf("idempotencygw: %s(%v): %s", option, value, why))
}

func metadataKeyChars(k string) bool {
	for i := 0; i < len(k); i++ {
		if c := k[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}
