package idempotencyotel

import (
	"context"
	"testing"

	"github.com/idempotency-grpc/idempotency"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestClientAttempts verifies that a call needing two retries counts one
// call and records 3 attempts.
func TestClientAttempts(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	observe, err := NewClientObserver(WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
	if err != nil {
		t.Fatal(err)
	}
	fails := 2
	invoker := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, opts ...grpc.CallOption) error {
		if fails > 0 {
			fails--
			return status.Error(codes.Unavailable, "down")
		}
		return nil
	}
	ic := idempotency.UnaryClientInterceptor(idempotency.WithClientObserver(observe), idempotency.WithBackoff(1, 1))
	if err := ic(context.Background(), "/pkg.S/M", nil, nil, nil, invoker); err != nil {
		t.Fatal(err)
	}
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var callsSeen, attemptsSum int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch m.Name {
			case ClientCallsMetric:
				for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
					callsSeen += dp.Value
				}
			case ClientAttemptsMetric:
				for _, dp := range m.Data.(metricdata.Histogram[int64]).DataPoints {
					attemptsSum += dp.Sum
				}
			}
		}
	}
	if callsSeen != 1 || attemptsSum != 3 {
		t.Fatalf("calls=%d attempts=%d, want 1 and 3", callsSeen, attemptsSum)
	}
}
