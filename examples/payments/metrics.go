package main

import (
	"context"
	"fmt"
	"net/http"

	"github.com/idempotency-grpc/idempotency"
	idempotencyotel "github.com/idempotency-grpc/idempotency/otel"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
)

// newMetrics returns the observer that records the idempotency
// interceptor's events as metrics, and the HTTP handler that serves them at
// /metrics: the otel module's observer (idempotencyotel.NewObserver) on an
// OpenTelemetry meter provider whose reader is OpenTelemetry's Prometheus
// exporter, served by promhttp. This is how a production server exposes
// them: the counter idempotency.server.calls appears as
// idempotency_server_calls_total and the histogram
// idempotency.store.duration as idempotency_store_duration_seconds, with the
// labels rpc_method, idempotency_outcome and idempotency_replayed.
func newMetrics() (observe func(context.Context, idempotency.Event), handler http.Handler, err error) {
	registry := prometheus.NewRegistry()
	exporter, err := otelprom.New(otelprom.WithRegisterer(registry), otelprom.WithoutScopeInfo())
	if err != nil {
		return nil, nil, fmt.Errorf("prometheus exporter: %w", err)
	}
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))
	observe, err = idempotencyotel.NewObserver(idempotencyotel.WithMeterProvider(provider))
	if err != nil {
		return nil, nil, fmt.Errorf("idempotency observer: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "idempotency metrics of the payments example: /metrics")
	})
	return observe, mux, nil
}
