package idempotency_test

import (
	"context"
	"fmt"
	"log"
	"net"

	"github.com/alicebob/miniredis/v2"
	"github.com/idempotency-grpc/idempotency"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"
)

type chargeServer struct {
	testingv1.UnimplementedTestServiceServer
	charges int
}

func (s *chargeServer) Charge(ctx context.Context, req *testingv1.ChargeRequest) (*testingv1.ChargeResponse, error) {
	s.charges++
	key, _ := idempotency.KeyFromContext(ctx) // pass it on to the payment provider
	return &testingv1.ChargeResponse{ChargeId: fmt.Sprintf("ch_%d_%s", s.charges, key)}, nil
}

// The server interceptor on a Redis store: the second call with the same
// key is answered from Redis, and the handler runs once.
func ExampleUnaryServerInterceptor() {
	mr := miniredis.NewMiniRedis() // your Redis: standalone, Sentinel or Cluster
	if err := mr.Start(); err != nil {
		log.Fatal(err)
	}
	defer mr.Close()
	rdb := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: []string{mr.Addr()}})
	defer rdb.Close()

	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(
		// authentication first, so WithScope can read the principal
		idempotency.UnaryServerInterceptor(idempotency.NewRedisStore(rdb)),
	))
	svc := &chargeServer{}
	testingv1.RegisterTestServiceServer(srv, svc)
	lis := bufconn.Listen(1 << 20)
	go srv.Serve(lis)
	defer srv.Stop()

	conn, _ := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer conn.Close()
	client := testingv1.NewTestServiceClient(conn)

	ctx := metadata.AppendToOutgoingContext(context.Background(), "idempotency-key", "order-8812")
	for i := 0; i < 2; i++ {
		var header metadata.MD
		resp, err := client.Charge(ctx, &testingv1.ChargeRequest{Amount: 1999}, grpc.Header(&header))
		fmt.Println(resp.GetChargeId(), err, "replayed:", idempotency.Replayed(header))
	}
	fmt.Println("charges made:", svc.charges)
	// Output:
	// ch_1_order-8812 <nil> replayed: false
	// ch_1_order-8812 <nil> replayed: true
	// charges made: 1
}

// A multi-tenant server scopes keys by the authenticated caller, so one
// tenant can never receive another's stored response.
func ExampleWithScope() {
	type principalKey struct{}
	interceptor := idempotency.UnaryServerInterceptor(idempotency.NewMemoryStore(),
		idempotency.WithScope(func(ctx context.Context) (string, error) {
			user, _ := ctx.Value(principalKey{}).(string) // set by your auth interceptor
			return user, nil
		}),
	)
	_ = grpc.NewServer(grpc.ChainUnaryInterceptor(interceptor))
	fmt.Println("ok")
	// Output: ok
}
