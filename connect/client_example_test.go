package idempotencyconnect_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
	idempotencyconnect "github.com/idempotency-grpc/idempotency/connect"
	"github.com/idempotency-grpc/idempotency/connect/internal/gen/idempotency/testing/v1/testingv1connect"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
)

// A connect-go client with the client interceptor, against a server whose
// first answer is lost after the charge was made (a proxy answers 503).
// The interceptor retries with the same key; the server replays the first
// charge instead of charging again.
func ExampleNewClientInterceptor() {
	svc := &service{} // Charge answers "ch_<execution>"
	url, stop := exampleServer(svc, true)
	defer stop()

	client := testingv1connect.NewTestServiceClient(http.DefaultClient, url,
		connect.WithInterceptors(idempotencyconnect.NewClientInterceptor(
			idempotencyconnect.WithBackoff(10*time.Millisecond, time.Second))))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var info idempotency.CallInfo
	resp, err := client.Charge(idempotencyconnect.WithCallResult(ctx, &info),
		connect.NewRequest(&testingv1.ChargeRequest{Amount: 1299}))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(resp.Msg.GetChargeId(), "replayed:", idempotencyconnect.Replayed(resp.Header()), "attempts:", info.Attempts)
	fmt.Println("charges:", svc.runs.Load())
	// Output:
	// ch_1 replayed: true attempts: 2
	// charges: 1
}

// A key from the caller's own records (an order id), given with
// idempotency.WithKey, as to the core's gRPC client interceptor: a job run
// again after a crash reuses it, and gets the first run's charge. Here the
// second run speaks gRPC-Web; the key means the same on every protocol.
func ExampleNewClientInterceptor_withKey() {
	svc := &service{}
	url, stop := exampleServer(svc, false)
	defer stop()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctx = idempotency.WithKey(ctx, "order-8812")
	for _, protocol := range []connect.ClientOption{connect.WithProtoJSON(), connect.WithGRPCWeb()} {
		client := testingv1connect.NewTestServiceClient(http.DefaultClient, url, protocol,
			connect.WithInterceptors(idempotencyconnect.NewClientInterceptor()))
		var info idempotency.CallInfo
		resp, err := client.Charge(idempotencyconnect.WithCallResult(ctx, &info),
			connect.NewRequest(&testingv1.ChargeRequest{Amount: 1299}))
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(resp.Msg.GetChargeId(), "key:", info.Key, "replayed:", info.Replayed)
	}
	// Output:
	// ch_1 key: order-8812 replayed: false
	// ch_1 key: order-8812 replayed: true
}

// exampleServer serves svc with the server interceptor on an HTTP/1.1
// test server; with loseFirst, the first answer is lost on its way back.
func exampleServer(svc *service, loseFirst bool) (url string, stop func()) {
	p := idempotency.NewProtocol(idempotency.NewMemoryStore())
	path, h := testingv1connect.NewTestServiceHandler(svc,
		connect.WithInterceptors(idempotencyconnect.NewInterceptor(p)))
	var lost atomic.Bool
	mux := http.NewServeMux()
	mux.Handle(path, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if loseFirst && lost.CompareAndSwap(false, true) {
			h.ServeHTTP(httptest.NewRecorder(), r)       // charged and stored...
			w.WriteHeader(http.StatusServiceUnavailable) // ...but the answer is lost
			return
		}
		h.ServeHTTP(w, r)
	}))
	srv := httptest.NewServer(mux)
	return srv.URL, srv.Close
}
