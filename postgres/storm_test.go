package idempotencypg

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestStormFourServers is the concurrency storm on Postgres: 2,000 calls
// (400 keys, each sent 5 times, in random order, from 32 callers at once)
// over 4 servers, each with its own pool and store on one table, a
// handler that inserts a business row in the call's transaction and
// sometimes fails (a stored error, a transient one) or is slow. Every key
// must have run its successful handler once: one business row per key,
// and every answer to a key identical.
func TestStormFourServers(t *testing.T) {
	skipUnlessLong(t)
	const servers, keys, repeats, callers = 4, 400, 5, 32
	first, _ := testStore(t)
	table := first.table
	charges := fmt.Sprintf("storm_charges_%d", tables.Add(1))
	ctx := testCtx(t)
	_, err := first.pool.Exec(ctx, `CREATE TABLE `+charges+` (id bigserial PRIMARY KEY, key text NOT NULL, amount bigint NOT NULL)`)
	require.NoError(t, err)

	var runsMu sync.Mutex
	runs := map[string]int{}
	clients := make([]testingv1.TestServiceClient, servers)
	for i := range clients {
		pool := pgtestPool(t)
		store, err := New(ctx, pool, WithTable(strings.Join(table, ".")))
		require.NoError(t, err)
		svc := &testservice.Service{OnCharge: func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
			key, _ := idempotency.KeyFromContext(ctx)
			runsMu.Lock()
			runs[key]++
			runsMu.Unlock()
			var id int64
			if err := Tx(ctx).QueryRow(ctx, `INSERT INTO `+charges+` (key, amount) VALUES ($1, $2) RETURNING id`, key, req.GetAmount()).Scan(&id); err != nil {
				return nil, status.Errorf(codes.Unavailable, "insert: %v", err)
			}
			switch rand.IntN(20) {
			case 0:
				return nil, status.Error(codes.Unavailable, "flaky provider") // released: runs again
			case 1:
				time.Sleep(time.Duration(rand.IntN(50)) * time.Millisecond)
			}
			if req.GetAmount()%50 == 0 {
				return nil, status.Error(codes.InvalidArgument, "amounts divisible by 50 are refused") // stored
			}
			return &testingv1.ChargeResponse{ChargeId: fmt.Sprintf("ch_%d", id)}, nil
		}}
		lis := testservice.Serve(t, svc, grpc.ChainUnaryInterceptor(idempotency.UnaryServerInterceptor(store, idempotency.WithLease(5*time.Second))))
		clients[i] = testservice.Dial(t, lis)
	}

	plan := make([]int, 0, keys*repeats)
	for k := range keys {
		for range repeats {
			plan = append(plan, k)
		}
	}
	rand.Shuffle(len(plan), func(i, j int) { plan[i], plan[j] = plan[j], plan[i] })
	type answer struct {
		id   string
		code codes.Code
	}
	var mu sync.Mutex
	answers := map[string][]answer{}
	work := make(chan int)
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			for k := range work {
				key := fmt.Sprintf("storm-%03d", k)
				for attempt := 0; ; attempt++ {
					client := clients[rand.IntN(servers)]
					resp, err := client.Charge(metadata.AppendToOutgoingContext(ctx, "idempotency-key", key), &testingv1.ChargeRequest{Amount: int64(k + 1)})
					code := status.Code(err)
					if code == codes.Aborted || code == codes.Unavailable {
						require.Less(t, attempt, 2000, "%s never got an answer: %v", key, err)
						time.Sleep(time.Duration(2+rand.IntN(10)) * time.Millisecond)
						continue
					}
					mu.Lock()
					answers[key] = append(answers[key], answer{resp.GetChargeId(), code})
					mu.Unlock()
					break
				}
			}
		})
	}
	for _, k := range plan {
		work <- k
	}
	close(work)
	wg.Wait()

	rowsPerKey := map[string]int{}
	rows, err := first.pool.Query(ctx, `SELECT key, count(*) FROM `+charges+` GROUP BY key`)
	require.NoError(t, err)
	for rows.Next() {
		var key string
		var n int
		require.NoError(t, rows.Scan(&key, &n))
		rowsPerKey[key] = n
	}
	require.NoError(t, rows.Err())
	duplicates, different, executions := 0, 0, 0
	for k := range keys {
		key := fmt.Sprintf("storm-%03d", k)
		list := answers[key]
		require.Len(t, list, repeats, key)
		for _, a := range list[1:] {
			if a != list[0] {
				different++
				break
			}
		}
		want := 1
		if list[0].code != codes.OK {
			want = 0 // a stored error rolls its row back
		}
		if rowsPerKey[key] != want {
			duplicates++
			t.Errorf("%s: %d business rows, want %d (answer %v)", key, rowsPerKey[key], want, list[0])
		}
		executions += runs[key]
	}
	t.Logf("storm: %d calls over %d keys on %d servers: handler executions %d (transient failures run again), keys with a wrong number of business rows %d, keys with different answers %d",
		len(plan), keys, servers, executions, duplicates, different)
	require.Zero(t, different, "keys with different answers")
}

// pgtestPool is a pool of its own on the shared cluster.
func pgtestPool(t *testing.T) *pgxpool.Pool {
	return pgtest.Shared(t).Pool(t, func(c *pgxpool.Config) { c.MaxConns = 24 })
}
