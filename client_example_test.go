package idempotency_test

import (
	"context"
	"fmt"
	"log"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
)

func ExampleUnaryClientInterceptor() {
	// A server whose first answer never reaches the client, as if the
	// connection dropped right after the charge was made.
	client, stop := clientExampleServer(clientExampleLoseFirstAnswer())
	defer stop()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var info idempotency.CallInfo
	resp, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 1299}, idempotency.CallResult(&info))
	if err != nil {
		log.Fatal(err)
	}
	// The retry carried the same key, so the server replayed the first
	// charge instead of charging again.
	fmt.Println(resp.GetChargeId(), "replayed:", info.Replayed, "attempts:", info.Attempts)
	// Output: ch_1 replayed: true attempts: 2
}

func ExampleWithKey() {
	client, stop := clientExampleServer()
	defer stop()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The key comes from the caller's own records (an order id), so a job
	// that is run again after a crash reuses it.
	ctx = idempotency.WithKey(ctx, "order-8812")
	for range 2 {
		var info idempotency.CallInfo
		resp, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 1299}, idempotency.CallResult(&info))
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(resp.GetChargeId(), "key:", info.Key, "replayed:", info.Replayed)
	}
	// Output:
	// ch_1 key: order-8812 replayed: false
	// ch_1 key: order-8812 replayed: true
}

// clientExampleLoseFirstAnswer returns a server interceptor that replaces
// the first answer with Unavailable after the call has run.
func clientExampleLoseFirstAnswer() grpc.UnaryServerInterceptor {
	var lost atomic.Bool
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		resp, err := handler(ctx, req)
		if lost.CompareAndSwap(false, true) {
			return nil, status.Error(codes.Unavailable, "connection reset")
		}
		return resp, err
	}
}

// clientExampleServer starts an in-memory server with the idempotency server
// interceptor innermost, and returns a client using the client interceptor.
func clientExampleServer(outer ...grpc.UnaryServerInterceptor) (testingv1.TestServiceClient, func()) {
	// The repository's test service: Charge answers "ch_<execution>".
	client, stop, err := testservice.Start(&testservice.Service{},
		[]grpc.ServerOption{grpc.ChainUnaryInterceptor(
			append(outer, idempotency.UnaryServerInterceptor(idempotency.NewMemoryStore()))...)},
		// Outermost, so that every retry (its own, or another retry
		// interceptor's placed after it) carries the same key.
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor(
			idempotency.WithMaxAttempts(3),
			idempotency.WithBackoff(10*time.Millisecond, time.Second),
		)),
	)
	if err != nil {
		log.Fatal(err)
	}
	return client, stop
}
