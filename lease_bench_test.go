package idempotency

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// renewCounter counts, on a go-redis client, the renewal scripts sent and
// the round trips that carried them (a command on its own, or a pipeline).
type renewCounter struct{ cmds, trips atomic.Int64 }

func (r *renewCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func isRenew(cmd redis.Cmder) bool {
	args := cmd.Args()
	return len(args) > 1 && (args[0] == "evalsha" || args[0] == "eval") &&
		(args[1] == renewScript.Hash() || args[1] == renewLua)
}

func (r *renewCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if isRenew(cmd) {
			r.cmds.Add(1)
			r.trips.Add(1)
		}
		return next(ctx, cmd)
	}
}

func (r *renewCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		n := 0
		for _, c := range cmds {
			if isRenew(c) {
				n++
			}
		}
		if n > 0 {
			r.cmds.Add(int64(n))
			r.trips.Add(1)
		}
		return next(ctx, cmds)
	}
}

// BenchmarkInFlightLeases holds many slow calls in flight at once on one
// server and a real redis-server, and measures what keeping their leases
// costs: goroutines per call beyond the call's own, and, per renewal period
// (a third of the lease), the renewal commands and the round trips that
// carried them. Run it with -benchtime 1x: one iteration is the whole
// scenario (claim every key, hold them for four renewal periods, release).
func BenchmarkInFlightLeases(b *testing.B) {
	for _, calls := range []int{1000, 10000} {
		b.Run(fmt.Sprint(calls), func(b *testing.B) {
			srv := sharedRedisServer(b)
			rdb := redis.NewClient(&redis.Options{Addr: srv.Addr, ContextTimeoutEnabled: true, PoolSize: 256})
			b.Cleanup(func() { rdb.Close() })
			counter := &renewCounter{}
			rdb.AddHook(counter)
			// Long enough that no claim of 10,000 at once answers after 7/8
			// of it (such a claim is refused) on a busy machine.
			const lease = 10 * time.Second
			every := lease / 4 // the renewal period
			store := NewRedisStore(rdb, WithKeyPrefix(fmt.Sprintf("bench-leases:%d:", time.Now().UnixNano())), WithRedisLogger(nil))
			icpt := UnaryServerInterceptor(store, WithLease(lease), WithCompleteTimeout(30*time.Second))
			info := &grpc.UnaryServerInfo{FullMethod: "/idempotency.testing.v1.TestService/Do"}
			for range b.N {
				release := make(chan struct{})
				var entered, failed atomic.Int64
				handler := func(ctx context.Context, req any) (any, error) {
					entered.Add(1)
					<-release
					return &testingv1.DoResponse{Id: req.(*testingv1.DoRequest).GetId()}, nil
				}
				base := runtime.NumGoroutine()
				var wg sync.WaitGroup
				for i := range calls {
					wg.Go(func() {
						ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("idempotency-key", fmt.Sprintf("k-%d-%d", time.Now().UnixNano(), i)))
						if _, err := icpt(ctx, &testingv1.DoRequest{Id: "x"}, info, handler); err != nil {
							failed.Add(1)
							b.Error(err)
						}
					})
				}
				for entered.Load()+failed.Load() < int64(calls) {
					time.Sleep(time.Millisecond)
				}
				if failed.Load() > 0 {
					close(release)
					wg.Wait()
					b.Fatalf("%d calls failed", failed.Load())
				}
				time.Sleep(every) // every call has its lease kept now
				goroutines := runtime.NumGoroutine() - base - calls
				cmds0, trips0 := counter.cmds.Load(), counter.trips.Load()
				const periods = 4
				time.Sleep(periods * every)
				cmds, trips := counter.cmds.Load()-cmds0, counter.trips.Load()-trips0
				close(release)
				wg.Wait()
				b.ReportMetric(float64(goroutines)/float64(calls), "extra-goroutines/call")
				b.ReportMetric(float64(cmds)/periods, "renew-cmds/period")
				b.ReportMetric(float64(trips)/periods, "renew-roundtrips/period")
			}
		})
	}
}
