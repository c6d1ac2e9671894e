package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/idempotency-grpc/idempotency"
	"github.com/redis/go-redis/v9"
)

// lockedLines collects log lines from several goroutines.
type lockedLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *lockedLines) add(line string) {
	l.mu.Lock()
	l.lines = append(l.lines, line)
	l.mu.Unlock()
}

func (l *lockedLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// waitDrained waits until group has delivered every entry of stream up to
// lastID and has none pending.
func waitDrained(ctx context.Context, t *testing.T, rdb redis.UniversalClient, stream, group, lastID string, alive func() error) {
	t.Helper()
	for {
		groups, err := rdb.XInfoGroups(ctx, stream).Result()
		if err != nil {
			t.Fatalf("XINFO GROUPS: %v", err)
		}
		for _, g := range groups {
			if g.Name == group && g.LastDeliveredID == lastID && g.Pending == 0 {
				return
			}
		}
		if err := alive(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the stream was not drained: %v (groups %+v)", ctx.Err(), groups)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestStreamConsumer runs the consume command's consumer on a stream whose
// messages arrive more than once in each way a stream redelivers: a
// producer's retried XADD (the same idempotency_key twice), and a message
// a consumer read and died with (pending, claimed with XAUTOCLAIM). The
// ledger must hold one charge per key; a key reused for another amount, a
// malformed message and an invalid charge are acknowledged without a
// charge; nothing is left pending.
func TestStreamConsumer(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { rdb.Close() })
	ctx := testContext(t)
	const stream, group = "charges", "payments"
	var lastID string
	add := func(vals ...string) {
		t.Helper()
		id, err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: vals}).Result()
		if err != nil {
			t.Fatal(err)
		}
		lastID = id
	}
	if err := rdb.XGroupCreateMkStream(ctx, stream, group, "0").Err(); err != nil {
		t.Fatal(err)
	}
	add(fieldAccount, "acct_1", fieldAmount, "1999", fieldCurrency, "EUR", fieldKey, "order-1")
	// A consumer reads it and dies without acknowledging it.
	if err := rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: group, Consumer: "dead", Streams: []string{stream, ">"}, Count: 1, Block: -1}).Err(); err != nil {
		t.Fatal(err)
	}
	add(fieldAccount, "acct_1", fieldAmount, "1999", fieldCurrency, "EUR", fieldKey, "order-1") // the producer's retry
	add(fieldAccount, "acct_2", fieldAmount, "500", fieldCurrency, "EUR", fieldKey, "order-2")
	add(fieldAccount, "acct_2", fieldAmount, "700", fieldCurrency, "EUR", fieldKey, "order-2") // key reused
	add(fieldAccount, "acct_3", fieldAmount, "300", fieldCurrency, "EUR")                      // keyed by its id
	add(fieldAccount, "acct_4", fieldAmount, "lots", fieldCurrency, "EUR")                     // malformed
	add(fieldAccount, "acct_5", fieldAmount, "100", fieldCurrency, "eur")                      // invalid

	led := newLedger(0)
	var logs lockedLines
	cfg := serverConfig{
		ledger:   led,
		store:    idempotency.NewRedisStore(rdb, idempotency.WithRedisLogger(nil)),
		logLine:  logs.add,
		detailed: true,
	}
	c := newStreamConsumer(rdb, stream, group, "live", 20*time.Millisecond, cfg, func(format string, args ...any) { logs.add(fmt.Sprintf(format, args...)) })
	cctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.run(cctx) }()
	alive := func() error {
		select {
		case err := <-done:
			return fmt.Errorf("the consumer stopped: %v\n%s", err, &logs)
		default:
			return nil
		}
	}
	waitDrained(ctx, t, rdb, stream, group, lastID, alive)
	stop()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("the consumer returned %v, want context.Canceled", err)
	}

	perAccount := map[string][]int64{}
	for _, ch := range led.list("") {
		perAccount[ch.GetAccountId()] = append(perAccount[ch.GetAccountId()], ch.GetAmountCents())
	}
	want := map[string][]int64{"acct_1": {1999}, "acct_2": {500}, "acct_3": {300}}
	if fmt.Sprint(perAccount) != fmt.Sprint(want) {
		t.Errorf("charges per account %v, want %v\n%s", perAccount, want, &logs)
	}
	out := logs.String()
	for _, line := range []string{
		"claimed 1 message(s) pending",
		"key=order-1 replayed: OK",
		"key=order-2 refused (key_reused): FailedPrecondition KEY_REUSED",
		`dropped: amount_cents "lots" is not a number of cents`,
		"executed: InvalidArgument: currency \"eur\"",
	} {
		if !strings.Contains(out, line) {
			t.Errorf("no log line with %q:\n%s", line, out)
		}
	}
}

// TestConsumeRefusesBadFlags: a claim-idle, lease or chaos probability that
// cannot be honoured is refused before anything connects.
func TestConsumeRefusesBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"--claim-idle", "0s"},
		{"--lease", "1us"},
		{"--chaos-kill", "1"},
	} {
		var stderr strings.Builder
		code := run(testContext(t), append([]string{"consume", "--redis", "127.0.0.1:1"}, args...), io.Discard, &stderr)
		if code != 1 || !strings.Contains(stderr.String(), args[0]) || strings.Contains(stderr.String(), "Redis at") {
			t.Errorf("consume %v: exit %d, stderr %q; want 1 and a message naming %s", args, code, stderr.String(), args[0])
		}
	}
}
