package idempotencyotel

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// brokenStore fails every claim, as an unreachable Redis would.
type brokenStore struct{ idempotency.Store }

func (brokenStore) Claim(context.Context, string, string, []byte, time.Duration) (idempotency.ClaimResult, error) {
	return idempotency.ClaimResult{}, errors.New("connection refused")
}

// stealingStore loses every lease before the outcome is written.
type stealingStore struct{ idempotency.Store }

func (stealingStore) Complete(context.Context, string, string, []byte, time.Duration) error {
	return idempotency.ErrLeaseLost
}

// outcomeSvc is the repository's test service; a Do with id "panic" panics.
func outcomeSvc() *testservice.Service {
	return &testservice.Service{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		if req.GetId() == "panic" {
			panic("boom")
		}
		return &testingv1.DoResponse{Id: req.GetId(), Payload: req.GetPayload()}, nil
	}}
}

func recoverer(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = status.Error(codes.Internal, "panic")
		}
	}()
	return h(ctx, req)
}

// TestOutcomeKinds checks, one subtest per outcome kind not covered by
// TestEveryOutcomeIsCounted, that the counter of that outcome moved by
// exactly one.
func TestOutcomeKinds(t *testing.T) {
	big := make([]byte, 4096)
	for _, tc := range []struct {
		outcome idempotency.Outcome
		store   idempotency.Store
		opts    []idempotency.Option
		req     *testingv1.DoRequest
		repeat  bool
	}{
		{outcome: idempotency.OutcomeStoreUnavailable, store: brokenStore{idempotency.NewMemoryStore()}},
		{outcome: idempotency.OutcomeFailOpen, store: brokenStore{idempotency.NewMemoryStore()}, opts: []idempotency.Option{idempotency.WithFailOpen()}},
		{outcome: idempotency.OutcomeLeaseLost, store: stealingStore{idempotency.NewMemoryStore()}},
		{outcome: idempotency.OutcomePanicked, req: &testingv1.DoRequest{Id: "panic"}},
		{outcome: idempotency.OutcomeTooLarge, req: &testingv1.DoRequest{Payload: big}, opts: []idempotency.Option{idempotency.WithMaxRecordSize(1024)}},
		{outcome: idempotency.OutcomeAlreadyProcessed, repeat: true, opts: []idempotency.Option{idempotency.WithRejectRepeats()}},
	} {
		t.Run(string(tc.outcome), func(t *testing.T) {
			reader := sdkmetric.NewManualReader()
			observe, err := NewObserver(WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
			if err != nil {
				t.Fatal(err)
			}
			store := tc.store
			if store == nil {
				store = idempotency.NewMemoryStore()
			}
			client := serveTest(t, outcomeSvc(), recoverer,
				idempotency.UnaryServerInterceptor(store, append([]idempotency.Option{idempotency.WithObserver(observe)}, tc.opts...)...))
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			ctx = metadata.AppendToOutgoingContext(ctx, "idempotency-key", "k")
			req := tc.req
			if req == nil {
				req = &testingv1.DoRequest{Id: "x"}
			}
			_, _ = client.Do(ctx, req)
			if tc.repeat {
				_, _ = client.Do(ctx, req)
			}
			if got := calls(t, reader, tc.outcome); got != 1 {
				t.Fatalf("%s counter = %d, want 1", tc.outcome, got)
			}
		})
	}
}
