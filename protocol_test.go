package idempotency

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// testTransport is a transport of its own, the smallest Exchange: its
// answers are plain values, its errors are wrapped in transportErr, so a
// test can tell what the protocol returned as is (the handler's own answer)
// from what it converted (Refuse) or built (Replay).
type testTransport struct {
	header  map[string][]string
	handler func(ctx context.Context) (*testingv1.DoResponse, error)
	// respHeader is what the handler "sends" as its header.
	respHeader metadata.MD
}

type transportErr struct{ st *status.Status }

func (e transportErr) Error() string { return "transport: " + e.st.Message() }

type replayed struct{ Stored }

func (x *testTransport) RequestHeader(name string) []string { return x.header[name] }

func (x *testTransport) Run(ctx context.Context, owner bool) Result {
	resp, err := x.handler(ctx)
	r := Result{Response: resp, Err: err}
	if err != nil {
		r.Status = status.New(codes.NotFound, err.Error())
	}
	if owner {
		r.Message = resp
		r.Header = withoutMarker(x.respHeader)
	}
	return r
}

func (x *testTransport) Replay(_ context.Context, s Stored) (any, error) {
	if s.Status.Code() != codes.OK {
		return nil, transportErr{s.Status}
	}
	return replayed{s}, nil
}

func (x *testTransport) Refuse(err error) error { return transportErr{status.Convert(err)} }

// TestProtocolOverAnotherTransport drives Protocol.Handle through a
// transport of its own, over one store with the gRPC adapter: the handler
// runs once per key across both, each side answering in its own form; the
// protocol's refusals go through Refuse; an error status the transport
// reports is stored and replayed as reported.
func TestProtocolOverAnotherTransport(t *testing.T) {
	p := NewProtocol(NewMemoryStore())
	ctx := context.Background()
	runs := 0
	x := &testTransport{
		header: map[string][]string{DefaultKeyHeader: {"k-1"}},
		handler: func(ctx context.Context) (*testingv1.DoResponse, error) {
			runs++
			if k, ok := KeyFromContext(ctx); !ok || k != "k-1" {
				t.Errorf("the handler's context carries key %q (%v), want k-1", k, ok)
			}
			return &testingv1.DoResponse{Id: "a", Execution: int64(runs)}, nil
		},
		respHeader: metadata.Pairs("x-ref", "r-1", ReplayedHeader, "true"),
	}
	req := &testingv1.DoRequest{Id: "a"}
	call := Call{Method: testservice.MethodDo, Request: req}

	resp, err := p.Handle(ctx, call, x)
	if r, ok := resp.(*testingv1.DoResponse); err != nil || !ok || r.GetExecution() != 1 {
		t.Fatalf("first call: %v, %v; want the handler's own *DoResponse", resp, err)
	}
	resp, err = p.Handle(ctx, call, x)
	rep, ok := resp.(replayed)
	if err != nil || !ok {
		t.Fatalf("repeat: %T %v, %v; want the transport's Replay", resp, resp, err)
	}
	if !proto.Equal(rep.Response, &testingv1.DoResponse{Id: "a", Execution: 1}) || rep.Status.Code() != codes.OK {
		t.Errorf("stored response %v, status %v", rep.Response, rep.Status)
	}
	if got := rep.Header.Get("x-ref"); len(got) != 1 || got[0] != "r-1" || !Replayed(rep.Header) || len(rep.Header.Get(ReplayedHeader)) != 1 {
		t.Errorf("stored header %v: want x-ref r-1 and the protocol's one marker", rep.Header)
	}

	// The same record, seen through the gRPC adapter of the same Protocol.
	grpcCtx := metadata.NewIncomingContext(ctx, metadata.Pairs(DefaultKeyHeader, "k-1"))
	gresp, err := p.UnaryServerInterceptor()(grpcCtx, req, &grpc.UnaryServerInfo{FullMethod: testservice.MethodDo},
		func(context.Context, any) (any, error) { runs++; return nil, errors.New("ran again") })
	if r, ok := gresp.(*testingv1.DoResponse); err != nil || !ok || r.GetExecution() != 1 {
		t.Errorf("gRPC adapter on the same key: %v, %v; want the replay of execution 1", gresp, err)
	}

	// Another request under the key: refused through Refuse.
	_, err = p.Handle(ctx, Call{Method: testservice.MethodDo, Request: &testingv1.DoRequest{Id: "b"}}, x)
	var te transportErr
	if !errors.As(err, &te) || te.st.Code() != codes.FailedPrecondition || ReasonOf(te.st.Err()) != ReasonKeyReused {
		t.Errorf("other request: %v; want the transport's form of KEY_REUSED", err)
	}

	// A stored error, as the transport reported its status.
	x.header[DefaultKeyHeader] = []string{"k-2"}
	x.handler = func(context.Context) (*testingv1.DoResponse, error) {
		runs++
		return nil, errors.New("no such account")
	}
	_, err = p.Handle(ctx, call, x)
	if err == nil || errors.As(err, &te) {
		t.Fatalf("failing first call: %v; want the handler's own error", err)
	}
	_, err = p.Handle(ctx, call, x)
	if !errors.As(err, &te) || te.st.Code() != codes.NotFound || te.st.Message() != "no such account" {
		t.Errorf("repeat of the failed call: %v; want the stored NotFound replayed", err)
	}
	if runs != 2 {
		t.Errorf("handler ran %d times, want 2 (one per key)", runs)
	}
}

// TestCallIdempotent checks Call.Idempotent: a method the transport
// declares idempotent ignores keys, unless its proto requires one, and
// WithKeyPolicy sees the result as the declared policy.
func TestCallIdempotent(t *testing.T) {
	var seen []string
	p := NewProtocol(NewMemoryStore(), WithKeyPolicy(func(method string, declared KeyPolicy) KeyPolicy {
		seen = append(seen, fmt.Sprintf("%s=%v", method, declared))
		return declared
	}))
	runs := 0
	x := &testTransport{
		header:  map[string][]string{DefaultKeyHeader: {"same"}},
		handler: func(context.Context) (*testingv1.DoResponse, error) { runs++; return &testingv1.DoResponse{}, nil },
	}
	for range 2 {
		if _, err := p.Handle(context.Background(), Call{Method: testservice.MethodDo, Request: &testingv1.DoRequest{}, Idempotent: true}, x); err != nil {
			t.Fatal(err)
		}
	}
	if runs != 2 {
		t.Errorf("Do declared idempotent by the transport ran %d times for 2 keyed calls, want 2", runs)
	}
	delete(x.header, DefaultKeyHeader)
	_, err := p.Handle(context.Background(), Call{Method: testservice.MethodCharge, Request: &testingv1.ChargeRequest{}, Idempotent: true}, x)
	var te transportErr
	if !errors.As(err, &te) || ReasonOf(te.st.Err()) != ReasonKeyRequired {
		t.Errorf("Charge (key_required) declared idempotent, without a key: %v; want KEY_REQUIRED", err)
	}
	want := []string{testservice.MethodDo + "=ignored", testservice.MethodCharge + "=required"}
	if fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Errorf("WithKeyPolicy saw %v, want %v (once per method)", seen, want)
	}
}

// TestProtocolTxStore runs another transport's call over a TxStore: the
// handler runs in the store's transaction and its write commits with the
// outcome, once.
func TestProtocolTxStore(t *testing.T) {
	store := newMemTxStore()
	p := NewProtocol(store)
	x := &testTransport{
		header: map[string][]string{DefaultKeyHeader: {"tx-1"}},
		handler: func(ctx context.Context) (*testingv1.DoResponse, error) {
			if err := memWrite(ctx); err != nil {
				return nil, err
			}
			return &testingv1.DoResponse{}, nil
		},
	}
	for range 2 {
		if _, err := p.Handle(context.Background(), Call{Method: testservice.MethodDo, Request: &testingv1.DoRequest{}}, x); err != nil {
			t.Fatal(err)
		}
	}
	if n := store.writes(); n != 1 {
		t.Errorf("%d committed writes for two calls with one key, want 1", n)
	}
}

// TestHTTPKeyHeader checks Call.HTTPKeyHeader: the IETF draft's header is
// read with ParseKeyHeader ("q" is the key q; a malformed string is
// refused), metadata as it is ("q", quotes included, is a key of its own).
func TestHTTPKeyHeader(t *testing.T) {
	for _, httpKey := range []bool{true, false} {
		p := NewProtocol(NewMemoryStore())
		runs := 0
		x := &testTransport{handler: func(context.Context) (*testingv1.DoResponse, error) { runs++; return &testingv1.DoResponse{}, nil }}
		call := Call{Method: testservice.MethodDo, Request: &testingv1.DoRequest{}, HTTPKeyHeader: httpKey}
		for _, key := range []string{`"q"`, "q"} {
			x.header = map[string][]string{DefaultKeyHeader: {key}}
			if _, err := p.Handle(context.Background(), call, x); err != nil {
				t.Fatalf("HTTPKeyHeader %v, key %s: %v", httpKey, key, err)
			}
		}
		want := 2
		if httpKey {
			want = 1
		}
		if runs != want {
			t.Errorf("HTTPKeyHeader %v: keys \"q\" and q ran the handler %d times, want %d", httpKey, runs, want)
		}
		x.header = map[string][]string{DefaultKeyHeader: {`"unterminated`}}
		_, err := p.Handle(context.Background(), call, x)
		var te transportErr
		if refused := errors.As(err, &te) && ReasonOf(te.st.Err()) == ReasonKeyInvalid; refused != httpKey {
			t.Errorf("HTTPKeyHeader %v: a malformed sf-string: %v", httpKey, err)
		}
	}
}
