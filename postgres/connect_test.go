package idempotencypg

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
	idempotencyconnect "github.com/idempotency-grpc/idempotency/connect"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// The store's transaction reaches a connect-go handler as it reaches a
// gRPC one: one Protocol over the Postgres store serves a grpc-go server
// and a connect-go handler, and concurrent duplicates through grpc-go and
// connect-go's Connect, gRPC and gRPC-Web clients, all with one key, leave
// exactly one business row, committed with the outcome; every client gets
// its charge.
func TestTxOverConnectAndGRPC(t *testing.T) {
	b := newBank(t) // for its store, pool, table and Charge body
	p := idempotency.NewProtocol(b.store, idempotency.WithWaitForInProgress(5*time.Millisecond))
	grpcClient := testservice.Dial(t, testservice.Serve(t, b.svc, grpc.ChainUnaryInterceptor(p.UnaryServerInterceptor())))

	charge := connect.NewUnaryHandler(testservice.MethodCharge,
		func(ctx context.Context, req *connect.Request[testingv1.ChargeRequest]) (*connect.Response[testingv1.ChargeResponse], error) {
			resp, err := b.svc.Charge(ctx, req.Msg)
			if err != nil {
				return nil, err
			}
			return connect.NewResponse(resp), nil
		},
		connect.WithInterceptors(idempotencyconnect.NewInterceptor(p)))
	hs := testservice.ServeHTTP(t, charge)
	url := hs.URL + testservice.MethodCharge
	connectClients := []*connect.Client[testingv1.ChargeRequest, testingv1.ChargeResponse]{
		connect.NewClient[testingv1.ChargeRequest, testingv1.ChargeResponse](hs.Client(), url),
		connect.NewClient[testingv1.ChargeRequest, testingv1.ChargeResponse](testservice.HTTPClient(t, true), url, connect.WithGRPC()),
		connect.NewClient[testingv1.ChargeRequest, testingv1.ChargeResponse](hs.Client(), url, connect.WithGRPCWeb()),
	}

	ctx := testCtx(t)
	type answer struct {
		id       string
		replayed bool
		err      error
	}
	var mu sync.Mutex
	var answers []answer
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			var header metadata.MD
			resp, err := grpcClient.Charge(metadata.AppendToOutgoingContext(ctx, idempotency.DefaultKeyHeader, "pg-connect"),
				&testingv1.ChargeRequest{Amount: 9}, grpc.Header(&header))
			mu.Lock()
			answers = append(answers, answer{resp.GetChargeId(), idempotency.Replayed(header), err})
			mu.Unlock()
		})
		for _, c := range connectClients {
			wg.Go(func() {
				r := connect.NewRequest(&testingv1.ChargeRequest{Amount: 9})
				r.Header().Set("Idempotency-Key", "pg-connect")
				resp, err := c.CallUnary(ctx, r)
				a := answer{err: err}
				if err == nil {
					a.id, a.replayed = resp.Msg.GetChargeId(), idempotencyconnect.Replayed(resp.Header())
				}
				mu.Lock()
				answers = append(answers, a)
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	fresh := 0
	for _, a := range answers {
		require.NoError(t, a.err)
		require.Equal(t, answers[0].id, a.id, "every client gets the one charge")
		if !a.replayed {
			fresh++
		}
	}
	require.Len(t, answers, 16)
	require.Equal(t, 1, fresh, "one answer is the execution, the others replays")
	require.EqualValues(t, 1, b.svc.Runs.Load())
	require.Equal(t, 1, b.rows(t), "one business row")
	var stored string
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT 'ch_' || id FROM `+b.table).Scan(&stored))
	require.Equal(t, stored, answers[0].id, fmt.Sprintf("the row is the charge every client got (%s)", answers[0].id))
}
