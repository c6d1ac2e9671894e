package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/idempotency-grpc/idempotency"
)

// metrics counts the idempotency interceptor's events and serves them at
// /metrics in the Prometheus text exposition format (version 0.0.4), written
// by hand so that the example needs no metrics library.
//
// The names, labels and descriptions are those the otel module's observer
// (idempotencyotel.NewObserver) gets through OpenTelemetry's Prometheus
// exporter: the counter idempotency.server.calls becomes
// idempotency_server_calls_total and the histogram idempotency.store.duration
// (unit s) becomes idempotency_store_duration_seconds, with the attributes
// rpc.method, idempotency.outcome and idempotency.replayed as the labels
// rpc_method, idempotency_outcome and idempotency_replayed. So a dashboard
// built on this endpoint keeps working on the real exporter, which adds only
// its otel_scope_* labels and target_info. The histogram's buckets are
// chosen for store round trips (0.25 ms to 1 s) rather than OpenTelemetry's
// defaults.
//
// A production server would use idempotencyotel.NewObserver with
// OpenTelemetry's Prometheus exporter instead; the otel module is a separate
// Go module, which the root module (and so this example) does not depend on.
type metrics struct {
	mu    sync.Mutex
	calls map[callSeries]uint64
	store map[storeSeries]*histogram
}

// callSeries is one series of idempotency_server_calls_total.
type callSeries struct {
	method, outcome string
	replayed        bool
}

// storeSeries is one series of idempotency_store_duration_seconds.
type storeSeries struct{ method, outcome string }

// storeBuckets are the upper bounds, in seconds, of the store latency
// histogram's buckets (+Inf is implied).
var storeBuckets = []float64{0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}

type histogram struct {
	counts []uint64 // per bucket of storeBuckets, not cumulative
	count  uint64   // observations, +Inf bucket included
	sum    float64
}

func newMetrics() *metrics {
	return &metrics{calls: make(map[callSeries]uint64), store: make(map[storeSeries]*histogram)}
}

// observe records one event. It is chained into the interceptor's observer
// (see newServer), as idempotencyotel.NewObserver's would be.
func (m *metrics) observe(_ context.Context, e idempotency.Event) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls[callSeries{e.Method, string(e.Outcome), e.Outcome == idempotency.OutcomeReplayed}]++
	if e.StoreLatency <= 0 { // no store round trip (as in the otel observer)
		return
	}
	k := storeSeries{e.Method, string(e.Outcome)}
	h := m.store[k]
	if h == nil {
		h = &histogram{counts: make([]uint64, len(storeBuckets))}
		m.store[k] = h
	}
	s := e.StoreLatency.Seconds()
	if i, _ := slices.BinarySearch(storeBuckets, s); i < len(storeBuckets) {
		h.counts[i]++
	}
	h.count++
	h.sum += s
}

const (
	callsName      = "idempotency_server_calls_total"
	callsHelp      = "Calls handled by the idempotency server interceptor, by outcome."
	storeName      = "idempotency_store_duration_seconds"
	storeHelp      = "Time spent in the idempotency store per call."
	metricsCType   = "text/plain; version=0.0.4; charset=utf-8"
	labelMethod    = "rpc_method"
	labelOutcome   = "idempotency_outcome"
	labelReplayed  = "idempotency_replayed"
	labelBucketMax = "le"
)

// write writes every series in the text exposition format, in a stable
// order: by method, then outcome, then replayed.
func (m *metrics) write(w io.Writer) error {
	var b strings.Builder
	m.mu.Lock()
	calls := make([]callSeries, 0, len(m.calls))
	for k := range m.calls {
		calls = append(calls, k)
	}
	slices.SortFunc(calls, func(x, y callSeries) int {
		if c := strings.Compare(x.method, y.method); c != 0 {
			return c
		}
		if c := strings.Compare(x.outcome, y.outcome); c != 0 {
			return c
		}
		return boolCompare(x.replayed, y.replayed)
	})
	fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s counter\n", callsName, escapeHelp(callsHelp), callsName)
	for _, k := range calls {
		fmt.Fprintf(&b, "%s{%s=%s,%s=%s,%s=%s} %d\n", callsName,
			labelMethod, quoteLabel(k.method), labelOutcome, quoteLabel(k.outcome),
			labelReplayed, quoteLabel(strconv.FormatBool(k.replayed)), m.calls[k])
	}

	stores := make([]storeSeries, 0, len(m.store))
	for k := range m.store {
		stores = append(stores, k)
	}
	slices.SortFunc(stores, func(x, y storeSeries) int {
		if c := strings.Compare(x.method, y.method); c != 0 {
			return c
		}
		return strings.Compare(x.outcome, y.outcome)
	})
	fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s histogram\n", storeName, escapeHelp(storeHelp), storeName)
	for _, k := range stores {
		h := m.store[k]
		labels := labelMethod + "=" + quoteLabel(k.method) + "," + labelOutcome + "=" + quoteLabel(k.outcome)
		var cum uint64
		for i, le := range storeBuckets {
			cum += h.counts[i]
			fmt.Fprintf(&b, "%s_bucket{%s,%s=%s} %d\n", storeName, labels, labelBucketMax, quoteLabel(formatFloat(le)), cum)
		}
		fmt.Fprintf(&b, "%s_bucket{%s,%s=\"+Inf\"} %d\n", storeName, labels, labelBucketMax, h.count)
		fmt.Fprintf(&b, "%s_sum{%s} %s\n", storeName, labels, formatFloat(h.sum))
		fmt.Fprintf(&b, "%s_count{%s} %d\n", storeName, labels, h.count)
	}
	m.mu.Unlock()
	_, err := io.WriteString(w, b.String())
	return err
}

// ServeHTTP serves /metrics.
func (m *metrics) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	w.Header().Set("Content-Type", metricsCType)
	if r.Method == http.MethodHead {
		return
	}
	_ = m.write(w)
}

// metricsHandler serves m at /metrics, and a pointer to it at /.
func metricsHandler(m *metrics) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", m)
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "idempotency metrics of the payments example: /metrics")
	})
	return mux
}

func boolCompare(x, y bool) int {
	switch {
	case x == y:
		return 0
	case !x:
		return -1
	}
	return 1
}

// labelEscaper escapes a label value as the exposition format requires:
// backslash, double quote and line feed.
var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

func quoteLabel(v string) string { return `"` + labelEscaper.Replace(v) + `"` }

// helpEscaper escapes HELP text: backslash and line feed.
var helpEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`)

func escapeHelp(s string) string { return helpEscaper.Replace(s) }

// formatFloat formats a sample value or bucket bound as Prometheus's own
// client does.
func formatFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }
