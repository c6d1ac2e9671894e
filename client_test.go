package idempotency

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
)

const (
	clientTestDo     = "/idempotency.testing.v1.TestService/Do"
	clientTestCharge = "/idempotency.testing.v1.TestService/Charge"
	clientTestRead   = "/idempotency.testing.v1.TestService/Read"
)

// withClientTestJitter replaces the full-jitter random source.
func withClientTestJitter(f func(upTo time.Duration) time.Duration) ClientOption {
	return func(o *clientOptions) { o.jitter = f }
}

// withClientTestSleep replaces the backoff sleep.
func withClientTestSleep(f func(ctx context.Context, d time.Duration) error) ClientOption {
	return func(o *clientOptions) { o.sleep = f }
}

// clientNoSleep records the requested waits and returns at once.
type clientNoSleep struct {
	mu    sync.Mutex
	waits []time.Duration
}

func (s *clientNoSleep) option() ClientOption {
	return withClientTestSleep(func(ctx context.Context, d time.Duration) error {
		s.mu.Lock()
		s.waits = append(s.waits, d)
		s.mu.Unlock()
		return ctx.Err()
	})
}

// clientNoWait makes retries immediate.
func clientNoWait() ClientOption { return (&clientNoSleep{}).option() }

func (s *clientNoSleep) got() []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.waits)
}

func clientTestContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// clientFakeAttempt is what the fake invoker saw on one attempt.
type clientFakeAttempt struct {
	keys        []string
	hasDeadline bool
}

// clientFake is a grpc.UnaryInvoker whose n-th attempt (from 1) returns
// result(ctx, n). It fills the header and trailer call options with header(n)
// and trailer(n).
type clientFake struct {
	header  string
	result  func(ctx context.Context, n int) error
	replay  func(n int) (header, trailer metadata.MD)
	mu      sync.Mutex
	seen    []clientFakeAttempt
	options [][]grpc.CallOption
}

func (f *clientFake) invoke(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, opts ...grpc.CallOption) error {
	md, _ := metadata.FromOutgoingContext(ctx)
	h := f.header
	if h == "" {
		h = DefaultKeyHeader
	}
	_, hasDeadline := ctx.Deadline()
	f.mu.Lock()
	f.seen = append(f.seen, clientFakeAttempt{keys: md.Get(h), hasDeadline: hasDeadline})
	f.options = append(f.options, opts)
	n := len(f.seen)
	f.mu.Unlock()
	if f.replay != nil {
		hd, tr := f.replay(n)
		for _, o := range opts {
			switch o := o.(type) {
			case grpc.HeaderCallOption:
				*o.HeaderAddr = hd
			case grpc.TrailerCallOption:
				*o.TrailerAddr = tr
			}
		}
	}
	if f.result == nil {
		return nil
	}
	return f.result(ctx, n)
}

func (f *clientFake) attempts() []clientFakeAttempt {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.seen)
}

// clientCall runs one call through the interceptor built from opts against
// f and returns its error and CallInfo.
func clientCall(ctx context.Context, f *clientFake, method string, opts ...ClientOption) (CallInfo, error) {
	var info CallInfo
	err := UnaryClientInterceptor(opts...)(ctx, method, &testingv1.DoRequest{}, &testingv1.DoResponse{}, nil, f.invoke, CallResult(&info))
	return info, err
}

func clientFailN(n int, err error) func(context.Context, int) error {
	return func(_ context.Context, i int) error {
		if i <= n {
			return err
		}
		return nil
	}
}

// TestClientSameGeneratedKeyOnEveryAttempt verifies that a key is generated
// once per logical call, is valid, is reported in CallInfo and is sent on
// every attempt.
func TestClientSameGeneratedKeyOnEveryAttempt(t *testing.T) {
	ctx := clientTestContext(t)
	var sleep clientNoSleep
	f := &clientFake{result: clientFailN(2, status.Error(codes.Unavailable, "down"))}
	info, err := clientCall(ctx, f, clientTestDo, sleep.option())
	if err != nil {
		t.Fatalf("call: got %v, want nil", err)
	}
	att := f.attempts()
	if len(att) != 3 || info.Attempts != 3 {
		t.Fatalf("attempts: invoker saw %d, CallInfo says %d, want 3", len(att), info.Attempts)
	}
	if err := ValidateKey(info.Key); err != nil {
		t.Fatalf("generated key %q: %v", info.Key, err)
	}
	for i, a := range att {
		if !slices.Equal(a.keys, []string{info.Key}) {
			t.Errorf("attempt %d sent keys %q, want [%q]", i+1, a.keys, info.Key)
		}
	}
	if info.Replayed {
		t.Errorf("Replayed: got true, want false")
	}
}

// TestClientKeyPrecedence verifies that a key already in the outgoing
// metadata is never overwritten, that WithKey is used otherwise, and that an
// invalid WithKey key fails before anything is sent.
func TestClientKeyPrecedence(t *testing.T) {
	ctx := clientTestContext(t)

	t.Run("metadata wins", func(t *testing.T) {
		f := &clientFake{}
		cctx := metadata.AppendToOutgoingContext(WithKey(ctx, "from-with-key"), DefaultKeyHeader, "from-metadata")
		info, err := clientCall(cctx, f, clientTestDo)
		if err != nil {
			t.Fatal(err)
		}
		if got := f.attempts()[0].keys; !slices.Equal(got, []string{"from-metadata"}) {
			t.Errorf("sent keys %q, want [from-metadata]", got)
		}
		if info.Key != "from-metadata" {
			t.Errorf("CallInfo.Key: got %q, want from-metadata", info.Key)
		}
	})
	t.Run("WithKey", func(t *testing.T) {
		f := &clientFake{}
		info, err := clientCall(WithKey(ctx, "order-8812"), f, clientTestDo)
		if err != nil {
			t.Fatal(err)
		}
		if got := f.attempts()[0].keys; !slices.Equal(got, []string{"order-8812"}) {
			t.Errorf("sent keys %q, want [order-8812]", got)
		}
		if info.Key != "order-8812" || info.Attempts != 1 {
			t.Errorf("CallInfo: got %+v, want key order-8812, 1 attempt", info)
		}
	})
	t.Run("invalid WithKey", func(t *testing.T) {
		f := &clientFake{}
		_, err := clientCall(WithKey(ctx, "has space"), f, clientTestDo)
		if status.Code(err) != codes.InvalidArgument || ReasonOf(err) != ReasonKeyInvalid {
			t.Errorf("got %v (reason %q), want InvalidArgument %s", err, ReasonOf(err), ReasonKeyInvalid)
		}
		if n := len(f.attempts()); n != 0 {
			t.Errorf("invoker called %d times, want 0", n)
		}
	})
	t.Run("custom header", func(t *testing.T) {
		f := &clientFake{header: "x-request-key"}
		if _, err := clientCall(ctx, f, clientTestDo, WithClientKeyHeader("X-Request-Key")); err != nil {
			t.Fatal(err)
		}
		if got := f.attempts()[0].keys; len(got) != 1 {
			t.Errorf("keys under x-request-key: got %q, want one", got)
		}
	})
}

// TestClientNewKey verifies that generated keys are valid, carry 128 random
// bits and do not repeat.
func TestClientNewKey(t *testing.T) {
	seen := make(map[string]bool)
	for range 10000 {
		k, err := NewKey()
		if err != nil {
			t.Fatal(err)
		}
		if err := ValidateKey(k); err != nil {
			t.Fatalf("NewKey() = %q: %v", k, err)
		}
		if b, err := base64.RawURLEncoding.DecodeString(k); err != nil || len(b) != 16 {
			t.Fatalf("NewKey() = %q: decodes to %d bytes (%v), want 16", k, len(b), err)
		}
		if seen[k] {
			t.Fatalf("NewKey() returned %q twice", k)
		}
		seen[k] = true
	}
}

// TestClientKeyGenerator verifies WithKeyGenerator and that a failing or
// invalid generator fails the call with Internal before anything is sent.
func TestClientKeyGenerator(t *testing.T) {
	ctx := clientTestContext(t)
	var calls atomic.Int32
	f := &clientFake{result: clientFailN(1, status.Error(codes.Unavailable, "down"))}
	info, err := clientCall(ctx, f, clientTestDo, clientNoWait(),
		WithKeyGenerator(func() (string, error) { return fmt.Sprintf("k-%d", calls.Add(1)), nil }))
	if err != nil || info.Key != "k-1" || calls.Load() != 1 {
		t.Errorf("got err %v, key %q, %d generator calls; want nil, k-1, 1", err, info.Key, calls.Load())
	}
	for name, gen := range map[string]func() (string, error){
		"error":   func() (string, error) { return "", errors.New("no entropy") },
		"invalid": func() (string, error) { return "", nil },
	} {
		t.Run(name, func(t *testing.T) {
			f := &clientFake{}
			_, err := clientCall(ctx, f, clientTestDo, WithKeyGenerator(gen))
			if status.Code(err) != codes.Internal || ReasonOf(err) != ReasonKeyGenerationFailed {
				t.Errorf("got %v, want code Internal with reason %s", err, ReasonKeyGenerationFailed)
			}
			if n := len(f.attempts()); n != 0 {
				t.Errorf("invoker called %d times, want 0", n)
			}
		})
	}
}

// TestClientRetryDecision verifies which errors are retried (until
// WithMaxAttempts) and which return after one attempt.
func TestClientRetryDecision(t *testing.T) {
	ctx := clientTestContext(t)
	const maxAttempts = 4
	tests := []struct {
		name  string
		err   error
		extra []codes.Code
		want  int
	}{
		{"Unavailable", status.Error(codes.Unavailable, "down"), nil, maxAttempts},
		{"store unavailable", newStatus(codes.Unavailable, ReasonStoreUnavailable, nil, "store down"), nil, maxAttempts},
		{"in progress", newStatus(codes.Aborted, ReasonInProgress, nil, "busy", retryInfo(time.Millisecond)), nil, maxAttempts},
		{"plain Aborted", status.Error(codes.Aborted, "conflict"), nil, 1},
		{"plain Aborted added", status.Error(codes.Aborted, "conflict"), []codes.Code{codes.Aborted}, maxAttempts},
		{"key required", errKeyRequired(clientTestDo, DefaultKeyHeader), nil, 1},
		{"key invalid", errKeyInvalid(clientTestDo, DefaultKeyHeader, ErrInvalidKey), nil, 1},
		{"key invalid even if added", errKeyInvalid(clientTestDo, DefaultKeyHeader, ErrInvalidKey), []codes.Code{codes.InvalidArgument}, 1},
		{"key reused", newStatus(codes.FailedPrecondition, ReasonKeyReused, nil, "reused"), []codes.Code{codes.FailedPrecondition}, 1},
		{"FailedPrecondition", status.Error(codes.FailedPrecondition, "no"), nil, 1},
		{"server DeadlineExceeded", status.Error(codes.DeadlineExceeded, "downstream timed out"), nil, 1},
		{"Internal", status.Error(codes.Internal, "bug"), nil, 1},
		{"Internal added", status.Error(codes.Internal, "bug"), []codes.Code{codes.Internal}, maxAttempts},
		{"ResourceExhausted", status.Error(codes.ResourceExhausted, "quota"), nil, 1},
		{"not a status", errors.New("plain"), nil, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &clientFake{result: func(context.Context, int) error { return tt.err }}
			info, err := clientCall(ctx, f, clientTestDo, clientNoWait(),
				WithMaxAttempts(maxAttempts), WithRetryCodes(tt.extra...))
			if !errors.Is(err, tt.err) && err.Error() != tt.err.Error() {
				t.Errorf("error: got %v, want the last attempt's %v", err, tt.err)
			}
			if n := len(f.attempts()); n != tt.want || info.Attempts != tt.want {
				t.Errorf("attempts: invoker saw %d, CallInfo says %d, want %d", n, info.Attempts, tt.want)
			}
		})
	}
}

// TestClientWithoutRetries verifies that WithoutRetries makes one attempt
// and still attaches a key.
func TestClientWithoutRetries(t *testing.T) {
	ctx := clientTestContext(t)
	f := &clientFake{result: clientFailN(1, status.Error(codes.Unavailable, "down"))}
	info, err := clientCall(ctx, f, clientTestDo, WithoutRetries())
	if status.Code(err) != codes.Unavailable {
		t.Errorf("got %v, want Unavailable", err)
	}
	if att := f.attempts(); len(att) != 1 || len(att[0].keys) != 1 || info.Key == "" {
		t.Errorf("got %d attempts, keys %v, CallInfo %+v; want 1 attempt with one key", len(att), att, info)
	}
}

// TestClientBackoff verifies the exponential caps handed to the jitter, that
// the jittered value is what is slept, and that a RetryInfo delay is a floor.
func TestClientBackoff(t *testing.T) {
	ctx := clientTestContext(t)
	unavailable := status.Error(codes.Unavailable, "down")

	t.Run("caps", func(t *testing.T) {
		var caps []time.Duration
		var sleep clientNoSleep
		f := &clientFake{result: clientFailN(6, unavailable)}
		_, err := clientCall(ctx, f, clientTestDo, sleep.option(), WithMaxAttempts(7),
			WithBackoff(10*time.Millisecond, 45*time.Millisecond),
			withClientTestJitter(func(upTo time.Duration) time.Duration { caps = append(caps, upTo); return upTo / 2 }))
		if err != nil {
			t.Fatal(err)
		}
		ms := time.Millisecond
		if want := []time.Duration{10 * ms, 20 * ms, 40 * ms, 45 * ms, 45 * ms, 45 * ms}; !slices.Equal(caps, want) {
			t.Errorf("jitter caps: got %v, want %v", caps, want)
		}
		if want := []time.Duration{5 * ms, 10 * ms, 20 * ms, 22500 * time.Microsecond, 22500 * time.Microsecond, 22500 * time.Microsecond}; !slices.Equal(sleep.got(), want) {
			t.Errorf("waits: got %v, want %v", sleep.got(), want)
		}
	})
	t.Run("RetryInfo floor", func(t *testing.T) {
		var sleep clientNoSleep
		busy := newStatus(codes.Aborted, ReasonInProgress, nil, "busy", retryInfo(3*time.Second))
		f := &clientFake{result: clientFailN(1, busy)}
		_, err := clientCall(ctx, f, clientTestDo, sleep.option(),
			withClientTestJitter(func(time.Duration) time.Duration { return 0 }))
		if err != nil {
			t.Fatal(err)
		}
		if want := []time.Duration{3 * time.Second}; !slices.Equal(sleep.got(), want) {
			t.Errorf("waits: got %v, want %v", sleep.got(), want)
		}
	})
	t.Run("default jitter in range", func(t *testing.T) {
		for range 1000 {
			if d := clientFullJitter(7 * time.Millisecond); d < 0 || d > 7*time.Millisecond {
				t.Fatalf("clientFullJitter(7ms) = %v, want within [0, 7ms]", d)
			}
		}
		if d := clientFullJitter(0); d != 0 {
			t.Errorf("clientFullJitter(0) = %v, want 0", d)
		}
	})
}

// TestClientBackoffPastDeadline verifies that when the next wait would end
// past the caller's deadline, the last error is returned at once, without
// sleeping.
func TestClientBackoffPastDeadline(t *testing.T) {
	ctx, cancel := context.WithTimeout(clientTestContext(t), time.Minute)
	defer cancel()
	for name, err := range map[string]error{
		"backoff":   status.Error(codes.Unavailable, "down"),
		"RetryInfo": newStatus(codes.Aborted, ReasonInProgress, nil, "busy", retryInfo(time.Hour)),
	} {
		t.Run(name, func(t *testing.T) {
			var sleep clientNoSleep
			f := &clientFake{result: func(context.Context, int) error { return err }}
			info, got := clientCall(ctx, f, clientTestDo, sleep.option(), WithBackoff(2*time.Hour, 2*time.Hour),
				withClientTestJitter(func(upTo time.Duration) time.Duration { return upTo }))
			if got.Error() != err.Error() {
				t.Errorf("got %v, want the last attempt's %v", got, err)
			}
			if info.Attempts != 1 || len(sleep.got()) != 0 {
				t.Errorf("got %d attempts and waits %v, want 1 attempt and no wait", info.Attempts, sleep.got())
			}
		})
	}
}

// TestClientCancelDuringBackoff verifies that canceling the caller's context
// ends a long backoff promptly with Canceled.
func TestClientCancelDuringBackoff(t *testing.T) {
	testCtx := clientTestContext(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := &clientFake{result: func(context.Context, int) error { return status.Error(codes.Unavailable, "down") }}
	// The real sleep, which signals when it starts.
	sleeping := make(chan time.Duration, 1)
	sleep := withClientTestSleep(func(ctx context.Context, d time.Duration) error {
		sleeping <- d
		return clientSleep(ctx, d)
	})
	type result struct {
		info CallInfo
		err  error
	}
	done := make(chan result, 1)
	go func() {
		info, err := clientCall(ctx, f, clientTestDo, sleep, WithBackoff(time.Hour, time.Hour),
			withClientTestJitter(func(upTo time.Duration) time.Duration { return upTo }))
		done <- result{info, err}
	}()
	select {
	case d := <-sleeping:
		if d != time.Hour {
			t.Errorf("backoff: got %v, want 1h", d)
		}
	case <-testCtx.Done():
		t.Fatal("the interceptor never started its backoff")
	}
	cancel()
	select {
	case r := <-done:
		if status.Code(r.err) != codes.Canceled || ReasonOf(r.err) != ReasonRetryInterrupted ||
			!strings.Contains(status.Convert(r.err).Message(), "down") {
			t.Errorf("got %v, want Canceled with reason %s quoting the last attempt's error", r.err, ReasonRetryInterrupted)
		}
		if r.info.Attempts != 1 {
			t.Errorf("attempts: got %d, want 1", r.info.Attempts)
		}
	case <-testCtx.Done():
		t.Fatal("the call did not return after its context was canceled")
	}
}

// TestClientCallerContextEndsAttempt verifies that an attempt ended by the
// caller's own deadline or cancellation is never retried, even with a
// per-attempt timeout configured.
func TestClientCallerContextEndsAttempt(t *testing.T) {
	testCtx := clientTestContext(t)
	blockUntilDone := func(ctx context.Context, _ int) error {
		<-ctx.Done()
		return status.FromContextError(ctx.Err()).Err()
	}
	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(testCtx, 50*time.Millisecond)
		defer cancel()
		f := &clientFake{result: blockUntilDone}
		info, err := clientCall(ctx, f, clientTestDo, WithPerAttemptTimeout(time.Hour), clientNoWait())
		if status.Code(err) != codes.DeadlineExceeded || info.Attempts != 1 {
			t.Errorf("got %v after %d attempts, want DeadlineExceeded after 1", err, info.Attempts)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		ctx, cancel := context.WithCancel(testCtx)
		started := make(chan struct{})
		f := &clientFake{result: func(ctx context.Context, n int) error { close(started); return blockUntilDone(ctx, n) }}
		go func() { <-started; cancel() }()
		info, err := clientCall(ctx, f, clientTestDo, WithPerAttemptTimeout(time.Hour), clientNoWait())
		if status.Code(err) != codes.Canceled || info.Attempts != 1 {
			t.Errorf("got %v after %d attempts, want Canceled after 1", err, info.Attempts)
		}
	})
}

// TestClientPerAttemptTimeout verifies that attempts cut off by the
// per-attempt timeout are retried with the same key while the caller's
// context is live.
func TestClientPerAttemptTimeout(t *testing.T) {
	ctx := clientTestContext(t)
	f := &clientFake{result: func(ctx context.Context, n int) error {
		if n <= 2 {
			<-ctx.Done()
			return status.FromContextError(ctx.Err()).Err()
		}
		return nil
	}}
	info, err := clientCall(ctx, f, clientTestDo, WithPerAttemptTimeout(20*time.Millisecond), clientNoWait())
	if err != nil {
		t.Fatalf("got %v, want nil", err)
	}
	att := f.attempts()
	if len(att) != 3 || info.Attempts != 3 {
		t.Fatalf("attempts: invoker saw %d, CallInfo says %d, want 3", len(att), info.Attempts)
	}
	for i, a := range att {
		if !a.hasDeadline || !slices.Equal(a.keys, []string{info.Key}) {
			t.Errorf("attempt %d: deadline %v, keys %q; want a deadline and [%q]", i+1, a.hasDeadline, a.keys, info.Key)
		}
	}
}

// TestClientServerReportsAttemptDeadline verifies that DeadlineExceeded
// reported by the server once the per-attempt deadline has passed is
// retried even if the client's timer has not fired yet, while one bound by
// the caller's earlier deadline is not.
func TestClientServerReportsAttemptDeadline(t *testing.T) {
	testCtx := clientTestContext(t)
	deadline := status.Error(codes.DeadlineExceeded, "stream terminated by RST_STREAM with error code: CANCEL")
	t.Run("per-attempt bound", func(t *testing.T) {
		f := &clientFake{result: func(ctx context.Context, n int) error {
			if n == 1 {
				// The server's answer arrives at our deadline, possibly
				// before our own timer has canceled the attempt.
				dl, _ := ctx.Deadline()
				time.Sleep(time.Until(dl))
				return deadline
			}
			return nil
		}}
		info, err := clientCall(testCtx, f, clientTestDo, WithPerAttemptTimeout(50*time.Millisecond), clientNoWait())
		if err != nil || info.Attempts != 2 {
			t.Errorf("got %v after %d attempts, want success after 2", err, info.Attempts)
		}
	})
	t.Run("caller bound", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(testCtx, 10*time.Second)
		defer cancel()
		f := &clientFake{result: clientFailN(1, deadline)}
		info, err := clientCall(ctx, f, clientTestDo, WithPerAttemptTimeout(time.Hour), clientNoWait())
		if status.Code(err) != codes.DeadlineExceeded || info.Attempts != 1 {
			t.Errorf("got %v after %d attempts, want DeadlineExceeded after 1", err, info.Attempts)
		}
	})
}

// TestClientHandlerDeadlineNotRetried verifies that a DeadlineExceeded the
// server returns well before the per-attempt deadline (the handler's own
// answer, say a downstream timeout) is returned after one attempt, not
// retried; listed in WithRetryCodes, it is retried as any listed code.
func TestClientHandlerDeadlineNotRetried(t *testing.T) {
	ctx := clientTestContext(t)
	handlerDeadline := status.Error(codes.DeadlineExceeded, "upstream timed out")
	f := &clientFake{result: clientFailN(1, handlerDeadline)}
	info, err := clientCall(ctx, f, clientTestDo, WithPerAttemptTimeout(10*time.Second), clientNoWait())
	if status.Code(err) != codes.DeadlineExceeded || info.Attempts != 1 || len(f.attempts()) != 1 {
		t.Fatalf("got %v after %d attempts, want the handler's DeadlineExceeded after 1", err, info.Attempts)
	}
	f = &clientFake{result: clientFailN(1, handlerDeadline)}
	info, err = clientCall(ctx, f, clientTestDo, WithPerAttemptTimeout(10*time.Second), WithRetryCodes(codes.DeadlineExceeded), clientNoWait())
	if err != nil || info.Attempts != 2 {
		t.Fatalf("with WithRetryCodes(DeadlineExceeded): got %v after %d attempts, want success after 2", err, info.Attempts)
	}
}

// TestClientE2EHandlerDeadlineRunsOnce verifies end to end that a handler
// returning DeadlineExceeded itself runs once: the client, with a
// per-attempt timeout and five attempts, does not retry the handler's
// answer (the server releases the key for it, so each retry would run the
// handler again).
func TestClientE2EHandlerDeadlineRunsOnce(t *testing.T) {
	var runs atomic.Int64
	svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		runs.Add(1)
		return nil, status.Error(codes.DeadlineExceeded, "upstream timed out")
	}}
	lis := testservice.Serve(t, svc, grpc.ChainUnaryInterceptor(UnaryServerInterceptor(NewMemoryStore())))
	client := testservice.Dial(t, lis, clientInterceptorDial(WithPerAttemptTimeout(5*time.Second), WithMaxAttempts(5), clientNoWait()))
	var info CallInfo
	_, err := client.Do(clientTestContext(t), &testingv1.DoRequest{Id: "x"}, CallResult(&info))
	if status.Code(err) != codes.DeadlineExceeded || info.Attempts != 1 {
		t.Fatalf("got %v after %d attempts, want the handler's DeadlineExceeded after 1", err, info.Attempts)
	}
	if n := runs.Load(); n != 1 {
		t.Fatalf("handler ran %d times, want 1", n)
	}
}

// TestClientMethodCoverage verifies the default method selection from the
// descriptors, WithClientMethods, and that WithKey covers any method.
func TestClientMethodCoverage(t *testing.T) {
	for method, want := range map[string]bool{
		clientTestDo:                true,
		clientTestCharge:            true,
		clientTestRead:              false,
		"/unknown.v1.Service/Write": true,
		"malformed":                 true,
	} {
		if got := clientDefaultCovers(method); got != want {
			t.Errorf("clientDefaultCovers(%q) = %v, want %v", method, got, want)
		}
		if got := clientDefaultCovers(method); got != want {
			t.Errorf("clientDefaultCovers(%q), cached, = %v, want %v", method, got, want)
		}
	}

	ctx := clientTestContext(t)
	unavailable := status.Error(codes.Unavailable, "down")
	tests := []struct {
		name      string
		ctx       context.Context
		method    string
		opts      []ClientOption
		wantKey   bool
		wantTries int
	}{
		{"read-only method passes through", ctx, clientTestRead, nil, false, 1},
		{"WithKey covers a read-only method", WithKey(ctx, "k1"), clientTestRead, nil, true, 3},
		{"excluded by WithClientMethods", ctx, clientTestCharge, []ClientOption{WithClientMethods(func(string) bool { return false })}, false, 1},
		{"included by WithClientMethods", ctx, clientTestRead, []ClientOption{WithClientMethods(func(string) bool { return true })}, true, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &clientFake{result: clientFailN(2, unavailable)}
			info, _ := clientCall(tt.ctx, f, tt.method, append(tt.opts, clientNoWait())...)
			att := f.attempts()
			if len(att) != tt.wantTries || info.Attempts != tt.wantTries {
				t.Errorf("attempts: invoker saw %d, CallInfo says %d, want %d", len(att), info.Attempts, tt.wantTries)
			}
			if got := len(att[0].keys) == 1 && info.Key != ""; got != tt.wantKey {
				t.Errorf("key sent: got %v (keys %q, CallInfo %q), want %v", got, att[0].keys, info.Key, tt.wantKey)
			}
		})
	}
}

// TestClientReplayedAndCallerOptions verifies that Replayed is read from the
// last attempt's header or, for a Trailers-Only answer, its trailer, and that
// the caller's call options reach every attempt.
func TestClientReplayedAndCallerOptions(t *testing.T) {
	ctx := clientTestContext(t)
	replayed := metadata.Pairs(ReplayedHeader, "true")
	tests := []struct {
		name   string
		replay func(n int) (metadata.MD, metadata.MD)
		want   bool
	}{
		{"fresh", func(int) (metadata.MD, metadata.MD) { return nil, nil }, false},
		{"header", func(int) (metadata.MD, metadata.MD) { return replayed, nil }, true},
		{"trailer", func(int) (metadata.MD, metadata.MD) { return nil, replayed }, true},
		{"only the first attempt", func(n int) (metadata.MD, metadata.MD) {
			if n == 1 {
				return replayed, nil
			}
			return nil, nil
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &clientFake{replay: tt.replay, result: clientFailN(1, status.Error(codes.Unavailable, "down"))}
			var info CallInfo
			callerOpt := grpc.WaitForReady(true)
			err := UnaryClientInterceptor(clientNoWait())(ctx, clientTestDo, &testingv1.DoRequest{}, &testingv1.DoResponse{},
				nil, f.invoke, callerOpt, CallResult(&info))
			if err != nil {
				t.Fatal(err)
			}
			if info.Replayed != tt.want || info.Attempts != 2 {
				t.Errorf("CallInfo: got %+v, want Replayed %v after 2 attempts", info, tt.want)
			}
			for i, opts := range f.options {
				if !slices.ContainsFunc(opts, func(o grpc.CallOption) bool { return o == callerOpt }) {
					t.Errorf("attempt %d: the caller's call option is missing", i+1)
				}
			}
		})
	}
}

// clientTestService is the test service behind the end-to-end tests. It
// counts handler executions and records the key each execution saw.
type clientTestService struct {
	testingv1.UnimplementedTestServiceServer
	execs atomic.Int64
	// do, when set, runs inside Do after the execution is counted.
	do func(ctx context.Context, req *testingv1.DoRequest) error

	mu   sync.Mutex
	keys []string
}

type clientExecutedKey struct{}

func (s *clientTestService) count(ctx context.Context) int64 {
	if k, ok := KeyFromContext(ctx); ok {
		s.mu.Lock()
		s.keys = append(s.keys, k)
		s.mu.Unlock()
	}
	if flag, ok := ctx.Value(clientExecutedKey{}).(*atomic.Bool); ok {
		flag.Store(true)
	}
	return s.execs.Add(1)
}

func (s *clientTestService) seenKeys() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.keys)
}

func (s *clientTestService) Do(ctx context.Context, req *testingv1.DoRequest) (*testingv1.DoResponse, error) {
	n := s.count(ctx)
	if s.do != nil {
		if err := s.do(ctx, req); err != nil {
			return nil, err
		}
	}
	return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
}

func (s *clientTestService) Charge(ctx context.Context, req *testingv1.ChargeRequest) (*testingv1.ChargeResponse, error) {
	return &testingv1.ChargeResponse{ChargeId: fmt.Sprintf("ch_%d", s.count(ctx))}, nil
}

func (s *clientTestService) Read(ctx context.Context, req *testingv1.ReadRequest) (*testingv1.ReadResponse, error) {
	return &testingv1.ReadResponse{Id: req.GetId()}, nil
}

// clientExecutionDone returns a server interceptor, to be placed outside the
// idempotency interceptor, that closes done once a call that executed the
// handler has returned through the idempotency interceptor, that is, once its
// outcome is stored.
func clientExecutionDone(done chan struct{}) grpc.UnaryServerInterceptor {
	var once sync.Once
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		executed := new(atomic.Bool)
		resp, err := handler(context.WithValue(ctx, clientExecutedKey{}, executed), req)
		if executed.Load() {
			once.Do(func() { close(done) })
		}
		return resp, err
	}
}

// clientTestServer serves svc over bufconn behind the server interceptors
// (the first is outermost) and returns a client whose connection uses the
// given dial options.
func clientTestServer(t *testing.T, svc *clientTestService, interceptors []grpc.UnaryServerInterceptor, dialOpts ...grpc.DialOption) testingv1.TestServiceClient {
	t.Helper()
	lis := testservice.Serve(t, svc, grpc.ChainUnaryInterceptor(interceptors...))
	return testservice.Dial(t, lis, dialOpts...)
}

func clientInterceptorDial(opts ...ClientOption) grpc.DialOption {
	return grpc.WithChainUnaryInterceptor(UnaryClientInterceptor(opts...))
}

// TestClientE2ELostResponse verifies that when the handler's answer is lost
// on the way back, the retry gets the original result, marked as replayed,
// and the handler has run exactly once.
func TestClientE2ELostResponse(t *testing.T) {
	ctx := clientTestContext(t)
	svc := &clientTestService{}
	var lost atomic.Bool
	loseFirst := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		resp, err := handler(ctx, req)
		if lost.CompareAndSwap(false, true) {
			return nil, status.Error(codes.Unavailable, "connection lost after the handler ran")
		}
		return resp, err
	}
	client := clientTestServer(t, svc, []grpc.UnaryServerInterceptor{loseFirst, UnaryServerInterceptor(NewMemoryStore())},
		clientInterceptorDial(WithBackoff(0, 0)))

	var info CallInfo
	resp, err := client.Do(ctx, &testingv1.DoRequest{Id: "lost", Amount: 5}, CallResult(&info))
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	if n := svc.execs.Load(); n != 1 {
		t.Errorf("handler executions: got %d, want 1", n)
	}
	if resp.GetId() != "lost" || resp.GetExecution() != 1 {
		t.Errorf("response: got %v, want id lost, execution 1", resp)
	}
	if !info.Replayed || info.Attempts != 2 {
		t.Errorf("CallInfo: got %+v, want Replayed after 2 attempts", info)
	}
	if keys := svc.seenKeys(); !slices.Equal(keys, []string{info.Key}) {
		t.Errorf("the handler saw keys %q, CallInfo says %q", keys, info.Key)
	}
}

// TestClientE2EDoubleClick verifies that two concurrent calls with the same
// explicit key run the handler once and both get its result.
func TestClientE2EDoubleClick(t *testing.T) {
	ctx := clientTestContext(t)
	var arrivals atomic.Int32
	bothArrived := make(chan struct{})
	countArrivals := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if arrivals.Add(1) == 2 {
			close(bothArrived)
		}
		return handler(ctx, req)
	}
	svc := &clientTestService{do: func(ctx context.Context, _ *testingv1.DoRequest) error {
		// Keep the first execution running until the second click is in.
		select {
		case <-bothArrived:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}}
	executed := make(chan struct{})
	client := clientTestServer(t, svc, []grpc.UnaryServerInterceptor{countArrivals, clientExecutionDone(executed), UnaryServerInterceptor(NewMemoryStore())},
		clientInterceptorDial(withClientTestSleep(func(ctx context.Context, _ time.Duration) error {
			select {
			case <-executed:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})))

	type result struct {
		resp *testingv1.DoResponse
		info CallInfo
		err  error
	}
	results := make(chan result, 2)
	kctx := WithKey(ctx, "double-click-1")
	for range 2 {
		go func() {
			var r result
			r.resp, r.err = client.Do(kctx, &testingv1.DoRequest{Id: "click", Amount: 10}, CallResult(&r.info))
			results <- r
		}()
	}
	var got []result
	for range 2 {
		select {
		case r := <-results:
			got = append(got, r)
		case <-ctx.Done():
			t.Fatal("the calls did not return")
		}
	}
	for i, r := range got {
		if r.err != nil {
			t.Fatalf("call %d: %v", i, r.err)
		}
		if r.info.Key != "double-click-1" {
			t.Errorf("call %d: key %q, want double-click-1", i, r.info.Key)
		}
	}
	if n := svc.execs.Load(); n != 1 {
		t.Errorf("handler executions: got %d, want 1", n)
	}
	if !proto.Equal(got[0].resp, got[1].resp) {
		t.Errorf("responses differ: %v and %v", got[0].resp, got[1].resp)
	}
	if got[0].info.Replayed == got[1].info.Replayed {
		t.Errorf("Replayed: got %v and %v, want exactly one replay", got[0].info.Replayed, got[1].info.Replayed)
	}
}

// TestClientE2EInProgressThenReplay verifies that a retry meeting a running
// first call gets Aborted, waits at least the server's RetryInfo delay, and
// then gets the replay; the handler runs once.
func TestClientE2EInProgressThenReplay(t *testing.T) {
	ctx := clientTestContext(t)
	started, release := make(chan struct{}), make(chan struct{})
	svc := &clientTestService{do: func(ctx context.Context, _ *testingv1.DoRequest) error {
		close(started)
		<-release
		return nil
	}}
	executed := make(chan struct{})
	var (
		mu    sync.Mutex
		waits []time.Duration
		once  sync.Once
	)
	sleep := func(ctx context.Context, d time.Duration) error {
		mu.Lock()
		waits = append(waits, d)
		mu.Unlock()
		once.Do(func() { close(release) })
		select {
		case <-executed:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	const serverDelay = 250 * time.Millisecond
	client := clientTestServer(t, svc,
		[]grpc.UnaryServerInterceptor{clientExecutionDone(executed), UnaryServerInterceptor(NewMemoryStore(), WithRetryDelay(serverDelay))},
		clientInterceptorDial(withClientTestSleep(sleep), withClientTestJitter(func(time.Duration) time.Duration { return 0 })))

	kctx := WithKey(ctx, "slow-1")
	type result struct {
		resp *testingv1.DoResponse
		info CallInfo
		err  error
	}
	first := make(chan result, 1)
	go func() {
		var r result
		r.resp, r.err = client.Do(kctx, &testingv1.DoRequest{Id: "slow"}, CallResult(&r.info))
		first <- r
	}()
	select {
	case <-started:
	case <-ctx.Done():
		t.Fatal("the first call did not start")
	}

	var info CallInfo
	resp, err := client.Do(kctx, &testingv1.DoRequest{Id: "slow"}, CallResult(&info))
	if err != nil {
		t.Fatalf("retry: %v", err)
	}
	if !info.Replayed || info.Attempts != 2 {
		t.Errorf("retry CallInfo: got %+v, want Replayed after 2 attempts", info)
	}
	mu.Lock()
	if len(waits) != 1 || waits[0] != serverDelay {
		t.Errorf("waits: got %v, want [%v] (the server's RetryInfo delay)", waits, serverDelay)
	}
	mu.Unlock()

	var r result
	select {
	case r = <-first:
	case <-ctx.Done():
		t.Fatal("the first call did not return")
	}
	if r.err != nil || r.info.Replayed || r.info.Attempts != 1 {
		t.Errorf("first call: err %v, CallInfo %+v; want success, fresh, 1 attempt", r.err, r.info)
	}
	if !proto.Equal(r.resp, resp) {
		t.Errorf("responses differ: first %v, retry %v", r.resp, resp)
	}
	if n := svc.execs.Load(); n != 1 {
		t.Errorf("handler executions: got %d, want 1", n)
	}
}

// TestClientE2EPerAttemptTimeout verifies that an attempt timed out while the
// handler still runs is retried with the same key, meets "in progress", and
// ends with the replay of the single execution.
func TestClientE2EPerAttemptTimeout(t *testing.T) {
	ctx := clientTestContext(t)
	release := make(chan struct{})
	svc := &clientTestService{do: func(context.Context, *testingv1.DoRequest) error {
		<-release // ignores cancellation, like a handler already committed to its work
		return nil
	}}
	executed := make(chan struct{})
	var (
		mu    sync.Mutex
		waits []time.Duration
	)
	// The first wait follows the timed-out attempt: retry at once, so the
	// second attempt meets the running handler. The second follows Aborted:
	// let the handler finish, and retry once its outcome is stored.
	sleep := func(ctx context.Context, d time.Duration) error {
		mu.Lock()
		waits = append(waits, d)
		n := len(waits)
		mu.Unlock()
		if n == 1 {
			return nil
		}
		if n == 2 {
			close(release)
		}
		select {
		case <-executed:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	client := clientTestServer(t, svc,
		[]grpc.UnaryServerInterceptor{clientExecutionDone(executed), UnaryServerInterceptor(NewMemoryStore())},
		clientInterceptorDial(WithPerAttemptTimeout(500*time.Millisecond), WithMaxAttempts(10), WithBackoff(0, 0),
			withClientTestSleep(sleep)))
	var info CallInfo
	resp, err := client.Do(ctx, &testingv1.DoRequest{Id: "timeout"}, CallResult(&info))
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	// A busy machine may time out the replay attempt too, hence "at least".
	if resp.GetExecution() != 1 || !info.Replayed || info.Attempts < 3 {
		t.Errorf("got %v, CallInfo %+v; want execution 1, replayed, at least 3 attempts", resp, info)
	}
	mu.Lock()
	if !slices.Contains(waits, DefaultRetryDelay) {
		t.Errorf("waits: got %v, want one to be the server's RetryInfo delay %v", waits, DefaultRetryDelay)
	}
	mu.Unlock()
	if n := svc.execs.Load(); n != 1 {
		t.Errorf("handler executions: got %d, want 1", n)
	}
}

// TestClientE2ENonRetryable verifies that the server's verdicts on the key
// and application errors return after one attempt.
func TestClientE2ENonRetryable(t *testing.T) {
	ctx := clientTestContext(t)
	svc := &clientTestService{do: func(_ context.Context, req *testingv1.DoRequest) error {
		if req.GetId() == "fail" {
			return status.Error(codes.Internal, "application failure")
		}
		return nil
	}}
	client := clientTestServer(t, svc, []grpc.UnaryServerInterceptor{UnaryServerInterceptor(NewMemoryStore())},
		clientInterceptorDial(clientNoWait()))
	noKeys := clientTestServer(t, svc, []grpc.UnaryServerInterceptor{UnaryServerInterceptor(NewMemoryStore())},
		clientInterceptorDial(clientNoWait(), WithClientMethods(func(string) bool { return false })))

	if _, err := client.Do(WithKey(ctx, "reuse-1"), &testingv1.DoRequest{Id: "a", Amount: 1}); err != nil {
		t.Fatalf("first use of the key: %v", err)
	}
	tests := []struct {
		name   string
		call   func(opt grpc.CallOption) error
		code   codes.Code
		reason string
	}{
		{"key reused", func(o grpc.CallOption) error {
			_, err := client.Do(WithKey(ctx, "reuse-1"), &testingv1.DoRequest{Id: "a", Amount: 2}, o)
			return err
		}, codes.FailedPrecondition, ReasonKeyReused},
		{"key invalid", func(o grpc.CallOption) error {
			_, err := client.Do(metadata.AppendToOutgoingContext(ctx, DefaultKeyHeader, "has space"), &testingv1.DoRequest{}, o)
			return err
		}, codes.InvalidArgument, ReasonKeyInvalid},
		{"key required", func(o grpc.CallOption) error {
			_, err := noKeys.Charge(ctx, &testingv1.ChargeRequest{Amount: 1}, o)
			return err
		}, codes.InvalidArgument, ReasonKeyRequired},
		{"application error", func(o grpc.CallOption) error {
			_, err := client.Do(ctx, &testingv1.DoRequest{Id: "fail"}, o)
			return err
		}, codes.Internal, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := svc.execs.Load()
			var info CallInfo
			err := tt.call(CallResult(&info))
			if status.Code(err) != tt.code || ReasonOf(err) != tt.reason {
				t.Errorf("got %v (reason %q), want %v (reason %q)", err, ReasonOf(err), tt.code, tt.reason)
			}
			if info.Attempts != 1 {
				t.Errorf("attempts: got %d, want 1", info.Attempts)
			}
			wantExecs := int64(0)
			if tt.reason == "" {
				wantExecs = 1
			}
			if n := svc.execs.Load() - before; n != wantExecs {
				t.Errorf("handler executions: got %d, want %d", n, wantExecs)
			}
		})
	}
}

// TestClientE2ECancel verifies that canceling a call while the server works
// on it returns Canceled after one attempt, without retrying.
func TestClientE2ECancel(t *testing.T) {
	testCtx := clientTestContext(t)
	started := make(chan struct{})
	svc := &clientTestService{do: func(ctx context.Context, _ *testingv1.DoRequest) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	}}
	client := clientTestServer(t, svc, []grpc.UnaryServerInterceptor{UnaryServerInterceptor(NewMemoryStore())},
		clientInterceptorDial(WithPerAttemptTimeout(time.Hour)))
	ctx, cancel := context.WithCancel(testCtx)
	defer cancel()
	go func() {
		select {
		case <-started:
			cancel()
		case <-testCtx.Done():
		}
	}()
	var info CallInfo
	_, err := client.Do(ctx, &testingv1.DoRequest{Id: "cancel"}, CallResult(&info))
	if status.Code(err) != codes.Canceled || info.Attempts != 1 {
		t.Errorf("got %v after %d attempts, want Canceled after 1", err, info.Attempts)
	}
}

// TestClientE2EKeysDistinctAndValid verifies that every logical call gets its
// own key, valid by the server's rules, and that read-only methods get none.
func TestClientE2EKeysDistinctAndValid(t *testing.T) {
	ctx := clientTestContext(t)
	var (
		mu       sync.Mutex
		readKeys []string
	)
	recordRead := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if info.FullMethod == clientTestRead {
			md, _ := metadata.FromIncomingContext(ctx)
			mu.Lock()
			readKeys = append(readKeys, md.Get(DefaultKeyHeader)...)
			mu.Unlock()
		}
		return handler(ctx, req)
	}
	svc := &clientTestService{}
	client := clientTestServer(t, svc, []grpc.UnaryServerInterceptor{recordRead, UnaryServerInterceptor(NewMemoryStore())},
		clientInterceptorDial())

	const calls = 50
	var wg sync.WaitGroup
	errs := make(chan error, 2*calls)
	for i := range calls {
		wg.Go(func() {
			if _, err := client.Do(ctx, &testingv1.DoRequest{Id: "same request", Amount: 1}); err != nil {
				errs <- fmt.Errorf("Do %d: %w", i, err)
			}
			if _, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 1}); err != nil {
				errs <- fmt.Errorf("Charge %d: %w", i, err)
			}
			if _, err := client.Read(ctx, &testingv1.ReadRequest{Id: "r"}); err != nil {
				errs <- fmt.Errorf("Read %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := svc.execs.Load(); n != 2*calls {
		t.Errorf("handler executions: got %d, want %d (identical requests are distinct calls)", n, 2*calls)
	}
	seen := make(map[string]bool)
	for _, k := range svc.seenKeys() {
		if err := ValidateKey(k); err != nil {
			t.Errorf("key %q: %v", k, err)
		}
		if seen[k] {
			t.Errorf("key %q used by two calls", k)
		}
		seen[k] = true
	}
	if len(seen) != 2*calls {
		t.Errorf("distinct keys: got %d, want %d", len(seen), 2*calls)
	}
	if len(readKeys) != 0 {
		t.Errorf("Read (NO_SIDE_EFFECTS) received keys %q, want none", readKeys)
	}
}

// TestClientE2EServiceConfigRetryKeepsKey verifies that gRPC's built-in
// retries (a service-config retryPolicy), which run below the client
// interceptors, send the interceptor's key on every attempt.
func TestClientE2EServiceConfigRetryKeepsKey(t *testing.T) {
	ctx := clientTestContext(t)
	var (
		mu   sync.Mutex
		seen [][]string
	)
	failTwice := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		mu.Lock()
		seen = append(seen, md.Get(DefaultKeyHeader))
		n := len(seen)
		mu.Unlock()
		if n <= 2 {
			return nil, status.Error(codes.Unavailable, "not yet")
		}
		return handler(ctx, req)
	}
	const serviceConfig = `{"methodConfig": [{
		"name": [{"service": "idempotency.testing.v1.TestService"}],
		"retryPolicy": {
			"maxAttempts": 5,
			"initialBackoff": "0.001s",
			"maxBackoff": "0.01s",
			"backoffMultiplier": 2,
			"retryableStatusCodes": ["UNAVAILABLE"]
		}
	}]}`
	svc := &clientTestService{}
	client := clientTestServer(t, svc, []grpc.UnaryServerInterceptor{failTwice, UnaryServerInterceptor(NewMemoryStore())},
		clientInterceptorDial(WithoutRetries()), grpc.WithDefaultServiceConfig(serviceConfig))

	var info CallInfo
	if _, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 3}, CallResult(&info)); err != nil {
		t.Fatalf("Charge: %v", err)
	}
	if info.Attempts != 1 {
		t.Errorf("interceptor attempts: got %d, want 1 (the retries were gRPC's)", info.Attempts)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 3 {
		t.Fatalf("server attempts: got %d, want 3", len(seen))
	}
	for i, keys := range seen {
		if !slices.Equal(keys, []string{info.Key}) {
			t.Errorf("attempt %d carried keys %q, want [%q]", i+1, keys, info.Key)
		}
	}
	if n := svc.execs.Load(); n != 1 {
		t.Errorf("handler executions: got %d, want 1", n)
	}
}

// TestClientE2ECallerHeaderOption verifies that a caller's own grpc.Header
// option still receives the response header, including the replay marker.
func TestClientE2ECallerHeaderOption(t *testing.T) {
	ctx := clientTestContext(t)
	svc := &clientTestService{}
	client := clientTestServer(t, svc, []grpc.UnaryServerInterceptor{UnaryServerInterceptor(NewMemoryStore())}, clientInterceptorDial())
	kctx := WithKey(ctx, "header-1")
	for i, want := range []bool{false, true} {
		var header metadata.MD
		var info CallInfo
		if _, err := client.Do(kctx, &testingv1.DoRequest{Id: "h"}, grpc.Header(&header), CallResult(&info)); err != nil {
			t.Fatalf("call %d: %v", i+1, err)
		}
		if Replayed(header) != want || info.Replayed != want {
			t.Errorf("call %d: Replayed(header) %v, CallInfo.Replayed %v, want %v", i+1, Replayed(header), info.Replayed, want)
		}
	}
}

// TestClientObserver verifies that the observer gets one event per logical
// call with the number of attempts it needed, and never the key itself.
func TestClientObserver(t *testing.T) {
	var mu sync.Mutex
	var events []ClientEvent
	observe := func(_ context.Context, e ClientEvent) {
		mu.Lock()
		events = append(events, e)
		mu.Unlock()
	}
	fails := 2
	invoker := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, opts ...grpc.CallOption) error {
		if fails > 0 {
			fails--
			return status.Error(codes.Unavailable, "down")
		}
		return nil
	}
	ic := UnaryClientInterceptor(WithClientObserver(observe), WithBackoff(time.Microsecond, time.Microsecond))
	ctx := WithKey(context.Background(), "secret-key")
	if err := ic(ctx, "/idempotency.testing.v1.TestService/Do", nil, nil, nil, invoker); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(events) != 1 {
		t.Fatalf("%d events, want 1 per logical call", len(events))
	}
	e := events[0]
	if e.Attempts != 3 || e.Code != codes.OK || e.KeyHash == "" || len(e.KeyHash) != 12 {
		t.Fatalf("event %+v: want 3 attempts, OK, and a hash instead of the key", e)
	}
}
