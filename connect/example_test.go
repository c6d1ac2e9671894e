package idempotencyconnect_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
	idempotencyconnect "github.com/idempotency-grpc/idempotency/connect"
	"github.com/idempotency-grpc/idempotency/connect/internal/gen/idempotency/testing/v1/testingv1connect"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
)

// A connect-go handler with the interceptor: a Connect client retries a
// charge with the same key, the handler runs once, and the retry gets the
// first answer, marked as a replay. A gRPC-Web client with the key gets it
// too.
func ExampleNewInterceptor() {
	p := idempotency.NewProtocol(idempotency.NewMemoryStore())
	svc := &service{}
	mux := http.NewServeMux()
	mux.Handle(testingv1connect.NewTestServiceHandler(svc,
		connect.WithInterceptors(idempotencyconnect.NewInterceptor(p))))
	srv := httptest.NewServer(mux)
	defer srv.Close()

	charge := func(client testingv1connect.TestServiceClient, key string) {
		req := connect.NewRequest(&testingv1.ChargeRequest{Amount: 1000})
		req.Header().Set("Idempotency-Key", key)
		resp, err := client.Charge(context.Background(), req)
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Printf("charge %s, replayed %v\n", resp.Msg.GetChargeId(), idempotencyconnect.Replayed(resp.Header()))
	}
	// On the Connect protocol the key may come as the IETF draft's quoted
	// string; on gRPC-Web, as on gRPC, it is metadata, sent as it is.
	charge(testingv1connect.NewTestServiceClient(srv.Client(), srv.URL), `"order-42"`)
	charge(testingv1connect.NewTestServiceClient(srv.Client(), srv.URL), "order-42")
	charge(testingv1connect.NewTestServiceClient(srv.Client(), srv.URL, connect.WithGRPCWeb()), "order-42")

	_, err := testingv1connect.NewTestServiceClient(srv.Client(), srv.URL).Charge(context.Background(),
		connect.NewRequest(&testingv1.ChargeRequest{Amount: 1000}))
	fmt.Println(connect.CodeOf(err), idempotencyconnect.ReasonOf(err))
	fmt.Println("executions:", svc.runs.Load())
	// Output:
	// charge ch_1, replayed false
	// charge ch_1, replayed true
	// charge ch_1, replayed true
	// invalid_argument KEY_REQUIRED
	// executions: 1
}
