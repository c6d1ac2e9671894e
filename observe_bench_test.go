package idempotency

import (
	"context"
	"testing"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// BenchmarkObserverCost calls the interceptor directly (no transport), on a
// memory-store replay, without an observer and with a no-op one, to show
// what the hook costs when unused and when set.
func BenchmarkObserverCost(b *testing.B) {
	info := &grpc.UnaryServerInfo{FullMethod: methodDo}
	req := &testingv1.DoRequest{Id: "bench", Amount: 1}
	handler := func(ctx context.Context, req any) (any, error) { return &testingv1.DoResponse{Id: "bench"}, nil }
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(DefaultKeyHeader, "bench-key"))
	for _, bc := range []struct {
		name string
		opts []Option
	}{
		{"no-observer", nil},
		{"noop-observer", []Option{WithObserver(func(context.Context, Event) {})}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ic := UnaryServerInterceptor(NewMemoryStore(), bc.opts...)
			if _, err := ic(ctx, req, info, handler); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := ic(ctx, req, info, handler); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
