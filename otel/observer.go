// Package idempotencyotel turns the events of the idempotency interceptors
// into OpenTelemetry metrics and span attributes. It lives in its own Go
// module so the core library does not depend on OpenTelemetry.
//
// Prometheus users export these metrics through OpenTelemetry's Prometheus
// exporter (go.opentelemetry.io/otel/exporters/prometheus), where the names
// become idempotency_server_calls_total and
// idempotency_store_duration_seconds.
package idempotencyotel

import (
	"context"

	"github.com/idempotency-grpc/idempotency"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// ScopeName is the instrumentation scope of the meter.
const ScopeName = "github.com/idempotency-grpc/idempotency/otel"

// Metric names, following OpenTelemetry's semantic-convention style.
const (
	// CallsMetric counts calls handled by the server interceptor, by
	// rpc.method, idempotency.outcome and idempotency.replayed.
	CallsMetric = "idempotency.server.calls"
	// ClientCallsMetric counts logical calls made through the client
	// interceptor, by rpc.method, rpc.grpc.status_code and
	// idempotency.replayed.
	ClientCallsMetric = "idempotency.client.calls"
	// ClientAttemptsMetric is a histogram of attempts per logical call (1 =
	// no retry), by rpc.method.
	ClientAttemptsMetric = "idempotency.client.attempts"
	// StoreDurationMetric is a histogram of the time spent in the store per
	// call (claim, plus complete or release), in seconds, by rpc.method and
	// idempotency.outcome.
	StoreDurationMetric = "idempotency.store.duration"
)

// Attribute keys set on metrics and on the current span.
const (
	AttrMethod   = attribute.Key("rpc.method")
	AttrOutcome  = attribute.Key("idempotency.outcome")
	AttrReplayed = attribute.Key("idempotency.replayed")
	AttrKeyHash  = attribute.Key("idempotency.key_hash")
	AttrCode     = attribute.Key("rpc.grpc.status_code")
)

// Option configures [NewObserver].
type Option func(*config)

type config struct {
	mp metric.MeterProvider
}

// WithMeterProvider sets the meter provider. Default: the global one
// (otel.GetMeterProvider).
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(c *config) { c.mp = mp }
}

// meter applies opts and returns the package's meter.
func meter(opts []Option) metric.Meter {
	c := &config{}
	for _, o := range opts {
		o(c)
	}
	if c.mp == nil {
		c.mp = otel.GetMeterProvider()
	}
	return c.mp.Meter(ScopeName)
}

// NewObserver returns an observer for idempotency.WithObserver that records
// every event as metrics and annotates the call's current span with the
// outcome, whether it was replayed and the key's hash (never the key).
func NewObserver(opts ...Option) (func(context.Context, idempotency.Event), error) {
	m := meter(opts)
	calls, err := m.Int64Counter(CallsMetric, metric.WithUnit("{call}"),
		metric.WithDescription("Calls handled by the idempotency server interceptor, by outcome."))
	if err != nil {
		return nil, err
	}
	storeDur, err := m.Float64Histogram(StoreDurationMetric, metric.WithUnit("s"),
		metric.WithDescription("Time spent in the idempotency store per call."),
		// A store call is a Redis round trip or two: sub-millisecond to a
		// second, far below OpenTelemetry's default bounds (0 to 10000).
		metric.WithExplicitBucketBoundaries(0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context, e idempotency.Event) {
		replayed := e.Outcome == idempotency.OutcomeReplayed
		attrs := metric.WithAttributes(AttrMethod.String(e.Method), AttrOutcome.String(string(e.Outcome)), AttrReplayed.Bool(replayed))
		calls.Add(ctx, 1, attrs)
		if e.StoreLatency > 0 {
			storeDur.Record(ctx, e.StoreLatency.Seconds(), metric.WithAttributes(AttrMethod.String(e.Method), AttrOutcome.String(string(e.Outcome))))
		}
		span := trace.SpanFromContext(ctx)
		if !span.IsRecording() {
			return
		}
		kv := []attribute.KeyValue{AttrOutcome.String(string(e.Outcome)), AttrReplayed.Bool(replayed), AttrCode.Int(int(e.Code))}
		if e.KeyHash != "" {
			kv = append(kv, AttrKeyHash.String(e.KeyHash))
		}
		span.SetAttributes(kv...)
		span.AddEvent("idempotency."+string(e.Outcome), trace.WithAttributes(kv...))
	}, nil
}

// NewClientObserver returns an observer for idempotency.WithClientObserver
// that counts logical calls and records how many attempts each needed.
func NewClientObserver(opts ...Option) (func(context.Context, idempotency.ClientEvent), error) {
	m := meter(opts)
	calls, err := m.Int64Counter(ClientCallsMetric, metric.WithUnit("{call}"),
		metric.WithDescription("Logical calls made through the idempotency client interceptor."))
	if err != nil {
		return nil, err
	}
	attempts, err := m.Int64Histogram(ClientAttemptsMetric, metric.WithUnit("{attempt}"),
		metric.WithDescription("Attempts per logical call made through the idempotency client interceptor."),
		metric.WithExplicitBucketBoundaries(1, 2, 3, 4, 5, 10))
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context, e idempotency.ClientEvent) {
		calls.Add(ctx, 1, metric.WithAttributes(AttrMethod.String(e.Method), AttrCode.Int(int(e.Code)), AttrReplayed.Bool(e.Replayed)))
		attempts.Record(ctx, int64(e.Attempts), metric.WithAttributes(AttrMethod.String(e.Method)))
		if span := trace.SpanFromContext(ctx); span.IsRecording() {
			kv := []attribute.KeyValue{AttrReplayed.Bool(e.Replayed), attribute.Int("idempotency.attempts", e.Attempts)}
			if e.KeyHash != "" {
				kv = append(kv, AttrKeyHash.String(e.KeyHash))
			}
			span.SetAttributes(kv...)
		}
	}, nil
}
