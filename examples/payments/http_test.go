package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
)

// "payments serve --http-addr" as a user tries it: a charge made through
// gRPC (the client command) is replayed to curl-like HTTP clients of the
// Connect protocol under the same key, marked, with the same charge; a
// different amount under the key is refused; and the ledger holds one
// charge. The log line of the HTTP call says what the interceptor did.
func TestServeHTTP(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	addr, _, logs, _ := startServe(ctx, t, "--http-addr", "127.0.0.1:0")
	httpAddr := logs.waitFor(ctx, t, regexp.MustCompile(`to HTTP clients \(Connect, gRPC-Web, gRPC over h2c\) on http://(\S+),`), nil)[1]
	logs.waitFor(ctx, t, regexp.MustCompile(`try: curl .* http://`+regexp.QuoteMeta(httpAddr)+`/payments\.v1\.PaymentsService/Charge`), nil)

	var o, e bytes.Buffer
	if code := run(ctx, []string{"client", "--addr", addr, "--account", "acct_h", "--amount", "500", "--key", "h-1"}, &o, &e); code != 0 {
		t.Fatalf("client: exit %d\n%s%s", code, &o, &e)
	}
	first := regexp.MustCompile(`(?m)^charge: +(ch_\w+),`).FindStringSubmatch(o.String())
	if first == nil {
		t.Fatalf("client printed no charge:\n%s", &o)
	}

	post := func(procedure, key, body string) (int, http.Header, map[string]any) {
		t.Helper()
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+httpAddr+"/payments.v1.PaymentsService/"+procedure, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatalf("%s: body %s: %v", procedure, b, err)
		}
		return resp.StatusCode, resp.Header, m
	}
	chargeID := func(m map[string]any) string {
		c, _ := m["charge"].(map[string]any)
		id, _ := c["id"].(string)
		return id
	}

	for _, key := range []string{`"h-1"`, "h-1"} {
		code, h, m := post("Charge", key, `{"account_id":"acct_h","amount_cents":500,"currency":"EUR"}`)
		if code != http.StatusOK || h.Get("Idempotency-Replayed") != "true" || chargeID(m) != first[1] {
			t.Errorf("Connect POST with key %s: %d, replayed %q, charge %q; want 200, the replay of %s", key, code, h.Get("Idempotency-Replayed"), chargeID(m), first[1])
		}
	}
	code, _, m := post("Charge", "h-1", `{"account_id":"acct_h","amount_cents":501,"currency":"EUR"}`)
	if code != http.StatusBadRequest || m["code"] != "failed_precondition" || !strings.Contains(fmt.Sprint(m["details"]), "KEY_REUSED") {
		t.Errorf("another amount under the key: %d %v; want 400 failed_precondition with KEY_REUSED", code, m)
	}
	code, _, m = post("Charge", "", `{"account_id":"acct_h","amount_cents":500,"currency":"EUR"}`)
	if code != http.StatusBadRequest || m["code"] != "invalid_argument" {
		t.Errorf("no key: %d %v; want 400 invalid_argument (Charge requires a key)", code, m)
	}
	code, _, m = post("ListCharges", "", `{"account_id":"acct_h"}`)
	if charges, _ := m["charges"].([]any); code != http.StatusOK || len(charges) != 1 {
		t.Errorf("ListCharges: %d %v; want 200 and one charge", code, m)
	}
	if !regexp.MustCompile(`Charge \(connect\) key="h-1" replayed: OK ` + regexp.QuoteMeta(first[1])).MatchString(logs.String()) {
		t.Errorf("no log line of the replay to the HTTP client:\n%s", logs.String())
	}
}

// The HTTP side serves with the interceptor only when the gRPC side does:
// with --bare, every HTTP charge runs.
func TestServeHTTPBare(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	_, _, logs, _ := startServe(ctx, t, "--bare", "--http-addr", "127.0.0.1:0")
	httpAddr := logs.waitFor(ctx, t, regexp.MustCompile(`on http://(\S+),`), nil)[1]
	for range 2 {
		req, _ := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodPost, "http://"+httpAddr+"/payments.v1.PaymentsService/Charge", strings.NewReader(`{"account_id":"b","amount_cents":1,"currency":"EUR"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", "b-1")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Idempotency-Replayed") != "" {
			t.Fatalf("bare charge: %d, replayed %q; want 200, not replayed", resp.StatusCode, resp.Header.Get("Idempotency-Replayed"))
		}
	}
	if n := len(regexp.MustCompile(`Charge \(connect\) key=b-1 executed \(no idempotency interceptor\)`).FindAllString(logs.String(), -1)); n != 2 {
		t.Errorf("%d bare HTTP charges logged as executed, want 2:\n%s", n, logs.String())
	}
}
