package idempotency

import (
	"context"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
)

// replicaPair is a real redis-server master with one real replica.
type replicaPair struct {
	master, replica       *redisServer
	masterRDB, replicaRDB *redis.Client
	// link is the fault proxy the replica reaches its master through
	// (newReplicaPairVia); nil for a direct link.
	link *faultProxy
}

// newReplicaPair starts a master and a replica of it, and waits until the
// replica streams the master's writes.
func newReplicaPair(t testing.TB) *replicaPair {
	t.Helper()
	return newReplicaPairVia(t, false)
}

// newReplicaPairVia is newReplicaPair with the replication link through a
// fault proxy when viaProxy is set, so a test can partition the replica
// from its master while both stay up (a lagging replica: SIGSTOP does not
// make one, since the kernel keeps buffering the master's stream).
//
// It waits for a write made after the sync to reach the replica, not for
// master_link_status:up: after a diskless full sync, Redis 7.0 starts
// streaming to the replica only at its first REPLCONF ACK the master
// counts, and in about a third of syncs that is the replica's once-a-second
// ACK, so for up to a second the replica reports a live link and holds none
// of the master's new writes (measured: 4 of 12 syncs on this machine; see
// docs/RELIABILITY.md). A master killed in that second loses everything.
func newReplicaPairVia(t testing.TB, viaProxy bool) *replicaPair {
	t.Helper()
	return startReplicaPair(t, "redis-server", viaProxy)
}

// startReplicaPair is newReplicaPairVia on binary (redis-server or
// valkey-server), with extra arguments for both servers.
func startReplicaPair(t testing.TB, binary string, viaProxy bool, extra ...string) *replicaPair {
	t.Helper()
	start := func(extra ...string) *redisServer {
		if binary == "valkey-server" {
			requireValkey(t)
		} else {
			requireRedisServer(t)
		}
		srv, err := startServerBinary(binary, t.TempDir(), freePort(t), extra...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Stop)
		return srv
	}
	extra = append([]string{"--repl-diskless-sync-delay", "0"}, extra...)
	master := start(extra...)
	upstream := master.Addr
	p := &replicaPair{master: master}
	if viaProxy {
		p.link = newFaultProxy(t, master.Addr)
		upstream = p.link.Addr()
	}
	host, port, _ := strings.Cut(upstream, ":")
	p.replica = start(append(extra, "--replicaof", host, port)...)
	p.masterRDB = redis.NewClient(&redis.Options{Addr: master.Addr, ContextTimeoutEnabled: true})
	p.replicaRDB = redis.NewClient(&redis.Options{Addr: p.replica.Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { p.masterRDB.Close(); p.replicaRDB.Close() })
	ctx := context.Background()
	waitUntil(t, "the replica streams the master's writes", func() bool {
		if err := p.masterRDB.Set(ctx, "replica-pair-probe", "1", 0).Err(); err != nil {
			return false
		}
		n, err := p.replicaRDB.Exists(ctx, "replica-pair-probe").Result()
		return err == nil && n == 1
	})
	if err := p.masterRDB.Del(ctx, "replica-pair-probe").Err(); err != nil {
		t.Fatal(err)
	}
	return p
}

// freeze stops the replica process (SIGSTOP): it stays connected but
// acknowledges nothing, as a replica stuck or cut off would. thaw resumes it;
// it is also registered as cleanup.
func (p *replicaPair) freeze(t *testing.T) (thaw func()) {
	t.Helper()
	if err := p.replica.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatalf("SIGSTOP the replica: %v", err)
	}
	thawed := false
	thaw = func() {
		if !thawed {
			thawed = true
			_ = p.replica.cmd.Process.Signal(syscall.SIGCONT)
		}
	}
	t.Cleanup(thaw)
	return thaw
}

// TestReplicaAcksOnARealReplica verifies WithReplicaAcks with a real
// replica: with the replica keeping up, a first execution still costs two
// round trips and a replay one (WAIT is pipelined behind the script), and
// the record is on the replica when the caller gets its answer.
func TestReplicaAcksOnARealReplica(t *testing.T) {
	t.Parallel()
	p := newReplicaPair(t)
	rt := &roundTrips{}
	p.masterRDB.AddHook(rt)
	prefix := "acks:" + t.Name() + ":"
	store := NewRedisStore(p.masterRDB, WithKeyPrefix(prefix), WithReplicaAcks(1, 5*time.Second), WithRedisLogger(nil))
	env := newTestEnv(t, store, envConfig{})
	ctx := testCtx(t)
	if _, err := env.client.Do(withKey(ctx, "warm"), &testingv1.DoRequest{}); err != nil {
		t.Fatal(err) // the first use of each script loads it
	}
	for i, want := range []int64{2, 1} {
		before := rt.n.Load()
		if _, err := env.client.Do(withKey(ctx, "acked"), &testingv1.DoRequest{}); err != nil {
			t.Fatal(err)
		}
		if got := rt.n.Load() - before; got != want {
			t.Fatalf("call %d: %d Redis round trips, want %d (WAIT must ride in the script's pipeline)", i+1, got, want)
		}
		if i == 0 {
			// No polling: the answer came after the replica acknowledged.
			rec, err := rawRedisRecord(ctx, p.replicaRDB, prefix+StoreKey(methodDo, "", "acked"))
			if err != nil {
				t.Fatalf("the replica lacks the outcome when the caller got its answer: %v", err)
			}
			if r, err := decodeRecord(rec); err != nil || r.GetStatus() == nil {
				t.Fatalf("the replica holds %v, %v; want the completed record", r, err)
			}
		}
	}
	if n := env.svc.Runs.Load(); n != 2 {
		t.Fatalf("handler ran %d times, want 2 (warm-up and one key)", n)
	}
}

// TestReplicaAcksRefusedClaim verifies that a claim no replica acknowledged
// is released and answered Unavailable (STORE_NOT_REPLICATED), and that the
// handler does not run; once the replica is back, the same key runs once.
func TestReplicaAcksRefusedClaim(t *testing.T) {
	t.Parallel()
	p := newReplicaPair(t)
	prefix := "acks:" + t.Name() + ":"
	store := NewRedisStore(p.masterRDB, WithKeyPrefix(prefix), WithReplicaAcks(1, 200*time.Millisecond), WithRedisLogger(nil))
	env := newTestEnv(t, store, envConfig{})
	ctx := testCtx(t)
	thaw := p.freeze(t)
	_, err := env.client.Do(withKey(ctx, "unacked-claim"), &testingv1.DoRequest{})
	wantStatus(t, err, codes.Unavailable, ReasonNotReplicated)
	if n := env.svc.Runs.Load(); n != 0 {
		t.Fatalf("handler ran %d times on an unreplicated claim", n)
	}
	if n := p.masterRDB.Exists(ctx, prefix+StoreKey(methodDo, "", "unacked-claim")).Val(); n != 0 {
		t.Fatalf("the unreplicated claim was left on the master")
	}
	thaw()
	waitUntil(t, "the replica acknowledges again", func() bool {
		_, err := env.client.Do(withKey(ctx, "unacked-claim"), &testingv1.DoRequest{})
		return err == nil
	})
	if n := env.svc.Runs.Load(); n != 1 {
		t.Fatalf("handler ran %d times, want 1", n)
	}
}

// TestReplicaAcksUnreplicatedOutcome verifies that an outcome no replica
// acknowledged is retried until the complete timeout and then reported as
// not_replicated, with a warning, while the caller still gets its answer;
// nothing is reported stored that was not acknowledged.
func TestReplicaAcksUnreplicatedOutcome(t *testing.T) {
	skipUnlessLong(t)
	p := newReplicaPair(t)
	prefix := "acks:" + t.Name() + ":"
	log, buf := bufferLogger()
	// A healthy replica acknowledges well within the second, even on a
	// busy machine; once frozen, every outcome write waits the second out.
	store := NewRedisStore(p.masterRDB, WithKeyPrefix(prefix), WithReplicaAcks(1, time.Second), WithRedisLogger(nil))
	started, release := make(chan struct{}), make(chan struct{})
	env := newTestEnv(t, store, envConfig{svc: &testService{OnDo: blockingFirstRun(started, release)},
		opts: []Option{WithCompleteTimeout(3 * time.Second), WithLogger(log)}})
	ctx := testCtx(t)
	done := make(chan error, 1)
	go func() {
		_, err := env.client.Do(withKey(ctx, "unacked-outcome"), &testingv1.DoRequest{})
		done <- err
	}()
	select {
	case <-started:
	case err := <-done:
		t.Fatalf("the call ended before its handler ran: %v", err)
	}
	thaw := p.freeze(t)
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("the caller's answer: %v", err)
	}
	env.events.waitFor(t, OutcomeNotReplicated, 1)
	if n := env.events.count(OutcomeExecuted); n != 0 {
		t.Fatalf("%d executed events: an unacknowledged outcome was reported stored", n)
	}
	if !strings.Contains(buf.String(), "not_replicated") {
		t.Fatalf("no warning logged:\n%s", buf.String())
	}
	thaw()
}

// TestReplicaAcksOnCluster verifies that on Redis Cluster the WAIT goes to
// the key's own master, pipelined with the script (a keyless WAIT would go
// to an arbitrary shard): on a cluster without replicas every claim is
// refused as not replicated, never with a routing error, and nothing runs.
func TestReplicaAcksOnCluster(t *testing.T) {
	t.Parallel()
	addrs := sharedCluster(t)
	c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, ContextTimeoutEnabled: true})
	t.Cleanup(func() { c.Close() })
	store := NewRedisStore(c, WithKeyPrefix("acks:"+t.Name()+":"), WithReplicaAcks(1, 50*time.Millisecond), WithRedisLogger(nil))
	env := newTestEnv(t, store, envConfig{})
	ctx := testCtx(t)
	for i := 0; i < 12; i++ { // keys spread over the three masters
		_, err := env.client.Do(withKey(ctx, "cluster-"+strconv.Itoa(i)), &testingv1.DoRequest{})
		wantStatus(t, err, codes.Unavailable, ReasonNotReplicated)
		if e, _ := env.events.last(OutcomeStoreUnavailable); e.Err == nil || !strings.Contains(e.Err.Error(), "0 of 1 replicas") {
			t.Fatalf("call %d: store error %v, want \"0 of 1 replicas acknowledged\"", i, e.Err)
		}
	}
	if n := env.svc.Runs.Load(); n != 0 {
		t.Fatalf("handler ran %d times", n)
	}
}
