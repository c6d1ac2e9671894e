package idempotency

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// acks is what a RedisStore waits for after each claim and outcome write.
type acks struct {
	fsync    bool // WAITAOF (behind a WAIT when replicas > 0), instead of WAIT
	replicas int
	timeout  time.Duration
	option   string // the option that set it, for messages
}

func (a acks) none() bool { return a.option == "" }

// maxWait is the longest the acknowledgement commands may block a write.
func (a acks) maxWait() time.Duration {
	if a.fsync && a.replicas > 0 {
		return 2 * a.timeout // WAIT, then WAITAOF
	}
	return a.timeout
}

// commands are the acknowledgement commands to pipeline behind a script;
// the reply of the last one decides.
//
// For WAITAOF with replicas, a WAIT goes first. The master asks its
// replicas for their offsets (REPLCONF GETACK) when a WAIT or WAITAOF
// blocks, and sends that request in the same write as the script's
// replicated effects; a replica that reads both at once answers with the
// offset it had fsynced before the write, and then acknowledges again only
// with its once-a-second REPLCONF ACK. So a WAITAOF right behind the write waited
// about a second on Valkey 8.0.1 whatever the replica's appendfsync. The
// WAIT returns once the replica has received the write; the WAITAOF's own
// request then reaches a replica that, with appendfsync always, has fsynced
// it (measured: p50 about 1 ms instead of 1 s; docs/PERFORMANCE.md).
func (a acks) commands() [][]any {
	ms := max(a.timeout.Milliseconds(), 1)
	switch {
	case !a.fsync:
		return [][]any{{"WAIT", a.replicas, ms}}
	case a.replicas == 0:
		return [][]any{{"WAITAOF", 1, 0, ms}}
	}
	return [][]any{{"WAIT", a.replicas, ms}, {"WAITAOF", 1, a.replicas, ms}}
}

// check reads the reply of the last of commands: nil when enough
// acknowledged, else an error wrapping ErrNotReplicated.
func (a acks) check(reply *redis.Cmd) error {
	if a.fsync {
		n, err := reply.Int64Slice()
		switch {
		case err != nil:
			return fmt.Errorf("%w: WAITAOF failed: %v", ErrNotReplicated, err)
		case len(n) != 2:
			return fmt.Errorf("%w: WAITAOF replied %v", ErrNotReplicated, n)
		case n[0] < 1:
			return fmt.Errorf("%w: the master did not fsync its AOF within %v", ErrNotReplicated, a.timeout)
		case n[1] < int64(a.replicas):
			return fmt.Errorf("%w: %d of %d replicas fsynced within %v", ErrNotReplicated, n[1], a.replicas, a.timeout)
		}
		return nil
	}
	n, err := reply.Int64()
	switch {
	case err != nil:
		return fmt.Errorf("%w: WAIT failed: %v", ErrNotReplicated, err)
	case n < int64(a.replicas):
		return fmt.Errorf("%w: %d of %d replicas acknowledged within %v", ErrNotReplicated, n, a.replicas, a.timeout)
	}
	return nil
}

func setAcks(option string, a acks) RedisOption {
	a.option = option
	return func(s *RedisStore) {
		if !s.acks.none() && s.acks.option != option {
			badOption(option, a.replicas, fmt.Sprintf("%s was given too: choose one (WithFsyncAcks(n, ...) already waits for n replicas, fsynced)", s.acks.option))
		}
		s.acks = a
	}
}

// WithReplicaAcks makes the store wait, after each claim and each outcome
// write, until at least replicas replicas have acknowledged it, for at most
// timeout: Redis's WAIT, pipelined behind the script on the same connection
// (on Cluster, the key's own master), so it costs no extra round trip when
// the replicas keep up. A claim that too few replicas acknowledged is
// released at once and the call is answered Unavailable (reason
// STORE_NOT_REPLICATED) without running the handler; an outcome write that
// too few acknowledged is retried until [WithCompleteTimeout] ends, then
// reported as not_replicated with a warning (a failover may then lose it,
// and the key run again once its replicated claim's lease ends). WAIT is no
// guarantee that a failover keeps the write (see docs/RELIABILITY.md); it
// closes the common gap of a master dying before its replica received the
// last writes. While the replicas are unreachable every claim waits the
// whole timeout, replays included. Renewals, releases and
// [RedisStore.Delete] are not acknowledged: keep the lease longer than a
// failover takes. It works on a *redis.Client, a Sentinel failover client,
// a *redis.ClusterClient (the key's master) and a *redis.Ring (the key's
// shard); another client's Pipeline must send all its commands down one
// connection.
//
// go-redis resends a pipeline by itself after a read timeout or a reset
// (MaxRetries). A resent claim finds the caller's own record and renews its
// lease, and a resent outcome write rewrites its TTL, so the WAIT behind
// either waits for a write of its own connection, which follows the record
// in the replication stream: a resend never counts as acknowledged a record
// no replica holds. Give the client a ReadTimeout at least a second longer
// than timeout ([RedisStore.CheckConfig] warns otherwise): with a shorter
// one every try times out while the replicas lag, and the call is refused
// only after MaxRetries+1 read timeouts. Default: no acknowledgements. Panics
// if replicas is below 1 or timeout is not positive; NewRedisStore panics if
// [WithFsyncAcks] is given too.
func WithReplicaAcks(replicas int, timeout time.Duration) RedisOption {
	if replicas < 1 {
		badOption("WithReplicaAcks", replicas, "at least one replica must acknowledge")
	}
	if timeout <= 0 {
		badOption("WithReplicaAcks", timeout, "the timeout must be positive (WAIT 0 would block forever)")
	}
	return setAcks("WithReplicaAcks", acks{replicas: replicas, timeout: timeout})
}

// WithFsyncAcks is [WithReplicaAcks] with fsync: after each claim and each
// outcome write the store waits, for at most timeout, until the master has
// written it to its append-only file and fsynced it, and at least replicas
// replicas (0 for none) have done the same: Redis's WAITAOF, pipelined the
// same way (behind a WAIT when replicas >= 1, so that the replicas are asked
// for their fsync after they received the write). It protects against a
// restart of the master as well as a failover, even with appendfsync
// everysec on the master, which alone may lose the last second of writes.
// What happens when too few acknowledge is as for WithReplicaAcks; with
// replicas >= 1 a write may wait up to twice timeout (the WAIT, then the
// WAITAOF) before it is refused.
//
// With replicas >= 1, run the replicas with appendfsync always. A replica
// with appendfsync everysec fsyncs up to a second after each write, and
// every claim and outcome write waits for that fsync: on Valkey 8.0.1 about
// one second per write with everysec against about a millisecond with
// always (BenchmarkFsyncAcks, docs/PERFORMANCE.md). The master's own
// appendfsync costs nothing here (it fsyncs at once for a waiting WAITAOF).
// A master cannot see its replicas' settings, so [RedisStore.CheckConfig]
// cannot check this one: set it on every replica, and on every server a
// failover can turn into one. The store logs a warning, once, the first
// time an acknowledged write took longer than half a second.
//
// It needs Redis 7.2 or later (or Valkey) with appendonly yes on every
// master and on the replicas it counts. An older server, or appendonly no, refuses WAITAOF, so every claim
// is released and refused (Unavailable, STORE_NOT_REPLICATED): nothing runs
// unprotected. NewRedisStore checks the servers at once, in the background,
// and logs what is wrong (see [WithRedisLogger]); call
// [RedisStore.CheckConfig] at startup to fail fast instead. Panics if
// replicas is negative or timeout is not positive; NewRedisStore panics if
// WithReplicaAcks is given too.
func WithFsyncAcks(replicas int, timeout time.Duration) RedisOption {
	if replicas < 0 {
		badOption("WithFsyncAcks", replicas, "the number of replicas must not be negative")
	}
	if timeout <= 0 {
		badOption("WithFsyncAcks", timeout, "the timeout must be positive (WAITAOF 0 would block forever)")
	}
	return setAcks("WithFsyncAcks", acks{fsync: true, replicas: replicas, timeout: timeout})
}

type pipeliner interface {
	Pipeline() redis.Pipeliner
}

type masterForKey interface {
	MasterForKey(ctx context.Context, key string) (*redis.Client, error)
}

// shardForKey is a redis.Ring, which routes a keyless WAIT to a random
// shard: the pipeline must go to the key's own shard instead.
type shardForKey interface {
	GetShardClientForKey(key string) (*redis.Client, error)
}

// runAcked runs script on key and, with WithReplicaAcks or WithFsyncAcks,
// pipelines the acknowledgement commands behind it on the same connection
// (the key's master on Cluster, the key's shard on a Ring). Another
// client's Pipeline must send its commands down one connection, as a
// *redis.Client's and a Sentinel failover client's do. ackErr wraps
// ErrNotReplicated when too few acknowledged.
func (s *RedisStore) runAcked(ctx context.Context, script *redis.Script, key string, args ...any) (cmd *redis.Cmd, ackErr error) {
	if s.acks.none() {
		return s.run(ctx, script, key, args...), nil
	}
	s.firstUse()
	start := time.Now()
	var wait *redis.Cmd
	if s.ackedPipe != nil {
		cmd, wait = s.ackedPipe.run(ctx, script, key, args)
	} else {
		cmd, wait = s.runAckedAlone(ctx, script, key, args)
	}
	if cmd.Err() != nil {
		return cmd, nil
	}
	return cmd, s.checkAcks(wait, start)
}

// runAckedAlone sends script and the acknowledgement commands in a pipeline
// of their own, bounded by ctx, and returns the script's reply and the
// last acknowledgement command's (nil when the script failed).
func (s *RedisStore) runAckedAlone(ctx context.Context, script *redis.Script, key string, args []any) (cmd, wait *redis.Cmd) {
	var p redis.Pipeliner
	switch c := s.client.(type) {
	case masterForKey:
		m, err := c.MasterForKey(ctx, key)
		if err != nil {
			return errCmd(ctx, fmt.Errorf("finding the master of the key: %w", err)), nil
		}
		p = m.Pipeline()
	case shardForKey:
		m, err := c.GetShardClientForKey(key)
		if err != nil {
			return errCmd(ctx, fmt.Errorf("finding the shard of the key: %w", err)), nil
		}
		p = m.Pipeline()
	case pipeliner:
		p = c.Pipeline()
	default:
		return errCmd(ctx, fmt.Errorf("%s needs a client that can pipeline, not %T", s.acks.option, s.client)), nil
	}
	exec := func(eval bool) (*redis.Cmd, *redis.Cmd) {
		var c *redis.Cmd
		if eval {
			c = script.Eval(ctx, p, []string{key}, args...)
		} else {
			c = script.EvalSha(ctx, p, []string{key}, args...)
		}
		var w *redis.Cmd
		for _, args := range s.acks.commands() {
			w = p.Do(ctx, args...)
		}
		_, _ = p.Exec(ctx)
		return c, w
	}
	both := func() (*redis.Cmd, *redis.Cmd) {
		c, w := exec(false)
		if redis.HasErrorPrefix(c.Err(), "NOSCRIPT") {
			c, w = exec(true) // loads it into the script cache too
		}
		return c, w
	}
	if s.bounded || ctx.Done() == nil {
		return both()
	}
	// The client would not bound the pipeline by ctx: bound it here.
	type result struct{ c, w *redis.Cmd }
	done := make(chan result, 1)
	go func() { c, w := both(); done <- result{c, w} }()
	select {
	case r := <-done:
		return r.c, r.w
	case <-ctx.Done():
		return errCmd(ctx, ctx.Err()), nil
	}
}

// checkAcks reads the reply of the last acknowledgement command of a write
// sent at start (see acks.check), and warns, once, about a slow replica
// fsync.
func (s *RedisStore) checkAcks(wait *redis.Cmd, start time.Time) error {
	if wait == nil {
		return fmt.Errorf("%w: no acknowledgement command was sent", ErrNotReplicated)
	}
	ackErr := s.acks.check(wait)
	if took := time.Since(start); ackErr == nil && s.acks.fsync && s.acks.replicas > 0 && took > slowFsync && s.logger != nil {
		s.slowFsync.Do(func() {
			s.logger.Warn(fmt.Sprintf("idempotency: redis store: a write acknowledged by WithFsyncAcks(%d) took %v: a replica with appendfsync everysec makes every write wait up to a second for its fsync. Set appendfsync always on the replicas (the master cannot report their setting)", s.acks.replicas, took.Round(time.Millisecond)),
				"prefix", s.prefix)
		})
	}
	return ackErr
}

// routesByKey reports whether client sends a key's commands to the key's
// own node (a Cluster, a Ring): a keyless WAIT in a shared pipeline would
// then reach another node than the writes it should count.
func routesByKey(client redis.Scripter) bool {
	switch client.(type) {
	case masterForKey, shardForKey:
		return true
	}
	return false
}

// slowFsync is how long a write acknowledged with fsyncs may take before the
// store warns, once, about the replicas' appendfsync: with always a write
// takes milliseconds, with everysec about a second.
const slowFsync = 500 * time.Millisecond
