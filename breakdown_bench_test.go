//go:build linux || darwin

package idempotency

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// BenchmarkBreakdown splits what a call through the interceptor on
// redis-server costs above its floor (the bare call whose handler makes as
// many PINGs as the call makes round trips) into three parts, measured in
// one paired phase (see bench_test.go), in units of one PING:
//
//	interceptor-rtt/op  the interceptor's own work: the interceptor over a
//	                    stand-in store whose every step is one PING
//	script-call-rtt/op  calling a script with the real arguments instead
//	                    of a PING: the same, over a store whose every step
//	                    is EVALSHA of a no-op script with the arguments the
//	                    RedisStore sends (key, token, the encoded value, the
//	                    lease or TTL)
//	script-work-rtt/op  what the real scripts do on top (reads, writes,
//	                    expiry; and parsing their replies): RedisStore over
//	                    the no-op-script store
//
// The three add up to rtt-over-floor/op of BenchmarkUnary's row. A replay
// step of a stand-in store answers with a completed record encoded by a
// real call beforehand.
func BenchmarkBreakdown(b *testing.B) {
	for _, path := range []string{"first", "replay"} {
		b.Run("redis-server/"+path, func(b *testing.B) {
			r := benchRedisBackend(b, "redis-server")
			ctx := context.Background()
			if err := noopScript.Load(ctx, r.client).Err(); err != nil {
				b.Fatal(err)
			}
			real := newBenchEnv(b, r.store(), nil, benchOpts(path)...)
			replayKey := warmUp(b, real, path)
			var replay []byte
			if path == "replay" {
				var err error
				if replay, _, err = r.store().(AdminStore).Get(ctx, StoreKey(methodDo, "", replayKey)); err != nil {
					b.Fatal(err)
				}
			}
			ping := func(ctx context.Context, key, token string, value []byte, ms int64) error {
				return r.client.Ping(ctx).Err()
			}
			script := func(ctx context.Context, key, token string, value []byte, ms int64) error {
				v, err := layoutValue(stateInProgress, token, value)
				if err != nil {
					return err
				}
				return noopScript.EvalSha(ctx, r.client, []string{DefaultKeyPrefix + key}, token, v, ms).Err()
			}
			pingEnv := newBenchEnv(b, &stepStore{step: ping, replay: replay}, nil, benchOpts(path)...)
			scriptEnv := newBenchEnv(b, &stepStore{step: script, replay: replay}, nil, benchOpts(path)...)
			floorRT := map[string]int{"first": 2, "replay": 1}[path]
			calls := []func() error{
				r.ping,
				floorEnv(b, r, floorRT).call(benchReq, ""),
				pingEnv.call(benchReq, replayKey),
				scriptEnv.call(benchReq, replayKey),
				real.call(benchReq, replayKey),
			}
			for i, c := range calls {
				if err := c(); err != nil {
					b.Fatalf("call %d: %v", i, err)
				}
			}
			b.ResetTimer()
			med := paired(b, max(b.N, pairedSamples), calls...)
			b.StopTimer()
			rtt := med[0].ns
			b.ReportMetric(0, "ns/op")
			b.ReportMetric((med[2].ns-med[1].ns)/rtt, "interceptor-rtt/op")
			b.ReportMetric((med[3].ns-med[2].ns)/rtt, "script-call-rtt/op")
			b.ReportMetric((med[4].ns-med[3].ns)/rtt, "script-work-rtt/op")
			b.ReportMetric((med[4].ns-med[1].ns)/rtt, "rtt-over-floor/op")
		})
	}
}

// stepStore is a stand-in Store for BenchmarkBreakdown: each Claim and
// Complete is one step; a Claim answers with replay when set, else claims.
type stepStore struct {
	step   func(ctx context.Context, key, token string, value []byte, ms int64) error
	replay []byte
}

func (s *stepStore) Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error) {
	if err := s.step(ctx, key, token, record, lease.Milliseconds()); err != nil {
		return ClaimResult{}, fmt.Errorf("step: %w", err)
	}
	if s.replay != nil {
		return ClaimResult{Record: s.replay, TTL: time.Minute}, nil
	}
	return ClaimResult{Claimed: true}, nil
}

func (s *stepStore) Complete(ctx context.Context, key, token string, record []byte, ttl time.Duration) error {
	return s.step(ctx, key, token, record, ttl.Milliseconds())
}

func (s *stepStore) Renew(context.Context, string, string, time.Duration) error { return nil }

func (s *stepStore) Release(context.Context, string, string) error { return nil }
