package idempotencyconnect

import (
	"context"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
	"google.golang.org/grpc/codes"
)

// ClientOption configures [NewClientInterceptor]. Each option is the
// connect-go form of the core's client option of the same name
// (idempotency.WithMaxAttempts, ...): it refuses the same values, with the
// same panic, when it is built, and means the same.
type ClientOption func(*clientOptions)

type clientOptions struct {
	header string                     // lower case
	core   []idempotency.ClientOption // the core's options, in order
}

func coreOption(opt idempotency.ClientOption) ClientOption {
	return func(o *clientOptions) { o.core = append(o.core, opt) }
}

// WithClientKeyHeader sets the request header that carries the
// idempotency key. It must match the server's idempotency.WithKeyHeader.
// The default is Idempotency-Key (idempotency.DefaultKeyHeader). The name
// is case-insensitive; gRPC sends it in lower case. Panics on the names
// idempotency.WithClientKeyHeader refuses, the empty name included: a name
// gRPC metadata cannot carry, the reserved "grpc-" prefix, a "-bin" name.
func WithClientKeyHeader(name string) ClientOption {
	name = strings.ToLower(name)
	idempotency.WithClientKeyHeader(name) // panics on a name it refuses
	return func(o *clientOptions) { o.header = name }
}

// WithMaxAttempts sets how many times a call is attempted in all, the first
// attempt included, before the last error is returned. The default is
// idempotency.DefaultClientMaxAttempts (5); 1 means no retries, as does
// [WithoutRetries]. Panics if n is below 1.
func WithMaxAttempts(n int) ClientOption {
	return coreOption(idempotency.WithMaxAttempts(n))
}

// WithoutRetries makes the interceptor attempt every call once: it still
// attaches a key, so that a retry made elsewhere (a later run of the same
// job with the same idempotency.WithKey key, another retrying interceptor
// installed after this one) is safe. The default is to retry (see
// [WithMaxAttempts]).
func WithoutRetries() ClientOption {
	return coreOption(idempotency.WithoutRetries())
}

// WithBackoff sets the exponential backoff between attempts: before retry n
// (n = 1, 2, ...) the interceptor waits a uniformly random time between 0
// and min(maxDelay, base·2^(n-1)) ("full jitter"), but never less than a
// delay the server asked for with google.rpc.RetryInfo. The defaults are
// idempotency.DefaultClientBackoffBase (100ms) and
// idempotency.DefaultClientBackoffMax (2s). base 0 retries at once unless
// the server asked for a delay. Panics if either is negative or maxDelay is
// below base.
func WithBackoff(base, maxDelay time.Duration) ClientOption {
	return coreOption(idempotency.WithBackoff(base, maxDelay))
}

// WithPerAttemptTimeout bounds each attempt by d, within the caller's own
// deadline; connect-go sends the attempt's deadline to the server
// (Connect-Timeout-Ms, grpc-timeout). An attempt cut off by this timeout
// (its deadline has passed, it was not the caller's earlier deadline, and
// the caller's context is still live) is retried with the same key: the
// server then replays the first execution, or answers KEY_IN_PROGRESS
// while it still runs. A DeadlineExceeded that arrives before the
// attempt's deadline is the handler's own answer and is not retried unless
// listed in [WithRetryCodes]. The default, 0, sets no per-attempt timeout:
// each attempt runs until the caller's deadline. Panics if d is negative.
func WithPerAttemptTimeout(d time.Duration) ClientOption {
	return coreOption(idempotency.WithPerAttemptTimeout(d))
}

// WithRetryCodes adds codes to those the interceptor retries. By default it
// retries only Unavailable, DeadlineExceeded caused by
// [WithPerAttemptTimeout], and Aborted with reason KEY_IN_PROGRESS. Note
// that connect-go reports an HTTP/2 stream reset by the server (RST_STREAM
// INTERNAL_ERROR, as net/http sends when a handler panics) as Internal:
// add connect.CodeInternal to retry it. Errors the server reports about
// the key itself (KEY_REQUIRED, KEY_INVALID, KEY_REUSED, and the other
// reasons except KEY_IN_PROGRESS and the store outages) are never retried,
// whatever their code: the same key would get the same answer. Default:
// none added. Panics on a code connect-go does not define.
func WithRetryCodes(c ...connect.Code) ClientOption {
	cs := make([]codes.Code, len(c))
	for i, k := range c {
		cs[i] = codes.Code(k) // connect-go's codes are gRPC's, number for number
	}
	return coreOption(idempotency.WithRetryCodes(cs...))
}

// WithClientMethods chooses the procedures the interceptor covers (attaches
// a key to and retries). covers receives the procedure,
// "/pkg.Service/Method", as connect.Spec.Procedure holds it. By default the
// interceptor covers every procedure except those whose descriptor, found
// in protoregistry.GlobalFiles, declares idempotency_level NO_SIDE_EFFECTS
// or IDEMPOTENT and does not set the key_required option (see
// proto/idempotency/v1), as the server does; procedures with no registered
// descriptor are covered. A call whose context carries a key from
// idempotency.WithKey is covered whatever covers says; a key the request
// carries in its header is sent in any case, and the call retried only if
// covered. Other calls to procedures not covered pass through untouched,
// with one attempt. Panics if covers is nil.
func WithClientMethods(covers func(procedure string) bool) ClientOption {
	return coreOption(idempotency.WithClientMethods(covers))
}

// WithKeyGenerator replaces the generator of keys for calls that bring no
// key of their own. It is called once per logical call, never per attempt,
// and must return a key that passes idempotency.ValidateKey and is unique
// across calls, or an error, which fails the call with code Internal and
// reason KEY_GENERATION_FAILED before anything is sent. The default is
// idempotency.NewKey (128 random bits). Panics if gen is nil.
func WithKeyGenerator(gen func() (string, error)) ClientOption {
	return coreOption(idempotency.WithKeyGenerator(gen))
}

// WithClientObserver calls observe once per logical call, after its last
// attempt, with the idempotency.ClientEvent describing it (Method is the
// procedure). observe runs on the call path and must not block; the otel
// module's NewClientObserver returns one that records metrics. Default:
// none; nil means none.
func WithClientObserver(observe func(ctx context.Context, e idempotency.ClientEvent)) ClientOption {
	return coreOption(idempotency.WithClientObserver(observe))
}
