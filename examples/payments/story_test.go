package main

import (
	"bytes"
	"context"
	"io"
	"log"
	"net"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"google.golang.org/grpc"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
)

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// The demo command, as "go run ./examples/payments" runs it: embedded
// Redis, the whole story, exit code 0.
func TestDemoCommand(t *testing.T) {
	t.Parallel()
	var stdout, stderr bytes.Buffer
	if code := run(testContext(t), nil, &stdout, &stderr); code != 0 {
		t.Fatalf("exit code %d, want 0\nstdout:\n%s\nstderr:\n%s", code, &stdout, &stderr)
	}
	out := stdout.String()
	for _, want := range []string{
		"Idempotency store: embedded Redis (miniredis)",
		"[ok] the retry got the stored answer (2 attempts, replayed)",
		"[ok] acct_lost_answer was charged once",
		"[ok] both clicks got the same charge, one of them as a replay",
		"[ok] acct_double_click was charged once",
		`[ok] the second was refused at once: code FailedPrecondition, reason "KEY_REUSED"`,
		"[ok] acct_reused_key was charged once",
		"[ok] as expected without idempotency, acct_unprotected was charged twice",
		"[ok] the ledger holds one charge per protected account and two for acct_unprotected",
		"All 9 expectations held.",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if strings.Contains(out, "FAILED") {
		t.Errorf("output reports a failure")
	}
	// Every call was logged by the server with the interceptor's verdict.
	for _, want := range []string{"executed: OK", "replayed: OK", "refused (key_reused): FailedPrecondition KEY_REUSED",
		"executed (no idempotency interceptor)", "ListCharges key=- passed through"} {
		if !strings.Contains(out, "server: ") || !strings.Contains(out, want) {
			t.Errorf("server log lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("output:\n%s", out)
	}
}

// The story does not depend on Redis: any store keeps it true.
func TestStoryOnMemoryStore(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	if err := runStory(testContext(t), &out, idempotency.NewMemoryStore(), "memory"); err != nil {
		t.Fatalf("runStory: %v\n%s", err, &out)
	}
}

// forgetfulStore claims every key, as if nothing had ever been stored: the
// interceptor then protects nothing.
type forgetfulStore struct{}

func (forgetfulStore) Claim(context.Context, string, string, []byte, time.Duration) (idempotency.ClaimResult, error) {
	return idempotency.ClaimResult{Claimed: true}, nil
}

func (forgetfulStore) Renew(context.Context, string, string, time.Duration) error {
	return nil
}

func (forgetfulStore) Complete(context.Context, string, string, []byte, time.Duration) error {
	return nil
}

func (forgetfulStore) Release(context.Context, string, string) error {
	return nil
}

// The story's checks are real: when the store forgets, the double charges
// happen and the story fails (so the demo would exit 1).
func TestStoryFailsWhenTheStoreForgets(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	err := runStory(testContext(t), &out, forgetfulStore{}, "forgetful")
	if err == nil {
		t.Fatalf("runStory succeeded with a store that forgets every key:\n%s", &out)
	}
	for _, want := range []string{
		"acct_lost_answer was charged once",
		"acct_double_click was charged once",
		"the second was refused at once",
		"the ledger holds one charge per protected account",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name the failed expectation %q", err, want)
		}
	}
	if !strings.Contains(out.String(), "[FAILED]") || strings.Contains(out.String(), "All 9 expectations held") {
		t.Errorf("output does not report the failures:\n%s", &out)
	}
}

// serve and client, as two terminals would run them.
func TestServeAndClient(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	store, err := openStore(ctx, "") // the embedded Redis
	if err != nil {
		t.Fatal(err)
	}
	defer store.close()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	var logs bytes.Buffer
	logger := log.New(&syncWriter{w: &logs}, "", 0)
	serveCtx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- serve(serveCtx, lis, serveOptions{store: store, logger: logger}) }()
	// shutdown is what SIGINT does to "payments serve".
	shutdown := sync.OnceValue(func() error { stop(); return <-served })
	defer shutdown()

	client := func(args ...string) (code int, stdout, stderr string) {
		var o, e bytes.Buffer
		code = run(ctx, append([]string{"client", "--addr", addr}, args...), &o, &e)
		return code, o.String(), e.String()
	}
	chargeLine := regexp.MustCompile(`(?m)^charge: +(ch_\w+), 12\.34 EUR on acct_t,`)

	code, first, stderr := client("--account", "acct_t", "--amount", "1234", "--currency", "EUR", "--key", "t-1")
	if code != 0 || !chargeLine.MatchString(first) || !strings.Contains(first, "replayed: false") ||
		!strings.Contains(first, "key:      t-1 (given with --key)") {
		t.Fatalf("first client: exit %d\n%s%s", code, first, stderr)
	}
	code, second, stderr := client("--account", "acct_t", "--amount", "1234", "--currency", "EUR", "--key", "t-1")
	if code != 0 || !strings.Contains(second, "replayed: true") {
		t.Fatalf("second client: exit %d\n%s%s", code, second, stderr)
	}
	if a, b := chargeLine.FindStringSubmatch(first)[1], chargeLine.FindStringSubmatch(second); b == nil || b[1] != a {
		t.Errorf("the repeat did not get the first charge back:\n%s\n%s", first, second)
	}
	code, _, stderr = client("--account", "acct_t", "--amount", "9999", "--key", "t-1")
	if code != 1 || !strings.Contains(stderr, "code FailedPrecondition, reason KEY_REUSED") {
		t.Errorf("a different amount with the same key: exit %d, stderr %q; want 1 and KEY_REUSED", code, stderr)
	}
	code, generated, stderr := client("--account", "acct_u")
	if code != 0 || !strings.Contains(generated, "(generated; pass --key ") {
		t.Errorf("client without --key: exit %d\n%s%s", code, generated, stderr)
	}

	conn, err := dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	list, err := paymentsv1.NewPaymentsServiceClient(conn).ListCharges(ctx, &paymentsv1.ListChargesRequest{AccountId: "acct_t"})
	if err != nil || len(list.GetCharges()) != 1 {
		t.Errorf("ListCharges(acct_t) = %v, %v; want 1 charge", list, err)
	}
	// Server reflection, which grpcurl relies on.
	if services := listServices(ctx, t, conn); !strings.Contains(services, "payments.v1.PaymentsService") {
		t.Errorf("reflection lists %q, want payments.v1.PaymentsService", services)
	}
	conn.Close()

	if err := shutdown(); err != nil {
		t.Errorf("serve: %v", err)
	}
	got := logs.String()
	for _, want := range []string{
		"Charge key=t-1 executed: OK ch_",
		"Charge key=t-1 replayed: OK ch_",
		"Charge key=t-1 refused (key_reused): FailedPrecondition KEY_REUSED",
		"ListCharges key=- passed through",
		"stopping: waiting for the calls in flight",
		"stopped",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("server log lacks %q:\n%s", want, got)
		}
	}
}

// listServices asks the server's reflection service for its services.
func listServices(ctx context.Context, t *testing.T, conn *grpc.ClientConn) string {
	t.Helper()
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatalf("reflection: %v", err)
	}
	defer func() { _ = stream.CloseSend() }()
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	}); err != nil {
		t.Fatalf("reflection: %v", err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("reflection: %v", err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	return strings.Join(names, ",")
}

func TestUsage(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"help"}, 0},
		{[]string{"-h"}, 0},
		{[]string{"demo", "-h"}, 0},
		{[]string{"bogus"}, 2},
		{[]string{"serve", "extra"}, 2},
		{[]string{"client", "--amount", "x"}, 2},
		{[]string{"--no-such-flag"}, 2},
		{[]string{"serve", "--metrics-addr"}, 2},
		{[]string{"inspect", "--key", "k"}, 2},                                 // no --redis
		{[]string{"forget", "--redis", "127.0.0.1:1"}, 2},                      // no --key
		{[]string{"inspect", "--redis", "127.0.0.1:1", "--key", "bad key"}, 2}, // not a valid key
		{[]string{"inspect", "-h"}, 0},
		{[]string{"consume"}, 2}, // no --redis: the stream lives in Redis
		{[]string{"consume", "-h"}, 0},
	} {
		if code := run(testContext(t), tc.args, io.Discard, io.Discard); code != tc.code {
			t.Errorf("run(%q) = %d, want %d", tc.args, code, tc.code)
		}
	}
}
