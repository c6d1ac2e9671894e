package idempotencyotel_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"sort"
	"strings"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	idempotencyotel "github.com/idempotency-grpc/idempotency/otel"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Prometheus users export the interceptor's metrics through OpenTelemetry's
// Prometheus exporter and serve them with promhttp. A call and its repeat
// show up as one executed and one replayed call.
func Example_prometheus() {
	registry := prometheus.NewRegistry()
	exporter, err := otelprom.New(otelprom.WithRegisterer(registry), otelprom.WithoutScopeInfo())
	if err != nil {
		log.Fatal(err)
	}
	observe, err := idempotencyotel.NewObserver(idempotencyotel.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))))
	if err != nil {
		log.Fatal(err)
	}

	// The repository's test service, in memory.
	client, stop, err := testservice.Start(&testservice.Service{}, []grpc.ServerOption{grpc.ChainUnaryInterceptor(
		idempotency.UnaryServerInterceptor(idempotency.NewMemoryStore(), idempotency.WithObserver(observe)))})
	if err != nil {
		log.Fatal(err)
	}
	defer stop()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "idempotency-key", "k1")
	for i := 0; i < 2; i++ {
		if _, err := client.Do(ctx, &testingv1.DoRequest{Id: "x"}); err != nil {
			log.Fatal(err)
		}
	}

	// What a Prometheus scrape of /metrics returns.
	metrics := httptest.NewServer(promhttp.HandlerFor(registry, promhttp.HandlerOpts{}))
	defer metrics.Close()
	resp, err := metrics.Client().Get(metrics.URL)
	if err != nil {
		log.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var lines []string
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "idempotency_server_calls_total{") || strings.HasPrefix(l, "idempotency_store_duration_seconds_count{") {
			lines = append(lines, l)
		}
	}
	sort.Strings(lines)
	for _, l := range lines {
		fmt.Println(l)
	}
	// Output:
	// idempotency_server_calls_total{idempotency_outcome="executed",idempotency_replayed="false",rpc_method="/idempotency.testing.v1.TestService/Do"} 1
	// idempotency_server_calls_total{idempotency_outcome="replayed",idempotency_replayed="true",rpc_method="/idempotency.testing.v1.TestService/Do"} 1
	// idempotency_store_duration_seconds_count{idempotency_outcome="executed",rpc_method="/idempotency.testing.v1.TestService/Do"} 1
	// idempotency_store_duration_seconds_count{idempotency_outcome="replayed",rpc_method="/idempotency.testing.v1.TestService/Do"} 1
}
