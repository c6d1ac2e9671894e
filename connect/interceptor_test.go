package idempotencyconnect_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/alicebob/miniredis/v2"
	"github.com/idempotency-grpc/idempotency"
	idempotencyconnect "github.com/idempotency-grpc/idempotency/connect"
	"github.com/idempotency-grpc/idempotency/connect/internal/gen/idempotency/testing/v1/testingv1connect"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

// service is the test service as a connect-go handler: it counts
// executions, as "exactly once" tests assert on.
type service struct {
	testingv1connect.UnimplementedTestServiceHandler
	runs  atomic.Int64
	reads atomic.Int64
	// onDo, when set, replaces Do's body; n is the execution number.
	onDo func(ctx context.Context, req *connect.Request[testingv1.DoRequest], n int64) (*connect.Response[testingv1.DoResponse], error)
}

func (s *service) Do(ctx context.Context, req *connect.Request[testingv1.DoRequest]) (*connect.Response[testingv1.DoResponse], error) {
	n := s.runs.Add(1)
	if s.onDo != nil {
		return s.onDo(ctx, req, n)
	}
	return connect.NewResponse(&testingv1.DoResponse{Id: req.Msg.GetId(), Execution: n, Payload: req.Msg.GetPayload()}), nil
}

func (s *service) Charge(_ context.Context, _ *connect.Request[testingv1.ChargeRequest]) (*connect.Response[testingv1.ChargeResponse], error) {
	n := s.runs.Add(1)
	return connect.NewResponse(&testingv1.ChargeResponse{ChargeId: fmt.Sprintf("ch_%d", n)}), nil
}

func (s *service) Read(_ context.Context, req *connect.Request[testingv1.ReadRequest]) (*connect.Response[testingv1.ReadResponse], error) {
	s.reads.Add(1)
	return connect.NewResponse(&testingv1.ReadResponse{Id: req.Msg.GetId()}), nil
}

// server is a connect-go server of the test service, with the interceptor,
// on a real TCP listener that speaks HTTP/1.1 and HTTP/2 without TLS
// (h2c). It records the HTTP version of every request it serves.
type server struct {
	svc   *service
	url   string
	proto atomic.Value // "HTTP/1.1" or "HTTP/2.0": the last request's
}

func newServer(t *testing.T, svc *service, p *idempotency.Protocol, opts ...connect.HandlerOption) *server {
	t.Helper()
	s := &server{svc: svc}
	// Interceptors in opts run outside ours.
	opts = append(opts, connect.WithInterceptors(idempotencyconnect.NewInterceptor(p)))
	path, h := testingv1connect.NewTestServiceHandler(svc, opts...)
	mux := http.NewServeMux()
	mux.Handle(path, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.proto.Store(r.Proto)
		h.ServeHTTP(w, r)
	}))
	s.url = testservice.ServeHTTP(t, mux).URL
	return s
}

// clientKind is one way a connect-go client reaches the server.
type clientKind struct {
	name     string
	protocol connect.ClientOption // nil: the Connect protocol
	h2c      bool
}

// clientKinds are the protocols connect-go speaks, on each HTTP version
// they run on (gRPC needs HTTP/2), and the Connect protocol with the JSON
// codec (a replayed message must encode in JSON too).
var clientKinds = []clientKind{
	{name: "connect/http1"},
	{name: "connect/h2c", h2c: true},
	{name: "grpc/h2c", protocol: connect.WithGRPC(), h2c: true},
	{name: "grpcweb/http1", protocol: connect.WithGRPCWeb()},
	{name: "grpcweb/h2c", protocol: connect.WithGRPCWeb(), h2c: true},
	{name: "connect+json/http1", protocol: connect.WithProtoJSON()},
}

// connectProtocol reports whether k speaks the Connect protocol, which
// reads the key header as the IETF draft's.
func (k clientKind) connectProtocol() bool {
	return strings.HasPrefix(k.name, "connect")
}

func (k clientKind) wantProto() string {
	if k.h2c {
		return "HTTP/2.0"
	}
	return "HTTP/1.1"
}

func (k clientKind) client(t *testing.T, s *server) testingv1connect.TestServiceClient {
	var opts []connect.ClientOption
	if k.protocol != nil {
		opts = append(opts, k.protocol)
	}
	return testingv1connect.NewTestServiceClient(testservice.HTTPClient(t, k.h2c), s.url, opts...)
}

func doReq(key string, msg *testingv1.DoRequest) *connect.Request[testingv1.DoRequest] {
	r := connect.NewRequest(msg)
	if key != "" {
		r.Header().Set("Idempotency-Key", key)
	}
	return r
}

func errorInfo(t *testing.T, err error) *errdetails.ErrorInfo {
	t.Helper()
	var ce *connect.Error
	if !errors.As(err, &ce) {
		t.Fatalf("error %v is not a *connect.Error", err)
	}
	for _, d := range ce.Details() {
		v, derr := d.Value()
		if derr != nil {
			t.Fatalf("detail %s: %v", d.Type(), derr)
		}
		if info, ok := v.(*errdetails.ErrorInfo); ok {
			return info
		}
	}
	t.Fatalf("error %v carries no ErrorInfo", err)
	return nil
}

// TestProtocols runs the contract over every protocol and HTTP version: a
// keyed call runs once and its repeat is the stored answer, marked; another
// request under the key is refused; a missing key where one is required
// and a malformed key are refused with their reasons; a method declared
// without side effects is not intercepted.
func TestProtocols(t *testing.T) {
	for _, k := range clientKinds {
		t.Run(k.name, func(t *testing.T) {
			for _, st := range stores(t) {
				t.Run(st.name, func(t *testing.T) {
					svc := &service{}
					s := newServer(t, svc, idempotency.NewProtocol(st.store))
					c := k.client(t, s)
					ctx := t.Context()

					first, err := c.Do(ctx, doReq("k-1", &testingv1.DoRequest{Id: "a", Amount: 5}))
					if err != nil {
						t.Fatalf("first call: %v", err)
					}
					if got := s.proto.Load(); got != k.wantProto() {
						t.Fatalf("served over %v, want %s", got, k.wantProto())
					}
					if idempotencyconnect.Replayed(first.Header()) {
						t.Errorf("first call marked as a replay")
					}
					repeatKey := "k-1"
					if k.connectProtocol() {
						repeatKey = `"k-1"` // the IETF draft's form, on HTTP's own protocol
					}
					again, err := c.Do(ctx, doReq(repeatKey, &testingv1.DoRequest{Id: "a", Amount: 5}))
					if err != nil {
						t.Fatalf("repeat (key %s): %v", repeatKey, err)
					}
					if !idempotencyconnect.Replayed(again.Header()) {
						t.Errorf("repeat not marked as a replay: header %v", again.Header())
					}
					if !proto.Equal(again.Msg, first.Msg) {
						t.Errorf("replay %v, want %v", again.Msg, first.Msg)
					}
					if n := svc.runs.Load(); n != 1 {
						t.Fatalf("handler ran %d times for one key, want 1", n)
					}

					_, err = c.Do(ctx, doReq("k-1", &testingv1.DoRequest{Id: "a", Amount: 6}))
					if connect.CodeOf(err) != connect.CodeFailedPrecondition || errorInfo(t, err).GetReason() != idempotency.ReasonKeyReused {
						t.Errorf("other request under the key: %v, want FailedPrecondition KEY_REUSED", err)
					}
					if info := errorInfo(t, err); info.GetDomain() != idempotency.ErrorDomain {
						t.Errorf("ErrorInfo domain %q, want %q", info.GetDomain(), idempotency.ErrorDomain)
					}

					_, err = c.Charge(ctx, connect.NewRequest(&testingv1.ChargeRequest{Amount: 1}))
					if connect.CodeOf(err) != connect.CodeInvalidArgument || errorInfo(t, err).GetReason() != idempotency.ReasonKeyRequired {
						t.Errorf("Charge without a key: %v, want InvalidArgument KEY_REQUIRED", err)
					}
					bad := []string{"has space", strings.Repeat("x", idempotency.MaxKeyLength+1)}
					if k.connectProtocol() {
						bad = append(bad, `"unterminated`) // a malformed sf-string; a valid key on gRPC
					}
					for _, bad := range bad {
						_, err = c.Do(ctx, doReq(bad, &testingv1.DoRequest{Id: "b"}))
						if connect.CodeOf(err) != connect.CodeInvalidArgument || errorInfo(t, err).GetReason() != idempotency.ReasonKeyInvalid {
							t.Errorf("key %.20q: %v, want InvalidArgument KEY_INVALID", bad, err)
						}
					}
					if n := svc.runs.Load(); n != 1 {
						t.Errorf("refused calls ran the handler: %d runs, want 1", n)
					}

					for range 2 {
						r := connect.NewRequest(&testingv1.ReadRequest{Id: "r"})
						r.Header().Set("Idempotency-Key", "read-1")
						resp, err := c.Read(ctx, r)
						if err != nil || idempotencyconnect.Replayed(resp.Header()) {
							t.Fatalf("Read: %v (replayed %v), want a fresh answer", err, err == nil && idempotencyconnect.Replayed(resp.Header()))
						}
					}
					if n := svc.reads.Load(); n != 2 {
						t.Errorf("Read (NO_SIDE_EFFECTS) ran %d times for 2 calls, want 2: it must not be intercepted", n)
					}
				})
			}
		})
	}
}

type namedStore struct {
	name  string
	store idempotency.Store
}

// stores are the stores the contract runs over: memory, and Redis on
// miniredis.
func stores(t *testing.T) []namedStore {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	return []namedStore{
		{name: "memory", store: idempotency.NewMemoryStore()},
		{name: "redis", store: idempotency.NewRedisStore(rdb)},
	}
}

// TestReplayFidelity checks that a replay carries everything the first
// answer did, on every protocol: the response with its header and trailer
// (a "-bin" one included) and, for a stored error, the code, message,
// details and metadata. The handler cannot forge the replay marker.
func TestReplayFidelity(t *testing.T) {
	for _, k := range clientKinds {
		t.Run(k.name, func(t *testing.T) {
			svc := &service{onDo: func(ctx context.Context, req *connect.Request[testingv1.DoRequest], n int64) (*connect.Response[testingv1.DoResponse], error) {
				if req.Msg.GetId() == "fail" {
					ce := connect.NewError(connect.CodeNotFound, errors.New("no such account"))
					d, _ := connect.NewErrorDetail(&errdetails.ResourceInfo{ResourceName: "acct-1"})
					ce.AddDetail(d)
					ce.Meta().Set("X-Error-Ref", fmt.Sprintf("e-%d", n))
					ce.Meta().Set(idempotencyconnect.ReplayedHeader, "true") // forged
					return nil, ce
				}
				resp := connect.NewResponse(&testingv1.DoResponse{Id: req.Msg.GetId(), Execution: n})
				resp.Header().Set("X-Charge-Id", fmt.Sprintf("ch-%d", n))
				resp.Header().Set("X-Sig-Bin", connect.EncodeBinaryHeader([]byte{0, 1, 0xff, byte(n)}))
				resp.Header().Set(idempotencyconnect.ReplayedHeader, "true") // forged
				resp.Trailer().Set("X-Ledger-Seq", fmt.Sprintf("%d", 100+n))
				return resp, nil
			}}
			// An interceptor outside ours reaches each answer's concrete
			// message as the package doc says.
			outer := make(chan any, 10)
			unwrap := connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
				return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
					resp, err := next(ctx, req)
					if err == nil {
						outer <- resp.Any().(proto.Message).ProtoReflect().Interface()
					}
					return resp, err
				}
			})
			s := newServer(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore()), connect.WithInterceptors(unwrap))
			c := k.client(t, s)
			ctx := t.Context()

			first, err := c.Do(ctx, doReq("ok", &testingv1.DoRequest{Id: "x"}))
			if err != nil {
				t.Fatal(err)
			}
			<-outer
			if idempotencyconnect.Replayed(first.Header()) {
				t.Fatalf("the handler forged the replay marker on a first answer")
			}
			again, err := c.Do(ctx, doReq("ok", &testingv1.DoRequest{Id: "x"}))
			if err != nil {
				t.Fatal(err)
			}
			if !idempotencyconnect.Replayed(again.Header()) || !proto.Equal(again.Msg, first.Msg) {
				t.Fatalf("replay %v (replayed %v), want %v", again.Msg, idempotencyconnect.Replayed(again.Header()), first.Msg)
			}
			if m, ok := (<-outer).(*testingv1.DoResponse); !ok || m.GetExecution() != first.Msg.GetExecution() {
				t.Errorf("an outer interceptor reached the replayed message as %T %v, want the *DoResponse of execution %d", m, m, first.Msg.GetExecution())
			}
			for _, h := range []string{"X-Charge-Id", "X-Sig-Bin"} {
				if got, want := again.Header().Get(h), first.Header().Get(h); got != want || want == "" {
					t.Errorf("replayed header %s = %q, first %q", h, got, want)
				}
			}
			if got, want := again.Trailer().Get("X-Ledger-Seq"), first.Trailer().Get("X-Ledger-Seq"); got != want || want == "" {
				t.Errorf("replayed trailer X-Ledger-Seq = %q, first %q", got, want)
			}

			_, ferr := c.Do(ctx, doReq("fail", &testingv1.DoRequest{Id: "fail"}))
			_, rerr := c.Do(ctx, doReq("fail", &testingv1.DoRequest{Id: "fail"}))
			var fe, re *connect.Error
			if !errors.As(ferr, &fe) || !errors.As(rerr, &re) {
				t.Fatalf("errors %v, %v: want *connect.Error", ferr, rerr)
			}
			if idempotencyconnect.Replayed(fe.Meta()) || !idempotencyconnect.Replayed(re.Meta()) {
				t.Errorf("marker: first %v, replay %v; want false, true", idempotencyconnect.Replayed(fe.Meta()), idempotencyconnect.Replayed(re.Meta()))
			}
			if re.Code() != fe.Code() || re.Message() != fe.Message() || fe.Code() != connect.CodeNotFound {
				t.Errorf("replayed error %v, first %v", re, fe)
			}
			if len(re.Details()) != 1 || len(fe.Details()) != 1 {
				t.Fatalf("details: replay %d, first %d, want 1", len(re.Details()), len(fe.Details()))
			}
			rv, _ := re.Details()[0].Value()
			if ri, ok := rv.(*errdetails.ResourceInfo); !ok || ri.GetResourceName() != "acct-1" {
				t.Errorf("replayed detail %v, want ResourceInfo acct-1", rv)
			}
			if got := re.Meta().Get("X-Error-Ref"); got != "e-2" || fe.Meta().Get("X-Error-Ref") != "e-2" {
				t.Errorf("error metadata X-Error-Ref: first %q, replay %q; want e-2 both", fe.Meta().Get("X-Error-Ref"), got)
			}
			if idempotencyconnect.ReasonOf(re) != "" {
				t.Errorf("a replayed handler error has reason %q, want none", idempotencyconnect.ReasonOf(re))
			}
			if n := svc.runs.Load(); n != 2 {
				t.Errorf("handler ran %d times, want 2 (ok, fail)", n)
			}
		})
	}
}

// TestInProgress checks the answer to a repeat while the first call runs:
// Aborted with KEY_IN_PROGRESS and a RetryInfo, which the Connect protocol
// sends as HTTP 409; once the first call ends, the repeat is its replay.
func TestInProgress(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	svc := &service{onDo: func(ctx context.Context, req *connect.Request[testingv1.DoRequest], n int64) (*connect.Response[testingv1.DoResponse], error) {
		close(entered)
		<-release
		return connect.NewResponse(&testingv1.DoResponse{Execution: n}), nil
	}}
	s := newServer(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore(), idempotency.WithRetryDelay(1500*time.Millisecond)))
	c := clientKinds[0].client(t, s)
	done := make(chan error, 1)
	go func() {
		_, err := c.Do(context.Background(), doReq("slow", &testingv1.DoRequest{}))
		done <- err
	}()
	<-entered
	_, err := c.Do(t.Context(), doReq("slow", &testingv1.DoRequest{}))
	if connect.CodeOf(err) != connect.CodeAborted || errorInfo(t, err).GetReason() != idempotency.ReasonInProgress {
		t.Fatalf("repeat during the first call: %v, want Aborted KEY_IN_PROGRESS", err)
	}
	if d, ok := idempotencyconnect.RetryDelayOf(err); !ok || d != 1500*time.Millisecond {
		t.Errorf("RetryInfo delay %v (%v), want 1.5s", d, ok)
	}

	// The same, seen as the HTTP status a browser's fetch gets.
	hreq, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url+testingv1connect.TestServiceDoProcedure, strings.NewReader(`{}`))
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Idempotency-Key", `"slow"`)
	hresp, err := http.DefaultClient.Do(hreq)
	if err != nil {
		t.Fatal(err)
	}
	_ = hresp.Body.Close()
	if hresp.StatusCode != http.StatusConflict {
		t.Errorf("Connect protocol status %d, want 409", hresp.StatusCode)
	}

	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	again, err := c.Do(t.Context(), doReq("slow", &testingv1.DoRequest{}))
	if err != nil || !idempotencyconnect.Replayed(again.Header()) || again.Msg.GetExecution() != 1 {
		t.Fatalf("repeat after the first call: %v, %v; want the replay of execution 1", again, err)
	}
}

// TestSpecIdempotencyLevel checks that a handler whose Spec declares it
// idempotent ignores keys, as a method with the proto option does on gRPC:
// Do, served with connect.WithIdempotency, runs on every call.
func TestSpecIdempotencyLevel(t *testing.T) {
	svc := &service{}
	s := newServer(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore()), connect.WithIdempotency(connect.IdempotencyIdempotent))
	c := clientKinds[0].client(t, s)
	for range 2 {
		resp, err := c.Do(t.Context(), doReq("same", &testingv1.DoRequest{}))
		if err != nil || idempotencyconnect.Replayed(resp.Header()) {
			t.Fatalf("Do: %v", err)
		}
	}
	if n := svc.runs.Load(); n != 2 {
		t.Errorf("handler declared idempotent ran %d times for 2 calls, want 2 (keys ignored)", n)
	}
	// Charge requires a key in its proto: that wins over the Spec.
	if _, err := c.Charge(t.Context(), connect.NewRequest(&testingv1.ChargeRequest{})); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("Charge without a key under WithIdempotency: %v, want InvalidArgument", err)
	}
}

// TestStoreDown checks that an unreachable store fails the call closed:
// Unavailable, STORE_UNAVAILABLE, and the handler does not run.
func TestStoreDown(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), MaxRetries: -1, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	svc := &service{}
	s := newServer(t, svc, idempotency.NewProtocol(idempotency.NewRedisStore(rdb)))
	mr.Close()
	_, err := clientKinds[2].client(t, s).Do(t.Context(), doReq("down", &testingv1.DoRequest{}))
	if connect.CodeOf(err) != connect.CodeUnavailable || errorInfo(t, err).GetReason() != idempotency.ReasonStoreUnavailable {
		t.Fatalf("store down: %v, want Unavailable STORE_UNAVAILABLE", err)
	}
	if n := svc.runs.Load(); n != 0 {
		t.Errorf("handler ran %d times with the store down, want 0", n)
	}
}

// TestReplayedHeaderName pins the canonical form of the core's marker.
func TestReplayedHeaderName(t *testing.T) {
	if got := http.CanonicalHeaderKey(idempotency.ReplayedHeader); got != idempotencyconnect.ReplayedHeader {
		t.Errorf("ReplayedHeader = %q, want %q", idempotencyconnect.ReplayedHeader, got)
	}
}

// TestKeyForms pins how each protocol reads the key header: the Connect
// protocol takes the IETF draft's structured-field string ("q" is the key
// q); gRPC and gRPC-Web take metadata as it is, as grpc-go's interceptor
// does ("q", quotes included, is a key of its own).
func TestKeyForms(t *testing.T) {
	for _, k := range clientKinds {
		t.Run(k.name, func(t *testing.T) {
			svc := &service{}
			s := newServer(t, svc, idempotency.NewProtocol(idempotency.NewMemoryStore()))
			c := k.client(t, s)
			for _, key := range []string{`"q"`, "q"} {
				if _, err := c.Do(t.Context(), doReq(key, &testingv1.DoRequest{})); err != nil {
					t.Fatalf("key %s: %v", key, err)
				}
			}
			want := int64(2)
			if k.connectProtocol() {
				want = 1
			}
			if n := svc.runs.Load(); n != want {
				t.Errorf(`keys "q" and q ran the handler %d times, want %d`, n, want)
			}
			// Two header lines: one key on Connect when they agree; never
			// on gRPC, whose metadata key must have one value.
			r := doReq("", &testingv1.DoRequest{Id: "two"})
			r.Header().Add("Idempotency-Key", "two")
			r.Header().Add("Idempotency-Key", "two")
			_, err := c.Do(t.Context(), r)
			if (err == nil) != (want == 1) {
				t.Errorf("two equal key lines: %v", err)
			}
		})
	}
}

// TestStatusOf pins the status each kind of error stands for, as
// connect-go sends it.
func TestStatusOf(t *testing.T) {
	if st := idempotencyconnect.StatusOf(nil); st != nil {
		t.Errorf("StatusOf(nil) = %v, want nil", st)
	}
	if c := idempotencyconnect.StatusOf(fmt.Errorf("wrapped: %w", context.Canceled)).Code(); c != codes.Canceled {
		t.Errorf("a context error: %v, want Canceled", c)
	}
	if st := idempotencyconnect.StatusOf(errors.New("boom")); st.Code() != codes.Unknown || st.Message() != "boom" {
		t.Errorf("a plain error: %v, want Unknown boom", st)
	}
	ce := connect.NewError(connect.CodeNotFound, errors.New("gone"))
	d, _ := connect.NewErrorDetail(&errdetails.ResourceInfo{ResourceName: "r"})
	ce.AddDetail(d)
	st := idempotencyconnect.StatusOf(fmt.Errorf("wrapped: %w", ce))
	if st.Code() != codes.NotFound || st.Message() != "gone" || len(st.Details()) != 1 {
		t.Errorf("a connect error: %v %v, want NotFound gone with its detail", st, st.Details())
	}
	if r := idempotencyconnect.ReasonOf(nil); r != "" {
		t.Errorf("ReasonOf(nil) = %q", r)
	}
}
