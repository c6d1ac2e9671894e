package idempotency_test

import (
	"context"
	"fmt"
	"sync"

	"github.com/idempotency-grpc/idempotency"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fencedLedger keeps, per key, the fence of the last write, as a fence
// column does: UPDATE ... SET fence = $f WHERE key = $k AND fence < $f.
type fencedLedger struct {
	mu     sync.Mutex
	fences map[string]uint64
}

func (l *fencedLedger) write(ctx context.Context, key string) error {
	fence, ok := idempotency.FenceFromContext(ctx)
	if !ok {
		return status.Error(codes.FailedPrecondition, "no fence: not the key's owner")
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if fence <= l.fences[key] {
		return status.Error(codes.Aborted, "stale: a newer owner of the key has written")
	}
	l.fences[key] = fence
	return nil
}

// A handler's write fenced on its owner's fence: an owner that writes after
// a newer owner of the key did (its lease ran out during a long pause, and a
// retry took the key over) is refused. Here the first run fails with a
// transient error, so the key is released and the retry is a new owner; the
// first run's context, used late, stands for the paused owner.
func ExampleFenceFromContext() {
	p := idempotency.NewProtocol(idempotency.NewMemoryStore())
	ledger := &fencedLedger{fences: map[string]uint64{}}
	req := &paymentsv1.ChargeRequest{AccountId: "acct_1", AmountCents: 1999, Currency: "EUR"}
	ctx := context.Background()

	var paused context.Context
	_, _, err := idempotency.Do(ctx, p, "payments.Charge", "k-1", req, func(ctx context.Context) (*paymentsv1.ChargeResponse, error) {
		paused = ctx
		return nil, status.Error(codes.Unavailable, "the provider timed out") // transient: the key is released
	})
	fmt.Println("first owner:", status.Code(err))

	res, _, err := idempotency.Do(ctx, p, "payments.Charge", "k-1", req, func(ctx context.Context) (*paymentsv1.ChargeResponse, error) {
		if err := ledger.write(ctx, "k-1"); err != nil {
			return nil, err
		}
		return &paymentsv1.ChargeResponse{Charge: &paymentsv1.Charge{Id: "ch_1"}}, nil
	})
	fmt.Println("second owner:", res.GetCharge().GetId(), err)

	fmt.Println("the first owner's late write:", status.Code(ledger.write(paused, "k-1")))
	// Output:
	// first owner: Unavailable
	// second owner: ch_1 <nil>
	// the first owner's late write: Aborted
}
