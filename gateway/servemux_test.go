package idempotencygw_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"github.com/idempotency-grpc/idempotency"
	idempotencygw "github.com/idempotency-grpc/idempotency/gateway"
	testgw "github.com/idempotency-grpc/idempotency/gateway/internal/gen/idempotency/testing/v1"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
)

// gateway is the whole path a REST client takes: an httptest.Server
// serving a grpc-gateway ServeMux (the generated handlers of the test
// service) that calls, over bufconn, a gRPC server running the
// idempotency interceptor over a store.
type gateway struct {
	svc *testservice.Service
	url string
	hc  *http.Client
}

// setup is what newGateway builds; the zero value is the default wiring on
// a memory store.
type setup struct {
	store  idempotency.Store            // default: a new memory store
	server []idempotency.Option         // the interceptor's options
	gw     []idempotencygw.Option       // the gateway option's options
	mux    []runtime.ServeMuxOption     // more mux options, after ours
	noGW   bool                         // leave out idempotencygw.ServeMuxOption
	svc    func(s *testservice.Service) // hooks to set on the service
}

func newGateway(t *testing.T, s setup) *gateway {
	t.Helper()
	if s.store == nil {
		s.store = idempotency.NewMemoryStore()
	}
	svc := &testservice.Service{}
	if s.svc != nil {
		s.svc(svc)
	}
	lis := testservice.Serve(t, svc, grpc.ChainUnaryInterceptor(idempotency.UnaryServerInterceptor(s.store, s.server...)))
	var muxOpts []runtime.ServeMuxOption
	if !s.noGW {
		muxOpts = append(muxOpts, idempotencygw.ServeMuxOption(s.gw...))
	}
	mux := runtime.NewServeMux(append(muxOpts, s.mux...)...)
	if err := testgw.RegisterTestServiceHandlerClient(t.Context(), mux, testservice.Dial(t, lis)); err != nil {
		t.Fatalf("register the gateway handlers: %v", err)
	}
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return &gateway{svc: svc, url: srv.URL, hc: srv.Client()}
}

// answer is an HTTP response, read whole.
type answer struct {
	status int
	header http.Header
	body   []byte
}

// post sends body to path with one Idempotency-Key header line per key.
func (g *gateway) post(t *testing.T, path, body string, keys ...string) answer {
	t.Helper()
	a, err := g.send(t.Context(), path, body, keys...)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// send is post for a goroutine other than the test's: it returns its error.
func (g *gateway) send(ctx context.Context, path, body string, keys ...string) (answer, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, g.url+path, strings.NewReader(body))
	if err != nil {
		return answer{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	for _, k := range keys {
		req.Header.Add(idempotencygw.KeyHeader, k)
	}
	resp, err := g.hc.Do(req)
	if err != nil {
		return answer{}, fmt.Errorf("POST %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, fmt.Errorf("read the answer to POST %s: %w", path, err)
	}
	return answer{status: resp.StatusCode, header: resp.Header, body: b}, nil
}

func (a answer) replayed() bool { return a.header.Get(idempotencygw.ReplayedHeader) == "true" }

// errorOf decodes the gateway's JSON error body (a google.rpc.Status) into
// the gRPC error it stands for, so that idempotency.ReasonOf reads it as a
// gRPC client would.
func (a answer) errorOf(t *testing.T) error {
	t.Helper()
	var p spb.Status
	if err := protojson.Unmarshal(a.body, &p); err != nil {
		t.Fatalf("the body %s is not a google.rpc.Status: %v", a.body, err)
	}
	return status.FromProto(&p).Err()
}

// wantError checks the status and the ErrorInfo reason of an error answer
// ("" for an error without one).
func (a answer) wantError(t *testing.T, wantStatus int, wantReason string) {
	t.Helper()
	if a.status != wantStatus {
		t.Errorf("status = %d, want %d (body %s)", a.status, wantStatus, a.body)
	}
	if got := idempotency.ReasonOf(a.errorOf(t)); got != wantReason {
		t.Errorf("ErrorInfo reason = %q, want %q (body %s)", got, wantReason, a.body)
	}
}

// errorInfo returns the google.rpc.ErrorInfo of err, or nil.
func errorInfo(t *testing.T, err error) *errdetails.ErrorInfo {
	t.Helper()
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info
		}
	}
	return nil
}

// doResponse decodes a Do answer.
func (a answer) doResponse(t *testing.T) *testingv1.DoResponse {
	t.Helper()
	if a.status != http.StatusOK {
		t.Fatalf("status = %d, want 200 (body %s)", a.status, a.body)
	}
	var r testingv1.DoResponse
	if err := protojson.Unmarshal(a.body, &r); err != nil {
		t.Fatalf("the body %s is not a DoResponse: %v", a.body, err)
	}
	return &r
}

// echoKey makes Do answer with the key the handler got in its id, so tests
// see what reached the server.
func echoKey(s *testservice.Service) {
	s.OnDo = func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		key, _ := idempotency.KeyFromContext(ctx)
		return &testingv1.DoResponse{Id: key, Execution: n}, nil
	}
}

// wantKeyK1Once posts the same request twice with Idempotency-Key "k1"
// (echoKey's service): the handler gets the key k1 and runs once, and the
// second answer is a replay.
func wantKeyK1Once(t *testing.T, g *gateway) {
	t.Helper()
	first := g.post(t, "/v1/do", `{}`, `"k1"`)
	second := g.post(t, "/v1/do", `{}`, `"k1"`)
	if got := first.doResponse(t).GetId(); got != "k1" || !second.replayed() {
		t.Errorf("the handler got key %q, second replayed %v; want k1, true", got, second.replayed())
	}
	wantRuns(t, g, 1)
}

func wantRuns(t *testing.T, g *gateway, want int64) {
	t.Helper()
	if got := g.svc.Runs.Load(); got != want {
		t.Errorf("handler executions = %d, want %d", got, want)
	}
}

func redisStore(t *testing.T) idempotency.Store {
	t.Helper()
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	return idempotency.NewRedisStore(rdb, idempotency.WithRedisLogger(nil))
}

// TestReplay verifies the guarantee end to end, on a memory and a Redis
// store, for a key sent as an RFC 8941 string, with escapes, and bare: the
// same request twice runs the handler once with the unquoted key, and the
// second answer is the first one's bytes, marked Idempotency-Replayed.
func TestReplay(t *testing.T) {
	stores := map[string]func(*testing.T) idempotency.Store{
		"memory": func(*testing.T) idempotency.Store { return idempotency.NewMemoryStore() },
		"redis":  redisStore,
	}
	for storeName, store := range stores {
		for _, tc := range []struct{ name, header, key string }{
			{"sf-string", `"order-42"`, "order-42"},
			{"sf-string with escapes", `"a\"b\\c"`, `a"b\c`},
			{"bare", "order-42", "order-42"},
			{"uuid", "8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"},
		} {
			t.Run(storeName+"/"+tc.name, func(t *testing.T) {
				g := newGateway(t, setup{store: store(t), svc: echoKey})
				first := g.post(t, "/v1/do", `{"amount": 5}`, tc.header)
				second := g.post(t, "/v1/do", `{"amount": 5}`, tc.header)

				if got := first.doResponse(t).GetId(); got != tc.key {
					t.Errorf("the handler got key %q, want %q", got, tc.key)
				}
				second.doResponse(t)
				if !bytes.Equal(first.body, second.body) {
					t.Errorf("the replay's body %s differs from the first %s", second.body, first.body)
				}
				if first.replayed() || first.header.Get(idempotencygw.ReplayedHeader) != "" {
					t.Errorf("the first answer has %s: %q, want none", idempotencygw.ReplayedHeader, first.header.Values(idempotencygw.ReplayedHeader))
				}
				if !second.replayed() {
					t.Errorf("the second answer's %s = %q, want \"true\"", idempotencygw.ReplayedHeader, second.header.Values(idempotencygw.ReplayedHeader))
				}
				if v := second.header.Values("Grpc-Metadata-" + idempotency.ReplayedHeader); len(v) != 0 {
					t.Errorf("the replay also carries grpc-gateway's Grpc-Metadata-%s: %q", idempotency.ReplayedHeader, v)
				}
				wantRuns(t, g, 1)
			})
		}
	}
}

// TestWithoutTheOption is the control: grpc-gateway on its own does not
// forward Idempotency-Key, so the same request twice runs twice. It fails
// if grpc-gateway ever starts forwarding the header itself, which would
// then arrive twice (and be refused) with the option.
func TestWithoutTheOption(t *testing.T) {
	g := newGateway(t, setup{noGW: true})
	for range 2 {
		g.post(t, "/v1/do", `{"amount": 5}`, `"order-42"`).doResponse(t)
	}
	wantRuns(t, g, 2)
}

// TestKeyReused verifies that the same key with another request is 422 with
// reason KEY_REUSED (grpc-gateway alone would say 400), and the handler
// does not run again.
func TestKeyReused(t *testing.T) {
	g := newGateway(t, setup{store: redisStore(t)})
	g.post(t, "/v1/do", `{"amount": 5}`, `"order-42"`).doResponse(t)
	a := g.post(t, "/v1/do", `{"amount": 6}`, `"order-42"`)
	a.wantError(t, http.StatusUnprocessableEntity, idempotency.ReasonKeyReused)
	if got := status.Code(a.errorOf(t)); got != codes.FailedPrecondition {
		t.Errorf("the body's code = %v, want FailedPrecondition: only the HTTP status changes", got)
	}
	wantRuns(t, g, 1)
}

// TestKeyRequired verifies that a method that requires a key (Charge,
// declared in the .proto; Do, by the server's WithRequiredKey) answers 400
// KEY_REQUIRED to a request without one, and runs when it has one.
func TestKeyRequired(t *testing.T) {
	g := newGateway(t, setup{server: []idempotency.Option{idempotency.WithRequiredKey(testservice.MethodDo)}})
	g.post(t, "/v1/charge", `{"amount": 5}`).wantError(t, http.StatusBadRequest, idempotency.ReasonKeyRequired)
	g.post(t, "/v1/do", `{"amount": 5}`).wantError(t, http.StatusBadRequest, idempotency.ReasonKeyRequired)
	wantRuns(t, g, 0)

	if a := g.post(t, "/v1/charge", `{"amount": 5}`, `"c1"`); a.status != http.StatusOK {
		t.Errorf("Charge with a key: status %d, want 200 (body %s)", a.status, a.body)
	}
	wantRuns(t, g, 1)
}

// TestKeyInvalid verifies that a malformed header (refused by the gateway)
// and a key the server refuses both answer 400 KEY_INVALID in the same JSON
// shape, and that the handler does not run.
func TestKeyInvalid(t *testing.T) {
	for _, tc := range []struct {
		name     string
		keys     []string
		byServer bool // refused by the interceptor, not by the gateway
	}{
		{"unterminated string", []string{`"abc`}, false},
		{"bad escape", []string{`"a\qb"`}, false},
		{"parameters", []string{`"abc";p=1`}, false},
		{"a tab in a string", []string{"\"a\tb\""}, false},
		{"non-ASCII, bare", []string{"ké"}, false},
		{"two different keys", []string{`"a"`, `"b"`}, false},
		{"too long", []string{`"` + strings.Repeat("k", 300) + `"`}, true},
		{"a space", []string{`"a b"`}, true},
		{"empty", []string{`""`}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newGateway(t, setup{})
			a := g.post(t, "/v1/do", `{"amount": 5}`, tc.keys...)
			a.wantError(t, http.StatusBadRequest, idempotency.ReasonKeyInvalid)
			if got := status.Code(a.errorOf(t)); got != codes.InvalidArgument {
				t.Errorf("the body's code = %v, want InvalidArgument", got)
			}
			// The interceptor's ErrorInfo names the gRPC method; the
			// gateway's, which never reached it, the HTTP header.
			if info := errorInfo(t, a.errorOf(t)); (info.GetMetadata()["method"] != "") != tc.byServer {
				t.Errorf("ErrorInfo metadata %v: refused by the server: %v, want %v", info.GetMetadata(), !tc.byServer, tc.byServer)
			}
			if ct := a.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q, want application/json", ct)
			}
			wantRuns(t, g, 0)
		})
	}
}

// TestSameKeyTwice verifies that two header lines carrying the same key,
// quoted or not, count as one.
func TestSameKeyTwice(t *testing.T) {
	g := newGateway(t, setup{svc: echoKey})
	if got := g.post(t, "/v1/do", `{}`, `"k1"`, "k1").doResponse(t).GetId(); got != "k1" {
		t.Errorf("the handler got key %q, want k1", got)
	}
}

// TestInProgress verifies that a request arriving while the first with its
// key still runs gets 409 KEY_IN_PROGRESS with Retry-After (the server's
// 1.5 s RetryInfo delay, rounded up), and that once the first has finished
// the same request replays it.
func TestInProgress(t *testing.T) {
	started, release := make(chan struct{}, 1), make(chan struct{})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	g := newGateway(t, setup{
		server: []idempotency.Option{idempotency.WithRetryDelay(1500 * time.Millisecond)},
		svc: func(s *testservice.Service) {
			s.OnDo = func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
				select {
				case started <- struct{}{}:
				default:
				}
				<-release
				return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
			}
		},
	})
	t.Cleanup(unblock) // a failed test must not leave the handler blocked
	type result struct {
		a   answer
		err error
	}
	firstDone := make(chan result, 1)
	go func() {
		a, err := g.send(t.Context(), "/v1/do", `{"id": "slow"}`, `"k-slow"`)
		firstDone <- result{a, err}
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the first request never reached the handler")
	}

	a := g.post(t, "/v1/do", `{"id": "slow"}`, `"k-slow"`)
	a.wantError(t, http.StatusConflict, idempotency.ReasonInProgress)
	if got := a.header.Get("Retry-After"); got != "2" {
		t.Errorf("Retry-After = %q, want \"2\"", got)
	}

	unblock()
	r := <-firstDone
	if r.err != nil {
		t.Fatalf("the first request: %v", r.err)
	}
	first := r.a
	if first.doResponse(t).GetExecution() != 1 || first.replayed() {
		t.Errorf("first answer: %s, replayed %v; want execution 1, not replayed", first.body, first.replayed())
	}
	third := g.post(t, "/v1/do", `{"id": "slow"}`, `"k-slow"`)
	if !bytes.Equal(third.body, first.body) || !third.replayed() {
		t.Errorf("third answer: %s, replayed %v; want the first's %s, replayed", third.body, third.replayed(), first.body)
	}
	wantRuns(t, g, 1)
}

// TestOtherErrors verifies that an error of the handler keeps grpc-gateway's
// status mapping, even FailedPrecondition, the code of KEY_REUSED: the
// status follows the ErrorInfo reason, never the code alone. The stored
// error replays with the same status, marked as a replay.
func TestOtherErrors(t *testing.T) {
	for _, tc := range []struct {
		code   codes.Code
		status int
	}{
		{codes.FailedPrecondition, http.StatusBadRequest},
		{codes.NotFound, http.StatusNotFound},
		{codes.Aborted, http.StatusConflict}, // not stored: runs again
	} {
		t.Run(tc.code.String(), func(t *testing.T) {
			g := newGateway(t, setup{svc: func(s *testservice.Service) {
				s.OnDo = func(context.Context, *testingv1.DoRequest, int64) (*testingv1.DoResponse, error) {
					return nil, status.Error(tc.code, "the handler says no")
				}
			}})
			first := g.post(t, "/v1/do", `{}`, `"k"`)
			second := g.post(t, "/v1/do", `{}`, `"k"`)
			stored := idempotency.DefaultStoredCode(tc.code)
			for i, a := range []answer{first, second} {
				a.wantError(t, tc.status, "")
				if a.header.Get("Retry-After") != "" {
					t.Errorf("answer %d has Retry-After %q", i+1, a.header.Get("Retry-After"))
				}
			}
			if first.replayed() || second.replayed() != stored {
				t.Errorf("replayed: %v, %v; want false, %v", first.replayed(), second.replayed(), stored)
			}
			want := int64(1)
			if !stored {
				want = 2
			}
			wantRuns(t, g, want)
		})
	}
}

// TestErrorHandlerOption verifies that a handler set with WithErrorHandler
// writes the error responses, that the idempotency errors get the draft's
// status when it picks the gateway's usual one, and that another status it
// picks is kept.
func TestErrorHandlerOption(t *testing.T) {
	custom := func(httpStatus func(error) int) runtime.ErrorHandlerFunc {
		return func(_ context.Context, _ *runtime.ServeMux, _ runtime.Marshaler, w http.ResponseWriter, _ *http.Request, err error) {
			w.Header().Set("Content-Type", "text/plain")
			w.WriteHeader(httpStatus(err))
			fmt.Fprintf(w, "custom: %s", idempotency.ReasonOf(err))
		}
	}
	t.Run("the usual status", func(t *testing.T) {
		g := newGateway(t, setup{gw: []idempotencygw.Option{idempotencygw.WithErrorHandler(custom(func(err error) int {
			return runtime.HTTPStatusFromCode(status.Code(err))
		}))}})
		g.post(t, "/v1/do", `{"amount": 1}`, "k").doResponse(t)
		a := g.post(t, "/v1/do", `{"amount": 2}`, "k")
		if a.status != http.StatusUnprocessableEntity || string(a.body) != "custom: KEY_REUSED" {
			t.Errorf("got %d %q, want 422 \"custom: KEY_REUSED\"", a.status, a.body)
		}
	})
	t.Run("a status of its own", func(t *testing.T) {
		g := newGateway(t, setup{gw: []idempotencygw.Option{idempotencygw.WithErrorHandler(custom(func(error) int {
			return http.StatusTeapot
		}))}})
		g.post(t, "/v1/do", `{"amount": 1}`, "k").doResponse(t)
		a := g.post(t, "/v1/do", `{"amount": 2}`, "k")
		if a.status != http.StatusTeapot || string(a.body) != "custom: KEY_REUSED" {
			t.Errorf("got %d %q, want 418 \"custom: KEY_REUSED\"", a.status, a.body)
		}
	})
}

// TestResponseHeaders verifies that the handler's own response headers
// still reach the client, through grpc-gateway's default matcher or the
// one set with WithOutgoingHeaderMatcher, beside Idempotency-Replayed.
func TestResponseHeaders(t *testing.T) {
	withHeader := func(s *testservice.Service) {
		s.OnDo = func(ctx context.Context, _ *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			if err := grpc.SetHeader(ctx, map[string][]string{"x-trace": {"t1"}}); err != nil {
				return nil, err
			}
			return &testingv1.DoResponse{Execution: n}, nil
		}
	}
	for _, tc := range []struct {
		name   string
		opts   []idempotencygw.Option
		header string
	}{
		{"default", nil, "Grpc-Metadata-X-Trace"},
		{"WithOutgoingHeaderMatcher", []idempotencygw.Option{idempotencygw.WithOutgoingHeaderMatcher(func(k string) (string, bool) {
			return "X-Backend-" + k, true
		})}, "X-Backend-X-Trace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newGateway(t, setup{gw: tc.opts, svc: withHeader})
			g.post(t, "/v1/do", `{}`, "k")
			a := g.post(t, "/v1/do", `{}`, "k")
			if got := a.header.Get(tc.header); got != "t1" || !a.replayed() {
				t.Errorf("replay: %s = %q, replayed %v; want \"t1\", true (headers %v)", tc.header, got, a.replayed(), a.header)
			}
		})
	}
}

// TestWithKeyHeader verifies that the key reaches a server that reads
// another metadata key when the gateway is told the same one.
func TestWithKeyHeader(t *testing.T) {
	g := newGateway(t, setup{
		server: []idempotency.Option{idempotency.WithKeyHeader("x-request-key")},
		gw:     []idempotencygw.Option{idempotencygw.WithKeyHeader("X-Request-Key")},
		svc:    echoKey,
	})
	wantKeyK1Once(t, g)
}

// TestRawHeaderNeverForwarded verifies that an incoming header matcher
// that forwards every header as it is does not add the raw header value
// ("k1" with its quotes) to the parsed key: the server gets one value, k1.
func TestRawHeaderNeverForwarded(t *testing.T) {
	g := newGateway(t, setup{
		mux: []runtime.ServeMuxOption{runtime.WithIncomingHeaderMatcher(func(k string) (string, bool) {
			return strings.ToLower(k), true
		})},
		svc: echoKey,
	})
	wantKeyK1Once(t, g)
}

// TestParsedKeyWins verifies that with grpc-gateway's legacy header
// matching, which lets a client set any metadata key, the key the gateway
// parsed from Idempotency-Key replaces a Grpc-Metadata-Idempotency-Key
// value rather than joining it.
func TestParsedKeyWins(t *testing.T) {
	g := newGateway(t, setup{mux: []runtime.ServeMuxOption{runtime.WithLegacyHeaderMatching()}, svc: echoKey})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, g.url+"/v1/do", strings.NewReader(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set(idempotencygw.KeyHeader, `"parsed"`)
	req.Header.Set("Grpc-Metadata-Idempotency-Key", "smuggled")
	resp, err := g.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var r testingv1.DoResponse
	if resp.StatusCode != http.StatusOK || protojson.Unmarshal(b, &r) != nil || r.GetId() != "parsed" {
		t.Errorf("got %d %s, want 200 with the key \"parsed\"", resp.StatusCode, b)
	}
}

// TestReadIsNotIntercepted verifies that a GET to a NO_SIDE_EFFECTS method
// passes with a key, and runs every time.
func TestReadIsNotIntercepted(t *testing.T) {
	g := newGateway(t, setup{})
	for range 2 {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, g.url+"/v1/read/r1", nil)
		req.Header.Set(idempotencygw.KeyHeader, `"k"`)
		resp, err := g.hc.Do(req)
		if err != nil {
			cancel()
			t.Fatal(err)
		}
		var body map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		cancel()
		if resp.StatusCode != http.StatusOK || body["id"] != "r1" || resp.Header.Get(idempotencygw.ReplayedHeader) != "" {
			t.Errorf("got %d %v replayed %q, want 200 {id: r1}, not replayed", resp.StatusCode, body, resp.Header.Get(idempotencygw.ReplayedHeader))
		}
	}
	if got := g.svc.Reads.Load(); got != 2 {
		t.Errorf("reads = %d, want 2", got)
	}
}

// TestOptionsPanic verifies that each option refuses a value it cannot
// honour when it is built, naming itself, and that a nil Option is skipped.
func TestOptionsPanic(t *testing.T) {
	for name, build := range map[string]func(){
		`WithKeyHeader("")`:              func() { idempotencygw.WithKeyHeader("") },
		`WithKeyHeader("a key")`:         func() { idempotencygw.WithKeyHeader("a key") },
		`WithKeyHeader("grpc-key")`:      func() { idempotencygw.WithKeyHeader("grpc-key") },
		`WithKeyHeader("key-bin")`:       func() { idempotencygw.WithKeyHeader("key-bin") },
		`WithErrorHandler(nil)`:          func() { idempotencygw.WithErrorHandler(nil) },
		`WithOutgoingHeaderMatcher(nil)`: func() { idempotencygw.WithOutgoingHeaderMatcher(nil) },
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				r := recover()
				if msg, _ := r.(string); !strings.HasPrefix(msg, "idempotencygw: "+name[:strings.Index(name, "(")]) {
					t.Errorf("panic %v, want one naming the option", r)
				}
			}()
			build()
		})
	}
	runtime.NewServeMux(idempotencygw.ServeMuxOption(nil, idempotencygw.WithKeyHeader("Idempotency-Key")))
}
