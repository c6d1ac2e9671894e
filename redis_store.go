package idempotency

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"strings"
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

	claimScript    = redis.NewScript(claimLua)
	renewScript    = redis.NewScript(renewLua)
	completeScript = redis.NewScript(completeLua)
	releaseScript  = redis.NewScript(releaseLua)
	inspectScript  = redis.NewScript(inspectLua)
	// deleteScript is a plain DEL, as a script so the store needs nothing
	// but redis.Scripter from its client.
	deleteScript = redis.NewScript("return redis.call('DEL', KEYS[1])")
)

// RedisStore is a [Store] on Redis. Each record is one Redis hash, and each
// step (claim, renew, complete, release) is one Lua script touching that one
// key, so it is atomic, costs one round trip, and works unchanged on Redis
// Cluster. A replay costs one round trip (the claim returns the stored
// record); a first execution costs two (claim, complete), plus one renewal
// per third of the lease while a slow handler runs.
//
// Durability is Redis's: with asynchronous replication a failover can lose
// a record written just before it, and without AOF a restart loses all of
// them. Use appendonly yes (appendfsync everysec or always) for payments.
type RedisStore struct {
	client redis.Scripter
	prefix string
}

// RedisOption configures a [RedisStore].
type RedisOption func(*RedisStore)

// WithKeyPrefix sets the prefix of the store's Redis keys. Default
// [DefaultKeyPrefix] ("idempotency:").
func WithKeyPrefix(prefix string) RedisOption {
	return func(s *RedisStore) { s.prefix = prefix }
}

// NewRedisStore returns a store on client, typically a
// redis.UniversalClient: a *redis.Client, a Sentinel failover client or a
// *redis.ClusterClient all work.
func NewRedisStore(client redis.Scripter, opts ...RedisOption) *RedisStore {
	s := &RedisStore{client: client, prefix: DefaultKeyPrefix}
	for _, opt := range opts {
		opt(s)
	}
	return s
}

// Claim implements [Store.Claim] with one script call.
func (s *RedisStore) Claim(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error) {
	res, err := claimScript.Run(ctx, s.client, []string{s.prefix + key}, token, record, lease.Milliseconds()).Slice()
	if err != nil {
		if strings.Contains(err.Error(), "WRONGTYPE") {
			// Something else wrote this key: it will never heal by retrying.
			return ClaimResult{}, fmt.Errorf("%w: redis key %s%s is not a record: %v", ErrCorruptRecord, s.prefix, key, err)
		}
		return ClaimResult{}, fmt.Errorf("idempotency: redis claim: %w", err)
	}
	if len(res) == 1 {
		return ClaimResult{Claimed: true}, nil
	}
	if len(res) != 2 {
		return ClaimResult{}, fmt.Errorf("idempotency: redis claim: unexpected reply %v", res)
	}
	rec, ok := res[1].(string)
	if !ok {
		return ClaimResult{}, fmt.Errorf("idempotency: redis claim: unexpected record type %T", res[1])
	}
	return ClaimResult{Record: []byte(rec)}, nil
}

// Renew implements [Store.Renew].
func (s *RedisStore) Renew(ctx context.Context, key, token string, lease time.Duration) error {
	return s.fenced(ctx, "renew", renewScript, key, token, lease.Milliseconds())
}

// Complete implements [Store.Complete].
func (s *RedisStore) Complete(ctx context.Context, key, token string, record []byte, ttl time.Duration) error {
	return s.fenced(ctx, "complete", completeScript, key, token, record, ttl.Milliseconds())
}

// Release implements [Store.Release].
func (s *RedisStore) Release(ctx context.Context, key, token string) error {
	return s.fenced(ctx, "release", releaseScript, key, token)
}

// fenced runs a script that acts only if token owns key: it returns a
// positive integer when it acted and 0 when it did not.
func (s *RedisStore) fenced(ctx context.Context, op string, script *redis.Script, key, token string, args ...any) error {
	n, err := script.Run(ctx, s.client, []string{s.prefix + key}, append([]any{token}, args...)...).Int()
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
	res, err := inspectScript.Run(ctx, s.client, []string{s.prefix + key}).Slice()
	if err != nil {
		return nil, 0, fmt.Errorf("idempotency: redis get: %w", err)
	}
	if len(res) < 2 {
		return nil, 0, ErrNoRecord
	}
	rec, _ := res[0].(string)
	ms, _ := res[1].(int64)
	return []byte(rec), time.Duration(ms) * time.Millisecond, nil
}

// Delete implements [AdminStore.Delete].
func (s *RedisStore) Delete(ctx context.Context, key string) error {
	n, err := deleteScript.Run(ctx, s.client, []string{s.prefix + key}).Int()
	if err != nil {
		return fmt.Errorf("idempotency: redis delete: %w", err)
	}
	if n == 0 {
		return ErrNoRecord
	}
	return nil
}
