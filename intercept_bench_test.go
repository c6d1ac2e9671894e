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
//
// The "-stream" variants call it as grpc-go does: each call in a goroutine
// of its own (so a deep call path pays for growing that goroutine's stack,
// see docs/PERFORMANCE.md) and with a server transport stream in the
// context (so the header capture runs); the handler sets no metadata.
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
	for _, path := range []string{"first", "replay"} {
		b.Run(path+"-stream", func(b *testing.B) {
			b.ReportAllocs()
			done := make(chan error)
			for i := 0; b.Loop(); i++ {
				key := "same-stream"
				if path == "first" {
					key = "ks" + strconv.Itoa(i)
				}
				ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(DefaultKeyHeader, key))
				ctx = grpc.NewContextWithServerTransportStream(ctx, benchStream{})
				go func() {
					_, err := icpt(ctx, req, info, handler)
					done <- err
				}()
				if err := <-done; err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("no-key", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := icpt(context.Background(), req, info, handler); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// benchStream is a server transport stream that accepts every header and
// trailer, standing for grpc-go's in BenchmarkInterceptDirect.
type benchStream struct{}

func (benchStream) Method() string               { return testservice.MethodDo }
func (benchStream) SetHeader(metadata.MD) error  { return nil }
func (benchStream) SendHeader(metadata.MD) error { return nil }
func (benchStream) SetTrailer(metadata.MD) error { return nil }
