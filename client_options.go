package idempotency

import (
	"context"
	"math/rand/v2"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
)

// ClientOption configures [UnaryClientInterceptor]. Server options are of the
// separate type [Option], so the two cannot be mixed up.
type ClientOption func(*clientOptions)

// Defaults of the client interceptor, documented on the options that change
// them.
const (
	DefaultClientMaxAttempts = 5
	DefaultClientBackoffBase = 100 * time.Millisecond
	DefaultClientBackoffMax  = 2 * time.Second
)

type clientOptions struct {
	header      string
	maxAttempts int
	backoffBase time.Duration
	backoffMax  time.Duration
	perAttempt  time.Duration
	extraCodes  map[codes.Code]bool
	covers      func(fullMethod string) bool
	generateKey func() (string, error)
	jitter      func(upTo time.Duration) time.Duration // uniform in [0, upTo]
	sleep       func(ctx context.Context, d time.Duration) error
	observer    func(ctx context.Context, e ClientEvent)
}

func evaluateClientOptions(opts []ClientOption) *clientOptions {
	o := &clientOptions{
		header:      DefaultKeyHeader,
		maxAttempts: DefaultClientMaxAttempts,
		backoffBase: DefaultClientBackoffBase,
		backoffMax:  DefaultClientBackoffMax,
		covers:      clientDefaultCovers,
		generateKey: NewKey,
		jitter:      clientFullJitter,
		sleep:       clientSleep,
	}
	for _, opt := range opts {
		if opt != nil {
			opt(o)
		}
	}
	return o
}

// WithClientKeyHeader sets the request metadata key that carries the
// idempotency key. It must match the server's [WithKeyHeader]. The name is
// lower-cased, as gRPC requires. The default is [DefaultKeyHeader]. Panics
// on the names [WithKeyHeader] refuses, the empty name included: keeping the
// default silently would make the two sides disagree.
func WithClientKeyHeader(name string) ClientOption {
	name = strings.ToLower(name)
	checkHeaderName("WithClientKeyHeader", name)
	return func(o *clientOptions) { o.header = name }
}

// WithMaxAttempts sets how many times a call is attempted in all, the first
// attempt included, before the last error is returned. The default is
// [DefaultClientMaxAttempts] (5); 1 means no retries, as does
// [WithoutRetries]. Panics if n is below 1.
func WithMaxAttempts(n int) ClientOption {
	if n < 1 {
		badOption("WithMaxAttempts", n, "at least one attempt is needed")
	}
	return func(o *clientOptions) { o.maxAttempts = n }
}

// WithoutRetries makes the interceptor attempt every call once: it still
// attaches a key, so gRPC's own retryPolicy (service config) or another retry
// interceptor placed after it can retry safely with that key. The default is
// to retry (see [WithMaxAttempts]).
func WithoutRetries() ClientOption {
	return WithMaxAttempts(1)
}

// WithBackoff sets the exponential backoff between attempts: before retry n
// (n = 1, 2, ...) the interceptor waits a uniformly random time between 0 and
// min(maxDelay, base·2^(n-1)) ("full jitter"), but never less than a delay the
// server asked for with google.rpc.RetryInfo. The defaults are
// [DefaultClientBackoffBase] (100ms) and [DefaultClientBackoffMax] (2s).
// base 0 retries at once unless the server asked for a delay. Panics if
// either is negative or maxDelay is below base.
func WithBackoff(base, maxDelay time.Duration) ClientOption {
	if base < 0 {
		badOption("WithBackoff", base, "the base delay must not be negative")
	}
	if maxDelay < base {
		badOption("WithBackoff", maxDelay, "the maximum delay must not be below the base ("+base.String()+")")
	}
	return func(o *clientOptions) { o.backoffBase, o.backoffMax = base, maxDelay }
}

// WithPerAttemptTimeout bounds each attempt by d, within the caller's own
// deadline. An attempt cut off by this timeout (its deadline has passed, it
// was not the caller's earlier deadline, and the caller's context is still
// live) is retried with the same key: the server then replays the first
// execution, or answers "in progress" while it still runs. A
// DeadlineExceeded that arrives before the attempt's deadline is the
// server's answer (a handler whose own downstream timed out), and is not
// retried unless listed in [WithRetryCodes].
// The default, 0, sets no per-attempt timeout; each attempt then runs until
// the caller's deadline. Panics if d is negative.
func WithPerAttemptTimeout(d time.Duration) ClientOption {
	if d < 0 {
		badOption("WithPerAttemptTimeout", d, "the timeout must not be negative (0 means none)")
	}
	return func(o *clientOptions) { o.perAttempt = d }
}

// WithRetryCodes adds status codes to those the interceptor retries. By
// default it retries only Unavailable, DeadlineExceeded caused by
// [WithPerAttemptTimeout], and Aborted with reason [ReasonInProgress]. Errors
// the server interceptor reports about the key itself ([ReasonKeyRequired],
// [ReasonKeyInvalid], [ReasonKeyReused], and the other reasons except
// [ReasonInProgress] and [ReasonStoreUnavailable]) are never retried, whatever
// their code: the same key would get the same answer. A call whose own context
// is done is never retried. Panics on OK or a code gRPC does not define.
func WithRetryCodes(c ...codes.Code) ClientOption {
	for _, k := range c {
		if k == codes.OK || k > codes.Unauthenticated {
			badOption("WithRetryCodes", k, "only error codes can be retried")
		}
	}
	return func(o *clientOptions) {
		if len(c) == 0 {
			return
		}
		m := make(map[codes.Code]bool, len(o.extraCodes)+len(c))
		for k := range o.extraCodes {
			m[k] = true
		}
		for _, k := range c {
			m[k] = true
		}
		o.extraCodes = m
	}
}

// WithClientMethods chooses the methods the interceptor covers (attaches a key
// to and retries). covers receives the full method name, "/pkg.Service/Method".
// By default the interceptor covers every method except those whose
// descriptor, found in protoregistry.GlobalFiles, declares idempotency_level
// NO_SIDE_EFFECTS or IDEMPOTENT and does not set the key_required option (see
// proto/idempotency/v1); methods with no registered descriptor are covered. A
// call whose context carries a key from [WithKey] is covered whatever covers
// says. Methods not covered pass through untouched, with one attempt.
// Panics if covers is nil.
func WithClientMethods(covers func(fullMethod string) bool) ClientOption {
	if covers == nil {
		badOption("WithClientMethods", "nil", "the function must not be nil")
	}
	return func(o *clientOptions) { o.covers = covers }
}

// WithKeyGenerator replaces the generator of keys for calls that bring no key
// of their own. It is called once per logical call, never per attempt, and
// must return a key that passes [ValidateKey] and is unique across calls, or
// an error, which fails the call with code Internal before anything is sent.
// The default is [NewKey]. Panics if gen is nil.
func WithKeyGenerator(gen func() (string, error)) ClientOption {
	if gen == nil {
		badOption("WithKeyGenerator", "nil", "the generator must not be nil")
	}
	return func(o *clientOptions) { o.generateKey = gen }
}

func clientFullJitter(upTo time.Duration) time.Duration {
	if upTo <= 0 {
		return 0
	}
	return rand.N(upTo + 1)
}

func clientSleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ClientEvent describes one logical call made through
// [UnaryClientInterceptor], after its last attempt. It is passed to the
// observer set with [WithClientObserver].
type ClientEvent struct {
	// Method is the full gRPC method name.
	Method string
	// KeyHash is a short hash of the key sent ("" when none was): keys are
	// never reported in full.
	KeyHash string
	// Attempts is the number of attempts the interceptor made; Attempts-1
	// is the number of retries the call needed.
	Attempts int
	// Replayed reports whether the final answer was a replay.
	Replayed bool
	// Code is the gRPC code of the final answer.
	Code codes.Code
}

// WithClientObserver calls observe once per logical call, after its last
// attempt, with the [ClientEvent] describing it. observe runs on the call
// path and must not block. Default: none.
func WithClientObserver(observe func(ctx context.Context, e ClientEvent)) ClientOption {
	return func(o *clientOptions) { o.observer = observe }
}
