package idempotency

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// sentinelSetup is a real master, one replica and one Sentinel (quorum 1)
// on loopback, started by the test.
type sentinelSetup struct {
	mu       sync.Mutex
	master   *redisServer
	replica  *redisServer
	sentinel string // address
}

const sentinelMaster = "mymaster"

// startSentinelSetup starts the master, its replica and a Sentinel watching
// them, with short timeouts so a failover takes a second or two. A shorter
// down-after (500 ms) made Sentinel fail over spuriously on a busy 2-core
// machine while the master was alive: a split brain that lost every write
// the old master took until Sentinel demoted it.
func startSentinelSetup(t *testing.T) *sentinelSetup {
	t.Helper()
	requireRedisServer(t)
	s := &sentinelSetup{}
	s.master = newRedisServer(t, "--repl-diskless-sync-delay", "0")
	s.replica = newRedisServer(t, "--repl-diskless-sync-delay", "0", "--replicaof", "127.0.0.1", strconv.Itoa(s.master.port))
	rc := newRedisClient(t, s.replica.Addr)
	waitUntil(t, "the replica is in sync", func() bool {
		info, err := rc.Info(context.Background(), "replication").Result()
		return err == nil && containsLine(info, "master_link_status:up")
	})

	dir := t.TempDir()
	port := freePort(t)
	conf := filepath.Join(dir, "sentinel.conf")
	body := fmt.Sprintf("port %d\nbind 127.0.0.1\nprotected-mode no\ndir %s\n"+
		"sentinel monitor %s 127.0.0.1 %d 1\n"+
		"sentinel down-after-milliseconds %s 1000\n"+
		"sentinel failover-timeout %s 3000\n"+
		"sentinel parallel-syncs %s 1\n", port, dir, sentinelMaster, s.master.port, sentinelMaster, sentinelMaster, sentinelMaster)
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("redis-server", conf, "--sentinel")
	logf, err := os.Create(filepath.Join(dir, "sentinel.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("start sentinel: %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	s.sentinel = fmt.Sprintf("127.0.0.1:%d", port)
	sc := redis.NewSentinelClient(&redis.Options{Addr: s.sentinel})
	t.Cleanup(func() { sc.Close() })
	waitUntil(t, "Sentinel sees the replica", func() bool {
		reps, err := sc.Replicas(context.Background(), sentinelMaster).Result()
		return err == nil && len(reps) == 1
	})
	return s
}

func containsLine(s, line string) bool {
	for _, l := range splitLines(s) {
		if l == line {
			return true
		}
	}
	return false
}

func splitLines(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' {
			l := s[start:i]
			if len(l) > 0 && l[len(l)-1] == '\r' {
				l = l[:len(l)-1]
			}
			out = append(out, l)
			start = i + 1
		}
	}
	return out
}

// masterAddr asks Sentinel for the current master.
func (s *sentinelSetup) masterAddr(ctx context.Context) string {
	sc := redis.NewSentinelClient(&redis.Options{Addr: s.sentinel})
	defer sc.Close()
	addr, err := sc.GetMasterAddrByName(ctx, sentinelMaster).Result()
	if err != nil || len(addr) != 2 {
		return ""
	}
	return addr[0] + ":" + addr[1]
}

// failoverClient is go-redis's Sentinel failover client, as the README
// suggests for Sentinel (NewUniversalClient with MasterName does the same).
func (s *sentinelSetup) failoverClient() *redis.Client {
	return redis.NewFailoverClient(&redis.FailoverOptions{MasterName: sentinelMaster, SentinelAddrs: []string{s.sentinel},
		ContextTimeoutEnabled: true, DialTimeout: 200 * time.Millisecond, ReadTimeout: time.Second, WriteTimeout: time.Second})
}

// TestStormSentinelFailover runs the 4-server storm on a master with one
// replica behind Sentinel, kills the master (SIGKILL) a third of the way in,
// lets Sentinel promote the replica, and restarts the old master, which
// Sentinel turns into the new master's replica, so traffic resumes with a
// replica to acknowledge it. Once without and once with WithReplicaAcks(1):
// it counts duplicated executions and lost outcomes (a failover that
// discards the last unreplicated writes loses claims and outcomes; with
// acknowledgements, nothing the handler ran on can be lost that way).
func TestStormSentinelFailover(t *testing.T) {
	for _, tc := range []struct {
		name    string
		acks    bool
		lagging bool // the replica stops acknowledging before the master dies
	}{
		{"acks off", false, false},
		{"acks on", true, false},
		// A replica frozen with SIGSTOP does not lag: the kernel keeps
		// receiving the master's stream, and the replica reads it on
		// SIGCONT. Real lag needs a partition (the proxy); the lagging
		// mode stays for that next step, unused until then.
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startSentinelSetup(t)
			cfg := defaultStorm(t)
			cfg.lease = 5 * time.Second // longer than a failover (1-2 s here)
			// Measured, not asserted, in both modes for now: without acks
			// duplicates are the expected gap; with acks 0 is expected but
			// not yet proven over enough runs to gate CI on (see
			// docs/RELIABILITY.md). What must never happen (a handler
			// without a claim, a foreign answer) still fails the test.
			cfg.measureOnly = true
			if tc.acks {
				cfg.storeOpts = []RedisOption{WithReplicaAcks(1, 500*time.Millisecond)}
			}
			var clients []*redis.Client
			cfg.newClient = func(int) redis.UniversalClient {
				c := s.failoverClient()
				clients = append(clients, c)
				return c
			}
			check := s.failoverClient()
			t.Cleanup(func() {
				check.Close()
				for _, c := range clients {
					c.Close()
				}
			})
			cfg.check = check
			var (
				oldMaster, newMaster string
				failoverTook         time.Duration
				afterFailover, lagOK int64
				failErr              error
			)
			cfg.faultAt = cfg.calls / 3
			cfg.fault = func(r *stormRun) {
				ctx := context.Background()
				oldMaster = s.masterAddr(ctx)
				if tc.lagging {
					// The replica stops (a network hiccup, a long fork): the
					// master goes on taking writes it has not replicated.
					if err := s.replica.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
						failErr = err
						return
					}
					okAt, frozen := r.resultCount("OK"), time.Now()
					for r.resultCount("OK") < okAt+20 && time.Since(frozen) < 2*time.Second {
						time.Sleep(5 * time.Millisecond)
					}
					lagOK = r.resultCount("OK") - okAt
				}
				if os.Getenv("IDEMPOTENCY_DEBUG_FAILOVER") != "" {
					// The replica's state just before the kill (see
					// docs/RELIABILITY.md: sometimes it holds none of the
					// master's records).
					mc, rc := newRedisClient(t, s.master.Addr), newRedisClient(t, s.replica.Addr)
					mi, _ := mc.Info(ctx, "replication").Result()
					ri, _ := rc.Info(ctx, "replication").Result()
					lb, _ := os.ReadFile(filepath.Join(s.replica.dir, fmt.Sprintf("redis-%d.log", s.replica.port)))
					t.Logf("DEBUG replica log:\n%s", lb)
					t.Logf("DEBUG before kill: master dbsize %d replica dbsize %d\nmaster: %s\nreplica: %s", mc.DBSize(ctx).Val(), rc.DBSize(ctx).Val(), mi, ri)
				}
				killed := time.Now()
				s.master.Stop() // SIGKILL
				if tc.lagging {
					_ = s.replica.cmd.Process.Signal(syscall.SIGCONT)
				}
				deadline := time.Now().Add(30 * time.Second)
				for newMaster = s.masterAddr(ctx); newMaster == oldMaster || newMaster == ""; newMaster = s.masterAddr(ctx) {
					if time.Now().After(deadline) {
						failErr = fmt.Errorf("Sentinel did not promote the replica within 30s")
						return
					}
					time.Sleep(20 * time.Millisecond)
				}
				failoverTook = time.Since(killed)
				// The old master comes back as a replica of the new one, as
				// Sentinel would make it (started as a master, empty, it
				// would accept writes from clients still on the old address
				// until Sentinel demoted it: a split brain of the test's own
				// making).
				host, port, _ := strings.Cut(newMaster, ":")
				back, err := startRedisServer(s.master.dir, s.master.port, "--repl-diskless-sync-delay", "0", "--replicaof", host, port)
				if err != nil {
					failErr = fmt.Errorf("restart the old master: %w", err)
					return
				}
				s.mu.Lock()
				s.master = back
				s.mu.Unlock()
				okAt := r.resultCount("OK")
				for r.resultCount("OK") < okAt+50 && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
				afterFailover = r.resultCount("OK") - okAt
			}
			t.Cleanup(func() {
				s.mu.Lock()
				defer s.mu.Unlock()
				s.master.Stop()
			})
			r := runStorm(t, cfg)
			if failErr != nil {
				t.Fatal(failErr)
			}
			if afterFailover < 50 {
				t.Errorf("traffic did not resume after the failover: %d successes", afterFailover)
			}
			r.allowOnly("OK", "Canceled", "Aborted KEY_IN_PROGRESS", "Unavailable STORE_UNAVAILABLE", "Unavailable STORE_NOT_REPLICATED")
			t.Logf("reliability: %s: %d successes while the replica lagged; master %s killed, Sentinel promoted %s after %v; %d successes right after; duplicated-execution keys=%d lost-outcome keys=%d different-answer keys=%d; not_replicated events=%d",
				t.Name(), lagOK, oldMaster, newMaster, failoverTook.Round(time.Millisecond), afterFailover,
				r.measured["duplicate"], r.measured["lost-outcome"], r.measured["different-answer"], r.eventCount(OutcomeNotReplicated))
		})
	}
}
