package main

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"

	"github.com/idempotency-grpc/idempotency"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// The benchmark flags of serve (--bare, --local-cache, --quiet) refuse what
// they cannot do, before anything is started.
func TestServeBenchFlagsRejected(t *testing.T) {
	t.Parallel()
	// Canceled: should a case be wrongly accepted, serve stops at once
	// (exit 0, which the case then reports).
	ctx, cancel := context.WithCancel(testContext(t))
	cancel()
	for _, tc := range []struct {
		args []string
		code int
		want string // in stderr
	}{
		{[]string{"--local-cache", "-1"}, 1, "payments serve: --local-cache -1: want a number of entries, or 0 for none"},
		{[]string{"--local-cache", "many"}, 2, `invalid value "many" for flag -local-cache`},
		{[]string{"--quiet=maybe"}, 2, `invalid boolean value "maybe" for -quiet`},
		{[]string{"--bare=maybe"}, 2, `invalid boolean value "maybe" for -bare`},
		{[]string{"--bare", "--redis", "127.0.0.1:1"}, 1, "payments serve: --bare serves without the idempotency interceptor and its store: drop --redis\n"},
		{[]string{"--bare", "--postgres", "postgres://127.0.0.1:1/x"}, 1, "drop --postgres\n"},
		{[]string{"--bare", "--lease", "5s"}, 1, "drop --lease\n"},
		{[]string{"--bare", "--local-cache", "100"}, 1, "drop --local-cache\n"},
		{[]string{"--bare", "--chaos-kill", "0.1"}, 1, "drop --chaos-kill\n"},
		// Given is enough, even at the default value; in the order of their names.
		{[]string{"--lease", "0", "--bare", "--chaos-kill", "0"}, 1, "drop --chaos-kill, --lease\n"},
	} {
		var stderr bytes.Buffer
		args := append([]string{"serve", "--addr", "127.0.0.1:0"}, tc.args...)
		if code := run(ctx, args, io.Discard, &stderr); code != tc.code || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("run(%q) = %d, stderr %q; want %d and %q", args, code, stderr.String(), tc.code, tc.want)
		}
	}
}

// charge sends one Charge with key in the request metadata, as ghz and
// grpcurl send it (no client interceptor), and returns the charge id and
// whether the answer was marked replayed.
func charge(ctx context.Context, t *testing.T, conn *grpc.ClientConn, key string) (id string, replayed bool) {
	t.Helper()
	var header metadata.MD
	resp, err := paymentsv1.NewPaymentsServiceClient(conn).Charge(
		metadata.AppendToOutgoingContext(ctx, idempotency.DefaultKeyHeader, key),
		&paymentsv1.ChargeRequest{AccountId: "acct_b", AmountCents: 1999, Currency: "EUR"},
		grpc.Header(&header))
	if err != nil {
		t.Fatalf("Charge with key %q: %v", key, err)
	}
	return resp.GetCharge().GetId(), strings.Join(header.Get(idempotency.ReplayedHeader), ",") == "true"
}

// serve --bare --quiet, the baseline of bench/ghz.sh: no store, no
// interceptor (a repeated key charges again, with no replayed header), and
// no log line per call.
func TestServeBareQuiet(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	addr, metricsURL, logs, shutdown := startServe(ctx, t, "--bare", "--quiet")
	if !strings.Contains(logs.String(), "idempotency store: none (--bare: no idempotency interceptor, keys are ignored)") {
		t.Errorf("the start lines do not say --bare:\n%s", logs)
	}
	if strings.Contains(logs.String(), "embedded Redis") {
		t.Errorf("--bare started an embedded Redis:\n%s", logs)
	}
	conn, err := dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	first, r1 := charge(ctx, t, conn, "b-1")
	second, r2 := charge(ctx, t, conn, "b-1")
	if first == second || r1 || r2 {
		t.Errorf("two calls with key b-1: charges %s (replayed %t), %s (replayed %t); want two charges, neither replayed", first, r1, second, r2)
	}
	if m := scrapeMetrics(ctx, t, metricsURL); strings.Contains(m, "idempotency_server_calls_total{") {
		t.Errorf("/metrics counts interceptor calls, but there is no interceptor:\n%s", m)
	}
	conn.Close()
	if code := shutdown(); code != 0 {
		t.Errorf("serve exited %d, want 0", code)
	}
	got := logs.String()
	if strings.Contains(got, "Charge key=") || !strings.Contains(got, "--quiet: no log line per call") || !strings.Contains(got, "stopped") {
		t.Errorf("--quiet log: want the start and stop lines and no line per call:\n%s", got)
	}
}

// serve --local-cache: a repeat on the same server is replayed from memory,
// with no store round trip (the metrics record no store time for it). Without
// --quiet each call is still logged, as in the demo.
func TestServeLocalCache(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	addr, metricsURL, logs, shutdown := startServe(ctx, t, "--local-cache", "10")
	if !strings.Contains(logs.String(), "local cache: up to 10 completed records in memory, each for up to 1m0s") {
		t.Errorf("the start lines do not describe the local cache:\n%s", logs)
	}
	conn, err := dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	first, r1 := charge(ctx, t, conn, "c-1")
	second, r2 := charge(ctx, t, conn, "c-1")
	if first != second || r1 || !r2 {
		t.Errorf("two calls with key c-1: charges %s (replayed %t), %s (replayed %t); want one charge, the second replayed", first, r1, second, r2)
	}
	const chargeMethod = `rpc_method="/payments.v1.PaymentsService/Charge"`
	m := scrapeMetrics(ctx, t, metricsURL)
	for _, want := range []string{
		`idempotency_server_calls_total{idempotency_outcome="executed",idempotency_replayed="false",` + chargeMethod + `} 1` + "\n",
		`idempotency_server_calls_total{idempotency_outcome="replayed",idempotency_replayed="true",` + chargeMethod + `} 1` + "\n",
		`idempotency_store_duration_seconds_count{idempotency_outcome="executed",` + chargeMethod + `} 1` + "\n",
	} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if strings.Contains(m, `idempotency_store_duration_seconds_count{idempotency_outcome="replayed"`) {
		t.Errorf("the replay went to the store, want it answered from the local cache")
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", m)
	}
	conn.Close()
	if code := shutdown(); code != 0 {
		t.Errorf("serve exited %d, want 0", code)
	}
	for _, want := range []string{"Charge key=c-1 executed: OK " + first, "Charge key=c-1 replayed: OK " + first} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
}
