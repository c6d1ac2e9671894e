package main

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// pausedRenewals is the store as a paused server sees it: its lease
// renewals hang until resume is closed, as they would while its process is
// stopped (a GC pause, a stalled VM).
type pausedRenewals struct {
	idempotency.Store
	resume chan struct{}
}

func (p *pausedRenewals) Renew(ctx context.Context, key, token string, lease time.Duration) error {
	<-p.resume
	return p.Store.Renew(ctx, key, token, lease)
}

// The ledger's fenced write (issue 26): server A's charge is paused just
// before its write, past its lease (miniredis fast-forwarded), while
// server B takes the key over and charges; when A wakes, its write carries
// the older fence and is refused (Aborted), so the key has one charge, B's,
// and a retry replays it. With the charges in memory, and in Postgres (the
// records in Redis, so the fence is the only guard of the charges table).
func TestStaleOwnerChargesNothing(t *testing.T) {
	t.Parallel()
	for _, inPostgres := range []bool{false, true} {
		name := map[bool]string{false: "memory", true: "postgres"}[inPostgres]
		t.Run(name, func(t *testing.T) {
			ctx := testContext(t)
			m := miniredis.RunT(t)
			rc := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
			t.Cleanup(func() { rc.Close() })
			store := idempotency.NewRedisStore(rc, idempotency.WithRedisLogger(nil))
			led := newLedger(0)
			if inPostgres {
				book, err := openBook(ctx, pgtest.Start(t).DSN)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(book.pool.Close)
				led.book = book
			}
			started, gate := make(chan struct{}), make(chan struct{})
			var calls atomic.Int64
			led.hold = func(context.Context) {
				if calls.Add(1) == 1 {
					close(started)
					<-gate
				}
			}
			paused := &pausedRenewals{Store: store, resume: make(chan struct{})}
			var once sync.Once
			wake := func() { once.Do(func() { close(paused.resume) }) }
			t.Cleanup(wake)
			opts := []idempotency.Option{idempotency.WithLease(time.Minute)}
			client := func(s idempotency.Store) paymentsv1.PaymentsServiceClient {
				addr, stop, err := startServer(serverConfig{ledger: led, store: s, opts: opts})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(stop)
				conn, err := dial(addr)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { conn.Close() })
				return paymentsv1.NewPaymentsServiceClient(conn)
			}
			a, b := client(paused), client(store)
			req := &paymentsv1.ChargeRequest{AccountId: "acct_f", AmountCents: 500, Currency: "EUR"}
			kctx := metadata.AppendToOutgoingContext(ctx, idempotency.DefaultKeyHeader, "fenced-1")

			aErr := make(chan error, 1)
			go func() {
				_, err := a.Charge(kctx, req)
				aErr <- err
			}()
			select {
			case <-started:
			case <-ctx.Done():
				t.Fatal("server A's charge never started")
			}
			m.FastForward(2 * time.Minute) // A's lease runs out while A is paused

			var header metadata.MD
			won, err := b.Charge(kctx, req, grpc.Header(&header))
			if err != nil || idempotency.Replayed(header) {
				t.Fatalf("server B after A's lease: %v, replayed %v; want a charge of its own", err, idempotency.Replayed(header))
			}
			close(gate)
			wake()
			if err := <-aErr; status.Code(err) != codes.Aborted {
				t.Fatalf("the stale owner's charge: %v, want Aborted (its fenced write refused)", err)
			}
			if n := calls.Load(); n != 2 {
				t.Fatalf("%d charges reached the write, want 2 (A paused past its lease, then B)", n)
			}
			list, err := b.ListCharges(ctx, &paymentsv1.ListChargesRequest{AccountId: "acct_f"})
			if err != nil {
				t.Fatal(err)
			}
			if len(list.GetCharges()) != 1 || list.GetCharges()[0].GetId() != won.GetCharge().GetId() {
				t.Fatalf("charges of the key: %v; want B's one charge %s", list.GetCharges(), won.GetCharge().GetId())
			}
			header = nil
			again, err := a.Charge(kctx, req, grpc.Header(&header))
			if err != nil || !idempotency.Replayed(header) || again.GetCharge().GetId() != won.GetCharge().GetId() {
				t.Fatalf("a retry through A: %v, %v, replayed %v; want B's charge replayed", again, err, idempotency.Replayed(header))
			}
		})
	}
}
