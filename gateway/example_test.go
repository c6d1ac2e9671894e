package idempotencygw_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"github.com/idempotency-grpc/idempotency"
	idempotencygw "github.com/idempotency-grpc/idempotency/gateway"
	testgw "github.com/idempotency-grpc/idempotency/gateway/internal/gen/idempotency/testing/v1"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	"google.golang.org/grpc"
)

// A REST client's double click through grpc-gateway: two POSTs with the
// same Idempotency-Key charge once, the second answer is the first one's
// marked Idempotency-Replayed, and the key reused for another amount is
// refused with 422.
func ExampleServeMuxOption() {
	// The gRPC server, as for gRPC clients: the interceptor over a store.
	svc := &testservice.Service{}
	client, stop, err := testservice.Start(svc, []grpc.ServerOption{grpc.ChainUnaryInterceptor(
		idempotency.UnaryServerInterceptor(idempotency.NewMemoryStore()),
	)})
	if err != nil {
		log.Fatal(err)
	}
	defer stop()

	// The gateway: one option on its mux, then the generated handlers as
	// usual (here RegisterTestServiceHandlerClient; yours may be
	// pb.RegisterXxxHandlerFromEndpoint).
	mux := runtime.NewServeMux(idempotencygw.ServeMuxOption())
	if err := testgw.RegisterTestServiceHandlerClient(context.Background(), mux, client); err != nil {
		log.Fatal(err)
	}
	srv := httptest.NewServer(mux)
	defer srv.Close()

	charge := func(body string) {
		req, err := http.NewRequest(http.MethodPost, srv.URL+"/v1/charge", strings.NewReader(body))
		if err != nil {
			log.Fatal(err)
		}
		req.Header.Set("Idempotency-Key", `"order-8812"`) // the draft's string; order-8812 bare works too
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			log.Fatal(err)
		}
		defer resp.Body.Close()
		var answer struct {
			ChargeID string `json:"chargeId"`
			Details  []struct {
				Reason string `json:"reason"`
			} `json:"details"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&answer); err != nil {
			log.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK {
			fmt.Println(resp.StatusCode, answer.Details[0].Reason)
			return
		}
		fmt.Println(resp.StatusCode, answer.ChargeID, "replayed:", resp.Header.Get("Idempotency-Replayed") == "true")
	}
	charge(`{"amount": 1999}`)
	charge(`{"amount": 1999}`)
	charge(`{"amount": 2999}`)
	fmt.Println("charges made:", svc.Runs.Load())
	// Output:
	// 200 ch_1 replayed: false
	// 200 ch_1 replayed: true
	// 422 KEY_REUSED
	// charges made: 1
}
