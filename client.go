package idempotency

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// UnaryClientInterceptor returns a client interceptor that gives every call to
// a covered method (see [WithClientMethods]) an idempotency key and retries
// the call with that same key.
//
// The key is, in order of preference: a key already in the outgoing metadata
// (never overwritten), the key from [WithKey], or a fresh key from [NewKey]
// (see [WithKeyGenerator]), generated once per logical call. Every attempt
// carries the same key, so the server runs the handler at most once and
// replays its outcome to the retries.
//
// Attempts are retried on Unavailable, on a timeout of
// [WithPerAttemptTimeout] (only when that timer's deadline has passed: a
// DeadlineExceeded the handler returns before it is its answer, not a
// timeout), and on Aborted with reason [ReasonInProgress]
// (after at least the server's google.rpc.RetryInfo delay), with exponential
// backoff and full jitter ([WithBackoff]), up to [WithMaxAttempts] attempts.
// The caller's context bounds the whole loop: when it is done, or when the
// next backoff would end past its deadline, the interceptor returns at once.
// Other errors are returned after one attempt (see [WithRetryCodes]). The
// error returned is the last attempt's, unchanged, except when the caller's
// context ends during a backoff: then it is a Canceled or DeadlineExceeded
// status whose message quotes the last attempt's error.
//
// Put it first (outermost) in grpc.WithChainUnaryInterceptor, before any
// retrying interceptor such as go-grpc-middleware's retry: that one re-invokes
// the interceptors after it, which would give each of its retries a new key.
// gRPC's built-in retries (a service-config retryPolicy) happen below all
// interceptors and reuse the key.
//
// Pass [CallResult] to a call to learn the key used, the number of attempts
// and whether the answer was a replay.
func UnaryClientInterceptor(opts ...ClientOption) grpc.UnaryClientInterceptor {
	o := evaluateClientOptions(opts)
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, callOpts ...grpc.CallOption) error {
		info := clientCallInfoOf(callOpts)
		key, attach, covered, err := o.resolveKey(ctx, method)
		if err != nil {
			return err
		}
		if attach {
			ctx = metadata.AppendToOutgoingContext(ctx, o.header, key)
		}
		maxAttempts := o.maxAttempts
		if !covered {
			maxAttempts = 1
		}
		res := CallInfo{Key: key}
		err = o.invokeWithRetry(ctx, method, req, reply, cc, invoker, callOpts, maxAttempts, &res)
		for _, i := range info {
			*i = res
		}
		if o.observer != nil {
			e := ClientEvent{Method: method, Attempts: res.Attempts, Replayed: res.Replayed, Code: status.Code(err)}
			if key != "" {
				e.KeyHash = keyHash(key)
			}
			o.observer(ctx, e)
		}
		return err
	}
}

// CallInfo describes how [UnaryClientInterceptor] carried out a call; see
// [CallResult].
type CallInfo struct {
	// Key is the idempotency key sent on every attempt, or "" when the method
	// is not covered and the call brought no key of its own.
	Key string
	// Replayed reports whether the final answer, success or error, was a
	// replay of a stored outcome (the server's [ReplayedHeader]) rather than a
	// fresh execution. A retry after a lost response is typically a replay.
	Replayed bool
	// Attempts is the number of attempts made by the interceptor, at least 1
	// once the call was sent. gRPC's own transparent and retryPolicy retries,
	// which happen below the interceptor, are not counted.
	Attempts int
}

// CallResult returns a call option that makes [UnaryClientInterceptor] store
// the outcome of the call in info when the call returns, whether it succeeds
// or fails. Without the interceptor in the chain, info is left untouched.
// Other interceptors and gRPC itself ignore the option.
func CallResult(info *CallInfo) grpc.CallOption {
	return clientCallResultOption{info: info}
}

type clientCallResultOption struct {
	grpc.EmptyCallOption
	info *CallInfo
}

func clientCallInfoOf(opts []grpc.CallOption) []*CallInfo {
	var out []*CallInfo
	for _, opt := range opts {
		if r, ok := opt.(clientCallResultOption); ok && r.info != nil {
			out = append(out, r.info)
		}
	}
	return out
}

type clientKeyCtxKey struct{}

// WithKey returns a copy of ctx whose calls through [UnaryClientInterceptor]
// carry key as their idempotency key, instead of a generated one. Use it when
// the key comes from outside the process (a client's request, a stored job
// id) so that a retry after a crash or a redelivery reuses it. A call with a
// key from WithKey is covered even if [WithClientMethods] excludes its method.
// A key already in the outgoing metadata takes precedence. A key that fails
// [ValidateKey] fails the call with InvalidArgument, reason
// [ReasonKeyInvalid], before anything is sent.
func WithKey(ctx context.Context, key string) context.Context {
	return context.WithValue(ctx, clientKeyCtxKey{}, key)
}

// NewKey returns a new random idempotency key: 128 bits from crypto/rand,
// encoded as 22 characters of unpadded base64url, which always pass
// [ValidateKey]. It is the interceptor's default generator; call it yourself
// to learn a key before the call, for example to store it with a job so that
// a later retry of the job reuses it via [WithKey].
func NewKey() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("idempotency: generating a key: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b[:]), nil
}

// resolveKey picks the call's key. attach reports whether the key must be
// added to the outgoing metadata; covered whether the call is retried.
func (o *clientOptions) resolveKey(ctx context.Context, method string) (key string, attach, covered bool, err error) {
	explicit, hasExplicit := ctx.Value(clientKeyCtxKey{}).(string)
	covered = hasExplicit || o.covers(method)
	if md, ok := metadata.FromOutgoingContext(ctx); ok {
		if vals := md.Get(o.header); len(vals) > 0 {
			// The caller's own metadata wins; the server judges its validity.
			return vals[0], false, covered, nil
		}
	}
	switch {
	case hasExplicit:
		if err := ValidateKey(explicit); err != nil {
			return "", false, false, errKeyInvalid(method, o.header, err)
		}
		return explicit, true, true, nil
	case !covered:
		return "", false, false, nil
	}
	key, err = o.generateKey()
	if err != nil {
		return "", false, false, errKeyGeneration(method, err)
	}
	if err := ValidateKey(key); err != nil {
		return "", false, false, errKeyGeneration(method, fmt.Errorf("the generator returned an invalid key: %w", err))
	}
	return key, true, true, nil
}

func (o *clientOptions) invokeWithRetry(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, callOpts []grpc.CallOption, maxAttempts int, res *CallInfo) error {
	// Our header and trailer options go last; gRPC fills every such option,
	// so the caller's own grpc.Header and grpc.Trailer still work.
	n := len(callOpts)
	attemptOpts := make([]grpc.CallOption, n+2)
	copy(attemptOpts, callOpts)
	for attempt := 1; ; attempt++ {
		var header, trailer metadata.MD
		attemptOpts[n] = grpc.Header(&header)
		attemptOpts[n+1] = grpc.Trailer(&trailer)

		actx, cancel := ctx, context.CancelFunc(func() {})
		perAttemptBound := false // the attempt's deadline is ours, not the caller's
		var dl time.Time
		if o.perAttempt > 0 {
			dl = time.Now().Add(o.perAttempt)
			parent, ok := ctx.Deadline()
			perAttemptBound = !ok || dl.Before(parent)
			actx, cancel = context.WithDeadline(ctx, dl)
		}
		err := invoker(actx, method, req, reply, cc, attemptOpts...)
		// Only our own timer makes an attempt "timed out". The server's
		// deadline is the one we sent, never earlier than ours, so its
		// DEADLINE_EXCEEDED arrives at or after dl; the attempt context's
		// Err may lag dl by a scheduling delay, hence the clock check. A
		// DEADLINE_EXCEEDED before dl came from the handler itself (say, a
		// downstream timeout): retrying it would run the handler again.
		attemptTimedOut := perAttemptBound && ctx.Err() == nil &&
			(errors.Is(actx.Err(), context.DeadlineExceeded) ||
				status.Code(err) == codes.DeadlineExceeded && !time.Now().Before(dl))
		cancel()

		res.Attempts = attempt
		// A Trailers-Only answer (an error before any header) has no header;
		// the server's metadata then arrives with the trailer.
		res.Replayed = Replayed(header) || Replayed(trailer)
		if err == nil || attempt >= maxAttempts || ctx.Err() != nil {
			return err
		}
		minDelay, retry := o.retryable(err, attemptTimedOut)
		if !retry {
			return err
		}
		wait := max(o.jitter(o.backoffCap(attempt)), minDelay)
		if dl, ok := ctx.Deadline(); ok && wait >= time.Until(dl) {
			// Sleeping would use up the caller's deadline: no attempt could
			// follow, so give the caller the real failure now.
			return err
		}
		if serr := o.sleep(ctx, wait); serr != nil {
			return errRetryInterrupted(method, serr, attempt, err)
		}
	}
}

// retryable reports whether err is worth another attempt with the same key,
// and the least delay the server asked for.
func (o *clientOptions) retryable(err error, attemptTimedOut bool) (time.Duration, bool) {
	st, ok := status.FromError(err)
	if !ok {
		return 0, false
	}
	delay, _ := RetryDelayOf(err)
	switch ReasonOf(err) {
	case "", ReasonCallEnded:
		// No verdict on the key: the server's side of the attempt ended
		// (its deadline, the one we sent, passed); judged by code below.
	case ReasonInProgress:
		return delay, true
	case ReasonStoreUnavailable, ReasonNotReplicated, ReasonNotCommitted:
		return delay, st.Code() == codes.Unavailable || o.extraCodes[st.Code()]
	default:
		// A verdict on the key: the same key would get the same answer.
		return 0, false
	}
	switch c := st.Code(); {
	case c == codes.Unavailable:
		return delay, true
	case c == codes.DeadlineExceeded && attemptTimedOut:
		return delay, true
	default:
		return delay, o.extraCodes[c]
	}
}

// backoffCap is the upper bound of the jittered wait before retry n.
func (o *clientOptions) backoffCap(n int) time.Duration {
	d := o.backoffBase
	for i := 1; i < n && d < o.backoffMax; i++ {
		d *= 2
	}
	return min(d, o.backoffMax)
}

// clientCoverCache holds the default coverage decision per full method name.
// Descriptors are registered at init time, so the decision does not change.
var clientCoverCache sync.Map // string -> bool

// clientDefaultCovers is the default of [WithClientMethods]: every method the
// server interceptor does not ignore by default.
func clientDefaultCovers(fullMethod string) bool {
	if v, ok := clientCoverCache.Load(fullMethod); ok {
		return v.(bool)
	}
	covered := DeclaredKeyPolicy(fullMethod) != KeyIgnored
	clientCoverCache.Store(fullMethod, covered)
	return covered
}
