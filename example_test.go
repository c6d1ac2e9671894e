package idempotency_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"strings"

	"github.com/alicebob/miniredis/v2"
	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// newChargeService is the repository's test service whose Charge answers
// "ch_<execution>_<key>": the key is what a handler passes on to its payment
// provider.
func newChargeService() *testservice.Service {
	return &testservice.Service{OnCharge: func(ctx context.Context, _ *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
		key, _ := idempotency.KeyFromContext(ctx) // pass it on to the payment provider
		return &testingv1.ChargeResponse{ChargeId: fmt.Sprintf("ch_%d_%s", n, key)}, nil
	}}
}

// The server interceptor on a Redis store: the second call with the same
// key is answered from Redis, and the handler runs once.
func ExampleUnaryServerInterceptor() {
	mr := miniredis.NewMiniRedis() // your Redis: standalone, Sentinel or Cluster
	if err := mr.Start(); err != nil {
		log.Fatal(err)
	}
	defer mr.Close()
	rdb := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: []string{mr.Addr()}, ContextTimeoutEnabled: true})
	defer rdb.Close()

	svc := newChargeService()
	client, stop, err := testservice.Start(svc, []grpc.ServerOption{grpc.ChainUnaryInterceptor(
		// authentication first, so WithScope can read the principal
		idempotency.UnaryServerInterceptor(idempotency.NewRedisStore(rdb)),
	)})
	if err != nil {
		log.Fatal(err)
	}
	defer stop()

	ctx := metadata.AppendToOutgoingContext(context.Background(), "idempotency-key", "order-8812")
	for i := 0; i < 2; i++ {
		var header metadata.MD
		resp, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 1999}, grpc.Header(&header))
		fmt.Println(resp.GetChargeId(), err, "replayed:", idempotency.Replayed(header))
	}
	fmt.Println("charges made:", svc.Runs.Load())
	// Output:
	// ch_1_order-8812 <nil> replayed: false
	// ch_1_order-8812 <nil> replayed: true
	// charges made: 1
}

// serveExample serves svc behind interceptor in memory and returns its
// client and a stop function.
func serveExample(svc *testservice.Service, interceptor grpc.UnaryServerInterceptor) (testingv1.TestServiceClient, func()) {
	client, stop, err := testservice.Start(svc, []grpc.ServerOption{grpc.ChainUnaryInterceptor(interceptor)})
	if err != nil {
		log.Fatal(err)
	}
	return client, stop
}

// A multi-tenant server scopes keys by the authenticated caller: two
// tenants that happen to send the same key get two executions and their own
// answers, and one can never receive the other's stored response.
func ExampleWithScope() {
	svc := newChargeService()
	client, stop := serveExample(svc, idempotency.UnaryServerInterceptor(idempotency.NewMemoryStore(),
		idempotency.WithScope(func(ctx context.Context) (string, error) {
			// Your authentication interceptor's principal; a header here.
			md, _ := metadata.FromIncomingContext(ctx)
			if t := md.Get("x-tenant"); len(t) == 1 {
				return t[0], nil
			}
			return "", status.Error(codes.Unauthenticated, "no tenant")
		}),
	))
	defer stop()
	for _, tenant := range []string{"acme", "globex", "acme"} {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "idempotency-key", "order-1", "x-tenant", tenant)
		resp, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 500})
		fmt.Println(tenant, resp.GetChargeId(), err)
	}
	fmt.Println("charges made:", svc.Runs.Load())
	// Output:
	// acme ch_1_order-1 <nil>
	// globex ch_2_order-1 <nil>
	// acme ch_1_order-1 <nil>
	// charges made: 2
}

// ReasonOf tells a client why the interceptor refused a call: here a key
// reused for a different request.
func ExampleReasonOf() {
	client, stop := serveExample(newChargeService(), idempotency.UnaryServerInterceptor(idempotency.NewMemoryStore()))
	defer stop()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "idempotency-key", "order-2")
	_, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 500})
	fmt.Println("first:", err)
	_, err = client.Charge(ctx, &testingv1.ChargeRequest{Amount: 900}) // same key, another amount
	fmt.Println("second:", status.Code(err), idempotency.ReasonOf(err))
	// Output:
	// first: <nil>
	// second: FailedPrecondition KEY_REUSED
}

// A Redis store: one hash per scoped key, under the prefix, named by a
// fixed-length hash whatever the client sends. CheckConfig reports what the
// guarantee depends on; miniredis, which has no CONFIG command, cannot be
// checked.
func ExampleNewRedisStore() {
	mr := miniredis.NewMiniRedis()
	if err := mr.Start(); err != nil {
		log.Fatal(err)
	}
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	defer rdb.Close()
	store := idempotency.NewRedisStore(rdb, idempotency.WithKeyPrefix("payments:"), idempotency.WithRedisLogger(nil))

	client, stop := serveExample(newChargeService(), idempotency.UnaryServerInterceptor(store))
	defer stop()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "idempotency-key", "checkout/2026-11-24/cart-991/any-length-up-to-255-bytes")
	if _, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 500}); err != nil {
		log.Fatal(err)
	}
	for _, k := range mr.Keys() {
		fmt.Println(k[:len("payments:")], len(k)-len("payments:"), "hex digits;", "ttl:", mr.TTL(k))
	}
	for _, w := range store.CheckConfig(context.Background()) {
		fmt.Println(strings.SplitN(w, " (", 2)[0])
	}
	// Output:
	// payments: 64 hex digits; ttl: 24h0m0s
	// could not check maxmemory-policy and the other settings
}

// Lookup and Forget, for the support ticket "my charge is stuck": Lookup
// shows the record (never the response), Forget deletes it, and the next
// call with the key runs the handler again.
func ExampleForget() {
	store := idempotency.NewMemoryStore()
	svc := newChargeService()
	client, stop := serveExample(svc, idempotency.UnaryServerInterceptor(store))
	defer stop()
	const method = "/idempotency.testing.v1.TestService/Charge"
	ctx := metadata.AppendToOutgoingContext(context.Background(), "idempotency-key", "order-3")
	if _, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 500}); err != nil {
		log.Fatal(err)
	}
	info, err := idempotency.Lookup(ctx, store, method, "", "order-3")
	fmt.Println(info.State, info.Code, info.ResponseSize > 0, err)

	fmt.Println("forget:", idempotency.Forget(ctx, store, method, "", "order-3"))
	_, err = idempotency.Lookup(ctx, store, method, "", "order-3")
	fmt.Println(errors.Is(err, idempotency.ErrNoRecord))
	resp, _ := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 500})
	fmt.Println(resp.GetChargeId(), "charges made:", svc.Runs.Load())
	// Output:
	// completed OK true <nil>
	// forget: <nil>
	// true
	// ch_2_order-3 charges made: 2
}
