package idempotencyotel

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
)

type svc struct {
	testingv1.UnimplementedTestServiceServer
	runs    atomic.Int64
	started chan struct{}
	release chan struct{}
}

func (s *svc) Do(ctx context.Context, req *testingv1.DoRequest) (*testingv1.DoResponse, error) {
	n := s.runs.Add(1)
	switch req.GetId() {
	case "slow":
		close(s.started)
		<-s.release
	case "transient":
		return nil, status.Error(codes.Unavailable, "down")
	}
	return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
}

// serveTest serves svc on bufconn behind the interceptors (the first is
// outermost) and returns a client; both end with the test.
func serveTest(t *testing.T, svc testingv1.TestServiceServer, interceptors ...grpc.UnaryServerInterceptor) testingv1.TestServiceClient {
	t.Helper()
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(interceptors...))
	testingv1.RegisterTestServiceServer(srv, svc)
	lis := bufconn.Listen(1 << 20)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return testingv1.NewTestServiceClient(conn)
}

// calls returns the value of the calls counter for an outcome.
func calls(t *testing.T, r *sdkmetric.ManualReader, outcome idempotency.Outcome) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != CallsMetric {
				continue
			}
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				if v, _ := dp.Attributes.Value(AttrOutcome); v.AsString() == string(outcome) {
					n += dp.Value
				}
			}
		}
	}
	return n
}

// TestEveryOutcomeIsCounted drives one call per outcome kind through a real
// server and checks that exactly that outcome's counter moved by one, and
// that the server span carries the attributes.
func TestEveryOutcomeIsCounted(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	observe, err := NewObserver(WithMeterProvider(mp))
	if err != nil {
		t.Fatal(err)
	}
	tracing := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		ctx, span := tp.Tracer("test").Start(ctx, info.FullMethod)
		defer span.End()
		return h(ctx, req)
	}
	s := &svc{started: make(chan struct{}), release: make(chan struct{})}
	client := serveTest(t, s, tracing,
		idempotency.UnaryServerInterceptor(idempotency.NewMemoryStore(), idempotency.WithObserver(observe)))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	key := func(k string) context.Context { return metadata.AppendToOutgoingContext(ctx, "idempotency-key", k) }

	slowDone := make(chan struct{})
	go func() {
		defer close(slowDone)
		_, _ = client.Do(key("slow"), &testingv1.DoRequest{Id: "slow"})
	}()
	<-s.started

	steps := []struct {
		outcome idempotency.Outcome
		call    func() error
	}{
		{idempotency.OutcomeExecuted, func() error { _, err := client.Do(key("a"), &testingv1.DoRequest{Id: "a"}); return err }},
		{idempotency.OutcomeReplayed, func() error { _, err := client.Do(key("a"), &testingv1.DoRequest{Id: "a"}); return err }},
		{idempotency.OutcomeKeyReused, func() error { _, err := client.Do(key("a"), &testingv1.DoRequest{Id: "b"}); return err }},
		{idempotency.OutcomeInProgress, func() error { _, err := client.Do(key("slow"), &testingv1.DoRequest{Id: "slow"}); return err }},
		{idempotency.OutcomeKeyMissing, func() error { _, err := client.Charge(ctx, &testingv1.ChargeRequest{}); return err }},
		{idempotency.OutcomeKeyInvalid, func() error { _, err := client.Do(key(""), &testingv1.DoRequest{}); return err }},
		{idempotency.OutcomeReleased, func() error {
			_, err := client.Do(key("t"), &testingv1.DoRequest{Id: "transient"})
			return err
		}},
		{idempotency.OutcomePassThrough, func() error { _, err := client.Do(ctx, &testingv1.DoRequest{}); return err }},
	}
	for _, st := range steps {
		before := calls(t, reader, st.outcome)
		_ = st.call()
		if got := calls(t, reader, st.outcome) - before; got != 1 {
			t.Fatalf("%s counter moved by %d, want 1", st.outcome, got)
		}
	}
	close(s.release)
	<-slowDone

	var replaySpan sdktrace.ReadOnlySpan
	for _, sp := range spans.Ended() {
		for _, a := range sp.Attributes() {
			if a.Key == AttrOutcome && a.Value.AsString() == string(idempotency.OutcomeReplayed) {
				replaySpan = sp
			}
		}
	}
	if replaySpan == nil {
		t.Fatal("no span with idempotency.outcome=replayed")
	}
	got := map[attribute.Key]attribute.Value{}
	for _, a := range replaySpan.Attributes() {
		got[a.Key] = a.Value
	}
	if !got[AttrReplayed].AsBool() || len(got[AttrKeyHash].AsString()) != 12 {
		t.Fatalf("replay span attributes %v: want idempotency.replayed=true and a 12-hex-digit key hash", got)
	}
}
