package idempotency

import (
	"context"
	"strconv"
	"testing"

	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// BenchmarkInterceptDirect measures the interceptor alone: called as a
// function, without a gRPC server or a network, on the memory store, so
// that its own CPU cost stands free of the transport's noise (a first
// execution, a replay, a call without a key). It is the benchmark that
// shows what an adapter layer costs (docs/PERFORMANCE.md, "The
// transport-neutral core").
func BenchmarkInterceptDirect(b *testing.B) {
	icpt := UnaryServerInterceptor(NewMemoryStore())
	info := &grpc.UnaryServerInfo{FullMethod: testservice.MethodDo}
	handler := func(context.Context, any) (any, error) { return &testingv1.DoResponse{Id: "x"}, nil }
	req := &testingv1.DoRequest{Id: "x", Amount: 1}
	b.Run("first", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(DefaultKeyHeader, "k"+strconv.Itoa(i)))
			if _, err := icpt(ctx, req, info, handler); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("replay", func(b *testing.B) {
		b.ReportAllocs()
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(DefaultKeyHeader, "same"))
		for b.Loop() {
			if _, err := icpt(ctx, req, info, handler); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("no-key", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := icpt(context.Background(), req, info, handler); err != nil {
				b.Fatal(err)
			}
		}
	})
}
