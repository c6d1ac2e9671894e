package idempotency

import (
	"context"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
)

// Option configures [UnaryServerInterceptor].
type Option func(*options)

// Defaults of the server interceptor.
const (
	DefaultTTL             = 24 * time.Hour
	DefaultLease           = 30 * time.Second
	DefaultRetryDelay      = time.Second
	DefaultMaxRecordSize   = 1 << 20
	DefaultCompleteTimeout = 5 * time.Second
	DefaultPollInterval    = 50 * time.Millisecond
)

// KeyPolicy says how the server interceptor treats a method.
type KeyPolicy int

const (
	// KeyOptional: a call with a key is handled once per key; a call without
	// one passes straight through. The default for methods that declare
	// nothing.
	KeyOptional KeyPolicy = iota
	// KeyRequired: a call without a key fails with InvalidArgument (reason
	// KEY_REQUIRED). The default for methods declared with the
	// `(idempotency.v1.method) = {key_required: true}` option.
	KeyRequired
	// KeyIgnored: the interceptor never intervenes, key or not. The default
	// for methods declared `idempotency_level = NO_SIDE_EFFECTS` or
	// `IDEMPOTENT`.
	KeyIgnored
)

// String returns "optional", "required" or "ignored".
func (p KeyPolicy) String() string {
	switch p {
	case KeyOptional:
		return "optional"
	case KeyRequired:
		return "required"
	case KeyIgnored:
		return "ignored"
	}
	return "unknown"
}

type options struct {
	keyHeader       string
	binHeader       string // keyHeader + "-bin"
	keyField        string
	ttl             time.Duration
	lease           time.Duration
	retryDelay      time.Duration
	waitInProgress  bool
	pollInterval    time.Duration
	rejectRepeats   bool
	failOpen        bool
	maxRecordSize   int
	completeTimeout time.Duration
	scope           func(context.Context) (string, error)
	fingerprint     FingerprintFunc
	storeOutcome    func(codes.Code) bool
	policy          func(fullMethod string, declared KeyPolicy) KeyPolicy
	logger          *slog.Logger
	observer        func(context.Context, Event)
	now             func() time.Time
	localCacheSize  int
	localCacheAge   time.Duration
	coalesce        bool
	renewHook       func(storeKey string) // tests: each renewal as it begins
	leaseClock      leaseClock            // tests: the renewer's time; nil is the real one
}

func evaluateOptions(opts []Option) *options {
	o := &options{
		keyHeader:       DefaultKeyHeader,
		ttl:             DefaultTTL,
		lease:           DefaultLease,
		retryDelay:      DefaultRetryDelay,
		pollInterval:    DefaultPollInterval,
		maxRecordSize:   DefaultMaxRecordSize,
		completeTimeout: DefaultCompleteTimeout,
		fingerprint:     DefaultFingerprint,
		storeOutcome:    DefaultStoredCode,
		now:             time.Now,
	}
	for _, opt := range opts {
		if opt != nil {
			opt(o)
		}
	}
	o.binHeader = o.keyHeader + "-bin"
	return o
}

// WithKeyHeader sets the request metadata key that carries the idempotency
// key; it is lower-cased, as gRPC requires. Default [DefaultKeyHeader]
// ("idempotency-key"). Panics if name is empty (every call would look
// keyless and pass through unprotected), holds a character gRPC does not
// allow in a metadata key, starts with "grpc-" or ends with "-bin".
func WithKeyHeader(name string) Option {
	name = strings.ToLower(name)
	checkHeaderName("WithKeyHeader", name)
	return func(o *options) { o.keyHeader = name }
}

// WithKeyField takes the key from a string field of the request message
// instead of the metadata, for APIs that follow Google AIP-155 and carry a
// `request_id` field. field is the protobuf field name. A request without the
// field, or with it empty, counts as a call without a key; the metadata is
// not consulted. Default: unset (the key comes from the metadata). Panics
// if field is empty.
func WithKeyField(field string) Option {
	if field == "" {
		badOption("WithKeyField", `""`, "the field name must not be empty")
	}
	return func(o *options) { o.keyField = field }
}

// WithTTL sets how long a completed outcome is kept and replayed. Repeats
// after it expires run the handler again. Default [DefaultTTL] (24h).
// Panics if d is below 1ms, the least a store can keep (Redis counts in
// milliseconds, and a zero expiry would delete the record at once).
func WithTTL(d time.Duration) Option {
	if d < time.Millisecond {
		badOption("WithTTL", d, "the TTL must be at least 1ms")
	}
	return func(o *options) { o.ttl = d }
}

// WithLease sets the lease of an in-progress key. The interceptor renews it
// a quarter of its length after the claim or the last renewal was sent,
// while the handler runs; a renewal that fails, or gets no answer within
// 1/32 of the lease (at least 100ms), is retried, a new try at least every
// 1/16 of the lease (100ms + 1/32 of it below 3.2s), so a slow handler keeps its key through a store outage (or a hung
// store) that ends at least that long before the lease would; if the
// server dies, the key frees itself when the lease ends and a retry runs the
// handler again. Default [DefaultLease] (30s). Panics if d is below 1ms, the
// least a store can keep: a zero expiry would delete the claim at once and
// let every concurrent duplicate run.
func WithLease(d time.Duration) Option {
	if d < time.Millisecond {
		badOption("WithLease", d, "the lease must be at least 1ms")
	}
	return func(o *options) { o.lease = d }
}

// WithRetryDelay sets the google.rpc.RetryInfo delay sent with the Aborted
// (KEY_IN_PROGRESS) answer to a repeat that arrives while the first call is
// still running. Default [DefaultRetryDelay] (1s); 0 asks for an immediate
// retry. Panics if d is negative.
func WithRetryDelay(d time.Duration) Option {
	if d < 0 {
		badOption("WithRetryDelay", d, "the delay must not be negative")
	}
	return func(o *options) { o.retryDelay = d }
}

// WithWaitForInProgress makes a repeat that meets a running first call wait
// for it to finish, polling the store every pollInterval, and then answer
// with the replay, instead of failing at once with Aborted. The wait is
// bounded by the caller's deadline; if the first call releases the key (a
// transient error, a panic, an expired lease) the waiter claims it and runs
// the handler itself. The poll interval doubles up to 16 times its value
// while the wait lasts. Default: off (answer Aborted at once); a typical
// pollInterval is [DefaultPollInterval]. Panics if pollInterval is not
// positive.
func WithWaitForInProgress(pollInterval time.Duration) Option {
	if pollInterval <= 0 {
		badOption("WithWaitForInProgress", pollInterval, "the poll interval must be positive")
	}
	return func(o *options) {
		o.waitInProgress = true
		o.pollInterval = pollInterval
	}
}

// WithRejectRepeats answers every repeat of a processed key with
// AlreadyExists (reason ALREADY_PROCESSED) instead of the replay. The stored
// outcome is attached as a status detail: the response message, or the
// stored error as a google.rpc.Status. Default: off (replay).
func WithRejectRepeats() Option {
	return func(o *options) { o.rejectRepeats = true }
}

// WithFailOpen runs the handler without protection when the store fails,
// instead of answering Unavailable. UNSAFE: during a store outage every retry
// runs the handler again, which for payments means double charges. Default:
// off (fail closed).
func WithFailOpen() Option {
	return func(o *options) { o.failOpen = true }
}

// WithMaxRecordSize sets the largest stored outcome, in bytes (the encoded
// record: response, status, metadata). A larger outcome is recorded as too
// large: the caller gets its response, and repeats get AlreadyExists (reason
// RESPONSE_TOO_LARGE) rather than a second execution. Default
// [DefaultMaxRecordSize] (1 MiB). Panics if n is not positive.
func WithMaxRecordSize(n int) Option {
	if n <= 0 {
		badOption("WithMaxRecordSize", n, "the size must be positive")
	}
	return func(o *options) { o.maxRecordSize = n }
}

// WithCompleteTimeout bounds the write of the outcome (or the release of the
// key) after the handler returns. That write does not use the request's
// context, so a client that goes away does not lose the outcome. Default
// [DefaultCompleteTimeout] (5s). Panics if d is not positive.
func WithCompleteTimeout(d time.Duration) Option {
	if d <= 0 {
		badOption("WithCompleteTimeout", d, "the timeout must be positive")
	}
	return func(o *options) { o.completeTimeout = d }
}

// WithScope scopes keys to the caller, typically the authenticated principal
// set by an earlier authentication interceptor: the same key sent by two
// scopes names two independent records, so one caller can never receive
// another's stored response. A multi-tenant server must set it. An error
// that is a gRPC status is returned to the caller as is; any other error
// becomes Internal (reason SCOPE_FAILED). The handler is not run in either
// case. Default: no scope (keys are scoped by method only). Panics if scope
// is nil.
func WithScope(scope func(ctx context.Context) (string, error)) Option {
	if scope == nil {
		badOption("WithScope", "nil", "the scope function must not be nil; omit the option for no scope")
	}
	return func(o *options) { o.scope = scope }
}

// WithFingerprint replaces the request fingerprint that binds a key to one
// request. Default [DefaultFingerprint] (SHA-256 of the deterministic
// protobuf encoding). Panics if f is nil.
func WithFingerprint(f FingerprintFunc) Option {
	if f == nil {
		badOption("WithFingerprint", "nil", "the fingerprint function must not be nil")
	}
	return func(o *options) { o.fingerprint = f }
}

// WithStoredCodes sets which outcomes are stored and replayed. An outcome
// whose code is not stored releases the key, so a retry runs the handler
// again. Default [DefaultStoredCode]. Panics if stored is nil.
func WithStoredCodes(stored func(codes.Code) bool) Option {
	if stored == nil {
		badOption("WithStoredCodes", "nil", "the function must not be nil")
	}
	return func(o *options) { o.storeOutcome = stored }
}

// WithKeyPolicy decides per method whether a key is required, optional or
// ignored. It receives the full method name and the policy declared in the
// method's protobuf descriptor (see [KeyPolicy]); it returns the policy to
// apply. Default: the declared policy. Panics if policy is nil.
func WithKeyPolicy(policy func(fullMethod string, declared KeyPolicy) KeyPolicy) Option {
	if policy == nil {
		badOption("WithKeyPolicy", "nil", "the policy function must not be nil")
	}
	return func(o *options) { o.policy = policy }
}

// WithRequiredKey makes the named methods (full names, "/pkg.Service/Method")
// require a key, whatever their descriptor declares. It composes with
// [WithKeyPolicy] set before it. Panics on a name that is not of that form.
func WithRequiredKey(fullMethods ...string) Option {
	return withMethodPolicy("WithRequiredKey", KeyRequired, fullMethods)
}

// WithIgnoredMethods makes the interceptor pass the named methods (full
// names) straight through, key or not. Panics on a name that is not of the
// form "/pkg.Service/Method".
func WithIgnoredMethods(fullMethods ...string) Option {
	return withMethodPolicy("WithIgnoredMethods", KeyIgnored, fullMethods)
}

// validFullMethod reports whether m looks like "/pkg.Service/Method".
func validFullMethod(m string) bool {
	if !strings.HasPrefix(m, "/") {
		return false
	}
	svc, meth, ok := strings.Cut(m[1:], "/")
	return ok && svc != "" && meth != "" && !strings.Contains(meth, "/")
}

func withMethodPolicy(option string, p KeyPolicy, fullMethods []string) Option {
	set := make(map[string]bool, len(fullMethods))
	for _, m := range fullMethods {
		if !validFullMethod(m) {
			badOption(option, strconv.Quote(m), `a full method name looks like "/pkg.Service/Method"`)
		}
		set[m] = true
	}
	return func(o *options) {
		prev := o.policy
		o.policy = func(m string, declared KeyPolicy) KeyPolicy {
			if set[m] {
				return p
			}
			if prev != nil {
				return prev(m, declared)
			}
			return declared
		}
	}
}

// WithLogger logs, at Warn level, the events an operator must see: a lost
// lease, an outcome that could not be stored, a fail-open pass-through.
// Keys are logged only as a short hash. Default: no logging; nil keeps it
// off.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.logger = l }
}

// WithObserver calls observe once for every call the interceptor handles,
// with the [Event] describing its outcome. observe runs on the request path
// and must not block. Default: none; nil means none.
func WithObserver(observe func(ctx context.Context, e Event)) Option {
	return func(o *options) { o.observer = observe }
}

// WithLocalCache keeps up to maxEntries completed records in process memory
// (least recently used evicted first), so a repeat that lands on the same
// server is answered with no store round trip. The fingerprint and scope are
// still checked. Completed records never change until their TTL ends, so the
// cache is exact, with one exception: a record deleted from the store with
// [Forget] may still be replayed from a server's cache for up to maxAge. An
// entry lives no longer than the record's remaining TTL as the store
// reported it to this server ([ClaimResult.TTL]), counted on this server's
// clock, so servers with skewed clocks never replay an expired key.
// Default: off. Panics if maxEntries or maxAge is not positive.
func WithLocalCache(maxEntries int, maxAge time.Duration) Option {
	if maxEntries <= 0 {
		badOption("WithLocalCache", maxEntries, "maxEntries must be positive")
	}
	if maxAge <= 0 {
		badOption("WithLocalCache", maxAge, "maxAge must be positive")
	}
	return func(o *options) {
		o.localCacheSize, o.localCacheAge = maxEntries, maxAge
	}
}

// WithCoalescing makes concurrent duplicates on one server (same scoped key
// and request) wait in process for the first one's outcome instead of each
// going to the store: a burst of N identical calls makes one claim. Waiters
// are bounded by their own deadline; if the first call stores no outcome
// (a transient error, a panic, a store failure) each waiter then goes to the
// store as usual. Duplicates on other servers are still decided by the
// store. Default: off.
func WithCoalescing() Option {
	return func(o *options) { o.coalesce = true }
}

// withClock injects the clock used for record times (tests).
func withClock(now func() time.Time) Option {
	return func(o *options) { o.now = now }
}

// DefaultStoredCode reports whether an outcome with code c is stored and
// replayed by default: OK and the deterministic errors (InvalidArgument,
// NotFound, AlreadyExists, PermissionDenied, FailedPrecondition, OutOfRange,
// Unimplemented). The others (Canceled, Unknown, DeadlineExceeded,
// ResourceExhausted, Aborted, Internal, Unavailable, DataLoss and
// Unauthenticated, which a refreshed credential may fix) release the key so a
// retry runs the handler again.
func DefaultStoredCode(c codes.Code) bool {
	switch c {
	case codes.OK, codes.InvalidArgument, codes.NotFound, codes.AlreadyExists,
		codes.PermissionDenied, codes.FailedPrecondition, codes.OutOfRange,
		codes.Unimplemented:
		return true
	}
	return false
}
