package idempotencyotel

import (
	"context"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// newSvc is the repository's test service: a Do with id "slow" signals
// started and waits for release; "transient" fails Unavailable.
func newSvc(started, release chan struct{}) *testservice.Service {
	return &testservice.Service{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		switch req.GetId() {
		case "slow":
			close(started)
			<-release
		case "transient":
			return nil, status.Error(codes.Unavailable, "down")
		}
		return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
	}}
}

// serveTest serves svc on bufconn behind the interceptors (the first is
// outermost) and returns a client; both end with the test.
func serveTest(t *testing.T, svc testingv1.TestServiceServer, interceptors ...grpc.UnaryServerInterceptor) testingv1.TestServiceClient {
	t.Helper()
	return testservice.Dial(t, testservice.Serve(t, svc, grpc.ChainUnaryInterceptor(interceptors...)))
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
	started, release := make(chan struct{}), make(chan struct{})
	s := newSvc(started, release)
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
	<-started

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
	close(release)
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
