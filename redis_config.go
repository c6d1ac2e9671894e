package idempotency

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// contextTimeoutEnabled reports whether a go-redis client honours context
// deadlines on its socket reads: 1 yes, 0 no, -1 unknown (a wrapper or
// another client type).
func contextTimeoutEnabled(client redis.Scripter) int {
	var on bool
	switch c := client.(type) {
	case interface{ Options() *redis.Options }:
		on = c.Options().ContextTimeoutEnabled
	case interface{ Options() *redis.ClusterOptions }:
		on = c.Options().ContextTimeoutEnabled
	case interface{ Options() *redis.RingOptions }:
		on = c.Options().ContextTimeoutEnabled
	default:
		return -1
	}
	if on {
		return 1
	}
	return 0
}

// readTimeout returns a go-redis client's ReadTimeout (0: none) and how many
// times it retries a failed command or pipeline by itself; ok is false for
// a client of another type.
func readTimeout(client redis.Scripter) (timeout time.Duration, retries int, ok bool) {
	switch c := client.(type) {
	case interface{ Options() *redis.Options }:
		o := c.Options()
		return o.ReadTimeout, o.MaxRetries, true
	case interface{ Options() *redis.ClusterOptions }:
		o := c.Options()
		return o.ReadTimeout, o.MaxRetries, true
	case interface{ Options() *redis.RingOptions }:
		o := c.Options()
		return o.ReadTimeout, o.MaxRetries, true
	}
	return 0, 0, false
}

// ackTimeoutProblem is CheckConfig's warning about a client whose
// ReadTimeout ends before an acknowledgement wait can: the read then times
// out while WAIT still waits, go-redis sends the script and its WAIT again
// on a new connection (MaxRetries times), and a refused claim or outcome
// takes that many read timeouts and is reported as a store failure instead
// of not_replicated.
func (s *RedisStore) ackTimeoutProblem() string {
	if s.acks.none() {
		return ""
	}
	rt, retries, ok := readTimeout(s.client)
	wait := s.acks.maxWait()
	if !ok || rt <= 0 || rt >= wait+time.Second {
		return ""
	}
	return fmt.Sprintf("the go-redis client's ReadTimeout (%v) is not at least a second longer than %s's wait (up to %v): while the replicas lag, the read times out before WAIT answers, go-redis resends the write and its WAIT up to %d more times, and the claim is refused only after all of them, as a store failure (STORE_UNAVAILABLE) rather than STORE_NOT_REPLICATED. Set ReadTimeout above %v, or shorten the acknowledgement timeout",
		rt, s.acks.option, wait, retries, wait+time.Second)
}

type configGetter interface {
	ConfigGet(ctx context.Context, parameter string) *redis.MapStringStringCmd
	Info(ctx context.Context, section ...string) *redis.StringCmd
	Do(ctx context.Context, args ...any) *redis.Cmd
}

type shardIterator interface {
	ForEachShard(ctx context.Context, fn func(ctx context.Context, client *redis.Client) error) error
}

type masterIterator interface {
	ForEachMaster(ctx context.Context, fn func(ctx context.Context, client *redis.Client) error) error
}

// CheckConfig reads the settings the store's guarantee depends on and
// returns one warning per problem it finds, or none:
//
//   - a maxmemory-policy other than noeviction, on any master: Redis may then
//     evict records, in-progress claims included, and a retry of an evicted
//     key runs the handler again;
//   - with [WithReplicaAcks] or [WithFsyncAcks], a master with fewer
//     connected replicas than asked, so that every claim would be refused;
//   - with WithFsyncAcks, a master without WAITAOF (Redis before 7.2) or
//     with appendonly no, which refuses every claim;
//   - with WithReplicaAcks or WithFsyncAcks, a go-redis client whose
//     ReadTimeout is not at least a second longer than the acknowledgement
//     wait: while the replicas lag, the client's read times out first and
//     go-redis resends the write and its WAIT, so a refused call takes
//     MaxRetries+1 read timeouts;
//   - a server that refuses CONFIG GET or INFO (as some managed services
//     do), so the settings could not be checked;
//   - a go-redis client created without ContextTimeoutEnabled, which waits
//     for its own ReadTimeout instead of the deadlines the interceptor sets
//     (the store then bounds such calls itself, with a goroutine per call:
//     every renewal try, and every call with WithPipelining(0) or, on a
//     Cluster or a Ring, with acknowledgements; pipelined calls wait on
//     their own context at no cost).
//
// The store runs it once, in the background, on first use (at construction
// with WithFsyncAcks), and logs each warning at Warn (see
// [WithRedisLogger]); call it at startup to fail fast instead.
func (s *RedisStore) CheckConfig(ctx context.Context) []string {
	var warnings []string
	switch contextTimeoutEnabled(s.client) {
	case 0:
		warnings = append(warnings, "the go-redis client was created without ContextTimeoutEnabled: true, so it ignores context deadlines and waits for its ReadTimeout; the store bounds its renewals (and every call when unpipelined, or acknowledged on a Cluster or a Ring) itself, with a goroutine per call. Set ContextTimeoutEnabled: true in the client options")
	case -1:
		// A wrapper of unknown type: the store bounds its calls itself, and
		// that is all that matters; nothing to tell.
	}
	if w := s.ackTimeoutProblem(); w != "" {
		warnings = append(warnings, w)
	}
	problems, err := s.bound(ctx, s.masterProblems)
	if err != nil {
		warnings = append(warnings, fmt.Sprintf("could not check maxmemory-policy and the other settings (%v): make sure maxmemory-policy is noeviction, or Redis may evict idempotency records, in-progress claims included, and a retry of an evicted key runs the handler again", err))
	}
	return append(warnings, problems...)
}

// masterProblems checks every master's settings (see CheckConfig).
func (s *RedisStore) masterProblems(ctx context.Context) ([]string, error) {
	var (
		mu       sync.Mutex
		problems []string
	)
	report := func(format string, args ...any) {
		mu.Lock()
		problems = append(problems, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	check := func(ctx context.Context, c configGetter, where string) error {
		m, err := c.ConfigGet(ctx, "maxmemory-policy").Result()
		if err != nil {
			return err
		}
		p, ok := m["maxmemory-policy"]
		if !ok {
			return fmt.Errorf("no maxmemory-policy in the CONFIG GET reply")
		}
		if p != "noeviction" {
			max := "?"
			if mm, err := c.ConfigGet(ctx, "maxmemory").Result(); err == nil {
				max = mm["maxmemory"]
			}
			report("%s has maxmemory-policy %s (maxmemory %s): Redis may evict idempotency records, in-progress claims included, when it reaches maxmemory, and a retry of an evicted key runs the handler again. Set maxmemory-policy noeviction", where, p, max)
		}
		if s.acks.none() {
			return nil
		}
		info, err := c.Info(ctx, "replication").Result()
		if err != nil {
			return err
		}
		if n := infoInt(info, "connected_slaves"); n >= 0 && n < s.acks.replicas {
			report("%s has %d connected replicas but %s asks for %d: every claim will be refused (Unavailable, STORE_NOT_REPLICATED)", where, n, s.acks.option, s.acks.replicas)
		}
		if !s.acks.fsync {
			return nil
		}
		// COMMAND INFO answers [nil] for a command the server lacks.
		if ci, err := c.Do(ctx, "COMMAND", "INFO", "WAITAOF").Slice(); err != nil || len(ci) != 1 || ci[0] == nil {
			report("%s does not support WAITAOF (Redis 7.2 or later, or Valkey, is needed): WithFsyncAcks cannot be honoured and every claim will be refused (Unavailable, STORE_NOT_REPLICATED). Upgrade, or use WithReplicaAcks", where)
			return nil
		}
		if m, err := c.ConfigGet(ctx, "appendonly").Result(); err != nil {
			return err
		} else if m["appendonly"] != "yes" {
			report("%s has appendonly %s: WAITAOF needs appendonly yes, so WithFsyncAcks cannot be honoured and every claim will be refused (Unavailable, STORE_NOT_REPLICATED)", where, m["appendonly"])
		}
		return nil
	}
	var err error
	switch c := s.client.(type) {
	case masterIterator:
		err = c.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			return check(ctx, m, "master "+m.Options().Addr)
		})
	case shardIterator: // a Ring: every shard is a master
		err = c.ForEachShard(ctx, func(ctx context.Context, m *redis.Client) error {
			return check(ctx, m, "shard "+m.Options().Addr)
		})
	case configGetter:
		err = check(ctx, c, "the server")
	default:
		err = fmt.Errorf("the client (%T) cannot send CONFIG GET", s.client)
	}
	return problems, err
}

// infoInt reads an integer field from an INFO reply; -1 if absent.
func infoInt(info, field string) int {
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			if n, err := strconv.Atoi(v); err == nil {
				return n
			}
		}
	}
	return -1
}

// bound runs f, returning when ctx ends even if the client ignores it.
func (s *RedisStore) bound(ctx context.Context, f func(context.Context) ([]string, error)) ([]string, error) {
	if s.bounded {
		return f(ctx)
	}
	type result struct {
		v   []string
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := f(ctx)
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// firstUse starts, once per store, the background check of the servers'
// settings (logConfig), unless logging is off.
func (s *RedisStore) firstUse() {
	if s.logger != nil {
		s.checked.Do(func() { go s.logConfig() })
	}
}

// logConfig logs what CheckConfig finds, once per store.
func (s *RedisStore) logConfig() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, w := range s.CheckConfig(ctx) {
		s.logger.Warn("idempotency: redis store: "+w, "prefix", s.prefix)
	}
}
