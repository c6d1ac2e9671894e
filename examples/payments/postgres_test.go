package main

import (
	"testing"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

// serve --postgres, in process: a charge and its retry make one row in the
// charges table, and ListCharges reads that table.
func TestServePostgresKeepsChargesInTheTable(t *testing.T) {
	t.Parallel()
	pg := pgtest.Start(t)
	ctx := testContext(t)
	book, err := openBook(ctx, pg.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer book.pool.Close()
	store, err := openPostgresStore(ctx, book.pool, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	led := newLedger(0)
	led.book = book
	addr, stop, err := startServer(serverConfig{ledger: led, store: store})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	conn, err := dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := paymentsv1.NewPaymentsServiceClient(conn)
	req := &paymentsv1.ChargeRequest{AccountId: "acct_pg", AmountCents: 1999, Currency: "EUR"}
	kctx := metadata.AppendToOutgoingContext(ctx, "idempotency-key", "pg-1")
	first, err := client.Charge(kctx, req)
	if err != nil {
		t.Fatal(err)
	}
	var header metadata.MD
	again, err := client.Charge(kctx, req, grpc.Header(&header))
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(first, again) || len(header.Get(idempotency.ReplayedHeader)) != 1 {
		t.Fatalf("the retry was not a replay of the first charge: %v / %v, header %v", first, again, header)
	}
	list, err := client.ListCharges(ctx, &paymentsv1.ListChargesRequest{AccountId: "acct_pg"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetCharges()) != 1 || list.GetCharges()[0].GetId() != first.GetCharge().GetId() {
		t.Fatalf("ListCharges = %v, want the one charge %s", list.GetCharges(), first.GetCharge().GetId())
	}
	var rows int
	if err := book.pool.QueryRow(ctx, `SELECT count(*) FROM charges WHERE idempotency_key = 'pg-1'`).Scan(&rows); err != nil || rows != 1 {
		t.Fatalf("charges rows for the key: %d (%v), want 1", rows, err)
	}
}
