package idempotency_test

import (
	"context"
	"fmt"
	"log"

	"github.com/idempotency-grpc/idempotency"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
)

// A queue consumer charges once per message, however often the queue
// delivers it: the redelivery of msg-1 (its consumer crashed before
// acknowledging it) gets the stored charge, and a message that reuses
// msg-1's key for another amount is refused.
func ExampleDo() {
	// A RedisStore, or the postgres module's store to commit each charge
	// with its outcome; one Protocol may also serve gRPC and Connect.
	p := idempotency.NewProtocol(idempotency.NewMemoryStore())
	charges := 0
	charge := func(ctx context.Context, req *paymentsv1.ChargeRequest) (*paymentsv1.ChargeResponse, error) {
		charges++ // the payment provider, the ledger's INSERT
		return &paymentsv1.ChargeResponse{Charge: &paymentsv1.Charge{
			Id: fmt.Sprintf("ch_%d", charges), AccountId: req.GetAccountId(), AmountCents: req.GetAmountCents(), Currency: req.GetCurrency(),
		}}, nil
	}

	deliveries := []struct {
		id  string // the message's stable id: its idempotency key
		req *paymentsv1.ChargeRequest
	}{
		{"msg-1", &paymentsv1.ChargeRequest{AccountId: "acct_1", AmountCents: 1999, Currency: "EUR"}},
		{"msg-2", &paymentsv1.ChargeRequest{AccountId: "acct_2", AmountCents: 500, Currency: "EUR"}},
		{"msg-1", &paymentsv1.ChargeRequest{AccountId: "acct_1", AmountCents: 1999, Currency: "EUR"}}, // redelivered
		{"msg-1", &paymentsv1.ChargeRequest{AccountId: "acct_1", AmountCents: 2999, Currency: "EUR"}}, // a producer bug
	}
	ctx := context.Background()
	for _, m := range deliveries {
		res, replayed, err := idempotency.Do(ctx, p, "payments.ChargeMessage", m.id, m.req,
			func(ctx context.Context) (*paymentsv1.ChargeResponse, error) { return charge(ctx, m.req) })
		if err != nil {
			fmt.Println(m.id, "refused:", idempotency.ReasonOf(err))
			continue // acknowledge it or park it: it will never run
		}
		fmt.Println(m.id, res.GetCharge().GetId(), "replayed:", replayed)
	}
	if charges != 2 {
		log.Fatalf("%d charges", charges)
	}
	fmt.Println("charges made:", charges)
	// Output:
	// msg-1 ch_1 replayed: false
	// msg-2 ch_2 replayed: false
	// msg-1 ch_1 replayed: true
	// msg-1 refused: KEY_REUSED
	// charges made: 2
}
