package idempotency

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// BenchmarkFsyncAcks measures what one acknowledged write costs on a
// valkey-server master (appendonly yes, appendfsync everysec) with one
// replica (appendonly yes, appendfsync always or everysec): a
// RedisStore.Claim of a fresh key, which is one script write, with no
// acknowledgement, with WithReplicaAcks(1) (WAIT), with WithFsyncAcks(1)
// (WAIT then WAITAOF), and with the WAITAOF alone right behind the claim
// script (what WithFsyncAcks sent before issue 27). The four take turns in
// alternating blocks on the same pair (paired, as BenchmarkReplicaAcks);
// it reports each median and their ratios. Each write with a replica on
// everysec takes about a second: run it with a small -benchtime (10x).
func BenchmarkFsyncAcks(b *testing.B) {
	for _, replicaFsync := range []string{"always", "everysec"} {
		b.Run("replica-appendfsync-"+replicaFsync, func(b *testing.B) {
			pair := startReplicaPair(b, "valkey-server", false, "--appendonly", "yes", "--appendfsync", "everysec")
			ctx := context.Background()
			if err := pair.replicaRDB.ConfigSet(ctx, "appendfsync", replicaFsync).Err(); err != nil {
				b.Fatal(err)
			}
			// A read timeout above every wait, so no try is resent.
			c := redis.NewClient(&redis.Options{Addr: pair.master.Addr, ReadTimeout: 15 * time.Second, ContextTimeoutEnabled: true})
			b.Cleanup(func() { c.Close() })
			claimWith := func(s *RedisStore) func() error {
				return func() error {
					res, err := s.Claim(ctx, newKey(), "owner", []byte("in progress"), time.Minute)
					if err == nil && !res.Claimed {
						err = fmt.Errorf("not claimed: %+v", res)
					}
					return err
				}
			}
			store := func(opts ...RedisOption) *RedisStore {
				return NewRedisStore(c, append(opts, WithKeyPrefix("bench-fsync:"), WithRedisLogger(nil))...)
			}
			none := claimWith(store())
			wait := claimWith(store(WithReplicaAcks(1, 5*time.Second)))
			fsync := claimWith(store(WithFsyncAcks(1, 5*time.Second)))
			aofOnly := func() error { // the pipeline before issue 27
				value, _ := layoutValue(stateInProgress, "owner", []byte("in progress"))
				p := c.Pipeline()
				claim := claimScript.EvalSha(ctx, p, []string{"bench-fsync:" + newKey()}, "owner", value, time.Minute.Milliseconds())
				w := p.Do(ctx, "WAITAOF", 1, 1, 5000)
				_, _ = p.Exec(ctx)
				if err := claim.Err(); err != nil {
					return err
				}
				return acks{fsync: true, replicas: 1, timeout: 5 * time.Second}.check(w)
			}
			for _, call := range []func() error{none, wait, fsync, aofOnly} {
				if err := call(); err != nil { // loads the script
					b.Fatal(err)
				}
			}
			b.ResetTimer()
			med := paired(b, max(b.N, 2), none, wait, fsync, aofOnly)
			b.ReportMetric(med[0].ns, "none-p50-ns/op")
			b.ReportMetric(med[1].ns, "wait-p50-ns/op")
			b.ReportMetric(med[2].ns, "fsync-p50-ns/op")
			b.ReportMetric(med[3].ns, "waitaof-alone-p50-ns/op")
			b.ReportMetric(med[2].ns/med[0].ns, "fsync-x-none")
			b.ReportMetric(med[2].ns/med[1].ns, "fsync-x-wait")
			b.ReportMetric(med[1].ns/med[0].ns, "wait-x-none")
			b.ReportMetric(med[3].ns/med[2].ns, "waitaof-alone-x-fsync")
		})
	}
}
