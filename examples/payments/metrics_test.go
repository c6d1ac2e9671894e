package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// logWatcher collects a command's log and lets a test wait, without
// polling, until a line matching a pattern has been written.
type logWatcher struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed on the next write
}

func newLogWatcher() *logWatcher { return &logWatcher{changed: make(chan struct{})} }

func (w *logWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	close(w.changed)
	w.changed = make(chan struct{})
	return w.buf.Write(p)
}

func (w *logWatcher) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// waitFor returns the submatches of the first match of re in the log,
// waiting until there is one, ctx ends or exited is closed (nil: a line
// known to be logged already).
func (w *logWatcher) waitFor(ctx context.Context, t *testing.T, re *regexp.Regexp, exited <-chan struct{}) []string {
	t.Helper()
	for {
		w.mu.Lock()
		m := re.FindStringSubmatch(w.buf.String())
		changed := w.changed
		w.mu.Unlock()
		if m != nil {
			return m
		}
		select {
		case <-changed:
		case <-exited:
			t.Fatalf("the command exited before logging %q:\n%s", re, w)
		case <-ctx.Done():
			t.Fatalf("no log line matches %q: %v\n%s", re, ctx.Err(), w)
		}
	}
}

// startServe runs "payments serve" with args (plus --addr 127.0.0.1:0 and
// --metrics-addr 127.0.0.1:0) until the test ends or shutdown is called,
// which returns its exit code. It returns once every start line is logged.
func startServe(ctx context.Context, t *testing.T, args ...string) (addr, metricsURL string, logs *logWatcher, shutdown func() int) {
	t.Helper()
	logs = newLogWatcher()
	serveCtx, stop := context.WithCancel(ctx)
	exited := make(chan struct{})
	var code int
	go func() {
		defer close(exited)
		code = run(serveCtx, append([]string{"serve", "--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"}, args...), io.Discard, logs)
	}()
	shutdown = sync.OnceValue(func() int { stop(); <-exited; return code })
	t.Cleanup(func() { shutdown() })
	addr = logs.waitFor(ctx, t, regexp.MustCompile(`serving payments\.v1\.PaymentsService on (\S+) `), exited)[1]
	metricsURL = "http://" + logs.waitFor(ctx, t, regexp.MustCompile(`metrics at http://(\S+)/metrics`), exited)[1] + "/metrics"
	// The last start line: the lines about --local-cache and --quiet come
	// before it.
	logs.waitFor(ctx, t, regexp.MustCompile(`try: grpcurl`), exited)
	return addr, metricsURL, logs, shutdown
}

// scrapeMetrics GETs the Prometheus text at url.
func scrapeMetrics(ctx context.Context, t *testing.T, url string) string {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s, %v\n%s", url, resp.Status, err, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("Content-Type %q, want the Prometheus text format", ct)
	}
	return string(body)
}

// "payments serve --metrics-addr" as an operator runs it, with the embedded
// Redis: the counters move as calls come in, and "inspect" and "forget"
// work against the Redis address serve logs.
func TestServeMetricsInspectForget(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	// shutdown is what SIGINT does to "payments serve".
	addr, metricsURL, logs, shutdown := startServe(ctx, t)
	// Logged before the last start line, which startServe waited for.
	redisAddr := logs.waitFor(ctx, t, regexp.MustCompile(`embedded Redis at (\S+): while this server runs, look a record up with: payments inspect --redis (\S+) --key K`), nil)[1]

	// OpenTelemetry's Prometheus exporter sorts the labels by name.
	const charge = `rpc_method="/payments.v1.PaymentsService/Charge"`
	callsLine := func(outcome string, replayed bool, n int) string {
		return fmt.Sprintf(`idempotency_server_calls_total{idempotency_outcome="%s",idempotency_replayed="%t",%s} %d`+"\n", outcome, replayed, charge, n)
	}
	storeCount := func(outcome string, n int) string {
		return fmt.Sprintf(`idempotency_store_duration_seconds_count{idempotency_outcome="%s",%s} %d`+"\n", outcome, charge, n)
	}
	expectMetrics := func(when string, want []string, absent ...string) {
		t.Helper()
		got := scrapeMetrics(ctx, t, metricsURL)
		ok := true
		for _, w := range want {
			if !strings.Contains(got, w) {
				t.Errorf("%s: /metrics lacks %q", when, w)
				ok = false
			}
		}
		for _, a := range absent {
			if strings.Contains(got, a) {
				t.Errorf("%s: /metrics has %q", when, a)
				ok = false
			}
		}
		if !ok {
			t.Fatalf("/metrics %s:\n%s", when, got)
		}
	}
	chargeLine := regexp.MustCompile(`(?m)^charge: +(ch_\w+), 12\.34 EUR on acct_m,`)
	client := func(wantReplayed bool) string {
		t.Helper()
		var o, e bytes.Buffer
		code := run(ctx, []string{"client", "--addr", addr, "--account", "acct_m", "--amount", "1234", "--key", "m-1"}, &o, &e)
		m := chargeLine.FindStringSubmatch(o.String())
		if code != 0 || m == nil || !strings.Contains(o.String(), fmt.Sprintf("replayed: %t", wantReplayed)) {
			t.Fatalf("client: exit %d, want 0 and replayed: %t\n%s%s", code, wantReplayed, &o, &e)
		}
		return m[1]
	}
	admin := func(args ...string) (code int, stdout, stderr string) {
		var o, e bytes.Buffer
		code = run(ctx, args, &o, &e)
		return code, o.String(), e.String()
	}

	expectMetrics("before any call", nil, "idempotency_server_calls_total{")

	first := client(false)
	expectMetrics("after the first charge", []string{
		"# HELP idempotency_server_calls_total Calls handled by the idempotency server interceptor, by outcome.\n",
		"# TYPE idempotency_server_calls_total counter\n",
		"# TYPE idempotency_store_duration_seconds histogram\n",
		callsLine("executed", false, 1), storeCount("executed", 1),
		`idempotency_store_duration_seconds_bucket{idempotency_outcome="executed",` + charge + `,le="+Inf"} 1` + "\n",
		`idempotency_store_duration_seconds_sum{idempotency_outcome="executed",` + charge + `} `,
	}, `idempotency_outcome="replayed"`)

	if again := client(true); again != first {
		t.Fatalf("the repeat got charge %s, want the first one, %s", again, first)
	}
	expectMetrics("after the repeat", []string{callsLine("executed", false, 1), callsLine("replayed", true, 1),
		storeCount("executed", 1), storeCount("replayed", 1)})

	// inspect, with the method as grpcurl writes it (no leading slash).
	code, out, errOut := admin("inspect", "--redis", redisAddr, "--method", "payments.v1.PaymentsService/Charge", "--key", "m-1")
	if code != 0 {
		t.Fatalf("inspect: exit %d\n%s%s", code, out, errOut)
	}
	for _, re := range []string{
		`(?m)^record: +key "m-1" on /payments\.v1\.PaymentsService/Charge$`,
		`(?m)^store: +Redis at ` + regexp.QuoteMeta(redisAddr) + `, Redis key idempotency:[0-9a-f]{64}$`,
		`(?m)^state: +completed$`,
		`(?m)^method: +/payments\.v1\.PaymentsService/Charge$`,
		`(?m)^age: +[0-9.]+(ms|s) \(completed \d{4}-\d\d-\d\dT`,
		`(?m)^ttl: +23h59m[0-9.]+s \(retention left\)$`, // counting down from 24h
		`(?m)^code: +OK \(a stored response: repeats get it back\)$`,
		`(?m)^response: +[1-9]\d* bytes$`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("inspect output does not match %s:\n%s", re, out)
		}
	}

	code, out, errOut = admin("forget", "--redis", redisAddr, "--key", "m-1")
	if code != 0 || !strings.Contains(out, `forgot the record of key "m-1" on /payments.v1.PaymentsService/Charge (it was completed)`) {
		t.Fatalf("forget: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = admin("inspect", "--redis", redisAddr, "--key", "m-1")
	if code != 1 || out != "" || !strings.Contains(errOut, `payments inspect: no record for key "m-1" on /payments.v1.PaymentsService/Charge`) {
		t.Errorf("inspect after forget: exit %d, stdout %q, stderr %q; want 1 and no record", code, out, errOut)
	}
	code, _, errOut = admin("forget", "--redis", redisAddr, "--key", "m-1")
	if code != 1 || !strings.Contains(errOut, "payments forget: no record for key") {
		t.Errorf("forget twice: exit %d, stderr %q; want 1 and no record", code, errOut)
	}

	// Forgotten: the same key charges again, with a new charge.
	if third := client(false); third == first {
		t.Errorf("after forget the key was replayed (%s), want a new charge", third)
	}
	expectMetrics("after forget and a new charge", []string{callsLine("executed", false, 2), callsLine("replayed", true, 1),
		storeCount("executed", 2)})

	if code := shutdown(); code != 0 {
		t.Errorf("serve: exit %d\n%s", code, logs)
	}
	got := logs.String()
	for _, want := range []string{"Charge key=m-1 executed: OK " + first, "Charge key=m-1 replayed: OK " + first, "stopped"} {
		if !strings.Contains(got, want) {
			t.Errorf("server log lacks %q:\n%s", want, got)
		}
	}
}
