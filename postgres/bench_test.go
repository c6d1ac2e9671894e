package idempotencypg

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// roundTrips counts what pgx sends as one round trip each: a query, an
// Exec, a batch, a prepare, a copy.
type roundTrips struct{ n atomic.Int64 }

func (r *roundTrips) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	r.n.Add(1)
	return ctx
}
func (r *roundTrips) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (r *roundTrips) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	r.n.Add(1)
	return ctx
}
func (r *roundTrips) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (r *roundTrips) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

// startRedis starts a redis-server for the comparison, or skips (fails
// under CI) without one.
func startRedis(b *testing.B) *redis.Client {
	b.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") != "" {
			b.Fatal("redis-server is not on PATH and CI is set")
		}
		b.Skip("redis-server is not on PATH")
	}
	port := freePort(b)
	cmd := exec.Command("redis-server", "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	rdb := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), ContextTimeoutEnabled: true, PoolSize: 64})
	b.Cleanup(func() { rdb.Close() })
	deadline := time.Now().Add(30 * time.Second)
	for rdb.Ping(context.Background()).Err() != nil {
		if time.Now().After(deadline) {
			b.Fatal("redis-server did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return rdb
}

// BenchmarkStores compares, on one Postgres and one redis-server on this
// machine, a Charge whose handler inserts one row: bare (its own
// transaction, no interceptor), with the Redis store (the row in its own
// transaction, outside the record's), and with this store (the row in the
// call's transaction, committed with the outcome). It reports Postgres
// round trips per call beyond the handler's own statement (pg-extra-rtt/op:
// the bare handler's BEGIN and COMMIT count as its own); Redis round trips
// are 2 per first execution and 1 per replay (docs/PERFORMANCE.md).
//
//	go test -run '^$' -bench BenchmarkStores -count 6 ./postgres | benchstat -
func BenchmarkStores(b *testing.B) {
	rt := &roundTrips{}
	pool := pgtest.Shared(b).Pool(b, func(c *pgxpool.Config) {
		c.MaxConns = 64
		c.ConnConfig.Tracer = rt
	})
	ctx := context.Background()
	table := fmt.Sprintf("bench_%d", tables.Add(1))
	if err := CreateSchema(ctx, pool, WithTable(table)); err != nil {
		b.Fatal(err)
	}
	store, err := New(ctx, pool, WithTable(table))
	if err != nil {
		b.Fatal(err)
	}
	charges := table + "_charges"
	if _, err := pool.Exec(ctx, `CREATE TABLE `+charges+` (id bigserial PRIMARY KEY, amount bigint NOT NULL)`); err != nil {
		b.Fatal(err)
	}
	rdb := startRedis(b)
	svc := &testservice.Service{OnCharge: func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error) {
		err := InTx(ctx, pool, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `INSERT INTO `+charges+` (amount) VALUES ($1)`, req.GetAmount())
			return err
		})
		return &testingv1.ChargeResponse{ChargeId: "ch"}, err
	}}
	clients := map[string]testingv1.TestServiceClient{
		"bare":     testservice.Dial(b, testservice.Serve(b, svc)),
		"redis":    testservice.Dial(b, testservice.Serve(b, svc, grpc.ChainUnaryInterceptor(idempotency.UnaryServerInterceptor(idempotency.NewRedisStore(rdb, idempotency.WithKeyPrefix(table+":"), idempotency.WithRedisLogger(nil)))))),
		"postgres": testservice.Dial(b, testservice.Serve(b, svc, grpc.ChainUnaryInterceptor(idempotency.UnaryServerInterceptor(store)))),
	}
	// The handler's own statements: bare, BEGIN, INSERT and COMMIT (3); in
	// the call's transaction, INSERT alone (BEGIN rides with it).
	own := map[string]int64{"bare": 3, "redis": 3, "postgres": 1}
	var seq atomic.Int64
	for _, name := range []string{"bare", "redis", "postgres"} {
		for _, path := range []string{"first", "replay"} {
			if name == "bare" && path == "replay" {
				continue
			}
			client := clients[name]
			call := func(key string) error {
				_, err := client.Charge(metadata.AppendToOutgoingContext(ctx, "idempotency-key", key), &testingv1.ChargeRequest{Amount: 1})
				return err
			}
			replayKey := fmt.Sprintf("replay-%s-%d", name, seq.Add(1))
			if err := call(replayKey); err != nil {
				b.Fatal(err)
			}
			key := func() string {
				if path == "replay" {
					return replayKey
				}
				return fmt.Sprintf("%s-%d", name, seq.Add(1))
			}
			b.Run(name+"/"+path, func(b *testing.B) {
				for range 20 { // warm the statement caches of the pool's connections
					_ = call(key())
				}
				start := rt.n.Load()
				b.ResetTimer()
				for b.Loop() {
					if err := call(key()); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				per := float64(rt.n.Load()-start) / float64(b.N)
				b.ReportMetric(per, "pg-rtt/op")
				handler := float64(own[name])
				if path == "replay" {
					handler = 0
				}
				b.ReportMetric(per-handler, "pg-extra-rtt/op")
			})
			b.Run(name+"/"+path+"/parallel", func(b *testing.B) {
				b.SetParallelism(8)
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if err := call(key()); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}

func freePort(b *testing.B) int {
	b.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
