package idempotencyconnect_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
	idempotencyconnect "github.com/idempotency-grpc/idempotency/connect"
	"github.com/idempotency-grpc/idempotency/connect/internal/gen/idempotency/testing/v1/testingv1connect"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc/codes"
)

// loss is what the front door does with one request.
type loss int

const (
	deliver   loss = iota
	lose503        // runs the handler (its outcome is stored), answers 503
	loseReset      // runs the handler, then resets (h1: closes the connection; h2: RST_STREAM)
	refuse503      // answers 503 without running the handler
)

// frontDoor sits in front of the connect-go handler, as a proxy or a load
// balancer would. It records the key header of every request and can lose
// an answer after the handler ran and its outcome was stored, so that the
// client sees a transient failure for a call that took effect.
type frontDoor struct {
	next  http.Handler
	lose  func(n int) loss // n counts requests from 1; nil delivers all
	after func(n int)      // called once request n has been served

	mu    sync.Mutex
	keys  [][]string // the Idempotency-Key values of each request
	times []time.Time
}

func (f *frontDoor) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.keys = append(f.keys, r.Header.Values("Idempotency-Key"))
	f.times = append(f.times, time.Now())
	n := len(f.keys)
	f.mu.Unlock()
	if f.after != nil {
		defer f.after(n)
	}
	mode := deliver
	if f.lose != nil {
		mode = f.lose(n)
	}
	switch mode {
	case lose503:
		f.next.ServeHTTP(httptest.NewRecorder(), r)
		w.WriteHeader(http.StatusServiceUnavailable)
	case loseReset:
		f.next.ServeHTTP(httptest.NewRecorder(), r)
		panic(http.ErrAbortHandler) // net/http resets without logging
	case refuse503:
		w.WriteHeader(http.StatusServiceUnavailable)
	default:
		f.next.ServeHTTP(w, r)
	}
}

func (f *frontDoor) requests() ([][]string, []time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.keys), slices.Clone(f.times)
}

// loseFirst loses the first answer as mode says and delivers the others.
func loseFirst(mode loss) func(int) loss {
	return func(n int) loss {
		if n == 1 {
			return mode
		}
		return deliver
	}
}

// keyService is the test service with a Do that records the key each
// execution saw and can be held.
func keyService(keys *[]string, mu *sync.Mutex, hold func(n int64)) *service {
	return &service{onDo: func(ctx context.Context, req *connect.Request[testingv1.DoRequest], n int64) (*connect.Response[testingv1.DoResponse], error) {
		k, _ := idempotency.KeyFromContext(ctx)
		mu.Lock()
		*keys = append(*keys, k)
		mu.Unlock()
		if hold != nil {
			hold(n)
		}
		return connect.NewResponse(&testingv1.DoResponse{Id: req.Msg.GetId(), Execution: n}), nil
	}}
}

// serveFront serves svc behind the server interceptor on p, behind front,
// on a real h1 + h2c listener, and returns the URL.
func serveFront(t *testing.T, svc testingv1connect.TestServiceHandler, p *idempotency.Protocol, front *frontDoor) string {
	t.Helper()
	path, h := testingv1connect.NewTestServiceHandler(svc, connect.WithInterceptors(idempotencyconnect.NewInterceptor(p)))
	front.next = h
	mux := http.NewServeMux()
	mux.Handle(path, front)
	return testservice.ServeHTTP(t, mux).URL
}

// idemClient is a client of kind k with the client interceptor built from
// opts.
func (k clientKind) idemClient(t *testing.T, url string, opts ...idempotencyconnect.ClientOption) testingv1connect.TestServiceClient {
	copts := []connect.ClientOption{connect.WithInterceptors(idempotencyconnect.NewClientInterceptor(opts...))}
	if k.protocol != nil {
		copts = append(copts, k.protocol)
	}
	return testingv1connect.NewTestServiceClient(testservice.HTTPClient(t, k.h2c), url, copts...)
}

// wireKey is key as the client interceptor sends it on kind k: the IETF
// draft's sf-string on the Connect protocol, as it is on gRPC and gRPC-Web.
func (k clientKind) wireKey(key string) string {
	if !k.connectProtocol() {
		return key
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(key) + `"`
}

func clientCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestClientDroppedAnswer is the proof of the client interceptor: over
// every protocol and HTTP version, against a real server whose first
// answer is lost after the handler ran and stored its outcome (a 503 from
// the front door, or a reset connection or stream), a call made with no
// key of its own charges once, and the client gets the first execution's
// answer, marked as a replay. Every attempt carries the same generated
// key, the one the handler saw. connect-go reports an HTTP/2 reset as
// Internal, which is retried only when WithRetryCodes lists it: without
// it, the call fails after one attempt (still one charge).
func TestClientDroppedAnswer(t *testing.T) {
	for _, k := range clientKinds {
		t.Run(k.name, func(t *testing.T) {
			for _, tc := range []struct {
				name  string
				mode  loss
				extra []connect.Code
			}{
				{name: "503", mode: lose503},
				{name: "reset", mode: loseReset},
				{name: "reset+Internal", mode: loseReset, extra: []connect.Code{connect.CodeInternal}},
			} {
				t.Run(tc.name, func(t *testing.T) {
					for _, st := range stores(t) {
						t.Run(st.name, func(t *testing.T) {
							var (
								mu       sync.Mutex
								seenKeys []string
								events   []idempotency.ClientEvent
							)
							svc := keyService(&seenKeys, &mu, nil)
							front := &frontDoor{lose: loseFirst(tc.mode)}
							url := serveFront(t, svc, idempotency.NewProtocol(st.store), front)
							c := k.idemClient(t, url, idempotencyconnect.WithBackoff(0, 0),
								idempotencyconnect.WithRetryCodes(tc.extra...),
								idempotencyconnect.WithClientObserver(func(_ context.Context, e idempotency.ClientEvent) {
									mu.Lock()
									events = append(events, e)
									mu.Unlock()
								}))

							var info idempotency.CallInfo
							resp, err := c.Do(idempotencyconnect.WithCallResult(clientCtx(t), &info),
								connect.NewRequest(&testingv1.DoRequest{Id: "pay-1", Amount: 1299}))
							if n := svc.runs.Load(); n != 1 {
								t.Fatalf("handler ran %d times, want 1 (one charge)", n)
							}
							if tc.mode == loseReset && k.h2c && len(tc.extra) == 0 {
								// The HTTP/2 reset is Internal: not retried.
								if connect.CodeOf(err) != connect.CodeInternal || info.Attempts != 1 {
									t.Fatalf("h2 reset without WithRetryCodes(Internal): %v after %d attempts, want Internal after 1", err, info.Attempts)
								}
								return
							}
							if err != nil {
								t.Fatalf("call: %v (after %d attempts)", err, info.Attempts)
							}
							if resp.Msg.GetExecution() != 1 || resp.Msg.GetId() != "pay-1" {
								t.Errorf("response %v, want the first execution's", resp.Msg)
							}
							if !idempotencyconnect.Replayed(resp.Header()) || !info.Replayed || info.Attempts != 2 {
								t.Errorf("Replayed(header) %v, CallInfo %+v; want a replay after 2 attempts",
									idempotencyconnect.Replayed(resp.Header()), info)
							}
							if err := idempotency.ValidateKey(info.Key); err != nil {
								t.Fatalf("generated key %q: %v", info.Key, err)
							}
							sent, _ := front.requests()
							want := []string{k.wireKey(info.Key)}
							if len(sent) != 2 || !slices.Equal(sent[0], want) || !slices.Equal(sent[1], want) {
								t.Errorf("keys sent %q, want %q on each of 2 attempts", sent, want)
							}
							mu.Lock()
							defer mu.Unlock()
							if !slices.Equal(seenKeys, []string{info.Key}) {
								t.Errorf("the handler saw keys %q, CallInfo says %q", seenKeys, info.Key)
							}
							if len(events) != 1 || events[0].Method != testingv1connect.TestServiceDoProcedure ||
								events[0].Attempts != 2 || !events[0].Replayed || events[0].Code != codes.OK || events[0].KeyHash == "" {
								t.Errorf("observer events %+v, want one for %s: 2 attempts, replayed, OK, a key hash", events, testingv1connect.TestServiceDoProcedure)
							}
						})
					}
				})
			}
		})
	}
}

// TestClientDeadline checks that retries stop at the caller's deadline:
// a server that answers 503 to everything gets retried until the next
// wait would end past the deadline, and the call returns about then; an
// in-progress answer whose RetryInfo delay ends past the deadline is
// returned at once, after one attempt, instead of waiting.
func TestClientDeadline(t *testing.T) {
	t.Parallel()
	t.Run("backoff", func(t *testing.T) {
		for _, k := range clientKinds {
			t.Run(k.name, func(t *testing.T) {
				front := &frontDoor{lose: func(int) loss { return refuse503 }}
				url := serveFront(t, &service{}, idempotency.NewProtocol(idempotency.NewMemoryStore()), front)
				c := k.idemClient(t, url, idempotencyconnect.WithMaxAttempts(1000),
					idempotencyconnect.WithBackoff(20*time.Millisecond, 100*time.Millisecond))
				const budget = 300 * time.Millisecond
				ctx, cancel := context.WithTimeout(clientCtx(t), budget)
				defer cancel()
				var info idempotency.CallInfo
				start := time.Now()
				_, err := c.Do(idempotencyconnect.WithCallResult(ctx, &info), connect.NewRequest(&testingv1.DoRequest{}))
				took := time.Since(start)
				if code := connect.CodeOf(err); code != connect.CodeUnavailable && code != connect.CodeDeadlineExceeded {
					t.Errorf("got %v, want the last attempt's Unavailable, or DeadlineExceeded", err)
				}
				// Generous for a busy machine; a wait past the deadline
				// would show as a RETRY_INTERRUPTED error too.
				if took > budget+2*time.Second {
					t.Errorf("returned after %v, deadline %v", took, budget)
				}
				sent, _ := front.requests()
				// The last attempt may be cut by the deadline before its
				// request reaches the server.
				if info.Attempts < 2 || len(sent) > info.Attempts || len(sent) < info.Attempts-1 {
					t.Errorf("%d attempts, %d requests: want at least 2 attempts, each sent but perhaps the last", info.Attempts, len(sent))
				}
				for i, s := range sent {
					if !slices.Equal(s, sent[0]) || len(s) != 1 {
						t.Fatalf("attempt %d sent key %q, attempt 1 %q: want one, the same", i+1, s, sent[0])
					}
				}
			})
		}
	})
	t.Run("RetryInfo past the deadline", func(t *testing.T) {
		entered, release := make(chan struct{}), make(chan struct{})
		var once sync.Once
		var mu sync.Mutex
		var keys []string
		svc := keyService(&keys, &mu, func(int64) { once.Do(func() { close(entered) }); <-release })
		front := &frontDoor{}
		url := serveFront(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore(), idempotency.WithRetryDelay(time.Hour)), front)
		first := make(chan error, 1)
		c := clientKinds[0].idemClient(t, url)
		kctx := idempotency.WithKey(clientCtx(t), "slow-job")
		go func() {
			_, err := c.Do(kctx, connect.NewRequest(&testingv1.DoRequest{}))
			first <- err
		}()
		<-entered
		for _, k := range clientKinds {
			ctx, cancel := context.WithTimeout(kctx, 20*time.Second)
			var info idempotency.CallInfo
			_, err := k.idemClient(t, url).Do(idempotencyconnect.WithCallResult(ctx, &info), connect.NewRequest(&testingv1.DoRequest{}))
			cancel()
			if connect.CodeOf(err) != connect.CodeAborted || idempotencyconnect.ReasonOf(err) != idempotency.ReasonInProgress || info.Attempts != 1 {
				t.Errorf("%s: %v after %d attempts, want Aborted %s after 1 (a 1h RetryInfo ends past the 20s deadline)",
					k.name, err, info.Attempts, idempotency.ReasonInProgress)
			}
		}
		close(release)
		if err := <-first; err != nil {
			t.Fatal(err)
		}
		if n := svc.runs.Load(); n != 1 {
			t.Errorf("handler ran %d times, want 1", n)
		}
	})
}

// TestClientInProgress checks that a retry meeting a first call that still
// runs waits at least the server's RetryInfo delay, then gets the first
// call's answer as a replay: the handler runs once.
func TestClientInProgress(t *testing.T) {
	t.Parallel()
	for _, k := range clientKinds {
		t.Run(k.name, func(t *testing.T) {
			entered, release := make(chan struct{}), make(chan struct{})
			var mu sync.Mutex
			var keys []string
			svc := keyService(&keys, &mu, func(n int64) {
				if n == 1 {
					close(entered)
					<-release
				}
			})
			// Request 1 is the first call; request 2 the second call's first
			// attempt, answered KEY_IN_PROGRESS: then the first call ends.
			front := &frontDoor{after: func(n int) {
				if n == 2 {
					close(release)
				}
			}}
			const delay = 300 * time.Millisecond
			url := serveFront(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore(), idempotency.WithRetryDelay(delay)), front)
			kctx := idempotency.WithKey(clientCtx(t), "order-77")
			first := make(chan error, 1)
			go func() {
				_, err := k.idemClient(t, url).Do(kctx, connect.NewRequest(&testingv1.DoRequest{Id: "o"}))
				first <- err
			}()
			<-entered
			var info idempotency.CallInfo
			resp, err := k.idemClient(t, url, idempotencyconnect.WithBackoff(0, 0)).Do(
				idempotencyconnect.WithCallResult(kctx, &info), connect.NewRequest(&testingv1.DoRequest{Id: "o"}))
			if err != nil {
				t.Fatalf("second call: %v", err)
			}
			if ferr := <-first; ferr != nil {
				t.Fatalf("first call: %v", ferr)
			}
			if !idempotencyconnect.Replayed(resp.Header()) || resp.Msg.GetExecution() != 1 || info.Attempts < 2 || info.Key != "order-77" {
				t.Errorf("second call: %v, replayed %v, %+v; want the replay of execution 1 after 2+ attempts with key order-77",
					resp.Msg, idempotencyconnect.Replayed(resp.Header()), info)
			}
			if n := svc.runs.Load(); n != 1 {
				t.Errorf("handler ran %d times, want 1", n)
			}
			_, times := front.requests()
			if len(times) < 3 {
				t.Fatalf("%d requests, want 3 or more", len(times))
			}
			if gap := times[2].Sub(times[1]); gap < delay {
				t.Errorf("the retry came %v after the KEY_IN_PROGRESS answer, want at least the RetryInfo delay %v", gap, delay)
			}
		})
	}
}

// TestClientNotRetried checks that answers other than the transient ones
// are returned after one attempt: a handler's own error (stored or not),
// the server's verdict on the key (KEY_REUSED), and anything for a
// procedure the interceptor does not cover (Read, NO_SIDE_EFFECTS), which
// also gets no key.
func TestClientNotRetried(t *testing.T) {
	for _, k := range clientKinds {
		t.Run(k.name, func(t *testing.T) {
			svc := &service{onDo: func(ctx context.Context, req *connect.Request[testingv1.DoRequest], n int64) (*connect.Response[testingv1.DoResponse], error) {
				switch req.Msg.GetId() {
				case "precondition":
					return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("insufficient funds"))
				case "internal":
					return nil, connect.NewError(connect.CodeInternal, errors.New("bug"))
				}
				return connect.NewResponse(&testingv1.DoResponse{Execution: n}), nil
			}}
			front := &frontDoor{}
			url := serveFront(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore()), front)
			c := k.idemClient(t, url, idempotencyconnect.WithBackoff(0, 0))
			ctx := clientCtx(t)
			call := func(ctx context.Context, id string) (idempotency.CallInfo, error) {
				var info idempotency.CallInfo
				_, err := c.Do(idempotencyconnect.WithCallResult(ctx, &info), connect.NewRequest(&testingv1.DoRequest{Id: id}))
				return info, err
			}
			for _, tc := range []struct {
				id   string
				code connect.Code
			}{{"precondition", connect.CodeFailedPrecondition}, {"internal", connect.CodeInternal}} {
				before := svc.runs.Load()
				info, err := call(ctx, tc.id)
				if connect.CodeOf(err) != tc.code || info.Attempts != 1 || svc.runs.Load() != before+1 {
					t.Errorf("%s: %v after %d attempts, %d runs; want %v after 1 attempt, 1 run", tc.id, err, info.Attempts, svc.runs.Load()-before, tc.code)
				}
			}
			kctx := idempotency.WithKey(ctx, "reused")
			if _, err := call(kctx, "a"); err != nil {
				t.Fatal(err)
			}
			before := svc.runs.Load()
			info, err := call(kctx, "b")
			if connect.CodeOf(err) != connect.CodeFailedPrecondition || idempotencyconnect.ReasonOf(err) != idempotency.ReasonKeyReused || info.Attempts != 1 {
				t.Errorf("another request under the key: %v after %d attempts, want FailedPrecondition KEY_REUSED after 1", err, info.Attempts)
			}
			if svc.runs.Load() != before {
				t.Errorf("KEY_REUSED ran the handler")
			}

			front.lose = func(int) loss { return refuse503 }
			sentBefore, _ := front.requests()
			var rinfo idempotency.CallInfo
			_, err = c.Read(idempotencyconnect.WithCallResult(ctx, &rinfo), connect.NewRequest(&testingv1.ReadRequest{Id: "r"}))
			sent, _ := front.requests()
			if connect.CodeOf(err) != connect.CodeUnavailable || rinfo.Attempts != 1 || len(sent) != len(sentBefore)+1 {
				t.Errorf("Read (not covered) against 503: %v after %d attempts (%d requests), want Unavailable after 1",
					err, rinfo.Attempts, len(sent)-len(sentBefore))
			}
			if last := sent[len(sent)-1]; len(last) != 0 || rinfo.Key != "" {
				t.Errorf("Read (not covered) sent key %q (CallInfo %q), want none", last, rinfo.Key)
			}
		})
	}
}

// TestClientKeyChoice checks where the key comes from: the request's own
// header wins and is sent as it is; a key from idempotency.WithKey is sent
// in each protocol's form and means the same key on all of them (a key
// in quotes with a backslash, first sent over one protocol, replays over
// the others); an invalid WithKey key or a failing generator fails the call
// before anything is sent; WithClientKeyHeader names the header.
func TestClientKeyChoice(t *testing.T) {
	t.Run("own header", func(t *testing.T) {
		for _, k := range clientKinds {
			var mu sync.Mutex
			var keys []string
			front := &frontDoor{}
			url := serveFront(t, keyService(&keys, &mu, nil), idempotency.NewProtocol(idempotency.NewMemoryStore()), front)
			raw := "mine-1"
			if k.connectProtocol() {
				raw = `"mine-1"`
			}
			req := connect.NewRequest(&testingv1.DoRequest{})
			req.Header().Set("Idempotency-Key", raw)
			var info idempotency.CallInfo
			if _, err := k.idemClient(t, url).Do(idempotencyconnect.WithCallResult(clientCtx(t), &info), req); err != nil {
				t.Fatalf("%s: %v", k.name, err)
			}
			sent, _ := front.requests()
			if !slices.Equal(sent[0], []string{raw}) || info.Key != "mine-1" || !slices.Equal(keys, []string{"mine-1"}) {
				t.Errorf("%s: sent %q, CallInfo key %q, handler saw %q; want %q as it is, key mine-1", k.name, sent[0], info.Key, keys, raw)
			}
		}
	})
	t.Run("WithKey across protocols", func(t *testing.T) {
		var mu sync.Mutex
		var keys []string
		svc := keyService(&keys, &mu, nil)
		front := &frontDoor{}
		url := serveFront(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore()), front)
		const key = `"order\9"` // read as an sf-string if sent bare on the Connect protocol
		ctx := idempotency.WithKey(clientCtx(t), key)
		for i, k := range clientKinds {
			var info idempotency.CallInfo
			resp, err := k.idemClient(t, url).Do(idempotencyconnect.WithCallResult(ctx, &info), connect.NewRequest(&testingv1.DoRequest{Id: "q"}))
			if err != nil {
				t.Fatalf("%s: %v", k.name, err)
			}
			if got := idempotencyconnect.Replayed(resp.Header()); got != (i > 0) || info.Key != key {
				t.Errorf("%s: replayed %v, key %q; want replayed %v, key %q", k.name, got, info.Key, i > 0, key)
			}
			sent, _ := front.requests()
			if want := []string{k.wireKey(key)}; !slices.Equal(sent[i], want) {
				t.Errorf("%s: sent %q, want %q", k.name, sent[i], want)
			}
		}
		if !slices.Equal(keys, []string{key}) {
			t.Errorf("the handler ran with keys %q, want once with %q", keys, key)
		}
	})
	t.Run("refused before sending", func(t *testing.T) {
		front := &frontDoor{}
		url := serveFront(t, &service{}, idempotency.NewProtocol(idempotency.NewMemoryStore()), front)
		ctx := clientCtx(t)
		for _, k := range clientKinds {
			_, err := k.idemClient(t, url).Do(idempotency.WithKey(ctx, "has space"), connect.NewRequest(&testingv1.DoRequest{}))
			var ce *connect.Error
			if !errors.As(err, &ce) || ce.Code() != connect.CodeInvalidArgument || idempotencyconnect.ReasonOf(err) != idempotency.ReasonKeyInvalid {
				t.Errorf("%s, invalid WithKey: %v, want a *connect.Error InvalidArgument %s", k.name, err, idempotency.ReasonKeyInvalid)
			}
			_, err = k.idemClient(t, url, idempotencyconnect.WithKeyGenerator(func() (string, error) { return "", errors.New("no entropy") })).
				Do(ctx, connect.NewRequest(&testingv1.DoRequest{}))
			if connect.CodeOf(err) != connect.CodeInternal || idempotencyconnect.ReasonOf(err) != idempotency.ReasonKeyGenerationFailed {
				t.Errorf("%s, failing generator: %v, want Internal %s", k.name, err, idempotency.ReasonKeyGenerationFailed)
			}
		}
		if sent, _ := front.requests(); len(sent) != 0 {
			t.Errorf("%d requests reached the server, want 0", len(sent))
		}
	})
	t.Run("WithClientKeyHeader", func(t *testing.T) {
		var mu sync.Mutex
		var keys []string
		svc := keyService(&keys, &mu, nil)
		front := &frontDoor{lose: loseFirst(lose503)}
		url := serveFront(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore(), idempotency.WithKeyHeader("x-request-key")), front)
		var info idempotency.CallInfo
		resp, err := clientKinds[2].idemClient(t, url, idempotencyconnect.WithClientKeyHeader("X-Request-Key"), idempotencyconnect.WithBackoff(0, 0)).
			Do(idempotencyconnect.WithCallResult(clientCtx(t), &info), connect.NewRequest(&testingv1.DoRequest{}))
		if err != nil || !idempotencyconnect.Replayed(resp.Header()) || svc.runs.Load() != 1 || !slices.Equal(keys, []string{info.Key}) {
			t.Errorf("under X-Request-Key: %v, %d runs, keys %q, CallInfo %+v; want a replay, 1 run with the key", err, svc.runs.Load(), keys, info)
		}
		if sent, _ := front.requests(); len(sent[0]) != 0 {
			t.Errorf("the key also went under Idempotency-Key: %q", sent[0])
		}
	})
}

// TestClientStreamingUntouched checks that a streaming call passes through
// the client interceptor untouched: no key is added and a transient
// failure is not retried (the server side covers unary calls only).
func TestClientStreamingUntouched(t *testing.T) {
	const procedure = "/idempotency.testing.v1.TestService/Watch"
	var runs atomic.Int64
	stream := connect.NewServerStreamHandler(procedure, func(ctx context.Context, req *connect.Request[testingv1.DoRequest], s *connect.ServerStream[testingv1.DoResponse]) error {
		n := runs.Add(1)
		return s.Send(&testingv1.DoResponse{Execution: n})
	})
	front := &frontDoor{next: stream, lose: func(n int) loss {
		if n == 1 {
			return lose503
		}
		return deliver
	}}
	mux := http.NewServeMux()
	mux.Handle(procedure, front)
	url := testservice.ServeHTTP(t, mux).URL
	for i, k := range clientKinds {
		opts := []connect.ClientOption{connect.WithInterceptors(idempotencyconnect.NewClientInterceptor(idempotencyconnect.WithBackoff(0, 0)))}
		if k.protocol != nil {
			opts = append(opts, k.protocol)
		}
		c := connect.NewClient[testingv1.DoRequest, testingv1.DoResponse](testservice.HTTPClient(t, k.h2c), url+procedure, opts...)
		s, err := c.CallServerStream(clientCtx(t), connect.NewRequest(&testingv1.DoRequest{}))
		received := 0
		if err == nil {
			for s.Receive() {
				received++
			}
			err = s.Err()
			_ = s.Close()
		}
		if i == 0 {
			if connect.CodeOf(err) != connect.CodeUnavailable || received != 0 {
				t.Errorf("%s, first answer lost: %v, %d messages; want Unavailable, not retried", k.name, err, received)
			}
		} else if err != nil || received != 1 {
			t.Errorf("%s: %v, %d messages; want 1", k.name, err, received)
		}
	}
	sent, _ := front.requests()
	if len(sent) != len(clientKinds) || runs.Load() != int64(len(clientKinds)) {
		t.Errorf("%d requests, %d runs for %d calls: want one each", len(sent), runs.Load(), len(clientKinds))
	}
	for i, s := range sent {
		if len(s) != 0 {
			t.Errorf("stream %d sent key %q, want none", i+1, s)
		}
	}
}

// TestClientOptionsRefuse checks that every option refuses nonsense when
// it is built, with a panic naming the option.
func TestClientOptionsRefuse(t *testing.T) {
	for name, build := range map[string]func(){
		"WithMaxAttempts":           func() { idempotencyconnect.WithMaxAttempts(0) },
		"WithBackoff":               func() { idempotencyconnect.WithBackoff(-time.Millisecond, time.Second) },
		"WithBackoff ":              func() { idempotencyconnect.WithBackoff(time.Second, time.Millisecond) },
		"WithPerAttemptTimeout":     func() { idempotencyconnect.WithPerAttemptTimeout(-time.Second) },
		"WithRetryCodes":            func() { idempotencyconnect.WithRetryCodes(0) },
		"WithRetryCodes ":           func() { idempotencyconnect.WithRetryCodes(connect.Code(99)) },
		"WithClientMethods":         func() { idempotencyconnect.WithClientMethods(nil) },
		"WithKeyGenerator":          func() { idempotencyconnect.WithKeyGenerator(nil) },
		"WithClientKeyHeader":       func() { idempotencyconnect.WithClientKeyHeader("") },
		"WithClientKeyHeader ":      func() { idempotencyconnect.WithClientKeyHeader("grpc-key") },
		"WithClientKeyHeader  ":     func() { idempotencyconnect.WithClientKeyHeader("key-bin") },
		"WithClientKeyHeader   ":    func() { idempotencyconnect.WithClientKeyHeader("has space") },
		"WithClientKeyHeader    ":   func() { idempotencyconnect.WithClientKeyHeader("Idempotency-Key:") },
		"WithClientKeyHeader     ":  func() { idempotencyconnect.WithClientKeyHeader("k\n") },
		"WithClientKeyHeader      ": func() { idempotencyconnect.WithClientKeyHeader("é") },
	} {
		func() {
			defer func() {
				r := recover()
				if msg, _ := r.(string); !strings.Contains(msg, strings.TrimSpace(name)+"(") {
					t.Errorf("%s: recovered %v, want a panic naming the option", name, r)
				}
			}()
			build()
		}()
	}
	// The valid extremes are accepted.
	idempotencyconnect.NewClientInterceptor(idempotencyconnect.WithMaxAttempts(1), idempotencyconnect.WithBackoff(0, 0),
		idempotencyconnect.WithPerAttemptTimeout(0), idempotencyconnect.WithRetryCodes(connect.CodeUnauthenticated, connect.CodeCanceled),
		idempotencyconnect.WithClientKeyHeader("X-Key"), idempotencyconnect.WithClientObserver(nil), nil)
}

// TestClientPerAttemptTimeout checks WithPerAttemptTimeout against a real
// server: the first attempt's handler outlives the attempt's deadline (it
// ignores its context, as a handler stuck on a slow downstream may), so
// the client cuts the attempt and retries with the same key; the retries
// get KEY_IN_PROGRESS while the handler runs, then its stored answer as a
// replay. The handler runs once.
func TestClientPerAttemptTimeout(t *testing.T) {
	t.Parallel()
	for _, k := range clientKinds {
		t.Run(k.name, func(t *testing.T) {
			release := make(chan struct{})
			var mu sync.Mutex
			var keys []string
			svc := keyService(&keys, &mu, func(n int64) {
				if n == 1 {
					<-release
				}
			})
			// Request 2 is the first retry, answered KEY_IN_PROGRESS: then
			// the first execution ends.
			front := &frontDoor{after: func(n int) {
				if n == 2 {
					close(release)
				}
			}}
			url := serveFront(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore(), idempotency.WithRetryDelay(20*time.Millisecond)), front)
			c := k.idemClient(t, url, idempotencyconnect.WithPerAttemptTimeout(200*time.Millisecond),
				idempotencyconnect.WithMaxAttempts(20), idempotencyconnect.WithBackoff(0, 0))
			var info idempotency.CallInfo
			resp, err := c.Do(idempotencyconnect.WithCallResult(clientCtx(t), &info), connect.NewRequest(&testingv1.DoRequest{Id: "slow"}))
			if err != nil {
				t.Fatalf("call: %v after %d attempts", err, info.Attempts)
			}
			if !idempotencyconnect.Replayed(resp.Header()) || resp.Msg.GetExecution() != 1 || info.Attempts < 3 {
				t.Errorf("got %v, replayed %v, after %d attempts; want the replay of execution 1 after 3 or more",
					resp.Msg, idempotencyconnect.Replayed(resp.Header()), info.Attempts)
			}
			if n := svc.runs.Load(); n != 1 {
				t.Errorf("handler ran %d times, want 1", n)
			}
			sent, _ := front.requests()
			for i, s := range sent {
				if !slices.Equal(s, []string{k.wireKey(info.Key)}) {
					t.Errorf("attempt %d sent %q, want %q", i+1, s, k.wireKey(info.Key))
				}
			}
		})
	}
}

// TestClientRequestReused checks that the generated key belongs to the
// logical call, not to the request value: the same *connect.Request sent
// twice is two calls with two keys (two executions), and its header is
// left as the caller made it.
func TestClientRequestReused(t *testing.T) {
	for _, k := range clientKinds {
		t.Run(k.name, func(t *testing.T) {
			var mu sync.Mutex
			var keys []string
			svc := keyService(&keys, &mu, nil)
			url := serveFront(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore()), &frontDoor{})
			c := k.idemClient(t, url)
			req := connect.NewRequest(&testingv1.DoRequest{Id: "same"})
			for i := range 2 {
				resp, err := c.Do(clientCtx(t), req)
				if err != nil || idempotencyconnect.Replayed(resp.Header()) {
					t.Fatalf("call %d: %v (replayed %v), want a fresh answer", i+1, err, err == nil && idempotencyconnect.Replayed(resp.Header()))
				}
				if v := req.Header().Values("Idempotency-Key"); len(v) != 0 {
					t.Fatalf("after call %d the request's header holds key %q, want it left as it was", i+1, v)
				}
			}
			if len(keys) != 2 || keys[0] == keys[1] || svc.runs.Load() != 2 {
				t.Errorf("two calls ran with keys %q (%d runs), want two different keys, 2 runs", keys, svc.runs.Load())
			}
		})
	}
}
