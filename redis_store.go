package idempotency

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// DefaultKeyPrefix is the prefix of every Redis key a [RedisStore] writes,
// unless changed with [WithKeyPrefix].
const DefaultKeyPrefix = "idempotency:"

var (
	//go:embed scripts/claim.lua
	claimLua string
	//go:embed scripts/renew.lua
	renewLua string
	//go:embed scripts/complete.lua
	completeLua string
	//go:embed scripts/release.lua
	releaseLua string
	//go:embed scripts/inspect.lua
	inspectLua string
	//go:embed scripts/forget.lua
	forgetLua string

	claimScript    = redis.NewScript(claimLua)
	renewScript    = redis.NewScript(renewLua)
	completeScript = redis.NewScript(completeLua)
	releaseScript  = redis.NewScript(releaseLua)
	inspectScript  = redis.NewScript(inspectLua)
	forgetScript   = redis.NewScript(forgetLua)
)

// RedisStore is a [Store] on Redis. Each record is one Redis string (its
// state, its owner token, the owner's fence and the encoded record; records written as hashes
// by earlier versions are still read and acted on), and each step (claim,
// renew, complete, release) is one Lua script touching that one key, so it
// is atomic, costs one round trip, and works unchanged on Redis Cluster. A
// replay costs one script call (the claim returns the stored record); a
// first execution costs two (claim, complete), plus one renewal per quarter
// of the lease while a slow handler runs. The script calls of concurrent
// calls travel together in shared pipelines ([WithPipelining]), so under
// load a round trip carries many calls' scripts.
//
// Durability is Redis's: with asynchronous replication a failover can lose
// a record written just before it, and without AOF a restart loses all of
// them. Use appendonly yes (appendfsync everysec or always) for payments, and
// maxmemory-policy noeviction: any other policy lets Redis evict records,
// in-progress claims included, and a retry of an evicted key runs again.
// [RedisStore.CheckConfig] reports both the eviction policy and a client
// that ignores context deadlines; the store logs its findings once, on
// first use.
type RedisStore struct {
	client redis.Scripter
	prefix string
	logger *slog.Logger
	// bounded is set when the client is known to honour context deadlines
	// itself (ContextTimeoutEnabled). Otherwise every call is bounded by the
	// store, so a hung Redis cannot hold a call past its deadline.
	bounded bool
	checked sync.Once
	// slowFsync: the warning about a slow replica fsync, logged once.
	slowFsync sync.Once
	// acks: WithReplicaAcks or WithFsyncAcks (zero: no acknowledgements).
	acks acks
	// pipelines is WithPipelining's n. When it is positive and the client
	// can pipeline, pipe sends the script calls, and ackedPipe, with
	// acknowledgements on a client that is not a Cluster or a Ring, the
	// acknowledged ones (claims and outcome writes); nil otherwise.
	pipelines int
	pipe      *autoPipeline
	ackedPipe *autoPipeline
}

// RedisOption configures a [RedisStore].
type RedisOption func(*RedisStore)

// WithKeyPrefix sets the prefix of the store's Redis keys. Default
// [DefaultKeyPrefix] ("idempotency:").
func WithKeyPrefix(prefix string) RedisOption {
	return func(s *RedisStore) { s.prefix = prefix }
}

// WithRedisLogger sets where the store logs, once, what
// [RedisStore.CheckConfig] finds on first use, and, once, a write that
// [WithFsyncAcks] made wait more than half a second. Default
// slog.Default(); nil turns both off.
func WithRedisLogger(l *slog.Logger) RedisOption {
	return func(s *RedisStore) { s.logger = l }
}

// WithPipelining sets how many pipelines the store keeps in flight at
// most: the claims, outcome writes and releases of concurrent calls are
// sent together, one write and one read per pipeline instead of one per
// call, which costs the server and Redis less per call (docs/PERFORMANCE.md).
// A call alone (nothing queued or in flight, and no pipeline shared
// lately) is sent at once as a single command from its caller's goroutine
// when the client honours contexts itself, and otherwise in a pipeline of
// its own; a call waits for its reply only as long as its context allows,
// whatever the client's ContextTimeoutEnabled. The script calls are the
// same either way, so records, script calls per call and every guarantee
// are unchanged; go-redis hooks see pipelines, without the calls'
// contexts. 0 sends each script call on its own, as a single command on
// the caller's context. Default [DefaultPipelines]. With [WithReplicaAcks]
// or [WithFsyncAcks], the claims and outcome writes go in pipelines of
// their own, each ending with one WAIT (or WAIT and WAITAOF), which
// answers for every write in it; on a Cluster or a Ring, whose WAIT must
// reach each key's own node, they are not pipelined. It does not apply to
// a client that cannot pipeline. Panics if n is negative.
func WithPipelining(n int) RedisOption {
	if n < 0 {
		badOption("WithPipelining", n, "the number of pipelines must not be negative (0 turns pipelining off)")
	}
	return func(s *RedisStore) { s.pipelines = n }
}

// NewRedisStore returns a store on client, typically a
// redis.UniversalClient: a *redis.Client, a Sentinel failover client or a
// *redis.ClusterClient all work. Create the client with
// ContextTimeoutEnabled: true, so that go-redis itself honours the deadlines
// the interceptor sets (the renewals' tries, and the calls it sends as
// single commands: all of them with WithPipelining(0), the acknowledged
// ones on a Cluster or a Ring). Without it go-redis waits for its own
// ReadTimeout instead, and the store bounds such a call itself, at the
// cost of a goroutine per call.
func NewRedisStore(client redis.Scripter, opts ...RedisOption) *RedisStore {
	s := &RedisStore{client: client, prefix: DefaultKeyPrefix, logger: slog.Default(), pipelines: DefaultPipelines}
	for _, opt := range opts {
		if opt != nil {
			opt(s)
		}
	}
	s.bounded = contextTimeoutEnabled(client) == 1
	if p, ok := client.(pipeliner); ok && s.pipelines > 0 {
		s.pipe = newAutoPipeline(p, s.pipelines, acks{}, s.runAlone, s.bounded)
		if !s.acks.none() && !routesByKey(client) {
			s.ackedPipe = newAutoPipeline(p, s.pipelines, s.acks, s.runAckedAlone, s.bounded)
		}
	}
	if s.acks.fsync && s.logger != nil {
		// Say at once whether the servers can honour WithFsyncAcks.
		s.firstUse()
	}
	return s
}

// run runs script, bounded by ctx even when the client would wait for its
// own ReadTimeout. A command abandoned that way may still be applied; every
// caller treats an error as "maybe applied", as it must for any network
// error.
func (s *RedisStore) run(ctx context.Context, script *redis.Script, key string, args ...any) *redis.Cmd {
	s.firstUse()
	if s.pipe != nil {
		cmd, _ := s.pipe.run(ctx, script, key, args)
		return cmd
	}
	cmd, _ := s.runAlone(ctx, script, key, args)
	return cmd
}

// runAlone sends script as a command of its own, bounded by ctx even when
// the client would wait for its own ReadTimeout (with a goroutine).
func (s *RedisStore) runAlone(ctx context.Context, script *redis.Script, key string, args []any) (*redis.Cmd, *redis.Cmd) {
	keys := []string{key}
	if s.bounded || ctx.Done() == nil {
		return script.Run(ctx, s.client, keys, args...), nil
	}
	done := make(chan *redis.Cmd, 1)
	go func() { done <- script.Run(ctx, s.client, keys, args...) }()
	select {
	case cmd := <-done:
		return cmd, nil
	case <-ctx.Done():
		return errCmd(ctx, ctx.Err()), nil
	}
}

// Claim implements [Store.Claim] with one script call.
func (s *RedisStore) Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error) {
	if err := checkExpiry("redis", "lease", lease); err != nil {
		return ClaimResult{}, err
	}
	if err := checkToken("redis", token); err != nil {
		return ClaimResult{}, err
	}
	value, err := layoutValue(stateInProgress, token, record)
	if err != nil {
		return ClaimResult{}, err
	}
	cmd, ackErr := s.runAcked(ctx, claimScript, s.prefix+key, token, value, lease.Milliseconds())
	reply, err := cmd.Result()
	if err == nil && ackErr != nil && (claimedReply(reply) || ownClaimReply(reply, token)) {
		// Claimed, or found our own claim (an earlier try of this call, its
		// reply lost: go-redis retries a pipeline by itself), but a
		// failover could lose the claim: free the key now (fenced by the
		// token), and let the caller answer Unavailable. claim.lua renews
		// an own claim's lease, so the WAIT behind it waited for a write of
		// this connection's own, which follows the claim in the stream.
		if rerr := s.fenced(ctx, "release", releaseScript, key, token); rerr != nil && !errors.Is(rerr, ErrLeaseLost) {
			return ClaimResult{}, fmt.Errorf("%w (and releasing the claim failed: %v)", ackErr, rerr)
		}
		return ClaimResult{}, ackErr
	}
	if err != nil {
		if strings.Contains(err.Error(), "WRONGTYPE") {
			// Something else wrote this key: it will never heal by retrying.
			return ClaimResult{}, fmt.Errorf("%w: redis key %s%s is not a record: %v", ErrCorruptRecord, s.prefix, key, err)
		}
		return ClaimResult{}, fmt.Errorf("idempotency: redis claim: %w", err)
	}
	res, _ := reply.([]any)
	switch {
	case len(res) == 2 && res[0] == int64(1):
		fence, _ := res[1].(int64)
		if fence <= 0 {
			return ClaimResult{}, fmt.Errorf("idempotency: redis claim: claimed with fence %v", res[1])
		}
		return ClaimResult{Claimed: true, Fence: uint64(fence)}, nil
	case len(res) == 1 && res[0] == int64(2):
		return ClaimResult{}, ErrLeaseLost
	case len(res) != 3 && len(res) != 4:
		return ClaimResult{}, fmt.Errorf("idempotency: redis claim: unexpected reply %v", reply)
	}
	rec, ok := res[1].(string)
	if !ok {
		return ClaimResult{}, fmt.Errorf("idempotency: redis claim: unexpected record type %T", res[1])
	}
	var out ClaimResult
	var fence uint64
	if out.Record, fence, err = s.replyRecord(key, rec, len(res) == 4); err != nil {
		return ClaimResult{}, err
	}
	if len(res) == 4 && rec[1] == stateInProgress {
		out.Fence = fence
	}
	if ms, _ := res[2].(int64); ms > 0 {
		out.TTL = time.Duration(ms) * time.Millisecond
	}
	return out, nil
}

// claimedReply reports whether reply, from claim.lua, says claimed.
func claimedReply(reply any) bool {
	res, _ := reply.([]any)
	return len(res) == 2 && res[0] == int64(1)
}

// ownClaimReply reports whether reply, from claim.lua, is token's own
// in-progress layout-2 or layout-3 record.
func ownClaimReply(reply any, token string) bool {
	res, _ := reply.([]any)
	if len(res) != 4 {
		return false
	}
	v, _ := res[1].(string)
	n := 3 + len(token)
	return len(v) >= n && (v[0] == layout2 || v[0] == layout3) && v[1] == stateInProgress && int(v[2]) == len(token) && v[3:n] == token
}

// Renew implements [Store.Renew].
func (s *RedisStore) Renew(ctx context.Context, key, token string, lease time.Duration) error {
	if err := checkExpiry("redis", "lease", lease); err != nil {
		return err
	}
	if err := checkToken("redis", token); err != nil {
		return err
	}
	return s.fenced(ctx, "renew", renewScript, key, token, lease.Milliseconds())
}

// RenewBatch implements [BatchRenewer]: the renewal scripts of all keys in
// one pipeline, which go-redis sends as one round trip per Redis node
// (Cluster included). Renewals are not acknowledged by replicas
// ([WithReplicaAcks]): a lost renewal costs at most a lease.
func (s *RedisStore) RenewBatch(ctx context.Context, keys, tokens []string, lease time.Duration) []error {
	errs := make([]error, len(keys))
	if err := checkExpiry("redis", "lease", lease); err != nil {
		for i := range errs {
			errs[i] = err
		}
		return errs
	}
	if slices.Contains(tokens, "") {
		// A caller's bug: Renew refuses each empty token.
		for i := range keys {
			errs[i] = s.Renew(ctx, keys[i], tokens[i], lease)
		}
		return errs
	}
	p, ok := s.client.(pipeliner)
	if !ok {
		return nil // the caller renews one by one
	}
	s.firstUse()
	send := func(eval bool, todo []int) []*redis.Cmd {
		pipe := p.Pipeline()
		cmds := make([]*redis.Cmd, len(keys))
		for _, i := range todo {
			args := []string{s.prefix + keys[i]}
			if eval {
				cmds[i] = renewScript.Eval(ctx, pipe, args, tokens[i], lease.Milliseconds())
			} else {
				cmds[i] = renewScript.EvalSha(ctx, pipe, args, tokens[i], lease.Milliseconds())
			}
		}
		if s.bounded || ctx.Done() == nil {
			_, _ = pipe.Exec(ctx)
			return cmds
		}
		done := make(chan struct{})
		go func() { _, _ = pipe.Exec(ctx); close(done) }()
		select {
		case <-done:
			return cmds
		case <-ctx.Done():
			return nil
		}
	}
	all := make([]int, len(keys))
	for i := range all {
		all[i] = i
	}
	cmds := send(false, all)
	if cmds == nil {
		for i := range errs {
			errs[i] = fmt.Errorf("idempotency: redis renew: %w", ctx.Err())
		}
		return errs
	}
	var noScript []int
	for i, c := range cmds {
		if redis.HasErrorPrefix(c.Err(), "NOSCRIPT") {
			noScript = append(noScript, i)
		}
	}
	if len(noScript) > 0 {
		// Eval loads the script into the cache too.
		again := send(true, noScript)
		for _, i := range noScript {
			if again == nil {
				cmds[i] = redis.NewCmd(ctx)
				cmds[i].SetErr(ctx.Err())
			} else {
				cmds[i] = again[i]
			}
		}
	}
	for i, c := range cmds {
		n, err := c.Int()
		switch {
		case err != nil:
			if errors.Is(err, redis.Nil) {
				err = errors.New("nil reply")
			}
			errs[i] = fmt.Errorf("idempotency: redis renew: %w", err)
		case n == 0:
			errs[i] = ErrLeaseLost
		}
	}
	return errs
}

// Complete implements [Store.Complete].
func (s *RedisStore) Complete(ctx context.Context, key, token string, record []byte, ttl time.Duration) error {
	if err := checkExpiry("redis", "ttl", ttl); err != nil {
		return err
	}
	if err := checkToken("redis", token); err != nil {
		return err
	}
	value, err := layoutValue(stateCompleted, token, record)
	if err != nil {
		return err
	}
	if s.acks.none() {
		return s.fenced(ctx, "complete", completeScript, key, token, value, ttl.Milliseconds())
	}
	cmd, ackErr := s.runAcked(ctx, completeScript, s.prefix+key, token, value, ttl.Milliseconds())
	n, err := cmd.Int()
	switch {
	case err != nil:
		return fmt.Errorf("idempotency: redis complete: %w", err)
	case n == 0:
		return ErrLeaseLost
	}
	// Stored on the master; a retry of an unacknowledged write rewrites its
	// TTL (complete.lua), so its WAIT waits for a write of its own.
	return ackErr
}

// Release implements [Store.Release].
func (s *RedisStore) Release(ctx context.Context, key, token string) error {
	if err := checkToken("redis", token); err != nil {
		return err
	}
	return s.fenced(ctx, "release", releaseScript, key, token)
}

// fenced runs a script that acts only if token owns key: it returns a
// positive integer when it acted and 0 when it did not.
func (s *RedisStore) fenced(ctx context.Context, op string, script *redis.Script, key, token string, args ...any) error {
	n, err := s.run(ctx, script, s.prefix+key, append([]any{token}, args...)...).Int()
	if err != nil {
		if errors.Is(err, redis.Nil) {
			err = errors.New("nil reply")
		}
		return fmt.Errorf("idempotency: redis %s: %w", op, err)
	}
	if n == 0 {
		return ErrLeaseLost
	}
	return nil
}

// Get implements [AdminStore.Get] with one read-only script call.
func (s *RedisStore) Get(ctx context.Context, key string) ([]byte, time.Duration, error) {
	res, err := s.run(ctx, inspectScript, s.prefix+key).Slice()
	if err != nil {
		return nil, 0, fmt.Errorf("idempotency: redis get: %w", err)
	}
	if len(res) < 2 {
		return nil, 0, ErrNoRecord
	}
	rec, _ := res[0].(string)
	ms, _ := res[1].(int64)
	b, _, err := s.replyRecord(key, rec, len(res) == 4)
	if err != nil {
		return nil, 0, err
	}
	return b, time.Duration(ms) * time.Millisecond, nil
}

// replyRecord returns the record in a script's reply and its fence (see
// layoutRecord): the value itself for a layout-1 record, the record inside
// a layout-2 or layout-3 value (see redis_layout.go), which the scripts mark
// with a fourth reply element.
func (s *RedisStore) replyRecord(key, value string, layout bool) ([]byte, uint64, error) {
	if !layout {
		return []byte(value), 0, nil
	}
	b, fence, err := layoutRecord(value)
	if err != nil {
		return nil, 0, fmt.Errorf("%w (redis key %s%s)", err, s.prefix, key)
	}
	return b, fence, nil
}

// Delete implements [AdminStore.Delete]. Deleting an in-progress record
// fences its owner off for the rest of its lease (see [AdminStore]).
func (s *RedisStore) Delete(ctx context.Context, key string) error {
	n, err := s.run(ctx, forgetScript, s.prefix+key).Int()
	if err != nil {
		return fmt.Errorf("idempotency: redis delete: %w", err)
	}
	if n == 0 {
		return ErrNoRecord
	}
	return nil
}
